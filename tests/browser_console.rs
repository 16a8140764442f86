//! The `/ui` console in a real browser: Debian's Chromium, driven by
//! `tests/browser/console.mjs` (Node and `playwright-core`), signs in through
//! a real OpenID provider, watches a chat request arrive as events and checks
//! that the page logged no error or warning and fits a phone's width.
//!
//! Skipped, saying so, when the provider's Python package, Chromium or
//! `tests/browser/node_modules` is missing — except under `CI=true`, where
//! `.ci/run` installs all three and a skip would hide that it never ran.

mod support;
// Not declared by support/mod.rs; included as tests/oidc_login.rs does.
#[path = "support/real_oidc.rs"]
mod real_oidc;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use real_oidc::RealProvider;
use serde_json::{json, Value};
use support::TestServer;
use tollgate::config::OidcConfig;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/console.mjs");
const NODE_MODULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/node_modules");
/// The script stops itself after 60 s; this is the backstop.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(90);
/// Environment variables that would send the browser or Node elsewhere.
const CLEARED_ENV: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

/// Whether this test can run here; `Err` says what is missing. Under
/// `CI=true` a missing piece fails the test instead.
fn missing_tools() -> Result<PathBuf, String> {
    let chromium = PathBuf::from(
        std::env::var("CHROMIUM_PATH").unwrap_or_else(|_| "/usr/bin/chromium".to_owned()),
    );
    if !chromium.exists() {
        return Err(format!(
            "no Chromium at {} (apt-get install chromium, or set CHROMIUM_PATH)",
            chromium.display()
        ));
    }
    if !Path::new(NODE_MODULES).join("playwright-core").exists() {
        return Err(
            "tests/browser/node_modules is not installed (cd tests/browser && npm ci)".into(),
        );
    }
    Ok(chromium)
}

fn skip_or_fail(reason: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the browser test cannot run in CI: {reason}; .ci/run installs what it needs"
    );
    println!("skipping: {reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_signs_in_and_shows_a_requests_events_in_chromium() {
    let chromium = match missing_tools() {
        Ok(chromium) => chromium,
        Err(reason) => return skip_or_fail(&reason),
    };
    let Some(provider) = RealProvider::start() else {
        return;
    };
    provider
        .set_user(
            "alice",
            json!({"name": "Alice Example", "email": "alice@example.com", "groups": ["ops"]}),
        )
        .await;

    // The redirect URL needs the server's port, so OIDC is set once it runs.
    let server = TestServer::start(|c| c.features.websocket.require_auth = true).await;
    let mut config = (**server.state.config.load()).clone();
    config.auth.oidc = Some(OidcConfig {
        issuer: provider.issuer.clone(),
        client_id: "tollgate-browser-test".into(),
        client_secret: Some("browser-test-secret".into()),
        redirect_url: server.url("/auth/callback"),
        scopes: ["openid", "profile", "email"].map(String::from).to_vec(),
        admin_groups: vec!["ops".into()],
        groups_claim: "groups".into(),
        session_ttl_secs: 3600,
        allowed_origins: vec![],
    });
    server.state.config.store(config.into());
    let api_key = server.create_key("browser-test", true).await;

    let artifacts = PathBuf::from(
        std::env::var("CARGO_TARGET_DIR")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_owned()),
    )
    .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("create target/test-artifacts");
    let screenshot = artifacts.join("console.png");

    let started = Instant::now();
    let mut command = tokio::process::Command::new("node");
    command
        .arg(SCRIPT)
        .env("GATEWAY_URL", server.url(""))
        .env("SUBJECT", "alice")
        .env("NAME", "Alice Example")
        .env("API_KEY", &api_key)
        .env("SCREENSHOT", &screenshot)
        .env("CHROMIUM_PATH", &chromium)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for name in CLEARED_ENV {
        command.env_remove(name);
    }
    let output = tokio::time::timeout(SCRIPT_DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("console.mjs did not finish within {SCRIPT_DEADLINE:?}"))
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "console.mjs failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    println!(
        "console.mjs passed in {:.1?}; screenshots in {}\n{stdout}",
        started.elapsed(),
        artifacts.display()
    );

    // The request the page showed is in the audit log, and the browser's
    // sign-in made a session, recorded (before the redirect) as an admin
    // action.
    let request_id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("REQUEST_ID "))
        .expect("the script prints the chat request's id");
    server.audit_record(request_id).await;
    let started_session = |record: &Value| {
        record["payload"]["action"] == "session.started"
            && record["payload"]["actor"] == "user:alice"
    };
    let audit: Value = reqwest::Client::new()
        .get(server.url("/admin/v1/audit?type=audit.admin&limit=1000"))
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .expect("the gateway answers")
        .json()
        .await
        .expect("the audit page is JSON");
    assert!(
        audit["data"]
            .as_array()
            .expect("data is a list")
            .iter()
            .any(started_session),
        "no session.started by user:alice in the audit log: {audit:#}"
    );
    server.shutdown().await;
}

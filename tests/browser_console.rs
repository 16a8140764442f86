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
use std::time::{Duration, Instant};

use real_oidc::RealProvider;
use serde_json::{json, Value};
use support::{run_script, skip_unless_ci, TestServer};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/console.mjs");
const NODE_MODULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/node_modules");
/// The script stops itself after 60 s; this is the backstop.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(90);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_signs_in_and_shows_a_requests_events_in_chromium() {
    let chromium = match missing_tools() {
        Ok(chromium) => chromium,
        Err(reason) => return skip_unless_ci(&reason),
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

    let server = TestServer::start(|c| c.features.websocket.require_auth = true).await;
    server.enable_oidc(
        &provider.issuer,
        "tollgate-browser-test",
        "browser-test-secret",
        |_| {},
    );
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
        .env("CHROMIUM_PATH", &chromium);
    let stdout = run_script(command, "console.mjs", SCRIPT_DEADLINE).await;
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
    let audit = server
        .admin_get("/admin/v1/audit?type=audit.admin&limit=1000")
        .await;
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

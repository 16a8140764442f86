//! The command line, by running the built binary: `keys create | list |
//! revoke` against a temporary SQLite database, and `config check` /
//! `serve` refusing bad configuration files with exit code 2.

mod support;

use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Value};
use support::{free_port, TollgateProcess, Workspace};
use tollgate::auth::{authenticate_key, AuthError};
use tollgate::store::Store;

/// What a finished run of the binary left behind.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Stdout, after asserting that the run succeeded.
    fn succeeded(self) -> String {
        assert_eq!(
            self.code,
            Some(0),
            "expected success; stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self.stdout
    }
}

async fn tollgate(workspace: &Workspace, args: &[&str]) -> Run {
    let mut command = workspace.command();
    command.args(args);
    run(command).await
}

async fn run(command: std::process::Command) -> Run {
    let mut process = TollgateProcess::spawn(command);
    let status = process.wait_for_exit().await;
    Run {
        code: status.code(),
        stdout: process.stdout(),
        stderr: process.stderr(),
    }
}

/// `tollgate keys --config FILE ARGS…`
async fn keys(workspace: &Workspace, config: &Path, args: &[&str]) -> Run {
    let config = config.to_str().expect("a UTF-8 path");
    let mut all = vec!["keys", "--config", config];
    all.extend_from_slice(args);
    tollgate(workspace, &all).await
}

/// A workspace with a configuration file naming its own database.
fn workspace() -> (Workspace, PathBuf) {
    let workspace = Workspace::new();
    let config = workspace.write_config("127.0.0.1:0");
    (workspace, config)
}

/// Creates a key and returns it, from the last line of stdout.
async fn create_key(workspace: &Workspace, config: &Path, args: &[&str]) -> String {
    let mut all = vec!["create"];
    all.extend_from_slice(args);
    let stdout = keys(workspace, config, &all).await.succeeded();
    stdout
        .lines()
        .last()
        .expect("keys create prints lines")
        .to_owned()
}

async fn list_json(workspace: &Workspace, config: &Path) -> (Vec<Value>, String) {
    let stdout = keys(workspace, config, &["list", "--json"])
        .await
        .succeeded();
    let parsed: Vec<Value> = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("keys list --json is a JSON array ({e}):\n{stdout}"));
    (parsed, stdout)
}

fn time(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .unwrap_or_else(|| panic!("{value} is an RFC 3339 time"))
        .with_timezone(&Utc)
}

#[tokio::test]
async fn keys_create_list_and_revoke_against_the_configured_database() {
    let (workspace, config) = workspace();

    let key = create_key(&workspace, &config, &["--name", "ci-key"]).await;
    assert!(key.starts_with("gw_live_"), "{key}");
    assert_eq!(key.len(), 51, "{key}");
    assert!(tollgate::auth::keys::is_well_formed(&key), "{key}");
    let prefix = &key[..14];

    let (listed, raw) = list_json(&workspace, &config).await;
    assert_eq!(listed.len(), 1, "{raw}");
    let entry = &listed[0];
    assert_eq!(entry["name"], "ci-key");
    assert_eq!(entry["prefix"], prefix);
    assert_eq!(entry["admin"], false);
    assert_eq!(entry["revoked_at"], Value::Null);
    assert_eq!(entry["expires_at"], Value::Null);
    assert!(entry.get("key").is_none() && entry.get("key_hash").is_none());
    assert!(!raw.contains(&key[14..]), "the full key leaked:\n{raw}");
    let table = keys(&workspace, &config, &["list"]).await.succeeded();
    assert!(
        table.contains(prefix) && table.contains("active"),
        "{table}"
    );
    assert!(!table.contains(&key[14..]), "the full key leaked:\n{table}");

    // The key lives in the database the configuration names.
    let store = Store::connect(&workspace.database_url()).await.unwrap();
    let record = authenticate_key(&store, &key).await.unwrap();
    assert_eq!(record.name, "ci-key");

    let revoked = keys(&workspace, &config, &["revoke", prefix])
        .await
        .succeeded();
    assert!(revoked.contains(&record.id.to_string()), "{revoked}");

    let (listed, raw) = list_json(&workspace, &config).await;
    assert_eq!(listed.len(), 1, "{raw}");
    let revoked_at = time(&listed[0]["revoked_at"]);
    assert!(Utc::now() - revoked_at < Duration::minutes(1), "{raw}");
    let table = keys(&workspace, &config, &["list"]).await.succeeded();
    assert!(table.contains("revoked"), "{table}");
    assert!(matches!(
        authenticate_key(&store, &key).await,
        Err(AuthError::Revoked)
    ));
    store.close().await;
}

#[tokio::test]
async fn keys_create_admin_marks_the_key_admin() {
    let (workspace, config) = workspace();
    create_key(&workspace, &config, &["--name", "ops", "--admin"]).await;
    create_key(&workspace, &config, &["--name", "app"]).await;
    let (listed, raw) = list_json(&workspace, &config).await;
    let admins: Vec<(&str, bool)> = listed
        .iter()
        .map(|k| (k["name"].as_str().unwrap(), k["admin"].as_bool().unwrap()))
        .collect();
    assert_eq!(admins, [("ops", true), ("app", false)], "{raw}");
}

#[tokio::test]
async fn keys_create_expires_in_sets_expires_at_that_far_ahead() {
    let (workspace, config) = workspace();
    create_key(
        &workspace,
        &config,
        &["--name", "month", "--expires-in", "30d"],
    )
    .await;
    let (listed, raw) = list_json(&workspace, &config).await;
    let expires_at = time(&listed[0]["expires_at"]);
    let distance = expires_at - (Utc::now() + Duration::days(30));
    assert!(distance.num_seconds().abs() < 120, "{raw}");
}

#[tokio::test]
async fn keys_create_refuses_a_bad_lifetime_and_creates_nothing() {
    let (workspace, config) = workspace();
    for (lifetime, expected) in [
        ("soon", "`soon` is not a duration such as 30d"),
        ("0s", "longer than zero"),
    ] {
        let run = keys(
            &workspace,
            &config,
            &["create", "--name", "x", "--expires-in", lifetime],
        )
        .await;
        assert_eq!(run.code, Some(1), "{}", run.stderr);
        assert!(run.stderr.contains(expected), "{}", run.stderr);
        assert!(!run.stdout.contains("gw_live_"), "{}", run.stdout);
    }
    let (listed, raw) = list_json(&workspace, &config).await;
    assert!(listed.is_empty(), "{raw}");
}

#[tokio::test]
async fn keys_revoke_takes_an_id_and_names_what_it_cannot_find() {
    let (workspace, config) = workspace();
    create_key(&workspace, &config, &["--name", "by-id"]).await;
    let (listed, _) = list_json(&workspace, &config).await;
    let id = listed[0]["id"].as_str().unwrap().to_owned();

    keys(&workspace, &config, &["revoke", &id])
        .await
        .succeeded();
    let (listed, raw) = list_json(&workspace, &config).await;
    assert!(listed[0]["revoked_at"].is_string(), "{raw}");

    let missing = keys(&workspace, &config, &["revoke", "gw_live_nope"]).await;
    assert_eq!(missing.code, Some(1), "{}", missing.stderr);
    assert!(
        missing
            .stderr
            .contains("no API key with id or prefix `gw_live_nope`"),
        "{}",
        missing.stderr
    );
}

const SECRET_CONFIG: &str = r#"[server]
listen = "127.0.0.1:8181"

[database]
url = "postgres://app:pg-password-123@db.example:5432/tollgate"

[providers.openai]
type = "openai"
base_url = "https://api.openai.com/v1"
api_key = "sk-provider-secret-456"

[[models]]
name = "gpt-4o-mini"
provider = "openai"
"#;

#[tokio::test]
async fn config_check_prints_a_valid_file_with_secrets_masked() {
    let workspace = Workspace::new();
    let file = workspace.write("secrets.toml", SECRET_CONFIG);
    let run = tollgate(&workspace, &["config", "check", file.to_str().unwrap()]).await;
    assert!(
        run.stderr.contains("configuration is valid"),
        "{}",
        run.stderr
    );
    let shown = run.succeeded();
    for secret in ["pg-password-123", "sk-provider-secret-456"] {
        assert!(!shown.contains(secret), "{secret} leaked:\n{shown}");
    }
    assert!(
        shown.contains("postgres://app:********@db.example:5432/tollgate"),
        "{shown}"
    );
    assert!(shown.contains("api_key = \"********\""), "{shown}");
    assert!(shown.contains("listen = \"127.0.0.1:8181\""), "{shown}");
    assert!(shown.contains("gpt-4o-mini"), "{shown}");
}

#[tokio::test]
async fn config_check_interpolates_variables_and_applies_overrides() {
    let workspace = Workspace::new();
    let file = workspace.write(
        "vars.toml",
        "[server]\nlisten = \"127.0.0.1:${TOLLGATE_CLI_TEST_PORT}\"\n",
    );
    let mut command = workspace.command();
    command
        .args(["config", "check", file.to_str().unwrap()])
        .env("TOLLGATE_CLI_TEST_PORT", "9393");
    let shown = run(command).await.succeeded();
    assert!(shown.contains("listen = \"127.0.0.1:9393\""), "{shown}");

    let mut command = workspace.command();
    command
        .args(["config", "check", file.to_str().unwrap()])
        .env("TOLLGATE_CLI_TEST_PORT", "9393")
        .env("TOLLGATE_LISTEN", "127.0.0.1:7474")
        .env("TOLLGATE_DATABASE_URL", "sqlite://elsewhere.db");
    let shown = run(command).await.succeeded();
    assert!(shown.contains("listen = \"127.0.0.1:7474\""), "{shown}");
    assert!(shown.contains("url = \"sqlite://elsewhere.db\""), "{shown}");
}

/// Files that must be refused, each with the line and the words the error
/// must contain.
const BAD_CONFIGS: &[(&str, &str, &[&str])] = &[
    (
        "unknown-key.toml",
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[features.websocket]\npong_timout_secs = 90\n",
        &["line 5", "unknown field `pong_timout_secs`"],
    ),
    (
        "wrong-type.toml",
        "[features.websocket]\nping_interval_secs = \"thirty\"\n",
        &[
            "line 2",
            "features.websocket.ping_interval_secs",
            "expected u64",
        ],
    ),
    (
        "pong-too-short.toml",
        "[features.websocket]\nping_interval_secs = 30\npong_timeout_secs = 30\n",
        &[
            "line 3",
            "features.websocket.pong_timeout_secs",
            "greater than ping_interval_secs (30)",
        ],
    ),
    (
        "unset-variable.toml",
        "[server]\nlisten = \"${TOLLGATE_CLI_TEST_NEVER_SET}\"\n",
        &["line 2", "`TOLLGATE_CLI_TEST_NEVER_SET` is not set"],
    ),
];

/// Asserts exit code 2 with a message naming the file and containing every
/// one of `expected`.
fn assert_refused(run: &Run, file: &Path, expected: &[&str]) {
    let file = file.to_string_lossy();
    assert_eq!(run.code, Some(2), "{file}: {}", run.stderr);
    for words in std::iter::once(&*file).chain(expected.iter().copied()) {
        assert!(run.stderr.contains(words), "{file}: {}", run.stderr);
    }
}

#[tokio::test]
async fn config_check_refuses_bad_files_with_exit_code_2_naming_file_and_line() {
    let workspace = Workspace::new();
    for (name, text, expected) in BAD_CONFIGS {
        let file = workspace.write(name, text);
        let run = tollgate(&workspace, &["config", "check", file.to_str().unwrap()]).await;
        assert!(run.stdout.is_empty(), "{name}: {}", run.stdout);
        assert_refused(&run, &file, expected);
    }
}

#[tokio::test]
async fn serve_refuses_bad_files_with_exit_code_2_before_listening() {
    let workspace = Workspace::new();
    let database = workspace.path().join("tollgate.db");
    for (name, text, expected) in BAD_CONFIGS {
        // A file that would otherwise open a database and listen on a real
        // port, so that starting anyway would show.
        let text = format!(
            "{text}\n[database]\nurl = \"{}\"\n",
            workspace.database_url()
        );
        let file = workspace.write(name, &text);
        let mut command = workspace.command();
        command
            .args(["serve", "--config", file.to_str().unwrap()])
            .env("TOLLGATE_LISTEN", format!("127.0.0.1:{}", free_port()));
        let run = run(command).await;
        assert_refused(&run, &file, expected);
        assert!(!run.stderr.contains("listening"), "{name}: {}", run.stderr);
        assert!(!database.exists(), "{name}: the database was opened");
    }
}

#[tokio::test]
async fn an_invalid_environment_override_is_refused_with_exit_code_2() {
    let (workspace, config) = workspace();
    let mut command = workspace.command();
    command
        .args(["config", "check", config.to_str().unwrap()])
        .env("TOLLGATE_LISTEN", "not-an-address");
    let run = run(command).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("server.listen"), "{}", run.stderr);
    assert!(run.stderr.contains("not-an-address"), "{}", run.stderr);
}

#[tokio::test]
async fn the_readme_configuration_example_is_valid() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    let section = &readme[readme
        .find("## Configuration")
        .expect("README has a Configuration section")..];
    let start = section.find("```toml\n").expect("a TOML example") + "```toml\n".len();
    let example = &section[start..start + section[start..].find("```").unwrap()];
    assert!(example.contains("[features.websocket]"), "{example}");

    let workspace = Workspace::new();
    let file = workspace.write("readme.toml", example);
    let mut command = workspace.command();
    command
        .args(["config", "check", file.to_str().unwrap()])
        .env("OPENAI_API_KEY", "sk-readme-example");
    let shown = run(command).await.succeeded();
    assert!(!shown.contains("sk-readme-example"), "{shown}");
}

#[tokio::test]
async fn keys_create_with_a_budget_stores_it_and_refuses_a_bad_one() {
    let (workspace, config) = workspace();
    create_key(
        &workspace,
        &config,
        &[
            "--name",
            "capped",
            "--budget-usd",
            "5",
            "--budget-period",
            "weekly",
        ],
    )
    .await;
    create_key(
        &workspace,
        &config,
        &["--name", "default-period", "--budget-usd", "0.25"],
    )
    .await;
    let (listed, raw) = list_json(&workspace, &config).await;
    let budgets: Vec<(&str, i64, &str)> = listed
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap(),
                k["budget_micros"].as_i64().unwrap(),
                k["budget_period"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        budgets,
        [
            ("capped", 5_000_000, "weekly"),
            ("default-period", 250_000, "monthly")
        ],
        "{raw}"
    );
    for args in [
        [
            "create",
            "--name",
            "x",
            "--budget-usd",
            "5",
            "--budget-period",
            "hourly",
        ],
        [
            "create",
            "--name",
            "x",
            "--budget-usd",
            "0",
            "--budget-period",
            "daily",
        ],
    ] {
        let run = keys(&workspace, &config, &args).await;
        assert_eq!(run.code, Some(1), "{}", run.stderr);
        assert!(run.stderr.contains("budget"), "{}", run.stderr);
    }
    let (listed, _) = list_json(&workspace, &config).await;
    assert_eq!(listed.len(), 2, "a refused key is not created");
}

#[tokio::test]
async fn keys_create_owner_gives_the_key_to_a_user() {
    let (workspace, config) = workspace();
    create_key(
        &workspace,
        &config,
        &["--name", "alices", "--owner", "alice"],
    )
    .await;
    create_key(&workspace, &config, &["--name", "nobodys"]).await;
    let (listed, _) = list_json(&workspace, &config).await;
    let owners: Vec<(&str, &Value)> = listed
        .iter()
        .map(|k| (k["name"].as_str().unwrap(), &k["owner"]))
        .collect();
    assert!(owners.contains(&("alices", &json!("alice"))), "{owners:?}");
    assert!(owners.contains(&("nobodys", &Value::Null)), "{owners:?}");
    let run = keys(
        &workspace,
        &config,
        &["create", "--name", "x", "--owner", " "],
    )
    .await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("owner"), "{}", run.stderr);
}

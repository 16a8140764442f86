//! The event stream of the real `tollgate serve` process, driven by real
//! signals: SIGTERM delivers `system.shutdown` then close 1001; SIGHUP
//! reloads the file, announcing changed sections or the error; keys made
//! with the CLI show up as `audit.admin` with actor `cli`.

#[path = "support/stream_client.rs"]
mod stream_client;
mod support;

use std::net::SocketAddr;

use serde_json::json;
use stream_client::WsClient;
use support::{free_port, wait_until, TollgateProcess, Workspace, DEADLINE};

async fn start(
    workspace: &Workspace,
    extra: &str,
) -> (TollgateProcess, SocketAddr, std::path::PathBuf) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let path = write_config(workspace, addr, extra);
    let mut command = workspace.command();
    command.args(["serve", "--config"]).arg(&path);
    let process = TollgateProcess::spawn(command);
    let health = format!("http://{addr}/health");
    wait_until("the gateway answers /health", DEADLINE, || async {
        reqwest::get(&health).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    (process, addr, path)
}

fn write_config(workspace: &Workspace, addr: SocketAddr, extra: &str) -> std::path::PathBuf {
    workspace.write(
        "tollgate.toml",
        &format!(
            "[server]\nlisten = \"{addr}\"\n\n[database]\nurl = \"{}\"\n\n{extra}",
            workspace.database_url()
        ),
    )
}

#[tokio::test]
async fn sigterm_delivers_system_shutdown_then_close_1001_and_exits_0() {
    let workspace = Workspace::new();
    let (mut process, addr, _) = start(&workspace, "").await;
    let (mut client, _) = WsClient::open(addr, "", None).await;
    process.signal("TERM");
    let frame = client.until_type("system.shutdown").await;
    assert_eq!(frame["topic"], "system");
    assert_eq!(client.close_code().await, Some(1001));
    let status = process.wait_for_exit().await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", process.stderr());
}

#[tokio::test]
async fn sighup_reloads_a_valid_file_and_keeps_the_old_one_when_invalid() {
    let workspace = Workspace::new();
    let (process, addr, path) =
        start(&workspace, "[features.websocket]\nmax_connections = 10\n").await;
    let (mut client, _) = WsClient::open(addr, "topics=system", None).await;

    // A valid change: announced by section name, applied to new connections.
    write_config(
        &workspace,
        addr,
        "[features.websocket]\nmax_connections = 1\n",
    );
    process.signal("HUP");
    let reloaded = client.until_type("system.config_reloaded").await;
    assert_eq!(
        reloaded["payload"],
        json!({"changed_sections": ["features.websocket"]})
    );
    let refused = WsClient::connect(addr, "", None)
        .await
        .err()
        .expect("the new limit applies");
    assert_eq!(refused.status, 503);
    // The connection opened before the reload is still there.
    client.send_json(json!({"type": "ping"})).await;
    assert_eq!(client.until_type("pong").await["type"], "pong");

    // An invalid file: the error is announced, the old configuration stays.
    std::fs::write(&path, "[features.websocket]\nping_interval_secs = 0\n").unwrap();
    process.signal("HUP");
    let failed = client.until_type("system.config_reload_failed").await;
    let error = failed["payload"]["error"].as_str().unwrap();
    assert!(
        error.contains("features.websocket.ping_interval_secs"),
        "{error}"
    );
    let refused = WsClient::connect(addr, "", None)
        .await
        .err()
        .expect("still the reloaded limit");
    assert_eq!(refused.status, 503);
}

#[tokio::test]
async fn keys_created_and_revoked_with_the_cli_are_audited_with_actor_cli() {
    let workspace = Workspace::new();
    let (_process, addr, path) = start(&workspace, "").await;
    let (mut client, _) = WsClient::open(addr, "types=audit.admin", None).await;
    let output = workspace
        .command()
        .args(["keys", "create", "--name", "from-cli", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let key = stdout.lines().last().unwrap().to_owned();
    let created = client.next_json().await;
    assert_eq!(created["payload"]["actor"], "cli");
    assert_eq!(created["payload"]["action"], "key.created");
    let prefix = &key[..14];
    let output = workspace
        .command()
        .args(["keys", "revoke", prefix, "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let revoked = client.next_json().await;
    assert_eq!(revoked["payload"]["action"], "key.revoked");
    assert_eq!(revoked["payload"]["target"], created["payload"]["target"]);
}

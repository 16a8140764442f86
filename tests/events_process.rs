//! The event stream of the real `tollgate serve` process, driven by real
//! signals: SIGTERM delivers `system.shutdown` then close 1001; SIGHUP
//! reloads the file, announcing changed sections or the error; keys made
//! with the CLI show up as `audit.admin` with actor `cli`.

#[path = "support/stream_client.rs"]
mod stream_client;
mod support;

use serde_json::json;
use stream_client::WsClient;
use support::Workspace;

#[tokio::test]
async fn sigterm_delivers_system_shutdown_then_close_1001_and_exits_0() {
    let workspace = Workspace::new();
    let (mut process, addr, _) = workspace.serve("").await;
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
    let (process, addr, path) = workspace
        .serve("[features.websocket]\nmax_connections = 10\n")
        .await;
    let (mut client, _) = WsClient::open(addr, "topics=system", None).await;

    // A valid change: announced by section name, applied to new connections.
    workspace.write_config_with(
        &addr.to_string(),
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
    let (_process, addr, path) = workspace.serve("").await;
    let (mut client, _) = WsClient::open(addr, "types=audit.admin", None).await;
    let stdout = workspace.keys(&path, &["create", "--name", "from-cli"]);
    let key = stdout.lines().last().unwrap().to_owned();
    let created = client.next_json().await;
    assert_eq!(created["payload"]["actor"], "cli");
    assert_eq!(created["payload"]["action"], "key.created");
    let prefix = &key[..14];
    workspace.keys(&path, &["revoke", prefix]);
    let revoked = client.next_json().await;
    assert_eq!(revoked["payload"]["action"], "key.revoked");
    assert_eq!(revoked["payload"]["target"], created["payload"]["target"]);
}

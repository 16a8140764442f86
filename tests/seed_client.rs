//! The specification page's JavaScript client example, run as written (only
//! the host and token filled in) by a real JavaScript WebSocket client:
//! Node.js's built-in `WebSocket`, the same API as a browser's.

mod support;

use std::process::Stdio;

use support::{wait_until, TestServer, DEADLINE};
use tokio::io::AsyncReadExt;
use tollgate::events::model::ConfigReloaded;

/// From ../shared/seed/websocket-events.md, "Client Example", verbatim but
/// for the URL.
const SEED_EXAMPLE: &str = r#"const ws = new WebSocket("ws://gateway:8080/ws/events?token=gw_live_...");
ws.onmessage = (event) => {
const data = JSON.parse(event.data);
console.log("Event:", data.type, data.payload);
};
ws.onclose = () => {
console.log("Connection closed, reconnecting...");
// Implement reconnection logic
};"#;

fn node_with_websocket() -> Option<&'static str> {
    let works = std::process::Command::new("node")
        .args([
            "--experimental-websocket",
            "-e",
            "if (typeof WebSocket !== 'function') process.exit(1)",
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    works.then_some("--experimental-websocket")
}

#[tokio::test]
async fn the_specification_pages_client_example_works_as_written() {
    let Some(flag) = node_with_websocket() else {
        println!("skipping: no Node.js with a WebSocket client on this machine");
        return;
    };
    let server = TestServer::start(|c| c.features.websocket.require_auth = true).await;
    let script = SEED_EXAMPLE
        .replace("gateway:8080", &server.addr.to_string())
        .replace("gw_live_...", &server.admin_key);
    let mut node = tokio::process::Command::new("node")
        .args([flag, "-e", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    wait_until("the example client is connected", DEADLINE, || async {
        server.state.stream_slots.open() == 1
    })
    .await;
    server.state.hub.publish(ConfigReloaded {
        changed_sections: vec!["features.websocket".into()],
    });
    // Stopping the server closes the socket; the example's onclose runs
    // and node exits with nothing left to do.
    server.shutdown().await;
    let mut stdout = node.stdout.take().unwrap();
    let mut output = String::new();
    tokio::time::timeout(DEADLINE, stdout.read_to_string(&mut output))
        .await
        .expect("node exits after the close")
        .unwrap();
    let lines: Vec<&str> = output.lines().collect();
    assert!(lines[0].starts_with("Event: connected {"), "{output}");
    assert!(
        lines.contains(
            &"Event: system.config_reloaded { changed_sections: [ 'features.websocket' ] }"
        ),
        "{output}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("Event: system.shutdown {")),
        "{output}"
    );
    assert_eq!(
        lines.last(),
        Some(&"Connection closed, reconnecting..."),
        "{output}"
    );
}

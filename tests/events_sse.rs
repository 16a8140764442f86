//! `/events/stream` (Server-Sent Events) against a real server: the same
//! authentication, filters, visibility and resume as the WebSocket, in
//! `id:` / `event:` / `data:` blocks with a keepalive comment.

#[path = "support/stream_client.rs"]
mod stream_client;
mod support;

use std::time::Duration;

use serde_json::json;
use stream_client::SseClient;
use support::{marker, TestServer};
use tollgate::events::model::UsageRecorded;
use uuid::Uuid;

#[tokio::test]
async fn events_arrive_as_id_event_and_data_lines_after_connected() {
    let server = TestServer::start(|_| {}).await;
    let mut sse = SseClient::connect(&server.url("/events/stream"), &[])
        .await
        .unwrap();
    let connected = sse.next_event().await.unwrap();
    assert_eq!(connected.event.as_deref(), Some("connected"));
    assert_eq!(connected.id, None, "control messages carry no id");
    assert_eq!(connected.data["payload"]["protocol_version"], 1);
    let published = server.state.hub.publish(marker(1));
    let event = sse.next_event().await.unwrap();
    assert_eq!(event.id, Some(published.id.to_string()));
    assert_eq!(event.event.as_deref(), Some("system.startup"));
    assert_eq!(event.data["id"], published.id.to_string());
    assert_eq!(event.data["payload"]["node"], "marker-1");
    server.shutdown().await;
}

#[tokio::test]
async fn a_comment_line_keeps_an_idle_stream_alive_every_ping_interval() {
    let server = TestServer::start(|c| {
        c.features.websocket.ping_interval_secs = 1;
        c.features.websocket.pong_timeout_secs = 2;
    })
    .await;
    let mut sse = SseClient::connect(&server.url("/events/stream"), &[])
        .await
        .unwrap();
    assert_eq!(
        sse.next_event().await.unwrap().event.as_deref(),
        Some("connected")
    );
    let started = std::time::Instant::now();
    let block = sse.next_block().await.unwrap();
    assert_eq!(block, ": keepalive");
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(1_900), "{waited:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn the_same_credentials_filters_and_visibility_apply() {
    let server = TestServer::start(|c| c.features.websocket.require_auth = true).await;
    let url = server.url("/events/stream");
    let refused = SseClient::connect(&url, &[]).await.err().unwrap();
    assert_eq!(refused.status, 401);
    assert_eq!(refused.body["error"]["code"], "missing_api_key");
    let refused = SseClient::connect(&format!("{url}?token=gw_live_nope"), &[])
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 401);
    let refused = SseClient::connect(&format!("{url}?topics=nope"), &[])
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 400);
    assert_eq!(refused.body["error"]["code"], "unknown_topic");

    let user = server.create_key("user", false).await;
    let user_id = server.key_id(&user).await;
    let auth = format!("Bearer {user}");
    let mut sse = SseClient::connect(&format!("{url}?topics=usage"), &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(
        sse.next_event().await.unwrap().data["payload"]["topics"],
        json!(["usage"])
    );
    let usage = |key_id| UsageRecorded {
        request_id: "r".into(),
        key_id,
        model: "m".into(),
        provider: "p".into(),
        input_tokens: 1,
        output_tokens: 1,
        cost_micros: 1,
        estimated: false,
    };
    server.state.hub.publish(usage(Uuid::new_v4()));
    server.state.hub.publish(marker(1));
    let own = server.state.hub.publish(usage(user_id));
    let event = sse.next_event().await.unwrap();
    assert_eq!(
        event.id,
        Some(own.id.to_string()),
        "only its own usage: {event:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn last_event_id_resumes_without_gap_or_duplicate() {
    let server = TestServer::start(|_| {}).await;
    let ids: Vec<u64> = (0..5)
        .map(|n| server.state.hub.publish(marker(n)).id)
        .collect();
    let last_event_id = ids[1].to_string();
    let mut sse = SseClient::connect(
        &server.url("/events/stream"),
        &[("last-event-id", last_event_id.as_str())],
    )
    .await
    .unwrap();
    let connected = sse.next_event().await.unwrap();
    assert_eq!(connected.data["payload"]["resumed"], true);
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(
            sse.next_event()
                .await
                .unwrap()
                .id
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    assert_eq!(seen, ids[2..]);
    let live = server.state.hub.publish(marker(9));
    assert_eq!(
        sse.next_event().await.unwrap().id,
        Some(live.id.to_string())
    );
    // A cursor that is too old: resume_failed, then live.
    let mut late = SseClient::connect(&server.url("/events/stream?since=5"), &[])
        .await
        .unwrap();
    late.next_event().await.unwrap();
    let failed = late.next_event().await.unwrap();
    assert_eq!(failed.event.as_deref(), Some("resume_failed"));
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_sends_system_shutdown_and_ends_the_stream() {
    let server = TestServer::start(|_| {}).await;
    let mut sse = SseClient::connect(&server.url("/events/stream"), &[])
        .await
        .unwrap();
    sse.next_event().await.unwrap();
    let stopping = tokio::spawn(server.shutdown());
    let event = sse.next_event().await.unwrap();
    assert_eq!(event.event.as_deref(), Some("system.shutdown"));
    assert_eq!(
        sse.next_event().await,
        None,
        "the stream ends after system.shutdown"
    );
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_revoked_key_ends_its_stream_with_an_error_event() {
    let server = TestServer::start(|_| {}).await;
    let user = server.create_key("user", false).await;
    let record = server
        .state
        .store
        .find_api_key_by_hash(&tollgate::auth::keys::hash(&user))
        .await
        .unwrap()
        .unwrap();
    let mut sse = SseClient::connect(&server.url(&format!("/events/stream?token={user}")), &[])
        .await
        .unwrap();
    sse.next_event().await.unwrap();
    server.state.store.revoke_api_key(record.id).await.unwrap();
    let event = sse.next_event().await.unwrap();
    assert_eq!(event.event.as_deref(), Some("error"));
    assert_eq!(event.data["payload"]["code"], "api_key_revoked");
    assert_eq!(sse.next_event().await, None);
    server.shutdown().await;
}

#[tokio::test]
async fn an_event_published_right_after_the_response_head_reaches_a_stream_whose_task_runs_late() {
    // The task cannot run until the event below has been published.
    let (server, release) = TestServer::start_with_event_thread_held().await;
    let mut sse = SseClient::connect(&server.url("/events/stream"), &[])
        .await
        .expect("the response head is sent without the task");
    let published = server.state.hub.publish(marker(7));
    release.send(()).unwrap();
    let connected = sse.next_event().await.unwrap();
    assert_eq!(connected.event.as_deref(), Some("connected"));
    let event = sse.next_event().await.unwrap();
    assert_eq!(event.id, Some(published.id.to_string()));
    assert_eq!(event.data["payload"]["node"], "marker-7");
    server.shutdown().await;
}

//! `/ws/events` against a real server on 127.0.0.1:0 with real WebSocket
//! clients: the specification page's settings, the protocol, visibility,
//! resume and revocation.

#[path = "support/stream_client.rs"]
mod stream_client;
mod support;

use std::time::Duration;

use serde_json::{json, Value};
use stream_client::{Read, WsClient};
use support::{marker, wait_until, TestServer, DEADLINE};
use tokio_tungstenite::tungstenite::Message;
use tollgate::events::model::{AdminAction, ConfigReloaded, UsageRecorded};
use uuid::Uuid;

fn usage(key_id: Uuid, request_id: &str) -> UsageRecorded {
    UsageRecorded {
        request_id: request_id.into(),
        key_id,
        model: "mock-1".into(),
        provider: "mock".into(),
        input_tokens: 3,
        output_tokens: 5,
        cost_micros: 7,
        estimated: false,
    }
}

fn id_of(frame: &Value) -> u64 {
    frame["id"]
        .as_str()
        .expect("events carry a string id")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn the_seed_client_example_reads_type_and_payload_of_each_event() {
    let server = TestServer::start(|_| {}).await;
    // As in the page: a token in the query string, nothing else.
    let (mut client, connected) =
        WsClient::open(server.addr, &format!("token={}", server.admin_key), None).await;
    let payload = &connected["payload"];
    assert_eq!(payload["protocol_version"], 1);
    assert_eq!(payload["resumed"], false);
    assert_eq!(payload["identity"]["kind"], "api_key");
    assert_eq!(payload["identity"]["admin"], true);
    assert_eq!(
        payload["topics"],
        json!(["audit", "usage", "budget", "circuit_breaker", "system"])
    );
    Uuid::parse_str(payload["connection_id"].as_str().unwrap()).unwrap();
    assert!(connected.get("id").is_none(), "control frames carry no id");

    let published = server.state.hub.publish(ConfigReloaded {
        changed_sections: vec!["server".into()],
    });
    let data = client.next_json().await;
    assert_eq!(data["type"], "system.config_reloaded");
    assert_eq!(data["payload"]["changed_sections"], json!(["server"]));
    assert_eq!(data["topic"], "system");
    assert_eq!(id_of(&data), published.id);
    let timestamp = data["timestamp"].as_str().unwrap();
    assert!(
        timestamp.ends_with('Z') && timestamp.len() == 24,
        "{timestamp}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_disabled_stream_answers_404_on_both_endpoints() {
    let server = TestServer::start(|c| c.features.websocket.enabled = false).await;
    let refused = WsClient::connect(server.addr, "", None)
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.status, 404);
    assert_eq!(refused.body["error"]["code"], "not_found");
    let sse = reqwest::get(server.url("/events/stream")).await.unwrap();
    assert_eq!(sse.status(), 404);
    server.shutdown().await;
}

#[tokio::test]
async fn presented_credentials_must_be_valid_whatever_require_auth_says() {
    let server = TestServer::start(|c| c.features.websocket.require_auth = false).await;
    let revoked = server.create_key("gone", false).await;
    let revoked_id = server.key_id(&revoked).await;
    server.state.store.revoke_api_key(revoked_id).await.unwrap();
    let unknown = format!("gw_live_{}", "A".repeat(43));
    for (query, bearer, code) in [
        ("token=gw_live_short".to_owned(), None, "invalid_api_key"),
        (format!("token={unknown}"), None, "invalid_api_key"),
        (format!("token={revoked}"), None, "revoked_api_key"),
        (String::new(), Some(revoked.as_str()), "revoked_api_key"),
    ] {
        let refused = WsClient::connect(server.addr, &query, bearer)
            .await
            .err()
            .expect("refused");
        assert_eq!(refused.status, 401, "{query} {bearer:?}");
        assert_eq!(refused.body["error"]["code"], code, "{query}");
        assert_eq!(refused.body["error"]["type"], "authentication_error");
    }
    // No credential at all: anonymous, seeing everything.
    let (_client, connected) = WsClient::open(server.addr, "", None).await;
    assert_eq!(connected["payload"]["identity"]["kind"], "anonymous");
    // A bearer header works like the query token.
    let user = server.create_key("user", false).await;
    let (_client, connected) = WsClient::open(server.addr, "", Some(&user)).await;
    assert_eq!(connected["payload"]["identity"]["name"], "user");
    server.shutdown().await;
}

#[tokio::test]
async fn an_expired_key_is_refused() {
    let server = TestServer::start(|_| {}).await;
    let expires = chrono::Utc::now() + chrono::Duration::milliseconds(300);
    let (_, secret) =
        tollgate::auth::issue_api_key(&server.state.store, "short", false, Some(expires))
            .await
            .unwrap();
    let token = format!("token={}", secret.expose());
    wait_until("the key has expired", DEADLINE, || async {
        chrono::Utc::now() > expires
    })
    .await;
    let refused = WsClient::connect(server.addr, &token, None)
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.status, 401);
    assert_eq!(refused.body["error"]["code"], "expired_api_key");
    server.shutdown().await;
}

#[tokio::test]
async fn require_auth_refuses_a_connection_without_credentials() {
    let server = TestServer::start(|c| c.features.websocket.require_auth = true).await;
    let refused = WsClient::connect(server.addr, "", None)
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.status, 401);
    assert_eq!(refused.body["error"]["code"], "missing_api_key");
    let (_client, connected) =
        WsClient::open(server.addr, &format!("token={}", server.admin_key), None).await;
    assert_eq!(connected["payload"]["identity"]["kind"], "api_key");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_cut_off_in_time_while_a_normal_one_survives() {
    let server = TestServer::start(|c| {
        c.features.websocket.ping_interval_secs = 1;
        c.features.websocket.pong_timeout_secs = 2;
    })
    .await;
    let (mut healthy, _) = WsClient::open(server.addr, "", None).await;
    // The silent client reads nothing, so its WebSocket layer never pongs.
    let (mut silent, _) = WsClient::open(server.addr, "", None).await;
    let opened = std::time::Instant::now();
    // The healthy client keeps reading (answering pings) for well over the
    // pong timeout; it must not be closed.
    let mut pings_seen = 0;
    while opened.elapsed() < Duration::from_millis(3_500) {
        match tokio::time::timeout(
            Duration::from_millis(200),
            futures::StreamExt::next(&mut healthy.ws),
        )
        .await
        {
            Ok(Some(Ok(Message::Ping(_)))) => pings_seen += 1,
            Ok(Some(Ok(Message::Close(frame)))) => {
                panic!("the healthy client was closed: {frame:?}")
            }
            Ok(None | Some(Err(_))) => panic!("the healthy client was disconnected"),
            _ => {}
        }
    }
    assert!(pings_seen >= 3, "a ping every second, saw {pings_seen}");
    // By now (3.5 s > 2 s + 1 s) the silent client's connection is gone:
    // only the healthy one still holds a slot.
    assert_eq!(server.state.stream_slots.open(), 1);
    match silent.read().await {
        Read::Close(_) => {}
        Read::Json(frame) => panic!("expected the connection to be gone, got {frame}"),
    }
    healthy.send_json(json!({"type": "ping"})).await;
    assert_eq!(healthy.until_type("pong").await["payload"], json!({}));
    server.shutdown().await;
}

#[tokio::test]
async fn connection_over_max_connections_is_refused_and_a_freed_slot_is_reusable() {
    let server = TestServer::start(|c| c.features.websocket.max_connections = 2).await;
    let (first, _) = WsClient::open(server.addr, "", None).await;
    // SSE streams count against the same limit.
    let mut sse = stream_client::SseClient::connect(&server.url("/events/stream"), &[])
        .await
        .unwrap();
    assert_eq!(sse.next_event().await.unwrap().data["type"], "connected");
    let refused = WsClient::connect(server.addr, "", None)
        .await
        .err()
        .expect("refused at the limit");
    assert_eq!(refused.status, 503);
    assert_eq!(refused.retry_after.as_deref(), Some("5"));
    assert_eq!(refused.body["error"]["code"], "too_many_connections");
    let refused = stream_client::SseClient::connect(&server.url("/events/stream"), &[])
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 503);
    drop(first);
    wait_until("the closed connection frees its slot", DEADLINE, || async {
        server.state.stream_slots.open() == 1
    })
    .await;
    let (_again, _) = WsClient::open(server.addr, "", None).await;
    server.shutdown().await;
}

#[tokio::test]
async fn zero_max_connections_means_unlimited() {
    let server = TestServer::start(|c| c.features.websocket.max_connections = 0).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(WsClient::open(server.addr, "", None).await.0);
    }
    assert_eq!(server.state.stream_slots.open(), 20);
    server.shutdown().await;
}

#[tokio::test]
async fn a_paused_readers_lagged_frames_count_exactly_what_it_missed_while_a_reading_peer_gets_every_event(
) {
    const EVENTS: usize = 3_000;
    let server = TestServer::start(|c| {
        c.features.websocket.channel_capacity = 16;
        c.features.websocket.history_size = 4_096;
        c.features.websocket.ping_interval_secs = 60;
        c.features.websocket.pong_timeout_secs = 120;
    })
    .await;
    let (mut reader, _) = WsClient::open(server.addr, "", None).await;
    let (mut paused, _) = WsClient::open(server.addr, "", None).await;
    // Large events so that the paused client's socket buffers fill and its
    // connection task stops draining the channel.
    let padding = "x".repeat(8 * 1024);
    let mut ids = Vec::with_capacity(EVENTS);
    // The reader says how far it got, so that the publisher can keep within
    // half a channel of it: the connections run on the event threads, not
    // on this test's runtime, and a publisher that outran a reader's
    // connection would rightly make it lag too.
    let (progress, mut reader_at) = tokio::sync::watch::channel(0usize);
    let reading = tokio::spawn(async move {
        let mut got = Vec::with_capacity(EVENTS);
        while got.len() < EVENTS {
            let frame = reader.next_json().await;
            assert_ne!(frame["type"], "lagged", "the reading peer must not lag");
            got.push(id_of(&frame));
            progress.send_replace(got.len());
        }
        got
    });
    for n in 0..EVENTS {
        ids.push(
            server
                .state
                .hub
                .publish(AdminAction {
                    actor: "test".into(),
                    action: format!("bulk.{n}"),
                    target: padding.clone(),
                })
                .id,
        );
        if n % 8 == 7 {
            let published = n + 1;
            tokio::time::timeout(DEADLINE, reader_at.wait_for(|got| got + 8 >= published))
                .await
                .expect("the reading peer keeps up")
                .expect("the reading peer is still reading");
        }
    }
    assert_eq!(
        reading.await.unwrap(),
        ids,
        "the reading peer got every event, in order"
    );

    // Now the paused client reads everything that reaches it: the
    // published ids in order, where each `lagged` frame stands for exactly
    // the `missed` ids right after its `resume_from`. Its connection, on
    // the event threads, may fall behind once before its socket fills and
    // once after, so there is at least one such gap (the pause), and the
    // count is exact whatever their number.
    let mut next = 0;
    let mut missed_total = 0;
    let mut gaps = 0;
    while next < EVENTS {
        let frame = paused.next_json().await;
        if frame["type"] == "lagged" {
            let missed = frame["payload"]["missed"].as_u64().unwrap() as usize;
            let resume_from: u64 = frame["payload"]["resume_from"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(missed > 0, "{frame}");
            assert_eq!(
                ids[next],
                resume_from + 1,
                "the gap starts after resume_from"
            );
            next += missed;
            missed_total += missed;
            gaps += 1;
        } else {
            assert_eq!(id_of(&frame), ids[next], "delivered in order, no duplicate");
            next += 1;
        }
    }
    assert_eq!(next, EVENTS, "delivered + missed = published");
    assert!(gaps >= 1 && missed_total > 0, "the paused reader lagged");
    server.shutdown().await;
}

#[tokio::test]
async fn client_messages_are_answered_and_bad_ones_get_an_error_frame_on_an_open_connection() {
    let server = TestServer::start(|_| {}).await;
    let (mut client, _) = WsClient::open(server.addr, "topics=usage", None).await;

    client.send_json(json!({"type": "ping"})).await;
    assert_eq!(
        client.next_json().await,
        json!({"type": "pong", "payload": {}})
    );

    client
        .send_json(json!({"type": "subscribe", "topics": ["budget", "system"]}))
        .await;
    assert_eq!(
        client.next_json().await,
        json!({"type": "subscribed", "payload": {"topics": ["usage", "budget", "system"]}})
    );
    client
        .send_json(json!({"type": "unsubscribe", "topics": ["usage"]}))
        .await;
    assert_eq!(
        client.next_json().await,
        json!({"type": "unsubscribed", "payload": {"topics": ["budget", "system"]}})
    );

    for (message, code) in [
        (
            Message::Text(r#"{"type":"subscribe","topics":["billing"]}"#.into()),
            "unknown_topic",
        ),
        (Message::Text("{not json".into()), "invalid_json"),
        (
            Message::Text(r#"{"type":"dance"}"#.into()),
            "unknown_message_type",
        ),
        (Message::Text(r#"{"topics":[]}"#.into()), "invalid_message"),
        (
            Message::Text(r#"{"type":"subscribe"}"#.into()),
            "invalid_message",
        ),
        (
            Message::Binary(vec![1, 2, 3].into()),
            "binary_not_supported",
        ),
    ] {
        client.send(message).await;
        let frame = client.next_json().await;
        assert_eq!(frame["type"], "error", "{frame}");
        assert_eq!(frame["payload"]["code"], code, "{frame}");
        assert!(frame["payload"]["message"].as_str().unwrap().len() > 10);
    }
    // The unknown topic changed nothing, and the connection still works:
    // a system event arrives, a usage event (unsubscribed) does not.
    server.state.hub.publish(usage(Uuid::new_v4(), "r1"));
    let published = server.state.hub.publish(marker(1));
    let frame = client.next_json().await;
    assert_eq!(id_of(&frame), published.id);
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_message_over_64_kib_closes_with_1009() {
    let server = TestServer::start(|_| {}).await;
    let (mut client, _) = WsClient::open(server.addr, "", None).await;
    // Exactly 64 KiB is allowed (and answered as an unknown type).
    let at_limit = format!(r#"{{"type":"x","pad":"{}"}}"#, "a".repeat(64 * 1024 - 21));
    assert_eq!(at_limit.len(), 64 * 1024);
    client.send(Message::Text(at_limit.into())).await;
    assert_eq!(
        client.next_json().await["payload"]["code"],
        "unknown_message_type"
    );
    let over = "a".repeat(64 * 1024 + 1);
    client.send(Message::Text(over.into())).await;
    assert_eq!(client.close_code().await, Some(1009));
    server.shutdown().await;
}

#[tokio::test]
async fn topic_and_type_filters_in_the_query_narrow_the_stream_and_unknown_names_are_400() {
    let server = TestServer::start(|_| {}).await;
    for (query, code) in [
        ("topics=usage,billing", "unknown_topic"),
        ("types=usage.spent", "unknown_event_type"),
        ("since=abc", "invalid_since"),
    ] {
        let refused = WsClient::connect(server.addr, query, None)
            .await
            .err()
            .expect("refused");
        assert_eq!(refused.status, 400, "{query}");
        assert_eq!(refused.body["error"]["code"], code, "{query}");
    }
    let (mut by_topic, connected) = WsClient::open(server.addr, "topics=usage", None).await;
    assert_eq!(connected["payload"]["topics"], json!(["usage"]));
    let (mut by_type, _) = WsClient::open(server.addr, "types=system.config_reloaded", None).await;
    server.state.hub.publish(marker(1));
    let usage_event = server.state.hub.publish(usage(Uuid::new_v4(), "r1"));
    let reload = server.state.hub.publish(ConfigReloaded {
        changed_sections: vec![],
    });
    assert_eq!(id_of(&by_topic.next_json().await), usage_event.id);
    assert_eq!(id_of(&by_type.next_json().await), reload.id);
    assert!(by_topic
        .read_within(Duration::from_millis(200))
        .await
        .is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn non_admin_keys_never_see_another_keys_events() {
    let server = TestServer::start(|_| {}).await;
    let alice = server.create_key("alice", false).await;
    let bob = server.create_key("bob", false).await;
    let (alice_id, bob_id) = (server.key_id(&alice).await, server.key_id(&bob).await);
    let (mut as_alice, _) = WsClient::open(server.addr, &format!("token={alice}"), None).await;
    let (mut as_admin, _) =
        WsClient::open(server.addr, &format!("token={}", server.admin_key), None).await;
    let (mut anonymous, _) = WsClient::open(server.addr, "", None).await;

    let alices = server.state.hub.publish(usage(alice_id, "a"));
    let bobs = server.state.hub.publish(usage(bob_id, "b"));
    let admin_only = server.state.hub.publish(AdminAction {
        actor: "cli".into(),
        action: "key.created".into(),
        target: bob_id.to_string(),
    });
    let everyone = server.state.hub.publish(marker(9));

    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(id_of(&as_alice.next_json().await));
    }
    assert_eq!(ids, vec![alices.id, everyone.id]);
    for client in [&mut as_admin, &mut anonymous] {
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(id_of(&client.next_json().await));
        }
        assert_eq!(ids, vec![alices.id, bobs.id, admin_only.id, everyone.id]);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn revoking_a_key_through_the_admin_api_closes_its_streams_with_1008() {
    let server = TestServer::start(|_| {}).await;
    let user = server.create_key("user", false).await;
    let user_id = server.key_id(&user).await;
    let (mut client, _) = WsClient::open(server.addr, &format!("token={user}"), None).await;
    let (mut other, _) = WsClient::open(server.addr, "", None).await;
    let started = std::time::Instant::now();
    let response = reqwest::Client::new()
        .delete(server.url(&format!("/admin/v1/keys/{user_id}")))
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(client.close_code().await, Some(1008));
    assert!(started.elapsed() < Duration::from_secs(5));
    // Other connections are untouched.
    let published = server.state.hub.publish(marker(1));
    assert_eq!(
        id_of(&other.until_type("system.startup").await),
        published.id
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_revoked_by_another_process_is_closed_within_5_seconds() {
    let server = TestServer::start(|_| {}).await;
    let user = server.create_key("user", false).await;
    let user_id = server.key_id(&user).await;
    let (mut client, _) = WsClient::open(server.addr, &format!("token={user}"), None).await;
    // Straight to the store, as `tollgate keys revoke` or another node does.
    let started = std::time::Instant::now();
    server.state.store.revoke_api_key(user_id).await.unwrap();
    assert_eq!(client.close_code().await, Some(1008));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn resume_under_concurrent_publishing_has_no_gap_and_no_duplicate() {
    const EVENTS: usize = 2_000;
    let server = TestServer::start(|c| c.features.websocket.history_size = 4_096).await;
    let first = server.state.hub.publish(marker(0));
    let hub = server.state.hub.clone();
    let publisher = tokio::spawn(async move {
        let mut last = 0;
        for n in 1..=EVENTS {
            last = hub.publish(marker(n)).id;
            if n % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        last
    });
    // Connect while the publisher runs, resuming from the first event.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (mut client, connected) =
        WsClient::open(server.addr, &format!("since={}", first.id), None).await;
    assert_eq!(connected["payload"]["resumed"], true);
    let last = publisher.await.unwrap();
    let mut seen = Vec::new();
    while seen.last() != Some(&last) {
        seen.push(id_of(&client.next_json().await));
    }
    let expected: Vec<u64> = (first.id + 1..=last).collect();
    assert_eq!(seen.len(), EVENTS);
    assert_eq!(
        seen, expected,
        "every event after the cursor exactly once, in order"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_cursor_older_than_the_history_gets_resume_failed_then_live_events() {
    let server = TestServer::start(|c| c.features.websocket.history_size = 4).await;
    let old = server.state.hub.publish(marker(0));
    let mut kept = Vec::new();
    for n in 1..=6 {
        kept.push(server.state.hub.publish(marker(n)).id);
    }
    let (mut client, connected) =
        WsClient::open(server.addr, &format!("since={}", old.id), None).await;
    assert_eq!(connected["payload"]["resumed"], false);
    let failed = client.next_json().await;
    assert_eq!(failed["type"], "resume_failed");
    assert_eq!(failed["payload"]["since"], old.id.to_string());
    assert_eq!(failed["payload"]["oldest_available"], kept[2].to_string());
    let live = server.state.hub.publish(marker(7));
    assert_eq!(id_of(&client.next_json().await), live.id);
    server.shutdown().await;
}

#[tokio::test]
async fn startup_is_published_once_the_listener_is_bound_and_kept_for_resume() {
    let server = TestServer::start(|_| {}).await;
    // A client that knows no id learns the oldest kept one from
    // resume_failed and resumes from just before it.
    let (mut probe, _) = WsClient::open(server.addr, "since=1", None).await;
    let failed = probe.next_json().await;
    let oldest: u64 = failed["payload"]["oldest_available"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (mut client, _) = WsClient::open(server.addr, &format!("since={}", oldest - 1), None).await;
    let startup = client.next_json().await;
    assert_eq!(startup["type"], "system.startup");
    assert_eq!(startup["payload"]["listen"], server.addr.to_string());
    assert_eq!(startup["payload"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(!startup["payload"]["node"].as_str().unwrap().is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn key_creation_and_revocation_through_the_admin_api_are_audited_live() {
    let server = TestServer::start(|_| {}).await;
    let admin_id = server.key_id(&server.admin_key).await;
    let (mut client, _) = WsClient::open(server.addr, "types=audit.admin", None).await;
    let http = reqwest::Client::new();
    let created: Value = http
        .post(server.url("/admin/v1/keys"))
        .bearer_auth(&server.admin_key)
        .json(&json!({"name": "svc"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new_id = created["id"].as_str().unwrap();
    let event = client.next_json().await;
    assert_eq!(
        event["payload"],
        json!({"actor": admin_id.to_string(), "action": "key.created", "target": new_id})
    );
    let status = http
        .delete(server.url(&format!("/admin/v1/keys/{new_id}")))
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let event = client.next_json().await;
    assert_eq!(
        event["payload"],
        json!({"actor": admin_id.to_string(), "action": "key.revoked", "target": new_id})
    );
    assert!(
        !event.to_string().contains("gw_live_"),
        "no key material in events"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn actions_recorded_by_the_cli_reach_the_stream_with_actor_cli() {
    let server = TestServer::start(|_| {}).await;
    let (mut client, _) = WsClient::open(server.addr, "types=audit.admin", None).await;
    // What `tollgate keys create` records: an unpublished action.
    server
        .state
        .store
        .record_admin_action("cli", "key.created", "some-key-id", false)
        .await
        .unwrap();
    let event = client.next_json().await;
    assert_eq!(
        event["payload"],
        json!({"actor": "cli", "action": "key.created", "target": "some-key-id"})
    );
    // Claimed once: it is not published again.
    assert!(client
        .read_within(Duration::from_millis(2_500))
        .await
        .is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_sends_system_shutdown_then_close_1001() {
    let server = TestServer::start(|_| {}).await;
    let (mut client, _) = WsClient::open(server.addr, "", None).await;
    let stopping = tokio::spawn(server.shutdown());
    let frame = client.until_type("system.shutdown").await;
    assert_eq!(frame["payload"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(client.close_code().await, Some(1001));
    stopping.await.unwrap();
}

#[tokio::test]
async fn config_reload_by_admin_api_is_admin_only_and_announced() {
    let server = TestServer::start(|_| {}).await;
    let user = server.create_key("user", false).await;
    let (mut client, _) = WsClient::open(server.addr, "topics=system", None).await;
    let http = reqwest::Client::new();
    let forbidden = http
        .post(server.url("/admin/v1/config/reload"))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let response = http
        .post(server.url("/admin/v1/config/reload"))
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The test server started from an in-memory configuration, so the
    // reload reads the defaults: its listen address and database changed.
    let body: Value = response.json().await.unwrap();
    let frame = client.until_type("system.config_reloaded").await;
    assert_eq!(
        frame["payload"]["changed_sections"],
        body["changed_sections"]
    );
    assert!(
        !frame.to_string().contains("sqlite://"),
        "names of sections, never values"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_count_streams_events_and_rejections() {
    let server = TestServer::start(|c| c.features.websocket.max_connections = 1).await;
    let (mut client, _) = WsClient::open(server.addr, "", None).await;
    let refused = WsClient::connect(server.addr, "", None)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 503);
    server.state.hub.publish(marker(1));
    client.next_json().await;
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tollgate_streams_open{transport=\"websocket\"}",
        "tollgate_events_published_total{type=\"system.startup\"}",
        "tollgate_stream_frames_delivered_total{transport=\"websocket\"}",
        "tollgate_stream_rejections_total{reason=\"capacity\"}",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn connections_and_the_ledger_writer_run_on_the_event_threads() {
    let server = TestServer::start(|config| config.server.event_threads = 2).await;
    let metrics = server.state.event_runtime.handle().metrics();
    assert_eq!(metrics.num_workers(), 2);
    // The ledger's writer is the one task there before any stream.
    let idle = metrics.num_alive_tasks();
    assert_eq!(idle, 1, "the ledger writer alone");
    let (client, _) =
        WsClient::open(server.addr, &format!("token={}", server.admin_key), None).await;
    wait_until("the connection's task runs there", DEADLINE, || async {
        metrics.num_alive_tasks() == idle + 1
    })
    .await;
    drop(client);
    wait_until("the task ends with the connection", DEADLINE, || async {
        metrics.num_alive_tasks() == idle
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_event_published_right_after_the_handshake_reaches_a_connection_whose_task_runs_late() {
    // The task cannot run until the event below has been published.
    let (server, release) = TestServer::start_with_event_thread_held().await;
    let mut client = WsClient::connect(server.addr, &format!("token={}", server.admin_key), None)
        .await
        .expect("the handshake completes without the task");
    let published = server.state.hub.publish(ConfigReloaded {
        changed_sections: vec!["late".into()],
    });
    release.send(()).unwrap();
    let connected = client.next_json().await;
    assert_eq!(connected["type"], "connected");
    let event = client.next_json().await;
    assert_eq!(event["type"], "system.config_reloaded");
    assert_eq!(id_of(&event), published.id);
    server.shutdown().await;
}

//! Circuit breakers against a real gateway and a real OpenAI-compatible
//! HTTP upstream that fails on command: the walks closed → open →
//! half_open → closed and → open again, exactly one
//! `circuit_breaker.state_changed` per transition (also under concurrent
//! load), what counts as a failure (5xx, timeouts, refused connections,
//! redirects; not 4xx; 429 only with `count_429`), fallbacks while open, and
//! `GET /admin/v1/providers`.
//!
//! The breaker's `open_secs` is 1 where a test walks through half-open (the
//! test waits for the half-open event, with a deadline) and 60 where it
//! does not, so that a slow machine cannot turn the breaker half-open in the
//! middle of a test that expects it to stay open.

#[path = "support/stream_client.rs"]
mod stream_client;
mod support;
#[path = "support/switchable_upstream.rs"]
mod switchable_upstream;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stream_client::WsClient;
use support::{TestServer, DEADLINE};
use switchable_upstream::{FlakyUpstream, HANG};
use tollgate::breaker::{BreakerSnapshot, CircuitBreakerConfig};
use tollgate::config::{Config, ModelConfig, ProviderConfig};
use tollgate::events::model::{BreakerState, BreakerStateChanged};

/// Every request's prompt (the mock fallback echoes it).
const PROMPT: &str = "hello there gateway";

fn breaker(failure_threshold: u32, open_secs: u64) -> CircuitBreakerConfig {
    CircuitBreakerConfig {
        failure_threshold,
        open_secs,
        half_open_max_requests: 1,
        count_429: false,
    }
}

/// `[providers.NAME] type = "openai"` at `base_url`. Built from JSON, as
/// from a file, so fields added later take their defaults.
fn openai(
    base_url: &str,
    timeout_secs: u64,
    circuit_breaker: CircuitBreakerConfig,
) -> ProviderConfig {
    let mut provider: ProviderConfig = serde_json::from_value(json!({
        "type": "openai",
        "base_url": base_url,
        "connect_timeout_secs": 2,
        "timeout_secs": timeout_secs,
    }))
    .expect("a valid provider configuration");
    provider.circuit_breaker = circuit_breaker;
    provider
}

fn mock() -> ProviderConfig {
    serde_json::from_value(json!({"type": "mock"})).expect("a valid provider configuration")
}

fn model(name: &str, provider: &str, fallbacks: &[&str]) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        provider: provider.into(),
        upstream_model: None,
        input_usd_per_mtok: 0.15,
        output_usd_per_mtok: 0.60,
        fallbacks: fallbacks.iter().map(|f| f.to_string()).collect(),
    }
}

/// A gateway whose only provider is `up` (at `upstream`) with `cb`, and the
/// model `up-model` routed to it; `more` changes the configuration further.
async fn start(
    upstream: &str,
    cb: CircuitBreakerConfig,
    more: impl FnOnce(&mut Config),
) -> TestServer {
    let upstream = upstream.to_owned();
    TestServer::start(move |c| {
        c.providers.clear();
        c.providers.insert("up".into(), openai(&upstream, 600, cb));
        c.models = vec![model("up-model", "up", &[])];
        more(c);
        c.validate().expect("the test configuration is valid");
    })
    .await
}

/// Asserts an OpenAI-shaped error answer; returns its message.
async fn expect_error(response: reqwest::Response, status: u16, kind: &str, code: &str) -> String {
    assert_eq!(response.status(), status, "{:?}", response.headers());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    body["error"]["message"].as_str().unwrap().to_owned()
}

/// Asserts a 502 `upstream_error` naming the upstream's status.
async fn expect_502(response: reqwest::Response, upstream_status: u16) {
    let message = expect_error(response, 502, "upstream_error", "upstream_error").await;
    assert_eq!(
        message,
        format!(
            "the provider `up` failed with HTTP {upstream_status}: scripted HTTP {upstream_status}"
        )
    );
}

/// Asserts a 503 `provider_unavailable` with `Retry-After` in whole
/// seconds: the time left until half-open, rounded up. `open_secs` 1 gives
/// exactly 1; for `open_secs` 60 it is 60 right after opening and less as
/// the test goes on, but never below 60 − 15 (a test takes less than its
/// [`DEADLINE`]).
async fn expect_503(response: reqwest::Response, open_secs: u64) {
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .expect("a 503 has Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is whole seconds");
    let lowest = open_secs.saturating_sub(DEADLINE.as_secs()).max(1);
    assert!(
        (lowest..=open_secs).contains(&retry_after),
        "Retry-After {retry_after} for open_secs {open_secs}"
    );
    let message = expect_error(response, 503, "server_error", "provider_unavailable").await;
    assert!(message.contains("`up`"), "{message}");
}

/// Asserts a 200 served by `provider`.
async fn expect_200(response: reqwest::Response, provider: &str) -> Value {
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-provider"], provider);
    response.json().await.unwrap()
}

fn snapshot(server: &TestServer, provider: &str) -> BreakerSnapshot {
    let routing = server.state.routing.load();
    routing
        .providers()
        .iter()
        .find(|u| u.name == provider)
        .unwrap_or_else(|| panic!("no provider `{provider}`"))
        .breaker
        .snapshot()
}

/// An admin subscriber to `circuit_breaker.state_changed` only.
async fn subscribe(server: &TestServer) -> WsClient {
    let query = format!(
        "token={}&types=circuit_breaker.state_changed",
        server.admin_key
    );
    WsClient::open(server.addr, &query, None).await.0
}

/// The next frame, which must be a breaker event.
async fn next_event(client: &mut WsClient) -> Value {
    let frame = client.next_json().await;
    assert_eq!(frame["type"], "circuit_breaker.state_changed", "{frame}");
    frame
}

/// Every frame until a marker published now, so everything published
/// before it has been seen.
async fn until_marker(server: &TestServer, client: &mut WsClient) -> Vec<Value> {
    let marker = server.state.hub.publish(BreakerStateChanged {
        provider: "test-marker".into(),
        from: BreakerState::Closed,
        to: BreakerState::Open,
        reason: "marker".into(),
        consecutive_failures: 0,
    });
    client.until_id(marker.id).await
}

/// An event as (provider, from, to, reason, consecutive_failures).
type Move = (String, String, String, String, u64);

fn mv(from: &str, to: &str, reason: &str, consecutive_failures: u64) -> Move {
    (
        "up".into(),
        from.into(),
        to.into(),
        reason.into(),
        consecutive_failures,
    )
}

fn moves(events: &[Value]) -> Vec<Move> {
    events
        .iter()
        .map(|e| {
            assert_eq!(e["type"], "circuit_breaker.state_changed", "{e}");
            let p = &e["payload"];
            (
                p["provider"].as_str().unwrap().to_owned(),
                p["from"].as_str().unwrap().to_owned(),
                p["to"].as_str().unwrap().to_owned(),
                p["reason"].as_str().unwrap().to_owned(),
                p["consecutive_failures"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn opened(last: &str) -> Move {
    mv(
        "closed",
        "open",
        &format!("3 consecutive failures (last: {last})"),
        3,
    )
}

/// Sends three requests one after another, each answered 502 with `code`
/// and a message that starts with `message_start`.
async fn fail_with_502(server: &TestServer, key: &str, code: &str, message_start: &str) {
    for _ in 0..3 {
        let message = expect_error(
            server.chat(key, "up-model", PROMPT).await,
            502,
            "upstream_error",
            code,
        )
        .await;
        assert!(message.starts_with(message_start), "{message}");
    }
}

/// Sends `n` requests one after another, each answered 502 for `status`.
async fn fail_sequentially(server: &TestServer, key: &str, n: usize, status: u16) {
    for _ in 0..n {
        expect_502(server.chat(key, "up-model", PROMPT).await, status).await;
    }
}

#[tokio::test]
async fn a_failing_provider_walks_closed_open_half_open_closed_with_one_event_per_transition() {
    let up = FlakyUpstream::start(500).await;
    let server = start(&up.base_url(), breaker(3, 1), |_| {}).await;
    let key = server.create_key("app", false).await;
    let mut client = subscribe(&server).await;
    let mut log = Vec::new();

    fail_sequentially(&server, &key, 2, 500).await;
    assert_eq!(snapshot(&server, "up").state, BreakerState::Closed);
    assert_eq!(snapshot(&server, "up").consecutive_failures, 2);
    let third_sent = Instant::now();
    fail_sequentially(&server, &key, 1, 500).await;
    // The transition is published before the failing answer is sent.
    log.push(next_event(&mut client).await);
    assert_eq!(moves(&log), [opened("HTTP 500")]);
    assert_eq!(up.hits(), 3);

    // Open: refused at once, without an upstream call.
    expect_503(server.chat(&key, "up-model", PROMPT).await, 1).await;
    assert_eq!(up.hits(), 3);

    // Half-open after open_secs, by itself, with no request.
    log.push(next_event(&mut client).await);
    let waited = third_sent.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "half-open only after open_secs, not after {waited:?}"
    );
    assert_eq!(
        moves(&log[1..]),
        [mv("open", "half_open", "open for 1 s", 3)]
    );
    assert_eq!(snapshot(&server, "up").state, BreakerState::HalfOpen);

    // The trial succeeds: closed.
    up.set_status(200);
    let body = expect_200(server.chat(&key, "up-model", PROMPT).await, "up").await;
    assert_eq!(body["choices"][0]["message"]["content"], "fine");
    assert_eq!(up.hits(), 4);
    log.extend(until_marker(&server, &mut client).await);
    assert_eq!(
        moves(&log),
        [
            opened("HTTP 500"),
            mv("open", "half_open", "open for 1 s", 3),
            mv("half_open", "closed", "trial request succeeded", 0),
        ]
    );
    let snap = snapshot(&server, "up");
    assert_eq!(snap.state, BreakerState::Closed);
    assert_eq!(snap.consecutive_failures, 0);
    assert_eq!(snap.failures_total, 3);
    assert_eq!(snap.successes_total, 1);
    assert_eq!(snap.rejections_total, 1);
    assert_eq!(snap.opened_at, None);

    // Closed again: requests flow, and nothing more is published.
    expect_200(server.chat(&key, "up-model", PROMPT).await, "up").await;
    assert_eq!(up.hits(), 5);
    assert_eq!(
        until_marker(&server, &mut client).await,
        Vec::<Value>::new()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_failed_trial_reopens_the_breaker_for_a_new_open_period_with_one_event_per_transition() {
    let up = FlakyUpstream::start(503).await;
    let server = start(&up.base_url(), breaker(3, 1), |_| {}).await;
    let key = server.create_key("app", false).await;
    let mut client = subscribe(&server).await;
    let mut log = Vec::new();

    fail_sequentially(&server, &key, 3, 503).await;
    log.push(next_event(&mut client).await);
    log.push(next_event(&mut client).await);
    assert_eq!(
        moves(&log),
        [
            opened("HTTP 503"),
            mv("open", "half_open", "open for 1 s", 3)
        ]
    );

    // The trial fails: open again, the streak goes on.
    fail_sequentially(&server, &key, 1, 503).await;
    log.push(next_event(&mut client).await);
    assert_eq!(
        moves(&log[2..]),
        [mv("half_open", "open", "trial request failed: HTTP 503", 4)]
    );
    expect_503(server.chat(&key, "up-model", PROMPT).await, 1).await;
    assert_eq!(up.hits(), 4);
    let snap = snapshot(&server, "up");
    assert_eq!(snap.state, BreakerState::Open);
    assert_eq!(snap.consecutive_failures, 4);

    // The new open period has its own timer; this time the trial succeeds.
    log.push(next_event(&mut client).await);
    up.set_status(200);
    expect_200(server.chat(&key, "up-model", PROMPT).await, "up").await;
    log.extend(until_marker(&server, &mut client).await);
    assert_eq!(
        moves(&log),
        [
            opened("HTTP 503"),
            mv("open", "half_open", "open for 1 s", 3),
            mv("half_open", "open", "trial request failed: HTTP 503", 4),
            mv("open", "half_open", "open for 1 s", 4),
            mv("half_open", "closed", "trial request succeeded", 0),
        ]
    );
    let snap = snapshot(&server, "up");
    assert_eq!(snap.state, BreakerState::Closed);
    assert_eq!(snap.failures_total, 4);
    assert_eq!(snap.successes_total, 1);
    assert_eq!(snap.rejections_total, 1);
    assert_eq!(up.hits(), 5);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_concurrent_failing_requests_open_the_breaker_exactly_once() {
    let up = FlakyUpstream::start(500).await;
    let server = start(&up.base_url(), breaker(3, 60), |_| {}).await;
    let key = server.create_key("app", false).await;
    let mut client = subscribe(&server).await;

    let responses =
        futures::future::join_all((0..40).map(|_| server.chat(&key, "up-model", PROMPT))).await;
    let (mut bad_gateway, mut unavailable) = (0, 0);
    for response in responses {
        match response.status().as_u16() {
            502 => {
                bad_gateway += 1;
                expect_502(response, 500).await;
            }
            503 => {
                unavailable += 1;
                expect_503(response, 60).await;
            }
            other => panic!("a failing request answered {other}"),
        }
    }
    assert!(
        bad_gateway >= 3,
        "{bad_gateway} failures opened the breaker"
    );
    assert_eq!(bad_gateway + unavailable, 40);
    // Exactly the 502s reached the upstream.
    assert_eq!(up.hits(), bad_gateway);
    assert_eq!(
        moves(&until_marker(&server, &mut client).await),
        [opened("HTTP 500")]
    );

    // Once open, a second burst is refused entirely.
    let responses =
        futures::future::join_all((0..10).map(|_| server.chat(&key, "up-model", PROMPT))).await;
    for response in responses {
        expect_503(response, 60).await;
    }
    assert_eq!(up.hits(), bad_gateway);
    assert_eq!(
        until_marker(&server, &mut client).await,
        Vec::<Value>::new()
    );
    let snap = snapshot(&server, "up");
    assert_eq!(snap.state, BreakerState::Open);
    assert_eq!(snap.consecutive_failures, 3);
    assert_eq!(snap.failures_total, bad_gateway as u64);
    assert_eq!(snap.rejections_total, unavailable as u64 + 10);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_while_half_open_send_one_trial_and_close_the_breaker_once() {
    let up = FlakyUpstream::start(500).await;
    let server = start(&up.base_url(), breaker(3, 1), |_| {}).await;
    let key = server.create_key("app", false).await;
    let mut client = subscribe(&server).await;
    fail_sequentially(&server, &key, 3, 500).await;
    let mut log = vec![next_event(&mut client).await];
    log.push(next_event(&mut client).await);
    assert_eq!(
        moves(&log),
        [
            opened("HTTP 500"),
            mv("open", "half_open", "open for 1 s", 3)
        ]
    );

    // A slow, healthy upstream: the one trial is in flight while the
    // others arrive, so they are refused until it has closed the breaker.
    up.set_status(200);
    up.set_delay(Duration::from_millis(300));
    let responses =
        futures::future::join_all((0..20).map(|_| server.chat(&key, "up-model", PROMPT))).await;
    let (mut ok, mut unavailable) = (0, 0);
    for response in responses {
        match response.status().as_u16() {
            200 => {
                ok += 1;
                expect_200(response, "up").await;
            }
            503 => {
                unavailable += 1;
                // Every trial slot taken: try again in a second.
                expect_503(response, 1).await;
            }
            other => panic!("a request while half-open answered {other}"),
        }
    }
    assert!(ok >= 1, "the trial succeeded");
    assert_eq!(ok + unavailable, 20);
    assert_eq!(up.hits(), 3 + ok);
    log.extend(until_marker(&server, &mut client).await);
    assert_eq!(
        moves(&log),
        [
            opened("HTTP 500"),
            mv("open", "half_open", "open for 1 s", 3),
            mv("half_open", "closed", "trial request succeeded", 0),
        ]
    );
    let snap = snapshot(&server, "up");
    assert_eq!(snap.state, BreakerState::Closed);
    assert_eq!(snap.rejections_total, unavailable as u64);
    assert_eq!(snap.successes_total, ok as u64);
    server.shutdown().await;
}

#[tokio::test]
async fn client_errors_do_not_count_and_429_counts_only_with_count_429() {
    let up = FlakyUpstream::start(400).await;
    let server = start(&up.base_url(), breaker(3, 60), |_| {}).await;
    let key = server.create_key("app", false).await;
    let mut client = subscribe(&server).await;

    // 400 and 429 are passed through and change nothing.
    for status in [400, 429] {
        up.set_status(status);
        for _ in 0..5 {
            let response = server.chat(&key, "up-model", PROMPT).await;
            assert_eq!(response.status(), status);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["message"], format!("scripted HTTP {status}"));
        }
    }
    let snap = snapshot(&server, "up");
    assert_eq!(snap.state, BreakerState::Closed);
    assert_eq!(snap.consecutive_failures, 0);
    assert_eq!(snap.failures_total, 0);
    assert_eq!(snap.ignored_total, 10);
    assert_eq!(
        until_marker(&server, &mut client).await,
        Vec::<Value>::new()
    );

    // Failures must be consecutive: a success starts the count again…
    up.set_status(500);
    fail_sequentially(&server, &key, 2, 500).await;
    up.set_status(200);
    expect_200(server.chat(&key, "up-model", PROMPT).await, "up").await;
    assert_eq!(snapshot(&server, "up").consecutive_failures, 0);
    // …while a client error neither counts nor breaks the streak.
    up.set_status(500);
    fail_sequentially(&server, &key, 2, 500).await;
    up.set_status(400);
    assert_eq!(server.chat(&key, "up-model", PROMPT).await.status(), 400);
    assert_eq!(snapshot(&server, "up").state, BreakerState::Closed);
    assert_eq!(snapshot(&server, "up").consecutive_failures, 2);
    up.set_status(500);
    fail_sequentially(&server, &key, 1, 500).await;
    assert_eq!(
        moves(&until_marker(&server, &mut client).await),
        [opened("HTTP 500")]
    );
    expect_503(server.chat(&key, "up-model", PROMPT).await, 60).await;
    server.shutdown().await;

    // With count_429, three 429s open the breaker.
    let up = FlakyUpstream::start(429).await;
    let cb = CircuitBreakerConfig {
        count_429: true,
        ..breaker(3, 60)
    };
    let server = start(&up.base_url(), cb, |_| {}).await;
    let key = server.create_key("app", false).await;
    let mut client = subscribe(&server).await;
    for _ in 0..3 {
        // The client still sees the provider's 429.
        assert_eq!(server.chat(&key, "up-model", PROMPT).await.status(), 429);
    }
    assert_eq!(
        moves(&until_marker(&server, &mut client).await),
        [opened("HTTP 429")]
    );
    expect_503(server.chat(&key, "up-model", PROMPT).await, 60).await;
    assert_eq!(up.hits(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn while_the_breaker_is_open_the_fallback_serves_and_is_named_and_recorded() {
    let up = FlakyUpstream::start(200).await;
    let server = start(&up.base_url(), breaker(3, 60), |c| {
        c.providers.insert("backup".into(), mock());
        c.models = vec![
            model("up-model", "up", &["backup"]),
            model("solo", "up", &[]),
        ];
    })
    .await;
    let key = server.create_key("app", false).await;
    let mut client = subscribe(&server).await;

    // Healthy: the model's own provider serves.
    expect_200(server.chat(&key, "up-model", PROMPT).await, "up").await;
    // Failures go to the client; fallbacks are for an open breaker only.
    up.set_status(500);
    fail_sequentially(&server, &key, 3, 500).await;
    assert_eq!(
        moves(&until_marker(&server, &mut client).await),
        [opened("HTTP 500")]
    );
    assert_eq!(up.hits(), 4);

    let response = server.chat(&key, "up-model", PROMPT).await;
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = expect_200(response, "backup").await;
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Mock reply to: hello there gateway"
    );
    assert_eq!(up.hits(), 4, "the open provider was not called");
    // The fallback request is in the ledger.
    let row = server.ledger_row(&request_id).await;
    assert_eq!(row.provider, "backup");
    assert_eq!(row.model, "up-model");
    assert_eq!(row.status, 200);
    assert_eq!((row.input_tokens, row.output_tokens), (10, 7));

    // Streamed answers too.
    let streamed = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "up-model", "stream": true,
            "messages": [{"role": "user", "content": "hello there gateway"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    assert_eq!(streamed.headers()["x-tollgate-provider"], "backup");
    assert_eq!(streamed.headers()["content-type"], "text/event-stream");
    let text = streamed.text().await.unwrap();
    assert!(text.contains("Mock"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // A model without fallbacks is refused.
    expect_503(server.chat(&key, "solo", PROMPT).await, 60).await;
    assert_eq!(up.hits(), 4);
    assert_eq!(snapshot(&server, "backup").state, BreakerState::Closed);
    assert_eq!(snapshot(&server, "backup").successes_total, 2);
    assert_eq!(snapshot(&server, "up").rejections_total, 3);
    assert_eq!(
        until_marker(&server, &mut client).await,
        Vec::<Value>::new()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_providers_endpoint_shows_each_breakers_state_and_counters_to_admins_only() {
    let up = FlakyUpstream::start(200).await;
    let server = start(&up.base_url(), breaker(3, 60), |c| {
        c.providers.insert("spare".into(), mock());
    })
    .await;
    let key = server.create_key("app", false).await;
    expect_200(server.chat(&key, "up-model", PROMPT).await, "up").await;
    up.set_status(500);
    fail_sequentially(&server, &key, 3, 500).await;
    expect_503(server.chat(&key, "up-model", PROMPT).await, 60).await;

    let http = reqwest::Client::new();
    let response = http
        .get(server.url("/admin/v1/providers"))
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let listed: Value = response.json().await.unwrap();
    assert_eq!(listed["object"], "list");
    let data = listed["data"].as_array().unwrap();
    let names: Vec<&str> = data
        .iter()
        .map(|p| p["provider"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["spare", "up"]);

    let spare = &data[0]["circuit_breaker"];
    assert_eq!(spare["provider"], "spare");
    assert_eq!(spare["state"], "closed");
    for counter in [
        "consecutive_failures",
        "successes_total",
        "failures_total",
        "ignored_total",
        "rejections_total",
        "half_open_in_flight",
    ] {
        assert_eq!(spare[counter], 0, "spare {counter}");
    }
    assert_eq!(spare["opened_at"], Value::Null);
    assert_eq!(spare["half_open_at"], Value::Null);

    let up_breaker = &data[1]["circuit_breaker"];
    assert_eq!(up_breaker["provider"], "up");
    assert_eq!(up_breaker["state"], "open");
    assert_eq!(up_breaker["consecutive_failures"], 3);
    assert_eq!(up_breaker["successes_total"], 1);
    assert_eq!(up_breaker["failures_total"], 3);
    assert_eq!(up_breaker["ignored_total"], 0);
    assert_eq!(up_breaker["rejections_total"], 1);
    assert_eq!(up_breaker["half_open_in_flight"], 0);
    assert_eq!(
        up_breaker["config"],
        json!({"failure_threshold": 3, "open_secs": 60, "half_open_max_requests": 1,
            "count_429": false})
    );
    let time = |key: &str| {
        chrono::DateTime::parse_from_rfc3339(up_breaker[key].as_str().unwrap())
            .unwrap_or_else(|e| panic!("{key}: {e}"))
    };
    assert_eq!(
        time("half_open_at") - time("opened_at"),
        chrono::Duration::seconds(60)
    );

    let app_key = http
        .get(server.url("/admin/v1/providers"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(app_key.status(), 403);
    let body: Value = app_key.json().await.unwrap();
    assert_eq!(body["error"]["code"], "admin_required");
    let anonymous = http
        .get(server.url("/admin/v1/providers"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    server.shutdown().await;
}

#[tokio::test]
async fn timeouts_count_as_failures() {
    let up = FlakyUpstream::start(HANG).await;
    let base_url = up.base_url();
    let server = TestServer::start(move |c| {
        c.providers.clear();
        c.providers
            .insert("up".into(), openai(&base_url, 1, breaker(3, 60)));
        c.models = vec![model("up-model", "up", &[])];
        c.validate().expect("the test configuration is valid");
    })
    .await;
    let key = server.create_key("app", false).await;
    let mut client = subscribe(&server).await;
    // Concurrently, so the test waits about one timeout, not three.
    let started = Instant::now();
    let responses =
        futures::future::join_all((0..3).map(|_| server.chat(&key, "up-model", PROMPT))).await;
    assert!(started.elapsed() >= Duration::from_secs(1));
    for response in responses {
        let message = expect_error(response, 504, "upstream_error", "upstream_timeout").await;
        assert_eq!(message, "the provider `up` did not answer in time");
    }
    assert_eq!(
        moves(&until_marker(&server, &mut client).await),
        [opened("the provider did not answer in time")]
    );
    expect_503(server.chat(&key, "up-model", PROMPT).await, 60).await;
    assert_eq!(up.hits(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn refused_connections_count_as_failures() {
    // A port where nothing listens: bound a moment ago, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = start(&format!("http://{closed}/v1"), breaker(3, 60), |_| {}).await;
    let key = server.create_key("app", false).await;
    let mut client = subscribe(&server).await;
    fail_with_502(
        &server,
        &key,
        "upstream_unreachable",
        "cannot connect to the provider `up`: ",
    )
    .await;
    let events = until_marker(&server, &mut client).await;
    let got = moves(&events);
    assert_eq!(got.len(), 1, "{got:?}");
    let (provider, from, to, reason, consecutive_failures) = &got[0];
    assert_eq!(
        (
            provider.as_str(),
            from.as_str(),
            to.as_str(),
            *consecutive_failures
        ),
        ("up", "closed", "open", 3)
    );
    assert!(
        reason.starts_with("3 consecutive failures (last: cannot connect to the provider: "),
        "{reason}"
    );
    expect_503(server.chat(&key, "up-model", PROMPT).await, 60).await;
    server.shutdown().await;
}

#[tokio::test]
async fn redirects_count_as_failures() {
    // A redirect is not followed (it would resend the prompt elsewhere, or
    // turn a POST into a GET): the provider moved or base_url is wrong, a
    // failure like a 5xx.
    let up = FlakyUpstream::start(307).await;
    let server = start(&up.base_url(), breaker(3, 60), |_| {}).await;
    let key = server.create_key("app", false).await;
    let mut client = subscribe(&server).await;
    fail_with_502(
        &server,
        &key,
        "upstream_error",
        "the provider `up` answered HTTP 307, a redirect",
    )
    .await;
    assert_eq!(
        moves(&until_marker(&server, &mut client).await),
        [opened("the provider answered HTTP 307, a redirect")]
    );
    expect_503(server.chat(&key, "up-model", PROMPT).await, 60).await;
    assert_eq!(up.hits(), 3);
    server.shutdown().await;
}

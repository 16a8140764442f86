//! End to end, as an operator sees it: one admin WebSocket subscriber
//! watches a global budget go 50% → 80%, a provider's circuit breaker go
//! open → half_open → closed, the budget go exceeded, and requests then get
//! 402 — every alert exactly once, in the order it happened.

#[path = "support/stream_client.rs"]
mod stream_client;
mod support;
#[path = "support/switchable_upstream.rs"]
mod switchable_upstream;

use serde_json::{json, Value};
use stream_client::WsClient;
use support::{marker, TestServer};
use switchable_upstream::FlakyUpstream;
use tollgate::breaker::CircuitBreakerConfig;
use tollgate::budget::{BudgetAction, BudgetConfig, BudgetScope, Period};
use tollgate::config::{ModelConfig, ProviderConfig};

/// A mock-1 request with this prompt costs 6 micro-dollars (see
/// tests/budgets.rs).
const PROMPT: &str = "hello there gateway";
const REQUEST_COST: i64 = 6;
/// 30 µ$: 50% is crossed by the 3rd mock-1 request (18), 80% by the 4th
/// (24), the limit by the 5th (30).
const LIMIT_USD: f64 = 0.00003;

/// The next frame, kept in `log`.
async fn next_frame(client: &mut WsClient, log: &mut Vec<Value>) -> Value {
    let frame = client.next_json().await;
    log.push(frame.clone());
    frame
}

/// A frame as (type, what it says): `threshold_percent` and spend for
/// budget events, `provider from->to (failures)` for breaker events.
fn summary(frame: &Value) -> (String, String) {
    let kind = frame["type"].as_str().unwrap_or("?").to_owned();
    let p = &frame["payload"];
    let what = match kind.as_str() {
        "budget.threshold_reached" | "budget.exceeded" => format!(
            "{} {}% {}/{}",
            p["budget"].as_str().unwrap(),
            p["threshold_percent"],
            p["spent_micros"],
            p["limit_micros"]
        ),
        "circuit_breaker.state_changed" => format!(
            "{} {}->{} ({})",
            p["provider"].as_str().unwrap(),
            p["from"].as_str().unwrap(),
            p["to"].as_str().unwrap(),
            p["consecutive_failures"]
        ),
        _ => frame.to_string(),
    };
    (kind, what)
}

fn ev(kind: &str, what: &str) -> (String, String) {
    (kind.to_owned(), what.to_owned())
}

#[tokio::test]
async fn one_subscriber_sees_budget_and_breaker_alerts_each_once_in_order() {
    let up = FlakyUpstream::start(500).await;
    let base_url = up.base_url();
    let server = TestServer::start(move |c| {
        // The default mock provider and mock-1 stay; `up` is added.
        let mut provider: ProviderConfig = serde_json::from_value(json!({
            "type": "openai", "base_url": base_url, "connect_timeout_secs": 2,
        }))
        .unwrap();
        provider.circuit_breaker = CircuitBreakerConfig {
            failure_threshold: 3,
            open_secs: 1,
            half_open_max_requests: 1,
            count_429: false,
        };
        c.providers.insert("up".into(), provider);
        // Free, so only mock-1 requests move the budget.
        c.models.push(ModelConfig {
            name: "up-model".into(),
            provider: "up".into(),
            upstream_model: None,
            input_usd_per_mtok: 0.0,
            output_usd_per_mtok: 0.0,
            fallbacks: Vec::new(),
        });
        c.budgets = vec![BudgetConfig {
            name: "team".into(),
            scope: BudgetScope::Global,
            period: Period::Daily,
            limit_usd: LIMIT_USD,
            thresholds: vec![50, 80],
            action: BudgetAction::Block,
        }];
        c.validate().expect("the test configuration is valid");
    })
    .await;
    let key = server.create_key("app", false).await;
    let query = format!(
        "token={}&topics=budget,circuit_breaker,system",
        server.admin_key
    );
    let (mut client, _) = WsClient::open(server.addr, &query, None).await;
    let mut log = Vec::new();

    // The budget: 6, 12, 18 µ$ → 50%; 24 µ$ → 80%. Each alert is awaited
    // before the next request, so the order on the stream is the order
    // things happened; a stray alert would be read in its place.
    for _ in 0..3 {
        assert_eq!(server.chat(&key, "mock-1", PROMPT).await.status(), 200);
    }
    let frame = next_frame(&mut client, &mut log).await;
    assert_eq!(
        summary(&frame),
        ev("budget.threshold_reached", "team 50% 18/30")
    );
    assert_eq!(server.chat(&key, "mock-1", PROMPT).await.status(), 200);
    let frame = next_frame(&mut client, &mut log).await;
    assert_eq!(
        summary(&frame),
        ev("budget.threshold_reached", "team 80% 24/30")
    );

    // The provider: three failures open its breaker…
    for _ in 0..3 {
        let response = server.chat(&key, "up-model", PROMPT).await;
        assert_eq!(response.status(), 502);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "upstream_error");
    }
    let frame = next_frame(&mut client, &mut log).await;
    assert_eq!(
        summary(&frame),
        ev("circuit_breaker.state_changed", "up closed->open (3)")
    );
    // …which refuses at once…
    let refused = server.chat(&key, "up-model", PROMPT).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "provider_unavailable");
    assert_eq!(up.hits(), 3);
    // …turns half-open by itself after open_secs…
    let frame = next_frame(&mut client, &mut log).await;
    assert_eq!(
        summary(&frame),
        ev("circuit_breaker.state_changed", "up open->half_open (3)")
    );
    // …and closes on a successful trial.
    up.set_status(200);
    let served = server.chat(&key, "up-model", PROMPT).await;
    assert_eq!(served.status(), 200);
    assert_eq!(served.headers()["x-tollgate-provider"], "up");
    let frame = next_frame(&mut client, &mut log).await;
    assert_eq!(
        summary(&frame),
        ev("circuit_breaker.state_changed", "up half_open->closed (0)")
    );

    // The budget again: 30 µ$ reaches the limit.
    assert_eq!(server.chat(&key, "mock-1", PROMPT).await.status(), 200);
    let frame = next_frame(&mut client, &mut log).await;
    assert_eq!(summary(&frame), ev("budget.exceeded", "team 100% 30/30"));
    assert_eq!(frame["payload"]["scope"], "global");
    assert_eq!(frame["payload"]["period"], "daily");

    // From now on every request is refused before any upstream call, and
    // nothing more is published.
    for model in ["mock-1", "mock-1", "up-model"] {
        let response = server.chat(&key, model, PROMPT).await;
        assert_eq!(response.status(), 402);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "insufficient_quota");
        assert_eq!(body["error"]["code"], "budget_exceeded");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("`team`"), "{message}");
        assert!(message.contains("resets at "), "{message}");
    }
    assert_eq!(up.hits(), 4);

    // Everything published before the marker has been read: the whole
    // stream, in order, each alert once.
    let marker = server.state.hub.publish(marker(0));
    log.extend(client.until_id(marker.id).await);
    let seen: Vec<(String, String)> = log.iter().map(summary).collect();
    assert_eq!(
        seen,
        [
            ev("budget.threshold_reached", "team 50% 18/30"),
            ev("budget.threshold_reached", "team 80% 24/30"),
            ev("circuit_breaker.state_changed", "up closed->open (3)"),
            ev("circuit_breaker.state_changed", "up open->half_open (3)"),
            ev("circuit_breaker.state_changed", "up half_open->closed (0)"),
            ev("budget.exceeded", "team 100% 30/30"),
        ]
    );
    assert_eq!(
        log.iter()
            .filter(|f| f["topic"] == "budget")
            .map(|f| f["payload"]["spent_micros"].as_i64().unwrap())
            .max(),
        Some(5 * REQUEST_COST)
    );
    server.shutdown().await;
}

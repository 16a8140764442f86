//! Budgets against a real gateway and the mock provider: alerts exactly once
//! per threshold per period under concurrency, 402 with `block`, passes
//! with `alert`, a new period starting clean, per-key isolation, keys' own
//! budgets, and `GET /admin/v1/budgets`.

#[path = "support/stream_client.rs"]
mod stream_client;
mod support;

use serde_json::{json, Value};
use stream_client::WsClient;
use support::{marker, wait_until, TestServer, DEADLINE};
use tollgate::budget::{BudgetAction, BudgetConfig, BudgetScope, Period};

/// A mock-1 request with this prompt: 10 input and 7 output tokens, costing
/// ceil((10 × 150 000 + 7 × 600 000) / 1 000 000) = 6 micro-dollars.
const PROMPT: &str = "hello there gateway";
const REQUEST_COST: i64 = 6;

fn budget(name: &str, scope: BudgetScope, limit_usd: f64, action: BudgetAction) -> BudgetConfig {
    BudgetConfig {
        name: name.into(),
        scope,
        period: Period::Daily,
        limit_usd,
        thresholds: vec![50, 80, 100],
        action,
    }
}

/// Waits until the ledger holds `n` requests in total.
async fn wait_for_ledger(server: &TestServer, n: i64) {
    let query = tollgate::store::UsageQuery {
        key_id: None,
        model: None,
        from: None,
        to: None,
        group_by: None,
    };
    wait_until(
        &format!("the ledger holds {n} requests"),
        DEADLINE,
        || async {
            let totals = server.state.store.usage_totals(&query).await.unwrap();
            totals.first().map_or(0, |t| t.requests) == n
        },
    )
    .await;
}

/// Every budget event until a marker published after the ledger settled.
async fn budget_events(server: &TestServer, client: &mut WsClient) -> Vec<Value> {
    let marker = server.state.hub.publish(marker(0));
    let mut events = client.until_id(marker.id).await;
    events.retain(|frame| frame["topic"] == "budget");
    events
}

fn summary(events: &[Value]) -> Vec<(String, u64)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["payload"]["threshold_percent"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn fifty_concurrent_requests_crossing_every_threshold_alert_exactly_once_each() {
    // 200 µ$: 50% at 100, 80% at 160, 100% at 200; 50 requests spend 300.
    let server = TestServer::start(|c| {
        c.budgets = vec![budget(
            "team",
            BudgetScope::Global,
            0.0002,
            BudgetAction::Alert,
        )]
    })
    .await;
    let key = server.create_key("app", false).await;
    let (mut client, _) =
        WsClient::open(server.addr, &format!("token={}", server.admin_key), None).await;
    let responses =
        futures::future::join_all((0..50).map(|_| server.chat(&key, "mock-1", PROMPT))).await;
    assert!(
        responses.iter().all(|r| r.status() == 200),
        "alert budgets let requests through"
    );
    wait_for_ledger(&server, 50).await;
    let events = budget_events(&server, &mut client).await;
    assert_eq!(
        summary(&events),
        vec![
            ("budget.threshold_reached".into(), 50),
            ("budget.threshold_reached".into(), 80),
            ("budget.threshold_reached".into(), 100),
            ("budget.exceeded".into(), 100),
        ]
    );
    for event in &events {
        let payload = &event["payload"];
        assert_eq!(payload["budget"], "team");
        assert_eq!(payload["scope"], "global");
        assert_eq!(payload["limit_micros"], 200);
        assert_eq!(payload["period"], "daily");
        let threshold = payload["threshold_percent"].as_i64().unwrap();
        let spent = payload["spent_micros"].as_i64().unwrap();
        // The crossing request's total: at or past the threshold, less
        // than one request's cost beyond it.
        assert!(
            spent >= 2 * threshold && spent < 2 * threshold + REQUEST_COST,
            "{payload}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_blocking_budget_answers_402_naming_the_budget_and_its_reset_and_a_new_period_starts_clean(
) {
    let server = TestServer::start(|c| {
        c.budgets = vec![budget(
            "per-key-daily",
            BudgetScope::Key,
            0.000012,
            BudgetAction::Block,
        )]
    })
    .await;
    let key = server.create_key("app", false).await;
    let (mut client, _) =
        WsClient::open(server.addr, &format!("token={}", server.admin_key), None).await;
    for _ in 0..2 {
        assert_eq!(server.chat(&key, "mock-1", PROMPT).await.status(), 200);
        // One at a time, so the book has seen each total.
    }
    wait_for_ledger(&server, 2).await;
    let refused = server.chat(&key, "mock-1", PROMPT).await;
    assert_eq!(refused.status(), 402);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("`per-key-daily`"), "{message}");
    let tomorrow = (server.state.clock.now() + chrono::Duration::days(1))
        .date_naive()
        .format("%Y-%m-%dT00:00:00Z")
        .to_string();
    assert!(
        message.contains(&format!("resets at {tomorrow}")),
        "{message}"
    );
    let first_period = budget_events(&server, &mut client).await;
    assert_eq!(
        summary(&first_period).last(),
        Some(&("budget.exceeded".into(), 100))
    );

    // The next day: requests pass again and the alerts come again, once.
    server.state.clock.advance(chrono::Duration::days(1));
    for _ in 0..2 {
        assert_eq!(server.chat(&key, "mock-1", PROMPT).await.status(), 200);
    }
    // Refused requests are in the ledger too (with no tokens): 2 + 1 + 2.
    wait_for_ledger(&server, 5).await;
    assert_eq!(server.chat(&key, "mock-1", PROMPT).await.status(), 402);
    let second_period = budget_events(&server, &mut client).await;
    assert_eq!(summary(&second_period), summary(&first_period));
    assert_ne!(
        second_period[0]["payload"]["period_start"],
        first_period[0]["payload"]["period_start"]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn key_scoped_budgets_isolate_keys_and_alert_budgets_let_requests_through() {
    let server = TestServer::start(|c| {
        c.budgets = vec![
            budget("per-key", BudgetScope::Key, 0.000006, BudgetAction::Block),
            budget("watch", BudgetScope::Global, 0.000001, BudgetAction::Alert),
        ]
    })
    .await;
    let alice = server.create_key("alice", false).await;
    let bob = server.create_key("bob", false).await;
    assert_eq!(server.chat(&alice, "mock-1", PROMPT).await.status(), 200);
    wait_for_ledger(&server, 1).await;
    assert_eq!(server.chat(&alice, "mock-1", PROMPT).await.status(), 402);
    // Bob has his own counter; the exceeded global budget only alerts.
    assert_eq!(server.chat(&bob, "mock-1", PROMPT).await.status(), 200);
    server.shutdown().await;
}

#[tokio::test]
async fn a_keys_own_budget_from_the_admin_api_blocks_that_key() {
    let server = TestServer::start(|_| {}).await;
    let http = reqwest::Client::new();
    let created: Value = http
        .post(server.url("/admin/v1/keys"))
        .bearer_auth(&server.admin_key)
        .json(&json!({"name": "capped", "budget_usd": 0.000006, "budget_period": "total"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(created["budget_micros"], 6);
    assert_eq!(created["budget_period"], "total");
    let key = created["key"].as_str().unwrap();
    assert_eq!(server.chat(key, "mock-1", PROMPT).await.status(), 200);
    wait_for_ledger(&server, 1).await;
    let refused = server.chat(key, "mock-1", PROMPT).await;
    assert_eq!(refused.status(), 402);
    let message = refused.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("does not reset"), "{message}");
    // A refused stream is audited as the stream it asked to be.
    let refused = http
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "mock-1", "stream": true,
            "messages": [{"role": "user", "content": PROMPT}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 402);
    let request_id = refused.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let audit = server.audit_record(&request_id).await["payload"].clone();
    assert_eq!(audit["status"], 402);
    assert_eq!(audit["error"], "budget_exceeded");
    assert_eq!(audit["stream"], true);
    let bad = http
        .post(server.url("/admin/v1/keys"))
        .bearer_auth(&server.admin_key)
        .json(&json!({"name": "bad", "budget_usd": 1.0, "budget_period": "hourly"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    server.shutdown().await;
}

#[tokio::test]
async fn the_budgets_endpoint_shows_spend_thresholds_state_and_reset() {
    let server = TestServer::start(|c| {
        c.budgets = vec![budget(
            "team",
            BudgetScope::Global,
            0.00001,
            BudgetAction::Block,
        )]
    })
    .await;
    let key = server.create_key("app", false).await;
    assert_eq!(server.chat(&key, "mock-1", PROMPT).await.status(), 200);
    wait_for_ledger(&server, 1).await;
    let listed: Value = reqwest::Client::new()
        .get(server.url("/admin/v1/budgets"))
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let team = &listed["data"][0];
    assert_eq!(team["budget"], "team");
    assert_eq!(team["scope"], "global");
    assert_eq!(team["spent_micros"], REQUEST_COST);
    assert_eq!(team["limit_micros"], 10);
    assert_eq!(team["thresholds_reached"], json!([50]));
    assert_eq!(team["state"], "ok");
    assert!(team["resets_at"].as_str().unwrap().ends_with("T00:00:00Z"));
    let forbidden = reqwest::Client::new()
        .get(server.url("/admin/v1/budgets"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    server.shutdown().await;
}

//! The proxy against a real OpenAI-compatible HTTP upstream started by each
//! test on 127.0.0.1:0 with scripted answers (`support/upstream.rs`): what
//! the upstream receives, what the client gets, the ledger row, and the
//! `audit.request` / `usage.recorded` events seen by real WebSocket
//! subscribers; then failures, validation, audit bodies and the admin
//! usage and audit endpoints.

#[path = "support/stream_client.rs"]
mod stream_client;
mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::StatusCode;
use serde_json::{json, Value};
use stream_client::WsClient;
use support::{wait_until, TestServer, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tollgate::config::{Config, ModelConfig, ProviderConfig, ProviderType};
use tollgate::events::model::SystemStartup;
use tollgate::proxy::provider::Endpoint;
use tollgate::proxy::usage;
use upstream::{completion, content_chunk, refused_addr, usage_chunk, Reply, Step, Upstream};
use uuid::Uuid;

const UPSTREAM_SECRET: &str = "sk-upstream-secret";
const CHAT: &str = "/v1/chat/completions";
const EMBEDDINGS: &str = "/v1/embeddings";

// ---------------------------------------------------------------- setup

/// Built from JSON, as from a configuration file, so that fields added to
/// the configuration later take their defaults here too.
fn openai_provider(base_url: String, timeout_secs: u64) -> ProviderConfig {
    let provider: ProviderConfig = serde_json::from_value(json!({
        "type": "openai",
        "base_url": base_url,
        "api_key": UPSTREAM_SECRET,
        "connect_timeout_secs": 2,
        "timeout_secs": timeout_secs,
    }))
    .expect("a valid provider configuration");
    assert_eq!(provider.kind, ProviderType::Openai);
    assert_eq!(provider.latency_ms, None, "mock-only fields stay unset");
    assert_eq!(provider.fail_models, None, "mock-only fields stay unset");
    provider
}

fn model(name: &str, upstream_model: Option<&str>, input_usd: f64, output_usd: f64) -> ModelConfig {
    serde_json::from_value(json!({
        "name": name,
        "provider": "up",
        "upstream_model": upstream_model,
        "input_usd_per_mtok": input_usd,
        "output_usd_per_mtok": output_usd,
    }))
    .expect("a valid model configuration")
}

/// Provider `up` at `base_url`, and model `gpt-test` → `upstream-model-x`
/// at $1 / $2 per million input / output tokens.
fn route_to(config: &mut Config, base_url: String, timeout_secs: u64) {
    config
        .providers
        .insert("up".into(), openai_provider(base_url, timeout_secs));
    config
        .models
        .push(model("gpt-test", Some("upstream-model-x"), 1.0, 2.0));
}

async fn gateway(upstream: &Upstream) -> TestServer {
    gateway_with(upstream.base_url(), 2, |_| {}).await
}

async fn gateway_with(
    base_url: String,
    timeout_secs: u64,
    configure: impl FnOnce(&mut Config),
) -> TestServer {
    TestServer::start(move |config| {
        route_to(config, base_url, timeout_secs);
        configure(config);
    })
    .await
}

/// The cost of `gpt-test` by the documented rule, computed here on its own:
/// ceil((in × 1 000 000 + out × 2 000 000) / 1 000 000) micro-dollars.
fn gpt_test_cost(input: i64, output: i64) -> i64 {
    let total = input * 1_000_000 + output * 2_000_000;
    (total + 999_999) / 1_000_000
}

async fn post(
    server: &TestServer,
    path: &str,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    post_raw(server, path, key, body.to_string()).await
}

async fn post_raw(
    server: &TestServer,
    path: &str,
    key: Option<&str>,
    body: String,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    tokio::time::timeout(DEADLINE, request.send())
        .await
        .expect("the gateway answers in time")
        .expect("the gateway answers")
}

async fn admin_get(
    server: &TestServer,
    path: &str,
    query: &[(&str, String)],
) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .get(server.url(path))
        .bearer_auth(&server.admin_key)
        .query(query)
        .send()
        .await
        .expect("the gateway answers");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

fn request_id(response: &reqwest::Response) -> String {
    let id = response
        .headers()
        .get("x-request-id")
        .expect("every response has x-request-id")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(!id.is_empty());
    id
}

/// Asserts an OpenAI-shaped error with exactly `type`, `code`, `message`;
/// returns the request id and the message.
async fn assert_error(
    response: reqwest::Response,
    status: StatusCode,
    kind: &str,
    code: &str,
) -> (String, String) {
    assert_eq!(response.status(), status);
    let id = request_id(&response);
    let body: Value = response.json().await.expect("an error body is JSON");
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    assert_eq!(error.len(), 3, "{body}");
    assert_eq!(error["type"], kind, "{body}");
    assert_eq!(error["code"], code, "{body}");
    let message = error["message"].as_str().unwrap_or_default().to_owned();
    assert!(!message.is_empty(), "{body}");
    assert!(!body.to_string().contains(UPSTREAM_SECRET), "{body}");
    (id, message)
}

/// The `data:` payloads of a `text/event-stream` body, in order.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

/// `data:` payloads as JSON, `[DONE]` as the string "[DONE]".
fn sse_values(text: &str) -> Vec<Value> {
    sse_data(text)
        .iter()
        .map(|d| {
            if d == "[DONE]" {
                Value::String(d.clone())
            } else {
                serde_json::from_str(d).unwrap_or_else(|e| panic!("not JSON ({e}): {d}"))
            }
        })
        .collect()
}

fn chat_body(content: &str) -> Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": content}]})
}

fn stream_body(content: &str) -> Value {
    json!({"model": "gpt-test", "stream": true,
        "messages": [{"role": "user", "content": content}]})
}

/// What the upstream must receive for `client`: the same JSON with the
/// upstream model name.
fn as_forwarded(client: &Value) -> Value {
    let mut forwarded = client.clone();
    forwarded["model"] = json!("upstream-model-x");
    forwarded
}

fn marker(node: &str) -> SystemStartup {
    SystemStartup {
        version: "test".into(),
        node: node.into(),
        listen: "-".into(),
    }
}

/// A WebSocket subscriber that keeps the frames it read past, so events can
/// be looked up by type and request id in any order.
struct Events {
    ws: WsClient,
    seen: Vec<Value>,
}

impl Events {
    async fn open(server: &TestServer, key: &str, types: &str) -> Events {
        let (ws, _) = WsClient::open(server.addr, &format!("types={types}"), Some(key)).await;
        Events {
            ws,
            seen: Vec::new(),
        }
    }

    /// The event of `kind` about `request_id` (each is returned once).
    async fn event(&mut self, kind: &str, request_id: &str) -> Value {
        let matches = |v: &Value| v["type"] == kind && v["payload"]["request_id"] == request_id;
        if let Some(at) = self.seen.iter().position(matches) {
            return self.seen.remove(at);
        }
        loop {
            let value = self.ws.next_json().await;
            if matches(&value) {
                return value;
            }
            self.seen.push(value);
        }
    }

    /// Every frame not yet returned, up to the `system.startup` marker
    /// published with `node` (excluded).
    async fn until_marker(&mut self, node: &str) -> Vec<Value> {
        let mut frames = std::mem::take(&mut self.seen);
        loop {
            let value = self.ws.next_json().await;
            if value["type"] == "system.startup" && value["payload"]["node"] == node {
                return frames;
            }
            frames.push(value);
        }
    }
}

/// Asserts an `audit.request` payload for a chat completion.
fn assert_audit(
    event: &Value,
    request_id: &str,
    key_id: Option<Uuid>,
    status: u16,
    stream: bool,
    error: Option<&str>,
) {
    let p = &event["payload"];
    assert_eq!(event["topic"], "audit", "{event}");
    assert_eq!(p["request_id"], request_id, "{event}");
    assert_eq!(p["key_id"], json!(key_id), "{event}");
    assert_eq!(p["method"], "POST", "{event}");
    assert_eq!(p["path"], CHAT, "{event}");
    assert_eq!(p["status"], status, "{event}");
    assert_eq!(p["stream"], stream, "{event}");
    assert_eq!(p["error"], json!(error), "{event}");
    assert!(p["latency_ms"].is_u64(), "{event}");
}

// ------------------------------------------------------------- 1. complete

#[tokio::test]
async fn a_completion_is_forwarded_with_the_upstream_model_and_key_and_recorded() {
    let upstream = Upstream::start().await;
    let answer = completion("Forty-two.", 17, 5);
    upstream.push(Reply::Json(200, answer.clone()));
    let server = gateway(&upstream).await;
    let key = server.create_key("app", false).await;
    let key_id = server.key_id(&key).await;

    let client_body = json!({
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "What is the answer?"}],
        "temperature": 0.25,
        "x_custom": {"a": 1},
    });
    let response = post(&server, CHAT, Some(&key), &client_body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-tollgate-provider"], "up");
    assert_eq!(response.headers()["content-type"], "application/json");
    let id = request_id(&response);
    assert_eq!(response.text().await.unwrap(), answer.to_string());

    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    let received = &requests[0];
    assert_eq!(received.method, "POST");
    assert_eq!(received.path, "/v1/chat/completions");
    assert_eq!(
        received.header("authorization").as_deref(),
        Some("Bearer sk-upstream-secret")
    );
    assert_eq!(received.body, as_forwarded(&client_body));

    let row = server.ledger_row(&id).await;
    assert_eq!(row.request_id, id);
    assert_eq!(row.key_id, key_id);
    assert_eq!(row.model, "gpt-test");
    assert_eq!(row.provider, "up");
    assert_eq!((row.input_tokens, row.output_tokens), (17, 5));
    assert_eq!(row.cost_micros, gpt_test_cost(17, 5));
    assert_eq!(row.cost_micros, 27);
    assert_eq!(row.status, 200);
    assert!(!row.streamed);
    assert!(!row.estimated);
    server.shutdown().await;
}

// --------------------------------------------------------- 2. stream usage

#[tokio::test]
async fn a_stream_asks_the_upstream_for_usage_and_gives_the_client_only_what_it_asked_for() {
    let upstream = Upstream::start().await;
    let server = gateway(&upstream).await;
    let key = server.create_key("app", false).await;
    let chunks = [
        content_chunk("c1", "Hel"),
        content_chunk("c1", "lo"),
        content_chunk("c1", " world"),
    ];
    let script = |usage: Value| {
        let mut steps: Vec<Step> = chunks.iter().cloned().map(Step::Data).collect();
        steps.push(Step::Data(usage));
        steps.push(Step::Done);
        steps
    };

    // A client that did not ask for usage.
    upstream.push_stream(script(usage_chunk("c1", 9, 3)));
    let client_body = stream_body("Say hello");
    let response = post(&server, CHAT, Some(&key), &client_body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-tollgate-provider"], "up");
    let id = request_id(&response);
    let text = response.text().await.unwrap();
    let mut expected: Vec<Value> = chunks.to_vec();
    expected.push(json!("[DONE]"));
    assert_eq!(sse_values(&text), expected, "{text}");
    assert!(
        !text.contains("usage"),
        "no usage chunk was asked for: {text}"
    );
    let mut forwarded = as_forwarded(&client_body);
    forwarded["stream_options"] = json!({"include_usage": true});
    assert_eq!(upstream.requests()[0].body, forwarded);
    let row = server.ledger_row(&id).await;
    assert_eq!((row.input_tokens, row.output_tokens), (9, 3));
    assert_eq!(row.cost_micros, gpt_test_cost(9, 3));
    assert!(row.streamed);
    assert!(!row.estimated);
    assert_eq!(row.status, 200);

    // A client that asked for it gets the usage chunk, before [DONE].
    upstream.push_stream(script(usage_chunk("c1", 8, 3)));
    let mut client_body = stream_body("Say hello again");
    client_body["stream_options"] = json!({"include_usage": true});
    let response = post(&server, CHAT, Some(&key), &client_body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let id = request_id(&response);
    let text = response.text().await.unwrap();
    let mut expected: Vec<Value> = chunks.to_vec();
    expected.push(usage_chunk("c1", 8, 3));
    expected.push(json!("[DONE]"));
    assert_eq!(sse_values(&text), expected, "{text}");
    assert_eq!(upstream.requests()[1].body, as_forwarded(&client_body));
    let row = server.ledger_row(&id).await;
    assert_eq!((row.input_tokens, row.output_tokens), (8, 3));
    assert!(!row.estimated);

    // A client that said no, from an upstream that puts usage on its last
    // content chunk: the upstream is asked anyway, the client gets the
    // chunk's content without the usage.
    let mut last = content_chunk("c1", "!");
    last["usage"] = json!({"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11});
    let mut steps: Vec<Step> = chunks.iter().cloned().map(Step::Data).collect();
    steps.push(Step::Data(last));
    steps.push(Step::Done);
    upstream.push_stream(steps);
    let mut client_body = stream_body("Say hello once more");
    client_body["stream_options"] = json!({"include_usage": false});
    let response = post(&server, CHAT, Some(&key), &client_body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let id = request_id(&response);
    let text = response.text().await.unwrap();
    let mut expected: Vec<Value> = chunks.to_vec();
    expected.push(content_chunk("c1", "!"));
    expected.push(json!("[DONE]"));
    assert_eq!(sse_values(&text), expected, "{text}");
    let mut forwarded = as_forwarded(&client_body);
    forwarded["stream_options"] = json!({"include_usage": true});
    assert_eq!(upstream.requests()[2].body, forwarded);
    let row = server.ledger_row(&id).await;
    assert_eq!((row.input_tokens, row.output_tokens), (7, 4));
    assert!(!row.estimated);
    server.shutdown().await;
}

// ------------------------------------------------------ 3. stream, no usage

#[tokio::test]
async fn a_stream_without_usage_is_counted_with_the_tokenizer_and_marked_estimated() {
    let upstream = Upstream::start().await;
    let deltas = ["The quick", " brown fox", " jumps over the lazy dog."];
    let mut steps: Vec<Step> = deltas
        .iter()
        .map(|d| Step::Data(content_chunk("c2", d)))
        .collect();
    steps.push(Step::Done);
    upstream.push_stream(steps);
    let server = gateway(&upstream).await;
    let key = server.create_key("app", false).await;

    let client_body = json!({"model": "gpt-test", "stream": true, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Type a pangram, please."}
    ]});
    let response = post(&server, CHAT, Some(&key), &client_body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let id = request_id(&response);
    let text = response.text().await.unwrap();
    let mut expected: Vec<Value> = deltas.iter().map(|d| content_chunk("c2", d)).collect();
    expected.push(json!("[DONE]"));
    assert_eq!(sse_values(&text), expected, "{text}");

    let output = usage::count_tokens(&deltas.concat());
    let input = usage::estimate_input(Endpoint::ChatCompletions, &client_body);
    assert!(output > 0 && input > 0);
    let row = server.ledger_row(&id).await;
    assert_eq!((row.input_tokens, row.output_tokens), (input, output));
    assert_eq!(row.cost_micros, gpt_test_cost(input, output));
    assert!(row.estimated);
    assert!(row.streamed);
    assert_eq!(row.status, 200);
    server.shutdown().await;
}

// --------------------------------------------------------- 4. slow chunks

#[tokio::test]
async fn the_first_chunk_reaches_the_client_before_the_upstream_sends_the_last() {
    let upstream = Upstream::start().await;
    let release = Arc::new(Notify::new());
    let probe = upstream.push_stream(vec![
        Step::Data(content_chunk("c3", "first-piece")),
        Step::Wait(release.clone()),
        Step::Data(content_chunk("c3", "last-piece")),
        Step::Data(usage_chunk("c3", 5, 2)),
        Step::Done,
    ]);
    // The provider's own timeout stays far beyond the client's deadline, so
    // a gateway that buffered would fail the read below, not end the stream.
    let server = gateway_with(upstream.base_url(), 60, |_| {}).await;
    let key = server.create_key("app", false).await;

    let mut response = post(&server, CHAT, Some(&key), &stream_body("slowly")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let id = request_id(&response);
    let mut received = String::new();
    let read_first = async {
        while !received.contains("first-piece") {
            let chunk = response.chunk().await.unwrap().expect("more of the stream");
            received.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_first)
        .await
        .expect("the first chunk arrives while the upstream is still holding the last");
    assert!(!received.contains("last-piece"));
    assert_eq!(
        probe.sent(),
        1,
        "the upstream has sent only the first chunk"
    );
    assert!(!probe.finished());

    release.notify_one();
    let read_rest = async {
        while let Some(chunk) = response.chunk().await.unwrap() {
            received.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    tokio::time::timeout(DEADLINE, read_rest)
        .await
        .expect("the rest of the stream arrives");
    assert_eq!(
        sse_values(&received),
        vec![
            content_chunk("c3", "first-piece"),
            content_chunk("c3", "last-piece"),
            json!("[DONE]")
        ]
    );
    assert!(probe.finished());
    assert!(!probe.cancelled());
    let row = server.ledger_row(&id).await;
    assert_eq!((row.input_tokens, row.output_tokens), (5, 2));
    server.shutdown().await;
}

// ------------------------------------------------------------- 5. failures

/// The ledger row (no tokens, no cost) and the `audit.request` event of a
/// failed request.
async fn assert_failure_recorded(
    server: &TestServer,
    events: &mut Events,
    id: &str,
    key_id: Uuid,
    status: u16,
    stream: bool,
    code: &str,
) {
    let row = server.ledger_row(id).await;
    assert_eq!(row.key_id, key_id);
    assert_eq!(row.model, "gpt-test");
    assert_eq!(row.provider, "up");
    assert_eq!(
        (row.input_tokens, row.output_tokens, row.cost_micros),
        (0, 0, 0)
    );
    assert_eq!(row.status, i64::from(status));
    assert_eq!(row.streamed, stream);
    assert!(!row.estimated);
    let event = events.event("audit.request", id).await;
    assert_audit(&event, id, Some(key_id), status, stream, Some(code));
    assert_eq!(event["payload"]["model"], "gpt-test");
    assert_eq!(event["payload"]["provider"], "up");
}

#[tokio::test]
async fn an_upstream_client_error_passes_through_with_its_status_and_message() {
    let upstream = Upstream::start().await;
    let error = json!({"error": {"message": "max_tokens is too large: 99999999",
        "type": "invalid_request_error", "param": "max_tokens", "code": null}});
    upstream.push(Reply::Json(400, error.clone()));
    let server = gateway(&upstream).await;
    let key = server.create_key("app", false).await;
    let key_id = server.key_id(&key).await;
    let mut events = Events::open(&server, &server.admin_key, "audit.request").await;

    let response = post(&server, CHAT, Some(&key), &chat_body("too long")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.headers()["x-tollgate-provider"], "up");
    let id = request_id(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, error);
    assert_eq!(upstream.requests().len(), 1);
    assert_failure_recorded(
        &server,
        &mut events,
        &id,
        key_id,
        400,
        false,
        "upstream_client_error",
    )
    .await;

    // The same for a stream: a 429 is passed through, not streamed.
    let limited = json!({"error": {"message": "Rate limit reached for requests",
        "type": "requests", "param": null, "code": "rate_limit_exceeded"}});
    upstream.push(Reply::Json(429, limited.clone()));
    let response = post(&server, CHAT, Some(&key), &stream_body("again")).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["content-type"], "application/json");
    let id = request_id(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, limited);
    assert_eq!(upstream.requests().len(), 2);
    assert_failure_recorded(
        &server,
        &mut events,
        &id,
        key_id,
        429,
        true,
        "upstream_client_error",
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_upstream_server_error_is_502_upstream_error() {
    let upstream = Upstream::start().await;
    upstream.push(Reply::Json(
        503,
        json!({"error": {"message": "the engine is overloaded", "type": "server_error"}}),
    ));
    let server = gateway(&upstream).await;
    let key = server.create_key("app", false).await;
    let key_id = server.key_id(&key).await;
    let mut events = Events::open(&server, &server.admin_key, "audit.request").await;

    let response = post(&server, CHAT, Some(&key), &chat_body("hello")).await;
    let (id, message) = assert_error(
        response,
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        "upstream_error",
    )
    .await;
    assert!(message.contains("503"), "{message}");
    assert!(message.contains("the engine is overloaded"), "{message}");
    assert_failure_recorded(
        &server,
        &mut events,
        &id,
        key_id,
        502,
        false,
        "upstream_error",
    )
    .await;

    // A 5xx whose body is not JSON is a 502 all the same.
    upstream.push(Reply::Raw(
        500,
        "text/html",
        "<h1>Internal Server Error</h1>".into(),
    ));
    let response = post(&server, CHAT, Some(&key), &chat_body("hello")).await;
    let (id, _) = assert_error(
        response,
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        "upstream_error",
    )
    .await;
    assert_failure_recorded(
        &server,
        &mut events,
        &id,
        key_id,
        502,
        false,
        "upstream_error",
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_upstream_redirect_is_not_followed_and_is_502_naming_only_its_origin() {
    let upstream = Upstream::start().await;
    let server = gateway(&upstream).await;
    let key = server.create_key("app", false).await;
    let key_id = server.key_id(&key).await;
    let mut events = Events::open(&server, &server.admin_key, "audit.request").await;

    // Followed, a 307 would resend the request (with the provider's key)
    // to wherever it points; the upstream here would then see a second
    // request, answered 500 as unscripted.
    let elsewhere = format!(
        "{}/elsewhere/chat/completions?token=s3cret",
        upstream.base_url()
    );
    for (n, (status, stream)) in [(307, false), (301, true)].into_iter().enumerate() {
        upstream.push(Reply::Redirect(status, elsewhere.clone()));
        let body = if stream {
            stream_body("hello")
        } else {
            chat_body("hello")
        };
        let response = post(&server, CHAT, Some(&key), &body).await;
        let (id, message) = assert_error(
            response,
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "upstream_error",
        )
        .await;
        assert_eq!(
            upstream.requests().len(),
            n + 1,
            "the redirect was not followed"
        );
        let origin = upstream.base_url().trim_end_matches("/v1").to_owned();
        assert!(
            message.contains(&format!("answered HTTP {status}, a redirect to {origin};")),
            "{message}"
        );
        assert!(message.contains("base_url"), "{message}");
        assert!(
            !message.contains("elsewhere") && !message.contains("s3cret"),
            "{message}"
        );
        assert_failure_recorded(
            &server,
            &mut events,
            &id,
            key_id,
            502,
            stream,
            "upstream_error",
        )
        .await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_hanging_upstream_is_504_upstream_timeout_after_the_providers_timeout() {
    let upstream = Upstream::start().await;
    upstream.push(Reply::Hang);
    let server = gateway_with(upstream.base_url(), 1, |_| {}).await;
    let key = server.create_key("app", false).await;
    let key_id = server.key_id(&key).await;
    let mut events = Events::open(&server, &server.admin_key, "audit.request").await;

    let started = Instant::now();
    let response = post(&server, CHAT, Some(&key), &chat_body("hello?")).await;
    let elapsed = started.elapsed();
    let (id, _) = assert_error(
        response,
        StatusCode::GATEWAY_TIMEOUT,
        "upstream_error",
        "upstream_timeout",
    )
    .await;
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(10),
        "timed out after {elapsed:?} with timeout_secs = 1"
    );
    assert_eq!(upstream.requests().len(), 1, "the upstream got the request");
    assert_failure_recorded(
        &server,
        &mut events,
        &id,
        key_id,
        504,
        false,
        "upstream_timeout",
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_refused_connection_is_502_upstream_unreachable() {
    let server = gateway_with(format!("http://{}/v1", refused_addr()), 2, |_| {}).await;
    let key = server.create_key("app", false).await;
    let key_id = server.key_id(&key).await;
    let mut events = Events::open(&server, &server.admin_key, "audit.request").await;

    let response = post(&server, CHAT, Some(&key), &chat_body("anyone there?")).await;
    let (id, _) = assert_error(
        response,
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        "upstream_unreachable",
    )
    .await;
    assert_failure_recorded(
        &server,
        &mut events,
        &id,
        key_id,
        502,
        false,
        "upstream_unreachable",
    )
    .await;
    server.shutdown().await;
}

// ------------------------------------------------ 6. client disconnects

/// Sends a POST over a raw connection, so the test decides when it closes.
async fn raw_post(server: &TestServer, path: &str, key: &str, body: &Value) -> TcpStream {
    let body = body.to_string();
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        server.addr,
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Reads until `needle` has arrived; returns everything read.
async fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    let mut received = Vec::new();
    let read = async {
        while !String::from_utf8_lossy(&received).contains(needle) {
            let mut buffer = [0u8; 4096];
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(n > 0, "the connection closed before `{needle}` arrived");
            received.extend_from_slice(&buffer[..n]);
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .unwrap_or_else(|_| panic!("`{needle}` did not arrive in time"));
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_cancels_the_upstream_and_is_recorded() {
    let upstream = Upstream::start().await;
    let never = Arc::new(Notify::new());
    let probe = upstream.push_stream(vec![
        Step::Data(content_chunk("c4", "Hello there, partial")),
        Step::Wait(never.clone()),
        Step::Data(content_chunk("c4", " never sent")),
        Step::Data(usage_chunk("c4", 50, 50)),
        Step::Done,
    ]);
    // A long provider timeout: the upstream request must end because the
    // client left, not because it timed out.
    let server = gateway_with(upstream.base_url(), 60, |_| {}).await;
    let key = server.create_key("app", false).await;
    let key_id = server.key_id(&key).await;
    let mut events = Events::open(&server, &server.admin_key, "audit.request,usage.recorded").await;

    let client_body = stream_body("Tell me a long story");
    let mut connection = raw_post(&server, CHAT, &key, &client_body).await;
    let received = read_until(&mut connection, "Hello there, partial").await;
    let head = received.split("\r\n\r\n").next().unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let id = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("x-request-id")
                .then(|| value.trim().to_owned())
        })
        .expect("the stream's response has an x-request-id");
    assert_eq!(probe.sent(), 1);
    drop(connection);

    wait_until(
        "the upstream sees its stream cancelled",
        DEADLINE,
        || async { probe.cancelled() },
    )
    .await;
    assert!(!probe.finished());
    assert_eq!(probe.sent(), 1, "nothing more was produced");

    let output = usage::count_tokens("Hello there, partial");
    let input = usage::estimate_input(Endpoint::ChatCompletions, &client_body);
    let row = server.ledger_row(&id).await;
    assert_eq!(row.key_id, key_id);
    assert_eq!((row.input_tokens, row.output_tokens), (input, output));
    assert_eq!(row.cost_micros, gpt_test_cost(input, output));
    assert!(row.estimated);
    assert!(row.streamed);
    assert_eq!(row.status, 200, "the stream had begun with 200");

    let audit = events.event("audit.request", &id).await;
    assert_audit(&audit, &id, Some(key_id), 200, true, Some("client_closed"));
    let usage_event = events.event("usage.recorded", &id).await;
    assert_eq!(usage_event["payload"]["input_tokens"], input);
    assert_eq!(usage_event["payload"]["output_tokens"], output);
    assert_eq!(usage_event["payload"]["estimated"], true);
    assert_eq!(upstream.requests().len(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_leaves_before_the_answer_cancels_the_upstream_and_is_recorded() {
    let upstream = Upstream::start().await;
    let probe = upstream.push(Reply::Hang);
    let server = gateway_with(upstream.base_url(), 60, |_| {}).await;
    let key = server.create_key("app", false).await;
    let key_id = server.key_id(&key).await;
    let mut events = Events::open(&server, &server.admin_key, "audit.request").await;

    let connection = raw_post(&server, CHAT, &key, &chat_body("take your time")).await;
    wait_until("the upstream has the request", DEADLINE, || async {
        upstream.requests().len() == 1
    })
    .await;
    drop(connection);
    wait_until(
        "the upstream sees its request cancelled",
        DEADLINE,
        || async { probe.cancelled() },
    )
    .await;

    // No response was sent, so no x-request-id reached the client: find
    // the request by its audit event.
    let audit = loop {
        let event = events.ws.next_json().await;
        if event["type"] == "audit.request" {
            break event;
        }
    };
    let id = audit["payload"]["request_id"].as_str().unwrap().to_owned();
    assert_audit(&audit, &id, Some(key_id), 499, false, Some("client_closed"));
    let row = server.ledger_row(&id).await;
    assert_eq!(row.key_id, key_id);
    assert_eq!(
        (row.input_tokens, row.output_tokens, row.cost_micros),
        (0, 0, 0)
    );
    assert_eq!(row.status, 499);
    server.shutdown().await;
}

#[tokio::test]
async fn an_upstream_stream_that_breaks_off_is_recorded_with_what_was_produced() {
    let upstream = Upstream::start().await;
    let release = Arc::new(Notify::new());
    let probe = upstream.push_stream(vec![
        Step::Data(content_chunk("c7", "Half an answer")),
        Step::Wait(release.clone()),
        Step::Fail,
    ]);
    let server = gateway(&upstream).await;
    let key = server.create_key("app", false).await;
    let key_id = server.key_id(&key).await;
    let mut events = Events::open(&server, &server.admin_key, "audit.request").await;

    let client_body = stream_body("a broken story");
    let mut response = post(&server, CHAT, Some(&key), &client_body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let id = request_id(&response);
    // The stream is under way when the upstream breaks off.
    let mut text = String::new();
    let read = async {
        while !text.contains("Half an answer") {
            let chunk = response.chunk().await.unwrap().expect("the first chunk");
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("the first chunk arrives");
    release.notify_one();
    let rest = async {
        while let Ok(Some(chunk)) = response.chunk().await {
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    tokio::time::timeout(DEADLINE, rest)
        .await
        .expect("the stream ends");
    assert_eq!(
        sse_values(&text),
        vec![content_chunk("c7", "Half an answer")],
        "a broken stream must not claim to be complete with [DONE]"
    );
    assert_eq!(probe.sent(), 1);
    assert!(!probe.finished());

    let output = usage::count_tokens("Half an answer");
    let input = usage::estimate_input(Endpoint::ChatCompletions, &client_body);
    let row = server.ledger_row(&id).await;
    assert_eq!((row.input_tokens, row.output_tokens), (input, output));
    assert!(row.estimated);
    assert!(row.streamed);
    let audit = events.event("audit.request", &id).await;
    assert_audit(&audit, &id, Some(key_id), 200, true, Some("upstream_error"));
    server.shutdown().await;
}

// -------------------------------------------------------------- 7. events

#[tokio::test]
async fn subscribers_get_audit_and_usage_events_matching_the_ledger_within_100ms() {
    let upstream = Upstream::start().await;
    upstream.push_stream(vec![
        Step::Data(content_chunk("c5", "Events")),
        Step::Data(content_chunk("c5", " are live.")),
        Step::Data(usage_chunk("c5", 12, 4)),
        Step::Done,
    ]);
    upstream.push(Reply::Json(200, completion("Also recorded.", 21, 3)));
    let server = gateway(&upstream).await;
    let key = server.create_key("app", false).await;
    let key_id = server.key_id(&key).await;
    let mut events = Events::open(&server, &server.admin_key, "audit.request,usage.recorded").await;

    for (body, stream) in [
        (stream_body("stream it"), true),
        (chat_body("say it"), false),
    ] {
        let response = post(&server, CHAT, Some(&key), &body).await;
        assert_eq!(response.status(), StatusCode::OK);
        let id = request_id(&response);
        response.bytes().await.expect("the whole body");
        let ended = Instant::now();
        let usage_event = events.event("usage.recorded", &id).await;
        let delay = ended.elapsed();
        assert!(
            delay < Duration::from_millis(100),
            "usage.recorded came {delay:?} after the response ended"
        );
        let audit = events.event("audit.request", &id).await;
        let row = server.ledger_row(&id).await;
        assert_eq!(usage_event["topic"], "usage");
        assert_eq!(
            usage_event["payload"],
            json!({
                "request_id": id, "key_id": key_id, "model": "gpt-test", "provider": "up",
                "input_tokens": row.input_tokens, "output_tokens": row.output_tokens,
                "cost_micros": row.cost_micros, "estimated": false,
            })
        );
        let expected = if stream { (12, 4) } else { (21, 3) };
        assert_eq!((row.input_tokens, row.output_tokens), expected);
        assert_eq!(row.cost_micros, gpt_test_cost(expected.0, expected.1));
        assert_audit(&audit, &id, Some(key_id), 200, stream, None);
        assert_eq!(audit["payload"]["model"], "gpt-test");
        assert_eq!(audit["payload"]["provider"], "up");
        assert_eq!(audit["payload"]["latency_ms"], row.latency_ms);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_subscriber_sees_only_its_own_requests() {
    let upstream = Upstream::start().await;
    upstream.set_fallback(Reply::Json(200, completion("ok", 6, 2)));
    let server = gateway(&upstream).await;
    let key_a = server.create_key("a", false).await;
    let key_b = server.create_key("b", false).await;
    let id_a = server.key_id(&key_a).await;
    let mut admin = Events::open(&server, &server.admin_key, "audit.request,usage.recorded").await;
    let mut events_a = Events::open(
        &server,
        &key_a,
        "audit.request,usage.recorded,system.startup",
    )
    .await;

    let response = post(&server, CHAT, Some(&key_a), &chat_body("from a")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let request_a = request_id(&response);
    let response = post(&server, CHAT, Some(&key_b), &chat_body("from b")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let request_b = request_id(&response);
    // Both requests' events are out (audit.request is published last).
    admin.event("audit.request", &request_a).await;
    admin.event("audit.request", &request_b).await;
    server.state.hub.publish(marker("after-a-and-b"));

    let seen = events_a.until_marker("after-a-and-b").await;
    let mut kinds: Vec<&str> = seen.iter().map(|e| e["type"].as_str().unwrap()).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["audit.request", "usage.recorded"], "{seen:?}");
    for event in &seen {
        assert_eq!(event["payload"]["request_id"], request_a, "{event}");
        assert_eq!(event["payload"]["key_id"], json!(id_a), "{event}");
    }
    server.shutdown().await;
}

// ----------------------------------------------------------- 8. validation

#[tokio::test]
async fn bad_requests_are_answered_clearly_and_audited() {
    let upstream = Upstream::start().await;
    let server = gateway_with(upstream.base_url(), 2, |c| c.server.max_body_bytes = 2048).await;
    let key = server.create_key("validator", false).await;
    let key_id = server.key_id(&key).await;
    let user = server.create_key("user", false).await;
    let mut admin = Events::open(&server, &server.admin_key, "audit.request").await;
    let mut user_events = Events::open(&server, &user, "audit.request,system.startup").await;

    let cases: Vec<(String, StatusCode, &str)> = vec![
        ("{not json".into(), StatusCode::BAD_REQUEST, "invalid_json"),
        (
            json!({"messages": [{"role": "user", "content": "hi"}]}).to_string(),
            StatusCode::BAD_REQUEST,
            "missing_model",
        ),
        (
            json!({"model": "gpt-test"}).to_string(),
            StatusCode::BAD_REQUEST,
            "missing_messages",
        ),
        (
            json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
            StatusCode::NOT_FOUND,
            "model_not_found",
        ),
        (
            chat_body(&"x".repeat(4096)).to_string(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let response = post_raw(&server, CHAT, Some(&key), body).await;
        let (id, _) = assert_error(response, status, "invalid_request_error", code).await;
        let event = admin.event("audit.request", &id).await;
        assert_audit(
            &event,
            &id,
            Some(key_id),
            status.as_u16(),
            false,
            Some(code),
        );
        // The audit row and any ledger row commit before the event: none.
        assert!(
            server
                .state
                .store
                .ledger_rows_for_request(&id)
                .await
                .unwrap()
                .is_empty(),
            "{code}: a request that reached no provider has no ledger row"
        );
    }
    assert!(
        upstream.requests().is_empty(),
        "nothing reached the upstream"
    );

    // No key: 401, audited with no key id, seen by admins only.
    let response = post(&server, CHAT, None, &chat_body("who am I?")).await;
    let (id, _) = assert_error(
        response,
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "missing_api_key",
    )
    .await;
    let event = admin.event("audit.request", &id).await;
    assert_audit(&event, &id, None, 401, false, Some("missing_api_key"));
    assert_eq!(event["payload"]["key_id"], Value::Null);
    server.state.hub.publish(marker("after-401"));
    let seen = user_events.until_marker("after-401").await;
    assert!(
        seen.is_empty(),
        "a non-admin key sees neither the unauthenticated request nor the validator's: {seen:?}"
    );
    assert!(upstream.requests().is_empty());
    server.shutdown().await;
}

// ----------------------------------------------------------- 9. embeddings

#[tokio::test]
async fn embeddings_are_forwarded_and_their_prompt_tokens_recorded() {
    let upstream = Upstream::start().await;
    let answer = json!({"object": "list", "model": "upstream-model-x",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}],
        "usage": {"prompt_tokens": 7, "total_tokens": 7}});
    upstream.push(Reply::Json(200, answer.clone()));
    let server = gateway(&upstream).await;
    let key = server.create_key("app", false).await;
    let key_id = server.key_id(&key).await;
    let mut events = Events::open(&server, &server.admin_key, "audit.request,usage.recorded").await;

    let client_body = json!({"model": "gpt-test", "input": "embed these words please",
        "encoding_format": "float", "dimensions": 3});
    let response = post(&server, EMBEDDINGS, Some(&key), &client_body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-tollgate-provider"], "up");
    let id = request_id(&response);
    assert_eq!(response.text().await.unwrap(), answer.to_string());

    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].path, "/v1/embeddings");
    assert_eq!(
        requests[0].header("authorization").as_deref(),
        Some("Bearer sk-upstream-secret")
    );
    assert_eq!(requests[0].body, as_forwarded(&client_body));

    let row = server.ledger_row(&id).await;
    assert_eq!(row.key_id, key_id);
    assert_eq!((row.input_tokens, row.output_tokens), (7, 0));
    assert_eq!(row.cost_micros, gpt_test_cost(7, 0));
    assert!(!row.estimated);
    assert!(!row.streamed);
    assert_eq!(row.status, 200);
    let usage_event = events.event("usage.recorded", &id).await;
    assert_eq!(usage_event["payload"]["input_tokens"], 7);
    assert_eq!(usage_event["payload"]["output_tokens"], 0);
    let audit = events.event("audit.request", &id).await;
    assert_eq!(audit["payload"]["path"], EMBEDDINGS);
    assert_eq!(audit["payload"]["status"], 200);
    assert_eq!(audit["payload"]["error"], Value::Null);
    server.shutdown().await;
}

// ------------------------------------------------------- 10. audit bodies

const PROMPT: &str = "PROMPT-TEXT aardvark 7731";
const REPLY_TEXT: &str = "COMPLETION-TEXT okapi 1187";
const STREAM_PROMPT: &str = "STREAM-PROMPT pangolin 5519";
const STREAM_REPLY: [&str; 2] = ["STREAM-REPLY ", "quokka 4402"];

/// One completion and one stream with recognisable texts; returns their
/// request ids and the audit and usage events of each.
async fn requests_with_texts(
    server: &TestServer,
    upstream: &Upstream,
) -> Vec<(String, Value, Value)> {
    upstream.push(Reply::Json(200, completion(REPLY_TEXT, 8, 4)));
    upstream.push_stream(vec![
        Step::Data(content_chunk("c6", STREAM_REPLY[0])),
        Step::Data(content_chunk("c6", STREAM_REPLY[1])),
        Step::Data(usage_chunk("c6", 9, 5)),
        Step::Done,
    ]);
    let key = server.create_key("app", false).await;
    let mut events = Events::open(server, &server.admin_key, "audit.request,usage.recorded").await;
    let mut recorded = Vec::new();
    for body in [chat_body(PROMPT), stream_body(STREAM_PROMPT)] {
        let response = post(server, CHAT, Some(&key), &body).await;
        assert_eq!(response.status(), StatusCode::OK);
        let id = request_id(&response);
        response.bytes().await.unwrap();
        let audit = events.event("audit.request", &id).await;
        let usage_event = events.event("usage.recorded", &id).await;
        recorded.push((id, audit, usage_event));
    }
    recorded
}

fn assert_no_texts(what: &str, text: &str) {
    for secret in [
        PROMPT,
        REPLY_TEXT,
        STREAM_PROMPT,
        STREAM_REPLY[0],
        STREAM_REPLY[1],
    ] {
        assert!(
            !text.contains(secret.trim()),
            "{what} contains `{secret}`: {text}"
        );
    }
}

#[tokio::test]
async fn without_include_bodies_no_prompt_or_completion_text_is_kept_or_published() {
    let upstream = Upstream::start().await;
    let server = gateway(&upstream).await;
    assert!(
        !server.state.config.load().audit.include_bodies,
        "off by default"
    );
    let recorded = requests_with_texts(&server, &upstream).await;
    for (_, audit, usage_event) in &recorded {
        assert_no_texts("the audit.request event", &audit.to_string());
        assert_no_texts("the usage.recorded event", &usage_event.to_string());
        let payload = audit["payload"].as_object().unwrap();
        assert!(!payload.contains_key("request_body"), "{audit}");
        assert!(!payload.contains_key("response_text"), "{audit}");
    }
    let (status, log) = admin_get(&server, "/admin/v1/audit", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let ids: BTreeSet<&str> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    assert!(
        recorded.iter().all(|(id, _, _)| ids.contains(id.as_str())),
        "{log}"
    );
    assert_no_texts("the audit log", &log.to_string());
    server.shutdown().await;
}

#[tokio::test]
async fn with_include_bodies_the_audit_event_and_log_keep_the_request_and_response_text() {
    let upstream = Upstream::start().await;
    let server = gateway_with(upstream.base_url(), 2, |c| c.audit.include_bodies = true).await;
    let recorded = requests_with_texts(&server, &upstream).await;
    let expected = [
        (chat_body(PROMPT), REPLY_TEXT.to_owned()),
        (stream_body(STREAM_PROMPT), STREAM_REPLY.concat()),
    ];
    let (status, log) = admin_get(
        &server,
        "/admin/v1/audit",
        &[("type", "audit.request".into())],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for ((id, audit, usage_event), (request, response_text)) in recorded.iter().zip(&expected) {
        assert_eq!(audit["payload"]["request_body"], *request, "{audit}");
        assert_eq!(audit["payload"]["response_text"], *response_text, "{audit}");
        // Usage events never carry text.
        assert_no_texts("the usage.recorded event", &usage_event.to_string());
        let row = log["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} is in the audit log: {log}"));
        assert_eq!(row["payload"]["request_body"], *request, "{row}");
        assert_eq!(row["payload"]["response_text"], *response_text, "{row}");
    }
    server.shutdown().await;
}

// ------------------------------------------------- 11. audit and usage API

/// Creates a key through the admin API (an `audit.admin` row); returns its
/// id and secret.
async fn create_key_via_api(server: &TestServer, name: &str) -> (Uuid, String) {
    let response = reqwest::Client::new()
        .post(server.url("/admin/v1/keys"))
        .bearer_auth(&server.admin_key)
        .json(&json!({"name": name}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    (
        body["id"].as_str().unwrap().parse().unwrap(),
        body["key"].as_str().unwrap().to_owned(),
    )
}

/// Waits until the clock is past `at` by a few milliseconds, so times taken
/// afterwards compare strictly later at the store's millisecond resolution.
async fn wait_past(at: DateTime<Utc>) {
    wait_until("the clock moves on", DEADLINE, || async {
        Utc::now() > at + chrono::Duration::milliseconds(3)
    })
    .await;
}

struct Made {
    id: String,
    key: Uuid,
    model: &'static str,
    input: i64,
    output: i64,
    cost: i64,
}

fn totals(made: &[&Made]) -> Value {
    json!({
        "requests": made.len(),
        "input_tokens": made.iter().map(|m| m.input).sum::<i64>(),
        "output_tokens": made.iter().map(|m| m.output).sum::<i64>(),
        "cost_micros": made.iter().map(|m| m.cost).sum::<i64>(),
    })
}

/// Walks `GET /admin/v1/audit` with `limit=2`; returns the ids of every row
/// and the number of pages.
async fn walk_audit(server: &TestServer, filter: &[(&str, String)]) -> (Vec<i64>, usize) {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut query = filter.to_vec();
        query.push(("limit", "2".into()));
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor.clone()));
        }
        let (status, page) = admin_get(server, "/admin/v1/audit", &query).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages += 1;
        let rows = page["data"].as_array().unwrap();
        assert!(!rows.is_empty() && rows.len() <= 2, "{page}");
        ids.extend(rows.iter().map(|r| r["id"].as_i64().unwrap()));
        match &page["next_cursor"] {
            Value::Null => return (ids, pages),
            Value::String(next) => cursor = Some(next.clone()),
            other => panic!("next_cursor is a string or null: {other}"),
        }
        assert!(pages < 100, "pagination does not end");
    }
}

#[tokio::test]
async fn the_audit_log_and_usage_totals_filter_group_and_paginate() {
    let upstream = Upstream::start().await;
    let server = gateway_with(upstream.base_url(), 2, |c| {
        c.models.push(model("gpt-test-2", None, 0.5, 4.0));
    })
    .await;
    let (key_a, secret_a) = create_key_via_api(&server, "key-a").await;
    let (key_b, secret_b) = create_key_via_api(&server, "key-b").await;
    let cost_2 =
        |input: i64, output: i64| (input * 500_000 + output * 4_000_000 + 999_999) / 1_000_000;

    let mut made: Vec<Made> = Vec::new();
    let send = |key: Uuid, model: &'static str, input: i64, output: i64| {
        let server = &server;
        let upstream = &upstream;
        let secret = if key == key_a {
            secret_a.clone()
        } else {
            secret_b.clone()
        };
        async move {
            upstream.push(Reply::Json(200, completion("fine", input, output)));
            let body = json!({"model": model, "messages": [{"role": "user", "content": "go"}]});
            let response = post(server, CHAT, Some(&secret), &body).await;
            assert_eq!(response.status(), StatusCode::OK);
            let id = request_id(&response);
            let cost = if model == "gpt-test" {
                gpt_test_cost(input, output)
            } else {
                cost_2(input, output)
            };
            let row = server.ledger_row(&id).await;
            assert_eq!(
                (row.input_tokens, row.output_tokens, row.cost_micros),
                (input, output, cost)
            );
            (
                Made {
                    id,
                    key,
                    model,
                    input,
                    output,
                    cost,
                },
                row.at,
            )
        }
    };

    // Batch 1, then a boundary, then batch 2.
    let mut last_at = Utc::now();
    for (key, model, input, output) in [(key_a, "gpt-test", 10, 5), (key_b, "gpt-test-2", 3, 1)] {
        let (m, at) = send(key, model, input, output).await;
        made.push(m);
        last_at = last_at.max(at);
    }
    wait_past(last_at).await;
    let mid = Utc::now();
    wait_past(mid).await;
    for (key, model, input, output) in [
        (key_a, "gpt-test-2", 7, 3),
        (key_a, "gpt-test", 1, 1),
        (key_b, "gpt-test", 4, 0),
    ] {
        made.push(send(key, model, input, output).await.0);
    }
    // A failed request: audited, no ledger row.
    let response = post(
        &server,
        CHAT,
        Some(&secret_b),
        &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "go"}]}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let failed_id = request_id(&response);
    wait_until(
        "the failed request is in the audit log",
        DEADLINE,
        || async {
            let (_, log) = admin_get(&server, "/admin/v1/audit", &[]).await;
            log["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["request_id"] == failed_id.as_str())
        },
    )
    .await;
    let mid_param = mid.to_rfc3339_opts(SecondsFormat::Millis, true);

    // ---- GET /admin/v1/audit
    let (status, all) = admin_get(&server, "/admin/v1/audit", &[("limit", "1000".into())]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all["next_cursor"], Value::Null);
    let rows = all["data"].as_array().unwrap();
    let all_ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert!(
        all_ids.windows(2).all(|w| w[0] > w[1]),
        "newest first: {all_ids:?}"
    );
    let request_ids = |rows: &[Value]| -> BTreeSet<String> {
        rows.iter()
            .filter(|r| r["type"] == "audit.request")
            .map(|r| r["request_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut expected_requests: BTreeSet<String> = made.iter().map(|m| m.id.clone()).collect();
    expected_requests.insert(failed_id.clone());
    assert_eq!(request_ids(rows), expected_requests);
    let admin_targets: BTreeSet<String> = rows
        .iter()
        .filter(|r| r["type"] == "audit.admin")
        .map(|r| r["payload"]["target"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        admin_targets,
        BTreeSet::from([key_a.to_string(), key_b.to_string()])
    );
    assert_eq!(
        rows.len(),
        6 + 2,
        "six requests and two key creations: {all}"
    );

    let (_, by_type) = admin_get(
        &server,
        "/admin/v1/audit",
        &[("type", "audit.request".into())],
    )
    .await;
    let typed = by_type["data"].as_array().unwrap();
    assert_eq!(typed.len(), 6);
    assert!(typed.iter().all(|r| r["type"] == "audit.request"));
    let (_, admins) = admin_get(
        &server,
        "/admin/v1/audit",
        &[("type", "audit.admin".into())],
    )
    .await;
    assert_eq!(admins["data"].as_array().unwrap().len(), 2);

    let (_, of_a) = admin_get(&server, "/admin/v1/audit", &[("key_id", key_a.to_string())]).await;
    let of_a = of_a["data"].as_array().unwrap();
    assert!(
        of_a.iter().all(|r| r["key_id"] == key_a.to_string()),
        "{of_a:?}"
    );
    let expected_a: BTreeSet<String> = made
        .iter()
        .filter(|m| m.key == key_a)
        .map(|m| m.id.clone())
        .collect();
    assert_eq!(request_ids(of_a), expected_a);
    assert_eq!(of_a.len(), 3);

    let (_, since) = admin_get(&server, "/admin/v1/audit", &[("since", mid_param.clone())]).await;
    let since = since["data"].as_array().unwrap();
    let mut expected_since: BTreeSet<String> = made[2..].iter().map(|m| m.id.clone()).collect();
    expected_since.insert(failed_id.clone());
    assert_eq!(request_ids(since), expected_since);
    assert_eq!(
        since.len(),
        4,
        "only batch 2 is since the boundary: {since:?}"
    );

    let (paged, pages) = walk_audit(&server, &[]).await;
    assert_eq!(
        paged, all_ids,
        "limit=2 walks every row exactly once, in order"
    );
    assert_eq!(pages, 4);
    let (paged, pages) = walk_audit(&server, &[("type", "audit.request".into())]).await;
    let typed_ids: Vec<i64> = typed.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(paged, typed_ids);
    assert_eq!(pages, 3);

    // ---- GET /admin/v1/usage
    let all_made: Vec<&Made> = made.iter().collect();
    let (status, usage_all) = admin_get(&server, "/admin/v1/usage", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(usage_all["totals"], totals(&all_made));
    assert_eq!(usage_all["data"], json!([]));

    let select =
        |f: &dyn Fn(&Made) -> bool| -> Vec<&Made> { made.iter().filter(|m| f(m)).collect() };
    let (_, by_key) = admin_get(&server, "/admin/v1/usage", &[("group_by", "key".into())]).await;
    let mut expected_groups: Vec<Value> = [key_a, key_b]
        .iter()
        .map(|k| {
            let mut group = totals(&select(&|m: &Made| m.key == *k));
            group["key_id"] = json!(k);
            group
        })
        .collect();
    expected_groups.sort_by_key(|g| -g["cost_micros"].as_i64().unwrap());
    assert_eq!(by_key["data"], json!(expected_groups));
    assert_eq!(by_key["totals"], totals(&all_made));
    assert_eq!(by_key["group_by"], "key");

    let (_, by_model) =
        admin_get(&server, "/admin/v1/usage", &[("group_by", "model".into())]).await;
    let mut expected_groups: Vec<Value> = ["gpt-test", "gpt-test-2"]
        .iter()
        .map(|name| {
            let mut group = totals(&select(&|m: &Made| m.model == *name));
            group["model"] = json!(name);
            group
        })
        .collect();
    expected_groups.sort_by_key(|g| -g["cost_micros"].as_i64().unwrap());
    assert_eq!(by_model["data"], json!(expected_groups));

    let mut days: BTreeMap<String, Vec<&Made>> = BTreeMap::new();
    for m in &made {
        let at = server.ledger_row(&m.id).await.at;
        days.entry(at.format("%Y-%m-%d").to_string())
            .or_default()
            .push(m);
    }
    let expected_days: Vec<Value> = days
        .iter()
        .map(|(day, made)| {
            let mut group = totals(made);
            group["day"] = json!(day);
            group
        })
        .collect();
    let (_, by_day) = admin_get(&server, "/admin/v1/usage", &[("group_by", "day".into())]).await;
    assert_eq!(by_day["data"], json!(expected_days));

    let (_, of_key) = admin_get(&server, "/admin/v1/usage", &[("key_id", key_a.to_string())]).await;
    assert_eq!(
        of_key["totals"],
        totals(&select(&|m: &Made| m.key == key_a))
    );
    let (_, of_model) = admin_get(
        &server,
        "/admin/v1/usage",
        &[("model", "gpt-test-2".into())],
    )
    .await;
    assert_eq!(
        of_model["totals"],
        totals(&select(&|m: &Made| m.model == "gpt-test-2"))
    );
    let (_, from) = admin_get(&server, "/admin/v1/usage", &[("from", mid_param.clone())]).await;
    assert_eq!(
        from["totals"],
        totals(&made[2..].iter().collect::<Vec<_>>())
    );
    let (_, to) = admin_get(&server, "/admin/v1/usage", &[("to", mid_param.clone())]).await;
    assert_eq!(to["totals"], totals(&made[..2].iter().collect::<Vec<_>>()));
    let (_, combined) = admin_get(
        &server,
        "/admin/v1/usage",
        &[
            ("key_id", key_a.to_string()),
            ("model", "gpt-test".into()),
            ("from", mid_param.clone()),
            ("group_by", "model".into()),
        ],
    )
    .await;
    let mut expected = totals(&[&made[3]]);
    assert_eq!(combined["totals"], expected);
    expected["model"] = json!("gpt-test");
    assert_eq!(combined["data"], json!([expected]));

    let (status, invalid) =
        admin_get(&server, "/admin/v1/usage", &[("group_by", "week".into())]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(invalid["error"]["code"], "invalid_group_by", "{invalid}");
    assert_eq!(
        invalid["error"]["type"], "invalid_request_error",
        "{invalid}"
    );
    server.shutdown().await;
}

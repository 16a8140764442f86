//! The OpenAI-compatible API (`/v1/chat/completions`, streamed or not,
//! `/v1/embeddings`, `/v1/models`) against the built-in `mock` provider of
//! the default configuration, over real HTTP: deterministic answers, usage
//! equal to the ledger row, costs by the pricing rule, and the mock's knobs
//! (`fail_models`, `fail_rate`, `latency_ms`, `tokens_per_second`) giving
//! failures and slowness on demand.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{mock_cost, tokens, TestServer, DEADLINE};
use tollgate::config::{Config, ModelConfig, ProviderConfig};
use uuid::Uuid;

const CHAT: &str = "/v1/chat/completions";
const EMBEDDINGS: &str = "/v1/embeddings";
const MODELS: &str = "/v1/models";

/// A gateway on the default configuration (changed by `configure`) with a
/// non-admin key whose id is known.
struct Gateway {
    server: TestServer,
    key: String,
    key_id: Uuid,
    http: reqwest::Client,
}

impl Gateway {
    async fn start(configure: impl FnOnce(&mut Config)) -> Gateway {
        let server = TestServer::start(configure).await;
        let (record, secret) =
            tollgate::auth::issue_api_key(&server.state.store, "proxy-test", false, None)
                .await
                .expect("create a key");
        Gateway {
            key: secret.expose().to_owned(),
            key_id: record.id,
            server,
            http: reqwest::Client::new(),
        }
    }

    /// `POST path` with the test key and a JSON body.
    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.server.url(path))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .expect("the gateway answers")
    }
}

fn request_id(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-request-id")
        .expect("every response has x-request-id")
        .to_str()
        .unwrap()
        .to_owned()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|v| v.to_str().unwrap())
}

/// OpenAI's chat framing: 4 tokens per message and 3 for the reply.
fn prompt_tokens(messages: &[&str]) -> i64 {
    messages.iter().map(|m| 4 + tokens(m)).sum::<i64>() + 3
}

fn chat_body(model: &str, content: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}]})
}

/// Asserts an OpenAI-shaped error with this status, `type` and `code`.
async fn assert_error(response: reqwest::Response, status: StatusCode, kind: &str, code: &str) {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.expect("an error body is JSON");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// A streamed answer as the client received it.
struct Sse {
    /// The `data:` payload of each event, in order.
    data: Vec<String>,
    /// How many separate reads the body arrived in.
    reads: usize,
}

impl Sse {
    /// The JSON chunks, without the final `[DONE]`.
    fn chunks(&self) -> Vec<Value> {
        self.data
            .iter()
            .filter(|d| d.as_str() != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{d}: {e}")))
            .collect()
    }

    fn content(&self) -> String {
        self.chunks()
            .iter()
            .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
            .filter_map(|choice| choice["delta"]["content"].as_str().map(str::to_owned))
            .collect()
    }
}

/// Reads an event stream to its end, each read within the deadline.
async fn read_sse(response: reqwest::Response) -> Sse {
    let mut body = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut reads = 0;
    while let Some(chunk) = tokio::time::timeout(DEADLINE, body.next())
        .await
        .expect("the stream goes on within the deadline")
    {
        buffer.extend_from_slice(&chunk.expect("the stream is not broken"));
        reads += 1;
    }
    let text = String::from_utf8(buffer).expect("the stream is UTF-8");
    assert!(
        text.ends_with("\n\n"),
        "events end with a blank line: {text:?}"
    );
    let data = text
        .split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("every event is one data line: {event:?}"))
                .to_owned()
        })
        .collect();
    Sse { data, reads }
}

/// A mock provider with the default knobs (no `fail_models`).
fn mock_provider(config: &Config) -> ProviderConfig {
    ProviderConfig {
        fail_models: None,
        ..config.providers["mock"].clone()
    }
}

/// Keeps a provider's circuit breaker closed through the failures a test
/// causes on purpose: what is tested is the mock, not the breaker.
fn never_open(provider: &mut ProviderConfig) {
    provider.circuit_breaker.failure_threshold = 1_000_000;
}

fn mock_model(name: &str, provider: &str) -> ModelConfig {
    // The default mock-1, with its prices, renamed.
    ModelConfig {
        name: name.to_owned(),
        provider: provider.to_owned(),
        upstream_model: None,
        ..Config::default().models[0].clone()
    }
}

const LONG_MESSAGE: &str =
    "one two three  four five six seven eight nine ten eleven twelve thirteen fourteen";
const LONG_REPLY: &str =
    "Mock reply to: one two three four five six seven eight nine ten eleven twelve";

#[tokio::test]
async fn non_streaming_chat_answers_deterministically_with_the_usage_the_ledger_keeps() {
    let gw = Gateway::start(|_| {}).await;
    // Only the last message is summarised, cut to its first 12 words.
    let messages = ["be brief", "an earlier question", LONG_MESSAGE];
    let body = json!({"model": "mock-1", "temperature": 0.2, "messages": [
        {"role": "system", "content": messages[0]},
        {"role": "user", "content": messages[1]},
        {"role": "user", "content": messages[2]},
    ]});
    let response = gw.post(CHAT, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    assert_eq!(header(&response, "x-tollgate-provider"), Some("mock"));
    let id = request_id(&response);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    assert_eq!(answer["model"], "mock-1", "{answer}");
    let choices = answer["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 1, "{answer}");
    assert_eq!(choices[0]["message"]["role"], "assistant");
    assert_eq!(choices[0]["message"]["content"], LONG_REPLY);
    assert_eq!(choices[0]["finish_reason"], "stop");
    let input = prompt_tokens(&messages);
    let output = tokens(LONG_REPLY);
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output})
    );

    let row = gw.server.ledger_row(&id).await;
    assert_eq!(row.request_id, id);
    assert_eq!(row.key_id, gw.key_id);
    assert_eq!(row.model, "mock-1");
    assert_eq!(row.provider, "mock");
    assert_eq!(row.input_tokens, input);
    assert_eq!(row.output_tokens, output);
    assert_eq!(row.cost_micros, mock_cost(input, output));
    assert_eq!(row.status, 200);
    assert!(!row.streamed);
    assert!(!row.estimated, "the mock reports usage");

    // The same request gets the same answer (and id), under a request id
    // the client chose.
    let again = gw
        .http
        .post(gw.server.url(CHAT))
        .bearer_auth(&gw.key)
        .header("x-request-id", "client-chosen-id-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(request_id(&again), "client-chosen-id-1");
    let second: Value = again.json().await.unwrap();
    assert_eq!(second["choices"], answer["choices"]);
    assert_eq!(second["id"], answer["id"]);
    assert_eq!(second["usage"], answer["usage"]);
    let row = gw.server.ledger_row("client-chosen-id-1").await;
    assert_eq!(
        (row.input_tokens, row.output_tokens),
        (input, output),
        "{row:?}"
    );

    // Multi-part content is read by its text parts.
    let parts = json!({"model": "mock-1", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}]});
    let answer: Value = gw.post(CHAT, &parts).await.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Mock reply to: hello world"
    );
    gw.server.shutdown().await;
}

#[tokio::test]
async fn a_stream_sends_its_chunks_in_order_ends_with_done_and_has_no_usage_chunk_unasked() {
    let gw = Gateway::start(|_| {}).await;
    let mut body = chat_body("mock-1", "hello world");
    body["stream"] = json!(true);
    let response = gw.post(CHAT, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&response, "x-tollgate-provider"), Some("mock"));
    let id = request_id(&response);
    let sse = read_sse(response).await;

    assert_eq!(sse.data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        sse.data.iter().filter(|d| d.as_str() == "[DONE]").count(),
        1
    );
    let chunks = sse.chunks();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        assert!(chunk.get("usage").is_none(), "no usage unasked: {chunk}");
    }
    // Role first, then the words in order, then the finish.
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let pieces: Vec<&str> = chunks[1..chunks.len() - 1]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(pieces, ["Mock", " reply", " to:", " hello", " world"]);
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"][0]["finish_reason"], "stop", "{last}");
    assert_eq!(last["choices"][0]["delta"], json!({}), "{last}");
    assert_eq!(sse.content(), "Mock reply to: hello world");

    // The gateway asked for usage upstream all the same: the row has it.
    let row = gw.server.ledger_row(&id).await;
    let (input, output) = (
        prompt_tokens(&["hello world"]),
        tokens("Mock reply to: hello world"),
    );
    assert_eq!((row.input_tokens, row.output_tokens), (input, output));
    assert_eq!(row.cost_micros, mock_cost(input, output));
    assert!(row.streamed);
    assert!(!row.estimated);
    assert_eq!(row.status, 200);
    assert_eq!(row.model, "mock-1");
    assert_eq!(row.key_id, gw.key_id);

    // `include_usage: false` is the same as not asking.
    body["stream_options"] = json!({"include_usage": false});
    let sse = read_sse(gw.post(CHAT, &body).await).await;
    assert!(sse.chunks().iter().all(|c| c.get("usage").is_none()));
    assert_eq!(sse.data.last().map(String::as_str), Some("[DONE]"));
    gw.server.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_asks_for_usage_gets_exactly_one_usage_chunk_right_before_done() {
    let gw = Gateway::start(|_| {}).await;
    let mut body = chat_body("mock-1", LONG_MESSAGE);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = gw.post(CHAT, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let id = request_id(&response);
    let sse = read_sse(response).await;
    assert_eq!(sse.data.last().map(String::as_str), Some("[DONE]"));
    let chunks = sse.chunks();
    let with_usage: Vec<usize> = (0..chunks.len())
        .filter(|&i| chunks[i].get("usage").is_some_and(|u| !u.is_null()))
        .collect();
    assert_eq!(
        with_usage,
        [chunks.len() - 1],
        "one usage chunk, the last before [DONE]"
    );
    let usage_chunk = &chunks[chunks.len() - 1];
    assert_eq!(usage_chunk["choices"], json!([]), "{usage_chunk}");
    assert_eq!(sse.content(), LONG_REPLY);
    let (input, output) = (prompt_tokens(&[LONG_MESSAGE]), tokens(LONG_REPLY));
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output})
    );
    let row = gw.server.ledger_row(&id).await;
    assert_eq!((row.input_tokens, row.output_tokens), (input, output));
    assert_eq!(row.cost_micros, mock_cost(input, output));
    assert!(row.streamed);
    assert!(!row.estimated);
    gw.server.shutdown().await;
}

#[tokio::test]
async fn embeddings_are_eight_deterministic_dimensions_with_usage() {
    let gw = Gateway::start(|_| {}).await;
    let embed = |input: Value| {
        let gw = &gw;
        async move {
            let response = gw
                .post(EMBEDDINGS, &json!({"model": "mock-1", "input": input}))
                .await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(header(&response, "x-tollgate-provider"), Some("mock"));
            let id = request_id(&response);
            let body: Value = response.json().await.unwrap();
            (id, body)
        }
    };
    let vector = |body: &Value, index: usize| -> Vec<f64> {
        let item = &body["data"][index];
        assert_eq!(item["object"], "embedding", "{body}");
        assert_eq!(item["index"], index, "{body}");
        let vector: Vec<f64> = item["embedding"]
            .as_array()
            .expect("an embedding is a list")
            .iter()
            .map(|x| x.as_f64().expect("a number"))
            .collect();
        assert_eq!(vector.len(), 8, "{body}");
        assert!(vector.iter().all(|x| (-1.0..=1.0).contains(x)), "{body}");
        vector
    };

    let (id, first) = embed(json!("hello world")).await;
    assert_eq!(first["object"], "list", "{first}");
    assert_eq!(first["model"], "mock-1", "{first}");
    assert_eq!(first["data"].as_array().unwrap().len(), 1, "{first}");
    let hello = vector(&first, 0);
    let input = tokens("hello world");
    assert_eq!(input, 2);
    assert_eq!(
        first["usage"],
        json!({"prompt_tokens": input, "total_tokens": input})
    );
    let row = gw.server.ledger_row(&id).await;
    assert_eq!((row.input_tokens, row.output_tokens), (2, 0));
    // ceil(2 × 0.15) = 1 micro-dollar.
    assert_eq!(row.cost_micros, 1);
    assert_eq!(row.cost_micros, mock_cost(2, 0));
    assert_eq!(row.model, "mock-1");
    assert_eq!(row.status, 200);
    assert!(!row.streamed);
    assert!(!row.estimated);

    // Same input, same vector; another input, another vector.
    let (_, again) = embed(json!("hello world")).await;
    assert_eq!(vector(&again, 0), hello);
    let (_, other) = embed(json!("goodbye world")).await;
    assert_ne!(vector(&other, 0), hello);

    // A batch: one vector per input, in order, each the same as alone.
    let (id, batch) = embed(json!(["hello world", "goodbye world"])).await;
    assert_eq!(batch["data"].as_array().unwrap().len(), 2, "{batch}");
    assert_eq!(vector(&batch, 0), hello);
    assert_eq!(vector(&batch, 1), vector(&other, 0));
    let both = tokens("hello world") + tokens("goodbye world");
    assert_eq!(batch["usage"]["prompt_tokens"], both);
    assert_eq!(gw.server.ledger_row(&id).await.input_tokens, both);
    gw.server.shutdown().await;
}

#[tokio::test]
async fn models_are_listed_in_openais_shape_for_a_key_only() {
    let gw = Gateway::start(|_| {}).await;
    let response = gw
        .http
        .get(gw.server.url(MODELS))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list", "{body}");
    let data = body["data"].as_array().expect("data is a list");
    let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["mock-1", "mock-fail"], "{body}");
    for model in data {
        assert_eq!(model["object"], "model", "{model}");
        assert_eq!(model["owned_by"], "mock", "{model}");
        assert!(model["created"].is_i64(), "{model}");
    }

    let anonymous = gw.http.get(gw.server.url(MODELS)).send().await.unwrap();
    assert_error(
        anonymous,
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "missing_api_key",
    )
    .await;
    let wrong = gw
        .http
        .get(gw.server.url(MODELS))
        .bearer_auth("gw_live_not-a-real-key")
        .send()
        .await
        .unwrap();
    assert_error(
        wrong,
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "invalid_api_key",
    )
    .await;
    for (path, body) in [
        (CHAT, chat_body("mock-1", "hi")),
        (EMBEDDINGS, json!({"model": "mock-1", "input": "hi"})),
    ] {
        let response = gw
            .http
            .post(gw.server.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_error(
            response,
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing_api_key",
        )
        .await;
    }
    gw.server.shutdown().await;
}

#[tokio::test]
async fn requests_that_cannot_be_routed_get_clear_client_errors() {
    let gw = Gateway::start(|config| config.server.max_body_bytes = 1024).await;
    let raw = |path: &'static str, body: &'static str| {
        gw.http
            .post(gw.server.url(path))
            .bearer_auth(&gw.key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let bad = (StatusCode::BAD_REQUEST, "invalid_request_error");
    for (path, body, (status, kind), code) in [
        (CHAT, "{not json", bad, "invalid_json"),
        (CHAT, "[1, 2]", bad, "invalid_json"),
        (
            CHAT,
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
            bad,
            "missing_model",
        ),
        (
            CHAT,
            r#"{"model": "", "messages": [{"role": "user", "content": "hi"}]}"#,
            bad,
            "missing_model",
        ),
        (CHAT, r#"{"model": "mock-1"}"#, bad, "missing_messages"),
        (
            CHAT,
            r#"{"model": "mock-1", "messages": []}"#,
            bad,
            "missing_messages",
        ),
        (EMBEDDINGS, r#"{"model": "mock-1"}"#, bad, "missing_input"),
        (
            EMBEDDINGS,
            r#"{"model": "mock-1", "input": null}"#,
            bad,
            "missing_input",
        ),
        (
            CHAT,
            r#"{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}"#,
            (StatusCode::NOT_FOUND, "invalid_request_error"),
            "model_not_found",
        ),
    ] {
        let response = raw(path, body).await.unwrap();
        assert_error(response, status, kind, code).await;
    }
    let big = chat_body("mock-1", &"x".repeat(2000));
    assert_error(
        gw.post(CHAT, &big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "request_too_large",
    )
    .await;
    gw.server.shutdown().await;
}

#[tokio::test]
async fn the_mock_fail_model_always_answers_502_upstream_error_and_is_recorded() {
    let gw = Gateway::start(|config| {
        never_open(config.providers.get_mut("mock").unwrap());
        // A public name for the failing upstream model: fail_models names
        // upstream models.
        config.models.push(ModelConfig {
            upstream_model: Some("mock-fail".into()),
            ..mock_model("alias-of-fail", "mock")
        });
    })
    .await;
    let mut stream = chat_body("mock-fail", "hello");
    stream["stream"] = json!(true);
    for (path, body) in [
        (CHAT, chat_body("mock-fail", "hello")),
        (CHAT, stream),
        (EMBEDDINGS, json!({"model": "mock-fail", "input": "hello"})),
        (CHAT, chat_body("alias-of-fail", "hello")),
    ] {
        for _ in 0..3 {
            let response = gw.post(path, &body).await;
            let id = request_id(&response);
            assert_error(
                response,
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "upstream_error",
            )
            .await;
            let row = gw.server.ledger_row(&id).await;
            assert_eq!(row.status, 502, "{row:?}");
            assert_eq!(
                (row.input_tokens, row.output_tokens, row.cost_micros),
                (0, 0, 0)
            );
            let audit = gw.server.audit_record(&id).await;
            assert_eq!(audit["key_id"], gw.key_id.to_string(), "{audit}");
            assert_eq!(audit["payload"]["status"], 502, "{audit}");
            assert_eq!(audit["payload"]["error"], "upstream_error", "{audit}");
            assert_eq!(audit["payload"]["provider"], "mock", "{audit}");
        }
    }
    // mock-1 on the same provider is unaffected.
    assert_eq!(
        gw.post(CHAT, &chat_body("mock-1", "hello")).await.status(),
        StatusCode::OK
    );
    gw.server.shutdown().await;
}

#[tokio::test]
async fn fail_rate_one_always_fails_and_fail_rate_zero_never_does() {
    let gw = Gateway::start(|config| {
        let mut always = ProviderConfig {
            fail_rate: Some(1.0),
            ..mock_provider(config)
        };
        never_open(&mut always);
        let never = ProviderConfig {
            fail_rate: Some(0.0),
            ..mock_provider(config)
        };
        config.providers.insert("always".into(), always);
        config.providers.insert("never".into(), never);
        config.models.push(mock_model("always-1", "always"));
        config.models.push(mock_model("never-1", "never"));
    })
    .await;
    for n in 0..20 {
        let mut chat = chat_body("always-1", &format!("request {n}"));
        chat["stream"] = json!(n % 2 == 0);
        assert_error(
            gw.post(CHAT, &chat).await,
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "upstream_error",
        )
        .await;
        assert_error(
            gw.post(EMBEDDINGS, &json!({"model": "always-1", "input": "x"}))
                .await,
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "upstream_error",
        )
        .await;
    }
    for n in 0..50 {
        let mut chat = chat_body("never-1", &format!("request {n}"));
        chat["stream"] = json!(n % 2 == 0);
        let response = gw.post(CHAT, &chat).await;
        assert_eq!(response.status(), StatusCode::OK, "request {n}");
        if n % 2 == 0 {
            let sse = read_sse(response).await;
            assert_eq!(sse.content(), format!("Mock reply to: request {n}"));
        } else {
            let body: Value = response.json().await.unwrap();
            assert_eq!(
                body["choices"][0]["message"]["content"],
                format!("Mock reply to: request {n}")
            );
        }
    }
    gw.server.shutdown().await;
}

#[tokio::test]
async fn latency_ms_delays_every_answer_by_at_least_that_long() {
    const LATENCY: Duration = Duration::from_millis(300);
    let gw = Gateway::start(|config| {
        let slow = ProviderConfig {
            latency_ms: Some(LATENCY.as_millis() as u64),
            ..mock_provider(config)
        };
        let slow_fail = ProviderConfig {
            fail_rate: Some(1.0),
            ..slow.clone()
        };
        config.providers.insert("slow".into(), slow);
        config.providers.insert("slow-fail".into(), slow_fail);
        config.models.push(mock_model("slow-1", "slow"));
        config.models.push(mock_model("slow-fail-1", "slow-fail"));
    })
    .await;

    let started = Instant::now();
    let response = gw.post(CHAT, &chat_body("slow-1", "hello")).await;
    let id = request_id(&response);
    let body: Value = response.json().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Mock reply to: hello"
    );
    assert!(elapsed >= LATENCY, "answered after {elapsed:?}");
    let row = gw.server.ledger_row(&id).await;
    assert!(row.latency_ms >= 300, "{row:?}");

    // A stream's first byte waits as long.
    let mut stream = chat_body("slow-1", "hello");
    stream["stream"] = json!(true);
    let started = Instant::now();
    let response = gw.post(CHAT, &stream).await;
    let mut body = response.bytes_stream();
    let first = tokio::time::timeout(DEADLINE, body.next())
        .await
        .expect("a first chunk")
        .expect("the stream is not empty")
        .unwrap();
    let elapsed = started.elapsed();
    assert!(!first.is_empty());
    assert!(elapsed >= LATENCY, "first chunk after {elapsed:?}");
    drop(body);

    let started = Instant::now();
    let response = gw
        .post(EMBEDDINGS, &json!({"model": "slow-1", "input": "x"}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    response.bytes().await.unwrap();
    assert!(started.elapsed() >= LATENCY);

    // Failures wait as long.
    let started = Instant::now();
    let response = gw.post(CHAT, &chat_body("slow-fail-1", "hello")).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert!(started.elapsed() >= LATENCY);
    gw.server.shutdown().await;
}

#[tokio::test]
async fn tokens_per_second_spaces_the_chunks_of_a_stream() {
    const TOKENS_PER_SECOND: u32 = 20;
    let gw = Gateway::start(|config| {
        let drip = ProviderConfig {
            tokens_per_second: Some(u64::from(TOKENS_PER_SECOND)),
            ..mock_provider(config)
        };
        config.providers.insert("drip".into(), drip);
        config.models.push(mock_model("drip-1", "drip"));
    })
    .await;
    let mut body = chat_body("drip-1", "one two three four five six");
    body["stream"] = json!(true);
    let started = Instant::now();
    let response = gw.post(CHAT, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let sse = read_sse(response).await;
    let elapsed = started.elapsed();
    assert_eq!(sse.content(), "Mock reply to: one two three four five six");
    assert_eq!(sse.data.last().map(String::as_str), Some("[DONE]"));
    // Role, 9 words, finish, [DONE].
    assert_eq!(sse.data.len(), 12);
    let at_least = Duration::from_secs(1) * (sse.data.len() as u32 - 1) / TOKENS_PER_SECOND;
    assert!(
        elapsed >= at_least,
        "{} events in {elapsed:?}, expected at least {at_least:?}",
        sse.data.len()
    );
    assert!(
        sse.reads > 1,
        "a spaced stream arrives in more than one piece"
    );
    gw.server.shutdown().await;
}

/// Found by this test: `src/proxy/mock.rs` divides one second by
/// `tokens_per_second as u32`, so a value that is a multiple of 2^32 (which
/// validation accepts) panics the handler with a division by zero and the
/// request is recorded as a 499 `client_closed`. Either validation refuses
/// such a value or the stream works.
#[tokio::test]
async fn a_huge_tokens_per_second_is_refused_or_streams_without_crashing() {
    let huge = 1u64 << 32;
    let mut refused = None;
    let gw = Gateway::start(|config| {
        let fast = ProviderConfig {
            tokens_per_second: Some(huge),
            ..mock_provider(config)
        };
        config.providers.insert("fast".into(), fast);
        config.models.push(mock_model("fast-1", "fast"));
        refused = config.validate().err();
    })
    .await;
    if let Some((key, _)) = refused {
        assert_eq!(key, "providers.fast.tokens_per_second");
        gw.server.shutdown().await;
        return;
    }
    let mut body = chat_body("fast-1", "hello world");
    body["stream"] = json!(true);
    let response = gw
        .http
        .post(gw.server.url(CHAT))
        .bearer_auth(&gw.key)
        .header("x-request-id", "huge-tokens-per-second")
        .json(&body)
        .send()
        .await;
    let audit = gw.server.audit_record("huge-tokens-per-second").await;
    let response = response.unwrap_or_else(|e| {
        panic!("tokens_per_second = {huge} broke the request ({e}); audited as {audit}")
    });
    assert_eq!(response.status(), StatusCode::OK, "{audit}");
    let sse = read_sse(response).await;
    assert_eq!(sse.content(), "Mock reply to: hello world");
    gw.server.shutdown().await;
}

#[tokio::test]
async fn cost_follows_the_pricing_rule_and_adds_up_in_the_usage_report() {
    // The rule itself, by hand: 8 input and 5 output tokens are
    // 1.2 + 3.0 = 4.2 micro-dollars, rounded up once to 5.
    assert_eq!(mock_cost(8, 5), 5);
    assert_eq!(mock_cost(1_000_000, 1_000_000), 750_000);
    let gw = Gateway::start(|_| {}).await;
    let long = "the quick brown fox jumps over the lazy dog ".repeat(300);
    let long_reply = "Mock reply to: the quick brown fox jumps over the lazy dog the quick brown";
    // (path, body, input tokens, output tokens)
    let requests = [
        (
            CHAT,
            chat_body("mock-1", &long),
            prompt_tokens(&[&long]),
            tokens(long_reply),
        ),
        (
            CHAT,
            chat_body("mock-1", "hi"),
            prompt_tokens(&["hi"]),
            tokens("Mock reply to: hi"),
        ),
        (
            EMBEDDINGS,
            json!({"model": "mock-1", "input": long.clone()}),
            tokens(&long),
            0,
        ),
    ];
    assert!(requests[0].2 > 2_000, "a long prompt: {}", requests[0].2);
    let price = tollgate::pricing::Price::of(&mock_model("mock-1", "mock"));
    let mut totals = (0, 0, 0);
    for (path, body, input, output) in &requests {
        let response = gw.post(path, body).await;
        assert_eq!(response.status(), StatusCode::OK);
        let id = request_id(&response);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["usage"]["prompt_tokens"], *input, "{path}");
        let row = gw.server.ledger_row(&id).await;
        assert_eq!((row.input_tokens, row.output_tokens), (*input, *output));
        let cost = mock_cost(*input, *output);
        assert!(cost > 0);
        assert_eq!(row.cost_micros, cost, "{row:?}");
        assert_eq!(price.cost_micros(*input, *output), cost);
        totals.0 += input;
        totals.1 += output;
        totals.2 += cost;
    }

    let report: Value = gw
        .http
        .get(gw.server.url(&format!(
            "/admin/v1/usage?key_id={}&group_by=model",
            gw.key_id
        )))
        .bearer_auth(&gw.server.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected = json!({"requests": 3, "input_tokens": totals.0,
        "output_tokens": totals.1, "cost_micros": totals.2});
    assert_eq!(report["totals"], expected, "{report}");
    assert_eq!(report["group_by"], "model", "{report}");
    let groups = report["data"].as_array().expect("groups");
    assert_eq!(groups.len(), 1, "{report}");
    assert_eq!(groups[0]["model"], "mock-1", "{report}");
    assert_eq!(groups[0]["cost_micros"], totals.2, "{report}");
    gw.server.shutdown().await;
}

#[tokio::test]
async fn audit_rows_keep_bodies_out_unless_include_bodies_is_set() {
    for include_bodies in [false, true] {
        let gw = Gateway::start(|config| config.audit.include_bodies = include_bodies).await;
        let body = chat_body("mock-1", "secret prompt text");
        let response = gw.post(CHAT, &body).await;
        assert_eq!(response.status(), StatusCode::OK);
        let id = request_id(&response);
        let audit = gw.server.audit_record(&id).await;
        let payload = &audit["payload"];
        assert_eq!(audit["type"], "audit.request", "{audit}");
        assert_eq!(payload["status"], 200, "{audit}");
        assert_eq!(payload["model"], "mock-1", "{audit}");
        assert_eq!(payload["provider"], "mock", "{audit}");
        assert_eq!(payload["path"], CHAT, "{audit}");
        assert_eq!(payload["stream"], false, "{audit}");
        assert!(payload["error"].is_null(), "{audit}");
        if include_bodies {
            assert_eq!(payload["request_body"], body, "{audit}");
            assert_eq!(
                payload["response_text"], "Mock reply to: secret prompt text",
                "{audit}"
            );
        } else {
            assert!(!audit.to_string().contains("secret prompt"), "{audit}");
            assert!(payload.get("request_body").is_none(), "{audit}");
            assert!(payload.get("response_text").is_none(), "{audit}");
        }
        gw.server.shutdown().await;
    }
}

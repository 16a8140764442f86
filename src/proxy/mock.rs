//! `type = "mock"`: a built-in provider with no network, for demos and for
//! trying the gateway before any real provider is configured.
//!
//! It answers deterministically (the reply repeats the start of the last
//! message), honours `stream` and `stream_options.include_usage`, reports
//! usage counted with the same tokenizer the gateway estimates with, and
//! has knobs for showing failures: `latency_ms`, `tokens_per_second` for
//! streams, `fail_rate`, and `fail_models` (upstream model names that
//! always answer HTTP 500; `mock-fail` by default).

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};

use super::provider::{
    Endpoint, Provider, ProviderError, UpstreamBody, UpstreamRequest, UpstreamResponse,
};
use super::usage::{content_text, count_tokens, estimate_input};
use crate::config::ProviderConfig;

/// Words of the last message repeated in the reply.
const SUMMARY_WORDS: usize = 12;
const EMBEDDING_DIMENSIONS: usize = 8;

pub struct MockProvider {
    latency: Duration,
    tokens_per_second: u64,
    fail_rate: f64,
    fail_models: Vec<String>,
}

impl MockProvider {
    pub fn new(config: &ProviderConfig) -> MockProvider {
        MockProvider {
            latency: Duration::from_millis(config.latency_ms.unwrap_or(0)),
            tokens_per_second: config.tokens_per_second.unwrap_or(0),
            fail_rate: config.fail_rate.unwrap_or(0.0),
            fail_models: config.fail_models.clone().unwrap_or_default(),
        }
    }

    fn fails(&self, model: &str) -> bool {
        self.fail_models.iter().any(|m| m == model)
            || (self.fail_rate > 0.0 && rand::thread_rng().gen_bool(self.fail_rate))
    }
}

fn json_response(status: u16, body: &Value) -> UpstreamResponse {
    UpstreamResponse {
        status,
        body: UpstreamBody::Complete(Bytes::from(body.to_string())),
    }
}

/// The reply to a chat request: the start of its last message.
fn reply_text(body: &Value) -> String {
    let last = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .map(|m| content_text(m.get("content")))
        .unwrap_or_default();
    let words: Vec<&str> = last.split_whitespace().take(SUMMARY_WORDS).collect();
    format!("Mock reply to: {}", words.join(" "))
}

fn chunk(id: &str, model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": id, "object": "chat.completion.chunk", "created": chrono::Utc::now().timestamp(),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })
}

fn sse(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

impl MockProvider {
    fn chat(&self, body: &Value, stream: bool) -> UpstreamResponse {
        let model = body.get("model").and_then(Value::as_str).unwrap_or("mock");
        let text = reply_text(body);
        let prompt_tokens = estimate_input(Endpoint::ChatCompletions, body);
        let completion_tokens = count_tokens(&text);
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        });
        let id = format!("chatcmpl-mock-{:016x}", fxhash(&text));
        if !stream {
            return json_response(
                200,
                &json!({
                    "id": id, "object": "chat.completion", "created": chrono::Utc::now().timestamp(),
                    "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": usage,
                }),
            );
        }
        let mut events = vec![sse(&chunk(
            &id,
            model,
            json!({"role": "assistant", "content": ""}),
            None,
        )
        .to_string())];
        for (i, word) in text.split(' ').enumerate() {
            let piece = if i == 0 {
                word.to_owned()
            } else {
                format!(" {word}")
            };
            events.push(sse(
                &chunk(&id, model, json!({"content": piece}), None).to_string()
            ));
        }
        events.push(sse(&chunk(&id, model, json!({}), Some("stop")).to_string()));
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if include_usage {
            let mut last =
                json!({"id": id, "object": "chat.completion.chunk", "model": model, "choices": []});
            last["usage"] = usage;
            events.push(sse(&last.to_string()));
        }
        events.push(sse("[DONE]"));
        let pause = (self.tokens_per_second > 0)
            .then(|| Duration::from_secs_f64(1.0 / self.tokens_per_second as f64));
        let stream = futures::stream::iter(events.into_iter().enumerate()).then(
            move |(i, event)| async move {
                if let Some(pause) = pause.filter(|_| i > 0) {
                    tokio::time::sleep(pause).await;
                }
                Ok::<_, ProviderError>(event)
            },
        );
        UpstreamResponse {
            status: 200,
            body: UpstreamBody::Stream(stream.boxed()),
        }
    }

    fn embeddings(&self, body: &Value) -> UpstreamResponse {
        let inputs: Vec<String> = match body.get("input") {
            Some(Value::Array(items)) => items.iter().map(|i| i.to_string()).collect(),
            Some(other) => vec![other.to_string()],
            None => Vec::new(),
        };
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(index, input)| {
                let seed = fxhash(input);
                let vector: Vec<f64> = (0..EMBEDDING_DIMENSIONS)
                    .map(|d| (((seed >> (d * 8)) & 0xff) as f64 / 127.5) - 1.0)
                    .collect();
                json!({"object": "embedding", "index": index, "embedding": vector})
            })
            .collect();
        let tokens = estimate_input(Endpoint::Embeddings, body);
        json_response(
            200,
            &json!({
                "object": "list", "data": data,
                "model": body.get("model").cloned().unwrap_or(Value::Null),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }),
        )
    }
}

/// A small stable hash, so replies and vectors are the same every run.
fn fxhash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Provider for MockProvider {
    fn send(
        &self,
        request: UpstreamRequest,
    ) -> BoxFuture<'static, Result<UpstreamResponse, ProviderError>> {
        let latency = self.latency;
        // The gateway serialized it; a body it cannot read is the gateway's
        // bug, answered as a provider failure rather than a panic.
        let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
            return futures::future::ready(Err(ProviderError::Broken(
                "the mock provider received a request that is not JSON".to_owned(),
            )))
            .boxed();
        };
        let model = body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let fail = self.fails(&model);
        let answer = if fail {
            json_response(
                500,
                &json!({"error": {"type": "server_error", "code": "mock_failure",
                    "message": format!("the mock provider fails model `{model}` on purpose")}}),
            )
        } else {
            match request.endpoint {
                Endpoint::ChatCompletions => self.chat(&body, request.stream),
                Endpoint::Embeddings => self.embeddings(&body),
            }
        };
        async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            Ok(answer)
        }
        .boxed()
    }
}

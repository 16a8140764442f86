//! Relaying a streamed completion: the upstream's `text/event-stream` is
//! passed to the client event by event as it arrives, never buffered whole.
//!
//! On the way through, each event is read for usage (the gateway always
//! asks the upstream for the final usage chunk) and for the text of content
//! deltas (to estimate usage if none comes). A client that did not ask for
//! the usage chunk does not get it. When the stream ends — completed,
//! broken upstream, or the client gone (the body is dropped, which also
//! drops and so cancels the upstream request) — the request is recorded
//! exactly once with what was produced.

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use serde_json::Value;

use super::provider::ProviderError;
use super::usage::{self, Usage};
use super::Call;

/// Relays `upstream` to the client; records the request through `call`
/// when the stream ends or is dropped.
pub fn relay(
    upstream: BoxStream<'static, Result<Bytes, ProviderError>>,
    call: Call,
    client_wants_usage: bool,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let relay = Relay {
        upstream,
        buffer: BytesMut::new(),
        client_wants_usage,
        reported: None,
        output_text: String::new(),
        saw_done: false,
        call: Some(call),
    };
    futures::stream::unfold(relay, |mut relay| async move {
        relay.next_bytes().await.map(|bytes| (Ok(bytes), relay))
    })
}

struct Relay {
    upstream: BoxStream<'static, Result<Bytes, ProviderError>>,
    buffer: BytesMut,
    client_wants_usage: bool,
    /// `(prompt_tokens, completion_tokens)` from the usage chunk.
    reported: Option<(i64, i64)>,
    output_text: String,
    saw_done: bool,
    /// Taken when the request is recorded, so it is recorded once.
    call: Option<Call>,
}

impl Relay {
    /// The next bytes for the client: every complete event available, at
    /// least one, or `None` at the end.
    async fn next_bytes(&mut self) -> Option<Bytes> {
        loop {
            let mut out = BytesMut::new();
            while let Some((end, separator)) = event_boundary(&self.buffer) {
                let event = self.buffer.split_to(end + separator);
                if let Some(forward) = self.process(&event[..end]) {
                    out.extend_from_slice(&forward);
                }
            }
            if !out.is_empty() {
                return Some(out.freeze());
            }
            // Recorded already: the upstream has ended.
            self.call.as_ref()?;
            match self.upstream.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(error)) => {
                    tracing::warn!(%error, "the upstream stream broke off");
                    self.finish(Some("upstream_error"));
                    return None;
                }
                None => {
                    // A last event without its blank line still counts.
                    let rest = self.buffer.split();
                    let mut out = BytesMut::new();
                    if !rest.iter().all(u8::is_ascii_whitespace) {
                        if let Some(forward) = self.process(&rest) {
                            out.extend_from_slice(&forward);
                        }
                    }
                    if !self.saw_done {
                        out.extend_from_slice(b"data: [DONE]\n\n");
                    }
                    self.finish(None);
                    return Some(out.freeze());
                }
            }
        }
    }

    /// Reads one event; returns what to forward (with its blank line).
    fn process(&mut self, event: &[u8]) -> Option<Bytes> {
        let forward = |bytes: &[u8]| {
            let mut out = BytesMut::with_capacity(bytes.len() + 2);
            out.extend_from_slice(bytes);
            out.extend_from_slice(b"\n\n");
            Some(out.freeze())
        };
        let Ok(text) = std::str::from_utf8(event) else {
            return forward(event);
        };
        let data: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            return forward(event);
        }
        let data = data.join("\n");
        if data.trim() == "[DONE]" {
            self.saw_done = true;
            return forward(event);
        }
        let Ok(mut chunk) = serde_json::from_str::<Value>(&data) else {
            return forward(event);
        };
        if let Some(choices) = chunk.get("choices").and_then(Value::as_array) {
            for choice in choices {
                if let Some(piece) = choice.pointer("/delta/content").and_then(Value::as_str) {
                    self.output_text.push_str(piece);
                }
            }
        }
        let has_usage = chunk.get("usage").is_some_and(|u| !u.is_null());
        if has_usage {
            if let Some(reported) = chunk.get("usage").and_then(usage::reported) {
                self.reported = Some(reported);
            }
        }
        if !has_usage || self.client_wants_usage {
            return forward(event);
        }
        // The client did not ask for usage: drop the usage-only chunk, or
        // strip usage from a chunk that also carries choices.
        let only_usage = chunk
            .get("choices")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
        if only_usage {
            return None;
        }
        if let Some(object) = chunk.as_object_mut() {
            object.remove("usage");
        }
        forward(format!("data: {chunk}").as_bytes())
    }

    fn finish(&mut self, error: Option<&str>) {
        if let Some(call) = self.call.take() {
            let usage = self.usage(&call);
            call.finish_stream(usage, error, std::mem::take(&mut self.output_text));
        }
    }

    fn usage(&self, call: &Call) -> Usage {
        match self.reported {
            Some((input_tokens, output_tokens)) => Usage {
                input_tokens,
                output_tokens,
                estimated: false,
            },
            None => Usage {
                input_tokens: call.estimate_input(),
                output_tokens: usage::count_tokens(&self.output_text),
                estimated: true,
            },
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Dropped before the end: the client went away.
        self.finish(Some("client_closed"));
    }
}

/// Where the first event in `buffer` ends and how long its separator is.
fn event_boundary(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

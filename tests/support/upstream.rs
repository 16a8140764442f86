//! A real OpenAI-compatible HTTP upstream for the proxy tests: an axum
//! server on 127.0.0.1:0 that records every request it receives and answers
//! from a script the test sets, one [`Reply`] per request in order.
//!
//! Streams are scripted step by step ([`Step`]): data events, waits on a
//! [`Notify`] the test controls (so a test can prove the first chunk reached
//! the client before the last was sent), delays and a deliberate break.
//! Each scripted answer has a [`StreamProbe`] that counts the steps sent and
//! notices when a stream's body (or a hanging answer) is dropped before its
//! end — the client (the gateway) cancelled it.
//!
//! Included with `#[path = "support/upstream.rs"] mod upstream;`.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    /// The body parsed as JSON, or `Value::Null` if it is not JSON.
    pub body: Value,
    pub raw_body: Bytes,
}

impl Recorded {
    /// A header's value as text (panics if it is not text).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("a text header").to_owned())
    }
}

/// How to answer one request.
#[derive(Clone)]
pub enum Reply {
    /// A JSON body with this status.
    Json(u16, Value),
    /// Any body with this status and content type.
    Raw(u16, &'static str, String),
    /// `text/event-stream` with status 200, step by step.
    Stream(Vec<Step>),
    /// A redirect with this status to this `Location`.
    Redirect(u16, String),
    /// Never answer (the request hangs until the client gives up; its
    /// probe says `cancelled` once the client has).
    Hang,
}

/// One step of a streamed answer.
#[derive(Clone)]
pub enum Step {
    /// `data: <json>\n\n`.
    Data(Value),
    /// These bytes as they are.
    Raw(String),
    /// `data: [DONE]\n\n`.
    Done,
    /// Wait until the test calls `notify_one` on it (a permit given before
    /// the stream gets here counts).
    Wait(Arc<Notify>),
    Delay(Duration),
    /// Break the connection off here (the body fails, so the response
    /// never ends properly).
    Fail,
}

/// What became of one streamed (or hanging) answer.
#[derive(Debug, Default)]
pub struct StreamProbe {
    /// Steps that put bytes on the wire (`Data`, `Raw`, `Done`) yielded so far.
    sent: AtomicUsize,
    /// The whole script was yielded.
    finished: AtomicBool,
    /// The body (or the hanging answer) was dropped before its end: the
    /// client went away.
    cancelled: AtomicBool,
}

impl StreamProbe {
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    pub fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<(Reply, Arc<StreamProbe>)>>,
    /// Used when the script is empty; without it, an unscripted request is
    /// answered 500 `unscripted_request` (so the test notices).
    fallback: Mutex<Option<Reply>>,
    requests: Mutex<Vec<Recorded>>,
    probes: Mutex<Vec<Arc<StreamProbe>>>,
}

/// The scripted upstream. Dropping it stops the server.
pub struct Upstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream on 127.0.0.1:0");
        let addr = listener.local_addr().expect("the upstream's address");
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("the upstream serves");
        });
        Upstream { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT/v1`, the provider's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Answers the next unanswered request with `reply`; returns its probe
    /// (meaningful for streams and hangs).
    pub fn push(&self, reply: Reply) -> Arc<StreamProbe> {
        let probe = Arc::new(StreamProbe::default());
        self.shared
            .script
            .lock()
            .unwrap()
            .push_back((reply, probe.clone()));
        probe
    }

    /// Answers the next unanswered request with this stream; returns its probe.
    pub fn push_stream(&self, steps: Vec<Step>) -> Arc<StreamProbe> {
        self.push(Reply::Stream(steps))
    }

    /// The answer to every request once the script is used up.
    pub fn set_fallback(&self, reply: Reply) {
        *self.shared.fallback.lock().unwrap() = Some(reply);
    }

    /// Every request received so far, in order of arrival.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Probes of every stream answered so far, in order.
    pub fn probes(&self) -> Vec<Arc<StreamProbe>> {
        self.shared.probes.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.requests.lock().unwrap().push(Recorded {
        method,
        path: uri.path().to_owned(),
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        raw_body: body,
    });
    let next = shared.script.lock().unwrap().pop_front();
    let (reply, probe) = match next {
        Some(next) => next,
        None => match shared.fallback.lock().unwrap().clone() {
            Some(reply) => (reply, Arc::default()),
            None => (
                Reply::Json(
                    500,
                    json!({"error": {"message": "unscripted request", "type": "server_error",
                        "code": "unscripted_request"}}),
                ),
                Arc::default(),
            ),
        },
    };
    match reply {
        Reply::Json(status, body) => respond(status, "application/json", body.to_string()),
        Reply::Raw(status, content_type, body) => respond(status, content_type, body),
        Reply::Redirect(status, location) => Response::builder()
            .status(status)
            .header(header::LOCATION, location)
            .body(Body::empty())
            .unwrap(),
        Reply::Hang => {
            shared.probes.lock().unwrap().push(probe.clone());
            let _guard = StreamBody {
                steps: VecDeque::new(),
                probe,
                done: false,
            };
            std::future::pending().await
        }
        Reply::Stream(steps) => {
            shared.probes.lock().unwrap().push(probe.clone());
            let body = StreamBody {
                steps: steps.into(),
                probe,
                done: false,
            };
            let stream = futures::stream::unfold(body, |mut body| async move {
                let next = body.next().await?;
                Some((next, body))
            });
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .body(Body::from_stream(stream))
                .unwrap()
        }
    }
}

fn respond(status: u16, content_type: &str, body: String) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .unwrap()
}

/// The state of a streamed answer; dropped before `done` means cancelled.
struct StreamBody {
    steps: VecDeque<Step>,
    probe: Arc<StreamProbe>,
    done: bool,
}

impl StreamBody {
    async fn next(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        loop {
            let Some(step) = self.steps.pop_front() else {
                if !self.done {
                    self.done = true;
                    self.probe.finished.store(true, Ordering::SeqCst);
                }
                return None;
            };
            let bytes = match step {
                Step::Data(value) => Bytes::from(format!("data: {value}\n\n")),
                Step::Raw(text) => Bytes::from(text),
                Step::Done => Bytes::from_static(b"data: [DONE]\n\n"),
                Step::Wait(notify) => {
                    notify.notified().await;
                    continue;
                }
                Step::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    continue;
                }
                Step::Fail => {
                    // Neither finished nor cancelled: broken off on purpose.
                    self.done = true;
                    self.steps.clear();
                    return Some(Err(std::io::Error::other("scripted failure")));
                }
            };
            self.probe.sent.fetch_add(1, Ordering::SeqCst);
            return Some(Ok(bytes));
        }
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        if !self.done {
            self.probe.cancelled.store(true, Ordering::SeqCst);
        }
    }
}

/// An address where nothing listens: bound a moment ago, then released.
pub fn refused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("a bound listener's address")
}

/// A chat completion chunk with `content` as its delta.
pub fn content_chunk(id: &str, content: &str) -> Value {
    json!({
        "id": id, "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "upstream-model-x",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}],
    })
}

/// The final chunk of a stream asked for usage: no choices, only usage.
pub fn usage_chunk(id: &str, prompt_tokens: i64, completion_tokens: i64) -> Value {
    json!({
        "id": id, "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "upstream-model-x", "choices": [],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens},
    })
}

/// A non-streamed chat completion with `content` and usage.
pub fn completion(content: &str, prompt_tokens: i64, completion_tokens: i64) -> Value {
    json!({
        "id": "chatcmpl-up-1", "object": "chat.completion", "created": 1_700_000_000,
        "model": "upstream-model-x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
            "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens},
    })
}

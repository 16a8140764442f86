//! A small OpenAI-compatible upstream whose answer the test switches while
//! it runs: every request gets the status currently set (200 with a chat
//! completion and usage, any other with an OpenAI-shaped error naming it),
//! optionally after a delay, or never an answer ([`HANG`]); requests are
//! counted. For tests of failure handling (circuit breakers, alerts), where
//! the scripted `support/upstream.rs` would be more than needed.
//!
//! Included with `#[path = "support/switchable_upstream.rs"] mod switchable_upstream;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;
use tokio::task::JoinHandle;

/// The upstream's status that means: never answer.
pub const HANG: u16 = 0;

/// The upstream's shared knobs and its request counter.
#[derive(Default)]
struct Control {
    /// The status every request is answered with (read when it arrives);
    /// [`HANG`] never answers.
    status: AtomicU16,
    /// How long to wait before answering.
    delay_ms: AtomicU64,
    /// Requests received.
    hits: AtomicUsize,
}

/// An OpenAI-compatible upstream on 127.0.0.1:0: 200 with a chat
/// completion (`content` "fine", 10 prompt and 7 completion tokens), or the
/// status it is told with an OpenAI-shaped error whose message is
/// `scripted HTTP <status>`. Dropping it stops it.
pub struct FlakyUpstream {
    pub addr: SocketAddr,
    control: Arc<Control>,
    task: JoinHandle<()>,
}

impl FlakyUpstream {
    /// Starts the upstream answering every request with `status`.
    pub async fn start(status: u16) -> FlakyUpstream {
        let control = Arc::new(Control::default());
        control.status.store(status, Ordering::SeqCst);
        let app = Router::new().fallback(answer).with_state(control.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream on 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("the upstream serves");
        });
        FlakyUpstream {
            addr,
            control,
            task,
        }
    }

    /// `http://127.0.0.1:PORT/v1`, the provider's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Answers every request from now on with `status` ([`HANG`]: never).
    pub fn set_status(&self, status: u16) {
        self.control.status.store(status, Ordering::SeqCst);
    }

    /// Waits `delay` before answering every request from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.control
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// How many requests have arrived so far.
    pub fn hits(&self) -> usize {
        self.control.hits.load(Ordering::SeqCst)
    }
}

impl Drop for FlakyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(State(control): State<Arc<Control>>) -> Response {
    control.hits.fetch_add(1, Ordering::SeqCst);
    let status = control.status.load(Ordering::SeqCst);
    let delay = control.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if status == HANG {
        return std::future::pending().await;
    }
    let body = if status == 200 {
        json!({
            "id": "chatcmpl-flaky", "object": "chat.completion", "created": 1_700_000_000,
            "model": "flaky-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17},
        })
    } else {
        json!({"error": {"message": format!("scripted HTTP {status}"), "type": "server_error",
            "code": "scripted"}})
    };
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

//! `GET /ws/events`: the event stream over WebSocket.
//!
//! Each connection is one task that owns its socket. It writes every ready
//! event in one batch and flushes once (a flush per event caps fan-out
//! long before the network does), pings every `ping_interval_secs`, and
//! cuts off a client whose last Pong is older than `pong_timeout_secs`. It
//! answers `subscribe` / `unsubscribe` / `ping` messages, and closes with
//! 1001 after `system.shutdown`, 1008 when its key is revoked, and 1009 for
//! a client message over 64 KiB.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::admission::{self, Admission, StreamQuery, Transport};
use super::credential::CredentialWatch;
use super::model::Topic;
use super::session::{self, Outgoing, StreamSession};
use crate::error::ApiError;
use crate::server::AppState;

/// The largest client message accepted; larger ones close with 1009.
pub const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// Frames written per flush at most, so one busy connection cannot hold
/// its task forever.
const MAX_BATCH: usize = 512;
/// Per-connection socket buffers; see the upgrade in [`ws_events`].
const READ_BUFFER: usize = 4 * 1024;
const WRITE_BUFFER: usize = 16 * 1024;
/// How long a closing handshake may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

pub mod close_code {
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
}

pub async fn ws_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => return ApiError::bad_request("invalid_query", e.body_text()).into_response(),
    };
    let admission =
        match admission::admit(&state, &headers, &query, None, Transport::WebSocket).await {
            Ok(admission) => admission,
            Err(error) => return error.into_response(),
        };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let tracker = state.stream_tasks.clone();
    upgrade
        // tungstenite's default read buffer is 128 KiB, zero-filled on every
        // read attempt: 132 KiB per idle connection and a CPU cost on every
        // loop. Clients send little; 4 KiB is plenty (BENCHMARKS.md).
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        // Room above the protocol's limit so an oversized message is read
        // whole and answered with 1009 rather than a broken connection.
        .max_message_size(MAX_CLIENT_MESSAGE * 4)
        .max_frame_size(MAX_CLIENT_MESSAGE * 4)
        .on_upgrade(move |socket| tracker.track_future(run_connection(state, admission, socket)))
}

type Sink = SplitSink<WebSocket, Message>;

/// How a connection ended, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    ClientClosed,
    PongTimeout,
    Shutdown,
    Revoked,
    TooBig,
    HubClosed,
}

async fn run_connection(state: AppState, admission: Admission, socket: WebSocket) {
    let Admission {
        filter,
        since,
        slot,
        settings,
    } = admission;
    let key_id = filter.identity.key_id();
    let (session, opening) = StreamSession::open(&state.hub, filter, since);
    let connection_id = session.connection_id;
    tracing::debug!(%connection_id, key_id = ?key_id, "event stream opened (websocket)");
    let (mut sink, stream) = socket.split();
    let pong_timeout = Duration::from_secs(settings.pong_timeout_secs);
    let end = match write_batch(&mut sink, opening, Instant::now() + pong_timeout).await {
        Ok(()) => {
            Connection {
                state: &state,
                session,
                sink,
                stream,
                ping_interval: Duration::from_secs(settings.ping_interval_secs),
                pong_timeout,
            }
            .run()
            .await
        }
        Err(_) => End::ClientClosed,
    };
    if end == End::PongTimeout {
        metrics::counter!("tollgate_stream_pong_timeouts_total").increment(1);
    }
    tracing::debug!(%connection_id, ?end, "event stream closed (websocket)");
    drop(slot);
}

struct Connection<'a> {
    state: &'a AppState,
    session: StreamSession,
    sink: Sink,
    stream: SplitStream<WebSocket>,
    ping_interval: Duration,
    pong_timeout: Duration,
}

impl Connection<'_> {
    async fn run(mut self) -> End {
        let mut pong_deadline = Instant::now() + self.pong_timeout;
        let mut ping =
            tokio::time::interval_at(Instant::now() + self.ping_interval, self.ping_interval);
        let mut credential = CredentialWatch::new(self.state, &self.session.filter.identity);
        let shutdown = self.state.shutdown.clone();
        // One timer for the whole connection, moved on each Pong, rather
        // than a new one registered on every pass through the loop.
        let pong_timer = tokio::time::sleep_until(pong_deadline);
        tokio::pin!(pong_timer);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    // `system.shutdown` was published before the signal; send
                    // everything still queued, then close.
                    let mut queued = Vec::new();
                    while let Ok(Some(out)) = self.session.try_next() {
                        queued.push(out);
                    }
                    let deadline = Instant::now() + CLOSE_GRACE;
                    if write_batch(&mut self.sink, queued, deadline).await.is_ok() {
                        self.close(close_code::GOING_AWAY, "server shutting down").await;
                    }
                    return End::Shutdown;
                }
                _ = &mut pong_timer => {
                    return End::PongTimeout;
                }
                ended = credential.ended() => {
                    self.close(close_code::POLICY_VIOLATION, ended.reason().0).await;
                    return End::Revoked;
                }
                _ = ping.tick() => {
                    if timed_send(&mut self.sink, Message::Ping(Default::default()), pong_deadline).await.is_err() {
                        return End::ClientClosed;
                    }
                }
                message = self.stream.next() => {
                    match message {
                        Some(Ok(Message::Pong(_))) => {
                            pong_deadline = Instant::now() + self.pong_timeout;
                            pong_timer.as_mut().reset(pong_deadline);
                        }
                        Some(Ok(Message::Text(text))) => {
                            if text.len() > MAX_CLIENT_MESSAGE {
                                self.close(close_code::MESSAGE_TOO_BIG, "message larger than 64 KiB").await;
                                return End::TooBig;
                            }
                            let reply = self.client_message(&text);
                            if write_batch(&mut self.sink, vec![reply], pong_deadline).await.is_err() {
                                return End::ClientClosed;
                            }
                        }
                        Some(Ok(Message::Binary(data))) => {
                            if data.len() > MAX_CLIENT_MESSAGE {
                                self.close(close_code::MESSAGE_TOO_BIG, "message larger than 64 KiB").await;
                                return End::TooBig;
                            }
                            let reply = session::error_frame("binary_not_supported", "send JSON text frames");
                            if write_batch(&mut self.sink, vec![reply], pong_deadline).await.is_err() {
                                return End::ClientClosed;
                            }
                        }
                        Some(Ok(Message::Ping(_))) => {} // answered by the WebSocket layer
                        Some(Ok(Message::Close(_))) | None => return End::ClientClosed,
                        Some(Err(error)) => {
                            if is_capacity_error(&error) {
                                self.close(close_code::MESSAGE_TOO_BIG, "message larger than 64 KiB").await;
                                return End::TooBig;
                            }
                            return End::ClientClosed;
                        }
                    }
                }
                next = self.session.next() => {
                    let Ok(first) = next else { return End::HubClosed };
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match self.session.try_next() {
                            Ok(Some(out)) => batch.push(out),
                            Ok(None) => break,
                            Err(_) => return End::HubClosed,
                        }
                    }
                    // A client that cannot take the batch before its pong
                    // deadline is as gone as one that stopped answering.
                    match write_batch(&mut self.sink, batch, pong_deadline).await {
                        Ok(()) => {}
                        Err(WriteError::TimedOut) => return End::PongTimeout,
                        Err(WriteError::Closed) => return End::ClientClosed,
                    }
                }
            }
        }
    }

    /// Answers one client text message.
    fn client_message(&mut self, text: &str) -> Outgoing {
        let value: Value = match serde_json::from_str(text) {
            Ok(value) => value,
            Err(e) => {
                return session::error_frame(
                    "invalid_json",
                    &format!("the message is not JSON: {e}"),
                )
            }
        };
        let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "ping" => session::control("pong", json!({})),
            "subscribe" | "unsubscribe" => {
                let topics = match parse_topics(&value) {
                    Ok(topics) => topics,
                    Err(frame) => return frame,
                };
                let set = &mut self.session.filter.topics;
                for topic in topics {
                    if kind == "subscribe" {
                        set.insert(topic);
                    } else {
                        set.remove(topic);
                    }
                }
                let reply = if kind == "subscribe" {
                    "subscribed"
                } else {
                    "unsubscribed"
                };
                session::topics_frame(reply, &self.session.filter)
            }
            "" => session::error_frame(
                "invalid_message",
                "a message needs a string `type`: subscribe, unsubscribe or ping",
            ),
            other => session::error_frame(
                "unknown_message_type",
                &format!("unknown message type `{other}`; expected subscribe, unsubscribe or ping"),
            ),
        }
    }

    /// Sends a close frame and waits briefly for the client's answer, so the
    /// frames before it are not lost to a reset.
    async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        let deadline = Instant::now() + CLOSE_GRACE;
        if timed_send(&mut self.sink, frame, deadline).await.is_ok() {
            let _ = tokio::time::timeout_at(deadline, async {
                while let Some(Ok(message)) = self.stream.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }
}

/// `topics` of a subscribe/unsubscribe message, every name known.
fn parse_topics(value: &Value) -> Result<Vec<Topic>, Outgoing> {
    let Some(names) = value.get("topics").and_then(Value::as_array) else {
        return Err(session::error_frame(
            "invalid_message",
            "subscribe and unsubscribe need `topics`, a list of topic names",
        ));
    };
    names
        .iter()
        .map(|name| {
            let name = name.as_str().ok_or_else(|| {
                session::error_frame("invalid_message", "topic names are strings")
            })?;
            name.parse::<Topic>()
                .map_err(|e| session::error_frame("unknown_topic", &e.to_string()))
        })
        .collect()
}

fn is_capacity_error(error: &axum::Error) -> bool {
    let text = error.to_string();
    text.contains("Space limit exceeded") || text.contains("too long") || text.contains("Capacity")
}

#[derive(Debug)]
enum WriteError {
    TimedOut,
    Closed,
}

/// Feeds every frame, then flushes once, all before `deadline`.
async fn write_batch(
    sink: &mut Sink,
    frames: Vec<Outgoing>,
    deadline: Instant,
) -> Result<(), WriteError> {
    let count = frames
        .iter()
        .filter(|f| matches!(f, Outgoing::Event(_)))
        .count();
    let write = async {
        for frame in frames {
            sink.feed(Message::Text(frame.json().clone())).await?;
        }
        sink.flush().await
    };
    match tokio::time::timeout_at(deadline, write).await {
        Ok(Ok(())) => {
            metrics::counter!("tollgate_stream_frames_delivered_total", "transport" => "websocket")
                .increment(count as u64);
            Ok(())
        }
        Ok(Err(_)) => Err(WriteError::Closed),
        Err(_) => Err(WriteError::TimedOut),
    }
}

async fn timed_send(
    sink: &mut Sink,
    message: Message,
    deadline: Instant,
) -> Result<(), WriteError> {
    match tokio::time::timeout_at(deadline, sink.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(WriteError::Closed),
        Err(_) => Err(WriteError::TimedOut),
    }
}

//! `GET /ws/events`: the event stream over WebSocket.
//!
//! Each connection is one task that owns its socket. It writes every ready
//! event in one batch and flushes once (a flush per event caps fan-out
//! long before the network does), pings every `ping_interval_secs`, and
//! cuts off a client whose last Pong is older than `pong_timeout_secs`. It
//! answers `subscribe` / `unsubscribe` / `ping` messages, and closes with
//! 1001 after `system.shutdown`, 1008 when its key is revoked or its session
//! ends, and 1009 for a client message over 64 KiB.

use std::pin::Pin;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::SinkExt;
use serde_json::{json, Value};
use tokio::time::{Instant, Sleep};

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
/// A batch smaller than this yields once before it is written.
const SMALL_BATCH: usize = 16;
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
    let pong_timeout = Duration::from_secs(settings.pong_timeout_secs);
    let mut connection = Connection {
        state: &state,
        session,
        socket,
        delivered: metrics::counter!("tollgate_stream_frames_delivered_total", "transport" => "websocket"),
        ping_interval: Duration::from_secs(settings.ping_interval_secs),
        pong_timeout,
    };
    // One timer for the whole connection: the pong deadline, moved on each
    // Pong. Writes race it too, rather than each registering a timer.
    let deadline = tokio::time::sleep(pong_timeout);
    tokio::pin!(deadline);
    let end = match connection.write_batch(opening, deadline.as_mut()).await {
        Ok(()) => connection.run(deadline).await,
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
    /// Not split: reads and writes never overlap (a `select!` branch's
    /// handler runs after the other branches' futures are dropped), and a
    /// split socket pays a lock on every read and write.
    socket: WebSocket,
    delivered: metrics::Counter,
    ping_interval: Duration,
    pong_timeout: Duration,
}

impl Connection<'_> {
    async fn run(mut self, mut deadline: Pin<&mut Sleep>) -> End {
        let mut ping =
            tokio::time::interval_at(Instant::now() + self.ping_interval, self.ping_interval);
        let mut credential = CredentialWatch::new(self.state, &self.session.filter.identity);
        let shutdown = self.state.shutdown.clone();
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
                    let grace = tokio::time::sleep(CLOSE_GRACE);
                    tokio::pin!(grace);
                    if self.write_batch(queued, grace).await.is_ok() {
                        self.close(close_code::GOING_AWAY, "server shutting down").await;
                    }
                    return End::Shutdown;
                }
                _ = deadline.as_mut() => {
                    return End::PongTimeout;
                }
                ended = credential.ended() => {
                    self.close(close_code::POLICY_VIOLATION, ended.reason().0).await;
                    return End::Revoked;
                }
                _ = ping.tick() => {
                    let ping = Message::Ping(Default::default());
                    if self.write([ping], deadline.as_mut()).await.is_err() {
                        return End::ClientClosed;
                    }
                }
                message = self.socket.recv() => {
                    match message {
                        Some(Ok(Message::Pong(_))) => {
                            deadline.as_mut().reset(Instant::now() + self.pong_timeout);
                        }
                        Some(Ok(Message::Text(text))) => {
                            if text.len() > MAX_CLIENT_MESSAGE {
                                self.close(close_code::MESSAGE_TOO_BIG, "message larger than 64 KiB").await;
                                return End::TooBig;
                            }
                            let reply = self.client_message(&text);
                            if self.write_batch(vec![reply], deadline.as_mut()).await.is_err() {
                                return End::ClientClosed;
                            }
                        }
                        Some(Ok(Message::Binary(data))) => {
                            if data.len() > MAX_CLIENT_MESSAGE {
                                self.close(close_code::MESSAGE_TOO_BIG, "message larger than 64 KiB").await;
                                return End::TooBig;
                            }
                            let reply = session::error_frame("binary_not_supported", "send JSON text frames");
                            if self.write_batch(vec![reply], deadline.as_mut()).await.is_err() {
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
                    // A small batch waits one turn of the scheduler for more:
                    // under load, fewer and fuller writes; no timer involved.
                    let mut yielded = false;
                    while batch.len() < MAX_BATCH {
                        match self.session.try_next() {
                            Ok(Some(out)) => batch.push(out),
                            Ok(None) if !yielded && batch.len() < SMALL_BATCH => {
                                yielded = true;
                                tokio::task::yield_now().await;
                            }
                            Ok(None) => break,
                            Err(_) => return End::HubClosed,
                        }
                    }
                    // A client that cannot take the batch before its pong
                    // deadline is as gone as one that stopped answering.
                    match self.write_batch(batch, deadline.as_mut()).await {
                        Ok(()) => {}
                        Err(WriteError::TimedOut) => return End::PongTimeout,
                        Err(WriteError::Closed) => return End::ClientClosed,
                    }
                }
            }
        }
    }

    /// Writes frames (events and control messages), then flushes once,
    /// before `deadline`; counts the events delivered.
    async fn write_batch(
        &mut self,
        frames: Vec<Outgoing>,
        deadline: Pin<&mut Sleep>,
    ) -> Result<(), WriteError> {
        let events = frames
            .iter()
            .filter(|f| matches!(f, Outgoing::Event(_)))
            .count();
        let messages = frames
            .into_iter()
            .map(|frame| Message::Text(frame.json().clone()));
        self.write(messages, deadline).await?;
        self.delivered.increment(events as u64);
        Ok(())
    }

    /// Feeds every message, then flushes once, all before `deadline`.
    async fn write(
        &mut self,
        messages: impl IntoIterator<Item = Message>,
        deadline: Pin<&mut Sleep>,
    ) -> Result<(), WriteError> {
        let socket = &mut self.socket;
        let write = async {
            for message in messages {
                socket.feed(message).await?;
            }
            socket.flush().await
        };
        tokio::select! {
            biased;
            written = write => written.map_err(|_| WriteError::Closed),
            _ = deadline => Err(WriteError::TimedOut),
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
        let grace = tokio::time::sleep(CLOSE_GRACE);
        tokio::pin!(grace);
        if self.write([frame], grace.as_mut()).await.is_ok() {
            let socket = &mut self.socket;
            let _ = tokio::time::timeout_at(grace.deadline(), async {
                while let Some(Ok(message)) = socket.recv().await {
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

//! `GET /ws/events`: the event stream over WebSocket.
//!
//! Each connection is one task that owns its socket. Events leave in
//! batches: every ready event is framed into the connection's write queue
//! (the envelope was serialised once, in the hub, and is shared, not
//! copied; a text frame adds a header of 2–10 bytes) and the queue goes out
//! in one vectored write. A write per event caps fan-out long before the
//! network does, and so does a per-message trip through a general
//! WebSocket sink (BENCHMARKS.md).
//! The protocol itself — client frames, masking, fragmentation, size
//! limits, pong and close replies — is tungstenite's sans-I/O
//! [`WebSocketContext`], fed from the same buffers.
//!
//! The task pings every `ping_interval_secs`, cuts off a client whose last
//! Pong is older than `pong_timeout_secs`, answers `subscribe` /
//! `unsubscribe` / `ping` messages, and closes with 1001 after
//! `system.shutdown`, 1008 when its key is revoked or its session ends,
//! 1009 for a client message over 64 KiB and 1002 for a protocol error.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BytesMut};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{FrameHeader, Utf8Bytes};
use tokio_tungstenite::tungstenite::protocol::{
    CloseFrame, Role, WebSocketConfig, WebSocketContext,
};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::admission::{self, Admission, StreamQuery, StreamSlot, Transport};
use super::credential::CredentialWatch;
use super::model::Topic;
use super::session::{self, Outgoing, StreamSession};
use super::upgrade::{Upgrade, Upgraded};
use crate::error::ApiError;
use crate::ledger::MIN_COMMIT_INTERVAL;
use crate::server::AppState;

/// The largest client message accepted; larger ones close with 1009.
pub const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// A batch stops taking events once this many bytes are waiting, so one
/// busy connection cannot hold its task forever.
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// A batch of fewer frames than this yields once for more before it is
/// written: under load, fewer and fuller writes, with no timer.
const SMALL_BATCH: usize = 16;
/// Under sustained load (this connection wrote within the last
/// [`BUSY_WINDOW`]) a connection woken by events writes them only after its
/// phase: 0 to `SPREAD_SLOTS - 1` ms, by the order connections opened in,
/// taking further events into the batch meanwhile. A burst of events (the
/// ledger publishes a batch at most every [`MIN_COMMIT_INTERVAL`], 20 ms;
/// the phases cover four fifths of it, and a connection that wrote within
/// two intervals counts as busy) then makes the subscribers' writes over
/// several milliseconds instead of all at once,
/// so requests are not queued behind a hundred writes, and each write
/// carries more events. Not when a quarter of the channel is already
/// waiting, and never past [`MAX_BATCH_BYTES`].
const SPREAD_SLOTS: u64 = MIN_COMMIT_INTERVAL.as_millis() as u64 * 4 / 5;
const BUSY_WINDOW: Duration = Duration::from_millis(2 * MIN_COMMIT_INTERVAL.as_millis() as u64);
/// Bytes read from the socket at a time. Clients send little (pongs,
/// subscribe messages); an idle connection keeps this much.
const READ_CHUNK: usize = 2 * 1024;
/// What the protocol layer copies out of `input` per step: memory to
/// memory, so small steps cost little, and its buffer stays this small on
/// an idle connection.
const PROTOCOL_CHUNK: usize = 256;
/// A write buffer that grew past this (a burst) is released after use, so
/// an idle connection does not keep a burst's memory.
const KEEP_WRITE_BUFFER: usize = 16 * 1024;
/// Likewise for the queue of payload references (40 bytes each: an offset
/// and a shared reference).
const KEEP_QUEUED_FRAMES: usize = 256;
/// The most buffers one `writev` takes (Linux's and macOS's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;
/// How long a closing handshake may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

pub mod close_code {
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
}

pub async fn ws_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, QueryRejection>,
    mut request: Request,
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
    let upgrade = match Upgrade::from_request(&mut request) {
        Ok(upgrade) => upgrade,
        Err(refusal) => return refusal.into_response(),
    };
    // Subscribed before the 101 answer: every event published after the
    // handshake reaches the connection, however late its task first runs
    // on the event threads.
    let Admission {
        filter,
        since,
        slot,
        settings,
    } = admission;
    let opened = StreamSession::open(&state.hub, filter, since);
    let tasks = state.stream_tasks.clone();
    upgrade.on_upgrade(&tasks, move |socket| {
        run_connection(state, opened, slot, settings, socket)
    })
}

/// How a connection ended, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    ClientClosed,
    PongTimeout,
    Shutdown,
    Revoked,
    TooBig,
    ProtocolError,
    HubClosed,
}

async fn run_connection(
    state: AppState,
    (session, opening): (StreamSession, Vec<Outgoing>),
    slot: StreamSlot,
    settings: crate::config::WebSocketConfig,
    socket: Upgraded,
) {
    let key_id = session.filter.identity.key_id();
    let connection_id = session.connection_id;
    tracing::debug!(%connection_id, key_id = ?key_id, "event stream opened (websocket)");
    let pong_timeout = Duration::from_secs(settings.pong_timeout_secs);
    let config = WebSocketConfig::default()
        .read_buffer_size(PROTOCOL_CHUNK)
        // Room above the protocol's limit so an oversized message is read
        // whole and answered with 1009 rather than a broken connection.
        .max_message_size(Some(MAX_CLIENT_MESSAGE * 4))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE * 4));
    let mut connection = Connection {
        state: &state,
        session,
        socket,
        protocol: WebSocketContext::new(Role::Server, Some(config)),
        input: BytesMut::new(),
        output: Vec::new(),
        payloads: Vec::new(),
        payload_bytes: 0,
        delivered: metrics::counter!("tollgate_stream_frames_delivered_total", "transport" => "websocket"),
        phase: next_phase(),
        last_write: None,
        ping_interval: Duration::from_secs(settings.ping_interval_secs),
        pong_timeout,
    };
    // One timer for the whole connection: the pong deadline, moved on each
    // Pong. Writes race it too, rather than each registering a timer.
    let deadline = tokio::time::sleep(pong_timeout);
    tokio::pin!(deadline);
    let mut events = 0;
    for out in &opening {
        connection.put(out, &mut events);
    }
    let end = match connection.send(events, deadline.as_mut()).await {
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
    /// handler runs after the other branches' futures are dropped).
    socket: Upgraded,
    /// The WebSocket protocol state, without I/O: it reads client frames
    /// out of `input` and writes its replies (pong, close) into `output`.
    protocol: WebSocketContext,
    /// Bytes read from the socket, not yet taken by `protocol`.
    input: BytesMut,
    /// Bytes waiting to be written, in order: frame headers and the
    /// protocol's own frames; each of `payloads` goes in at its offset.
    output: Vec<u8>,
    /// Text frames' payloads (shared with every other subscriber), each
    /// with the offset in `output` it is written at.
    payloads: Vec<(usize, Utf8Bytes)>,
    /// The payloads' length in all.
    payload_bytes: usize,
    delivered: metrics::Counter,
    /// How long this connection waits before a batch under load.
    phase: Duration,
    /// When this connection last wrote.
    last_write: Option<Instant>,
    ping_interval: Duration,
    pong_timeout: Duration,
}

/// `WebSocketContext`'s byte side: reads what the socket gave, writes into
/// the outgoing buffer. Reading past the end is `WouldBlock`, so the
/// context stops at the last complete frame.
struct Buffers<'a> {
    input: &'a mut BytesMut,
    output: &'a mut Vec<u8>,
}

impl io::Read for Buffers<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input.advance(n);
        Ok(n)
    }
}

impl io::Write for Buffers<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What reading the client's bytes asks the connection to do next.
enum Received {
    /// Keep going (replies, if any, are in `output`).
    Continue,
    /// Close with this code and reason, then end.
    Close(u16, &'static str, End),
    /// The client closed or broke the connection: send what is queued (a
    /// close reply) and end.
    Ended,
}

impl Connection<'_> {
    async fn run(mut self, mut deadline: Pin<&mut Sleep>) -> End {
        let mut ping =
            tokio::time::interval_at(Instant::now() + self.ping_interval, self.ping_interval);
        let mut credential = CredentialWatch::new(self.state, &self.session.filter.identity);
        let shutdown = self.state.shutdown.clone();
        loop {
            self.input.reserve(READ_CHUNK);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    // `system.shutdown` was published before the signal; send
                    // everything still queued, then close.
                    let mut events = 0;
                    while let Ok(Some(out)) = self.session.try_next() {
                        self.put(&out, &mut events);
                    }
                    let grace = tokio::time::sleep(CLOSE_GRACE);
                    tokio::pin!(grace);
                    if self.send(events, grace).await.is_ok() {
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
                    put_header(&mut self.output, OpCode::Control(Control::Ping), 0);
                    if self.send(0, deadline.as_mut()).await.is_err() {
                        return End::ClientClosed;
                    }
                }
                read = self.socket.read_buf(&mut self.input) => {
                    let received = match read {
                        Ok(0) | Err(_) => return End::ClientClosed,
                        Ok(_) => self.receive(deadline.as_mut()),
                    };
                    match received {
                        Received::Continue => {}
                        Received::Close(code, reason, end) => {
                            self.close(code, reason).await;
                            return end;
                        }
                        Received::Ended => {
                            let grace = tokio::time::sleep(CLOSE_GRACE);
                            tokio::pin!(grace);
                            let _ = self.send(0, grace).await;
                            return End::ClientClosed;
                        }
                    }
                    if self.send(0, deadline.as_mut()).await.is_err() {
                        return End::ClientClosed;
                    }
                }
                next = self.session.next() => {
                    let Ok(first) = next else { return End::HubClosed };
                    let mut events = 0;
                    let mut frames = 1;
                    self.put(&first, &mut events);
                    if let Some(wait) = self.spread_wait() {
                        // The write waits for the phase; the events do not:
                        // they are taken as they come, so the channel never
                        // fills meanwhile.
                        let pause = tokio::time::sleep(wait);
                        tokio::pin!(pause);
                        while self.queued_bytes() < MAX_BATCH_BYTES {
                            tokio::select! {
                                biased;
                                _ = &mut pause => break,
                                next = self.session.next() => {
                                    let Ok(out) = next else { return End::HubClosed };
                                    self.put(&out, &mut events);
                                    frames += 1;
                                }
                            }
                        }
                    }
                    let mut yielded = false;
                    while self.queued_bytes() < MAX_BATCH_BYTES {
                        match self.session.try_next() {
                            Ok(Some(out)) => {
                                self.put(&out, &mut events);
                                frames += 1;
                            }
                            Ok(None) if !yielded && frames < SMALL_BATCH => {
                                yielded = true;
                                tokio::task::yield_now().await;
                            }
                            Ok(None) => break,
                            Err(_) => return End::HubClosed,
                        }
                    }
                    // A client that cannot take the batch before its pong
                    // deadline is as gone as one that stopped answering.
                    match self.send(events, deadline.as_mut()).await {
                        Ok(()) => {}
                        Err(WriteError::TimedOut) => return End::PongTimeout,
                        Err(WriteError::Closed) => return End::ClientClosed,
                    }
                }
            }
        }
    }

    /// How long to wait before draining a batch: the connection's phase
    /// while it is busy, nothing when it was idle or has much to send.
    fn spread_wait(&self) -> Option<Duration> {
        spread_wait(self.phase, self.last_write.map(|at| at.elapsed()), || {
            self.session.backlog_is_small()
        })
    }

    /// Queues one outgoing message as a text frame.
    fn put(&mut self, out: &Outgoing, events: &mut u64) {
        let payload = out.json();
        put_header(&mut self.output, OpCode::Data(Data::Text), payload.len());
        self.payloads.push((self.output.len(), payload.clone()));
        self.payload_bytes += payload.len();
        if matches!(out, Outgoing::Event(_)) {
            *events += 1;
        }
    }

    /// Bytes queued for the next write.
    fn queued_bytes(&self) -> usize {
        self.output.len() + self.payload_bytes
    }

    /// Writes the queued frames before `deadline` and counts the `events`
    /// among them as delivered.
    async fn send(&mut self, events: u64, deadline: Pin<&mut Sleep>) -> Result<(), WriteError> {
        if self.queued_bytes() == 0 {
            return Ok(());
        }
        self.last_write = Some(Instant::now());
        let socket = &mut self.socket;
        let mut slices = spliced(&self.output, &self.payloads);
        let write = async {
            write_all_vectored(socket, &mut slices).await?;
            socket.flush().await
        };
        tokio::select! {
            biased;
            written = write => written.map_err(|_| WriteError::Closed)?,
            _ = deadline => return Err(WriteError::TimedOut),
        }
        self.output.clear();
        self.payloads.clear();
        self.payload_bytes = 0;
        if self.output.capacity() > KEEP_WRITE_BUFFER {
            self.output = Vec::new();
        }
        if self.payloads.capacity() > KEEP_QUEUED_FRAMES {
            self.payloads = Vec::new();
        }
        self.delivered.increment(events);
        Ok(())
    }

    /// Takes every complete client message out of `input` and answers it
    /// (into `output`).
    fn receive(&mut self, mut deadline: Pin<&mut Sleep>) -> Received {
        loop {
            let (protocol, mut buffers) = self.protocol_io();
            let message = match protocol.read(&mut buffers) {
                Ok(message) => message,
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(WsError::Capacity(_)) => return too_big(),
                Err(WsError::Protocol(_) | WsError::Utf8(_)) => {
                    return Received::Close(
                        close_code::PROTOCOL_ERROR,
                        "WebSocket protocol error",
                        End::ProtocolError,
                    )
                }
                Err(_) => return Received::Ended,
            };
            match message {
                Message::Pong(_) => {
                    deadline.as_mut().reset(Instant::now() + self.pong_timeout);
                }
                Message::Text(text) => {
                    if text.len() > MAX_CLIENT_MESSAGE {
                        return too_big();
                    }
                    let reply = self.client_message(&text);
                    self.put(&reply, &mut 0);
                }
                Message::Binary(data) => {
                    if data.len() > MAX_CLIENT_MESSAGE {
                        return too_big();
                    }
                    let reply =
                        session::error_frame("binary_not_supported", "send JSON text frames");
                    self.put(&reply, &mut 0);
                }
                // The pong reply is queued by the protocol and flushed below.
                Message::Ping(_) | Message::Frame(_) => {}
                Message::Close(_) => {
                    // The close reply is queued; flushing it ends the context.
                    self.flush_protocol();
                    return Received::Ended;
                }
            }
        }
        self.flush_protocol();
        Received::Continue
    }

    /// The protocol state with its byte side: `input` to read client
    /// frames from, `output` for its replies.
    fn protocol_io(&mut self) -> (&mut WebSocketContext, Buffers<'_>) {
        let buffers = Buffers {
            input: &mut self.input,
            output: &mut self.output,
        };
        (&mut self.protocol, buffers)
    }

    /// Moves anything the protocol queued (pong or close replies) into
    /// `output`.
    fn flush_protocol(&mut self) {
        let (protocol, mut buffers) = self.protocol_io();
        // Writing into memory cannot fail; `ConnectionClosed` after a close
        // reply only says the handshake is over.
        let _ = protocol.flush(&mut buffers);
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
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from_static(reason),
        };
        let (protocol, mut buffers) = self.protocol_io();
        if protocol.close(&mut buffers, Some(frame)).is_err() {
            return;
        }
        let grace = tokio::time::sleep(CLOSE_GRACE);
        tokio::pin!(grace);
        if self.send(0, grace.as_mut()).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout_at(grace.deadline(), async {
            loop {
                self.input.reserve(READ_CHUNK);
                match self.socket.read_buf(&mut self.input).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let (protocol, mut buffers) = self.protocol_io();
                loop {
                    match protocol.read(&mut buffers) {
                        Ok(Message::Close(_)) => return,
                        Ok(_) => {}
                        Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => return,
                    }
                }
            }
        })
        .await;
        let _ = self.socket.shutdown().await;
    }
}

fn too_big() -> Received {
    Received::Close(
        close_code::MESSAGE_TOO_BIG,
        "message larger than 64 KiB",
        End::TooBig,
    )
}

/// The spread's rule: wait `phase` when the last write was less than
/// [`BUSY_WINDOW`] ago and the backlog is small; an idle connection (or
/// one that never wrote) and phase 0 do not wait.
fn spread_wait(
    phase: Duration,
    since_last_write: Option<Duration>,
    backlog_is_small: impl FnOnce() -> bool,
) -> Option<Duration> {
    let busy = since_last_write.is_some_and(|elapsed| elapsed < BUSY_WINDOW);
    (busy && !phase.is_zero() && backlog_is_small()).then_some(phase)
}

/// The next connection's phase (see [`SPREAD_SLOTS`]).
fn next_phase() -> Duration {
    static OPENED: AtomicU64 = AtomicU64::new(0);
    Duration::from_millis(OPENED.fetch_add(1, Ordering::Relaxed) % SPREAD_SLOTS)
}

/// Appends the header of one unmasked, final frame (RFC 6455 §5.2) whose
/// payload of `len` bytes follows it.
fn put_header(output: &mut Vec<u8>, opcode: OpCode, len: usize) {
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    header
        .format(len as u64, output)
        .expect("writing into a Vec cannot fail");
}

/// The queued bytes in order, as buffers for a vectored write: `output`
/// with each payload spliced in at its offset.
fn spliced<'a>(output: &'a [u8], payloads: &'a [(usize, Utf8Bytes)]) -> Vec<IoSlice<'a>> {
    let mut slices = Vec::with_capacity(payloads.len() * 2 + 1);
    let mut at = 0;
    for (offset, payload) in payloads {
        if *offset > at {
            slices.push(IoSlice::new(&output[at..*offset]));
            at = *offset;
        }
        if !payload.is_empty() {
            slices.push(IoSlice::new(payload.as_bytes()));
        }
    }
    if output.len() > at {
        slices.push(IoSlice::new(&output[at..]));
    }
    slices
}

/// Writes every buffer, in order, in as few `writev` calls as the socket
/// takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let window = slices.len().min(MAX_IOVECS);
        let written = writer.write_vectored(&slices[..window]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
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

#[derive(Debug)]
enum WriteError {
    TimedOut,
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_busy_connection_with_a_small_backlog_waits_its_phase() {
        let phase = Duration::from_millis(3);
        let recent = Some(Duration::from_millis(5));
        assert_eq!(spread_wait(phase, recent, || true), Some(phase));
        // Idle: never wrote, or not within the busy window.
        assert_eq!(spread_wait(phase, None, || true), None);
        assert_eq!(spread_wait(phase, Some(BUSY_WINDOW), || true), None);
        // Much waiting already: write now.
        assert_eq!(spread_wait(phase, recent, || false), None);
        // Phase 0 never waits.
        assert_eq!(spread_wait(Duration::ZERO, recent, || true), None);
    }

    #[test]
    fn connections_take_the_phases_in_turn() {
        let phases: Vec<u64> = (0..2 * SPREAD_SLOTS)
            .map(|_| next_phase().as_millis() as u64)
            .collect();
        // Other tests may open connections meanwhile, so look at steps, not
        // values: each phase is below SPREAD_SLOTS and most follow the last.
        assert!(phases.iter().all(|p| *p < SPREAD_SLOTS), "{phases:?}");
        let in_turn = phases
            .windows(2)
            .filter(|w| w[1] == (w[0] + 1) % SPREAD_SLOTS)
            .count();
        assert!(in_turn >= phases.len() / 2, "{phases:?}");
    }

    /// A socket that takes at most `max` bytes per write and records how
    /// many buffers each vectored write was offered.
    struct Trickle {
        written: Vec<u8>,
        max: usize,
        offered: Vec<usize>,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            self.offered.push(bufs.len());
            let mut room = self.max;
            for buf in bufs {
                let n = buf.len().min(room);
                self.written.extend_from_slice(&buf[..n]);
                room -= n;
            }
            std::task::Poll::Ready(Ok(self.max - room))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Queues like a connection does: headers and protocol bytes into
    /// `output`, payloads beside it; returns the bytes a plain buffer
    /// would hold.
    fn queue(
        frames: &[&'static str],
        output: &mut Vec<u8>,
        payloads: &mut Vec<(usize, Utf8Bytes)>,
    ) -> Vec<u8> {
        let mut expected = Vec::new();
        for (i, text) in frames.iter().enumerate() {
            if i == 1 {
                // A pong the protocol queued between two text frames.
                output.extend_from_slice(&[0x8a, 0x00]);
                expected.extend_from_slice(&[0x8a, 0x00]);
            }
            let start = output.len();
            put_header(output, OpCode::Data(Data::Text), text.len());
            expected.extend_from_slice(&output[start..]);
            payloads.push((output.len(), Utf8Bytes::from_static(text)));
            expected.extend_from_slice(text.as_bytes());
        }
        put_header(output, OpCode::Control(Control::Ping), 0);
        expected.extend_from_slice(&[0x89, 0x00]);
        expected
    }

    #[tokio::test]
    async fn queued_frames_are_written_whole_and_in_order_across_partial_writes() {
        let (mut output, mut payloads) = (Vec::new(), Vec::new());
        let long: &'static str = Box::leak("x".repeat(300).into_boxed_str());
        let expected = queue(&["{\"a\":1}", "", long, "{}"], &mut output, &mut payloads);
        assert_eq!(
            &expected[..2],
            &[0x81, 7],
            "a final text frame of 7 bytes first"
        );
        for max in [1, 7, 64, 100_000] {
            let mut socket = Trickle {
                written: Vec::new(),
                max,
                offered: Vec::new(),
            };
            let mut slices = spliced(&output, &payloads);
            write_all_vectored(&mut socket, &mut slices).await.unwrap();
            assert_eq!(socket.written, expected, "at most {max} bytes per write");
            if max == 100_000 {
                assert_eq!(
                    socket.offered.len(),
                    1,
                    "one write when the socket takes it all"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_write_offers_at_most_iov_max_buffers() {
        let (mut output, mut payloads) = (Vec::new(), Vec::new());
        let frames = vec!["{\"type\":\"e\"}"; 1500];
        let expected = queue(&frames, &mut output, &mut payloads);
        let mut socket = Trickle {
            written: Vec::new(),
            max: usize::MAX,
            offered: Vec::new(),
        };
        let mut slices = spliced(&output, &payloads);
        assert!(slices.len() > 2 * MAX_IOVECS);
        write_all_vectored(&mut socket, &mut slices).await.unwrap();
        assert_eq!(socket.written, expected);
        assert_eq!(
            socket.offered,
            [MAX_IOVECS, MAX_IOVECS, slices.len() - 2 * MAX_IOVECS]
        );
    }

    #[tokio::test]
    async fn a_socket_that_takes_nothing_is_an_error() {
        let (mut output, mut payloads) = (Vec::new(), Vec::new());
        queue(&["{}"], &mut output, &mut payloads);
        let mut socket = Trickle {
            written: Vec::new(),
            max: 0,
            offered: Vec::new(),
        };
        let mut slices = spliced(&output, &payloads);
        let error = write_all_vectored(&mut socket, &mut slices)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WriteZero);
    }
}

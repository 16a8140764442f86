//! `tollgate events tail`: the live event stream in a terminal.
//!
//! The tail is an ordinary WebSocket client of `/ws/events` (DESIGN §5). It
//! prints one line per event — local time, type and the key facts of the
//! payload as `k=v` pairs — or, with `--json`, each envelope exactly as it
//! arrived. Control frames (`connected`, `lagged`, `resume_failed`, …) are
//! about the connection, not the gateway, so they go to stderr and never mix
//! with the events on stdout.
//!
//! A stream that drops (the gateway restarted, the network blinked, a read
//! failed) is reopened with exponential backoff and full jitter, passing
//! `since=<the last id printed>`, so the gateway replays exactly what was
//! missed: nothing is shown twice or skipped while the gateway still keeps
//! those events, and a `resume_failed` warning says so when it does not.
//! What retrying cannot fix ends the tail with an error instead: the gateway
//! refusing the upgrade (401, 403, 404, 503 or any other 4xx), the key being
//! revoked while connected (close code 1008), or a gateway that could not be
//! reached at all on the first attempt.
//!
//! [`run`] takes its output streams as arguments, so tests drive it in
//! process; `main.rs` only maps the command line to [`TailOptions`].

use std::fmt::Write as _;
use std::future::Future;
use std::io::{self, Write};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, Request, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use url::Url;

/// Where `tollgate serve` listens with the default configuration.
pub const DEFAULT_URL: &str = "ws://127.0.0.1:8080/ws/events";

/// The path of the stream, added to a base URL that has none.
const STREAM_PATH: &str = "/ws/events";

/// How long opening a connection (TCP and upgrade) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What to tail and how.
#[derive(Debug, Clone)]
pub struct TailOptions {
    /// `ws://`, `wss://`, `http://` or `https://`; a URL without a path gets
    /// `/ws/events`.
    pub url: String,
    /// An API key, sent as `Authorization: Bearer` and never printed.
    pub token: Option<String>,
    /// Topic names; empty = every topic.
    pub topics: Vec<String>,
    /// Event type names; empty = every type.
    pub types: Vec<String>,
    /// Start by replaying the kept events after this id.
    pub since: Option<String>,
    /// Print raw envelopes instead of readable lines.
    pub json: bool,
    /// The first reconnection delay's ceiling; doubled per failed attempt.
    pub initial_backoff: Duration,
    /// The largest reconnection delay's ceiling.
    pub max_backoff: Duration,
    /// Silence after which the tail pings the gateway itself; a second
    /// silence as long counts as a dropped connection.
    pub keepalive: Duration,
}

impl TailOptions {
    pub fn new(url: impl Into<String>) -> TailOptions {
        TailOptions {
            url: url.into(),
            token: None,
            topics: Vec::new(),
            types: Vec::new(),
            since: None,
            json: false,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
            keepalive: Duration::from_secs(45),
        }
    }
}

impl Default for TailOptions {
    fn default() -> Self {
        TailOptions::new(DEFAULT_URL)
    }
}

/// Why the tail stopped without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("invalid URL `{url}`: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "the token cannot be sent in an HTTP header (it contains characters headers do not allow)"
    )]
    InvalidToken,
    /// The gateway answered the upgrade with an HTTP error.
    #[error("the gateway refused the stream: {}", refusal(*.status, .message.as_deref(), .retry_after.as_deref()))]
    Refused {
        status: StatusCode,
        /// The `error.message` of the JSON body, when there was one.
        message: Option<String>,
        retry_after: Option<String>,
    },
    /// Close code 1008: the key was revoked (or expired) while connected.
    #[error(
        "the gateway closed the stream: {reason} (close code 1008); the key is no longer valid"
    )]
    Revoked { reason: String },
    /// The first connection failed; nothing was ever received.
    #[error("cannot connect to {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("cannot write the output")]
    Output(#[source] io::Error),
}

fn refusal(status: StatusCode, message: Option<&str>, retry_after: Option<&str>) -> String {
    let mut text = status.to_string();
    if let Some(message) = message {
        let _ = write!(text, ": {message}");
    }
    if let Some(secs) = retry_after {
        let _ = write!(text, " (retry after {secs} s)");
    }
    text
}

/// Tails until Ctrl-C (then `Ok`) or a fatal error.
pub async fn run<O, E>(options: TailOptions, out: O, err: E) -> Result<(), TailError>
where
    O: Write + Send,
    E: Write + Send,
{
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // Without a signal handler the tail runs until killed.
            std::future::pending::<()>().await;
        }
    };
    run_until(options, out, err, ctrl_c).await
}

/// Tails until `stop` completes (then `Ok`) or a fatal error.
pub async fn run_until<O, E>(
    options: TailOptions,
    out: O,
    err: E,
    stop: impl Future<Output = ()>,
) -> Result<(), TailError>
where
    O: Write + Send,
    E: Write + Send,
{
    let target = Target::new(&options)?;
    let mut tail = Tail {
        target,
        json: options.json,
        keepalive: options.keepalive,
        cursor: options.since.clone(),
        ever_connected: false,
        out,
        err,
    };
    let mut backoff = Backoff::new(options.initial_backoff, options.max_backoff);
    tokio::pin!(stop);
    loop {
        let ended = tokio::select! {
            _ = &mut stop => return Ok(()),
            ended = tail.stream_once() => ended,
        };
        let (reason, connected, refused) = match ended {
            Ended::Fatal(TailError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                // `tollgate events tail | head`: the reader has had enough.
                return Ok(());
            }
            Ended::Fatal(error) => return Err(error),
            Ended::Dropped {
                reason,
                connected,
                refused,
            } => (reason, connected, refused),
        };
        if !tail.ever_connected {
            let hint = if refused {
                "; is the gateway running (`tollgate serve`) at that address?"
            } else {
                ""
            };
            return Err(TailError::Unreachable {
                url: tail.target.display.clone(),
                reason: format!("{reason}{hint}"),
            });
        }
        if connected {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        let resume = match &tail.cursor {
            Some(id) => format!(", resuming after id {id}"),
            None => String::new(),
        };
        let what = if connected {
            "connection lost"
        } else {
            "reconnection failed"
        };
        tail.warn(format_args!(
            "{what}: {reason}; retrying in {:.1} s{resume}",
            delay.as_secs_f64()
        ))?;
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// The stream's URL with its fixed query, and the credential.
struct Target {
    url: Url,
    /// The URL without query or credentials, for messages.
    display: String,
    authorization: Option<HeaderValue>,
}

impl Target {
    fn new(options: &TailOptions) -> Result<Target, TailError> {
        let url = stream_url(&options.url, &options.topics, &options.types)?;
        let mut display = url.clone();
        display.set_query(None);
        let _ = display.set_username("");
        let _ = display.set_password(None);
        let authorization = match options.token.as_deref().map(str::trim) {
            Some(token) if !token.is_empty() => {
                let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| TailError::InvalidToken)?;
                value.set_sensitive(true);
                Some(value)
            }
            _ => None,
        };
        Ok(Target {
            url,
            display: display.to_string(),
            authorization,
        })
    }

    /// The upgrade request, resuming after `cursor`.
    fn request(&self, cursor: Option<&str>) -> Result<Request<()>, tungstenite::Error> {
        let mut url = self.url.clone();
        if let Some(cursor) = cursor {
            url.query_pairs_mut().append_pair("since", cursor);
        }
        let mut request = url.as_str().into_client_request()?;
        if let Some(value) = &self.authorization {
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

/// `--url` as a WebSocket URL of the stream with `topics` and `types` in
/// its query (replacing any given there; `since` is added per connection).
pub fn stream_url(raw: &str, topics: &[String], types: &[String]) -> Result<Url, TailError> {
    let invalid = |reason: String| TailError::InvalidUrl {
        url: raw.to_owned(),
        reason,
    };
    let text = raw.trim();
    let with_scheme = if text.contains("://") {
        text.to_owned()
    } else {
        format!("ws://{text}")
    };
    let mut url = Url::parse(&with_scheme).map_err(|e| invalid(e.to_string()))?;
    let scheme = match url.scheme() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        other => {
            return Err(invalid(format!(
                "unsupported scheme `{other}`; use ws://, wss://, http:// or https://"
            )))
        }
    };
    url.set_scheme(scheme)
        .map_err(|()| invalid("cannot use a WebSocket scheme".into()))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host".into()));
    }
    if url.path().is_empty() || url.path() == "/" {
        url.set_path(STREAM_PATH);
    }
    url.set_fragment(None);
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !matches!(k.as_ref(), "topics" | "types" | "since"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.set_query(None);
    {
        let mut query = url.query_pairs_mut();
        query.extend_pairs(kept);
        for (name, list) in [("topics", topics), ("types", types)] {
            let joined = list
                .iter()
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(",");
            if !joined.is_empty() {
                query.append_pair(name, &joined);
            }
        }
    }
    if url.query() == Some("") {
        url.set_query(None);
    }
    Ok(url)
}

/// How one connection ended.
enum Ended {
    /// Worth reconnecting, if the tail was ever connected. `connected`: the
    /// upgrade had succeeded this time; `refused`: nothing listens there.
    Dropped {
        reason: String,
        connected: bool,
        refused: bool,
    },
    Fatal(TailError),
}

impl From<io::Error> for Ended {
    fn from(e: io::Error) -> Self {
        Ended::Fatal(TailError::Output(e))
    }
}

impl From<TailError> for Ended {
    fn from(e: TailError) -> Self {
        Ended::Fatal(e)
    }
}

struct Tail<O, E> {
    target: Target,
    json: bool,
    keepalive: Duration,
    /// The id of the last event printed (or `--since` before the first).
    cursor: Option<String>,
    ever_connected: bool,
    out: O,
    err: E,
}

impl<O: Write, E: Write> Tail<O, E> {
    /// Opens one connection and prints from it until it ends.
    async fn stream_once(&mut self) -> Ended {
        let request = match self.target.request(self.cursor.as_deref()) {
            Ok(request) => request,
            Err(e) => {
                return Ended::Fatal(TailError::InvalidUrl {
                    url: self.target.display.clone(),
                    reason: e.to_string(),
                })
            }
        };
        let connecting =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request));
        let Ok(connected) = connecting.await else {
            return Ended::Dropped {
                reason: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                connected: false,
                refused: false,
            };
        };
        let socket = match connected {
            Ok((socket, _)) => socket,
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status();
                let error = TailError::Refused {
                    status,
                    message: response.body().as_deref().and_then(error_message),
                    retry_after: response
                        .headers()
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                };
                // Authentication, a disabled stream, a bad filter, a full
                // gateway: asking again will get the same answer.
                if status.is_client_error() || status == StatusCode::SERVICE_UNAVAILABLE {
                    return Ended::Fatal(error);
                }
                return Ended::Dropped {
                    reason: error.to_string(),
                    connected: false,
                    refused: false,
                };
            }
            Err(e) => {
                return Ended::Dropped {
                    reason: describe(&e),
                    connected: false,
                    refused: matches!(&e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::ConnectionRefused),
                }
            }
        };
        self.ever_connected = true;
        let (mut sink, mut stream) = socket.split();
        let mut pinged = false;
        loop {
            let message = match tokio::time::timeout(self.keepalive, stream.next()).await {
                Ok(message) => message,
                Err(_) if !pinged => {
                    pinged = true;
                    if let Err(e) = sink.send(Message::Ping(Default::default())).await {
                        return dropped(describe(&e));
                    }
                    continue;
                }
                Err(_) => {
                    return dropped(format!(
                        "nothing received for {} s, not even a pong",
                        2 * self.keepalive.as_secs()
                    ))
                }
            };
            pinged = false;
            match message {
                Some(Ok(Message::Text(text))) => {
                    if let Err(ended) = self.frame(text.as_str()) {
                        return ended;
                    }
                }
                Some(Ok(Message::Close(frame))) => return closed(frame),
                Some(Ok(_)) => {} // pings are answered by tungstenite
                Some(Err(e)) => return dropped(describe(&e)),
                None => return dropped("the connection closed (1006)".into()),
            }
        }
    }

    /// Prints one server frame.
    fn frame(&mut self, text: &str) -> Result<(), Ended> {
        let Ok(Value::Object(frame)) = serde_json::from_str::<Value>(text) else {
            self.warn(format_args!("ignoring a frame that is not a JSON object"))?;
            return Ok(());
        };
        if let Some(id) = frame.get("id").and_then(Value::as_str) {
            let id = id.to_owned();
            if self.json {
                writeln!(self.out, "{text}")?;
            } else {
                writeln!(self.out, "{}", format_event(&frame))?;
            }
            self.out.flush()?;
            self.cursor = Some(id);
            return Ok(());
        }
        // With nothing printed yet, resume from where this stream began, so
        // a drop before the first event loses nothing either.
        if self.cursor.is_none() && frame.get("type").and_then(Value::as_str) == Some("connected") {
            self.cursor = frame
                .get("payload")
                .and_then(|p| p.get("last_id"))
                .and_then(Value::as_str)
                .map(str::to_owned);
        }
        if self.json {
            writeln!(self.err, "{text}")?;
            self.err.flush()?;
            return Ok(());
        }
        let kind = frame.get("type").and_then(Value::as_str).unwrap_or("");
        let empty = Map::new();
        let payload = frame
            .get("payload")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let field = |name: &str| payload.get(name).map(plain).unwrap_or_default();
        match kind {
            "connected" => {
                let who = match payload.get("identity") {
                    Some(identity) if identity["kind"] == "api_key" => {
                        format!(" as key `{}`", plain(&identity["name"]))
                    }
                    Some(identity) if identity["kind"] == "anonymous" => " anonymously".into(),
                    _ => String::new(),
                };
                writeln!(
                    self.err,
                    "connected to {}{who} (resumed={})",
                    self.target.display,
                    field("resumed")
                )?;
                self.err.flush()?;
            }
            "lagged" => self.warn(format_args!(
                "lagged: missed {} events after id {}; continuing live",
                field("missed"),
                field("resume_from")
            ))?,
            "resume_failed" => self.warn(format_args!(
                "resume_failed: the gateway no longer keeps the events after id {} (oldest kept: {}); \
                 some events were missed, continuing live",
                field("since"),
                field("oldest_available")
            ))?,
            "error" => self.warn(format_args!(
                "the gateway reported an error: {}: {}",
                field("code"),
                field("message")
            ))?,
            // Answers to client commands, which the tail does not send.
            _ => {}
        }
        Ok(())
    }

    fn warn(&mut self, message: std::fmt::Arguments<'_>) -> Result<(), TailError> {
        writeln!(self.err, "warning: {message}")
            .and_then(|()| self.err.flush())
            .map_err(TailError::Output)
    }
}

fn dropped(reason: String) -> Ended {
    Ended::Dropped {
        reason,
        connected: true,
        refused: false,
    }
}

/// A close frame from the gateway: 1008 is final, anything else (1001 on
/// shutdown, …) is worth reconnecting for.
fn closed(frame: Option<CloseFrame>) -> Ended {
    match frame {
        Some(frame) if frame.code == CloseCode::Policy => Ended::Fatal(TailError::Revoked {
            reason: if frame.reason.is_empty() {
                "policy violation".into()
            } else {
                frame.reason.to_string()
            },
        }),
        Some(frame) => {
            let code = u16::from(frame.code);
            dropped(if frame.reason.is_empty() {
                format!("the gateway closed the stream ({code})")
            } else {
                format!("the gateway closed the stream ({code} {})", frame.reason)
            })
        }
        None => dropped("the gateway closed the stream".into()),
    }
}

/// A connection error in words a user can act on.
fn describe(error: &tungstenite::Error) -> String {
    use tungstenite::error::UrlError;
    match error {
        tungstenite::Error::Io(e) => e.to_string(),
        tungstenite::Error::Url(UrlError::TlsFeatureNotEnabled) => {
            "wss:// needs TLS support, which this build of tollgate does not include".into()
        }
        other => other.to_string(),
    }
}

/// `error.message` of a JSON error body (`{"error":{"message":…}}`).
fn error_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?;
    error
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| error.as_str())
        .map(str::to_owned)
}

/// The fields worth a glance, per event type; other types (`system.*`,
/// types newer than this build) show every payload field.
const KEY_FACTS: &[(&str, &[&str])] = &[
    (
        "usage.recorded",
        &[
            "model",
            "provider",
            "key_id",
            "input_tokens",
            "output_tokens",
            "cost_micros",
        ],
    ),
    (
        "audit.request",
        &["status", "method", "path", "model", "latency_ms", "error"],
    ),
    (
        "audit.guardrail_violation",
        &["rule", "category", "action", "direction", "key_id"],
    ),
    ("audit.admin", &["actor", "action", "target"]),
    (
        "budget.threshold_reached",
        &[
            "budget",
            "threshold_percent",
            "spent_micros",
            "limit_micros",
        ],
    ),
    (
        "budget.exceeded",
        &[
            "budget",
            "threshold_percent",
            "spent_micros",
            "limit_micros",
        ],
    ),
    (
        "circuit_breaker.state_changed",
        &["provider", "from", "to", "reason"],
    ),
];

/// One readable line for an event envelope:
/// `17:00:00.123  usage.recorded  model=gpt-4o input_tokens=12 …`.
/// Fields that are null are left out.
pub fn format_event(envelope: &Map<String, Value>) -> String {
    let kind = envelope.get("type").and_then(Value::as_str).unwrap_or("?");
    let time = envelope
        .get("timestamp")
        .and_then(Value::as_str)
        .map(local_time)
        .unwrap_or_else(|| "--:--:--.---".into());
    let mut line = format!("{time}  {kind}");
    let Some(payload) = envelope.get("payload").and_then(Value::as_object) else {
        return line;
    };
    let facts: Vec<(&str, &Value)> = match KEY_FACTS.iter().find(|(t, _)| *t == kind) {
        Some((_, names)) => names
            .iter()
            .filter_map(|name| payload.get(*name).map(|v| (*name, v)))
            .collect(),
        None => payload.iter().map(|(k, v)| (k.as_str(), v)).collect(),
    };
    let mut separator = "  ";
    for (name, value) in facts {
        if value.is_null() {
            continue;
        }
        let _ = write!(line, "{separator}{name}={}", quoted(&plain(value)));
        separator = " ";
    }
    line
}

/// An RFC 3339 timestamp as local `HH:MM:SS.mmm`; unparsable ones as given.
fn local_time(timestamp: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(timestamp) {
        Ok(at) => at
            .with_timezone(&chrono::Local)
            .format("%H:%M:%S%.3f")
            .to_string(),
        Err(_) => timestamp.to_owned(),
    }
}

/// A JSON value as text: strings bare, lists comma-joined (`[]` when
/// empty), objects as JSON.
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "null".into(),
        Value::Array(items) if items.is_empty() => "[]".into(),
        Value::Array(items) => items.iter().map(plain).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Quotes a value that would otherwise break the `k=v` layout.
fn quoted(text: &str) -> String {
    if text.is_empty() || text.contains(|c: char| c.is_whitespace() || c == '"' || c == '=') {
        Value::String(text.to_owned()).to_string()
    } else {
        text.to_owned()
    }
}

/// Exponential backoff with full jitter: attempt `n` waits a random time
/// up to `min(max, initial · 2ⁿ)`.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn ceiling(&self) -> Duration {
        self.initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max)
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rand::thread_rng().gen_range(0..=micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn urls_become_the_stream_url_with_filters() {
        let url = |raw: &str| stream_url(raw, &[], &[]).unwrap().to_string();
        assert_eq!(
            url("ws://127.0.0.1:8080/ws/events"),
            "ws://127.0.0.1:8080/ws/events"
        );
        assert_eq!(
            url("http://gw.example:8080"),
            "ws://gw.example:8080/ws/events"
        );
        assert_eq!(url("https://gw.example/"), "wss://gw.example/ws/events");
        assert_eq!(url("localhost:9000"), "ws://localhost:9000/ws/events");
        assert_eq!(
            url("http://gw/prefix/ws/events"),
            "ws://gw/prefix/ws/events"
        );
        let filtered = stream_url(
            "ws://gw/ws/events?since=1&topics=x&keep=1",
            &names(&["usage", " budget"]),
            &names(&["usage.recorded"]),
        )
        .unwrap();
        assert_eq!(
            filtered.as_str(),
            "ws://gw/ws/events?keep=1&topics=usage%2Cbudget&types=usage.recorded"
        );
        assert!(matches!(
            stream_url("ftp://gw", &[], &[]),
            Err(TailError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn the_request_carries_the_token_as_a_header_and_the_cursor_in_the_query() {
        let mut options = TailOptions::new("http://127.0.0.1:1");
        options.token = Some("gw_live_secret".into());
        let target = Target::new(&options).unwrap();
        let request = target.request(Some("42")).unwrap();
        assert_eq!(request.uri(), "ws://127.0.0.1:1/ws/events?since=42");
        assert_eq!(
            request.headers()[header::AUTHORIZATION],
            "Bearer gw_live_secret"
        );
        assert!(!target.display.contains("secret"));
    }

    #[test]
    fn events_read_as_one_line_of_key_facts() {
        let envelope = json!({
            "id": "7", "type": "audit.request", "topic": "audit",
            "timestamp": "2026-11-27T17:00:00.123Z",
            "payload": {"request_id": "r1", "key_id": null, "method": "POST",
                        "path": "/v1/chat/completions", "model": "gpt 4", "provider": "p",
                        "status": 502, "latency_ms": 31, "stream": false, "error": "upstream_error"}
        });
        let line = format_event(envelope.as_object().unwrap());
        let time = local_time("2026-11-27T17:00:00.123Z");
        assert!(time.ends_with(".123") && time.len() == 12, "{time}");
        assert_eq!(
            line,
            format!("{time}  audit.request  status=502 method=POST path=/v1/chat/completions model=\"gpt 4\" latency_ms=31 error=upstream_error")
        );
        let system = json!({
            "id": "8", "type": "system.config_reloaded", "topic": "system",
            "timestamp": "2026-11-27T17:00:00.123Z",
            "payload": {"changed_sections": ["server", "features"]}
        });
        assert!(format_event(system.as_object().unwrap())
            .ends_with("system.config_reloaded  changed_sections=server,features"));
        let nothing = json!({"type": "system.config_reloaded", "timestamp": "x",
                             "payload": {"changed_sections": []}});
        assert_eq!(
            format_event(nothing.as_object().unwrap()),
            "x  system.config_reloaded  changed_sections=[]"
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_below_the_ceiling() {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let ceiling = backoff.ceiling();
            assert!(backoff.next_delay() <= ceiling);
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(ceilings, [250, 500, 1000, 2000, 4000, 8000, 10000, 10000]);
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(250));
    }

    #[test]
    fn error_bodies_give_their_message() {
        let body = br#"{"error":{"type":"authentication_error","code":"revoked_api_key","message":"the API key has been revoked"}}"#;
        assert_eq!(
            error_message(body).as_deref(),
            Some("the API key has been revoked")
        );
        assert_eq!(error_message(b"<html>"), None);
        let refused = TailError::Refused {
            status: StatusCode::UNAUTHORIZED,
            message: Some("the API key has been revoked".into()),
            retry_after: None,
        };
        assert_eq!(
            refused.to_string(),
            "the gateway refused the stream: 401 Unauthorized: the API key has been revoked"
        );
    }
}

//! `proxy-bench-upstream`: the two helper processes of the proxy-overhead
//! benchmark (`bench/proxy-overhead.sh`, issue 4; DESIGN §8). Not a test.
//!
//! * `serve`: a minimal OpenAI-compatible upstream on 127.0.0.1 that answers
//!   every `POST /v1/chat/completions` at once with the same small chat
//!   completion (with `usage`), so that calling it directly and through the
//!   gateway differ only by what the gateway adds.
//! * `subscribe`: N WebSocket subscribers on the gateway's `/ws/events`
//!   (key from `PROXY_BENCH_TOKEN`; an admin key sees every request). Each
//!   counts the `audit.request` and `usage.recorded` events it receives, an
//!   order-independent checksum of their request ids, and any `lagged`
//!   frame's `missed`. On SIGTERM or SIGINT, or after `--max-secs`, it reads
//!   on until no frame has arrived for `--quiet-ms`, then prints one
//!   `RESULT {json}` line; subscriber 0 can also write the request ids it
//!   saw, so the caller can compare them with the ledger. After the
//!   `connected` frame each subscriber reads its socket directly
//!   (`bench_support/raw_ws.rs`, shared with `events-bench --parse raw`).
//!
//! Everything listens on or connects to 127.0.0.1 only, and every wait is
//! bounded.
//!
//! ```text
//! proxy-bench-upstream serve --listen 127.0.0.1:0
//! PROXY_BENCH_TOKEN=gw_live_… proxy-bench-upstream subscribe \
//!     --url ws://127.0.0.1:8080/ws/events --count 100 --ids-dir /tmp/ids
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use memchr::memmem::Finder;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

#[path = "bench_support/raw_ws.rs"]
mod raw_ws;

/// The one answer: a small, complete chat completion with usage.
const COMPLETION: &[u8] = br#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-upstream","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}"#;

/// Upper bounds, so that nothing can run away.
const MAX_SUBSCRIBERS: usize = 5_000;
const MAX_SECS: u64 = 3_600;

#[derive(Debug, Parser)]
#[command(
    name = "proxy-bench-upstream",
    about = "Upstream and event subscribers for bench/proxy-overhead.sh (see BENCHMARKS.md)"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answer POST /v1/chat/completions with a fixed completion; prints
    /// `LISTENING ADDR` once bound.
    Serve {
        /// Loopback address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Runtime worker threads; 1 runs on the current thread.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Exit by itself after this many seconds.
        #[arg(long, default_value_t = 1800)]
        max_secs: u64,
    },
    /// Open N subscribers on /ws/events and count the request events they
    /// receive (key from the PROXY_BENCH_TOKEN environment variable).
    Subscribe {
        /// The gateway's stream, `ws://127.0.0.1:PORT/ws/events`.
        #[arg(long)]
        url: String,
        /// Number of WebSocket subscribers.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Runtime worker threads; 1 runs on the current thread.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Stop by itself after this many seconds even without a signal.
        #[arg(long, default_value_t = 900)]
        max_secs: u64,
        /// After the stop request, keep reading until no frame arrived for
        /// this long.
        #[arg(long, default_value_t = 1000)]
        quiet_ms: u64,
        /// Write subscriber 0's request ids here (audit-ids.txt,
        /// usage-ids.txt, one per line, in arrival order), and when each
        /// `audit.request` arrived (audit-received.txt: `ID MICROS`, micros
        /// since the Unix epoch).
        #[arg(long)]
        ids_dir: Option<PathBuf>,
    },
}

fn main() {
    let args = Args::parse();
    let result = match args.command {
        Command::Serve {
            listen,
            threads,
            max_secs,
        } => runtime(threads).and_then(|rt| rt.block_on(serve(listen, max_secs))),
        Command::Subscribe {
            url,
            count,
            threads,
            max_secs,
            quiet_ms,
            ids_dir,
        } => runtime(threads)
            .and_then(|rt| rt.block_on(subscribe(url, count, max_secs, quiet_ms, ids_dir))),
    };
    if let Err(error) = result {
        eprintln!("proxy-bench-upstream: error: {error:#}");
        std::process::exit(1);
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads.min(64));
        b
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

async fn serve(listen: std::net::SocketAddr, max_secs: u64) -> anyhow::Result<()> {
    if !listen.ip().is_loopback() {
        bail!("--listen must be a loopback address, not {listen}");
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let app = Router::new().route("/v1/chat/completions", post(completion));
    println!("LISTENING {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let deadline = tokio::time::sleep(Duration::from_secs(max_secs.min(MAX_SECS)));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = deadline => eprintln!("proxy-bench-upstream: --max-secs reached; stopping"),
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
        .await
        .context("server failed")
}

/// Reads the whole request (as a real server does) and answers at once.
async fn completion(_body: Bytes) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::from_static(COMPLETION),
    )
}

/// What one subscriber saw.
#[derive(Debug, Default, Clone, Serialize)]
struct Counts {
    audit_request: u64,
    /// `audit.request` events with status 200.
    audit_request_ok: u64,
    usage_recorded: u64,
    /// Wrapping sum of FNV-1a 64 of each event's request id.
    audit_checksum: u64,
    usage_checksum: u64,
    lagged_frames: u64,
    missed: u64,
    other_frames: u64,
    /// The connection ended before the stop request.
    closed_early: bool,
    #[serde(skip)]
    audit_ids: Vec<String>,
    /// When each of `audit_ids` arrived: microseconds since the Unix epoch
    /// (the wall clock, which the ledger's `at` is taken from as well).
    #[serde(skip)]
    audit_received_us: Vec<i64>,
    #[serde(skip)]
    usage_ids: Vec<String>,
}

#[derive(Debug, Serialize)]
struct MinMax {
    min: u64,
    max: u64,
    sum: u64,
}

fn min_max(values: impl Iterator<Item = u64> + Clone) -> MinMax {
    MinMax {
        min: values.clone().min().unwrap_or(0),
        max: values.clone().max().unwrap_or(0),
        sum: values.sum(),
    }
}

#[derive(Debug, Serialize)]
struct Report {
    subscribers: usize,
    connected: usize,
    closed_early: usize,
    audit_request: MinMax,
    audit_request_ok: MinMax,
    usage_recorded: MinMax,
    /// Every subscriber saw the same request ids (same count and checksum).
    same_audit_ids: bool,
    same_usage_ids: bool,
    audit_checksum: String,
    usage_checksum: String,
    lagged_frames: u64,
    missed: u64,
    other_frames: u64,
    /// Seconds from the stop request to the end of the quiet period.
    drain_secs: f64,
}

async fn subscribe(
    url: String,
    count: usize,
    max_secs: u64,
    quiet_ms: u64,
    ids_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    if !url.starts_with("ws://127.0.0.1:") {
        bail!("--url must be a loopback ws://127.0.0.1:… address");
    }
    if count == 0 || count > MAX_SUBSCRIBERS {
        bail!("--count must be between 1 and {MAX_SUBSCRIBERS}");
    }
    let token = std::env::var("PROXY_BENCH_TOKEN").ok();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let started = Instant::now();
    // Nanoseconds since `started` of the last frame any subscriber read.
    let last_frame = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let mut request = url.as_str().into_client_request().context("bad --url")?;
        if let Some(token) = &token {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .context("PROXY_BENCH_TOKEN is not a valid header value")?;
            request.headers_mut().insert("authorization", value);
        }
        let connect = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(request),
        );
        let (mut ws, _) = connect
            .await
            .with_context(|| format!("subscriber {index}: connecting timed out"))?
            .with_context(|| format!("subscriber {index}: cannot connect"))?;
        // The first frame is `connected`: the subscription is live after it.
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if text.contains("\"connected\"") => {}
            other => bail!("subscriber {index}: expected a `connected` frame, got {other:?}"),
        }
        let keep_ids = index == 0 && ids_dir.is_some();
        tasks.push(tokio::spawn(read_events(
            ws,
            keep_ids,
            stop.clone(),
            last_frame.clone(),
            started,
        )));
    }
    println!("READY {count}");
    std::io::stdout().flush()?;

    let deadline = tokio::time::sleep(Duration::from_secs(max_secs.min(MAX_SECS)));
    tokio::select! {
        _ = deadline => eprintln!("proxy-bench-upstream: --max-secs reached; stopping"),
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    // Drain: stop only once no frame has arrived for `quiet_ms` (bounded).
    let stop_requested = Instant::now();
    let quiet = Duration::from_millis(quiet_ms);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let last = Duration::from_nanos(last_frame.load(Ordering::Relaxed));
        let since_last = started.elapsed().saturating_sub(last);
        if since_last >= quiet || stop_requested.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    let drain_secs = stop_requested.elapsed().as_secs_f64();
    stop.cancel();
    let mut all = Vec::with_capacity(count);
    for task in tasks {
        all.push(task.await.context("a subscriber task panicked")?);
    }
    if let (Some(dir), Some(first)) = (&ids_dir, all.first()) {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("audit-ids.txt"), lines(&first.audit_ids))?;
        std::fs::write(dir.join("usage-ids.txt"), lines(&first.usage_ids))?;
        let mut received = String::with_capacity(first.audit_ids.len() * 54);
        for (id, at) in first.audit_ids.iter().zip(&first.audit_received_us) {
            received.push_str(&format!("{id} {at}\n"));
        }
        std::fs::write(dir.join("audit-received.txt"), received)?;
    }
    let first = all[0].clone();
    let report = Report {
        subscribers: count,
        connected: all.len(),
        closed_early: all.iter().filter(|c| c.closed_early).count(),
        audit_request: min_max(all.iter().map(|c| c.audit_request)),
        audit_request_ok: min_max(all.iter().map(|c| c.audit_request_ok)),
        usage_recorded: min_max(all.iter().map(|c| c.usage_recorded)),
        same_audit_ids: all.iter().all(|c| {
            c.audit_request == first.audit_request && c.audit_checksum == first.audit_checksum
        }),
        same_usage_ids: all.iter().all(|c| {
            c.usage_recorded == first.usage_recorded && c.usage_checksum == first.usage_checksum
        }),
        audit_checksum: format!("{:016x}", first.audit_checksum),
        usage_checksum: format!("{:016x}", first.usage_checksum),
        lagged_frames: all.iter().map(|c| c.lagged_frames).sum(),
        missed: all.iter().map(|c| c.missed).sum(),
        other_frames: all.iter().map(|c| c.other_frames).sum(),
        drain_secs,
    };
    println!("RESULT {}", serde_json::to_string(&report)?);
    std::io::stdout().flush()?;
    Ok(())
}

fn lines(ids: &[String]) -> String {
    let mut out = String::with_capacity(ids.len() * 37);
    for id in ids {
        out.push_str(id);
        out.push('\n');
    }
    out
}

/// One subscriber: reads its socket directly (`raw_ws`), so the 100
/// subscribers cost the shared CPU as little as a client can.
async fn read_events(
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    keep_ids: bool,
    stop: CancellationToken,
    last_frame: Arc<AtomicU64>,
    started: Instant,
) -> Counts {
    let mut counts = Counts::default();
    let MaybeTlsStream::Plain(mut tcp) = ws.into_inner() else {
        counts.closed_early = true;
        return counts;
    };
    let end = raw_ws::read_frames(&mut tcp, stop.cancelled(), |seen| {
        match seen {
            raw_ws::Seen::Read => {
                last_frame.store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            raw_ws::Seen::Text(payload) => count_frame(payload, keep_ids, &mut counts),
            raw_ws::Seen::Other => counts.other_frames += 1,
        }
        false
    })
    .await;
    counts.closed_early = end == raw_ws::RawEnd::Closed && !stop.is_cancelled();
    counts
}

/// Classifies one frame by scanning the server's compact JSON (serde's
/// field order: `id`, `type`, `topic`, `timestamp`, `payload`) with
/// prebuilt substring finders, which is far cheaper than parsing it, so the
/// subscribers take little of the CPU the gateway is measured on. The
/// fields read are ASCII, so the bytes are not checked as UTF-8 first.
fn count_frame(text: &[u8], keep_ids: bool, counts: &mut Counts) {
    static TYPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\":\""));
    static REQUEST_ID: LazyLock<Finder<'static>> =
        LazyLock::new(|| Finder::new(b"\"request_id\":\""));
    static STATUS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"status\":"));
    static MISSED: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"missed\":"));
    let Some(kind) = string_field(text, &TYPE) else {
        counts.other_frames += 1;
        return;
    };
    match kind {
        b"audit.request" | b"usage.recorded" => {
            let id = string_field(text, &REQUEST_ID).unwrap_or(b"");
            let hash = fnv1a(id);
            let id = || String::from_utf8_lossy(id).into_owned();
            if kind == b"audit.request" {
                counts.audit_request += 1;
                counts.audit_checksum = counts.audit_checksum.wrapping_add(hash);
                if number_field(text, &STATUS) == Some(200) {
                    counts.audit_request_ok += 1;
                }
                if keep_ids {
                    counts.audit_ids.push(id());
                    counts
                        .audit_received_us
                        .push(chrono::Utc::now().timestamp_micros());
                }
            } else {
                counts.usage_recorded += 1;
                counts.usage_checksum = counts.usage_checksum.wrapping_add(hash);
                if keep_ids {
                    counts.usage_ids.push(id());
                }
            }
        }
        b"lagged" => {
            counts.lagged_frames += 1;
            counts.missed += number_field(text, &MISSED).unwrap_or(0);
        }
        _ => counts.other_frames += 1,
    }
}

/// The string after the first `"name":"` (the finder's needle), up to the
/// next quote.
fn string_field<'a>(text: &'a [u8], field: &Finder<'_>) -> Option<&'a [u8]> {
    let start = field.find(text)? + field.needle().len();
    let end = memchr::memchr(b'"', &text[start..])? + start;
    Some(&text[start..end])
}

/// The unsigned integer after the first `"name":` (the finder's needle).
fn number_field(text: &[u8], field: &Finder<'_>) -> Option<u64> {
    let start = field.find(text)? + field.needle().len();
    let digits = &text[start..];
    let end = digits
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_counted_by_type_with_their_request_ids() {
        let mut counts = Counts::default();
        let audit = br#"{"id":"7","type":"audit.request","topic":"audit","timestamp":"2026-11-28T00:00:00.000Z","payload":{"request_id":"req_a","key_id":null,"status":200,"latency_ms":1}}"#;
        let failed = br#"{"id":"8","type":"audit.request","topic":"audit","timestamp":"2026-11-28T00:00:00.000Z","payload":{"request_id":"req_b","status":502}}"#;
        let usage = br#"{"id":"9","type":"usage.recorded","topic":"usage","timestamp":"2026-11-28T00:00:00.000Z","payload":{"request_id":"req_a","input_tokens":12}}"#;
        let lagged = br#"{"type":"lagged","missed":42}"#;
        for frame in [
            &audit[..],
            failed,
            usage,
            lagged,
            br#"{"type":"pong"}"#,
            b"not json",
        ] {
            count_frame(frame, true, &mut counts);
        }
        assert_eq!((counts.audit_request, counts.audit_request_ok), (2, 1));
        assert_eq!(counts.usage_recorded, 1);
        assert_eq!(counts.audit_ids, ["req_a", "req_b"]);
        let now = chrono::Utc::now().timestamp_micros();
        assert_eq!(counts.audit_received_us.len(), 2);
        assert!(counts
            .audit_received_us
            .iter()
            .all(|at| (now - 5_000_000..=now).contains(at)));
        assert_eq!(counts.usage_ids, ["req_a"]);
        assert_eq!(
            counts.audit_checksum,
            fnv1a(b"req_a").wrapping_add(fnv1a(b"req_b"))
        );
        assert_eq!(counts.usage_checksum, fnv1a(b"req_a"));
        assert_eq!((counts.lagged_frames, counts.missed), (1, 42));
        assert_eq!(counts.other_frames, 2);
    }
}

//! `events-bench`: load tool for the live event stream (issue 3, point 10;
//! DESIGN §8). Not a test: it measures, it does not assert.
//!
//! It starts the real server code (`tollgate::server::Server`) in this
//! process on 127.0.0.1:0, on its own multi-threaded runtime, with a SQLite
//! database in a fresh temporary directory, and then runs one of two
//! benchmarks:
//!
//! * **fan-out** (default): N real WebSocket subscribers on `/ws/events`
//!   (each waits for its `connected` frame and reads in its own task), while
//!   a publisher thread calls `hub.publish` R times a second for D seconds
//!   with envelopes of about S bytes. Each payload carries its publish time
//!   (CLOCK_MONOTONIC nanoseconds, shared by every process on the machine),
//!   so every received frame yields one publish→receive latency. Reports
//!   delivered events/s, latency p50/p99/max, events lost (counting the
//!   `missed` of `lagged` frames), lagged frames, server RSS and CPU.
//! * **idle memory** (`--idle N`): N idle WebSocket connections; reports the
//!   server's RSS growth per connection.
//!
//! By default the clients run in a child process (this same executable
//! re-executed with `--client-only`), so the server's RSS and CPU are its
//! own; `--in-process` keeps them in this process instead.
//!
//! Every loop is bounded in count and time; all traffic is on 127.0.0.1.
//!
//! ```text
//! cargo run --release --bin events-bench -- --subscribers 100 --rate 1000 --duration 10
//! cargo run --release --bin events-bench -- --subscribers 1000 --rate 2000 --duration 20 --size 300
//! cargo run --release --bin events-bench -- --idle 10000
//! ```

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[path = "bench_support/raw_ws.rs"]
mod raw_ws;

use tollgate::config::Config;
use tollgate::events::model::AdminAction;
use tollgate::events::EventHub;
use tollgate::server::{AppState, Server};

/// Longest run allowed for any phase, so nothing can run away.
const MAX_DURATION_SECS: u64 = 60;
/// Upper bound on connections this tool will open.
const MAX_CONNECTIONS: usize = 50_000;
/// File descriptors a process needs besides its sockets.
const FD_HEADROOM: u64 = 128;
/// Marks the benchmark's own events (`action` of the `audit.admin` payload).
const ACTION_EVENT: &str = "bench.event";
const ACTION_PROBE: &str = "bench.probe";
const ACTION_END: &str = "bench.end";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
enum Parse {
    /// serde into a borrowed struct (id, type, payload.action/target/missed):
    /// what a typed Rust client does.
    Typed,
    /// `serde_json::Value`, like a browser's `JSON.parse`.
    Value,
    /// Substring scan for the id and timestamp only, still through
    /// tokio-tungstenite: the cheapest real WebSocket client.
    Scan,
    /// After the handshake, read the socket directly and split WebSocket
    /// frames by hand (scan per frame, one clock read per socket read, one
    /// timer per subscriber): as little client CPU as possible, so that on
    /// a machine shared with the clients the server is what is measured.
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ClientMode {
    Fanout,
    Idle,
}

#[derive(Debug, Parser)]
#[command(
    name = "events-bench",
    about = "Fan-out and idle-memory benchmark of tollgate's /ws/events (see BENCHMARKS.md)"
)]
struct Args {
    /// Fan-out: number of WebSocket subscribers.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Fan-out: events published per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Fan-out: seconds of publishing (at most 60).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Fan-out: approximate size of each event's JSON envelope, in bytes.
    #[arg(long, default_value_t = 300)]
    size: usize,
    /// `[features.websocket] channel_capacity` of the server.
    #[arg(long, default_value_t = 1024)]
    channel_capacity: u64,
    /// `[features.websocket] history_size` of the server.
    #[arg(long, default_value_t = 1024)]
    history_size: u64,
    /// How a subscriber parses each frame.
    #[arg(long, value_enum, default_value_t = Parse::Typed)]
    parse: Parse,
    /// Run the clients in this process instead of a child process (their
    /// memory and CPU then count as the server's).
    #[arg(long)]
    in_process: bool,
    /// Worker threads of the server's runtime.
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    /// `[server] event_threads` of the server (0: one per four CPUs).
    #[arg(long, default_value_t = tollgate::config::ServerConfig::default().event_threads)]
    event_threads: u32,
    /// `[server] event_thread_nice` of the server.
    #[arg(long, default_value_t = tollgate::config::ServerConfig::default().event_thread_nice)]
    event_thread_nice: u8,
    /// Worker threads of the clients' runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// WebSocket handshakes in flight at once while connecting.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Idle-memory mode: open this many idle connections and report the
    /// server's RSS growth per connection.
    #[arg(long)]
    idle: Option<usize>,
    /// Idle mode: connections are opened in this many equal steps, RSS
    /// measured after each (the slope between steps excludes one-time costs).
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Idle mode: seconds to wait after each step before reading RSS.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// Pin the server process (server runtime and publisher) to CPU 0 and
    /// the client process to CPU 1, so each side has one core and the
    /// report shows which one runs out.
    #[arg(long)]
    pin: bool,
    /// Before starting, wait up to this many seconds for the machine to be
    /// quiet (under 0.25 cores busy over 2 s), so other work on it does not
    /// disturb the measurement. 0: start at once.
    #[arg(long, default_value_t = 0)]
    wait_quiet: u64,
    /// Print one machine-readable `SUMMARY {json}` line at the end.
    #[arg(long)]
    json: bool,

    // The child process's side of the re-exec; not for direct use.
    #[arg(long, hide = true)]
    client_only: bool,
    #[arg(long, hide = true)]
    url: Option<String>,
    #[arg(long, hide = true, value_enum, default_value_t = ClientMode::Fanout)]
    client_mode: ClientMode,
    #[arg(long, hide = true, default_value_t = 90)]
    deadline_secs: u64,
    #[arg(long, hide = true)]
    pin_cpu: Option<usize>,
}

fn main() {
    let args = Args::parse();
    let result = if args.client_only {
        client_main(&args)
    } else {
        validate(&args)
            .and_then(|()| {
                wait_quiet(args.wait_quiet);
                if args.pin {
                    pin_to_cpu(0)?;
                }
                Ok(())
            })
            .and_then(|()| match args.idle {
                Some(n) => idle_main(&args, n),
                None => fanout_main(&args),
            })
    };
    if let Err(error) = result {
        eprintln!("events-bench: error: {error:#}");
        std::process::exit(1);
    }
}

fn validate(args: &Args) -> anyhow::Result<()> {
    if args.duration == 0 || args.duration > MAX_DURATION_SECS {
        bail!("--duration must be 1..={MAX_DURATION_SECS} seconds");
    }
    if args.rate == 0 || args.rate > 1_000_000 {
        bail!("--rate must be 1..=1000000 events/s");
    }
    let n = args.idle.unwrap_or(args.subscribers);
    if n == 0 || n > MAX_CONNECTIONS {
        bail!("the number of connections must be 1..={MAX_CONNECTIONS}");
    }
    if args.size > 1 << 20 {
        bail!("--size is at most 1 MiB");
    }
    if args.steps == 0 || args.steps > 100 || args.settle > 30 {
        bail!("--steps must be 1..=100 and --settle at most 30");
    }
    if args.pin && args.in_process {
        bail!("--pin needs the clients in their own process (drop --in-process)");
    }
    if args.connect_concurrency == 0 || args.server_threads == 0 || args.client_threads == 0 {
        bail!("thread counts and --connect-concurrency must be at least 1");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Process facts: clock, RSS, CPU, file-descriptor limit.

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of the
/// machine, so a child can compare its receive time with the parent's
/// publish time.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// This process's memory from /proc/self/status, in KiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Memory {
    rss_kib: u64,
    rss_anon_kib: u64,
    hwm_kib: u64,
}

fn memory() -> Memory {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: field("VmRSS:"),
        rss_anon_kib: field("RssAnon:"),
        hwm_kib: field("VmHWM:"),
    }
}

/// User and system CPU seconds of this process (or thread).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Cpu {
    user: f64,
    sys: f64,
}

impl Cpu {
    fn total(self) -> f64 {
        self.user + self.sys
    }

    fn since(self, start: Cpu) -> Cpu {
        Cpu {
            user: self.user - start.user,
            sys: self.sys - start.sys,
        }
    }
}

impl std::fmt::Display for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} s (user {:.2}, sys {:.2})",
            self.total(),
            self.user,
            self.sys
        )
    }
}

fn cpu_seconds(who: libc::c_int) -> Cpu {
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is valid and writable.
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return Cpu::default();
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Cpu {
        user: tv(usage.ru_utime),
        sys: tv(usage.ru_stime),
    }
}

/// Machine-wide CPU time from /proc/stat, in seconds: (busy, total).
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let total: f64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0);
    ((total - idle) / hz, total / hz)
}

/// Cores the whole machine was busy between two [`machine_cpu`] samples,
/// and cores available (the total).
fn machine_busy_cores(start: (f64, f64), end: (f64, f64), wall_secs: f64) -> (f64, f64) {
    ((end.0 - start.0) / wall_secs, (end.1 - start.1) / wall_secs)
}

/// Waits (at most `limit_secs`) until the machine is nearly idle.
fn wait_quiet(limit_secs: u64) {
    if limit_secs == 0 {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(limit_secs.min(1800));
    loop {
        let start = machine_cpu();
        std::thread::sleep(Duration::from_secs(2));
        let (busy, _) = machine_busy_cores(start, machine_cpu(), 2.0);
        if busy < 0.25 {
            eprintln!("events-bench: machine quiet ({busy:.2} cores busy); starting");
            return;
        }
        if Instant::now() >= deadline {
            eprintln!("events-bench: machine still busy ({busy:.2} cores) after {limit_secs} s; starting anyway");
            return;
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Restricts this process (and the threads it creates afterwards) to one CPU.
fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if cpus < 2 {
        bail!("--pin needs at least 2 CPUs; this machine has {cpus}");
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
    // sched_setaffinity only read and write that set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity(CPU {cpu}) failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit and checks that
/// `needed` descriptors fit.
fn raise_nofile(needed: u64, who: &str) -> anyhow::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-parameter.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let soft: u64 = limit.rlim_cur;
    if soft < needed {
        bail!(
            "the {who} needs about {needed} open files but RLIMIT_NOFILE allows {soft} \
             (hard limit {}); raise the hard limit (e.g. `ulimit -Hn {needed}` as root, \
             `docker run --ulimit nofile={needed}`, or /etc/security/limits.conf) \
             or use fewer connections",
            limit.rlim_max
        );
    }
    Ok(soft)
}

// ---------------------------------------------------------------------------
// Latency histogram: log-linear, 64 sub-buckets per power of two (relative
// error under 1.6 %), exact below 128 µs. Values in microseconds.

const HIST_LINEAR: u64 = 128;
const HIST_SUB_BITS: u32 = 6;
const HIST_MAX_EXP: u32 = 31;
const HIST_BUCKETS: usize =
    HIST_LINEAR as usize + (((HIST_MAX_EXP - 7 + 1) as usize) << HIST_SUB_BITS);

#[derive(Debug, Clone)]
struct Histogram {
    counts: Vec<u32>,
    total: u64,
    max: u64,
    sum: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; HIST_BUCKETS],
            total: 0,
            max: 0,
            sum: 0,
        }
    }
}

impl Histogram {
    fn index(value: u64) -> usize {
        let value = value.min((1u64 << (HIST_MAX_EXP + 1)) - 1);
        if value < HIST_LINEAR {
            return value as usize;
        }
        let exp = 63 - value.leading_zeros(); // ≥ 7
        let sub = (value >> (exp - HIST_SUB_BITS)) & ((1 << HIST_SUB_BITS) - 1);
        HIST_LINEAR as usize + (((exp - 7) as usize) << HIST_SUB_BITS) + sub as usize
    }

    /// The largest value that falls in bucket `index`.
    fn upper(index: usize) -> u64 {
        if (index as u64) < HIST_LINEAR {
            return index as u64;
        }
        let rest = index - HIST_LINEAR as usize;
        let exp = (rest >> HIST_SUB_BITS) as u32 + 7;
        let sub = (rest & ((1 << HIST_SUB_BITS) - 1)) as u64;
        let width = 1u64 << (exp - HIST_SUB_BITS);
        (((1 << HIST_SUB_BITS) + sub) << (exp - HIST_SUB_BITS)) + width - 1
    }

    fn record(&mut self, value: u64) {
        self.counts[Self::index(value)] += 1;
        self.total += 1;
        self.max = self.max.max(value);
        self.sum += value;
    }

    /// The value at percentile `p` (0–100): the upper edge of its bucket,
    /// never above the exact maximum.
    fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count as u64;
            if seen >= rank {
                return Self::upper(index).min(self.max);
            }
        }
        self.max
    }

    /// How many recorded values exceed `limit`.
    fn count_above(&self, limit: u64) -> u64 {
        let start = Self::index(limit) + 1;
        self.counts[start.min(self.counts.len())..]
            .iter()
            .map(|&c| c as u64)
            .sum()
    }

    fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    fn to_sparse(&self) -> SparseHistogram {
        SparseHistogram {
            buckets: self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| (i as u32, c))
                .collect(),
            total: self.total,
            max: self.max,
            sum: self.sum,
        }
    }

    fn from_sparse(sparse: &SparseHistogram) -> Histogram {
        let mut histogram = Histogram::default();
        for &(index, count) in &sparse.buckets {
            if let Some(slot) = histogram.counts.get_mut(index as usize) {
                *slot += count;
            }
        }
        histogram.total = sparse.total;
        histogram.max = sparse.max;
        histogram.sum = sparse.sum;
        histogram
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SparseHistogram {
    buckets: Vec<(u32, u32)>,
    total: u64,
    max: u64,
    sum: u64,
}

// ---------------------------------------------------------------------------
// The server, in this process.

struct RunningServer {
    runtime: tokio::runtime::Runtime,
    state: AppState,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    dir: PathBuf,
}

impl RunningServer {
    fn start(args: &Args) -> anyhow::Result<RunningServer> {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-events-bench-{}-{}",
            std::process::id(),
            mono_ns()
        ));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".to_owned();
        config.server.shutdown_timeout_secs = 5;
        config.server.node_name = Some("events-bench".to_owned());
        config.server.event_threads = args.event_threads;
        config.server.event_thread_nice = args.event_thread_nice;
        config.database.url = format!("sqlite://{}", dir.join("bench.db").display());
        let ws = &mut config.features.websocket;
        ws.enabled = true;
        ws.require_auth = false;
        ws.max_connections = 0;
        ws.channel_capacity = args.channel_capacity;
        ws.history_size = args.history_size;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.server_threads)
            .thread_name("server")
            .enable_all()
            .build()
            .context("cannot build the server runtime")?;
        let server = runtime
            .block_on(Server::bind(config, None))
            .context("cannot start the server")?;
        let url = format!("ws://{}/ws/events", server.local_addr());
        let state = server.state().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = runtime.spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Ok(RunningServer {
            runtime,
            state,
            url,
            stop: Some(stop),
            task: Some(task),
            dir,
        })
    }

    fn hub(&self) -> &EventHub {
        &self.state.hub
    }

    fn open_streams(&self) -> u64 {
        self.state.stream_slots.open()
    }

    /// Waits until the server counts `count` open streams (or fewer, with
    /// `at_most`), up to `limit`.
    fn wait_open(&self, count: u64, at_most: bool, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let open = self.open_streams();
            if (at_most && open <= count) || (!at_most && open >= count) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = self
                .runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(15), task).await });
            match result {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => eprintln!("events-bench: server ended with an error: {e:#}"),
                Ok(Err(e)) => eprintln!("events-bench: server task failed: {e}"),
                Err(_) => eprintln!("events-bench: server did not stop within 15 s"),
            }
        }
        self.runtime.shutdown_timeout(Duration::from_secs(5));
        remove_dir(&self.dir);
    }
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("events-bench: cannot remove {}: {e}", dir.display());
    }
}

/// The server's Prometheus counters, summed over labels.
fn server_counter(name: &str) -> u64 {
    let Some(handle) = tollgate::metrics::install() else {
        return 0;
    };
    handle
        .render()
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

// ---------------------------------------------------------------------------
// Clients: in this process or in a child.

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn client_runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("client")
        .enable_all()
        .build()
        .context("cannot build the client runtime")
}

/// Opens one subscriber and waits for its `connected` frame.
async fn connect_one(url: &str) -> anyhow::Result<Ws> {
    let limit = Duration::from_secs(20);
    let (mut ws, _) = tokio::time::timeout(limit, tokio_tungstenite::connect_async(url))
        .await
        .context("handshake timed out")??;
    let first = tokio::time::timeout(limit, ws.next())
        .await
        .context("no `connected` frame in time")?
        .context("closed before `connected`")??;
    let Message::Text(text) = first else {
        bail!("first frame is not text: {first:?}");
    };
    let value: serde_json::Value = serde_json::from_str(text.as_str())?;
    if value["type"] != "connected" {
        bail!("first frame is not `connected`: {text}");
    }
    Ok(ws)
}

/// Opens `count` subscribers, `concurrency` handshakes at a time. Returns
/// the open sockets and the errors of those that failed.
async fn connect_many(url: &str, count: usize, concurrency: usize) -> (Vec<Ws>, Vec<String>) {
    let results: Vec<anyhow::Result<Ws>> = futures::stream::iter(0..count)
        .map(|_| connect_one(url))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut open = Vec::with_capacity(count);
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(ws) => open.push(ws),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    (open, errors)
}

/// What the subscribers saw, summed; sent from a child as JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ClientReport {
    subscribers: u64,
    connect_failures: u64,
    first_connect_error: Option<String>,
    /// Benchmark events received (all subscribers).
    events: u64,
    lagged_frames: u64,
    /// Sum of `missed` over `lagged` frames.
    missed: u64,
    /// Frames that were neither benchmark events nor `lagged`.
    other_frames: u64,
    /// Events whose id was not above the previous one's.
    out_of_order: u64,
    /// Subscribers that received the end marker.
    saw_end: u64,
    /// Subscribers whose connection ended before the end marker.
    closed_early: u64,
    /// Subscribers still waiting at the deadline.
    timed_out: u64,
    first_receive_ns: u64,
    last_receive_ns: u64,
    latency_us: SparseHistogram,
    /// CPU seconds of the client process between its READY and RESULT
    /// (child only).
    cpu: Cpu,
    /// Client process memory at the end (child only).
    memory_rss_kib: u64,
}

#[derive(Default)]
struct SubscriberStats {
    events: u64,
    lagged_frames: u64,
    missed: u64,
    other_frames: u64,
    out_of_order: u64,
    saw_end: bool,
    closed_early: bool,
    timed_out: bool,
    first_receive_ns: u64,
    last_receive_ns: u64,
    latency: Histogram,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(default, borrow)]
    id: Option<&'a str>,
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    payload: Option<FramePayload<'a>>,
}

#[derive(Deserialize)]
struct FramePayload<'a> {
    #[serde(default, borrow)]
    action: Option<&'a str>,
    #[serde(default, borrow)]
    target: Option<&'a str>,
    #[serde(default)]
    missed: Option<u64>,
}

/// What one frame is, as far as the benchmark cares.
enum Seen {
    Event { id: u64, sent_ns: u64 },
    End,
    Lagged { missed: u64 },
    Other,
}

/// The publish time from a target `t=<20 digits>;…`.
fn sent_ns(target: &str) -> Option<u64> {
    target.strip_prefix("t=")?.get(..20)?.parse().ok()
}

fn classify(text: &str, parse: Parse) -> Seen {
    match parse {
        Parse::Typed => match serde_json::from_str::<Frame>(text) {
            Ok(frame) => classify_fields(
                frame.kind,
                frame.id,
                frame.payload.as_ref().and_then(|p| p.action),
                frame.payload.as_ref().and_then(|p| p.target),
                frame.payload.as_ref().and_then(|p| p.missed),
            ),
            Err(_) => Seen::Other,
        },
        Parse::Value => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value) => classify_fields(
                value["type"].as_str().unwrap_or(""),
                value["id"].as_str(),
                value["payload"]["action"].as_str(),
                value["payload"]["target"].as_str(),
                value["payload"]["missed"].as_u64(),
            ),
            Err(_) => Seen::Other,
        },
        Parse::Scan | Parse::Raw => {
            if let Some(rest) = text.strip_prefix("{\"id\":\"") {
                let id = rest.split('"').next().and_then(|s| s.parse().ok());
                let marker = "\"target\":\"t=";
                let sent = text
                    .find(marker)
                    .and_then(|at| sent_ns(&text[at + marker.len() - 2..]));
                match (id, sent) {
                    (Some(id), Some(sent_ns)) if text.contains(ACTION_EVENT) => {
                        Seen::Event { id, sent_ns }
                    }
                    _ if text.contains(ACTION_END) => Seen::End,
                    _ => Seen::Other,
                }
            } else {
                // Control frames are rare: parse them properly.
                classify(text, Parse::Typed)
            }
        }
    }
}

fn classify_fields(
    kind: &str,
    id: Option<&str>,
    action: Option<&str>,
    target: Option<&str>,
    missed: Option<u64>,
) -> Seen {
    match (kind, action) {
        ("audit.admin", Some(ACTION_EVENT)) => {
            match (id.and_then(|id| id.parse().ok()), target.and_then(sent_ns)) {
                (Some(id), Some(sent_ns)) => Seen::Event { id, sent_ns },
                _ => Seen::Other,
            }
        }
        ("audit.admin", Some(ACTION_END)) => Seen::End,
        ("lagged", _) => Seen::Lagged {
            missed: missed.unwrap_or(0),
        },
        _ => Seen::Other,
    }
}

impl SubscriberStats {
    /// Counts one frame received at `now`; `true` once it was the end marker.
    fn frame(&mut self, seen: Seen, now: u64, last_id: &mut u64) -> bool {
        match seen {
            Seen::Event { id, sent_ns } => {
                self.events += 1;
                if id <= *last_id {
                    self.out_of_order += 1;
                }
                *last_id = id;
                if self.first_receive_ns == 0 {
                    self.first_receive_ns = now;
                }
                self.last_receive_ns = now;
                self.latency.record(now.saturating_sub(sent_ns) / 1000);
            }
            Seen::End => {
                self.saw_end = true;
                return true;
            }
            Seen::Lagged { missed } => {
                self.lagged_frames += 1;
                self.missed += missed;
            }
            Seen::Other => self.other_frames += 1,
        }
        false
    }
}

/// The digits at the start of `bytes` as a number.
fn leading_number(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    bytes[..digits].iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// [`Parse::Raw`]'s classification: on bytes, with precompiled substring
/// searches, relying on the envelope's field order (`id` first; the
/// payload's `action` before `target`). Control frames are rare: those
/// are parsed properly.
fn classify_raw(frame: &[u8]) -> Seen {
    use std::sync::LazyLock;
    static ACTION: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\"action\":\"bench.e"));
    static TARGET: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\"target\":\"t="));
    let Some(rest) = frame.strip_prefix(b"{\"id\":\"") else {
        return classify(std::str::from_utf8(frame).unwrap_or(""), Parse::Typed);
    };
    let Some(at) = ACTION.find(frame) else {
        return Seen::Other;
    };
    let after = at + ACTION.needle().len();
    match frame.get(after) {
        Some(b'v') => {
            let sent = TARGET
                .find(&frame[after..])
                .and_then(|t| leading_number(&frame[after + t + TARGET.needle().len()..]));
            match (leading_number(rest), sent) {
                (Some(id), Some(sent_ns)) => Seen::Event { id, sent_ns },
                _ => Seen::Other,
            }
        }
        Some(b'n') => Seen::End,
        _ => Seen::Other,
    }
}

/// [`Parse::Raw`]: the subscriber's loop on the bare TCP stream.
async fn subscribe_raw(ws: Ws, deadline: tokio::time::Instant) -> SubscriberStats {
    let mut stats = SubscriberStats::default();
    let MaybeTlsStream::Plain(mut tcp) = ws.into_inner() else {
        stats.closed_early = true;
        return stats;
    };
    let mut last_id = 0u64;
    // One clock read per socket read, for every frame it brought.
    let mut now = 0;
    let end = raw_ws::read_frames(&mut tcp, tokio::time::sleep_until(deadline), |seen| {
        match seen {
            raw_ws::Seen::Read => now = mono_ns(),
            raw_ws::Seen::Text(payload) => {
                return stats.frame(classify_raw(payload), now, &mut last_id)
            }
            raw_ws::Seen::Other => stats.other_frames += 1,
        }
        false
    })
    .await;
    match end {
        raw_ws::RawEnd::Done => {}
        raw_ws::RawEnd::Stopped => stats.timed_out = true,
        raw_ws::RawEnd::Closed => stats.closed_early = true,
    }
    stats
}

/// One subscriber's read loop: until the end marker, the connection's end
/// or the deadline.
async fn subscribe(mut ws: Ws, parse: Parse, deadline: tokio::time::Instant) -> SubscriberStats {
    if parse == Parse::Raw {
        return subscribe_raw(ws, deadline).await;
    }
    let mut stats = SubscriberStats::default();
    let mut last_id = 0u64;
    loop {
        let message = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => {
                stats.timed_out = true;
                break;
            }
            Ok(None) | Ok(Some(Err(_))) => {
                stats.closed_early = true;
                break;
            }
            Ok(Some(Ok(message))) => message,
        };
        let now = mono_ns();
        let Message::Text(text) = message else {
            if matches!(message, Message::Close(_)) {
                stats.closed_early = true;
                break;
            }
            continue; // Ping (answered by tungstenite), Pong, Binary.
        };
        if stats.frame(classify(text.as_str(), parse), now, &mut last_id) {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    stats
}

/// Runs every subscriber in its own task until all are done, then sums.
async fn receive_all(
    sockets: Vec<Ws>,
    parse: Parse,
    deadline: tokio::time::Instant,
) -> ClientReport {
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(subscribe(ws, parse, deadline)))
        .collect();
    let mut report = ClientReport::default();
    let mut latency = Histogram::default();
    for task in tasks {
        let Ok(stats) = task.await else {
            report.closed_early += 1;
            continue;
        };
        report.subscribers += 1;
        report.events += stats.events;
        report.lagged_frames += stats.lagged_frames;
        report.missed += stats.missed;
        report.other_frames += stats.other_frames;
        report.out_of_order += stats.out_of_order;
        report.saw_end += stats.saw_end as u64;
        report.closed_early += stats.closed_early as u64;
        report.timed_out += stats.timed_out as u64;
        if stats.first_receive_ns != 0 {
            report.first_receive_ns = match report.first_receive_ns {
                0 => stats.first_receive_ns,
                first => first.min(stats.first_receive_ns),
            };
        }
        report.last_receive_ns = report.last_receive_ns.max(stats.last_receive_ns);
        latency.merge(&stats.latency);
    }
    report.latency_us = latency.to_sparse();
    report
}

/// An idle connection: reads (so pings are answered) until told to stop.
async fn hold_idle(mut ws: Ws, stop: tokio_util::sync::CancellationToken) -> bool {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return true,
            message = ws.next() => match message {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return false,
                Some(Ok(_)) => {}
            }
        }
    }
}

/// The child process: opens the connections, says READY, then either
/// receives the fan-out or holds the connections idle until told to stop.
/// Lines on stdout: `READY <open> <failed>`, `RESULT <json>`, `CLOSED <n>`.
fn client_main(args: &Args) -> anyhow::Result<()> {
    let url = args.url.clone().context("--client-only needs --url")?;
    if !url.starts_with("ws://127.0.0.1:") {
        bail!("--url must be a loopback ws://127.0.0.1:… address");
    }
    let count = args.subscribers.min(MAX_CONNECTIONS);
    raise_nofile(count as u64 + FD_HEADROOM, "client process")?;
    if let Some(cpu) = args.pin_cpu {
        pin_to_cpu(cpu)?;
    }
    let deadline_secs = args.deadline_secs.min(4 * MAX_DURATION_SECS);
    // Watchdog: whatever happens, this process ends.
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(deadline_secs + 30));
        eprintln!("events-bench client: watchdog deadline reached; exiting");
        std::process::exit(3);
    });
    let runtime = client_runtime(args.client_threads)?;
    let mut stdout = std::io::stdout().lock();
    match args.client_mode {
        ClientMode::Fanout => {
            let (sockets, errors) =
                runtime.block_on(connect_many(&url, count, args.connect_concurrency));
            writeln!(stdout, "READY {} {}", sockets.len(), errors.len())?;
            stdout.flush()?;
            let cpu_start = cpu_seconds(libc::RUSAGE_SELF);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(deadline_secs);
            let mut report = runtime.block_on(receive_all(sockets, args.parse, deadline));
            report.cpu = cpu_seconds(libc::RUSAGE_SELF).since(cpu_start);
            report.memory_rss_kib = memory().rss_kib;
            report.connect_failures = errors.len() as u64;
            report.first_connect_error = errors.into_iter().next();
            writeln!(stdout, "RESULT {}", serde_json::to_string(&report)?)?;
            stdout.flush()?;
        }
        ClientMode::Idle => {
            let stop = tokio_util::sync::CancellationToken::new();
            let mut holders = Vec::with_capacity(count);
            let mut failed = 0usize;
            let steps = args.steps.clamp(1, 100);
            let mut stdin = std::io::stdin().lock();
            for step in 0..steps {
                let in_step = count * (step + 1) / steps - count * step / steps;
                let (sockets, errors) =
                    runtime.block_on(connect_many(&url, in_step, args.connect_concurrency));
                if let Some(error) = errors.first() {
                    eprintln!(
                        "events-bench client: {} connections failed, first: {error}",
                        errors.len()
                    );
                }
                failed += errors.len();
                for ws in sockets {
                    holders.push(runtime.spawn(hold_idle(ws, stop.clone())));
                }
                writeln!(stdout, "READY {} {}", holders.len(), failed)?;
                stdout.flush()?;
                // Wait for NEXT from the parent; STOP or EOF ends the run.
                let mut line = String::new();
                let stopped = stdin.read_line(&mut line)? == 0 || line.trim() == "STOP";
                if stopped || step + 1 == steps {
                    // After the last step, NEXT means nothing more to open:
                    // wait for STOP (or EOF).
                    if !stopped {
                        line.clear();
                        while stdin.read_line(&mut line)? > 0 && line.trim() != "STOP" {
                            line.clear();
                        }
                    }
                    break;
                }
            }
            stop.cancel();
            let still_open = runtime.block_on(async {
                let mut open = 0;
                for holder in holders {
                    if let Ok(true) = holder.await {
                        open += 1;
                    }
                }
                open
            });
            writeln!(stdout, "CLOSED {still_open}")?;
            stdout.flush()?;
        }
    }
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// The parent's handle on the client child process.
struct ClientChild {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl ClientChild {
    fn spawn(
        args: &Args,
        url: &str,
        mode: ClientMode,
        count: usize,
        deadline_secs: u64,
    ) -> anyhow::Result<ClientChild> {
        let exe = std::env::current_exe().context("cannot find this executable to re-run it")?;
        let mode = match mode {
            ClientMode::Fanout => "fanout",
            ClientMode::Idle => "idle",
        };
        let parse = match args.parse {
            Parse::Typed => "typed",
            Parse::Value => "value",
            Parse::Scan => "scan",
            Parse::Raw => "raw",
        };
        let mut child = Command::new(exe)
            .args(["--client-only", "--url", url, "--client-mode", mode])
            .args(["--subscribers", &count.to_string()])
            .args(["--steps", &args.steps.to_string()])
            .args(["--parse", parse])
            .args(["--client-threads", &args.client_threads.to_string()])
            .args([
                "--connect-concurrency",
                &args.connect_concurrency.to_string(),
            ])
            .args(["--deadline-secs", &deadline_secs.to_string()])
            .args(if args.pin {
                vec!["--pin-cpu", "1"]
            } else {
                vec![]
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the client process")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(ClientChild {
            child,
            stdin,
            lines,
        })
    }

    /// The next line starting with `prefix`, within `limit`.
    fn expect(&mut self, prefix: &str, limit: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_owned());
                    }
                    eprintln!("client: {line}");
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("the client process sent no {prefix} within {limit:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the client process ended before {prefix}")
                }
            }
        }
    }

    fn say(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }

    fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "events-bench: client process did not exit; killing it (pid {})",
            self.child.id()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_ready(line: &str) -> anyhow::Result<(u64, u64)> {
    let mut parts = line.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(open)), Some(Ok(failed))) => Ok((open, failed)),
        _ => bail!("bad READY line from the client: {line}"),
    }
}

// ---------------------------------------------------------------------------
// Publishing.

#[derive(Debug, Default)]
struct PublishReport {
    published: u64,
    start_ns: u64,
    end_ns: u64,
    /// How far the publisher fell behind its schedule at worst.
    max_behind_us: u64,
    /// Time spent inside `hub.publish` (µs).
    publish_call_us: Histogram,
    /// CPU of the publisher thread.
    cpu: Cpu,
}

/// The envelope length of an `audit.admin` event whose target is `t=` +
/// 20 digits + `;`, found by publishing one probe (before any subscriber,
/// so nobody receives it).
fn probe_envelope_len(hub: &EventHub) -> usize {
    let target = format!("t={:020};", 0);
    let probe = hub.publish(AdminAction {
        actor: "events-bench".to_owned(),
        action: ACTION_PROBE.to_owned(),
        target: target.clone(),
    });
    probe.json.len()
}

/// Publishes `rate` events a second for `duration` on this thread, then the
/// end marker.
fn publish(hub: EventHub, rate: u64, duration: Duration, padding: String) -> PublishReport {
    let total = rate * duration.as_secs();
    let interval_ns = 1_000_000_000f64 / rate as f64;
    let mut report = PublishReport::default();
    let cpu_start = cpu_seconds(libc::RUSAGE_THREAD);
    let start = Instant::now();
    report.start_ns = mono_ns();
    for i in 0..total {
        let due = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else {
            report.max_behind_us = report.max_behind_us.max((now - due).as_micros() as u64);
        }
        let sent = mono_ns();
        let target = format!("t={sent:020};{padding}");
        hub.publish(AdminAction {
            actor: "events-bench".to_owned(),
            action: ACTION_EVENT.to_owned(),
            target,
        });
        report.publish_call_us.record((mono_ns() - sent) / 1000);
        report.published += 1;
        // Hard stop: never run far past the planned duration.
        if start.elapsed() > duration + Duration::from_secs(MAX_DURATION_SECS) {
            eprintln!("events-bench: publisher far behind schedule; stopping early");
            break;
        }
    }
    report.end_ns = mono_ns();
    report.cpu = cpu_seconds(libc::RUSAGE_THREAD).since(cpu_start);
    hub.publish(AdminAction {
        actor: "events-bench".to_owned(),
        action: ACTION_END.to_owned(),
        target: format!("n={}", report.published),
    });
    report
}

// ---------------------------------------------------------------------------
// Fan-out benchmark.

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn fanout_main(args: &Args) -> anyhow::Result<()> {
    let n = args.subscribers;
    let needed = if args.in_process {
        2 * n as u64
    } else {
        n as u64
    } + FD_HEADROOM;
    with_server(args, needed, |server, nofile| {
        fanout_with(args, server, nofile)
    })
}

/// Raises the descriptor limit to `needed_fds`, starts the server, runs
/// `body` against it, stops it, and prints the summary.
fn with_server(
    args: &Args,
    needed_fds: u64,
    body: impl FnOnce(&RunningServer, u64) -> anyhow::Result<serde_json::Value>,
) -> anyhow::Result<()> {
    let nofile = raise_nofile(needed_fds, "server process")?;
    let wall_start = Instant::now();
    let server = RunningServer::start(args)?;
    let result = body(&server, nofile);
    server.stop();
    let summary = result?;
    if args.json {
        println!("SUMMARY {}", serde_json::to_string(&summary)?);
    }
    eprintln!(
        "(total wall time {:.1} s)",
        wall_start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn fanout_with(
    args: &Args,
    server: &RunningServer,
    nofile: u64,
) -> anyhow::Result<serde_json::Value> {
    let n = args.subscribers;
    let probe_len = probe_envelope_len(server.hub());
    let padding = "x".repeat(args.size.saturating_sub(probe_len));
    let envelope_bytes = probe_len + padding.len();
    std::thread::sleep(Duration::from_millis(300));
    let mem_before = memory();
    let receive_secs = args.duration + 30;

    // Connect.
    let connect_start = Instant::now();
    enum Clients {
        Child(ClientChild),
        InProcess(tokio::runtime::Runtime, Vec<Ws>),
    }
    let (mut clients, open, failed) = if args.in_process {
        let runtime = client_runtime(args.client_threads)?;
        let (sockets, errors) =
            runtime.block_on(connect_many(&server.url, n, args.connect_concurrency));
        if let Some(error) = errors.first() {
            eprintln!(
                "events-bench: {} connections failed, first: {error}",
                errors.len()
            );
        }
        let (open, failed) = (sockets.len() as u64, errors.len() as u64);
        (Clients::InProcess(runtime, sockets), open, failed)
    } else {
        let mut child = ClientChild::spawn(args, &server.url, ClientMode::Fanout, n, receive_secs)?;
        let (open, failed) = parse_ready(&child.expect("READY", Duration::from_secs(120))?)?;
        (Clients::Child(child), open, failed)
    };
    let connect_secs = connect_start.elapsed().as_secs_f64();
    if !server.wait_open(open, false, Duration::from_secs(10)) {
        eprintln!(
            "events-bench: the server counts {} open streams, the clients {open}",
            server.open_streams()
        );
    }
    if open == 0 {
        bail!("no subscriber could connect");
    }
    std::thread::sleep(Duration::from_secs(1));
    let mem_connected = memory();

    // Receive (in-process: tasks on the client runtime), then publish.
    let in_process_receive = match &mut clients {
        Clients::InProcess(runtime, sockets) => {
            let sockets = std::mem::take(sockets);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(receive_secs);
            Some(runtime.spawn(receive_all(sockets, args.parse, deadline)))
        }
        Clients::Child(_) => None,
    };
    let frames_before = server_counter("tollgate_stream_frames_delivered_total");
    let lagged_before = server_counter("tollgate_events_lagged_total");
    let cpu_start = cpu_seconds(libc::RUSAGE_SELF);
    let machine_start = machine_cpu();
    let window_start = Instant::now();
    let publisher = {
        let hub = server.hub().clone();
        let duration = Duration::from_secs(args.duration);
        let rate = args.rate;
        std::thread::Builder::new()
            .name("publisher".to_owned())
            .spawn(move || publish(hub, rate, duration, padding))?
    };
    let published = publisher
        .join()
        .map_err(|_| anyhow::anyhow!("the publisher thread panicked"))?;
    let mem_end = memory();

    // Collect.
    let report = match clients {
        Clients::Child(mut child) => {
            let line = child.expect("RESULT", Duration::from_secs(receive_secs + 30));
            child.finish();
            serde_json::from_str::<ClientReport>(&line?)?
        }
        Clients::InProcess(runtime, _) => {
            let task = in_process_receive.expect("spawned above");
            let report = runtime.block_on(task)?;
            runtime.shutdown_timeout(Duration::from_secs(2));
            report
        }
    };
    let cpu_server = cpu_seconds(libc::RUSAGE_SELF).since(cpu_start);
    let window_secs = window_start.elapsed().as_secs_f64();
    let (machine_busy, machine_cores) =
        machine_busy_cores(machine_start, machine_cpu(), window_secs);
    let frames = server_counter("tollgate_stream_frames_delivered_total") - frames_before;
    let lagged_server = server_counter("tollgate_events_lagged_total") - lagged_before;

    // Report.
    let latency = Histogram::from_sparse(&report.latency_us);
    let expected = report.subscribers * published.published;
    let lost = expected.saturating_sub(report.events);
    let publish_secs = (published.end_ns - published.start_ns) as f64 / 1e9;
    let delivery_secs = report.last_receive_ns.saturating_sub(published.start_ns) as f64 / 1e9;
    let delivered_rate = if delivery_secs > 0.0 {
        report.events as f64 / delivery_secs
    } else {
        0.0
    };
    let p50 = latency.percentile(50.0);
    let p99 = latency.percentile(99.0);
    let p999 = latency.percentile(99.9);
    let ms = |us: u64| us as f64 / 1000.0;

    println!("== events-bench fan-out ==");
    println!(
        "setup: {n} subscribers ({} clients, {} client threads, parse={:?}), {} ev/s for {} s, \
         envelope {} B, channel_capacity {}, server threads {}, RLIMIT_NOFILE {nofile}{}",
        if args.in_process {
            "in-process"
        } else {
            "child-process"
        },
        args.client_threads,
        args.parse,
        args.rate,
        args.duration,
        envelope_bytes,
        args.channel_capacity,
        args.server_threads,
        if args.pin {
            ", pinned: server CPU 0, clients CPU 1"
        } else {
            ""
        },
    );
    println!(
        "connected: {open} ok, {failed} failed, in {connect_secs:.2} s{}",
        report
            .first_connect_error
            .as_deref()
            .map(|e| format!(" (first error: {e})"))
            .unwrap_or_default()
    );
    println!(
        "published: {} events in {publish_secs:.2} s = {:.0} ev/s (target {}); publisher max behind schedule {:.1} ms; \
         hub.publish call p50 {} µs, p99 {} µs, max {} µs; publisher thread CPU {:.2} s",
        published.published,
        published.published as f64 / publish_secs,
        args.rate,
        ms(published.max_behind_us),
        published.publish_call_us.percentile(50.0),
        published.publish_call_us.percentile(99.0),
        published.publish_call_us.max,
        published.cpu.total(),
    );
    println!(
        "delivered: {} events to {} subscribers = {delivered_rate:.0} ev/s total (expected {} ev/s); \
         last receive {:.2} s after first publish",
        report.events,
        report.subscribers,
        report.subscribers * args.rate,
        delivery_secs,
    );
    println!(
        "latency publish→receive: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, mean {:.2} ms ({} samples)",
        ms(p50),
        ms(p99),
        ms(p999),
        ms(latency.max),
        latency.mean() / 1000.0,
        latency.total,
    );
    let share = |above_ms: u64| {
        100.0 * latency.count_above(above_ms * 1000) as f64 / latency.total.max(1) as f64
    };
    println!(
        "latency distribution: p90 {:.2} ms, p95 {:.2} ms; over 10 ms {:.2} %, over 40 ms {:.2} %, over 50 ms {:.3} %",
        ms(latency.percentile(90.0)),
        ms(latency.percentile(95.0)),
        share(10),
        share(40),
        share(50),
    );
    println!(
        "lost: {lost} of {expected} expected (lagged frames {}, missed in lagged frames {}; server lagged counter {lagged_server}); \
         out of order {}, other frames {}, end marker seen by {}/{}, closed early {}, timed out {}",
        report.lagged_frames,
        report.missed,
        report.out_of_order,
        report.other_frames,
        report.saw_end,
        report.subscribers,
        report.closed_early,
        report.timed_out,
    );
    println!("server frames delivered counter: {frames} (events + end markers)");
    println!(
        "server RSS: before subscribers {:.1} MiB, connected {:.1} MiB, end {:.1} MiB (peak {:.1} MiB){}",
        mib(mem_before.rss_kib),
        mib(mem_connected.rss_kib),
        mib(mem_end.rss_kib),
        mib(mem_end.hwm_kib),
        if args.in_process { " — includes the in-process clients" } else { "" },
    );
    let cores = |cpu: Cpu| cpu.total() / window_secs;
    if args.in_process {
        println!(
            "CPU during publishing+drain ({window_secs:.1} s): whole process {cpu_server} = {:.2} cores",
            cores(cpu_server)
        );
    } else {
        println!(
            "CPU during publishing+drain ({window_secs:.1} s): server process {cpu_server} = {:.2} cores \
             (publisher thread {:.2} s); client process {} = {:.2} cores; client RSS at end {:.1} MiB",
            cores(cpu_server),
            published.cpu.total(),
            report.cpu,
            cores(report.cpu),
            mib(report.memory_rss_kib),
        );
    }
    let ours = cores(cpu_server)
        + if args.in_process {
            0.0
        } else {
            cores(report.cpu)
        };
    let others = (machine_busy - ours).max(0.0);
    println!(
        "machine during the window: {machine_busy:.2} of {machine_cores:.2} cores busy; other processes {others:.2} cores; load average at end {}{}",
        load_average(),
        if others > 0.25 { " — WARNING: the machine was not quiet, results are disturbed" } else { "" },
    );
    let zero_lag = report.lagged_frames == 0 && lost == 0;
    println!(
        "verdict: lagged frames {} (target 0): {}; p99 {:.2} ms (target < 50 ms): {}",
        report.lagged_frames,
        if zero_lag { "MET" } else { "MISSED" },
        ms(p99),
        if p99 < 50_000 { "MET" } else { "MISSED" },
    );
    Ok(json!({
        "mode": "fanout",
        "subscribers": n,
        "connected": open,
        "connect_failed": failed,
        "in_process": args.in_process,
        "pinned": args.pin,
        "parse": format!("{:?}", args.parse),
        "rate": args.rate,
        "duration_s": args.duration,
        "envelope_bytes": envelope_bytes,
        "channel_capacity": args.channel_capacity,
        "published": published.published,
        "publish_rate": published.published as f64 / publish_secs,
        "publisher_max_behind_ms": ms(published.max_behind_us),
        "publish_call_us_p99": published.publish_call_us.percentile(99.0),
        "delivered_events": report.events,
        "delivered_per_s": delivered_rate,
        "latency_ms": {"p50": ms(p50), "p99": ms(p99), "p999": ms(p999), "max": ms(latency.max)},
        "lost": lost,
        "lagged_frames": report.lagged_frames,
        "missed_in_lagged": report.missed,
        "rss_mib": {"before": mib(mem_before.rss_kib), "connected": mib(mem_connected.rss_kib), "end": mib(mem_end.rss_kib)},
        "cpu_s": {"server": cpu_server, "publisher": published.cpu, "client": report.cpu, "window": window_secs},
        "machine_busy_cores": machine_busy,
        "other_processes_cores": others,
    }))
}

// ---------------------------------------------------------------------------
// Idle-connection memory benchmark.

fn idle_main(args: &Args, n: usize) -> anyhow::Result<()> {
    with_server(args, n as u64 + FD_HEADROOM, |server, nofile| {
        idle_with(args, server, n, nofile)
    })
}

fn idle_with(
    args: &Args,
    server: &RunningServer,
    n: usize,
    nofile: u64,
) -> anyhow::Result<serde_json::Value> {
    std::thread::sleep(Duration::from_millis(500));
    let base = memory();
    let mut child = ClientChild::spawn(
        args,
        &server.url,
        ClientMode::Idle,
        n,
        4 * MAX_DURATION_SECS,
    )?;
    let mut points: Vec<(u64, Memory)> = vec![(0, base)];
    let mut failed_total = 0;
    let steps = args.steps;
    let connect_start = Instant::now();
    for step in 0..steps {
        let (open, failed) = parse_ready(&child.expect("READY", Duration::from_secs(120))?)?;
        failed_total = failed;
        if !server.wait_open(open, false, Duration::from_secs(10)) {
            eprintln!(
                "events-bench: the server counts {} open streams, the client {open}",
                server.open_streams()
            );
        }
        std::thread::sleep(Duration::from_secs(args.settle));
        points.push((server.open_streams(), memory()));
        if step + 1 < steps {
            child.say("NEXT");
        }
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let (open, full) = *points.last().expect("at least one step");
    child.say("STOP");
    let held = child
        .expect("CLOSED", Duration::from_secs(60))
        .ok()
        .and_then(|n| n.parse::<u64>().ok());
    child.finish();
    server.wait_open(0, true, Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(1));
    let after_close = memory();

    let per_conn = |from: (u64, Memory), to: (u64, Memory)| {
        let conns = to.0.saturating_sub(from.0).max(1) as f64;
        (
            (to.1.rss_kib as f64 - from.1.rss_kib as f64) / conns,
            (to.1.rss_anon_kib as f64 - from.1.rss_anon_kib as f64) / conns,
        )
    };
    let (overall, overall_anon) = per_conn(points[0], (open, full));
    println!("== events-bench idle connections ==");
    println!(
        "setup: {n} idle WebSocket connections from a child process, {} steps, settle {} s, server threads {}, RLIMIT_NOFILE {nofile}",
        steps, args.settle, args.server_threads
    );
    println!("load average at end: {}", load_average());
    println!("opened: {open} open on the server, {failed_total} failed, in {connect_secs:.1} s (including settle time)");
    for (i, (conns, mem)) in points.iter().enumerate() {
        println!(
            "  point {i}: {conns:>6} connections: RSS {:.1} MiB (anon {:.1} MiB)",
            mib(mem.rss_kib),
            mib(mem.rss_anon_kib)
        );
    }
    let mut slopes = Vec::new();
    for pair in points.windows(2).skip(1) {
        let (kib, anon) = per_conn(pair[0], pair[1]);
        println!(
            "  marginal {}→{}: {kib:.2} KiB/connection RSS ({anon:.2} KiB anon)",
            pair[0].0, pair[1].0
        );
        slopes.push(kib);
    }
    println!(
        "RSS growth: {:.1} MiB for {open} connections = {overall:.2} KiB per connection ({overall_anon:.2} KiB anon); target ≤ 12 KiB: {}",
        mib(full.rss_kib.saturating_sub(base.rss_kib)),
        if overall <= 12.0 { "MET" } else { "MISSED" },
    );
    println!(
        "connections still open when the client stopped: {} of {open}",
        held.map_or("unknown".to_owned(), |n| n.to_string())
    );
    println!(
        "after closing all: RSS {:.1} MiB (peak {:.1} MiB)",
        mib(after_close.rss_kib),
        mib(after_close.hwm_kib)
    );
    Ok(json!({
        "mode": "idle",
        "connections": open,
        "failed": failed_total,
        "rss_mib_base": mib(base.rss_kib),
        "rss_mib_full": mib(full.rss_kib),
        "rss_mib_after_close": mib(after_close.rss_kib),
        "kib_per_connection": overall,
        "kib_per_connection_anon": overall_anon,
        "marginal_kib_per_connection": slopes,
    }))
}

#[cfg(test)]
mod tests {
    use super::raw_ws::frame_header;
    use super::*;

    #[test]
    fn histogram_buckets_contain_their_values_within_two_percent() {
        for value in (0..5000u64).chain((1..40).map(|e| (1u64 << e) + 12345 % (1 << e))) {
            let value = value.min((1 << (HIST_MAX_EXP + 1)) - 1);
            let index = Histogram::index(value);
            assert!(index < HIST_BUCKETS, "{value}");
            let upper = Histogram::upper(index);
            assert!(upper >= value, "{value} > {upper}");
            assert!(
                (upper - value) as f64 <= value as f64 / 50.0 + 1.0,
                "{value} {upper}"
            );
        }
    }

    #[test]
    fn percentiles_and_merge() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        for v in 1..=500 {
            a.record(v);
        }
        for v in 501..=1000 {
            b.record(v);
        }
        a.merge(&b);
        let back = Histogram::from_sparse(&a.to_sparse());
        assert_eq!(back.total, 1000);
        assert_eq!(back.max, 1000);
        let p50 = back.percentile(50.0);
        assert!((500..=510).contains(&p50), "{p50}");
        let p99 = back.percentile(99.0);
        assert!((990..=1000).contains(&p99), "{p99}");
        assert_eq!(back.count_above(1000), 0);
    }

    #[test]
    fn frames_are_classified() {
        let event = r#"{"id":"42","type":"audit.admin","topic":"audit","timestamp":"t","payload":{"actor":"events-bench","action":"bench.event","target":"t=00000000000000001234;xxxx"}}"#;
        for parse in [Parse::Typed, Parse::Value, Parse::Scan, Parse::Raw] {
            assert!(matches!(
                classify(event, parse),
                Seen::Event {
                    id: 42,
                    sent_ns: 1234
                }
            ));
            let lagged = r#"{"type":"lagged","payload":{"missed":7,"resume_from":"3"}}"#;
            assert!(matches!(
                classify(lagged, parse),
                Seen::Lagged { missed: 7 }
            ));
            let end = event.replace("bench.event", "bench.end");
            assert!(matches!(classify(&end, parse), Seen::End));
        }
        assert!(matches!(
            classify_raw(event.as_bytes()),
            Seen::Event {
                id: 42,
                sent_ns: 1234
            }
        ));
        let lagged = r#"{"type":"lagged","payload":{"missed":7,"resume_from":"3"}}"#;
        assert!(matches!(
            classify_raw(lagged.as_bytes()),
            Seen::Lagged { missed: 7 }
        ));
        let end = event.replace("bench.event", "bench.end");
        assert!(matches!(classify_raw(end.as_bytes()), Seen::End));
    }

    #[test]
    fn frame_headers_of_all_three_length_forms_are_read() {
        assert_eq!(frame_header(&[0x81, 5, b'h']), Some((0x81, 5, 2)));
        assert_eq!(frame_header(&[0x81, 126, 1, 44]), Some((0x81, 300, 4)));
        let mut long = vec![0x82, 127];
        long.extend_from_slice(&70_000u64.to_be_bytes());
        assert_eq!(frame_header(&long), Some((0x82, 70_000, 10)));
        assert_eq!(frame_header(&[0x81]), None);
        assert_eq!(frame_header(&[0x81, 126, 1]), None);
    }
}

//! Shared setup for the integration tests: a fresh database per test, an
//! in-process gateway on 127.0.0.1:0, a scratch folder for running the built
//! binary, and waiting for a condition with a deadline.
//!
//! It also holds the small lookups several test files need: a key's id, a
//! request's ledger row or audit record (waiting for the ledger writer), a
//! plain chat request, and a marker event.
//!
//! Every `tests/*.rs` file compiles this module on its own and uses only part
//! of it, hence the `dead_code` allowance. Keep it to setup and lookups:
//! assertions about behaviour belong in the tests themselves.
#![allow(dead_code)]

use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle as ThreadHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::{Connection, Executor};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate::config::Config;
use tollgate::events::model::SystemStartup;
use tollgate::server::{AppState, Server};
use tollgate::store::{ApiKeyRecord, LedgerRow, Store};
use uuid::Uuid;

/// How long a test waits for something that should happen at once (a server
/// answering, a process exiting) before failing. Generous, because tests
/// run in parallel with each other and with builds.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// The environment variable naming a PostgreSQL server for tests.
pub const POSTGRES_URL_VAR: &str = "TOLLGATE_TEST_POSTGRES_URL";

/// `GET url` with `key` as the bearer token; asserts a 2xx answer and
/// returns its JSON.
pub async fn get_json(url: &str, key: &str) -> Value {
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .expect("the gateway answers");
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    response.json().await.expect("a JSON answer")
}

/// `POST BASE/v1/chat/completions` on `http` with `key` for `model` and one
/// user message, `content`.
pub async fn post_chat(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    model: &str,
    content: &str,
) -> reqwest::Response {
    http.post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": content}]}))
        .send()
        .await
        .expect("the gateway answers")
}

/// Polls `condition` every 20 ms until it holds; panics naming `what` if it
/// does not within `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `tollgate` binary built for these tests.
pub fn tollgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tollgate")
}

/// A database of its own for one test: a SQLite file in a temporary folder,
/// or a new database on the PostgreSQL server named by
/// `TOLLGATE_TEST_POSTGRES_URL`. Call [`TestDb::cleanup`] at the end; a test
/// that panics before that still has its PostgreSQL database dropped.
pub struct TestDb {
    /// The URL to give [`Store::connect`] or `[database] url`.
    pub url: String,
    backend: TestBackend,
}

enum TestBackend {
    Sqlite(TempDir),
    Postgres {
        server_url: String,
        name: String,
        dropped: bool,
    },
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("create a temporary folder");
        TestDb {
            url: format!("sqlite://{}", dir.path().join("tollgate.db").display()),
            backend: TestBackend::Sqlite(dir),
        }
    }

    /// A new, empty PostgreSQL database, or `None` (after printing why) when
    /// `TOLLGATE_TEST_POSTGRES_URL` is not set, so the caller can return.
    pub async fn postgres() -> Option<TestDb> {
        let Ok(server_url) = std::env::var(POSTGRES_URL_VAR) else {
            println!("skipping: {POSTGRES_URL_VAR} is not set");
            return None;
        };
        let name = format!("tollgate_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&server_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {POSTGRES_URL_VAR} ({server_url}): {e}"));
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        conn.close().await.ok();
        let mut url = url::Url::parse(&server_url)
            .unwrap_or_else(|e| panic!("{POSTGRES_URL_VAR} is not a URL: {e}"));
        url.set_path(&name);
        Some(TestDb {
            url: url.to_string(),
            backend: TestBackend::Postgres {
                server_url,
                name,
                dropped: false,
            },
        })
    }

    /// A store on this database, migrated.
    pub async fn store(&self) -> Store {
        Store::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("cannot open the test database {}: {e}", self.url))
    }

    /// Removes the database. For PostgreSQL, open connections are ended.
    pub async fn cleanup(mut self) {
        if let TestBackend::Postgres {
            server_url,
            name,
            dropped,
        } = &mut self.backend
        {
            drop_postgres_database(server_url, name).await;
            *dropped = true;
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestBackend::Postgres {
            server_url,
            name,
            dropped: false,
        } = &self.backend
        {
            // Reached when a test panicked before `cleanup`. A runtime may
            // be running on this thread, so drop the database from another.
            let (server_url, name) = (server_url.clone(), name.clone());
            let _ = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("start a runtime")
                    .block_on(drop_postgres_database(&server_url, &name));
            })
            .join();
        }
    }
}

async fn drop_postgres_database(server_url: &str, name: &str) {
    let mut conn = sqlx::PgConnection::connect(server_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {server_url} to drop {name}: {e}"));
    conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await
        .unwrap_or_else(|e| panic!("cannot drop database {name}: {e}"));
    conn.close().await.ok();
}

/// A gateway running in this process on 127.0.0.1 with a port of its own and
/// a fresh SQLite database (unless the caller points it elsewhere).
/// Dropping it stops the server too; [`TestServer::shutdown`] also checks
/// that it stopped cleanly.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The `bootstrap` admin key created on the empty database.
    pub admin_key: String,
    /// The server's shared state: its store and live configuration.
    pub state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _db: TestDb,
}

impl TestServer {
    /// Starts a server on `Config::default()` with `listen = 127.0.0.1:0` and
    /// a temporary SQLite database, after `configure` has changed it.
    pub async fn start(configure: impl FnOnce(&mut Config)) -> TestServer {
        let db = TestDb::sqlite();
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".to_owned();
        config.database.url = db.url.clone();
        configure(&mut config);
        let server = Server::bind(config, None)
            .await
            .expect("the test server starts");
        let admin_key = server
            .bootstrap_key
            .as_ref()
            .expect("an empty database gets a bootstrap key")
            .expose()
            .to_owned();
        let addr = server.local_addr();
        let state = server.state().clone();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            // A dropped sender stops the server as well.
            let _ = stop.await;
        }));
        TestServer {
            addr,
            admin_key,
            state,
            shutdown: Some(shutdown),
            task: Some(task),
            _db: db,
        }
    }

    /// Starts a server with one event thread and holds that thread until
    /// the returned sender sends (or is dropped): a connection's task
    /// cannot run meanwhile, as when the event threads are busy.
    pub async fn start_with_event_thread_held() -> (TestServer, std::sync::mpsc::Sender<()>) {
        let server = TestServer::start(|config| config.server.event_threads = 1).await;
        let (release, held) = std::sync::mpsc::channel::<()>();
        server.state.event_runtime.handle().spawn(async move {
            let _ = held.recv();
        });
        (server, release)
    }

    /// `http://127.0.0.1:PORT` followed by `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Creates a key directly in the server's store and returns it.
    pub async fn create_key(&self, name: &str, admin: bool) -> String {
        let (_, secret) = tollgate::auth::issue_api_key(&self.state.store, name, admin, None)
            .await
            .expect("create a key");
        secret.expose().to_owned()
    }

    /// The stored record of the key `secret` (panics if there is none).
    pub async fn key_record(&self, secret: &str) -> ApiKeyRecord {
        self.state
            .store
            .find_api_key_by_hash(&tollgate::auth::keys::hash(secret))
            .await
            .expect("look the key up")
            .expect("the key exists")
    }

    /// The id of the key `secret` (panics if there is none).
    pub async fn key_id(&self, secret: &str) -> Uuid {
        self.key_record(secret).await.id
    }

    /// Turns `[auth.oidc]` on for `issuer`, then lets `configure` change
    /// it. Done after start, because the redirect URL needs the port; the
    /// gateway reads the configuration per request.
    pub fn enable_oidc(
        &self,
        issuer: &str,
        client_id: &str,
        client_secret: &str,
        configure: impl FnOnce(&mut tollgate::config::OidcConfig),
    ) {
        let mut oidc = tollgate::config::OidcConfig {
            issuer: issuer.to_owned(),
            client_id: client_id.to_owned(),
            client_secret: Some(client_secret.to_owned()),
            redirect_url: self.url("/auth/callback"),
            scopes: ["openid", "profile", "email"].map(String::from).to_vec(),
            admin_groups: vec!["ops".into()],
            groups_claim: "groups".into(),
            session_ttl_secs: 3600,
            allowed_origins: vec![],
        };
        configure(&mut oidc);
        let mut config = (**self.state.config.load()).clone();
        config.auth.oidc = Some(oidc);
        config.validate().expect("a valid test configuration");
        self.state.config.store(Arc::new(config));
    }

    /// `GET path` with the bootstrap admin key; the JSON answer.
    pub async fn admin_get(&self, path: &str) -> Value {
        get_json(&self.url(path), &self.admin_key).await
    }

    /// `POST /v1/chat/completions` with `key` for `model` and one user
    /// message, `content`.
    pub async fn chat(&self, key: &str, model: &str, content: &str) -> reqwest::Response {
        post_chat(
            &reqwest::Client::new(),
            &format!("http://{}", self.addr),
            key,
            model,
            content,
        )
        .await
    }

    /// The one ledger row of a request, waiting (up to [`DEADLINE`]) for the
    /// ledger writer; panics unless there is exactly one.
    pub async fn ledger_row(&self, request_id: &str) -> LedgerRow {
        let store = &self.state.store;
        wait_until(
            &format!("the ledger has a row for request {request_id}"),
            DEADLINE,
            || async move {
                !store
                    .ledger_rows_for_request(request_id)
                    .await
                    .expect("read the ledger")
                    .is_empty()
            },
        )
        .await;
        let mut rows = store.ledger_rows_for_request(request_id).await.unwrap();
        assert_eq!(rows.len(), 1, "one ledger row per request: {rows:?}");
        rows.remove(0)
    }

    /// The `audit.request` record of a request through the admin API
    /// (`GET /admin/v1/audit`, which must answer 200), waiting (up to
    /// [`DEADLINE`]) for the ledger writer.
    pub async fn audit_record(&self, request_id: &str) -> Value {
        let url = self.url("/admin/v1/audit?type=audit.request&limit=1000");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + DEADLINE;
        loop {
            let response = client
                .get(&url)
                .bearer_auth(&self.admin_key)
                .send()
                .await
                .expect("the gateway answers");
            assert_eq!(response.status(), reqwest::StatusCode::OK);
            let page: Value = response.json().await.expect("the audit page is JSON");
            let found = page["data"]
                .as_array()
                .expect("data is a list")
                .iter()
                .find(|r| r["request_id"] == request_id)
                .cloned();
            if let Some(record) = found {
                return record;
            }
            assert!(
                Instant::now() < deadline,
                "the audit log has no request {request_id} after {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Signals shutdown and waits for `run` to return `Ok` within the deadline.
    pub async fn shutdown(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let task = self.task.take().expect("the server task is present");
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("the server stops within the deadline")
            .expect("the server task did not panic")
            .expect("the server stopped without error");
    }
}

/// A scratch folder for running the built binary: its working directory
/// (so no `./tollgate.toml` or `data/` of the repository is touched), its
/// configuration files and its SQLite database.
pub struct Workspace {
    pub dir: TempDir,
}

impl Workspace {
    pub fn new() -> Workspace {
        Workspace {
            dir: tempfile::tempdir().expect("create a temporary folder"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A SQLite database in this folder (created on first use).
    pub fn database_url(&self) -> String {
        format!("sqlite://{}", self.path().join("tollgate.db").display())
    }

    /// Writes `text` to `name` in this folder and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, text).expect("write a file in the workspace");
        path
    }

    /// A minimal configuration file, `tollgate.toml`, using this folder's
    /// database and listening on `listen`.
    pub fn write_config(&self, listen: &str) -> PathBuf {
        self.write_config_with(listen, "")
    }

    /// [`Workspace::write_config`] followed by `extra` (more TOML sections).
    pub fn write_config_with(&self, listen: &str, extra: &str) -> PathBuf {
        self.write(
            "tollgate.toml",
            &format!(
                "[server]\nlisten = \"{listen}\"\n\n[database]\nurl = \"{}\"\n{extra}",
                self.database_url()
            ),
        )
    }

    /// Writes `tollgate.toml` ([`Workspace::write_config_with`] with `extra`)
    /// for a free port of 127.0.0.1, runs `tollgate serve --config` on it and
    /// waits (up to [`DEADLINE`]) until `/health` answers 200. Returns the
    /// process, its address and the configuration file.
    pub async fn serve(&self, extra: &str) -> (TollgateProcess, SocketAddr, PathBuf) {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let path = self.write_config_with(&addr.to_string(), extra);
        let mut command = self.command();
        command.args(["serve", "--config"]).arg(&path);
        let process = TollgateProcess::spawn(command);
        let health = format!("http://{addr}/health");
        wait_until("the gateway answers /health", DEADLINE, || async {
            reqwest::get(&health).await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        (process, addr, path)
    }

    /// Runs `tollgate keys ARGS… --config CONFIG` to its end, asserts that it
    /// succeeded and returns its stdout.
    pub fn keys(&self, config: &Path, args: &[&str]) -> String {
        let output = self
            .command()
            .arg("keys")
            .args(args)
            .arg("--config")
            .arg(config)
            .output()
            .expect("run tollgate keys");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// The `tollgate` binary run in this folder, with the environment
    /// variables that would change its behaviour removed.
    pub fn command(&self) -> Command {
        let mut command = Command::new(tollgate_bin());
        command
            .current_dir(self.path())
            .env_remove("TOLLGATE_LISTEN")
            .env_remove("TOLLGATE_DATABASE_URL")
            .env_remove("RUST_LOG");
        command
    }
}

impl Default for Workspace {
    fn default() -> Self {
        Self::new()
    }
}

/// mock-1's prices in micro-dollars per million tokens ($0.15 and $0.60).
pub const MOCK_INPUT_MICROS_PER_MTOK: i128 = 150_000;
pub const MOCK_OUTPUT_MICROS_PER_MTOK: i128 = 600_000;

/// Tokens of `text` in `cl100k_base`, the tokenizer the mock counts with.
pub fn tokens(text: &str) -> i64 {
    tiktoken_rs::cl100k_base_singleton()
        .encode_with_special_tokens(text)
        .len() as i64
}

/// What mock-1 costs for these tokens, computed here on its own by the rule
/// of src/pricing.rs: ceil((in × in_price + out × out_price) / 1 000 000)
/// micro-dollars.
pub fn mock_cost(input_tokens: i64, output_tokens: i64) -> i64 {
    let total = i128::from(input_tokens) * MOCK_INPUT_MICROS_PER_MTOK
        + i128::from(output_tokens) * MOCK_OUTPUT_MICROS_PER_MTOK;
    ((total + 999_999) / 1_000_000) as i64
}

/// A `system.startup` event from node `marker-N`, for a test to publish and
/// recognise on a stream.
pub fn marker(n: usize) -> SystemStartup {
    SystemStartup {
        version: "test".into(),
        node: format!("marker-{n}"),
        listen: "-".into(),
    }
}

/// Proxy variables that would send a child process's HTTP somewhere other
/// than 127.0.0.1.
pub const PROXY_ENV: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

/// A tool an end-to-end test needs is missing. Outside CI the test is
/// skipped, saying why; under `CI=true`, where `.ci/run` installs what the
/// tests need, a skip would hide that the test never ran, so it fails.
pub fn skip_unless_ci(reason: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "this test cannot run in CI: {reason}; .ci/run installs what it needs"
    );
    println!("skipping: {reason}");
}

/// Runs a test script (`node …`, `python3 …`) to its end within
/// `deadline`, with stdin closed and the proxy variables removed; panics
/// with both of its outputs unless it exits 0. Returns its stdout.
pub async fn run_script(
    mut command: tokio::process::Command,
    what: &str,
    deadline: Duration,
) -> String {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for name in PROXY_ENV {
        command.env_remove(name);
    }
    let output = tokio::time::timeout(deadline, command.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {deadline:?}"))
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    stdout
}

/// A port on 127.0.0.1 that was free a moment ago, for a process that must
/// be told its address in advance.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A running `tollgate` process whose stdout and stderr are collected as
/// they arrive. Dropping it kills the process, so a failing test leaves
/// nothing running.
pub struct TollgateProcess {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<ThreadHandle<()>>,
}

impl TollgateProcess {
    /// Spawns `command` (see [`Workspace::command`]) with stdin closed.
    pub fn spawn(mut command: Command) -> TollgateProcess {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the tollgate binary");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().expect("piped stdout"), stdout.clone()),
            collect(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        TollgateProcess {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process has written to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// What the process has written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Sends a signal by name (`TERM`, `INT`) with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// Waits for the process to exit, at most [`DEADLINE`]; returns its
    /// status once all of its output has been collected.
    pub async fn wait_for_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("poll the process") {
                break status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the process did not exit within {DEADLINE:?}; stderr so far:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for reader in self.readers.drain(..) {
            reader.join().expect("an output reader thread");
        }
        status
    }
}

impl Drop for TollgateProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> ThreadHandle<()> {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buffer) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buffer[..n]);
        }
    })
}

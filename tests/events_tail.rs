//! `tollgate events tail` against a real gateway on 127.0.0.1:0: the built
//! binary for output, filters, exit codes and Ctrl-C; the in-process
//! [`tollgate::tail::run_until`] behind a TCP proxy the test can cut, for
//! reconnecting and resuming without a gap or a duplicate.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use support::{free_port, wait_until, TestServer, TollgateProcess, Workspace, DEADLINE};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate::events::model::{
    AdminAction, AuditRequest, BreakerState, BreakerStateChanged, ConfigReloaded, UsageRecorded,
};
use tollgate::events::StoredEvent;
use tollgate::tail::{TailError, TailOptions};
use uuid::Uuid;

// ---------------------------------------------------------------- helpers

fn admin_action(target: &str) -> AdminAction {
    AdminAction {
        actor: "cli".into(),
        action: "key.created".into(),
        target: target.into(),
    }
}

fn usage(key_id: Uuid) -> UsageRecorded {
    UsageRecorded {
        request_id: "req-1".into(),
        key_id,
        model: "gpt-4o".into(),
        provider: "openai".into(),
        input_tokens: 12,
        output_tokens: 34,
        cost_micros: 560,
        estimated: false,
    }
}

fn breaker() -> BreakerStateChanged {
    BreakerStateChanged {
        provider: "openai".into(),
        from: BreakerState::Closed,
        to: BreakerState::Open,
        reason: "5 consecutive failures".into(),
        consecutive_failures: 5,
    }
}

/// The local `HH:MM:SS.mmm` of an event, as the tail should print it.
fn local_time(event: &StoredEvent) -> String {
    let envelope: Value = serde_json::from_str(&event.json).unwrap();
    chrono::DateTime::parse_from_rfc3339(envelope["timestamp"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Local)
        .format("%H:%M:%S%.3f")
        .to_string()
}

fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/ws/events")
}

/// `tollgate events tail ARGS…` in a scratch folder, with no token in its
/// environment unless `token_env` is given.
fn spawn_tail(workspace: &Workspace, args: &[&str], token_env: Option<&str>) -> TollgateProcess {
    let mut command = workspace.command();
    command.arg("events").arg("tail").args(args);
    command.env_remove("TOLLGATE_TOKEN");
    if let Some(token) = token_env {
        command.env("TOLLGATE_TOKEN", token);
    }
    TollgateProcess::spawn(command)
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_owned).collect()
}

async fn wait_for_stdout_lines(tail: &TollgateProcess, count: usize) {
    wait_until(&format!("the tail printed {count} lines"), DEADLINE, || {
        let done = tail.stdout().lines().count() >= count;
        async move { done }
    })
    .await;
}

async fn wait_for_stderr(tail: &TollgateProcess, needle: &str) {
    wait_until(&format!("stderr contains `{needle}`"), DEADLINE, || {
        let done = tail.stderr().contains(needle);
        async move { done }
    })
    .await;
}

/// Runs the binary to its end and returns its exit code and stderr.
async fn tail_to_exit(args: &[&str]) -> (Option<i32>, String, String) {
    let workspace = Workspace::new();
    let mut tail = spawn_tail(&workspace, args, None);
    let status = tail.wait_for_exit().await;
    (status.code(), tail.stdout(), tail.stderr())
}

/// An in-memory stdout/stderr for the in-process tail.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// [`tollgate::tail::run_until`] in a task, stopped by [`InProcessTail::stop`].
struct InProcessTail {
    out: SharedBuf,
    err: SharedBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), TailError>>,
}

impl InProcessTail {
    fn start(options: TailOptions) -> InProcessTail {
        let (out, err) = (SharedBuf::default(), SharedBuf::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tollgate::tail::run_until(
            options,
            out.clone(),
            err.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        InProcessTail {
            out,
            err,
            stop: Some(stop),
            task,
        }
    }

    async fn wait_for_lines(&self, count: usize) {
        wait_until(&format!("the tail printed {count} lines"), DEADLINE, || {
            let done = self.out.text().lines().count() >= count;
            async move { done }
        })
        .await;
    }

    async fn wait_for_stderr(&self, needle: &str, times: usize) {
        wait_until(
            &format!("stderr contains `{needle}` {times} times"),
            DEADLINE,
            || {
                let done = self.err.text().matches(needle).count() >= times;
                async move { done }
            },
        )
        .await;
    }

    /// Stops the tail the way Ctrl-C does and checks it ended cleanly.
    async fn stop(mut self) -> (String, String) {
        self.stop.take().unwrap().send(()).unwrap();
        let result = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the tail stops within the deadline")
            .expect("the tail task did not panic");
        assert!(
            result.is_ok(),
            "the tail ended with {result:?}; stderr:\n{}",
            self.err.text()
        );
        (self.out.text(), self.err.text())
    }
}

/// A TCP proxy in front of the gateway that the test can cut (every
/// connection dropped, the port closed so connecting is refused), reopen on
/// the same port.
struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    accepted: Arc<AtomicUsize>,
    pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            upstream,
            accepted: Arc::default(),
            pipes: Arc::default(),
            acceptor: None,
        };
        proxy.accept_on(listener);
        proxy
    }

    fn accept_on(&mut self, listener: TcpListener) {
        let (upstream, accepted, pipes) =
            (self.upstream, self.accepted.clone(), self.pipes.clone());
        self.acceptor = Some(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                pipes.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        }));
    }

    /// Drops every connection and closes the port.
    async fn cut(&mut self) {
        let acceptor = self.acceptor.take().expect("the proxy is open");
        acceptor.abort();
        let _ = acceptor.await;
        let pipes: Vec<_> = self.pipes.lock().unwrap().drain(..).collect();
        for pipe in pipes {
            pipe.abort();
            let _ = pipe.await;
        }
    }

    /// Listens on the same port again.
    async fn reopen(&mut self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("rebind the proxy's port");
        self.accept_on(listener);
    }
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn the_binary_prints_one_readable_line_per_event_and_exits_0_on_ctrl_c() {
    let server = TestServer::start(|_| {}).await;
    let workspace = Workspace::new();
    // The token comes from TOLLGATE_TOKEN here.
    let mut tail = spawn_tail(
        &workspace,
        &["--url", &ws_url(server.addr)],
        Some(&server.admin_key),
    );
    wait_for_stderr(&tail, "connected to").await;
    assert!(tail.stderr().contains("resumed=false"), "{}", tail.stderr());

    let key_id = Uuid::new_v4();
    let hub = &server.state.hub;
    let published = [
        hub.publish(usage(key_id)),
        hub.publish(admin_action("k-1")),
        hub.publish(breaker()),
    ];
    wait_for_stdout_lines(&tail, 3).await;

    tail.signal("INT");
    let status = tail.wait_for_exit().await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", tail.stderr());
    let expected = vec![
        format!(
            "{}  usage.recorded  model=gpt-4o provider=openai key_id={key_id} input_tokens=12 output_tokens=34 cost_micros=560",
            local_time(&published[0])
        ),
        format!(
            "{}  audit.admin  actor=cli action=key.created target=k-1",
            local_time(&published[1])
        ),
        format!(
            "{}  circuit_breaker.state_changed  provider=openai from=closed to=open reason=\"5 consecutive failures\"",
            local_time(&published[2])
        ),
    ];
    assert_eq!(lines(&tail.stdout()), expected);
    for output in [tail.stdout(), tail.stderr()] {
        assert!(!output.contains(&server.admin_key), "the token was printed");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn json_prints_the_exact_envelopes_of_the_filtered_events() {
    let server = TestServer::start(|_| {}).await;
    let workspace = Workspace::new();
    let mut tail = spawn_tail(
        &workspace,
        &[
            "--url",
            &server.url(""), // http:// base URL, no path
            "--token",
            &server.admin_key,
            "--topics",
            "audit,usage",
            "--types",
            "audit.admin,usage.recorded",
            "--json",
        ],
        None,
    );
    wait_for_stderr(&tail, "\"type\":\"connected\"").await;

    let hub = &server.state.hub;
    hub.publish(ConfigReloaded {
        changed_sections: vec!["server".into()],
    }); // topic system: filtered out
    let first = hub.publish(admin_action("k-1"));
    hub.publish(AuditRequest {
        request_id: "r".into(),
        key_id: None,
        method: "GET".into(),
        path: "/v1/models".into(),
        model: None,
        provider: None,
        status: 200,
        latency_ms: 1,
        stream: false,
        error: None,
        request_body: None,
        response_text: None,
    }); // type audit.request: filtered out
    let second = hub.publish(usage(Uuid::new_v4()));
    hub.publish(breaker()); // topic circuit_breaker: filtered out
    let third = hub.publish(admin_action("k-2"));
    // Events arrive in order, so once the last wanted one is there every
    // unwanted one before it would have been too.
    wait_for_stdout_lines(&tail, 3).await;

    tail.signal("INT");
    let status = tail.wait_for_exit().await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", tail.stderr());
    assert_eq!(
        tail.stdout(),
        format!("{}\n{}\n{}\n", first.json, second.json, third.json)
    );
    // Control frames go to stderr as raw JSON.
    let connected: Value = serde_json::from_str(tail.stderr().lines().next().unwrap()).unwrap();
    assert_eq!(connected["type"], "connected");
    assert_eq!(
        connected["payload"]["topics"],
        serde_json::json!(["audit", "usage"])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_dropped_connection_is_resumed_with_every_event_exactly_once_in_order() {
    let server = TestServer::start(|_| {}).await;
    let mut proxy = Proxy::start(server.addr).await;
    let tail = InProcessTail::start(TailOptions {
        token: Some(server.admin_key.clone()),
        json: true,
        ..TailOptions::new(ws_url(proxy.addr))
    });
    tail.wait_for_stderr("\"type\":\"connected\"", 1).await;

    let hub = &server.state.hub;
    let mut published: Vec<_> = (0..3)
        .map(|n| hub.publish(admin_action(&format!("before-{n}"))))
        .collect();
    tail.wait_for_lines(3).await;

    // Cut every connection and refuse new ones while events keep coming.
    proxy.cut().await;
    published.extend((0..4).map(|n| hub.publish(admin_action(&format!("during-{n}")))));
    // The drop is noticed, and a reconnection attempt is refused and retried.
    tail.wait_for_stderr("warning: connection lost: ", 1).await;
    tail.wait_for_stderr("warning: reconnection failed: Connection refused", 1)
        .await;

    proxy.reopen().await;
    tail.wait_for_stderr("\"type\":\"connected\"", 2).await;
    published.extend((0..2).map(|n| hub.publish(admin_action(&format!("after-{n}")))));
    tail.wait_for_lines(9).await;

    let (out, err) = tail.stop().await;
    let expected: Vec<String> = published.iter().map(|e| e.json.to_string()).collect();
    assert_eq!(lines(&out), expected, "stderr:\n{err}");
    let ids: Vec<u64> = lines(&out)
        .iter()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            v["id"].as_str().unwrap().parse().unwrap()
        })
        .collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "ids are consecutive: {ids:?}"
    );
    // The second connection resumed after the last id printed before the cut.
    let connected: Vec<Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "connected")
        .collect();
    assert_eq!(connected.len(), 2, "{err}");
    assert_eq!(connected[0]["payload"]["resumed"], false);
    assert_eq!(connected[1]["payload"]["resumed"], true);
    assert!(
        err.contains(&format!("resuming after id {}", published[2].id)),
        "{err}"
    );
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn a_gateway_shutdown_is_shown_and_the_tail_keeps_retrying() {
    let server = TestServer::start(|_| {}).await;
    let tail = InProcessTail::start(TailOptions {
        token: Some(server.admin_key.clone()),
        ..TailOptions::new(ws_url(server.addr))
    });
    tail.wait_for_stderr("connected to", 1).await;
    server.state.hub.publish(admin_action("old"));
    tail.wait_for_lines(1).await;

    // Shutdown sends system.shutdown, then close 1001; the tail, having
    // been connected, retries against the closed port instead of exiting.
    server.shutdown().await;
    tail.wait_for_stderr("1001 server shutting down", 1).await;
    tail.wait_for_stderr("warning: reconnection failed: Connection refused", 2)
        .await;
    assert!(!tail.task.is_finished(), "{}", tail.err.text());

    let (out, err) = tail.stop().await;
    let printed = lines(&out);
    assert_eq!(printed.len(), 2, "{out}");
    assert!(
        printed[0].ends_with("  audit.admin  actor=cli action=key.created target=old"),
        "{out}"
    );
    assert!(printed[1].contains("  system.shutdown  "), "{out}");
    assert!(
        err.contains("connection lost: the gateway closed the stream (1001 server shutting down)"),
        "{err}"
    );
}

#[tokio::test]
async fn a_resume_beyond_the_kept_history_warns_and_continues_live() {
    let server = TestServer::start(|config| config.features.websocket.history_size = 2).await;
    let mut proxy = Proxy::start(server.addr).await;
    let tail = InProcessTail::start(TailOptions {
        token: Some(server.admin_key.clone()),
        ..TailOptions::new(ws_url(proxy.addr))
    });
    tail.wait_for_stderr("connected to", 1).await;
    let hub = &server.state.hub;
    let printed_before = hub.publish(admin_action("before"));
    tail.wait_for_lines(1).await;

    proxy.cut().await;
    tail.wait_for_stderr("connection lost", 1).await;
    // Five events while away; only the last two are kept.
    let away: Vec<_> = (0..5)
        .map(|n| hub.publish(admin_action(&format!("away-{n}"))))
        .collect();
    proxy.reopen().await;
    tail.wait_for_stderr("connected to", 2).await;
    hub.publish(admin_action("live"));
    tail.wait_for_lines(2).await;

    let (out, err) = tail.stop().await;
    let printed = lines(&out);
    assert_eq!(printed.len(), 2, "{out}");
    assert!(printed[0].ends_with("target=before"), "{out}");
    assert!(printed[1].ends_with("target=live"), "{out}");
    assert!(
        err.contains(&format!(
            "warning: resume_failed: the gateway no longer keeps the events after id {} (oldest kept: {})",
            printed_before.id, away[3].id
        )),
        "{err}"
    );
    assert!(err.contains("(resumed=false)"), "{err}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_revoked_key_is_refused_with_401_and_exit_code_1() {
    let server = TestServer::start(|_| {}).await;
    let (record, secret) = tollgate::auth::issue_api_key(&server.state.store, "gone", false, None)
        .await
        .unwrap();
    server.state.store.revoke_api_key(record.id).await.unwrap();
    let (code, stdout, stderr) =
        tail_to_exit(&["--url", &ws_url(server.addr), "--token", secret.expose()]).await;
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert_eq!(stdout, "");
    assert!(
        stderr.contains(
            "error: the gateway refused the stream: 401 Unauthorized: the API key has been revoked"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains(secret.expose()));
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_revoked_while_connected_ends_the_tail_with_exit_code_1() {
    let server = TestServer::start(|_| {}).await;
    let (record, secret) = tollgate::auth::issue_api_key(&server.state.store, "soon", false, None)
        .await
        .unwrap();
    let workspace = Workspace::new();
    let mut tail = spawn_tail(
        &workspace,
        &["--url", &ws_url(server.addr), "--token", secret.expose()],
        None,
    );
    wait_for_stderr(&tail, "connected to").await;
    assert!(tail.stderr().contains("as key `soon`"), "{}", tail.stderr());
    server.state.store.revoke_api_key(record.id).await.unwrap();
    server.state.revocations.notify(record.id);
    let status = tail.wait_for_exit().await;
    assert_eq!(status.code(), Some(1), "stderr:\n{}", tail.stderr());
    assert!(
        tail.stderr()
            .contains("error: the gateway closed the stream: API key revoked (close code 1008)"),
        "{}",
        tail.stderr()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_disabled_stream_is_refused_with_404_and_exit_code_1() {
    let server = TestServer::start(|config| config.features.websocket.enabled = false).await;
    let (code, _, stderr) =
        tail_to_exit(&["--url", &ws_url(server.addr), "--token", &server.admin_key]).await;
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains(
            "error: the gateway refused the stream: 404 Not Found: the event stream is disabled"
        ),
        "{stderr}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_full_gateway_is_refused_with_503_and_exit_code_1() {
    let server = TestServer::start(|config| config.features.websocket.max_connections = 1).await;
    let request = format!("{}?token={}", ws_url(server.addr), server.admin_key);
    let (_holder, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let (code, _, stderr) =
        tail_to_exit(&["--url", &ws_url(server.addr), "--token", &server.admin_key]).await;
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("error: the gateway refused the stream: 503 Service Unavailable: the gateway has 1 event streams open"),
        "{stderr}"
    );
    assert!(stderr.contains("(retry after 5 s)"), "{stderr}");
    server.shutdown().await;
}

#[tokio::test]
async fn an_unknown_topic_is_refused_with_400_and_exit_code_1() {
    let server = TestServer::start(|_| {}).await;
    let (code, _, stderr) = tail_to_exit(&[
        "--url",
        &ws_url(server.addr),
        "--token",
        &server.admin_key,
        "--topics",
        "billing",
    ])
    .await;
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("400 Bad Request: unknown topic `billing`"),
        "{stderr}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn no_gateway_on_the_first_attempt_exits_1_instead_of_retrying() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, _, stderr) = tail_to_exit(&["--url", &url]).await;
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: cannot connect to ws://127.0.0.1:{port}/ws/events: Connection refused"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("is the gateway running (`tollgate serve`) at that address?"),
        "{stderr}"
    );
    assert!(!stderr.contains("retrying"), "{stderr}");
}

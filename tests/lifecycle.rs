//! Starting and stopping the gateway: `tollgate serve` as a process
//! (bootstrap key on first start only, exit 0 on SIGTERM and SIGINT,
//! refusing a database it cannot open) and `/ready` following the database.

mod support;

use reqwest::StatusCode;
use serde_json::Value;
use support::{
    free_port, get_json, wait_until, TestDb, TestServer, TollgateProcess, Workspace, DEADLINE,
};

/// Starts `tollgate serve` on a free port of 127.0.0.1 with the workspace's
/// database, waits until `/health` answers and the startup log has been
/// read. Returns the process and its base URL.
async fn serve(workspace: &Workspace) -> (TollgateProcess, String) {
    let (process, addr, _) = workspace.serve("").await;
    // The log line comes after the bootstrap key, which is printed before
    // the listener serves; once it is read, the key has been too.
    wait_until("the startup log is read", DEADLINE, || async {
        process.stderr().contains("tollgate listening")
    })
    .await;
    (process, format!("http://{addr}"))
}

/// Sends `signal` and asserts that the process exits with status 0 within
/// the deadline. Returns everything it wrote to stderr.
async fn stop(mut process: TollgateProcess, signal: &str) -> String {
    process.signal(signal);
    let status = process.wait_for_exit().await;
    let stderr = process.stderr();
    assert_eq!(status.code(), Some(0), "after SIG{signal}: {stderr}");
    stderr
}

#[tokio::test]
async fn first_start_prints_a_bootstrap_key_once_and_signals_stop_the_gateway_with_exit_0() {
    let workspace = Workspace::new();

    let (process, base) = serve(&workspace).await;
    let response = reqwest::get(format!("{base}/health")).await.unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    let stderr = process.stderr();
    let start = stderr
        .find("gw_live_")
        .unwrap_or_else(|| panic!("no bootstrap key on first start:\n{stderr}"));
    let key = stderr[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(tollgate::auth::keys::is_well_formed(&key), "{key}");
    assert!(stderr.contains("`bootstrap`"), "{stderr}");

    // The printed key is the admin key of this database.
    let listed = get_json(&format!("{base}/admin/v1/keys"), &key).await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed["data"][0]["name"], "bootstrap");

    let stderr = stop(process, "TERM").await;
    assert_eq!(stderr.matches("gw_live_").count(), 1, "{stderr}");
    assert!(
        reqwest::get(format!("{base}/health")).await.is_err(),
        "still answering after exit"
    );

    // A second start on the same database prints no key, and SIGINT stops
    // it as cleanly.
    let (process, _) = serve(&workspace).await;
    let stdout = process.stdout();
    let stderr = stop(process, "INT").await;
    assert!(!stderr.contains("gw_live_"), "{stderr}");
    assert!(!stdout.contains("gw_live_"), "{stdout}");
}

/// comm → se.slice (ns) of every thread of `pid`; several threads of one
/// name must agree.
#[cfg(target_os = "linux")]
fn thread_slices(pid: u32) -> std::collections::BTreeMap<String, Vec<u64>> {
    let mut slices = std::collections::BTreeMap::<String, Vec<u64>>::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
        let sched = std::fs::read_to_string(dir.join("sched")).unwrap_or_default();
        let slice = sched
            .lines()
            .find(|l| l.starts_with("se.slice"))
            .and_then(|l| l.split(':').nth(1)?.trim().parse().ok());
        if let Some(slice) = slice {
            slices
                .entry(comm.trim().to_owned())
                .or_default()
                .push(slice);
        }
    }
    slices
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn serve_runs_requests_on_tollgate_request_threads_with_the_configured_slice() {
    if !tollgate::sched::slices_are_honoured() {
        eprintln!("skipped: this kernel ignores a chosen time slice (before Linux 6.12)");
        return;
    }
    let workspace = Workspace::new();
    let (process, _) = serve(&workspace).await;
    let slices = thread_slices(process.pid());
    // comm is cut to 15 bytes.
    let request = &slices["tollgate-reques"];
    // One worker per CPU, and the blocking pool's threads once used.
    assert!(request.len() >= tollgate_workers(), "{slices:?}");
    let wanted = u64::from(tollgate::config::DEFAULT_REQUEST_THREAD_SLICE_US) * 1_000;
    assert!(request.iter().all(|&s| s == wanted), "{slices:?}");
    // The event threads and the main thread keep the kernel's slice.
    let events = &slices["tollgate-events"];
    assert!(events.iter().all(|&s| s != wanted), "{slices:?}");
    stop(process, "TERM").await;
}

/// Worker threads of a default tokio runtime: one per CPU.
fn tollgate_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[tokio::test]
async fn serve_exits_1_when_the_database_cannot_be_opened_without_showing_its_password() {
    let workspace = Workspace::new();
    // Nothing listens on this port.
    let url = format!("postgres://app:hunter2@127.0.0.1:{}/x", free_port());
    let config = workspace.write(
        "tollgate.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\n\n[database]\nurl = \"{url}\"\n",
            free_port()
        ),
    );
    let mut command = workspace.command();
    command.arg("serve").arg("--config").arg(&config);
    let mut process = TollgateProcess::spawn(command);
    let status = process.wait_for_exit().await;
    let stderr = process.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot open the database"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(!stderr.contains("gw_live_"), "{stderr}");
}

async fn ready_status(server: &TestServer) -> reqwest::Response {
    reqwest::get(server.url("/ready"))
        .await
        .expect("the server answers")
}

async fn assert_unready(response: reqwest::Response) {
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
}

#[tokio::test]
async fn ready_answers_503_once_the_database_is_gone() {
    let server = TestServer::start(|_| {}).await;
    assert_eq!(ready_status(&server).await.status(), StatusCode::OK);
    // Closing the pool is as unavailable as a SQLite database gets while
    // its file is open.
    server.state.store.close().await;
    assert_unready(ready_status(&server).await).await;
    let health = reqwest::get(server.url("/health")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK, "liveness is not readiness");
    server.shutdown().await;
}

#[tokio::test]
async fn ready_answers_503_when_the_postgres_database_is_dropped() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let url = db.url.clone();
    let server = TestServer::start(|config| config.database.url = url).await;
    assert_eq!(
        server.state.store.backend(),
        tollgate::store::Backend::Postgres
    );
    assert_eq!(ready_status(&server).await.status(), StatusCode::OK);

    db.cleanup().await;
    wait_until("/ready answers 503", DEADLINE, || async {
        ready_status(&server).await.status() == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert_unready(ready_status(&server).await).await;
    server.shutdown().await;
}

/// A slow mock stream: about 10 chunks at 10 per second.
fn slow_streams(config: &mut tollgate::config::Config, shutdown_timeout_secs: u64) {
    config.server.shutdown_timeout_secs = shutdown_timeout_secs;
    let mock = config
        .providers
        .get_mut("mock")
        .expect("the default mock provider");
    mock.tokens_per_second = Some(10);
}

/// Starts a streamed chat request and returns its body once the first
/// chunk has arrived, so the request is certainly in flight.
async fn stream_in_flight(server: &TestServer) -> (reqwest::Response, Vec<u8>) {
    let key = server.create_key("app", false).await;
    let mut response = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"model": "mock-1", "stream": true,
            "messages": [{"role": "user", "content": "one two three four five six"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let first = tokio::time::timeout(DEADLINE, response.chunk())
        .await
        .expect("a first chunk in time")
        .unwrap()
        .expect("the stream has a first chunk");
    (response, first.to_vec())
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let server = TestServer::start(|c| slow_streams(c, 10)).await;
    let (mut response, mut body) = stream_in_flight(&server).await;
    let stopping = tokio::spawn(server.shutdown());
    while let Some(chunk) = tokio::time::timeout(DEADLINE, response.chunk())
        .await
        .expect("chunks keep coming during shutdown")
        .expect("the stream is not cut")
    {
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(body).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains(" six"), "the whole reply arrived: {text}");
    stopping.await.expect("the server stopped cleanly");
}

#[tokio::test]
async fn graceful_shutdown_stops_waiting_after_shutdown_timeout_secs() {
    let server = TestServer::start(|c| {
        slow_streams(c, 1);
        c.providers.get_mut("mock").unwrap().tokens_per_second = Some(1);
    })
    .await;
    let (response, _) = stream_in_flight(&server).await;
    let started = std::time::Instant::now();
    server.shutdown().await;
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(900)
            && waited < std::time::Duration::from_secs(5),
        "the server waited {waited:?} for a 1 s grace"
    );
    // `run` has returned although the 10-second stream is still going: in
    // the binary, the process exits here and the connection ends with it.
    drop(response);
}

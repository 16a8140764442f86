//! The ledger writer's counters in `/metrics`, end to end (`tollgate serve`
//! as a process, so that its counters hold only this test's requests): a
//! burst of requests is written whole, in transactions started at least
//! `ledger::MIN_COMMIT_INTERVAL` apart, and a request after a quiet spell
//! gets one of its own. (The pacing itself is tested exactly, on paused
//! time, in `src/ledger.rs`.)

mod support;

use std::time::{Duration, Instant};

use support::{get_json, post_chat, wait_until, Workspace, DEADLINE};
use tollgate::ledger::MIN_COMMIT_INTERVAL;

/// `tollgate_ledger_records_total` and `tollgate_ledger_transactions_total`
/// from `/metrics` (0 before the first write registers them).
async fn ledger_counters(base: &str) -> (u64, u64) {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("a text body");
    let counter = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .map(|value| value.trim().parse::<u64>().expect("an integer counter"))
            .unwrap_or(0)
    };
    (
        counter("tollgate_ledger_records_total"),
        counter("tollgate_ledger_transactions_total"),
    )
}

#[tokio::test]
async fn a_burst_of_requests_is_counted_whole_in_transactions_an_interval_apart() {
    const REQUESTS: u64 = 60;
    /// Requests start this far apart, each in its own task.
    const SPACING: Duration = Duration::from_millis(1);

    let workspace = Workspace::new();
    let (_process, addr, config) = workspace.serve("").await;
    let base = format!("http://{addr}");
    // An admin key, so that it can read the usage totals as well.
    let created = workspace.keys(&config, &["create", "--name", "pacing", "--admin"]);
    let key = created
        .lines()
        .last()
        .expect("the new key")
        .trim()
        .to_owned();
    let http = reqwest::Client::new();
    // One request first: the key is verified and cached, the connection
    // pool warm, and the counters exist.
    assert_eq!(chat(&http, &base, &key, 0).await, 200);
    let deadline = Instant::now() + DEADLINE;
    while ledger_counters(&base).await != (1, 1) {
        assert!(
            Instant::now() < deadline,
            "the first request was not written"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let started = Instant::now();
    let mut ticks = tokio::time::interval(SPACING);
    let mut requests = Vec::new();
    for n in 1..=REQUESTS {
        ticks.tick().await;
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        requests.push(tokio::spawn(
            async move { chat(&http, &base, &key, n).await },
        ));
    }
    for request in requests {
        assert_eq!(request.await.expect("a request task"), 200);
    }
    let (records, transactions) = loop {
        let counters = ledger_counters(&base).await;
        if counters.0 > REQUESTS {
            break counters;
        }
        assert!(
            Instant::now() < deadline,
            "the ledger has {counters:?} after {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let elapsed = started.elapsed();
    assert_eq!(records, REQUESTS + 1);
    let transactions = transactions - 1;

    // Transactions start at least MIN_COMMIT_INTERVAL apart, so however
    // slow the machine, there are at most elapsed / interval + 1 of them.
    // (A debug build's transaction takes about as long as the interval, so
    // this bound cannot tell pacing from natural batching here; the unit
    // tests in src/ledger.rs can.)
    let bound = (elapsed.as_micros() / MIN_COMMIT_INTERVAL.as_micros()) as u64 + 1;
    assert!(
        (1..=bound).contains(&transactions),
        "{REQUESTS} records took {transactions} transactions in {elapsed:?} (at most {bound} allowed)"
    );

    // Nothing lost or doubled: the ledger's own totals agree.
    let usage = get_json(&format!("{base}/admin/v1/usage"), &key).await;
    assert_eq!(usage["totals"]["requests"], REQUESTS + 1, "{usage}");

    // After a quiet spell, one request is one transaction of its own.
    tokio::time::sleep(MIN_COMMIT_INTERVAL * 4).await;
    assert_eq!(
        ledger_counters(&base).await,
        (REQUESTS + 1, transactions + 1)
    );
    assert_eq!(chat(&http, &base, &key, REQUESTS + 1).await, 200);
    wait_until("the lone request is in the ledger", DEADLINE, || async {
        ledger_counters(&base).await == (REQUESTS + 2, transactions + 2)
    })
    .await;
}

/// One chat request to the built-in mock model; its status.
async fn chat(http: &reqwest::Client, base: &str, key: &str, n: u64) -> u16 {
    post_chat(http, base, key, "mock-1", &format!("request {n}"))
        .await
        .status()
        .as_u16()
}

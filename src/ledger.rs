//! The request ledger: every finished `/v1/*` request is written to the
//! store — its usage row (when it reached a provider) and its audit row in
//! one transaction — and only then published as `usage.recorded` and
//! `audit.request`, so an event never announces a row that is not there.
//!
//! Requests hand their record to [`RequestLedger::record`], which never
//! blocks (it may be called from a dropped stream). One writer task drains
//! everything queued into each transaction, so the store sees one commit per
//! burst rather than one per request, and retries a failed write until it
//! lands: a database outage delays records, it does not lose them.
//!
//! Under load the writer also paces itself: it starts a transaction at most
//! once per [`MIN_COMMIT_INTERVAL`], so records arriving faster than that
//! share one commit and their events reach subscribers in one burst. A
//! record after a quiet spell is written at once; none waits longer than
//! the interval (plus the write before it).

use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use std::sync::Arc;

use crate::budget::{BudgetBook, BudgetCrossing, BudgetRef};
use crate::events::model::{AuditRequest, EventPayload, GuardrailViolation, UsageRecorded};
use crate::events::EventHub;
use crate::store::{LedgerRow, NewAuditRecord, SpendIncrement, Store};

/// Records drained into one transaction at most.
const MAX_BATCH: usize = 512;

/// A batch's events are published together, so a subscriber with one
/// event still unread must have room for all of them: a batch holds at
/// most a quarter of the smallest subscriber channel in records (each
/// publishes two events, more with guardrail hits or budget alerts).
fn batch_limit(smallest_channel_capacity: usize) -> usize {
    (smallest_channel_capacity / 4).clamp(1, MAX_BATCH)
}

/// The shortest time between the starts of two ledger transactions. At
/// 2,000 requests/s it turns ~1,000 commits of one or two rows into 50 of
/// forty, and each subscriber's hundreds of small writes into fewer,
/// fuller ones. 5, 10 and 20 ms were measured (BENCHMARKS.md): from 10 to
/// 20 ms the gateway's CPU per request fell by 7–13 % at 2,000 req/s and
/// by 28 % at 500, its write calls by a third. The events are at most this
/// much later (plus a subscriber's spread phase, [`crate::events::ws`]),
/// well inside the 100 ms they are promised in.
pub const MIN_COMMIT_INTERVAL: Duration = Duration::from_millis(20);

/// One finished request.
#[derive(Debug, Clone)]
pub struct FinishedRequest {
    /// When the request finished.
    pub at: chrono::DateTime<Utc>,
    pub audit: AuditRequest,
    /// Present when the request reached a provider on behalf of a key.
    pub ledger: Option<LedgerRow>,
    /// The budgets the request's cost counts against.
    pub budgets: Vec<BudgetRef>,
    /// Guardrail hits of the request, kept and published with it.
    pub violations: Vec<GuardrailViolation>,
}

enum Message<T> {
    Record(Box<T>),
    /// Write what is queued, then stop and answer.
    Close(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct RequestLedger {
    queue: mpsc::UnboundedSender<Message<FinishedRequest>>,
}

impl RequestLedger {
    /// Starts the writer task on `runtime` (the event runtime: the writer
    /// publishes every request's events).
    pub fn start(
        store: Store,
        hub: EventHub,
        book: Arc<BudgetBook>,
        runtime: &tokio::runtime::Handle,
    ) -> RequestLedger {
        let (queue, receiver) = mpsc::unbounded_channel();
        runtime.spawn(write_loop(store, hub, book, receiver));
        RequestLedger { queue }
    }

    pub fn record(&self, finished: FinishedRequest) {
        if self
            .queue
            .send(Message::Record(Box::new(finished)))
            .is_err()
        {
            tracing::error!("a request finished after the ledger closed; its record is lost");
        }
    }

    /// Writes everything queued and stops the writer.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.queue.send(Message::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}

async fn write_loop(
    store: Store,
    hub: EventHub,
    book: Arc<BudgetBook>,
    receiver: mpsc::UnboundedReceiver<Message<FinishedRequest>>,
) {
    let limit = || batch_limit(hub.smallest_channel_capacity());
    gather(receiver, MIN_COMMIT_INTERVAL, limit, |mut batch| {
        let (store, hub, book) = (&store, &hub, &book);
        async move {
            write_batch(store, hub, book, &mut batch).await;
            batch
        }
    })
    .await
}

/// Receives records into batches of at most `limit()` and hands each to
/// `write` (which gives the emptied vector back), until a `Close` has been
/// answered or every sender is gone. A write starts at least `interval`
/// after the one before it unless that one was full, so a busy spell's
/// records gather while a record after a quiet spell goes at once.
async fn gather<T, F, Fut>(
    mut receiver: mpsc::UnboundedReceiver<Message<T>>,
    interval: Duration,
    limit: impl Fn() -> usize,
    mut write: F,
) where
    F: FnMut(Vec<T>) -> Fut,
    Fut: Future<Output = Vec<T>>,
{
    let mut batch = Vec::new();
    let mut next_write_at: Option<Instant> = None;
    while let Some(first) = receiver.recv().await {
        if let (Message::Record(_), Some(at)) = (&first, next_write_at) {
            if at > Instant::now() {
                tokio::time::sleep_until(at).await;
            }
        }
        let limit = limit().max(1);
        let mut close = None;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Record(record) => batch.push(*record),
                Message::Close(done) => {
                    close = Some(done);
                    break;
                }
            }
            if batch.len() < limit {
                next = receiver.try_recv().ok();
            }
        }
        if let Some(done) = close {
            // Close writes whatever else is queued behind it too, at once
            // and still in batches of the limit.
            loop {
                while batch.len() < limit {
                    match receiver.try_recv() {
                        Ok(Message::Record(record)) => batch.push(*record),
                        _ => break,
                    }
                }
                if batch.is_empty() {
                    break;
                }
                batch = write(batch).await;
                batch.clear();
            }
            let _ = done.send(());
            return;
        }
        next_write_at = (batch.len() < limit).then(|| Instant::now() + interval);
        batch = write(batch).await;
        batch.clear();
    }
}

async fn write_batch(
    store: &Store,
    hub: &EventHub,
    book: &BudgetBook,
    batch: &mut Vec<FinishedRequest>,
) {
    // Each request's cost is added to each of its budgets' counters for the
    // period its ledger row falls in.
    let mut spends = Vec::new();
    let mut spent_by = Vec::new();
    for finished in batch.iter() {
        let Some(row) = finished.ledger.as_ref().filter(|r| r.cost_micros > 0) else {
            continue;
        };
        for budget in &finished.budgets {
            let period_start = budget.period.start(row.at);
            spends.push(SpendIncrement {
                budget: budget.name.clone(),
                scope_key: budget.scope_key(),
                period_start_ms: period_start.timestamp_millis(),
                amount: row.cost_micros,
            });
            spent_by.push((budget, period_start));
        }
    }
    let ledger: Vec<LedgerRow> = batch.iter().filter_map(|f| f.ledger.clone()).collect();
    let mut audit: Vec<NewAuditRecord> = Vec::with_capacity(batch.len());
    for f in batch.iter() {
        for violation in &f.violations {
            audit.push(NewAuditRecord {
                at: f.at,
                event_type: "audit.guardrail_violation",
                key_id: violation.key_id,
                request_id: Some(violation.request_id.clone()),
                payload: serde_json::to_string(violation).expect("audit payloads serialise"),
            });
        }
        audit.push(NewAuditRecord {
            at: f.at,
            event_type: "audit.request",
            key_id: f.audit.key_id,
            request_id: Some(f.audit.request_id.clone()),
            payload: serde_json::to_string(&f.audit).expect("audit payloads serialise"),
        });
    }
    let mut backoff = Duration::from_millis(50);
    let totals = loop {
        match store.record_requests(&ledger, &audit, &spends).await {
            Ok(totals) => break totals,
            Err(error) => {
                tracing::error!(%error, records = batch.len(), retry_in_ms = backoff.as_millis() as u64,
                    "cannot write the request ledger; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    metrics::counter!("tollgate_ledger_transactions_total").increment(1);
    metrics::counter!("tollgate_ledger_records_total").increment(batch.len() as u64);
    let mut crossings = Vec::new();
    for ((spend, (budget, period_start)), total) in spends.iter().zip(spent_by).zip(totals) {
        book.observe(
            &spend.budget,
            &spend.scope_key,
            spend.period_start_ms,
            total,
        );
        crossings.extend(budget.crossings(total - spend.amount, total, period_start));
    }
    for mut finished in batch.drain(..) {
        for violation in finished.violations.drain(..) {
            hub.publish(violation);
        }
        if let Some(row) = &finished.ledger {
            if row.input_tokens > 0 || row.output_tokens > 0 {
                hub.publish(UsageRecorded {
                    request_id: row.request_id.clone(),
                    key_id: row.key_id,
                    model: row.model.clone(),
                    provider: row.provider.clone(),
                    input_tokens: row.input_tokens,
                    output_tokens: row.output_tokens,
                    cost_micros: row.cost_micros,
                    estimated: row.estimated,
                });
            }
        }
        hub.publish(finished.audit);
    }
    for crossing in crossings {
        hub.publish(match crossing {
            BudgetCrossing::Threshold(alert) => EventPayload::BudgetThresholdReached(alert),
            BudgetCrossing::Exceeded(alert) => EventPayload::BudgetExceeded(alert),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(5);

    /// When each write started, and its batch.
    type Writes = Vec<(Instant, Vec<u32>)>;

    /// Runs [`gather`] with batches of at most `limit` and a writer that
    /// takes no time and notes when each batch started and what it held.
    fn start_gathering(
        limit: usize,
    ) -> (
        mpsc::UnboundedSender<Message<u32>>,
        tokio::task::JoinHandle<Writes>,
    ) {
        let (queue, receiver) = mpsc::unbounded_channel();
        let writer = tokio::spawn(async move {
            let mut writes = Vec::new();
            gather(
                receiver,
                INTERVAL,
                move || limit,
                |batch: Vec<u32>| {
                    writes.push((Instant::now(), batch.clone()));
                    async move { batch }
                },
            )
            .await;
            writes
        });
        (queue, writer)
    }

    fn send(queue: &mpsc::UnboundedSender<Message<u32>>, record: u32) {
        assert!(queue.send(Message::Record(Box::new(record))).is_ok());
    }

    async fn close(queue: &mpsc::UnboundedSender<Message<u32>>) {
        let (done, closed) = oneshot::channel();
        assert!(queue.send(Message::Close(done)).is_ok());
        closed.await.expect("the writer answers Close");
    }

    #[tokio::test(start_paused = true)]
    async fn records_a_millisecond_apart_share_writes_started_an_interval_apart() {
        let (queue, writer) = start_gathering(MAX_BATCH);
        let start = Instant::now();
        for record in 0..20 {
            send(&queue, record);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        close(&queue).await;
        let writes = writer.await.unwrap();

        // Every record once, in order.
        let written: Vec<u32> = writes.iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(written, (0..20).collect::<Vec<_>>());
        // The first goes at once; the others gather for the interval.
        assert_eq!(writes[0], (start, vec![0]));
        for pair in writes.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= INTERVAL, "{writes:?}");
        }
        // 20 ms of records: the first alone, then one write per interval.
        assert_eq!(writes.len(), 5, "{writes:?}");
        assert_eq!(writes[1].1, vec![1, 2, 3, 4, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_after_a_quiet_spell_is_written_at_once() {
        let (queue, writer) = start_gathering(MAX_BATCH);
        send(&queue, 1);
        tokio::time::sleep(INTERVAL * 3).await;
        let alone = Instant::now();
        send(&queue, 2);
        tokio::time::sleep(Duration::from_millis(1)).await;
        close(&queue).await;
        let writes = writer.await.unwrap();
        assert_eq!(writes.len(), 2, "{writes:?}");
        assert_eq!(writes[1], (alone, vec![2]));
    }

    #[tokio::test(start_paused = true)]
    async fn close_writes_everything_queued_within_one_interval() {
        let (queue, writer) = start_gathering(MAX_BATCH);
        send(&queue, 1);
        tokio::task::yield_now().await;
        let closing = Instant::now();
        send(&queue, 2);
        send(&queue, 3);
        close(&queue).await;
        assert!(Instant::now() - closing <= INTERVAL);
        let writes = writer.await.unwrap();
        let sizes: Vec<_> = writes.iter().map(|(_, b)| b.clone()).collect();
        assert_eq!(sizes, vec![vec![1], vec![2, 3]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_does_not_hold_back_the_next() {
        let (queue, writer) = start_gathering(3);
        let start = Instant::now();
        for record in 0..7 {
            send(&queue, record);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        // The last write was not full, so this one waits for the interval.
        send(&queue, 7);
        close(&queue).await;
        let writes = writer.await.unwrap();
        let batches: Vec<_> = writes.iter().map(|(_, b)| b.clone()).collect();
        assert_eq!(
            batches,
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6], vec![7]]
        );
        assert!(writes[..3].iter().all(|(at, _)| *at == start), "{writes:?}");
        assert_eq!(writes[3].0, start + INTERVAL);
    }

    #[tokio::test(start_paused = true)]
    async fn close_writes_what_is_queued_behind_it_at_once_in_batches_of_the_limit() {
        let (queue, writer) = start_gathering(2);
        send(&queue, 0);
        tokio::task::yield_now().await;
        let closing = Instant::now();
        let (done, closed) = oneshot::channel();
        assert!(queue.send(Message::Close(done)).is_ok());
        // Requests that finished while the server was stopping.
        for record in 1..6 {
            send(&queue, record);
        }
        closed.await.expect("the writer answers Close");
        assert_eq!(Instant::now(), closing);
        let writes = writer.await.unwrap();
        let batches: Vec<_> = writes.iter().map(|(_, b)| b.clone()).collect();
        assert_eq!(batches, vec![vec![0], vec![1, 2], vec![3, 4], vec![5]]);
    }

    #[test]
    fn a_batch_leaves_room_in_the_smallest_subscriber_channel() {
        assert_eq!(batch_limit(1024), 256);
        assert_eq!(batch_limit(100), 25);
        assert_eq!(batch_limit(3), 1);
        assert_eq!(batch_limit(1 << 20), MAX_BATCH);
    }
}

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

use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};

use std::sync::Arc;

use crate::budget::{BudgetBook, BudgetCrossing, BudgetRef};
use crate::events::model::{AuditRequest, EventPayload, GuardrailViolation, UsageRecorded};
use crate::events::EventHub;
use crate::store::{LedgerRow, NewAuditRecord, SpendIncrement, Store};

/// Records drained into one transaction at most.
const MAX_BATCH: usize = 512;

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

enum Message {
    Record(Box<FinishedRequest>),
    /// Write what is queued, then stop and answer.
    Close(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct RequestLedger {
    queue: mpsc::UnboundedSender<Message>,
}

impl RequestLedger {
    /// Starts the writer task.
    pub fn start(store: Store, hub: EventHub, book: Arc<BudgetBook>) -> RequestLedger {
        let (queue, receiver) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(store, hub, book, receiver));
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
    mut receiver: mpsc::UnboundedReceiver<Message>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = receiver.recv().await {
        let mut close = None;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Record(finished) => batch.push(*finished),
                Message::Close(done) => {
                    close = Some(done);
                    break;
                }
            }
            if batch.len() < MAX_BATCH {
                next = receiver.try_recv().ok();
            }
        }
        // Close drains whatever else is queued behind it too.
        if close.is_some() {
            while let Ok(Message::Record(finished)) = receiver.try_recv() {
                batch.push(*finished);
            }
        }
        if !batch.is_empty() {
            write_batch(&store, &hub, &book, &mut batch).await;
        }
        if let Some(done) = close {
            let _ = done.send(());
            return;
        }
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

//! Once a second, notices what changed in the store without passing
//! through this process: keys revoked by the CLI or another node, keys that
//! just expired (their streams must close), admin actions recorded by the
//! CLI (published here as `audit.admin`), and budget spend of the current
//! periods (other gateways' requests count too). Once an hour it deletes
//! sessions that ended or expired over a day ago.

use std::time::Duration;

use chrono::Utc;

use crate::budget::Period;
use crate::events::model::AdminAction;
use crate::server::AppState;

const PERIOD: Duration = Duration::from_secs(1);
/// Revocations are looked for a little before the last check too, so a
/// write that committed just before a check with an earlier timestamp is
/// not missed. A repeated notice is harmless.
const OVERLAP: chrono::Duration = chrono::Duration::seconds(2);
/// How often dead sessions are deleted, and how long they are kept first.
const SESSION_PURGE_EVERY: u32 = 3600;
const SESSION_KEEP: chrono::Duration = chrono::Duration::days(1);

/// Runs until the server shuts down.
pub async fn run(state: AppState) {
    let mut last_check = Utc::now();
    let mut ticker = tokio::time::interval(PERIOD);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Utc::now();
        match state
            .store
            .keys_invalidated_between(last_check - OVERLAP, now)
            .await
        {
            Ok(ids) => {
                for id in ids {
                    state.key_invalidated(id);
                }
                last_check = now;
            }
            Err(error) => tracing::warn!(%error, "cannot check the store for revoked keys"),
        }
        match state.store.claim_unpublished_admin_actions(100).await {
            Ok(actions) => {
                for action in actions {
                    state.hub.publish(AdminAction {
                        actor: action.actor,
                        action: action.action,
                        target: action.target,
                    });
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read admin actions from the store"),
        }
        refresh_budget_book(&state).await;
        if ticks.is_multiple_of(SESSION_PURGE_EVERY) {
            match state.store.purge_sessions(now - SESSION_KEEP).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(sessions = n, "deleted ended and expired sessions"),
                Err(error) => tracing::warn!(%error, "cannot delete old sessions"),
            }
        }
        ticks = ticks.wrapping_add(1);
    }
}

/// Loads the current periods' counters into the budget book.
async fn refresh_budget_book(state: &AppState) {
    let now = state.clock.now();
    let mut starts: Vec<i64> = [
        Period::Daily,
        Period::Weekly,
        Period::Monthly,
        Period::Total,
    ]
    .into_iter()
    .map(|p| p.start(now).timestamp_millis())
    .collect();
    starts.sort_unstable();
    starts.dedup();
    match state.store.budget_spend_in(&starts).await {
        Ok(rows) => {
            for row in rows {
                state.budget_book.observe(
                    &row.budget,
                    &row.scope_key,
                    row.period_start_ms,
                    row.spent_micros,
                );
            }
            state.budget_book.forget_before(starts[0]);
        }
        Err(error) => tracing::warn!(%error, "cannot read budget spend from the store"),
    }
}

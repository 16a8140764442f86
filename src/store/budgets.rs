//! The `budget_state` table: spend per budget, counter and period, added to
//! atomically so that concurrent requests and several gateways agree.

use sqlx::any::Any;
use sqlx::Row;

use super::{Store, StoreError};

/// One counter's spend in one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetSpend {
    pub budget: String,
    pub scope_key: String,
    pub period_start_ms: i64,
    pub spent_micros: i64,
}

/// Adds `amount` to a counter inside `tx` and returns the new total.
pub(crate) async fn add_spend(
    tx: &mut sqlx::Transaction<'_, Any>,
    budget: &str,
    scope_key: &str,
    period_start_ms: i64,
    amount: i64,
) -> Result<i64, StoreError> {
    let row = sqlx::query(
        "INSERT INTO budget_state (budget, scope_key, period_start, spent_micros) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (budget, scope_key, period_start) \
         DO UPDATE SET spent_micros = budget_state.spent_micros + excluded.spent_micros \
         RETURNING spent_micros",
    )
    .bind(budget)
    .bind(scope_key)
    .bind(period_start_ms)
    .bind(amount)
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.try_get("spent_micros")?)
}

impl Store {
    /// Every counter of the periods starting at one of `period_starts_ms`.
    pub async fn budget_spend_in(
        &self,
        period_starts_ms: &[i64],
    ) -> Result<Vec<BudgetSpend>, StoreError> {
        let mut out = Vec::new();
        for start in period_starts_ms {
            let rows = sqlx::query(
                "SELECT budget, scope_key, period_start, spent_micros FROM budget_state WHERE period_start = $1",
            )
            .bind(*start)
            .fetch_all(&self.pool)
            .await?;
            for row in rows {
                out.push(BudgetSpend {
                    budget: row.try_get("budget")?,
                    scope_key: row.try_get("scope_key")?,
                    period_start_ms: row.try_get("period_start")?,
                    spent_micros: row.try_get("spent_micros")?,
                });
            }
        }
        Ok(out)
    }
}

//! The `usage_ledger` table: one row per proxied request of a known key,
//! written together with the request's audit row, and the totals behind
//! `GET /admin/v1/usage`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use uuid::Uuid;

use super::{from_millis, to_millis, NewAuditRecord, Store, StoreError};

/// One request's usage, as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerRow {
    pub at: DateTime<Utc>,
    pub request_id: String,
    pub key_id: Uuid,
    pub model: String,
    pub provider: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_micros: i64,
    pub latency_ms: i64,
    pub status: i64,
    pub streamed: bool,
    pub estimated: bool,
}

/// Spend to add to one budget counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendIncrement {
    pub budget: String,
    pub scope_key: String,
    pub period_start_ms: i64,
    pub amount: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGrouping {
    Key,
    Model,
    Day,
}

/// Filters of `GET /admin/v1/usage`.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub key_id: Option<Uuid>,
    pub model: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub group_by: Option<UsageGrouping>,
}

/// Totals of one group (or of everything, with no grouping).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageGroup {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `YYYY-MM-DD`, UTC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_micros: i64,
}

const DAY_MS: i64 = 86_400_000;

/// Rows per multi-row INSERT: at 12 parameters a row, far below the
/// parameters a statement may have (SQLite 32,766; PostgreSQL 65,535).
const ROWS_PER_INSERT: usize = 200;

/// `($1, …, $n<extra>), ($n+1, …)` for `rows` rows of `params` parameters
/// each, `extra` (literal SQL) closing every row.
fn values_clause(rows: usize, params: usize, extra: &str) -> String {
    let mut sql = String::with_capacity(rows * (params * 5 + extra.len() + 4));
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for param in 0..params {
            if param > 0 {
                sql.push_str(", ");
            }
            sql.push('$');
            sql.push_str(&(row * params + param + 1).to_string());
        }
        sql.push_str(extra);
        sql.push(')');
    }
    sql
}

impl Store {
    /// Writes finished requests in one transaction: their ledger rows and
    /// audit rows land together or not at all.
    ///
    /// `spends` are added to their budget counters in the same transaction;
    /// the new totals come back in the same order.
    pub async fn record_requests(
        &self,
        ledger: &[LedgerRow],
        audit: &[NewAuditRecord],
        spends: &[SpendIncrement],
    ) -> Result<Vec<i64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut totals = Vec::with_capacity(spends.len());
        for spend in spends {
            totals.push(
                super::budgets::add_spend(
                    &mut tx,
                    &spend.budget,
                    &spend.scope_key,
                    spend.period_start_ms,
                    spend.amount,
                )
                .await?,
            );
        }
        // Many rows per statement: one round trip to the database (a
        // thread hop for SQLite, a network trip for PostgreSQL) per chunk
        // rather than per row.
        for rows in ledger.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO usage_ledger (at, request_id, key_id, model, provider, input_tokens, \
                 output_tokens, cost_micros, latency_ms, status, streamed, estimated) VALUES {}",
                values_clause(rows.len(), 12, "")
            );
            let mut query = sqlx::query(&sql);
            for row in rows {
                query = query
                    .bind(to_millis(row.at))
                    .bind(&row.request_id)
                    .bind(row.key_id.to_string())
                    .bind(&row.model)
                    .bind(&row.provider)
                    .bind(row.input_tokens)
                    .bind(row.output_tokens)
                    .bind(row.cost_micros)
                    .bind(row.latency_ms)
                    .bind(row.status)
                    .bind(i64::from(row.streamed))
                    .bind(i64::from(row.estimated));
            }
            query.execute(&mut *tx).await?;
        }
        for records in audit.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO audit_log (at, event_type, key_id, request_id, payload, published) \
                 VALUES {}",
                values_clause(records.len(), 5, ", 1")
            );
            let mut query = sqlx::query(&sql);
            for record in records {
                query = query
                    .bind(to_millis(record.at))
                    .bind(record.event_type)
                    .bind(record.key_id.map(|k| k.to_string()))
                    .bind(record.request_id.clone())
                    .bind(&record.payload);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(totals)
    }

    /// The ledger rows of one request (normally one), for checks and support.
    pub async fn ledger_rows_for_request(
        &self,
        request_id: &str,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, request_id, key_id, model, provider, input_tokens, output_tokens, cost_micros, \
             latency_ms, status, streamed, estimated FROM usage_ledger WHERE request_id = $1 ORDER BY id",
        )
        .bind(request_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let key_id: String = row.try_get("key_id")?;
                Ok(LedgerRow {
                    at: from_millis(row.try_get("at")?),
                    request_id: row.try_get("request_id")?,
                    key_id: Uuid::parse_str(&key_id)
                        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                    model: row.try_get("model")?,
                    provider: row.try_get("provider")?,
                    input_tokens: row.try_get("input_tokens")?,
                    output_tokens: row.try_get("output_tokens")?,
                    cost_micros: row.try_get("cost_micros")?,
                    latency_ms: row.try_get("latency_ms")?,
                    status: row.try_get("status")?,
                    streamed: row.try_get::<i64, _>("streamed")? != 0,
                    estimated: row.try_get::<i64, _>("estimated")? != 0,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Token and cost totals, optionally grouped, largest cost first (days
    /// in date order).
    pub async fn usage_totals(&self, query: &UsageQuery) -> Result<Vec<UsageGroup>, StoreError> {
        let (select, group_order) = match query.group_by {
            None => (String::new(), String::new()),
            Some(grouping) => {
                let column = match grouping {
                    UsageGrouping::Key => "key_id",
                    UsageGrouping::Model => "model",
                    UsageGrouping::Day => "at / 86400000",
                };
                let order = if grouping == UsageGrouping::Day {
                    "g"
                } else {
                    "cost_micros DESC, g"
                };
                (
                    format!("{column} AS g, "),
                    format!("GROUP BY {column} ORDER BY {order}"),
                )
            }
        };
        // Sums are cast back to BIGINT: PostgreSQL widens SUM(bigint) to
        // NUMERIC, which the portable driver does not decode.
        let sql = format!(
            "SELECT {select}CAST(COUNT(*) AS BIGINT) AS requests, \
             CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens, \
             CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens, \
             CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) AS cost_micros \
             FROM usage_ledger \
             WHERE ($1 = 0 OR key_id = $2) AND ($3 = 0 OR model = $4) \
               AND ($5 = 0 OR at >= $6) AND ($7 = 0 OR at < $8) \
             {group_order}"
        );
        let rows = sqlx::query(&sql)
            .bind(i64::from(query.key_id.is_some()))
            .bind(query.key_id.map(|k| k.to_string()).unwrap_or_default())
            .bind(i64::from(query.model.is_some()))
            .bind(query.model.clone().unwrap_or_default())
            .bind(i64::from(query.from.is_some()))
            .bind(query.from.map(to_millis).unwrap_or(0))
            .bind(i64::from(query.to.is_some()))
            .bind(query.to.map(to_millis).unwrap_or(0))
            .fetch_all(&self.pool)
            .await?;
        let mut groups = Vec::with_capacity(rows.len());
        for row in rows {
            let mut group = UsageGroup {
                key_id: None,
                model: None,
                day: None,
                requests: row.try_get("requests")?,
                input_tokens: row.try_get("input_tokens")?,
                output_tokens: row.try_get("output_tokens")?,
                cost_micros: row.try_get("cost_micros")?,
            };
            match query.group_by {
                None => {}
                Some(UsageGrouping::Key) => {
                    let key: String = row.try_get("g")?;
                    group.key_id = Uuid::parse_str(&key).ok();
                }
                Some(UsageGrouping::Model) => group.model = Some(row.try_get("g")?),
                Some(UsageGrouping::Day) => {
                    let day: i64 = row.try_get("g")?;
                    group.day = Some(from_millis(day * DAY_MS).format("%Y-%m-%d").to_string());
                }
            }
            groups.push(group);
        }
        Ok(groups)
    }
}

#[cfg(test)]
mod tests {
    use super::values_clause;

    #[test]
    fn values_clauses_number_every_parameter_once_in_order() {
        assert_eq!(values_clause(1, 2, ""), "($1, $2)");
        assert_eq!(
            values_clause(3, 2, ", 1"),
            "($1, $2, 1), ($3, $4, 1), ($5, $6, 1)"
        );
        let many = values_clause(200, 12, "");
        assert!(many.starts_with("($1, $2,") && many.ends_with("$2399, $2400)"));
        assert_eq!(many.matches('$').count(), 2400);
    }
}

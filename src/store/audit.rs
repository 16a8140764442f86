//! The `audit_log` table: every `audit.*` event kept with its payload, and
//! the outbox through which actions taken by the CLI reach the event stream.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{from_millis, to_millis, Store, StoreError};

/// An audit row as stored and listed by `GET /admin/v1/audit`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// Opaque, increasing; the pagination cursor.
    pub id: i64,
    pub at: DateTime<Utc>,
    #[serde(rename = "type")]
    pub event_type: String,
    pub key_id: Option<Uuid>,
    pub request_id: Option<String>,
    pub payload: serde_json::Value,
}

/// An audit row to write.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditRecord {
    pub at: DateTime<Utc>,
    pub event_type: &'static str,
    pub key_id: Option<Uuid>,
    pub request_id: Option<String>,
    /// The event payload as JSON text.
    pub payload: String,
}

/// An admin action claimed from the outbox, to publish as `audit.admin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminActionRecord {
    pub id: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
}

/// Filters of `GET /admin/v1/audit`, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub since: Option<DateTime<Utc>>,
    pub event_type: Option<String>,
    pub key_id: Option<Uuid>,
    /// Rows older than this id (the previous page's `next_cursor`).
    pub before_id: Option<i64>,
    pub limit: i64,
}

fn audit_record(row: &AnyRow) -> Result<AuditRecord, sqlx::Error> {
    let key_id: Option<String> = row.try_get("key_id")?;
    let payload: String = row.try_get("payload")?;
    Ok(AuditRecord {
        id: row.try_get("id")?,
        at: from_millis(row.try_get("at")?),
        event_type: row.try_get("event_type")?,
        key_id: key_id
            .map(|k| Uuid::parse_str(&k).map_err(|e| sqlx::Error::Decode(Box::new(e))))
            .transpose()?,
        request_id: row.try_get("request_id")?,
        payload: serde_json::from_str(&payload).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
    })
}

impl Store {
    /// Records an admin action. `published` says whether the caller
    /// publishes the event itself; if not, a running gateway will.
    pub async fn record_admin_action(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        published: bool,
    ) -> Result<(), StoreError> {
        let payload = serde_json::json!({ "actor": actor, "action": action, "target": target });
        sqlx::query(
            "INSERT INTO audit_log (at, event_type, payload, published) VALUES ($1, 'audit.admin', $2, $3)",
        )
        .bind(to_millis(Utc::now()))
        .bind(payload.to_string())
        .bind(i64::from(published))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Claims up to `limit` unpublished admin actions, oldest first. Each
    /// row is claimed by one conditional update, so two gateways sharing the
    /// store never both publish it.
    pub async fn claim_unpublished_admin_actions(
        &self,
        limit: i64,
    ) -> Result<Vec<AdminActionRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, payload FROM audit_log WHERE published = 0 AND event_type = 'audit.admin' \
             ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.try_get("id")?;
            let updated =
                sqlx::query("UPDATE audit_log SET published = 1 WHERE id = $1 AND published = 0")
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
            if updated.rows_affected() != 1 {
                continue;
            }
            let payload: String = row.try_get("payload")?;
            let payload: serde_json::Value = serde_json::from_str(&payload)
                .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))?;
            let field = |name: &str| payload[name].as_str().unwrap_or_default().to_owned();
            claimed.push(AdminActionRecord {
                id,
                actor: field("actor"),
                action: field("action"),
                target: field("target"),
            });
        }
        Ok(claimed)
    }

    /// A page of the audit log, newest first.
    pub async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        // Unused filters compare a column with itself, so one statement
        // serves every combination and every value is bound, never spliced.
        let rows = sqlx::query(
            "SELECT id, at, event_type, key_id, request_id, payload FROM audit_log \
             WHERE ($1 = 0 OR at >= $2) AND ($3 = 0 OR event_type = $4) \
               AND ($5 = 0 OR key_id = $6) AND ($7 = 0 OR id < $8) \
             ORDER BY id DESC LIMIT $9",
        )
        .bind(i64::from(query.since.is_some()))
        .bind(query.since.map(to_millis).unwrap_or(0))
        .bind(i64::from(query.event_type.is_some()))
        .bind(query.event_type.clone().unwrap_or_default())
        .bind(i64::from(query.key_id.is_some()))
        .bind(query.key_id.map(|k| k.to_string()).unwrap_or_default())
        .bind(i64::from(query.before_id.is_some()))
        .bind(query.before_id.unwrap_or(0))
        .bind(query.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(audit_record).collect::<Result<_, _>>()?)
    }
}

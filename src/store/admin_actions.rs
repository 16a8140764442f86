//! The `admin_actions` table: a record of administrative actions, and the
//! outbox through which actions taken by the CLI reach the event stream.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{from_millis, to_millis, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminActionRecord {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: String,
}

impl Store {
    /// Records an action. `published` says whether the caller publishes the
    /// event itself; if not, a running gateway will.
    pub async fn record_admin_action(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        published: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO admin_actions (at, actor, action, target, published) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(to_millis(Utc::now()))
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(i64::from(published))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Claims up to `limit` unpublished actions, oldest first. Each row is
    /// claimed by one conditional update, so two gateways sharing the store
    /// never both publish it.
    pub async fn claim_unpublished_admin_actions(
        &self,
        limit: i64,
    ) -> Result<Vec<AdminActionRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target FROM admin_actions WHERE published = 0 ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.try_get("id")?;
            let updated = sqlx::query(
                "UPDATE admin_actions SET published = 1 WHERE id = $1 AND published = 0",
            )
            .bind(id)
            .execute(&self.pool)
            .await?;
            if updated.rows_affected() == 1 {
                claimed.push(AdminActionRecord {
                    id,
                    at: from_millis(row.try_get("at")?),
                    actor: row.try_get("actor")?,
                    action: row.try_get("action")?,
                    target: row.try_get("target")?,
                });
            }
        }
        Ok(claimed)
    }

    /// Ids of keys revoked at or after `since`, or that expired in
    /// `[since, until)`: keys whose open streams must close.
    pub async fn keys_invalidated_between(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<uuid::Uuid>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM api_keys WHERE revoked_at >= $1 OR (expires_at >= $1 AND expires_at < $2)",
        )
        .bind(to_millis(since))
        .bind(to_millis(until))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                uuid::Uuid::parse_str(&id)
                    .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))
            })
            .collect()
    }
}

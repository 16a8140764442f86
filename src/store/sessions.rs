//! The `sessions` table: browser sessions from OIDC login. Only the SHA-256
//! of a session id is stored, so a copy of the database cannot be turned
//! into a signed-in browser.

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{from_millis, to_millis, Store, StoreError};

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Hex SHA-256 of the session id.
    pub id_hash: String,
    /// The OIDC subject (`sub`) of the user.
    pub subject: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub admin: bool,
    pub groups: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str =
    "id_hash, subject, name, email, is_admin, groups_json, created_at, expires_at, ended_at";

fn record(row: &AnyRow) -> Result<SessionRecord, sqlx::Error> {
    let groups: String = row.try_get("groups_json")?;
    Ok(SessionRecord {
        id_hash: row.try_get("id_hash")?,
        subject: row.try_get("subject")?,
        name: row.try_get("name")?,
        email: row.try_get("email")?,
        admin: row.try_get::<i64, _>("is_admin")? != 0,
        groups: serde_json::from_str(&groups).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        created_at: from_millis(row.try_get("created_at")?),
        expires_at: from_millis(row.try_get("expires_at")?),
        ended_at: row.try_get::<Option<i64>, _>("ended_at")?.map(from_millis),
    })
}

impl Store {
    pub async fn insert_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sessions (id_hash, subject, name, email, is_admin, groups_json, \
             created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(session.id_hash.clone())
        .bind(session.subject.clone())
        .bind(session.name.clone())
        .bind(session.email.clone())
        .bind(i64::from(session.admin))
        .bind(serde_json::to_string(&session.groups).expect("strings always serialise"))
        .bind(to_millis(session.created_at))
        .bind(to_millis(session.expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn find_session(&self, id_hash: &str) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM sessions WHERE id_hash = $1"
        ))
        .bind(id_hash.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(record).transpose()?)
    }

    /// Ends a session (logout). Ending an ended session keeps its first end.
    pub async fn end_session(&self, id_hash: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE sessions SET ended_at = $1 WHERE id_hash = $2 AND ended_at IS NULL")
            .bind(to_millis(at))
            .bind(id_hash.to_owned())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes sessions that ended or expired before `before`; returns how
    /// many.
    pub async fn purge_sessions(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM sessions WHERE expires_at < $1 OR ended_at < $1")
            .bind(to_millis(before))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

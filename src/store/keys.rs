//! The `api_keys` table. Only hashes are stored; the full key exists only
//! in the answer to the request that created it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{from_millis, to_millis, Store, StoreError};

/// A key as stored: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKeyRecord {
    pub id: Uuid,
    pub name: String,
    /// The first characters of the key, for telling keys apart in listings.
    pub prefix: String,
    #[serde(skip)]
    pub key_hash: String,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    /// The key's own budget, if it has one: micro-dollars per period.
    pub budget_micros: Option<i64>,
    /// `daily`, `weekly`, `monthly` or `total`, with `budget_micros`.
    pub budget_period: Option<String>,
    /// The user (OIDC subject) the key belongs to, who sees its events.
    pub owner: Option<String>,
}

impl ApiKeyRecord {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// What it takes to store a new key.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub name: String,
    pub prefix: String,
    pub key_hash: String,
    pub admin: bool,
    pub expires_at: Option<DateTime<Utc>>,
    /// The key's own budget: micro-dollars and period.
    pub budget: Option<(i64, String)>,
    /// The user (OIDC subject) the key belongs to.
    pub owner: Option<String>,
}

const COLUMNS: &str = "id, name, prefix, key_hash, is_admin, created_at, expires_at, revoked_at, \
     last_used_at, budget_micros, budget_period, owner";

fn record(row: &AnyRow) -> Result<ApiKeyRecord, sqlx::Error> {
    let id: String = row.try_get("id")?;
    Ok(ApiKeyRecord {
        id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        key_hash: row.try_get("key_hash")?,
        admin: row.try_get::<i64, _>("is_admin")? != 0,
        created_at: from_millis(row.try_get("created_at")?),
        expires_at: row
            .try_get::<Option<i64>, _>("expires_at")?
            .map(from_millis),
        revoked_at: row
            .try_get::<Option<i64>, _>("revoked_at")?
            .map(from_millis),
        last_used_at: row
            .try_get::<Option<i64>, _>("last_used_at")?
            .map(from_millis),
        budget_micros: row.try_get("budget_micros")?,
        budget_period: row.try_get("budget_period")?,
        owner: row.try_get("owner")?,
    })
}

fn key_id(row: &AnyRow) -> Result<Uuid, StoreError> {
    let id: String = row.try_get("id")?;
    Uuid::parse_str(&id).map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))
}

impl Store {
    pub async fn insert_api_key(&self, key: NewApiKey) -> Result<ApiKeyRecord, StoreError> {
        let record = ApiKeyRecord {
            id: Uuid::new_v4(),
            name: key.name,
            prefix: key.prefix,
            key_hash: key.key_hash,
            admin: key.admin,
            // Stored at millisecond precision; keep the record equal to its row.
            created_at: from_millis(to_millis(Utc::now())),
            expires_at: key.expires_at.map(|t| from_millis(to_millis(t))),
            revoked_at: None,
            last_used_at: None,
            budget_micros: key.budget.as_ref().map(|b| b.0),
            budget_period: key.budget.map(|b| b.1),
            owner: key.owner,
        };
        sqlx::query(
            "INSERT INTO api_keys (id, name, prefix, key_hash, is_admin, created_at, expires_at, \
             budget_micros, budget_period, owner) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(record.id.to_string())
        .bind(&record.name)
        .bind(&record.prefix)
        .bind(&record.key_hash)
        .bind(i64::from(record.admin))
        .bind(to_millis(record.created_at))
        .bind(record.expires_at.map(to_millis))
        .bind(record.budget_micros)
        .bind(record.budget_period.clone())
        .bind(record.owner.clone())
        .execute(&self.pool)
        .await?;
        Ok(record)
    }

    /// Every key, oldest first.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM api_keys ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(record).collect::<Result<_, _>>()?)
    }

    pub async fn count_api_keys(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM api_keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    pub async fn find_api_key_by_hash(
        &self,
        hash: &str,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM api_keys WHERE key_hash = $1"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(record).transpose()?)
    }

    pub async fn find_api_key(&self, id: Uuid) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(record).transpose()?)
    }

    /// Finds one key by its id or by a prefix of its display prefix (as
    /// shown by `keys list`). More than one match is an error, never a guess.
    pub async fn find_api_key_by_id_or_prefix(
        &self,
        needle: &str,
    ) -> Result<ApiKeyRecord, StoreError> {
        if let Ok(id) = Uuid::parse_str(needle) {
            return self
                .find_api_key(id)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("no API key with id {id}")));
        }
        if needle.trim().len() < 4 {
            return Err(StoreError::NotFound(format!(
                "`{needle}` is too short to name a key; give its id or at least 4 characters of its prefix"
            )));
        }
        // Compared character for character: LIKE would treat `_` (a base64url
        // character, and part of `gw_live_`) as a wildcard, and is
        // case-insensitive on SQLite.
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM api_keys WHERE substr(prefix, 1, length($1)) = $1 \
             ORDER BY created_at"
        ))
        .bind(needle)
        .fetch_all(&self.pool)
        .await?;
        let mut found: Vec<ApiKeyRecord> = rows.iter().map(record).collect::<Result<_, _>>()?;
        match found.len() {
            0 => Err(StoreError::NotFound(format!(
                "no API key with id or prefix `{needle}`"
            ))),
            1 => Ok(found.remove(0)),
            n => Err(StoreError::Ambiguous(format!(
                "{n} API keys start with `{needle}`; give the id instead"
            ))),
        }
    }

    /// Marks a key revoked. Revoking a revoked key keeps its first
    /// revocation time. Returns the key as it now is.
    pub async fn revoke_api_key(&self, id: Uuid) -> Result<ApiKeyRecord, StoreError> {
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(to_millis(Utc::now()))
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        self.existing_api_key(id).await
    }

    /// The key `id` as it now is, or `NotFound`.
    async fn existing_api_key(&self, id: Uuid) -> Result<ApiKeyRecord, StoreError> {
        self.find_api_key(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no API key with id {id}")))
    }

    /// Gives a key to a user (the OIDC subject), or takes it back with
    /// `None`. Returns the key as it now is.
    pub async fn set_api_key_owner(
        &self,
        id: Uuid,
        owner: Option<&str>,
    ) -> Result<ApiKeyRecord, StoreError> {
        sqlx::query("UPDATE api_keys SET owner = $1 WHERE id = $2")
            .bind(owner.map(str::to_owned))
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        self.existing_api_key(id).await
    }

    /// Ids of the keys a user owns, revoked ones included (their past
    /// events are still theirs).
    pub async fn key_ids_owned_by(&self, owner: &str) -> Result<Vec<Uuid>, StoreError> {
        let rows = sqlx::query("SELECT id FROM api_keys WHERE owner = $1")
            .bind(owner.to_owned())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(key_id).collect()
    }

    pub async fn touch_api_key(&self, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
            .bind(to_millis(at))
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ids of keys revoked at or after `since`, or that expired in
    /// `[since, until)`: keys whose open streams must close.
    pub async fn keys_invalidated_between(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<Uuid>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM api_keys WHERE revoked_at >= $1 OR (expires_at >= $1 AND expires_at < $2)",
        )
        .bind(to_millis(since))
        .bind(to_millis(until))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_id).collect()
    }
}

//! A short-lived cache of checked API keys, so the hot paths (every proxied
//! request, every stream connection) do not query the store each time.
//!
//! An entry lives [`TTL`]; expiry is re-checked on every use; a key revoked
//! through this gateway is dropped at once, and one revoked elsewhere (the
//! CLI, another node) within the store watcher's period plus [`TTL`]. Only
//! successful checks are cached: an unknown key always asks the store.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use uuid::Uuid;

use super::{authenticate_key, keys, AuthError};
use crate::store::{ApiKeyRecord, Store};

/// How long a checked key is trusted without asking the store again.
pub const TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct KeyCache {
    by_hash: Mutex<HashMap<String, (ApiKeyRecord, Instant)>>,
}

impl KeyCache {
    /// [`authenticate_key`], answered from the cache while fresh.
    pub async fn authenticate(
        &self,
        store: &Store,
        presented: &str,
    ) -> Result<ApiKeyRecord, AuthError> {
        if !keys::is_well_formed(presented) {
            return Err(AuthError::Malformed);
        }
        let hash = keys::hash(presented);
        let cached = {
            let entries = self.by_hash.lock().unwrap_or_else(|e| e.into_inner());
            entries
                .get(&hash)
                .filter(|(_, at)| at.elapsed() < TTL)
                .map(|(record, _)| record.clone())
        };
        if let Some(record) = cached {
            if record.is_expired(Utc::now()) {
                return Err(AuthError::Expired);
            }
            return Ok(record);
        }
        let record = authenticate_key(store, presented).await?;
        let mut entries = self.by_hash.lock().unwrap_or_else(|e| e.into_inner());
        // Keep the map from growing with keys that are no longer used.
        entries.retain(|_, (_, at)| at.elapsed() < TTL);
        entries.insert(hash, (record.clone(), Instant::now()));
        Ok(record)
    }

    /// Forgets a key that was revoked or expired.
    pub fn forget(&self, key_id: Uuid) {
        let mut entries = self.by_hash.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (record, _)| record.id != key_id);
    }
}

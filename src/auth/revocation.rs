//! Telling open event streams that a key stopped being valid, so they close
//! within seconds: the admin API notifies at once, and the store watcher
//! notices what other processes (the CLI, other nodes) and the clock
//! (expiry) did.

use tokio::sync::broadcast::{self, error::RecvError};
use uuid::Uuid;

use crate::store::Store;

/// Notices are small and frequent enough that a lagging listener simply
/// re-checks its own key in the store.
const CAPACITY: usize = 256;

#[derive(Debug, Clone)]
pub struct KeyRevocations {
    sender: broadcast::Sender<Uuid>,
}

impl Default for KeyRevocations {
    fn default() -> Self {
        KeyRevocations {
            sender: broadcast::channel(CAPACITY).0,
        }
    }
}

impl KeyRevocations {
    /// Announces that `key_id` is no longer valid.
    pub fn notify(&self, key_id: Uuid) {
        let _ = self.sender.send(key_id);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.sender.subscribe()
    }
}

/// Whether a notice (or a gap in notices) ends the stream of `own_key`.
pub async fn ends_stream(notice: Result<Uuid, RecvError>, own_key: Uuid, store: &Store) -> bool {
    match notice {
        Ok(id) => id == own_key,
        Err(RecvError::Lagged(_)) => !key_is_live(store, own_key).await,
        Err(RecvError::Closed) => false,
    }
}

/// Whether a key still exists, unrevoked and unexpired. A store error
/// counts as live: an outage must not disconnect every operator.
pub async fn key_is_live(store: &Store, key_id: Uuid) -> bool {
    match store.find_api_key(key_id).await {
        Ok(Some(record)) => !record.is_revoked() && !record.is_expired(chrono::Utc::now()),
        Ok(None) => false,
        Err(error) => {
            tracing::warn!(%error, "cannot re-check a streaming key; keeping the stream");
            true
        }
    }
}

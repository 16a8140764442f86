//! Ends an event stream when the credential it was opened with stops being
//! valid: a revoked or expired key (announced at once by the admin API, or
//! by the store watcher for other processes and the clock), or an ended or
//! expired session (re-checked in the store every two seconds, which also
//! refreshes the keys the user owns).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::broadcast;
use tokio::time::{Interval, MissedTickBehavior};
use uuid::Uuid;

use crate::auth::session::{self, UserIdentity};
use crate::auth::{revocation, Identity};
use crate::server::AppState;

/// How often a session-authenticated stream re-reads its session.
pub const SESSION_RECHECK: Duration = Duration::from_secs(2);

/// Why a stream's credential stopped being valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    KeyRevoked,
    SessionEnded,
}

impl Ended {
    /// The close reason (WebSocket) and error code (SSE).
    pub fn reason(self) -> (&'static str, &'static str) {
        match self {
            Ended::KeyRevoked => ("API key revoked", "api_key_revoked"),
            Ended::SessionEnded => ("session ended", "session_ended"),
        }
    }
}

type Check = Pin<Box<dyn Future<Output = bool> + Send>>;

pub struct CredentialWatch {
    state: AppState,
    kind: Kind,
}

enum Kind {
    Nothing,
    Key {
        id: Uuid,
        notices: broadcast::Receiver<Uuid>,
    },
    Session {
        user: UserIdentity,
        tick: Interval,
        /// A store check in progress, kept across cancelled polls so a busy
        /// stream still finishes it.
        checking: Option<Check>,
    },
}

impl CredentialWatch {
    pub fn new(state: &AppState, identity: &Identity) -> Self {
        let kind = match identity {
            Identity::Anonymous => Kind::Nothing,
            Identity::Key(key) => Kind::Key {
                id: key.id,
                notices: state.revocations.subscribe(),
            },
            Identity::User(user) => {
                let start = tokio::time::Instant::now() + SESSION_RECHECK;
                let mut tick = tokio::time::interval_at(start, SESSION_RECHECK);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                Kind::Session {
                    user: user.clone(),
                    tick,
                    checking: None,
                }
            }
        };
        CredentialWatch {
            state: state.clone(),
            kind,
        }
    }

    /// Resolves once the credential is no longer valid; never for an
    /// anonymous stream. Cancel-safe: use it in `select!`.
    pub async fn ended(&mut self) -> Ended {
        match &mut self.kind {
            Kind::Nothing => std::future::pending().await,
            Kind::Key { id, notices } => loop {
                let notice = notices.recv().await;
                if revocation::ends_stream(notice, *id, &self.state.store).await {
                    return Ended::KeyRevoked;
                }
            },
            Kind::Session {
                user,
                tick,
                checking,
            } => loop {
                if checking.is_none() {
                    tick.tick().await;
                    *checking = Some(Box::pin(session_still_live(
                        self.state.clone(),
                        user.clone(),
                    )));
                }
                let live = checking.as_mut().expect("set just above").await;
                *checking = None;
                if !live {
                    return Ended::SessionEnded;
                }
            },
        }
    }
}

/// Whether the session is still live, refreshing the user's keys on the
/// way. A store error counts as live: an outage must not disconnect every
/// operator.
async fn session_still_live(state: AppState, user: UserIdentity) -> bool {
    match state.store.find_session(&user.session_hash).await {
        Ok(Some(record)) if session::session_is_live(&record, Utc::now()).is_ok() => {}
        Ok(_) => return false,
        Err(error) => {
            tracing::warn!(%error, "cannot re-check a streaming session; keeping the stream");
            return true;
        }
    }
    match state.store.key_ids_owned_by(&user.subject).await {
        Ok(ids) => user.owned_keys.replace(ids),
        Err(error) => tracing::warn!(%error, "cannot refresh the keys a user owns"),
    }
    true
}

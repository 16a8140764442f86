//! Whether an event stream may open, decided before any upgrade and the
//! same way for WebSocket and SSE: the feature switch (404), the query's
//! filters and cursor (400), the credential (401) and `max_connections`
//! (503 with `Retry-After`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::http::{header, HeaderMap};
use serde::Deserialize;

use super::model::{EventType, Topic, TopicSet, TypeSet};
use super::visibility::StreamFilter;
use crate::auth::{self, session, AuthError, Identity, KeyIdentity};
use crate::config::normalise_origin;
use crate::config::WebSocketConfig;
use crate::error::ApiError;
use crate::server::AppState;

/// The query string of `/ws/events` and `/events/stream`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamQuery {
    pub token: Option<String>,
    pub topics: Option<String>,
    pub types: Option<String>,
    pub since: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
        }
    }
}

/// An admitted stream: who, what it receives, where it resumes, and the
/// connection slot it holds until dropped.
pub struct Admission {
    pub filter: StreamFilter,
    pub since: Option<u64>,
    pub slot: StreamSlot,
    /// `[features.websocket]` as it was when the stream opened; a reload
    /// applies to streams opened after it.
    pub settings: WebSocketConfig,
}

/// Counts open streams (both transports) against `max_connections`.
#[derive(Debug, Default)]
pub struct StreamSlots {
    open: AtomicU64,
}

impl StreamSlots {
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Acquire)
    }

    /// Takes a slot unless `max` are open (`max = 0`: unlimited).
    fn try_acquire(self: &Arc<Self>, max: u64, transport: Transport) -> Option<StreamSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (max == 0 || open < max).then_some(open + 1)
            })
            .ok()?;
        metrics::gauge!("tollgate_streams_open", "transport" => transport.as_str()).increment(1.0);
        Some(StreamSlot {
            slots: self.clone(),
            transport,
        })
    }
}

/// One open stream's place; freed when dropped, however the stream ends.
#[derive(Debug)]
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    transport: Transport,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.slots.open.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("tollgate_streams_open", "transport" => self.transport.as_str())
            .decrement(1.0);
    }
}

fn reject(reason: &'static str, error: ApiError) -> ApiError {
    metrics::counter!("tollgate_stream_rejections_total", "reason" => reason).increment(1);
    error
}

/// Decides whether a stream may open. `last_event_id` is SSE's header,
/// used when the query has no `since`.
pub async fn admit(
    state: &AppState,
    headers: &HeaderMap,
    query: &StreamQuery,
    last_event_id: Option<&str>,
    transport: Transport,
) -> Result<Admission, ApiError> {
    let settings = state.config.load().features.websocket.clone();
    if !settings.enabled {
        return Err(ApiError::not_found(
            "not_found",
            "the event stream is disabled on this gateway ([features.websocket] enabled = false)",
        ));
    }
    let bad = |code, message: String| reject("bad_request", ApiError::bad_request(code, message));
    let topics = match &query.topics {
        Some(list) => parse_list::<Topic>(list)
            .map_err(|e| bad("unknown_topic", e))?
            .into_iter()
            .collect(),
        None => TopicSet::all(),
    };
    let types: TypeSet = match &query.types {
        Some(list) => parse_list::<EventType>(list)
            .map_err(|e| bad("unknown_event_type", e))?
            .into_iter()
            .collect(),
        None => TypeSet::default(),
    };
    let since = match query.since.as_deref().or(last_event_id) {
        Some(cursor) => Some(cursor.trim().parse::<u64>().map_err(|_| {
            bad(
                "invalid_since",
                format!("`{cursor}` is not an event id from this gateway"),
            )
        })?),
        None => None,
    };
    let identity = authenticate(state, headers, query, settings.require_auth)
        .await
        .map_err(|e| reject("auth", e))?;
    let slot = state
        .stream_slots
        .try_acquire(settings.max_connections, transport)
        .ok_or_else(|| {
            reject(
                "capacity",
                ApiError::unavailable(
                    "too_many_connections",
                    format!(
                        "the gateway has {} event streams open, its limit (max_connections); try again shortly",
                        settings.max_connections
                    ),
                    5,
                ),
            )
        })?;
    Ok(Admission {
        filter: StreamFilter {
            identity,
            topics,
            types,
        },
        since,
        slot,
        settings,
    })
}

/// A presented credential must be valid whatever `require_auth` says; no
/// credential is anonymous only where `require_auth = false`. An API key
/// (`Authorization: Bearer` or `?token=`) wins over a session cookie.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    query: &StreamQuery,
    require_auth: bool,
) -> Result<Identity, ApiError> {
    let presented = match auth::bearer_token(headers) {
        Some(token) => Some(token?),
        None => query.token.as_deref(),
    };
    if let Some(token) = presented {
        let record = state.key_cache.authenticate(&state.store, token).await?;
        return Ok(Identity::Key(KeyIdentity::from(&record)));
    }
    if let Some(cookie) = session::cookie_value(headers, session::SESSION_COOKIE) {
        check_origin(state, headers)?;
        let record = session::authenticate_session(&state.store, cookie).await?;
        let user = session::user_identity(&state.store, &record).await?;
        return Ok(Identity::User(user));
    }
    if require_auth {
        return Err(ApiError::from(AuthError::Missing));
    }
    Ok(Identity::Anonymous)
}

/// A browser sends its cookie with a WebSocket upgrade from any page, so a
/// cookie-authenticated stream must come from the gateway's own pages or an
/// origin in `allowed_origins` (cross-site WebSocket hijacking). Clients
/// that send no `Origin` are not browsers and are not at risk.
fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let config = state.config.load();
    let origin = origin.to_str().ok().and_then(normalise_origin);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let allowed = origin.as_deref().is_some_and(|origin| {
        let own = host.is_some_and(|host| {
            ["http", "https"].iter().any(|scheme| {
                normalise_origin(&format!("{scheme}://{host}")).as_deref() == Some(origin)
            })
        });
        let oidc = config.auth.oidc.as_ref();
        own || oidc.is_some_and(|oidc| {
            normalise_origin(&oidc.redirect_url_origin()).as_deref() == Some(origin)
                || oidc
                    .allowed_origins
                    .iter()
                    .any(|allowed| normalise_origin(allowed).as_deref() == Some(origin))
        })
    });
    if allowed {
        return Ok(());
    }
    Err(ApiError::forbidden(
        "origin_not_allowed",
        "a stream signed in by session cookie must be opened from this gateway's own pages or an origin in [auth.oidc] allowed_origins",
    ))
}

/// Parses a comma list of names; empty entries are ignored, an unknown
/// name is an error naming it.
pub fn parse_list<T: std::str::FromStr<Err = super::model::UnknownName>>(
    list: &str,
) -> Result<Vec<T>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| name.parse::<T>().map_err(|e| e.to_string()))
        .collect()
}

//! Who is calling: API keys presented as `Authorization: Bearer` (or, on the
//! event stream, `?token=`), resolved against the store into an [`Identity`].

pub mod cache;
pub mod keys;
pub mod oidc;
pub mod revocation;
pub mod routes;
pub mod session;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use chrono::{Duration, Utc};
use uuid::Uuid;

use crate::error::ApiError;
use crate::server::AppState;
use crate::store::{ApiKeyRecord, Store, StoreError};

/// `last_used_at` is written at most this often per key, so a busy key does
/// not cost a database write on every request.
const LAST_USED_RESOLUTION: Duration = Duration::seconds(60);

/// The caller behind a request or an event-stream connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No credential, where the configuration allows it.
    Anonymous,
    Key(KeyIdentity),
    /// A browser signed in with OIDC, by its session cookie.
    User(session::UserIdentity),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIdentity {
    pub id: Uuid,
    pub name: String,
    pub admin: bool,
}

impl Identity {
    pub fn key_id(&self) -> Option<Uuid> {
        match self {
            Identity::Key(key) => Some(key.id),
            Identity::Anonymous | Identity::User(_) => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no API key was presented; send `Authorization: Bearer gw_live_…`")]
    Missing,
    #[error("the API key is malformed; keys look like `gw_live_` followed by 43 characters")]
    Malformed,
    #[error("the API key is not known to this gateway")]
    Unknown,
    #[error("the API key has been revoked")]
    Revoked,
    #[error("the API key has expired")]
    Expired,
    #[error("the session is not known to this gateway or has ended; sign in again at /auth/login")]
    SessionUnknown,
    #[error("the session has expired; sign in again at /auth/login")]
    SessionExpired,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        let code = match &error {
            AuthError::Store(e) => return ApiError::store(e),
            AuthError::Missing => "missing_api_key",
            AuthError::Revoked => "revoked_api_key",
            AuthError::Expired => "expired_api_key",
            AuthError::Malformed | AuthError::Unknown => "invalid_api_key",
            AuthError::SessionUnknown => "invalid_session",
            AuthError::SessionExpired => "session_expired",
        };
        ApiError::unauthorized(code, error.to_string())
    }
}

/// Resolves a presented key to its live record: well-formed, known (its
/// hash matched in constant time), not revoked, not expired.
pub async fn authenticate_key(store: &Store, presented: &str) -> Result<ApiKeyRecord, AuthError> {
    if !keys::is_well_formed(presented) {
        return Err(AuthError::Malformed);
    }
    let record = store
        .find_api_key_by_hash(&keys::hash(presented))
        .await?
        .ok_or(AuthError::Unknown)?;
    if !keys::verify(presented, &record.key_hash) {
        return Err(AuthError::Unknown);
    }
    let now = Utc::now();
    if record.is_revoked() {
        return Err(AuthError::Revoked);
    }
    if record.is_expired(now) {
        return Err(AuthError::Expired);
    }
    if record
        .last_used_at
        .is_none_or(|at| now - at >= LAST_USED_RESOLUTION)
    {
        let (store, id) = (store.clone(), record.id);
        tokio::spawn(async move {
            if let Err(error) = store.touch_api_key(id, now).await {
                tracing::warn!(%error, key_id = %id, "could not record last use of a key");
            }
        });
    }
    Ok(record)
}

/// The token of an `Authorization: Bearer …` header, if there is one.
/// A header with another scheme counts as a malformed credential.
pub fn bearer_token(headers: &HeaderMap) -> Option<Result<&str, AuthError>> {
    let value = headers.get(header::AUTHORIZATION)?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or(AuthError::Malformed),
    )
}

impl From<&ApiKeyRecord> for KeyIdentity {
    fn from(record: &ApiKeyRecord) -> Self {
        KeyIdentity {
            id: record.id,
            name: record.name.clone(),
            admin: record.admin,
        }
    }
}

/// Extractor: a request authenticated by a live API key.
#[derive(Debug, Clone)]
pub struct ApiKeyAuth(pub KeyIdentity);

impl FromRequestParts<AppState> for ApiKeyAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers).ok_or(AuthError::Missing)??;
        let record = state.key_cache.authenticate(&state.store, token).await?;
        Ok(ApiKeyAuth(KeyIdentity::from(&record)))
    }
}

/// Extractor: a request authenticated by a live admin key (403 otherwise).
#[derive(Debug, Clone)]
pub struct AdminAuth(pub KeyIdentity);

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ApiKeyAuth(key) = ApiKeyAuth::from_request_parts(parts, state).await?;
        if !key.admin {
            return Err(ApiError::forbidden(
                "admin_required",
                "this endpoint needs an admin API key",
            ));
        }
        Ok(AdminAuth(key))
    }
}

/// What a new key is: its name, rights, lifetime and own budget.
#[derive(Debug, Clone, Default)]
pub struct KeySpec {
    pub name: String,
    pub admin: bool,
    pub expires_at: Option<chrono::DateTime<Utc>>,
    /// Micro-dollars per period.
    pub budget: Option<(i64, crate::budget::Period)>,
    /// The user (OIDC subject) the key belongs to.
    pub owner: Option<String>,
}

/// Creates and stores a new key without a budget; see [`issue_key`].
pub async fn issue_api_key(
    store: &Store,
    name: &str,
    admin: bool,
    expires_at: Option<chrono::DateTime<Utc>>,
) -> Result<(ApiKeyRecord, keys::ApiKeySecret), StoreError> {
    issue_key(
        store,
        KeySpec {
            name: name.to_owned(),
            admin,
            expires_at,
            budget: None,
            owner: None,
        },
    )
    .await
}

/// Creates and stores a new key; returns its record and the key itself,
/// which exists nowhere else and must be shown to the caller once.
pub async fn issue_key(
    store: &Store,
    spec: KeySpec,
) -> Result<(ApiKeyRecord, keys::ApiKeySecret), StoreError> {
    let generated = keys::generate();
    let record = store
        .insert_api_key(crate::store::NewApiKey {
            name: spec.name,
            prefix: generated.prefix,
            key_hash: generated.hash,
            admin: spec.admin,
            expires_at: spec.expires_at,
            budget: spec
                .budget
                .map(|(micros, period)| (micros, period.as_str().to_owned())),
            owner: spec.owner,
        })
        .await?;
    Ok((record, generated.secret))
}

/// Parses a key budget given by an operator: USD and a period name.
pub fn key_budget(usd: f64, period: &str) -> Result<(i64, crate::budget::Period), String> {
    let micros = crate::config::usd_to_micros(usd)
        .filter(|m| *m > 0)
        .ok_or_else(|| {
            "a budget is an amount in USD above zero with at most 6 decimal places".to_owned()
        })?;
    let period = crate::budget::Period::parse(period).ok_or_else(|| {
        format!("`{period}` is not a budget period; expected daily, weekly, monthly or total")
    })?;
    Ok((micros, period))
}

/// Checks a key name given by an operator.
pub fn validate_key_name(name: &str) -> Result<&str, String> {
    let name = name.trim();
    if name.is_empty() {
        return Err("a key needs a non-empty name".to_owned());
    }
    if name.chars().count() > 100 {
        return Err("a key name is at most 100 characters".to_owned());
    }
    Ok(name)
}

/// Checks a key owner given by an operator: a user's OIDC subject.
pub fn validate_owner(owner: &str) -> Result<&str, String> {
    let owner = owner.trim();
    if owner.is_empty() {
        return Err("an owner is a user's OIDC subject and cannot be empty".to_owned());
    }
    if owner.len() > 255 {
        return Err("an owner is at most 255 bytes (OIDC subjects are)".to_owned());
    }
    Ok(owner)
}

/// Parses a lifetime such as `30d`, `12h` or `90m` into an expiry time.
pub fn expiry_after(lifetime: &str) -> Result<chrono::DateTime<Utc>, String> {
    let duration = humantime::parse_duration(lifetime.trim())
        .map_err(|e| format!("`{lifetime}` is not a duration such as 30d, 12h or 90m: {e}"))?;
    if duration.is_zero() {
        return Err("a key's lifetime must be longer than zero".to_owned());
    }
    chrono::Duration::from_std(duration)
        .ok()
        .and_then(|d| Utc::now().checked_add_signed(d))
        .ok_or_else(|| format!("`{lifetime}` is too long"))
}

//! Browser sessions: an opaque random id in an `HttpOnly` cookie, stored
//! server-side only as its SHA-256, with an expiry. A session is who a
//! signed-in operator is on `/auth/me` and on the event stream.

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::http::{header, HeaderMap, HeaderValue};
use base64::Engine;
use chrono::{DateTime, Utc};
use cookie::{Cookie, SameSite};
use rand::RngCore;
use uuid::Uuid;

use super::AuthError;
use crate::store::{SessionRecord, Store};

/// The cookie that carries the session id.
pub const SESSION_COOKIE: &str = "tollgate_session";

/// A signed-in user, as an event stream or `/auth/me` sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIdentity {
    /// The OIDC subject.
    pub subject: String,
    pub name: Option<String>,
    pub admin: bool,
    /// Which session this is (hex SHA-256 of its id), to notice its end.
    pub session_hash: String,
    /// The keys this user owns, whose events they see; kept fresh by the
    /// stream that holds it.
    pub owned_keys: OwnedKeys,
}

/// A set of key ids that one task refreshes while others read it.
#[derive(Clone, Default)]
pub struct OwnedKeys(Arc<ArcSwap<HashSet<Uuid>>>);

impl OwnedKeys {
    pub fn new(ids: impl IntoIterator<Item = Uuid>) -> Self {
        let owned = OwnedKeys::default();
        owned.replace(ids);
        owned
    }

    pub fn contains(&self, id: Uuid) -> bool {
        self.0.load().contains(&id)
    }

    pub fn replace(&self, ids: impl IntoIterator<Item = Uuid>) {
        self.0.store(Arc::new(ids.into_iter().collect()));
    }
}

impl std::fmt::Debug for OwnedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.load().iter()).finish()
    }
}

/// Two handles are equal when they are the same set, not merely equal sets.
impl PartialEq for OwnedKeys {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for OwnedKeys {}

/// A new session id (256 random bits, base64url) and its stored hash.
pub fn new_session_id() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_id(&id);
    (id, hash)
}

/// What is stored of a session id.
pub fn hash_id(id: &str) -> String {
    super::keys::hash(id)
}

/// The value of the cookie `name` in a request's `Cookie` headers.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Lax`, `Secure` when the
/// gateway is reached over https, living `max_age_secs` (0 deletes it).
pub fn set_cookie(
    name: &str,
    value: String,
    path: &str,
    max_age_secs: i64,
    secure: bool,
) -> HeaderValue {
    let cookie = Cookie::build((name.to_owned(), value))
        .path(path.to_owned())
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(secure)
        .max_age(cookie::time::Duration::seconds(max_age_secs))
        .build();
    HeaderValue::from_str(&cookie.to_string()).expect("cookie values are base64url or empty")
}

/// Resolves a presented session id to its live record.
pub async fn authenticate_session(
    store: &Store,
    presented: &str,
) -> Result<SessionRecord, AuthError> {
    let record = store
        .find_session(&hash_id(presented))
        .await?
        .ok_or(AuthError::SessionUnknown)?;
    session_is_live(&record, Utc::now())?;
    Ok(record)
}

/// Why a session can no longer be used, if it cannot.
pub fn session_is_live(record: &SessionRecord, now: DateTime<Utc>) -> Result<(), AuthError> {
    if record.ended_at.is_some() {
        return Err(AuthError::SessionUnknown);
    }
    if record.expires_at <= now {
        return Err(AuthError::SessionExpired);
    }
    Ok(())
}

/// The stream identity of a live session, with the keys its user owns.
pub async fn user_identity(
    store: &Store,
    record: &SessionRecord,
) -> Result<UserIdentity, AuthError> {
    let owned = store.key_ids_owned_by(&record.subject).await?;
    Ok(UserIdentity {
        subject: record.subject.clone(),
        name: record.name.clone(),
        admin: record.admin,
        session_hash: record.id_hash.clone(),
        owned_keys: OwnedKeys::new(owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_random_and_only_their_hash_is_kept() {
        let (a, hash_a) = new_session_id();
        let (b, _) = new_session_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(hash_a, hash_id(&a));
        assert!(!hash_a.contains(&a));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; tollgate_session=abc"),
        );
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie_value(&headers, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie_value(&headers, "b"), Some("2"));
        assert_eq!(cookie_value(&headers, "tollgate"), None);
    }

    #[test]
    fn session_cookies_are_http_only_lax_and_secure_over_https() {
        let value = set_cookie(SESSION_COOKIE, "x".into(), "/", 60, true);
        let text = value.to_str().unwrap();
        for part in [
            "tollgate_session=x",
            "HttpOnly",
            "SameSite=Lax",
            "Secure",
            "Path=/",
            "Max-Age=60",
        ] {
            assert!(text.contains(part), "{text} lacks {part}");
        }
        let plain = set_cookie(SESSION_COOKIE, String::new(), "/", 0, false);
        assert!(!plain.to_str().unwrap().contains("Secure"));
        assert!(plain.to_str().unwrap().contains("Max-Age=0"));
    }

    #[test]
    fn ended_and_expired_sessions_are_refused() {
        let now = Utc::now();
        let mut record = SessionRecord {
            id_hash: "h".into(),
            subject: "alice".into(),
            name: None,
            email: None,
            admin: false,
            groups: vec![],
            created_at: now,
            expires_at: now + chrono::Duration::hours(1),
            ended_at: None,
        };
        assert!(session_is_live(&record, now).is_ok());
        assert!(matches!(
            session_is_live(&record, now + chrono::Duration::hours(2)),
            Err(AuthError::SessionExpired)
        ));
        record.ended_at = Some(now);
        assert!(matches!(
            session_is_live(&record, now),
            Err(AuthError::SessionUnknown)
        ));
    }
}

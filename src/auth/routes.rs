//! Browser sign-in routes: `GET /auth/login`, `GET /auth/callback`,
//! `POST /auth/logout` and `GET /auth/me`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use super::oidc::{OidcError, PendingLogin, LOGIN_TTL_SECS};
use super::session::{self, SESSION_COOKIE};
use super::AuthError;
use crate::config::OidcConfig;
use crate::error::ApiError;
use crate::server::AppState;
use crate::store::SessionRecord;

/// The cookie that holds a login in progress; only the callback reads it,
/// so it is scoped to the callback's path as browsers see it (which may sit
/// under a reverse proxy's prefix).
const LOGIN_COOKIE: &str = "tollgate_login";

fn login_cookie_path(config: &OidcConfig) -> String {
    url::Url::parse(&config.redirect_url)
        .map(|url| url.path().to_owned())
        .unwrap_or_else(|_| "/".to_owned())
}
/// Where a browser lands after signing in when it did not say.
const DEFAULT_RETURN: &str = "/ui";

fn oidc_config(state: &AppState) -> Result<OidcConfig, ApiError> {
    state.config.load().auth.oidc.clone().ok_or_else(|| {
        ApiError::not_found(
            "oidc_not_configured",
            "browser sign-in is not configured on this gateway ([auth.oidc])",
        )
    })
}

/// Cookies are `Secure` when the gateway is reached over https, which the
/// scheme of its `redirect_url` says.
fn secure(config: &OidcConfig) -> bool {
    config.redirect_url.starts_with("https://")
}

impl From<OidcError> for ApiError {
    fn from(error: OidcError) -> Self {
        match &error {
            OidcError::Discovery { .. } => {
                ApiError::bad_gateway("oidc_provider_unreachable", error.to_string())
            }
            OidcError::TokenExchange(_) | OidcError::NoIdToken => {
                ApiError::bad_gateway("oidc_token_exchange_failed", error.to_string())
            }
            OidcError::InvalidIdToken(_) => {
                ApiError::unauthorized("invalid_id_token", error.to_string())
            }
            OidcError::Config(_) => ApiError::internal(error.to_string()),
        }
    }
}

/// A place on this gateway to return to: a plain absolute path, never
/// another site (`//evil.example` and `/\evil.example` are other sites to
/// a browser).
fn safe_return_path(raw: Option<&str>) -> String {
    match raw {
        Some(path)
            if path.starts_with('/')
                && !path.starts_with("//")
                && !path.contains('\\')
                && path.len() <= 512
                && !path.chars().any(char::is_control) =>
        {
            path.to_owned()
        }
        _ => DEFAULT_RETURN.to_owned(),
    }
}

fn redirect(location: &str, cookies: Vec<HeaderValue>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(location).expect("locations are URLs or checked paths"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for cookie in cookies {
        headers.append(header::SET_COOKIE, cookie);
    }
    response
}

fn with_cookie(error: ApiError, cookie: HeaderValue) -> Response {
    let mut response = error.into_response();
    response.headers_mut().append(header::SET_COOKIE, cookie);
    response
}

#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    pub return_to: Option<String>,
}

/// `GET /auth/login[?return_to=/ui]`: sends the browser to the provider.
pub async fn login(
    State(state): State<AppState>,
    query: Result<Query<LoginQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let config = oidc_config(&state)?;
    let return_to = safe_return_path(query.ok().and_then(|q| q.0.return_to).as_deref());
    let (url, pending) = state.oidc.begin(&config, return_to).await?;
    let cookie = session::set_cookie(
        LOGIN_COOKIE,
        pending.to_cookie_value(),
        &login_cookie_path(&config),
        LOGIN_TTL_SECS,
        secure(&config),
    );
    Ok(redirect(url.as_str(), vec![cookie]))
}

#[derive(Debug, Deserialize)]
pub struct CallbackQuery {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// `GET /auth/callback`: the provider sends the browser back here with a
/// code; a verified ID token becomes a session cookie.
pub async fn callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<CallbackQuery>, QueryRejection>,
) -> Response {
    let config = match oidc_config(&state) {
        Ok(config) => config,
        Err(error) => return error.into_response(),
    };
    // The login cookie is single-use whatever happens next.
    let clear_login = session::set_cookie(
        LOGIN_COOKIE,
        String::new(),
        &login_cookie_path(&config),
        0,
        secure(&config),
    );
    match finish_login(&state, &config, &headers, query).await {
        Ok((return_to, session_cookie)) => redirect(&return_to, vec![clear_login, session_cookie]),
        Err(error) => with_cookie(error, clear_login),
    }
}

async fn finish_login(
    state: &AppState,
    config: &OidcConfig,
    headers: &HeaderMap,
    query: Result<Query<CallbackQuery>, QueryRejection>,
) -> Result<(String, HeaderValue), ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    if let Some(error) = &query.error {
        let detail = query
            .error_description
            .as_deref()
            .unwrap_or("no description");
        return Err(ApiError::unauthorized(
            "login_refused",
            format!("the OpenID provider refused the sign-in: {error} ({detail})"),
        ));
    }
    let pending = session::cookie_value(headers, LOGIN_COOKIE)
        .and_then(PendingLogin::from_cookie_value)
        .ok_or_else(|| {
            ApiError::bad_request(
                "login_expired",
                "no sign-in is in progress in this browser (it took over 10 minutes, or cookies are blocked); start again at /auth/login",
            )
        })?;
    if !query
        .state
        .as_deref()
        .is_some_and(|returned| pending.state_matches(returned))
    {
        return Err(ApiError::bad_request(
            "invalid_state",
            "the sign-in answer does not belong to the sign-in this browser started; start again at /auth/login",
        ));
    }
    let code = query.code.ok_or_else(|| {
        ApiError::bad_request(
            "missing_code",
            "the OpenID provider sent no authorization code",
        )
    })?;
    let user = state.oidc.finish(config, &pending, code).await?;
    let (session_id, id_hash) = session::new_session_id();
    let now = Utc::now();
    let ttl = i64::try_from(config.session_ttl_secs).expect("validated to at most 30 days");
    let record = SessionRecord {
        id_hash,
        subject: user.subject.clone(),
        name: user.name,
        email: user.email,
        admin: user.admin,
        groups: user.groups,
        created_at: now,
        expires_at: now + chrono::Duration::seconds(ttl),
        ended_at: None,
    };
    state
        .store
        .insert_session(&record)
        .await
        .map_err(|e| ApiError::store(&e))?;
    tracing::info!(subject = %user.subject, admin = user.admin, "user signed in");
    crate::admin::record_action(
        state,
        &actor(&user.subject),
        "session.started",
        &user.subject,
    )
    .await?;
    let cookie = session::set_cookie(SESSION_COOKIE, session_id, "/", ttl, secure(config));
    Ok((pending.return_to, cookie))
}

/// The `actor` of a signed-in user's actions in `audit.admin`.
fn actor(subject: &str) -> String {
    format!("user:{subject}")
}

/// `POST /auth/logout`: ends the session (its streams close within
/// seconds) and deletes the cookie. Idempotent.
pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let secure = state.config.load().auth.oidc.as_ref().is_some_and(secure);
    if let Some(presented) = session::cookie_value(&headers, SESSION_COOKIE) {
        if let Ok(record) = session::authenticate_session(&state.store, presented).await {
            state
                .store
                .end_session(&record.id_hash, Utc::now())
                .await
                .map_err(|e| ApiError::store(&e))?;
            tracing::info!(subject = %record.subject, "user signed out");
            crate::admin::record_action(
                &state,
                &actor(&record.subject),
                "session.ended",
                &record.subject,
            )
            .await?;
        }
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session::set_cookie(SESSION_COOKIE, String::new(), "/", 0, secure),
    );
    Ok(response)
}

/// `GET /auth/me`: who the session cookie belongs to. Always 200, so a
/// page can ask without a failed request in its console:
/// `{"signed_in": false, "reason": …}` when there is no live session.
pub async fn me(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(presented) = session::cookie_value(&headers, SESSION_COOKIE) else {
        return Ok(Json(json!({ "signed_in": false, "reason": "no_session" })));
    };
    let record = match session::authenticate_session(&state.store, presented).await {
        Ok(record) => record,
        Err(AuthError::Store(e)) => return Err(ApiError::store(&e)),
        Err(error) => {
            return Ok(Json(json!({
                "signed_in": false,
                "reason": ApiError::from(error).code,
            })))
        }
    };
    Ok(Json(json!({
        "signed_in": true,
        "subject": record.subject,
        "name": record.name,
        "email": record.email,
        "admin": record.admin,
        "groups": record.groups,
        "expires_at": record.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_local_paths_are_returned_to() {
        assert_eq!(safe_return_path(Some("/ui?x=1")), "/ui?x=1");
        for bad in [
            "https://evil.example/",
            "//evil.example",
            "/\\evil.example",
            "ui",
            "/a\nb",
        ] {
            assert_eq!(safe_return_path(Some(bad)), "/ui", "{bad}");
        }
        assert_eq!(safe_return_path(None), "/ui");
    }

    #[test]
    fn the_login_cookie_is_scoped_to_the_callback_as_browsers_see_it() {
        let mut config: OidcConfig = toml::from_str(
            "issuer = \"https://idp.example\"\nclient_id = \"c\"\nredirect_url = \"https://gw.example/auth/callback\"\n",
        )
        .unwrap();
        assert_eq!(login_cookie_path(&config), "/auth/callback");
        config.redirect_url = "https://example.com/gateway/auth/callback".into();
        assert_eq!(login_cookie_path(&config), "/gateway/auth/callback");
        assert!(secure(&config));
    }
}

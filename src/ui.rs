//! `GET /ui`: the live event console, one page embedded in the binary (no
//! network needed to build or serve it).

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::server::AppState;

const CONSOLE: &str = include_str!("ui/console.html");
/// Replaced in the page with `true` or `false`: whether to offer sign-in,
/// and whether a stream needs a credential.
const OIDC_FLAG: &str = "__TOLLGATE_OIDC_ENABLED__";
const REQUIRE_AUTH_FLAG: &str = "__TOLLGATE_REQUIRE_AUTH__";

pub async fn console(State(state): State<AppState>) -> Response {
    let config = state.config.load();
    let flag = |on: bool| if on { "true" } else { "false" };
    let page = CONSOLE
        .replace(OIDC_FLAG, flag(config.auth.oidc.is_some()))
        .replace(
            REQUIRE_AUTH_FLAG,
            flag(config.features.websocket.require_auth),
        );
    let mut response = page.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Everything the page needs is inline and same-origin; nothing else runs.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
             frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

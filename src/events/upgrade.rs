//! The server side of the WebSocket opening handshake (RFC 6455 §4.2) on
//! an HTTP/1.1 request: checked here, answered with `101 Switching
//! Protocols`, and the upgraded connection handed to a task as plain bytes.
//!
//! `/ws/events` does its own upgrade rather than axum's `WebSocketUpgrade`
//! because it needs the raw connection: events are framed into the
//! connection's write queue directly (see `ws.rs`), while tungstenite's
//! sans-I/O `WebSocketContext` still does the protocol (reading client
//! frames, pong and close replies).

use std::future::Future;

use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::error::ApiError;
use crate::events::runtime::StreamTasks;

/// The upgraded connection: bytes in both directions.
pub type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// A request that asked for a WebSocket and may have one.
pub struct Upgrade {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
}

impl Upgrade {
    /// Checks the handshake; the error is the HTTP answer for a request that
    /// is not a WebSocket opening handshake this server speaks.
    pub fn from_request<B>(request: &mut Request<B>) -> Result<Upgrade, Refused> {
        let accept =
            accept_key(request.method(), request.version(), request.headers()).map_err(Refused)?;
        let on_upgrade = request
            .extensions_mut()
            .remove::<OnUpgrade>()
            .ok_or_else(|| {
                Refused(ApiError::upgrade_required(
                    "websocket_upgrade_required",
                    "this connection cannot be upgraded to a WebSocket",
                ))
            })?;
        Ok(Upgrade { accept, on_upgrade })
    }

    /// Answers `101 Switching Protocols` and runs `connection` on the
    /// upgraded bytes, in a task of `tasks`, once the client has received
    /// that answer. A client that goes away before the upgrade completes
    /// ends the task without running `connection`.
    pub fn on_upgrade<F, Fut>(self, tasks: &StreamTasks, connection: F) -> Response
    where
        F: FnOnce(Upgraded) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tasks.spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => connection(TokioIo::new(upgraded)).await,
                Err(error) => tracing::debug!(%error, "WebSocket upgrade did not complete"),
            }
        });
        let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        response
    }
}

/// A refused handshake: a JSON error, with `Sec-WebSocket-Version: 13` when
/// the version was the problem (§4.2.2).
#[derive(Debug)]
pub struct Refused(pub ApiError);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let version_refused = self.0.code == "unsupported_websocket_version";
        let mut response = self.0.into_response();
        if version_refused {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

/// RFC 6455 §4.2.1 and §4.2.2: the checks on the client's opening
/// handshake, and the `Sec-WebSocket-Accept` value that answers it.
fn accept_key(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<HeaderValue, ApiError> {
    if version != Version::HTTP_11 {
        return Err(ApiError::upgrade_required(
            "websocket_upgrade_required",
            "a WebSocket opens with an HTTP/1.1 GET request",
        ));
    }
    if method != Method::GET {
        return Err(ApiError::bad_request(
            "invalid_websocket_handshake",
            "a WebSocket opens with a GET request",
        ));
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade") {
        return Err(ApiError::bad_request(
            "invalid_websocket_handshake",
            "`Connection: upgrade` is missing: this endpoint is a WebSocket (use /events/stream for Server-Sent Events)",
        ));
    }
    if !header_has_token(headers, header::UPGRADE, "websocket") {
        return Err(ApiError::bad_request(
            "invalid_websocket_handshake",
            "`Upgrade: websocket` is missing",
        ));
    }
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"13");
    if !version_ok {
        // §4.2.2: answer with the version this server understands.
        return Err(ApiError::upgrade_required(
            "unsupported_websocket_version",
            "only WebSocket version 13 (RFC 6455) is supported; see Sec-WebSocket-Version",
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().trim_ascii())
        .filter(|k| is_handshake_key(k))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_websocket_handshake",
                "`Sec-WebSocket-Key` is missing or is not 16 bytes in base64",
            )
        })?;
    let accept = derive_accept_key(key);
    Ok(HeaderValue::from_str(&accept).expect("base64 is a valid header value"))
}

/// §4.1: the key is 16 random bytes in base64, i.e. 24 characters ending
/// in `==`.
fn is_handshake_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

/// Whether a comma-separated header has `token` (case-insensitive) in any
/// of its values.
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b','))
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    const GOOD: &[(&str, &str)] = &[
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn accepts_the_rfc_example_and_derives_its_accept_key() {
        let accept = accept_key(&Method::GET, Version::HTTP_11, &handshake(GOOD)).unwrap();
        // RFC 6455 §1.3's worked example.
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn refuses_what_is_not_an_opening_handshake() {
        let without = |name: &str| -> HeaderMap {
            handshake(
                &GOOD
                    .iter()
                    .copied()
                    .filter(|(n, _)| *n != name)
                    .collect::<Vec<_>>(),
            )
        };
        let status = |m: &Method, v: Version, h: &HeaderMap| accept_key(m, v, h).unwrap_err();
        for name in ["connection", "upgrade", "sec-websocket-key"] {
            let error = status(&Method::GET, Version::HTTP_11, &without(name));
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "without {name}");
            assert_eq!(error.code, "invalid_websocket_handshake");
        }
        let error = status(
            &Method::GET,
            Version::HTTP_11,
            &without("sec-websocket-version"),
        );
        assert_eq!(error.status, StatusCode::UPGRADE_REQUIRED);
        assert_eq!(error.code, "unsupported_websocket_version");

        let mut old = without("sec-websocket-version");
        old.insert("sec-websocket-version", HeaderValue::from_static("8"));
        assert_eq!(
            status(&Method::GET, Version::HTTP_11, &old).code,
            "unsupported_websocket_version"
        );
        let mut short = without("sec-websocket-key");
        short.insert("sec-websocket-key", HeaderValue::from_static("abc"));
        assert_eq!(
            status(&Method::GET, Version::HTTP_11, &short).status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(&Method::GET, Version::HTTP_10, &handshake(GOOD)).status,
            StatusCode::UPGRADE_REQUIRED
        );
        assert_eq!(
            status(&Method::HEAD, Version::HTTP_11, &handshake(GOOD)).status,
            StatusCode::BAD_REQUEST
        );
        // `Upgrade: websocket` must be a token, not a substring.
        let mut other = without("upgrade");
        other.insert("upgrade", HeaderValue::from_static("websocketx"));
        assert!(accept_key(&Method::GET, Version::HTTP_11, &other).is_err());
    }
}

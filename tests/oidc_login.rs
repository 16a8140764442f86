//! Browser sign-in with OpenID Connect, end to end over real HTTP: the
//! gateway's /auth routes against a scripted provider (for ID tokens a real
//! provider will not spoil) and against a real one (oidc-provider-mock), the
//! session cookie, and streams opened with it (Origin check, visibility,
//! closed after logout and expiry).

#[path = "support/oidc_provider.rs"]
mod oidc_provider;
#[path = "support/real_oidc.rs"]
mod real_oidc;
#[path = "support/stream_client.rs"]
mod stream_client;
mod support;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use oidc_provider::{ScriptedProvider, ScriptedUser, Spoil};
use real_oidc::RealProvider;
use serde_json::{json, Value};
use sqlx::Connection;
use stream_client::{Read, SseClient, WsClient};
use support::TestServer;
use tollgate::config::OidcConfig;

const CLIENT_ID: &str = "tollgate-test";
const CLIENT_SECRET: &str = "s3cret-of-the-client";

/// A gateway with `require_auth = true` and `[auth.oidc]` pointing at
/// `issuer`.
async fn gateway(issuer: &str, configure: impl FnOnce(&mut OidcConfig)) -> TestServer {
    let server = TestServer::start(|c| c.features.websocket.require_auth = true).await;
    server.enable_oidc(issuer, CLIENT_ID, CLIENT_SECRET, configure);
    server
}

/// A browser's worth of HTTP: no automatic redirects, and a cookie jar
/// that keeps what `Set-Cookie` says (one host, so no domain scoping).
struct Browser {
    http: reqwest::Client,
    cookies: Mutex<BTreeMap<String, String>>,
    /// Every `Set-Cookie` value seen, for checking attributes.
    set_cookies: Mutex<Vec<String>>,
}

impl Browser {
    fn new() -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: Mutex::default(),
            set_cookies: Mutex::default(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn cookie(&self, name: &str) -> Option<String> {
        self.cookies.lock().unwrap().get(name).cloned()
    }

    fn set_cookie_for(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}=");
        self.set_cookies
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|c| c.starts_with(&prefix))
            .cloned()
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> reqwest::Response {
        let response = request
            .header("cookie", self.cookie_header())
            .send()
            .await
            .expect("the request is answered");
        for value in response.headers().get_all("set-cookie") {
            let text = value.to_str().unwrap().to_owned();
            let (pair, attributes) = text.split_once(';').unwrap_or((&text, ""));
            let (name, value) = pair.split_once('=').unwrap();
            let mut jar = self.cookies.lock().unwrap();
            if attributes.contains("Max-Age=0") {
                jar.remove(name);
            } else {
                jar.insert(name.to_owned(), value.to_owned());
            }
            self.set_cookies.lock().unwrap().push(text);
        }
        response
    }

    async fn get(&self, url: &str) -> reqwest::Response {
        self.send(self.http.get(url)).await
    }

    async fn post(&self, url: &str) -> reqwest::Response {
        self.send(self.http.post(url)).await
    }
}

fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("location")
        .unwrap_or_else(|| panic!("a redirect, got {}", response.status()))
        .to_str()
        .unwrap()
        .to_owned()
}

/// `/auth/login` → the provider → `/auth/callback`; returns the callback's
/// answer. The scripted provider approves at once.
async fn sign_in(server: &TestServer, browser: &Browser) -> reqwest::Response {
    let login = browser.get(&server.url("/auth/login?return_to=/ui")).await;
    assert_eq!(login.status(), 303, "login redirects to the provider");
    let at_provider = browser.get(&location(&login)).await;
    assert_eq!(at_provider.status().as_u16(), 303);
    browser.get(&location(&at_provider)).await
}

async fn me(server: &TestServer, browser: &Browser) -> Value {
    let response = browser.get(&server.url("/auth/me")).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

async fn scripted(groups: &[&str]) -> (ScriptedProvider, TestServer) {
    let provider = ScriptedProvider::start(CLIENT_ID, CLIENT_SECRET).await;
    provider.set_user(ScriptedUser {
        subject: "alice".into(),
        name: "Alice Example".into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    });
    let server = gateway(&provider.issuer, |_| {}).await;
    (provider, server)
}

#[tokio::test]
async fn signing_in_uses_pkce_state_and_nonce_and_creates_a_session() {
    let (provider, server) = scripted(&["ops", "dev"]).await;
    let browser = Browser::new();
    let callback = sign_in(&server, &browser).await;
    assert_eq!(callback.status(), 303);
    assert_eq!(location(&callback), "/ui", "back where the login started");

    let asked = &provider.authorize_requests()[0];
    assert_eq!(asked["response_type"], "code");
    assert_eq!(asked["client_id"], CLIENT_ID);
    assert_eq!(asked["redirect_uri"], server.url("/auth/callback"));
    assert_eq!(asked["code_challenge_method"], "S256");
    assert_eq!(asked["code_challenge"].len(), 43);
    assert!(asked["state"].len() >= 16 && asked["nonce"].len() >= 16);
    let scopes: Vec<&str> = asked["scope"].split(' ').collect();
    for scope in ["openid", "profile", "email"] {
        assert!(scopes.contains(&scope), "{scopes:?} lacks {scope}");
    }

    let cookie = browser
        .set_cookie_for("tollgate_session")
        .expect("a session cookie");
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=3600"] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    assert!(!cookie.contains("Secure"), "plain http: no Secure flag");
    assert_eq!(browser.cookie("tollgate_session").unwrap().len(), 43);
    assert!(
        browser.cookie("tollgate_login").is_none(),
        "the login cookie is spent"
    );
    let login_cookies: Vec<String> = browser
        .set_cookies
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.starts_with("tollgate_login="))
        .cloned()
        .collect();
    assert_eq!(
        login_cookies.len(),
        2,
        "set by login, deleted by the callback"
    );
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/auth/callback"] {
        assert!(
            login_cookies.iter().all(|c| c.contains(attribute)),
            "{login_cookies:?} lack {attribute}"
        );
    }
    assert!(login_cookies[0].contains("Max-Age=600") && login_cookies[1].contains("Max-Age=0"));

    let who = me(&server, &browser).await;
    assert_eq!(who["signed_in"], true);
    assert_eq!(who["subject"], "alice");
    assert_eq!(who["name"], "Alice Example");
    assert_eq!(who["email"], "alice@example.com");
    assert_eq!(who["admin"], true, "in the admin group `ops`");
    assert_eq!(who["groups"], json!(["ops", "dev"]));

    // Only the hash of the session id is stored.
    let id = browser.cookie("tollgate_session").unwrap();
    let stored = server
        .state
        .store
        .find_session(&tollgate::auth::keys::hash(&id))
        .await
        .unwrap()
        .expect("the session is stored by its hash");
    assert_eq!(stored.subject, "alice");
    assert_ne!(stored.id_hash, id);

    let audit = server.admin_get("/admin/v1/audit?type=audit.admin").await;
    assert!(
        audit["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["payload"]["action"] == "session.started"
                && r["payload"]["actor"] == "user:alice"),
        "sign-in is audited: {audit}"
    );
}

#[tokio::test]
async fn users_outside_the_admin_groups_are_not_admins() {
    let (_provider, server) = scripted(&["dev"]).await;
    let browser = Browser::new();
    assert_eq!(sign_in(&server, &browser).await.status(), 303);
    let who = me(&server, &browser).await;
    assert_eq!(who["signed_in"], true);
    assert_eq!(who["admin"], false);
}

#[tokio::test]
async fn spoiled_id_tokens_are_refused_without_a_session() {
    let (provider, server) = scripted(&["ops"]).await;
    for (spoil, expected) in [
        (Spoil::WrongIssuer, "issuer"),
        (Spoil::WrongAudience, "audience"),
        (Spoil::Expired, "xpired"),
        (Spoil::WrongNonce, "nonce"),
        (Spoil::BadSignature, "ignature"),
    ] {
        provider.spoil(spoil);
        let browser = Browser::new();
        let callback = sign_in(&server, &browser).await;
        assert!(
            browser.cookie("tollgate_session").is_none(),
            "{spoil:?}: no session"
        );
        let status = callback.status().as_u16();
        let body: Value = callback.json().await.unwrap();
        assert_eq!(status, 401, "{spoil:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_id_token", "{spoil:?}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(expected),
            "{spoil:?}: the error says why: {message}"
        );
        assert!(!message.contains(CLIENT_SECRET));
        assert_eq!(me(&server, &browser).await["signed_in"], false);
    }
}

#[tokio::test]
async fn a_callback_needs_the_login_this_browser_started() {
    let (_provider, server) = scripted(&[]).await;
    // No login cookie at all.
    let stranger = Browser::new();
    let (status, code) = error_code(
        stranger
            .get(&server.url("/auth/callback?code=x&state=y"))
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (400, "login_expired"));

    // A login cookie, but another state (a forged or replayed answer).
    let browser = Browser::new();
    let login = browser.get(&server.url("/auth/login")).await;
    let at_provider = browser.get(&location(&login)).await;
    let mut back = url::Url::parse(&location(&at_provider)).unwrap();
    let code_param: String = back
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    back.query_pairs_mut()
        .clear()
        .append_pair("code", &code_param)
        .append_pair("state", "not-the-state");
    let (status, code) = error_code(browser.get(back.as_str()).await).await;
    assert_eq!((status, code.as_str()), (400, "invalid_state"));
    assert!(browser.cookie("tollgate_session").is_none());
    assert!(
        browser.cookie("tollgate_login").is_none(),
        "spent even on failure"
    );

    // The provider said no.
    let (status, code) = error_code(
        Browser::new()
            .get(&server.url("/auth/callback?error=access_denied&error_description=no"))
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (401, "login_refused"));
}

#[tokio::test]
async fn login_is_404_without_oidc_and_never_returns_to_another_site() {
    let plain = TestServer::start(|_| {}).await;
    let (status, code) = error_code(Browser::new().get(&plain.url("/auth/login")).await).await;
    assert_eq!((status, code.as_str()), (404, "oidc_not_configured"));
    assert_eq!(
        me(&plain, &Browser::new()).await,
        json!({"signed_in": false, "reason": "no_session"})
    );

    let (_provider, server) = scripted(&[]).await;
    let browser = Browser::new();
    let login = browser
        .get(&server.url("/auth/login?return_to=//evil.example/x"))
        .await;
    let at_provider = browser.get(&location(&login)).await;
    let callback = browser.get(&location(&at_provider)).await;
    assert_eq!(location(&callback), "/ui");
}

/// Signs in and returns the browser and its `Cookie` header.
async fn signed_in(server: &TestServer) -> (Browser, String) {
    let browser = Browser::new();
    assert_eq!(sign_in(server, &browser).await.status(), 303);
    let cookie = format!(
        "tollgate_session={}",
        browser.cookie("tollgate_session").unwrap()
    );
    (browser, cookie)
}

#[tokio::test]
async fn a_cookie_stream_must_come_from_the_gateways_own_origin_or_an_allowed_one() {
    let provider = ScriptedProvider::start(CLIENT_ID, CLIENT_SECRET).await;
    let server = gateway(&provider.issuer, |oidc| {
        oidc.allowed_origins = vec!["https://console.example.com".into()];
    })
    .await;
    let (_browser, cookie) = signed_in(&server).await;
    let own = format!("http://{}", server.addr);

    let (mut ws, connected) = {
        let mut client =
            WsClient::connect_with(server.addr, "", &[("cookie", &cookie), ("origin", &own)])
                .await
                .expect("accepted from the gateway's own origin");
        let first = client.next_json().await;
        (client, first)
    };
    assert_eq!(connected["type"], "connected");
    assert_eq!(connected["payload"]["identity"]["kind"], "user");
    assert_eq!(connected["payload"]["identity"]["subject"], "alice");
    ws.ws.close(None).await.ok();

    for origin in [
        "http://evil.example",
        "null",
        "https://console.example.com.evil.example",
    ] {
        let refused =
            WsClient::connect_with(server.addr, "", &[("cookie", &cookie), ("origin", origin)])
                .await
                .err()
                .unwrap_or_else(|| panic!("{origin} is refused"));
        assert_eq!(refused.status, 403, "{origin}");
        assert_eq!(refused.body["error"]["code"], "origin_not_allowed");
    }
    for accepted in ["https://console.example.com"] {
        WsClient::connect_with(
            server.addr,
            "",
            &[("cookie", &cookie), ("origin", accepted)],
        )
        .await
        .unwrap_or_else(|r| panic!("{accepted} is allowed: {r:?}"));
    }
    // Not a browser (no Origin): not at risk, accepted.
    WsClient::connect_with(server.addr, "", &[("cookie", &cookie)])
        .await
        .expect("no Origin");
    // An API key needs no Origin check: it is not sent by the browser on its own.
    WsClient::connect_with(
        server.addr,
        "",
        &[
            ("authorization", &format!("Bearer {}", server.admin_key)),
            ("origin", "http://evil.example"),
        ],
    )
    .await
    .expect("key-authenticated streams are not origin-bound");

    // The same over SSE.
    let mut sse = SseClient::connect(
        &server.url("/events/stream"),
        &[("cookie", &cookie), ("origin", &own)],
    )
    .await
    .expect("SSE with the cookie");
    let first = sse.next_event().await.unwrap();
    assert_eq!(first.data["payload"]["identity"]["kind"], "user");
    let refused = SseClient::connect(
        &server.url("/events/stream"),
        &[("cookie", &cookie), ("origin", "http://evil.example")],
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(refused.status, 403);

    // A cookie that is not a live session is a presented, invalid credential.
    let refused = WsClient::connect_with(
        server.addr,
        "",
        &[("cookie", "tollgate_session=made-up"), ("origin", &own)],
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(refused.status, 401);
    assert_eq!(refused.body["error"]["code"], "invalid_session");
}

#[tokio::test]
async fn logging_out_closes_the_sessions_streams_within_five_seconds() {
    let (_provider, server) = scripted(&["ops"]).await;
    let (browser, cookie) = signed_in(&server).await;
    let (mut ws, _) = {
        let mut client = WsClient::connect_with(server.addr, "", &[("cookie", &cookie)])
            .await
            .unwrap();
        let first = client.next_json().await;
        (client, first)
    };
    let mut sse = SseClient::connect(&server.url("/events/stream"), &[("cookie", &cookie)])
        .await
        .unwrap();
    assert_eq!(sse.next_event().await.unwrap().data["type"], "connected");

    let logout = browser.post(&server.url("/auth/logout")).await;
    assert_eq!(logout.status(), 204);
    let cleared = browser.set_cookie_for("tollgate_session").unwrap();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    assert_eq!(me(&server, &browser).await["signed_in"], false);

    let started = std::time::Instant::now();
    let code = loop {
        match ws.read_within(Duration::from_secs(6)).await {
            Some(Read::Json(_)) => continue,
            Some(Read::Close(frame)) => break frame.map(|f| u16::from(f.code)),
            None => panic!("the stream stayed open after logout"),
        }
    };
    assert_eq!(code, Some(1008));
    assert!(started.elapsed() < Duration::from_secs(5));
    let ended = loop {
        let event = sse
            .next_event()
            .await
            .expect("an error event before the end");
        if event.data["type"] == "error" {
            break event;
        }
    };
    assert_eq!(ended.data["payload"]["code"], "session_ended");
    assert!(sse.next_event().await.is_none(), "the SSE stream ends");

    // The old cookie opens nothing any more.
    let refused = WsClient::connect_with(server.addr, "", &[("cookie", &cookie)])
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.status, 401);
    // Logging out again is harmless.
    assert_eq!(
        browser.post(&server.url("/auth/logout")).await.status(),
        204
    );
}

#[tokio::test]
async fn an_expired_session_closes_its_stream_and_is_reported() {
    let (_provider, server) = scripted(&[]).await;
    let (browser, cookie) = signed_in(&server).await;
    let mut ws = WsClient::connect_with(server.addr, "", &[("cookie", &cookie)])
        .await
        .unwrap();
    assert_eq!(ws.next_json().await["type"], "connected");

    // Expire it in the store, as time would: a second ago (not long ago,
    // or the store watcher's purge of day-old sessions may delete it).
    let url = server.state.config.load().database.url.clone();
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("UPDATE sessions SET expires_at = $1")
        .bind(chrono::Utc::now().timestamp_millis() - 1000)
        .execute(&mut db)
        .await
        .unwrap();

    match ws.read_within(Duration::from_secs(5)).await {
        Some(Read::Close(frame)) => assert_eq!(frame.map(|f| u16::from(f.code)), Some(1008)),
        other => panic!("expected a close within 5 s, got {other:?}"),
    }
    assert_eq!(
        me(&server, &browser).await,
        json!({"signed_in": false, "reason": "session_expired"})
    );
}

async fn create_key(server: &TestServer, name: &str, owner: Option<&str>) -> (String, String) {
    let response = reqwest::Client::new()
        .post(server.url("/admin/v1/keys"))
        .bearer_auth(&server.admin_key)
        .json(&json!({"name": name, "owner": owner}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["owner"], json!(owner));
    (
        body["key"].as_str().unwrap().to_owned(),
        body["id"].as_str().unwrap().to_owned(),
    )
}

/// The request id of the next `usage.recorded` on `ws`.
async fn next_usage(ws: &mut WsClient) -> Value {
    ws.until_type("usage.recorded").await
}

#[tokio::test]
async fn a_user_sees_the_events_of_the_keys_they_own_and_no_others() {
    let (_provider, server) = scripted(&["dev"]).await;
    let (_browser, cookie) = signed_in(&server).await;
    let (own_key, _) = create_key(&server, "alice's", Some("alice")).await;
    let (other_key, other_id) = create_key(&server, "bob's", None).await;

    let mut user = WsClient::connect_with(server.addr, "topics=usage", &[("cookie", &cookie)])
        .await
        .unwrap();
    let connected = user.next_json().await;
    assert_eq!(connected["payload"]["identity"]["admin"], false);
    let (mut admin, _) = WsClient::open(server.addr, "topics=usage", Some(&server.admin_key)).await;

    // Another key's request first: the admin sees it, the user must not.
    let other = server.chat(&other_key, "mock-1", "bob asks").await;
    let other_request = other.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(
        next_usage(&mut admin).await["payload"]["request_id"],
        other_request
    );
    let mine = server.chat(&own_key, "mock-1", "alice asks").await;
    let my_request = mine.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(
        next_usage(&mut admin).await["payload"]["request_id"],
        my_request
    );
    let seen = next_usage(&mut user).await;
    assert_eq!(
        seen["payload"]["request_id"], my_request,
        "the user's first usage event is their own key's, not bob's"
    );

    // Given the other key while connected: its events show up within seconds.
    let response = reqwest::Client::new()
        .patch(server.url(&format!("/admin/v1/keys/{other_id}")))
        .bearer_auth(&server.admin_key)
        .json(&json!({"owner": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(tollgate::events::credential::SESSION_RECHECK * 2).await;
    let later = server
        .chat(&other_key, "mock-1", "bob's key, now alice's")
        .await;
    let later_request = later.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(
        next_usage(&mut user).await["payload"]["request_id"],
        later_request
    );
}

#[tokio::test]
async fn the_full_login_works_against_a_real_openid_provider() {
    let Some(provider) = RealProvider::start() else {
        return;
    };
    for (subject, groups, admin) in [
        ("ops-user", json!(["ops"]), true),
        ("dev-user", json!(["dev"]), false),
    ] {
        provider
            .set_user(subject, json!({"name": format!("{subject} name"), "email": format!("{subject}@example.com"), "groups": groups}))
            .await;
        let server = gateway(&provider.issuer, |_| {}).await;
        let browser = Browser::new();
        let login = browser.get(&server.url("/auth/login?return_to=/ui")).await;
        assert_eq!(login.status(), 303);
        let back = provider.authorize(&location(&login), subject).await;
        assert!(back.starts_with(&server.url("/auth/callback")), "{back}");
        let callback = browser.get(&back).await;
        let status = callback.status();
        assert_eq!(status, 303, "{:?}", callback.text().await);
        let who = me(&server, &browser).await;
        assert_eq!(who["signed_in"], true, "{who}");
        assert_eq!(who["subject"], subject);
        assert_eq!(who["email"], format!("{subject}@example.com"));
        assert_eq!(who["admin"], admin, "{subject}: groups map to admin");

        // The session opens the stream, as the seed's browser example does.
        let cookie = format!(
            "tollgate_session={}",
            browser.cookie("tollgate_session").unwrap()
        );
        let own = format!("http://{}", server.addr);
        let mut ws =
            WsClient::connect_with(server.addr, "", &[("cookie", &cookie), ("origin", &own)])
                .await
                .expect("the session opens the stream");
        let connected = ws.next_json().await;
        assert_eq!(connected["payload"]["identity"]["subject"], subject);
    }
}

#[tokio::test]
async fn an_unreachable_provider_is_a_clear_502_and_the_gateway_keeps_serving() {
    let issuer = format!("http://127.0.0.1:{}", support::free_port());
    let server = gateway(&issuer, |_| {}).await;
    let response = Browser::new().get(&server.url("/auth/login")).await;
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "oidc_provider_unreachable");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&issuer), "{message}");
    assert!(!message.contains(CLIENT_SECRET));
    // API keys still work.
    WsClient::open(server.addr, "", Some(&server.admin_key)).await;
}

#[tokio::test]
async fn the_console_page_is_served_with_its_flags_and_a_strict_policy() {
    async fn page(server: &TestServer) -> String {
        let response = reqwest::get(server.url("/ui")).await.unwrap();
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let policy = headers["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(policy.contains(directive), "{policy} lacks {directive}");
        }
        let body = response.text().await.unwrap();
        assert!(!body.contains("__TOLLGATE_"), "every flag is filled in");
        body
    }
    let plain = TestServer::start(|_| {}).await;
    let body = page(&plain).await;
    assert!(body.contains("const OIDC_ENABLED = false;"));
    assert!(body.contains("const REQUIRE_AUTH = false;"));
    let (_provider, server) = scripted(&[]).await;
    let body = page(&server).await;
    assert!(body.contains("const OIDC_ENABLED = true;"));
    assert!(body.contains("const REQUIRE_AUTH = true;"));
}

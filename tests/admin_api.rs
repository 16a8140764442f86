//! The admin HTTP API, `/health`, `/ready` and request ids, over real HTTP
//! against an in-process gateway on 127.0.0.1.

mod support;

use chrono::{Duration, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{wait_until, TestServer, DEADLINE};
use tollgate::auth::keys;

const KEYS: &str = "/admin/v1/keys";

/// Sends `method path` with an optional bearer key and JSON body.
async fn call(
    server: &TestServer,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new().request(method, server.url(path));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.expect("the server answers")
}

async fn list_keys(server: &TestServer, key: &str) -> Vec<Value> {
    let response = call(server, Method::GET, KEYS, Some(key), None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list", "{body}");
    body["data"].as_array().expect("data is a list").clone()
}

/// Creates a key through the API; returns the 201 body.
async fn create_key(server: &TestServer, request: Value) -> Value {
    let response = call(
        server,
        Method::POST,
        KEYS,
        Some(&server.admin_key),
        Some(request),
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json().await.unwrap()
}

/// `DELETE path` with the admin key.
async fn admin_delete(server: &TestServer, path: &str) -> reqwest::Response {
    call(server, Method::DELETE, path, Some(&server.admin_key), None).await
}

/// One request to each admin endpoint: (method, path, body).
fn admin_endpoints() -> [(Method, String, Option<Value>); 3] {
    [
        (Method::GET, KEYS.to_owned(), None),
        (Method::POST, KEYS.to_owned(), Some(json!({"name": "x"}))),
        (
            Method::DELETE,
            format!("{KEYS}/{}", uuid::Uuid::new_v4()),
            None,
        ),
    ]
}

/// An error's HTTP status with the OpenAI `type` that goes with it.
type ErrorKind = (StatusCode, &'static str);
const BAD_REQUEST: ErrorKind = (StatusCode::BAD_REQUEST, "invalid_request_error");
const UNAUTHORIZED: ErrorKind = (StatusCode::UNAUTHORIZED, "authentication_error");
const FORBIDDEN: ErrorKind = (StatusCode::FORBIDDEN, "permission_error");
const NOT_FOUND: ErrorKind = (StatusCode::NOT_FOUND, "invalid_request_error");

/// Asserts an OpenAI-shaped error: exactly `{"error":{"type","code","message"}}`.
async fn assert_error(response: reqwest::Response, (status, kind): ErrorKind, code: &str) {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.expect("an error body is JSON");
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    assert_eq!(error.len(), 3, "{body}");
    assert_eq!(error["type"], kind, "{body}");
    assert_eq!(error["code"], code, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn requests_without_a_key_get_401_missing_api_key() {
    let server = TestServer::start(|_| {}).await;
    for (method, path, body) in admin_endpoints() {
        let response = call(&server, method, &path, None, body).await;
        assert_error(response, UNAUTHORIZED, "missing_api_key").await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_or_unknown_keys_get_401_invalid_api_key() {
    let server = TestServer::start(|_| {}).await;
    let mut altered = server.admin_key.clone().into_bytes();
    let last = altered.len() - 1;
    altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    let unknown = keys::generate().secret.expose().to_owned();
    for key in ["nope", "gw_live_short", &altered, &unknown] {
        let response = call(&server, Method::GET, KEYS, Some(key), None).await;
        assert_error(response, UNAUTHORIZED, "invalid_api_key").await;
    }
    let basic = reqwest::Client::new()
        .get(server.url(KEYS))
        .basic_auth("admin", Some(&server.admin_key))
        .send()
        .await
        .unwrap();
    assert_error(basic, UNAUTHORIZED, "invalid_api_key").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_non_admin_key_gets_403_on_every_admin_endpoint() {
    let server = TestServer::start(|_| {}).await;
    let key = server.create_key("app", false).await;
    for (method, path, body) in admin_endpoints() {
        let response = call(&server, method, &path, Some(&key), body).await;
        assert_error(response, FORBIDDEN, "admin_required").await;
    }
    assert_eq!(server.state.store.count_api_keys().await.unwrap(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn the_admin_key_lists_keys_without_the_keys_themselves() {
    let server = TestServer::start(|_| {}).await;
    let response = call(&server, Method::GET, KEYS, Some(&server.admin_key), None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    assert!(
        !text.contains(&server.admin_key[14..]),
        "a key leaked: {text}"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{body}");
    assert_eq!(data[0]["name"], "bootstrap");
    assert_eq!(data[0]["admin"], true);
    assert_eq!(data[0]["prefix"], &server.admin_key[..14]);
    assert_eq!(data[0]["revoked_at"], Value::Null);
    assert!(data[0].get("key").is_none() && data[0].get("key_hash").is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn post_creates_a_key_that_is_shown_only_in_its_answer() {
    let server = TestServer::start(|_| {}).await;
    let created = create_key(&server, json!({"name": "svc"})).await;
    let key = created["key"].as_str().expect("the answer has the key");
    assert!(keys::is_well_formed(key), "{key}");
    assert_eq!(created["name"], "svc");
    assert_eq!(created["admin"], false);
    assert_eq!(created["prefix"], &key[..14]);
    assert_eq!(created["expires_at"], Value::Null);
    assert_eq!(created["revoked_at"], Value::Null);
    let id = created["id"].as_str().unwrap();
    uuid::Uuid::parse_str(id).expect("the id is a UUID");

    let listed = list_keys(&server, &server.admin_key).await;
    let names: Vec<&str> = listed.iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["bootstrap", "svc"]);
    assert_eq!(listed[1]["id"], id);
    assert!(listed[1].get("key").is_none());
    assert!(!Value::Array(listed).to_string().contains(&key[14..]));

    // The new key is live: a non-admin key is known (403), not unknown (401).
    let response = call(&server, Method::GET, KEYS, Some(key), None).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    let admin = create_key(&server, json!({"name": "ops", "admin": true})).await;
    let admin_key = admin["key"].as_str().unwrap();
    assert_eq!(list_keys(&server, admin_key).await.len(), 3);

    let expiring = create_key(&server, json!({"name": "month", "expires_in": "30d"})).await;
    let expires_at: chrono::DateTime<Utc> =
        serde_json::from_value(expiring["expires_at"].clone()).unwrap();
    let distance = expires_at - (Utc::now() + Duration::days(30));
    assert!(distance.num_seconds().abs() < 120, "{expiring}");
    server.shutdown().await;
}

#[tokio::test]
async fn post_refuses_bad_requests_with_400_and_creates_nothing() {
    let server = TestServer::start(|_| {}).await;
    let past = (Utc::now() - Duration::minutes(1)).to_rfc3339();
    let future = (Utc::now() + Duration::days(1)).to_rfc3339();
    for (body, code) in [
        (json!({}), "invalid_body"),
        (json!({"name": "x", "colour": "red"}), "invalid_body"),
        (json!({"name": 5}), "invalid_body"),
        (json!({"name": "  "}), "invalid_name"),
        (json!({"name": "x", "expires_in": "soon"}), "invalid_expiry"),
        (
            json!({"name": "x", "expires_in": "1d", "expires_at": future}),
            "invalid_expiry",
        ),
        (json!({"name": "x", "expires_at": past}), "invalid_expiry"),
    ] {
        let response = call(
            &server,
            Method::POST,
            KEYS,
            Some(&server.admin_key),
            Some(body),
        )
        .await;
        assert_error(response, BAD_REQUEST, code).await;
    }
    let not_json = reqwest::Client::new()
        .post(server.url(KEYS))
        .bearer_auth(&server.admin_key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(not_json, BAD_REQUEST, "invalid_body").await;
    assert_eq!(server.state.store.count_api_keys().await.unwrap(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn delete_revokes_a_key_which_then_gets_401_revoked_api_key() {
    let server = TestServer::start(|_| {}).await;
    let created = create_key(&server, json!({"name": "doomed", "admin": true})).await;
    let key = created["key"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();
    assert_eq!(list_keys(&server, key).await.len(), 2);

    let path = format!("{KEYS}/{id}");
    let response = admin_delete(&server, &path).await;
    assert_eq!(response.status(), StatusCode::OK);
    let revoked: Value = response.json().await.unwrap();
    assert_eq!(revoked["id"], id);
    let revoked_at = revoked["revoked_at"].clone();
    assert!(revoked_at.is_string(), "{revoked}");

    let response = call(&server, Method::GET, KEYS, Some(key), None).await;
    assert_error(response, UNAUTHORIZED, "revoked_api_key").await;
    let listed = list_keys(&server, &server.admin_key).await;
    assert_eq!(listed[1]["revoked_at"], revoked_at);

    // Revoking again is harmless and keeps the first time.
    let response = admin_delete(&server, &path).await;
    assert_eq!(response.status(), StatusCode::OK);
    let again: Value = response.json().await.unwrap();
    assert_eq!(again["revoked_at"], revoked_at);

    let unknown = format!("{KEYS}/{}", uuid::Uuid::new_v4());
    let response = admin_delete(&server, &unknown).await;
    assert_error(response, NOT_FOUND, "key_not_found").await;
    let bad = format!("{KEYS}/not-a-uuid");
    let response = admin_delete(&server, &bad).await;
    assert_error(response, BAD_REQUEST, "invalid_key_id").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_past_its_expiry_gets_401_expired_api_key() {
    let server = TestServer::start(|_| {}).await;
    let expires_at = (Utc::now() + Duration::seconds(1)).to_rfc3339();
    let created = create_key(
        &server,
        json!({"name": "brief", "admin": true, "expires_at": expires_at}),
    )
    .await;
    let key = created["key"].as_str().unwrap();
    wait_until("the key has expired", DEADLINE, || async {
        let response = call(&server, Method::GET, KEYS, Some(key), None).await;
        response.status() != StatusCode::OK
    })
    .await;
    let response = call(&server, Method::GET, KEYS, Some(key), None).await;
    assert_error(response, UNAUTHORIZED, "expired_api_key").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_stored_already_expired_gets_401_expired_api_key() {
    let server = TestServer::start(|_| {}).await;
    let (_, secret) = tollgate::auth::issue_api_key(
        &server.state.store,
        "lapsed",
        true,
        Some(Utc::now() - Duration::seconds(1)),
    )
    .await
    .unwrap();
    let response = call(&server, Method::GET, KEYS, Some(secret.expose()), None).await;
    assert_error(response, UNAUTHORIZED, "expired_api_key").await;
    server.shutdown().await;
}

#[tokio::test]
async fn using_a_key_records_when_it_was_last_used() {
    let server = TestServer::start(|_| {}).await;
    let record = server.key_record(&server.admin_key).await;
    assert_eq!(record.last_used_at, None);
    list_keys(&server, &server.admin_key).await;
    wait_until("last_used_at is recorded", DEADLINE, || async {
        let record = server.key_record(&server.admin_key).await;
        record
            .last_used_at
            .is_some_and(|at| (Utc::now() - at) < Duration::minutes(1))
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn every_response_has_a_request_id_and_a_clients_id_is_echoed() {
    let server = TestServer::start(|_| {}).await;
    let client = reqwest::Client::new();
    let mut seen = Vec::new();
    for path in ["/health", KEYS, "/no/such/route"] {
        let response = client.get(server.url(path)).send().await.unwrap();
        let id = response
            .headers()
            .get("x-request-id")
            .unwrap_or_else(|| panic!("{path} answered without x-request-id"))
            .to_str()
            .unwrap()
            .to_owned();
        uuid::Uuid::parse_str(&id).expect("a generated request id is a UUID");
        seen.push(id);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3, "request ids repeat: {seen:?}");

    for path in ["/health", KEYS] {
        let response = client
            .get(server.url(path))
            .header("x-request-id", "client-chosen-42")
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers().get("x-request-id").unwrap(),
            "client-chosen-42",
            "{path}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn health_reports_the_version_and_ready_reports_the_database() {
    let server = TestServer::start(|_| {}).await;
    let response = call(&server, Method::GET, "/health", None, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));

    let response = call(&server, Method::GET, "/ready", None, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_get_openai_shaped_errors() {
    let server = TestServer::start(|_| {}).await;
    let response = call(&server, Method::GET, "/v2/nothing", None, None).await;
    assert_error(response, NOT_FOUND, "not_found").await;
    let response = call(&server, Method::PUT, "/health", None, None).await;
    assert_error(
        response,
        (StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error"),
        "method_not_allowed",
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_revoked_by_another_process_is_refused_within_the_cache_lifetime() {
    let server = TestServer::start(|_| {}).await;
    let key = server.create_key("app", false).await;
    let models = |key: String| {
        let url = server.url("/v1/models");
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    // Checked once, so the gateway now trusts it from its key cache.
    assert_eq!(models(key.clone()).await, StatusCode::OK);
    let id = server.key_id(&key).await;
    // Straight to the store, as `tollgate keys revoke` or another node does.
    server.state.store.revoke_api_key(id).await.unwrap();
    let revoked = std::time::Instant::now();
    wait_until("the revoked key is refused", DEADLINE, || async {
        models(key.clone()).await == StatusCode::UNAUTHORIZED
    })
    .await;
    // The store watcher's second plus the cache's second, with slack.
    assert!(
        revoked.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        revoked.elapsed()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_gets_an_owner_at_creation_or_later_and_can_lose_it() {
    let server = TestServer::start(|_| {}).await;
    let created = create_key(&server, json!({"name": "owned", "owner": "alice"})).await;
    assert_eq!(created["owner"], "alice");
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("{KEYS}/{id}");
    let admin = Some(server.admin_key.as_str());

    let moved = call(
        &server,
        Method::PATCH,
        &path,
        admin,
        Some(json!({"owner": "bob"})),
    )
    .await;
    assert_eq!(moved.status(), StatusCode::OK);
    assert_eq!(moved.json::<Value>().await.unwrap()["owner"], "bob");
    let listed = list_keys(&server, &server.admin_key).await;
    let row = listed.iter().find(|k| k["id"] == id.as_str()).unwrap();
    assert_eq!(row["owner"], "bob");

    let cleared = call(
        &server,
        Method::PATCH,
        &path,
        admin,
        Some(json!({"owner": null})),
    )
    .await;
    assert_eq!(cleared.json::<Value>().await.unwrap()["owner"], Value::Null);
    let audit = server.admin_get("/admin/v1/audit?type=audit.admin").await;
    let changes = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["payload"]["action"] == "key.owner_changed" && r["payload"]["target"] == id.as_str()
        })
        .count();
    assert_eq!(changes, 2, "each change is audited: {audit}");

    // Refusals: no `owner` at all, an empty one, unknown fields, another id.
    for body in [
        json!({}),
        json!({"owner": " "}),
        json!({"owner": "a", "admin": true}),
    ] {
        let response = call(&server, Method::PATCH, &path, admin, Some(body.clone())).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
    }
    let response = create_key_response(&server, json!({"name": "x", "owner": ""})).await;
    assert_error(response, BAD_REQUEST, "invalid_owner").await;
    let unknown = format!("{KEYS}/{}", uuid::Uuid::new_v4());
    let response = call(
        &server,
        Method::PATCH,
        &unknown,
        admin,
        Some(json!({"owner": "a"})),
    )
    .await;
    assert_error(response, NOT_FOUND, "key_not_found").await;
    let response = call(
        &server,
        Method::PATCH,
        &format!("{KEYS}/nope"),
        admin,
        Some(json!({"owner": "a"})),
    )
    .await;
    assert_error(response, BAD_REQUEST, "invalid_key_id").await;
    let user = server.create_key("plain", false).await;
    let response = call(
        &server,
        Method::PATCH,
        &path,
        Some(&user),
        Some(json!({"owner": "a"})),
    )
    .await;
    assert_error(response, FORBIDDEN, "admin_required").await;
}

async fn create_key_response(server: &TestServer, request: Value) -> reqwest::Response {
    call(
        server,
        Method::POST,
        KEYS,
        Some(&server.admin_key),
        Some(request),
    )
    .await
}

//! A scripted OpenID provider on 127.0.0.1:0 for the failure cases a real
//! one will not produce: discovery, a JWKS with one RS256 key
//! (tests/oidc/test-signing-key.*), an authorization endpoint that approves
//! at once, and a token endpoint that checks the client's secret and the
//! PKCE verifier, then signs an ID token — spoiled on request (wrong
//! issuer, audience or nonce, expired, signed by another key).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const SIGNING_KEY: &str = include_str!("../oidc/test-signing-key.pem");
const PUBLIC_JWK: &str = include_str!("../oidc/test-signing-key.jwk.json");

/// How to spoil the next ID tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spoil {
    Nothing,
    WrongIssuer,
    WrongAudience,
    Expired,
    WrongNonce,
    /// A signature that does not match the token.
    BadSignature,
}

#[derive(Debug, Clone)]
pub struct ScriptedUser {
    pub subject: String,
    pub name: String,
    pub groups: Vec<String>,
}

struct Grant {
    client_id: String,
    nonce: String,
    challenge: String,
    challenge_method: String,
    redirect_uri: String,
}

struct Inner {
    issuer: String,
    client_id: String,
    client_secret: String,
    user: ScriptedUser,
    spoil: Spoil,
    grants: HashMap<String, Grant>,
    /// The query of every authorization request, in order.
    authorize_requests: Vec<HashMap<String, String>>,
}

#[derive(Clone)]
struct Shared(Arc<Mutex<Inner>>);

pub struct ScriptedProvider {
    pub issuer: String,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedProvider {
    pub async fn start(client_id: &str, client_secret: &str) -> ScriptedProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let shared = Shared(Arc::new(Mutex::new(Inner {
            issuer: issuer.clone(),
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            user: ScriptedUser {
                subject: "alice".into(),
                name: "Alice".into(),
                groups: vec![],
            },
            spoil: Spoil::Nothing,
            grants: HashMap::new(),
            authorize_requests: Vec::new(),
        })));
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        ScriptedProvider {
            issuer,
            shared,
            task,
        }
    }

    pub fn set_user(&self, user: ScriptedUser) {
        self.shared.0.lock().unwrap().user = user;
    }

    pub fn spoil(&self, spoil: Spoil) {
        self.shared.0.lock().unwrap().spoil = spoil;
    }

    pub fn authorize_requests(&self) -> Vec<HashMap<String, String>> {
        self.shared.0.lock().unwrap().authorize_requests.clone()
    }
}

impl Drop for ScriptedProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn discovery(State(shared): State<Shared>) -> Json<Value> {
    let issuer = shared.0.lock().unwrap().issuer.clone();
    Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "jwks_uri": format!("{issuer}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "code_challenge_methods_supported": ["S256"],
    }))
}

async fn jwks() -> Json<Value> {
    let key: Value = serde_json::from_str(PUBLIC_JWK).unwrap();
    Json(json!({ "keys": [key] }))
}

async fn authorize(
    State(shared): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let mut inner = shared.0.lock().unwrap();
    inner.authorize_requests.push(query.clone());
    let field = |name: &str| query.get(name).cloned().unwrap_or_default();
    let code = uuid::Uuid::new_v4().to_string();
    inner.grants.insert(
        code.clone(),
        Grant {
            client_id: field("client_id"),
            nonce: field("nonce"),
            challenge: field("code_challenge"),
            challenge_method: field("code_challenge_method"),
            redirect_uri: field("redirect_uri"),
        },
    );
    let mut back = url::Url::parse(&field("redirect_uri")).expect("a redirect_uri");
    back.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &field("state"));
    Redirect::to(back.as_str()).into_response()
}

fn token_error(code: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": code }))).into_response()
}

async fn token(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut inner = shared.0.lock().unwrap();
    let expected = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", inner.client_id, inner.client_secret));
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "));
    if basic != Some(expected.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "invalid_client" })),
        )
            .into_response();
    }
    let field = |name: &str| form.get(name).cloned().unwrap_or_default();
    let Some(grant) = inner.grants.remove(&field("code")) else {
        return token_error("invalid_grant");
    };
    let verifier = field("code_verifier");
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(Sha256::digest(verifier.as_bytes()));
    if grant.challenge_method != "S256"
        || challenge != grant.challenge
        || grant.redirect_uri != field("redirect_uri")
        || grant.client_id != inner.client_id
    {
        return token_error("invalid_grant");
    }
    let now = chrono::Utc::now().timestamp();
    let spoil = inner.spoil;
    let user = inner.user.clone();
    let claims = json!({
        "iss": if spoil == Spoil::WrongIssuer { "http://elsewhere.example".to_owned() } else { inner.issuer.clone() },
        "aud": if spoil == Spoil::WrongAudience { "another-client".to_owned() } else { inner.client_id.clone() },
        "sub": user.subject,
        "name": user.name,
        "email": format!("{}@example.com", user.subject),
        "groups": user.groups,
        "iat": now - 5,
        "exp": if spoil == Spoil::Expired { now - 60 } else { now + 300 },
        "nonce": if spoil == Spoil::WrongNonce { "not-the-nonce".to_owned() } else { grant.nonce },
    });
    let mut header = Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("tollgate-test".into());
    let key = EncodingKey::from_rsa_pem(SIGNING_KEY.as_bytes()).unwrap();
    let mut id_token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    if spoil == Spoil::BadSignature {
        // Sign other claims and keep this token's header and payload.
        let other = jsonwebtoken::encode(&header, &json!({"sub": "mallory"}), &key).unwrap();
        let (signed, _) = id_token.rsplit_once('.').unwrap();
        let (_, signature) = other.rsplit_once('.').unwrap();
        id_token = format!("{signed}.{signature}");
    }
    Json(json!({
        "access_token": uuid::Uuid::new_v4().to_string(),
        "token_type": "Bearer",
        "expires_in": 300,
        "id_token": id_token,
    }))
    .into_response()
}

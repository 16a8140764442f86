//! Sign-in with an OpenID Connect provider: discovery, the Authorization
//! Code flow with PKCE, `state` and `nonce`, and the ID token's signature
//! and claims checked by the `openidconnect` crate.
//!
//! Nothing about a login in progress is kept on the server: `state`, the
//! `nonce` and the PKCE verifier travel in a short-lived `HttpOnly` cookie
//! on the browser that started the login, so the callback may land on any
//! gateway node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreErrorResponseType, CoreGenderClaim, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm, CoreProviderMetadata,
    CoreResponseType, CoreRevocableToken, CoreRevocationErrorResponse,
    CoreTokenIntrospectionResponse, CoreTokenType,
};
use openidconnect::{
    AccessTokenHash, AdditionalClaims, AuthenticationFlow, AuthorizationCode, Client, ClientId,
    ClientSecret, CsrfToken, EmptyExtraTokenFields, EndpointMaybeSet, EndpointNotSet, EndpointSet,
    IdTokenFields, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, Scope, StandardErrorResponse, StandardTokenResponse, TokenResponse,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;
use tokio::sync::Mutex;

use crate::config::OidcConfig;

/// How long a discovered provider (endpoints and signing keys) is reused.
const DISCOVERY_TTL: Duration = Duration::from_secs(600);
/// How long a user has to finish signing in at the provider.
pub const LOGIN_TTL_SECS: i64 = 600;
/// Time allowed for each call to the provider.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);

/// Every claim of the ID token beyond the standard ones, so the configured
/// groups claim can be read whatever its name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OtherClaims {
    #[serde(flatten)]
    pub claims: Map<String, Value>,
}

impl AdditionalClaims for OtherClaims {}

type IdFields = IdTokenFields<
    OtherClaims,
    EmptyExtraTokenFields,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;
type GatewayTokenResponse = StandardTokenResponse<IdFields, CoreTokenType>;
type GatewayClient = Client<
    OtherClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    GatewayTokenResponse,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("cannot reach the OpenID provider at {issuer}: {detail}")]
    Discovery { issuer: String, detail: String },
    #[error("the OpenID provider refused the authorization code: {0}")]
    TokenExchange(String),
    #[error("the OpenID provider's answer has no ID token")]
    NoIdToken,
    #[error("the ID token was rejected: {0}")]
    InvalidIdToken(String),
    #[error("[auth.oidc] is invalid: {0}")]
    Config(String),
}

/// A login in progress, kept in the browser between `/auth/login` and
/// `/auth/callback`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingLogin {
    pub state: String,
    pub nonce: String,
    pub pkce_verifier: String,
    /// Where to send the browser once signed in (a path on this gateway).
    pub return_to: String,
}

impl PendingLogin {
    pub fn to_cookie_value(&self) -> String {
        let json = serde_json::to_vec(self).expect("strings always serialise");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    pub fn from_cookie_value(value: &str) -> Option<PendingLogin> {
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .ok()?;
        serde_json::from_slice(&json).ok()
    }

    /// Whether the `state` the provider sent back is this login's.
    pub fn state_matches(&self, returned: &str) -> bool {
        self.state.as_bytes().ct_eq(returned.as_bytes()).into()
    }
}

/// Who signed in, from a verified ID token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIn {
    pub subject: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub groups: Vec<String>,
    pub admin: bool,
}

struct Discovered {
    /// The configuration the client was built from; a reload that changes
    /// it discovers again.
    config: OidcConfig,
    client: Arc<GatewayClient>,
    at: Instant,
}

/// The OpenID provider as this gateway knows it: discovered lazily (so the
/// gateway starts while the provider is down) and cached for a while.
pub struct Oidc {
    http: reqwest::Client,
    discovered: Mutex<Option<Discovered>>,
}

impl Default for Oidc {
    fn default() -> Self {
        Oidc {
            http: reqwest::Client::builder()
                // The provider's endpoints must not redirect us elsewhere
                // (openidconnect's advice against SSRF).
                .redirect(reqwest::redirect::Policy::none())
                .timeout(PROVIDER_TIMEOUT)
                .build()
                .expect("a plain reqwest client always builds"),
            discovered: Mutex::new(None),
        }
    }
}

impl Oidc {
    async fn client(&self, config: &OidcConfig) -> Result<Arc<GatewayClient>, OidcError> {
        let mut discovered = self.discovered.lock().await;
        if let Some(found) = discovered.as_ref() {
            if found.config == *config && found.at.elapsed() < DISCOVERY_TTL {
                return Ok(found.client.clone());
            }
        }
        let issuer =
            IssuerUrl::new(config.issuer.clone()).map_err(|e| OidcError::Config(e.to_string()))?;
        let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| OidcError::Discovery {
                issuer: config.issuer.clone(),
                detail: error_chain(&e),
            })?;
        let redirect = RedirectUrl::new(config.redirect_url.clone())
            .map_err(|e| OidcError::Config(e.to_string()))?;
        let client = Arc::new(
            GatewayClient::from_provider_metadata(
                metadata,
                ClientId::new(config.client_id.clone()),
                config.client_secret.clone().map(ClientSecret::new),
            )
            .set_redirect_uri(redirect),
        );
        *discovered = Some(Discovered {
            config: config.clone(),
            client: client.clone(),
            at: Instant::now(),
        });
        Ok(client)
    }

    /// Starts a login: the provider URL to send the browser to, and what
    /// the callback will need to finish it.
    pub async fn begin(
        &self,
        config: &OidcConfig,
        return_to: String,
    ) -> Result<(url::Url, PendingLogin), OidcError> {
        let client = self.client(config).await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state, nonce) = client
            .authorize_url(
                AuthenticationFlow::<CoreResponseType>::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scopes(
                config
                    .scopes
                    .iter()
                    .filter(|s| s.as_str() != "openid")
                    .map(|s| Scope::new(s.clone())),
            )
            .set_pkce_challenge(challenge)
            .url();
        Ok((
            url,
            PendingLogin {
                state: state.secret().clone(),
                nonce: nonce.secret().clone(),
                pkce_verifier: verifier.secret().clone(),
                return_to,
            },
        ))
    }

    /// Finishes a login: exchanges the code (with the PKCE verifier) and
    /// verifies the ID token: signature, issuer, audience, expiry, nonce,
    /// and the access-token hash when present.
    pub async fn finish(
        &self,
        config: &OidcConfig,
        pending: &PendingLogin,
        code: String,
    ) -> Result<SignedIn, OidcError> {
        let client = self.client(config).await?;
        let response = client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|e| OidcError::Config(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier.clone()))
            .request_async(&self.http)
            .await
            .map_err(|e| OidcError::TokenExchange(error_chain(&e)))?;
        let id_token = response.id_token().ok_or(OidcError::NoIdToken)?;
        let verifier = client.id_token_verifier();
        let nonce = Nonce::new(pending.nonce.clone());
        let claims = id_token
            .claims(&verifier, &nonce)
            .map_err(|e| OidcError::InvalidIdToken(e.to_string()))?;
        if let Some(expected) = claims.access_token_hash() {
            let invalid = |e: &dyn std::fmt::Display| OidcError::InvalidIdToken(e.to_string());
            let alg = id_token.signing_alg().map_err(|e| invalid(&e))?;
            let key = id_token.signing_key(&verifier).map_err(|e| invalid(&e))?;
            let actual = AccessTokenHash::from_token(response.access_token(), alg, key)
                .map_err(|e| invalid(&e))?;
            if actual != *expected {
                return Err(OidcError::InvalidIdToken(
                    "the access token does not match its hash (at_hash)".to_owned(),
                ));
            }
        }
        let groups = groups(&claims.additional_claims().claims, &config.groups_claim);
        let admin = groups.iter().any(|g| config.admin_groups.contains(g));
        Ok(SignedIn {
            subject: claims.subject().as_str().to_owned(),
            name: claims
                .name()
                .and_then(|n| n.get(None))
                .map(|n| n.as_str().to_owned())
                .or_else(|| claims.preferred_username().map(|u| u.as_str().to_owned())),
            email: claims.email().map(|e| e.as_str().to_owned()),
            groups,
            admin,
        })
    }
}

/// The user's groups from the configured claim: a list of strings, or one
/// string; anything else counts as no groups.
fn groups(claims: &Map<String, Value>, claim: &str) -> Vec<String> {
    match claims.get(claim) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|item| item.as_str().map(str::to_owned))
            .collect(),
        Some(Value::String(one)) => vec![one.clone()],
        _ => Vec::new(),
    }
}

/// An error and its causes on one line (the provider's clients nest them).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_come_from_the_configured_claim_as_a_list_or_one_string() {
        let claims: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "groups": ["ops", 7, "dev"],
            "role": "admins",
            "weird": {"a": 1}
        }))
        .unwrap();
        assert_eq!(groups(&claims, "groups"), vec!["ops", "dev"]);
        assert_eq!(groups(&claims, "role"), vec!["admins"]);
        assert!(groups(&claims, "weird").is_empty());
        assert!(groups(&claims, "missing").is_empty());
    }

    #[test]
    fn a_pending_login_survives_its_cookie_and_checks_state_exactly() {
        let pending = PendingLogin {
            state: "s1".into(),
            nonce: "n1".into(),
            pkce_verifier: "v1".into(),
            return_to: "/ui".into(),
        };
        let back = PendingLogin::from_cookie_value(&pending.to_cookie_value()).unwrap();
        assert_eq!(back.nonce, "n1");
        assert_eq!(back.return_to, "/ui");
        assert!(back.state_matches("s1"));
        assert!(!back.state_matches("s2"));
        assert!(!back.state_matches(""));
        assert!(PendingLogin::from_cookie_value("not base64 json!").is_none());
    }
}

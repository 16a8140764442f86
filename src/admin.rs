//! The admin HTTP API under `/admin/v1`, for holders of an admin key.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::auth::{self, AdminAuth, KeyIdentity};
use crate::error::ApiError;
use crate::events::model::AdminAction;
use crate::server::AppState;
use crate::store::StoreError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    pub name: String,
    #[serde(default)]
    pub admin: bool,
    /// A lifetime such as `30d`; or give `expires_at`.
    #[serde(default)]
    pub expires_in: Option<String>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// `POST /admin/v1/keys`: the new key is in the answer, and only there.
pub async fn create_key(
    State(state): State<AppState>,
    AdminAuth(admin): AdminAuth,
    body: Result<Json<CreateKeyRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(request) = body.map_err(|e| ApiError::bad_request("invalid_body", e.body_text()))?;
    let name = auth::validate_key_name(&request.name)
        .map_err(|m| ApiError::bad_request("invalid_name", m))?;
    let expires_at = match (&request.expires_in, request.expires_at) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_expiry",
                "give expires_in or expires_at, not both",
            ))
        }
        (Some(lifetime), None) => Some(
            auth::expiry_after(lifetime).map_err(|m| ApiError::bad_request("invalid_expiry", m))?,
        ),
        (None, Some(at)) if at <= Utc::now() => {
            return Err(ApiError::bad_request(
                "invalid_expiry",
                "expires_at is in the past",
            ))
        }
        (None, at) => at,
    };
    let (record, secret) = auth::issue_api_key(&state.store, name, request.admin, expires_at)
        .await
        .map_err(|e| ApiError::store(&e))?;
    record_action(&state, &admin, "key.created", &record.id.to_string()).await?;
    let mut body = serde_json::to_value(&record).map_err(|e| ApiError::internal(e.to_string()))?;
    body["key"] = Value::String(secret.expose().to_owned());
    Ok((StatusCode::CREATED, Json(body)))
}

/// `GET /admin/v1/keys`: every key, never the keys themselves.
pub async fn list_keys(
    State(state): State<AppState>,
    AdminAuth(_admin): AdminAuth,
) -> Result<Json<Value>, ApiError> {
    let keys = state
        .store
        .list_api_keys()
        .await
        .map_err(|e| ApiError::store(&e))?;
    Ok(Json(json!({ "object": "list", "data": keys })))
}

/// `DELETE /admin/v1/keys/{id}`: revokes the key; revoking twice is harmless.
pub async fn revoke_key(
    State(state): State<AppState>,
    AdminAuth(admin): AdminAuth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| {
        ApiError::bad_request("invalid_key_id", format!("`{id}` is not a key id (a UUID)"))
    })?;
    let record = state.store.revoke_api_key(id).await.map_err(|e| match e {
        StoreError::NotFound(m) => ApiError::not_found("key_not_found", m),
        e => ApiError::store(&e),
    })?;
    state.revocations.notify(record.id);
    record_action(&state, &admin, "key.revoked", &record.id.to_string()).await?;
    Ok(Json(
        serde_json::to_value(&record).map_err(|e| ApiError::internal(e.to_string()))?,
    ))
}

/// `POST /admin/v1/config/reload`: 200 with the changed sections, or 400
/// with the configuration error (the old configuration stays in force).
pub async fn reload_config(
    State(state): State<AppState>,
    AdminAuth(admin): AdminAuth,
) -> Result<Json<Value>, ApiError> {
    match crate::reload::reload(&state).await {
        Ok(changed) => {
            record_action(&state, &admin, "config.reloaded", "configuration").await?;
            Ok(Json(
                json!({ "status": "reloaded", "changed_sections": changed }),
            ))
        }
        Err(error) => Err(ApiError::bad_request(
            "invalid_configuration",
            error.to_string(),
        )),
    }
}

/// Keeps an admin action in the store and publishes it as `audit.admin`.
async fn record_action(
    state: &AppState,
    admin: &KeyIdentity,
    action: &str,
    target: &str,
) -> Result<(), ApiError> {
    let actor = admin.id.to_string();
    state
        .store
        .record_admin_action(&actor, action, target, true)
        .await
        .map_err(|e| ApiError::store(&e))?;
    state.hub.publish(AdminAction {
        actor,
        action: action.to_owned(),
        target: target.to_owned(),
    });
    Ok(())
}

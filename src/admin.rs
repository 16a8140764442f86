//! The admin HTTP API under `/admin/v1`, for holders of an admin key.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::auth::{self, AdminAuth, KeyIdentity};
use crate::budget::{self, BudgetScope, Period};
use crate::error::ApiError;
use crate::events::model::AdminAction;
use crate::events::EventType;
use crate::server::AppState;
use crate::store::{AuditQuery, StoreError, UsageGrouping, UsageQuery};

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
    /// The key's own budget in USD per `budget_period` (default monthly).
    #[serde(default)]
    pub budget_usd: Option<f64>,
    #[serde(default)]
    pub budget_period: Option<String>,
    /// The user (OIDC subject) the key belongs to; they see its events.
    #[serde(default)]
    pub owner: Option<String>,
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
    let budget = match (request.budget_usd, &request.budget_period) {
        (Some(usd), period) => Some(
            auth::key_budget(usd, period.as_deref().unwrap_or("monthly"))
                .map_err(|m| ApiError::bad_request("invalid_budget", m))?,
        ),
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_budget",
                "budget_period needs budget_usd",
            ))
        }
        (None, None) => None,
    };
    let spec = auth::KeySpec {
        name: name.to_owned(),
        admin: request.admin,
        expires_at,
        budget,
        owner: request
            .owner
            .as_deref()
            .map(auth::validate_owner)
            .transpose()
            .map_err(|m| ApiError::bad_request("invalid_owner", m))?
            .map(str::to_owned),
    };
    let (record, secret) = auth::issue_key(&state.store, spec)
        .await
        .map_err(|e| ApiError::store(&e))?;
    record_action(
        &state,
        &actor(&admin),
        "key.created",
        &record.id.to_string(),
    )
    .await?;
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

fn parse_key_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| {
        ApiError::bad_request("invalid_key_id", format!("`{id}` is not a key id (a UUID)"))
    })
}

fn key_store_error(error: StoreError) -> ApiError {
    match error {
        StoreError::NotFound(m) => ApiError::not_found("key_not_found", m),
        e => ApiError::store(&e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateKeyRequest {
    /// The new owner (an OIDC subject), or `null` for none. Required.
    pub owner: Option<String>,
}

/// `PATCH /admin/v1/keys/{id}`: gives the key to a user (`{"owner":
/// "subject"}`) or takes it back (`{"owner": null}`).
pub async fn update_key(
    State(state): State<AppState>,
    AdminAuth(admin): AdminAuth,
    Path(id): Path<String>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_key_id(&id)?;
    let Json(body) = body.map_err(|e| ApiError::bad_request("invalid_body", e.body_text()))?;
    // `owner` must be present: a missing field is not the same as `null`.
    if body.get("owner").is_none() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "give `owner`: a user's subject, or null to remove the owner",
        ));
    }
    let request: UpdateKeyRequest = serde_json::from_value(body)
        .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
    let owner = request
        .owner
        .as_deref()
        .map(auth::validate_owner)
        .transpose()
        .map_err(|m| ApiError::bad_request("invalid_owner", m))?;
    let record = state
        .store
        .set_api_key_owner(id, owner)
        .await
        .map_err(key_store_error)?;
    record_action(
        &state,
        &actor(&admin),
        "key.owner_changed",
        &record.id.to_string(),
    )
    .await?;
    Ok(Json(
        serde_json::to_value(&record).map_err(|e| ApiError::internal(e.to_string()))?,
    ))
}

/// `DELETE /admin/v1/keys/{id}`: revokes the key; revoking twice is harmless.
pub async fn revoke_key(
    State(state): State<AppState>,
    AdminAuth(admin): AdminAuth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_key_id(&id)?;
    let record = state
        .store
        .revoke_api_key(id)
        .await
        .map_err(key_store_error)?;
    state.key_invalidated(record.id);
    record_action(
        &state,
        &actor(&admin),
        "key.revoked",
        &record.id.to_string(),
    )
    .await?;
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
            record_action(&state, &actor(&admin), "config.reloaded", "configuration").await?;
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

/// The `actor` of an admin key's actions: its id.
fn actor(admin: &KeyIdentity) -> String {
    admin.id.to_string()
}

/// Keeps an admin action in the store and publishes it as `audit.admin`.
pub async fn record_action(
    state: &AppState,
    actor: &str,
    action: &str,
    target: &str,
) -> Result<(), ApiError> {
    let actor = actor.to_owned();
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    pub key_id: Option<Uuid>,
    pub model: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub group_by: Option<String>,
}

/// `GET /admin/v1/usage`: token and cost totals from the ledger, filtered by
/// `key_id`, `model`, `from`, `to` (RFC 3339) and grouped by `key`, `model`
/// or `day` (UTC).
pub async fn usage(
    State(state): State<AppState>,
    AdminAuth(_admin): AdminAuth,
    params: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let group_by = match params.group_by.as_deref() {
        None => None,
        Some("key") => Some(UsageGrouping::Key),
        Some("model") => Some(UsageGrouping::Model),
        Some("day") => Some(UsageGrouping::Day),
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_group_by",
                format!("group_by `{other}` is not one of key, model, day"),
            ))
        }
    };
    let query = UsageQuery {
        key_id: params.key_id,
        model: params.model,
        from: params.from,
        to: params.to,
        group_by,
    };
    let groups = state
        .store
        .usage_totals(&query)
        .await
        .map_err(|e| ApiError::store(&e))?;
    let totals = groups.iter().fold(
        json!({"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_micros": 0}),
        |mut t, g| {
            for (field, value) in [
                ("requests", g.requests),
                ("input_tokens", g.input_tokens),
                ("output_tokens", g.output_tokens),
                ("cost_micros", g.cost_micros),
            ] {
                t[field] = json!(t[field].as_i64().unwrap_or(0) + value);
            }
            t
        },
    );
    Ok(Json(json!({
        "object": "list",
        "group_by": params.group_by,
        "data": if group_by.is_some() { json!(groups) } else { json!([]) },
        "totals": totals,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    pub since: Option<DateTime<Utc>>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub key_id: Option<Uuid>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

const AUDIT_PAGE_DEFAULT: i64 = 100;
const AUDIT_PAGE_MAX: i64 = 1000;

/// `GET /admin/v1/audit`: the audit log, newest first, filtered by `since`
/// (RFC 3339), `type` (`audit.request`, `audit.admin`, …) and `key_id`, in
/// pages of `limit` (default 100, at most 1000); pass `next_cursor` back as
/// `cursor` for the next page.
pub async fn audit(
    State(state): State<AppState>,
    AdminAuth(_admin): AdminAuth,
    params: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    if let Some(kind) = &params.event_type {
        let known = kind
            .parse::<EventType>()
            .is_ok_and(|t| t.topic() == crate::events::Topic::Audit);
        if !known {
            return Err(ApiError::bad_request(
                "invalid_type",
                format!("`{kind}` is not an audit event type (audit.request, audit.guardrail_violation, audit.admin)"),
            ));
        }
    }
    let limit = params.limit.unwrap_or(AUDIT_PAGE_DEFAULT);
    if !(1..=AUDIT_PAGE_MAX).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be between 1 and {AUDIT_PAGE_MAX}"),
        ));
    }
    let before_id = params
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>().map_err(|_| {
                ApiError::bad_request("invalid_cursor", "cursor is not one this endpoint gave")
            })
        })
        .transpose()?;
    let query = AuditQuery {
        since: params.since,
        event_type: params.event_type,
        key_id: params.key_id,
        before_id,
        // One more than the page tells whether another page exists.
        limit: limit + 1,
    };
    let mut records = state
        .store
        .list_audit(&query)
        .await
        .map_err(|e| ApiError::store(&e))?;
    let next_cursor = (records.len() as i64 > limit).then(|| {
        records.truncate(limit as usize);
        records.last().map(|r| r.id.to_string())
    });
    Ok(Json(json!({
        "object": "list",
        "data": records,
        "next_cursor": next_cursor.flatten(),
    })))
}

/// `GET /admin/v1/budgets`: every budget counter of the current periods —
/// global budgets once, key-scoped budgets per key with spend, and keys'
/// own budgets — with spend, thresholds reached, state and reset time.
pub async fn budgets(
    State(state): State<AppState>,
    AdminAuth(_admin): AdminAuth,
) -> Result<Json<Value>, ApiError> {
    let now = state.clock.now();
    let config = state.config.load();
    let keys = state
        .store
        .list_api_keys()
        .await
        .map_err(|e| ApiError::store(&e))?;
    let mut refs = Vec::new();
    for budget in &config.budgets {
        match budget.scope {
            BudgetScope::Global => refs.extend(
                budget::budgets_for(std::slice::from_ref(budget), Uuid::nil(), None)
                    .into_iter()
                    .map(|mut b| {
                        b.key_id = None;
                        b
                    }),
            ),
            BudgetScope::Key => {
                for key in keys.iter().filter(|k| !k.is_revoked()) {
                    refs.extend(budget::budgets_for(
                        std::slice::from_ref(budget),
                        key.id,
                        None,
                    ));
                }
            }
        }
    }
    for key in keys.iter().filter(|k| !k.is_revoked()) {
        if let Some(own) = key
            .budget_micros
            .zip(key.budget_period.as_deref().and_then(Period::parse))
        {
            refs.extend(budget::budgets_for(&[], key.id, Some(own)));
        }
    }
    let starts: Vec<i64> = {
        let mut starts: Vec<i64> = refs
            .iter()
            .map(|b| b.period.start(now).timestamp_millis())
            .collect();
        starts.sort_unstable();
        starts.dedup();
        starts
    };
    let spend = state
        .store
        .budget_spend_in(&starts)
        .await
        .map_err(|e| ApiError::store(&e))?;
    let data: Vec<Value> = refs
        .iter()
        .map(|b| {
            let start = b.period.start(now);
            let spent = spend
                .iter()
                .find(|s| s.budget == b.name && s.scope_key == b.scope_key() && s.period_start_ms == start.timestamp_millis())
                .map_or(0, |s| s.spent_micros);
            let reached: Vec<u32> = b
                .thresholds
                .iter()
                .copied()
                .filter(|t| i128::from(spent) * 100 >= i128::from(b.limit_micros) * i128::from(*t))
                .collect();
            json!({
                "budget": b.name,
                "scope": b.scope,
                "key_id": b.key_id,
                "period": b.period,
                "action": b.action,
                "limit_micros": b.limit_micros,
                "spent_micros": spent,
                "thresholds": b.thresholds,
                "thresholds_reached": reached,
                "state": if spent >= b.limit_micros { "exceeded" } else { "ok" },
                "period_start": start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "resets_at": b.period.reset(now).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            })
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `GET /admin/v1/providers`: each provider's circuit breaker — state,
/// counters, when it opened and when it turns half-open, its settings.
pub async fn providers(State(state): State<AppState>, AdminAuth(_admin): AdminAuth) -> Json<Value> {
    let routing = state.routing.load();
    let data: Vec<Value> = routing
        .providers()
        .iter()
        .map(|upstream| json!({"provider": upstream.name, "circuit_breaker": upstream.breaker.snapshot()}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

//! Liveness and readiness: `/health` answers while the process runs,
//! `/ready` only while the database answers too.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::server::AppState;

pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok", "version": crate::VERSION }))
}

pub async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => Ok(Json(
            json!({ "status": "ready", "version": crate::VERSION }),
        )),
        Ok(Err(error)) => Err(ApiError::store(&error)),
        Err(_) => Err(ApiError::unavailable(
            "store_unavailable",
            "the gateway's database did not answer within 2 seconds",
            1,
        )),
    }
}

//! Prometheus metrics at `GET /metrics`, through the `metrics` facade.
//!
//! Names (all prefixed `tollgate_`): `streams_open{transport}`,
//! `events_published_total{type}`, `stream_frames_delivered_total{transport}`,
//! `events_lagged_total`, `stream_resumes_total{outcome}`,
//! `stream_rejections_total{reason}`, `stream_pong_timeouts_total`,
//! `ledger_records_total` (finished `/v1/*` requests written) and
//! `ledger_transactions_total` (the store transactions they took).

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls reuse it. `None`
/// when another recorder was installed first (the metrics then go there).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => Some(handle),
            Err(error) => {
                tracing::warn!(%error, "cannot install the Prometheus recorder; /metrics will be empty");
                None
            }
        })
        .as_ref()
}

pub async fn render() -> impl IntoResponse {
    let body = install().map(PrometheusHandle::render).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

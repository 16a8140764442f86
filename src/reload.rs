//! Reloading the configuration on SIGHUP or `POST /admin/v1/config/reload`:
//! the new file is validated first; a valid one replaces the old one whole
//! and `system.config_reloaded` names the changed sections (never values);
//! an invalid one leaves the old in force and `system.config_reload_failed`
//! says why.
//!
//! `[features.websocket]` changes apply to streams opened after the reload.
//! `server.listen`, `database.url`, `server.event_threads`,
//! `server.event_thread_nice` and `server.request_thread_slice_us` are
//! swapped in but take effect only at the
//! next start; a warning says so.

use crate::config::{self, ConfigError};
use crate::events::model::{ConfigReloadFailed, ConfigReloaded};
use crate::guardrails::Guardrails;
use crate::proxy::provider::Routing;
use crate::server::AppState;

/// Reloads from the file the server started with (or the defaults and the
/// environment, if it started without one). Returns the changed sections.
pub async fn reload(state: &AppState) -> Result<Vec<String>, ConfigError> {
    let path = state.config_path.clone();
    let loaded = tokio::task::spawn_blocking(move || config::load(path.as_deref()))
        .await
        .unwrap_or_else(|e| {
            Err(ConfigError {
                file: None,
                position: None,
                key: None,
                message: format!("reload task failed: {e}"),
            })
        });
    let loaded = loaded.and_then(|new| {
        let routing =
            Routing::from_config(&new, &state.breakers).map_err(|message| ConfigError {
                file: state.config_path.clone(),
                position: None,
                key: Some("providers".to_owned()),
                message,
            })?;
        let guardrails = Guardrails::compile(&new.guardrails).map_err(|message| ConfigError {
            file: state.config_path.clone(),
            position: None,
            key: Some("guardrails".to_owned()),
            message,
        })?;
        Ok((new, routing, guardrails))
    });
    match loaded {
        Ok((new, routing, guardrails)) => {
            let old = state.config.load_full();
            let changed = old.changed_sections(&new);
            if old.server.listen != new.server.listen
                || old.database != new.database
                || old.server.event_threads != new.server.event_threads
                || old.server.event_thread_nice != new.server.event_thread_nice
                || old.server.request_thread_slice_us != new.server.request_thread_slice_us
            {
                tracing::warn!(
                    "server.listen, database.url, server.event_thread* and server.request_thread_slice_us changes take effect at the next start"
                );
            }
            let ws = &new.features.websocket;
            state
                .hub
                .resize(ws.channel_capacity as usize, ws.history_size as usize);
            state.config.store(std::sync::Arc::new(new));
            state.routing.store(std::sync::Arc::new(routing));
            state.guardrails.store(std::sync::Arc::new(guardrails));
            tracing::info!(changed = ?changed, "configuration reloaded");
            state.hub.publish(ConfigReloaded {
                changed_sections: changed.clone(),
            });
            Ok(changed)
        }
        Err(error) => {
            tracing::error!(%error, "configuration reload failed; keeping the current configuration");
            state.hub.publish(ConfigReloadFailed {
                error: error.to_string(),
            });
            Err(error)
        }
    }
}

/// Reloads on every SIGHUP until shutdown.
#[cfg(unix)]
pub async fn on_sighup(state: AppState) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP; reload with POST /admin/v1/config/reload");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            received = hangups.recv() => {
                if received.is_none() {
                    return;
                }
                let _ = reload(&state).await;
            }
        }
    }
}

#[cfg(not(unix))]
pub async fn on_sighup(_state: AppState) {}

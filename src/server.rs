//! Assembles the gateway: builds the one [`AppState`], the router, binds
//! the listener, and runs until a shutdown signal, letting in-flight
//! requests finish within `[server] shutdown_timeout_secs`.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use axum::http::{HeaderName, Request};
use axum::routing::{delete, get};
use axum::Router;
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::auth::keys::ApiKeySecret;
use crate::config::Config;
use crate::store::Store;
use crate::{admin, health};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Everything handlers share, built once in [`Server::bind`].
#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

pub struct AppStateInner {
    /// The live configuration; swapped whole on reload.
    pub config: ArcSwap<Config>,
    pub store: Store,
}

impl Deref for AppState {
    type Target = AppStateInner;

    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

impl AppState {
    pub fn new(config: Config, store: Store) -> AppState {
        AppState(Arc::new(AppStateInner {
            config: ArcSwap::from_pointee(config),
            store,
        }))
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/admin/v1/keys", get(admin::list_keys).post(admin::create_key))
        .route("/admin/v1/keys/{id}", delete(admin::revoke_key))
        .with_state(state)
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                let id = request
                    .headers()
                    .get(REQUEST_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
            }),
        )
        // Outermost: give every request an id (keeping the client's), then
        // copy it onto the response.
        .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER))
        .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER, MakeRequestUuid))
}

/// A gateway bound to its address, ready to run.
pub struct Server {
    listener: TcpListener,
    state: AppState,
    /// The admin key created on first start with an empty database; shown
    /// once by the caller, never stored.
    pub bootstrap_key: Option<ApiKeySecret>,
}

impl Server {
    /// Connects the store (running migrations), creates the bootstrap admin
    /// key on an empty database, and binds the listener.
    pub async fn bind(config: Config, _config_path: Option<PathBuf>) -> anyhow::Result<Server> {
        let store = Store::connect(&config.database.url)
            .await
            .with_context(|| {
                format!(
                    "cannot open the database {}",
                    crate::config::mask_url_password(&config.database.url)
                )
            })?;
        let bootstrap_key = if store.count_api_keys().await? == 0 {
            let (_, secret) = crate::auth::issue_api_key(&store, "bootstrap", true, None).await?;
            Some(secret)
        } else {
            None
        };
        let listener = TcpListener::bind(&config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.listen))?;
        Ok(Server {
            listener,
            state: AppState::new(config, store),
            bootstrap_key,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then stops accepting and gives
    /// in-flight requests `shutdown_timeout_secs` to finish.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.local_addr();
        let state = self.state.clone();
        let grace = Duration::from_secs(state.config.load().server.shutdown_timeout_secs);
        let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
        tracing::info!(%addr, version = crate::VERSION, "tollgate listening");
        let serve = axum::serve(self.listener, router(state.clone()))
            .with_graceful_shutdown(async move {
                shutdown.await;
                tracing::info!("shutting down: no new connections; finishing in-flight requests");
                let _ = stopping_tx.send(true);
            })
            .into_future();
        tokio::select! {
            result = serve => result.context("server failed")?,
            _ = async {
                let _ = stopping_rx.wait_for(|stopping| *stopping).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(grace_secs = grace.as_secs(), "in-flight requests did not finish in time; stopping anyway");
            }
        }
        state.store.close().await;
        tracing::info!("tollgate stopped");
        Ok(())
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

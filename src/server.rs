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
use axum::routing::{delete, get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::cache::KeyCache;
use crate::auth::keys::ApiKeySecret;
use crate::auth::revocation::KeyRevocations;
use crate::budget::{BudgetBook, Clock};
use crate::config::Config;
use crate::error::ApiError;
use crate::events::admission::StreamSlots;
use crate::events::model::{SystemShutdown, SystemStartup};
use crate::events::runtime::{EventRuntime, StreamTasks};
use crate::events::EventHub;
use crate::guardrails::Guardrails;
use crate::ledger::RequestLedger;
use crate::proxy::provider::{Breakers, Routing};
use crate::store::Store;
use crate::{admin, events, health, metrics, proxy, reload, store_watch};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Everything handlers share, built once in [`Server::bind`].
#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

pub struct AppStateInner {
    /// The live configuration; swapped whole on reload.
    pub config: ArcSwap<Config>,
    /// The file the configuration came from, reread on reload.
    pub config_path: Option<PathBuf>,
    pub store: Store,
    pub hub: EventHub,
    /// This node's name in `system.*` events.
    pub node: String,
    pub stream_slots: Arc<StreamSlots>,
    /// Every event-stream task, on the event runtime; shutdown waits for
    /// their close frames.
    pub stream_tasks: StreamTasks,
    /// Cancelled once, when the server starts shutting down.
    pub shutdown: CancellationToken,
    pub revocations: KeyRevocations,
    /// Keys checked in the last second.
    pub key_cache: KeyCache,
    /// The OpenID provider of `[auth.oidc]`, discovered on first use.
    pub oidc: crate::auth::oidc::Oidc,
    /// Model name → provider; rebuilt whole on reload.
    pub routing: ArcSwap<Routing>,
    /// Every provider's circuit breaker, kept across reloads.
    pub breakers: Breakers,
    /// The compiled `[[guardrails.rules]]`; rebuilt whole on reload.
    pub guardrails: ArcSwap<Guardrails>,
    pub ledger: RequestLedger,
    /// Current periods' spend per budget, for blocking.
    pub budget_book: Arc<BudgetBook>,
    /// The time budgets and the ledger go by.
    pub clock: Arc<Clock>,
    /// Threads of the ledger writer and the event streams (last: stopped
    /// once everything above is gone).
    pub event_runtime: EventRuntime,
}

impl Deref for AppState {
    type Target = AppStateInner;

    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

impl AppState {
    /// Builds the state and starts the event runtime; fails if a provider
    /// cannot be built or the runtime's threads cannot be started.
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        store: Store,
    ) -> anyhow::Result<AppState> {
        let ws = &config.features.websocket;
        let hub = EventHub::local(ws.channel_capacity as usize, ws.history_size as usize);
        let breakers = Breakers::new(hub.clone());
        let routing = Routing::from_config(&config, &breakers).map_err(anyhow::Error::msg)?;
        let guardrails = Guardrails::compile(&config.guardrails).map_err(anyhow::Error::msg)?;
        let node = config.server.node_name.clone().unwrap_or_else(host_name);
        let budget_book = Arc::new(BudgetBook::default());
        let event_runtime = EventRuntime::from_config(&config.server)
            .context("cannot start the event threads (server.event_threads)")?;
        let ledger = RequestLedger::start(
            store.clone(),
            hub.clone(),
            budget_book.clone(),
            event_runtime.handle(),
        );
        let stream_tasks = StreamTasks::new(&event_runtime);
        Ok(AppState(Arc::new(AppStateInner {
            config: ArcSwap::from_pointee(config),
            config_path,
            store,
            hub,
            node,
            stream_slots: Arc::default(),
            stream_tasks,
            shutdown: CancellationToken::new(),
            revocations: KeyRevocations::default(),
            key_cache: KeyCache::default(),
            oidc: Default::default(),
            routing: ArcSwap::from_pointee(routing),
            breakers,
            guardrails: ArcSwap::from_pointee(guardrails),
            ledger,
            budget_book,
            clock: Arc::default(),
            event_runtime,
        })))
    }
}

impl AppState {
    /// A key was revoked or expired: stop trusting it and close its streams.
    pub fn key_invalidated(&self, key_id: uuid::Uuid) {
        self.key_cache.forget(key_id);
        self.revocations.notify(key_id);
    }
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "tollgate".to_owned())
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/admin/v1/keys", get(admin::list_keys).post(admin::create_key))
        .route(
            "/admin/v1/keys/{id}",
            delete(admin::revoke_key).patch(admin::update_key),
        )
        .route("/admin/v1/config/reload", post(admin::reload_config))
        .route("/admin/v1/usage", get(admin::usage))
        .route("/admin/v1/audit", get(admin::audit))
        .route("/admin/v1/budgets", get(admin::budgets))
        .route("/admin/v1/providers", get(admin::providers))
        .route("/auth/login", get(crate::auth::routes::login))
        .route("/auth/callback", get(crate::auth::routes::callback))
        .route("/auth/logout", post(crate::auth::routes::logout))
        .route("/auth/me", get(crate::auth::routes::me))
        .route("/ui", get(crate::ui::console))
        .route("/ui/", get(crate::ui::console))
        .route("/ws/events", get(events::ws::ws_events))
        .route("/events/stream", get(events::sse::sse_events))
        .route("/metrics", get(metrics::render))
        .route("/v1/chat/completions", post(proxy::chat_completions))
        .route("/v1/embeddings", post(proxy::embeddings))
        .route("/v1/models", get(proxy::list_models))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
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

async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found("not_found", format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: axum::http::StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::bad_request(
            "method_not_allowed",
            format!("{} does not accept {method}", uri.path()),
        )
    }
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
    pub async fn bind(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Server> {
        metrics::install();
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
        // Loading the tokenizer takes a moment; do it now, not on the first request.
        tokio::task::spawn_blocking(|| crate::proxy::usage::count_tokens("warm up"));
        let state = AppState::new(config, config_path, store)?;
        state.hub.publish(SystemStartup {
            version: crate::VERSION.to_owned(),
            node: state.node.clone(),
            listen: listener.local_addr()?.to_string(),
        });
        Ok(Server {
            listener,
            state,
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

    /// Serves until `shutdown` completes, then stops accepting, tells every
    /// event stream (`system.shutdown`, then close 1001) and gives in-flight
    /// requests `shutdown_timeout_secs` to finish.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.local_addr();
        let state = self.state.clone();
        let grace = Duration::from_secs(state.config.load().server.shutdown_timeout_secs);
        tracing::info!(%addr, version = crate::VERSION, node = %state.node, "tollgate listening");
        let background = TaskTracker::new();
        background.spawn(store_watch::run(state.clone()));
        background.spawn(reload::on_sighup(state.clone()));
        background.close();
        let stopping = state.clone();
        // Without TCP_NODELAY a small event frame can wait for the peer's
        // delayed ACK (tens of milliseconds) before it leaves.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        });
        let serve = axum::serve(listener, router(state.clone()))
            .with_graceful_shutdown(async move {
                shutdown.await;
                tracing::info!("shutting down: no new connections; finishing in-flight requests");
                // Published before streams are told to stop, so each sends
                // it ahead of its close frame.
                stopping.hub.publish(SystemShutdown {
                    version: crate::VERSION.to_owned(),
                    node: stopping.node.clone(),
                    reason: "signal".to_owned(),
                });
                stopping.shutdown.cancel();
            })
            .into_future();
        let deadline = async {
            state.shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            result = serve => result.context("server failed")?,
            _ = deadline => {
                tracing::warn!(grace_secs = grace.as_secs(), "in-flight requests did not finish in time; stopping anyway");
            }
        }
        state.stream_tasks.close();
        if tokio::time::timeout(grace, state.stream_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("event streams did not close in time");
        }
        background.wait().await;
        // Every request has finished or been abandoned: write their records.
        state.ledger.close().await;
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

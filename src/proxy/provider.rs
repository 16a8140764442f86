//! Providers: where requests go. One trait, [`Provider`], with an
//! OpenAI-compatible HTTP implementation ([`super::openai`]) and the built-in
//! mock ([`super::mock`]); and [`Routing`], the table from a public model
//! name to its provider, upstream model name and prices, rebuilt whole on
//! configuration reload.
//!
//! A provider answers with the upstream's status and body: a whole JSON body,
//! or, for streams, the raw `text/event-stream` bytes as they arrive. The
//! proxy layer reads usage from both the same way, whoever produced them.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::config::{Config, ProviderType};
use crate::pricing::Price;

/// The OpenAI API operations the gateway proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
}

impl Endpoint {
    /// The path under a provider's base URL and under `/v1`.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }
}

/// A request on its way upstream: the client's JSON with the model name
/// replaced by the upstream's (and, for streams, usage asked for).
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub endpoint: Endpoint,
    pub body: serde_json::Value,
    pub stream: bool,
}

pub enum UpstreamBody {
    Complete(Bytes),
    /// `text/event-stream` bytes as the upstream sends them.
    Stream(BoxStream<'static, Result<Bytes, ProviderError>>),
}

pub struct UpstreamResponse {
    pub status: u16,
    pub body: UpstreamBody,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot connect to the provider: {0}")]
    Connect(String),
    #[error("the provider did not answer in time")]
    Timeout,
    #[error("the provider's answer broke off: {0}")]
    Broken(String),
}

pub trait Provider: Send + Sync {
    fn send(
        &self,
        request: UpstreamRequest,
    ) -> BoxFuture<'static, Result<UpstreamResponse, ProviderError>>;
}

/// A public model name's destination.
#[derive(Clone)]
pub struct Route {
    pub model: String,
    pub provider_name: String,
    pub provider: Arc<dyn Provider>,
    pub upstream_model: String,
    pub price: Price,
}

/// Model name → route, built from one configuration.
#[derive(Clone, Default)]
pub struct Routing {
    routes: HashMap<String, Route>,
    /// Model names in configuration order, for `GET /v1/models`.
    order: Vec<String>,
}

impl Routing {
    /// Builds every provider of a validated configuration.
    pub fn from_config(config: &Config) -> Result<Routing, String> {
        let mut providers: HashMap<&str, Arc<dyn Provider>> = HashMap::new();
        for (name, provider) in &config.providers {
            let built: Arc<dyn Provider> = match provider.kind {
                ProviderType::Openai => Arc::new(
                    super::openai::OpenAiProvider::new(provider)
                        .map_err(|e| format!("provider `{name}`: {e}"))?,
                ),
                ProviderType::Mock => Arc::new(super::mock::MockProvider::new(provider)),
            };
            providers.insert(name, built);
        }
        let mut routing = Routing::default();
        for model in &config.models {
            let provider = providers
                .get(model.provider.as_str())
                .ok_or_else(|| format!("model `{}` names no provider", model.name))?;
            routing.order.push(model.name.clone());
            routing.routes.insert(
                model.name.clone(),
                Route {
                    model: model.name.clone(),
                    provider_name: model.provider.clone(),
                    provider: provider.clone(),
                    upstream_model: model
                        .upstream_model
                        .clone()
                        .unwrap_or_else(|| model.name.clone()),
                    price: Price::of(model),
                },
            );
        }
        Ok(routing)
    }

    pub fn route(&self, model: &str) -> Option<&Route> {
        self.routes.get(model)
    }

    pub fn models(&self) -> impl Iterator<Item = &Route> {
        self.order.iter().filter_map(|name| self.routes.get(name))
    }
}

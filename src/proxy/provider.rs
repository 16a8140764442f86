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
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

use crate::breaker::{CircuitBreaker, CircuitBreakerConfig};
use crate::config::{Config, ProviderType};
use crate::events::EventHub;
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
    /// The JSON body, serialized.
    pub body: Bytes,
    pub stream: bool,
}

impl UpstreamRequest {
    /// Serializes the client's `request` for the upstream without copying
    /// it: `model` becomes `upstream_model`, and a stream asks for its
    /// final usage chunk (`stream_options.include_usage`, other options
    /// kept). Every other field goes as the client sent it.
    pub fn new(
        endpoint: Endpoint,
        request: &Map<String, Value>,
        upstream_model: &str,
        stream: bool,
    ) -> UpstreamRequest {
        let body = serde_json::to_vec(&Overridden {
            request,
            model: upstream_model,
            ask_usage: stream,
        })
        .expect("a JSON value serializes");
        UpstreamRequest {
            endpoint,
            body: Bytes::from(body),
            stream,
        }
    }
}

struct Overridden<'a> {
    request: &'a Map<String, Value>,
    model: &'a str,
    ask_usage: bool,
}

impl Serialize for Overridden<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        let mut model = false;
        let mut options = false;
        for (key, value) in self.request {
            match key.as_str() {
                "model" => {
                    map.serialize_entry(key, self.model)?;
                    model = true;
                }
                "stream_options" if self.ask_usage => {
                    map.serialize_entry(key, &WithUsage(value))?;
                    options = true;
                }
                _ => map.serialize_entry(key, value)?,
            }
        }
        if !model {
            map.serialize_entry("model", self.model)?;
        }
        if self.ask_usage && !options {
            map.serialize_entry("stream_options", &WithUsage(&Value::Null))?;
        }
        map.end()
    }
}

/// `stream_options` with `include_usage: true`: the client's other options
/// kept when it sent an object, replaced when it sent anything else.
struct WithUsage<'a>(&'a Value);

impl Serialize for WithUsage<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        if let Value::Object(options) = self.0 {
            for (key, value) in options.iter().filter(|(k, _)| *k != "include_usage") {
                map.serialize_entry(key, value)?;
            }
        }
        map.serialize_entry("include_usage", &true)?;
        map.end()
    }
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
    /// The provider answered with a redirect, which is not followed: a
    /// POST turned into a GET, or the provider's key sent to another host,
    /// is worse than a clear error. `to` is the target's origin (scheme,
    /// host and port: never its path or query), where it could be read.
    #[error("the provider answered HTTP {status}, a redirect")]
    Redirected { status: u16, to: Option<String> },
}

pub trait Provider: Send + Sync {
    fn send(
        &self,
        request: UpstreamRequest,
    ) -> BoxFuture<'static, Result<UpstreamResponse, ProviderError>>;
}

/// One provider as a route uses it: its name, the provider, and the
/// provider's circuit breaker (shared by every model routed to it).
#[derive(Clone)]
pub struct Upstream {
    pub name: String,
    pub provider: Arc<dyn Provider>,
    pub breaker: Arc<CircuitBreaker>,
}

/// A public model name's destination: its provider, then its fallbacks.
#[derive(Clone)]
pub struct Route {
    pub model: String,
    /// The model's provider first, then its `fallbacks` in order.
    pub upstreams: Vec<Upstream>,
    pub upstream_model: String,
    pub price: Price,
}

impl Route {
    pub fn provider_name(&self) -> &str {
        &self.upstreams[0].name
    }
}

/// Every provider's circuit breaker, kept across configuration reloads so
/// a reload neither resets nor forgets a breaker's state.
pub struct Breakers {
    hub: EventHub,
    by_provider: Mutex<HashMap<String, Arc<CircuitBreaker>>>,
}

impl Breakers {
    pub fn new(hub: EventHub) -> Breakers {
        Breakers {
            hub,
            by_provider: Mutex::default(),
        }
    }

    /// The provider's breaker, created on first use, with `config` applied.
    fn get(&self, provider: &str, config: &CircuitBreakerConfig) -> Arc<CircuitBreaker> {
        let mut map = self.by_provider.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(provider) {
            Some(breaker) => {
                breaker.set_config(config.clone());
                breaker.clone()
            }
            None => {
                let breaker =
                    CircuitBreaker::new(provider.to_owned(), config.clone(), self.hub.clone());
                map.insert(provider.to_owned(), breaker.clone());
                breaker
            }
        }
    }
}

/// Model name → route, built from one configuration.
#[derive(Clone, Default)]
pub struct Routing {
    routes: HashMap<String, Route>,
    /// Model names in configuration order, for `GET /v1/models`.
    order: Vec<String>,
    /// Every configured provider, by name, for `GET /admin/v1/providers`.
    upstreams: Vec<Upstream>,
}

impl Routing {
    /// Builds every provider of a validated configuration.
    pub fn from_config(config: &Config, breakers: &Breakers) -> Result<Routing, String> {
        let mut upstreams: HashMap<&str, Upstream> = HashMap::new();
        for (name, provider) in &config.providers {
            let built: Arc<dyn Provider> = match provider.kind {
                ProviderType::Openai => Arc::new(
                    super::openai::OpenAiProvider::new(provider)
                        .map_err(|e| format!("provider `{name}`: {e}"))?,
                ),
                ProviderType::Mock => Arc::new(super::mock::MockProvider::new(provider)),
            };
            upstreams.insert(
                name,
                Upstream {
                    name: name.clone(),
                    provider: built,
                    breaker: breakers.get(name, &provider.circuit_breaker),
                },
            );
        }
        let mut routing = Routing::default();
        for model in &config.models {
            let chain = std::iter::once(&model.provider)
                .chain(&model.fallbacks)
                .map(|name| {
                    upstreams
                        .get(name.as_str())
                        .cloned()
                        .ok_or_else(|| format!("model `{}` names no provider `{name}`", model.name))
                })
                .collect::<Result<Vec<_>, _>>()?;
            routing.order.push(model.name.clone());
            routing.routes.insert(
                model.name.clone(),
                Route {
                    model: model.name.clone(),
                    upstreams: chain,
                    upstream_model: model
                        .upstream_model
                        .clone()
                        .unwrap_or_else(|| model.name.clone()),
                    price: Price::of(model),
                },
            );
        }
        let mut all: Vec<Upstream> = upstreams.into_values().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        routing.upstreams = all;
        Ok(routing)
    }

    pub fn route(&self, model: &str) -> Option<&Route> {
        self.routes.get(model)
    }

    pub fn models(&self) -> impl Iterator<Item = &Route> {
        self.order.iter().filter_map(|name| self.routes.get(name))
    }

    pub fn providers(&self) -> &[Upstream] {
        &self.upstreams
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sent(request: Value, stream: bool) -> Value {
        let request = UpstreamRequest::new(
            Endpoint::ChatCompletions,
            request.as_object().unwrap(),
            "up-model",
            stream,
        );
        serde_json::from_slice(&request.body).unwrap()
    }

    #[test]
    fn the_model_is_the_upstreams_and_every_other_field_goes_as_sent() {
        let request = json!({"model": "public", "messages": [{"role": "user", "content": "hi"}],
            "x_vendor": {"deep": [1, 2.5, null]}, "temperature": 0.2,
            "stream_options": {"include_usage": false}});
        let mut expected = request.clone();
        expected["model"] = json!("up-model");
        assert_eq!(sent(request, false), expected);
    }

    #[test]
    fn a_stream_asks_for_usage_and_keeps_the_clients_other_options() {
        let base = json!({"model": "public", "messages": [], "stream": true});
        let cases = [
            (None, json!({"include_usage": true})),
            (
                Some(json!({"include_usage": false})),
                json!({"include_usage": true}),
            ),
            (
                Some(json!({"include_obfuscation": false})),
                json!({"include_obfuscation": false, "include_usage": true}),
            ),
            (Some(json!("not an object")), json!({"include_usage": true})),
        ];
        for (options, expected) in cases {
            let mut request = base.clone();
            if let Some(options) = options {
                request["stream_options"] = options;
            }
            let body = sent(request, true);
            assert_eq!(body["stream_options"], expected);
            assert_eq!(body["model"], "up-model");
            assert_eq!(body["stream"], true);
        }
    }

    #[test]
    fn the_body_has_each_key_once() {
        let request = json!({"model": "public", "stream_options": {"include_usage": false}});
        let request = UpstreamRequest::new(
            Endpoint::ChatCompletions,
            request.as_object().unwrap(),
            "up-model",
            true,
        );
        let text = std::str::from_utf8(&request.body).unwrap();
        assert_eq!(text.matches("\"model\"").count(), 1);
        assert_eq!(text.matches("\"include_usage\"").count(), 1);
        assert_eq!(text.matches("\"stream_options\"").count(), 1);
    }
}

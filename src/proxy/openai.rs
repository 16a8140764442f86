//! `type = "openai"`: any OpenAI-compatible HTTP API (OpenAI, vLLM, Ollama,
//! Groq, …) at `base_url`, through one pooled reqwest client per provider.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};

use super::provider::{
    Endpoint, Provider, ProviderError, UpstreamBody, UpstreamRequest, UpstreamResponse,
};
use crate::config::ProviderConfig;

pub struct OpenAiProvider {
    client: reqwest::Client,
    /// The endpoints' URLs, parsed once (parsing one per request was 2.6 %
    /// of the request threads' time at 2,000 req/s: BENCHMARKS.md).
    chat_completions_url: reqwest::Url,
    embeddings_url: reqwest::Url,
}

impl OpenAiProvider {
    pub fn new(config: &ProviderConfig) -> Result<OpenAiProvider, String> {
        let mut headers = HeaderMap::new();
        if let Some(key) = &config.api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| "api_key contains characters not allowed in a header".to_owned())?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("`{name}` is not a valid header name"))?;
            let mut value = HeaderValue::from_str(value)
                .map_err(|_| format!("the value of header `{name}` is not valid"))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(config.connect_timeout_secs))
            .timeout(Duration::from_secs(config.timeout_secs))
            .pool_idle_timeout(Duration::from_secs(90))
            // A redirect is answered as a 502 `upstream_error`, not followed.
            // Following also cost two URL parses per request (1.7 % of the
            // gateway's samples at 2,000 req/s: BENCHMARKS.md).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let base_url = config.base_url.as_deref().unwrap_or_default();
        let base_url = base_url.trim_end_matches('/');
        let url = |endpoint: Endpoint| {
            reqwest::Url::parse(&format!("{base_url}{}", endpoint.path()))
                // Not the URL itself: it may hold a password.
                .map_err(|e| {
                    format!(
                        "base_url followed by `{}` is not a URL: {e}",
                        endpoint.path()
                    )
                })
        };
        Ok(OpenAiProvider {
            client,
            chat_completions_url: url(Endpoint::ChatCompletions)?,
            embeddings_url: url(Endpoint::Embeddings)?,
        })
    }

    fn url(&self, endpoint: Endpoint) -> &reqwest::Url {
        match endpoint {
            Endpoint::ChatCompletions => &self.chat_completions_url,
            Endpoint::Embeddings => &self.embeddings_url,
        }
    }
}

fn classify(error: reqwest::Error) -> ProviderError {
    if error.is_timeout() {
        ProviderError::Timeout
    } else if error.is_connect() {
        // The URL is ours (configuration), never a secret, but keep only
        // the cause: reqwest's text may include it.
        ProviderError::Connect(root_cause(&error))
    } else {
        ProviderError::Broken(root_cause(&error))
    }
}

/// The origin (`scheme://host[:port]`) a redirect points to, resolved
/// against the request's URL. Its path and query may carry tokens, so they
/// are left out.
fn redirect_origin(response: &reqwest::Response) -> Option<String> {
    let location = response.headers().get(reqwest::header::LOCATION)?;
    let target = response.url().join(location.to_str().ok()?).ok()?;
    let origin = target.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

impl Provider for OpenAiProvider {
    fn send(
        &self,
        request: UpstreamRequest,
    ) -> BoxFuture<'static, Result<UpstreamResponse, ProviderError>> {
        let call = self
            .client
            .post(self.url(request.endpoint).clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(request.body)
            .send();
        async move {
            let response = call.await.map_err(classify)?;
            let status = response.status().as_u16();
            if response.status().is_redirection() {
                return Err(ProviderError::Redirected {
                    status,
                    to: redirect_origin(&response),
                });
            }
            let body = if request.stream && response.status().is_success() {
                UpstreamBody::Stream(response.bytes_stream().map_err(classify).boxed())
            } else {
                UpstreamBody::Complete(response.bytes().await.map_err(classify)?)
            };
            Ok(UpstreamResponse { status, body })
        }
        .boxed()
    }
}

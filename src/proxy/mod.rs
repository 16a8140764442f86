//! The OpenAI-compatible API under `/v1`: `POST /v1/chat/completions`
//! (streamed or not), `POST /v1/embeddings` and `GET /v1/models`.
//!
//! A request is authenticated by key, read within the body limit, checked
//! enough to answer clearly (JSON, `model`, `messages` or `input`), routed by
//! model name, and forwarded with every field we do not know left intact.
//! Whatever happens, the request is recorded exactly once through a [`Call`]:
//! an audit row and event always, a ledger row and usage event when it
//! reached a provider for a key (see [`crate::ledger`]).

pub mod mock;
pub mod openai;
pub mod provider;
pub mod stream;
pub mod usage;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Value};
use uuid::Uuid;

use self::provider::{Endpoint, ProviderError, Route, Upstream, UpstreamBody, UpstreamRequest};
use self::usage::Usage;
use crate::auth::{self, AuthError};
use crate::breaker::{Admission, Permit};
use crate::budget::{self, BudgetRef, Clock, Period};
use crate::error::ApiError;
use crate::events::model::AuditRequest;
use crate::events::model::GuardrailAction;
use crate::guardrails::{Guardrails, Hit, Verdict};
use crate::ledger::{FinishedRequest, RequestLedger};
use crate::pricing::Price;
use crate::server::{AppState, REQUEST_ID_HEADER};
use crate::store::{ApiKeyRecord, LedgerRow};

/// Names the provider that served a response.
pub const PROVIDER_HEADER: &str = "x-tollgate-provider";

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    proxy(state, Endpoint::ChatCompletions, headers, body).await
}

pub async fn embeddings(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    proxy(state, Endpoint::Embeddings, headers, body).await
}

/// `GET /v1/models`: the configured models in OpenAI's list shape.
pub async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let mut call = Call::start(&state, &headers, "GET", "/v1/models");
    if let Err(error) = authenticate(&state, &headers, &mut call).await {
        return call.fail(error);
    }
    let routing = state.routing.load();
    let data: Vec<Value> = routing
        .models()
        .map(|route| json!({"id": route.model, "object": "model", "created": 0, "owned_by": route.provider_name()}))
        .collect();
    call.finish_without_usage(StatusCode::OK, None);
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn proxy(state: AppState, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let path = format!("/v1{}", endpoint.path());
    let mut call = Call::start(&state, &headers, "POST", &path);
    match forward(&state, endpoint, &headers, body, &mut call).await {
        Ok(Forwarded::Complete(response)) => response,
        Ok(Forwarded::Stream(response)) => response,
        Err(error) => call.fail(error),
    }
}

enum Forwarded {
    Complete(Response),
    Stream(Response),
}

async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    call: &mut Call,
) -> Result<ApiKeyRecord, ApiError> {
    let token = auth::bearer_token(headers).ok_or(AuthError::Missing)??;
    let record = state.key_cache.authenticate(&state.store, token).await?;
    call.audit.key_id = Some(record.id);
    Ok(record)
}

/// The budgets a key's requests count against, and whether one that
/// blocks is exhausted (402, before any upstream call).
fn check_budgets(state: &AppState, key: &ApiKeyRecord, call: &mut Call) -> Result<(), ApiError> {
    let own = key
        .budget_micros
        .zip(key.budget_period.as_deref().and_then(Period::parse));
    let budgets = budget::budgets_for(&state.config.load().budgets, key.id, own);
    let exhausted = state.budget_book.check(&budgets, state.clock.now());
    call.budgets = budgets;
    match exhausted {
        None => Ok(()),
        Some(exhausted) => Err(ApiError::budget_exceeded(format!(
            "the {} budget `{}` is exhausted: {} spent of {}; {}",
            exhausted.budget.period.as_str(),
            exhausted.budget.name,
            budget::usd(exhausted.spent_micros),
            budget::usd(exhausted.budget.limit_micros),
            match exhausted.resets_at {
                Some(at) => format!(
                    "it resets at {}",
                    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                None => "it is a total budget and does not reset".to_owned(),
            }
        ))),
    }
}

async fn forward(
    state: &AppState,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
    call: &mut Call,
) -> Result<Forwarded, ApiError> {
    let key = authenticate(state, headers, call).await?;
    let limit = state.config.load().server.max_body_bytes as usize;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::payload_too_large(format!(
            "the request body is larger than {limit} bytes (server.max_body_bytes)"
        ))
    })?;
    let mut request = parse_request(endpoint, &bytes)?;
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    call.audit.model = Some(model.clone());
    let verdict = call.guardrails.check_input(&mut request);
    call.hits.extend(verdict.hits);
    if let Some(rule) = verdict.blocked_by {
        return Err(guardrail_blocked(&rule, "request"));
    }
    let route = state.routing.load().route(&model).cloned().ok_or_else(|| {
        ApiError::not_found(
            "model_not_found",
            format!("the model `{model}` does not exist on this gateway"),
        )
    })?;
    let stream =
        endpoint == Endpoint::ChatCompletions && request.get("stream") == Some(&Value::Bool(true));
    let client_wants_usage =
        request.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
    // A stream always asks for the final usage chunk; it is removed again
    // on the way back if the client did not ask for it.
    let Some(object) = request.as_object() else {
        // parse_request admits only objects, and guardrails keep them so.
        return Err(ApiError::bad_request(
            "invalid_json",
            "the request body must be a JSON object",
        ));
    };
    let upstream_request = UpstreamRequest::new(endpoint, object, &route.upstream_model, stream);
    call.routed(&route, request);
    call.audit.stream = stream;
    check_budgets(state, &key, call)?;
    let (upstream_choice, permit) = choose_upstream(&route)?;
    call.served_by(&upstream_choice.name);
    let sent = upstream_choice.provider.send(upstream_request).await;
    let upstream = match sent {
        Ok(upstream) => upstream,
        Err(error) => {
            permit.failure(&error.to_string());
            return Err(provider_error(&upstream_choice.name, error));
        }
    };
    // A streamed answer counts by its status when it begins; the provider
    // answered, whatever becomes of the stream.
    permit.report(upstream_choice.breaker.classify(Some(upstream.status)));
    let status = StatusCode::from_u16(upstream.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let provider_name = upstream_choice.name.as_str();
    match upstream.body {
        UpstreamBody::Stream(events) if status.is_success() => {
            let relay = stream::relay(events, call.take(), client_wants_usage);
            let mut response = Response::new(Body::from_stream(relay));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            insert_provider(headers, provider_name);
            Ok(Forwarded::Stream(response))
        }
        UpstreamBody::Stream(_) => Err(ApiError::bad_gateway(
            "upstream_error",
            "the provider answered an error as a stream",
        )),
        UpstreamBody::Complete(body) => {
            complete(endpoint, call, provider_name, status, body).map(Forwarded::Complete)
        }
    }
}

/// The first of the route's providers whose circuit breaker admits the
/// request: its own provider, else its fallbacks in order. None admits →
/// 503 `provider_unavailable` with the soonest `Retry-After`.
fn choose_upstream(route: &Route) -> Result<(&Upstream, Permit), ApiError> {
    let mut retry_after = u64::MAX;
    for upstream in &route.upstreams {
        match upstream.breaker.admit() {
            Admission::Allowed(permit) => return Ok((upstream, permit)),
            Admission::Rejected { retry_after_secs } => {
                retry_after = retry_after.min(retry_after_secs)
            }
        }
    }
    let names: Vec<&str> = route.upstreams.iter().map(|u| u.name.as_str()).collect();
    Err(ApiError::unavailable(
        "provider_unavailable",
        format!(
            "the circuit breaker of {} is open after repeated failures; retry after {retry_after} s",
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(" and of ")
        ),
        retry_after.max(1),
    ))
}

/// Checks what must be there to route and answer clearly.
fn parse_request(endpoint: Endpoint, bytes: &Bytes) -> Result<Value, ApiError> {
    let request: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    if !request.is_object() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the request body must be a JSON object",
        ));
    }
    match request.get("model") {
        Some(Value::String(model)) if !model.is_empty() => {}
        _ => {
            return Err(ApiError::bad_request(
                "missing_model",
                "the request needs `model`, a model name",
            ))
        }
    }
    match endpoint {
        Endpoint::ChatCompletions => match request.get("messages") {
            Some(Value::Array(messages)) if !messages.is_empty() => {}
            _ => {
                return Err(ApiError::bad_request(
                    "missing_messages",
                    "a chat completion needs `messages`, a non-empty list",
                ))
            }
        },
        Endpoint::Embeddings => {
            if request.get("input").is_none_or(Value::is_null) {
                return Err(ApiError::bad_request(
                    "missing_input",
                    "an embeddings request needs `input`",
                ));
            }
        }
    }
    Ok(request)
}

/// 400 `guardrail_violation`, naming the rule (never what it matched).
fn guardrail_blocked(rule: &str, what: &str) -> ApiError {
    ApiError::bad_request(
        "guardrail_violation",
        format!("the {what} was blocked by the guardrail rule `{rule}`"),
    )
}

fn provider_error(provider: &str, error: ProviderError) -> ApiError {
    tracing::warn!(provider, %error, "provider request failed");
    match error {
        ProviderError::Timeout => {
            ApiError::gateway_timeout(format!("the provider `{provider}` did not answer in time"))
        }
        ProviderError::Connect(cause) => ApiError::bad_gateway(
            "upstream_unreachable",
            format!("cannot connect to the provider `{provider}`: {cause}"),
        ),
        ProviderError::Broken(cause) => ApiError::bad_gateway(
            "upstream_error",
            format!("the provider `{provider}` answered with a broken response: {cause}"),
        ),
        ProviderError::Redirected { status, to } => ApiError::bad_gateway(
            "upstream_error",
            format!(
                "the provider `{provider}` answered HTTP {status}, a redirect{}; redirects are not followed: set the provider's base_url to the address it redirects to",
                to.map(|to| format!(" to {to}")).unwrap_or_default()
            ),
        ),
    }
}

fn insert_provider(headers: &mut HeaderMap, provider: &str) {
    if let Ok(value) = HeaderValue::from_str(provider) {
        headers.insert(PROVIDER_HEADER, value);
    }
}

/// A whole upstream answer: success with usage, a 4xx passed through with
/// its status and message, a 5xx as 502.
fn complete(
    endpoint: Endpoint,
    call: &mut Call,
    provider_name: &str,
    status: StatusCode,
    body: Bytes,
) -> Result<Response, ApiError> {
    let upstream_json: Option<Value> = serde_json::from_slice(&body).ok();
    if status.is_server_error() {
        let message = upstream_json
            .as_ref()
            .and_then(|v| v.pointer("/error/message"))
            .and_then(Value::as_str)
            .unwrap_or("no message");
        return Err(ApiError::bad_gateway(
            "upstream_error",
            format!(
                "the provider `{}` failed with HTTP {}: {message}",
                provider_name,
                status.as_u16()
            ),
        ));
    }
    let mut response = if status.is_success() {
        let Some(mut answer) = upstream_json else {
            return Err(ApiError::bad_gateway(
                "upstream_error",
                "the provider's answer is not JSON",
            ));
        };
        let usage = usage::of_response(endpoint, call.request_body(), &answer);
        let verdict = match endpoint {
            Endpoint::ChatCompletions => call.guardrails.check_output_json(&mut answer),
            Endpoint::Embeddings => Verdict::default(),
        };
        let redacted = verdict
            .hits
            .iter()
            .any(|h| h.action == GuardrailAction::Redacted);
        call.hits.extend(verdict.hits);
        if let Some(rule) = verdict.blocked_by {
            // The tokens were spent: the request is recorded with its usage.
            let error = guardrail_blocked(&rule, "response");
            call.take()
                .finish(error.status, usage, Some(error.code), None);
            return Ok(error.into_response());
        }
        let text = usage::completion_text(&answer);
        call.take().finish(status, usage, None, Some(text));
        if redacted {
            Response::new(Body::from(answer.to_string()))
        } else {
            Response::new(Body::from(body))
        }
    } else {
        // A client error: the upstream's status and message reach the
        // client; its error body is kept when it has OpenAI's shape.
        let body = match &upstream_json {
            Some(v) if v.get("error").is_some_and(Value::is_object) => body,
            _ => Bytes::from(
                json!({"error": {"type": "invalid_request_error", "code": "upstream_client_error",
                    "message": String::from_utf8_lossy(&body)}})
                .to_string(),
            ),
        };
        call.take().finish(
            status,
            Usage::default(),
            Some("upstream_client_error"),
            None,
        );
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        response
    };
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    insert_provider(response.headers_mut(), provider_name);
    Ok(response)
}

/// One `/v1/*` request on its way to being recorded: what the audit event
/// says, and the route and prices once known. Recorded exactly once, by
/// [`Call::finish`], [`Call::fail`] or the stream relay.
pub struct Call {
    ledger: RequestLedger,
    guardrails: Arc<Guardrails>,
    /// Guardrail hits so far, recorded with the request.
    hits: Vec<Hit>,
    clock: Arc<Clock>,
    budgets: Vec<BudgetRef>,
    include_bodies: bool,
    started: Instant,
    audit: AuditRequest,
    routed: Option<Routed>,
    recorded: bool,
}

struct Routed {
    provider: String,
    price: Price,
    request_body: Value,
}

impl Call {
    fn start(state: &AppState, headers: &HeaderMap, method: &str, path: &str) -> Call {
        let request_id = headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        Call {
            ledger: state.ledger.clone(),
            guardrails: state.guardrails.load_full(),
            hits: Vec::new(),
            clock: state.clock.clone(),
            budgets: Vec::new(),
            include_bodies: state.config.load().audit.include_bodies,
            started: Instant::now(),
            audit: AuditRequest {
                request_id,
                key_id: None,
                method: method.to_owned(),
                path: path.to_owned(),
                model: None,
                provider: None,
                status: 0,
                latency_ms: 0,
                stream: false,
                error: None,
                request_body: None,
                response_text: None,
            },
            routed: None,
            recorded: false,
        }
    }

    fn routed(&mut self, route: &Route, request_body: Value) {
        self.audit.provider = Some(route.provider_name().to_owned());
        self.routed = Some(Routed {
            provider: route.provider_name().to_owned(),
            price: route.price,
            request_body,
        });
    }

    fn request_body(&self) -> &Value {
        static EMPTY: Value = Value::Null;
        self.routed.as_ref().map_or(&EMPTY, |r| &r.request_body)
    }

    /// Records which provider actually serves the request (a fallback,
    /// when the model's own provider's breaker is open).
    fn served_by(&mut self, provider: &str) {
        self.audit.provider = Some(provider.to_owned());
        if let Some(routed) = &mut self.routed {
            routed.provider = provider.to_owned();
        }
    }

    /// The gateway's count of the request's input tokens.
    pub fn estimate_input(&self) -> i64 {
        let endpoint = if self.audit.path.ends_with("/embeddings") {
            Endpoint::Embeddings
        } else {
            Endpoint::ChatCompletions
        };
        usage::estimate_input(endpoint, self.request_body())
    }

    /// Moves the call out, leaving a recorded husk behind (so the caller's
    /// error path cannot record it a second time).
    fn take(&mut self) -> Call {
        let taken = Call {
            ledger: self.ledger.clone(),
            guardrails: self.guardrails.clone(),
            hits: std::mem::take(&mut self.hits),
            clock: self.clock.clone(),
            budgets: std::mem::take(&mut self.budgets),
            include_bodies: self.include_bodies,
            started: self.started,
            audit: self.audit.clone(),
            routed: self.routed.take(),
            recorded: false,
        };
        self.recorded = true;
        taken
    }

    fn fail(mut self, error: ApiError) -> Response {
        let status = error.status;
        let code = error.code;
        self.finish_inner(status, Usage::default(), Some(code), None);
        error.into_response()
    }

    fn finish_without_usage(mut self, status: StatusCode, error: Option<&str>) {
        self.finish_inner(status, Usage::default(), error, None);
    }

    fn finish(
        mut self,
        status: StatusCode,
        usage: Usage,
        error: Option<&str>,
        text: Option<String>,
    ) {
        self.finish_inner(status, usage, error, text);
    }

    /// Records a streamed request: its status was 200 when the stream began.
    pub fn finish_stream(mut self, usage: Usage, error: Option<&str>, text: String) {
        // Output rules cannot change what was already sent: they are
        // checked on the whole text afterwards and their hits are warnings.
        if self.guardrails.has_output_rules() {
            let hits = self.guardrails.check_streamed_output(&text);
            self.hits.extend(hits);
        }
        self.finish_inner(StatusCode::OK, usage, error, Some(text));
    }

    fn finish_inner(
        &mut self,
        status: StatusCode,
        usage: Usage,
        error: Option<&str>,
        text: Option<String>,
    ) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let latency_ms = self.started.elapsed().as_millis() as i64;
        let mut audit = self.audit.clone();
        audit.status = status.as_u16();
        audit.latency_ms = latency_ms as u64;
        audit.error = error.map(str::to_owned);
        let routed = self.routed.take();
        if self.include_bodies {
            audit.request_body = routed.as_ref().map(|r| r.request_body.clone());
            audit.response_text = text;
        }
        let at = self.clock.now();
        let ledger = match (&routed, audit.key_id, &audit.model) {
            (Some(routed), Some(key_id), Some(model)) => Some(LedgerRow {
                at,
                request_id: audit.request_id.clone(),
                key_id,
                model: model.clone(),
                provider: routed.provider.clone(),
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
                cost_micros: routed
                    .price
                    .cost_micros(usage.input_tokens, usage.output_tokens),
                latency_ms,
                status: i64::from(status.as_u16()),
                streamed: audit.stream,
                estimated: usage.estimated,
            }),
            _ => None,
        };
        let violations = self
            .hits
            .drain(..)
            .map(|hit| hit.violation(&audit.request_id, audit.key_id))
            .collect();
        self.ledger.record(FinishedRequest {
            at,
            audit,
            ledger,
            budgets: std::mem::take(&mut self.budgets),
            violations,
        });
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // A handler future dropped mid-way (the client went away before an
        // answer): record what is known.
        if !self.recorded {
            // 499: nginx's "client closed request"; no answer was sent.
            let status = StatusCode::from_u16(499).expect("499 is a valid status");
            self.finish_inner(status, Usage::default(), Some("client_closed"), None);
        }
    }
}

//! Typed configuration: the TOML file an operator writes, its defaults, and
//! the checks that refuse a bad file before the gateway listens.
//!
//! Loading is three steps, each with errors an operator can act on:
//! 1. `${VAR}` references are replaced from the environment (an unset
//!    variable is an error naming it and its line);
//! 2. the text is parsed into [`Config`], rejecting unknown keys and wrong
//!    types with the file, line, column and key;
//! 3. [`Config::validate`] checks values that parse but cannot work (zero
//!    intervals, a pong timeout shorter than the ping interval, …).
//!
//! Environment overrides (`TOLLGATE_LISTEN`, `TOLLGATE_DATABASE_URL`) are
//! applied between parsing and validation, so they are validated too.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file looked for in the working directory when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "tollgate.toml";

/// Shown instead of a secret wherever the configuration is printed.
const MASK: &str = "********";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub features: FeaturesConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    /// Empty in the file together with `models` → the built-in `mock`
    /// provider and its model, so a bare configuration still serves.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    #[serde(default)]
    pub budgets: Vec<crate::budget::BudgetConfig>,
    #[serde(default)]
    pub guardrails: crate::guardrails::GuardrailsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
}

/// `[auth]`: how browsers sign in. Without `[auth.oidc]` there is no
/// browser login and streams take API keys only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcConfig>,
}

/// `[auth.oidc]`: sign-in with an OpenID Connect provider (Authorization
/// Code flow with PKCE, `state` and `nonce`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's issuer URL; its discovery document is read from
    /// `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    /// Absent for a public client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    /// This gateway's `/auth/callback` as the provider knows it, e.g.
    /// `https://gateway.example.com/auth/callback`. Its scheme decides
    /// whether the session cookie is `Secure`.
    pub redirect_url: String,
    /// Scopes asked for; `openid` is always asked for.
    #[serde(default = "default_oidc_scopes")]
    pub scopes: Vec<String>,
    /// Users in any of these groups are administrators.
    #[serde(default)]
    pub admin_groups: Vec<String>,
    /// The ID-token claim that lists a user's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    #[serde(default = "default_session_ttl_secs")]
    pub session_ttl_secs: u64,
    /// Origins besides the gateway's own from which a cookie-authenticated
    /// stream may be opened, e.g. `https://grafana.example.com`.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

fn default_oidc_scopes() -> Vec<String> {
    ["openid", "profile", "email"].map(str::to_owned).to_vec()
}

fn default_groups_claim() -> String {
    "groups".to_owned()
}

fn default_session_ttl_secs() -> u64 {
    8 * 3600
}

/// The shortest and longest session lifetimes accepted.
const SESSION_TTL_RANGE: std::ops::RangeInclusive<u64> = 60..=30 * 24 * 3600;

impl OidcConfig {
    /// The origin of `redirect_url`: the gateway as browsers reach it.
    pub fn redirect_url_origin(&self) -> String {
        url::Url::parse(&self.redirect_url)
            .map(|url| url.origin().ascii_serialization())
            .unwrap_or_default()
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let fail = |field: &str, message: String| Err((format!("auth.oidc.{field}"), message));
        for (field, value) in [
            ("issuer", &self.issuer),
            ("redirect_url", &self.redirect_url),
        ] {
            match url::Url::parse(value) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
                _ => return fail(field, format!("`{value}` is not an http(s) URL")),
            }
        }
        if self.client_id.trim().is_empty() {
            return fail("client_id", "must not be empty".to_owned());
        }
        if self.groups_claim.trim().is_empty() {
            return fail("groups_claim", "must not be empty".to_owned());
        }
        if !SESSION_TTL_RANGE.contains(&self.session_ttl_secs) {
            return fail(
                "session_ttl_secs",
                format!(
                    "must be between {} and {} seconds (30 days)",
                    SESSION_TTL_RANGE.start(),
                    SESSION_TTL_RANGE.end()
                ),
            );
        }
        for origin in &self.allowed_origins {
            if normalise_origin(origin).is_none() {
                return fail(
                    "allowed_origins",
                    format!("`{origin}` is not an origin; expected scheme://host[:port] such as \"https://console.example.com\""),
                );
            }
        }
        Ok(())
    }
}

/// `scheme://host[:port]` with the default port left out, for comparing
/// origins; `None` unless `raw` is exactly an http(s) origin.
pub fn normalise_origin(raw: &str) -> Option<String> {
    let url = url::Url::parse(raw).ok()?;
    let plain = matches!(url.scheme(), "http" | "https")
        && url.has_host()
        && url.path() == "/"
        && url.query().is_none()
        && url.fragment().is_none()
        && url.username().is_empty()
        && url.password().is_none();
    plain.then(|| url.origin().ascii_serialization())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on, `host:port`.
    pub listen: String,
    /// How long in-flight requests may run after SIGINT/SIGTERM.
    pub shutdown_timeout_secs: u64,
    /// Name of this gateway node in `system.*` events; the host name when unset.
    pub node_name: Option<String>,
    /// Largest request body accepted on `/v1/*`; larger ones get 413.
    pub max_body_bytes: u64,
    /// Threads for the ledger writer and event fan-out; 0: one per four
    /// CPUs, at least one (see [`crate::events::runtime`]).
    pub event_threads: u32,
    /// How many nice steps below the request path those threads run
    /// (0–19; Linux only, elsewhere they keep the process's priority). 0 by
    /// default: with less weight than the request threads, the fan-out
    /// falls behind whenever the CPUs are saturated (by requests or by
    /// another process) and healthy subscribers lag (BENCHMARKS.md, proxy
    /// overhead, 2026-12-02 17:15–18:45 UTC). Requests go first by their
    /// shorter slice instead (`request_thread_slice_us`).
    pub event_thread_nice: u8,
    /// The time slice the request threads ask the kernel for, in
    /// microseconds (100–100000; 0: the kernel's default). Linux 6.12 and
    /// later: a request thread that wakes may preempt a thread inside a
    /// longer slice instead of waiting it out. See [`crate::sched`].
    pub request_thread_slice_us: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".to_owned(),
            shutdown_timeout_secs: 10,
            node_name: None,
            max_body_bytes: 10 * 1024 * 1024,
            event_threads: 0,
            event_thread_nice: 0,
            request_thread_slice_us: DEFAULT_REQUEST_THREAD_SLICE_US,
        }
    }
}

/// `[server] request_thread_slice_us` unless set.
pub const DEFAULT_REQUEST_THREAD_SLICE_US: u32 = 100;

/// More event threads than this is a typo, not a setting.
pub const MAX_EVENT_THREADS: u32 = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://path` (created when missing) or `postgres://…`.
    pub url: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/tollgate.db".to_owned(),
        }
    }
}

/// `[audit]`: what the audit log and events may contain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Keep prompt and completion text in `audit.request` events and the
    /// audit log. Off by default: they may hold personal data.
    pub include_bodies: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesConfig {
    pub websocket: WebSocketConfig,
}

/// `[features.websocket]`: the specification page's six keys with its types
/// and defaults, plus `history_size`, ours, for resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    pub enabled: bool,
    pub require_auth: bool,
    pub ping_interval_secs: u64,
    pub pong_timeout_secs: u64,
    /// Open event streams (WebSocket and SSE together); 0 = unlimited.
    pub max_connections: u64,
    pub channel_capacity: u64,
    /// Events kept for resume; 0 keeps none.
    pub history_size: u64,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            require_auth: false,
            ping_interval_secs: 30,
            pong_timeout_secs: 60,
            max_connections: 1000,
            channel_capacity: 1024,
            history_size: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderType {
    /// Any OpenAI-compatible HTTP API.
    Openai,
    /// Built in, no network: deterministic replies for demos.
    Mock,
}

/// `[providers.NAME]`. Fields that do not apply to a type are refused by
/// [`Config::validate`] rather than silently ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    #[serde(rename = "type")]
    pub kind: ProviderType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// mock: delay before answering (and before the first chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// mock: streaming speed; unset or 0 sends every chunk at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<u64>,
    /// mock: fraction of requests, 0.0 to 1.0, answered with HTTP 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_rate: Option<f64>,
    /// mock: upstream model names that always fail with HTTP 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_models: Option<Vec<String>>,
    /// `[providers.NAME.circuit_breaker]`.
    #[serde(default)]
    pub circuit_breaker: crate::breaker::CircuitBreakerConfig,
}

fn default_connect_timeout_secs() -> u64 {
    10
}

fn default_timeout_secs() -> u64 {
    600
}

impl ProviderConfig {
    fn mock() -> Self {
        Self {
            kind: ProviderType::Mock,
            base_url: None,
            api_key: None,
            headers: BTreeMap::new(),
            connect_timeout_secs: default_connect_timeout_secs(),
            timeout_secs: default_timeout_secs(),
            latency_ms: None,
            tokens_per_second: None,
            fail_rate: None,
            fail_models: Some(vec!["mock-fail".to_owned()]),
            circuit_breaker: Default::default(),
        }
    }
}

/// `[[models]]`: a public model name routed to a provider, with prices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_model: Option<String>,
    #[serde(default)]
    pub input_usd_per_mtok: f64,
    #[serde(default)]
    pub output_usd_per_mtok: f64,
    /// Providers to use, in order, while this model's provider's circuit
    /// breaker is open. They get the same upstream model name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<String>,
}

fn default_providers() -> BTreeMap<String, ProviderConfig> {
    BTreeMap::from([("mock".to_owned(), ProviderConfig::mock())])
}

fn default_models() -> Vec<ModelConfig> {
    let mock = |name: &str| ModelConfig {
        name: name.to_owned(),
        provider: "mock".to_owned(),
        upstream_model: None,
        input_usd_per_mtok: 0.15,
        output_usd_per_mtok: 0.60,
        fallbacks: Vec::new(),
    };
    // `mock-fail` always fails, to demonstrate failures and alerts.
    vec![mock("mock-1"), mock("mock-fail")]
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            database: DatabaseConfig::default(),
            features: FeaturesConfig::default(),
            audit: AuditConfig::default(),
            providers: default_providers(),
            models: default_models(),
            budgets: Vec::new(),
            guardrails: Default::default(),
            auth: AuthConfig::default(),
        }
    }
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, or `None` for the embedded defaults.
    pub file: Option<PathBuf>,
    /// 1-based line and column, where known.
    pub position: Option<(usize, usize)>,
    /// Dotted key path, where known (`features.websocket.ping_interval_secs`).
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration")?;
        match &self.file {
            Some(file) => write!(f, " in {}", file.display())?,
            None => f.write_str(" (defaults and environment)")?,
        }
        if let Some((line, column)) = self.position {
            write!(f, " at line {line}, column {column}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where a configuration came from: the `--config` file, `./tollgate.toml`,
/// or nothing (embedded defaults).
pub fn resolve_path(explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(path) => Some(path.to_owned()),
        None => {
            let local = PathBuf::from(DEFAULT_CONFIG_FILE);
            local.is_file().then_some(local)
        }
    }
}

/// Loads the configuration the way `tollgate serve` does: the file (or the
/// defaults), then the process environment's overrides, then validation.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    load_with_env(path, &|name| std::env::var(name).ok())
}

/// [`load`] with an explicit environment, so tests need not touch the
/// process's own.
pub fn load_with_env(
    path: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                file: Some(path.to_owned()),
                position: None,
                key: None,
                message: format!("cannot read the file: {e}"),
            })?;
            parse(&text, Some(path), env)
        }
        None => {
            let mut config = Config::default();
            apply_env_overrides(&mut config, env);
            config.validate().map_err(|(key, message)| ConfigError {
                file: None,
                position: None,
                key: Some(key),
                message,
            })?;
            Ok(config)
        }
    }
}

/// Parses and validates configuration text; `file` only labels errors.
pub fn parse(
    text: &str,
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let error_at = |span: Option<Range<usize>>, key: Option<String>, message: String| ConfigError {
        file: file.map(Path::to_owned),
        position: span.map(|s| line_column(text, s.start)),
        key,
        message,
    };
    let interpolated = interpolate(text, env).map_err(|(offset, name)| {
        error_at(
            Some(offset..offset),
            None,
            format!("environment variable `{name}` is not set"),
        )
    })?;
    // Spans from the parser point into the interpolated text; positions are
    // reported against it, which matches the file unless a variable's value
    // spans lines.
    let mut config: Config = toml::from_str(&interpolated).map_err(|e| {
        let key = e.span().and_then(|s| key_at(&interpolated, s.start));
        ConfigError {
            file: file.map(Path::to_owned),
            position: e.span().map(|s| line_column(&interpolated, s.start)),
            key,
            message: e.message().trim().to_owned(),
        }
    })?;
    config.add_mock_when_nothing_is_routed();
    apply_env_overrides(&mut config, env);
    config.validate().map_err(|(key, message)| ConfigError {
        file: file.map(Path::to_owned),
        position: span_of(&interpolated, &key).map(|s| line_column(&interpolated, s.start)),
        key: Some(key),
        message,
    })?;
    Ok(config)
}

fn apply_env_overrides(config: &mut Config, env: &dyn Fn(&str) -> Option<String>) {
    if let Some(listen) = env("TOLLGATE_LISTEN") {
        config.server.listen = listen;
    }
    if let Some(url) = env("TOLLGATE_DATABASE_URL") {
        config.database.url = url;
    }
}

/// Replaces every `${NAME}` with the variable's value. On an unset variable
/// returns its byte offset and name.
fn interpolate(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut consumed = 0;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            break;
        };
        let name = &rest[start + 2..start + 2 + len];
        let is_name =
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        out.push_str(&rest[..start]);
        if is_name {
            match env(name) {
                Some(value) => out.push_str(&value),
                None => return Err((consumed + start, name.to_owned())),
            }
        } else {
            out.push_str(&rest[start..start + 3 + len]);
        }
        consumed += start + 3 + len;
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    Ok(out)
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
    (line, column)
}

/// The span of a dotted key in the document (`models.0.provider` indexes
/// arrays of tables), for pointing validation errors at a line.
fn span_of(text: &str, key: &str) -> Option<Range<usize>> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let parts: Vec<&str> = key.split('.').collect();
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut span = None;
    let mut i = 0;
    while let Some(part) = parts.get(i) {
        let Some((k, v)) = table.get_key_value(part) else {
            break;
        };
        span = k.span().or_else(|| v.span()).or(span);
        i += 1;
        if let Some(array) = v.as_array_of_tables() {
            let Some(entry) = parts
                .get(i)
                .and_then(|p| p.parse().ok())
                .and_then(|n| array.get(n))
            else {
                break;
            };
            span = entry.span().or(span);
            table = entry;
            i += 1;
        } else if let Some(inner) = v.as_table_like() {
            table = inner;
        } else {
            break;
        }
    }
    span
}

/// The dotted key whose entry contains `offset`, the most specific one.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut path = Vec::new();
    find_key(doc.as_table(), offset, &mut path).then(|| path.join("."))
}

fn find_key(table: &dyn toml_edit::TableLike, offset: usize, path: &mut Vec<String>) -> bool {
    for (key, item) in table.iter() {
        let Some(k) = table.key(key) else { continue };
        let key_span = k.span();
        let value_span = item.span();
        let contains = |s: &Option<Range<usize>>| s.as_ref().is_some_and(|s| s.contains(&offset));
        path.push(key.to_owned());
        if let Some(inner) = item.as_table_like() {
            if find_key(inner, offset, path) {
                return true;
            }
        }
        if let Some(array) = item.as_array_of_tables() {
            for (index, t) in array.iter().enumerate() {
                path.push(index.to_string());
                if find_key(t, offset, path) {
                    return true;
                }
                path.pop();
            }
        }
        if contains(&key_span) || contains(&value_span) {
            return true;
        }
        path.pop();
    }
    false
}

impl Config {
    fn add_mock_when_nothing_is_routed(&mut self) {
        if self.providers.is_empty() && self.models.is_empty() {
            self.providers = default_providers();
            self.models = default_models();
        }
    }

    /// Checks values that parse but cannot work. Returns the dotted key and
    /// what is expected of it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, message: String| Err((key.to_owned(), message));
        if self.server.listen.parse::<SocketAddr>().is_err() {
            return fail(
                "server.listen",
                format!(
                    "`{}` is not a socket address; expected host:port such as \"0.0.0.0:8080\"",
                    self.server.listen
                ),
            );
        }
        if self.server.max_body_bytes < 1024 {
            return fail(
                "server.max_body_bytes",
                "must be at least 1024 bytes".to_owned(),
            );
        }
        if self.server.event_threads > MAX_EVENT_THREADS {
            return fail(
                "server.event_threads",
                format!("must be at most {MAX_EVENT_THREADS} (0: one per four CPUs)"),
            );
        }
        if self.server.event_thread_nice > 19 {
            return fail(
                "server.event_thread_nice",
                "must be between 0 (the request path's priority) and 19 (the lowest)".to_owned(),
            );
        }
        let slice = self.server.request_thread_slice_us;
        if slice != 0 && !crate::sched::SLICE_RANGE_US.contains(&slice) {
            return fail(
                "server.request_thread_slice_us",
                format!(
                    "must be 0 (the kernel's default) or between {} and {} microseconds",
                    crate::sched::SLICE_RANGE_US.start(),
                    crate::sched::SLICE_RANGE_US.end()
                ),
            );
        }
        if self.server.shutdown_timeout_secs == 0 {
            return fail(
                "server.shutdown_timeout_secs",
                "must be at least 1 second".to_owned(),
            );
        }
        validate_database_url(&self.database.url)
            .or_else(|message| fail("database.url", message))?;
        let ws = &self.features.websocket;
        if ws.ping_interval_secs == 0 {
            return fail(
                "features.websocket.ping_interval_secs",
                "must be at least 1 second".to_owned(),
            );
        }
        if ws.pong_timeout_secs <= ws.ping_interval_secs {
            return fail(
                "features.websocket.pong_timeout_secs",
                format!(
                    "must be greater than ping_interval_secs ({}): a client only answers a ping once per interval, so a shorter timeout disconnects healthy clients",
                    ws.ping_interval_secs
                ),
            );
        }
        if ws.channel_capacity == 0 {
            return fail(
                "features.websocket.channel_capacity",
                "must be at least 1 event".to_owned(),
            );
        }
        for (name, provider) in &self.providers {
            self.validate_provider(name, provider)?;
        }
        self.guardrails.validate()?;
        if let Some(oidc) = &self.auth.oidc {
            oidc.validate()?;
        }
        let mut budget_names = std::collections::HashSet::new();
        for (index, budget) in self.budgets.iter().enumerate() {
            budget.validate(&format!("budgets.{index}"))?;
            if !budget_names.insert(budget.name.as_str()) {
                return fail(
                    &format!("budgets.{index}.name"),
                    format!("budget `{}` is declared twice", budget.name),
                );
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (index, model) in self.models.iter().enumerate() {
            if model.name.trim().is_empty() {
                return fail(
                    &format!("models.{index}.name"),
                    "must not be empty".to_owned(),
                );
            }
            if !seen.insert(model.name.as_str()) {
                return fail(
                    &format!("models.{index}.name"),
                    format!("model `{}` is declared twice", model.name),
                );
            }
            if !self.providers.contains_key(&model.provider) {
                return fail(
                    &format!("models.{index}.provider"),
                    format!(
                        "no provider named `{}`; declared providers: {}",
                        model.provider,
                        self.providers
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
            for (position, fallback) in model.fallbacks.iter().enumerate() {
                if !self.providers.contains_key(fallback) || *fallback == model.provider {
                    return fail(
                        &format!("models.{index}.fallbacks"),
                        format!(
                            "fallback {} `{fallback}` is not another declared provider",
                            position + 1
                        ),
                    );
                }
            }
            for (field, price) in [
                ("input_usd_per_mtok", model.input_usd_per_mtok),
                ("output_usd_per_mtok", model.output_usd_per_mtok),
            ] {
                if usd_to_micros(price).is_none() {
                    return fail(
                        &format!("models.{index}.{field}"),
                        "must be a price in USD of zero or more with at most 6 decimal places"
                            .to_owned(),
                    );
                }
            }
        }
        Ok(())
    }

    fn validate_provider(
        &self,
        name: &str,
        provider: &ProviderConfig,
    ) -> Result<(), (String, String)> {
        let key = |field: &str| format!("providers.{name}.{field}");
        match provider.kind {
            ProviderType::Openai => {
                let Some(base_url) = &provider.base_url else {
                    return Err((
                        key("base_url"),
                        "required for type \"openai\"; expected e.g. \"https://api.openai.com/v1\""
                            .to_owned(),
                    ));
                };
                for (field, set) in [
                    ("latency_ms", provider.latency_ms.is_some()),
                    ("tokens_per_second", provider.tokens_per_second.is_some()),
                    ("fail_rate", provider.fail_rate.is_some()),
                    ("fail_models", provider.fail_models.is_some()),
                ] {
                    if set {
                        return Err((key(field), "applies only to type \"mock\"".to_owned()));
                    }
                }
                match url::Url::parse(base_url) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                    _ => {
                        return Err((
                            key("base_url"),
                            format!("`{base_url}` is not an http(s) URL"),
                        ))
                    }
                }
            }
            ProviderType::Mock => {
                if provider.tokens_per_second.is_some_and(|t| t > 1_000_000) {
                    return Err((
                        key("tokens_per_second"),
                        "must be at most 1000000 (0 sends every chunk at once)".to_owned(),
                    ));
                }
                if let Some(rate) = provider.fail_rate {
                    if !(0.0..=1.0).contains(&rate) {
                        return Err((key("fail_rate"), "must be between 0.0 and 1.0".to_owned()));
                    }
                }
                for (field, set) in [
                    ("base_url", provider.base_url.is_some()),
                    ("api_key", provider.api_key.is_some()),
                    ("headers", !provider.headers.is_empty()),
                ] {
                    if set {
                        return Err((key(field), "does not apply to type \"mock\"".to_owned()));
                    }
                }
            }
        }
        provider
            .circuit_breaker
            .validate(&format!("providers.{name}.circuit_breaker"))?;
        if provider.connect_timeout_secs == 0 {
            return Err((
                key("connect_timeout_secs"),
                "must be at least 1 second".to_owned(),
            ));
        }
        if provider.timeout_secs == 0 {
            return Err((key("timeout_secs"), "must be at least 1 second".to_owned()));
        }
        Ok(())
    }

    /// The configuration as TOML with every secret replaced by a mask, for
    /// printing (`tollgate config check`).
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        masked.database.url = mask_url_password(&masked.database.url);
        for provider in masked.providers.values_mut() {
            if provider.api_key.is_some() {
                provider.api_key = Some(MASK.to_owned());
            }
            for value in provider.headers.values_mut() {
                *value = MASK.to_owned();
            }
            if let Some(base_url) = &provider.base_url {
                provider.base_url = Some(mask_url_password(base_url));
            }
        }
        if let Some(oidc) = masked.auth.oidc.as_mut() {
            if oidc.client_secret.is_some() {
                oidc.client_secret = Some(MASK.to_owned());
            }
        }
        toml::to_string_pretty(&masked).expect("configuration always serialises")
    }

    /// Names of the top-level sections (and `features.*` subsections) whose
    /// values differ between two configurations; never the values.
    pub fn changed_sections(&self, other: &Config) -> Vec<String> {
        let mut changed = Vec::new();
        let mut note = |name: &str, differs: bool| {
            if differs {
                changed.push(name.to_owned());
            }
        };
        note("server", self.server != other.server);
        note("database", self.database != other.database);
        note("audit", self.audit != other.audit);
        note(
            "features.websocket",
            self.features.websocket != other.features.websocket,
        );
        note("providers", self.providers != other.providers);
        note("models", self.models != other.models);
        note("budgets", self.budgets != other.budgets);
        note("guardrails", self.guardrails != other.guardrails);
        note("auth", self.auth != other.auth);
        changed
    }
}

/// A price in USD as integer micro-dollars, if it is a non-negative amount
/// with at most six decimal places (so the conversion is exact).
pub fn usd_to_micros(usd: f64) -> Option<i64> {
    if !usd.is_finite() || !(0.0..=1e12).contains(&usd) {
        return None;
    }
    let micros = (usd * 1_000_000.0).round();
    ((usd * 1_000_000.0 - micros).abs() < 1e-6).then_some(micros as i64)
}

fn validate_database_url(raw: &str) -> Result<(), String> {
    let expected = "expected sqlite://PATH or postgres://USER@HOST:PORT/DATABASE";
    let (scheme, rest) = raw.split_once("://").ok_or_else(|| {
        format!(
            "`{}` is not a database URL; {expected}",
            mask_url_password(raw)
        )
    })?;
    match scheme {
        "sqlite" if !rest.is_empty() => Ok(()),
        "postgres" | "postgresql" => match url::Url::parse(raw) {
            Ok(url) if url.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
            _ => Err(format!(
                "`{}` is not a valid PostgreSQL URL; {expected}",
                mask_url_password(raw)
            )),
        },
        _ => Err(format!(
            "`{}` has an unsupported scheme; {expected}",
            mask_url_password(raw)
        )),
    }
}

/// Replaces the password of a URL, if it has one, with the mask.
pub fn mask_url_password(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some(MASK));
            url.to_string()
        }
        _ => raw.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse_text(text: &str) -> Result<Config, ConfigError> {
        parse(text, Some(Path::new("test.toml")), &no_env)
    }

    #[test]
    fn websocket_defaults_are_the_specification_pages() {
        let ws = parse_text("").unwrap().features.websocket;
        assert!(ws.enabled);
        assert!(!ws.require_auth);
        assert_eq!(ws.ping_interval_secs, 30);
        assert_eq!(ws.pong_timeout_secs, 60);
        assert_eq!(ws.max_connections, 1000);
        assert_eq!(ws.channel_capacity, 1024);
        assert_eq!(ws.history_size, 1024);
    }

    #[test]
    fn embedded_defaults_listen_on_8080_with_sqlite_and_the_mock_provider() {
        let config = load_with_env(None, &no_env).unwrap();
        assert_eq!(config.server.listen, "0.0.0.0:8080");
        assert_eq!(config.server.shutdown_timeout_secs, 10);
        assert_eq!(config.database.url, "sqlite://data/tollgate.db");
        assert_eq!(config.providers["mock"].kind, ProviderType::Mock);
        assert_eq!(config.models[0].provider, "mock");
    }

    #[test]
    fn the_specification_pages_examples_parse() {
        for example in [
            "[features.websocket]\nenabled = true\nrequire_auth = false\nping_interval_secs = 30\npong_timeout_secs = 60\nmax_connections = 100\nchannel_capacity = 256\n",
            "[features.websocket]\nenabled = true\nrequire_auth = true\nping_interval_secs = 30\npong_timeout_secs = 60\nmax_connections = 5000\nchannel_capacity = 4096\n",
            "[features.websocket]\nenabled = false\n",
        ] {
            parse_text(example).unwrap();
        }
        let disabled = parse_text("[features.websocket]\nenabled = false\n").unwrap();
        assert!(!disabled.features.websocket.enabled);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse_text(
            "[server]\nlisten = \"127.0.0.1:1\"\n\n[features.websocket]\npong_timout_secs = 5\n",
        )
        .unwrap_err();
        assert_eq!(err.position, Some((5, 1)));
        assert!(
            err.message.contains("unknown field `pong_timout_secs`"),
            "{err}"
        );
        let shown = err.to_string();
        assert!(shown.contains("test.toml"), "{shown}");
        assert!(shown.contains("line 5, column 1"), "{shown}");
    }

    #[test]
    fn wrong_type_names_the_key_and_the_expected_type() {
        let err =
            parse_text("[features.websocket]\nping_interval_secs = \"thirty\"\n").unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("features.websocket.ping_interval_secs")
        );
        assert_eq!(err.position.map(|p| p.0), Some(2));
        assert!(err.message.contains("expected u64"), "{err}");
    }

    #[test]
    fn unknown_section_is_refused() {
        let err = parse_text("[featurez]\n").unwrap_err();
        assert!(err.message.contains("unknown field `featurez`"), "{err}");
        assert_eq!(err.position.map(|p| p.0), Some(1));
    }

    fn validation_error(text: &str) -> ConfigError {
        parse_text(text).unwrap_err()
    }

    #[test]
    fn zero_ping_interval_is_refused() {
        let err = validation_error("[features.websocket]\nping_interval_secs = 0\n");
        assert_eq!(
            err.key.as_deref(),
            Some("features.websocket.ping_interval_secs")
        );
        assert_eq!(err.position, Some((2, 1)));
        assert!(err.message.contains("at least 1"), "{err}");
    }

    #[test]
    fn pong_timeout_not_above_ping_interval_is_refused() {
        let err = validation_error(
            "[features.websocket]\nping_interval_secs = 30\npong_timeout_secs = 30\n",
        );
        assert_eq!(
            err.key.as_deref(),
            Some("features.websocket.pong_timeout_secs")
        );
        assert_eq!(err.position, Some((3, 1)));
        assert!(
            err.message.contains("greater than ping_interval_secs (30)"),
            "{err}"
        );
    }

    #[test]
    fn zero_channel_capacity_is_refused() {
        let err = validation_error("[features.websocket]\nchannel_capacity = 0\n");
        assert_eq!(
            err.key.as_deref(),
            Some("features.websocket.channel_capacity")
        );
        assert_eq!(err.position, Some((2, 1)));
    }

    #[test]
    fn event_thread_settings_have_defaults_and_bounds() {
        let config = parse_text("[server]\nevent_threads = 2\nevent_thread_nice = 7\n").unwrap();
        assert_eq!(
            (config.server.event_threads, config.server.event_thread_nice),
            (2, 7)
        );
        let defaults = ServerConfig::default();
        assert_eq!((defaults.event_threads, defaults.event_thread_nice), (0, 0));
        let err = validation_error("[server]\nevent_thread_nice = 20\n");
        assert_eq!(err.key.as_deref(), Some("server.event_thread_nice"));
        assert_eq!(err.position, Some((2, 1)));
        assert!(err.message.contains("between 0"), "{err}");
        let err = validation_error("[server]\nevent_threads = 1000\n");
        assert_eq!(err.key.as_deref(), Some("server.event_threads"));
        assert!(err.message.contains("at most 256"), "{err}");
        // A negative nice would raise the priority: not a number this key takes.
        let err = validation_error("[server]\nevent_thread_nice = -5\n");
        assert_eq!(err.key.as_deref(), Some("server.event_thread_nice"));
    }

    #[test]
    fn the_request_thread_slice_is_0_or_within_the_kernels_range() {
        assert_eq!(ServerConfig::default().request_thread_slice_us, 100);
        for ok in [0, 100, 2_500, 100_000] {
            let config =
                parse_text(&format!("[server]\nrequest_thread_slice_us = {ok}\n")).unwrap();
            assert_eq!(config.server.request_thread_slice_us, ok);
        }
        for bad in [1, 99, 100_001] {
            let err = validation_error(&format!("[server]\nrequest_thread_slice_us = {bad}\n"));
            assert_eq!(err.key.as_deref(), Some("server.request_thread_slice_us"));
            assert_eq!(err.position, Some((2, 1)));
            assert!(err.message.contains("between 100 and 100000"), "{err}");
        }
    }

    #[test]
    fn malformed_listen_address_is_refused() {
        let err = validation_error("[server]\nlisten = \"localhost\"\n");
        assert_eq!(err.key.as_deref(), Some("server.listen"));
        assert_eq!(err.position, Some((2, 1)));
        assert!(err.message.contains("host:port"), "{err}");
    }

    #[test]
    fn malformed_database_url_is_refused_without_showing_its_password() {
        let err = validation_error("[database]\nurl = \"mysql://u:hunter2@h/db\"\n");
        assert_eq!(err.key.as_deref(), Some("database.url"));
        assert_eq!(err.position, Some((2, 1)));
        assert!(err.message.contains("unsupported scheme"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = validation_error("[database]\nurl = \"not a url\"\n");
        assert_eq!(err.key.as_deref(), Some("database.url"));
    }

    #[test]
    fn model_pointing_at_an_unknown_provider_is_refused() {
        let err = validation_error(
            "[providers.mock]\ntype = \"mock\"\n\n[[models]]\nname = \"a\"\nprovider = \"mock\"\n\n[[models]]\nname = \"b\"\nprovider = \"nope\"\n",
        );
        assert_eq!(err.key.as_deref(), Some("models.1.provider"));
        assert_eq!(err.position, Some((10, 1)));
        assert!(err.message.contains("no provider named `nope`"), "{err}");
    }

    #[test]
    fn openai_provider_needs_a_base_url() {
        let err = validation_error("[providers.openai]\ntype = \"openai\"\n");
        assert_eq!(err.key.as_deref(), Some("providers.openai.base_url"));
    }

    #[test]
    fn variables_are_interpolated_from_the_environment() {
        let env = |name: &str| (name == "LISTEN_PORT").then(|| "9191".to_owned());
        let config = parse(
            "[server]\nlisten = \"127.0.0.1:${LISTEN_PORT}\"\n",
            None,
            &env,
        )
        .unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:9191");
    }

    #[test]
    fn an_unset_variable_is_named_with_its_line() {
        let err = parse_text("[server]\n\nlisten = \"${NOT_SET_ANYWHERE}\"\n").unwrap_err();
        assert!(
            err.message.contains("`NOT_SET_ANYWHERE` is not set"),
            "{err}"
        );
        assert_eq!(err.position, Some((3, 11)));
    }

    #[test]
    fn environment_overrides_the_listen_address_and_database() {
        let env = |name: &str| match name {
            "TOLLGATE_LISTEN" => Some("127.0.0.1:7000".to_owned()),
            "TOLLGATE_DATABASE_URL" => Some("postgres://db.example/x".to_owned()),
            _ => None,
        };
        let config = parse("[server]\nlisten = \"0.0.0.0:1\"\n", None, &env).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:7000");
        assert_eq!(config.database.url, "postgres://db.example/x");
        let bad = |name: &str| (name == "TOLLGATE_LISTEN").then(|| "nope".to_owned());
        let err = load_with_env(None, &bad).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("server.listen"));
    }

    #[test]
    fn masked_configuration_hides_every_secret() {
        let env = |name: &str| (name == "KEY").then(|| "sk-secret-value".to_owned());
        let config = parse(
            "[database]\nurl = \"postgres://app:pw-secret@db/x\"\n[providers.openai]\ntype = \"openai\"\nbase_url = \"https://api.openai.com/v1\"\napi_key = \"${KEY}\"\nheaders = { x-org = \"org-secret\" }\n",
            None,
            &env,
        )
        .unwrap();
        let shown = config.to_masked_toml();
        for secret in ["sk-secret-value", "pw-secret", "org-secret"] {
            assert!(!shown.contains(secret), "{secret} leaked in {shown}");
        }
        assert!(shown.contains("api_key = \"********\""), "{shown}");
        assert!(shown.contains("postgres://app:********@db/x"), "{shown}");
    }

    const OIDC: &str = "[auth.oidc]\nissuer = \"https://login.example.com\"\nclient_id = \"tollgate\"\nclient_secret = \"oidc-secret\"\nredirect_url = \"https://gw.example.com/auth/callback\"\n";

    #[test]
    fn oidc_has_defaults_and_its_secret_is_masked() {
        let config = parse_text(OIDC).unwrap();
        let oidc = config.auth.oidc.as_ref().expect("[auth.oidc] is read");
        assert_eq!(oidc.scopes, ["openid", "profile", "email"]);
        assert_eq!(oidc.groups_claim, "groups");
        assert_eq!(oidc.session_ttl_secs, 8 * 3600);
        assert!(oidc.admin_groups.is_empty() && oidc.allowed_origins.is_empty());
        assert_eq!(oidc.redirect_url_origin(), "https://gw.example.com");
        let shown = config.to_masked_toml();
        assert!(!shown.contains("oidc-secret"), "{shown}");
        assert!(shown.contains("client_secret = \"********\""), "{shown}");
        assert!(parse_text("").unwrap().auth.oidc.is_none());
    }

    #[test]
    fn bad_oidc_settings_name_their_key() {
        for (extra, key) in [
            ("session_ttl_secs = 5\n", "auth.oidc.session_ttl_secs"),
            (
                "allowed_origins = [\"https://a.example/path\"]\n",
                "auth.oidc.allowed_origins",
            ),
            (
                "allowed_origins = [\"console.example\"]\n",
                "auth.oidc.allowed_origins",
            ),
            ("groups_claim = \" \"\n", "auth.oidc.groups_claim"),
        ] {
            let err = validation_error(&format!("{OIDC}{extra}"));
            assert_eq!(err.key.as_deref(), Some(key), "{extra}");
        }
        let err = validation_error(&OIDC.replace("https://login.example.com", "login.example.com"));
        assert_eq!(err.key.as_deref(), Some("auth.oidc.issuer"));
        let err = parse_text(&format!("{OIDC}admin_group = [\"ops\"]\n")).unwrap_err();
        assert!(err.to_string().contains("admin_group"), "{err}");
    }

    #[test]
    fn origins_compare_by_scheme_host_and_effective_port() {
        assert_eq!(
            normalise_origin("https://a.example:443").as_deref(),
            Some("https://a.example")
        );
        assert_eq!(
            normalise_origin("http://A.example:8080/").as_deref(),
            Some("http://a.example:8080")
        );
        assert_eq!(normalise_origin("null"), None);
        assert_eq!(normalise_origin("https://a.example/x"), None);
        assert_eq!(normalise_origin("ftp://a.example"), None);
    }

    #[test]
    fn prices_convert_exactly_to_micro_dollars() {
        assert_eq!(usd_to_micros(0.15), Some(150_000));
        assert_eq!(usd_to_micros(2.5), Some(2_500_000));
        assert_eq!(usd_to_micros(0.000001), Some(1));
        assert_eq!(usd_to_micros(0.0), Some(0));
        assert_eq!(usd_to_micros(0.0000001), None);
        assert_eq!(usd_to_micros(-1.0), None);
        let err = validation_error(
            "[providers.mock]\ntype = \"mock\"\n[[models]]\nname = \"m\"\nprovider = \"mock\"\ninput_usd_per_mtok = 0.1234567\n",
        );
        assert_eq!(err.key.as_deref(), Some("models.0.input_usd_per_mtok"));
    }

    #[test]
    fn mock_knobs_are_refused_on_other_provider_types_and_checked() {
        let err = validation_error(
            "[providers.x]\ntype = \"openai\"\nbase_url = \"http://h/v1\"\nlatency_ms = 5\n",
        );
        assert_eq!(err.key.as_deref(), Some("providers.x.latency_ms"));
        let err = validation_error("[providers.m]\ntype = \"mock\"\nfail_rate = 1.5\n");
        assert_eq!(err.key.as_deref(), Some("providers.m.fail_rate"));
    }

    #[test]
    fn changed_sections_names_sections_not_values() {
        let a = Config::default();
        let mut b = a.clone();
        b.features.websocket.max_connections = 5;
        b.server.shutdown_timeout_secs = 3;
        assert_eq!(a.changed_sections(&b), vec!["server", "features.websocket"]);
        assert!(a.changed_sections(&a).is_empty());
    }
}

//! What can happen in the gateway, as types: the [`Topic`]s a client
//! subscribes to, the [`EventType`]s within them, one payload struct per
//! type, and the [`Audience`] that decides who may see an event.
//!
//! Producers build an [`EventPayload`] and hand it to
//! [`EventHub::publish`](super::EventHub::publish); the hub adds the id and
//! time and serialises the envelope once.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A stream a client subscribes to by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Topic {
    Audit,
    Usage,
    Budget,
    CircuitBreaker,
    System,
}

impl Topic {
    pub const ALL: [Topic; 5] = [
        Topic::Audit,
        Topic::Usage,
        Topic::Budget,
        Topic::CircuitBreaker,
        Topic::System,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Audit => "audit",
            Topic::Usage => "usage",
            Topic::Budget => "budget",
            Topic::CircuitBreaker => "circuit_breaker",
            Topic::System => "system",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Topic {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, UnknownName> {
        Topic::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownName::new("topic", s, Topic::ALL.map(Topic::as_str).as_slice()))
    }
}

/// A name that is not a topic or event type, with the names that are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{name}`; expected one of: {expected}")]
pub struct UnknownName {
    pub what: &'static str,
    pub name: String,
    pub expected: String,
}

impl UnknownName {
    fn new(what: &'static str, name: &str, expected: &[&str]) -> Self {
        UnknownName {
            what,
            name: name.to_owned(),
            expected: expected.join(", "),
        }
    }
}

/// Every kind of event, named `topic.what` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    AuditRequest,
    AuditGuardrailViolation,
    AuditAdmin,
    UsageRecorded,
    BudgetThresholdReached,
    BudgetExceeded,
    CircuitBreakerStateChanged,
    SystemStartup,
    SystemShutdown,
    SystemConfigReloaded,
    SystemConfigReloadFailed,
}

impl EventType {
    pub const ALL: [EventType; 11] = [
        EventType::AuditRequest,
        EventType::AuditGuardrailViolation,
        EventType::AuditAdmin,
        EventType::UsageRecorded,
        EventType::BudgetThresholdReached,
        EventType::BudgetExceeded,
        EventType::CircuitBreakerStateChanged,
        EventType::SystemStartup,
        EventType::SystemShutdown,
        EventType::SystemConfigReloaded,
        EventType::SystemConfigReloadFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::AuditRequest => "audit.request",
            EventType::AuditGuardrailViolation => "audit.guardrail_violation",
            EventType::AuditAdmin => "audit.admin",
            EventType::UsageRecorded => "usage.recorded",
            EventType::BudgetThresholdReached => "budget.threshold_reached",
            EventType::BudgetExceeded => "budget.exceeded",
            EventType::CircuitBreakerStateChanged => "circuit_breaker.state_changed",
            EventType::SystemStartup => "system.startup",
            EventType::SystemShutdown => "system.shutdown",
            EventType::SystemConfigReloaded => "system.config_reloaded",
            EventType::SystemConfigReloadFailed => "system.config_reload_failed",
        }
    }

    pub fn topic(self) -> Topic {
        match self {
            EventType::AuditRequest
            | EventType::AuditGuardrailViolation
            | EventType::AuditAdmin => Topic::Audit,
            EventType::UsageRecorded => Topic::Usage,
            EventType::BudgetThresholdReached | EventType::BudgetExceeded => Topic::Budget,
            EventType::CircuitBreakerStateChanged => Topic::CircuitBreaker,
            EventType::SystemStartup
            | EventType::SystemShutdown
            | EventType::SystemConfigReloaded
            | EventType::SystemConfigReloadFailed => Topic::System,
        }
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, UnknownName> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                UnknownName::new(
                    "event type",
                    s,
                    EventType::ALL.map(EventType::as_str).as_slice(),
                )
            })
    }
}

impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A set of topics, as a bit set: cheap to copy and test per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicSet(u8);

impl TopicSet {
    pub fn all() -> TopicSet {
        TopicSet::from_iter(Topic::ALL)
    }

    pub fn contains(self, topic: Topic) -> bool {
        self.0 & topic.bit() != 0
    }

    pub fn insert(&mut self, topic: Topic) {
        self.0 |= topic.bit();
    }

    pub fn remove(&mut self, topic: Topic) {
        self.0 &= !topic.bit();
    }

    pub fn topics(self) -> Vec<Topic> {
        Topic::ALL
            .into_iter()
            .filter(|t| self.contains(*t))
            .collect()
    }
}

impl FromIterator<Topic> for TopicSet {
    fn from_iter<I: IntoIterator<Item = Topic>>(iter: I) -> Self {
        let mut set = TopicSet::default();
        for topic in iter {
            set.insert(topic);
        }
        set
    }
}

/// A set of event types; empty means "every type".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TypeSet(u16);

impl TypeSet {
    pub fn contains_or_empty(self, event_type: EventType) -> bool {
        self.0 == 0 || self.0 & event_type.bit() != 0
    }
}

impl FromIterator<EventType> for TypeSet {
    fn from_iter<I: IntoIterator<Item = EventType>>(iter: I) -> Self {
        TypeSet(iter.into_iter().fold(0, |bits, t| bits | t.bit()))
    }
}

/// Who may see an event, decided by its producer's facts, not by strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Ownerless events (circuit breakers, system): every connection.
    Everyone,
    /// Events about one key: admins and connections of that key.
    Key(Uuid),
    /// Events about no key that only operators may see (admin actions,
    /// unauthenticated requests).
    Admins,
}

/// `audit.request`: one request to `/v1/*`, successful or not.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRequest {
    pub request_id: String,
    pub key_id: Option<Uuid>,
    pub method: String,
    pub path: String,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub status: u16,
    pub latency_ms: u64,
    pub stream: bool,
    /// An error code (`upstream_error`, `client_closed`, …); `None` on success.
    pub error: Option<String>,
    /// The request's JSON, only with `[audit] include_bodies = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_body: Option<serde_json::Value>,
    /// The completion's text, only with `[audit] include_bodies = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_text: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardrailAction {
    Blocked,
    Warned,
    Redacted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Input,
    Output,
}

/// `audit.guardrail_violation`: a rule matched; never the matched text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuardrailViolation {
    pub request_id: String,
    pub key_id: Option<Uuid>,
    pub rule: String,
    pub category: String,
    pub action: GuardrailAction,
    pub direction: Direction,
}

/// `audit.admin`: an administrative action.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminAction {
    /// The admin key's id, or `cli`.
    pub actor: String,
    /// `key.created`, `key.revoked`, `config.reloaded`, …
    pub action: String,
    /// What was acted on (a key id, …).
    pub target: String,
}

/// `usage.recorded`: tokens and cost of one request, after its ledger row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRecorded {
    pub request_id: String,
    pub key_id: Uuid,
    pub model: String,
    pub provider: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_micros: i64,
    /// Counted by the gateway because the upstream reported no usage.
    pub estimated: bool,
}

/// `budget.threshold_reached` and `budget.exceeded`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetAlert {
    pub budget: String,
    pub scope: String,
    pub key_id: Option<Uuid>,
    pub period: String,
    pub threshold_percent: u32,
    pub spent_micros: i64,
    pub limit_micros: i64,
    pub period_start: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// `circuit_breaker.state_changed`: one transition of one provider's breaker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerStateChanged {
    pub provider: String,
    pub from: BreakerState,
    pub to: BreakerState,
    pub reason: String,
    pub consecutive_failures: u32,
}

/// `system.startup`: the listener is bound.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemStartup {
    pub version: String,
    pub node: String,
    pub listen: String,
}

/// `system.shutdown`: sent to every client before its close frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemShutdown {
    pub version: String,
    pub node: String,
    pub reason: String,
}

/// `system.config_reloaded`: names of the sections that changed, never values.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigReloaded {
    pub changed_sections: Vec<String>,
}

/// `system.config_reload_failed`: the old configuration stays in force.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigReloadFailed {
    pub error: String,
}

/// One event's type and payload, as a producer hands it to the hub.
#[derive(Debug, Clone, PartialEq)]
pub enum EventPayload {
    AuditRequest(AuditRequest),
    AuditGuardrailViolation(GuardrailViolation),
    AuditAdmin(AdminAction),
    UsageRecorded(UsageRecorded),
    BudgetThresholdReached(BudgetAlert),
    BudgetExceeded(BudgetAlert),
    CircuitBreakerStateChanged(BreakerStateChanged),
    SystemStartup(SystemStartup),
    SystemShutdown(SystemShutdown),
    SystemConfigReloaded(ConfigReloaded),
    SystemConfigReloadFailed(ConfigReloadFailed),
}

impl EventPayload {
    pub fn event_type(&self) -> EventType {
        match self {
            EventPayload::AuditRequest(_) => EventType::AuditRequest,
            EventPayload::AuditGuardrailViolation(_) => EventType::AuditGuardrailViolation,
            EventPayload::AuditAdmin(_) => EventType::AuditAdmin,
            EventPayload::UsageRecorded(_) => EventType::UsageRecorded,
            EventPayload::BudgetThresholdReached(_) => EventType::BudgetThresholdReached,
            EventPayload::BudgetExceeded(_) => EventType::BudgetExceeded,
            EventPayload::CircuitBreakerStateChanged(_) => EventType::CircuitBreakerStateChanged,
            EventPayload::SystemStartup(_) => EventType::SystemStartup,
            EventPayload::SystemShutdown(_) => EventType::SystemShutdown,
            EventPayload::SystemConfigReloaded(_) => EventType::SystemConfigReloaded,
            EventPayload::SystemConfigReloadFailed(_) => EventType::SystemConfigReloadFailed,
        }
    }

    /// Who may see this event; see [`Audience`].
    pub fn audience(&self) -> Audience {
        let about_key = |key_id: Option<Uuid>| key_id.map_or(Audience::Admins, Audience::Key);
        match self {
            EventPayload::AuditRequest(p) => about_key(p.key_id),
            EventPayload::AuditGuardrailViolation(p) => about_key(p.key_id),
            EventPayload::AuditAdmin(_) => Audience::Admins,
            EventPayload::UsageRecorded(p) => Audience::Key(p.key_id),
            EventPayload::BudgetThresholdReached(p) | EventPayload::BudgetExceeded(p) => {
                p.key_id.map_or(Audience::Everyone, Audience::Key)
            }
            EventPayload::CircuitBreakerStateChanged(_)
            | EventPayload::SystemStartup(_)
            | EventPayload::SystemShutdown(_)
            | EventPayload::SystemConfigReloaded(_)
            | EventPayload::SystemConfigReloadFailed(_) => Audience::Everyone,
        }
    }
}

/// Payloads that belong to exactly one event type convert into it, so a
/// producer writes `hub.publish(UsageRecorded { … })`.
macro_rules! payload_of {
    ($($payload:ident => $variant:ident),* $(,)?) => {$(
        impl From<$payload> for EventPayload {
            fn from(p: $payload) -> Self {
                EventPayload::$variant(p)
            }
        }
    )*};
}

payload_of! {
    AuditRequest => AuditRequest,
    GuardrailViolation => AuditGuardrailViolation,
    AdminAction => AuditAdmin,
    UsageRecorded => UsageRecorded,
    BreakerStateChanged => CircuitBreakerStateChanged,
    SystemStartup => SystemStartup,
    SystemShutdown => SystemShutdown,
    ConfigReloaded => SystemConfigReloaded,
    ConfigReloadFailed => SystemConfigReloadFailed,
}

impl Serialize for EventPayload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EventPayload::AuditRequest(p) => p.serialize(s),
            EventPayload::AuditGuardrailViolation(p) => p.serialize(s),
            EventPayload::AuditAdmin(p) => p.serialize(s),
            EventPayload::UsageRecorded(p) => p.serialize(s),
            EventPayload::BudgetThresholdReached(p) | EventPayload::BudgetExceeded(p) => {
                p.serialize(s)
            }
            EventPayload::CircuitBreakerStateChanged(p) => p.serialize(s),
            EventPayload::SystemStartup(p) => p.serialize(s),
            EventPayload::SystemShutdown(p) => p.serialize(s),
            EventPayload::SystemConfigReloaded(p) => p.serialize(s),
            EventPayload::SystemConfigReloadFailed(p) => p.serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for t in Topic::ALL {
            assert_eq!(t.as_str().parse::<Topic>().unwrap(), t);
        }
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>().unwrap(), t);
            assert!(t.as_str().starts_with(t.topic().as_str()));
        }
        let err = "billing".parse::<Topic>().unwrap_err();
        assert_eq!(err.to_string(), "unknown topic `billing`; expected one of: audit, usage, budget, circuit_breaker, system");
        assert!("usage.spent".parse::<EventType>().is_err());
    }

    #[test]
    fn topic_and_type_sets_filter() {
        let mut set: TopicSet = [Topic::Usage, Topic::Budget].into_iter().collect();
        assert!(set.contains(Topic::Usage) && !set.contains(Topic::Audit));
        set.remove(Topic::Usage);
        assert_eq!(set.topics(), vec![Topic::Budget]);
        assert_eq!(TopicSet::all().topics().len(), 5);
        let types: TypeSet = [EventType::BudgetExceeded].into_iter().collect();
        assert!(types.contains_or_empty(EventType::BudgetExceeded));
        assert!(!types.contains_or_empty(EventType::BudgetThresholdReached));
        assert!(TypeSet::default().contains_or_empty(EventType::AuditAdmin));
    }
}

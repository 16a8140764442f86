//! Per-provider circuit breakers: stop sending requests to a provider that
//! keeps failing, try it again after a pause, and tell operators about every
//! change through the event stream.
//!
//! # The states
//!
//! * **closed** — requests flow. Each failure of a request admitted while
//!   closed adds one to `consecutive_failures`; a success resets it to 0.
//!   After `failure_threshold` *consecutive* failures the breaker opens.
//! * **open** — requests are refused at once ([`Admission::Rejected`] with the
//!   whole seconds left until half-open, at least 1), so the caller answers
//!   503 `provider_unavailable` with `Retry-After` or tries a fallback. After
//!   `open_secs` a timer moves the breaker to half-open — at that moment, even
//!   with no traffic, so the event appears when it happens.
//! * **half_open** — at most `half_open_max_requests` trial requests are in
//!   flight at once; others are refused with `retry_after_secs = 1`. The first
//!   trial to succeed closes the breaker; the first to fail opens it again,
//!   for a new `open_secs` with a new timer.
//!
//! # Reporting outcomes
//!
//! [`CircuitBreaker::admit`] hands out a [`Permit`] per admitted request. The
//! caller consumes it with exactly one of [`Permit::success`],
//! [`Permit::failure`] or [`Permit::ignore`] (or [`Permit::report`] with an
//! [`Outcome`] from [`classify`]). A permit dropped without any of them — the
//! request future was cancelled because the client went away, a panic, an
//! early return — counts as **ignore**: it frees its half-open slot and
//! changes nothing else. What counts as a failure is decided by [`classify`]:
//! no response (connect error, timeout) and 5xx are failures, 429 only with
//! `count_429`, other 4xx are neutral (the client's fault, not the
//! provider's), 1xx–3xx are successes.
//!
//! # Exactly one event per transition
//!
//! Every transition publishes exactly one `circuit_breaker.state_changed`
//! ([`BreakerStateChanged`]) with the true `from` and `to`. The state change
//! and the publish happen under one [`std::sync::Mutex`] (never held across
//! an `.await`), so events are in transition order and concurrent requests
//! cannot both observe "closed" and both open the breaker. There is never a
//! closed → closed, open → open or half_open → half_open event.
//!
//! Every transition starts a new *generation*. A permit remembers the
//! generation it was admitted in, and its outcome moves the state machine
//! only while that generation is current. So when 200 requests admitted
//! while closed all fail, the failure that reaches `failure_threshold` opens
//! the breaker and the other failures — reported after it opened, by
//! requests admitted before it did — are counted in the totals but neither
//! change the state nor publish anything. Likewise a trial that finishes
//! after another trial already decided the half-open episode, and the timer
//! of an open episode that has already ended, do nothing.
//!
//! # `consecutive_failures`
//!
//! The number of consecutive failures the breaker has acted on, i.e.
//! failures of requests admitted in the current generation, since the last
//! such success. In an event it is the value *after* the transition:
//! `failure_threshold` when closed → open; unchanged when open → half_open;
//! one more when a trial fails (half_open → open: the streak goes on, no
//! success came in between); 0 when a trial succeeds (half_open → closed).
//! Late outcomes (see above) never change it.
//!
//! # Time
//!
//! Time comes from a [`Clock`]: [`SystemClock`] (tokio's clock, so tokio's
//! paused test time also works) in production and [`ManualClock`] in tests,
//! which moves only when told to. The half-open timer is a tokio task; when
//! the breaker is used outside a tokio runtime (no task can be spawned), or
//! the task is late, [`CircuitBreaker::admit`] and
//! [`CircuitBreaker::snapshot`] make the due transition themselves — still
//! exactly once, thanks to the generation.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::events::model::{BreakerState, BreakerStateChanged};
use crate::events::EventHub;

/// The longest `open_secs` accepted: one day.
pub const MAX_OPEN_SECS: u64 = 86_400;

/// The longest failure reason kept in events, in characters; longer ones are
/// cut (upstream error texts can be long).
const MAX_REASON_CHARS: usize = 200;

/// `[providers.NAME.circuit_breaker]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long the breaker stays open before it lets trial requests through.
    pub open_secs: u64,
    /// Trial requests allowed in flight at once while half-open.
    pub half_open_max_requests: u32,
    /// Whether HTTP 429 (rate limited) counts as a failure.
    pub count_429: bool,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_secs: 30,
            half_open_max_requests: 1,
            count_429: false,
        }
    }
}

impl CircuitBreakerConfig {
    /// Checks values that parse but cannot work. `key_prefix` is the table's
    /// dotted key, e.g. `providers.openai.circuit_breaker`; an error is the
    /// offending field's full dotted key and what is expected of it.
    pub fn validate(&self, key_prefix: &str) -> Result<(), (String, String)> {
        let fail = |field: &str, message: String| Err((format!("{key_prefix}.{field}"), message));
        if self.failure_threshold == 0 {
            return fail("failure_threshold", "must be at least 1 failure".to_owned());
        }
        if self.open_secs == 0 {
            return fail("open_secs", "must be at least 1 second".to_owned());
        }
        if self.open_secs > MAX_OPEN_SECS {
            return fail(
                "open_secs",
                format!("must be at most {MAX_OPEN_SECS} seconds (one day)"),
            );
        }
        if self.half_open_max_requests == 0 {
            return fail(
                "half_open_max_requests",
                "must be at least 1 request".to_owned(),
            );
        }
        Ok(())
    }

    fn open_duration(&self) -> Duration {
        Duration::from_secs(self.open_secs.clamp(1, MAX_OPEN_SECS))
    }
}

/// What one upstream attempt means for the provider's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider answered properly.
    Success,
    /// The provider is at fault; the reason goes into the event
    /// (`HTTP 503`, `timeout`, `connect error`, …).
    Failure(String),
    /// Says nothing about the provider (a client error, a cancelled request).
    Neutral,
}

/// Classifies an upstream attempt by its HTTP status; `None` means no
/// response at all (connect error, timeout, broken connection):
///
/// | status | outcome |
/// |---|---|
/// | `None` | `Failure("no response")` — when the caller knows better, it calls [`Permit::failure`] with `"timeout"`, `"connect error"`, … itself |
/// | 100–399 | `Success` |
/// | 429 | `Failure("HTTP 429")` if `count_429`, else `Neutral` |
/// | other 400–499 | `Neutral`: the request's fault, not the provider's |
/// | 500–599 and anything else | `Failure("HTTP <status>")` |
pub fn classify(status: Option<u16>, count_429: bool) -> Outcome {
    match status {
        None => Outcome::Failure("no response".to_owned()),
        Some(100..=399) => Outcome::Success,
        Some(429) if count_429 => Outcome::Failure("HTTP 429".to_owned()),
        Some(400..=499) => Outcome::Neutral,
        Some(status) => Outcome::Failure(format!("HTTP {status}")),
    }
}

/// The answer to [`CircuitBreaker::admit`].
#[derive(Debug)]
#[must_use = "a rejected request must not go upstream; an allowed one must report through its Permit"]
pub enum Admission {
    /// Send the request, then report its outcome through the permit.
    Allowed(Permit),
    /// Do not send it: answer 503 with `Retry-After: retry_after_secs` (or
    /// try a fallback provider).
    Rejected { retry_after_secs: u64 },
}

/// One admitted request's handle. Consume it with exactly one of
/// [`success`](Permit::success), [`failure`](Permit::failure),
/// [`ignore`](Permit::ignore) or [`report`](Permit::report); dropping it
/// unconsumed is the same as `ignore` (the half-open slot is freed, nothing
/// else changes). It holds only a weak reference, so a breaker replaced
/// while the request runs is simply not told.
#[derive(Debug)]
#[must_use = "report the request's outcome with success(), failure() or ignore()"]
pub struct Permit {
    breaker: Weak<CircuitBreaker>,
    generation: u64,
    trial: bool,
    reported: bool,
}

impl Permit {
    /// Whether this is a half-open trial request.
    pub fn is_trial(&self) -> bool {
        self.trial
    }

    /// The provider answered properly.
    pub fn success(self) {
        self.report(Outcome::Success)
    }

    /// The provider failed (connect error, timeout, 5xx, …); `reason` goes
    /// into the event, so it must not contain secrets.
    pub fn failure(self, reason: &str) {
        self.report(Outcome::Failure(reason.to_owned()))
    }

    /// The outcome says nothing about the provider (a 4xx that is the
    /// request's fault, the client went away).
    pub fn ignore(self) {
        self.report(Outcome::Neutral)
    }

    /// Reports an [`Outcome`], e.g. from [`classify`].
    pub fn report(mut self, outcome: Outcome) {
        self.resolve(outcome);
    }

    fn resolve(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        if let Some(breaker) = self.breaker.upgrade() {
            breaker.record(self.generation, outcome);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.resolve(Outcome::Neutral);
    }
}

/// A breaker's state and counters, for `GET /admin/v1/providers`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerSnapshot {
    pub provider: String,
    pub state: BreakerState,
    /// See the module documentation.
    pub consecutive_failures: u32,
    /// Outcomes reported since the breaker was created, including late ones
    /// that no longer moved the state.
    pub successes_total: u64,
    pub failures_total: u64,
    /// Permits consumed with `ignore` or dropped, and neutral outcomes.
    pub ignored_total: u64,
    /// Requests refused while open or with every half-open slot taken.
    pub rejections_total: u64,
    /// Trial requests in flight now (0 unless half-open).
    pub half_open_in_flight: u32,
    /// When the current open episode began (RFC 3339, UTC); `null` while
    /// closed. Kept while half-open: the opening that led to it.
    pub opened_at: Option<String>,
    /// When the breaker will become (open) or became (half_open)
    /// half-open; `null` while closed.
    pub half_open_at: Option<String>,
    pub config: CircuitBreakerConfig,
}

/// Where a breaker gets the time and sleeps.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic now, for deadlines.
    fn now(&self) -> Instant;
    /// Wall-clock now, for `opened_at` and `half_open_at`.
    fn now_utc(&self) -> DateTime<Utc>;
    /// Completes at or after `deadline`.
    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The real clock: tokio's (so `tokio::time::pause` applies) and UTC.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn now_utc(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep_until(deadline))
    }
}

/// A clock that moves only by [`ManualClock::advance`], waking the sleepers
/// whose deadline has come. For tests, including integration tests.
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    base_utc: DateTime<Utc>,
    elapsed: watch::Sender<Duration>,
}

impl ManualClock {
    pub fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock {
            base: Instant::now(),
            base_utc: Utc::now(),
            elapsed: watch::Sender::new(Duration::ZERO),
        })
    }

    pub fn advance(&self, by: Duration) {
        self.elapsed.send_modify(|elapsed| *elapsed += by);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + *self.elapsed.borrow()
    }

    fn now_utc(&self) -> DateTime<Utc> {
        let elapsed = chrono::Duration::from_std(*self.elapsed.borrow()).unwrap_or_default();
        self.base_utc + elapsed
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let mut elapsed = self.elapsed.subscribe();
        let base = self.base;
        Box::pin(async move {
            loop {
                if base + *elapsed.borrow_and_update() >= deadline {
                    return;
                }
                if elapsed.changed().await.is_err() {
                    // The clock is gone, and with it the breaker: nothing
                    // left to wake.
                    return;
                }
            }
        })
    }
}

/// One provider's circuit breaker. Create it with [`CircuitBreaker::new`];
/// share the returned `Arc`.
pub struct CircuitBreaker {
    provider: String,
    hub: EventHub,
    clock: Arc<dyn Clock>,
    /// Ourselves, for permits and the half-open timer.
    me: Weak<CircuitBreaker>,
    inner: Mutex<Inner>,
}

struct Inner {
    config: CircuitBreakerConfig,
    state: BreakerState,
    /// Incremented by every transition; see the module documentation.
    generation: u64,
    consecutive_failures: u32,
    trials_in_flight: u32,
    /// While open: when it becomes half-open, and after how many seconds.
    half_open_deadline: Option<Instant>,
    open_secs: u64,
    opened_at: Option<DateTime<Utc>>,
    half_open_at: Option<DateTime<Utc>>,
    successes_total: u64,
    failures_total: u64,
    ignored_total: u64,
    rejections_total: u64,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("provider", &self.provider)
            .field("state", &self.lock().state)
            .finish_non_exhaustive()
    }
}

impl CircuitBreaker {
    /// A closed breaker for `provider` on the system clock. Publishes
    /// nothing until its first transition.
    pub fn new(provider: String, config: CircuitBreakerConfig, hub: EventHub) -> Arc<Self> {
        Self::with_clock(provider, config, hub, Arc::new(SystemClock))
    }

    /// Like [`CircuitBreaker::new`] with a chosen clock (tests).
    pub fn with_clock(
        provider: String,
        config: CircuitBreakerConfig,
        hub: EventHub,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| CircuitBreaker {
            provider,
            hub,
            clock,
            me: me.clone(),
            inner: Mutex::new(Inner {
                config,
                state: BreakerState::Closed,
                generation: 0,
                consecutive_failures: 0,
                trials_in_flight: 0,
                half_open_deadline: None,
                open_secs: 0,
                opened_at: None,
                half_open_at: None,
                successes_total: 0,
                failures_total: 0,
                ignored_total: 0,
                rejections_total: 0,
            }),
        })
    }

    pub fn provider(&self) -> &str {
        &self.provider
    }

    pub fn state(&self) -> BreakerState {
        let mut inner = self.lock();
        self.half_open_if_due(&mut inner);
        inner.state
    }

    pub fn config(&self) -> CircuitBreakerConfig {
        self.lock().config.clone()
    }

    /// Applies a reloaded configuration without resetting the state: a new
    /// `failure_threshold` applies from the next failure (so a lowered one
    /// already reached opens on it), `half_open_max_requests` to the next
    /// admission, `open_secs` to the next opening (a running open episode
    /// keeps its deadline), `count_429` to the next [`classify`](Self::classify).
    pub fn set_config(&self, config: CircuitBreakerConfig) {
        self.lock().config = config;
    }

    /// [`classify`] with this breaker's `count_429`.
    pub fn classify(&self, status: Option<u16>) -> Outcome {
        classify(status, self.lock().config.count_429)
    }

    /// Decides whether a request may go to the provider now.
    pub fn admit(&self) -> Admission {
        let mut inner = self.lock();
        self.half_open_if_due(&mut inner);
        match inner.state {
            BreakerState::Closed => Admission::Allowed(self.permit(inner.generation, false)),
            BreakerState::Open => {
                inner.rejections_total += 1;
                let left = inner
                    .half_open_deadline
                    .map(|deadline| deadline.saturating_duration_since(self.clock.now()))
                    .unwrap_or_default();
                let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                Admission::Rejected {
                    retry_after_secs: secs.max(1),
                }
            }
            BreakerState::HalfOpen => {
                if inner.trials_in_flight < inner.config.half_open_max_requests {
                    inner.trials_in_flight += 1;
                    Admission::Allowed(self.permit(inner.generation, true))
                } else {
                    inner.rejections_total += 1;
                    Admission::Rejected {
                        retry_after_secs: 1,
                    }
                }
            }
        }
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let mut inner = self.lock();
        self.half_open_if_due(&mut inner);
        BreakerSnapshot {
            provider: self.provider.clone(),
            state: inner.state,
            consecutive_failures: inner.consecutive_failures,
            successes_total: inner.successes_total,
            failures_total: inner.failures_total,
            ignored_total: inner.ignored_total,
            rejections_total: inner.rejections_total,
            half_open_in_flight: inner.trials_in_flight,
            opened_at: inner.opened_at.map(rfc3339),
            half_open_at: inner.half_open_at.map(rfc3339),
            config: inner.config.clone(),
        }
    }

    fn permit(&self, generation: u64, trial: bool) -> Permit {
        Permit {
            breaker: self.me.clone(),
            generation,
            trial,
            reported: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update under the lock is a few plain assignments followed by
        // a publish; recovering after a panic elsewhere is safer than
        // refusing every request to the provider.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An outcome of a permit admitted in `generation`.
    fn record(&self, generation: u64, outcome: Outcome) {
        let mut inner = self.lock();
        match outcome {
            Outcome::Success => inner.successes_total += 1,
            Outcome::Failure(_) => inner.failures_total += 1,
            Outcome::Neutral => inner.ignored_total += 1,
        }
        if generation != inner.generation {
            // Admitted before the last transition: too late to matter.
            return;
        }
        match inner.state {
            BreakerState::Closed => match outcome {
                Outcome::Success => inner.consecutive_failures = 0,
                Outcome::Failure(reason) => {
                    inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                    let n = inner.consecutive_failures;
                    if n >= inner.config.failure_threshold {
                        let plural = if n == 1 { "" } else { "s" };
                        let reason =
                            format!("{n} consecutive failure{plural} (last: {})", short(&reason));
                        self.transition(&mut inner, BreakerState::Open, reason);
                    }
                }
                Outcome::Neutral => {}
            },
            BreakerState::HalfOpen => {
                inner.trials_in_flight = inner.trials_in_flight.saturating_sub(1);
                match outcome {
                    Outcome::Success => {
                        inner.consecutive_failures = 0;
                        let reason = "trial request succeeded".to_owned();
                        self.transition(&mut inner, BreakerState::Closed, reason);
                    }
                    Outcome::Failure(reason) => {
                        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                        let reason = format!("trial request failed: {}", short(&reason));
                        self.transition(&mut inner, BreakerState::Open, reason);
                    }
                    Outcome::Neutral => {}
                }
            }
            // No permit is ever issued in an open generation.
            BreakerState::Open => {}
        }
    }

    /// Moves an open breaker whose deadline has passed to half-open.
    fn half_open_if_due(&self, inner: &mut Inner) {
        if inner.state == BreakerState::Open
            && inner
                .half_open_deadline
                .is_some_and(|deadline| self.clock.now() >= deadline)
        {
            self.to_half_open(inner);
        }
    }

    /// The timer of the open episode `generation` has fired.
    fn on_timer(&self, generation: u64) {
        let mut inner = self.lock();
        if inner.generation == generation && inner.state == BreakerState::Open {
            self.to_half_open(&mut inner);
        }
    }

    fn to_half_open(&self, inner: &mut Inner) {
        let reason = format!("open for {} s", inner.open_secs);
        self.transition(inner, BreakerState::HalfOpen, reason);
    }

    /// Changes the state, starts a new generation and publishes the one
    /// event, all under the caller's lock.
    fn transition(&self, inner: &mut Inner, to: BreakerState, reason: String) {
        let from = inner.state;
        debug_assert_ne!(from, to, "a transition changes the state");
        inner.state = to;
        inner.generation += 1;
        inner.trials_in_flight = 0;
        inner.half_open_deadline = None;
        match to {
            BreakerState::Open => {
                let open_for = inner.config.open_duration();
                let deadline = self.clock.now() + open_for;
                let now_utc = self.clock.now_utc();
                inner.half_open_deadline = Some(deadline);
                inner.open_secs = open_for.as_secs();
                inner.opened_at = Some(now_utc);
                inner.half_open_at =
                    Some(now_utc + chrono::Duration::from_std(open_for).unwrap_or_default());
                self.start_timer(inner.generation, deadline);
            }
            BreakerState::HalfOpen => inner.half_open_at = Some(self.clock.now_utc()),
            BreakerState::Closed => {
                inner.opened_at = None;
                inner.half_open_at = None;
            }
        }
        let consecutive_failures = inner.consecutive_failures;
        if to == BreakerState::Open {
            tracing::warn!(provider = %self.provider, ?from, ?to, %reason, consecutive_failures, "circuit breaker state changed");
        } else {
            tracing::info!(provider = %self.provider, ?from, ?to, %reason, consecutive_failures, "circuit breaker state changed");
        }
        self.hub.publish(BreakerStateChanged {
            provider: self.provider.clone(),
            from,
            to,
            reason,
            consecutive_failures,
        });
    }

    /// Spawns the task that makes the open episode `generation` half-open
    /// at `deadline`. Outside a tokio runtime there is no task, and the
    /// transition happens at the next `admit`, `state` or `snapshot`.
    fn start_timer(&self, generation: u64, deadline: Instant) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let sleep = self.clock.sleep_until(deadline);
        let breaker = self.me.clone();
        runtime.spawn(async move {
            sleep.await;
            if let Some(breaker) = breaker.upgrade() {
                breaker.on_timer(generation);
            }
        });
    }
}

fn rfc3339(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// A failure reason cut to [`MAX_REASON_CHARS`].
fn short(reason: &str) -> &str {
    match reason.char_indices().nth(MAX_REASON_CHARS) {
        Some((end, _)) => &reason[..end],
        None => reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Subscription;
    use serde_json::Value;
    use tokio::sync::broadcast::error::TryRecvError;

    const PROVIDER: &str = "openai";

    fn config(failure_threshold: u32, open_secs: u64, half_open_max: u32) -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            failure_threshold,
            open_secs,
            half_open_max_requests: half_open_max,
            count_429: false,
        }
    }

    struct Fixture {
        breaker: Arc<CircuitBreaker>,
        clock: Arc<ManualClock>,
        sub: Subscription,
    }

    fn fixture(config: CircuitBreakerConfig) -> Fixture {
        let hub = EventHub::local(1024, 1024);
        let sub = hub.subscribe(None);
        let clock = ManualClock::new();
        let breaker = CircuitBreaker::with_clock(PROVIDER.into(), config, hub, clock.clone());
        Fixture {
            breaker,
            clock,
            sub,
        }
    }

    /// One published breaker event, as its payload.
    #[derive(Debug, Clone, PartialEq)]
    struct Ev {
        from: String,
        to: String,
        reason: String,
        consecutive_failures: u64,
    }

    fn parse(json: &str) -> Ev {
        let value: Value = serde_json::from_str(json).unwrap();
        assert_eq!(value["type"], "circuit_breaker.state_changed");
        assert_eq!(value["topic"], "circuit_breaker");
        let p = &value["payload"];
        assert_eq!(p["provider"], PROVIDER);
        Ev {
            from: p["from"].as_str().unwrap().to_owned(),
            to: p["to"].as_str().unwrap().to_owned(),
            reason: p["reason"].as_str().unwrap().to_owned(),
            consecutive_failures: p["consecutive_failures"].as_u64().unwrap(),
        }
    }

    /// Every event published so far and not yet read.
    fn drain(sub: &mut Subscription) -> Vec<Ev> {
        let mut events = Vec::new();
        loop {
            match sub.receiver.try_recv() {
                Ok(event) => events.push(parse(&event.json)),
                Err(TryRecvError::Empty) => return events,
                Err(other) => panic!("{other:?}"),
            }
        }
    }

    /// The next event, waiting (in real time, as a safety net) for a timer.
    async fn next_event(sub: &mut Subscription) -> Ev {
        let event = tokio::time::timeout(Duration::from_secs(10), sub.receiver.recv())
            .await
            .expect("an event within 10 s")
            .unwrap();
        parse(&event.json)
    }

    fn moves(events: &[Ev]) -> Vec<(&str, &str)> {
        events
            .iter()
            .map(|e| (e.from.as_str(), e.to.as_str()))
            .collect()
    }

    fn allowed(breaker: &CircuitBreaker) -> Permit {
        match breaker.admit() {
            Admission::Allowed(permit) => permit,
            Admission::Rejected { retry_after_secs } => {
                panic!("rejected (retry after {retry_after_secs} s)")
            }
        }
    }

    fn rejected(breaker: &CircuitBreaker) -> u64 {
        match breaker.admit() {
            Admission::Allowed(permit) => panic!("allowed: {permit:?}"),
            Admission::Rejected { retry_after_secs } => retry_after_secs,
        }
    }

    fn fail(breaker: &CircuitBreaker, n: u32) {
        for _ in 0..n {
            allowed(breaker).failure("HTTP 503");
        }
    }

    /// Lets spawned timer tasks run (current-thread runtime).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    /// Opens the breaker and reads the event.
    fn open(f: &mut Fixture) {
        let threshold = f.breaker.config().failure_threshold;
        fail(&f.breaker, threshold);
        assert_eq!(moves(&drain(&mut f.sub)), [("closed", "open")]);
    }

    /// Opens the breaker, waits out `open_secs` and reads both events.
    async fn half_open(f: &mut Fixture) {
        open(f);
        f.clock
            .advance(Duration::from_secs(f.breaker.config().open_secs));
        assert_eq!(
            moves(&[next_event(&mut f.sub).await]),
            [("open", "half_open")]
        );
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c = CircuitBreakerConfig::default();
        assert_eq!(
            (
                c.failure_threshold,
                c.open_secs,
                c.half_open_max_requests,
                c.count_429
            ),
            (5, 30, 1, false)
        );
        let parsed: CircuitBreakerConfig = toml::from_str("").unwrap();
        assert_eq!(parsed, c);
        let parsed: CircuitBreakerConfig =
            toml::from_str("failure_threshold = 3\ncount_429 = true").unwrap();
        assert_eq!(parsed.failure_threshold, 3);
        assert!(parsed.count_429);
        assert_eq!(parsed.open_secs, 30);
        let error = toml::from_str::<CircuitBreakerConfig>("open_seconds = 3").unwrap_err();
        assert!(error.to_string().contains("open_seconds"), "{error}");
        // Round trip.
        let text = toml::to_string(&parsed).unwrap();
        assert_eq!(
            toml::from_str::<CircuitBreakerConfig>(&text).unwrap(),
            parsed
        );
    }

    #[test]
    fn validate_names_the_dotted_key_of_each_bad_value() {
        let prefix = "providers.openai.circuit_breaker";
        assert_eq!(CircuitBreakerConfig::default().validate(prefix), Ok(()));
        let cases = [
            (config(0, 30, 1), "failure_threshold"),
            (config(5, 0, 1), "open_secs"),
            (config(5, MAX_OPEN_SECS + 1, 1), "open_secs"),
            (config(5, 30, 0), "half_open_max_requests"),
        ];
        for (bad, field) in cases {
            let (key, message) = bad.validate(prefix).unwrap_err();
            assert_eq!(key, format!("{prefix}.{field}"));
            assert!(message.starts_with("must be"), "{message}");
        }
        assert_eq!(config(1, MAX_OPEN_SECS, 1).validate(prefix), Ok(()));
    }

    #[test]
    fn classify_follows_the_documented_table() {
        for status in [200, 201, 204, 301, 304] {
            assert_eq!(classify(Some(status), false), Outcome::Success, "{status}");
        }
        for status in [400, 401, 403, 404, 408, 413, 422] {
            assert_eq!(classify(Some(status), true), Outcome::Neutral, "{status}");
        }
        for status in [500, 502, 503, 504] {
            assert_eq!(
                classify(Some(status), false),
                Outcome::Failure(format!("HTTP {status}"))
            );
        }
        assert_eq!(classify(Some(429), false), Outcome::Neutral);
        assert_eq!(
            classify(Some(429), true),
            Outcome::Failure("HTTP 429".into())
        );
        assert_eq!(
            classify(None, false),
            Outcome::Failure("no response".into())
        );
    }

    #[tokio::test]
    async fn opens_after_exactly_failure_threshold_consecutive_failures() {
        let mut f = fixture(config(5, 30, 1));
        fail(&f.breaker, 4);
        allowed(&f.breaker).success();
        fail(&f.breaker, 4);
        assert_eq!(f.breaker.state(), BreakerState::Closed);
        assert_eq!(f.breaker.snapshot().consecutive_failures, 4);
        assert!(drain(&mut f.sub).is_empty());

        allowed(&f.breaker).failure("HTTP 503");
        assert_eq!(f.breaker.state(), BreakerState::Open);
        assert_eq!(
            drain(&mut f.sub),
            [Ev {
                from: "closed".into(),
                to: "open".into(),
                reason: "5 consecutive failures (last: HTTP 503)".into(),
                consecutive_failures: 5,
            }]
        );
    }

    #[tokio::test]
    async fn neutral_outcomes_neither_count_nor_reset_the_streak() {
        let mut f = fixture(config(3, 30, 1));
        fail(&f.breaker, 2);
        allowed(&f.breaker).ignore();
        allowed(&f.breaker).report(classify(Some(404), false));
        drop(allowed(&f.breaker));
        assert_eq!(f.breaker.snapshot().consecutive_failures, 2);
        allowed(&f.breaker).failure("timeout");
        let events = drain(&mut f.sub);
        assert_eq!(moves(&events), [("closed", "open")]);
        assert_eq!(events[0].reason, "3 consecutive failures (last: timeout)");
        assert_eq!(f.breaker.snapshot().ignored_total, 3);
    }

    #[tokio::test]
    async fn a_threshold_of_one_opens_on_the_first_failure() {
        let mut f = fixture(config(1, 30, 1));
        allowed(&f.breaker).failure("connect error");
        let events = drain(&mut f.sub);
        assert_eq!(
            events[0].reason,
            "1 consecutive failure (last: connect error)"
        );
        assert_eq!(events[0].consecutive_failures, 1);
    }

    #[tokio::test]
    async fn open_rejects_with_the_seconds_left_until_half_open() {
        let mut f = fixture(config(2, 30, 1));
        open(&mut f);
        assert_eq!(rejected(&f.breaker), 30);
        f.clock.advance(Duration::from_millis(10_500));
        assert_eq!(rejected(&f.breaker), 20); // 19.5 s left, rounded up
        f.clock.advance(Duration::from_millis(19_400));
        assert_eq!(rejected(&f.breaker), 1); // 0.1 s left
        let snapshot = f.breaker.snapshot();
        assert_eq!(snapshot.rejections_total, 3);
        assert_eq!(snapshot.state, BreakerState::Open);
        assert!(drain(&mut f.sub).is_empty());
    }

    #[tokio::test]
    async fn open_becomes_half_open_after_open_secs_by_timer_without_traffic() {
        let mut f = fixture(config(5, 30, 1));
        open(&mut f);
        f.clock.advance(Duration::from_secs(29));
        settle().await;
        assert!(drain(&mut f.sub).is_empty(), "not before open_secs");

        f.clock.advance(Duration::from_secs(1));
        // No admit, no snapshot: only the timer can publish this.
        assert_eq!(
            next_event(&mut f.sub).await,
            Ev {
                from: "open".into(),
                to: "half_open".into(),
                reason: "open for 30 s".into(),
                consecutive_failures: 5,
            }
        );
        assert_eq!(f.breaker.state(), BreakerState::HalfOpen);
        assert!(allowed(&f.breaker).is_trial());
        settle().await;
        assert!(drain(&mut f.sub).is_empty());
    }

    #[tokio::test]
    async fn half_open_closes_on_a_trial_success() {
        let mut f = fixture(config(5, 30, 1));
        half_open(&mut f).await;
        let trial = allowed(&f.breaker);
        assert!(trial.is_trial());
        trial.success();
        assert_eq!(
            drain(&mut f.sub),
            [Ev {
                from: "half_open".into(),
                to: "closed".into(),
                reason: "trial request succeeded".into(),
                consecutive_failures: 0,
            }]
        );
        let snapshot = f.breaker.snapshot();
        assert_eq!(snapshot.state, BreakerState::Closed);
        assert_eq!(snapshot.opened_at, None);
        assert_eq!(snapshot.half_open_at, None);
        // Closed again: everything is admitted, and it takes a full streak
        // to open again.
        let permits: Vec<Permit> = (0..10).map(|_| allowed(&f.breaker)).collect();
        assert!(permits.iter().all(|p| !p.is_trial()));
        drop(permits);
        fail(&f.breaker, 4);
        assert_eq!(f.breaker.state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn half_open_reopens_on_a_trial_failure_with_a_new_timer() {
        let mut f = fixture(config(5, 30, 1));
        half_open(&mut f).await;
        allowed(&f.breaker).failure("timeout");
        assert_eq!(
            drain(&mut f.sub),
            [Ev {
                from: "half_open".into(),
                to: "open".into(),
                reason: "trial request failed: timeout".into(),
                consecutive_failures: 6,
            }]
        );
        assert_eq!(rejected(&f.breaker), 30, "a whole new open period");

        f.clock.advance(Duration::from_secs(29));
        settle().await;
        assert!(drain(&mut f.sub).is_empty());
        f.clock.advance(Duration::from_secs(1));
        let event = next_event(&mut f.sub).await;
        assert_eq!(
            (event.from.as_str(), event.to.as_str()),
            ("open", "half_open")
        );
        assert_eq!(event.consecutive_failures, 6);
        allowed(&f.breaker).success();
        assert_eq!(moves(&drain(&mut f.sub)), [("half_open", "closed")]);
    }

    #[tokio::test]
    async fn half_open_admits_at_most_half_open_max_requests() {
        let mut f = fixture(config(5, 30, 2));
        half_open(&mut f).await;
        let first = allowed(&f.breaker);
        let second = allowed(&f.breaker);
        assert_eq!(rejected(&f.breaker), 1);
        assert_eq!(rejected(&f.breaker), 1);
        assert_eq!(f.breaker.snapshot().half_open_in_flight, 2);
        first.ignore();
        let third = allowed(&f.breaker);
        assert_eq!(rejected(&f.breaker), 1);
        assert!(
            drain(&mut f.sub).is_empty(),
            "ignoring a trial decides nothing"
        );
        assert_eq!(f.breaker.state(), BreakerState::HalfOpen);
        second.success();
        assert_eq!(moves(&drain(&mut f.sub)), [("half_open", "closed")]);
        // The other trial finishes after the episode was decided: nothing.
        third.failure("HTTP 500");
        assert!(drain(&mut f.sub).is_empty());
        let snapshot = f.breaker.snapshot();
        assert_eq!(snapshot.state, BreakerState::Closed);
        assert_eq!(snapshot.consecutive_failures, 0);
        assert_eq!(snapshot.rejections_total, 3);
    }

    #[tokio::test]
    async fn a_dropped_permit_frees_its_half_open_slot() {
        let mut f = fixture(config(5, 30, 1));
        half_open(&mut f).await;
        let trial = allowed(&f.breaker);
        assert_eq!(rejected(&f.breaker), 1);
        drop(trial);
        assert_eq!(f.breaker.snapshot().half_open_in_flight, 0);
        allowed(&f.breaker).success();
        assert_eq!(moves(&drain(&mut f.sub)), [("half_open", "closed")]);
    }

    #[tokio::test]
    async fn a_dropped_request_future_counts_as_ignore() {
        let mut f = fixture(config(5, 30, 1));
        half_open(&mut f).await;
        let breaker = f.breaker.clone();
        let request = tokio::spawn(async move {
            let _permit = allowed(&breaker);
            std::future::pending::<()>().await;
        });
        settle().await;
        assert_eq!(rejected(&f.breaker), 1);
        request.abort();
        let _ = request.await;
        assert!(allowed(&f.breaker).is_trial());
        assert!(drain(&mut f.sub).is_empty());
    }

    #[tokio::test]
    async fn status_429_counts_only_with_count_429() {
        let mut f = fixture(config(3, 30, 1));
        for _ in 0..10 {
            let outcome = f.breaker.classify(Some(429));
            allowed(&f.breaker).report(outcome);
        }
        assert_eq!(f.breaker.state(), BreakerState::Closed);
        assert!(drain(&mut f.sub).is_empty());

        let mut f = fixture(CircuitBreakerConfig {
            count_429: true,
            ..config(3, 30, 1)
        });
        for _ in 0..3 {
            let outcome = f.breaker.classify(Some(429));
            allowed(&f.breaker).report(outcome);
        }
        let events = drain(&mut f.sub);
        assert_eq!(moves(&events), [("closed", "open")]);
        assert_eq!(events[0].reason, "3 consecutive failures (last: HTTP 429)");
    }

    #[tokio::test]
    async fn late_outcomes_of_requests_admitted_before_opening_change_nothing() {
        let mut f = fixture(config(5, 30, 1));
        let permits: Vec<Permit> = (0..10).map(|_| allowed(&f.breaker)).collect();
        let mut permits = permits.into_iter();
        for permit in permits.by_ref().take(5) {
            permit.failure("HTTP 502");
        }
        assert_eq!(moves(&drain(&mut f.sub)), [("closed", "open")]);
        permits.next().unwrap().success();
        for permit in permits {
            permit.failure("HTTP 502");
        }
        assert!(drain(&mut f.sub).is_empty());
        let snapshot = f.breaker.snapshot();
        assert_eq!(snapshot.state, BreakerState::Open);
        assert_eq!(snapshot.consecutive_failures, 5);
        assert_eq!(snapshot.failures_total, 9);
        assert_eq!(snapshot.successes_total, 1);
    }

    #[tokio::test]
    async fn an_admit_after_the_deadline_transitions_once_and_the_timer_then_does_nothing() {
        let mut f = fixture(config(5, 30, 1));
        open(&mut f);
        f.clock.advance(Duration::from_secs(30));
        // Before the timer task has had a chance to run:
        let trial = allowed(&f.breaker);
        assert!(trial.is_trial());
        settle().await;
        assert_eq!(moves(&drain(&mut f.sub)), [("open", "half_open")]);
        trial.success();
        assert_eq!(moves(&drain(&mut f.sub)), [("half_open", "closed")]);
    }

    #[test]
    fn without_a_runtime_the_due_transition_happens_on_the_next_admit() {
        let mut f = fixture(config(2, 30, 1));
        open(&mut f);
        f.clock.advance(Duration::from_secs(30));
        assert!(allowed(&f.breaker).is_trial()); // dropped: ignore
        assert_eq!(moves(&drain(&mut f.sub)), [("open", "half_open")]);
        allowed(&f.breaker).failure("HTTP 500");
        assert_eq!(moves(&drain(&mut f.sub)), [("half_open", "open")]);
        f.clock.advance(Duration::from_secs(30));
        assert_eq!(f.breaker.snapshot().state, BreakerState::HalfOpen);
        assert_eq!(moves(&drain(&mut f.sub)), [("open", "half_open")]);
    }

    #[tokio::test]
    async fn snapshot_reports_state_counters_times_and_config() {
        let mut f = fixture(config(2, 30, 1));
        allowed(&f.breaker).success();
        open(&mut f);
        let _ = rejected(&f.breaker);
        let value = serde_json::to_value(f.breaker.snapshot()).unwrap();
        assert_eq!(value["provider"], PROVIDER);
        assert_eq!(value["state"], "open");
        assert_eq!(value["consecutive_failures"], 2);
        assert_eq!(value["successes_total"], 1);
        assert_eq!(value["failures_total"], 2);
        assert_eq!(value["rejections_total"], 1);
        assert_eq!(value["config"]["open_secs"], 30);
        assert_eq!(value["config"]["failure_threshold"], 2);
        let time =
            |key: &str| chrono::DateTime::parse_from_rfc3339(value[key].as_str().unwrap()).unwrap();
        assert_eq!(
            time("half_open_at") - time("opened_at"),
            chrono::Duration::seconds(30)
        );

        f.clock.advance(Duration::from_secs(31));
        let _ = next_event(&mut f.sub).await;
        let snapshot = f.breaker.snapshot();
        assert_eq!(snapshot.state, BreakerState::HalfOpen);
        assert!(snapshot.opened_at.is_some() && snapshot.half_open_at.is_some());

        allowed(&f.breaker).success();
        let value = serde_json::to_value(f.breaker.snapshot()).unwrap();
        assert_eq!(value["state"], "closed");
        assert_eq!(value["opened_at"], Value::Null);
        assert_eq!(value["half_open_at"], Value::Null);
    }

    #[tokio::test]
    async fn set_config_applies_without_resetting_the_state() {
        let mut f = fixture(config(5, 30, 1));
        fail(&f.breaker, 3);
        f.breaker.set_config(config(2, 10, 1));
        assert_eq!(f.breaker.state(), BreakerState::Closed);
        allowed(&f.breaker).failure("HTTP 503");
        let events = drain(&mut f.sub);
        assert_eq!(events[0].consecutive_failures, 4);
        assert_eq!(rejected(&f.breaker), 10);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn two_hundred_concurrent_failures_open_the_breaker_exactly_once() {
        let mut f = fixture(config(5, 30, 1));
        let barrier = Arc::new(tokio::sync::Barrier::new(200));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let breaker = f.breaker.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    // All admitted while closed, then all fail at once.
                    let permit = allowed(&breaker);
                    barrier.wait().await;
                    permit.failure("HTTP 503");
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            drain(&mut f.sub),
            [Ev {
                from: "closed".into(),
                to: "open".into(),
                reason: "5 consecutive failures (last: HTTP 503)".into(),
                consecutive_failures: 5,
            }]
        );
        let snapshot = f.breaker.snapshot();
        assert_eq!(snapshot.state, BreakerState::Open);
        assert_eq!(snapshot.consecutive_failures, 5);
        assert_eq!(snapshot.failures_total, 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn racing_admissions_and_failures_open_the_breaker_exactly_once() {
        let mut f = fixture(config(5, 30, 1));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let breaker = f.breaker.clone();
                tokio::spawn(async move {
                    tokio::task::yield_now().await;
                    match breaker.admit() {
                        Admission::Allowed(permit) => {
                            permit.failure("HTTP 503");
                            false
                        }
                        Admission::Rejected { .. } => true,
                    }
                })
            })
            .collect();
        let mut rejected_count = 0;
        for task in tasks {
            rejected_count += u64::from(task.await.unwrap());
        }
        let events = drain(&mut f.sub);
        assert_eq!(moves(&events), [("closed", "open")]);
        assert_eq!(events[0].consecutive_failures, 5);
        let snapshot = f.breaker.snapshot();
        assert_eq!(snapshot.rejections_total, rejected_count);
        assert_eq!(snapshot.failures_total + rejected_count, 200);
    }

    /// `n` concurrent requests that each report `outcome` if admitted;
    /// returns how many were admitted as trials.
    async fn load(breaker: &Arc<CircuitBreaker>, n: usize, succeed: bool) -> usize {
        let barrier = Arc::new(tokio::sync::Barrier::new(n));
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let breaker = breaker.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    let admission = breaker.admit();
                    // Hold the permits so that admissions overlap.
                    barrier.wait().await;
                    match admission {
                        Admission::Allowed(permit) => {
                            let trial = permit.is_trial();
                            if succeed {
                                permit.success();
                            } else {
                                permit.failure("HTTP 503");
                            }
                            trial
                        }
                        Admission::Rejected { .. } => false,
                    }
                })
            })
            .collect();
        let mut trials = 0;
        for task in tasks {
            trials += usize::from(task.await.unwrap());
        }
        trials
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_half_open_requests_get_at_most_max_trials() {
        let mut f = fixture(config(5, 30, 3));
        load(&f.breaker, 100, false).await;
        assert_eq!(moves(&drain(&mut f.sub)), [("closed", "open")]);
        f.clock.advance(Duration::from_secs(30));
        assert_eq!(
            moves(&[next_event(&mut f.sub).await]),
            [("open", "half_open")]
        );
        let trials = load(&f.breaker, 100, true).await;
        assert_eq!(trials, 3);
        assert_eq!(moves(&drain(&mut f.sub)), [("half_open", "closed")]);
    }

    fn ev(from: &str, to: &str, reason: &str, consecutive_failures: u64) -> Ev {
        Ev {
            from: from.into(),
            to: to.into(),
            reason: reason.into(),
            consecutive_failures,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn full_walk_closed_open_half_open_closed_under_load() {
        let mut f = fixture(config(5, 30, 2));
        let mut log = Vec::new();
        load(&f.breaker, 100, false).await;
        log.extend(drain(&mut f.sub));
        f.clock.advance(Duration::from_secs(30));
        log.push(next_event(&mut f.sub).await);
        assert_eq!(load(&f.breaker, 100, true).await, 2);
        load(&f.breaker, 100, true).await;
        log.extend(drain(&mut f.sub));
        assert_eq!(
            log,
            [
                ev(
                    "closed",
                    "open",
                    "5 consecutive failures (last: HTTP 503)",
                    5
                ),
                ev("open", "half_open", "open for 30 s", 5),
                ev("half_open", "closed", "trial request succeeded", 0),
            ]
        );
        let snapshot = f.breaker.snapshot();
        assert_eq!(snapshot.state, BreakerState::Closed);
        assert_eq!(snapshot.failures_total, 100);
        assert_eq!(snapshot.successes_total, 102);
        assert_eq!(snapshot.rejections_total, 98);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn full_walk_closed_open_half_open_open_under_load() {
        let mut f = fixture(config(5, 30, 2));
        let mut log = Vec::new();
        load(&f.breaker, 100, false).await;
        log.extend(drain(&mut f.sub));
        f.clock.advance(Duration::from_secs(30));
        log.push(next_event(&mut f.sub).await);
        assert_eq!(load(&f.breaker, 100, false).await, 2);
        // Open again: everything is refused, and nothing more is published.
        assert_eq!(load(&f.breaker, 100, false).await, 0);
        log.extend(drain(&mut f.sub));
        // The new open episode has its own timer.
        f.clock.advance(Duration::from_secs(30));
        log.push(next_event(&mut f.sub).await);
        load(&f.breaker, 100, true).await;
        log.extend(drain(&mut f.sub));
        assert_eq!(
            log,
            [
                ev(
                    "closed",
                    "open",
                    "5 consecutive failures (last: HTTP 503)",
                    5
                ),
                ev("open", "half_open", "open for 30 s", 5),
                ev("half_open", "open", "trial request failed: HTTP 503", 6),
                ev("open", "half_open", "open for 30 s", 6),
                ev("half_open", "closed", "trial request succeeded", 0),
            ]
        );
    }
}

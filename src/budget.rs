//! Budgets: spending limits per key or for the whole gateway, per UTC
//! calendar period, that alert at thresholds and can block.
//!
//! Spend is accumulated in the store by one atomic `INSERT … ON CONFLICT DO
//! UPDATE … RETURNING` per budget, inside the same transaction as the
//! request's ledger row (see [`crate::ledger`]). Because each increment
//! returns the total it produced, the increment whose `[before, after)`
//! interval contains a threshold is the only one that crossed it: each
//! threshold alert (`budget.threshold_reached`) and the limit alert
//! (`budget.exceeded`) is published exactly once per budget per period, by
//! whichever request crossed it — however many requests run at once and
//! however many gateways share the store. A new period is a new row, so it
//! starts clean.
//!
//! Blocking (`action = "block"`) is decided before the upstream call from
//! the [`BudgetBook`], this node's view of the current periods' spend: the
//! ledger writer updates it after each commit, and it is refreshed from the
//! store every second (spend of other nodes). Overshoot is therefore
//! bounded by the cost of the requests already admitted when the limit was
//! crossed — in flight on this node, plus, with several nodes, those other
//! nodes admitted in the second before they saw the new total.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::usd_to_micros;
use crate::events::model::BudgetAlert;

/// The name under which a key's own budget (`keys create --budget-usd`) is kept.
pub const KEY_BUDGET_NAME: &str = "key-budget";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetScope {
    /// Each key has its own counter.
    Key,
    /// One counter for all requests.
    Global,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    Total,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetAction {
    /// Requests in the budget's scope get 402 once it is exceeded.
    Block,
    /// Alerts only.
    Alert,
}

fn default_thresholds() -> Vec<u32> {
    vec![50, 80, 100]
}

/// `[[budgets]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub name: String,
    pub scope: BudgetScope,
    pub period: Period,
    pub limit_usd: f64,
    /// Percentages of the limit that alert once each per period.
    #[serde(default = "default_thresholds")]
    pub thresholds: Vec<u32>,
    pub action: BudgetAction,
}

impl BudgetConfig {
    /// Checks one budget; `key` is its dotted path (`budgets.0`).
    pub fn validate(&self, key: &str) -> Result<(), (String, String)> {
        let fail = |field: &str, message: String| Err((format!("{key}.{field}"), message));
        if self.name.trim().is_empty() {
            return fail("name", "must not be empty".to_owned());
        }
        if self.name == KEY_BUDGET_NAME {
            return fail(
                "name",
                format!("`{KEY_BUDGET_NAME}` is reserved for keys' own budgets"),
            );
        }
        match usd_to_micros(self.limit_usd) {
            Some(micros) if micros > 0 => {}
            _ => {
                return fail(
                    "limit_usd",
                    "must be an amount in USD above zero with at most 6 decimal places".to_owned(),
                )
            }
        }
        let mut previous = 0;
        for threshold in &self.thresholds {
            if !(1..=100).contains(threshold) || *threshold <= previous {
                return fail(
                    "thresholds",
                    "must be percentages from 1 to 100 in increasing order, e.g. [50, 80, 100]"
                        .to_owned(),
                );
            }
            previous = *threshold;
        }
        Ok(())
    }
}

impl Period {
    /// The start of the period containing `at` (UTC calendar boundaries;
    /// weeks start on Monday).
    pub fn start(self, at: DateTime<Utc>) -> DateTime<Utc> {
        let day = at.date_naive();
        let first = match self {
            Period::Daily => day,
            Period::Weekly => day - Duration::days(i64::from(day.weekday().num_days_from_monday())),
            Period::Monthly => {
                NaiveDate::from_ymd_opt(day.year(), day.month(), 1).expect("day 1 exists")
            }
            Period::Total => return DateTime::UNIX_EPOCH,
        };
        Utc.from_utc_datetime(&first.and_hms_opt(0, 0, 0).expect("midnight exists"))
    }

    /// When the period containing `at` ends; `None` for `total`.
    pub fn reset(self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let start = self.start(at);
        match self {
            Period::Daily => Some(start + Duration::days(1)),
            Period::Weekly => Some(start + Duration::days(7)),
            Period::Monthly => {
                let d = start.date_naive();
                let (y, m) = if d.month() == 12 {
                    (d.year() + 1, 1)
                } else {
                    (d.year(), d.month() + 1)
                };
                NaiveDate::from_ymd_opt(y, m, 1)
                    .and_then(|n| n.and_hms_opt(0, 0, 0))
                    .map(|n| Utc.from_utc_datetime(&n))
            }
            Period::Total => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Total => "total",
        }
    }

    pub fn parse(text: &str) -> Option<Period> {
        [
            Period::Daily,
            Period::Weekly,
            Period::Monthly,
            Period::Total,
        ]
        .into_iter()
        .find(|p| p.as_str() == text)
    }
}

/// One budget as it applies to one request: which counter, and its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRef {
    pub name: String,
    pub scope: BudgetScope,
    /// The key whose counter this is (scope `key`), or `None` (global).
    pub key_id: Option<Uuid>,
    pub period: Period,
    pub limit_micros: i64,
    pub thresholds: Vec<u32>,
    pub action: BudgetAction,
}

impl BudgetRef {
    /// The counter's key in the store: the key id, or `global`.
    pub fn scope_key(&self) -> String {
        self.key_id
            .map_or_else(|| "global".to_owned(), |k| k.to_string())
    }

    fn counter(&self, at: DateTime<Utc>) -> Counter {
        (
            self.name.clone(),
            self.scope_key(),
            self.period.start(at).timestamp_millis(),
        )
    }

    /// The alerts an increment from `before` to `after` crosses: each
    /// threshold whose amount lies in `(before, after]`, then `exceeded`
    /// if the limit does.
    pub fn crossings(
        &self,
        before: i64,
        after: i64,
        period_start: DateTime<Utc>,
    ) -> Vec<BudgetCrossing> {
        let alert = |threshold_percent| BudgetAlert {
            budget: self.name.clone(),
            scope: match self.scope {
                BudgetScope::Key => "key".to_owned(),
                BudgetScope::Global => "global".to_owned(),
            },
            key_id: self.key_id,
            period: self.period.as_str().to_owned(),
            threshold_percent,
            spent_micros: after,
            limit_micros: self.limit_micros,
            period_start: period_start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let crossed = |amount: i64| before < amount && amount <= after;
        let mut out: Vec<BudgetCrossing> = self
            .thresholds
            .iter()
            .filter(|t| crossed(threshold_amount(self.limit_micros, **t)))
            .map(|t| BudgetCrossing::Threshold(alert(*t)))
            .collect();
        if crossed(self.limit_micros) {
            out.push(BudgetCrossing::Exceeded(alert(100)));
        }
        out
    }
}

/// The spend at which `percent` of `limit` is reached, rounded up.
fn threshold_amount(limit_micros: i64, percent: u32) -> i64 {
    let amount = i128::from(limit_micros) * i128::from(percent);
    ((amount + 99) / 100) as i64
}

#[derive(Debug, Clone, PartialEq)]
pub enum BudgetCrossing {
    Threshold(BudgetAlert),
    Exceeded(BudgetAlert),
}

/// The budgets a request of `key_id` counts against: every global budget,
/// every key-scoped budget for this key, and the key's own budget.
pub fn budgets_for(
    configured: &[BudgetConfig],
    key_id: Uuid,
    own: Option<(i64, Period)>,
) -> Vec<BudgetRef> {
    let mut refs: Vec<BudgetRef> = configured
        .iter()
        .map(|b| BudgetRef {
            name: b.name.clone(),
            scope: b.scope,
            key_id: (b.scope == BudgetScope::Key).then_some(key_id),
            period: b.period,
            limit_micros: usd_to_micros(b.limit_usd).unwrap_or(i64::MAX),
            thresholds: b.thresholds.clone(),
            action: b.action,
        })
        .collect();
    if let Some((limit_micros, period)) = own {
        refs.push(BudgetRef {
            name: KEY_BUDGET_NAME.to_owned(),
            scope: BudgetScope::Key,
            key_id: Some(key_id),
            period,
            limit_micros,
            thresholds: default_thresholds(),
            action: BudgetAction::Block,
        });
    }
    refs
}

type Counter = (String, String, i64);

/// This node's view of the current periods' spend, for blocking.
#[derive(Debug, Default)]
pub struct BudgetBook {
    spent: Mutex<HashMap<Counter, i64>>,
}

/// A budget that blocks a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    pub budget: BudgetRef,
    pub spent_micros: i64,
    pub resets_at: Option<DateTime<Utc>>,
}

impl BudgetBook {
    /// Records a counter's total as the store returned it. Totals only grow
    /// within a period, so a stale, smaller value never replaces a newer one.
    pub fn observe(&self, name: &str, scope_key: &str, period_start_ms: i64, spent: i64) {
        let mut book = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        let entry = book
            .entry((name.to_owned(), scope_key.to_owned(), period_start_ms))
            .or_insert(spent);
        *entry = (*entry).max(spent);
    }

    pub fn spent(&self, budget: &BudgetRef, at: DateTime<Utc>) -> i64 {
        let book = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        book.get(&budget.counter(at)).copied().unwrap_or(0)
    }

    /// The first blocking budget that is exhausted at `at`, if any.
    pub fn check(&self, budgets: &[BudgetRef], at: DateTime<Utc>) -> Option<Exhausted> {
        budgets
            .iter()
            .filter(|b| b.action == BudgetAction::Block)
            .find_map(|b| {
                let spent = self.spent(b, at);
                (spent >= b.limit_micros).then(|| Exhausted {
                    budget: b.clone(),
                    spent_micros: spent,
                    resets_at: b.period.reset(at),
                })
            })
    }

    /// Forgets counters of periods that have ended.
    pub fn forget_before(&self, oldest_current_start_ms: i64) {
        let mut book = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        book.retain(|(_, _, start), _| *start == 0 || *start >= oldest_current_start_ms);
    }
}

/// The gateway's clock: the system time plus an offset that tests move to
/// cross period boundaries without waiting.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + Duration::milliseconds(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock forward (tests only need this).
    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.num_milliseconds(), Ordering::Relaxed);
    }
}

/// Formats micro-dollars as dollars for messages: `$10.000123`.
pub fn usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let micros = micros.unsigned_abs();
    let (whole, frac) = (micros / 1_000_000, micros % 1_000_000);
    let mut frac = format!("{frac:06}");
    while frac.len() > 2 && frac.ends_with('0') {
        frac.pop();
    }
    format!("{sign}${whole}.{frac}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn periods_start_and_reset_on_utc_calendar_boundaries() {
        let t = at("2026-11-27T17:30:00Z"); // a Friday
        assert_eq!(Period::Daily.start(t), at("2026-11-27T00:00:00Z"));
        assert_eq!(Period::Daily.reset(t), Some(at("2026-11-28T00:00:00Z")));
        assert_eq!(Period::Weekly.start(t), at("2026-11-23T00:00:00Z"));
        assert_eq!(Period::Weekly.reset(t), Some(at("2026-11-30T00:00:00Z")));
        assert_eq!(Period::Monthly.start(t), at("2026-11-01T00:00:00Z"));
        assert_eq!(
            Period::Monthly.reset(at("2026-12-31T23:59:59Z")),
            Some(at("2027-01-01T00:00:00Z"))
        );
        assert_eq!(Period::Total.start(t), DateTime::UNIX_EPOCH);
        assert_eq!(Period::Total.reset(t), None);
    }

    fn budget(limit: i64, thresholds: Vec<u32>) -> BudgetRef {
        BudgetRef {
            name: "b".into(),
            scope: BudgetScope::Global,
            key_id: None,
            period: Period::Daily,
            limit_micros: limit,
            thresholds,
            action: BudgetAction::Block,
        }
    }

    fn kinds(crossings: &[BudgetCrossing]) -> Vec<(String, u32)> {
        crossings
            .iter()
            .map(|c| match c {
                BudgetCrossing::Threshold(a) => ("threshold".to_owned(), a.threshold_percent),
                BudgetCrossing::Exceeded(a) => ("exceeded".to_owned(), a.threshold_percent),
            })
            .collect()
    }

    #[test]
    fn an_increment_reports_exactly_the_thresholds_it_crosses() {
        let b = budget(1_000, vec![50, 80, 100]);
        let start = at("2026-11-27T00:00:00Z");
        assert!(b.crossings(0, 499, start).is_empty());
        assert_eq!(
            kinds(&b.crossings(499, 500, start)),
            vec![("threshold".into(), 50)]
        );
        assert!(
            b.crossings(500, 799, start).is_empty(),
            "50% is not repeated"
        );
        assert_eq!(
            kinds(&b.crossings(700, 1_200, start)),
            vec![
                ("threshold".into(), 80),
                ("threshold".into(), 100),
                ("exceeded".into(), 100)
            ]
        );
        assert!(
            b.crossings(1_200, 5_000, start).is_empty(),
            "never again after exceeding"
        );
    }

    #[test]
    fn consecutive_increments_cross_each_threshold_once() {
        let b = budget(997, vec![33, 50, 100]);
        let start = at("2026-11-27T00:00:00Z");
        let mut total = 0;
        let mut seen = Vec::new();
        for cost in [1, 7, 13, 250, 3, 99, 200, 400, 64, 1, 1] {
            seen.extend(kinds(&b.crossings(total, total + cost, start)));
            total += cost;
        }
        assert_eq!(
            seen,
            vec![
                ("threshold".into(), 33),
                ("threshold".into(), 50),
                ("threshold".into(), 100),
                ("exceeded".into(), 100)
            ]
        );
    }

    #[test]
    fn the_book_blocks_only_exhausted_blocking_budgets_of_the_current_period() {
        let book = BudgetBook::default();
        let now = at("2026-11-27T12:00:00Z");
        let mut b = budget(1_000, vec![]);
        book.observe(
            "b",
            "global",
            Period::Daily.start(now).timestamp_millis(),
            1_000,
        );
        let exhausted = book.check(std::slice::from_ref(&b), now).unwrap();
        assert_eq!(exhausted.spent_micros, 1_000);
        assert_eq!(exhausted.resets_at, Some(at("2026-11-28T00:00:00Z")));
        assert!(
            book.check(std::slice::from_ref(&b), at("2026-11-28T00:00:01Z"))
                .is_none(),
            "a new day starts clean"
        );
        b.action = BudgetAction::Alert;
        assert!(book.check(&[b], now).is_none());
        // A stale smaller total does not lower what was seen.
        book.observe(
            "b",
            "global",
            Period::Daily.start(now).timestamp_millis(),
            10,
        );
        assert_eq!(book.spent(&budget(1_000, vec![]), now), 1_000);
    }

    #[test]
    fn configuration_is_checked() {
        let config = |limit_usd, thresholds| BudgetConfig {
            name: "n".into(),
            scope: BudgetScope::Key,
            period: Period::Daily,
            limit_usd,
            thresholds,
            action: BudgetAction::Block,
        };
        assert!(config(10.0, vec![50, 80, 100])
            .validate("budgets.0")
            .is_ok());
        assert_eq!(
            config(0.0, vec![]).validate("budgets.0").unwrap_err().0,
            "budgets.0.limit_usd"
        );
        assert_eq!(
            config(1.0, vec![80, 50])
                .validate("budgets.0")
                .unwrap_err()
                .0,
            "budgets.0.thresholds"
        );
        assert_eq!(
            config(1.0, vec![0]).validate("budgets.0").unwrap_err().0,
            "budgets.0.thresholds"
        );
        assert_eq!(
            config(1.0, vec![101]).validate("budgets.0").unwrap_err().0,
            "budgets.0.thresholds"
        );
    }

    #[test]
    fn dollars_are_formatted_for_people() {
        assert_eq!(usd(10_000_000), "$10.00");
        assert_eq!(usd(10_000_123), "$10.000123");
        assert_eq!(usd(1_500_000), "$1.50");
        assert_eq!(usd(7), "$0.000007");
    }
}

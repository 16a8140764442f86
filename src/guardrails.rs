//! Guardrails: rules that look at the text of a request before it goes
//! upstream, and at the text of a completion before it goes back, and
//! block it, let it pass with a warning, or redact what they find.
//!
//! # Rules
//!
//! `[[guardrails.rules]]` in the configuration (DESIGN §4), each with a
//! `name`, a `kind`, an `action` and `apply_to`:
//!
//! | kind | finds | category reported |
//! |---|---|---|
//! | `pii` | the listed `categories`: `email`, `phone`, `credit_card`, `us_ssn`, `ipv4` | the matching category |
//! | `regex` | the rule's `pattern`, as written (regex crate syntax) | `category`, default `regex` |
//! | `blocklist` | any of `words`, as whole words, case-insensitive | `blocklist` |
//! | `max_input_chars` | input texts longer than `max_chars` characters in total | `max_input_chars` |
//!
//! Actions: `block` refuses the request (the caller answers 400
//! `guardrail_violation` naming [`Verdict::blocked_by`], with no upstream
//! call); `warn` lets it pass unchanged; `redact` replaces every match, in
//! place, with `[REDACTED:CATEGORY]` (the category upper-cased, e.g.
//! `[REDACTED:EMAIL]`, `[REDACTED:CREDIT_CARD]`) before the text is used.
//!
//! # What is checked
//!
//! - Input ([`Guardrails::check_input`], rules with `apply_to` `input` or
//!   `both`): a chat request's `messages[].content`, as a string or as the
//!   `text` of its parts (image and other parts are left alone), and an
//!   embeddings request's `input`, a string or an array of strings. Token-id
//!   arrays in `input` are not text and are not checked. Other fields
//!   (`tool_calls` arguments, `name`, …) are not checked.
//! - Output of a non-streamed response ([`Guardrails::check_output_json`]:
//!   `choices[].message.content`; or [`Guardrails::check_output`] on a text),
//!   rules with `apply_to` `output` or `both`.
//! - Every rule looks at the original text: one rule's redaction does not hide
//!   a match from another rule in the same check. Redactions of overlapping
//!   matches are merged into one marker (the category of the match that
//!   starts first).
//! - `max_input_chars` counts Unicode scalar values (`char`s) over all input
//!   texts of the request together, before any redaction; more than
//!   `max_chars` is a hit. It applies to input only.
//!
//! # Streams
//!
//! For streamed responses (`"stream": true`) output rules are NOT applied to
//! the chunks in flight: chunks are forwarded as the upstream sends them, so
//! an output rule's `block` or `redact` cannot stop or change what was
//! already sent. What the engine offers for streams is
//! [`Guardrails::check_streamed_output`]: after the stream ends, the caller
//! passes the accumulated completion text and gets one [`Hit`] per
//! (rule, category) that matched, each with the rule's category, direction
//! `output`, and action [`GuardrailAction::Warned`] whatever the rule's
//! configured action, because the text was delivered as it was. Nothing is
//! blocked or redacted. Input rules apply to streamed requests exactly as to
//! non-streamed ones: the request is checked before it goes upstream.
//!
//! # Hits
//!
//! A check reports one [`Hit`] per (rule, category) that matched at least
//! once in that check, however many times and in however many messages,
//! parts or inputs it matched; hits are in configuration order (rules, then
//! a `pii` rule's categories in the order listed). A hit never carries the
//! matched text, only the rule, category, action and direction. When several
//! rules hit, all are reported; when any of them blocks,
//! [`Verdict::blocked_by`] names the first blocking rule in configuration
//! order.
//!
//! # Detection
//!
//! - `email`: ASCII `local@domain.tld`, with at least one dot in the domain
//!   and a top-level domain of two or more letters.
//! - `phone`: international numbers starting with `+` (7 to 15 digits in
//!   total, groups separated by single spaces, dots or dashes, area codes in
//!   parentheses allowed) and North American numbers `415-555-2671`,
//!   `415.555.2671`, `415 555 2671`, `(415) 555-2671`, optionally preceded by
//!   `1`. Unseparated 10-digit runs without `+` and 7-digit local numbers are
//!   not reported (too many other numbers look like them).
//! - `credit_card`: 13 to 19 digits, unbroken or in groups separated by single
//!   spaces or dashes, passing the Luhn check. Groups are never split: a
//!   25-digit run is not searched for a card inside it. (About one random
//!   digit run in ten passes Luhn; that is inherent to the check.)
//! - `us_ssn`: `AAA-GG-SSSS` with the never-issued ranges excluded (area
//!   000, 666 and 900–999, group 00, serial 0000).
//! - `ipv4`: dotted quads, each octet 0–255 without leading zeros.
//! - Numbers glued to letters, or continuing with `.digit` or `-digit`
//!   (`1.2.3.4.5`, `123-45-6789-0`, a decimal `0.4111111111111111`,
//!   `A4111111111111111`), are not reported as phone, SSN or IPv4, and such
//!   a glued digit group is never part of a card.
//! - A digit sequence that is a valid card number is never also reported as
//!   a phone number, whether or not `credit_card` is enabled, so the two
//!   categories never report the same digits.
//! - `blocklist`: each word (trimmed; inner whitespace matches any
//!   whitespace) matches as a whole word, case-insensitively: `secret`
//!   matches `the SECRET plan` but not `secretary` or `secrets`. Word
//!   boundaries are required only at ends that are word characters, so
//!   `c++` can be listed.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::ops::Range;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::events::model::{Direction, GuardrailAction, GuardrailViolation};

/// The `pii` categories, in the order they are listed in messages.
pub const PII_CATEGORIES: [&str; 5] = ["email", "phone", "credit_card", "us_ssn", "ipv4"];

/// `[guardrails]`: the rules, applied in this order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardrailsConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<GuardrailRule>,
}

/// `[[guardrails.rules]]`. Fields that do not apply to the rule's kind are
/// refused by [`GuardrailsConfig::validate`] rather than ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardrailRule {
    /// Unique; named in events and in the 400 answer of a blocked request.
    pub name: String,
    pub kind: RuleKind,
    /// `pii`: which categories to look for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// `regex`: the pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// `regex`: the category reported and used in `[REDACTED:…]`; `regex`
    /// when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// `blocklist`: words or phrases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub words: Vec<String>,
    /// `max_input_chars`: the most characters a request's texts may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_chars: Option<u64>,
    pub action: RuleAction,
    #[serde(default)]
    pub apply_to: ApplyTo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    Pii,
    Regex,
    Blocklist,
    MaxInputChars,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Pii => "pii",
            RuleKind::Regex => "regex",
            RuleKind::Blocklist => "blocklist",
            RuleKind::MaxInputChars => "max_input_chars",
        }
    }
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    Block,
    Warn,
    Redact,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyTo {
    #[default]
    Input,
    Output,
    Both,
}

impl ApplyTo {
    fn covers(self, direction: Direction) -> bool {
        matches!(
            (self, direction),
            (ApplyTo::Both, _)
                | (ApplyTo::Input, Direction::Input)
                | (ApplyTo::Output, Direction::Output)
        )
    }
}

impl GuardrailsConfig {
    /// Checks rules that parse but cannot work. Returns the dotted key
    /// (`guardrails.rules.N.field`) and what is wrong with it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let mut names = HashSet::new();
        for (index, rule) in self.rules.iter().enumerate() {
            let key = |field: &str| format!("guardrails.rules.{index}.{field}");
            if rule.name.trim().is_empty() {
                return Err((key("name"), "must not be empty".to_owned()));
            }
            if !names.insert(rule.name.as_str()) {
                return Err((
                    key("name"),
                    format!(
                        "rule `{}` is declared twice; names must be unique",
                        rule.name
                    ),
                ));
            }
            rule.validate()
                .map_err(|(field, message)| (key(field), message))?;
        }
        Ok(())
    }
}

impl GuardrailRule {
    /// The field at fault and why.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let kind = self.kind;
        for (field, set, owner) in [
            ("categories", !self.categories.is_empty(), RuleKind::Pii),
            ("pattern", self.pattern.is_some(), RuleKind::Regex),
            ("category", self.category.is_some(), RuleKind::Regex),
            ("words", !self.words.is_empty(), RuleKind::Blocklist),
            (
                "max_chars",
                self.max_chars.is_some(),
                RuleKind::MaxInputChars,
            ),
        ] {
            if set && kind != owner {
                return Err((
                    field,
                    format!("applies only to kind \"{owner}\"; this rule is kind \"{kind}\""),
                ));
            }
        }
        let known = PII_CATEGORIES.join(", ");
        match kind {
            RuleKind::Pii => {
                if self.categories.is_empty() {
                    return Err((
                        "categories",
                        format!(
                            "a pii rule needs at least one category; known categories: {known}"
                        ),
                    ));
                }
                let mut seen = HashSet::new();
                for category in &self.categories {
                    if !PII_CATEGORIES.contains(&category.as_str()) {
                        return Err((
                            "categories",
                            format!("unknown pii category `{category}`; known categories: {known}"),
                        ));
                    }
                    if !seen.insert(category.as_str()) {
                        return Err(("categories", format!("`{category}` is listed twice")));
                    }
                }
            }
            RuleKind::Regex => {
                let Some(pattern) = &self.pattern else {
                    return Err((
                        "pattern",
                        "required for kind \"regex\"; e.g. pattern = \"EMP-[0-9]{6}\"".to_owned(),
                    ));
                };
                if pattern.is_empty() {
                    return Err(("pattern", "must not be empty".to_owned()));
                }
                let regex = Regex::new(pattern).map_err(|e| {
                    (
                        "pattern",
                        format!("`{pattern}` is not a valid regular expression: {e}"),
                    )
                })?;
                if regex.is_match("") {
                    return Err((
                        "pattern",
                        format!(
                            "`{pattern}` matches the empty string, so it would match every text"
                        ),
                    ));
                }
                if let Some(category) = &self.category {
                    let valid = !category.is_empty()
                        && category
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if !valid {
                        return Err((
                            "category",
                            format!(
                                "`{category}` is not a category name; use letters, digits, `_` and `-` (e.g. \"employee_id\")"
                            ),
                        ));
                    }
                }
            }
            RuleKind::Blocklist => {
                if self.words.is_empty() {
                    return Err((
                        "words",
                        "a blocklist rule needs at least one word; e.g. words = [\"confidential\"]"
                            .to_owned(),
                    ));
                }
                if let Some(index) = self.words.iter().position(|w| w.trim().is_empty()) {
                    return Err((
                        "words",
                        format!("word {index} is empty; every word must have a character other than whitespace"),
                    ));
                }
                blocklist_regex(&self.words)
                    .map_err(|e| ("words", format!("the words cannot be compiled: {e}")))?;
            }
            RuleKind::MaxInputChars => {
                match self.max_chars {
                    None => {
                        return Err((
                            "max_chars",
                            "required for kind \"max_input_chars\"; e.g. max_chars = 100000"
                                .to_owned(),
                        ))
                    }
                    Some(0) => return Err(("max_chars", "must be at least 1".to_owned())),
                    Some(_) => {}
                }
                if self.action == RuleAction::Redact {
                    return Err((
                        "action",
                        "\"redact\" does not apply to kind \"max_input_chars\": there is no match to redact; use \"block\" or \"warn\"".to_owned(),
                    ));
                }
                if self.apply_to != ApplyTo::Input {
                    return Err((
                        "apply_to",
                        "kind \"max_input_chars\" checks only the request; apply_to must be \"input\""
                            .to_owned(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One rule that matched in one check. Never the matched text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// The rule's name.
    pub rule: String,
    /// `email`, `phone`, …, the regex rule's category, `blocklist` or
    /// `max_input_chars`.
    pub category: String,
    pub action: GuardrailAction,
    pub direction: Direction,
}

impl Hit {
    /// The `audit.guardrail_violation` payload for this hit.
    pub fn violation(&self, request_id: &str, key_id: Option<Uuid>) -> GuardrailViolation {
        GuardrailViolation {
            request_id: request_id.to_owned(),
            key_id,
            rule: self.rule.clone(),
            category: self.category.clone(),
            action: self.action,
            direction: self.direction,
        }
    }
}

/// The outcome of one check: every (rule, category) that matched, and the
/// first blocking rule, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    pub hits: Vec<Hit>,
    /// The name of the first rule, in configuration order, whose action is
    /// `block` and that matched. The caller must not send the request (or
    /// return the completion).
    pub blocked_by: Option<String>,
}

impl Verdict {
    pub fn is_blocked(&self) -> bool {
        self.blocked_by.is_some()
    }
}

/// Compiled rules, built once at start and on each reload.
#[derive(Debug, Clone, Default)]
pub struct Guardrails {
    rules: Vec<CompiledRule>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    name: String,
    action: RuleAction,
    apply_to: ApplyTo,
    matcher: Matcher,
}

#[derive(Debug, Clone)]
enum Matcher {
    /// One detector per category (several for `pii`, one otherwise).
    Detectors(Vec<Detector>),
    MaxInputChars(u64),
}

#[derive(Debug, Clone)]
struct Detector {
    category: String,
    /// `[REDACTED:CATEGORY]`.
    marker: String,
    finder: Finder,
}

#[derive(Debug, Clone)]
enum Finder {
    Email,
    Phone,
    CreditCard,
    UsSsn,
    Ipv4,
    Pattern(Regex),
}

impl Detector {
    fn new(category: &str, finder: Finder) -> Self {
        Self {
            category: category.to_owned(),
            marker: format!("[REDACTED:{}]", category.to_uppercase()),
            finder,
        }
    }

    fn find(&self, text: &str) -> Vec<Range<usize>> {
        match &self.finder {
            Finder::Email => EMAIL.find_iter(text).map(|m| m.range()).collect(),
            Finder::Phone => find_phones(text),
            Finder::CreditCard => find_cards(text),
            Finder::UsSsn => find_ssns(text),
            Finder::Ipv4 => IPV4
                .find_iter(text)
                .map(|m| m.range())
                .filter(|r| !glued(text, r))
                .collect(),
            Finder::Pattern(regex) => regex
                .find_iter(text)
                .map(|m| m.range())
                .filter(|r| !r.is_empty())
                .collect(),
        }
    }
}

/// (rule index, detector index) pairs that matched, in configuration order.
type Tally = BTreeSet<(usize, usize)>;

impl Guardrails {
    /// Validates and compiles the rules. The error is `key: message`.
    pub fn compile(config: &GuardrailsConfig) -> Result<Guardrails, String> {
        config
            .validate()
            .map_err(|(key, message)| format!("{key}: {message}"))?;
        let rules = config
            .rules
            .iter()
            .map(|rule| {
                let matcher = match rule.kind {
                    RuleKind::Pii => Matcher::Detectors(
                        rule.categories
                            .iter()
                            .map(|category| {
                                let finder = match category.as_str() {
                                    "email" => Finder::Email,
                                    "phone" => Finder::Phone,
                                    "credit_card" => Finder::CreditCard,
                                    "us_ssn" => Finder::UsSsn,
                                    _ => Finder::Ipv4,
                                };
                                Detector::new(category, finder)
                            })
                            .collect(),
                    ),
                    RuleKind::Regex => {
                        let pattern = rule.pattern.as_deref().unwrap_or_default();
                        let regex = Regex::new(pattern).map_err(|e| e.to_string())?;
                        let category = rule.category.as_deref().unwrap_or("regex");
                        Matcher::Detectors(vec![Detector::new(category, Finder::Pattern(regex))])
                    }
                    RuleKind::Blocklist => {
                        let regex = blocklist_regex(&rule.words).map_err(|e| e.to_string())?;
                        Matcher::Detectors(vec![Detector::new("blocklist", Finder::Pattern(regex))])
                    }
                    RuleKind::MaxInputChars => {
                        Matcher::MaxInputChars(rule.max_chars.unwrap_or(u64::MAX))
                    }
                };
                Ok(CompiledRule {
                    name: rule.name.clone(),
                    action: rule.action,
                    apply_to: rule.apply_to,
                    matcher,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Guardrails { rules })
    }

    /// No rules at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Some rule applies to requests.
    pub fn has_input_rules(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.apply_to.covers(Direction::Input))
    }

    /// Some rule applies to completions (worth accumulating a stream's text
    /// for [`Guardrails::check_streamed_output`]).
    pub fn has_output_rules(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.apply_to.covers(Direction::Output))
    }

    /// Checks a chat (`messages[].content`) or embeddings (`input`) request
    /// body with the input rules, redacting in place.
    pub fn check_input(&self, body: &mut Value) -> Verdict {
        let mut texts = input_texts(body);
        self.check(&mut texts, Direction::Input)
    }

    /// Checks a completion's text with the output rules, redacting in place.
    pub fn check_output(&self, text: &mut String) -> Verdict {
        self.check(&mut [text], Direction::Output)
    }

    /// Checks a non-streamed chat completion response
    /// (`choices[].message.content`) with the output rules, redacting in
    /// place.
    pub fn check_output_json(&self, response: &mut Value) -> Verdict {
        let mut texts = Vec::new();
        if let Some(Value::Array(choices)) = response.get_mut("choices") {
            for choice in choices {
                if let Some(content) = choice.get_mut("message").and_then(|m| m.get_mut("content"))
                {
                    content_texts(content, &mut texts);
                }
            }
        }
        self.check(&mut texts, Direction::Output)
    }

    /// For a streamed response, after the stream ended: the output rules'
    /// hits on the accumulated text, every one [`GuardrailAction::Warned`]
    /// (what was sent cannot be blocked or redacted any more). See the
    /// module documentation.
    pub fn check_streamed_output(&self, text: &str) -> Vec<Hit> {
        let mut tally = Tally::new();
        self.scan(text, Direction::Output, &mut tally, None);
        self.verdict(&tally, Direction::Output, true).hits
    }

    fn check(&self, texts: &mut [&mut String], direction: Direction) -> Verdict {
        let mut tally = Tally::new();
        if direction == Direction::Input {
            let total: u64 = texts.iter().map(|t| t.chars().count() as u64).sum();
            for (index, rule) in self.rules.iter().enumerate() {
                if let Matcher::MaxInputChars(max) = rule.matcher {
                    if rule.apply_to.covers(direction) && total > max {
                        tally.insert((index, 0));
                    }
                }
            }
        }
        for text in texts.iter_mut() {
            let mut spans = Vec::new();
            self.scan(text, direction, &mut tally, Some(&mut spans));
            if !spans.is_empty() {
                **text = redact(text, spans);
            }
        }
        self.verdict(&tally, direction, false)
    }

    /// Runs every applicable detector on `text`, recording matches in
    /// `tally` and, when `spans` is given, the ranges `redact` rules replace.
    fn scan<'a>(
        &'a self,
        text: &str,
        direction: Direction,
        tally: &mut Tally,
        mut spans: Option<&mut Vec<(Range<usize>, &'a str)>>,
    ) {
        for (rule_index, rule) in self.rules.iter().enumerate() {
            if !rule.apply_to.covers(direction) {
                continue;
            }
            let Matcher::Detectors(detectors) = &rule.matcher else {
                continue;
            };
            for (detector_index, detector) in detectors.iter().enumerate() {
                let found = detector.find(text);
                if found.is_empty() {
                    continue;
                }
                tally.insert((rule_index, detector_index));
                if rule.action == RuleAction::Redact {
                    if let Some(spans) = spans.as_deref_mut() {
                        spans.extend(found.into_iter().map(|r| (r, detector.marker.as_str())));
                    }
                }
            }
        }
    }

    fn verdict(&self, tally: &Tally, direction: Direction, warn_only: bool) -> Verdict {
        let mut verdict = Verdict::default();
        for &(rule_index, detector_index) in tally {
            let rule = &self.rules[rule_index];
            let category = match &rule.matcher {
                Matcher::Detectors(detectors) => detectors[detector_index].category.clone(),
                Matcher::MaxInputChars(_) => "max_input_chars".to_owned(),
            };
            let action = match (warn_only, rule.action) {
                (true, _) | (false, RuleAction::Warn) => GuardrailAction::Warned,
                (false, RuleAction::Block) => GuardrailAction::Blocked,
                (false, RuleAction::Redact) => GuardrailAction::Redacted,
            };
            if action == GuardrailAction::Blocked && verdict.blocked_by.is_none() {
                verdict.blocked_by = Some(rule.name.clone());
            }
            verdict.hits.push(Hit {
                rule: rule.name.clone(),
                category,
                action,
                direction,
            });
        }
        verdict
    }
}

/// The input texts of a chat or embeddings request body, mutably.
fn input_texts(body: &mut Value) -> Vec<&mut String> {
    let mut texts = Vec::new();
    let Value::Object(map) = body else {
        return texts;
    };
    for (key, value) in map.iter_mut() {
        match (key.as_str(), value) {
            ("messages", Value::Array(messages)) => {
                for message in messages {
                    if let Some(content) = message.get_mut("content") {
                        content_texts(content, &mut texts);
                    }
                }
            }
            ("input", Value::String(text)) => texts.push(text),
            ("input", Value::Array(items)) => {
                for item in items {
                    if let Value::String(text) = item {
                        texts.push(text);
                    }
                }
            }
            _ => {}
        }
    }
    texts
}

/// A message `content`: the string, or the `text` of each part.
fn content_texts<'a>(content: &'a mut Value, out: &mut Vec<&'a mut String>) {
    match content {
        Value::String(text) => out.push(text),
        Value::Array(parts) => {
            for part in parts {
                if let Some(Value::String(text)) = part.get_mut("text") {
                    out.push(text);
                }
            }
        }
        _ => {}
    }
}

/// `text` with every span replaced by its marker; overlapping spans merge
/// into one marker, the one of the span that starts first.
fn redact(text: &str, mut spans: Vec<(Range<usize>, &str)>) -> String {
    spans.sort_by(|a, b| a.0.start.cmp(&b.0.start).then(b.0.end.cmp(&a.0.end)));
    let mut merged: Vec<(Range<usize>, &str)> = Vec::with_capacity(spans.len());
    for (range, marker) in spans {
        match merged.last_mut() {
            Some((last, _)) if range.start < last.end => last.end = last.end.max(range.end),
            _ => merged.push((range, marker)),
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (range, marker) in merged {
        out.push_str(&text[at..range.start]);
        out.push_str(marker);
        at = range.end;
    }
    out.push_str(&text[at..]);
    out
}

/// One regex for a blocklist: each word whole, case-insensitive, longest
/// first so a phrase wins over a word it starts with.
fn blocklist_regex(words: &[String]) -> Result<Regex, regex::Error> {
    let mut words: Vec<&str> = words.iter().map(|w| w.trim()).collect();
    words.sort_by_key(|w| std::cmp::Reverse(w.chars().count()));
    let alternatives: Vec<String> = words
        .iter()
        .map(|word| {
            let start = if word.starts_with(is_word) { r"\b" } else { "" };
            let end = if word.ends_with(is_word) { r"\b" } else { "" };
            let body = word
                .split_whitespace()
                .map(regex::escape)
                .collect::<Vec<_>>()
                .join(r"\s+");
            format!("{start}{body}{end}")
        })
        .collect();
    Regex::new(&format!("(?i)(?:{})", alternatives.join("|")))
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\b",
    )
    .expect("email regex")
});

static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?x)
        # international: +country code, then groups of 1-4 digits
        \+[1-9][0-9]{0,2}(?:[\ .-]?(?:\([0-9]{1,4}\)|[0-9]{1,4})){2,6}\b
        # North American: [1 ](415) 555-2671, 415-555-2671, 415.555.2671, 415 555 2671
        | (?:\b1[\ .-]?)?(?:\([0-9]{3}\)[\ .-]?|\b[0-9]{3}[\ .-])[0-9]{3}[\ .-][0-9]{4}\b
        ",
    )
    .expect("phone regex")
});

/// Digits in groups separated by single spaces or dashes.
static DIGIT_RUN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[0-9]+(?:[ -][0-9]+)*").expect("digit run regex"));

static DIGIT_GROUP: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[0-9]+").expect("digit group regex"));

static SSN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b([0-9]{3})-([0-9]{2})-([0-9]{4})\b").expect("ssn regex"));

static IPV4: LazyLock<Regex> = LazyLock::new(|| {
    let octet = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
    Regex::new(&format!(r"\b{octet}(?:\.{octet}){{3}}\b")).expect("ipv4 regex")
});

/// Whether a match continues into its surroundings: a letter, digit or `_`
/// right before or after it, or `.`/`-` followed by a digit (`1.2.3.4.5`).
fn glued(text: &str, range: &Range<usize>) -> bool {
    glued_before(text, range.start) || glued_after(text, range.end)
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn glued_before(text: &str, start: usize) -> bool {
    let mut before = text[..start].chars().rev();
    match before.next() {
        Some(c) if is_word(c) => true,
        Some('.' | '-') => before.next().is_some_and(|c| c.is_ascii_digit()),
        _ => false,
    }
}

fn glued_after(text: &str, end: usize) -> bool {
    let mut after = text[end..].chars();
    match after.next() {
        Some(c) if is_word(c) => true,
        Some('.' | '-') => after.next().is_some_and(|c| c.is_ascii_digit()),
        _ => false,
    }
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Card numbers: within each run of digit groups, the leftmost, then
/// longest, sequence of whole groups with 13 to 19 digits passing Luhn.
fn find_cards(text: &str) -> Vec<Range<usize>> {
    let mut found = Vec::new();
    for run in DIGIT_RUN.find_iter(text) {
        // Only the run's outer edges can be glued to their surroundings;
        // inner groups are bounded by the run's own separators.
        let glued_start = glued_before(text, run.start());
        let glued_end = glued_after(text, run.end());
        let groups: Vec<(Range<usize>, Vec<u8>)> = DIGIT_GROUP
            .find_iter(run.as_str())
            .map(|g| {
                let range = run.start() + g.start()..run.start() + g.end();
                (range, g.as_str().bytes().map(|b| b - b'0').collect())
            })
            .collect();
        let mut first = usize::from(glued_start);
        while first < groups.len() {
            let mut digits: Vec<u8> = Vec::new();
            let mut best = None;
            for (last, (_, group)) in groups.iter().enumerate().skip(first) {
                digits.extend_from_slice(group);
                if digits.len() > 19 {
                    break;
                }
                let edge_glued = glued_end && last == groups.len() - 1;
                if digits.len() >= 13 && !edge_glued && luhn(&digits) {
                    best = Some(last);
                }
            }
            match best {
                Some(last) => {
                    found.push(groups[first].0.start..groups[last].0.end);
                    first = last + 1;
                }
                None => first += 1,
            }
        }
    }
    found
}

/// Phone numbers, excluding any that overlaps a valid card number.
fn find_phones(text: &str) -> Vec<Range<usize>> {
    let candidates: Vec<Range<usize>> = PHONE
        .find_iter(text)
        .filter(|m| (7..=15).contains(&m.as_str().bytes().filter(u8::is_ascii_digit).count()))
        .map(|m| m.range())
        .filter(|r| !glued(text, r))
        .collect();
    if candidates.is_empty() {
        return candidates;
    }
    let cards = find_cards(text);
    candidates
        .into_iter()
        .filter(|p| !cards.iter().any(|c| p.start < c.end && c.start < p.end))
        .collect()
}

/// `AAA-GG-SSSS` outside the never-issued ranges.
fn find_ssns(text: &str) -> Vec<Range<usize>> {
    SSN.captures_iter(text)
        .filter(|c| {
            let number = |i: usize| c[i].parse::<u32>().unwrap_or(0);
            let (area, group, serial) = (number(1), number(2), number(3));
            area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
        })
        .map(|c| c.get(0).expect("whole match").range())
        .filter(|r| !glued(text, r))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        guardrails: GuardrailsConfig,
    }

    fn parse(text: &str) -> Result<GuardrailsConfig, String> {
        toml::from_str::<File>(text)
            .map(|f| f.guardrails)
            .map_err(|e| e.to_string())
    }

    fn rule(kind: RuleKind, action: RuleAction) -> GuardrailRule {
        GuardrailRule {
            name: "r".to_owned(),
            kind,
            categories: Vec::new(),
            pattern: None,
            category: None,
            words: Vec::new(),
            max_chars: None,
            action,
            apply_to: ApplyTo::Input,
        }
    }

    fn pii(name: &str, categories: &[&str], action: RuleAction) -> GuardrailRule {
        GuardrailRule {
            name: name.to_owned(),
            categories: categories.iter().map(|c| c.to_string()).collect(),
            ..rule(RuleKind::Pii, action)
        }
    }

    fn engine(rules: Vec<GuardrailRule>) -> Guardrails {
        Guardrails::compile(&GuardrailsConfig { rules }).unwrap()
    }

    /// Whether one pii category's detector finds something in `text`.
    fn detects(category: &str, text: &str) -> bool {
        let g = engine(vec![pii("p", &[category], RuleAction::Warn)]);
        let mut text = text.to_owned();
        !g.check_input_text(&mut text).hits.is_empty()
    }

    fn redacted(categories: &[&str], text: &str) -> String {
        let g = engine(vec![pii("p", categories, RuleAction::Redact)]);
        let mut body = json!({"messages": [{"role": "user", "content": text}]});
        g.check_input(&mut body);
        body["messages"][0]["content"].as_str().unwrap().to_owned()
    }

    impl Guardrails {
        /// The input rules on one text.
        fn check_input_text(&self, text: &mut String) -> Verdict {
            self.check(&mut [text], Direction::Input)
        }
    }

    fn invalid(rule: GuardrailRule) -> (String, String) {
        GuardrailsConfig { rules: vec![rule] }
            .validate()
            .unwrap_err()
    }

    // ---- configuration ----

    #[test]
    fn the_design_documents_example_rule_parses_and_validates() {
        let config = parse(
            "[[guardrails.rules]]\nname = \"no-emails\"\nkind = \"pii\"\ncategories = [\"email\"]\naction = \"redact\"\napply_to = \"input\"\n",
        )
        .unwrap();
        assert_eq!(config.rules.len(), 1);
        let rule = &config.rules[0];
        assert_eq!(rule.kind, RuleKind::Pii);
        assert_eq!(rule.action, RuleAction::Redact);
        assert_eq!(rule.apply_to, ApplyTo::Input);
        config.validate().unwrap();
        Guardrails::compile(&config).unwrap();
    }

    #[test]
    fn apply_to_defaults_to_input_and_kinds_are_snake_case() {
        let config = parse(
            "[[guardrails.rules]]\nname = \"long\"\nkind = \"max_input_chars\"\nmax_chars = 10\naction = \"block\"\n",
        )
        .unwrap();
        assert_eq!(config.rules[0].apply_to, ApplyTo::Input);
        assert_eq!(config.rules[0].kind, RuleKind::MaxInputChars);
        assert_eq!(
            parse("[guardrails]\n").unwrap(),
            GuardrailsConfig::default()
        );
    }

    #[test]
    fn unknown_fields_kinds_and_actions_are_refused_when_parsing() {
        let base = "[[guardrails.rules]]\nname = \"x\"\nkind = \"regex\"\npattern = \"a\"\naction = \"warn\"\n";
        let err = parse(&format!("{base}patern = \"b\"\n")).unwrap_err();
        assert!(err.contains("unknown field `patern`"), "{err}");
        let err = parse(&base.replace("\"regex\"", "\"pi\"")).unwrap_err();
        assert!(err.contains("unknown variant `pi`"), "{err}");
        let err = parse(&base.replace("\"warn\"", "\"drop\"")).unwrap_err();
        assert!(err.contains("unknown variant `drop`"), "{err}");
        let err = parse("[guardrails]\nrule = []\n").unwrap_err();
        assert!(err.contains("unknown field `rule`"), "{err}");
    }

    #[test]
    fn configuration_round_trips_through_toml() {
        let config = GuardrailsConfig {
            rules: vec![
                pii("a", &["email", "phone"], RuleAction::Redact),
                GuardrailRule {
                    name: "b".to_owned(),
                    pattern: Some("EMP-[0-9]+".to_owned()),
                    category: Some("employee_id".to_owned()),
                    apply_to: ApplyTo::Both,
                    ..rule(RuleKind::Regex, RuleAction::Warn)
                },
            ],
        };
        #[derive(Serialize)]
        struct Out<'a> {
            guardrails: &'a GuardrailsConfig,
        }
        let text = toml::to_string(&Out {
            guardrails: &config,
        })
        .unwrap();
        assert_eq!(parse(&text).unwrap(), config, "{text}");
    }

    #[test]
    fn an_empty_rule_name_is_refused() {
        let (key, message) = invalid(GuardrailRule {
            name: " ".to_owned(),
            ..pii("x", &["email"], RuleAction::Warn)
        });
        assert_eq!(key, "guardrails.rules.0.name");
        assert!(message.contains("must not be empty"), "{message}");
    }

    #[test]
    fn a_duplicate_rule_name_is_refused_at_the_second_rule() {
        let (key, message) = GuardrailsConfig {
            rules: vec![
                pii("same", &["email"], RuleAction::Warn),
                pii("same", &["phone"], RuleAction::Warn),
            ],
        }
        .validate()
        .unwrap_err();
        assert_eq!(key, "guardrails.rules.1.name");
        assert!(message.contains("`same` is declared twice"), "{message}");
    }

    #[test]
    fn an_unknown_pii_category_is_refused_listing_the_known_ones() {
        let (key, message) = invalid(pii("p", &["email", "passport"], RuleAction::Warn));
        assert_eq!(key, "guardrails.rules.0.categories");
        assert!(
            message.contains("unknown pii category `passport`"),
            "{message}"
        );
        assert!(
            message.contains("email, phone, credit_card, us_ssn, ipv4"),
            "{message}"
        );
        let err = Guardrails::compile(&GuardrailsConfig {
            rules: vec![pii("p", &["passport"], RuleAction::Warn)],
        })
        .unwrap_err();
        assert!(
            err.starts_with("guardrails.rules.0.categories: unknown pii category"),
            "{err}"
        );
    }

    #[test]
    fn a_pii_rule_without_categories_or_with_a_repeated_one_is_refused() {
        let (key, message) = invalid(pii("p", &[], RuleAction::Warn));
        assert_eq!(key, "guardrails.rules.0.categories");
        assert!(message.contains("at least one category"), "{message}");
        assert!(message.contains("credit_card"), "{message}");
        let (key, message) = invalid(pii("p", &["email", "email"], RuleAction::Warn));
        assert_eq!(key, "guardrails.rules.0.categories");
        assert!(message.contains("listed twice"), "{message}");
    }

    #[test]
    fn a_bad_regex_is_refused_with_the_regex_error() {
        let (key, message) = invalid(GuardrailRule {
            pattern: Some("EMP-([0-9]+".to_owned()),
            ..rule(RuleKind::Regex, RuleAction::Block)
        });
        assert_eq!(key, "guardrails.rules.0.pattern");
        assert!(
            message.contains("not a valid regular expression"),
            "{message}"
        );
        assert!(message.contains("unclosed group"), "{message}");
    }

    #[test]
    fn a_regex_rule_without_a_pattern_or_with_an_empty_one_is_refused() {
        let (key, message) = invalid(rule(RuleKind::Regex, RuleAction::Block));
        assert_eq!(key, "guardrails.rules.0.pattern");
        assert!(message.contains("required"), "{message}");
        let (key, _) = invalid(GuardrailRule {
            pattern: Some(String::new()),
            ..rule(RuleKind::Regex, RuleAction::Block)
        });
        assert_eq!(key, "guardrails.rules.0.pattern");
    }

    #[test]
    fn a_regex_matching_the_empty_string_is_refused() {
        let (key, message) = invalid(GuardrailRule {
            pattern: Some("x*".to_owned()),
            ..rule(RuleKind::Regex, RuleAction::Block)
        });
        assert_eq!(key, "guardrails.rules.0.pattern");
        assert!(message.contains("matches the empty string"), "{message}");
    }

    #[test]
    fn a_regex_category_must_be_a_plain_name() {
        let (key, message) = invalid(GuardrailRule {
            pattern: Some("x".to_owned()),
            category: Some("employee id]".to_owned()),
            ..rule(RuleKind::Regex, RuleAction::Redact)
        });
        assert_eq!(key, "guardrails.rules.0.category");
        assert!(message.contains("not a category name"), "{message}");
    }

    #[test]
    fn a_blocklist_without_words_or_with_an_empty_word_is_refused() {
        let (key, message) = invalid(rule(RuleKind::Blocklist, RuleAction::Block));
        assert_eq!(key, "guardrails.rules.0.words");
        assert!(message.contains("at least one word"), "{message}");
        let (key, message) = invalid(GuardrailRule {
            words: vec!["secret".to_owned(), "  ".to_owned()],
            ..rule(RuleKind::Blocklist, RuleAction::Block)
        });
        assert_eq!(key, "guardrails.rules.0.words");
        assert!(message.contains("word 1 is empty"), "{message}");
    }

    #[test]
    fn max_input_chars_needs_a_positive_max_chars() {
        let (key, message) = invalid(rule(RuleKind::MaxInputChars, RuleAction::Block));
        assert_eq!(key, "guardrails.rules.0.max_chars");
        assert!(message.contains("required"), "{message}");
        let (key, message) = invalid(GuardrailRule {
            max_chars: Some(0),
            ..rule(RuleKind::MaxInputChars, RuleAction::Block)
        });
        assert_eq!(key, "guardrails.rules.0.max_chars");
        assert!(message.contains("at least 1"), "{message}");
    }

    #[test]
    fn max_input_chars_refuses_redact_and_output() {
        let limit = GuardrailRule {
            max_chars: Some(10),
            ..rule(RuleKind::MaxInputChars, RuleAction::Block)
        };
        let (key, message) = invalid(GuardrailRule {
            action: RuleAction::Redact,
            ..limit.clone()
        });
        assert_eq!(key, "guardrails.rules.0.action");
        assert!(message.contains("\"redact\" does not apply"), "{message}");
        for apply_to in [ApplyTo::Output, ApplyTo::Both] {
            let (key, message) = invalid(GuardrailRule {
                apply_to,
                ..limit.clone()
            });
            assert_eq!(key, "guardrails.rules.0.apply_to");
            assert!(message.contains("must be \"input\""), "{message}");
        }
    }

    #[test]
    fn fields_of_another_kind_are_refused() {
        let cases = [
            (
                GuardrailRule {
                    pattern: Some("x".to_owned()),
                    ..pii("p", &["email"], RuleAction::Warn)
                },
                "pattern",
                "applies only to kind \"regex\"; this rule is kind \"pii\"",
            ),
            (
                GuardrailRule {
                    category: Some("c".to_owned()),
                    ..pii("p", &["email"], RuleAction::Warn)
                },
                "category",
                "kind \"regex\"",
            ),
            (
                GuardrailRule {
                    pattern: Some("x".to_owned()),
                    words: vec!["w".to_owned()],
                    ..rule(RuleKind::Regex, RuleAction::Warn)
                },
                "words",
                "kind \"blocklist\"",
            ),
            (
                GuardrailRule {
                    max_chars: Some(5),
                    ..pii("p", &["email"], RuleAction::Warn)
                },
                "max_chars",
                "kind \"max_input_chars\"",
            ),
            (
                GuardrailRule {
                    categories: vec!["email".to_owned()],
                    words: vec!["w".to_owned()],
                    ..rule(RuleKind::Blocklist, RuleAction::Warn)
                },
                "categories",
                "kind \"pii\"; this rule is kind \"blocklist\"",
            ),
        ];
        for (rule, field, expected) in cases {
            let (key, message) = invalid(rule);
            assert_eq!(key, format!("guardrails.rules.0.{field}"));
            assert!(message.contains(expected), "{message}");
        }
    }

    // ---- detection: email ----

    #[test]
    fn emails_are_found() {
        for text in [
            "write to user@example.com today",
            "first.last+tag@sub.example.co.uk",
            "<ADMIN@EXAMPLE.ORG>",
        ] {
            assert!(detects("email", text), "{text}");
        }
        assert_eq!(
            redacted(&["email"], "mail first.last+tag@sub.example.co.uk, thanks."),
            "mail [REDACTED:EMAIL], thanks."
        );
    }

    #[test]
    fn things_that_only_look_like_emails_are_not() {
        for text in [
            "a@b",
            "@example.com",
            "user@",
            "user@example",
            "user@example.c",
            "ping @someone on chat",
        ] {
            assert!(!detects("email", text), "{text}");
        }
    }

    // ---- phone ----

    #[test]
    fn international_and_us_phone_numbers_are_found() {
        for text in [
            "call +1 415 555 2671 now",
            "call (415) 555-2671",
            "call 415-555-2671",
            "call 415.555.2671.",
            "call 1-800-555-0199",
            "London: +44 20 7946 0958",
            "E.164 +14155552671",
        ] {
            assert!(detects("phone", text), "{text}");
        }
        assert_eq!(
            redacted(&["phone"], "a (415) 555-2671 b +44 20 7946 0958 c"),
            "a [REDACTED:PHONE] b [REDACTED:PHONE] c"
        );
        assert_eq!(redacted(&["phone"], "+1 415 555 2671"), "[REDACTED:PHONE]");
    }

    #[test]
    fn short_numbers_years_and_other_digit_shapes_are_not_phones() {
        for text in [
            "the answer is 42",
            "in 2026",
            "on 2026-05-14 at 12:30",
            "4111 1111 1111 1111",
            "4111111111111111",
            "1234 5678 9012 3456",
            "192.168.100.200",
            "123-45-6789",
            "4155552671",
            "555-2671",
            "1+1 = 2",
            "v415-555-2671x",
        ] {
            assert!(!detects("phone", text), "{text}");
        }
    }

    // ---- credit_card ----

    #[test]
    fn luhn_valid_card_numbers_are_found_however_they_are_grouped() {
        for text in [
            "card 4111 1111 1111 1111 exp 12/29",
            "card 4111-1111-1111-1111",
            "card 4111111111111111",
            "amex 3782 822463 10005",
            "5555555555554444",
            "visa 4222222222222",
            "ref12 4111 1111 1111 1111",
        ] {
            assert!(detects("credit_card", text), "{text}");
        }
        assert_eq!(
            redacted(&["credit_card"], "pay with 4111 1111 1111 1111 please"),
            "pay with [REDACTED:CREDIT_CARD] please"
        );
    }

    #[test]
    fn a_sixteen_digit_number_failing_luhn_is_not_a_card() {
        assert!(!luhn(&[4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]));
        assert!(!detects("credit_card", "4111 1111 1111 1112"));
        let random = "8273645501928374";
        let digits: Vec<u8> = random.bytes().map(|b| b - b'0').collect();
        assert!(!luhn(&digits));
        assert!(!detects("credit_card", random));
    }

    #[test]
    fn digit_runs_too_short_too_long_or_oddly_separated_are_not_cards() {
        // 12 digits passing Luhn.
        assert!(luhn(&[4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 7]));
        assert!(!detects("credit_card", "411111111117"));
        // 25 digits: a group is never split to find a card inside it.
        assert!(!detects("credit_card", "4111111111111111000000000"));
        // Double separators break the run.
        assert!(!detects("credit_card", "4111  1111  1111  1111"));
        // A decimal is not a card.
        assert!(!detects("credit_card", "pi is 0.4111111111111111"));
        assert!(!detects("credit_card", "order id A4111111111111111"));
    }

    #[test]
    fn a_card_inside_a_longer_run_of_groups_is_found_on_group_boundaries() {
        assert_eq!(
            redacted(&["credit_card"], "4111 1111 1111 1111 2026"),
            "[REDACTED:CREDIT_CARD] 2026"
        );
    }

    #[test]
    fn a_card_number_is_never_also_reported_as_a_phone() {
        let g = engine(vec![pii("p", &["phone", "credit_card"], RuleAction::Warn)]);
        for card in [
            "4111 1111 1111 1111",
            "+4111111111111111",
            "4 415-555-2671 00000",
        ] {
            let mut text = format!("card {card}");
            let hits = g.check_input_text(&mut text).hits;
            let categories: Vec<&str> = hits.iter().map(|h| h.category.as_str()).collect();
            assert_eq!(categories, ["credit_card"], "{card}");
        }
        // Also with the two categories in separate rules, and phone alone.
        let g = engine(vec![
            pii("cards", &["credit_card"], RuleAction::Redact),
            pii("phones", &["phone"], RuleAction::Redact),
        ]);
        let mut body = json!({"input": "4 415-555-2671 00000 and 415-555-2671"});
        let verdict = g.check_input(&mut body);
        assert_eq!(body["input"], "[REDACTED:CREDIT_CARD] and [REDACTED:PHONE]");
        assert_eq!(verdict.hits.len(), 2);
        assert!(!detects("phone", "4 415-555-2671 00000"));
    }

    // ---- us_ssn ----

    #[test]
    fn valid_ssns_are_found() {
        for text in [
            "ssn 123-45-6789",
            "078-05-1120",
            "899-99-9999",
            "665-01-0001",
        ] {
            assert!(detects("us_ssn", text), "{text}");
        }
        assert_eq!(
            redacted(&["us_ssn"], "SSN: 123-45-6789."),
            "SSN: [REDACTED:US_SSN]."
        );
    }

    #[test]
    fn never_issued_ssn_ranges_and_other_shapes_are_not_ssns() {
        for text in [
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "999-12-3456",
            "123-00-4567",
            "123-45-0000",
            "123456789",
            "123 45 6789",
            "123-45-67890",
            "1123-45-6789",
            "123-45-6789-1",
        ] {
            assert!(!detects("us_ssn", text), "{text}");
        }
    }

    // ---- ipv4 ----

    #[test]
    fn dotted_quads_with_octets_up_to_255_are_ipv4() {
        for text in [
            "host 192.168.1.10",
            "0.0.0.0",
            "255.255.255.255",
            "10.0.0.1:8080",
            "net 10.1.2.0/24",
        ] {
            assert!(detects("ipv4", text), "{text}");
        }
        assert_eq!(
            redacted(&["ipv4"], "from 10.0.0.1, to 10.0.0.2."),
            "from [REDACTED:IPV4], to [REDACTED:IPV4]."
        );
    }

    #[test]
    fn out_of_range_short_or_long_quads_are_not_ipv4() {
        for text in [
            "256.1.1.1",
            "1.2.3",
            "1.2.3.4.5",
            "192.168.1.300",
            "01.02.03.04",
            "version 1.2.3.4a",
        ] {
            assert!(!detects("ipv4", text), "{text}");
        }
    }

    // ---- blocklist and regex ----

    fn blocklist(words: &[&str], action: RuleAction) -> GuardrailRule {
        GuardrailRule {
            name: "words".to_owned(),
            words: words.iter().map(|w| w.to_string()).collect(),
            ..rule(RuleKind::Blocklist, action)
        }
    }

    #[test]
    fn blocklist_words_match_whole_words_case_insensitively() {
        let g = engine(vec![blocklist(&["Secret"], RuleAction::Block)]);
        let check = |text: &str| {
            let mut body = json!({"input": text});
            g.check_input(&mut body)
        };
        let verdict = check("the SECRET plan");
        assert_eq!(verdict.blocked_by.as_deref(), Some("words"));
        assert_eq!(verdict.hits[0].category, "blocklist");
        assert!(check("Secret.").is_blocked());
        for text in ["my secretary", "secrets", "topsecret", "secret_key"] {
            assert!(!check(text).is_blocked(), "{text}");
        }
    }

    #[test]
    fn blocklist_words_are_literal_and_phrases_match_any_whitespace() {
        let g = engine(vec![blocklist(
            &["c++", "a.b", " top secret ", "top"],
            RuleAction::Redact,
        )]);
        let mut body = json!({"input": "C++ and axb and a.b, TOP\n secret and top"});
        g.check_input(&mut body);
        assert_eq!(
            body["input"],
            "[REDACTED:BLOCKLIST] and axb and [REDACTED:BLOCKLIST], [REDACTED:BLOCKLIST] and [REDACTED:BLOCKLIST]"
        );
    }

    #[test]
    fn a_regex_rule_uses_the_pattern_as_written_and_its_category() {
        let g = engine(vec![GuardrailRule {
            name: "employee-ids".to_owned(),
            pattern: Some("EMP-[0-9]{6}".to_owned()),
            category: Some("employee_id".to_owned()),
            ..rule(RuleKind::Regex, RuleAction::Redact)
        }]);
        let mut body = json!({"input": ["id EMP-123456", "emp-123456 EMP-12345"]});
        let verdict = g.check_input(&mut body);
        assert_eq!(
            body["input"],
            json!(["id [REDACTED:EMPLOYEE_ID]", "emp-123456 EMP-12345"])
        );
        assert_eq!(verdict.hits[0].category, "employee_id");
        let g = engine(vec![GuardrailRule {
            pattern: Some("(?i)project x".to_owned()),
            ..rule(RuleKind::Regex, RuleAction::Redact)
        }]);
        let mut text = "about PROJECT X".to_owned();
        let verdict = g.check_input_text(&mut text);
        assert_eq!(text, "about [REDACTED:REGEX]");
        assert_eq!(verdict.hits[0].category, "regex");
    }

    // ---- max_input_chars ----

    fn limit(max: u64, action: RuleAction) -> GuardrailRule {
        GuardrailRule {
            name: "limit".to_owned(),
            max_chars: Some(max),
            ..rule(RuleKind::MaxInputChars, action)
        }
    }

    #[test]
    fn max_input_chars_counts_characters_of_all_input_texts() {
        let g = engine(vec![limit(10, RuleAction::Block)]);
        // 5 + 5 = 10: not more than the limit.
        let mut body = json!({"messages": [
            {"role": "system", "content": "abcde"},
            {"role": "user", "content": [{"type": "text", "text": "éééé€"}]}
        ]});
        assert_eq!(g.check_input(&mut body), Verdict::default());
        // One more character, in another part.
        let mut body = json!({"messages": [
            {"role": "system", "content": "abcde"},
            {"role": "user", "content": [
                {"type": "text", "text": "éééé€"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a-very-long-url"}},
                {"type": "text", "text": "x"}
            ]}
        ]});
        let verdict = g.check_input(&mut body);
        assert_eq!(verdict.blocked_by.as_deref(), Some("limit"));
        assert_eq!(
            verdict.hits,
            [Hit {
                rule: "limit".to_owned(),
                category: "max_input_chars".to_owned(),
                action: GuardrailAction::Blocked,
                direction: Direction::Input,
            }]
        );
        let g = engine(vec![limit(3, RuleAction::Warn)]);
        let mut body = json!({"input": ["ab", "cd"]});
        let verdict = g.check_input(&mut body);
        assert!(!verdict.is_blocked());
        assert_eq!(verdict.hits[0].action, GuardrailAction::Warned);
        assert_eq!(body, json!({"input": ["ab", "cd"]}));
    }

    // ---- semantics ----

    #[test]
    fn redact_replaces_every_match_in_every_message_part_and_input() {
        let g = engine(vec![pii("no-emails", &["email"], RuleAction::Redact)]);
        let mut body = json!({"model": "m", "messages": [
            {"role": "system", "content": "a@example.com and b@example.com"},
            {"role": "user", "content": [
                {"type": "text", "text": "c@example.com"},
                {"type": "image_url", "image_url": {"url": "https://x.example.com/u@example.com.png"}}
            ]}
        ]});
        let verdict = g.check_input(&mut body);
        assert_eq!(
            body["messages"][0]["content"],
            "[REDACTED:EMAIL] and [REDACTED:EMAIL]"
        );
        assert_eq!(
            body["messages"][1]["content"][0]["text"],
            "[REDACTED:EMAIL]"
        );
        assert_eq!(
            body["messages"][1]["content"][1]["image_url"]["url"],
            "https://x.example.com/u@example.com.png"
        );
        assert_eq!(body["model"], "m");
        // One hit for the rule and category, not one per occurrence.
        assert_eq!(
            verdict,
            Verdict {
                hits: vec![Hit {
                    rule: "no-emails".to_owned(),
                    category: "email".to_owned(),
                    action: GuardrailAction::Redacted,
                    direction: Direction::Input,
                }],
                blocked_by: None,
            }
        );
        let mut body = json!({"input": ["x@example.com", "none", 7]});
        g.check_input(&mut body);
        assert_eq!(body["input"], json!(["[REDACTED:EMAIL]", "none", 7]));
    }

    #[test]
    fn warn_records_a_hit_and_leaves_the_text_unchanged() {
        let g = engine(vec![pii("w", &["email", "ipv4"], RuleAction::Warn)]);
        let original =
            json!({"messages": [{"role": "user", "content": "me@example.com on 10.0.0.1"}]});
        let mut body = original.clone();
        let verdict = g.check_input(&mut body);
        assert_eq!(body, original);
        assert!(!verdict.is_blocked());
        let got: Vec<(&str, GuardrailAction)> = verdict
            .hits
            .iter()
            .map(|h| (h.category.as_str(), h.action))
            .collect();
        assert_eq!(
            got,
            [
                ("email", GuardrailAction::Warned),
                ("ipv4", GuardrailAction::Warned)
            ]
        );
    }

    #[test]
    fn every_hit_is_reported_and_the_first_blocking_rule_in_config_order_blocks() {
        let g = engine(vec![
            pii("redact-email", &["email"], RuleAction::Redact),
            pii("warn-ip", &["ipv4"], RuleAction::Warn),
            blocklist(&["confidential"], RuleAction::Block),
            GuardrailRule {
                name: "block-domain".to_owned(),
                pattern: Some("example\\.com".to_owned()),
                ..rule(RuleKind::Regex, RuleAction::Block)
            },
            pii("unused", &["us_ssn"], RuleAction::Block),
        ]);
        let mut body = json!({"messages": [
            {"role": "user", "content": "confidential: me@example.com from 10.0.0.1"}
        ]});
        let verdict = g.check_input(&mut body);
        assert_eq!(verdict.blocked_by.as_deref(), Some("words"));
        let got: Vec<(&str, &str, GuardrailAction)> = verdict
            .hits
            .iter()
            .map(|h| (h.rule.as_str(), h.category.as_str(), h.action))
            .collect();
        // The regex still sees the address the email rule redacts.
        assert_eq!(
            got,
            [
                ("redact-email", "email", GuardrailAction::Redacted),
                ("warn-ip", "ipv4", GuardrailAction::Warned),
                ("words", "blocklist", GuardrailAction::Blocked),
                ("block-domain", "regex", GuardrailAction::Blocked),
            ]
        );
    }

    #[test]
    fn overlapping_redactions_merge_into_one_marker() {
        let g = engine(vec![
            pii("emails", &["email"], RuleAction::Redact),
            GuardrailRule {
                name: "domains".to_owned(),
                pattern: Some("example\\.com and".to_owned()),
                category: Some("domain".to_owned()),
                ..rule(RuleKind::Regex, RuleAction::Redact)
            },
        ]);
        let mut text = "to me@example.com and you".to_owned();
        let verdict = g.check_input_text(&mut text);
        assert_eq!(text, "to [REDACTED:EMAIL] you");
        assert_eq!(verdict.hits.len(), 2);
    }

    #[test]
    fn hits_never_carry_the_matched_text() {
        let g = engine(vec![
            pii(
                "all",
                &["email", "phone", "credit_card", "us_ssn", "ipv4"],
                RuleAction::Warn,
            ),
            blocklist(&["hunter2"], RuleAction::Block),
        ]);
        let secrets = [
            "me@example.com",
            "415-555-2671",
            "4111 1111 1111 1111",
            "123-45-6789",
            "10.0.0.1",
            "hunter2",
        ];
        let mut body = json!({"input": secrets.join(" ; ")});
        let verdict = g.check_input(&mut body);
        assert_eq!(verdict.hits.len(), 6);
        let shown = format!("{verdict:?}");
        for hit in &verdict.hits {
            let event = serde_json::to_string(&hit.violation("req-1", None)).unwrap();
            for secret in secrets {
                assert!(!event.contains(secret), "{event}");
            }
        }
        for secret in secrets {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn a_hit_becomes_an_audit_event_payload() {
        let key = Uuid::new_v4();
        let hit = Hit {
            rule: "no-emails".to_owned(),
            category: "email".to_owned(),
            action: GuardrailAction::Redacted,
            direction: Direction::Input,
        };
        assert_eq!(
            serde_json::to_value(hit.violation("req-1", Some(key))).unwrap(),
            json!({"request_id": "req-1", "key_id": key, "rule": "no-emails",
                   "category": "email", "action": "redacted", "direction": "input"})
        );
    }

    #[test]
    fn apply_to_selects_the_direction() {
        let g = engine(vec![
            GuardrailRule {
                apply_to: ApplyTo::Input,
                ..pii("in", &["email"], RuleAction::Redact)
            },
            GuardrailRule {
                apply_to: ApplyTo::Output,
                ..pii("out", &["ipv4"], RuleAction::Redact)
            },
            GuardrailRule {
                apply_to: ApplyTo::Both,
                ..blocklist(&["secret"], RuleAction::Warn)
            },
        ]);
        assert!(g.has_input_rules() && g.has_output_rules());
        let text = "me@example.com 10.0.0.1 secret";
        let mut body = json!({"input": text});
        let verdict = g.check_input(&mut body);
        assert_eq!(body["input"], "[REDACTED:EMAIL] 10.0.0.1 secret");
        let rules: Vec<&str> = verdict.hits.iter().map(|h| h.rule.as_str()).collect();
        assert_eq!(rules, ["in", "words"]);
        let mut out = text.to_owned();
        let verdict = g.check_output(&mut out);
        assert_eq!(out, "me@example.com [REDACTED:IPV4] secret");
        let rules: Vec<&str> = verdict.hits.iter().map(|h| h.rule.as_str()).collect();
        assert_eq!(rules, ["out", "words"]);
        assert!(verdict
            .hits
            .iter()
            .all(|h| h.direction == Direction::Output));
        let only_input = engine(vec![pii("in", &["email"], RuleAction::Block)]);
        assert!(!only_input.has_output_rules());
        assert!(Guardrails::default().is_empty());
    }

    #[test]
    fn output_checks_redact_and_block_a_non_streamed_chat_response() {
        let g = engine(vec![
            GuardrailRule {
                apply_to: ApplyTo::Output,
                ..pii("out-cards", &["credit_card"], RuleAction::Redact)
            },
            GuardrailRule {
                apply_to: ApplyTo::Output,
                ..blocklist(&["forbidden"], RuleAction::Block)
            },
        ]);
        let mut response = json!({"id": "c1", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "use 4111 1111 1111 1111"}},
            {"index": 1, "message": {"role": "assistant", "content": [{"type": "text", "text": "or 5555555555554444"}]}}
        ], "usage": {"prompt_tokens": 1}});
        let verdict = g.check_output_json(&mut response);
        assert_eq!(
            response["choices"][0]["message"]["content"],
            "use [REDACTED:CREDIT_CARD]"
        );
        assert_eq!(
            response["choices"][1]["message"]["content"][0]["text"],
            "or [REDACTED:CREDIT_CARD]"
        );
        assert_eq!(verdict.hits.len(), 1);
        assert_eq!(verdict.hits[0].direction, Direction::Output);
        let mut response = json!({"choices": [{"message": {"content": "this is Forbidden"}}]});
        let verdict = g.check_output_json(&mut response);
        assert_eq!(verdict.blocked_by.as_deref(), Some("words"));
        assert_eq!(verdict.hits[0].action, GuardrailAction::Blocked);
    }

    #[test]
    fn streamed_output_hits_are_all_warned_and_nothing_blocks() {
        let g = engine(vec![
            GuardrailRule {
                apply_to: ApplyTo::Output,
                ..pii("out-emails", &["email"], RuleAction::Redact)
            },
            GuardrailRule {
                apply_to: ApplyTo::Both,
                ..blocklist(&["forbidden"], RuleAction::Block)
            },
            pii("input-only", &["ipv4"], RuleAction::Block),
        ]);
        let hits = g.check_streamed_output("forbidden: me@example.com at 10.0.0.1, me@example.com");
        assert_eq!(
            hits,
            [
                Hit {
                    rule: "out-emails".to_owned(),
                    category: "email".to_owned(),
                    action: GuardrailAction::Warned,
                    direction: Direction::Output,
                },
                Hit {
                    rule: "words".to_owned(),
                    category: "blocklist".to_owned(),
                    action: GuardrailAction::Warned,
                    direction: Direction::Output,
                },
            ]
        );
        assert!(g.check_streamed_output("nothing here").is_empty());
    }

    #[test]
    fn bodies_without_texts_are_left_alone() {
        let g = engine(vec![pii("p", &["email"], RuleAction::Block)]);
        for mut body in [
            json!({"input": [[1, 2, 3]]}),
            json!({"messages": [{"role": "assistant", "content": null}]}),
            json!("a@example.com"),
            json!({"prompt": "a@example.com"}),
        ] {
            let before = body.clone();
            assert_eq!(g.check_input(&mut body), Verdict::default());
            assert_eq!(body, before);
        }
    }
}

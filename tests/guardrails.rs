//! Guardrails end to end, through the real gateway on 127.0.0.1:0 and a
//! real OpenAI-compatible upstream started by each test
//! (`support/upstream.rs`), which records every request it receives:
//!
//! - each kind (`pii`, `regex`, `blocklist`, `max_input_chars`) and action
//!   (`block`, `warn`, `redact`), judged by what the upstream received and
//!   what the client got;
//! - each PII category and its near-misses (a 16-digit number failing Luhn,
//!   SSN area 000, an octet of 256, …);
//! - output rules on non-streamed responses (redacted, blocked with the
//!   usage still in the ledger) and on streams (checked after the end, so
//!   the text is delivered as it was and the hit is a warning);
//! - every hit is exactly one `audit.guardrail_violation`, seen by an admin
//!   WebSocket subscriber and kept in the audit log, and nothing that was
//!   matched appears in any event, audit row or error message;
//! - invalid rules are configuration errors at start and at reload (the
//!   real binary, SIGHUP), where the old rules stay in force.

#[path = "support/stream_client.rs"]
mod stream_client;
mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::net::SocketAddr;

use futures::StreamExt;
use serde_json::{json, Value};
use stream_client::WsClient;
use support::{TestServer, Workspace, DEADLINE};
use tokio_tungstenite::tungstenite::Message;
use tollgate::config::{Config, ModelConfig, ProviderConfig};
use tollgate::guardrails::GuardrailsConfig;
use upstream::{completion, content_chunk, usage_chunk, Reply, Step, Upstream};
use uuid::Uuid;

const CHAT: &str = "/v1/chat/completions";
const EMBEDDINGS: &str = "/v1/embeddings";
/// The reply of the upstream when a test scripted nothing else.
const DEFAULT_REPLY: &str = "Hello from upstream";

// ---------------------------------------------------------------- setup

/// The `[guardrails]` section of a configuration file, parsed and
/// validated the way `tollgate serve` does it.
fn guardrails_from_toml(text: &str) -> GuardrailsConfig {
    tollgate::config::parse(text, None, &|_| None)
        .unwrap_or_else(|e| panic!("the test's rules are valid: {e}"))
        .guardrails
}

/// The gateway with provider `up` (type openai) at the test's upstream and
/// model `gpt-test` → `upstream-model-x` at $1 / $2 per million tokens, a
/// non-admin key, and an admin WebSocket subscriber to guardrail and
/// request audit events.
struct Gateway {
    server: TestServer,
    upstream: Upstream,
    key: String,
    key_id: Uuid,
    events: WsClient,
}

async fn gateway(rules: &str) -> Gateway {
    gateway_with(rules, |_| {}).await
}

async fn gateway_with(rules: &str, configure: impl FnOnce(&mut Config) + Send) -> Gateway {
    let guardrails = guardrails_from_toml(rules);
    let upstream = Upstream::start().await;
    upstream.set_fallback(Reply::Json(200, completion(DEFAULT_REPLY, 9, 3)));
    let base_url = upstream.base_url();
    let server = TestServer::start(move |config| {
        let provider: ProviderConfig = serde_json::from_value(json!({
            "type": "openai", "base_url": base_url, "api_key": "sk-upstream",
            "connect_timeout_secs": 2, "timeout_secs": 10,
        }))
        .expect("a valid provider");
        config.providers.insert("up".into(), provider);
        let model: ModelConfig = serde_json::from_value(json!({
            "name": "gpt-test", "provider": "up", "upstream_model": "upstream-model-x",
            "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0,
        }))
        .expect("a valid model");
        config.models.push(model);
        config.guardrails = guardrails;
        configure(config);
    })
    .await;
    let (record, secret) = tollgate::auth::issue_api_key(&server.state.store, "app", false, None)
        .await
        .expect("create a key");
    let (events, _) = WsClient::open(
        server.addr,
        &format!(
            "token={}&types=audit.guardrail_violation,audit.request",
            server.admin_key
        ),
        None,
    )
    .await;
    Gateway {
        server,
        upstream,
        key: secret.expose().to_owned(),
        key_id: record.id,
        events,
    }
}

/// A client's answer: status, `x-request-id`, and the body as sent.
#[derive(Debug)]
struct Answer {
    status: u16,
    request_id: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts the 400 `guardrail_violation` answer with exactly `message`.
    fn assert_blocked(&self, message: &str) {
        assert_eq!(self.status, 400, "{}", self.body);
        assert_eq!(
            self.json(),
            json!({"error": {"type": "invalid_request_error", "code": "guardrail_violation",
                "message": message}}),
        );
    }

    /// The text of a non-streamed chat completion.
    fn content(&self) -> String {
        assert_eq!(self.status, 200, "{}", self.body);
        self.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_else(|| panic!("no content: {}", self.body))
            .to_owned()
    }
}

async fn post(addr: SocketAddr, key: &str, path: &str, body: &Value) -> Answer {
    let request = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .bearer_auth(key)
        .json(body);
    let response = tokio::time::timeout(DEADLINE, request.send())
        .await
        .expect("the gateway answers in time")
        .expect("the gateway answers");
    let status = response.status().as_u16();
    let request_id = response
        .headers()
        .get("x-request-id")
        .expect("every answer has x-request-id")
        .to_str()
        .unwrap()
        .to_owned();
    let body = tokio::time::timeout(DEADLINE, response.text())
        .await
        .expect("the body arrives in time")
        .expect("the body reads");
    Answer {
        status,
        request_id,
        body,
    }
}

fn user(content: &str) -> Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": content}]})
}

impl Gateway {
    async fn chat(&self, content: &str) -> Answer {
        self.send(CHAT, &user(content)).await
    }

    async fn send(&self, path: &str, body: &Value) -> Answer {
        post(self.server.addr, &self.key, path, body).await
    }

    /// The requests the upstream received so far.
    fn received(&self) -> usize {
        self.upstream.requests().len()
    }

    /// The body of the upstream's last request.
    fn last_upstream_body(&self) -> Value {
        self.upstream
            .requests()
            .last()
            .expect("the upstream received a request")
            .body
            .clone()
    }

    /// The content of the first message of the upstream's last request.
    fn last_upstream_content(&self) -> Value {
        self.last_upstream_body()["messages"][0]["content"].clone()
    }

    /// Asserts that `answer`'s request produced exactly `expected`
    /// guardrail events — `(rule, category, action, direction)` in this
    /// order — on the WebSocket and in the audit log, each with the
    /// request's id and the key's id, and that none of `secrets` is in any
    /// frame, in the audit log, or in the answer. Every request of a test
    /// goes through here, in order: the frames read are those published
    /// up to the request's `audit.request`, which follows its violations.
    async fn expect_violations(
        &mut self,
        answer: &Answer,
        expected: &[(&str, &str, &str, &str)],
        secrets: &[&str],
    ) -> Value {
        let want: Vec<Value> = expected
            .iter()
            .map(|(rule, category, action, direction)| {
                json!({"request_id": answer.request_id, "key_id": self.key_id, "rule": rule,
                    "category": category, "action": action, "direction": direction})
            })
            .collect();
        // The WebSocket: this request's violations, then its audit.request.
        let mut seen = Vec::new();
        let audit_request = loop {
            let (raw, frame) = next_frame(&mut self.events).await;
            assert_no_secret("an event frame", &raw, secrets);
            assert_eq!(
                frame["payload"]["request_id"], answer.request_id,
                "a frame of another request (or a duplicate) arrived: {raw}"
            );
            match frame["type"].as_str() {
                Some("audit.guardrail_violation") => {
                    assert_eq!(frame["topic"], "audit", "{raw}");
                    seen.push(frame["payload"].clone());
                }
                Some("audit.request") => break frame,
                _ => panic!("an unexpected frame: {raw}"),
            }
        };
        assert_eq!(
            seen, want,
            "the guardrail events of request {}",
            answer.request_id
        );
        // The audit log: kept, with the same payloads (the WebSocket event
        // is published after the commit, so the rows are there).
        let raw = self
            .admin_get("/admin/v1/audit?type=audit.guardrail_violation&limit=1000")
            .await;
        assert_no_secret("the guardrail audit log", &raw, secrets);
        let log: Value = serde_json::from_str(&raw).unwrap();
        let mut rows: Vec<&Value> = log["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|row| row["request_id"] == answer.request_id)
            .collect();
        rows.reverse(); // newest first → in order of writing
        for row in &rows {
            assert_eq!(row["type"], "audit.guardrail_violation", "{row}");
            assert_eq!(row["key_id"], json!(self.key_id), "{row}");
        }
        let kept: Vec<Value> = rows.iter().map(|row| row["payload"].clone()).collect();
        assert_eq!(kept, want, "the audit log of request {}", answer.request_id);
        let all = self.admin_get("/admin/v1/audit?limit=1000").await;
        assert_no_secret("the audit log", &all, secrets);
        assert_no_secret("the answer", &answer.body, secrets);
        audit_request
    }

    async fn admin_get(&self, path: &str) -> String {
        let response = reqwest::Client::new()
            .get(self.server.url(path))
            .bearer_auth(&self.server.admin_key)
            .send()
            .await
            .expect("the admin API answers");
        assert_eq!(response.status(), 200, "{path}");
        response.text().await.unwrap()
    }
}

/// The next text frame, raw and parsed.
async fn next_frame(client: &mut WsClient) -> (String, Value) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let message = tokio::time::timeout_at(deadline, client.ws.next())
            .await
            .unwrap_or_else(|_| panic!("no event frame within {DEADLINE:?}"))
            .expect("the event stream is open")
            .expect("the event stream reads");
        match message {
            Message::Text(text) => {
                let raw = text.to_string();
                let value =
                    serde_json::from_str(&raw).unwrap_or_else(|e| panic!("not JSON ({e}): {raw}"));
                return (raw, value);
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("an unexpected message: {other:?}"),
        }
    }
}

/// Case-insensitively, so an upper-cased blocklist word counts too.
fn assert_no_secret(what: &str, text: &str, secrets: &[&str]) {
    let lower = text.to_lowercase();
    for secret in secrets {
        assert!(
            !lower.contains(&secret.to_lowercase()),
            "{what} contains `{secret}`: {text}"
        );
    }
}

/// The text of the content deltas of a `text/event-stream` body.
fn streamed_text(body: &str) -> String {
    body.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .filter_map(|data| {
            let value: Value =
                serde_json::from_str(data).unwrap_or_else(|e| panic!("not JSON ({e}): {data}"));
            value["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

fn blocked_request(rule: &str) -> String {
    format!("the request was blocked by the guardrail rule `{rule}`")
}

// ---------------------------------------------------------------- kinds and actions

#[tokio::test]
async fn pii_redact_replaces_emails_before_the_upstream_sees_them_and_the_client_gets_200() {
    let mut gw = gateway(
        r#"
[[guardrails.rules]]
name = "no-emails"
kind = "pii"
categories = ["email"]
action = "redact"
"#,
    )
    .await;
    let secrets = ["alice.smith@example.com", "bob@example.org"];

    // Every message, string content and text parts alike; one hit.
    let request = json!({"model": "gpt-test", "temperature": 0.2, "messages": [
        {"role": "system", "content": "You help alice.smith@example.com."},
        {"role": "user", "content": [
            {"type": "text", "text": "write to alice.smith@example.com and bob@example.org"},
            {"type": "image_url", "image_url": {"url": "https://img.example.com/a.png"}}
        ]}
    ]});
    let answer = gw.send(CHAT, &request).await;
    assert_eq!(answer.content(), DEFAULT_REPLY);
    assert_eq!(gw.received(), 1);
    let sent = gw.last_upstream_body();
    assert_eq!(
        sent,
        json!({"model": "upstream-model-x", "temperature": 0.2, "messages": [
            {"role": "system", "content": "You help [REDACTED:EMAIL]."},
            {"role": "user", "content": [
                {"type": "text", "text": "write to [REDACTED:EMAIL] and [REDACTED:EMAIL]"},
                {"type": "image_url", "image_url": {"url": "https://img.example.com/a.png"}}
            ]}
        ]})
    );
    assert_no_secret(
        "the upstream's request",
        &String::from_utf8_lossy(&gw.upstream.requests()[0].raw_body),
        &secrets,
    );
    let audit = gw
        .expect_violations(
            &answer,
            &[("no-emails", "email", "redacted", "input")],
            &secrets,
        )
        .await;
    assert_eq!(audit["payload"]["status"], 200);
    assert_eq!(audit["payload"]["error"], Value::Null);

    // Embeddings: every string of `input`.
    gw.upstream.push(Reply::Json(
        200,
        json!({"object": "list", "model": "upstream-model-x",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.5]},
                     {"object": "embedding", "index": 1, "embedding": [0.25]}],
            "usage": {"prompt_tokens": 6, "total_tokens": 6}}),
    ));
    let answer = gw
        .send(
            EMBEDDINGS,
            &json!({"model": "gpt-test", "input": ["bob@example.org", "plain text"]}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        gw.last_upstream_body()["input"],
        json!(["[REDACTED:EMAIL]", "plain text"])
    );
    gw.expect_violations(
        &answer,
        &[("no-emails", "email", "redacted", "input")],
        &secrets,
    )
    .await;
    gw.server.shutdown().await;
}

#[tokio::test]
async fn pii_block_answers_400_naming_the_rule_and_the_upstream_receives_nothing() {
    let mut gw = gateway(
        r#"
[[guardrails.rules]]
name = "no-cards"
kind = "pii"
categories = ["credit_card"]
action = "block"
"#,
    )
    .await;
    let card = "4111 1111 1111 1111";
    let answer = gw.chat(&format!("charge {card} please")).await;
    answer.assert_blocked(&blocked_request("no-cards"));
    let audit = gw
        .expect_violations(
            &answer,
            &[("no-cards", "credit_card", "blocked", "input")],
            &[card, "4111111111111111"],
        )
        .await;
    assert_eq!(audit["payload"]["status"], 400);
    assert_eq!(audit["payload"]["error"], "guardrail_violation");

    // A streamed request is checked before it goes upstream just the same.
    let answer = gw
        .send(
            CHAT,
            &json!({"model": "gpt-test", "stream": true,
                "messages": [{"role": "user", "content": "card 5555555555554444"}]}),
        )
        .await;
    answer.assert_blocked(&blocked_request("no-cards"));
    gw.expect_violations(
        &answer,
        &[("no-cards", "credit_card", "blocked", "input")],
        &["5555555555554444"],
    )
    .await;
    assert_eq!(gw.received(), 0, "a blocked request never reaches upstream");

    // Without a card the same rule lets the request through.
    let answer = gw.chat("charge order 42 please").await;
    assert_eq!(answer.content(), DEFAULT_REPLY);
    gw.expect_violations(&answer, &[], &[]).await;
    assert_eq!(gw.received(), 1);
    gw.server.shutdown().await;
}

#[tokio::test]
async fn warn_passes_the_request_unchanged_and_emits_a_warned_event() {
    let mut gw = gateway(
        r#"
[[guardrails.rules]]
name = "watch-ips"
kind = "pii"
categories = ["ipv4"]
action = "warn"
"#,
    )
    .await;
    let request = json!({"model": "gpt-test", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "why is 10.1.2.3 unreachable from 10.1.2.4?"}
    ]});
    let answer = gw.send(CHAT, &request).await;
    assert_eq!(answer.content(), DEFAULT_REPLY);
    let mut forwarded = request.clone();
    forwarded["model"] = json!("upstream-model-x");
    assert_eq!(gw.last_upstream_body(), forwarded);
    gw.expect_violations(
        &answer,
        &[("watch-ips", "ipv4", "warned", "input")],
        &["10.1.2.3", "10.1.2.4"],
    )
    .await;
    gw.server.shutdown().await;
}

#[tokio::test]
async fn regex_rules_redact_and_block_with_their_pattern_as_written() {
    let mut gw = gateway(
        r#"
[[guardrails.rules]]
name = "employee-ids"
kind = "regex"
pattern = "EMP-[0-9]{6}"
category = "employee_id"
action = "redact"

[[guardrails.rules]]
name = "project-names"
kind = "regex"
pattern = '(?i)project\s+falcon'
action = "block"
"#,
    )
    .await;
    let answer = gw.chat("badge EMP-123456 lost").await;
    assert_eq!(answer.content(), DEFAULT_REPLY);
    assert_eq!(
        gw.last_upstream_content(),
        "badge [REDACTED:EMPLOYEE_ID] lost"
    );
    gw.expect_violations(
        &answer,
        &[("employee-ids", "employee_id", "redacted", "input")],
        &["EMP-123456"],
    )
    .await;

    let answer = gw.chat("status of Project   FALCON?").await;
    answer.assert_blocked(&blocked_request("project-names"));
    gw.expect_violations(
        &answer,
        &[("project-names", "regex", "blocked", "input")],
        &["falcon"],
    )
    .await;
    assert_eq!(gw.received(), 1);

    // Case-sensitive pattern, too few digits: no match, no event.
    let text = "emp-123456 and EMP-12345 and project eagle";
    let answer = gw.chat(text).await;
    assert_eq!(answer.content(), DEFAULT_REPLY);
    assert_eq!(gw.last_upstream_content(), text);
    gw.expect_violations(&answer, &[], &[]).await;
    gw.server.shutdown().await;
}

#[tokio::test]
async fn blocklist_blocks_whole_words_case_insensitively_and_nothing_else() {
    let mut gw = gateway(
        r#"
[[guardrails.rules]]
name = "words"
kind = "blocklist"
words = ["secret", "top clearance"]
action = "block"
"#,
    )
    .await;
    for text in ["the SECRET plan", "a Secret.", "needs TOP   clearance now"] {
        let answer = gw.chat(text).await;
        answer.assert_blocked(&blocked_request("words"));
        gw.expect_violations(
            &answer,
            &[("words", "blocklist", "blocked", "input")],
            &["secret", "clearance"],
        )
        .await;
    }
    assert_eq!(gw.received(), 0);
    for text in [
        "ask the secretary",
        "no secrets here",
        "topsecret",
        "top-level clearances",
    ] {
        let answer = gw.chat(text).await;
        assert_eq!(answer.content(), DEFAULT_REPLY, "{text}");
        assert_eq!(gw.last_upstream_content(), text);
        gw.expect_violations(&answer, &[], &[]).await;
    }
    assert_eq!(gw.received(), 4);
    gw.server.shutdown().await;
}

#[tokio::test]
async fn max_input_chars_blocks_or_warns_on_the_characters_of_all_input_texts() {
    let mut gw = gateway(
        r#"
[[guardrails.rules]]
name = "hard-limit"
kind = "max_input_chars"
max_chars = 40
action = "block"

[[guardrails.rules]]
name = "soft-limit"
kind = "max_input_chars"
max_chars = 20
action = "warn"
"#,
    )
    .await;
    // 20 characters (40 bytes): at the soft limit, not over it.
    let answer = gw.chat(&"é".repeat(20)).await;
    assert_eq!(answer.content(), DEFAULT_REPLY);
    gw.expect_violations(&answer, &[], &[]).await;

    // 11 + 10 characters over two messages: over the soft limit; warned,
    // passed unchanged.
    let request = json!({"model": "gpt-test", "messages": [
        {"role": "system", "content": "abcdefghijk"},
        {"role": "user", "content": "0123456789"}
    ]});
    let answer = gw.send(CHAT, &request).await;
    assert_eq!(answer.content(), DEFAULT_REPLY);
    assert_eq!(gw.last_upstream_body()["messages"], request["messages"]);
    gw.expect_violations(
        &answer,
        &[("soft-limit", "max_input_chars", "warned", "input")],
        &[],
    )
    .await;
    assert_eq!(gw.received(), 2);

    // 41 characters: over both; blocked, both hits reported.
    let answer = gw.chat(&"x".repeat(41)).await;
    answer.assert_blocked(&blocked_request("hard-limit"));
    gw.expect_violations(
        &answer,
        &[
            ("hard-limit", "max_input_chars", "blocked", "input"),
            ("soft-limit", "max_input_chars", "warned", "input"),
        ],
        &[],
    )
    .await;
    assert_eq!(gw.received(), 2);
    gw.server.shutdown().await;
}

// ---------------------------------------------------------------- PII categories

#[tokio::test]
async fn every_pii_category_is_found_and_its_near_misses_are_not() {
    let mut gw = gateway(
        r#"
[[guardrails.rules]]
name = "pii"
kind = "pii"
categories = ["email", "phone", "credit_card", "us_ssn", "ipv4"]
action = "redact"
"#,
    )
    .await;
    // (sent, what the upstream must receive, the category hit)
    let hits = [
        (
            "mail bob@example.org now",
            "mail [REDACTED:EMAIL] now",
            "email",
        ),
        (
            "call +44 20 7946 0958 today",
            "call [REDACTED:PHONE] today",
            "phone",
        ),
        (
            "call (415) 555-2671 today",
            "call [REDACTED:PHONE] today",
            "phone",
        ),
        (
            "call 415-555-2671 today",
            "call [REDACTED:PHONE] today",
            "phone",
        ),
        (
            "card 4111 1111 1111 1111 ok",
            "card [REDACTED:CREDIT_CARD] ok",
            "credit_card",
        ),
        (
            "card 5555555555554444 ok",
            "card [REDACTED:CREDIT_CARD] ok",
            "credit_card",
        ),
        ("ssn 123-45-6789 ok", "ssn [REDACTED:US_SSN] ok", "us_ssn"),
        ("host 192.168.1.20 ok", "host [REDACTED:IPV4] ok", "ipv4"),
        ("host 255.255.255.0 ok", "host [REDACTED:IPV4] ok", "ipv4"),
    ];
    for (sent, received, category) in hits {
        let answer = gw.chat(sent).await;
        assert_eq!(answer.content(), DEFAULT_REPLY, "{sent}");
        assert_eq!(gw.last_upstream_content(), received, "{sent}");
        let secret = sent.split_once(' ').unwrap().1.rsplit_once(' ').unwrap().0;
        gw.expect_violations(
            &answer,
            &[("pii", category, "redacted", "input")],
            &[secret],
        )
        .await;
    }
    let near_misses = [
        // 16 digits failing the Luhn check: not a card, nor anything else.
        "order 4111111111111112 shipped",
        "order 4111 1111 1111 1112 shipped",
        // Never-issued SSNs.
        "ssn 000-12-3456 void",
        "ssn 666-12-3456 void",
        "ssn 123-00-6789 void",
        "ssn 123-45-0000 void",
        // Not IPv4: an octet over 255, leading zeros, five parts.
        "host 256.1.1.1 down",
        "host 192.168.01.1 down",
        "version 1.2.3.4.5 out",
        // No dot in the domain.
        "mail bob@localhost now",
        // Too short for a phone; an unseparated 10-digit run.
        "call 555-2671 today",
        "ref 4155552671 today",
    ];
    for sent in near_misses {
        let answer = gw.chat(sent).await;
        assert_eq!(answer.content(), DEFAULT_REPLY, "{sent}");
        assert_eq!(gw.last_upstream_content(), sent, "{sent}");
        gw.expect_violations(&answer, &[], &[]).await;
    }
    assert_eq!(gw.received(), hits.len() + near_misses.len());
    gw.server.shutdown().await;
}

// ---------------------------------------------------------------- output

#[tokio::test]
async fn an_output_redact_rule_redacts_a_non_streamed_completion() {
    let mut gw = gateway(
        r#"
[[guardrails.rules]]
name = "out-emails"
kind = "pii"
categories = ["email"]
action = "redact"
apply_to = "output"
"#,
    )
    .await;
    gw.upstream.push(Reply::Json(
        200,
        completion("write to carol@example.net today", 12, 6),
    ));
    // An output rule does not look at the request.
    let answer = gw.chat("who answers me@example.com?").await;
    assert_eq!(answer.content(), "write to [REDACTED:EMAIL] today");
    let body = answer.json();
    assert_eq!(body["id"], "chatcmpl-up-1");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18})
    );
    assert_eq!(gw.last_upstream_content(), "who answers me@example.com?");
    gw.expect_violations(
        &answer,
        &[("out-emails", "email", "redacted", "output")],
        &["carol@example.net", "me@example.com"],
    )
    .await;
    let rows = gw
        .server
        .state
        .store
        .ledger_rows_for_request(&answer.request_id)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].input_tokens, rows[0].output_tokens, rows[0].status),
        (12, 6, 200)
    );
    gw.server.shutdown().await;
}

#[tokio::test]
async fn an_output_block_rule_answers_400_and_the_ledger_still_records_the_usage() {
    let mut gw = gateway(
        r#"
[[guardrails.rules]]
name = "output-words"
kind = "blocklist"
words = ["forbidden"]
action = "block"
apply_to = "output"
"#,
    )
    .await;
    gw.upstream.push(Reply::Json(
        200,
        completion("this is Forbidden knowledge", 11, 7),
    ));
    // The request itself may say the word: the rule is for output only.
    let answer = gw.chat("tell me forbidden things").await;
    answer.assert_blocked("the response was blocked by the guardrail rule `output-words`");
    assert_eq!(gw.received(), 1);
    let audit = gw
        .expect_violations(
            &answer,
            &[("output-words", "blocklist", "blocked", "output")],
            &["forbidden"],
        )
        .await;
    assert_eq!(audit["payload"]["status"], 400);
    assert_eq!(audit["payload"]["error"], "guardrail_violation");
    let rows = gw
        .server
        .state
        .store
        .ledger_rows_for_request(&answer.request_id)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(
        (
            row.input_tokens,
            row.output_tokens,
            row.cost_micros,
            row.status,
            row.key_id
        ),
        // ceil(11 × $1 + 7 × $2 per million) = 25 µ$.
        (11, 7, 25, 400, gw.key_id)
    );
    assert!(!row.estimated && !row.streamed, "{row:?}");
    gw.server.shutdown().await;
}

#[tokio::test]
async fn a_streamed_completion_is_delivered_as_sent_and_output_hits_are_warned_after_the_end() {
    let mut gw = gateway(
        r#"
[[guardrails.rules]]
name = "out-emails"
kind = "pii"
categories = ["email"]
action = "redact"
apply_to = "output"

[[guardrails.rules]]
name = "output-words"
kind = "blocklist"
words = ["forbidden"]
action = "block"
apply_to = "output"
"#,
    )
    .await;
    // The address is split over two chunks: the check sees the whole text.
    gw.upstream.push_stream(vec![
        Step::Data(content_chunk("s1", "reach dave@")),
        Step::Data(content_chunk("s1", "example.com, forbidden")),
        Step::Data(usage_chunk("s1", 8, 5)),
        Step::Done,
    ]);
    let answer = gw
        .send(
            CHAT,
            &json!({"model": "gpt-test", "stream": true,
                "messages": [{"role": "user", "content": "how do I reach Dave?"}]}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        streamed_text(&answer.body),
        "reach dave@example.com, forbidden"
    );
    assert!(answer.body.ends_with("data: [DONE]\n\n"), "{}", answer.body);
    let audit = gw
        .expect_violations(
            &answer,
            &[
                ("out-emails", "email", "warned", "output"),
                ("output-words", "blocklist", "warned", "output"),
            ],
            // Not in the events or the audit log; the answer has them.
            &[],
        )
        .await;
    let raw = audit.to_string();
    assert_no_secret("audit.request", &raw, &["dave@example.com", "forbidden"]);
    assert_eq!(audit["payload"]["stream"], true);
    assert_eq!(audit["payload"]["status"], 200);
    let guardrail_log = gw
        .admin_get("/admin/v1/audit?type=audit.guardrail_violation")
        .await;
    assert_no_secret(
        "the guardrail audit log",
        &guardrail_log,
        &["dave@example.com", "forbidden"],
    );
    let rows = gw
        .server
        .state
        .store
        .ledger_rows_for_request(&answer.request_id)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (
            rows[0].input_tokens,
            rows[0].output_tokens,
            rows[0].streamed
        ),
        (8, 5, true)
    );
    gw.server.shutdown().await;
}

#[tokio::test]
async fn apply_to_both_checks_the_request_and_the_response_and_audit_bodies_hold_only_redacted_text(
) {
    let mut gw = gateway_with(
        r#"
[[guardrails.rules]]
name = "both-emails"
kind = "pii"
categories = ["email"]
action = "redact"
apply_to = "both"
"#,
        |config| config.audit.include_bodies = true,
    )
    .await;
    let secrets = ["me@example.com", "helpdesk@example.com"];
    gw.upstream.push(Reply::Json(
        200,
        completion("ask helpdesk@example.com", 10, 4),
    ));
    let answer = gw.chat("I am me@example.com").await;
    assert_eq!(answer.content(), "ask [REDACTED:EMAIL]");
    assert_eq!(gw.last_upstream_content(), "I am [REDACTED:EMAIL]");
    // One event per direction; the audit.request (with bodies) and the
    // whole audit log hold the redacted texts only.
    let audit = gw
        .expect_violations(
            &answer,
            &[
                ("both-emails", "email", "redacted", "input"),
                ("both-emails", "email", "redacted", "output"),
            ],
            &secrets,
        )
        .await;
    assert_eq!(
        audit["payload"]["request_body"]["messages"][0]["content"],
        "I am [REDACTED:EMAIL]"
    );
    assert_eq!(audit["payload"]["response_text"], "ask [REDACTED:EMAIL]");

    // A streamed request is redacted on its way up just the same.
    gw.upstream.push_stream(vec![
        Step::Data(content_chunk("s2", "noted")),
        Step::Data(usage_chunk("s2", 6, 1)),
        Step::Done,
    ]);
    let answer = gw
        .send(
            CHAT,
            &json!({"model": "gpt-test", "stream": true,
                "messages": [{"role": "user", "content": "I am me@example.com"}]}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(streamed_text(&answer.body), "noted");
    let sent = gw.last_upstream_body();
    assert_eq!(sent["messages"][0]["content"], "I am [REDACTED:EMAIL]");
    assert_eq!(sent["stream"], true);
    gw.expect_violations(
        &answer,
        &[("both-emails", "email", "redacted", "input")],
        &secrets,
    )
    .await;
    gw.server.shutdown().await;
}

// ---------------------------------------------------------------- events

#[tokio::test]
async fn every_hit_is_one_event_to_a_guardrail_subscriber_and_nothing_matched_is_in_it() {
    let mut gw = gateway(
        r#"
[[guardrails.rules]]
name = "redact-emails"
kind = "pii"
categories = ["email"]
action = "redact"

[[guardrails.rules]]
name = "warn-ips"
kind = "pii"
categories = ["ipv4"]
action = "warn"

[[guardrails.rules]]
name = "block-words"
kind = "blocklist"
words = ["confidential"]
action = "block"

[[guardrails.rules]]
name = "marker"
kind = "regex"
pattern = "MARKER-[0-9]+"
category = "marker"
action = "warn"
"#,
    )
    .await;
    // Exactly the subscription an operator would open.
    let (mut only_guardrails, _) = WsClient::open(
        gw.server.addr,
        &format!(
            "token={}&types=audit.guardrail_violation",
            gw.server.admin_key
        ),
        None,
    )
    .await;
    // A subscriber with another (non-admin) key sees none of these.
    let (_, other_key) =
        tollgate::auth::issue_api_key(&gw.server.state.store, "other", false, None)
            .await
            .expect("create a key");
    let other_key = other_key.expose().to_owned();
    let (mut other, _) = WsClient::open(
        gw.server.addr,
        "types=audit.guardrail_violation",
        Some(&other_key),
    )
    .await;
    let secrets = [
        "me@example.com",
        "you@example.com",
        "10.0.0.1",
        "10.0.0.2",
        "confidential",
    ];

    // Three rules hit, once each, however often they match.
    let blocked = gw
        .chat("CONFIDENTIAL: me@example.com, you@example.com from 10.0.0.1 (confidential)")
        .await;
    blocked.assert_blocked(&blocked_request("block-words"));
    gw.expect_violations(
        &blocked,
        &[
            ("redact-emails", "email", "redacted", "input"),
            ("warn-ips", "ipv4", "warned", "input"),
            ("block-words", "blocklist", "blocked", "input"),
        ],
        &secrets,
    )
    .await;
    assert_eq!(gw.received(), 0);

    // Several messages, one hit.
    let warned = gw
        .send(
            CHAT,
            &json!({"model": "gpt-test", "messages": [
                {"role": "user", "content": "10.0.0.1"},
                {"role": "user", "content": "10.0.0.2"}
            ]}),
        )
        .await;
    assert_eq!(warned.content(), DEFAULT_REPLY);
    gw.expect_violations(
        &warned,
        &[("warn-ips", "ipv4", "warned", "input")],
        &secrets,
    )
    .await;

    let marker = gw.chat("MARKER-1").await;
    assert_eq!(marker.content(), DEFAULT_REPLY);
    gw.expect_violations(&marker, &[("marker", "marker", "warned", "input")], &[])
        .await;

    // The types-only subscriber got the same events, and nothing between
    // them: the marker's event is the fifth frame.
    let mut got = Vec::new();
    for _ in 0..5 {
        let (raw, frame) = next_frame(&mut only_guardrails).await;
        assert_no_secret("an event frame", &raw, &secrets);
        assert_eq!(frame["type"], "audit.guardrail_violation", "{raw}");
        let p = &frame["payload"];
        assert_eq!(p["key_id"], json!(gw.key_id), "{raw}");
        got.push((
            p["request_id"].as_str().unwrap().to_owned(),
            p["rule"].as_str().unwrap().to_owned(),
            p["action"].as_str().unwrap().to_owned(),
        ));
    }
    let expected: Vec<(String, String, String)> = [
        (&blocked, "redact-emails", "redacted"),
        (&blocked, "warn-ips", "warned"),
        (&blocked, "block-words", "blocked"),
        (&warned, "warn-ips", "warned"),
        (&marker, "marker", "warned"),
    ]
    .into_iter()
    .map(|(a, rule, action)| (a.request_id.clone(), rule.to_owned(), action.to_owned()))
    .collect();
    assert_eq!(got, expected);

    // The other key's subscriber: its own marker's event comes first.
    let own = post(gw.server.addr, &other_key, CHAT, &user("MARKER-2")).await;
    assert_eq!(own.content(), DEFAULT_REPLY);
    let (raw, frame) = next_frame(&mut other).await;
    assert_eq!(frame["payload"]["request_id"], own.request_id, "{raw}");
    assert_eq!(frame["payload"]["rule"], "marker", "{raw}");
    let (raw, frame) = next_frame(&mut only_guardrails).await;
    assert_eq!(frame["payload"]["request_id"], own.request_id, "{raw}");
    let (raw, frame) = next_frame(&mut gw.events).await;
    assert_eq!(frame["payload"]["request_id"], own.request_id, "{raw}");

    // The audit log has exactly those six.
    let log: Value = serde_json::from_str(
        &gw.admin_get("/admin/v1/audit?type=audit.guardrail_violation")
            .await,
    )
    .unwrap();
    assert_eq!(log["data"].as_array().unwrap().len(), 6, "{log}");
    gw.server.shutdown().await;
}

// ---------------------------------------------------------------- configuration

const BAD_REGEX: &str = r#"
[[guardrails.rules]]
name = "bad"
kind = "regex"
pattern = "([a-z"
action = "block"
"#;

const UNKNOWN_CATEGORY: &str = r#"
[[guardrails.rules]]
name = "ok"
kind = "pii"
categories = ["email"]
action = "warn"

[[guardrails.rules]]
name = "passports"
kind = "pii"
categories = ["email", "passport"]
action = "block"
"#;

#[test]
fn invalid_rules_are_configuration_errors_naming_the_key() {
    let error = tollgate::config::parse(BAD_REGEX, None, &|_| None).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("guardrails.rules.0.pattern"));
    assert!(
        error
            .message
            .contains("`([a-z` is not a valid regular expression"),
        "{error}"
    );
    assert_eq!(error.position.map(|(line, _)| line), Some(5), "{error}");
    assert!(
        error.to_string().contains("guardrails.rules.0.pattern"),
        "{error}"
    );

    let error = tollgate::config::parse(UNKNOWN_CATEGORY, None, &|_| None).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("guardrails.rules.1.categories"));
    assert!(
        error.message.contains("unknown pii category `passport`"),
        "{error}"
    );
    for known in ["email", "phone", "credit_card", "us_ssn", "ipv4"] {
        assert!(error.message.contains(known), "{error}");
    }

    let error = tollgate::config::parse(
        "[[guardrails.rules]]\nname = \"x\"\nkind = \"profanity\"\naction = \"block\"\n",
        None,
        &|_| None,
    )
    .unwrap_err();
    assert_eq!(
        error.key.as_deref(),
        Some("guardrails.rules.0.kind"),
        "{error}"
    );
}

const FORBIDDEN_WORDS: &str = r#"
[[guardrails.rules]]
name = "words"
kind = "blocklist"
words = ["forbidden"]
action = "block"
"#;

async fn mock_chat(addr: SocketAddr, key: &str, content: &str) -> Answer {
    post(
        addr,
        key,
        CHAT,
        &json!({"model": "mock-1", "messages": [{"role": "user", "content": content}]}),
    )
    .await
}

#[tokio::test]
async fn a_reload_with_invalid_rules_fails_with_an_event_and_the_old_rules_stay() {
    let workspace = Workspace::new();
    // `tollgate serve` with guardrails; the built-in mock provider serves
    // `mock-1`.
    let (process, addr, path) = workspace.serve(FORBIDDEN_WORDS).await;
    let key = workspace
        .keys(&path, &["create", "--name", "app"])
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();
    let (mut system, _) = WsClient::open(addr, "topics=system", None).await;

    let answer = mock_chat(addr, &key, "this is forbidden").await;
    answer.assert_blocked(&blocked_request("words"));
    let answer = mock_chat(addr, &key, "a banana").await;
    assert_eq!(answer.content(), "Mock reply to: a banana");

    // A bad regex in the new file: refused, announced, old rules kept.
    let new_words = r#"
[[guardrails.rules]]
name = "words"
kind = "blocklist"
words = ["banana"]
action = "block"
"#;
    workspace.write_config_with(&addr.to_string(), &format!("{new_words}{BAD_REGEX}"));
    process.signal("HUP");
    let failed = system.until_type("system.config_reload_failed").await;
    let error = failed["payload"]["error"].as_str().unwrap();
    assert!(error.contains("guardrails.rules.1.pattern"), "{error}");
    let answer = mock_chat(addr, &key, "this is forbidden").await;
    answer.assert_blocked(&blocked_request("words"));
    let answer = mock_chat(addr, &key, "a banana").await;
    assert_eq!(answer.content(), "Mock reply to: a banana");

    // An unknown category: the same.
    workspace.write_config_with(&addr.to_string(), UNKNOWN_CATEGORY);
    process.signal("HUP");
    let failed = system.until_type("system.config_reload_failed").await;
    let error = failed["payload"]["error"].as_str().unwrap();
    assert!(error.contains("guardrails.rules.1.categories"), "{error}");
    let answer = mock_chat(addr, &key, "this is forbidden").await;
    answer.assert_blocked(&blocked_request("words"));

    // A valid file: the new rules replace the old ones.
    workspace.write_config_with(&addr.to_string(), new_words);
    process.signal("HUP");
    let reloaded = system.until_type("system.config_reloaded").await;
    assert_eq!(
        reloaded["payload"],
        json!({"changed_sections": ["guardrails"]})
    );
    let answer = mock_chat(addr, &key, "this is forbidden").await;
    assert_eq!(answer.content(), "Mock reply to: this is forbidden");
    let answer = mock_chat(addr, &key, "a banana").await;
    answer.assert_blocked(&blocked_request("words"));
    drop(process);
}

-- The audit log: every audit.* event (requests, guardrail hits, admin
-- actions) with its payload as JSON text. `published` = 0 marks a row from a
-- process without an event hub (the CLI); a running gateway claims and
-- publishes it. Replaces admin_actions, whose rows move here.
CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    event_type  TEXT    NOT NULL,
    key_id      TEXT,
    request_id  TEXT,
    payload     TEXT    NOT NULL,
    published   INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_key ON audit_log (key_id, id);
CREATE INDEX audit_log_unpublished ON audit_log (published, id);

INSERT INTO audit_log (at, event_type, payload, published)
SELECT at, 'audit.admin', json_object('actor', actor, 'action', action, 'target', target), published
FROM admin_actions ORDER BY id;
DROP TABLE admin_actions;

-- The usage ledger: one row per proxied request of a known key.
CREATE TABLE usage_ledger (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    at            INTEGER NOT NULL,
    request_id    TEXT    NOT NULL,
    key_id        TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    provider      TEXT    NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_micros   INTEGER NOT NULL,
    latency_ms    INTEGER NOT NULL,
    status        INTEGER NOT NULL,
    streamed      INTEGER NOT NULL,
    estimated     INTEGER NOT NULL
);
CREATE INDEX usage_ledger_at ON usage_ledger (at);
CREATE INDEX usage_ledger_key_at ON usage_ledger (key_id, at);

-- API keys: only the SHA-256 of a key is stored, with a short prefix for display.
-- Times are Unix milliseconds (UTC); flags are 0/1, so SQLite and PostgreSQL
-- rows decode the same way.
CREATE TABLE api_keys (
    id           TEXT   PRIMARY KEY,
    name         TEXT   NOT NULL,
    prefix       TEXT   NOT NULL,
    key_hash     TEXT   NOT NULL UNIQUE,
    is_admin     BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    revoked_at   BIGINT,
    last_used_at BIGINT
);
CREATE INDEX api_keys_prefix ON api_keys (prefix);

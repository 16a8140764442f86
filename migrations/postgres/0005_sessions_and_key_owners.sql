-- Browser sessions from OIDC login. Only a SHA-256 of the session id is
-- stored; the id itself lives in the browser's HttpOnly cookie.
CREATE TABLE sessions (
    id_hash      TEXT PRIMARY KEY,
    subject      TEXT NOT NULL,
    name         TEXT,
    email        TEXT,
    is_admin     BIGINT NOT NULL,
    groups_json  TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    ended_at     BIGINT
);
CREATE INDEX sessions_expires ON sessions (expires_at);

-- A key may belong to a user (the OIDC subject), who then sees its events.
ALTER TABLE api_keys ADD COLUMN owner TEXT;
CREATE INDEX api_keys_owner ON api_keys (owner);

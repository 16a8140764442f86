-- Administrative actions (key created, key revoked, …), kept as an audit
-- record. `published` = 0 marks a row written by a process without an event
-- hub (the CLI); a running gateway claims and publishes it as audit.admin.
CREATE TABLE admin_actions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    actor      TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    target     TEXT    NOT NULL,
    published  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX admin_actions_unpublished ON admin_actions (published, id);

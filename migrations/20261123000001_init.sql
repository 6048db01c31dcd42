-- Detour control plane schema, version 1.
-- Portable between SQLite and Postgres (sqlx Any): only TEXT and BIGINT
-- columns, times as milliseconds since the Unix epoch, ids as text,
-- booleans as 0/1. Never edit this file once committed: add a new migration.

CREATE TABLE route_version (
    id BIGINT PRIMARY KEY,
    version BIGINT NOT NULL
);
INSERT INTO route_version (id, version) VALUES (1, 0);

-- One routing rule. `spec` is the full rule as JSON (trunks, weights,
-- failover, window, hook); the matcher columns are copied out of it so the
-- uniqueness of a matcher is enforced by the database.
CREATE TABLE routes (
    name TEXT PRIMARY KEY,
    prefix TEXT NOT NULL,
    call_type TEXT NOT NULL,
    priority TEXT NOT NULL,
    window_key TEXT NOT NULL,
    spec TEXT NOT NULL,
    revision BIGINT NOT NULL,
    route_version BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE UNIQUE INDEX routes_matcher ON routes (prefix, call_type, priority, window_key);

CREATE TABLE route_audit (
    id TEXT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    request_id TEXT,
    action TEXT NOT NULL,
    name TEXT NOT NULL,
    route_version BIGINT NOT NULL,
    before_spec TEXT,
    after_spec TEXT
);
CREATE INDEX route_audit_at ON route_audit (at);

CREATE TABLE agent_tokens (
    token_hash TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    pop TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE calls (
    id TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    pop TEXT NOT NULL,
    caller TEXT,
    destination TEXT NOT NULL,
    call_type TEXT NOT NULL,
    priority TEXT NOT NULL,
    metadata TEXT NOT NULL,
    decision TEXT NOT NULL,
    state TEXT NOT NULL,
    ringing_at BIGINT,
    answered_at BIGINT,
    ended_at BIGINT,
    duration_ms BIGINT,
    updated_at BIGINT NOT NULL
);

CREATE TABLE call_events (
    call_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    at BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (call_id, kind)
);

-- The first response to each Idempotency-Key. The primary key is the claim:
-- a second request with the same key cannot insert, so it replays.
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY,
    request_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    status BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX idempotency_created_at ON idempotency (created_at);

CREATE TABLE agent_reports (
    pop TEXT PRIMARY KEY,
    received_at BIGINT NOT NULL,
    report TEXT NOT NULL
);

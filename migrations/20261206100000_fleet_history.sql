-- The fleet page: operator tokens and their browser sessions,
-- and the fleet's recent history, shared by every replica. Portable between
-- SQLite and Postgres like version 1 (TEXT and BIGINT only, times in ms).
-- The history is bounded: the control plane deletes samples older than
-- 20 minutes and events past `fleet.events_retention` or beyond the newest
-- `fleet.max_events` (control-plane/src/tasks.rs).
-- Written to run twice (IF NOT EXISTS), like 20261206000001: rolling back
-- across the release that tolerates newer schemas deletes both rows from
-- _sqlx_migrations, and the next upgrade applies them again
-- (docs/operations.md, "Rolling back").

-- Read-only tokens for people (the fleet page), not agents. Only the
-- SHA-256 of a token is kept, as for agent tokens.
CREATE TABLE IF NOT EXISTS operator_tokens (
    token_hash TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- A browser's login on the fleet page: the cookie holds a random session
-- id whose SHA-256 is kept here, with the hash of the token that logged in
-- (a revoked token ends its sessions).
CREATE TABLE IF NOT EXISTS operator_sessions (
    session_hash TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    who TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS operator_sessions_expires_at ON operator_sessions (expires_at);

-- One path of one PoP over one 30-second bucket (`received_at / 30000`):
-- the worst of what its reports said then, for the 15-minute sparklines.
-- rtt_us is the highest smoothed RTT, loss_ppm the highest loss (parts per
-- million), state the worst (0 up, 1 degraded, 2 down), active 1 when the
-- path carried new requests at any report in the bucket.
CREATE TABLE IF NOT EXISTS fleet_samples (
    pop TEXT NOT NULL,
    path TEXT NOT NULL,
    bucket BIGINT NOT NULL,
    rtt_us BIGINT,
    loss_ppm BIGINT NOT NULL,
    state BIGINT NOT NULL,
    active BIGINT NOT NULL,
    PRIMARY KEY (pop, path, bucket)
);
CREATE INDEX IF NOT EXISTS fleet_samples_bucket ON fleet_samples (bucket);

-- What happened: `switch` (a PoP's active path changed; `at` by the agent's
-- clock, from_path, to_path, reason) and `refusal` (a PoP's relay refused
-- `n` tunnels for `reason` between two reports; `at` when the control plane
-- received the report). The id makes an event that several reports repeat
-- one row.
CREATE TABLE IF NOT EXISTS fleet_events (
    id TEXT PRIMARY KEY,
    pop TEXT NOT NULL,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    from_path TEXT,
    to_path TEXT,
    reason TEXT NOT NULL,
    n BIGINT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS fleet_events_at ON fleet_events (at);
CREATE INDEX IF NOT EXISTS fleet_events_kind_at ON fleet_events (kind, at);
CREATE INDEX IF NOT EXISTS fleet_events_received_at ON fleet_events (received_at);

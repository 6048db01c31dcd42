-- Recordings of calls (version 2). One row per stored object: the same
-- recording reported twice (an agent's retry, a replay after a restart) is
-- one row. Portable between SQLite and Postgres like version 1.

CREATE TABLE call_recordings (
    call_id TEXT NOT NULL,
    bucket TEXT NOT NULL,
    object_key TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    duration_ms BIGINT,
    content_type TEXT,
    recorded_at BIGINT NOT NULL,
    PRIMARY KEY (call_id, bucket, object_key)
);

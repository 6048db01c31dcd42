//! Retention: deleting rows older than their keep time, one bounded batch
//! per statement, so a sweep never holds locks (or SQLite's one
//! connection) for long. `tasks` runs the batches off the request path.
//!
//! On Postgres each batch locks its rows first (`FOR UPDATE SKIP LOCKED`):
//! replicas sweeping at once take different rows, and a request changing
//! an old call (an event locks the call row first) either finishes before
//! the batch takes it or finds it gone (404). On SQLite the statements of a
//! batch run in one transaction on the one connection, so nothing comes
//! between them.

use sqlx::Row;

use super::{Result, Store};

/// What one batch of calls took with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgedCalls {
    /// Call rows (at most the batch size).
    pub calls: u64,
    /// Their events.
    pub events: u64,
    /// Their recordings' rows (the objects stay in the bucket).
    pub recordings: u64,
}

/// The tables retention deletes from, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `route_audit`.
    Audit,
    /// `idempotency`.
    Idempotency,
    /// `agent_reports`.
    AgentReports,
}

impl Table {
    /// The table's name (the metric label).
    pub fn name(self) -> &'static str {
        match self {
            Table::Audit => "route_audit",
            Table::Idempotency => "idempotency",
            Table::AgentReports => "agent_reports",
        }
    }

    /// One batch: Postgres, then SQLite. Static text: the table is chosen
    /// here, never formatted into SQL.
    fn sql(self) -> (&'static str, &'static str) {
        match self {
            Table::Audit => (
                "DELETE FROM route_audit WHERE id IN (SELECT id FROM route_audit WHERE at < $1 \
                 ORDER BY at LIMIT $2 FOR UPDATE SKIP LOCKED)",
                "DELETE FROM route_audit WHERE id IN (SELECT id FROM route_audit WHERE at < $1 \
                 ORDER BY at LIMIT $2)",
            ),
            Table::Idempotency => (
                "DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency WHERE created_at < $1 \
                 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
                "DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency WHERE created_at < $1 \
                 ORDER BY created_at LIMIT $2)",
            ),
            // One row per PoP: no index needed.
            Table::AgentReports => (
                "DELETE FROM agent_reports WHERE pop IN (SELECT pop FROM agent_reports \
                 WHERE received_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                "DELETE FROM agent_reports WHERE pop IN (SELECT pop FROM agent_reports \
                 WHERE received_at < $1 LIMIT $2)",
            ),
        }
    }
}

const PURGE_CALLS_POSTGRES: &str = "WITH doomed AS (\
       SELECT id FROM calls WHERE created_at < $1 ORDER BY created_at LIMIT $2 \
       FOR UPDATE SKIP LOCKED), \
     e AS (DELETE FROM call_events WHERE call_id IN (SELECT id FROM doomed) RETURNING 1), \
     r AS (DELETE FROM call_recordings WHERE call_id IN (SELECT id FROM doomed) RETURNING 1), \
     c AS (DELETE FROM calls WHERE id IN (SELECT id FROM doomed) RETURNING 1) \
     SELECT (SELECT COUNT(*) FROM c) AS calls, (SELECT COUNT(*) FROM e) AS events, \
     (SELECT COUNT(*) FROM r) AS recordings";

/// The batch's calls, as a subquery each SQLite statement repeats; within
/// the transaction it names the same rows every time (the index on
/// `created_at` orders them, and nothing else writes in between).
const PURGE_CALLS_SQLITE: [&str; 3] = [
    "DELETE FROM call_events WHERE call_id IN \
     (SELECT id FROM calls WHERE created_at < $1 ORDER BY created_at LIMIT $2)",
    "DELETE FROM call_recordings WHERE call_id IN \
     (SELECT id FROM calls WHERE created_at < $1 ORDER BY created_at LIMIT $2)",
    "DELETE FROM calls WHERE id IN \
     (SELECT id FROM calls WHERE created_at < $1 ORDER BY created_at LIMIT $2)",
];

impl Store {
    /// Deletes at most `limit` calls created before `before` (ms since the
    /// epoch), oldest first, with their events and recordings, in one
    /// transaction.
    pub async fn purge_calls(&self, before: i64, limit: u32) -> Result<PurgedCalls> {
        let limit = i64::from(limit);
        if !self.sqlite {
            let row = sqlx::query(PURGE_CALLS_POSTGRES)
                .bind(before)
                .bind(limit)
                .fetch_one(&self.pool)
                .await?;
            let n = |c: &str| -> Result<u64> { Ok(u64::try_from(row.try_get::<i64, _>(c)?).unwrap_or(0)) };
            return Ok(PurgedCalls {
                calls: n("calls")?,
                events: n("events")?,
                recordings: n("recordings")?,
            });
        }
        let mut tx = self.pool.begin().await?;
        let mut counts = [0u64; 3];
        for (sql, count) in PURGE_CALLS_SQLITE.iter().zip(counts.iter_mut()) {
            *count = sqlx::query(*sql)
                .bind(before)
                .bind(limit)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(PurgedCalls {
            events: counts[0],
            recordings: counts[1],
            calls: counts[2],
        })
    }

    /// Deletes at most `limit` rows of `table` older than `before` (ms
    /// since the epoch), oldest first; returns how many.
    pub async fn purge(&self, table: Table, before: i64, limit: u32) -> Result<u64> {
        let (postgres, sqlite) = table.sql();
        let sql = if self.sqlite { sqlite } else { postgres };
        let r = sqlx::query(sql)
            .bind(before)
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}

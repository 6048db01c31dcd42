//! Fleet: the `agent_reports` table (the latest report of each PoP) and the
//! fleet's history (`fleet_samples` for the sparklines, `fleet_events` for
//! switches and relay refusals), written in the report's transaction and
//! shared by every replica; and their purge, which keeps them bounded.

use std::time::Duration;

use detour_wire::{AgentReport, PathState};
use sqlx::Row;

use super::idempotency::claim;
use super::{Idem, Outcome, Result, Store, StoredResponse, now_ms};

/// The width of one history sample: reports received within the same
/// 30 seconds fold into one point of a sparkline (the worst of them).
pub const BUCKET_MS: i64 = 30_000;
/// Paths of one report kept in the history, at most (a PoP has one per
/// peer and endpoint; this bounds what a broken agent can write).
const MAX_SAMPLED_PATHS: usize = 64;
/// Longest reason or path name kept in an event, in characters.
const MAX_TEXT: usize = 300;

/// One stored report: `(pop, received_at ms, report JSON)`.
pub type ReportRow = (String, i64, String);

/// One path of one PoP over one bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    pub pop: String,
    pub path: String,
    /// `received_at / BUCKET_MS`.
    pub bucket: i64,
    /// The highest smoothed RTT reported, microseconds.
    pub rtt_us: Option<i64>,
    /// The highest loss reported, parts per million.
    pub loss_ppm: i64,
    /// The worst state: 0 up, 1 degraded, 2 down.
    pub state: i64,
    /// Whether the path was the active one in any report of the bucket.
    pub active: bool,
}

/// A switch or a relay refusal.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub pop: String,
    /// ms since the epoch: the agent's clock for a switch, the control
    /// plane's for a refusal.
    pub at: i64,
    /// `switch` or `refusal`.
    pub kind: String,
    pub from_path: Option<String>,
    pub to_path: Option<String>,
    pub reason: String,
    /// Refusals counted in this event (1 for a switch).
    pub n: i64,
}

/// A state as the history stores it: higher is worse.
pub fn state_rank(s: PathState) -> i64 {
    match s {
        PathState::Up => 0,
        PathState::Degraded => 1,
        PathState::Down => 2,
    }
}

fn clip(s: &str) -> String {
    s.chars().take(MAX_TEXT).collect()
}

impl Store {
    /// Stores an agent report (latest per PoP) and what it adds to the
    /// history, in one transaction guarded by a key if given: a sample per
    /// path, the switches the previous report did not carry yet, and the
    /// relay refusals counted since it.
    pub async fn put_report(
        &self,
        idem: Option<&Idem>,
        report: &AgentReport,
        text: &str,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<Outcome<()>> {
        let pop = report.pop.as_str();
        let mut tx = self.pool.begin().await?;
        if let Some(idem) = idem
            && let Some(early) = claim(&mut tx, idem, Some(response), retention).await?.answered()
        {
            return Ok(early);
        }
        let now = now_ms();
        let previous: Option<AgentReport> = sqlx::query("SELECT report FROM agent_reports WHERE pop = $1")
            .bind(pop)
            .fetch_optional(&mut *tx)
            .await?
            .and_then(|r| r.try_get::<String, _>("report").ok())
            .and_then(|t| serde_json::from_str(&t).ok());
        sqlx::query(
            "INSERT INTO agent_reports (pop, received_at, report) VALUES ($1, $2, $3) \
             ON CONFLICT (pop) DO UPDATE SET received_at = excluded.received_at, \
             report = excluded.report",
        )
        .bind(pop)
        .bind(now)
        .bind(text)
        .execute(&mut *tx)
        .await?;
        let bucket = now.div_euclid(BUCKET_MS);
        for p in report.paths.iter().take(MAX_SAMPLED_PATHS) {
            // The worst of the bucket: a spike between two points still shows.
            sqlx::query(
                "INSERT INTO fleet_samples (pop, path, bucket, rtt_us, loss_ppm, state, active) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (pop, path, bucket) DO UPDATE SET \
                 rtt_us = CASE WHEN fleet_samples.rtt_us IS NULL OR excluded.rtt_us > fleet_samples.rtt_us \
                          THEN excluded.rtt_us ELSE fleet_samples.rtt_us END, \
                 loss_ppm = CASE WHEN excluded.loss_ppm > fleet_samples.loss_ppm \
                            THEN excluded.loss_ppm ELSE fleet_samples.loss_ppm END, \
                 state = CASE WHEN excluded.state > fleet_samples.state \
                         THEN excluded.state ELSE fleet_samples.state END, \
                 active = CASE WHEN excluded.active > fleet_samples.active \
                          THEN excluded.active ELSE fleet_samples.active END",
            )
            .bind(pop)
            .bind(clip(&p.path))
            .bind(bucket)
            .bind(p.rtt_seconds.map(|s| (s * 1e6).round() as i64))
            .bind((p.loss_ratio.clamp(0.0, 1.0) * 1e6).round() as i64)
            .bind(state_rank(p.state))
            .bind(i64::from(p.active))
            .execute(&mut *tx)
            .await?;
        }
        let before = previous.as_ref();
        for s in &report.switches {
            if before.is_some_and(|b| b.switches.contains(s)) {
                continue;
            }
            sqlx::query(
                "INSERT INTO fleet_events (id, pop, at, kind, from_path, to_path, reason, n, received_at) \
                 VALUES ($1, $2, $3, 'switch', $4, $5, $6, 1, $7) ON CONFLICT (id) DO NOTHING",
            )
            .bind(format!("switch:{pop}:{}:{}", s.at_ms, clip(&s.to)))
            .bind(pop)
            .bind(s.at_ms)
            .bind(clip(&s.from))
            .bind(clip(&s.to))
            .bind(clip(&s.reason))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        for (reason, &count) in &report.relay_rejected {
            let earlier = before
                .and_then(|b| b.relay_rejected.get(reason))
                .copied()
                .unwrap_or(0);
            // A count below the last one: the agent restarted.
            let n = if count >= earlier { count - earlier } else { count };
            if n == 0 {
                continue;
            }
            sqlx::query(
                "INSERT INTO fleet_events (id, pop, at, kind, from_path, to_path, reason, n, received_at) \
                 VALUES ($1, $2, $3, 'refusal', NULL, NULL, $4, $5, $3) ON CONFLICT (id) DO NOTHING",
            )
            // The running count makes the id unique even for two reports
            // in the same millisecond.
            .bind(format!("refusal:{pop}:{now}:{}:{count}", clip(reason)))
            .bind(pop)
            .bind(now)
            .bind(clip(reason))
            .bind(i64::try_from(n).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Outcome::Done(()))
    }

    /// Latest report per PoP: `(pop, received_at, report JSON)`.
    pub async fn fleet(&self) -> Result<Vec<ReportRow>> {
        let rows = sqlx::query("SELECT pop, received_at, report FROM agent_reports ORDER BY pop")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("pop")?, r.try_get("received_at")?, r.try_get("report")?)))
            .collect()
    }

    /// Every history sample from bucket `since` on.
    pub async fn fleet_samples(&self, since: i64) -> Result<Vec<SampleRow>> {
        let rows = sqlx::query(
            "SELECT pop, path, bucket, rtt_us, loss_ppm, state, active FROM fleet_samples \
             WHERE bucket >= $1",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SampleRow {
                    pop: r.try_get("pop")?,
                    path: r.try_get("path")?,
                    bucket: r.try_get("bucket")?,
                    rtt_us: r.try_get("rtt_us")?,
                    loss_ppm: r.try_get("loss_ppm")?,
                    state: r.try_get("state")?,
                    active: r.try_get::<i64, _>("active")? != 0,
                })
            })
            .collect()
    }

    /// The newest `limit` events of `kind` (`switch`, `refusal`), newest first.
    pub async fn fleet_events(&self, kind: &str, limit: i64) -> Result<Vec<EventRow>> {
        let rows = sqlx::query(
            "SELECT pop, at, kind, from_path, to_path, reason, n FROM fleet_events \
             WHERE kind = $1 ORDER BY at DESC LIMIT $2",
        )
        .bind(kind)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRow {
                    pop: r.try_get("pop")?,
                    at: r.try_get("at")?,
                    kind: r.try_get("kind")?,
                    from_path: r.try_get("from_path")?,
                    to_path: r.try_get("to_path")?,
                    reason: r.try_get("reason")?,
                    n: r.try_get("n")?,
                })
            })
            .collect()
    }

    /// Keeps the history bounded: samples of buckets before `samples_from`,
    /// events received before `events_from` (ms), and all but the newest
    /// `max_events` events go. Returns the rows deleted.
    pub async fn purge_fleet(&self, samples_from: i64, events_from: i64, max_events: i64) -> Result<u64> {
        let mut n = sqlx::query("DELETE FROM fleet_samples WHERE bucket < $1")
            .bind(samples_from)
            .execute(&self.pool)
            .await?
            .rows_affected();
        n += sqlx::query("DELETE FROM fleet_events WHERE received_at < $1")
            .bind(events_from)
            .execute(&self.pool)
            .await?
            .rows_affected();
        // Exactly the newest `max_events` by arrival stay (ties broken by id).
        n += sqlx::query(
            "DELETE FROM fleet_events WHERE id NOT IN \
             (SELECT id FROM fleet_events ORDER BY received_at DESC, id DESC LIMIT $1)",
        )
        .bind(max_events.max(0))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n)
    }

    /// How many history rows there are: `(samples, events)`.
    pub async fn fleet_history_size(&self) -> Result<(i64, i64)> {
        let s = sqlx::query("SELECT COUNT(*) AS n FROM fleet_samples")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        let e = sqlx::query("SELECT COUNT(*) AS n FROM fleet_events")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok((s, e))
    }
}

//! Fleet: the `agent_reports` table, the latest report of each PoP.

use std::time::Duration;

use sqlx::Row;

use super::idempotency::claim;
use super::{Idem, Outcome, Result, Store, StoredResponse, now_ms};

impl Store {
    /// Stores an agent report (latest per PoP), guarded by a key if given.
    pub async fn put_report(
        &self,
        idem: Option<&Idem>,
        pop: &str,
        report: &str,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<Outcome<()>> {
        let mut tx = self.pool.begin().await?;
        if let Some(idem) = idem
            && let Some(early) = claim(&mut tx, idem, Some(response), retention).await?.answered()
        {
            return Ok(early);
        }
        sqlx::query(
            "INSERT INTO agent_reports (pop, received_at, report) VALUES ($1, $2, $3) \
             ON CONFLICT (pop) DO UPDATE SET received_at = excluded.received_at, \
             report = excluded.report",
        )
        .bind(pop)
        .bind(now_ms())
        .bind(report)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Outcome::Done(()))
    }

    /// Latest report per PoP: `(pop, received_at, report JSON)`.
    pub async fn fleet(&self) -> Result<Vec<(String, i64, String)>> {
        let rows = sqlx::query("SELECT pop, received_at, report FROM agent_reports ORDER BY pop")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("pop")?, r.try_get("received_at")?, r.try_get("report")?)))
            .collect()
    }
}

//! Audit: the `route_audit` table, one entry per route change, written in
//! the change's transaction.

use sqlx::{AnyConnection, Row};

use super::{Result, Store};

/// One audit entry of a route change.
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub at: i64,
    pub actor: String,
    pub request_id: Option<String>,
    pub action: String,
    pub name: String,
    pub route_version: i64,
    pub before: Option<String>,
    pub after: Option<String>,
}

/// A route change to audit (an [`AuditRow`] before it is written).
pub(super) struct AuditEntry<'a> {
    /// When, in milliseconds since the Unix epoch.
    pub at: i64,
    /// Who: `admin`, `admin:<X-Detour-Actor>`, or a tool's name.
    pub actor: &'a str,
    /// The request's `X-Request-Id`, if it had one.
    pub request_id: Option<&'a str>,
    /// `create`, `update`, `delete` or `bulk`.
    pub action: &'a str,
    /// The route's name (for `bulk`: how many routes).
    pub name: &'a str,
    /// The route version the change made.
    pub route_version: i64,
    /// The spec before the change (JSON), if there was one.
    pub before: Option<&'a str>,
    /// The spec after the change (JSON), if there is one.
    pub after: Option<&'a str>,
}

/// Writes `entry` inside the caller's transaction.
pub(super) async fn audit(conn: &mut AnyConnection, entry: &AuditEntry<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO route_audit (id, at, actor, request_id, action, name, route_version, \
         before_spec, after_spec) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(entry.at)
    .bind(entry.actor)
    .bind(entry.request_id)
    .bind(entry.action)
    .bind(entry.name)
    .bind(entry.route_version)
    .bind(entry.before)
    .bind(entry.after)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

impl Store {
    /// The newest audit entries, newest first.
    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT at, actor, request_id, action, name, route_version, before_spec, after_spec \
             FROM route_audit ORDER BY route_version DESC, at DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRow {
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    request_id: r.try_get("request_id")?,
                    action: r.try_get("action")?,
                    name: r.try_get("name")?,
                    route_version: r.try_get("route_version")?,
                    before: r.try_get("before_spec")?,
                    after: r.try_get("after_spec")?,
                })
            })
            .collect()
    }
}

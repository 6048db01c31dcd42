//! Routes: the `routes` table and the route version every change bumps
//! (replicas poll it). Every change is audited in its own transaction.

use sqlx::{AnyConnection, Row};

use super::audit::{AuditEntry, audit};
use super::{Matcher, Result, Store, StoreError, now_ms};

/// A stored route.
#[derive(Debug, Clone)]
pub struct RouteRow {
    pub name: String,
    pub spec: String,
    pub revision: i64,
    pub route_version: i64,
    pub updated_at: i64,
    pub updated_by: String,
}

impl Store {
    /// The current route version (bumped by every route change).
    pub async fn route_version(&self) -> Result<i64> {
        let row = sqlx::query("SELECT version FROM route_version WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("version")?)
    }

    /// Every route, with the version read before them (so a change racing
    /// this read is picked up by the next poll).
    pub async fn load_routes(&self) -> Result<(i64, Vec<RouteRow>)> {
        let version = self.route_version().await?;
        let rows = self.list_routes().await?;
        Ok((version, rows))
    }

    /// Every route, by name.
    pub async fn list_routes(&self) -> Result<Vec<RouteRow>> {
        let rows = sqlx::query(
            "SELECT name, spec, revision, route_version, updated_at, updated_by \
             FROM routes ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(route_row).collect()
    }

    /// One route.
    pub async fn get_route(&self, name: &str) -> Result<Option<RouteRow>> {
        let row = sqlx::query(
            "SELECT name, spec, revision, route_version, updated_at, updated_by \
             FROM routes WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(route_row).transpose()
    }

    /// Creates or replaces a route, bumps the route version and audits it.
    /// Returns the stored row and whether it was created. A matcher already
    /// used by another route is a conflict naming that route.
    pub async fn put_route(
        &self,
        name: &str,
        spec: &str,
        matcher: &Matcher,
        actor: &str,
        request_id: Option<&str>,
    ) -> Result<(RouteRow, bool)> {
        let mut tx = self.pool.begin().await?;
        if let Some(other) = other_route_matching(&mut tx, matcher, name).await? {
            return Err(StoreError::Conflict(format!(
                "route {other:?} already matches the same prefix, call type, priority and window"
            )));
        }
        let version = bump_version(&mut tx).await?;
        let before = sqlx::query("SELECT spec, revision FROM routes WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let (before_spec, revision): (Option<String>, i64) = match before {
            Some(r) => (Some(r.try_get("spec")?), r.try_get::<i64, _>("revision")? + 1),
            None => (None, 1),
        };
        let row = RouteRow {
            name: name.to_owned(),
            spec: spec.to_owned(),
            revision,
            route_version: version,
            updated_at: now_ms(),
            updated_by: actor.to_owned(),
        };
        upsert_route(&mut tx, &row, matcher).await?;
        let entry = AuditEntry {
            at: row.updated_at,
            actor,
            request_id,
            action: if before_spec.is_some() { "update" } else { "create" },
            name,
            route_version: version,
            before: before_spec.as_deref(),
            after: Some(spec),
        };
        audit(&mut tx, &entry).await?;
        tx.commit().await?;
        Ok((row, before_spec.is_none()))
    }

    /// Deletes a route; `None` when it did not exist. Returns the new version.
    pub async fn delete_route(
        &self,
        name: &str,
        actor: &str,
        request_id: Option<&str>,
    ) -> Result<Option<i64>> {
        let mut tx = self.pool.begin().await?;
        let before = sqlx::query("SELECT spec FROM routes WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(before) = before else {
            return Ok(None);
        };
        let before: String = before.try_get("spec")?;
        let version = bump_version(&mut tx).await?;
        sqlx::query("DELETE FROM routes WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let entry = AuditEntry {
            at: now_ms(),
            actor,
            request_id,
            action: "delete",
            name,
            route_version: version,
            before: Some(&before),
            after: None,
        };
        audit(&mut tx, &entry).await?;
        tx.commit().await?;
        Ok(Some(version))
    }

    /// Inserts many routes in one transaction with one version bump (seeding
    /// and benchmarks); audited as one `bulk` entry.
    pub async fn bulk_insert_routes(&self, routes: &[(String, String, Matcher)], actor: &str) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let version = bump_version(&mut tx).await?;
        let now = now_ms();
        for (name, spec, m) in routes {
            sqlx::query(
                "INSERT INTO routes (name, prefix, call_type, priority, window_key, spec, \
                 revision, route_version, updated_at, updated_by) \
                 VALUES ($1, $2, $3, $4, $5, $6, 1, $7, $8, $9)",
            )
            .bind(name)
            .bind(&m.prefix)
            .bind(&m.call_type)
            .bind(&m.priority)
            .bind(&m.window)
            .bind(spec)
            .bind(version)
            .bind(now)
            .bind(actor)
            .execute(&mut *tx)
            .await?;
        }
        let what = format!("{} routes", routes.len());
        let entry = AuditEntry {
            at: now,
            actor,
            request_id: None,
            action: "bulk",
            name: &what,
            route_version: version,
            before: None,
            after: None,
        };
        audit(&mut tx, &entry).await?;
        tx.commit().await?;
        Ok(version)
    }
}

/// The name of a route other than `name` with the same matcher, if any.
async fn other_route_matching(
    conn: &mut AnyConnection,
    matcher: &Matcher,
    name: &str,
) -> Result<Option<String>> {
    let other = sqlx::query(
        "SELECT name FROM routes WHERE prefix = $1 AND call_type = $2 AND priority = $3 \
         AND window_key = $4 AND name <> $5",
    )
    .bind(&matcher.prefix)
    .bind(&matcher.call_type)
    .bind(&matcher.priority)
    .bind(&matcher.window)
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(other.map(|r| r.try_get("name")).transpose()?)
}

/// Writes `row` over any route of the same name.
async fn upsert_route(conn: &mut AnyConnection, row: &RouteRow, matcher: &Matcher) -> Result<()> {
    sqlx::query(
        "INSERT INTO routes (name, prefix, call_type, priority, window_key, spec, revision, \
         route_version, updated_at, updated_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (name) DO UPDATE SET prefix = excluded.prefix, \
         call_type = excluded.call_type, priority = excluded.priority, \
         window_key = excluded.window_key, spec = excluded.spec, revision = excluded.revision, \
         route_version = excluded.route_version, updated_at = excluded.updated_at, \
         updated_by = excluded.updated_by",
    )
    .bind(&row.name)
    .bind(&matcher.prefix)
    .bind(&matcher.call_type)
    .bind(&matcher.priority)
    .bind(&matcher.window)
    .bind(&row.spec)
    .bind(row.revision)
    .bind(row.route_version)
    .bind(row.updated_at)
    .bind(&row.updated_by)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn route_row(r: &sqlx::any::AnyRow) -> Result<RouteRow> {
    Ok(RouteRow {
        name: r.try_get("name")?,
        spec: r.try_get("spec")?,
        revision: r.try_get("revision")?,
        route_version: r.try_get("route_version")?,
        updated_at: r.try_get("updated_at")?,
        updated_by: r.try_get("updated_by")?,
    })
}

async fn bump_version(conn: &mut AnyConnection) -> Result<i64> {
    let row = sqlx::query("UPDATE route_version SET version = version + 1 WHERE id = 1 RETURNING version")
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.try_get("version")?)
}

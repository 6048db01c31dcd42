//! Migrations: the schema in `migrations/`, embedded in the binary, and the
//! policy that lets two releases share one database.
//!
//! The policy is **expand, then contract**: a release's migrations only add
//! (tables, nullable columns or columns with a default, indexes), so the
//! release before it runs against the new schema; what the old release
//! needed is removed only by a later release, once no replica of the old
//! one runs. For that to help, a binary must start against a database that
//! a newer release has migrated further: [`Store::migrate`] (what `serve`
//! and the `token` commands run) applies this build's pending migrations
//! and accepts applied migrations it does not know, while
//! [`Store::migrate_strict`] (the `migrate` command) refuses them, so the
//! one command meant to change the schema never runs an old build's idea of
//! it over a newer one.

use std::collections::BTreeMap;

use sqlx::Row;
use sqlx::migrate::{MigrateError, Migrator};

use super::{Result, Store, StoreError};

/// Migrations embedded from the repository's `migrations/` folder.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// A migration applied to the database that this build does not know: a
/// newer release migrated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unknown {
    /// Its version (the file name's number).
    pub version: i64,
    /// Its description (the rest of the file name).
    pub description: String,
}

/// Why `migrate` refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateRefused {
    /// The database carries migrations this build does not have.
    #[error(
        "the database was migrated by a newer release: it has migration{} {} that this build does \
         not know. `migrate` never takes a schema backwards; run the newer release's `migrate`, or \
         run this build's `serve`, which runs against a newer schema",
        if .0.len() == 1 { "" } else { "s" },
        .0.iter().map(|u| format!("{} ({})", u.version, u.description)).collect::<Vec<_>>().join(", ")
    )]
    Newer(Vec<Unknown>),
    /// Anything else (the database, a failed migration).
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn store_error(e: MigrateError) -> StoreError {
    match e {
        MigrateError::Execute(e) => StoreError::from(e),
        other => StoreError::Other(other.to_string()),
    }
}

/// This build's migrations, accepting applied ones it does not know.
fn tolerant() -> Migrator {
    let mut m = Migrator::with_migrations(MIGRATOR.iter().cloned().collect());
    m.set_ignore_missing(true);
    m
}

impl Store {
    /// Applies this build's pending migrations. A database that a newer
    /// release has migrated further is accepted (its migrations only added,
    /// by the policy above); those migrations are returned so the caller
    /// can say so.
    pub async fn migrate(&self) -> Result<Vec<Unknown>> {
        tolerant().run(&self.pool).await.map_err(store_error)?;
        self.unknown_migrations().await
    }

    /// Applies this build's pending migrations, refusing a database that
    /// has migrations this build does not know (the `migrate` command).
    pub async fn migrate_strict(&self) -> std::result::Result<(), MigrateRefused> {
        // Asked first so the refusal names them; sqlx would refuse anyway
        // (`VersionMissing`), with only a number.
        match self.unknown_migrations().await {
            Ok(newer) if !newer.is_empty() => return Err(MigrateRefused::Newer(newer)),
            // No migrations table yet, or the database is down: the run
            // below creates it or says what is wrong.
            _ => {}
        }
        MIGRATOR.run(&self.pool).await.map_err(|e| match e {
            MigrateError::VersionMissing(v) => MigrateRefused::Newer(vec![Unknown {
                version: v,
                description: "unknown".to_owned(),
            }]),
            other => MigrateRefused::Store(store_error(other)),
        })
    }

    /// Every applied migration: version and description.
    async fn applied(&self) -> Result<BTreeMap<i64, String>> {
        let rows = sqlx::query("SELECT version, description FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("version")?, r.try_get("description")?)))
            .collect()
    }

    /// Applied migrations this build does not have.
    pub async fn unknown_migrations(&self) -> Result<Vec<Unknown>> {
        Ok(self
            .applied()
            .await?
            .into_iter()
            .filter(|(v, _)| !MIGRATOR.version_exists(*v))
            .map(|(version, description)| Unknown { version, description })
            .collect())
    }

    /// Ready: the database answers and every migration of this build is
    /// applied. Migrations of a newer release beside them do not matter.
    pub async fn ready(&self) -> Result<(), String> {
        let applied = self.applied().await.map_err(|e| match e {
            StoreError::Unavailable(e) => format!("database: {e}"),
            // The database answered: the migrations table is missing.
            other => format!("migrations not applied ({other})"),
        })?;
        let missing: Vec<String> = MIGRATOR
            .iter()
            .filter(|m| !applied.contains_key(&m.version))
            .map(|m| format!("{} ({})", m.version, m.description))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "migrations: the database lacks {} that this build needs; run `migrate`",
                missing.join(", ")
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::MIGRATOR;

    /// The first statement of `sql` that removes or rewrites what the
    /// previous release reads (a `DROP`, a rename, a type change, a new
    /// `NOT NULL` column without a default), unless the file says
    /// `-- contract: <why the previous release no longer runs>`.
    fn contracting(sql: &str) -> Option<String> {
        let sql = sql.to_ascii_uppercase();
        if sql.contains("-- CONTRACT:") {
            return None;
        }
        let code: String = sql
            .lines()
            .map(|l| l.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ");
        code.split(';')
            .find(|statement| {
                let words: Vec<&str> = statement
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| !w.is_empty())
                    .collect();
                let has = |w: &str| words.contains(&w);
                let pair = |a: &str, b: &str| words.windows(2).any(|p| p[0] == a && p[1] == b);
                has("DROP")
                    || has("RENAME")
                    || has("TRUNCATE")
                    || pair("ALTER", "COLUMN")
                    || (pair("ALTER", "TABLE") && pair("NOT", "NULL") && !has("DEFAULT"))
            })
            .map(|s| s.trim().to_owned())
    }

    /// The policy, checked on the files: a migration only adds.
    #[test]
    fn migrations_only_expand_unless_marked_contract() {
        for m in MIGRATOR.iter() {
            if let Some(statement) = contracting(m.sql.as_str()) {
                panic!(
                    "migration {} ({}) removes or rewrites what the previous release reads:\n\
                     {statement}\nmark it `-- contract: …` only once no replica of the release \
                     before runs",
                    m.version, m.description
                );
            }
        }
    }

    #[test]
    fn the_check_tells_expand_from_contract() {
        for ok in [
            "CREATE TABLE t (a TEXT NOT NULL);",
            "CREATE INDEX IF NOT EXISTS calls_created_at ON calls (created_at);",
            "ALTER TABLE calls ADD COLUMN tag TEXT;",
            "ALTER TABLE calls ADD COLUMN n BIGINT NOT NULL DEFAULT 0;",
            "-- we never DROP anything here\nCREATE TABLE x (a TEXT);",
            "-- contract: 0.3 is the oldest release running\nDROP TABLE old;",
        ] {
            assert_eq!(contracting(ok), None, "{ok}");
        }
        for bad in [
            "DROP TABLE agent_reports;",
            "DROP INDEX routes_matcher;",
            "ALTER TABLE calls RENAME COLUMN pop TO site;",
            "ALTER TABLE calls ALTER COLUMN caller TYPE BIGINT;",
            "ALTER TABLE calls ADD COLUMN tag TEXT NOT NULL;",
            "CREATE TABLE y (a TEXT);\nALTER TABLE calls DROP COLUMN metadata;",
        ] {
            assert!(contracting(bad).is_some(), "{bad}");
        }
    }
}

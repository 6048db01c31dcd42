//! Backups of the embedded SQLite database: `VACUUM INTO` writes a
//! consistent copy from one read transaction, so it runs beside a serving
//! control plane (WAL mode: readers never block the writer); and what a
//! copy holds, to check it before it is trusted.

use std::path::Path;

use sqlx::Row;
use sqlx::any::AnyPoolOptions;

use super::{Result, Store, StoreError};

/// What a database holds, as a backup's report shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// Rows of `calls`.
    pub calls: i64,
    /// Rows of `routes`.
    pub routes: i64,
    /// Agent tokens.
    pub tokens: i64,
    /// The newest migration applied.
    pub schema: i64,
    /// Whether every migration of this build is applied (else `migrate`,
    /// which `serve` runs, brings it up).
    pub current: bool,
}

/// `sqlite://PATH?mode=MODE`, with the characters sqlx decodes in a path
/// (`%`, `?`, `#`) encoded.
pub fn sqlite_url(path: &Path, mode: &str) -> String {
    let mut p = String::new();
    for c in path.display().to_string().chars() {
        match c {
            '%' => p.push_str("%25"),
            '?' => p.push_str("%3F"),
            '#' => p.push_str("%23"),
            c => p.push(c),
        }
    }
    format!("sqlite://{p}?mode={mode}")
}

impl Store {
    /// Opens an SQLite file by itself, read-only (a backup, before it is
    /// trusted): one connection, no settings changed.
    pub async fn open_sqlite_file(path: &Path) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect(&sqlite_url(path, "ro"))
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Store::from_pool(pool, true))
    }

    /// Writes a consistent copy of the database to `path`, which must not
    /// exist. SQLite only.
    pub async fn vacuum_into(&self, path: &Path) -> Result<()> {
        if !self.sqlite {
            return Err(StoreError::Other("VACUUM INTO is SQLite's; use pg_dump".into()));
        }
        let target = path
            .to_str()
            .ok_or_else(|| StoreError::Other(format!("{} is not UTF-8", path.display())))?;
        sqlx::query("VACUUM INTO $1")
            .bind(target)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// SQLite's `PRAGMA integrity_check`: `ok`, or what is wrong.
    pub async fn integrity(&self) -> Result<String> {
        let rows = sqlx::query("PRAGMA integrity_check")
            .fetch_all(&self.pool)
            .await?;
        let lines: Vec<String> = rows
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<std::result::Result<_, _>>()?;
        Ok(lines.join("; "))
    }

    /// What the database holds. Fails on a database that is not the control
    /// plane's (no `_sqlx_migrations` or `calls`).
    pub async fn contents(&self) -> Result<Contents> {
        let one = |sql: &'static str| async move {
            let row = sqlx::query(sql).fetch_one(&self.pool).await?;
            Ok::<i64, StoreError>(row.try_get::<Option<i64>, _>(0)?.unwrap_or(0))
        };
        let calls = one("SELECT COUNT(*) FROM calls").await?;
        let routes = one("SELECT COUNT(*) FROM routes").await?;
        let tokens = one("SELECT COUNT(*) FROM agent_tokens").await?;
        let schema = one("SELECT MAX(version) FROM _sqlx_migrations").await?;
        Ok(Contents {
            calls,
            routes,
            tokens,
            schema,
            current: self.ready().await.is_ok(),
        })
    }
}

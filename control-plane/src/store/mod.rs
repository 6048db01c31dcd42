//! Store: every database access (sqlx `Any`, so one code path serves SQLite
//! and Postgres). Each write is one transaction; idempotency claims share the
//! transaction of the write they protect, so nothing is half-written.
//!
//! This module opens the pool and holds what every table shares (errors,
//! the Idempotency-Key types); one module per resource holds its SQL:
//! `calls` (with `batch`, group commit), `routes`,
//! `audit`, `fleet` (reports and their history), `tokens`, `operators`
//! (operator tokens and fleet-page sessions), `idempotency` (the claims),
//! `migrations` (the schema and the policy that lets two releases share it),
//! `retention` (deleting old rows in bounded batches) and `backup` (SQLite's
//! online copy).
//!
//! **Invariant:** all SQL here is static text with `$n` parameters; nothing
//! is built by string concatenation.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::IntCounter;
use sqlx::AnyConnection;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Connection, Executor};

mod audit;
mod backup;
mod batch;
mod calls;
mod fleet;
mod idempotency;
mod migrations;
mod operators;
mod recordings;
mod retention;
mod routes;
mod tokens;

use crate::config::Config;
use batch::{Batcher, Counters};

pub use audit::AuditRow;
pub use backup::{Contents, sqlite_url};
pub use calls::{CallRow, NewCall};
pub use fleet::{BUCKET_MS, EventRow, ReportRow, SampleRow, state_rank};
pub use migrations::{MIGRATOR, MigrateRefused, Unknown};
pub use operators::SessionRow;
pub use recordings::Recorded;
pub use retention::{PurgedCalls, Table};
pub use routes::RouteRow;

/// Prefix, call type, priority and window key: what must be unique among
/// routes. Re-exported from [`crate::routing`], which derives it from a rule.
pub use crate::routing::Matcher;

/// Why a database operation failed, in the terms the API needs.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is overloaded: retry later (503).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness rule was broken (409).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Anything else: a bug or a schema problem (500).
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &e {
            E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::Protocol(_) => {
                StoreError::Unavailable(e.to_string())
            }
            E::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            E::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                if db.is_unique_violation() {
                    StoreError::Conflict(db.message().to_owned())
                } else if code.starts_with("08")
                    || code.starts_with("57")
                    || code.starts_with("53")
                    // Read-only (a Postgres primary demoted in a failover, or
                    // a replica behind the writer's address): retry later.
                    || code == "25006"
                    // Serialisation failure and deadlock: the next try succeeds.
                    || code == "40001"
                    || code == "40P01"
                    // SQLite: BUSY, LOCKED, READONLY, IOERR and their extended codes.
                    || matches!(code.as_str(), "5" | "6" | "8" | "10" | "261" | "262" | "517")
                {
                    StoreError::Unavailable(e.to_string())
                } else {
                    StoreError::Other(e.to_string())
                }
            }
            _ => StoreError::Other(e.to_string()),
        }
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A response kept for an Idempotency-Key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// An Idempotency-Key and the hash of the request it came with.
#[derive(Debug, Clone)]
pub struct Idem {
    pub key: String,
    pub request_hash: String,
}

/// What happened to a write guarded by an Idempotency-Key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// First request with this key (or no key): the write was done.
    Done(T),
    /// An earlier request with this key and the same body: its response.
    Replay(StoredResponse),
    /// An earlier request used this key with a different body.
    Mismatch,
}

/// The database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    sqlite: bool,
    /// Group commit for new calls, started on first use.
    batcher: Arc<OnceLock<Batcher>>,
    /// How many batch statements may run at once.
    batch_slots: usize,
    /// What the batcher counts; see [`Store::counting_batches`].
    batch_counters: Counters,
}

/// Pooled connections idle longer than this are pinged before use.
const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Store {
    /// Opens a pool (lazily: a database that is down at start is not fatal,
    /// `/readyz` says so). SQLite gets WAL and one connection.
    pub async fn open(config: &Config) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let url = config.database_connect_url();
        let sqlite = url.expose().starts_with("sqlite:");
        if sqlite && config.database_url.is_none() {
            std::fs::create_dir_all(&config.data_dir)
                .map_err(|e| anyhow::anyhow!("cannot create data_dir {}: {e}", config.data_dir.display()))?;
        }
        let background_checkpoints = !config.database.sqlite_checkpoint_interval.is_zero();
        let opts = AnyPoolOptions::new()
            .acquire_timeout(config.database.acquire_timeout)
            .max_connections(if sqlite {
                1
            } else {
                config.database.max_connections
            })
            // A ping before every checkout costs a round trip per request;
            // only connections idle for a while are checked (a busy one
            // would have failed its last query if the server had gone).
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > IDLE_PING_AFTER {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if conn.backend_name().eq_ignore_ascii_case("sqlite") {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                        if background_checkpoints {
                            // `checkpoint_sqlite` does it off the request path.
                            conn.execute("PRAGMA wal_autocheckpoint = 0").await?;
                        }
                    }
                    Ok(())
                })
            });
        // The URL carries the password (from the file); sqlx's errors here
        // describe the URL's shape, never quote it.
        let pool = opts
            .connect_lazy(url.expose())
            .map_err(|e| anyhow::anyhow!("database_url {}: {e}", crate::redact(&config.database_url())))?;
        let mut store = Store::from_pool(pool, sqlite);
        // SQLite has one connection: one batch at a time.
        store.batch_slots = if sqlite {
            1
        } else {
            config.database.batch_writers as usize
        };
        Ok(store)
    }

    /// A store on `pool`, writing new calls one statement each until
    /// [`Store::open`] sets the group commit's writers.
    fn from_pool(pool: AnyPool, sqlite: bool) -> Store {
        Store {
            pool,
            sqlite,
            batcher: Arc::new(OnceLock::new()),
            batch_slots: 1,
            batch_counters: Counters {
                batches: IntCounter::new("batches", "group-commit statements").expect("static metric name"),
                calls: IntCounter::new("batched_calls", "calls in them").expect("static metric name"),
            },
        }
    }

    /// The store counting its group-commit statements and their calls in
    /// these counters (the service's registered metrics). Call it before the
    /// store writes its first call.
    pub fn counting_batches(mut self, batches: IntCounter, calls: IntCounter) -> Store {
        self.batch_counters = Counters { batches, calls };
        self
    }

    /// Copies SQLite's write-ahead log into the database file every
    /// `every`, on a connection of its own, so that the fsync of a
    /// checkpoint never lands inside a request's commit (it did with
    /// SQLite's automatic checkpoints and showed as a 20–30 ms p99).
    /// Returns when `stop` changes. No-op for Postgres.
    pub async fn checkpoint_sqlite(
        &self,
        url: &str,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        if !self.sqlite || every.is_zero() {
            return;
        }
        let mut conn: Option<AnyConnection> = None;
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
            }
            if conn.is_none() {
                conn = AnyConnection::connect(url).await.ok();
            }
            if let Some(c) = conn.as_mut() {
                // PASSIVE: never waits for or blocks the writer.
                if let Err(e) = c.execute("PRAGMA wal_checkpoint(PASSIVE)").await {
                    tracing::debug!(error = %e, "SQLite checkpoint failed; reconnecting");
                    conn = None;
                }
            }
        }
    }

    /// Whether this is the embedded SQLite database.
    pub fn is_sqlite(&self) -> bool {
        self.sqlite
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Pings the database (used by `/readyz` and the DB-up gauge).
pub async fn ping(pool: &AnyPool) -> Result<()> {
    let mut c = pool.acquire().await?;
    c.ping().await?;
    Ok(())
}

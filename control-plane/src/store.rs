//! Store: every database access (sqlx `Any`, so one code path serves SQLite
//! and Postgres). Each write is one transaction; idempotency claims share the
//! transaction of the write they protect, so nothing is half-written.
//!
//! **Invariant:** all SQL here is static text with `$n` parameters; nothing
//! is built by string concatenation.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::IntCounter;
use sqlx::AnyConnection;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Connection, Executor, Row};

mod batch;

use crate::config::Config;
use crate::intake::Priority;
use crate::record::{self, EventKind};
use batch::{Batcher, Counters, Written};

/// Migrations embedded from the repository's `migrations/` folder.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

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

/// Prefix, call type, priority and window key: what must be unique.
pub type Matcher = (String, String, String, String);

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

/// A new call row.
#[derive(Debug, Clone)]
pub struct NewCall {
    pub id: String,
    pub created_at: i64,
    pub pop: String,
    pub caller: Option<String>,
    pub destination: String,
    pub call_type: String,
    pub priority: String,
    /// JSON object.
    pub metadata: String,
    /// JSON: `{"route", "fallback", "fallback_reason"}`.
    pub decision: String,
}

/// A stored call with its record.
#[derive(Debug, Clone)]
pub struct CallRow {
    pub call: NewCall,
    pub folded: record::Folded,
    pub events: Vec<(EventKind, i64)>,
}

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

/// The database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    sqlite: bool,
    /// Group commit for new calls (Postgres), started on first use.
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
        let url = config.database_url();
        let sqlite = url.starts_with("sqlite:");
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
        let pool = opts
            .connect_lazy(&url)
            .map_err(|e| anyhow::anyhow!("database_url: {e}"))?;
        Ok(Store {
            pool,
            sqlite,
            batcher: Arc::new(OnceLock::new()),
            batch_slots: config.database.batch_writers as usize,
            batch_counters: Counters {
                batches: IntCounter::new("batches", "group-commit statements").expect("static metric name"),
                calls: IntCounter::new("batched_calls", "calls in them").expect("static metric name"),
            },
        })
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

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => StoreError::from(e),
            other => StoreError::Other(other.to_string()),
        })
    }

    /// Ready: the database answers and every embedded migration is applied.
    pub async fn ready(&self) -> Result<(), String> {
        let want = MIGRATOR.migrations.iter().map(|m| m.version).max().unwrap_or(0);
        let row = sqlx::query("SELECT MAX(version) AS v FROM _sqlx_migrations")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| match StoreError::from(e) {
                StoreError::Unavailable(e) => format!("database: {e}"),
                // The database answered: the migrations table is missing.
                other => format!("migrations not applied ({other})"),
            })?;
        let have: Option<i64> = row.try_get("v").map_err(|e| e.to_string())?;
        if have.unwrap_or(0) < want {
            return Err(format!(
                "migrations: database at {}, this build needs {want}",
                have.unwrap_or(0)
            ));
        }
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- routes ----

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
        let other = sqlx::query(
            "SELECT name FROM routes WHERE prefix = $1 AND call_type = $2 AND priority = $3 \
             AND window_key = $4 AND name <> $5",
        )
        .bind(&matcher.0)
        .bind(&matcher.1)
        .bind(&matcher.2)
        .bind(&matcher.3)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(other) = other {
            let other: String = other.try_get("name")?;
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
        let now = now_ms();
        sqlx::query(
            "INSERT INTO routes (name, prefix, call_type, priority, window_key, spec, revision, \
             route_version, updated_at, updated_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (name) DO UPDATE SET prefix = excluded.prefix, \
             call_type = excluded.call_type, priority = excluded.priority, \
             window_key = excluded.window_key, spec = excluded.spec, revision = excluded.revision, \
             route_version = excluded.route_version, updated_at = excluded.updated_at, \
             updated_by = excluded.updated_by",
        )
        .bind(name)
        .bind(&matcher.0)
        .bind(&matcher.1)
        .bind(&matcher.2)
        .bind(&matcher.3)
        .bind(spec)
        .bind(revision)
        .bind(version)
        .bind(now)
        .bind(actor)
        .execute(&mut *tx)
        .await?;
        let action = if before_spec.is_some() { "update" } else { "create" };
        audit(
            &mut tx,
            now,
            actor,
            request_id,
            action,
            name,
            version,
            before_spec.as_deref(),
            Some(spec),
        )
        .await?;
        tx.commit().await?;
        Ok((
            RouteRow {
                name: name.to_owned(),
                spec: spec.to_owned(),
                revision,
                route_version: version,
                updated_at: now,
                updated_by: actor.to_owned(),
            },
            before_spec.is_none(),
        ))
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
        audit(
            &mut tx,
            now_ms(),
            actor,
            request_id,
            "delete",
            name,
            version,
            Some(&before),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(Some(version))
    }

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
            .bind(&m.0)
            .bind(&m.1)
            .bind(&m.2)
            .bind(&m.3)
            .bind(spec)
            .bind(version)
            .bind(now)
            .bind(actor)
            .execute(&mut *tx)
            .await?;
        }
        let what = format!("{} routes", routes.len());
        audit(&mut tx, now, actor, None, "bulk", &what, version, None, None).await?;
        tx.commit().await?;
        Ok(version)
    }

    // ---- tokens ----

    /// Stores the hash of a new agent token for `pop`.
    pub async fn insert_token(&self, hash: &str, id: &str, pop: &str) -> Result<()> {
        sqlx::query("INSERT INTO agent_tokens (token_hash, id, pop, created_at) VALUES ($1, $2, $3, $4)")
            .bind(hash)
            .bind(id)
            .bind(pop)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Agent tokens (never the tokens themselves): (id, pop, created_at ms),
    /// oldest first, optionally for one PoP.
    pub async fn list_tokens(&self, pop: Option<&str>) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT id, pop, created_at FROM agent_tokens WHERE $1 = '' OR pop = $1 ORDER BY created_at, id",
        )
        .bind(pop.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("pop")?, r.try_get("created_at")?)))
            .collect()
    }

    /// Deletes the token with this id; its PoP, or `None` if there is none.
    pub async fn revoke_token(&self, id: &str) -> Result<Option<String>> {
        let row = sqlx::query("DELETE FROM agent_tokens WHERE id = $1 RETURNING pop")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("pop")).transpose()?)
    }

    /// The PoP a token hash belongs to.
    pub async fn token_pop(&self, hash: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT pop FROM agent_tokens WHERE token_hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("pop")).transpose()?)
    }

    // ---- calls ----

    /// Stores a call and, with a key, its response, atomically. A concurrent
    /// duplicate waits on the key's row (Postgres) or the single connection
    /// (SQLite) and then replays.
    pub async fn create_call(
        &self,
        idem: Option<&Idem>,
        call: &NewCall,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<Outcome<()>> {
        // Fast paths: one statement, one round trip, atomic on its own.
        match idem {
            None => {
                insert_call(&self.pool, call).await?;
                return Ok(Outcome::Done(()));
            }
            Some(idem) if !self.sqlite && call.priority == Priority::Normal.as_str() => {
                // Written together with the calls that arrive meanwhile
                // (batch.rs); a key that exists is decided below.
                let batcher = self.batcher.get_or_init(|| {
                    Batcher::start(self.pool.clone(), self.batch_slots, self.batch_counters.clone())
                });
                match batcher.write(idem, call, response).await {
                    Written::Created => return Ok(Outcome::Done(())),
                    Written::Failed(e) => return Err(e),
                    Written::Exists | Written::Individually => {}
                }
            }
            Some(idem) if !self.sqlite => {
                // The claim and the call in one statement (Postgres allows
                // data-modifying CTEs; SQLite does not). Zero rows means the
                // key exists: the transactional path below decides between
                // replay, mismatch and an expired key.
                let done = sqlx::query(
                    "WITH claim AS (INSERT INTO idempotency \
                     (key, request_hash, created_at, status, content_type, body) \
                     VALUES ($10, $11, $2, $12, $13, $14) ON CONFLICT (key) DO NOTHING \
                     RETURNING key) \
                     INSERT INTO calls (id, created_at, pop, caller, destination, call_type, \
                     priority, metadata, decision, state, updated_at) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, 'initiated', $2 \
                     WHERE EXISTS (SELECT 1 FROM claim)",
                )
                .bind(&call.id)
                .bind(call.created_at)
                .bind(&call.pop)
                .bind(call.caller.as_deref())
                .bind(&call.destination)
                .bind(&call.call_type)
                .bind(&call.priority)
                .bind(&call.metadata)
                .bind(&call.decision)
                .bind(&idem.key)
                .bind(&idem.request_hash)
                .bind(i64::from(response.status))
                .bind(&response.content_type)
                .bind(&response.body)
                .execute(&self.pool)
                .await?;
                if done.rows_affected() == 1 {
                    return Ok(Outcome::Done(()));
                }
            }
            Some(_) => {}
        }
        let mut tx = self.pool.begin().await?;
        if let Some(idem) = idem {
            match claim(&mut tx, idem, Some(response), retention).await? {
                Claim::Claimed => {}
                Claim::Replay(r) => return Ok(Outcome::Replay(r)),
                Claim::Mismatch => return Ok(Outcome::Mismatch),
            }
        }
        insert_call(&mut *tx, call).await?;
        tx.commit().await?;
        Ok(Outcome::Done(()))
    }

    /// Group commit so far: (statements, calls they carried).
    pub fn call_batches(&self) -> (u64, u64) {
        (self.batch_counters.batches.get(), self.batch_counters.calls.get())
    }

    /// The PoP that made a call, if the call exists.
    pub async fn call_pop(&self, id: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT pop FROM calls WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("pop")).transpose()?)
    }

    /// A call and its record.
    pub async fn get_call(&self, id: &str) -> Result<Option<CallRow>> {
        let mut conn = self.pool.acquire().await?;
        read_call(&mut conn, id).await
    }

    /// Records an event (each kind once; a repeat is a no-op) and refolds
    /// the record. `None`: no such call. The call row is locked first so
    /// concurrent events for one call fold in turn.
    pub async fn record_event<F>(
        &self,
        idem: Option<&Idem>,
        call_id: &str,
        kind: EventKind,
        at: i64,
        retention: Duration,
        respond: F,
    ) -> Result<Outcome<Option<CallRow>>>
    where
        F: FnOnce(&CallRow) -> StoredResponse,
    {
        let mut tx = self.pool.begin().await?;
        if let Some(idem) = idem {
            match claim(&mut tx, idem, None, retention).await? {
                Claim::Claimed => {}
                Claim::Replay(r) => return Ok(Outcome::Replay(r)),
                Claim::Mismatch => return Ok(Outcome::Mismatch),
            }
        }
        let now = now_ms();
        let locked = sqlx::query("UPDATE calls SET updated_at = $2 WHERE id = $1")
            .bind(call_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if locked.rows_affected() == 0 {
            // Rolls back the claim too: a 404 is not kept for the key.
            return Ok(Outcome::Done(None));
        }
        sqlx::query(
            "INSERT INTO call_events (call_id, kind, at, received_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (call_id, kind) DO NOTHING",
        )
        .bind(call_id)
        .bind(kind.as_str())
        .bind(at)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let events = read_events(&mut tx, call_id).await?;
        let f = record::fold(&events);
        sqlx::query(
            "UPDATE calls SET state = $2, ringing_at = $3, answered_at = $4, ended_at = $5, \
             duration_ms = $6 WHERE id = $1",
        )
        .bind(call_id)
        .bind(f.state)
        .bind(f.ringing_at)
        .bind(f.answered_at)
        .bind(f.ended_at)
        .bind(f.duration_ms)
        .execute(&mut *tx)
        .await?;
        let row = read_call(&mut tx, call_id).await?;
        if let (Some(idem), Some(row)) = (idem, &row) {
            finish_claim(&mut tx, &idem.key, &respond(row)).await?;
        }
        tx.commit().await?;
        Ok(Outcome::Done(row))
    }

    // ---- fleet ----

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
        if let Some(idem) = idem {
            match claim(&mut tx, idem, Some(response), retention).await? {
                Claim::Claimed => {}
                Claim::Replay(r) => return Ok(Outcome::Replay(r)),
                Claim::Mismatch => return Ok(Outcome::Mismatch),
            }
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

    /// Deletes idempotency keys older than `retention`; returns how many.
    pub async fn purge_idempotency(&self, retention: Duration) -> Result<u64> {
        let cutoff = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let r = sqlx::query("DELETE FROM idempotency WHERE created_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Number of calls stored (tests and benchmarks).
    pub async fn count_calls(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM calls")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }
}

async fn insert_call<'e, E>(executor: E, call: &NewCall) -> Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(
        "INSERT INTO calls (id, created_at, pop, caller, destination, call_type, priority, \
         metadata, decision, state, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'initiated', $2)",
    )
    .bind(&call.id)
    .bind(call.created_at)
    .bind(&call.pop)
    .bind(call.caller.as_deref())
    .bind(&call.destination)
    .bind(&call.call_type)
    .bind(&call.priority)
    .bind(&call.metadata)
    .bind(&call.decision)
    .execute(executor)
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

#[allow(clippy::too_many_arguments)]
async fn audit(
    conn: &mut AnyConnection,
    at: i64,
    actor: &str,
    request_id: Option<&str>,
    action: &str,
    name: &str,
    version: i64,
    before: Option<&str>,
    after: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO route_audit (id, at, actor, request_id, action, name, route_version, \
         before_spec, after_spec) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(at)
    .bind(actor)
    .bind(request_id)
    .bind(action)
    .bind(name)
    .bind(version)
    .bind(before)
    .bind(after)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

enum Claim {
    Claimed,
    Replay(StoredResponse),
    Mismatch,
}

/// Claims an idempotency key inside the caller's transaction. With
/// `response` the final answer is stored at once; without it a placeholder
/// is stored and `finish_claim` fills it before commit (no other
/// transaction can see the placeholder).
async fn claim(
    conn: &mut AnyConnection,
    idem: &Idem,
    response: Option<&StoredResponse>,
    retention: Duration,
) -> Result<Claim> {
    let now = now_ms();
    let placeholder = StoredResponse {
        status: 0,
        content_type: String::new(),
        body: String::new(),
    };
    let resp = response.unwrap_or(&placeholder);
    // Two tries: the second after deleting an expired row for the key.
    for _ in 0..2 {
        let inserted = sqlx::query(
            "INSERT INTO idempotency (key, request_hash, created_at, status, content_type, body) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key) DO NOTHING",
        )
        .bind(&idem.key)
        .bind(&idem.request_hash)
        .bind(now)
        .bind(i64::from(resp.status))
        .bind(&resp.content_type)
        .bind(&resp.body)
        .execute(&mut *conn)
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok(Claim::Claimed);
        }
        let row = sqlx::query(
            "SELECT request_hash, created_at, status, content_type, body FROM idempotency \
             WHERE key = $1",
        )
        .bind(&idem.key)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else {
            // Purged between the two statements: claim again.
            continue;
        };
        let created_at: i64 = row.try_get("created_at")?;
        let cutoff = now - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        if created_at < cutoff {
            sqlx::query("DELETE FROM idempotency WHERE key = $1 AND created_at < $2")
                .bind(&idem.key)
                .bind(cutoff)
                .execute(&mut *conn)
                .await?;
            continue;
        }
        let hash: String = row.try_get("request_hash")?;
        if hash != idem.request_hash {
            return Ok(Claim::Mismatch);
        }
        let status: i64 = row.try_get("status")?;
        return Ok(Claim::Replay(StoredResponse {
            status: u16::try_from(status).unwrap_or(500),
            content_type: row.try_get("content_type")?,
            body: row.try_get("body")?,
        }));
    }
    Err(StoreError::Unavailable(
        "idempotency key is being expired concurrently; retry".into(),
    ))
}

async fn finish_claim(conn: &mut AnyConnection, key: &str, resp: &StoredResponse) -> Result<()> {
    sqlx::query("UPDATE idempotency SET status = $2, content_type = $3, body = $4 WHERE key = $1")
        .bind(key)
        .bind(i64::from(resp.status))
        .bind(&resp.content_type)
        .bind(&resp.body)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn read_events(conn: &mut AnyConnection, call_id: &str) -> Result<Vec<(EventKind, i64)>> {
    let rows = sqlx::query("SELECT kind, at FROM call_events WHERE call_id = $1 ORDER BY at, kind")
        .bind(call_id)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .filter_map(|r| {
            let kind: String = match r.try_get("kind") {
                Ok(k) => k,
                Err(e) => return Some(Err(e.into())),
            };
            let at: i64 = match r.try_get("at") {
                Ok(a) => a,
                Err(e) => return Some(Err(e.into())),
            };
            EventKind::parse(&kind).map(|k| Ok((k, at)))
        })
        .collect()
}

async fn read_call(conn: &mut AnyConnection, id: &str) -> Result<Option<CallRow>> {
    let row = sqlx::query(
        "SELECT id, created_at, pop, caller, destination, call_type, priority, metadata, \
         decision FROM calls WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    let call = NewCall {
        id: r.try_get("id")?,
        created_at: r.try_get("created_at")?,
        pop: r.try_get("pop")?,
        caller: r.try_get("caller")?,
        destination: r.try_get("destination")?,
        call_type: r.try_get("call_type")?,
        priority: r.try_get("priority")?,
        metadata: r.try_get("metadata")?,
        decision: r.try_get("decision")?,
    };
    let events = read_events(conn, id).await?;
    Ok(Some(CallRow {
        folded: record::fold(&events),
        call,
        events,
    }))
}

/// Pings the database (used by `/readyz` and the DB-up gauge).
pub async fn ping(pool: &AnyPool) -> Result<()> {
    let mut c = pool.acquire().await?;
    c.ping().await?;
    Ok(())
}

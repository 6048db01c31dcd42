//! Calls: the `calls` and `call_events` tables. A new call and its
//! Idempotency-Key claim are written together (normal calls by the group
//! commit in `batch`); events are folded into the call's record
//! in the transaction that adds them.

use std::time::Duration;

use sqlx::{AnyConnection, AnyPool, Row};

use super::batch::{Batcher, Dialect, Written};
use super::idempotency::{claim, finish_claim};
use super::{Idem, Outcome, Result, Store, StoredResponse, now_ms};
use crate::intake::Priority;
use crate::record::{self, EventKind};

/// How [`Store::change_call`] went.
pub(super) enum CallChange<T> {
    /// The change may go on: its transaction and the time it began.
    Open(sqlx::Transaction<'static, sqlx::Any>, i64),
    /// The request's idempotency key already has an answer.
    Answered(Outcome<T>),
    /// No such call.
    NoCall,
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
    pub recordings: Vec<crate::intake::Recording>,
}

impl Store {
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
            Some(idem) if call.priority == Priority::Normal.as_str() => {
                // Written together with the calls that arrive meanwhile
                // (batch.rs); a key that exists is decided below.
                match self.batcher().write(idem, call, response).await {
                    Written::Created => return Ok(Outcome::Done(())),
                    Written::Failed(e) => return Err(e),
                    Written::Exists | Written::Individually => {}
                }
            }
            Some(idem) if !self.sqlite => {
                if insert_call_claiming(&self.pool, idem, call, response).await? {
                    return Ok(Outcome::Done(()));
                }
            }
            Some(_) => {}
        }
        let mut tx = self.pool.begin().await?;
        if let Some(idem) = idem
            && let Some(early) = claim(&mut tx, idem, Some(response), retention).await?.answered()
        {
            return Ok(early);
        }
        insert_call(&mut *tx, call).await?;
        tx.commit().await?;
        Ok(Outcome::Done(()))
    }

    /// The group-commit writer, started on first use.
    fn batcher(&self) -> &Batcher {
        self.batcher.get_or_init(|| {
            let dialect = if self.sqlite {
                Dialect::Sqlite
            } else {
                Dialect::Postgres
            };
            Batcher::start(
                self.pool.clone(),
                dialect,
                self.batch_slots,
                self.batch_counters.clone(),
            )
        })
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
    /// Opens a change to one call (an event, a recording): the transaction,
    /// the claim of the request's idempotency key (an answer already stored
    /// for it ends the change), and the call's row locked, so concurrent
    /// changes to one call apply one after the other. `NoCall` rolls back
    /// the claim too: a 404 is not kept for the key.
    pub(super) async fn change_call<T>(
        &self,
        idem: Option<&Idem>,
        call_id: &str,
        retention: Duration,
    ) -> Result<CallChange<T>> {
        let mut tx = self.pool.begin().await?;
        if let Some(idem) = idem
            && let Some(early) = claim(&mut tx, idem, None, retention).await?.answered()
        {
            return Ok(CallChange::Answered(early));
        }
        let now = now_ms();
        let locked = sqlx::query("UPDATE calls SET updated_at = $2 WHERE id = $1")
            .bind(call_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if locked.rows_affected() == 0 {
            return Ok(CallChange::NoCall);
        }
        Ok(CallChange::Open(tx, now))
    }

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
        let (mut tx, now) = match self.change_call(idem, call_id, retention).await? {
            CallChange::Open(tx, now) => (tx, now),
            CallChange::Answered(early) => return Ok(early),
            CallChange::NoCall => return Ok(Outcome::Done(None)),
        };
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

    /// Number of calls stored (tests and benchmarks).
    pub async fn count_calls(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM calls")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }
}

/// The claim and the call in one statement (Postgres allows data-modifying
/// CTEs; SQLite does not). `false` means the key exists: the caller's
/// transactional path decides between replay, mismatch and an expired key.
async fn insert_call_claiming(
    pool: &AnyPool,
    idem: &Idem,
    call: &NewCall,
    response: &StoredResponse,
) -> Result<bool> {
    let query = sqlx::query(
        "WITH claim AS (INSERT INTO idempotency \
         (key, request_hash, created_at, status, content_type, body) \
         VALUES ($10, $11, $2, $12, $13, $14) ON CONFLICT (key) DO NOTHING \
         RETURNING key) \
         INSERT INTO calls (id, created_at, pop, caller, destination, call_type, \
         priority, metadata, decision, state, updated_at) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, 'initiated', $2 \
         WHERE EXISTS (SELECT 1 FROM claim)",
    );
    let done = bind_call(query, call)
        .bind(&idem.key)
        .bind(&idem.request_hash)
        .bind(i64::from(response.status))
        .bind(&response.content_type)
        .bind(&response.body)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

async fn insert_call<'e, E>(executor: E, call: &NewCall) -> Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let query = sqlx::query(
        "INSERT INTO calls (id, created_at, pop, caller, destination, call_type, priority, \
         metadata, decision, state, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'initiated', $2)",
    );
    bind_call(query, call).execute(executor).await?;
    Ok(())
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// Binds a new call's columns as `$1`..`$9` (id, created_at, pop, caller,
/// destination, call_type, priority, metadata, decision).
fn bind_call<'q>(query: AnyQuery<'q>, call: &'q NewCall) -> AnyQuery<'q> {
    query
        .bind(&call.id)
        .bind(call.created_at)
        .bind(&call.pop)
        .bind(call.caller.as_deref())
        .bind(&call.destination)
        .bind(&call.call_type)
        .bind(&call.priority)
        .bind(&call.metadata)
        .bind(&call.decision)
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

pub(super) async fn read_call(conn: &mut AnyConnection, id: &str) -> Result<Option<CallRow>> {
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
    let recordings = super::recordings::read_recordings(conn, id).await?;
    Ok(Some(CallRow {
        folded: record::fold(&events),
        call,
        events,
        recordings,
    }))
}

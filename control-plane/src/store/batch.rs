//! Group commit for new calls, on Postgres and on SQLite.
//!
//! Every normal-priority call with an Idempotency-Key is one row in
//! `idempotency` and one in `calls`. Written one call per statement, each
//! call pays its own round trip, its own commit and its own WAL flush; under
//! load Postgres spends more on that than on the rows. The batcher writes the
//! calls that arrive while earlier writes are in flight as one statement: at
//! low load every batch holds one call (no waiting is added), under load
//! batches grow by themselves, up to [`MAX_BATCH`].
//!
//! On Postgres the statement is static SQL with one parameter, the batch as a
//! JSON array (`json_to_recordset`); values are never put into the SQL text.
//! SQLite cannot insert inside a `WITH`, so there a batch is one transaction
//! of two static statements over the same JSON (`json_each`): the claims,
//! returning the keys taken, then the calls of those keys. Its one
//! connection is the single writer either way; what a batch saves there is
//! the per-call round trips to sqlx's SQLite thread and a commit (a WAL
//! append) per call. A call
//! whose key already exists comes back as [`Written::Exists`] and is then
//! handled one by one (replay or mismatch) by the store's transactional path,
//! exactly as without batching. Two calls with the same key never share a
//! batch, and keys are written in sorted order so that two batches cannot
//! deadlock on each other's keys; if a batch fails for any reason but an
//! unreachable database, its calls are written one by one instead, so one bad
//! row cannot fail its neighbours.
//!
//! Emergency calls do not come here: they keep their own path to the database.
//! The queue has no bound of its own and needs none: every call in it holds
//! one of the service's in-flight slots (`limits.max_in_flight`) while it
//! waits.

use std::collections::HashSet;
use std::sync::Arc;

use prometheus::IntCounter;
use serde::Serialize;
use sqlx::{AnyPool, Row};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Idem, NewCall, StoreError, StoredResponse};

/// Most calls written by one statement.
pub const MAX_BATCH: usize = 64;

/// Largest batch parameter, roughly, in bytes. A statement bigger than the
/// socket's initial send buffer (16 KiB on Linux) goes out in two parts, and
/// the second waits for the database's delayed ACK of the first: 40 ms on
/// loopback, seen as every batch of 18 or more calls taking 43 ms.
pub const MAX_BATCH_BYTES: usize = 12 * 1024;

/// What happened to one call sent to the batcher.
#[derive(Debug)]
pub enum Written {
    /// The key was claimed and the call stored, atomically with its batch.
    Created,
    /// The key already exists (or may): decide replay / mismatch one by one.
    Exists,
    /// The batch failed for a reason that may be this call's neighbour's:
    /// write this call on its own.
    Individually,
    /// The database could not be reached.
    Failed(StoreError),
}

struct Job {
    call: NewCall,
    idem: Idem,
    response: StoredResponse,
    reply: oneshot::Sender<Written>,
}

impl Job {
    /// About how many bytes this call adds to the batch parameter.
    fn size(&self) -> usize {
        let c = &self.call;
        let text = [
            &c.id,
            &c.pop,
            &c.destination,
            &c.call_type,
            &c.priority,
            &c.metadata,
            &c.decision,
            &self.idem.key,
            &self.idem.request_hash,
            &self.response.content_type,
            &self.response.body,
        ];
        // Field names, numbers and quoting: about 200 bytes a row.
        200 + c.caller.as_ref().map_or(0, String::len) + text.iter().map(|s| s.len()).sum::<usize>()
    }
}

/// Handle to the batching task; cheap to clone.
#[derive(Clone, Debug)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
}

/// Which database's statements a batch is written with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// Counts statements run and the calls they carried (the service registers
/// them as `detour_cp_db_batches_total` / `detour_cp_db_batched_calls_total`).
#[derive(Clone, Debug)]
pub struct Counters {
    pub batches: IntCounter,
    pub calls: IntCounter,
}

impl Batcher {
    /// Starts the batching task on the current tokio runtime. At most
    /// `in_flight` batch statements run at once (each holds one pooled
    /// connection); the task ends when every handle is dropped.
    pub fn start(pool: AnyPool, dialect: Dialect, in_flight: usize, counters: Counters) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, dialect, rx, in_flight.max(1), counters));
        Batcher { tx }
    }

    /// Writes one call with its key and response.
    pub async fn write(&self, idem: &Idem, call: &NewCall, response: &StoredResponse) -> Written {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            call: call.clone(),
            idem: idem.clone(),
            response: response.clone(),
            reply,
        };
        if self.tx.send(job).is_err() {
            return Written::Individually;
        }
        rx.await.unwrap_or(Written::Individually)
    }
}

async fn run(
    pool: AnyPool,
    dialect: Dialect,
    mut rx: mpsc::UnboundedReceiver<Job>,
    in_flight: usize,
    counters: Counters,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        // Waiting for a free slot is what lets a batch grow: calls that
        // arrive meanwhile queue up and go together.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut keys = HashSet::new();
        keys.insert(first.idem.key.clone());
        let mut bytes = first.size();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(j) if keys.contains(&j.idem.key) => {
                    // Same key as a call in this batch: it goes in the next
                    // one, and will find the key there.
                    held = Some(j);
                    break;
                }
                Ok(j) if bytes + j.size() > MAX_BATCH_BYTES => {
                    held = Some(j);
                    break;
                }
                Ok(j) => {
                    keys.insert(j.idem.key.clone());
                    bytes += j.size();
                    batch.push(j);
                }
                Err(_) => break,
            }
        }
        counters.batches.inc();
        counters.calls.inc_by(batch.len() as u64);
        let pool = pool.clone();
        tokio::spawn(async move {
            match dialect {
                Dialect::Postgres => write_batch(&pool, batch).await,
                Dialect::Sqlite => write_batch_sqlite(&pool, batch).await,
            }
            drop(permit);
        });
    }
}

#[derive(Serialize)]
struct BatchRow<'a> {
    id: &'a str,
    created_at: i64,
    pop: &'a str,
    caller: Option<&'a str>,
    destination: &'a str,
    call_type: &'a str,
    priority: &'a str,
    metadata: &'a str,
    decision: &'a str,
    key: &'a str,
    request_hash: &'a str,
    status: i64,
    content_type: &'a str,
    body: &'a str,
}

const INSERT_BATCH: &str = "WITH v AS (SELECT * FROM json_to_recordset($1::json) AS x(\
     id TEXT, created_at BIGINT, pop TEXT, caller TEXT, destination TEXT, call_type TEXT, \
     priority TEXT, metadata TEXT, decision TEXT, key TEXT, request_hash TEXT, status BIGINT, \
     content_type TEXT, body TEXT)), \
     claim AS (INSERT INTO idempotency (key, request_hash, created_at, status, content_type, body) \
     SELECT key, request_hash, created_at, status, content_type, body FROM v \
     ON CONFLICT (key) DO NOTHING RETURNING key) \
     INSERT INTO calls (id, created_at, pop, caller, destination, call_type, priority, metadata, \
     decision, state, updated_at) \
     SELECT v.id, v.created_at, v.pop, v.caller, v.destination, v.call_type, v.priority, \
     v.metadata, v.decision, 'initiated', v.created_at FROM v JOIN claim ON claim.key = v.key \
     RETURNING id";

/// The batch's rows, in key order.
fn rows(batch: &[Job]) -> Vec<BatchRow<'_>> {
    batch
        .iter()
        .map(|j| BatchRow {
            id: &j.call.id,
            created_at: j.call.created_at,
            pop: &j.call.pop,
            caller: j.call.caller.as_deref(),
            destination: &j.call.destination,
            call_type: &j.call.call_type,
            priority: &j.call.priority,
            metadata: &j.call.metadata,
            decision: &j.call.decision,
            key: &j.idem.key,
            request_hash: &j.idem.request_hash,
            status: i64::from(j.response.status),
            content_type: &j.response.content_type,
            body: &j.response.body,
        })
        .collect()
}

async fn write_batch(pool: &AnyPool, mut batch: Vec<Job>) {
    batch.sort_by(|a, b| a.idem.key.cmp(&b.idem.key));
    let rows = rows(&batch);
    let json = match serde_json::to_string(&rows) {
        Ok(j) => j,
        Err(_) => {
            for j in batch {
                let _ = j.reply.send(Written::Individually);
            }
            return;
        }
    };
    drop(rows);
    let result = sqlx::query(INSERT_BATCH).bind(json).fetch_all(pool).await;
    match result {
        Ok(created) => {
            let ids: HashSet<String> = created
                .iter()
                .filter_map(|r| r.try_get::<String, _>("id").ok())
                .collect();
            for j in batch {
                let w = if ids.contains(&j.call.id) {
                    Written::Created
                } else {
                    Written::Exists
                };
                let _ = j.reply.send(w);
            }
        }
        Err(e) => fail(batch, e.into()),
    }
}

/// Tells every call of a failed batch what to do: report an unreachable
/// database, or be written on its own (the failure may be a neighbour's).
fn fail(batch: Vec<Job>, e: StoreError) {
    let unreachable = match e {
        StoreError::Unavailable(why) => Some(why),
        other => {
            tracing::debug!(calls = batch.len(), error = %other, "batched call insert failed; writing its calls one by one");
            None
        }
    };
    for j in batch {
        let w = match &unreachable {
            Some(why) => Written::Failed(StoreError::Unavailable(why.clone())),
            None => Written::Individually,
        };
        let _ = j.reply.send(w);
    }
}

/// SQLite: the claims of a batch; returns the keys taken.
const CLAIM_BATCH_SQLITE: &str = "INSERT INTO idempotency \
     (key, request_hash, created_at, status, content_type, body) \
     SELECT value->>'key', value->>'request_hash', value->>'created_at', value->>'status', \
     value->>'content_type', value->>'body' FROM json_each($1) WHERE true \
     ON CONFLICT (key) DO NOTHING RETURNING key";

/// SQLite: the calls whose keys were taken (the batch's JSON, filtered).
const INSERT_BATCH_SQLITE: &str = "INSERT INTO calls \
     (id, created_at, pop, caller, destination, call_type, priority, metadata, decision, state, \
     updated_at) \
     SELECT value->>'id', value->>'created_at', value->>'pop', value->>'caller', \
     value->>'destination', value->>'call_type', value->>'priority', value->>'metadata', \
     value->>'decision', 'initiated', value->>'created_at' FROM json_each($1)";

/// SQLite: one transaction holding the claims and the calls of the keys
/// taken; a key that exists is left to the one-by-one path, as on Postgres.
async fn write_batch_sqlite(pool: &AnyPool, mut batch: Vec<Job>) {
    batch.sort_by(|a, b| a.idem.key.cmp(&b.idem.key));
    match claim_and_insert_sqlite(pool, &batch).await {
        Ok(claimed) => {
            for j in batch {
                let w = if claimed.contains(&j.idem.key) {
                    Written::Created
                } else {
                    Written::Exists
                };
                let _ = j.reply.send(w);
            }
        }
        Err(e) => fail(batch, e),
    }
}

async fn claim_and_insert_sqlite(pool: &AnyPool, batch: &[Job]) -> Result<HashSet<String>, StoreError> {
    let all = rows(batch);
    let json = serde_json::to_string(&all).map_err(|e| StoreError::Other(e.to_string()))?;
    let mut tx = pool.begin().await?;
    let claimed: HashSet<String> = sqlx::query(CLAIM_BATCH_SQLITE)
        .bind(json)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>("key"))
        .collect::<Result<_, _>>()?;
    if !claimed.is_empty() {
        let mine: Vec<&BatchRow<'_>> = all.iter().filter(|r| claimed.contains(r.key)).collect();
        let json = serde_json::to_string(&mine).map_err(|e| StoreError::Other(e.to_string()))?;
        let inserted = sqlx::query(INSERT_BATCH_SQLITE)
            .bind(json)
            .execute(&mut *tx)
            .await?;
        if inserted.rows_affected() != mine.len() as u64 {
            // Not expected (a failed row fails the statement); if it ever
            // happens, nothing of the batch is kept and each call is written
            // on its own.
            return Err(StoreError::Other(format!(
                "batch inserted {} calls for {} keys",
                inserted.rows_affected(),
                mine.len()
            )));
        }
    }
    tx.commit().await?;
    Ok(claimed)
}

//! Recordings: the `call_recordings` table. A recording is one object in the
//! store; reporting it again is a no-op, reporting a different object under
//! the same key is a conflict.

use std::time::Duration;

use sqlx::{AnyConnection, Row};

use super::calls::{CallChange, CallRow, read_call};
use super::idempotency::finish_claim;
use super::{Idem, Outcome, Result, Store, StoredResponse};
use crate::intake::Recording;

/// What recording a recording came to.
#[derive(Debug, Clone)]
pub enum Recorded {
    /// Stored now or before: the call with all its recordings.
    Stored(Box<CallRow>),
    /// No such call.
    NoCall,
    /// Another object (size or checksum) is recorded under this key.
    Conflict(Recording),
}

impl Store {
    /// Records `rec` for `call_id` once. The call row is locked first, as
    /// for events, so a call's recordings are added in turn.
    pub async fn record_recording<F>(
        &self,
        idem: Option<&Idem>,
        call_id: &str,
        rec: &Recording,
        retention: Duration,
        respond: F,
    ) -> Result<Outcome<Recorded>>
    where
        F: FnOnce(&CallRow) -> StoredResponse,
    {
        let (mut tx, now) = match self.change_call(idem, call_id, retention).await? {
            CallChange::Open(tx, now) => (tx, now),
            CallChange::Answered(early) => return Ok(early),
            CallChange::NoCall => return Ok(Outcome::Done(Recorded::NoCall)),
        };
        sqlx::query(
            "INSERT INTO call_recordings (call_id, bucket, object_key, size, sha256, duration_ms, \
             content_type, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (call_id, bucket, object_key) DO NOTHING",
        )
        .bind(call_id)
        .bind(&rec.bucket)
        .bind(&rec.key)
        .bind(rec.size)
        .bind(&rec.sha256)
        .bind(rec.duration_ms)
        .bind(&rec.content_type)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let stored = read_recordings(&mut tx, call_id).await?;
        if let Some(other) = stored.iter().find(|r| {
            r.bucket == rec.bucket && r.key == rec.key && (r.size != rec.size || r.sha256 != rec.sha256)
        }) {
            // Rolls back the claim: the caller may fix the body and retry.
            return Ok(Outcome::Done(Recorded::Conflict(other.clone())));
        }
        let Some(row) = read_call(&mut tx, call_id).await? else {
            return Ok(Outcome::Done(Recorded::NoCall));
        };
        if let Some(idem) = idem {
            finish_claim(&mut tx, &idem.key, &respond(&row)).await?;
        }
        tx.commit().await?;
        Ok(Outcome::Done(Recorded::Stored(Box::new(row))))
    }
}

/// A call's recordings, oldest first.
pub(super) async fn read_recordings(conn: &mut AnyConnection, call_id: &str) -> Result<Vec<Recording>> {
    let rows = sqlx::query(
        "SELECT bucket, object_key, size, sha256, duration_ms, content_type FROM call_recordings \
         WHERE call_id = $1 ORDER BY recorded_at, bucket, object_key",
    )
    .bind(call_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Recording {
                bucket: r.try_get("bucket")?,
                key: r.try_get("object_key")?,
                size: r.try_get("size")?,
                sha256: r.try_get("sha256")?,
                duration_ms: r.try_get("duration_ms")?,
                content_type: r.try_get("content_type")?,
            })
        })
        .collect()
}

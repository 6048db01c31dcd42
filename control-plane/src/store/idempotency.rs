//! Idempotency-Key claims: a row in `idempotency`, taken inside the
//! transaction of the write it guards. Expired keys are purged by
//! `retention`.

use std::time::Duration;

use sqlx::{AnyConnection, Row};

use super::{Idem, Outcome, Result, StoreError, StoredResponse, now_ms};

/// What claiming a key found.
pub(super) enum Claim {
    Claimed,
    Replay(StoredResponse),
    Mismatch,
}

impl Claim {
    /// What the guarded write answers without writing: `None` when the key
    /// was claimed (go on and write), else the earlier response or the
    /// mismatch.
    pub(super) fn answered<T>(self) -> Option<Outcome<T>> {
        match self {
            Claim::Claimed => None,
            Claim::Replay(r) => Some(Outcome::Replay(r)),
            Claim::Mismatch => Some(Outcome::Mismatch),
        }
    }
}

/// Claims an idempotency key inside the caller's transaction. With
/// `response` the final answer is stored at once; without it a placeholder
/// is stored and `finish_claim` fills it before commit (no other
/// transaction can see the placeholder).
pub(super) async fn claim(
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

/// Stores the final answer of a key claimed with a placeholder.
pub(super) async fn finish_claim(conn: &mut AnyConnection, key: &str, resp: &StoredResponse) -> Result<()> {
    sqlx::query("UPDATE idempotency SET status = $2, content_type = $3, body = $4 WHERE key = $1")
        .bind(key)
        .bind(i64::from(resp.status))
        .bind(&resp.content_type)
        .bind(&resp.body)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

//! Operators: the `operator_tokens` table (read-only tokens for people,
//! only their SHA-256 kept) and `operator_sessions` (the fleet page's
//! logins, by the SHA-256 of the cookie's session id).

use sqlx::Row;

use super::{Result, Store, now_ms};

/// A fleet-page session as stored.
#[derive(Debug, Clone)]
pub struct SessionRow {
    /// `admin` or `operator:<name>`.
    pub who: String,
    /// The hash of the token that logged in.
    pub token_hash: String,
    pub expires_at: i64,
    /// The operator's name while its token exists (`None` once revoked,
    /// and for the admin token).
    pub operator: Option<String>,
}

impl Store {
    /// Stores the hash of a new operator token.
    pub async fn insert_operator_token(&self, hash: &str, id: &str, name: &str, scope: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO operator_tokens (token_hash, id, name, scope, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(hash)
        .bind(id)
        .bind(name)
        .bind(scope)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Operator tokens (never the tokens): (id, name, created_at ms), oldest first.
    pub async fn list_operator_tokens(&self) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query("SELECT id, name, created_at FROM operator_tokens ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("name")?, r.try_get("created_at")?)))
            .collect()
    }

    /// Deletes the operator token with this id and its sessions; its name,
    /// or `None` if there is none.
    pub async fn revoke_operator_token(&self, id: &str) -> Result<Option<String>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("DELETE FROM operator_tokens WHERE id = $1 RETURNING name, token_hash")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let hash: String = row.try_get("token_hash")?;
        sqlx::query("DELETE FROM operator_sessions WHERE token_hash = $1")
            .bind(&hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(row.try_get("name")?))
    }

    /// The operator a token hash belongs to.
    pub async fn operator_by_hash(&self, hash: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT name FROM operator_tokens WHERE token_hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("name")).transpose()?)
    }

    /// Stores a new session.
    pub async fn create_session(
        &self,
        session_hash: &str,
        token_hash: &str,
        who: &str,
        expires_at: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO operator_sessions (session_hash, token_hash, who, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(session_hash)
        .bind(token_hash)
        .bind(who)
        .bind(now_ms())
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The session with this hash, with its operator if the token still exists.
    pub async fn session(&self, session_hash: &str) -> Result<Option<SessionRow>> {
        let row = sqlx::query(
            "SELECT s.who, s.token_hash, s.expires_at, o.name FROM operator_sessions s \
             LEFT JOIN operator_tokens o ON o.token_hash = s.token_hash WHERE s.session_hash = $1",
        )
        .bind(session_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(SessionRow {
                who: r.try_get("who")?,
                token_hash: r.try_get("token_hash")?,
                expires_at: r.try_get("expires_at")?,
                operator: r.try_get("name")?,
            })
        })
        .transpose()
    }

    /// Ends a session (logout).
    pub async fn delete_session(&self, session_hash: &str) -> Result<()> {
        sqlx::query("DELETE FROM operator_sessions WHERE session_hash = $1")
            .bind(session_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes expired sessions; returns how many.
    pub async fn purge_sessions(&self) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM operator_sessions WHERE expires_at < $1")
            .bind(now_ms())
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}

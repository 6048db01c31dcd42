//! Tokens: the `agent_tokens` table. Only a token's SHA-256 is kept; the
//! token itself is shown once, when it is created.

use sqlx::Row;

use super::{Result, Store, now_ms};

impl Store {
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
}

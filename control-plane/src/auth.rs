//! Auth: bearer tokens. Agents hold per-PoP tokens (only their SHA-256 is
//! stored); operators hold the admin token from `admin_token_file`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::{self, HeaderMap};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::store::{Store, StoreError};

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The admin token: every endpoint.
    Admin,
    /// An agent token for one PoP: calls and that PoP's report.
    Agent { pop: String },
}

impl Principal {
    /// Name used in audit entries, metrics and idempotency scoping.
    pub fn name(&self) -> String {
        match self {
            Principal::Admin => "admin".to_owned(),
            Principal::Agent { pop } => format!("pop:{pop}"),
        }
    }

    /// The PoP calls are attributed to (`admin` for the admin token).
    pub fn pop(&self) -> &str {
        match self {
            Principal::Admin => "admin",
            Principal::Agent { pop } => pop,
        }
    }
}

/// Why a request is not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("unknown or malformed bearer token")]
    Invalid,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Hex SHA-256 of a token: what the database keeps.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random agent token for `pop`: `dtr_<pop>_<64 hex>`. The PoP in the
/// text is for people reading logs; authority comes from the stored hash.
pub fn new_token(pop: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("dtr_{pop}_{}", hex::encode(bytes))
}

/// Whether `pop` is an acceptable PoP name.
pub fn valid_pop(pop: &str) -> bool {
    !pop.is_empty()
        && pop.len() <= 32
        && pop
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The admin token in `path` (one line, not empty).
pub(crate) fn read_admin_token_file(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let token = text.trim().to_owned();
    anyhow::ensure!(!token.is_empty(), "{} is empty", path.display());
    Ok(token)
}

/// How long a verified token is trusted without asking the database again.
const CACHE_TTL: Duration = Duration::from_secs(30);
/// How long an unknown token is remembered as unknown.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
const CACHE_MAX: usize = 10_000;

/// Verifies bearer tokens, with a small cache so the hot path rarely reads
/// the database.
pub struct Authenticator {
    admin_hash: Option<String>,
    store: Store,
    cache: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

impl Authenticator {
    /// `admin_token`: the contents of `admin_token_file`, if configured.
    pub fn new(admin_token: Option<&str>, store: Store) -> Self {
        Self {
            admin_hash: admin_token.map(|t| hash_token(t.trim())),
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The principal behind the request's `Authorization` header.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?
            .to_str()
            .map_err(|_| AuthError::Invalid)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(AuthError::Invalid)?
            .trim();
        if token.is_empty() || token.len() > 512 {
            return Err(AuthError::Invalid);
        }
        let hash = hash_token(token);
        if self.admin_hash.as_deref() == Some(hash.as_str()) {
            return Ok(Principal::Admin);
        }
        let now = Instant::now();
        let cached = self.cache.lock().await.get(&hash).cloned();
        if let Some((pop, at)) = &cached {
            let ttl = if pop.is_some() { CACHE_TTL } else { NEGATIVE_TTL };
            if now.duration_since(*at) < ttl {
                return pop
                    .clone()
                    .map(|pop| Principal::Agent { pop })
                    .ok_or(AuthError::Invalid);
            }
        }
        let pop = match self.store.token_pop(&hash).await {
            Ok(pop) => pop,
            // The database is away: a token this replica verified before
            // stays good until it can be checked again, so agents (and their
            // emergency calls) keep working through the outage.
            Err(e) => match cached {
                Some((Some(pop), _)) => return Ok(Principal::Agent { pop }),
                _ => return Err(e.into()),
            },
        };
        {
            let mut cache = self.cache.lock().await;
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(hash, (pop.clone(), now));
        }
        pop.map(|pop| Principal::Agent { pop }).ok_or(AuthError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_is_hex_sha256() {
        let a = new_token("blr");
        let b = new_token("blr");
        assert_ne!(a, b);
        assert!(a.starts_with("dtr_blr_") && a.len() == 8 + 64);
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn pop_names() {
        assert!(valid_pop("blr"));
        assert!(valid_pop("blr-2"));
        assert!(!valid_pop("BLR"));
        assert!(!valid_pop(""));
        assert!(!valid_pop("a/b"));
    }
}

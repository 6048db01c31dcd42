//! Auth: bearer tokens and the fleet page's sessions. Agents hold per-PoP
//! tokens, people hold operator tokens (read-only: the fleet view) or the
//! admin token from `admin_token_file`; only SHA-256 hashes are stored. A
//! login on the fleet page trades a token for a session id in an HttpOnly
//! cookie, which only the fleet reads accept.

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
    /// An operator token (`token create --operator NAME`): reads the fleet
    /// view and nothing else.
    Operator { name: String },
}

impl Principal {
    /// Name used in audit entries, metrics and idempotency scoping.
    pub fn name(&self) -> String {
        match self {
            Principal::Admin => "admin".to_owned(),
            Principal::Agent { pop } => format!("pop:{pop}"),
            Principal::Operator { name } => format!("operator:{name}"),
        }
    }

    /// The PoP calls are attributed to (`admin` for the admin token).
    pub fn pop(&self) -> &str {
        match self {
            Principal::Admin => "admin",
            Principal::Agent { pop } => pop,
            Principal::Operator { .. } => "operator",
        }
    }
}

/// What an operator token may do: read the fleet view.
pub const OPERATOR_SCOPE: &str = "fleet:read";

/// Why a request is not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("unknown or malformed bearer token")]
    Invalid,
    /// An operator token on an endpoint other than the fleet reads (403).
    #[error("an operator token may only read the fleet view (GET /v1/fleet, /v1/fleet/view, /fleet)")]
    ReadOnly,
    /// No valid session cookie on a fleet read (401).
    #[error("not logged in: send `Authorization: Bearer <token>`, or log in at /fleet/login")]
    NoSession,
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

/// A new random operator token for `name`: `dto_<name>_<64 hex>`.
pub fn new_operator_token(name: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("dto_{name}_{}", hex::encode(bytes))
}

/// A new random session id for the fleet page's cookie (64 hex digits).
pub fn new_session_id() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
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
    cache: Mutex<HashMap<String, (Option<Principal>, Instant)>>,
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

    /// The principal behind the request's `Authorization` header, for every
    /// endpoint but the fleet reads: an operator token is refused here
    /// ([`AuthError::ReadOnly`]), so no endpoint accepts one by accident.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        match self.bearer(headers).await? {
            Principal::Operator { .. } => Err(AuthError::ReadOnly),
            p => Ok(p),
        }
    }

    /// Any principal behind the `Authorization` header, operator tokens
    /// included (the fleet reads).
    pub async fn bearer(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?
            .to_str()
            .map_err(|_| AuthError::Invalid)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(AuthError::Invalid)?;
        self.token(token).await
    }

    /// Whether `hash` is the admin token's.
    pub fn is_admin_hash(&self, hash: &str) -> bool {
        self.admin_hash.as_deref() == Some(hash)
    }

    /// The principal a token (from a header or the login form) stands for.
    pub async fn token(&self, token: &str) -> Result<Principal, AuthError> {
        let token = token.trim();
        if token.is_empty() || token.len() > 512 {
            return Err(AuthError::Invalid);
        }
        let hash = hash_token(token);
        if self.is_admin_hash(&hash) {
            return Ok(Principal::Admin);
        }
        let now = Instant::now();
        let cached = self.cache.lock().await.get(&hash).cloned();
        if let Some((who, at)) = &cached {
            let ttl = if who.is_some() { CACHE_TTL } else { NEGATIVE_TTL };
            if now.duration_since(*at) < ttl {
                return who.clone().ok_or(AuthError::Invalid);
            }
        }
        let found = async {
            if let Some(pop) = self.store.token_pop(&hash).await? {
                return Ok(Some(Principal::Agent { pop }));
            }
            Ok::<_, StoreError>(
                self.store
                    .operator_by_hash(&hash)
                    .await?
                    .map(|name| Principal::Operator { name }),
            )
        };
        let who = match found.await {
            Ok(who) => who,
            // The database is away: a token this replica verified before
            // stays good until it can be checked again, so agents (and their
            // emergency calls) keep working through the outage.
            Err(e) => match cached {
                Some((Some(who), _)) => return Ok(who),
                _ => return Err(e.into()),
            },
        };
        {
            let mut cache = self.cache.lock().await;
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(hash, (who.clone(), now));
        }
        who.ok_or(AuthError::Invalid)
    }

    /// The principal of a fleet-page session id (the cookie's value): the
    /// session must exist, be unexpired, and its token still be valid (a
    /// revoked operator token, or a replaced admin token, ends it).
    pub async fn session(&self, id: &str) -> Result<Principal, AuthError> {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AuthError::NoSession);
        }
        let Some(s) = self.store.session(&hash_token(id)).await? else {
            return Err(AuthError::NoSession);
        };
        if s.expires_at <= crate::store::now_ms() {
            return Err(AuthError::NoSession);
        }
        match s.operator {
            Some(name) => Ok(Principal::Operator { name }),
            None if s.who == "admin" && self.is_admin_hash(&s.token_hash) => Ok(Principal::Admin),
            None => Err(AuthError::NoSession),
        }
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
        let o = new_operator_token("alice");
        assert!(o.starts_with("dto_alice_") && o.len() == 10 + 64);
        assert_eq!(new_session_id().len(), 64);
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

//! Idempotency: validates `Idempotency-Key` and fingerprints the request it
//! came with. The claim itself is a row inserted in the same transaction as
//! the write it protects (see `store`), so duplicates cannot both win.

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::store::Idem;

/// Header on a replayed response: `true` when it was stored earlier.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Why an `Idempotency-Key` header was rejected.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key must be 1 to 255 visible ASCII characters")]
pub struct BadKey;

/// The request's key, if any, with the fingerprint of method, path, caller
/// and body. The same key with a different fingerprint is rejected (422).
pub fn from_request(
    headers: &HeaderMap,
    method: &str,
    path: &str,
    principal: &str,
    body: &[u8],
) -> Result<Option<Idem>, BadKey> {
    let Some(value) = headers.get(detour_wire::headers::IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value.to_str().map_err(|_| BadKey)?;
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(BadKey);
    }
    let mut h = Sha256::new();
    for part in [method.as_bytes(), path.as_bytes(), principal.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(body);
    Ok(Some(Idem {
        key: key.to_owned(),
        request_hash: hex::encode(h.finalize()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("idempotency-key", key.parse().unwrap());
        h
    }

    #[test]
    fn fingerprint_covers_body_path_and_caller() {
        let h = headers("k1");
        let a = from_request(&h, "POST", "/v1/calls", "pop:blr", b"{}")
            .unwrap()
            .unwrap();
        let same = from_request(&h, "POST", "/v1/calls", "pop:blr", b"{}")
            .unwrap()
            .unwrap();
        assert_eq!(a.request_hash, same.request_hash);
        for (path, who, body) in [
            ("/v1/calls", "pop:blr", &b"{ }"[..]),
            ("/v1/callsx", "pop:blr", b"{}"),
            ("/v1/calls", "pop:maa", b"{}"),
        ] {
            let b = from_request(&h, "POST", path, who, body).unwrap().unwrap();
            assert_ne!(a.request_hash, b.request_hash);
        }
    }

    #[test]
    fn keys_are_validated() {
        assert_eq!(
            from_request(&HeaderMap::new(), "POST", "/", "a", b"")
                .unwrap()
                .map(|i| i.key),
            None
        );
        assert!(from_request(&headers("has space"), "POST", "/", "a", b"").is_err());
        assert!(from_request(&headers(&"k".repeat(256)), "POST", "/", "a", b"").is_err());
    }
}

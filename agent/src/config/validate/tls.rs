//! `[tls]`: this agent's identity on the peer mesh (fleet CA, certificate,
//! key), which must load, match and name this PoP, and the fleet CA's
//! revocation list (`crl`, optional), which must be signed by a CA of `ca`.

use std::sync::Arc;

use toml::Spanned;

use super::Diag;
use crate::config::raw;
use crate::config::values::{resolve, valid_pop_name};
use crate::tls::{self, TlsMaterial};

/// The material, or `None` after saying why it cannot be used.
pub(super) fn validate(d: &mut Diag<'_>, t: &Spanned<raw::Tls>, pop: &str) -> Option<Arc<TlsMaterial>> {
    let t = t.get_ref();
    let ca = resolve(d.file(), t.ca.get_ref());
    let cert = resolve(d.file(), t.cert.get_ref());
    let key = resolve(d.file(), t.key.get_ref());
    let crl = t.crl.as_ref().map(|c| (c, resolve(d.file(), c.get_ref())));
    let mut readable = true;
    let files = [
        Some(("tls.ca", &t.ca, &ca)),
        Some(("tls.cert", &t.cert, &cert)),
        Some(("tls.key", &t.key, &key)),
        crl.as_ref().map(|(v, p)| ("tls.crl", *v, p)),
    ];
    for (k, v, p) in files.into_iter().flatten() {
        if let Err(e) = std::fs::metadata(p).and_then(|_| std::fs::File::open(p).map(|_| ())) {
            d.span(v, format!("{k}: cannot read {}: {e}", p.display()));
            readable = false;
        }
    }
    if !readable {
        return None;
    }
    match TlsMaterial::load(&ca, &cert, &key, crl.as_ref().map(|(_, p)| p.as_path())) {
        Ok(m) => {
            if valid_pop_name(pop) && !m.names.iter().any(|n| n == pop) {
                d.span(
                    &t.cert,
                    format!(
                        "tls.cert: certificate is for {:?}, not for this PoP `{pop}`",
                        m.names
                    ),
                );
            }
            Some(Arc::new(m))
        }
        Err(e) => {
            let at = match e.field {
                tls::Field::Ca => &t.ca,
                tls::Field::Cert => &t.cert,
                tls::Field::Key => &t.key,
                tls::Field::Crl => t.crl.as_ref().unwrap_or(&t.ca),
            };
            d.span(at, e.message);
            None
        }
    }
}

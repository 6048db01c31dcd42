//! TLS: the rustls server configuration for serving HTTPS directly, with
//! ALPN offering HTTP/2 and HTTP/1.1.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// Builds the server config from the PEM files in `tls`.
pub fn server_config(tls: &TlsConfig) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    server_config_from(load_certs(&tls.cert)?, load_key(&tls.key)?)
}

/// Reads the certificate chain of `tls.cert`.
pub fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("tls.cert {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("tls.cert {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "tls.cert {}: no certificate", path.display());
    Ok(certs)
}

/// Reads the private key of `tls.key`.
pub fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| format!("tls.key {}", path.display()))
}

/// The server config for a chain and its key; fails when they do not match.
pub fn server_config_from(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("tls.key is not the key of tls.cert's certificate (or either is unusable)")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

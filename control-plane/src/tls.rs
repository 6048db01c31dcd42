//! TLS: the rustls server configuration for serving HTTPS directly, with
//! ALPN offering HTTP/2 and HTTP/1.1, and its rotation without a restart
//! ([`ServerCert`]): the certificate and key are read again (on SIGHUP and
//! every `tls.reload_interval`, by `tasks`), and a new pair replaces the one
//! in use only once a server configuration was built from it.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

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

/// A certificate's subject and the end of its validity (Unix seconds), as
/// `detour_certificate_expiry_timestamp_seconds` carries them (the agent's
/// `tls::cert_expiry` reads them the same way).
pub fn cert_expiry(cert: &CertificateDer<'_>) -> Option<(String, i64)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some((
        parsed.subject().to_string(),
        parsed.validity().not_after.timestamp(),
    ))
}

/// The certificate this replica serves, and the files it comes from.
pub struct ServerCert {
    files: TlsConfig,
    current: ArcSwap<Loaded>,
}

/// One pair as read, and the server configuration built from it.
struct Loaded {
    config: Arc<rustls::ServerConfig>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// What [`ServerCert::reload`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// The files hold the pair in use.
    Unchanged,
    /// A new pair serves new connections from now on.
    Rotated,
}

impl ServerCert {
    /// Reads `files.cert` and `files.key`; fails when they do not load or
    /// do not match.
    pub fn load(files: &TlsConfig) -> anyhow::Result<ServerCert> {
        let loaded = Self::read(files)?;
        Ok(ServerCert {
            files: files.clone(),
            current: ArcSwap::from_pointee(loaded),
        })
    }

    fn read(files: &TlsConfig) -> anyhow::Result<Loaded> {
        let chain = load_certs(&files.cert)?;
        let key = load_key(&files.key)?;
        let config = server_config_from(chain.clone(), key.clone_key())?;
        Ok(Loaded { config, chain, key })
    }

    /// The configuration for a new connection's handshake.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current.load().config.clone()
    }

    /// The certificate chain in use (leaf first).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().chain.clone()
    }

    /// Reads the files again. A different pair that loads and matches is
    /// swapped in for new connections (open ones keep theirs); on any error
    /// the pair in use stays.
    pub fn reload(&self) -> anyhow::Result<Reloaded> {
        let new = Self::read(&self.files)?;
        let current = self.current.load();
        if new.chain == current.chain && new.key.secret_der() == current.key.secret_der() {
            return Ok(Reloaded::Unchanged);
        }
        self.current.store(Arc::new(new));
        Ok(Reloaded::Rotated)
    }

    /// `tls.reload_interval`.
    pub fn reload_interval(&self) -> std::time::Duration {
        self.files.reload_interval
    }
}

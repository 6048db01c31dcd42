//! TLS material and rustls configurations: the fleet identity for the peer
//! mesh (relay server and tunnel client, both mutual TLS) and the client
//! configuration for TLS to the control plane.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Which file a TLS problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Ca,
    Cert,
    Key,
}

/// A problem loading TLS material.
#[derive(Debug, Clone)]
pub struct TlsError {
    pub field: Field,
    pub message: String,
}

/// This agent's identity on the peer mesh and the fleet CA it trusts.
#[derive(Debug)]
pub struct TlsMaterial {
    pub fleet_roots: Arc<RootCertStore>,
    /// The fleet CA file's certificates as read (a reload compares them).
    pub ca_certs: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// DNS names in this agent's certificate; one of them is the PoP name.
    pub names: Vec<String>,
}

/// Why a PEM certificate file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} is not a PEM certificate file: {source}", path.display())]
    NotPem {
        path: std::path::PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    Empty { path: std::path::PathBuf },
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|source| CertsError::Read {
            path: path.to_owned(),
            source,
        })?
        .collect();
    let certs = certs.map_err(|source| CertsError::NotPem {
        path: path.to_owned(),
        source,
    })?;
    if certs.is_empty() {
        return Err(CertsError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A certificate's subject and the end of its validity (Unix seconds).
pub fn cert_expiry(cert: &CertificateDer<'_>) -> Option<(String, i64)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some((
        parsed.subject().to_string(),
        parsed.validity().not_after.timestamp(),
    ))
}

/// The DNS names (subject alternative names) of a certificate.
pub fn cert_dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    names
}

impl TlsMaterial {
    /// Whether two loads hold the same fleet CA, certificate chain and key:
    /// a reload compares file contents, not just paths.
    pub fn same_as(&self, other: &TlsMaterial) -> bool {
        self.ca_certs == other.ca_certs
            && self.chain == other.chain
            && self.key.secret_der() == other.key.secret_der()
    }

    /// Loads the fleet CA, this agent's certificate chain and key, and checks
    /// that the key belongs to the certificate and the chain to the CA.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<TlsMaterial, TlsError> {
        let err = |field, message: String| TlsError { field, message };
        let ca_certs = load_certs(ca).map_err(|m| err(Field::Ca, format!("tls.ca: {m}")))?;
        let mut roots = RootCertStore::empty();
        for c in ca_certs.iter().cloned() {
            roots.add(c).map_err(|e| {
                err(
                    Field::Ca,
                    format!("tls.ca: {} is not a usable CA certificate: {e}", ca.display()),
                )
            })?;
        }
        let chain = load_certs(cert).map_err(|m| err(Field::Cert, format!("tls.cert: {m}")))?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            err(
                Field::Key,
                format!("tls.key: {} is not a PEM private key: {e}", key.display()),
            )
        })?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| {
            err(
                Field::Key,
                format!("tls.key: unsupported private key in {}: {e}", key.display()),
            )
        })?;
        let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
        certified.keys_match().map_err(|_| {
            err(
                Field::Key,
                format!(
                    "tls.key: {} does not match the certificate in {}",
                    key.display(),
                    cert.display()
                ),
            )
        })?;
        let roots = Arc::new(roots);
        // The certificate must chain to the fleet CA, or no peer would accept it.
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| err(Field::Ca, format!("tls.ca: {e}")))?;
        let names = cert_dns_names(&chain[0]);
        if let Some(name) = names.first() {
            let server_name = rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|e| err(Field::Cert, format!("tls.cert: name `{name}` is not usable: {e}")))?;
            let now = rustls::pki_types::UnixTime::now();
            rustls::client::danger::ServerCertVerifier::verify_server_cert(
                verifier.as_ref(),
                &chain[0],
                &chain[1..],
                &server_name,
                &[],
                now,
            )
            .map_err(|e| {
                err(
                    Field::Cert,
                    format!(
                        "tls.cert: {} is not valid under the fleet CA {}: {e}",
                        cert.display(),
                        ca.display()
                    ),
                )
            })?;
        } else {
            return Err(err(
                Field::Cert,
                format!(
                    "tls.cert: {} has no DNS name; it must carry the PoP name",
                    cert.display()
                ),
            ));
        }
        Ok(TlsMaterial {
            fleet_roots: roots,
            ca_certs,
            chain,
            key: key_der,
            names,
        })
    }

    /// Server side of the relay: TLS 1.2/1.3, a client certificate from the
    /// fleet CA is mandatory.
    pub fn relay_server_config(&self) -> Result<Arc<ServerConfig>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.fleet_roots.clone(), provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// Client side of a tunnel to a peer's relay: presents this agent's
    /// certificate and accepts only fleet-CA server certificates.
    pub fn peer_client_config(&self) -> Result<Arc<ClientConfig>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.fleet_roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Client configuration for TLS to the control plane: the system's roots plus
/// an optional extra CA. `extra_ca` is `control_plane.ca` as read when the config was loaded, so
/// the paths trust exactly what the config (and a reload's comparison) saw.
pub fn control_plane_client_config(
    extra_ca: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, ClientTlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        // A broken system certificate must not stop the agent; skip it.
        let _ = roots.add(c);
    }
    for c in extra_ca {
        roots.add(c.clone()).map_err(ClientTlsError::ControlPlaneCa)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // ALPN (h2, http/1.1) is set by the HTTPS connector that uses this.
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ClientTlsError::Rustls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Why a client TLS configuration for the paths could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    /// A certificate in `control_plane.ca` is not a usable trust anchor.
    #[error("control_plane.ca: {0}")]
    ControlPlaneCa(rustls::Error),
    /// The peer-mesh client identity (certificate and key) was refused.
    #[error("peer TLS: {0}")]
    Peer(rustls::Error),
    #[error("{0}")]
    Rustls(rustls::Error),
}

/// The PoP name a verified peer certificate carries: its first DNS name.
pub fn peer_name(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    certs?.first().and_then(|c| cert_dns_names(c).into_iter().next())
}

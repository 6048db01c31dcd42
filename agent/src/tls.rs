//! TLS material and rustls configurations: the fleet identity for the peer
//! mesh (relay server and tunnel client, both mutual TLS, both checking the
//! fleet CA's revocation list when `tls.crl` is set) and the client
//! configuration for TLS to the control plane.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Which file a TLS problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Ca,
    Cert,
    Key,
    Crl,
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
    /// The fleet CA's revocation lists from `tls.crl` as read (a reload
    /// compares them); empty without one. Both sides of the mesh refuse a
    /// peer certificate they list.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// Whether this agent's own certificate is on one of those lists: every
    /// peer with the same list refuses it. Not an error (the direct path
    /// still works), but said at start, on reload and by `check-config`.
    pub own_revoked: bool,
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
            && self.crls == other.crls
    }

    /// Whether two loads check peers the same way: same fleet CA and
    /// revocation lists. When this changes, open tunnels are checked again.
    pub fn same_trust(&self, other: &TlsMaterial) -> bool {
        self.ca_certs == other.ca_certs && self.crls == other.crls
    }

    /// Loads the fleet CA, this agent's certificate chain and key, and the
    /// optional revocation list, and checks that the key belongs to the
    /// certificate, the chain to the CA, and each list to a CA of the bundle.
    pub fn load(ca: &Path, cert: &Path, key: &Path, crl: Option<&Path>) -> Result<TlsMaterial, TlsError> {
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
        let (crls, own_revoked) = match crl {
            None => (Vec::new(), false),
            Some(path) => {
                let crls = load_crls(path, &ca_certs, ca).map_err(|m| err(Field::Crl, m))?;
                // rustls's own reading of the lists: one it cannot use would
                // fail every handshake.
                let verifier = mesh_server_verifier(&roots, &crls)
                    .map_err(|e| err(Field::Crl, format!("tls.crl: {}: {e}", path.display())))?;
                let own = rustls::client::danger::ServerCertVerifier::verify_server_cert(
                    verifier.as_ref(),
                    &chain[0],
                    &chain[1..],
                    &rustls::pki_types::ServerName::try_from(names[0].clone())
                        .map_err(|e| err(Field::Cert, format!("tls.cert: {e}")))?,
                    &[],
                    rustls::pki_types::UnixTime::now(),
                );
                let own_revoked = match own {
                    Ok(_) => false,
                    Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) => true,
                    Err(e) => return Err(err(Field::Crl, format!("tls.crl: {}: {e}", path.display()))),
                };
                (crls, own_revoked)
            }
        };
        Ok(TlsMaterial {
            fleet_roots: roots,
            ca_certs,
            chain,
            key: key_der,
            names,
            crls,
            own_revoked,
        })
    }

    /// The relay's check of a peer's client certificate: it must chain to
    /// the fleet CA and not be on a revocation list of `tls.crl`. Kept by
    /// the relay to check open tunnels again when the lists change.
    pub fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        WebPkiClientVerifier::builder_with_provider(self.fleet_roots.clone(), provider())
            .with_crls(self.crls.iter().cloned())
            // The fleet CA signs the PoP certificates directly, and a bundle
            // during a CA rotation may hold a CA without a list: its
            // certificates are checked for the chain only.
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))
    }

    /// Server side of the relay: TLS 1.2/1.3, a client certificate from the
    /// fleet CA is mandatory ([`TlsMaterial::client_verifier`], returned too).
    pub fn relay_server_config(
        &self,
    ) -> Result<(Arc<ServerConfig>, Arc<dyn ClientCertVerifier>), rustls::Error> {
        let verifier = self.client_verifier()?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok((Arc::new(cfg), verifier))
    }

    /// Client side of a tunnel to a peer's relay: presents this agent's
    /// certificate and accepts only fleet-CA server certificates that no
    /// revocation list of `tls.crl` names.
    pub fn peer_client_config(&self) -> Result<Arc<ClientConfig>, rustls::Error> {
        let verifier = mesh_server_verifier(&self.fleet_roots, &self.crls)?;
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The dialer's check of a peer relay's certificate (the relay's, in
/// [`TlsMaterial::client_verifier`], is the same on the other side).
fn mesh_server_verifier(
    roots: &Arc<RootCertStore>,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(crls.iter().cloned())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))
}

/// Reads the revocation lists of `tls.crl` (one or more PEM CRLs) and checks
/// each one: issued and signed by a CA of the fleet bundle (`ca_certs`, read
/// from `ca_path`), which may sign CRLs.
pub fn load_crls(
    path: &Path,
    ca_certs: &[CertificateDer<'static>],
    ca_path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let crls: Vec<CertificateRevocationListDer<'static>> = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| format!("tls.crl: cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crl: {} is not a PEM CRL file: {e}", path.display()))?;
    if crls.is_empty() {
        return Err(format!(
            "tls.crl: {} holds no PEM CRL (-----BEGIN X509 CRL-----)",
            path.display()
        ));
    }
    let cas: Vec<_> = ca_certs
        .iter()
        .filter_map(|c| {
            x509_parser::parse_x509_certificate(c.as_ref())
                .ok()
                .map(|(_, c)| c)
        })
        .collect();
    // rustls picks the list for a certificate by its issuer's name: with two
    // CAs of one name (a rotation between CAs made alike), the other CA's
    // list would be checked with the wrong key and every handshake refused.
    for (i, a) in cas.iter().enumerate() {
        if let Some(b) = cas[i + 1..].iter().find(|b| {
            b.subject().as_raw() == a.subject().as_raw() && b.public_key().raw != a.public_key().raw
        }) {
            return Err(format!(
                "tls.crl: tls.ca {} holds two different CAs named `{}`; revocation lists are matched \
                 to their CA by name, so with tls.crl the CAs of a bundle need names of their own \
                 (detour-agent pki init gives each one its own)",
                ca_path.display(),
                b.subject()
            ));
        }
    }
    for (i, der) in crls.iter().enumerate() {
        let which = if crls.len() > 1 {
            format!("CRL {} of {}", i + 1, crls.len())
        } else {
            "the CRL".to_owned()
        };
        let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
            .map_err(|e| format!("tls.crl: {}: {which} does not parse: {e}", path.display()))?;
        let Some(ca) = cas.iter().find(|c| c.subject().as_raw() == crl.issuer().as_raw()) else {
            return Err(format!(
                "tls.crl: {}: {which} is from `{}`, which is not a CA in tls.ca {}",
                path.display(),
                crl.issuer(),
                ca_path.display()
            ));
        };
        if crl.verify_signature(ca.public_key()).is_err() {
            return Err(format!(
                "tls.crl: {}: {which} names `{}` as its issuer, but that CA's key did not sign it",
                path.display(),
                crl.issuer()
            ));
        }
        if let Ok(Some(usage)) = ca.key_usage()
            && !usage.value.crl_sign()
        {
            return Err(format!(
                "tls.crl: {}: the CA `{}` may not sign CRLs (its key usage lacks cRLSign)",
                path.display(),
                ca.subject()
            ));
        }
    }
    Ok(crls)
}

/// What a failed TLS handshake with a peer says about certificates, for
/// people: `Some` when a certificate was refused (revoked, or not trusted),
/// on either side.
pub fn certificate_problem(e: &std::io::Error) -> Option<String> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match inner {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked) => {
            Some("its certificate is revoked (tls.crl)".to_owned())
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked) => {
            Some("it refused this agent's certificate as revoked".to_owned())
        }
        rustls::Error::InvalidCertificate(c) => Some(format!("its certificate is not trusted: {c}")),
        rustls::Error::AlertReceived(
            a @ (rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::CertificateExpired
            | rustls::AlertDescription::CertificateUnknown),
        ) => Some(format!("it refused this agent's certificate ({a:?})")),
        _ => None,
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

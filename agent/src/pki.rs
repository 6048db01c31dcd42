//! `detour-agent pki`: a fleet CA, per-PoP certificates and the CA's
//! revocation list (rcgen), so a lab or a small fleet needs no OpenSSL
//! commands. Production may bring its own PKI: the agent only needs a CA
//! file, a certificate naming the PoP, its key, and optionally a CRL.
//!
//! The CA directory holds `ca.pem` and `ca.key` (`pki init`), a copy of every
//! certificate `pki issue` signed under `issued/<serial>.pem` (so `pki revoke
//! --name` knows a PoP's serials), and `crl.pem`, the revocation list `pki
//! revoke` rewrites: the list itself is the record of what is revoked, so
//! each new one carries every earlier entry and the next CRL number.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};

use crate::config::valid_pop_name;

/// How long a fleet CA is valid by default (five years). Replacing it is a
/// fleet change in three rollouts (docs/operations.md, "Certificate
/// rotation"), so it lives much longer than the PoP certificates it signs.
pub const CA_VALIDITY_DAYS: i64 = 5 * 365;
/// How long a PoP certificate is valid by default (90 days). Short enough that
/// a leaked key stops working soon even if nobody revokes it, long enough for
/// the 30-day warning (`DetourCertificateExpiring`) to leave two months of
/// routine renewals.
pub const LEAF_VALIDITY_DAYS: i64 = 90;
/// How far ahead a CRL's `nextUpdate` is put. Agents do not refuse a CRL whose
/// `nextUpdate` has passed (a stale list still revokes what it lists; an
/// expired one must not cut the mesh), so this is informational.
pub const CRL_VALIDITY_DAYS: i64 = 365;
/// Where `pki issue` keeps a copy of each certificate, under the CA directory.
pub const ISSUED_DIR: &str = "issued";
/// The revocation list `pki revoke` writes, in the CA directory.
pub const CRL_FILE: &str = "crl.pem";

/// Writes `dir/ca.pem` and `dir/ca.key` (mode 0600), valid for
/// [`CA_VALIDITY_DAYS`]. Refuses to overwrite an existing CA, since every
/// certificate of the fleet hangs on it.
pub fn init(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    init_for(dir, CA_VALIDITY_DAYS)
}

/// [`init`] with a CA valid for `days`. Each CA gets a name of its own
/// (`Detour fleet CA <date> <random>`): a revocation list is matched to its
/// CA by name, so the old and the new CA of a rotation must not share one.
pub fn init_for(dir: &Path, days: i64) -> anyhow::Result<(PathBuf, PathBuf)> {
    if days < 1 {
        bail!("--days must be at least 1");
    }
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    if cert_path.exists() || key_path.exists() {
        bail!("{} already holds a CA; refusing to overwrite it", dir.display());
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let now = OffsetDateTime::now_utc();
    let name = format!("Detour fleet CA {} {:08x}", now.date(), rand::random::<u32>());
    let (pem, key) = new_ca(&name, now, days)?;
    write_file(&cert_path, pem.as_bytes(), false)?;
    write_file(&key_path, key.as_bytes(), true)?;
    Ok((cert_path, key_path))
}

/// A CA certificate and key as PEM text.
pub fn new_ca(common_name: &str, not_before: OffsetDateTime, days: i64) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate().context("generating CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Detour");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before - Duration::hours(1);
    params.not_after = not_before + Duration::days(days);
    let cert = params.self_signed(&key).context("signing CA certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issues `out/NAME.pem` and `out/NAME.key` for PoP `name`, signed by the CA
/// in `ca_dir`, and keeps a copy of the certificate in `ca_dir/issued/` for
/// [`revoke`]. The certificate serves both sides of the mesh (relay server
/// and tunnel client) and carries the PoP name as its DNS name.
pub fn issue(ca_dir: &Path, name: &str, out: &Path, days: i64) -> anyhow::Result<(PathBuf, PathBuf)> {
    if !valid_pop_name(name) {
        bail!("`{name}` is not a PoP name (lowercase letters, digits and '-', at most 32)");
    }
    if days < 1 {
        bail!("--days must be at least 1");
    }
    let (ca_pem, ca_key) = read_ca(ca_dir)?;
    let now = OffsetDateTime::now_utc();
    let (pem, key) = issue_pem(
        &ca_pem,
        &ca_key,
        name,
        now - Duration::hours(1),
        now + Duration::days(days),
    )?;
    let serial = serial_hex(&parse_pem_cert(&pem)?.0);
    let issued = ca_dir.join(ISSUED_DIR);
    fs::create_dir_all(&issued).with_context(|| format!("creating {}", issued.display()))?;
    write_file(&issued.join(format!("{serial}.pem")), pem.as_bytes(), false)?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cert_path = out.join(format!("{name}.pem"));
    let key_path = out.join(format!("{name}.key"));
    write_file(&cert_path, pem.as_bytes(), false)?;
    write_file(&key_path, key.as_bytes(), true)?;
    Ok((cert_path, key_path))
}

/// A leaf certificate and key for `name` as PEM text, valid in the given window.
pub fn issue_pem(
    ca_pem: &str,
    ca_key_pem: &str,
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> anyhow::Result<(String, String)> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("parsing CA key")?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, ca_key).context("parsing CA certificate")?;
    let key = KeyPair::generate().context("generating key")?;
    let mut params = CertificateParams::new(vec![name.to_owned()]).context("certificate names")?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "Detour");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, &issuer).context("signing certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Why a certificate is revoked, as the CRL says it (`pki revoke --reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reason {
    /// No reason given (the CRL entry carries no reason code).
    Unspecified,
    /// The private key leaked or may have.
    KeyCompromise,
    /// Replaced by a newer certificate.
    Superseded,
    /// The PoP was decommissioned.
    CessationOfOperation,
}

impl Reason {
    fn code(self) -> Option<RevocationReason> {
        match self {
            Reason::Unspecified => None,
            Reason::KeyCompromise => Some(RevocationReason::KeyCompromise),
            Reason::Superseded => Some(RevocationReason::Superseded),
            Reason::CessationOfOperation => Some(RevocationReason::CessationOfOperation),
        }
    }
}

/// One entry of a revocation list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The certificate's serial number (big-endian bytes, as in the certificate).
    pub serial: Vec<u8>,
    pub at: OffsetDateTime,
    pub reason: Option<RevocationReason>,
}

/// A certificate [`revoke`] added to the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedCert {
    /// The serial as hex (`ab:cd:…` without the colons), as `issued/` names it.
    pub serial: String,
    /// The DNS names it carries (the PoP name first).
    pub names: Vec<String>,
    /// When it would have expired (Unix seconds).
    pub not_after: i64,
}

/// What [`revoke`] did.
#[derive(Debug)]
pub struct Revocation {
    /// `ca_dir/crl.pem`, rewritten.
    pub crl: PathBuf,
    /// The CRL number of the new list.
    pub number: u64,
    /// Certificates added now.
    pub added: Vec<RevokedCert>,
    /// Certificates that were already on the list (asked for again).
    pub already: Vec<RevokedCert>,
    /// Entries on the new list in all.
    pub total: usize,
}

/// Revokes certificates issued by the CA in `ca_dir` and rewrites
/// `ca_dir/crl.pem`: with `cert`, the certificate in that PEM file (which
/// must come from this CA, and name `name` if given); otherwise every
/// certificate `pki issue` recorded in `ca_dir/issued/` for PoP `name`.
/// Earlier entries are kept, and the CRL number goes up by one.
pub fn revoke(
    ca_dir: &Path,
    name: Option<&str>,
    cert: Option<&Path>,
    reason: Reason,
) -> anyhow::Result<Revocation> {
    let (ca_pem, ca_key) = read_ca(ca_dir)?;
    let ca_der = rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .context("parsing the CA certificate")?;
    let targets: Vec<(Vec<u8>, RevokedCert)> = match (cert, name) {
        (Some(path), name) => {
            let pem = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let (serial, info) = parse_pem_cert(&pem).with_context(|| path.display().to_string())?;
            check_issued_by(&pem, &ca_der).with_context(|| path.display().to_string())?;
            if let Some(n) = name
                && !info.names.iter().any(|x| x == n)
            {
                bail!(
                    "{} is a certificate for {:?}, not for `{n}`",
                    path.display(),
                    info.names
                );
            }
            vec![(serial, info)]
        }
        (None, Some(name)) => {
            let found = issued_to(ca_dir, name)?;
            if found.is_empty() {
                bail!(
                    "no certificate for `{name}` is recorded in {} (pki issue records each one there; \
                     for a certificate issued before that, or by other tools, pass --cert FILE)",
                    ca_dir.join(ISSUED_DIR).display()
                );
            }
            found
        }
        (None, None) => bail!("say which certificate: --name POP or --cert FILE"),
    };
    let crl_path = ca_dir.join(CRL_FILE);
    let (mut entries, number) = match fs::read(&crl_path) {
        Ok(bytes) => read_crl(&bytes, &ca_der).with_context(|| format!("reading {}", crl_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", crl_path.display())),
    };
    let now = OffsetDateTime::now_utc();
    let (mut added, mut already) = (Vec::new(), Vec::new());
    for (serial, info) in targets {
        if entries.iter().any(|e| same_serial(&e.serial, &serial)) {
            already.push(info);
        } else {
            entries.push(Revoked {
                serial,
                at: now,
                reason: reason.code(),
            });
            added.push(info);
        }
    }
    let number = number + 1;
    let pem = crl_pem(&ca_pem, &ca_key, &entries, number, now)?;
    write_atomically(&crl_path, pem.as_bytes())?;
    Ok(Revocation {
        crl: crl_path,
        number,
        added,
        already,
        total: entries.len(),
    })
}

/// A CRL signed by the CA (`ca_pem`, `ca_key_pem`) listing `revoked`, as PEM
/// text, issued at `now` with number `number`.
pub fn crl_pem(
    ca_pem: &str,
    ca_key_pem: &str,
    revoked: &[Revoked],
    number: u64,
    now: OffsetDateTime,
) -> anyhow::Result<String> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("parsing CA key")?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, ca_key).context("parsing CA certificate")?;
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(CRL_VALIDITY_DAYS),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|r| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&r.serial),
                revocation_time: r.at,
                reason_code: r.reason,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&issuer)
        .context("signing the revocation list (the CA must allow CRL signing)")?;
    crl.pem().context("encoding the revocation list")
}

/// The entries and number of a CRL (PEM) that the CA `ca` signed.
fn read_crl(bytes: &[u8], ca: &rustls::pki_types::CertificateDer<'_>) -> anyhow::Result<(Vec<Revoked>, u64)> {
    use rustls::pki_types::CertificateRevocationListDer;
    let der = CertificateRevocationListDer::from_pem_slice(bytes).context("not a PEM CRL")?;
    let (_, crl) =
        x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| anyhow::anyhow!("not a CRL: {e}"))?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca.as_ref()).map_err(|e| anyhow::anyhow!("CA: {e}"))?;
    if crl.issuer().as_raw() != ca.subject().as_raw() || crl.verify_signature(ca.public_key()).is_err() {
        bail!("not signed by this CA; move it away to start a new list");
    }
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n.clone()).ok())
        .unwrap_or(0);
    let entries = crl
        .iter_revoked_certificates()
        .map(|r| Revoked {
            serial: r.raw_serial().to_vec(),
            at: r.revocation_date.to_datetime(),
            reason: r.reason_code().and_then(|(_, c)| reason_from_code(c.0)),
        })
        .collect();
    Ok((entries, number))
}

fn reason_from_code(code: u8) -> Option<RevocationReason> {
    Some(match code {
        1 => RevocationReason::KeyCompromise,
        2 => RevocationReason::CaCompromise,
        3 => RevocationReason::AffiliationChanged,
        4 => RevocationReason::Superseded,
        5 => RevocationReason::CessationOfOperation,
        6 => RevocationReason::CertificateHold,
        8 => RevocationReason::RemoveFromCrl,
        9 => RevocationReason::PrivilegeWithdrawn,
        10 => RevocationReason::AaCompromise,
        _ => return None,
    })
}

/// Serial numbers are compared as integers: a leading zero byte (added when
/// the top bit is set) does not make another serial.
fn same_serial(a: &[u8], b: &[u8]) -> bool {
    let trim = |s: &[u8]| -> Vec<u8> { s.iter().copied().skip_while(|b| *b == 0).collect() };
    trim(a) == trim(b)
}

/// Every certificate recorded in `ca_dir/issued/` that carries `name`.
fn issued_to(ca_dir: &Path, name: &str) -> anyhow::Result<Vec<(Vec<u8>, RevokedCert)>> {
    let dir = ca_dir.join(ISSUED_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.extension().is_none_or(|x| x != "pem") {
            continue;
        }
        let pem = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let (serial, info) = parse_pem_cert(&pem).with_context(|| path.display().to_string())?;
        if info.names.iter().any(|n| n == name) {
            found.push((serial, info));
        }
    }
    found.sort_by_key(|(_, info)| info.not_after);
    Ok(found)
}

/// A PEM certificate's serial (big-endian bytes) and what [`revoke`] reports.
fn parse_pem_cert(pem: &str) -> anyhow::Result<(Vec<u8>, RevokedCert)> {
    let der =
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).context("not a PEM certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow::anyhow!("not a certificate: {e}"))?;
    let serial = cert.raw_serial().to_vec();
    Ok((
        serial.clone(),
        RevokedCert {
            serial: serial_hex(&serial),
            names: crate::tls::cert_dns_names(&der),
            not_after: cert.validity().not_after.timestamp(),
        },
    ))
}

/// Whether the certificate in `pem` was signed by the CA certificate `ca`.
fn check_issued_by(pem: &str, ca: &rustls::pki_types::CertificateDer<'_>) -> anyhow::Result<()> {
    let der =
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).context("not a PEM certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow::anyhow!("not a certificate: {e}"))?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca.as_ref()).map_err(|e| anyhow::anyhow!("CA: {e}"))?;
    if cert.issuer().as_raw() != ca.subject().as_raw()
        || cert.verify_signature(Some(ca.public_key())).is_err()
    {
        bail!("not issued by this CA ({})", ca.subject());
    }
    Ok(())
}

fn serial_hex(serial: &[u8]) -> String {
    let trimmed: Vec<u8> = serial.iter().copied().skip_while(|b| *b == 0).collect();
    if trimmed.is_empty() {
        "00".to_owned()
    } else {
        hex::encode(trimmed)
    }
}

fn read_ca(ca_dir: &Path) -> anyhow::Result<(String, String)> {
    let ca_pem = fs::read_to_string(ca_dir.join("ca.pem"))
        .with_context(|| format!("reading {}", ca_dir.join("ca.pem").display()))?;
    let ca_key = fs::read_to_string(ca_dir.join("ca.key"))
        .with_context(|| format!("reading {}", ca_dir.join("ca.key").display()))?;
    Ok((ca_pem, ca_key))
}

/// Writes `path` through a temporary file renamed over it, so a reader (an
/// agent watching its `tls.crl`, a copy task) never sees half a list.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("pem.tmp");
    write_file(&tmp, bytes, false)?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> anyhow::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::{CertificateDer, UnixTime};

    use super::*;
    use crate::tls::TlsMaterial;

    fn der(path: &Path) -> CertificateDer<'static> {
        crate::tls::load_certs(path).unwrap().remove(0)
    }

    /// What blr's relay says about a client presenting `cert`, with blr's
    /// identity and `crl` as its revocation list.
    fn relay_check(ca: &Path, crl: Option<&Path>, cert: &Path) -> Result<(), rustls::Error> {
        rustls::crypto::ring::default_provider().install_default().ok();
        let blr =
            TlsMaterial::load(&ca.join("ca.pem"), &ca.join("blr.pem"), &ca.join("blr.key"), crl).unwrap();
        blr.client_verifier()?
            .verify_client_cert(&der(cert), &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn revoking_a_pop_lists_every_certificate_issued_to_it_and_keeps_earlier_entries() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path();
        init(ca).unwrap();
        issue(ca, "blr", ca, 30).unwrap();
        let old_maa = dir.path().join("old-maa");
        issue(ca, "maa", &old_maa, 30).unwrap();
        issue(ca, "maa", ca, 30).unwrap();
        issue(ca, "del", ca, 30).unwrap();
        assert_eq!(
            fs::read_dir(ca.join(ISSUED_DIR)).unwrap().count(),
            4,
            "each certificate is recorded"
        );
        // Before any revocation both maa certificates are accepted.
        relay_check(ca, None, &ca.join("maa.pem")).unwrap();

        let r = revoke(ca, Some("maa"), None, Reason::KeyCompromise).unwrap();
        assert_eq!((r.number, r.added.len(), r.total), (1, 2, 2), "{r:?}");
        assert!(r.added.iter().all(|c| c.names == ["maa"]), "{r:?}");
        let crl = ca.join(CRL_FILE);
        for maa in [ca.join("maa.pem"), old_maa.join("maa.pem")] {
            let e = relay_check(ca, Some(&crl), &maa).unwrap_err();
            assert_eq!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            );
        }
        relay_check(ca, Some(&crl), &ca.join("del.pem")).unwrap();

        // The next revocation keeps maa's entries, and counts up.
        let r = revoke(ca, Some("del"), None, Reason::Unspecified).unwrap();
        assert_eq!((r.number, r.added.len(), r.total), (2, 1, 3), "{r:?}");
        relay_check(ca, Some(&crl), &ca.join("maa.pem")).unwrap_err();
        relay_check(ca, Some(&crl), &ca.join("del.pem")).unwrap_err();
        relay_check(ca, Some(&crl), &ca.join("blr.pem")).unwrap();
        let (entries, number) = read_crl(&fs::read(&crl).unwrap(), &der(&ca.join("ca.pem"))).unwrap();
        assert_eq!(number, 2);
        assert_eq!(
            entries
                .iter()
                .filter(|e| e.reason == Some(RevocationReason::KeyCompromise))
                .count(),
            2,
            "maa's reason survives the rewrite"
        );

        // Asked again: nothing new, and said so.
        let r = revoke(ca, None, Some(&ca.join("maa.pem")), Reason::Unspecified).unwrap();
        assert_eq!((r.added.len(), r.already.len(), r.total), (0, 1, 3), "{r:?}");
    }

    #[test]
    fn a_list_without_an_entry_lets_that_certificate_back_in() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path();
        init(ca).unwrap();
        issue(ca, "blr", ca, 30).unwrap();
        issue(ca, "maa", ca, 30).unwrap();
        revoke(ca, Some("maa"), None, Reason::Unspecified).unwrap();
        let crl = ca.join(CRL_FILE);
        relay_check(ca, Some(&crl), &ca.join("maa.pem")).unwrap_err();
        let pem = crl_pem(
            &fs::read_to_string(ca.join("ca.pem")).unwrap(),
            &fs::read_to_string(ca.join("ca.key")).unwrap(),
            &[],
            2,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        fs::write(&crl, pem).unwrap();
        relay_check(ca, Some(&crl), &ca.join("maa.pem")).unwrap();
    }

    #[test]
    fn revoke_refuses_what_it_cannot_vouch_for() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init(&ca).unwrap();
        issue(&ca, "maa", &ca, 30).unwrap();
        // A certificate from another CA.
        let other = dir.path().join("other");
        init(&other).unwrap();
        issue(&other, "maa", &other, 30).unwrap();
        let e = revoke(&ca, None, Some(&other.join("maa.pem")), Reason::Unspecified).unwrap_err();
        assert!(format!("{e:#}").contains("not issued by this CA"), "{e:#}");
        // --name and --cert disagree.
        let e = revoke(&ca, Some("blr"), Some(&ca.join("maa.pem")), Reason::Unspecified).unwrap_err();
        assert!(format!("{e:#}").contains("not for `blr`"), "{e:#}");
        // Nothing recorded for that PoP.
        let e = revoke(&ca, Some("del"), None, Reason::Unspecified).unwrap_err();
        assert!(format!("{e:#}").contains("--cert FILE"), "{e:#}");
        // No list was written by any of these.
        assert!(!ca.join(CRL_FILE).exists());
        // A list in the CA directory signed by another CA is not extended.
        revoke(&other, Some("maa"), None, Reason::Unspecified).unwrap();
        fs::copy(other.join(CRL_FILE), ca.join(CRL_FILE)).unwrap();
        let e = revoke(&ca, Some("maa"), None, Reason::Unspecified).unwrap_err();
        assert!(format!("{e:#}").contains("not signed by this CA"), "{e:#}");
    }

    #[test]
    fn every_fleet_ca_has_a_name_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        init(&a).unwrap();
        init(&b).unwrap();
        let subject = |d: &Path| crate::tls::cert_expiry(&der(&d.join("ca.pem"))).unwrap().0;
        assert!(subject(&a).starts_with("CN=Detour fleet CA "), "{}", subject(&a));
        assert_ne!(subject(&a), subject(&b));
    }

    #[test]
    fn default_lifetimes_are_short_for_pops_and_longer_for_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path();
        init(ca).unwrap();
        issue(ca, "blr", ca, LEAF_VALIDITY_DAYS).unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let days_left = |p: &Path| (crate::tls::cert_expiry(&der(p)).unwrap().1 - now + 43_200) / 86_400;
        assert_eq!(days_left(&ca.join("blr.pem")), LEAF_VALIDITY_DAYS);
        assert_eq!(days_left(&ca.join("ca.pem")), CA_VALIDITY_DAYS);
        const { assert!(CA_VALIDITY_DAYS > 4 * LEAF_VALIDITY_DAYS) };
    }
}

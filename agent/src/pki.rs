//! `detour-agent pki`: a fleet CA and per-PoP certificates (rcgen), so a lab
//! or a small fleet needs no OpenSSL commands. Production may bring its own PKI:
//! the agent only needs a CA file, a certificate naming the PoP, and its key.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::config::valid_pop_name;

/// How long a fleet CA is valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// How long a PoP certificate is valid by default.
pub const LEAF_VALIDITY_DAYS: i64 = 825;

/// Writes `dir/ca.pem` and `dir/ca.key` (mode 0600). Refuses to overwrite an
/// existing CA, since every certificate of the fleet hangs on it.
pub fn init(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    if cert_path.exists() || key_path.exists() {
        bail!("{} already holds a CA; refusing to overwrite it", dir.display());
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (pem, key) = new_ca("Detour fleet CA", OffsetDateTime::now_utc(), CA_VALIDITY_DAYS)?;
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
/// in `ca_dir`. The certificate serves both sides of the mesh (relay server
/// and tunnel client) and carries the PoP name as its DNS name.
pub fn issue(ca_dir: &Path, name: &str, out: &Path, days: i64) -> anyhow::Result<(PathBuf, PathBuf)> {
    if !valid_pop_name(name) {
        bail!("`{name}` is not a PoP name (lowercase letters, digits and '-', at most 32)");
    }
    let ca_pem = fs::read_to_string(ca_dir.join("ca.pem"))
        .with_context(|| format!("reading {}", ca_dir.join("ca.pem").display()))?;
    let ca_key = fs::read_to_string(ca_dir.join("ca.key"))
        .with_context(|| format!("reading {}", ca_dir.join("ca.key").display()))?;
    let now = OffsetDateTime::now_utc();
    let (pem, key) = issue_pem(
        &ca_pem,
        &ca_key,
        name,
        now - Duration::hours(1),
        now + Duration::days(days),
    )?;
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

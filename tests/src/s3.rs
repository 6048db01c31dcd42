//! A real S3-compatible server for the recordings tests: `moto` in server
//! mode (PyPI `moto[server]`), on loopback, killed on drop. moto accepts any
//! credentials and does not check `x-amz-checksum-sha256` (FACTS.md), so the
//! tests compare the stored objects' SHA-256 themselves.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;

use crate::load::CallClient;
use crate::process::{Proc, free_port};

/// moto refuses anonymous reads of private objects and checks no
/// signature: any `Authorization` will do.
const ANY_AUTH: &str = "AWS4-HMAC-SHA256 Credential=AKIALAB/20261205/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00";

/// Why moto cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    match Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        _ => Some("moto_server is not installed (pip install 'moto[server]')".to_owned()),
    }
}

/// A running moto server.
pub struct Moto {
    pub addr: SocketAddr,
    _proc: Proc,
    client: CallClient,
}

impl Moto {
    pub async fn start() -> anyhow::Result<Moto> {
        let port = free_port()?;
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting moto_server")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let moto = Moto {
            addr,
            _proc: Proc(child),
            client: CallClient::new(Duration::from_secs(30)),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = moto
                .client
                .send(http::Method::GET, &moto.url("/"), &[], Bytes::new())
                .await;
            if r.status.is_some() {
                return Ok(moto);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "moto_server did not start: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        let r = self
            .client
            .send(
                http::Method::PUT,
                &self.url(&format!("/{bucket}")),
                &[],
                Bytes::new(),
            )
            .await;
        anyhow::ensure!(r.status == Some(200), "creating bucket {bucket}: {r:?}");
        Ok(())
    }

    /// The object's bytes, or `None` when there is no such object. (moto
    /// refuses anonymous reads of private objects and checks no signature:
    /// any `Authorization` will do.)
    pub async fn get(&self, bucket: &str, key: &str) -> anyhow::Result<Option<Bytes>> {
        let r = self
            .client
            .send(
                http::Method::GET,
                &self.url(&format!("/{bucket}/{key}")),
                &[("authorization", ANY_AUTH)],
                Bytes::new(),
            )
            .await;
        match r.status {
            Some(200) => Ok(Some(r.body)),
            Some(404) => Ok(None),
            _ => anyhow::bail!("GET {bucket}/{key}: {r:?}"),
        }
    }

    /// Whether the object exists (a `HEAD`).
    pub async fn exists(&self, bucket: &str, key: &str) -> bool {
        let r = self
            .client
            .send(
                http::Method::HEAD,
                &self.url(&format!("/{bucket}/{key}")),
                &[("authorization", ANY_AUTH)],
                Bytes::new(),
            )
            .await;
        r.status == Some(200)
    }

    /// Multipart uploads begun and neither completed nor aborted.
    pub async fn open_uploads(&self, bucket: &str) -> anyhow::Result<usize> {
        let r = self
            .client
            .send(
                http::Method::GET,
                &self.url(&format!("/{bucket}?uploads")),
                &[],
                Bytes::new(),
            )
            .await;
        anyhow::ensure!(r.status == Some(200), "listing uploads of {bucket}: {r:?}");
        Ok(String::from_utf8_lossy(&r.body).matches("<Upload>").count())
    }

    /// The keys in the bucket (up to 1,000).
    pub async fn keys(&self, bucket: &str) -> anyhow::Result<Vec<String>> {
        let r = self
            .client
            .send(
                http::Method::GET,
                &self.url(&format!("/{bucket}?list-type=2")),
                &[],
                Bytes::new(),
            )
            .await;
        anyhow::ensure!(r.status == Some(200), "listing {bucket}: {r:?}");
        let text = String::from_utf8_lossy(&r.body).into_owned();
        Ok(text
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_owned)
            .collect())
    }
}

/// A `[recordings]` section for a lab agent: files in `recordings/` next to
/// its agent.toml, the store at moto's port as `localhost` (path-style
/// URLs) dialled at `store` (moto itself, or a link in front of it), plus
/// `extra` lines for the section.
pub fn recordings_section(
    moto_port: u16,
    store: SocketAddr,
    credentials: &Path,
    bucket: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[recordings]
dir = "recordings"
complete = "renamed"
{extra}

[recordings.store]
endpoint = "http://localhost:{moto_port}"
addresses = ["{store}"]
bucket = "{bucket}"
region = "ap-south-1"
credentials_file = "{creds}"
key_template = "{{pop}}/{{date}}/{{call_id}}/{{file}}"
"#,
        creds = credentials.display(),
    )
}

/// Writes a credentials file (moto accepts any keys) in `dir`; its path.
pub fn write_credentials(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("s3.credentials");
    std::fs::write(
        &path,
        "[default]\naws_access_key_id = AKIALAB\naws_secret_access_key = lab-secret\n",
    )?;
    Ok(path)
}

/// Writes `data` as `name` into `dir` the way `complete = "renamed"` wants:
/// under another name first, then renamed in.
pub fn drop_file(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.part"));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, dir.join(name))
}

/// Deterministic bytes of `len`, different for each `seed`.
pub fn content(seed: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Today (UTC) as a key template's `{date}` writes it.
pub fn today() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

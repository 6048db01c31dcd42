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
    /// moto's request log (its stderr), one line per request.
    log: tempfile::NamedTempFile,
    /// Where moto keeps the objects it spills to files, when not `/tmp`.
    _spill: Option<tempfile::TempDir>,
}

impl Moto {
    pub async fn start() -> anyhow::Result<Moto> {
        Moto::start_with(&[], None).await
    }

    /// moto kept on `cpu` (`taskset`) in the `SCHED_IDLE` class (`chrt`): a
    /// store in another datacentre, off the PoP's CPU, and yielding that CPU
    /// at once to the control plane that shares it (see [`crate::cpus`]).
    ///
    /// And off the PoP's disk: moto writes every object and multipart part
    /// over 5 MB to a temporary file, and keeps a completed upload's parts
    /// beside its object until the object is deleted, so each 50 MB
    /// recording cost 100 MB of writes to this machine's one disk, queued
    /// with the PoP's own. Its temporary files go to a tmpfs (`/dev/shm`)
    /// instead; delete what is no longer needed ([`Moto::delete`]) to give
    /// the memory back.
    pub async fn start_on(cpu: usize) -> anyhow::Result<Moto> {
        let spill = Path::new("/dev/shm")
            .is_dir()
            .then(|| {
                tempfile::Builder::new()
                    .prefix("detour-moto")
                    .tempdir_in("/dev/shm")
            })
            .transpose()?;
        let tmpdir = spill.as_ref().map(|d| d.path().to_string_lossy().into_owned());
        let env: Vec<(&str, &str)> = tmpdir.iter().map(|d| ("TMPDIR", d.as_str())).collect();
        let mut moto = Moto::start_with(&env, Some(cpu)).await?;
        moto._spill = spill;
        Ok(moto)
    }

    /// moto that checks credentials and signatures, as S3 does, with
    /// `bucket` made and one user allowed everything on S3; that user's
    /// (access key, secret key). Any other key is refused
    /// (`InvalidAccessKeyId`), and so is a wrong secret
    /// (`SignatureDoesNotMatch`). The setup goes through boto3 (which moto
    /// brings) in the first four requests, the only ones moto lets through
    /// unsigned (`INITIAL_NO_AUTH_ACTION_COUNT`).
    pub async fn start_checking_credentials(bucket: &str) -> anyhow::Result<(Moto, String, String)> {
        let moto = Moto::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "4")], None).await?;
        let script = format!(
            r#"
import boto3
kw = dict(endpoint_url="{url}", region_name="us-east-1",
          aws_access_key_id="setup", aws_secret_access_key="setup")
boto3.client("s3", **kw).create_bucket(Bucket="{bucket}")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="recorder")
key = iam.create_access_key(UserName="recorder")["AccessKey"]
iam.put_user_policy(UserName="recorder", PolicyName="s3",
    PolicyDocument='{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:*","Resource":"*"}}]}}')
print(key["AccessKeyId"], key["SecretAccessKey"])
"#,
            url = moto.url(""),
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .context("running python3 for moto's setup")?;
        anyhow::ensure!(
            out.status.success(),
            "moto's setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout)?;
        let (access, secret) = text
            .trim()
            .split_once(' ')
            .context("no access key from moto's setup")?;
        Ok((moto, access.to_owned(), secret.to_owned()))
    }

    async fn start_with(env: &[(&str, &str)], cpu: Option<usize>) -> anyhow::Result<Moto> {
        let port = free_port()?;
        let log = tempfile::NamedTempFile::new()?;
        // moto stands in for a store in another datacentre: niced, so that
        // its CPU on this machine does not count against what is measured
        // here (`taskset`, `chrt` and `nice` exec it: the child is moto
        // itself).
        let mut command = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string(), "chrt", "--idle", "0", "nice"]);
                c
            }
            None => Command::new("nice"),
        };
        let child = command
            .args(["-n", "10", "moto_server"])
            .envs(env.iter().copied())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(log.reopen()?)
            .spawn()
            .context("starting moto_server")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let moto = Moto {
            addr,
            _proc: Proc(child),
            client: CallClient::new(Duration::from_secs(30)),
            log,
            _spill: None,
        };
        // A connection, not a request: moto counts requests against
        // INITIAL_NO_AUTH_ACTION_COUNT.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "moto_server did not start on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(moto)
    }

    /// Every multipart part moto stored (answered 200), in order, as
    /// (upload id, part number), from its request log: what was sent to it
    /// and kept, however the sender counts.
    pub fn stored_parts(&self) -> anyhow::Result<Vec<(String, u32)>> {
        let text = std::fs::read_to_string(self.log.path())?;
        Ok(text.lines().filter_map(stored_part).collect())
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

    /// The parts moto holds now, in every open multipart upload of `bucket`,
    /// that are `part_size` bytes or more: (upload id, part number). A part
    /// cut short by a sender that died mid-body is stored short by moto
    /// (it checks no checksum), so only these are known whole.
    pub async fn whole_parts(&self, bucket: &str, part_size: u64) -> anyhow::Result<Vec<(String, u32)>> {
        let r = self
            .client
            .send(
                http::Method::GET,
                &self.url(&format!("/{bucket}?uploads")),
                &[("authorization", ANY_AUTH)],
                Bytes::new(),
            )
            .await;
        anyhow::ensure!(r.status == Some(200), "listing uploads of {bucket}: {r:?}");
        let mut whole = Vec::new();
        for upload in elements(&String::from_utf8_lossy(&r.body), "Upload") {
            let (Some(key), Some(id)) = (element(&upload, "Key"), element(&upload, "UploadId")) else {
                continue;
            };
            let mut list = url::Url::parse(&self.url(&format!("/{bucket}/{key}")))?;
            list.query_pairs_mut().append_pair("uploadId", &id);
            let r = self
                .client
                .send(
                    http::Method::GET,
                    list.as_str(),
                    &[("authorization", ANY_AUTH)],
                    Bytes::new(),
                )
                .await;
            anyhow::ensure!(r.status == Some(200), "listing parts of {key}: {r:?}");
            for part in elements(&String::from_utf8_lossy(&r.body), "Part") {
                let number = element(&part, "PartNumber").and_then(|n| n.parse().ok());
                let size: Option<u64> = element(&part, "Size").and_then(|n| n.parse().ok());
                if let (Some(number), Some(size)) = (number, size)
                    && size >= part_size
                {
                    whole.push((id.clone(), number));
                }
            }
        }
        Ok(whole)
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
        Ok(elements(&String::from_utf8_lossy(&r.body), "Key"))
    }

    /// Deletes the object (moto frees its bytes, and the parts it was
    /// assembled from).
    pub async fn delete(&self, bucket: &str, key: &str) -> anyhow::Result<()> {
        let r = self
            .client
            .send(
                http::Method::DELETE,
                &self.url(&format!("/{bucket}/{key}")),
                &[("authorization", ANY_AUTH)],
                Bytes::new(),
            )
            .await;
        anyhow::ensure!(r.status == Some(204), "deleting {bucket}/{key}: {r:?}");
        Ok(())
    }
}

/// `s3s-fs` (crates.io, a file-system-backed S3 server) on loopback,
/// killed on drop. Unlike moto it checks signatures, presigned ones too
/// (`SignatureDoesNotMatch`, `NotSignedUp` for an unknown key), and a
/// `PutObject`'s `x-amz-checksum-sha256` (`BadDigest`).
pub struct S3sFs {
    pub addr: SocketAddr,
    _proc: Proc,
    root: tempfile::TempDir,
}

impl S3sFs {
    /// Why s3s-fs cannot run here, if it cannot.
    pub fn unavailable() -> Option<String> {
        match Command::new("s3s-fs")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(s) if s.success() => None,
            _ => Some(
                "s3s-fs is not installed (cargo install s3s-fs --version 0.14.1 --features binary --locked)"
                    .to_owned(),
            ),
        }
    }

    /// Starts it with one key pair and `bucket` made.
    pub async fn start(access: &str, secret: &str, bucket: &str) -> anyhow::Result<S3sFs> {
        let root = tempfile::tempdir()?;
        std::fs::create_dir(root.path().join(bucket))?;
        let port = free_port()?;
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", access, "--secret-key", secret])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting s3s-fs")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let server = S3sFs {
            addr,
            _proc: Proc(child),
            root,
        };
        crate::process::wait_listening(addr).await?;
        Ok(server)
    }

    /// The stored object's bytes, read from s3s-fs's directory.
    pub fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.path().join(bucket).join(key)).ok()
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
    write_keys(dir, "AKIALAB", "lab-secret")
}

/// Writes a credentials file with these keys in `dir`; its path.
pub fn write_keys(dir: &Path, access: &str, secret: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("s3.credentials");
    std::fs::write(
        &path,
        format!("[default]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n"),
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

/// The contents of every `<name>` element in `xml` (flat, unescaped
/// enough for moto's listings of the lab's keys).
fn elements(xml: &str, name: &str) -> Vec<String> {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    xml.split(&open)
        .skip(1)
        .filter_map(|s| s.split(&close).next())
        .map(str::to_owned)
        .collect()
}

fn element(xml: &str, name: &str) -> Option<String> {
    elements(xml, name).into_iter().next()
}

/// A request-log line of a stored part: `... "PUT /b/key?partNumber=N&uploadId=U HTTP/1.1" 200 -`.
fn stored_part(line: &str) -> Option<(String, u32)> {
    let (request, status) = line.split_once("\" ")?;
    if !status.starts_with("200") {
        return None;
    }
    let target = request.split_once("\"PUT ")?.1.split(' ').next()?;
    let query = target.split_once('?')?.1;
    let mut part = None;
    let mut upload = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "partNumber" => part = v.parse().ok(),
            "uploadId" => upload = Some(v.into_owned()),
            _ => {}
        }
    }
    Some((upload?, part?))
}

#[cfg(test)]
mod tests {
    use super::stored_part;

    #[test]
    fn a_stored_part_is_read_from_the_request_log_and_nothing_else_is() {
        let ok =
            r#"127.0.0.1 - - [05/Dec/2026 17:08:33] "PUT /b/k?partNumber=3&uploadId=abc HTTP/1.1" 200 -"#;
        assert_eq!(stored_part(ok), Some(("abc".to_owned(), 3)));
        let failed = ok.replace("200 -", "500 -");
        assert_eq!(stored_part(&failed), None);
        let whole = r#"127.0.0.1 - - [05/Dec/2026 17:08:33] "PUT /b/k HTTP/1.1" 200 -"#;
        assert_eq!(stored_part(whole), None);
        assert_eq!(stored_part("Traceback (most recent call last):"), None);
    }
}

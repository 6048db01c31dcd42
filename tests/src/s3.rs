//! A real S3-compatible server for the recordings tests: `moto` in server
//! mode (PyPI `moto[server]`), on loopback, killed on drop. moto accepts any
//! credentials and does not check `x-amz-checksum-sha256` (FACTS.md), so the
//! tests compare the stored objects' SHA-256 themselves.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;

use crate::load::CallClient;
use crate::process::{Proc, free_port};

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
        let auth = "AWS4-HMAC-SHA256 Credential=AKIALAB/20261205/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00";
        let r = self
            .client
            .send(
                http::Method::GET,
                &self.url(&format!("/{bucket}/{key}")),
                &[("authorization", auth)],
                Bytes::new(),
            )
            .await;
        match r.status {
            Some(200) => Ok(Some(r.body)),
            Some(404) => Ok(None),
            _ => anyhow::bail!("GET {bucket}/{key}: {r:?}"),
        }
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

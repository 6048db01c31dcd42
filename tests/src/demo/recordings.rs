//! The demo's recordings: when moto is installed, blr's call handler also
//! leaves a finished recording every two seconds, and blr's agent carries
//! them to moto's bucket over its paths: its own uplink while it works,
//! a peer's relay while it is cut. At the end each is checked in the
//! bucket (SHA-256) and on its call. Without moto the story is told
//! without them, and says so.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::fleet::{Fleet, counter_sum};
use crate::link::{Fault, Link};
use crate::load::CallClient;
use crate::s3::{Moto, content, drop_file, recordings_section, today, write_credentials};

const BUCKET: &str = "recordings";

/// moto, its bucket, and blr's link to it (cut together with blr's uplink).
pub struct Recordings {
    moto: Moto,
    _creds_dir: tempfile::TempDir,
    creds: PathBuf,
    /// blr's way to the store: the same uplink, so the same faults.
    pub link: Link,
    written: Arc<Mutex<Vec<Written>>>,
}

/// A recording the call handler wrote: call id, file name, SHA-256.
type Written = (String, String, [u8; 32]);

/// What became of the recordings.
pub struct Outcome {
    pub written: usize,
    /// In the bucket whole and listed on their call.
    pub stored: usize,
    /// Recording bytes blr sent per path.
    pub bytes_by_path: Vec<(String, u64)>,
}

impl Recordings {
    /// Starts moto with the bucket; `Ok(None)` (and why) when moto is missing.
    pub async fn start() -> anyhow::Result<Result<Recordings, String>> {
        if let Some(why) = crate::s3::unavailable() {
            return Ok(Err(why));
        }
        let moto = Moto::start().await?;
        moto.create_bucket(BUCKET).await?;
        let creds_dir = tempfile::tempdir()?;
        let creds = write_credentials(creds_dir.path())?;
        let link = Link::start(moto.addr).await?;
        Ok(Ok(Recordings {
            moto,
            _creds_dir: creds_dir,
            creds,
            link,
            written: Arc::default(),
        }))
    }

    /// Each PoP's `[recordings]` section: blr's store through its link;
    /// the peers' sections make their relays allow the store.
    pub fn tails(&self, pops: &[String]) -> BTreeMap<String, String> {
        let port = self.moto.addr.port();
        pops.iter()
            .map(|pop| {
                let via = if pop == "blr" {
                    self.link.addr
                } else {
                    self.moto.addr
                };
                let extra = "scan_interval = \"100ms\"";
                (
                    pop.clone(),
                    recordings_section(port, via, &self.creds, BUCKET, extra),
                )
            })
            .collect()
    }

    /// The call handler's recordings: one every two seconds for `total`,
    /// each for a new call made through blr, 100 KB to 2 MB.
    pub fn spawn_writer(&self, fleet: &Fleet, total: Duration) -> JoinHandle<()> {
        let local = fleet.pop("blr").local_url();
        let dir = recordings_dir(fleet);
        let written = self.written.clone();
        tokio::spawn(async move {
            let client = CallClient::new(Duration::from_secs(10));
            let start = Instant::now();
            let mut n = 0usize;
            while start.elapsed() + Duration::from_secs(2) < total {
                n += 1;
                tokio::time::sleep_until(start + Duration::from_secs(2 * n as u64)).await;
                let Some(id) = new_call(&client, &local, n).await else {
                    continue;
                };
                let name = format!("{id}.wav");
                let data = content(n, 100_000 + (n * 337_000) % 1_900_000);
                if drop_file(&dir, &name, &data).is_ok() {
                    let sum: [u8; 32] = Sha256::digest(&data).into();
                    written
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((id, name, sum));
                }
            }
        })
    }

    /// Mirrors blr's uplink fault on its way to the store.
    pub fn set(&self, fault: Fault) {
        self.link.set(fault);
    }

    /// Waits (at most `within`) until blr has finished every recording,
    /// then checks each in the bucket and on its call.
    pub async fn finish(&self, fleet: &Fleet, within: Duration) -> anyhow::Result<Outcome> {
        let dir = recordings_dir(fleet);
        let written = self.written.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let deadline = Instant::now() + within;
        while written.iter().any(|(_, name, _)| dir.join(name).exists()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let client = CallClient::new(Duration::from_secs(5));
        let local = fleet.pop("blr").local_url();
        let mut stored = 0;
        for (id, name, sum) in &written {
            let key = format!("blr/{}/{id}/{name}", today());
            let whole = self
                .moto
                .get(BUCKET, &key)
                .await?
                .is_some_and(|body| <[u8; 32]>::from(Sha256::digest(&body)) == *sum);
            let r = client
                .send(
                    http::Method::GET,
                    &format!("{local}/v1/calls/{id}"),
                    &[],
                    bytes::Bytes::new(),
                )
                .await;
            let listed = serde_json::from_slice::<serde_json::Value>(&r.body)
                .ok()
                .and_then(|v| v["recordings"].as_array().map(Vec::len))
                == Some(1);
            if whole && listed {
                stored += 1;
            }
        }
        let agent = fleet.pop("blr").agent();
        let bytes_by_path = ["direct", "via:maa", "via:del"]
            .iter()
            .map(|p| {
                (
                    (*p).to_owned(),
                    counter_sum(agent, "detour_recordings_bytes_total", "path", p),
                )
            })
            .filter(|(_, b)| *b > 0)
            .collect();
        Ok(Outcome {
            written: written.len(),
            stored,
            bytes_by_path,
        })
    }
}

fn recordings_dir(fleet: &Fleet) -> PathBuf {
    fleet
        .pop("blr")
        .config_path
        .parent()
        .map(|p| p.join("recordings"))
        .unwrap_or_default()
}

async fn new_call(client: &CallClient, local: &str, n: usize) -> Option<String> {
    let r = client
        .send(
            http::Method::POST,
            &format!("{local}/v1/calls"),
            &[
                ("content-type", "application/json"),
                ("idempotency-key", &format!("demo-recording-{n}")),
            ],
            bytes::Bytes::from_static(br#"{"caller":"+919876543210","destination":"+918041234567"}"#),
        )
        .await;
    if r.status != Some(201) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
    v["call_id"].as_str().map(str::to_owned)
}

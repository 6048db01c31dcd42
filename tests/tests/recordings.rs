//! Call recordings reach a real S3-compatible store (moto, on loopback) over
//! the agent's paths, are recorded on their calls at the real control plane,
//! and only then leave the local directory. Without moto the suite prints
//! `SKIPPED` (with `DETOUR_REQUIRE_TOOLS=1`, as in CI, it fails instead).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use detour_lab::fleet::{Fleet, FleetOptions, counter_sum};
use detour_lab::link::{Fault, Link};
use detour_lab::load::CallClient;
use detour_lab::s3::Moto;
use sha2::{Digest, Sha256};

const BUCKET: &str = "recordings";

fn skip() -> bool {
    match detour_lab::s3::unavailable() {
        None => false,
        Some(why) => {
            assert!(
                std::env::var("DETOUR_REQUIRE_TOOLS").as_deref() != Ok("1"),
                "the recordings suite is required but cannot run: {why}"
            );
            eprintln!("SKIPPED: recordings: {why}");
            true
        }
    }
}

/// A `[recordings]` section whose store is reached at `store` (blr's is
/// behind a link the test can cut, like its control-plane uplink).
fn section(moto: &Moto, store: std::net::SocketAddr, credentials: &Path) -> String {
    format!(
        r#"
[recordings]
dir = "recordings"
complete = "renamed"
part_size = "5MiB"
scan_interval = "100ms"

[recordings.store]
endpoint = "http://localhost:{port}"
addresses = ["{store}"]
bucket = "{BUCKET}"
region = "ap-south-1"
credentials_file = "{creds}"
key_template = "{{pop}}/{{date}}/{{call_id}}/{{file}}"
"#,
        port = moto.addr.port(),
        creds = credentials.display(),
    )
}

/// Failed recording steps other than "no path for now".
fn hard_failures(agent: &detour_agent::Agent) -> Vec<(String, u64)> {
    [
        "unreadable",
        "vanished",
        "changed",
        "no_call_id",
        "store_refused",
        "control_plane_refused",
        "journal",
        "local_action",
    ]
    .iter()
    .map(|r| {
        let n = agent
            .shared
            .metrics
            .recordings_failed
            .with_label_values(&[r])
            .get();
        (r.to_string(), n)
    })
    .filter(|(_, n)| *n > 0)
    .collect()
}

/// The recording bytes `agent` sent, on every path.
fn bytes_sent(agent: &detour_agent::Agent) -> u64 {
    ["direct", "via:maa", "via:del"]
        .iter()
        .map(|p| counter_sum(agent, "detour_recordings_bytes_total", "path", p))
        .sum()
}

/// The moto server with the bucket, and a credentials file.
async fn store() -> (Moto, tempfile::TempDir, std::path::PathBuf) {
    let moto = Moto::start().await.unwrap();
    moto.create_bucket(BUCKET).await.unwrap();
    let creds_dir = tempfile::tempdir().unwrap();
    let creds = creds_dir.path().join("s3.credentials");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = AKIALAB\naws_secret_access_key = lab-secret\n",
    )
    .unwrap();
    (moto, creds_dir, creds)
}

/// Writes `data` as `name` into `dir` the way `complete = "renamed"` wants.
fn drop_file(dir: &Path, name: &str, data: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    let tmp = dir.join(format!(".{name}.part"));
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// Makes a call through `pop`'s agent; its id.
async fn make_call(client: &CallClient, local: &str, n: usize) -> String {
    let r = client
        .send(
            http::Method::POST,
            &format!("{local}/v1/calls"),
            &[
                ("content-type", "application/json"),
                ("idempotency-key", &format!("rec-call-{n}")),
            ],
            Bytes::from_static(br#"{"caller":"+919876543210","destination":"+918041234567"}"#),
        )
        .await;
    assert_eq!(r.status, Some(201), "{r:?}");
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["call_id"].as_str().unwrap().to_owned()
}

/// Deterministic bytes of `len`, different for each `seed`.
fn content(seed: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_written_while_the_uplink_is_cut_reach_the_store_through_a_peer_once_each() {
    if skip() {
        return;
    }
    let moto = Moto::start().await.unwrap();
    moto.create_bucket(BUCKET).await.unwrap();
    let creds_dir = tempfile::tempdir().unwrap();
    let creds = creds_dir.path().join("s3.credentials");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = AKIALAB\naws_secret_access_key = lab-secret\n",
    )
    .unwrap();
    // blr reaches the store through a link cut with its uplink; the peers
    // reach it directly.
    let blr_store = Link::start(moto.addr).await.unwrap();
    let mut tail = BTreeMap::new();
    tail.insert("blr".to_owned(), section(&moto, blr_store.addr, &creds));
    tail.insert("maa".to_owned(), section(&moto, moto.addr, &creds));
    tail.insert("del".to_owned(), section(&moto, moto.addr, &creds));
    let fleet = Fleet::start(FleetOptions {
        real_cp: true,
        tail,
        ..Default::default()
    })
    .await
    .unwrap();
    fleet
        .put_route("blr", "india", r#"{"prefix":"+91","trunk":"t1","pop":"blr"}"#)
        .await
        .unwrap();
    let local = fleet.pop("blr").local_url();
    let client = CallClient::new(Duration::from_secs(5));
    // blr's uplink is cut: calls and recordings both go through a peer.
    fleet.pop("blr").uplink.set(Fault::Blackhole);
    blr_store.set(Fault::Blackhole);
    let dir = fleet.pop("blr").config_path.parent().unwrap().join("recordings");
    std::fs::create_dir_all(&dir).unwrap();
    // Mixed sizes: small files in one PUT, larger ones as multipart uploads
    // of 5 MiB parts.
    let sizes = [1_000, 40_000, 300_000, 1_500_000, 5 * 1024 * 1024 + 1, 12_000_000];
    let mut expected = Vec::new();
    for (n, size) in sizes.iter().enumerate() {
        let id = make_call(&client, &local, n).await;
        let data = content(n, *size);
        let name = format!("{id}.wav");
        // Written under another name, then renamed: complete = "renamed".
        let tmp = dir.join(format!(".{name}.part"));
        std::fs::write(&tmp, &data).unwrap();
        std::fs::rename(&tmp, dir.join(&name)).unwrap();
        expected.push((id, name, hex::encode(Sha256::digest(&data)), *size));
    }
    // Every file leaves the directory once stored and recorded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<_> = expected
            .iter()
            .filter(|(_, name, _, _)| dir.join(name).exists())
            .collect();
        if left.is_empty() {
            break;
        }
        let status = fleet.pop("blr").agent().shared.recordings.load_full();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} recordings still in the directory: {:?}; backlog: {status:?}",
            left.len(),
            left.iter().map(|l| &l.1).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let keys = moto.keys(BUCKET).await.unwrap();
    assert_eq!(keys.len(), expected.len(), "objects: {keys:?}");
    for (id, name, sha, size) in &expected {
        let key = keys
            .iter()
            .find(|k| k.ends_with(&format!("/{id}/{name}")) && k.starts_with("blr/"))
            .unwrap_or_else(|| panic!("no object for {name} in {keys:?}"));
        let body = moto.get(BUCKET, key).await.unwrap().unwrap();
        assert_eq!(body.len(), *size, "{key}");
        assert_eq!(
            &hex::encode(Sha256::digest(&body)),
            sha,
            "{key}: stored bytes differ"
        );
        let r = client
            .send(
                http::Method::GET,
                &format!("{local}/v1/calls/{id}"),
                &[],
                Bytes::new(),
            )
            .await;
        let call: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let recs = call["recordings"].as_array().unwrap();
        assert_eq!(recs.len(), 1, "{call}");
        assert_eq!(recs[0]["sha256"], sha.as_str());
        assert_eq!(recs[0]["key"], key.as_str());
        assert_eq!(recs[0]["size"], *size as u64);
    }
    let agent = fleet.pop("blr").agent();
    let total: u64 = sizes.iter().map(|s| *s as u64).sum();
    let via: u64 = ["via:maa", "via:del"]
        .iter()
        .map(|p| counter_sum(agent, "detour_recordings_bytes_total", "path", p))
        .sum();
    assert_eq!(via, total, "every byte went through a peer, once");
    assert_eq!(
        counter_sum(agent, "detour_recordings_bytes_total", "path", "direct"),
        0
    );
    assert_eq!(agent.shared.metrics.recordings_uploaded.get(), sizes.len() as u64);
    assert_eq!(agent.shared.metrics.recordings_pending.get(), 0);
    assert_eq!(hard_failures(agent), Vec::<(String, u64)>::new());
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopped_mid_upload_resumes_without_sending_stored_parts_again() {
    if skip() {
        return;
    }
    let (moto, _creds_dir, creds) = store().await;
    // A slow store link, so that every stop lands in the middle of a part.
    let blr_store = Link::start(moto.addr).await.unwrap();
    blr_store.set(Fault::Latency(Duration::from_millis(3)));
    let mut tail = BTreeMap::new();
    tail.insert("blr".to_owned(), section(&moto, blr_store.addr, &creds));
    let mut fleet = Fleet::start(FleetOptions {
        real_cp: true,
        tail,
        ..Default::default()
    })
    .await
    .unwrap();
    fleet
        .put_route("blr", "india", r#"{"prefix":"+91","trunk":"t1","pop":"blr"}"#)
        .await
        .unwrap();
    let client = CallClient::new(Duration::from_secs(5));
    let local = fleet.pop("blr").local_url();
    let dir = fleet.pop("blr").config_path.parent().unwrap().join("recordings");
    let big_id = make_call(&client, &local, 100).await;
    let late_id = make_call(&client, &local, 101).await;
    let big = content(100, 26 * 1024 * 1024 + 12_345);
    drop_file(&dir, &format!("{big_id}.wav"), &big);

    let part = 5 * 1024 * 1024;
    let mut sent = 0;
    let mut stops = 0;
    for round in 0..3 {
        // Stop once at least one more part has been stored in this life.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let agent = fleet.pop("blr").agent();
            if bytes_sent(agent) >= part as u64 || !dir.join(format!("{big_id}.wav")).exists() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no part stored in round {round}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !dir.join(format!("{big_id}.wav")).exists() {
            break;
        }
        sent += bytes_sent(fleet.pop("blr").agent());
        fleet.stop_agent("blr").await;
        stops += 1;
        if round == 0 {
            // Written while the agent is stopped: found at start.
            drop_file(&dir, &format!("{late_id}.wav"), &content(101, 70_000));
        }
        fleet.restart_agent("blr").await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while dir.join(format!("{big_id}.wav")).exists() || dir.join(format!("{late_id}.wav")).exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "recordings not done after the restarts"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sent += bytes_sent(fleet.pop("blr").agent());
    assert!(
        stops >= 2,
        "the upload finished before the agent could be stopped twice"
    );
    // Bytes are counted when the store has accepted them, so a part in
    // flight at a stop is not counted; a part stored but not yet journalled
    // at a stop (a window of one fsync) is sent again. Starting over would
    // send every stored part again: at least one per stop.
    let total = big.len() as u64 + 70_000;
    assert!(
        sent <= total + part as u64,
        "{sent} bytes sent for {total} bytes of recordings with {stops} stops: stored parts were sent again"
    );
    let local = fleet.pop("blr").local_url();
    for (id, data) in [(&big_id, big.clone()), (&late_id, content(101, 70_000))] {
        let key = format!("blr/{}/{id}/{id}.wav", today());
        let body = moto.get(BUCKET, &key).await.unwrap().expect("stored");
        assert_eq!(Sha256::digest(&body), Sha256::digest(&data), "{key}");
        let r = client
            .send(
                http::Method::GET,
                &format!("{local}/v1/calls/{id}"),
                &[],
                Bytes::new(),
            )
            .await;
        let call: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(call["recordings"].as_array().unwrap().len(), 1, "{call}");
    }
    fleet.shutdown().await;
}

/// Today (UTC) as the key template writes it.
fn today() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

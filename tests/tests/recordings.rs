//! Call recordings reach a real S3-compatible store (moto, on loopback) over
//! the agent's paths, are recorded on their calls at the real control plane,
//! and only then leave the local directory. Without moto the suite prints
//! `SKIPPED` (with `DETOUR_REQUIRE_TOOLS=1`, as in CI, it fails instead).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use detour_lab::fleet::{Fleet, FleetOptions, counter_sum};
use detour_lab::link::{Fault, Link};
use detour_lab::load::CallClient;
use detour_lab::s3::{Moto, content, recordings_section, today, write_credentials};
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

/// blr's section: the store at `store`, scanned every 100 ms, 5 MiB parts.
fn section(moto: &Moto, store: std::net::SocketAddr, credentials: &std::path::Path) -> String {
    recordings_section(
        moto.addr.port(),
        store,
        credentials,
        BUCKET,
        "part_size = \"5MiB\"\nscan_interval = \"100ms\"",
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
    let creds = write_credentials(creds_dir.path()).unwrap();
    (moto, creds_dir, creds)
}

/// The fleet with the real control plane, each PoP's `tail` in its
/// agent.toml, and a route for India's numbers to blr.
async fn fleet_with(tail: BTreeMap<String, String>) -> Fleet {
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
    fleet
}

/// blr's recordings directory.
fn blr_dir(fleet: &Fleet) -> std::path::PathBuf {
    fleet.pop("blr").config_path.parent().unwrap().join("recordings")
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

/// The size of recording `n` of the 200: mostly 1 KB to 1 MB, every 20th
/// 5 to 20 MB (multipart), two of 60 MB.
fn size_of(n: usize) -> usize {
    match n {
        7 | 77 => 60_000_000,
        n if n % 20 == 0 => 5_000_000 + n * 75_000,
        n => 1_000 + (n * 7_919) % 1_000_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_written_while_the_uplink_is_cut_reach_the_store_once_each_and_calls_fail_nothing() {
    if skip() {
        return;
    }
    let (moto, _creds_dir, creds) = store().await;
    // blr reaches the store through a link cut with its uplink; the peers
    // reach it directly.
    let blr_store = Link::start(moto.addr).await.unwrap();
    let mut tail = BTreeMap::new();
    tail.insert("blr".to_owned(), section(&moto, blr_store.addr, &creds));
    tail.insert("maa".to_owned(), section(&moto, moto.addr, &creds));
    tail.insert("del".to_owned(), section(&moto, moto.addr, &creds));
    let fleet = fleet_with(tail).await;
    let local = fleet.pop("blr").local_url();
    let client = CallClient::new(Duration::from_secs(5));
    let dir = blr_dir(&fleet);
    let count = 200;
    let mut ids = Vec::new();
    for n in 0..count {
        ids.push(make_call(&client, &local, n).await);
    }
    // Call control keeps going the whole time: 20 calls/s for 30 s, sent
    // once each by a client that never retries.
    let calls = {
        let (client, url) = (
            CallClient::strict(Duration::from_secs(3)),
            format!("{local}/v1/calls"),
        );
        tokio::spawn(detour_lab::load::paced(20, Duration::from_secs(30), move |n| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                client
                    .send(
                        http::Method::POST,
                        &url,
                        &[
                            ("content-type", "application/json"),
                            ("idempotency-key", &format!("traffic-{n}")),
                        ],
                        Bytes::from_static(br#"{"caller":"+919876543210","destination":"+918041234567"}"#),
                    )
                    .await
            }
        }))
    };
    // blr's uplink is cut while the recordings are written; it is restored
    // 10 s later.
    fleet.pop("blr").uplink.set(Fault::Blackhole);
    blr_store.set(Fault::Blackhole);
    let mut expected = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let data = content(n, size_of(n));
        let name = format!("{id}.wav");
        detour_lab::s3::drop_file(&dir, &name, &data).unwrap();
        expected.push((id.clone(), name, hex::encode(Sha256::digest(&data)), data.len()));
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during_cut = bytes_sent(fleet.pop("blr").agent());
    let direct_during_cut = counter_sum(
        fleet.pop("blr").agent(),
        "detour_recordings_bytes_total",
        "path",
        "direct",
    );
    fleet.pop("blr").uplink.set(Fault::Pass);
    blr_store.set(Fault::Pass);
    // Every file leaves the directory once stored and recorded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let left = expected
            .iter()
            .filter(|(_, name, _, _)| dir.join(name).exists())
            .count();
        if left == 0 {
            break;
        }
        let status = fleet.pop("blr").agent().shared.recordings.load_full();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} recordings still in the directory; backlog: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let results = calls.await.unwrap();
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.status != Some(201)).collect();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {:?}",
        failed.len(),
        results.len(),
        failed.first()
    );

    let keys = moto.keys(BUCKET).await.unwrap();
    assert_eq!(keys.len(), count, "one object per recording");
    for (id, name, sha, size) in &expected {
        let key = format!("blr/{}/{id}/{name}", today());
        assert!(keys.contains(&key), "no object {key}");
        let body = moto.get(BUCKET, &key).await.unwrap().unwrap();
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
    let total: u64 = expected.iter().map(|e| e.3 as u64).sum();
    // While the uplink was cut, recordings went on through the peers.
    assert!(during_cut > 0, "nothing was uploaded during the cut");
    assert_eq!(direct_during_cut, 0, "bytes counted on a blackholed uplink");
    // Each byte once (a part interrupted by a path going down is sent again
    // on the next; it was not counted where it did not arrive).
    assert_eq!(
        bytes_sent(agent),
        total,
        "bytes sent for {total} bytes of recordings"
    );
    assert_eq!(agent.shared.metrics.recordings_uploaded.get(), count as u64);
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
    let mut fleet = fleet_with(tail).await;
    let client = CallClient::new(Duration::from_secs(5));
    let local = fleet.pop("blr").local_url();
    let dir = blr_dir(&fleet);
    let big_id = make_call(&client, &local, 100).await;
    let late_id = make_call(&client, &local, 101).await;
    let big = content(100, 26 * 1024 * 1024 + 12_345);
    detour_lab::s3::drop_file(&dir, &format!("{big_id}.wav"), &big).unwrap();

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
            detour_lab::s3::drop_file(&dir, &format!("{late_id}.wav"), &content(101, 70_000)).unwrap();
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

/// Waits until `cond` holds, at most `within`; says what was awaited.
async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn failures(agent: &detour_agent::Agent, reason: &str) -> u64 {
    agent
        .shared
        .metrics
        .recordings_failed
        .with_label_values(&[reason])
        .get()
}

/// What blr's `/status` says about a file, if it is failing.
fn failing(agent: &detour_agent::Agent, file: &str) -> Option<String> {
    let report = detour_agent::admin::report(&agent.shared);
    report
        .recordings?
        .failing
        .into_iter()
        .find(|f| f.file == file)
        .map(|f| format!("{}: {}", f.reason, f.detail))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_a_damaged_journal_are_reported_and_nothing_is_deleted() {
    if skip() {
        return;
    }
    let (moto, _creds_dir, creds) = store().await;
    // The bucket does not exist yet.
    let late = "late-bucket";
    let mut tail = BTreeMap::new();
    tail.insert(
        "blr".to_owned(),
        section(&moto, moto.addr, &creds)
            .replace(&format!("bucket = \"{BUCKET}\""), &format!("bucket = \"{late}\"")),
    );
    let mut fleet = fleet_with(tail).await;
    let client = CallClient::new(Duration::from_secs(5));
    let local = fleet.pop("blr").local_url();
    let dir = blr_dir(&fleet);
    let id = make_call(&client, &local, 1).await;
    let good = format!("{id}.wav");
    let no_id = "not a call id.wav";
    let unknown = "no-such-call-42.wav";
    detour_lab::s3::drop_file(&dir, &good, &content(1, 50_000)).unwrap();
    detour_lab::s3::drop_file(&dir, no_id, &content(2, 1_000)).unwrap();
    detour_lab::s3::drop_file(&dir, unknown, &content(3, 2_000)).unwrap();

    // No bucket: refused, said why, kept.
    let blr = fleet.pop("blr").agent().clone();
    wait_for("the missing bucket reported", Duration::from_secs(10), || {
        failing(&blr, &good).is_some_and(|f| f.contains("store_refused") && f.contains("NoSuchBucket"))
    })
    .await;
    assert!(failures(&blr, "store_refused") >= 1);
    // The files may be found by different scans (each rename wakes one).
    wait_for("no call id reported", Duration::from_secs(10), || {
        failing(&blr, no_id).is_some()
    })
    .await;
    let no_id_why = failing(&blr, no_id).expect("no call id reported");
    assert!(
        no_id_why.starts_with("no_call_id: `not a call id` is not a call id"),
        "{no_id_why}"
    );
    assert!(dir.join(&good).exists() && dir.join(no_id).exists() && dir.join(unknown).exists());

    // The operator creates the bucket: the next try stores the good file.
    moto.create_bucket(late).await.unwrap();
    wait_for("the good recording done", Duration::from_secs(20), || {
        !dir.join(&good).exists()
    })
    .await;
    let stored = moto
        .get(late, &format!("blr/{}/{id}/{good}", today()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Sha256::digest(&stored), Sha256::digest(content(1, 50_000)));
    // A call the control plane does not know: stored, refused there, kept.
    wait_for("the unknown call reported", Duration::from_secs(20), || {
        failing(&blr, unknown).is_some_and(|f| f.starts_with("control_plane_refused: 404"))
    })
    .await;
    assert!(dir.join(unknown).exists() && dir.join(no_id).exists());

    // A damaged journal (a crash mid-line, or worse): reported; nothing done
    // is done again, nothing pending is forgotten.
    let journal = dir.join(".detour-recordings.journal");
    fleet.stop_agent("blr").await;
    let mut text = std::fs::read(&journal).unwrap();
    text.extend_from_slice(b"{\"file\":\"torn");
    std::fs::write(&journal, text).unwrap();
    fleet.restart_agent("blr").await.unwrap();
    let blr = fleet.pop("blr").agent().clone();
    wait_for("the damaged line counted", Duration::from_secs(10), || {
        failures(&blr, "journal") == 1
    })
    .await;
    wait_for(
        "the pending files reported again",
        Duration::from_secs(20),
        || failing(&blr, unknown).is_some() && failing(&blr, no_id).is_some(),
    )
    .await;
    assert_eq!(
        blr.shared.metrics.recordings_uploaded.get(),
        0,
        "a done recording was sent again"
    );
    assert_eq!(
        moto.keys(late).await.unwrap().len(),
        2,
        "the good one and the unknown call's"
    );
    let text = detour_agent::status::table(&detour_agent::admin::report(&blr.shared));
    assert!(text.contains("recordings: 2 pending"), "{text}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_changes_or_vanishes_mid_upload_is_never_stored_half() {
    if skip() {
        return;
    }
    let (moto, _creds_dir, creds) = store().await;
    let blr_store = Link::start(moto.addr).await.unwrap();
    blr_store.set(Fault::Latency(Duration::from_millis(3)));
    let mut tail = BTreeMap::new();
    tail.insert("blr".to_owned(), section(&moto, blr_store.addr, &creds));
    let fleet = fleet_with(tail).await;
    let client = CallClient::new(Duration::from_secs(5));
    let local = fleet.pop("blr").local_url();
    let dir = blr_dir(&fleet);
    let blr = fleet.pop("blr").agent().clone();

    // Changes after its first part is stored: uploaded again, whole.
    let id = make_call(&client, &local, 1).await;
    let name = format!("{id}.wav");
    let mut data = content(1, 16 * 1024 * 1024);
    detour_lab::s3::drop_file(&dir, &name, &data).unwrap();
    wait_for("a first part", Duration::from_secs(30), || bytes_sent(&blr) > 0).await;
    let more = content(9, 3_000);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(&name))
            .unwrap();
        f.write_all(&more).unwrap();
    }
    data.extend_from_slice(&more);
    wait_for("the changed recording done", Duration::from_secs(60), || {
        !dir.join(&name).exists()
    })
    .await;
    assert!(failures(&blr, "changed") >= 1, "the change went unnoticed");
    let stored = moto
        .get(BUCKET, &format!("blr/{}/{id}/{name}", today()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.len(), data.len());
    assert_eq!(
        Sha256::digest(&stored),
        Sha256::digest(&data),
        "a half-old object was stored"
    );

    // Vanishes mid-upload: nothing stored under its key, nothing pending.
    let id2 = make_call(&client, &local, 2).await;
    let gone = format!("{id2}.wav");
    let before = bytes_sent(&blr);
    detour_lab::s3::drop_file(&dir, &gone, &content(2, 16 * 1024 * 1024)).unwrap();
    wait_for("a first part", Duration::from_secs(30), || {
        bytes_sent(&blr) > before
    })
    .await;
    std::fs::remove_file(dir.join(&gone)).unwrap();
    wait_for("nothing pending", Duration::from_secs(30), || {
        blr.shared.metrics.recordings_pending.get() == 0
    })
    .await;
    assert!(
        moto.get(BUCKET, &format!("blr/{}/{id2}/{gone}", today()))
            .await
            .unwrap()
            .is_none()
    );
    assert!(failures(&blr, "vanished") >= 1);
    // Both abandoned multipart uploads were aborted: the store keeps no parts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while moto.open_uploads(BUCKET).await.unwrap() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an abandoned multipart upload was left open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.shutdown().await;
}

/// The agent binary cargo built beside the lab.
fn agent_bin() -> std::path::PathBuf {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_detour-lab")).with_file_name("detour-agent");
    assert!(bin.exists(), "build the agent first: cargo build -p detour-agent");
    bin
}

/// The parts of multipart uploads the journal in `dir` records as stored.
fn journalled_parts(dir: &std::path::Path) -> Vec<(String, u32)> {
    let text = std::fs::read_to_string(dir.join(".detour-recordings.journal")).unwrap_or_default();
    let mut latest = BTreeMap::new();
    for line in text.lines() {
        // A torn last line is the agent's business (it reports it).
        if let Ok(e) = serde_json::from_str::<detour_agent::recordings::journal::Entry>(line) {
            latest.insert(e.file.clone(), e);
        }
    }
    latest
        .into_values()
        .filter_map(|e| Some((e.upload_id?, e.parts)))
        .flat_map(|(id, parts)| parts.into_iter().map(move |p| (id.clone(), u32::from(p.number))))
        .collect()
}

/// The recordings still waiting in `dir` (not the journal, not temporaries).
fn waiting(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".wav"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_at_ten_random_moments_loses_no_recording_and_sends_no_stored_part_again() {
    if skip() {
        return;
    }
    use rand::Rng;
    let (moto, _creds_dir, creds) = store().await;
    // A slow store link, so that kills land in the middle of parts too.
    let blr_store = Link::start(moto.addr).await.unwrap();
    blr_store.set(Fault::Latency(Duration::from_millis(2)));
    let mut tail = BTreeMap::new();
    // Two parts in flight at once: at a kill, up to two are cut short.
    let parallel = 2usize;
    tail.insert(
        "blr".to_owned(),
        section(&moto, blr_store.addr, &creds).replace(
            "scan_interval = \"100ms\"",
            &format!("scan_interval = \"100ms\"\nparallel_parts = {parallel}"),
        ),
    );
    let mut fleet = fleet_with(tail).await;
    let client = CallClient::new(Duration::from_secs(5));
    let dir = blr_dir(&fleet);
    // 5 multipart recordings (3 to 4 parts each) and 25 small ones; 12 are
    // there when the agent starts, the rest are written while it is dead
    // (two after each of the first nine kills, so that uploads streamed
    // fast still outlast ten kills).
    let mut files = Vec::new();
    {
        let local = fleet.pop("blr").local_url();
        for n in 0..30 {
            let id = make_call(&client, &local, 300 + n).await;
            let size = if n % 6 == 0 {
                16_000_000 + n * 100_000
            } else {
                1_000 + n * 37_000
            };
            files.push((id, content(300 + n, size)));
        }
    }
    fleet.stop_agent("blr").await;
    let bin = agent_bin();
    let drop_n = |range: std::ops::Range<usize>| {
        for (id, data) in &files[range] {
            detour_lab::s3::drop_file(&dir, &format!("{id}.wav"), data).unwrap();
        }
    };
    drop_n(0..12);
    let (mut proc, local) = fleet.spawn_agent_process("blr", &bin).await.unwrap();

    let part = 5 * 1024 * 1024u64;
    let mut rng = rand::rng();
    let mut kills = 0;
    // (request-log position at a kill, a part journalled then)
    let mut held: Vec<(usize, (String, u32))> = Vec::new();
    let mut unknown_at_kills = 0;
    while kills < 10 {
        // A random moment during the uploads: after 0.2 to 1.5 parts' worth
        // more bytes reached the store in this life.
        let target = blr_store.bytes_up.load(std::sync::atomic::Ordering::Relaxed)
            + rng.random_range(part / 5..part * 3 / 2);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while blr_store.bytes_up.load(std::sync::atomic::Ordering::Relaxed) < target && waiting(&dir) > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no progress after {kills} kills"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if waiting(&dir) == 0 && kills >= 2 {
            break;
        }
        // SIGKILL: no drain, no journal flush, no goodbye.
        proc.0.kill().unwrap();
        proc.0.wait().unwrap();
        kills += 1;
        // The dead agent's socket still holds bytes the kernel goes on
        // sending (the part in flight may even complete at the store, with
        // nobody to hear the answer); wait until the link is quiet.
        let mut last = u64::MAX;
        loop {
            let now = blr_store.bytes_up.load(std::sync::atomic::Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Compare what the store holds whole with what the journal says.
        let logged = moto.stored_parts().unwrap().len();
        let journalled = journalled_parts(&dir);
        let whole = moto.whole_parts(BUCKET, part).await.unwrap();
        let unknown = whole.iter().filter(|p| !journalled.contains(p)).count();
        assert!(
            unknown <= parallel,
            "kill {kills}: the store holds {unknown} whole parts the journal does not know"
        );
        unknown_at_kills += unknown;
        // Whole at the store at this moment, journalled or not: the agent
        // takes the ones its journal missed from the store's own list
        // (ListParts) when it resumes, so none is sent again.
        for p in whole {
            held.push((logged, p));
        }
        if kills <= 9 {
            drop_n(12 + (kills - 1) * 2..12 + kills * 2);
        }
        (proc, _) = fleet.spawn_agent_process("blr", &bin).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while waiting(&dir) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} recordings still waiting after {kills} kills",
            waiting(&dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kills, 10, "the uploads finished before ten kills");

    // Every recording stored whole, once on its call.
    for (id, data) in &files {
        let key = format!("blr/{}/{id}/{id}.wav", today());
        let body = moto.get(BUCKET, &key).await.unwrap().expect("stored");
        assert_eq!(Sha256::digest(&body), Sha256::digest(data), "{key}");
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
    assert_eq!(moto.keys(BUCKET).await.unwrap().len(), files.len());
    // No part the store held whole at a kill was sent to it again after it.
    let parts = moto.stored_parts().unwrap();
    let again: Vec<&(String, u32)> = held
        .iter()
        .filter(|(at, p)| parts[*at..].contains(p))
        .map(|(_, p)| p)
        .collect();
    assert!(again.is_empty(), "stored parts sent again: {again:?}");
    let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    let sent = blr_store.bytes_up.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{kills} kills: {} part uploads; {unknown_at_kills} parts finished by the store after a kill (taken from its list, not sent again); {sent} bytes sent for {total} bytes of recordings",
        parts.len()
    );
    // Bytes: at most the parts in flight at each kill are lost (and headers).
    assert!(
        sent <= total + (kills * parallel) as u64 * part + 1024 * 1024,
        "{sent} bytes sent for {total} bytes with {kills} kills"
    );
    drop(proc);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_reported_and_the_recording_waits_for_the_right_ones() {
    // moto checks no signature on presigned requests; s3s-fs does, and
    // checks a PUT's SHA-256 as S3 does.
    if skip() {
        return;
    }
    if let Some(why) = detour_lab::s3::S3sFs::unavailable() {
        assert!(
            std::env::var("DETOUR_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "the credentials test is required but cannot run: {why}"
        );
        eprintln!("SKIPPED: credentials: {why}");
        return;
    }
    let (access, secret) = ("AKIADETOURLAB", "the-right-secret");
    let store = detour_lab::s3::S3sFs::start(access, secret, BUCKET)
        .await
        .unwrap();
    let creds_dir = tempfile::tempdir().unwrap();
    // The right key with the wrong secret first.
    let creds = detour_lab::s3::write_keys(creds_dir.path(), access, "not-the-secret").unwrap();
    let mut tail = BTreeMap::new();
    tail.insert(
        "blr".to_owned(),
        recordings_section(
            store.addr.port(),
            store.addr,
            &creds,
            BUCKET,
            "part_size = \"5MiB\"\nscan_interval = \"100ms\"",
        ),
    );
    let fleet = fleet_with(tail).await;
    let client = CallClient::new(Duration::from_secs(5));
    let local = fleet.pop("blr").local_url();
    let dir = blr_dir(&fleet);
    let mut files = Vec::new();
    for (n, size) in [(1, 7 * 1024 * 1024), (2, 300_000)] {
        let id = make_call(&client, &local, n).await;
        let name = format!("{id}.wav");
        detour_lab::s3::drop_file(&dir, &name, &content(n, size)).unwrap();
        files.push((id, name, content(n, size)));
    }
    let name = files[0].1.clone();

    let blr = fleet.pop("blr").agent().clone();
    wait_for("the bad signature reported", Duration::from_secs(15), || {
        failing(&blr, &name)
            .is_some_and(|f| f.contains("store_refused") && f.contains("SignatureDoesNotMatch"))
    })
    .await;
    // An unknown key next (the file is re-read on reload, as on SIGHUP).
    detour_lab::s3::write_keys(creds_dir.path(), "AKIANOBODY", secret).unwrap();
    let files_cfg = blr.shared.forwarder.runtime().config.files.clone();
    assert_eq!(
        detour_agent::reload::reload_now(&blr, &files_cfg),
        detour_agent::reload::ReloadResult::Applied,
        "new credentials are a change"
    );
    // A reload retries refused files at once, not after their 10 s wait.
    wait_for("the unknown key reported", Duration::from_secs(8), || {
        failing(&blr, &name).is_some_and(|f| f.contains("store_refused") && f.contains("NotSignedUp"))
    })
    .await;
    assert!(failures(&blr, "store_refused") >= 2);
    assert!(
        files.iter().all(|(_, n, _)| dir.join(n).exists()),
        "a refused recording was deleted"
    );
    let text = detour_agent::status::table(&detour_agent::admin::report(&blr.shared));
    assert!(text.contains("NotSignedUp"), "{text}");

    // The operator puts the right keys in and reloads: stored (the store
    // checked the small one's SHA-256), recorded, gone.
    detour_lab::s3::write_keys(creds_dir.path(), access, secret).unwrap();
    assert_eq!(
        detour_agent::reload::reload_now(&blr, &files_cfg),
        detour_agent::reload::ReloadResult::Applied
    );
    wait_for("the recordings done", Duration::from_secs(8), || {
        files.iter().all(|(_, n, _)| !dir.join(n).exists())
    })
    .await;
    for (id, name, data) in &files {
        let key = format!("blr/{}/{id}/{name}", today());
        let stored = store.object(BUCKET, &key).expect("stored");
        assert_eq!(Sha256::digest(&stored), Sha256::digest(data), "{key}");
        let r = client
            .send(
                http::Method::GET,
                &format!("{local}/v1/calls/{id}"),
                &[],
                Bytes::new(),
            )
            .await;
        let call: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let recordings = call["recordings"].as_array().unwrap();
        assert_eq!(recordings.len(), 1, "{call}");
        assert_eq!(
            recordings[0]["sha256"].as_str().unwrap(),
            hex::encode(Sha256::digest(data)),
            "{call}"
        );
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_nothing_is_lost_when_space_returns() {
    if skip() {
        return;
    }
    if !detour_lab::process::is_root() {
        assert!(
            std::env::var("DETOUR_REQUIRE_NETNS").as_deref() != Ok("1"),
            "the full-disk test needs root (a small tmpfs) but cannot run"
        );
        eprintln!("SKIPPED: full disk: needs root to mount a small tmpfs");
        return;
    }
    // blr's recordings directory (and so its journal) on a 1 MiB tmpfs.
    let disk = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "detour-full-disk"])
        .arg(disk.path())
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs failed");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(disk.path().to_owned());

    let (moto, _creds_dir, creds) = store().await;
    let mut tail = BTreeMap::new();
    tail.insert(
        "blr".to_owned(),
        section(&moto, moto.addr, &creds).replace(
            "dir = \"recordings\"",
            &format!("dir = \"{}\"", disk.path().display()),
        ),
    );
    let mut fleet = fleet_with(tail).await;
    let client = CallClient::new(Duration::from_secs(5));
    let local = fleet.pop("blr").local_url();
    let id = make_call(&client, &local, 1).await;
    let name = format!("{id}.wav");

    // The agent is down while the call handler writes a recording and the
    // disk fills up (the handler's own junk, say).
    fleet.stop_agent("blr").await;
    let data = content(1, 200_000);
    detour_lab::s3::drop_file(disk.path(), &name, &data).unwrap();
    let filler = disk.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    fleet.restart_agent("blr").await.unwrap();
    let blr = fleet.pop("blr").agent().clone();
    wait_for("the full disk reported", Duration::from_secs(15), || {
        failing(&blr, &name).is_some_and(|f| f.starts_with("journal") && f.contains("No space left"))
    })
    .await;
    assert!(failures(&blr, "journal") >= 1);
    assert!(
        disk.path().join(&name).exists(),
        "a recording was deleted on a full disk"
    );

    // Space returns: the recording goes on, whole.
    std::fs::remove_file(&filler).unwrap();
    wait_for("the recording done", Duration::from_secs(30), || {
        !disk.path().join(&name).exists()
    })
    .await;
    let body = moto
        .get(BUCKET, &format!("blr/{}/{id}/{name}", today()))
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(Sha256::digest(&body), Sha256::digest(&data));
    fleet.shutdown().await;
}

//! `detour-lab bench recordings`: how fast a finished recording is durable
//! in the object store, healthy and with blr's uplink cut (through a peer);
//! upload throughput against `boto3`'s `upload_file` on the same link; and
//! call-control latency with and without the recorder kept busy with four
//! 50 MB recordings beside it, both as they are written and when they were
//! written before.
//!
//! The in-process fleet with the real control plane (SQLite) and moto (the
//! S3-compatible server the tests use) on loopback; blr reaches moto through
//! a link that is cut with its uplink. "Durable" is the moment a `HEAD` of
//! the object succeeds, polled every 10 ms from the file's rename into the
//! recordings directory. The agent's defaults: a scan every 250 ms, 8 MiB
//! parts, one recording at a time.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use detour_control_plane::store::sqlite_url;
use tokio::time::Instant;

use super::BenchArgs;
use crate::fleet::{CP_HOST, Fleet, FleetOptions};
use crate::link::{Fault, Link};
use crate::load::{CallClient, Latencies, paced};
use crate::report::{Table, machine, ms};
use crate::s3::{Moto, content, drop_file, recordings_section, today, write_credentials};

const BUCKET: &str = "recordings";
const MB: usize = 1_000_000;

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(why) = crate::s3::unavailable() {
        anyhow::bail!("bench recordings needs moto: {why}");
    }
    // The PoP's work on one CPU, the cloud's (control plane, store, the
    // store's link) on another: on two shared cores the stand-ins for the
    // cloud would otherwise compete with the PoP for CPU, which a real PoP
    // never sees. The call handler writing its recordings (the feeder) and
    // boto3 run on the PoP's CPU, like the agent.
    let split = crate::cpus::split();
    let _pinned = match split {
        Some(s) => Some(crate::cpus::pin_process(s.pop)?),
        None => {
            println!("recordings: one CPU: the PoP and the cloud's stand-ins share it");
            None
        }
    };
    let cloud = split.map(|s| s.cloud);
    let moto = match cloud {
        Some(cpu) => Moto::start_on(cpu).await?,
        None => Moto::start().await?,
    };
    moto.create_bucket(BUCKET).await?;
    let creds_dir = tempfile::tempdir()?;
    let creds = write_credentials(creds_dir.path())?;
    // On a thread of its own: it carries every upload's bytes.
    let blr_store = Link::start_apart(moto.addr, cloud).await?;
    let mut tail = BTreeMap::new();
    let port = moto.addr.port();
    tail.insert(
        "blr".to_owned(),
        recordings_section(port, blr_store.addr, &creds, BUCKET, ""),
    );
    for pop in ["maa", "del"] {
        tail.insert(
            pop.to_owned(),
            recordings_section(port, moto.addr, &creds, BUCKET, ""),
        );
    }
    // The control plane's database on tmpfs: in production it is on another
    // machine's disk; here it would share one with the recordings, and its
    // commits would wait behind their writeback.
    let cp_db =
        tempfile::Builder::new()
            .prefix("detour-bench-cp")
            .tempdir_in(if Path::new("/dev/shm").is_dir() {
                "/dev/shm"
            } else {
                "/tmp"
            })?;
    let fleet = Fleet::start(FleetOptions {
        real_cp: true,
        cp_cpu: cloud,
        database_url: Some(sqlite_url(&cp_db.path().join("detour.db"), "rwc")),
        tail,
        ..Default::default()
    })
    .await?;
    fleet
        .put_route("blr", "india", r#"{"prefix":"+91","trunk":"t1","pop":"blr"}"#)
        .await?;
    let local = fleet.pop("blr").local_url();
    let dir = fleet
        .pop("blr")
        .config_path
        .parent()
        .context("no pop dir")?
        .join("recordings");
    let client = CallClient::new(Duration::from_secs(5));
    let direct = Straight::new(&fleet, "blr")?;
    let mut calls = 0usize;
    let mut next_call = async || -> anyhow::Result<String> {
        calls += 1;
        new_call(&client, &local, calls).await
    };

    let mut rows = Vec::new();
    for (label, size, n) in [
        ("1 MB, healthy", MB, 20),
        ("50 MB, healthy", 50 * MB, THROUGHPUT_RUNS),
    ] {
        let mut took = Vec::new();
        for i in 0..n {
            let id = next_call().await?;
            took.push(durable(&moto, &dir, &id, size, i).await?);
        }
        rows.push((label, size, Latencies::new(took)));
    }
    // blr's uplink cut: recordings go through a peer.
    fleet.pop("blr").uplink.set(Fault::Blackhole);
    blr_store.set(Fault::Blackhole);
    wait_off_direct(&fleet).await?;
    for (label, size, n) in [("1 MB, uplink cut", MB, 20), ("50 MB, uplink cut", 50 * MB, 5)] {
        let mut took = Vec::new();
        for i in 0..n {
            let id = next_call().await?;
            took.push(durable(&moto, &dir, &id, size, 100 + i).await?);
        }
        rows.push((label, size, Latencies::new(took)));
    }
    fleet.pop("blr").uplink.set(Fault::Pass);
    blr_store.set(Fault::Pass);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let boto = boto3_seconds(blr_store.addr, 50 * MB, THROUGHPUT_RUNS)?;

    // Call control beside uploads: 100 calls/s for 20 s idle; then, in
    // PAIRS alternated rounds, four windows of 20 s:
    // - four 50 MB recordings pending at every moment (one dropped as soon
    //   as one is stored), so the recorder is never idle in the window, each
    //   written as it is dropped, at 100 MB/s;
    // - the same files written at the same moments into a directory the
    //   agent does not watch: the call handler's own writing, without the
    //   uploads, to tell the two costs apart;
    // - four recordings pending the same way, but written (and synced)
    //   before the windows began: each a hard link renamed in, so nothing is
    //   written in the window and what call control meets is the uploads
    //   alone;
    // - nothing else, the baseline for the third.
    // Each kind's calls are pooled for its p99 (6,000 calls). In the last
    // two kinds, 100 calls/s are also sent straight to the control plane,
    // never through the agent ([`Straight`]): what the uploads add to those
    // is not the agent's doing.
    //
    // What the store holds is no longer needed from here on: moto's copies
    // are deleted as they land, so that its memory (a tmpfs, see
    // `Moto::start_on`) stays small however many recordings are uploaded.
    let done = std::sync::atomic::AtomicBool::new(false);
    let deleter = async {
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(keys) = moto.keys(BUCKET).await {
                for key in keys {
                    let _ = moto.delete(BUCKET, &key).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let windows = async {
        let r = async {
            let url = format!("{local}/v1/calls");
            let idle = call_latencies(&url, 0).await;
            let bodies: Vec<std::sync::Arc<Vec<u8>>> = (0..4)
                .map(|i| std::sync::Arc::new(content(200 + i, 50 * MB)))
                .collect();
            let unwatched = dir.with_file_name("not-watched");
            let written = write_ahead(&dir.with_file_name("written"), &bodies)?;
            let (mut busy, mut writes_only, mut dropped) = (Vec::new(), Vec::new(), 0);
            let (mut uploads_only, mut quiet) = (Vec::new(), Vec::new());
            let (mut straight_uploads, mut straight_quiet) = (Vec::new(), Vec::new());
            // Call ids made ready for an upload window, one per recording.
            let mut ids_for_window = async || -> anyhow::Result<Vec<String>> {
                let mut ids = Vec::new();
                for _ in 0..BUSY_IDS {
                    ids.push(next_call().await?);
                }
                Ok(ids)
            };
            let window = async |feed: Feed,
                                ids: Vec<String>,
                                key_base: u64,
                                straight: Option<u64>|
                   -> anyhow::Result<(Latencies, Option<Latencies>, Vec<Duration>)> {
                let (stop, stopped) = tokio::sync::watch::channel(false);
                let feeder = tokio::spawn(keep_four_pending(dir.clone(), ids, feed, stopped));
                let (calls, straight) = tokio::join!(call_latencies(&url, key_base), async {
                    match straight {
                        Some(k) => Some(direct.latencies(k).await),
                        None => None,
                    }
                });
                let _ = stop.send(true);
                let (drops, pending) = feeder.await??;
                let deadline = Instant::now() + Duration::from_secs(300);
                while pending.iter().any(|id| dir.join(format!("{id}.wav")).exists()) {
                    anyhow::ensure!(Instant::now() < deadline, "the last uploads did not finish");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok((calls, straight, drops))
            };
            for pair in 0..PAIRS as u64 {
                let ids = ids_for_window().await?;
                let (calls, _, drops) =
                    window(Feed::Write(bodies.clone()), ids, 10_000 + 40_000 * pair, None).await?;
                busy.push(calls);
                dropped += drops.len();
                let _ = std::fs::remove_dir_all(&unwatched);
                let writer = tokio::spawn(write_at(unwatched.clone(), drops, bodies.clone()));
                writes_only.push(call_latencies(&url, 20_000 + 40_000 * pair).await);
                writer.await??;
                let _ = std::fs::remove_dir_all(&unwatched);
                let ids = ids_for_window().await?;
                let (calls, straight, drops) = window(
                    Feed::Link(written.clone()),
                    ids,
                    30_000 + 40_000 * pair,
                    Some(30_000 + 40_000 * pair),
                )
                .await?;
                uploads_only.push(calls);
                straight_uploads.extend(straight);
                dropped += drops.len();
                let (calls, straight) = tokio::join!(
                    call_latencies(&url, 40_000 + 40_000 * pair),
                    direct.latencies(40_000 + 40_000 * pair)
                );
                quiet.push(calls);
                straight_quiet.push(straight);
            }
            let straight = (straight_uploads, straight_quiet);
            Ok::<_, anyhow::Error>((
                idle,
                busy,
                writes_only,
                uploads_only,
                quiet,
                straight,
                dropped,
                unwatched,
            ))
        }
        .await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    };
    let (windows, ()) = tokio::join!(windows, deleter);
    let (idle, busy, writes_only, uploads_only, quiet, straight, dropped, unwatched) = windows?;
    let _ = std::fs::remove_dir_all(&unwatched);
    fleet.shutdown().await;
    drop(_pinned);

    let _ = std::fs::remove_dir_all(dir.with_file_name("written"));
    let calls = CallControl {
        idle,
        writes_only,
        busy,
        uploads_only,
        quiet,
        straight,
        dropped,
        split,
    };
    let md = render(&rows, &boto, &calls, &machine());
    args.publish("recordings", &md)
}

/// Call ids made ready for each busy window (one per recording dropped in
/// it; at 100 MB/s the window takes about 40).
const BUSY_IDS: usize = 120;

/// Rounds of the four call-control windows, alternated: one pair's p99
/// difference moved by 2 to 3 ms from run to run, more than the 2 ms it is
/// judged by.
const PAIRS: usize = 3;

/// How long each call-control window lasts: 2,000 calls, so that a p99 is
/// the 20th slowest, not the 10th (a difference of two p99s of 1,000 calls
/// moved by about a millisecond from run to run).
const WINDOW: Duration = Duration::from_secs(20);

/// 50 MB uploads timed on each side of the throughput comparison (with
/// five, one slow upload moved the ratio by 10% or more).
const THROUGHPUT_RUNS: usize = 10;

/// How [`keep_four_pending`] makes each recording it drops.
#[derive(Clone)]
enum Feed {
    /// Written as it is dropped (off the runtime, as the call handler
    /// would), from one of these in turn.
    Write(Vec<std::sync::Arc<Vec<u8>>>),
    /// A hard link to one of these files, written and synced before the
    /// windows: a new name for bytes already on disk and in the page cache.
    Link(Vec<std::path::PathBuf>),
}

/// Keeps four 50 MB recordings pending in `dir` until `stop`: a new one is
/// dropped as soon as one is gone. Returns when each was dropped (from the
/// start), and those still pending.
async fn keep_four_pending(
    dir: std::path::PathBuf,
    ids: Vec<String>,
    feed: Feed,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(Vec<Duration>, Vec<String>)> {
    let start = Instant::now();
    let mut drops = Vec::new();
    let mut pending: Vec<String> = Vec::new();
    while !*stop.borrow() {
        pending.retain(|id| dir.join(format!("{id}.wav")).exists());
        while pending.len() < 4 {
            let next = drops.len();
            let id = ids
                .get(next)
                .context("out of call ids: the recorder would have been idle in the window")?
                .clone();
            let (d, name) = (dir.clone(), format!("{id}.wav"));
            drops.push(start.elapsed());
            match &feed {
                Feed::Write(bodies) => {
                    let body = bodies[next % bodies.len()].clone();
                    tokio::task::spawn_blocking(move || drop_file(&d, &name, &body)).await??;
                }
                Feed::Link(files) => {
                    let from = files[next % files.len()].clone();
                    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                        let tmp = d.join(format!(".{name}.part"));
                        std::fs::hard_link(&from, &tmp)?;
                        std::fs::rename(&tmp, d.join(&name))
                    })
                    .await??;
                }
            }
            pending.push(id);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((drops, pending))
}

/// Writes eight recordings (`bodies`, twice over) into `dir` beside the
/// recordings directory, synced, for [`Feed::Link`]. Eight, not four: a new
/// link changes its file's inode (its ctime), which an upload still reading
/// another link to it would take for a change to the recording; with eight
/// in turn and four pending, a file is linked again only after its last
/// upload ended.
fn write_ahead(dir: &Path, bodies: &[std::sync::Arc<Vec<u8>>]) -> anyhow::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for (n, body) in bodies.iter().chain(bodies).enumerate() {
        let path = dir.join(format!("{n}.wav"));
        let mut f = std::fs::File::create(&path)?;
        std::io::Write::write_all(&mut f, body)?;
        f.sync_all()?;
        out.push(path);
    }
    Ok(out)
}

/// Writes the same files as [`keep_four_pending`] at the same moments into
/// `dir` (not watched by the agent), keeping the last four, as the call
/// handler's writing alone would.
async fn write_at(
    dir: std::path::PathBuf,
    drops: Vec<Duration>,
    bodies: Vec<std::sync::Arc<Vec<u8>>>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir)?;
    let start = Instant::now();
    for (n, at) in drops.iter().enumerate() {
        tokio::time::sleep_until(start + *at).await;
        let (d, body) = (dir.clone(), bodies[n % bodies.len()].clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            drop_file(&d, &format!("{n}.wav"), &body)?;
            if n >= 4 {
                std::fs::remove_file(d.join(format!("{}.wav", n - 4)))?;
            }
            Ok(())
        })
        .await??;
    }
    Ok(())
}

/// Call-control latency in the windows: idle, then each pair's busy and
/// writing-alone windows.
struct CallControl {
    idle: Latencies,
    writes_only: Vec<Latencies>,
    busy: Vec<Latencies>,
    /// Uploads of recordings written before the window.
    uploads_only: Vec<Latencies>,
    /// Nothing else, alternated with `uploads_only`.
    quiet: Vec<Latencies>,
    /// Calls sent straight to the control plane in the `uploads_only` and
    /// `quiet` windows, beside the agent's.
    straight: (Vec<Latencies>, Vec<Latencies>),
    dropped: usize,
    split: Option<crate::cpus::Split>,
}

async fn new_call(client: &CallClient, local: &str, n: usize) -> anyhow::Result<String> {
    let r = client
        .send(
            http::Method::POST,
            &format!("{local}/v1/calls"),
            &[
                ("content-type", "application/json"),
                ("idempotency-key", &format!("bench-rec-{n}")),
            ],
            Bytes::from_static(br#"{"caller":"+919876543210","destination":"+918041234567"}"#),
        )
        .await;
    anyhow::ensure!(r.status == Some(201), "a call failed: {r:?}");
    let v: serde_json::Value = serde_json::from_slice(&r.body)?;
    Ok(v["call_id"].as_str().unwrap_or_default().to_owned())
}

/// Drops a recording of `size` for call `id` and waits until its object is
/// in the store; the time from the rename.
async fn durable(
    moto: &Moto,
    dir: &std::path::Path,
    id: &str,
    size: usize,
    seed: usize,
) -> anyhow::Result<Duration> {
    let name = format!("{id}.wav");
    let key = format!("blr/{}/{id}/{name}", today());
    let data = content(seed, size);
    let tmp = dir.join(format!(".{name}.part"));
    std::fs::create_dir_all(dir)?;
    std::fs::write(&tmp, &data)?;
    let started = Instant::now();
    std::fs::rename(&tmp, dir.join(&name))?;
    while !moto.exists(BUCKET, &key).await {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "{key} not stored in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    // Let the agent finish with it (recorded, deleted) before the next.
    while dir.join(&name).exists() && started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(took)
}

async fn wait_off_direct(fleet: &Fleet) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = fleet
            .pop("blr")
            .agent()
            .shared
            .forwarder
            .runtime()
            .health
            .snapshot();
        if snap.active().is_some_and(|p| p.name.starts_with("via:")) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "blr did not leave direct");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `boto3`'s `upload_file` (its defaults: 8 MB parts, 10 threads) of a
/// `size`-byte file to moto through `via`, `n` times; seconds of each.
fn boto3_seconds(via: std::net::SocketAddr, size: usize, n: usize) -> anyhow::Result<Vec<f64>> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("boto.wav");
    std::fs::write(&file, content(999, size))?;
    let script = format!(
        r#"
import time, boto3
s3 = boto3.client("s3", endpoint_url="http://{via}", aws_access_key_id="AKIALAB",
                  aws_secret_access_key="lab-secret", region_name="ap-south-1")
for i in range({n}):
    t = time.monotonic()
    s3.upload_file("{file}", "{BUCKET}", "boto/%d.wav" % i)
    print(time.monotonic() - t)
"#,
        file = file.display()
    );
    let out = Command::new("python3").arg("-c").arg(&script).output()?;
    anyhow::ensure!(
        out.status.success(),
        "boto3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// 100 calls/s for [`WINDOW`] through `url`, each sent once; their latencies.
async fn call_latencies(url: &str, key_base: u64) -> Latencies {
    let client = CallClient::strict(Duration::from_secs(3));
    let url = url.to_owned();
    let results = paced(100, WINDOW, move |n| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .send(
                    http::Method::POST,
                    &url,
                    &[
                        ("content-type", "application/json"),
                        ("idempotency-key", &format!("bench-ctl-{}", key_base + n)),
                    ],
                    Bytes::from_static(br#"{"caller":"+919876543210","destination":"+918041234567"}"#),
                )
                .await
        }
    })
    .await;
    // The slowest calls and when they were sent: one stall holds up every
    // call sent during it, which a p99 alone does not tell.
    let mut slow: Vec<_> = results.iter().map(|(at, r)| (*at, r.latency)).collect();
    slow.sort_by_key(|s| std::cmp::Reverse(s.1));
    let shown: Vec<String> = slow
        .iter()
        .take(12)
        .map(|(at, l)| format!("{} at +{:.2} s", ms(*l), at.as_secs_f64()))
        .collect();
    eprintln!(
        "recordings: slowest calls (keys from {key_base}): {}",
        shown.join(", ")
    );
    Latencies::new(
        results
            .iter()
            .filter(|(_, r)| r.status == Some(201))
            .map(|(_, r)| r.latency),
    )
}

/// Calls sent straight to the control plane, as blr's agent would send
/// them (its token, TLS to [`CP_HOST`]), without the agent: whether a cost
/// the uploads add to call control is the agent's or the control plane's,
/// which shares its CPU with the store's stand-ins.
struct Straight {
    client: reqwest::Client,
    url: String,
    auth: String,
}

impl Straight {
    fn new(fleet: &Fleet, pop: &str) -> anyhow::Result<Straight> {
        let ca = std::fs::read(fleet.dir.path().join("certs").join("ca.pem"))?;
        let token = std::fs::read_to_string(fleet.dir.path().join(pop).join("agent.token"))?;
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca)?])
            .resolve(CP_HOST, fleet.cp_addr)
            .no_proxy()
            .timeout(Duration::from_secs(3))
            .build()?;
        Ok(Straight {
            client,
            url: format!("https://{CP_HOST}:{}/v1/calls", fleet.cp_addr.port()),
            auth: format!("Bearer {}", token.trim()),
        })
    }

    /// 100 calls/s for [`WINDOW`], each sent once; the latencies of those
    /// answered 201.
    async fn latencies(&self, key_base: u64) -> Latencies {
        let results = paced(100, WINDOW, |n| {
            let request = self
                .client
                .post(&self.url)
                .header("authorization", &self.auth)
                .header("content-type", "application/json")
                .header("idempotency-key", format!("bench-straight-{}", key_base + n))
                .body(&br#"{"caller":"+919876543210","destination":"+918041234567"}"#[..]);
            async move {
                let sent = Instant::now();
                let created = match request.send().await {
                    Ok(r) => r.status().as_u16() == 201 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                (sent.elapsed(), created)
            }
        })
        .await;
        Latencies::new(results.iter().filter(|(_, (_, ok))| *ok).map(|(_, (l, _))| *l))
    }
}

fn mb_per_s(size: usize, d: Duration) -> String {
    format!("{:.0}", size as f64 / MB as f64 / d.as_secs_f64().max(1e-9))
}

fn render(rows: &[(&str, usize, Latencies)], boto: &[f64], calls: &CallControl, machine: &str) -> String {
    let mut out = format!(
        "## Recordings (issue: recordings over the resilient path)\n\nMeasured {machine}, with `cargo build --release -p detour-lab && target/release/detour-lab bench recordings`: the in-process fleet with the real control plane and moto (`moto_server`, the S3-compatible server the tests use) on loopback; blr reaches moto through a link cut together with its uplink (run by a thread of its own: on a real PoP its copying is the kernel's forwarding, not work on the agent's runtime). Durable: from the file's rename into the recordings directory until a `HEAD` of its object succeeds (polled every 10 ms). The agent's defaults: the directory watched (inotify) with a scan every 250 ms as the fallback, 8 MiB parts with 4 in flight, one recording at a time. moto writes each object and part over 5 MB to a temporary file and keeps a finished upload's parts until its object is deleted: those files are on a tmpfs, and from the call-control windows on each object is deleted as it lands (before, each 50 MB recording wrote 100 MB to the same disk as the PoP's).\n\n"
    );
    let mut t = Table::new(&[
        "recording",
        "count",
        "durable p50",
        "durable p99",
        "throughput p50 (MB/s)",
    ]);
    for (label, size, l) in rows {
        let (p50, p99, _) = l.p50_p99_max();
        t.row(&[
            label.to_string(),
            l.len().to_string(),
            ms(p50),
            ms(p99),
            mb_per_s(*size, p50),
        ]);
    }
    out.push_str(&t.finish());
    let mut boto_sorted = boto.to_vec();
    boto_sorted.sort_by(f64::total_cmp);
    let boto_p50 = boto_sorted.get(boto_sorted.len() / 2).copied().unwrap_or(0.0);
    let ours = rows
        .iter()
        .find(|r| r.0 == "50 MB, healthy")
        .map(|r| r.2.p50_p99_max().0)
        .unwrap_or_default();
    out.push_str(&format!(
        "\nThroughput against `boto3` `upload_file` (8 MB parts, 10 threads) of a 50 MB file to the same moto through the same link, {} runs: boto3 {:.0} MB/s (p50 {:.2} s), Detour on `direct` {} MB/s from rename to durable (p50 {:.2} s): {:.0}% of boto3.\n",
        boto.len(),
        50.0 / boto_p50.max(1e-9),
        boto_p50,
        mb_per_s(50 * MB, ours),
        ours.as_secs_f64(),
        100.0 * boto_p50 / ours.as_secs_f64().max(1e-9),
    ));
    let pooled = |windows: &[Latencies]| Latencies::new(windows.iter().flat_map(|l| l.iter()));
    let (busy, writes_only) = (pooled(&calls.busy), pooled(&calls.writes_only));
    let (uploads_only, quiet) = (pooled(&calls.uploads_only), pooled(&calls.quiet));
    let (u50, u99, _) = uploads_only.p50_p99_max();
    let (q50, q99, _) = quiet.p50_p99_max();
    let (i50, i99, _) = calls.idle.p50_p99_max();
    let (w50, w99, _) = writes_only.p50_p99_max();
    let (b50, b99, _) = busy.p50_p99_max();
    let diff = |a: Duration, b: Duration| (a.as_secs_f64() - b.as_secs_f64()) * 1000.0;
    let pairs: Vec<String> = calls
        .busy
        .iter()
        .zip(&calls.writes_only)
        .map(|(b, w)| format!("{:+.1}", diff(b.at(0.99), w.at(0.99))))
        .collect();
    let alone: Vec<String> = calls
        .uploads_only
        .iter()
        .zip(&calls.quiet)
        .map(|(u, q)| format!("{:+.1}", diff(u.at(0.99), q.at(0.99))))
        .collect();
    out.push_str(&format!(
        "\nCall control beside uploads (100 calls/s through blr's agent on `direct`, each sent once; {} s idle, then {} alternated rounds of four {} s windows, pooled by kind), p50 / p99 in ms:\n\n| window | calls answered | p50 | p99 |\n|---|---|---|---|\n| nothing else, first | {} | {} | {} |\n| four 50 MB recordings pending throughout, each written as it is dropped ({} dropped over both kinds of upload window, each as soon as one was stored: the recorder never idle) | {} | {} | {} |\n| the same files written at the same moments where the agent does not look (the call handler's writing alone) | {} | {} | {} |\n| four 50 MB recordings pending throughout, written before the windows (hard links renamed in: nothing written in the window) | {} | {} | {} |\n| nothing else, alternated with the row above | {} | {} | {} |\n\nCall-control p99 raised by the uploads of recordings already written (against nothing else, alternated): **{:+.1} ms** over the pooled windows (each round on its own: {} ms). Raised by the uploads beside the writing (against the same writing alone): **{:+.1} ms** pooled (each round: {} ms); by writing and uploading together (against the first quiet window): {:+.1} ms.\n",
        WINDOW.as_secs(),
        calls.busy.len(),
        WINDOW.as_secs(),
        calls.idle.len(),
        ms(i50),
        ms(i99),
        calls.dropped,
        busy.len(),
        ms(b50),
        ms(b99),
        writes_only.len(),
        ms(w50),
        ms(w99),
        uploads_only.len(),
        ms(u50),
        ms(u99),
        quiet.len(),
        ms(q50),
        ms(q99),
        diff(u99, q99),
        alone.join(", "),
        diff(b99, w99),
        pairs.join(", "),
        diff(b99, i99),
    ));
    let (su, sq) = (pooled(&calls.straight.0), pooled(&calls.straight.1));
    let straight_rounds: Vec<String> = calls
        .straight
        .0
        .iter()
        .zip(&calls.straight.1)
        .map(|(u, q)| format!("{:+.1}", diff(u.at(0.99), q.at(0.99))))
        .collect();
    out.push_str(&format!(
        "\nCalls sent straight to the control plane in the same two kinds of window (100/s beside the agent's, blr's token, TLS, kept alive: what the uploads cost a call that never passes through the agent), p99 with the uploads {} ms ({} calls), without {} ms ({} calls): **{:+.1} ms** (each round: {} ms).\n",
        ms(su.p50_p99_max().1),
        su.len(),
        ms(sq.p50_p99_max().1),
        sq.len(),
        diff(su.p50_p99_max().1, sq.p50_p99_max().1),
        straight_rounds.join(", "),
    ));
    out.push_str(&match calls.split {
        Some(s) => format!("\nThe PoP's work (the agent, its recorder, the writing of recordings, boto3) ran on CPU {}; the stand-ins for the cloud (control plane, moto, the store's link) on CPU {}, and the control plane's SQLite on tmpfs: on a real fleet they run on other machines, and on two shared cores they competed with the PoP for CPU and disk (a control plane commit waited up to 100 ms behind the recordings' writeback, and boto3 uploading to moto from the same machine raised call control's p99 by 95 ms without Detour uploading anything).\n", s.pop, s.cloud),
        None => "\nOne CPU: the PoP's work and the stand-ins for the cloud shared it.\n".to_owned(),
    });
    out.push_str("\nGoals (issue 15): a 1 MB recording durable within 1 s p99 of its completion; upload throughput at least 90% of boto3's on the same link; call-control p99 raised by at most 2 ms.\n");
    out
}

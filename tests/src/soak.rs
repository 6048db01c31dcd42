//! The soak: a long run on the real kernel network (the namespace fleet
//! with the real control plane) at 200 calls/s through blr,
//! with a fault every few minutes: blr's uplink blackholed, 10% and 30% lossy,
//! a peer agent restarted, the control plane restarted, blr's peer list
//! edited. Reports failed calls and how blr's agent process grew: RSS, open
//! file descriptors, OS threads and tokio tasks after warm-up and at the end.
//! `detour-lab bench soak` runs it for an hour; the same run, a few minutes long, is a test (`tests/tests/netns_smoke.rs`).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::time::Instant;

use crate::ns::NsFleet;
use crate::process::{fd_count, status, status_field};

/// One look at blr's agent process.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
    /// Tasks alive in the agent's tokio runtime (`detour_runtime_tasks`).
    pub tasks: u64,
}

/// What a soak saw.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seconds: u64,
    pub calls: u64,
    /// Never answered, though retried with the same key for 10 s.
    pub failed: u64,
    /// Answered only after the call handler re-sent it (the control-plane
    /// restarts make some; network faults should make none).
    pub retried: u64,
    pub failures_by_status: serde_json::Value,
    pub faults: Vec<String>,
    /// After a short warm-up, before the first fault.
    pub start: Sample,
    /// After one round of every fault: the allocator's high-water mark is
    /// reached by then (the control-plane restart piles up retried calls),
    /// so growth from here on is what a leak would show.
    pub after_round: Option<Sample>,
    /// At the same point of every complete round (quiet, two thirds of a
    /// fault period after the round's last heal): a leak grows round by
    /// round, an allocator's high-water mark does not.
    pub rounds: Vec<Sample>,
    pub end: Sample,
    pub max: Sample,
}

impl Report {
    /// Growth from `start` to `end` as a share (0.05 = 5%).
    pub fn drift(start: u64, end: u64) -> f64 {
        if start == 0 {
            return 0.0;
        }
        end as f64 / start as f64 - 1.0
    }
}

impl Sample {
    /// The larger of each of `self`'s and `other`'s.
    fn max(self, other: Sample) -> Sample {
        Sample {
            rss_kib: self.rss_kib.max(other.rss_kib),
            fds: self.fds.max(other.fds),
            threads: self.threads.max(other.threads),
            tasks: self.tasks.max(other.tasks),
        }
    }
}

/// The call handler's connections open to blr's agent
/// (`detour_local_connections`), or `None` if its metrics do not answer.
fn local_connections(fleet: &NsFleet) -> Option<u64> {
    let metrics = fleet
        .exec(
            "blr",
            Path::new("curl"),
            &["-sf", "http://127.0.0.1:9090/metrics"],
        )
        .ok()?;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("detour_local_connections "))
        .or_else(|| {
            metrics
                .lines()
                .find(|l| l.starts_with("detour_local_connections{"))
                .and_then(|l| l.rsplit(' ').next())
        })
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A look at blr's agent: `/proc` for memory, descriptors and threads, its
/// metrics for tasks.
fn sample(fleet: &NsFleet) -> anyhow::Result<Sample> {
    let pid = fleet.pid("blr").context("blr's agent is not running")?;
    let status = status(pid)?;
    let fds = fd_count(pid)?;
    let metrics = fleet.exec(
        "blr",
        Path::new("curl"),
        &["-sf", "http://127.0.0.1:9090/metrics"],
    )?;
    let tasks = metrics
        .lines()
        .find_map(|l| l.strip_prefix("detour_runtime_tasks"))
        .and_then(|rest| rest.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64;
    Ok(Sample {
        rss_kib: status_field(&status, "VmRSS:"),
        fds,
        threads: status_field(&status, "Threads:"),
        tasks,
    })
}

/// The faults, in the order they are applied, one per `every`.
pub const FAULTS: [&str; 6] = [
    "blackhole",
    "10% loss",
    "peer restart (maa)",
    "30% loss",
    "control-plane restart",
    "peer-list edit",
];

/// Runs the soak for `total` with a fault every `every` (each fault lasts
/// a third of it, then everything heals). `bins` holds the binaries.
pub async fn run(bins: &Path, total: Duration, every: Duration) -> anyhow::Result<Report> {
    let route = r#"{"prefix":"+91","trunk":"t1","pop":"blr"}"#;
    let mut fleet = NsFleet::start_with_control_plane(bins, &[("india", route)]).await?;
    for (pop, _) in crate::ns::POPS {
        fleet.wait_ready(pop, bins, Duration::from_secs(30)).await?;
    }
    let load = fleet.spawn_load(
        bins,
        &[
            "--rate",
            "200",
            "--duration",
            &format!("{}s", total.as_secs()),
            "--retry-for",
            "10s",
            "--body",
            r#"{"caller":"+919876543210","destination":"+918041234567"}"#,
        ],
    )?;
    let started = Instant::now();
    let warm = every.min(Duration::from_secs(60)) / 2;
    tokio::time::sleep(warm).await;
    let first = sample(&fleet)?;
    let mut max = first;
    let peers_file = fleet.dir().join("blr").join("peers.toml");
    let peers = std::fs::read_to_string(&peers_file)?;
    let mut faults = Vec::new();
    let mut after_round = None;
    let mut rounds = Vec::new();
    let mut n = 0;
    while started.elapsed() + every <= total {
        let name = FAULTS[n % FAULTS.len()];
        n += 1;
        let at = started.elapsed().as_secs();
        eprintln!("soak: {at:>5} s: {name}");
        faults.push(format!("{at} s: {name}"));
        let hold = every / 3;
        apply(&mut fleet, bins, name, &peers_file, &peers).await?;
        tokio::time::sleep(hold).await;
        fleet.heal("blr")?;
        std::fs::write(&peers_file, &peers)?;
        max = max.max(sample(&fleet)?);
        tokio::time::sleep(every - hold).await;
        if n % FAULTS.len() == 0 {
            let s = sample(&fleet)?;
            after_round.get_or_insert(s);
            rounds.push(s);
        }
    }
    let out = load.wait_with_output()?;
    // The call handler's connections close as it exits; the agent keeps idle
    // ones for `ingress.idle_timeout`, so they are still open until it has
    // read those closes. Sampled before that, they look like a leak.
    let settled = tokio::time::Instant::now() + Duration::from_secs(5);
    while local_connections(&fleet).is_some_and(|n| n > 0) && tokio::time::Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end = sample(&fleet)?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("load printed: {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok(Report {
        seconds: total.as_secs(),
        calls: v["calls"].as_u64().unwrap_or(0),
        failed: v["failed"].as_u64().unwrap_or(0),
        retried: v["retried"].as_u64().unwrap_or(0),
        failures_by_status: v["failures_by_status"].clone(),
        faults,
        start: first,
        after_round,
        rounds,
        end,
        max: max.max(end),
    })
}

/// Applies the fault `name` (one of [`FAULTS`]). Network faults and the
/// peer-list edit stay until the caller heals blr and writes `peers` back to
/// `peers_file`; restarts are over when this returns.
async fn apply(
    fleet: &mut NsFleet,
    bins: &Path,
    name: &str,
    peers_file: &Path,
    peers: &str,
) -> anyhow::Result<()> {
    match name {
        "blackhole" => fleet.uplink_loss("blr", 100)?,
        "10% loss" => fleet.uplink_loss("blr", 10)?,
        "30% loss" => fleet.uplink_loss("blr", 30)?,
        "peer restart (maa)" => {
            fleet.kill("maa");
            tokio::time::sleep(Duration::from_secs(2)).await;
            fleet.restart("maa", bins)?;
        }
        "control-plane restart" => {
            fleet
                .restart_control_plane(bins, true, Duration::from_secs(2))
                .await?
        }
        _ => {
            // Drain del from blr's peer list (a hot reload), then put it back.
            let edited = peers.replacen("name = \"del\"", "name = \"del\"\nenabled = false", 1);
            std::fs::write(peers_file, edited)?;
        }
    }
    Ok(())
}

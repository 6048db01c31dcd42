//! `detour-lab bench soak`: a long run on the real kernel network (the
//! namespace fleet with the real control plane) at 200 calls/s through blr,
//! with a fault every few minutes: blr's uplink blackholed, 10% and 30% lossy,
//! a peer agent restarted, the control plane restarted, blr's peer list
//! edited. Reports failed calls and how blr's agent process grew: RSS, open
//! file descriptors, OS threads and tokio tasks after warm-up and at the end.
//! The same run, a few minutes long, is a test (`tests/tests/netns_smoke.rs`).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::time::Instant;

use crate::ns::NsFleet;

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

fn sample(fleet: &NsFleet, bins: &Path) -> anyhow::Result<Sample> {
    let pid = fleet.pid("blr").context("blr's agent is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    let _ = bins;
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
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
        tasks,
    })
}

/// The faults, in the order they are applied, one per `every`.
const FAULTS: [&str; 6] = [
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
    let first = sample(&fleet, bins)?;
    let mut max = first;
    let peers_file = fleet.dir().join("blr").join("peers.toml");
    let peers = std::fs::read_to_string(&peers_file)?;
    let mut faults = Vec::new();
    let mut after_round = None;
    let mut n = 0;
    while started.elapsed() + every <= total {
        let name = FAULTS[n % FAULTS.len()];
        n += 1;
        let at = started.elapsed().as_secs();
        eprintln!("soak: {at:>5} s: {name}");
        faults.push(format!("{at} s: {name}"));
        let hold = every / 3;
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
                std::fs::write(&peers_file, edited)?;
            }
        }
        tokio::time::sleep(hold).await;
        fleet.heal("blr")?;
        std::fs::write(&peers_file, &peers)?;
        let s = sample(&fleet, bins)?;
        max = Sample {
            rss_kib: max.rss_kib.max(s.rss_kib),
            fds: max.fds.max(s.fds),
            threads: max.threads.max(s.threads),
            tasks: max.tasks.max(s.tasks),
        };
        tokio::time::sleep(every - hold).await;
        if n == FAULTS.len() {
            after_round = Some(sample(&fleet, bins)?);
        }
    }
    let out = load.wait_with_output()?;
    let end = sample(&fleet, bins)?;
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
        end,
        max: Sample {
            rss_kib: max.rss_kib.max(end.rss_kib),
            fds: max.fds.max(end.fds),
            threads: max.threads.max(end.threads),
            tasks: max.tasks.max(end.tasks),
        },
    })
}

/// `detour-lab bench soak --seconds N` (default an hour, a fault every 3 minutes).
pub async fn bench(args: &crate::bench::BenchArgs) -> anyhow::Result<()> {
    if let Some(why) = crate::ns::unavailable() {
        anyhow::bail!("bench soak needs root, `ip` and `nft`: {why}");
    }
    let bins = crate::process::built_bins()?;
    let total = Duration::from_secs(args.seconds.max(60));
    let every = if total >= Duration::from_secs(1800) {
        Duration::from_secs(180)
    } else {
        (total / 8).max(Duration::from_secs(15))
    };
    let r = run(&bins, total, every).await?;
    let round = r.after_round.unwrap_or(r.start);
    let pct = |a: u64, b: u64| format!("{:+.1}%", Report::drift(a, b) * 100.0);
    let md = format!(
        "## Soak\n\nMeasured {} with `target/release/detour-lab bench soak --seconds {}` (root): the namespace \
         fleet with the real control plane (SQLite, HTTPS), 200 calls/s (`POST /v1/calls`) from blr's call handler, \
         each re-sent with its Idempotency-Key for up to 10 s while unanswered (2 s client timeout). A fault every \
         {} s, held for a third of that, then healed: {}.\n\n\
         | calls | failed | answered after a retry | failures seen in between |\n|---|---|---|---|\n\
         | {} | {} | {} | `{}` |\n\n\
         blr's agent process before the first fault, after one round of every fault (warm-up: the allocator's \
         high-water mark is reached at the control-plane restart, when retried calls pile up), at the end, and the \
         most seen at any sample; drift is from after the round to the end:\n\n\
         | | before faults | after one round | end | drift | max |\n|---|---|---|---|---|---|\n\
         | RSS (MiB) | {:.1} | {:.1} | {:.1} | {} | {:.1} |\n\
         | open fds | {} | {} | {} | {} | {} |\n\
         | OS threads | {} | {} | {} | {} | {} |\n\
         | tokio tasks | {} | {} | {} | {} | {} |\n\n\
         Goals (issue 12): zero failed; RSS and fds drift at most 5% after warm-up. Retries happen only around \
         the control-plane restarts (503 problem+json while it is away); network faults are absorbed by the agent.\n",
        crate::report::machine(),
        r.seconds,
        every.as_secs(),
        FAULTS.join(", "),
        r.calls,
        r.failed,
        r.retried,
        r.failures_by_status,
        r.start.rss_kib as f64 / 1024.0,
        round.rss_kib as f64 / 1024.0,
        r.end.rss_kib as f64 / 1024.0,
        pct(round.rss_kib, r.end.rss_kib),
        r.max.rss_kib as f64 / 1024.0,
        r.start.fds,
        round.fds,
        r.end.fds,
        pct(round.fds, r.end.fds),
        r.max.fds,
        r.start.threads,
        round.threads,
        r.end.threads,
        pct(round.threads, r.end.threads),
        r.max.threads,
        r.start.tasks,
        round.tasks,
        r.end.tasks,
        pct(round.tasks, r.end.tasks),
        r.max.tasks,
    );
    println!("{md}");
    eprintln!("{}", serde_json::to_string(&r)?);
    if !args.no_write {
        crate::report::write_block(&args.doc, "soak", &md)?;
    }
    Ok(())
}

//! `detour-lab bench netns` (root): failover on the real kernel network,
//! each fault repeated `runs` times on a fresh [`NsFleet`]. 50 requests/s
//! from blr's call handler (2 s client timeout); 3 s healthy, then the fault
//! on blr's uplink for `seconds`. Measures how long blr's agent takes to move
//! traffic off `direct` (its `/status`, polled every 50 ms), and what the call
//! handler saw. Writes the `netns` block of docs/benchmarks.md.

use std::path::Path;
use std::time::Duration;

use super::BenchArgs;
use crate::ns::{NsFleet, POPS};
use crate::process::built_bins;
use crate::report::{Table, machine};

/// What one fault did over all its runs.
#[derive(Default)]
struct FaultRow {
    requests: u64,
    failed: u64,
    /// The worst p99 and maximum latency of any run, in ms.
    p99: f64,
    max: f64,
    /// Time to leave `direct`, for each run that did.
    left: Vec<Duration>,
    /// Runs that stayed on `direct`.
    never: u32,
}

/// `detour-lab bench netns`.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(why) = crate::ns::unavailable() {
        anyhow::bail!("bench netns needs root, `ip` and `nft`: {why}");
    }
    let bins = built_bins()?;
    if args.loss_sweep {
        return loss_sweep(args, &bins).await;
    }
    let fault_for = Duration::from_secs(args.seconds.clamp(6, 60));
    let healthy = Duration::from_secs(3);
    let runs = args.runs.max(1);
    let faults: [(&str, u32); 3] = [("blackhole", 100), ("10% loss", 10), ("30% loss", 30)];
    let mut md = intro(&machine(), healthy, fault_for);
    let mut table = Table::new(&[
        "fault",
        "runs",
        "requests",
        "failed",
        "left direct: min / median / max",
        "worst p99 (ms)",
        "worst max (ms)",
    ]);
    for (name, percent) in faults {
        let mut row = FaultRow::default();
        for run in 1..=runs {
            eprintln!("netns: {name}, run {run} of {runs} …");
            let (moved, v) = one_run(&bins, percent, healthy, fault_for).await?;
            row.requests += v["requests"].as_u64().unwrap_or(0);
            row.failed += v["failed"].as_u64().unwrap_or(0);
            row.p99 = row.p99.max(v["p99_ms"].as_f64().unwrap_or(0.0));
            row.max = row.max.max(v["max_ms"].as_f64().unwrap_or(0.0));
            match moved {
                Some(d) => row.left.push(d),
                None => row.never += 1,
            }
            eprintln!("  left direct after {moved:?}; {v}");
        }
        table.row(&row.cells(name, runs));
    }
    md.push_str(&table.finish());
    md.push_str(
        "\nTargets (issues 3 and 5): zero failed requests; off a blackholed path within 1 s; off a lossy path \
         within 5 s. Before the agent read the kernel's retransmission counters (2026-12-01), 10% loss took \
         0.4 to 6.3 s to leave in eight runs of the netns test's scenario (debug build): most lost segments were \
         repaired in ~20 ms, below every timeout.\n",
    );
    args.publish("netns", &md)
}

/// One run on a fresh fleet: `healthy` of load, then `percent`% loss on
/// blr's uplink for `fault_for`. Returns when blr left `direct` (from the nft
/// rule) and the load's JSON summary.
async fn one_run(
    bins: &Path,
    percent: u32,
    healthy: Duration,
    fault_for: Duration,
) -> anyhow::Result<(Option<Duration>, serde_json::Value)> {
    let fleet = NsFleet::start(bins)?;
    for (pop, _) in POPS {
        fleet.wait_ready(pop, bins, Duration::from_secs(20)).await?;
    }
    let total = healthy + fault_for;
    let load = fleet.spawn_load(
        bins,
        &["--rate", "50", "--duration", &format!("{}s", total.as_secs())],
    )?;
    tokio::time::sleep(healthy).await;
    fleet.uplink_loss("blr", percent)?;
    let t = tokio::time::Instant::now();
    let mut moved = None;
    while t.elapsed() < fault_for {
        if moved.is_none() && fleet.active_path("blr", bins).starts_with("via:") {
            moved = Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = load.wait_with_output()?;
    fleet.heal("blr")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    Ok((moved, v))
}

fn intro(machine: &str, healthy: Duration, fault_for: Duration) -> String {
    format!(
        "## Failover on the real kernel network\n\nMeasured {machine} with `target/release/detour-lab bench netns` (root): \
         the fleet in network namespaces (control-plane stand-in over TLS behind an \"internet\" bridge, blr/maa/del \
         agents, a backbone bridge between PoPs), faults from nftables on blr's uplink in both directions (`drop`, or \
         `numgen random mod 100 < N drop`). Each run starts a fresh fleet: 50 requests/s from blr's call handler with a \
         2 s client timeout, {} s healthy, then {} s of fault. \"Left direct\" is the time from the nft rule to blr's \
         `/status` showing a peer path (polled every 50 ms, so up to ~50 ms late); latencies are over the whole run.\n\n",
        healthy.as_secs(),
        fault_for.as_secs(),
    )
}

impl FaultRow {
    /// This fault's line of the table.
    fn cells(mut self, name: &str, runs: u32) -> [String; 7] {
        self.left.sort();
        let left = &self.left;
        let ms = |d: &Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        let spread = match (left.first(), left.get(left.len() / 2), left.last()) {
            (Some(a), Some(b), Some(c)) => format!("{} / {} / {}", ms(a), ms(b), ms(c)),
            _ => "—".to_owned(),
        };
        let spread = if self.never > 0 {
            format!("{spread} (stayed on direct in {} of {runs})", self.never)
        } else {
            spread
        };
        [
            name.to_owned(),
            runs.to_string(),
            self.requests.to_string(),
            self.failed.to_string(),
            spread,
            format!("{:.1}", self.p99),
            format!("{:.1}", self.max),
        ]
    }
}

/// The levels of `--loss-sweep`, in per mille.
const SWEEP: [u32; 8] = [0, 5, 10, 20, 50, 100, 200, 300];

/// What one level of the sweep did.
struct Level {
    permille: u32,
    /// From the nft rule to blr's first switch off `direct`.
    left: Option<Duration>,
    /// Active-path switches during the loss (the agent keeps its last 16).
    switches: usize,
    requests: u64,
    failed: u64,
    p99: f64,
    /// Data segments per second on `direct` during the loss, and the share
    /// sent again (the evidence the loss test had).
    segments_per_s: f64,
    resent: f64,
}

/// `detour-lab bench netns --loss-sweep`: random loss on blr's uplink, one
/// level per fresh fleet, peers clean; 50 requests/s from blr's call handler.
async fn loss_sweep(args: &BenchArgs, bins: &Path) -> anyhow::Result<()> {
    let levels: Vec<u32> = if args.levels.is_empty() {
        SWEEP.to_vec()
    } else {
        args.levels.clone()
    };
    let hold = Duration::from_secs(args.level_seconds.max(10));
    let healthy = Duration::from_secs(3);
    let machine = machine();
    let mut rows = Vec::new();
    for &permille in &levels {
        eprintln!(
            "loss sweep: {:.1}% for {} s …",
            f64::from(permille) / 10.0,
            hold.as_secs()
        );
        let row = one_level(bins, permille, healthy, hold).await?;
        eprintln!(
            "  left direct after {:?}; {} switches; {} of {} failed; p99 {:.1} ms; {:.0} segments/s, {:.2}% sent again",
            row.left,
            row.switches,
            row.failed,
            row.requests,
            row.p99,
            row.segments_per_s,
            row.resent * 100.0
        );
        rows.push(row);
    }
    let mut md = format!(
        "## Loss judged precisely: the sweep\n\nMeasured {machine} with `target/release/detour-lab bench netns --loss-sweep --level-seconds {}` (root): \
         the namespace fleet of the netns benchmark, random loss from nftables on blr's uplink in both directions \
         (`numgen random mod 1000 < N drop`), peers clean, each level on a fresh fleet: 50 requests/s from blr's call \
         handler (2 s client timeout), {} s healthy, then {} s of loss. \"Left direct\" is from the nft rule to the \
         agent's first switch off `direct` (its own switch log); switches are every change of the active path during \
         the loss (leaving `direct` is one; coming back another); \"segments/s\" is what the kernel sent on \
         `direct` over the whole loss (`detour_path_segments_total`: requests and probes while it carried the \
         traffic, the probes alone after it was left), the evidence the loss test judges.\n\n",
        hold.as_secs(),
        healthy.as_secs(),
        hold.as_secs()
    );
    let mut table = Table::new(&[
        "loss",
        "left direct after",
        "switches",
        "requests",
        "failed",
        "p99 (ms)",
        "segments/s on direct",
        "of them sent again",
    ]);
    for r in &rows {
        let switches = if r.switches >= 16 {
            "16 or more".to_owned()
        } else {
            r.switches.to_string()
        };
        table.row(&[
            format!("{:.1}%", f64::from(r.permille) / 10.0),
            r.left
                .map_or("stayed".to_owned(), |d| format!("{:.2} s", d.as_secs_f64())),
            switches,
            r.requests.to_string(),
            r.failed.to_string(),
            format!("{:.1}", r.p99),
            format!("{:.0}", r.segments_per_s),
            format!("{:.2}%", r.resent * 100.0),
        ]);
    }
    md.push_str(&table.finish());
    md.push_str(
        "\nGoals (issue 19): at 0% and 0.5% never leave `direct`; at 1-2% at most one switch per 10 minutes; at 5% \
         and more leave within 2 s in every run; zero failed requests at every level. The rule and the statistics \
         behind it: docs/failover.md, \"Judging loss\".\n",
    );
    args.publish("loss-sweep", &md)
}

/// One level of the sweep on a fresh fleet.
async fn one_level(bins: &Path, permille: u32, healthy: Duration, hold: Duration) -> anyhow::Result<Level> {
    let fleet = NsFleet::start(bins)?;
    for (pop, _) in POPS {
        fleet.wait_ready(pop, bins, Duration::from_secs(20)).await?;
    }
    let total = healthy + hold;
    let load = fleet.spawn_load(
        bins,
        &["--rate", "50", "--duration", &format!("{}s", total.as_secs())],
    )?;
    tokio::time::sleep(healthy).await;
    let before = segments(&fleet, bins);
    fleet.uplink_loss_permille("blr", permille)?;
    let rule_ms = unix_ms();
    let started = tokio::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || load.wait_with_output()).await??;
    let elapsed = started.elapsed().as_secs_f64();
    let after = segments(&fleet, bins);
    let status: serde_json::Value =
        serde_json::from_str(&fleet.exec("blr", &bins.join("detour-agent"), &["status", "--json"])?)
            .unwrap_or_default();
    fleet.heal("blr")?;
    let switches: Vec<(i64, String)> = status["switches"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| Some((s["at_ms"].as_i64()?, s["from"].as_str()?.to_owned())))
                .filter(|(at, _)| *at >= rule_ms)
                .collect()
        })
        .unwrap_or_default();
    let left = switches
        .iter()
        .find(|(_, from)| from.starts_with("direct"))
        .map(|(at, _)| Duration::from_millis(u64::try_from(at - rule_ms).unwrap_or(0)));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let sent = after.0.saturating_sub(before.0) as f64;
    let again = after.1.saturating_sub(before.1) as f64;
    Ok(Level {
        permille,
        left,
        switches: switches.len(),
        requests: v["requests"].as_u64().unwrap_or(0),
        failed: v["failed"].as_u64().unwrap_or(0),
        p99: v["p99_ms"].as_f64().unwrap_or(0.0),
        segments_per_s: sent / elapsed.max(1.0),
        resent: if sent > 0.0 { again / sent } else { 0.0 },
    })
}

/// blr's `detour_path_segments_total` on `direct`: (sent, sent again).
fn segments(fleet: &NsFleet, bins: &Path) -> (u64, u64) {
    let _ = bins;
    let text = fleet
        .exec("blr", Path::new("curl"), &["-s", "http://127.0.0.1:9090/metrics"])
        .unwrap_or_default();
    let mut totals = (0, 0);
    for line in text.lines() {
        if !line.starts_with("detour_path_segments_total{") || !line.contains("path=\"direct") {
            continue;
        }
        let n = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        if line.contains("kind=\"sent\"") {
            totals.0 += n;
        } else if line.contains("kind=\"again\"") {
            totals.1 += n;
        }
    }
    totals
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

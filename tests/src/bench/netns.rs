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
    /// The worst p99 of any run's healthy window and of its fault window, ms.
    healthy_p99: f64,
    p99: f64,
    max: f64,
    /// Hedges sent by blr's agent, healthy and in the fault.
    healthy_requests: u64,
    healthy_hedges: u64,
    hedges: u64,
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
    let healthy = Duration::from_secs(10);
    let runs = args.runs.max(1);
    let faults: [(&str, u32); 3] = [("blackhole", 100), ("10% loss", 10), ("30% loss", 30)];
    let mut md = intro(&machine(), healthy, fault_for);
    let mut table = Table::new(&[
        "fault",
        "runs",
        "requests in the fault",
        "failed",
        "left direct: min / median / max",
        "healthy p99 (ms)",
        "p99 in the fault (ms)",
        "goal: 3x healthy + 5 ms",
        "max in the fault (ms)",
        "hedges per 100 requests: healthy / fault",
    ]);
    for (name, percent) in faults {
        let mut row = FaultRow::default();
        for run in 1..=runs {
            eprintln!("netns: {name}, run {run} of {runs} …");
            let r = one_run(&bins, percent, healthy, fault_for).await?;
            row.healthy_requests += r.healthy["requests"].as_u64().unwrap_or(0);
            row.healthy_p99 = row.healthy_p99.max(r.healthy["p99_ms"].as_f64().unwrap_or(0.0));
            row.healthy_hedges += r.hedges.0;
            row.hedges += r.hedges.1;
            row.requests += r.fault["requests"].as_u64().unwrap_or(0);
            row.failed += r.healthy["failed"].as_u64().unwrap_or(0) + r.fault["failed"].as_u64().unwrap_or(0);
            row.p99 = row.p99.max(r.fault["p99_ms"].as_f64().unwrap_or(0.0));
            row.max = row.max.max(r.fault["max_ms"].as_f64().unwrap_or(0.0));
            match r.moved {
                Some(d) => row.left.push(d),
                None => row.never += 1,
            }
            eprintln!(
                "  left direct after {:?}; hedges {:?}; healthy {}; fault {}",
                r.moved, r.hedges, r.healthy, r.fault
            );
        }
        table.row(&row.cells(name, runs));
    }
    md.push_str(&table.finish());
    md.push_str(
        "\nTargets (issues 3, 5 and 19): zero failed requests; off a blackholed path within 1 s; off a lossy path \
         within 5 s; p99 in the fault at most 3x the healthy p99 + 5 ms, the hedges inside the retry budget (20% of \
         requests + 10/s). Before the agent read the kernel's retransmission counters (2026-12-01), 10% loss took \
         0.4 to 6.3 s to leave in eight runs of the netns test's scenario (debug build): most lost segments were \
         repaired in ~20 ms, below every timeout.\n",
    );
    args.publish("netns", &md)
}

/// What one run saw.
struct RunResult {
    /// When blr left `direct`, from the nft rule.
    moved: Option<Duration>,
    /// The load's JSON summaries of the healthy window and the fault's.
    healthy: serde_json::Value,
    fault: serde_json::Value,
    /// Hedges blr's agent sent in each.
    hedges: (u64, u64),
}

/// One run on a fresh fleet: `healthy` of load, then `percent`% loss on
/// blr's uplink for `fault_for`, each window measured by a load of its own.
async fn one_run(
    bins: &Path,
    percent: u32,
    healthy: Duration,
    fault_for: Duration,
) -> anyhow::Result<RunResult> {
    let fleet = NsFleet::start(bins)?;
    for (pop, _) in POPS {
        fleet.wait_ready(pop, bins, Duration::from_secs(20)).await?;
    }
    let rate = ["--rate", "50", "--duration"];
    let h0 = hedges(&fleet);
    let load = fleet.spawn_load(bins, &[&rate[..], &[&format!("{}s", healthy.as_secs())]].concat())?;
    let healthy_out = tokio::task::spawn_blocking(move || load.wait_with_output()).await??;
    let h1 = hedges(&fleet);
    let load = fleet.spawn_load(
        bins,
        &[&rate[..], &[&format!("{}s", fault_for.as_secs())]].concat(),
    )?;
    fleet.uplink_loss("blr", percent)?;
    let t = tokio::time::Instant::now();
    let mut moved = None;
    while t.elapsed() < fault_for {
        if moved.is_none() && fleet.active_path("blr", bins).starts_with("via:") {
            moved = Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fault_out = tokio::task::spawn_blocking(move || load.wait_with_output()).await??;
    let h2 = hedges(&fleet);
    fleet.heal("blr")?;
    let json = |o: &std::process::Output| serde_json::from_slice(&o.stdout).unwrap_or_default();
    Ok(RunResult {
        moved,
        healthy: json(&healthy_out),
        fault: json(&fault_out),
        hedges: (h1.saturating_sub(h0), h2.saturating_sub(h1)),
    })
}

/// Hedges blr's agent has sent (`detour_attempts_total{kind="hedge"}`).
fn hedges(fleet: &NsFleet) -> u64 {
    metric_sum(fleet, |l| {
        l.starts_with("detour_attempts_total{") && l.contains("kind=\"hedge\"")
    })
}

/// The sum of blr's metric lines that `pick` selects.
fn metric_sum(fleet: &NsFleet, pick: impl Fn(&str) -> bool) -> u64 {
    let text = fleet
        .exec("blr", Path::new("curl"), &["-s", "http://127.0.0.1:9090/metrics"])
        .unwrap_or_default();
    text.lines()
        .filter(|l| pick(l))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn intro(machine: &str, healthy: Duration, fault_for: Duration) -> String {
    format!(
        "## Failover on the real kernel network\n\nMeasured {machine} with `target/release/detour-lab bench netns` (root): \
         the fleet in network namespaces (control-plane stand-in over TLS behind an \"internet\" bridge, blr/maa/del \
         agents, a backbone bridge between PoPs), faults from nftables on blr's uplink in both directions (`drop`, or \
         `numgen random mod 100 < N drop`). Each run starts a fresh fleet: 50 requests/s from blr's call handler with a \
         2 s client timeout, {} s healthy, then {} s of fault, each window its own load so each has its own \
         latencies. \"Left direct\" is the time from the nft rule to blr's `/status` showing a peer path (polled every \
         50 ms, so up to ~50 ms late); hedges are blr's `detour_attempts_total{{kind=\"hedge\"}}` per 100 requests \
         of the window.\n\n",
        healthy.as_secs(),
        fault_for.as_secs(),
    )
}

impl FaultRow {
    /// This fault's line of the table.
    fn cells(mut self, name: &str, runs: u32) -> [String; 10] {
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
        let goal = 3.0 * self.healthy_p99 + 5.0;
        let per100 = |h: u64, n: u64| if n == 0 { 0.0 } else { h as f64 * 100.0 / n as f64 };
        [
            name.to_owned(),
            runs.to_string(),
            self.requests.to_string(),
            self.failed.to_string(),
            spread,
            format!("{:.1}", self.healthy_p99),
            format!("{:.1}", self.p99),
            format!("{goal:.1} ({})", if self.p99 <= goal { "met" } else { "missed" }),
            format!("{:.1}", self.max),
            format!(
                "{:.1} / {:.1}",
                per100(self.healthy_hedges, self.healthy_requests),
                per100(self.hedges, self.requests)
            ),
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
    /// Active-path switches during the loss (the agent keeps its last 16),
    /// and why the first one happened.
    switches: usize,
    why: String,
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
        "why it left",
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
            r.why.replace('|', "/"),
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
    let before = segments(&fleet);
    fleet.uplink_loss_permille("blr", permille)?;
    let rule_ms = unix_ms();
    let started = tokio::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || load.wait_with_output()).await??;
    let elapsed = started.elapsed().as_secs_f64();
    let after = segments(&fleet);
    let status: serde_json::Value =
        serde_json::from_str(&fleet.exec("blr", &bins.join("detour-agent"), &["status", "--json"])?)
            .unwrap_or_default();
    fleet.heal("blr")?;
    let switches: Vec<(i64, String, String)> = status["switches"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| {
                    Some((
                        s["at_ms"].as_i64()?,
                        s["from"].as_str()?.to_owned(),
                        s["reason"].as_str().unwrap_or_default().to_owned(),
                    ))
                })
                .filter(|(at, _, _)| *at >= rule_ms)
                .collect()
        })
        .unwrap_or_default();
    for (at, from, why) in &switches {
        eprintln!("  +{} ms: off {from}: {why}", at - rule_ms);
    }
    let first = switches.iter().find(|(_, from, _)| from.starts_with("direct"));
    let left = first.map(|(at, _, _)| Duration::from_millis(u64::try_from(at - rule_ms).unwrap_or(0)));
    let why = first.map(|(_, _, why)| why.clone()).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let sent = after.0.saturating_sub(before.0) as f64;
    let again = after.1.saturating_sub(before.1) as f64;
    Ok(Level {
        permille,
        left,
        switches: switches.len(),
        why,
        requests: v["requests"].as_u64().unwrap_or(0),
        failed: v["failed"].as_u64().unwrap_or(0),
        p99: v["p99_ms"].as_f64().unwrap_or(0.0),
        segments_per_s: sent / elapsed.max(1.0),
        resent: if sent > 0.0 { again / sent } else { 0.0 },
    })
}

/// blr's `detour_path_segments_total` on `direct`: (sent, sent again).
fn segments(fleet: &NsFleet) -> (u64, u64) {
    let on_direct = |l: &str, kind: &str| {
        l.starts_with("detour_path_segments_total{")
            && l.contains("path=\"direct")
            && l.contains(&format!("kind=\"{kind}\""))
    };
    (
        metric_sum(fleet, |l| on_direct(l, "sent")),
        metric_sum(fleet, |l| on_direct(l, "again")),
    )
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

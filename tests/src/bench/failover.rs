//! `detour-lab bench failover`: the in-process fleet at 50 requests/s with a
//! 2 s client timeout while blr's uplink is blackholed or lossy; per run:
//! failed requests, time from the fault to traffic on another path, latency
//! during and outside the fault, path switches.

use std::time::Duration;

use tokio::time::Instant;

use super::BenchArgs;
use super::faults::{Window, faults};
use crate::fleet::{Fleet, FleetOptions, counter_sum};
use crate::link::Fault;
use crate::load::{CallResult, q3};
use crate::report::{Table, machine, ms};

struct FailoverRow {
    scenario: String,
    requests: usize,
    failed: usize,
    reroute: Option<Duration>,
    during: (Duration, Duration, Duration),
    outside: (Duration, Duration, Duration),
    switches: u64,
    /// Hedges sent while healthy (before the fault) and in the fault.
    hedges: (u64, u64),
    /// Requests sent while healthy (before the fault) and in the fault.
    sent: (usize, usize),
}

/// `detour-lab bench failover`.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let mut window = Window::new(args.seconds);
    // A WAN's round trip: half of it on each way of every uplink.
    let wan = (args.wan_rtt_ms > 0).then(|| Fault::Latency(Duration::from_millis(args.wan_rtt_ms) / 2));
    if let Some(w) = wan {
        window.healthy = w;
    }
    let mut rows = Vec::new();
    for (name, fault) in faults() {
        eprintln!("failover: {name} …");
        let fleet = Fleet::start(FleetOptions {
            cp_tls: true,
            ..Default::default()
        })
        .await?;
        if let Some(w) = wan {
            for pop in ["blr", "maa", "del"] {
                fleet.pop(pop).uplink.set(w);
            }
        }
        let blr = fleet.pop("blr");
        let switches0 = blr.agent().shared.metrics.path_switches.get();
        let hedges = || counter_sum(blr.agent(), "detour_attempts_total", "kind", "hedge");
        let h0 = hedges();
        // The first moment blr's active path is a peer, polled every 5 ms.
        let watch = |fault_for: Duration| async move {
            let h1 = hedges();
            let t = Instant::now();
            let mut reroute = None;
            while t.elapsed() < fault_for {
                let snap = blr.agent().shared.forwarder.runtime().health.snapshot();
                if reroute.is_none() && snap.active().is_some_and(|a| &*a.name != "direct") {
                    reroute = Some(t.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (reroute, (h1 - h0, hedges() - h1))
        };
        let set = |f| blr.uplink.set(f);
        let (results, (reroute, hedged)) = window.run(&blr.local_url(), set, fault, watch).await;
        let during: Vec<&CallResult> = results.iter().filter(|r| window.during(r)).collect();
        let outside: Vec<&CallResult> = results.iter().filter(|r| !window.during(r)).collect();
        rows.push(FailoverRow {
            scenario: name.to_owned(),
            requests: results.len(),
            failed: results.iter().filter(|r| !r.ok()).count(),
            reroute,
            during: q3(&during),
            outside: q3(&outside),
            switches: blr.agent().shared.metrics.path_switches.get() - switches0,
            hedges: hedged,
            sent: (
                results.iter().filter(|r| r.at < window.before).count(),
                during.len(),
            ),
        });
        fleet.shutdown().await;
    }
    match wan {
        None => args.publish("failover", &render(&window, &rows, &machine(), None)),
        Some(_) => args.publish(
            "failover-wan",
            &render(&window, &rows, &machine(), Some(args.wan_rtt_ms)),
        ),
    }
}

fn render(window: &Window, rows: &[FailoverRow], machine: &str, wan_rtt_ms: Option<u64>) -> String {
    let (title, command, profile) = match wan_rtt_ms {
        None => (
            "Failover (issue: agent brains)".to_owned(),
            "bench failover".to_owned(),
            String::new(),
        ),
        Some(rtt) => (
            format!("Failover on a WAN: {rtt} ms round trip to the control plane (issue 19)"),
            format!("bench failover --wan-rtt-ms {rtt}"),
            format!(
                " Every PoP's uplink delays each chunk {} ms each way, outside the fault too (a loss fault replaces that \
                 delay on blr's uplink while it lasts); peers reach each other without delay, as PoPs on one \
                 backbone.",
                rtt / 2
            ),
        ),
    };
    let mut md = format!(
        "## {title}\n\nMeasured {machine} with `target/release/detour-lab {command}` (in-process fleet \
         blr/maa/del and a TLS control-plane stand-in on loopback; faults by the lab's links on blr's uplink: a blackhole \
         holds every byte, loss stalls that share of chunks for 300 ms like a retransmission).{profile} 50 requests/s through blr, \
         2 s client timeout; {} s healthy, {} s of fault, {} s healed.\n\n",
        window.before.as_secs(),
        window.fault_for.as_secs(),
        window.after.as_secs()
    );
    let mut table = Table::new(&[
        "fault",
        "requests",
        "failed",
        "fault → traffic on a peer",
        "p50 / p99 / max during fault (ms)",
        "p50 / p99 / max outside (ms)",
        "path switches",
        "hedges per 100 requests: healthy / fault",
    ]);
    let three = |(a, b, c): (Duration, Duration, Duration)| format!("{} / {} / {}", ms(a), ms(b), ms(c));
    for r in rows {
        table.row(&[
            r.scenario.clone(),
            r.requests.to_string(),
            r.failed.to_string(),
            r.reroute
                .map_or("did not move".to_owned(), |d| format!("{} ms", ms(d))),
            three(r.during),
            three(r.outside),
            r.switches.to_string(),
            format!(
                "{:.1} / {:.1}",
                per_100(r.hedges.0, r.sent.0),
                per_100(r.hedges.1, r.sent.1)
            ),
        ]);
    }
    md.push_str(&table.finish());
    md.push_str(
        "\nTargets (issue 3): zero failed requests, p99 during any fault under 250 ms, reroute under 1 s on a blackhole, \
         a lossy path left within 5 s. A lossy path is only trusted again after 30 s without a bad exchange, so after a \
         loss run traffic is still on a peer when the run ends (that is the second switch missing, by design).\n",
    );
    md
}

fn per_100(hedges: u64, requests: usize) -> f64 {
    100.0 * hedges as f64 / requests.max(1) as f64
}

//! `detour-lab bench regions`: the primary control-plane region lost under
//! call traffic. The in-process fleet with the real control plane in two
//! regions on one database (`mumbai`, priority 1, and `singapore`, priority
//! 2); 50 calls/s through blr; 2 s in, the primary is lost for 3 s, two ways:
//! its process stopped (connections refused), or unreachable from every PoP
//! (every uplink to it blackholed: nothing answers, nothing refuses). For
//! each: failed requests, when the active path moved to the secondary, the
//! latency of the calls sent in the second after the loss, and how long after
//! the primary came back traffic returned to it.

use std::time::Duration;

use tokio::time::Instant;

use super::BenchArgs;
use crate::fleet::{Fleet, FleetOptions};
use crate::link::Fault;
use crate::load::{Call, CallClient, Latencies, SMALL_CALL, steady};
use crate::report::{Table, machine, ms};

const RATE: u32 = 50;

#[derive(Clone, Copy, PartialEq)]
enum Loss {
    Stopped,
    Unreachable,
}

impl Loss {
    fn name(self) -> &'static str {
        match self {
            Loss::Stopped => "stopped (refused)",
            Loss::Unreachable => "unreachable (blackholed)",
        }
    }
}

struct Run {
    loss: Loss,
    sent: usize,
    failed: usize,
    /// From the loss to the active path on the secondary.
    moved: Duration,
    /// Latencies of the calls sent in the second after the loss.
    after: Vec<Duration>,
    /// From the primary's return to the active path back on it.
    back: Duration,
}

fn active(fleet: &Fleet) -> String {
    let snap = fleet
        .pop("blr")
        .agent()
        .shared
        .forwarder
        .runtime()
        .health
        .snapshot();
    snap.active().map(|a| a.name.to_string()).unwrap_or_default()
}

async fn wait_for(fleet: &Fleet, want: impl Fn(&str) -> bool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !want(&active(fleet)) {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "active path still {} after 30 s",
            active(fleet)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

async fn one(fleet: &mut Fleet, loss: Loss) -> anyhow::Result<Run> {
    wait_for(fleet, |a| a == "direct@mumbai").await?;
    let url = fleet.pop("blr").local_url();
    let client = CallClient::new(Duration::from_secs(5));
    let begin = Instant::now();
    let load = steady(&client, &url, RATE, Duration::from_secs(8), |_| {
        Call::post("/v1/calls", SMALL_CALL)
    });
    let faults = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let lost = begin.elapsed();
        match loss {
            Loss::Stopped => fleet.stop_region(1).await?,
            Loss::Unreachable => {
                for p in fleet.pops.values() {
                    p.uplink.set(Fault::Blackhole);
                }
            }
        }
        let moved = wait_for(fleet, |a| a.ends_with("@singapore")).await?;
        tokio::time::sleep_until(begin + Duration::from_secs(5)).await;
        match loss {
            Loss::Stopped => fleet.start_region(1).await?,
            Loss::Unreachable => {
                for p in fleet.pops.values() {
                    p.uplink.set(Fault::Pass);
                }
            }
        }
        let back = wait_for(fleet, |a| a == "direct@mumbai").await?;
        anyhow::Ok((lost, moved, back))
    };
    let (results, faults) = tokio::join!(load, faults);
    let (lost, moved, back) = faults?;
    let after = results
        .iter()
        .filter(|r| r.at >= lost && r.at < lost + Duration::from_secs(1))
        .map(|r| r.latency)
        .collect();
    Ok(Run {
        loss,
        sent: results.len(),
        failed: results.iter().filter(|r| !r.ok()).count(),
        moved,
        after,
        back,
    })
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for _ in 0..args.runs.clamp(1, 10) {
        for loss in [Loss::Stopped, Loss::Unreachable] {
            // A fresh fleet each time: on one fleet, each outage would
            // lengthen the primary paths' hold-down (flap damping), and the
            // later runs would measure that instead.
            let mut fleet = Fleet::start(FleetOptions {
                real_cp: true,
                second_region: true,
                ..Default::default()
            })
            .await?;
            fleet
                .put_route("blr", "india", r#"{"prefix":"+91","trunk":"t1","pop":"blr"}"#)
                .await?;
            let r = one(&mut fleet, loss).await;
            fleet.shutdown().await;
            let r = r?;
            eprintln!(
                "{}: {} failed of {}, moved {:?}, back {:?}",
                loss.name(),
                r.failed,
                r.sent,
                r.moved,
                r.back
            );
            runs.push(r);
        }
    }
    args.publish("regions", &render(&runs, args.runs.clamp(1, 10), &machine()))
}

fn render(runs: &[Run], n: u32, machine: &str) -> String {
    let mut t = Table::new(&[
        "primary region",
        "calls",
        "failed",
        "on the secondary after, ms (max)",
        "calls in the next second, ms: p50 / p99 / max",
        "back on the primary after, ms (max)",
    ]);
    for loss in [Loss::Stopped, Loss::Unreachable] {
        let of: Vec<&Run> = runs.iter().filter(|r| r.loss == loss).collect();
        let after = Latencies::new(of.iter().flat_map(|r| r.after.iter().copied()));
        let (p50, p99, max) = after.p50_p99_max();
        t.row(&[
            loss.name().to_owned(),
            of.iter().map(|r| r.sent).sum::<usize>().to_string(),
            of.iter().map(|r| r.failed).sum::<usize>().to_string(),
            ms(of.iter().map(|r| r.moved).max().unwrap_or_default()),
            format!("{} / {} / {}", ms(p50), ms(p99), ms(max)),
            ms(of.iter().map(|r| r.back).max().unwrap_or_default()),
        ]);
    }
    format!(
        "### Losing the primary control-plane region\n\n\
         `cargo run --release -p detour-lab -- bench regions --runs {n}` ({machine}).\n\n\
         The real control plane in two regions on one database, listed by every\n\
         agent as `mumbai` (priority 1) and `singapore` (priority 2); {RATE} calls/s\n\
         through blr for 8 s; 2 s in, the primary is lost for 3 s: its process\n\
         stopped, or unreachable from every PoP (every uplink to it blackholed).\n\
         {n} runs of each, each on a fresh fleet. \"On the secondary\" is when blr's active\n\
         path moved to the secondary; before that, requests already fail over\n\
         inside each request (a refused connection is a free retry; a silent one\n\
         waits for the attempt timeout). \"Back\" is from the primary's return to\n\
         the active path on `direct@mumbai` again: hold-down plus `health.rise`\n\
         good probes.\n\n{}",
        t.finish()
    )
}

//! `detour-lab bench streams`: how soon streams come back after a cut. The
//! in-process fleet with the real control plane (its WebSocket echo); 20
//! streams open through blr, all on `direct`; blr's uplink blackholed (no
//! FIN, no RST: the handler alone would wait on a dead socket). Per stream:
//! the time from the cut to the call handler's side closing, and to a new
//! stream, opened at once, answering its first echo. `--runs` rounds, each
//! on a fresh fleet.

use std::sync::Arc;
use std::time::Duration;

use detour_wire::PathState;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::BenchArgs;
use crate::fleet::{Fleet, FleetOptions};
use crate::link::Fault;
use crate::load::Latencies;
use crate::report::{Table, machine, ms};
use crate::ws::open_echo;

const STREAMS: usize = 20;
const ECHO_WITHIN: Duration = Duration::from_secs(5);

/// One stream's round.
struct Sample {
    closed: Duration,
    reconnected: Duration,
    /// Handshakes that failed before the one that worked.
    retries: u32,
    path: String,
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let machine = machine();
    let mut samples = Vec::new();
    let mut judged = Vec::new();
    for round in 0..args.runs.max(1) {
        let (j, s) = one_round().await?;
        println!(
            "round {}: direct judged down {} ms after the cut; {} streams back",
            round + 1,
            ms(j),
            s.len()
        );
        judged.push(j);
        samples.extend(s);
    }
    let md = render(&judged, &samples, args.runs.max(1), &machine);
    args.publish("streams", &md)
}

async fn one_round() -> anyhow::Result<(Duration, Vec<Sample>)> {
    let fleet = Fleet::start(FleetOptions {
        real_cp: true,
        ..Default::default()
    })
    .await?;
    let blr = fleet.pop("blr");
    let local = blr.local_url();
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut s = open_echo(&local, None).await?;
        anyhow::ensure!(s.path == "direct", "a stream opened on {}", s.path);
        s.echo(Message::text("before the cut"), ECHO_WITHIN).await?;
        streams.push(s);
    }
    let agent = Arc::clone(blr.agent());
    let cut = Instant::now();
    blr.uplink.set(Fault::Blackhole);
    let watcher = tokio::spawn(async move {
        loop {
            let snap = agent.shared.forwarder.runtime().health.snapshot();
            if snap.by_name("direct").is_some_and(|p| p.state == PathState::Down) {
                return cut.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut tasks = Vec::new();
    for mut s in streams {
        let local = local.clone();
        tasks.push(tokio::spawn(async move {
            s.closed(Duration::from_secs(30)).await?;
            let closed = cut.elapsed();
            // As a call handler does: reconnect at once, again until it works.
            let mut retries = 0;
            loop {
                match open_echo(&local, None).await {
                    Ok(mut n) => {
                        n.echo(Message::text("after the cut"), ECHO_WITHIN).await?;
                        return anyhow::Ok(Sample {
                            closed,
                            reconnected: cut.elapsed(),
                            retries,
                            path: n.path,
                        });
                    }
                    Err(e) => {
                        anyhow::ensure!(
                            cut.elapsed() < Duration::from_secs(30),
                            "no reconnect in 30 s: {e}"
                        );
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.push(t.await??);
    }
    let judged = tokio::time::timeout(Duration::from_secs(30), watcher).await??;
    fleet.shutdown().await;
    Ok((judged, samples))
}

fn render(judged: &[Duration], samples: &[Sample], runs: u32, machine: &str) -> String {
    let closed = Latencies::new(samples.iter().map(|s| s.closed));
    let reconnected = Latencies::new(samples.iter().map(|s| s.reconnected));
    let judged_l = Latencies::new(judged.iter().copied());
    let (j50, _, jmax) = judged_l.p50_p99_max();
    let (c50, c99, cmax) = closed.p50_p99_max();
    let (r50, r99, rmax) = reconnected.p50_p99_max();
    let retries: u32 = samples.iter().map(|s| s.retries).sum();
    let via = samples.iter().filter(|s| s.path.starts_with("via:")).count();
    let mut t = Table::new(&["from the cut to", "p50", "p99", "max"]);
    t.row(&[
        format!("`direct` judged down ({runs} cuts)"),
        format!("{} ms", ms(j50)),
        "-".to_owned(),
        format!("{} ms", ms(jmax)),
    ]);
    t.row(&[
        "the call handler's side closed".to_owned(),
        format!("{} ms", ms(c50)),
        format!("{} ms", ms(c99)),
        format!("{} ms", ms(cmax)),
    ]);
    t.row(&[
        "a new stream's first echo (reconnected at once)".to_owned(),
        format!("{} ms", ms(r50)),
        format!("{} ms", ms(r99)),
        format!("{} ms", ms(rmax)),
    ]);
    format!(
        "## Streams: reconnect after a cut (issue: when the traffic is a stream)\n\nMeasured {machine} with `cargo run --release -p detour-lab -- bench streams`: the in-process fleet with the real control plane (SQLite) and its WebSocket echo (`GET /v1/streams/echo`), health probes every 200 ms; {STREAMS} WebSockets open through blr, all on `direct`, then blr's uplink blackholed (nothing gets through, and no FIN or RST reaches anyone). Each stream's handler waits for its side to close, then reconnects at once and sends one echo. {runs} rounds, {n} streams.\n\n{}\n{via} of {n} reconnects went through a peer, after {retries} failed handshakes in all. A stream is cut within about {watch} ms of its path being judged down (each stream looks at the health snapshot every {watch} ms); most of the time from the cut is the health table's judgement of `direct`.\n",
        t.finish(),
        n = samples.len(),
        watch = detour_agent::streams::WATCH_EVERY.as_millis(),
    )
}

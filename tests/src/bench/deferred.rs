//! `detour-lab bench deferred`: deferred delivery through an outage. The
//! in-process fleet with the mock control plane; every uplink cut; 10,000
//! call events (100 calls, 100 each, the calls side by side) sent to blr,
//! which answers them 202 from its journal; then the uplinks healed, and the
//! time until the journal is empty and the mock has every event.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::BenchArgs;
use crate::fleet::{Fleet, FleetOptions};
use crate::link::Fault;
use crate::load::{CallClient, Latencies};
use crate::report::{Table, machine, ms};

const CALLS: usize = 100;
const EVENTS: usize = 100;

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let mut extra = BTreeMap::new();
    extra.insert(
        "forward".to_owned(),
        "deferred_journal = \"deferred.journal\"\n[[forward.deferrable]]\nmethod = \"POST\"\npath = \"/v1/calls/*/events\"\n"
            .to_owned(),
    );
    let fleet = Fleet::start(FleetOptions {
        extra,
        ..Default::default()
    })
    .await?;
    let local = fleet.pop("blr").local_url();
    for p in fleet.pops.values() {
        p.uplink.set(Fault::Blackhole);
    }

    // During the outage: every event answered from the journal.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for call in 0..CALLS {
        let local = local.clone();
        tasks.push(tokio::spawn(async move {
            let client = CallClient::new(Duration::from_secs(5));
            let mut out = Vec::new();
            for n in 0..EVENTS {
                let r = client
                    .send(
                        http::Method::POST,
                        &format!("{local}/v1/calls/bench-{call}/events"),
                        &[
                            ("content-type", "application/json"),
                            ("idempotency-key", &format!("bench-{call}-{n}")),
                        ],
                        Bytes::from_static(br#"{"event":"ringing"}"#),
                    )
                    .await;
                out.push((n, r));
            }
            out
        }));
    }
    let mut journalled = Vec::new();
    let mut first = Vec::new();
    for t in tasks {
        for (n, r) in t.await? {
            anyhow::ensure!(r.status == Some(202), "an event was not deferred: {r:?}");
            // The first of each call waits for the deadline on every path;
            // the rest queue behind it at once.
            if n == 0 {
                first.push(r.latency);
            } else {
                journalled.push(r.latency);
            }
        }
    }
    let outage = started.elapsed();
    let journalled = Latencies::new(journalled);
    let first = Latencies::new(first);
    let agent = fleet.pop("blr").agent().clone();
    let pending = agent.shared.metrics.deferred_pending.get();
    anyhow::ensure!(pending == (CALLS * EVENTS) as i64, "{pending} waiting");

    let journal = fleet
        .pop("blr")
        .config_path
        .parent()
        .map(|d| d.join("deferred.journal"))
        .and_then(|j| std::fs::metadata(j).ok())
        .map_or(0, |m| m.len());

    // The uplinks back: the drain.
    let healed = Instant::now();
    // Healed to links with a WAN's delay (15 ms each way per chunk).
    for p in fleet.pops.values() {
        p.uplink.set(Fault::Latency(Duration::from_millis(15)));
    }
    let mut first_delivery = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while agent.shared.metrics.deferred_pending.get() > 0 {
        if first_delivery.is_none() && agent.shared.metrics.deferred_delivered.get() > 0 {
            first_delivery = Some(healed.elapsed());
        }
        anyhow::ensure!(Instant::now() < deadline, "the journal did not drain in 300 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = healed.elapsed();
    let first_delivery = first_delivery.unwrap_or(drained);
    let recorder = &fleet
        .cp
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the fleet has no mock control plane"))?
        .recorder;
    let keys: HashSet<String> = recorder
        .requests()
        .iter()
        .filter_map(|s| s.headers.get("idempotency-key")?.to_str().ok().map(str::to_owned))
        .filter(|k| k.starts_with("bench-"))
        .collect();
    anyhow::ensure!(
        keys.len() == CALLS * EVENTS,
        "{} of {} events arrived",
        keys.len(),
        CALLS * EVENTS
    );
    fleet.shutdown().await;

    let md = render(
        &journalled,
        &first,
        outage,
        first_delivery,
        drained,
        journal,
        &machine(),
    );
    args.publish("deferred", &md)
}

fn render(
    journalled: &Latencies,
    first: &Latencies,
    outage: Duration,
    first_delivery: Duration,
    drained: Duration,
    journal_bytes: u64,
    machine: &str,
) -> String {
    let total = CALLS * EVENTS;
    let (j50, j99, jmax) = journalled.p50_p99_max();
    let (f50, _, _) = first.p50_p99_max();
    let mut t = Table::new(&["measure", "value"]);
    t.row(&[
        "events answered 202 during the outage".to_owned(),
        format!(
            "{total} in {:.1} s ({:.0}/s)",
            outage.as_secs_f64(),
            total as f64 / outage.as_secs_f64()
        ),
    ]);
    t.row(&[
        "202 latency, an event queued behind its call's (p50 / p99 / max)".to_owned(),
        format!("{} / {} / {} ms", ms(j50), ms(j99), ms(jmax)),
    ]);
    t.row(&[
        "202 latency, a call's first event (tries every path first; p50)".to_owned(),
        format!("{} ms", ms(f50)),
    ]);
    t.row(&[
        "journal on disk at the end of the outage".to_owned(),
        format!("{:.1} MiB", journal_bytes as f64 / (1024.0 * 1024.0)),
    ]);
    t.row(&[
        "uplinks healed to the first delivery".to_owned(),
        format!("{:.2} s", first_delivery.as_secs_f64()),
    ]);
    t.row(&[
        format!("uplinks healed to all {total} delivered"),
        format!(
            "{:.1} s ({:.0} events/s once delivering)",
            drained.as_secs_f64(),
            total as f64 / (drained - first_delivery).as_secs_f64().max(1e-3)
        ),
    ]);
    format!(
        "## Deferred delivery (issue: when no path works)\n\nMeasured {machine}, with `cargo build --release -p detour-lab && target/release/detour-lab bench deferred`: the in-process fleet with the mock control plane on loopback, `[[forward.deferrable]]` for `POST /v1/calls/*/events`, every uplink blackholed while {CALLS} calls send {EVENTS} events each (the calls side by side, each call's events one after the other), then healed to links that delay every chunk 15 ms each way (a WAN's round trip of 30 ms or more). Every event arrived; the mock control plane saw each key.\n\n{}\nThe sender delivers the oldest waiting event of up to 16 calls at once (each call's events one after the other, in order), so up to 16 round trips overlap instead of one at a time.\n",
        t.finish()
    )
}

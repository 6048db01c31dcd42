//! `detour-lab demo --netns`: the outage story on the real kernel network —
//! the fleet of [`crate::ns`] in network namespaces, faults from nftables on
//! blr's uplink, call-handler traffic from `detour-lab load` inside blr.

use std::time::Duration;

use super::DemoArgs;
use crate::ns::{NsFleet, POPS};
use crate::process::exe_dir;

/// The story: (phase, what happens).
const PHASES: [(&str, &str); 7] = [
    ("healthy", "all paths up"),
    ("cut", "nft drops every packet on blr's uplink"),
    ("restored", "rules removed"),
    (
        "lossy",
        "nft drops 10% of packets on blr's uplink (numgen random)",
    ),
    (
        "restored",
        "rules removed; direct must stay clean 30 s before it is trusted",
    ),
    ("peer-dies", "the agent of blr's active peer is killed"),
    ("restored", "the peer is restarted"),
];

/// `detour-lab demo --netns`; `Ok(true)` when no request failed.
pub async fn run(args: &DemoArgs) -> anyhow::Result<bool> {
    if let Some(why) = crate::ns::unavailable() {
        anyhow::bail!("--netns needs root, `ip` and `nft`: {why}");
    }
    let bins = exe_dir()?;
    anyhow::ensure!(
        bins.join("detour-agent").exists(),
        "{} is missing; build it first: cargo build -p detour-agent",
        bins.join("detour-agent").display()
    );
    println!("starting: namespaces for cp, blr, maa, del; internet and backbone bridges…");
    let mut fleet = NsFleet::start(&bins)?;
    for (pop, _) in POPS {
        fleet.wait_ready(pop, &bins, Duration::from_secs(20)).await?;
    }
    let secs = args.duration.max(3);
    let mut killed: Option<String> = None;
    let mut all_ok = true;
    println!(
        "\n{:<10} {:>8} {:>6} {:>8} {:>8} {:>8}  {:<10} {:<10}  what happened",
        "phase", "requests", "failed", "p50", "p99", "max", "before", "after"
    );
    for (name, story) in PHASES {
        let before = fleet.active_path("blr", &bins);
        match name {
            "cut" => fleet.uplink_loss("blr", 100)?,
            "lossy" => fleet.uplink_loss("blr", 10)?,
            "peer-dies" => {
                let victim = before.strip_prefix("via:").unwrap_or("maa").to_owned();
                fleet.kill(&victim);
                killed = Some(victim);
            }
            "restored" => {
                fleet.heal("blr")?;
                if let Some(v) = killed.take() {
                    fleet.restart(&v, &bins)?;
                }
            }
            _ => {}
        }
        let load = fleet.spawn_load(
            &bins,
            &[
                "--rate",
                &args.rate.to_string(),
                "--duration",
                &format!("{secs}s"),
            ],
        )?;
        let out = load.wait_with_output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let failed = v["failed"].as_u64().unwrap_or(u64::MAX);
        all_ok &= failed == 0;
        println!(
            "{:<10} {:>8} {:>6} {:>6.1}ms {:>6.1}ms {:>6.1}ms  {:<10} {:<10}  {story}",
            name,
            v["requests"].as_u64().unwrap_or(0),
            failed,
            v["p50_ms"].as_f64().unwrap_or(0.0),
            v["p99_ms"].as_f64().unwrap_or(0.0),
            v["max_ms"].as_f64().unwrap_or(0.0),
            before,
            fleet.active_path("blr", &bins),
        );
    }
    println!(
        "\n{}",
        if all_ok {
            "no request failed: PASS"
        } else {
            "some requests failed: FAIL"
        }
    );
    Ok(all_ok)
}

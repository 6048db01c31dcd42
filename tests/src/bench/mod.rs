//! `detour-lab bench`: benchmarks whose numbers go to docs/benchmarks.md,
//! one module each; this one holds their options and picks one.
//!
//! - [`overhead`]: the agent's cost on a healthy path, as processes.
//! - [`failover`]: the in-process fleet under faults on blr's uplink.
//! - [`compare`]: the same load and faults against HAProxy + Squid (root).
//! - [`netns`]: failover on the real kernel network (root).
//! - [`soak`]: an hour of faults on the kernel network (root).
//! - [`upgrade`]: the local entry point upgraded under traffic, against
//!   HAProxy's seamless reload.
//! - [`recordings`]: recordings to the object store, against boto3.
//! - [`deferred`]: call events through an outage, journalled and drained.
//! - [`regions`]: the primary control-plane region lost under traffic.
//! - [`streams`]: WebSockets through blr, its uplink cut: close and
//!   reconnect times.
//! - [`fleet`](mod@fleet): the fleet page's data with 1,000 PoPs reporting.
//! - [`scale`]: one agent with 100 peers (probes, relay, failover), and the
//!   control plane with 1,000 PoPs reporting.
//!
//! [`faults`] is what failover and compare share.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

pub mod compare;
pub mod deferred;
pub mod failover;
pub mod faults;
pub mod fleet;
pub mod netns;
pub mod overhead;
pub mod recordings;
pub mod regions;
pub mod scale;
pub mod soak;
pub mod streams;
pub mod upgrade;

/// Options of `detour-lab bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Which benchmark: overhead, failover, compare (HAProxy + Squid, root),
    /// netns (failover on the real kernel network, root), soak (an hour of
    /// faults on the kernel network, root; `--seconds` sets the length),
    /// upgrade (the agent upgraded under traffic, against HAProxy's seamless
    /// reload; `--runs` upgrades each), recordings (recordings to an
    /// S3-compatible store, needs moto), deferred (call events through an
    /// outage), regions (the primary control-plane region lost under
    /// traffic; `--runs` each way), streams (WebSockets through a cut;
    /// `--runs` rounds), fleet (the fleet page's data with `--pops` PoPs
    /// reporting and `--viewers` pages open), scale (one agent with 100 peers,
    /// each its own process: probe and relay CPU, RSS, `--runs` failovers;
    /// then the control plane with `--pops` PoPs reporting), all (overhead
    /// and failover).
    #[arg(default_value = "all")]
    pub what: String,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Write the results into docs/benchmarks.md (else only print them).
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub doc: PathBuf,
    /// Print only; leave the doc alone.
    #[arg(long)]
    pub no_write: bool,
    /// Worker threads for the agents (`detour-agent run --threads`); the
    /// agent's default when absent.
    #[arg(long)]
    pub agent_threads: Option<u16>,
    /// Runs per fault (`netns`): each on a fresh fleet; upgrades per system
    /// (`upgrade`).
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// PoPs reporting (`fleet`).
    #[arg(long, default_value_t = 1000)]
    pub pops: usize,
    /// Fleet pages open, each polling every second (`fleet`).
    #[arg(long, default_value_t = 3)]
    pub viewers: usize,
    /// `netns`: instead of the three faults, sweep random loss on blr's
    /// uplink (0, 0.5, 1, 2, 5, 10, 20 and 30%), `--level-seconds` each,
    /// each level on a fresh fleet.
    #[arg(long)]
    pub loss_sweep: bool,
    /// `netns --loss-sweep`: seconds of loss per level.
    #[arg(long, default_value_t = 300)]
    pub level_seconds: u64,
    /// `netns --loss-sweep`: only these levels, in per mille (e.g. `5,50`).
    #[arg(long, value_delimiter = ',')]
    pub levels: Vec<u32>,
    /// `failover`: a WAN profile, every PoP's uplink with this round-trip
    /// time (half of it each way; 30 is about Mumbai to AWS's ap-south-1
    /// from another Indian city), written as its own block.
    #[arg(long, default_value_t = 0)]
    pub wan_rtt_ms: u64,
}

impl BenchArgs {
    /// Prints a benchmark's Markdown and, unless `--no-write`, puts it in
    /// the `name` block of the doc.
    pub fn publish(&self, name: &str, md: &str) -> anyhow::Result<()> {
        println!("{md}");
        if !self.no_write {
            crate::report::write_block(&self.doc, name, md)?;
        }
        Ok(())
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what.as_str() {
        "compare" => compare::run(&args).await,
        "overhead" => overhead::run(&args).await,
        "failover" => failover::run(&args).await,
        "netns" => netns::run(&args).await,
        "soak" => soak::run(&args).await,
        "upgrade" => upgrade::run(&args).await,
        "recordings" => recordings::run(&args).await,
        "deferred" => deferred::run(&args).await,
        "regions" => regions::run(&args).await,
        "streams" => streams::run(&args).await,
        "fleet" => fleet::run(&args).await,
        "scale" => scale::run(&args).await,
        "all" => {
            overhead::run(&args).await?;
            failover::run(&args).await
        }
        other => bail!(
            "unknown benchmark `{other}`; choose overhead, failover, compare, netns, soak, upgrade, recordings, deferred, regions, streams, fleet, scale or all"
        ),
    }
}

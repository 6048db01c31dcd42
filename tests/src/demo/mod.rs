//! `detour-lab demo`: the scripted outage story — blr's uplink cut, made
//! lossy, healed, and a peer killed, under a call handler's steady traffic
//! through blr. [`loopback`] tells it on the in-process fleet with a live
//! timeline, [`netns`] on the real kernel network (`--netns`, root).

use clap::Args;

pub mod loopback;
pub mod netns;
mod recordings;
mod traffic;

/// Options of `detour-lab demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Seconds per phase.
    #[arg(long, default_value_t = 8)]
    pub duration: u64,
    /// Requests per second through blr.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Run one fault only (with a healthy phase before and a healed one after):
    /// cut, lossy, peer-dies.
    #[arg(long)]
    pub scenario: Option<String>,
    /// Print JSON lines (one per second and one per phase) instead of the timeline.
    #[arg(long)]
    pub json: bool,
    /// The same story in Linux network namespaces with nftables faults (root).
    #[arg(long)]
    pub netns: bool,
    /// After the story, keep the fleet running (and its fleet page up)
    /// until Ctrl-C.
    #[arg(long)]
    pub hold: bool,
}

/// Runs the demo; `Ok(true)` when no request failed.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    if args.netns {
        return netns::run(&args).await;
    }
    loopback::run(args).await
}

//! `detour-lab demo`: the scripted outage story on a loopback fleet.

use clap::Args;

/// Options of `detour-lab demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Seconds per phase.
    #[arg(long, default_value_t = 8)]
    pub duration: u64,
    /// Requests per second through blr.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Run one phase only: healthy, cut, lossy, peer-dies.
    #[arg(long)]
    pub scenario: Option<String>,
    /// Print JSON (one object per phase and a summary) instead of the timeline.
    #[arg(long)]
    pub json: bool,
    /// The same story in Linux network namespaces with nftables faults (root).
    #[arg(long)]
    pub netns: bool,
}

/// Runs the demo; `Ok(true)` when no request failed.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    if args.netns {
        return crate::netns::demo(&args).await;
    }
    anyhow::bail!("the loopback demo is not built yet")
}

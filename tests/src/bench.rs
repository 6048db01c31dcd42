//! `detour-lab bench`: benchmarks whose numbers go to docs/benchmarks.md.

use clap::Args;

/// Options of `detour-lab bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Which benchmark: overhead, failover, compare (HAProxy + Squid), all.
    #[arg(default_value = "all")]
    pub what: String,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.what == "compare" {
        return crate::compare::run().await;
    }
    anyhow::bail!("benchmark `{}` is not built yet", args.what)
}

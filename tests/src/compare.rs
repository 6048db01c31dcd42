//! Detour against HAProxy + Squid on the same topology, load and faults.

/// `detour-lab bench compare`.
pub async fn run() -> anyhow::Result<()> {
    anyhow::bail!("the HAProxy + Squid comparison is not built yet")
}

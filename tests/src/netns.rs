//! Fleets in Linux network namespaces with nftables faults (root only).

/// `detour-lab demo --netns`.
pub async fn demo(_args: &crate::demo::DemoArgs) -> anyhow::Result<bool> {
    anyhow::bail!("the network-namespace lab is not built yet")
}

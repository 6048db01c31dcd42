//! Detour agent: keeps a telephony server talking to its control plane over
//! the best working path.
//!
//! A request meets the modules in this order: [`ingress`] (call handler ->
//! agent, with its listener) -> [`forward`] (attempts, retries, hedging) ->
//! [`paths`] (`direct`, `via:<peer>`) -> [`transport`] (the kernel's view of
//! each connection), with [`health`] beside them publishing a ranked snapshot
//! from what [`probe`] and the requests observe. [`relay`] serves the peers.
//! [`runtime`] owns the running state and its replacement on reload,
//! [`reload`] watches the files, [`agent`] takes or binds the listeners and
//! starts the loops, [`upgrade`] hands them from one process to the next; [`config`], [`tls`], [`pki`], [`admin`], [`metrics`], [`allocator`] and [`status`]
//! support them. `main.rs` only parses the command line ([`cli`]) and calls into this
//! library, so tests and the lab drive the same code.

pub mod admin;
pub mod agent;
pub mod allocator;
pub mod cli;
pub mod config;
pub mod control;
pub mod deferred;
pub mod forward;
pub mod health;
pub mod ingress;
pub mod metrics;
pub mod paths;
pub mod pki;
pub mod probe;
pub mod recordings;
pub mod relay;
pub mod reload;
pub mod runtime;
pub mod status;
pub mod streams;
pub mod tls;
pub mod transport;
pub mod upgrade;

pub use agent::Agent;
pub use runtime::Shared;

use std::sync::Arc;

use config::AgentConfig;

/// Runs an agent until `shutdown` completes or a new process takes over,
/// reloading on SIGHUP and file changes. This is what `detour-agent run`
/// does; see [`start`] for `takeover`.
pub async fn run(
    config: AgentConfig,
    takeover: bool,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let files = config.files.clone();
    let agent = start(config, takeover).await?;
    let reloader = reload::spawn(agent.clone(), files);
    let how = tokio::select! {
        () = shutdown => agent::Stop::Terminate,
        () = until_taken_over(&agent) => agent::Stop::HandedOver,
    };
    tracing::info!(?how, "shutting down: draining");
    reloader.abort();
    let _ = reloader.await;
    agent.shutdown(how).await;
    Ok(())
}

/// Starts an agent. With `takeover`, its listening sockets (and its path
/// table) come from the agent running with the same `upgrade.dir`, which
/// drains and exits once this one serves; when none runs there, or without
/// `takeover`, they come from systemd when it passes them (socket
/// activation), else they are bound.
pub async fn start(config: AgentConfig, takeover: bool) -> anyhow::Result<Arc<Agent>> {
    let mut predecessor = None;
    let inherited = match (&config.upgrade.dir, takeover) {
        (None, true) => anyhow::bail!(
            "--takeover needs upgrade.dir in {}: where the running agent listens for its successor",
            config.files.agent.display()
        ),
        (Some(dir), true) => match upgrade::handover::take(dir).await? {
            Some(mut old) => {
                tracing::info!(pid = old.old_pid, version = %old.old_version, "taking over from the running agent");
                let inherited = upgrade::Inherited::from_fds(std::mem::take(&mut old.sockets))?;
                predecessor = Some(old);
                inherited
            }
            None => {
                tracing::info!("no running agent to take over from: starting on its own");
                upgrade::Inherited::from_systemd()?
            }
        },
        (_, false) => upgrade::Inherited::from_systemd()?,
    };
    let agent = Arc::new(Agent::start_with(config, inherited).await?);
    if let Some(old) = predecessor
        && let Err(e) = old.ready().await
    {
        // It went away meanwhile; the sockets are this process's either way.
        tracing::warn!(error = %e, "the previous agent did not hear that this one serves");
    }
    Ok(agent)
}

/// Offers the agent's listeners on `upgrade.dir/handover.sock` and returns
/// once a successor serves on them (the caller then drains with
/// [`agent::Stop::HandedOver`]). Never returns without `upgrade.dir`.
pub async fn until_taken_over(agent: &Agent) {
    let rt = agent.shared.forwarder.runtime();
    let Some(dir) = rt.config.upgrade.dir.clone() else {
        return std::future::pending().await;
    };
    drop(rt);
    match upgrade::handover::listen(&dir) {
        Ok(listener) => upgrade::handover::serve(listener, agent).await,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "no handover socket: a successor cannot take over from this process");
            std::future::pending().await
        }
    }
}

//! Detour agent: keeps a telephony server talking to its control plane over
//! the best working path.
//!
//! A request meets the modules in this order: [`ingress`] (call handler ->
//! agent, with its listener) -> [`forward`] (attempts, retries, hedging) ->
//! [`paths`] (`direct`, `via:<peer>`) -> [`transport`] (the kernel's view of
//! each connection), with [`health`] beside them publishing a ranked snapshot
//! from what [`probe`] and the requests observe. [`relay`] serves the peers.
//! [`runtime`] owns the running state and its replacement on reload,
//! [`reload`] watches the files, [`agent`] binds the listeners and starts the
//! loops; [`config`], [`tls`], [`pki`], [`admin`], [`metrics`] and [`status`]
//! support them. `main.rs` only parses the command line and calls into this
//! library, so tests and the lab drive the same code.

pub mod admin;
pub mod agent;
pub mod config;
pub mod forward;
pub mod health;
pub mod ingress;
pub mod metrics;
pub mod paths;
pub mod pki;
pub mod probe;
pub mod relay;
pub mod reload;
pub mod runtime;
pub mod status;
pub mod tls;
pub mod transport;

pub use agent::Agent;
pub use runtime::Shared;

use std::sync::Arc;

use config::AgentConfig;

/// Runs an agent until `shutdown` completes, reloading on SIGHUP and file
/// changes. This is what `detour-agent run` does.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let files = config.files.clone();
    let agent = Arc::new(Agent::start(config).await?);
    let reloader = reload::spawn(agent.clone(), files);
    shutdown.await;
    tracing::info!("shutting down: draining in-flight requests");
    reloader.abort();
    let _ = reloader.await;
    agent.shutdown().await;
    Ok(())
}

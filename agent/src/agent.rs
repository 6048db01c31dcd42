//! A running agent: binds its listeners, starts every loop over one
//! [`Shared`] state, and drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::AgentConfig;
use crate::runtime::{Applied, ApplyError, Shared};
use crate::{admin, ingress, probe, relay};

/// A running agent. Dropping it does not stop it; call [`Agent::shutdown`].
pub struct Agent {
    pub local_addr: SocketAddr,
    pub relay_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: tokio::sync::Mutex<JoinSet<()>>,
    drain_timeout: Duration,
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {key} {addr}"))
}

impl Agent {
    /// Binds the listeners and starts every task. Port 0 in a listen address
    /// picks a free port; the bound addresses are in the returned value.
    pub async fn start(config: AgentConfig) -> anyhow::Result<Agent> {
        let config = Arc::new(config);
        let shared = Arc::new(Shared::new(config.clone())?);
        let local = bind(config.listen.local, "listen.local").await?;
        let admin = bind(config.listen.admin, "listen.admin").await?;
        let relay_listener = match (config.listen.relay, &shared.relay) {
            (Some(addr), Some(_)) => Some(bind(addr, "listen.relay").await?),
            _ => None,
        };
        let local_addr = local.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let relay_addr = relay_listener.as_ref().map(|l| l.local_addr()).transpose()?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(ingress::listener::serve(
            local,
            shared.clone(),
            shutdown_rx.clone(),
            config.ingress.clone(),
        ));
        tasks.spawn(admin::serve(admin, shared.clone(), shutdown_rx.clone()));
        if let (Some(l), Some(r)) = (relay_listener, shared.relay.clone()) {
            tasks.spawn(relay::serve(l, r, shutdown_rx.clone()));
        }
        tasks.spawn(probe::probe_loop(shared.clone(), shutdown_rx.clone()));
        tasks.spawn(probe::refresh_loop(shared.clone(), shutdown_rx.clone()));
        tasks.spawn(admin::report_loop(shared.clone(), shutdown_rx.clone()));
        tracing::info!(pop = %config.pop, local = %local_addr, admin = %admin_addr, relay = ?relay_addr, paths = shared.forwarder.runtime().paths.len(), "agent started");
        Ok(Agent {
            local_addr,
            relay_addr,
            admin_addr,
            shared,
            shutdown,
            tasks: tokio::sync::Mutex::new(tasks),
            drain_timeout: config.ingress.drain_timeout,
        })
    }

    /// Applies a new, already validated config; see [`Shared::apply`].
    /// Listener addresses and the PoP name cannot change live: such a change
    /// is refused with a reason and nothing of the new config is applied.
    pub fn apply(&self, new: AgentConfig) -> Result<Applied, ApplyError> {
        self.shared.apply(new)
    }

    /// A receiver that turns `true` when shutdown starts.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain
    /// timeout), then stops every task.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        let drain = self.drain_timeout + Duration::from_secs(1);
        let mut tasks = self.tasks.lock().await;
        if tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tasks.abort_all();
        }
    }
}

//! A running agent: takes or binds its listeners, starts every loop over one
//! [`Shared`] state, and drains on shutdown.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::AgentConfig;
use crate::runtime::{Applied, ApplyError, Shared};
use crate::upgrade::{Inherited, snapshot};
use crate::{admin, ingress, probe, relay};

/// How an agent stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: no other process serves this host's call handler until this
    /// one has exited (a systemd restart waits for it), so the local listener
    /// goes on accepting while kept-alive connections drain.
    Terminate,
    /// A new process took the listeners over and serves them: stop
    /// accepting at once and drain what is open.
    HandedOver,
}

/// A running agent. Dropping it does not stop it; call [`Agent::shutdown`].
pub struct Agent {
    pub local_addr: SocketAddr,
    pub relay_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    /// Copies of the listening sockets by name, for a successor; given up
    /// when shutdown begins, so a stopped agent leaves nothing listening.
    sockets: std::sync::Mutex<Vec<(&'static str, OwnedFd)>>,
    /// The local listener's drain starts when this says how to stop.
    stop: watch::Sender<Option<Stop>>,
    local: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// The other listeners stop accepting, the loops stop.
    shutdown: watch::Sender<bool>,
    /// Relayed tunnels close (after the local drain).
    close: watch::Sender<bool>,
    tasks: tokio::sync::Mutex<JoinSet<()>>,
    drain_timeout: Duration,
}

/// The listener for `key`: the inherited socket for it, or a new one bound
/// to `addr`.
async fn listener(
    inherited: &mut Inherited,
    name: &'static str,
    addr: SocketAddr,
) -> anyhow::Result<TcpListener> {
    let key = format!("listen.{name}");
    if let Some(l) = inherited.take(name, addr) {
        l.set_nonblocking(true)
            .with_context(|| format!("{key}: inherited socket"))?;
        let l = TcpListener::from_std(l).with_context(|| format!("{key}: inherited socket"))?;
        tracing::info!(listener = name, addr = %l.local_addr()?, from = inherited.from, "listening on an inherited socket");
        return Ok(l);
    }
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {key} {addr}"))
}

impl Agent {
    /// Binds the listeners and starts every task. Port 0 in a listen address
    /// picks a free port; the bound addresses are in the returned value.
    pub async fn start(config: AgentConfig) -> anyhow::Result<Agent> {
        Self::start_with(config, Inherited::default()).await
    }

    /// Starts on the listening sockets in `inherited` where it has one for a
    /// listener (binding the others), from the health snapshot in
    /// `upgrade.dir` when there is a fresh one.
    pub async fn start_with(config: AgentConfig, mut inherited: Inherited) -> anyhow::Result<Agent> {
        let config = Arc::new(config);
        let shared = Arc::new(Shared::new(config.clone())?);
        let local = listener(&mut inherited, "local", config.listen.local).await?;
        let admin = listener(&mut inherited, "admin", config.listen.admin).await?;
        let relay_listener = match (config.listen.relay, &shared.relay) {
            (Some(addr), Some(_)) => Some(listener(&mut inherited, "relay", addr).await?),
            _ => None,
        };
        if !inherited.is_empty() {
            anyhow::bail!(
                "{} passed listening sockets on {} that [listen] in {} does not name",
                inherited.from,
                inherited.leftover().join(", "),
                config.files.agent.display()
            );
        }
        // Once the sockets are this process's: one that cannot start never
        // claims its predecessor's view.
        if let Some(dir) = &config.upgrade.dir {
            let health = shared.forwarder.runtime().health.clone();
            match snapshot::restore(dir, &config.pop, config.upgrade.snapshot_max_age, &health) {
                snapshot::Restored::Used { paths, age } => {
                    tracing::info!(
                        paths,
                        age_ms = age.as_millis() as u64,
                        "path health taken from the previous process"
                    );
                }
                snapshot::Restored::Ignored(why) => {
                    tracing::info!(why = %why, "no health snapshot used: probing every path afresh");
                }
            }
        }
        // Bound last: a process that fails before this point leaves its
        // predecessor's socket in place.
        let control = config
            .listen
            .control
            .as_deref()
            .map(crate::control::bind)
            .transpose()?;
        let local_addr = local.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let relay_addr = relay_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let mut sockets = vec![
            ("local", local.as_fd().try_clone_to_owned()?),
            ("admin", admin.as_fd().try_clone_to_owned()?),
        ];
        if let Some(r) = &relay_listener {
            sockets.push(("relay", r.as_fd().try_clone_to_owned()?));
        }

        if !config.forward.deferrable.is_empty() {
            let journal = &config.forward.deferred_journal;
            match crate::deferred::Deferred::open(
                journal,
                config.forward.deferred_max_bytes,
                shared.metrics.clone(),
            ) {
                Ok((d, loaded)) => {
                    if loaded.damaged > 0 {
                        tracing::warn!(journal = %journal.display(), damaged = loaded.damaged, "deferred: damaged journal lines skipped (a torn last line is a request never answered 202)");
                        shared
                            .metrics
                            .deferred_dropped
                            .with_label_values(&["damaged"])
                            .inc_by(loaded.damaged as u64);
                    }
                    tracing::info!(journal = %journal.display(), pending = loaded.pending, "deferred: journal open");
                    shared.deferred.store(Some(Arc::new(d)));
                }
                Err(e) => {
                    tracing::error!(journal = %journal.display(), error = %e, "deferred: cannot open the journal; deferrable requests fail with 503 as any other");
                }
            }
        }
        let (stop, stop_rx) = watch::channel(None);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (close, close_rx) = watch::channel(false);
        let local_task = tokio::spawn(ingress::listener::serve(
            local,
            shared.clone(),
            stop_rx,
            config.ingress.clone(),
        ));
        let mut tasks = JoinSet::new();
        tasks.spawn(admin::serve(admin, shared.clone(), shutdown_rx.clone()));
        if let Some(control) = control {
            tasks.spawn(crate::control::serve(
                control,
                shared.clone(),
                shutdown_rx.clone(),
            ));
        }
        if let (Some(l), Some(r)) = (relay_listener, shared.relay.clone()) {
            tasks.spawn(relay::serve(l, r, shutdown_rx.clone(), close_rx));
        }
        tasks.spawn(probe::probe_loop(shared.clone(), shutdown_rx.clone()));
        tasks.spawn(probe::refresh_loop(shared.clone(), shutdown_rx.clone()));
        tasks.spawn(admin::report_loop(shared.clone(), shutdown_rx.clone()));
        tasks.spawn(crate::allocator::trim_loop(shutdown_rx.clone()));
        if let Some(d) = shared.deferred.load_full() {
            tasks.spawn(crate::deferred::send_loop(shared.clone(), d, shutdown_rx.clone()));
        }
        tasks.spawn(crate::recordings::run_apart(
            shared.clone(),
            local_addr,
            shutdown_rx.clone(),
        ));
        tracing::info!(pop = %config.pop, version = env!("CARGO_PKG_VERSION"), local = %local_addr, admin = %admin_addr, relay = ?relay_addr, paths = shared.forwarder.runtime().paths.len(), "agent started");
        Ok(Agent {
            local_addr,
            relay_addr,
            admin_addr,
            shared,
            sockets: std::sync::Mutex::new(sockets),
            stop,
            local: tokio::sync::Mutex::new(Some(local_task)),
            shutdown,
            close,
            tasks: tokio::sync::Mutex::new(tasks),
            drain_timeout: config.ingress.drain_timeout + config.ingress.drain_idle,
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

    /// Copies of the listening sockets (`local`, `admin`, `relay`), for the
    /// process that takes over.
    pub fn sockets(&self) -> std::io::Result<Vec<(&'static str, OwnedFd)>> {
        let sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        if sockets.is_empty() {
            return Err(std::io::Error::other("this agent is stopping"));
        }
        sockets
            .iter()
            .map(|(name, fd)| Ok((*name, fd.try_clone()?)))
            .collect()
    }

    /// Writes the path table to `upgrade.dir` for the next process.
    pub fn save_snapshot(&self) {
        let rt = self.shared.forwarder.runtime();
        let Some(dir) = &rt.config.upgrade.dir else { return };
        match snapshot::save(dir, &rt.config.pop, &rt.health) {
            Ok(()) => tracing::info!(dir = %dir.display(), "path health written for the next process"),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot write the health snapshot; the next process will probe afresh")
            }
        }
    }

    /// Drains and stops: the health snapshot is written, the local listener
    /// drains as [`Stop`] says (ingress::listener::serve), the other
    /// listeners stop accepting, and relayed tunnels close once the local
    /// drain is done; then every task ends.
    pub async fn shutdown(&self, how: Stop) {
        if how == Stop::Terminate {
            // On a handover it was written before the sockets were given.
            self.save_snapshot();
        }
        self.sockets.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        let _ = self.stop.send(Some(how));
        let _ = self.shutdown.send(true);
        if let Some(local) = self.local.lock().await.take() {
            let limit = self.drain_timeout + Duration::from_secs(1);
            if tokio::time::timeout(limit, local).await.is_err() {
                tracing::warn!("local listener did not drain in time");
            }
        }
        // Peers were told the relay is draining (over framed tunnels); they
        // close each tunnel once their requests on it are answered. Whatever
        // is open at the end of the drain time, and every tunnel of a peer
        // too old to be told, is closed now.
        if let Some(relay) = &self.shared.relay {
            let counts = relay.load().counts.clone();
            let drained = async {
                while counts.framed() > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                tracing::warn!(
                    tunnels = counts.framed(),
                    "relayed tunnels still open at the end of the drain: closing them"
                );
            }
        }
        let _ = self.close.send(true);
        let mut tasks = self.tasks.lock().await;
        if tokio::time::timeout(Duration::from_secs(1), async {
            while tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tasks.abort_all();
        }
    }
}

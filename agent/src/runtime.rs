//! The agent's running state and its replacement on reload.
//!
//! [`Shared`] is what every listener and loop of one agent holds. A new
//! config is applied in one place, [`Shared::apply`]: it is compared with the
//! running one ([`restart_needed`], [`same_config`]), a new [`Runtime`] is
//! built beside the running one keeping what has not changed ([`build`]:
//! warm connection pools of unchanged paths, the evidence about every path
//! that stays), and only then is everything swapped in. A failure at any step
//! leaves the running config whole.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::config::{AgentConfig, ConfigErrors};
use crate::forward::{Forwarder, Runtime};
use crate::health::{HealthTable, PathInfo};
use crate::metrics::Metrics;
use crate::paths::{self, Route};
use crate::relay;
use crate::tls::ClientTlsError;

/// State shared by the listeners and background tasks of one agent.
pub struct Shared {
    pub forwarder: Arc<Forwarder>,
    pub metrics: Arc<Metrics>,
    pub relay: Option<Arc<ArcSwap<relay::Relay>>>,
    /// The last reload error, shown in `/status` until a reload succeeds.
    pub config_error: ArcSwapOption<String>,
    /// The recordings backlog (`None` without `[recordings]`).
    pub recordings: ArcSwapOption<crate::recordings::Backlog>,
    /// The deferred-delivery journal (`None` without deferrable requests,
    /// or when it could not be opened).
    pub deferred: ArcSwapOption<crate::deferred::Deferred>,
    /// Peers drained at runtime (`detour-agent peer drain`), by name. Held
    /// while a runtime is built and swapped, so a drain and a reload never
    /// race. Kept in `upgrade.dir` (when set) across restarts and upgrades.
    drained: Mutex<BTreeSet<String>>,
}

/// Why a runtime drain or undrain was refused.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("no peer named `{0}` in the running config")]
    UnknownPeer(String),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// The file in `upgrade.dir` that keeps the runtime drains.
const DRAINED_FILE: &str = "drained-peers";

fn drained_file(config: &AgentConfig) -> Option<PathBuf> {
    config.upgrade.dir.as_ref().map(|d| d.join(DRAINED_FILE))
}

/// The drains kept by an earlier process, if any.
fn load_drained(config: &AgentConfig) -> BTreeSet<String> {
    let Some(path) = drained_file(config) else {
        return BTreeSet::new();
    };
    let names: BTreeSet<String> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if !names.is_empty() {
        tracing::warn!(peers = ?names, file = %path.display(), "peers drained at runtime by an earlier process stay drained (detour-agent peer undrain NAME)");
    }
    names
}

/// Writes the drains next to the upgrade snapshot (a temporary file, then a
/// rename, so a crash leaves the old list or the new one).
fn save_drained(path: &Path, names: &BTreeSet<String>) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let text: String = names.iter().map(|n| format!("{n}\n")).collect();
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Why a config was not applied. The running config is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Settings that take effect only at start changed (listener addresses,
    /// the PoP name, `ingress.max_connections`).
    #[error("needs restart: {} changed; the running config is unchanged", .0.join(", "))]
    NeedsRestart(Vec<&'static str>),
    /// The files do not make a valid config.
    #[error("{0}")]
    Invalid(ConfigErrors),
    /// Valid, but the paths' TLS configuration could not be built from it.
    #[error("{0}")]
    Paths(#[from] ClientTlsError),
    /// Valid, but the relay's TLS configuration could not be built from it.
    #[error("relay TLS configuration: {0}")]
    Relay(rustls::Error),
}

/// What [`Shared::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The new config is running.
    Swapped,
    /// The new config is the running one; nothing was rebuilt.
    Unchanged,
}

impl Shared {
    /// The running state for a freshly loaded config (agent start).
    pub fn new(config: Arc<AgentConfig>) -> Result<Shared, ApplyError> {
        let metrics = Arc::new(Metrics::new(&config.pop));
        let mut drained = load_drained(&config);
        drained.retain(|n| config.peers.iter().any(|p| p.name == *n));
        let runtime = build(config.clone(), &metrics, None, &drained)?;
        metrics.set_config_gauges(&config);
        let forwarder = Arc::new(Forwarder::new(runtime, metrics.clone()));
        let relay = relay_state(&config, &metrics, None)?.map(|r| Arc::new(ArcSwap::from_pointee(r)));
        for w in config.warnings() {
            tracing::warn!("{w}");
        }
        Ok(Shared {
            forwarder,
            metrics,
            relay,
            config_error: ArcSwapOption::empty(),
            recordings: ArcSwapOption::empty(),
            deferred: ArcSwapOption::empty(),
            drained: Mutex::new(drained),
        })
    }

    /// The peers drained at runtime now.
    pub fn drained(&self) -> BTreeSet<String> {
        self.drained.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Drains (`drain`) or undrains a peer at runtime: its paths stay probed
    /// but take no new requests, exactly as `enabled = false` in the peers
    /// file, until undrained. Survives reloads; kept in `upgrade.dir` across
    /// restarts when that is set. Returns whether anything changed.
    pub fn set_drained(&self, peer: &str, drain: bool) -> Result<bool, DrainError> {
        let mut drained = self.drained.lock().unwrap_or_else(|e| e.into_inner());
        let rt = self.forwarder.runtime();
        if !rt.config.peers.iter().any(|p| p.name == peer) {
            return Err(DrainError::UnknownPeer(peer.to_owned()));
        }
        let mut next = drained.clone();
        let changed = if drain {
            next.insert(peer.to_owned())
        } else {
            next.remove(peer)
        };
        if !changed {
            return Ok(false);
        }
        let runtime = build(rt.config.clone(), &self.metrics, Some(&rt), &next)?;
        self.forwarder.replace(runtime);
        *drained = next;
        if let Some(path) = drained_file(&rt.config)
            && let Err(e) = save_drained(&path, &drained)
        {
            tracing::warn!(error = %e, file = %path.display(), "could not keep the runtime drains for the next process");
        }
        tracing::warn!(
            peer,
            drained = drain,
            "peer {} at runtime",
            if drain { "drained" } else { "undrained" }
        );
        Ok(true)
    }

    /// Applies a new, already validated config. A rotated certificate, key,
    /// CA or revocation list is applied: the relay presents and checks the
    /// new ones on new handshakes (and closes open tunnels of peers a new
    /// list revokes), and tunnels through peers are set up again with them.
    pub fn apply(&self, new: AgentConfig) -> Result<Applied, ApplyError> {
        let rt = self.forwarder.runtime();
        if same_config(&rt.config, &new) {
            return Ok(Applied::Unchanged);
        }
        let needs = restart_needed(&rt.config, &new);
        if !needs.is_empty() {
            return Err(ApplyError::NeedsRestart(needs));
        }
        let new = Arc::new(new);
        let mut drained = self.drained.lock().unwrap_or_else(|e| e.into_inner());
        // A drained peer removed from the file is forgotten.
        drained.retain(|n| new.peers.iter().any(|p| p.name == *n));
        // Everything is built before anything is swapped.
        let runtime = build(new.clone(), &self.metrics, Some(&rt), &drained)?;
        let relay_next = match &self.relay {
            Some(relay) => relay_state(&new, &self.metrics, Some(&relay.load()))?,
            None => None,
        };
        if let (Some(relay), Some(r)) = (&self.relay, relay_next) {
            let trust_changed = match (&rt.config.tls, &new.tls) {
                (Some(a), Some(b)) => !a.same_trust(b),
                _ => true,
            };
            let r = Arc::new(r);
            relay.store(r.clone());
            if trust_changed {
                // Open tunnels were admitted under the old lists: each checks
                // its peer's certificate again and closes if it is revoked.
                r.trust.send_replace(r.verifier.clone());
            }
        }
        let gone: Vec<(Arc<str>, Arc<str>)> = rt
            .paths
            .iter()
            .filter(|o| {
                !runtime
                    .paths
                    .iter()
                    .any(|p| p.name == o.name && p.endpoint == o.endpoint)
            })
            .map(|o| (o.name.clone(), o.endpoint.clone()))
            .collect();
        self.forwarder.replace(runtime);
        self.metrics.set_config_gauges(&new);
        for w in new.warnings() {
            tracing::warn!("{w}");
        }
        for (name, endpoint) in &gone {
            HealthTable::forget(&self.metrics, name, endpoint);
        }
        Ok(Applied::Swapped)
    }
}

/// Builds the runtime (paths and health table) for a config, reusing the
/// connection pools of paths that are unchanged in `old` and the evidence
/// of every path that keeps its name.
pub fn build(
    config: Arc<AgentConfig>,
    metrics: &Arc<Metrics>,
    old: Option<&Runtime>,
    drained: &BTreeSet<String>,
) -> Result<Runtime, ApplyError> {
    let mut paths = paths::build_paths(&config)?;
    if let Some(old) = old {
        let same_mesh = same_mesh(&old.config, &config);
        if same_cp_trust(&old.config, &config) {
            for p in paths.iter_mut() {
                let via = matches!(p.route, Route::Via { .. });
                if via && !same_mesh {
                    continue;
                }
                if let Some(o) = old.paths.iter().find(|o| {
                    o.name == p.name
                        && same_route(&o.route, &p.route)
                        && o.target == p.target
                        && o.base_path == p.base_path
                        && o.priority == p.priority
                }) {
                    // Same path, same endpoint: keep its warm connections.
                    *p = o.clone();
                }
            }
        }
    }
    for p in &paths {
        p.count_renewals(metrics.path_pool_renewals.with_label_values(&[&*p.name]));
    }
    let infos = paths
        .iter()
        .map(|p| {
            let peer = match &p.route {
                Route::Direct => None,
                Route::Via { peer, .. } => config.peers.iter().find(|x| x.pop == *peer),
            };
            PathInfo {
                name: p.name.clone(),
                endpoint: p.endpoint.clone(),
                priority: p.priority,
                direct: peer.is_none(),
                weight: peer.map_or(100, |x| x.weight),
                enabled: peer.is_none_or(|x| x.enabled && !drained.contains(&x.name)),
                drained: peer.is_some_and(|x| drained.contains(&x.name)),
            }
        })
        .collect();
    let health = Arc::new(HealthTable::new(config.health.clone(), infos, metrics.clone()));
    if let Some(old) = old {
        health.inherit(&old.health);
    }
    Ok(Runtime {
        config,
        paths,
        health,
    })
}

/// The relay's state for `config`; what lives across reloads (the tunnel
/// counts, the channel open tunnels watch for new trust) is taken from
/// `old`, the running relay.
fn relay_state(
    config: &Arc<AgentConfig>,
    metrics: &Arc<Metrics>,
    old: Option<&relay::Relay>,
) -> Result<Option<relay::Relay>, ApplyError> {
    let (Some(_), Some(tls)) = (config.listen.relay, &config.tls) else {
        return Ok(None);
    };
    let (server, verifier) = tls.relay_server_config().map_err(ApplyError::Relay)?;
    let (counts, trust) = match old {
        Some(o) => (o.counts.clone(), o.trust.clone()),
        None => (
            Arc::new(relay::TunnelCounts::default()),
            Arc::new(tokio::sync::watch::Sender::new(verifier.clone())),
        ),
    };
    Ok(Some(relay::Relay {
        config: config.clone(),
        acceptor: tokio_rustls::TlsAcceptor::from(server),
        verifier,
        trust,
        metrics: metrics.clone(),
        counts,
    }))
}

// ---- What changed on reload, and what can be kept -------------------------

/// The settings that differ between `old` and `new` and take effect only
/// when the agent starts; empty when `new` can be applied live.
pub fn restart_needed(old: &AgentConfig, new: &AgentConfig) -> Vec<&'static str> {
    let mut needs = Vec::new();
    if old.listen != new.listen {
        needs.push("listen addresses");
    }
    if old.pop != new.pop {
        needs.push("pop");
    }
    if old.ingress.max_connections != new.ingress.max_connections {
        needs.push("ingress.max_connections");
    }
    if old.upgrade.dir != new.upgrade.dir {
        needs.push("upgrade.dir");
    }
    if old.forward.deferred_journal != new.forward.deferred_journal
        || old.forward.deferred_max_bytes != new.forward.deferred_max_bytes
        || (old.forward.deferrable.is_empty() && !new.forward.deferrable.is_empty())
    {
        needs.push("forward.deferred_journal (the journal is opened at start)");
    }
    needs
}

/// Whether two configs would run the same: a reload that finds this is a no-op.
pub fn same_config(a: &AgentConfig, b: &AgentConfig) -> bool {
    a.peers == b.peers
        && a.forward == b.forward
        && a.health == b.health
        && a.ingress == b.ingress
        && a.relay == b.relay
        && a.listen == b.listen
        && a.pop == b.pop
        && a.upgrade == b.upgrade
        && same_cp_connections(a, b)
        && a.control_plane.token == b.control_plane.token
        && a.control_plane.report_interval == b.control_plane.report_interval
        && same_mesh(a, b)
        && match (&a.recordings, &b.recordings) {
            (None, None) => true,
            (Some(x), Some(y)) => x.same_as(y),
            _ => false,
        }
}

/// Whether connections made for `a` to the control plane are good for `b`:
/// same endpoints (URL, addresses, priority) and trust. The token is sent
/// per request, so it does not matter here.
fn same_cp_connections(a: &AgentConfig, b: &AgentConfig) -> bool {
    let (x, y) = (&a.control_plane, &b.control_plane);
    same_cp_trust(a, b)
        && x.endpoints.len() == y.endpoints.len()
        && x.endpoints
            .iter()
            .zip(&y.endpoints)
            .all(|(e, f)| e.same_connections(f) && e.name == f.name && e.priority == f.priority)
}

/// Whether `a` and `b` trust the same control-plane certificates.
fn same_cp_trust(a: &AgentConfig, b: &AgentConfig) -> bool {
    let (a, b) = (&a.control_plane, &b.control_plane);
    a.ca == b.ca && a.ca_certs == b.ca_certs
}

/// Whether two configs carry the same peer-mesh identity and fleet CA (file
/// contents, so a rotated certificate or CA bundle is noticed). Tunnels
/// through peers were set up with them: a rotated one needs new tunnels.
pub fn same_mesh(a: &AgentConfig, b: &AgentConfig) -> bool {
    match (&a.tls, &b.tls) {
        (None, None) => true,
        (Some(x), Some(y)) => x.same_as(y),
        _ => false,
    }
}

fn same_route(a: &Route, b: &Route) -> bool {
    match (a, b) {
        (Route::Direct, Route::Direct) => true,
        (Route::Via { peer: p1, relay: r1 }, Route::Via { peer: p2, relay: r2 }) => p1 == p2 && r1 == r2,
        _ => false,
    }
}

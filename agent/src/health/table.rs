//! The health of every path of one agent: evidence in under a short per-path
//! lock, the ranked [`Snapshot`] out through `ArcSwap`, the per-path metrics
//! published (and removed with their path), and the active path's switches.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use detour_wire::{AgentReport, PathReport, PathState, SwitchReport};
use tokio::time::Instant;

use super::{FailureKind, Outcome, PathInfo, PathMemory, PathStats};
use crate::config::Health as HealthConfig;
use crate::metrics::Metrics;
use crate::transport::Delta;

/// One path as the request path sees it.
#[derive(Debug, Clone)]
pub struct PathView {
    pub index: usize,
    pub name: Arc<str>,
    /// The control-plane endpoint and its priority (lower is preferred).
    pub endpoint: Arc<str>,
    pub priority: u32,
    pub direct: bool,
    pub state: PathState,
    pub enabled: bool,
    pub drained: bool,
    pub rtt: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    /// Median and p95 of recent request latencies on this path, seconds
    /// (the hedge delay is made of the median).
    pub request_p50: Option<f64>,
    pub request_p95: Option<f64>,
    pub loss: f64,
    /// Share of recent data segments sent again, from the kernel.
    pub retransmit: Option<f64>,
    pub score: f64,
    pub consecutive_failures: u32,
    pub reason: Option<String>,
    /// Worth probing more often ([`PathStats::suspect`]).
    pub suspect: bool,
}

/// The ranked view of every path, published on every change.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every path, in table order (index = position in the path table).
    pub paths: Vec<PathView>,
    /// Indices of enabled paths, best first.
    pub ranked: Vec<usize>,
}

impl Snapshot {
    /// The path new requests go to first.
    pub fn active(&self) -> Option<&PathView> {
        self.ranked.first().map(|&i| &self.paths[i])
    }

    pub fn by_name(&self, name: &str) -> Option<&PathView> {
        self.paths.iter().find(|p| &*p.name == name)
    }

    /// Whether path `index` is watched closely (probed every
    /// `health.interval`, its TCP counters read every refresh): a `direct`
    /// path, one of the first `watched` of the ranking (the active path and
    /// the stand-ins a failover takes), or one this snapshot does not know
    /// yet (a reload just added it).
    pub fn watched(&self, index: usize, watched: usize) -> bool {
        self.paths
            .get(index)
            .filter(|p| p.index == index)
            .is_none_or(|p| p.direct)
            || self.ranked.iter().take(watched).any(|&r| r == index)
    }

    /// Whether path `index` is under suspicion ([`PathView::suspect`]).
    pub fn suspect(&self, index: usize) -> bool {
        self.paths
            .get(index)
            .is_some_and(|p| p.index == index && p.suspect)
    }
}

/// The current path keeps traffic unless the best is this much better...
const STICKY_RATIO: f64 = 1.5;
/// ...plus this many score points (about milliseconds of RTT).
const STICKY_MARGIN: f64 = 2.0;

/// Selection class: lower is better.
fn class(p: &PathView) -> u8 {
    match p.state {
        PathState::Up if p.direct => 0,
        PathState::Up => 1,
        PathState::Degraded => 2,
        PathState::Down => 3,
    }
}

/// Ranks paths. First the control-plane endpoint: live (not down) paths to
/// the most preferred endpoint that any path still reaches come first, then
/// live paths to the others by priority, then down paths. Within that: `direct` when it is up, then up paths by
/// score, then degraded by score, then down by score (fail static: a bad
/// path beats no path). Disabled paths are left out.
pub fn rank(paths: &[PathView]) -> Vec<usize> {
    let reached = paths
        .iter()
        .filter(|p| p.enabled && p.state != PathState::Down)
        .map(|p| p.priority)
        .min();
    // Live paths to the preferred reachable endpoint, then live paths to
    // the others, then down paths; each by priority.
    let group = |p: &PathView| {
        let tier = match p.state {
            PathState::Down => 2,
            _ if Some(p.priority) == reached => 0,
            _ => 1,
        };
        (tier, p.priority)
    };
    let mut order: Vec<usize> = paths.iter().filter(|p| p.enabled).map(|p| p.index).collect();
    order.sort_by(|&a, &b| {
        let (pa, pb) = (&paths[a], &paths[b]);
        group(pa)
            .cmp(&group(pb))
            .then(class(pa).cmp(&class(pb)))
            .then(pa.score.total_cmp(&pb.score))
            .then(a.cmp(&b))
    });
    order
}

/// One path's metric series, looked up once per table rather than on every
/// publish (the snapshot is rebuilt up to ten times a second for every path).
struct PathSeries {
    state: prometheus::IntGauge,
    enabled: prometheus::IntGauge,
    rtt: prometheus::Gauge,
    loss: prometheus::Gauge,
    retransmit: prometheus::Gauge,
    segments_sent: prometheus::IntCounter,
    segments_again: prometheus::IntCounter,
}

impl PathSeries {
    fn new(m: &Metrics, info: &PathInfo) -> PathSeries {
        let labels = [&*info.name, &*info.endpoint];
        let segments = |kind| {
            m.path_segments
                .with_label_values(&[&*info.name, &*info.endpoint, kind])
        };
        PathSeries {
            state: m.path_state.with_label_values(&labels),
            enabled: m.path_enabled.with_label_values(&labels),
            rtt: m.path_rtt.with_label_values(&labels),
            loss: m.path_loss.with_label_values(&labels),
            retransmit: m.path_retransmit.with_label_values(&labels),
            segments_sent: segments("sent"),
            segments_again: segments("again"),
        }
    }
}

/// The health of every path of one agent.
pub struct HealthTable {
    cfg: HealthConfig,
    epoch: Instant,
    paths: Vec<Mutex<PathStats>>,
    /// Each path's metric series, in table order.
    series: Vec<PathSeries>,
    snapshot: ArcSwap<Snapshot>,
    metrics: Arc<Metrics>,
    active: Mutex<Option<Arc<str>>>,
    dirty: AtomicBool,
    /// The last switches of the active path, oldest first, for the fleet
    /// report (at most [`AgentReport::MAX_SWITCHES`]).
    switches: Mutex<VecDeque<SwitchReport>>,
}

impl HealthTable {
    pub fn new(cfg: HealthConfig, infos: Vec<PathInfo>, metrics: Arc<Metrics>) -> HealthTable {
        let table = HealthTable {
            cfg,
            epoch: Instant::now(),
            series: infos.iter().map(|i| PathSeries::new(&metrics, i)).collect(),
            paths: infos.into_iter().map(|i| Mutex::new(PathStats::new(i))).collect(),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            metrics,
            active: Mutex::new(None),
            dirty: AtomicBool::new(false),
            switches: Mutex::new(VecDeque::new()),
        };
        table.publish();
        table
    }

    /// Carries the evidence of an older table over to paths of the same name
    /// (used when the peer list is reloaded).
    pub fn inherit(&self, old: &HealthTable) {
        for p in &self.paths {
            let mut new = lock(p);
            for o in &old.paths {
                let mut o = lock(o);
                if o.info.name == new.info.name {
                    let info = new.info.clone();
                    std::mem::swap(&mut *new, &mut *o);
                    new.info = info;
                    break;
                }
            }
        }
        *lock(&self.active) = lock(&old.active).clone();
        *lock(&self.switches) = lock(&old.switches).clone();
        self.publish();
    }

    /// The last switches of the active path, oldest first.
    pub fn switches(&self) -> Vec<SwitchReport> {
        lock(&self.switches).iter().cloned().collect()
    }

    /// Every path's evidence and state, and the active path, as of now (the
    /// health snapshot a restart starts from).
    pub fn memory(&self) -> (Vec<PathMemory>, Option<String>) {
        let now = Instant::now();
        let paths = self.paths.iter().map(|p| lock(p).memory(now)).collect();
        (paths, lock(&self.active).as_deref().map(str::to_owned))
    }

    /// Takes over the evidence of paths of the same name from a snapshot
    /// written `elapsed` ago; returns how many paths it knew.
    pub fn remember(&self, paths: &[PathMemory], active: Option<&str>, elapsed: Duration) -> usize {
        let now = Instant::now();
        let mut known = 0;
        for p in &self.paths {
            let mut s = lock(p);
            if let Some(m) = paths.iter().find(|m| *m.name == *s.info.name) {
                s.remember(m, now, elapsed);
                known += 1;
            }
        }
        if let Some(active) = active
            && self.paths.iter().any(|p| &*lock(p).info.name == active)
        {
            *lock(&self.active) = Some(Arc::from(active));
        }
        self.publish();
        known
    }

    pub fn config(&self) -> &HealthConfig {
        &self.cfg
    }

    /// The current ranked view; lock-free.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Records one outcome on path `index`.
    pub fn record(&self, index: usize, outcome: Outcome) {
        if outcome == Outcome::Failed(FailureKind::Refused) {
            tracing::trace!(index, "refused by the control plane: no evidence about the path");
            return;
        }
        self.update(index, |s, now| {
            let changed = s.record(outcome, now, self.epoch, &self.cfg);
            tracing::trace!(path = %s.info.name, ?outcome, state = s.state().as_str(), "evidence");
            changed
        });
    }

    /// Records what the kernel saw on path `index`'s connections since the
    /// previous sample.
    pub fn record_transport(&self, index: usize, delta: Delta) {
        self.update(index, |s, now| {
            if delta.delivered > 0
                && let Some(series) = self.series.get(index)
            {
                series.segments_sent.inc_by(delta.sent);
                series.segments_again.inc_by(delta.repeats);
            }
            let changed = s.record_transport(delta, now, &self.cfg);
            tracing::trace!(path = %s.info.name, sent = delta.sent, again = delta.repeats, delivered = delta.delivered, state = s.state().as_str(), "transport");
            changed
        });
    }

    /// Applies `f` to path `index`'s stats under its lock; logs a state change.
    fn update(&self, index: usize, f: impl FnOnce(&mut PathStats, Instant) -> Option<PathState>) {
        let Some(p) = self.paths.get(index) else { return };
        let changed = {
            let mut s = lock(p);
            let changed = f(&mut s, Instant::now());
            if let Some(to) = changed {
                tracing::info!(path = %s.info.name, state = to.as_str(), reason = s.reason().unwrap_or("recovered"), "path state changed");
            }
            changed
        };
        // A state change is published at once; fresher RTT and loss figures
        // wait for the next refresh tick, keeping the hot path cheap.
        if changed.is_some() {
            self.publish();
        } else {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Republishes the snapshot if evidence arrived since the last one.
    /// The agent calls this every 100 ms.
    pub fn refresh(&self) {
        if self.dirty.swap(false, Ordering::Relaxed) {
            self.publish();
        }
    }

    /// A hint for timeouts on path `index`: its recent p99 RTT.
    pub fn p99(&self, index: usize) -> Option<Duration> {
        let s = self.snapshot.load();
        s.paths
            .get(index)
            .and_then(|p| p.p99)
            .map(Duration::from_secs_f64)
    }

    fn publish(&self) {
        let now = Instant::now();
        let mut views = Vec::with_capacity(self.paths.len());
        for (i, p) in self.paths.iter().enumerate() {
            let s = lock(p);
            let [p95, p99] = s.rtt_quantiles([0.95, 0.99]);
            let [request_p50, request_p95] = s.request_quantiles([0.5, 0.95]);
            views.push(PathView {
                index: i,
                name: s.info.name.clone(),
                endpoint: s.info.endpoint.clone(),
                priority: s.info.priority,
                direct: s.info.direct,
                state: s.state(),
                enabled: s.info.enabled,
                drained: s.info.drained,
                rtt: s.rtt(),
                p95,
                p99,
                request_p50,
                request_p95,
                loss: s.loss(now, self.epoch),
                retransmit: s.retransmit_ratio(now),
                score: s.score(now, self.epoch),
                consecutive_failures: s.consecutive_failures(),
                reason: s.reason().map(str::to_owned),
                suspect: s.suspect(),
            });
        }
        let mut ranked = rank(&views);
        // Stickiness: stay on the current path while it is as healthy as the
        // best and not clearly worse, so small RTT wobbles between peers do
        // not move traffic back and forth.
        if let Some(current) = lock(&self.active).clone()
            && let (Some(&best), Some(pos)) = (
                ranked.first(),
                ranked.iter().position(|&i| views[i].name == current),
            )
        {
            let (b, c) = (&views[best], &views[ranked[pos]]);
            let same_class = class(b) == class(c) && b.priority == c.priority;
            if pos > 0 && same_class && c.score <= b.score * STICKY_RATIO + STICKY_MARGIN {
                let i = ranked.remove(pos);
                ranked.insert(0, i);
            }
        }
        let snap = Snapshot { paths: views, ranked };
        for (v, series) in snap.paths.iter().zip(&self.series) {
            let state = match v.state {
                PathState::Up => 2,
                PathState::Degraded => 1,
                PathState::Down => 0,
            };
            series.state.set(state);
            series.enabled.set(i64::from(v.enabled));
            if let Some(rtt) = v.rtt {
                series.rtt.set(rtt);
            }
            series.loss.set(v.loss);
            if let Some(r) = v.retransmit {
                series.retransmit.set(r);
            }
        }
        let new_active = snap.active().map(|p| p.name.clone());
        {
            let mut active = lock(&self.active);
            if *active != new_active {
                let reason = switch_reason(&snap, active.as_deref());
                let from = active.as_deref().unwrap_or("none").to_owned();
                let to = new_active.as_deref().unwrap_or("none");
                if let Some(old) = active.as_deref() {
                    self.metrics.active_path.with_label_values(&[old]).set(0);
                    let old_state = snap.by_name(old).map_or("removed", |p| p.state.as_str());
                    tracing::warn!(from = %from, to, reason = %reason, old_state, "active path switched");
                    self.metrics.path_switches.inc();
                }
                // The first choice after start is no switch; coming back
                // from having no path at all is one.
                let mut switches = lock(&self.switches);
                if active.is_some() || switches.back().is_some_and(|s| s.to == "none") {
                    if switches.len() == AgentReport::MAX_SWITCHES {
                        switches.pop_front();
                    }
                    switches.push_back(SwitchReport {
                        at_ms: unix_ms(),
                        from: from.clone(),
                        to: to.to_owned(),
                        reason,
                    });
                }
                drop(switches);
                if let Some(new) = new_active.as_deref() {
                    self.metrics.active_path.with_label_values(&[new]).set(1);
                }
                let endpoint = snap.active().map(|p| p.endpoint.clone());
                for v in &snap.paths {
                    let on = Some(&v.endpoint) == endpoint.as_ref();
                    self.metrics
                        .active_endpoint
                        .with_label_values(&[&*v.endpoint])
                        .set(i64::from(on));
                }
                *active = new_active;
            }
        }
        self.snapshot.store(Arc::new(snap));
    }

    /// Removes every series this table publishes for a path that is gone
    /// (a removed peer), so none stays frozen at its last value: a removed
    /// path that was down would keep alerting. The publisher removes what it
    /// publishes; counters elsewhere keep their history.
    pub fn forget(metrics: &Metrics, path: &str, endpoint: &str) {
        let _ = metrics.path_state.remove_label_values(&[path, endpoint]);
        let _ = metrics.path_enabled.remove_label_values(&[path, endpoint]);
        let _ = metrics.path_rtt.remove_label_values(&[path, endpoint]);
        let _ = metrics.path_loss.remove_label_values(&[path, endpoint]);
        let _ = metrics.path_retransmit.remove_label_values(&[path, endpoint]);
        for kind in ["sent", "again"] {
            let _ = metrics.path_segments.remove_label_values(&[path, endpoint, kind]);
        }
        let _ = metrics.active_path.remove_label_values(&[path]);
        let _ = metrics.path_pool_renewals.remove_label_values(&[path]);
    }

    /// The `/status` view of every path.
    pub fn reports(&self) -> Vec<PathReport> {
        let snap = self.snapshot();
        let active = snap.active().map(|p| p.index);
        snap.paths
            .iter()
            .map(|p| PathReport {
                path: p.name.to_string(),
                endpoint: (!p.endpoint.is_empty()).then(|| p.endpoint.to_string()),
                state: p.state,
                rtt_seconds: p.rtt,
                rtt_p95_seconds: p.p95,
                loss_ratio: p.loss,
                score: p.score,
                active: Some(p.index) == active,
                consecutive_failures: p.consecutive_failures,
                reason: if p.enabled {
                    p.reason.clone()
                } else if p.drained {
                    Some("drained at runtime (detour-agent peer undrain to restore)".to_owned())
                } else {
                    Some("disabled (draining)".to_owned())
                },
            })
            .collect()
    }
}

/// Why the active path moves away from `from`, for people: what is wrong
/// with the path left, or, when nothing is, what is better about the one
/// taken (a recovered `direct` is preferred to a peer).
fn switch_reason(snap: &Snapshot, from: Option<&str>) -> String {
    let left = from.map(|f| (f, snap.by_name(f)));
    match (left, snap.active()) {
        (Some((f, None)), _) => format!("{f} removed"),
        (Some((_, Some(old))), _) if !old.enabled => format!("{} disabled (drained)", old.name),
        (Some((_, Some(old))), _) if old.state != PathState::Up => format!(
            "{} {}: {}",
            old.name,
            old.state.as_str(),
            old.reason.as_deref().unwrap_or("no reason recorded")
        ),
        (_, Some(new)) if new.direct && new.state == PathState::Up => {
            format!("{} up again, preferred", new.name)
        }
        (_, Some(new)) => format!("{} is {} and scores better", new.name, new.state.as_str()),
        (_, None) => "no enabled path".to_owned(),
    }
}

/// Milliseconds since the Unix epoch, by the system clock.
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Locks a mutex, recovering from a poisoned one: health stats stay usable
/// even if a thread panicked while holding the lock.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;

//! Path health: what probes and real requests saw on every path, the
//! `up`/`degraded`/`down` state machine with hysteresis and hold-down, scoring,
//! and the ranked snapshot the request path reads without locks.
//!
//! Evidence arrives as [`Outcome`]s, from the prober (one `GET /healthz` per
//! path per interval) and from every request attempt (passive health). Each
//! outcome updates that path's stats under a short per-path lock that is never
//! held across an `.await`; then a fresh [`Snapshot`] is published through
//! `ArcSwap`, which the forwarder loads for free on every request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use detour_wire::{PathReport, PathState};
use tokio::time::Instant;

use crate::config::Health as HealthConfig;
use crate::metrics::Metrics;
use crate::transport::Delta;

/// What one exchange on a path showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// A probe's answer arrived after this long (a network RTT sample).
    Ok(Duration),
    /// A request was answered after this long. Good evidence, but its time
    /// includes the control plane's work, so it feeds the hedge delay, not RTT.
    Answered(Duration),
    /// Slow enough to count as a lost exchange, though it completed
    /// (a stall like a retransmission).
    Slow(Duration),
    /// Timed out, reset, refused, or could not connect.
    Failed(FailureKind),
}

/// Why an exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// TCP or TLS connect failed, or the peer's relay refused the tunnel.
    Connect,
    /// No response headers within the timeout.
    Timeout,
    /// The connection broke during the exchange.
    Broken,
    /// The control plane itself refused the request or its connection
    /// (HTTP/2 RST_STREAM or GOAWAY): the path carried the bytes, so this is
    /// no evidence against it. One bad request cannot take a path down.
    Refused,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect failed",
            FailureKind::Timeout => "timed out",
            FailureKind::Broken => "connection broke",
            FailureKind::Refused => "refused by the control plane",
        }
    }
}

/// How a path is used, for scoring.
#[derive(Debug, Clone, PartialEq)]
pub struct PathInfo {
    /// `direct` or `via:<peer>`.
    pub name: Arc<str>,
    pub direct: bool,
    /// Preference among peers (1..=1000, default 100).
    pub weight: u32,
    /// `false` while a peer is drained: never chosen for new requests.
    pub enabled: bool,
}

/// Evidence and state of one path.
#[derive(Debug)]
pub struct PathStats {
    pub info: PathInfo,
    state: PathState,
    reason: Option<String>,
    /// Smoothed RTT (EWMA, alpha 0.2), seconds.
    ewma: Option<f64>,
    /// The most recent RTT samples, newest last.
    recent: VecDeque<f64>,
    /// The most recent request latencies (time to response headers), newest last.
    req_recent: VecDeque<f64>,
    /// Recent exchanges: when, and whether it was bad.
    exchanges: VecDeque<(Instant, bool)>,
    consecutive_failures: u32,
    consecutive_ok: u32,
    /// No rise before this instant.
    hold_until: Option<Instant>,
    /// Flaps in a row; each one doubles the hold-down.
    flaps: u32,
    /// When the path last became `up`.
    up_since: Option<Instant>,
    /// Since the path left `up`: whether any exchange succeeded.
    ok_since_out: bool,
    /// Since the path left `up`: whether failures and successes alternated (loss).
    mixed: bool,
    /// The path has never been `up` and never failed.
    never_up: bool,
    /// When the last lost, stalled or failed exchange happened, or the
    /// kernel last showed the path losing packets.
    last_bad: Option<Instant>,
    /// What the kernel's TCP stack saw on the path's connections recently
    /// (see [`PathStats::record_transport`]).
    transport: VecDeque<(Instant, Delta)>,
    /// Since the path left `up`: when it first answered again.
    answering_since: Option<Instant>,
}

const RECENT: usize = 64;
/// Evidence older than this is forgotten, however few exchanges there were.
const MAX_AGE: Duration = Duration::from_secs(30);
/// A lossy path rises only after this long without a bad exchange.
pub const CLEAN_RUN: Duration = Duration::from_secs(30);
/// A path that stayed up this long forgets its past flaps.
const FLAP_FORGET: Duration = Duration::from_secs(60);
/// Fewest bad exchanges in the short window that make a path degraded (and
/// fewest segments sent again among the last [`TRANSPORT_SEGMENTS`]).
const MIN_BAD_FOR_DEGRADED: u32 = 3;
/// How long the kernel's retransmission counts are remembered.
const TRANSPORT_WINDOW: Duration = Duration::from_secs(10);
/// How many of the most recent data segments the retransmission share is
/// taken over.
const TRANSPORT_SEGMENTS: u64 = 200;
/// Retransmissions in this long after a down path first answers again are
/// the outage's (the data sent into it going out again), not loss.
const TRANSPORT_SETTLE: Duration = Duration::from_millis(500);

impl PathStats {
    pub fn new(info: PathInfo) -> PathStats {
        PathStats {
            info,
            state: PathState::Down,
            reason: Some("no evidence yet".to_owned()),
            ewma: None,
            recent: VecDeque::with_capacity(RECENT),
            req_recent: VecDeque::with_capacity(RECENT),
            exchanges: VecDeque::with_capacity(64),
            consecutive_failures: 0,
            consecutive_ok: 0,
            hold_until: None,
            flaps: 0,
            up_since: None,
            ok_since_out: false,
            mixed: false,
            never_up: true,
            last_bad: None,
            transport: VecDeque::new(),
            answering_since: None,
        }
    }

    pub fn state(&self) -> PathState {
        self.state
    }

    /// Smoothed RTT in seconds.
    pub fn rtt(&self) -> Option<f64> {
        self.ewma
    }

    /// The `q` quantile (0..1) of recent RTT samples, in seconds.
    pub fn rtt_quantile(&self, q: f64) -> Option<f64> {
        quantile(&self.recent, q)
    }

    /// The `q` quantile (0..1) of recent request latencies, in seconds.
    pub fn request_quantile(&self, q: f64) -> Option<f64> {
        quantile(&self.req_recent, q)
    }

    /// (exchanges, bad ones) among the last `health.window` exchanges that
    /// are not older than [`MAX_AGE`].
    fn window(&self, now: Instant) -> (u32, u32) {
        self.exchanges
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) <= MAX_AGE)
            .fold((0, 0), |(t, b), (_, bad)| (t + 1, b + u32::from(*bad)))
    }

    /// Share of bad exchanges among the recent ones, or of retransmitted
    /// segments among those sent recently, whichever is worse.
    pub fn loss(&self, now: Instant, epoch: Instant) -> f64 {
        let _ = epoch;
        let (total, bad) = self.window(now);
        let exchanges = if total == 0 {
            0.0
        } else {
            f64::from(bad) / f64::from(total)
        };
        exchanges.max(self.retransmit_ratio(now).unwrap_or(0.0))
    }

    /// (segments sent, segments sent again) over the most recent
    /// [`TRANSPORT_SEGMENTS`] segments, or the whole transport window when
    /// fewer were sent in it. Counting segments rather than time keeps the
    /// figure fresh under traffic (a few seconds of history, so new loss
    /// shows within a second) and meaningful when only probes flow.
    fn transport_totals(&self, now: Instant) -> (u64, u64) {
        let mut totals = (0, 0);
        for (t, d) in self.transport.iter().rev() {
            if now.saturating_duration_since(*t) > TRANSPORT_WINDOW || totals.0 >= TRANSPORT_SEGMENTS {
                break;
            }
            totals = (totals.0 + d.sent, totals.1 + d.repeats);
        }
        totals
    }

    /// Share of the data segments sent recently on this path's connections
    /// that the kernel had to retransmit; `None` without recent traffic.
    pub fn retransmit_ratio(&self, now: Instant) -> Option<f64> {
        let (sent, retrans) = self.transport_totals(now);
        (sent > 0).then(|| (retrans as f64 / sent as f64).min(1.0))
    }

    /// Takes the kernel's view of the path's connections since the previous
    /// sample into account: data segments sent, retransmitted, delivered.
    ///
    /// A path that delivers data while retransmitting at least
    /// `health.degraded_loss` of it is losing packets, even when every
    /// exchange still answers in time (short paths repair a loss in
    /// milliseconds). Such a path is degraded, and it counts as bad for the
    /// clean run a lossy path must show before it is trusted again.
    /// Retransmissions that deliver nothing are an outage, which the
    /// exchanges judge; so are those just after a down path answers again.
    pub fn record_transport(&mut self, delta: Delta, now: Instant, cfg: &HealthConfig) -> Option<PathState> {
        while self
            .transport
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > TRANSPORT_WINDOW)
        {
            self.transport.pop_front();
        }
        if delta.delivered == 0 {
            return None;
        }
        if self.state == PathState::Down
            && self
                .answering_since
                .is_none_or(|t| now.saturating_duration_since(t) < TRANSPORT_SETTLE)
        {
            return None;
        }
        self.transport.push_back((now, delta));
        let (sent, retrans) = self.transport_totals(now);
        let ratio = retrans as f64 / sent.max(1) as f64;
        // Only a sample with repeats of its own is new evidence; the clean
        // run counts from the last segment sent again, not from the moment
        // old repeats leave the window.
        if delta.repeats == 0 || retrans < u64::from(MIN_BAD_FOR_DEGRADED) || ratio < cfg.degraded_loss {
            return None;
        }
        self.last_bad = Some(now);
        let before = self.state;
        let next = match self.state {
            PathState::Up => {
                self.reason = Some(format!(
                    "{:.0}% of packets sent again ({retrans} of the last {sent})",
                    ratio * 100.0
                ));
                PathState::Degraded
            }
            PathState::Down => {
                // Answering while losing packets: loss, not an outage.
                self.mixed = true;
                PathState::Down
            }
            PathState::Degraded => PathState::Degraded,
        };
        if next != before {
            self.transition(before, next, now, cfg);
            Some(next)
        } else {
            None
        }
    }

    /// Lower is better. Latency in milliseconds, inflated by loss, divided by
    /// the peer's weight share; a state adds a large constant so a healthier
    /// state always ranks first.
    pub fn score(&self, now: Instant, epoch: Instant) -> f64 {
        let rtt_ms = self.ewma.map_or(1000.0, |s| s * 1000.0).max(0.1);
        let loss = self.loss(now, epoch);
        let weight = f64::from(self.info.weight.max(1)) / 100.0;
        let base = rtt_ms * (1.0 + 20.0 * loss) / weight;
        let penalty = match self.state {
            PathState::Up => 0.0,
            PathState::Degraded => 100_000.0,
            PathState::Down => 1_000_000.0,
        };
        penalty + base + f64::from(self.consecutive_failures) * 1000.0
    }

    /// Takes one outcome into account and moves the state machine. Returns
    /// the new state when it changed.
    pub fn record(
        &mut self,
        outcome: Outcome,
        now: Instant,
        epoch: Instant,
        cfg: &HealthConfig,
    ) -> Option<PathState> {
        let _ = epoch;
        let bad = !matches!(outcome, Outcome::Ok(_) | Outcome::Answered(_));
        self.exchanges.push_back((now, bad));
        while self.exchanges.len() > cfg.window
            || self
                .exchanges
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > MAX_AGE)
        {
            self.exchanges.pop_front();
        }
        let hard = match outcome {
            Outcome::Ok(rtt) => {
                self.sample(rtt);
                self.consecutive_failures = 0;
                self.consecutive_ok += 1;
                false
            }
            Outcome::Answered(took) => {
                if self.req_recent.len() == RECENT {
                    self.req_recent.pop_front();
                }
                self.req_recent.push_back(took.as_secs_f64());
                self.consecutive_failures = 0;
                self.consecutive_ok += 1;
                false
            }
            Outcome::Slow(_) => {
                self.last_bad = Some(now);
                // A stall is loss, not latency: keeping it out of the RTT
                // samples keeps attempt timeouts short on a lossy path.
                self.consecutive_ok = 0;
                false
            }
            Outcome::Failed(_) => {
                self.last_bad = Some(now);
                self.never_up = false;
                self.consecutive_ok = 0;
                self.consecutive_failures += 1;
                true
            }
        };
        if self.state == PathState::Up
            && self
                .up_since
                .is_some_and(|t| now.duration_since(t) >= FLAP_FORGET)
        {
            self.flaps = 0;
        }
        let before = self.state;
        let (short_total, short_bad) = self.window(now);
        let short_loss = if short_total == 0 {
            0.0
        } else {
            f64::from(short_bad) / f64::from(short_total)
        };
        let lossy = short_bad >= MIN_BAD_FOR_DEGRADED && short_loss >= cfg.degraded_loss;

        // Once a path is out, a failure after a success means loss, not an outage.
        if self.state != PathState::Up && hard && self.ok_since_out {
            self.mixed = true;
        }
        if self.state != PathState::Up && !hard && matches!(outcome, Outcome::Ok(_) | Outcome::Answered(_)) {
            self.ok_since_out = true;
            self.answering_since.get_or_insert(now);
        }
        let next = if hard && self.consecutive_failures >= cfg.fall {
            let why = match outcome {
                Outcome::Failed(k) => k.as_str(),
                _ => "failed",
            };
            self.reason = Some(format!(
                "{} consecutive failures ({why})",
                self.consecutive_failures
            ));
            PathState::Down
        } else if self.state == PathState::Up {
            if lossy {
                self.reason = Some(format!(
                    "{:.0}% of recent exchanges lost or stalled",
                    short_loss * 100.0
                ));
                PathState::Degraded
            } else {
                PathState::Up
            }
        } else {
            let held = self.hold_until.is_some_and(|t| now < t);
            // A clean outage (nothing but failures, then nothing but
            // successes) may rise after `rise` good exchanges. A lossy path
            // must first go a whole clean run without a bad exchange, or it
            // would flap.
            let clean = !self.mixed || self.last_bad.is_none_or(|t| now.duration_since(t) >= CLEAN_RUN);
            // A path nobody has seen fail yet is up on its first good answer,
            // so an agent is useful the moment it starts.
            let first_light =
                self.up_since.is_none() && self.never_up && !self.mixed && self.consecutive_ok >= 1;
            if (self.consecutive_ok >= cfg.rise || first_light) && clean && !held {
                self.reason = None;
                PathState::Up
            } else if self.state == PathState::Down && self.consecutive_ok >= cfg.rise && !held && self.mixed
            {
                self.reason = Some(format!(
                    "answering, but {:.0}% lost or stalled",
                    short_loss * 100.0
                ));
                PathState::Degraded
            } else {
                self.state
            }
        };
        if next != before {
            self.transition(before, next, now, cfg);
            Some(next)
        } else {
            None
        }
    }

    fn sample(&mut self, rtt: Duration) {
        let s = rtt.as_secs_f64();
        self.ewma = Some(match self.ewma {
            None => s,
            Some(e) => e * 0.8 + s * 0.2,
        });
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(s);
    }

    fn transition(&mut self, from: PathState, to: PathState, now: Instant, cfg: &HealthConfig) {
        // A good exchange after a bad one in the recent window is loss, not a
        // clean outage (which is good ones, then only bad ones): such a path
        // must show the long clean run before it is trusted again.
        let loss_pattern = {
            let mut seen_bad = false;
            self.exchanges.iter().any(|(_, bad)| {
                seen_bad |= *bad;
                seen_bad && !*bad
            })
        };
        if from == PathState::Up {
            // Falling soon after rising is a flap: wait longer before the next rise.
            let recently_up = self.up_since.is_some_and(|t| now.duration_since(t) < FLAP_FORGET);
            if recently_up {
                self.flaps = (self.flaps + 1).min(16);
            }
            let base = cfg.hold_down_min.as_secs_f64() * 2f64.powi(self.flaps as i32);
            let jitter = 1.0 + (rand::random::<f64>() - 0.5) * 0.4;
            let hold = (base * jitter).min(cfg.hold_down_max.as_secs_f64());
            self.hold_until = Some(now + Duration::from_secs_f64(hold));
            self.up_since = None;
        }
        // An outage's retransmissions say nothing about loss, and a path
        // that rises is judged afresh.
        if to == PathState::Down || to == PathState::Up {
            self.transport.clear();
        }
        if to == PathState::Down {
            self.answering_since = None;
        }
        if to == PathState::Down && from != PathState::Degraded {
            // The outage is the state; recovery is judged on fresh evidence.
            self.exchanges.clear();
            self.consecutive_ok = 0;
        }
        if from == PathState::Up {
            self.ok_since_out = false;
            self.answering_since = None;
            self.mixed = to == PathState::Degraded || loss_pattern;
        }
        if to == PathState::Up || from == PathState::Up || to == PathState::Degraded {
            self.never_up = false;
        }
        if to == PathState::Up {
            // The evidence that kept the path out is history now; judge it
            // afresh, or the old failures would push it straight out again.
            self.exchanges.clear();
            self.up_since = Some(now);
            self.hold_until = None;
        }
        self.state = to;
    }

    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }
}

fn quantile(samples: &VecDeque<f64>, q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = samples.iter().copied().collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(idx.min(v.len() - 1)).copied()
}

/// One path as the request path sees it.
#[derive(Debug, Clone)]
pub struct PathView {
    pub index: usize,
    pub name: Arc<str>,
    pub state: PathState,
    pub enabled: bool,
    pub rtt: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    /// p95 of recent request latencies on this path, seconds (the hedge delay).
    pub request_p95: Option<f64>,
    pub loss: f64,
    /// Share of recent data segments sent again, from the kernel.
    pub retransmit: Option<f64>,
    pub score: f64,
    pub consecutive_failures: u32,
    pub reason: Option<String>,
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
}

/// The current path keeps traffic unless the best is this much better...
const STICKY_RATIO: f64 = 1.5;
/// ...plus this many score points (about milliseconds of RTT).
const STICKY_MARGIN: f64 = 2.0;

/// Selection class: lower is better.
fn class(p: &PathView) -> u8 {
    match p.state {
        PathState::Up if &*p.name == "direct" => 0,
        PathState::Up => 1,
        PathState::Degraded => 2,
        PathState::Down => 3,
    }
}

/// Ranks paths: `direct` when it is up, then up paths by score, then degraded
/// by score, then down by score (fail static: a bad path beats no path).
/// Disabled paths are left out.
pub fn rank(paths: &[PathView]) -> Vec<usize> {
    let mut order: Vec<usize> = paths.iter().filter(|p| p.enabled).map(|p| p.index).collect();
    order.sort_by(|&a, &b| {
        let (pa, pb) = (&paths[a], &paths[b]);
        class(pa)
            .cmp(&class(pb))
            .then(pa.score.total_cmp(&pb.score))
            .then(a.cmp(&b))
    });
    order
}

/// The health of every path of one agent.
pub struct HealthTable {
    cfg: HealthConfig,
    epoch: Instant,
    paths: Vec<Mutex<PathStats>>,
    snapshot: ArcSwap<Snapshot>,
    metrics: Arc<Metrics>,
    active: Mutex<Option<Arc<str>>>,
    dirty: AtomicBool,
}

impl HealthTable {
    pub fn new(cfg: HealthConfig, infos: Vec<PathInfo>, metrics: Arc<Metrics>) -> HealthTable {
        let table = HealthTable {
            cfg,
            epoch: Instant::now(),
            paths: infos.into_iter().map(|i| Mutex::new(PathStats::new(i))).collect(),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            metrics,
            active: Mutex::new(None),
            dirty: AtomicBool::new(false),
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
        self.publish();
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
            views.push(PathView {
                index: i,
                name: s.info.name.clone(),
                state: s.state(),
                enabled: s.info.enabled,
                rtt: s.rtt(),
                p95: s.rtt_quantile(0.95),
                p99: s.rtt_quantile(0.99),
                request_p95: s.request_quantile(0.95),
                loss: s.loss(now, self.epoch),
                retransmit: s.retransmit_ratio(now),
                score: s.score(now, self.epoch),
                consecutive_failures: s.consecutive_failures(),
                reason: s.reason().map(str::to_owned),
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
            let same_class = class(b) == class(c);
            if pos > 0 && same_class && c.score <= b.score * STICKY_RATIO + STICKY_MARGIN {
                let i = ranked.remove(pos);
                ranked.insert(0, i);
            }
        }
        let snap = Snapshot { paths: views, ranked };
        for v in &snap.paths {
            let state = match v.state {
                PathState::Up => 2,
                PathState::Degraded => 1,
                PathState::Down => 0,
            };
            self.metrics.path_state.with_label_values(&[&*v.name]).set(state);
            if let Some(rtt) = v.rtt {
                self.metrics.path_rtt.with_label_values(&[&*v.name]).set(rtt);
            }
            self.metrics.path_loss.with_label_values(&[&*v.name]).set(v.loss);
            if let Some(r) = v.retransmit {
                self.metrics.path_retransmit.with_label_values(&[&*v.name]).set(r);
            }
        }
        let new_active = snap.active().map(|p| p.name.clone());
        {
            let mut active = lock(&self.active);
            if *active != new_active {
                let reason = match snap.active() {
                    Some(p) => format!("{} is {}", p.name, p.state.as_str()),
                    None => "no enabled path".to_owned(),
                };
                let from = active.as_deref().unwrap_or("none").to_owned();
                if let Some(old) = active.as_deref() {
                    self.metrics.active_path.with_label_values(&[old]).set(0);
                    let old_state = snap.by_name(old).map_or("removed", |p| p.state.as_str());
                    tracing::warn!(from = %from, to = new_active.as_deref().unwrap_or("none"), reason = %reason, old_state, "active path switched");
                    self.metrics.path_switches.inc();
                }
                if let Some(new) = new_active.as_deref() {
                    self.metrics.active_path.with_label_values(&[new]).set(1);
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
    pub fn forget(metrics: &Metrics, path: &str) {
        let _ = metrics.path_state.remove_label_values(&[path]);
        let _ = metrics.path_rtt.remove_label_values(&[path]);
        let _ = metrics.path_loss.remove_label_values(&[path]);
        let _ = metrics.path_retransmit.remove_label_values(&[path]);
        let _ = metrics.active_path.remove_label_values(&[path]);
    }

    /// The `/status` view of every path.
    pub fn reports(&self) -> Vec<PathReport> {
        let snap = self.snapshot();
        let active = snap.active().map(|p| p.index);
        snap.paths
            .iter()
            .map(|p| PathReport {
                path: p.name.to_string(),
                state: p.state,
                rtt_seconds: p.rtt,
                rtt_p95_seconds: p.p95,
                loss_ratio: p.loss,
                score: p.score,
                active: Some(p.index) == active,
                consecutive_failures: p.consecutive_failures,
                reason: if p.enabled {
                    p.reason.clone()
                } else {
                    Some("disabled (draining)".to_owned())
                },
            })
            .collect()
    }
}

/// Locks a mutex, recovering from a poisoned one: health stats stay usable
/// even if a thread panicked while holding the lock.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;

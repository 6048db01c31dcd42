//! One path's evidence (exchanges, RTT samples, the kernel's retransmission
//! counts) and its `up`/`degraded`/`down` state machine with hysteresis,
//! hold-down and the clean run a lossy path must show.

use std::collections::VecDeque;
use std::time::Duration;

use detour_wire::PathState;
use tokio::time::Instant;

use super::{FailureKind, Outcome, PathInfo};
use crate::config::Health as HealthConfig;
use crate::transport::Delta;

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
    /// Since the path went `down`: when the kernel first delivered data on
    /// it while sending segments again, and in how many samples since.
    down_repeats: Option<(Instant, u32)>,
    /// Sequential tests of the loss the kernel's segments show, and of the
    /// loss the exchanges show ([`loss`]).
    segments: LossTest,
    exchanges_test: LossTest,
    /// When the exchange loss test last counted a bad exchange: the ones
    /// within `health.timeout_min` of it are the same stall.
    bad_trial_at: Option<Instant>,
    /// When the path last left `up`.
    out_since: Option<Instant>,
    /// When an exchange last succeeded.
    last_ok: Option<Instant>,
}

const RECENT: usize = 64;
/// Evidence older than this is forgotten, however few exchanges there were.
const MAX_AGE: Duration = Duration::from_secs(30);
/// A lossy path rises only after this long without a bad exchange.
pub const CLEAN_RUN: Duration = Duration::from_secs(30);
/// A path that stayed up this long forgets its past flaps.
const FLAP_FORGET: Duration = Duration::from_secs(60);
/// How long the kernel's retransmission counts are remembered.
const TRANSPORT_WINDOW: Duration = Duration::from_secs(10);
/// How many of the most recent data segments the retransmission share is
/// taken over.
const TRANSPORT_SEGMENTS: u64 = 200;
/// Retransmissions in this long after a down path first answers again are
/// the outage's (the data sent into it going out again), not loss.
const TRANSPORT_SETTLE: Duration = Duration::from_millis(500);
/// A down path whose connections deliver data while sending segments again
/// in this many samples, spread over at least [`LOSS_SPREAD`], is losing
/// packets, not out (see [`PathStats::down_transport`]).
const LOSS_SAMPLES: u32 = 3;
const LOSS_SPREAD: Duration = Duration::from_secs(1);

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
            down_repeats: None,
            segments: LossTest::default(),
            exchanges_test: LossTest::default(),
            bad_trial_at: None,
            out_since: None,
            last_ok: None,
        }
    }

    /// Worth probing more often than `health.interval`: an `up` path halfway
    /// to a verdict of loss, or a path left for loss that answers and has
    /// yet to prove itself clean. More evidence decides sooner.
    pub fn suspect(&self) -> bool {
        if self.state == PathState::Up {
            self.segments.suspect() || self.exchanges_test.suspect()
        } else {
            self.mixed && self.ok_since_out && !self.loss_tests_clean()
        }
    }

    /// Both loss tests found the path's loss negligible (or saw nothing).
    fn loss_tests_clean(&self) -> bool {
        self.segments.clean() && self.exchanges_test.clean()
    }

    pub fn state(&self) -> PathState {
        self.state
    }

    /// Smoothed RTT in seconds.
    pub fn rtt(&self) -> Option<f64> {
        self.ewma
    }

    /// The `qs` quantiles (0..1) of recent RTT samples, in seconds.
    pub fn rtt_quantiles<const N: usize>(&self, qs: [f64; N]) -> [Option<f64>; N] {
        quantiles(&self.recent, qs)
    }

    /// The `qs` quantiles (0..1) of recent request latencies, in seconds.
    pub fn request_quantiles<const N: usize>(&self, qs: [f64; N]) -> [Option<f64>; N] {
        quantiles(&self.req_recent, qs)
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
    /// exchanges judge; a down path's are read by [`Self::down_transport`].
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
        if self.state == PathState::Down {
            self.down_transport(delta, now, cfg);
            return None;
        }
        self.transport.push_back((now, delta));
        self.segments
            .observe(Stream::Segments, delta.sent, delta.repeats, cfg.degraded_loss);
        if delta.repeats > 0 {
            self.last_bad = Some(now);
        }
        // The verdict is given on the path's next answer (see
        // `next_state`): segments sent again with data delivered can also be
        // the first moments of an outage, which answers nothing.
        None
    }

    /// The kernel's view of a down path. Data delivered between segments
    /// sent again, sample after sample for a second or more, is loss, not an
    /// outage: a loss burst can begin with exchanges lost back to back and
    /// take the path down looking like an outage, and its probes may then all
    /// time out behind retransmissions. An outage's backlog, by contrast,
    /// goes out in one or two samples when it heals (one per connection
    /// whose retransmission timer fires). Once the path answers and the
    /// backlog has settled, the samples feed its loss figures again.
    fn down_transport(&mut self, delta: Delta, now: Instant, cfg: &HealthConfig) {
        if delta.repeats > 0 {
            let (first, samples) = self.down_repeats.get_or_insert((now, 0));
            *samples += 1;
            if *samples >= LOSS_SAMPLES && now.saturating_duration_since(*first) >= LOSS_SPREAD {
                self.mixed = true;
                self.last_bad = Some(now);
            }
        }
        if self
            .answering_since
            .is_some_and(|t| now.saturating_duration_since(t) >= TRANSPORT_SETTLE)
        {
            self.transport.push_back((now, delta));
            self.segments
                .observe(Stream::Segments, delta.sent, delta.repeats, cfg.degraded_loss);
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
        let hard = self.count(outcome, now, cfg);
        if self.state == PathState::Up
            && self
                .up_since
                .is_some_and(|t| now.duration_since(t) >= FLAP_FORGET)
        {
            self.flaps = 0;
        }
        let before = self.state;
        let next = self.next_state(outcome, hard, now, cfg);
        if next != before {
            self.transition(before, next, now, cfg);
            Some(next)
        } else {
            None
        }
    }

    /// Adds `outcome` to the evidence: the window of exchanges, RTT or
    /// request-latency samples, the runs of successes and failures. Returns
    /// whether it was a hard failure.
    fn count(&mut self, outcome: Outcome, now: Instant, cfg: &HealthConfig) -> bool {
        let bad = !matches!(outcome, Outcome::Ok(_) | Outcome::Answered(_));
        self.exchanges.push_back((now, bad));
        // One lost segment often spoils several exchanges at once: all that
        // wait on the same retransmission end together, as stalls or
        // timeouts. For the loss test those are one trial, not several: bad
        // exchanges within `timeout_min` of the last one it counted are left
        // out (good ones always count).
        let same_stall = bad
            && self
                .bad_trial_at
                .is_some_and(|t| now.saturating_duration_since(t) < cfg.timeout_min);
        if !same_stall {
            if bad {
                self.bad_trial_at = Some(now);
            }
            self.exchanges_test
                .observe(Stream::Exchanges, 1, u64::from(bad), cfg.degraded_loss);
        }
        while self.exchanges.len() > cfg.window
            || self
                .exchanges
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > MAX_AGE)
        {
            self.exchanges.pop_front();
        }
        match outcome {
            Outcome::Ok(rtt) => {
                self.last_ok = Some(now);
                self.sample(rtt);
                self.consecutive_failures = 0;
                self.consecutive_ok += 1;
                false
            }
            Outcome::Answered(took) => {
                self.last_ok = Some(now);
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
        }
    }

    /// The state the evidence calls for after `outcome`: down after `fall`
    /// hard failures in a row; degraded when recent exchanges are lossy; back
    /// up after `rise` good ones, past the hold-down and, for a lossy path,
    /// the clean run.
    fn next_state(&mut self, outcome: Outcome, hard: bool, now: Instant, cfg: &HealthConfig) -> PathState {
        // The share of recent exchanges that went bad, for a reason's text
        // only: counted when a reason is written, not on every exchange.
        let short_loss = |s: &Self| {
            let (total, bad) = s.window(now);
            if total == 0 {
                0.0
            } else {
                f64::from(bad) / f64::from(total)
            }
        };
        // Loss is judged when the path answers: failures in a row with
        // nothing answering between them are an outage in progress (or a
        // stall), which `fall` judges, and the segments sent again at the
        // start of an outage come with the last data delivered before it.
        let answered = matches!(outcome, Outcome::Ok(_) | Outcome::Answered(_));
        let lossy_segments = answered && self.segments.lossy();
        let lossy = answered && (lossy_segments || self.exchanges_test.lossy());

        // Once a path is out, a failure after a success means loss, not an outage.
        if self.state != PathState::Up && hard && self.ok_since_out {
            self.mixed = true;
        }
        if self.state != PathState::Up && !hard && matches!(outcome, Outcome::Ok(_) | Outcome::Answered(_)) {
            self.ok_since_out = true;
            self.answering_since.get_or_insert(now);
        }
        // Timeouts are ambiguous: a lost segment stalls every request on its
        // connection until the kernel repairs it (a tail-loss probe or a
        // retransmission timeout, ~200 ms), so several time out in a row
        // on a path that is merely lossy. They take the path down only once
        // nothing has answered for twice the shortest timeout; a refused or
        // broken connection does at once.
        let ambiguous = matches!(outcome, Outcome::Failed(FailureKind::Timeout));
        let silent = self
            .last_ok
            .is_none_or(|t| now.saturating_duration_since(t) >= cfg.timeout_min * 2);
        if hard && self.consecutive_failures >= cfg.fall && (silent || !ambiguous) {
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
            if lossy_segments {
                let (sent, again) = self.segments.run;
                self.reason = Some(format!(
                    "{:.0}% of packets sent again ({again} of the last {sent})",
                    again as f64 * 100.0 / sent.max(1) as f64
                ));
                PathState::Degraded
            } else if lossy {
                self.reason = Some(format!(
                    "{:.0}% of recent exchanges lost or stalled",
                    short_loss(self) * 100.0
                ));
                PathState::Degraded
            } else {
                PathState::Up
            }
        } else {
            let held = self.hold_until.is_some_and(|t| now < t);
            // A clean outage (nothing but failures, then nothing but
            // successes) may rise after `rise` good exchanges. A path left
            // for loss must first prove its loss negligible, and stay out
            // for the clean run at least, or it would flap.
            let clean = !self.mixed
                || (self.loss_tests_clean()
                    && self.out_since.is_none_or(|t| now.duration_since(t) >= CLEAN_RUN));
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
                    short_loss(self) * 100.0
                ));
                PathState::Degraded
            } else {
                self.state
            }
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
            self.out_since = Some(now);
            // The verdict is in; what follows must prove the path afresh.
            self.segments.restart();
            self.exchanges_test.restart();
        }
        // An outage's retransmissions say nothing about loss, and a path
        // that rises is judged afresh.
        if to == PathState::Down || to == PathState::Up {
            self.transport.clear();
        }
        if to == PathState::Down {
            self.answering_since = None;
            self.down_repeats = None;
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
            self.segments.restart();
            self.exchanges_test.restart();
            self.out_since = None;
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

/// The `qs` quantiles (0..1) of `samples` (at most [`RECENT`]), sorted once
/// on the stack: the snapshot is rebuilt up to ten times a second for every
/// path.
fn quantiles<const N: usize>(samples: &VecDeque<f64>, qs: [f64; N]) -> [Option<f64>; N] {
    let mut v = [0.0; RECENT];
    let n = samples.len().min(RECENT);
    for (slot, s) in v.iter_mut().zip(samples.iter().rev()) {
        *slot = *s;
    }
    let v = &mut v[..n];
    v.sort_unstable_by(f64::total_cmp);
    qs.map(|q| {
        let idx = ((n as f64 - 1.0) * q).round() as usize;
        v.get(idx.min(n.saturating_sub(1))).copied()
    })
}

mod loss;
mod memory;
#[cfg(test)]
mod tests;

pub use loss::{LossTest, Stream};

pub use memory::PathMemory;

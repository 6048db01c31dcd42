//! Judging a path's loss by sequential tests instead of a fixed window.
//!
//! A share over a short window is noisy: "2 of 40 bad" flags about 6% of
//! windows at a true 1% loss, 19% at 2%, and catches 5% only ~60% of the
//! time. Each evidence stream here runs Page's CUSUM on the log-likelihood
//! ratio of two loss rates instead (Wald's sequential test, restarted at
//! zero): every trial adds `ln(p1/p0)` when bad and `ln((1-p1)/(1-p0))`
//! when good, the sum never goes below zero, and a verdict is reached when
//! it crosses a threshold. That spends exactly as much evidence as the
//! traffic needs: a heavy loss is seen in a few dozen segments, a loss near
//! the tolerated rate almost never raises an alarm, and the false-alarm
//! rate is fixed by the threshold rather than by the traffic.
//!
//! Two tests per stream (docs/failover.md, "Judging loss"):
//! - *leave*: the loss is `health.degraded_loss` (p1, 5%) rather than a
//!   tolerated p0 = p1/5 (1%). Crossing [`LEAVE`] makes an `up` path
//!   `degraded`.
//! - *back*: the loss is p_ok = p1/20 (0.25%) rather than p0. A path that
//!   was left for loss returns only once this crosses [`BACK`], so a path
//!   at 1-2% that was left stays left instead of flapping.
//!
//! The streams are kept apart because they see different things: the
//! kernel's segments sent again (the sending side's loss, most of it
//! repaired in milliseconds, so the exchanges never notice), and exchanges
//! that stalled or failed (loss in either direction long enough to hurt a
//! request), whose rates are twice the packet rates (a request and its
//! answer can each be lost).

/// Threshold of the leave test: ln(10^4). At the tolerated rate p0 a
/// one-sided CUSUM runs on the order of e^h / KL(p0 || p1) trials before a
/// false alarm: some 400,000 segments (over an hour at 100 segments/s).
pub const LEAVE: f64 = 9.21;
/// Threshold of the back test: ln(10^4) too. At 0% loss that is some 1,220
/// segments and 600 exchanges: 30 s of a suspect path's probing.
pub const BACK: f64 = 9.21;

/// How many "packets" one trial of a stream stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// A data segment the kernel sent (bad: sent again).
    Segments,
    /// A probe or request (bad: stalled or failed); two packets.
    Exchanges,
}

/// The three rates of one stream, from `health.degraded_loss`.
#[derive(Debug, Clone, Copy)]
struct Rates {
    ok: f64,
    tolerated: f64,
    bad: f64,
}

fn rates(stream: Stream, degraded_loss: f64) -> Rates {
    let p1 = degraded_loss.clamp(0.001, 0.5);
    let k = match stream {
        Stream::Segments => 1.0,
        Stream::Exchanges => 2.0,
    };
    let scale = |p: f64| (p * k).min(0.9);
    Rates {
        ok: scale(p1 / 20.0),
        tolerated: scale(p1 / 5.0),
        bad: scale(p1),
    }
}

/// Log-likelihood ratio of `bad` failures in `trials` Bernoulli trials
/// under rate `a` against rate `b`.
fn llr(trials: u64, bad: u64, a: f64, b: f64) -> f64 {
    let good = trials.saturating_sub(bad) as f64;
    bad as f64 * (a / b).ln() + good * ((1.0 - a) / (1.0 - b)).ln()
}

/// The two sequential tests of one evidence stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossTest {
    /// Evidence that the loss is at `health.degraded_loss` rather than
    /// tolerated; 0 when none.
    pub leave: f64,
    /// Evidence that the loss is negligible rather than tolerated, capped at
    /// [`BACK`] so a long clean history does not excuse fresh loss.
    pub back: f64,
    /// Whether any trial arrived since the path last left `up`.
    pub seen: bool,
    /// Trials and bad ones since the leave evidence last stood at zero: the
    /// run of evidence behind a verdict, for people.
    #[serde(default)]
    pub run: (u64, u64),
}

impl LossTest {
    /// Adds `trials` of which `bad` were bad.
    pub fn observe(&mut self, stream: Stream, trials: u64, bad: u64, degraded_loss: f64) {
        if trials == 0 {
            return;
        }
        let bad = bad.min(trials);
        let r = rates(stream, degraded_loss);
        self.leave = (self.leave + llr(trials, bad, r.bad, r.tolerated)).max(0.0);
        self.run = if self.leave > 0.0 {
            (self.run.0 + trials, self.run.1 + bad)
        } else {
            (0, 0)
        };
        self.back = (self.back + llr(trials, bad, r.ok, r.tolerated)).clamp(0.0, BACK);
        self.seen = true;
    }

    /// The loss is at the degraded rate.
    pub fn lossy(&self) -> bool {
        self.leave >= LEAVE
    }

    /// Halfway to a verdict of loss: worth probing harder.
    pub fn suspect(&self) -> bool {
        self.leave >= LEAVE / 2.0
    }

    /// The loss is negligible, or this stream saw nothing to judge by.
    pub fn clean(&self) -> bool {
        !self.seen || self.back >= BACK
    }

    /// Forgets the evidence (the path changed state; judge it afresh).
    pub fn restart(&mut self) {
        *self = LossTest::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64*), so the statistics
    /// below are the same on every run.
    struct Rng(u64);
    impl Rng {
        fn chance(&mut self, p: f64) -> bool {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
            ((x >> 11) as f64 / (1u64 << 53) as f64) < p
        }
    }

    /// Segments until the leave test fires at true loss `p`, at most `max`.
    fn segments_to_leave(rng: &mut Rng, p: f64, max: u64) -> Option<u64> {
        let mut t = LossTest::default();
        for n in 1..=max {
            let bad = u64::from(rng.chance(p));
            t.observe(Stream::Segments, 1, bad, 0.05);
            if t.lossy() {
                return Some(n);
            }
        }
        None
    }

    #[test]
    fn tolerated_loss_raises_no_alarm_and_heavy_loss_is_seen_in_a_few_hundred_segments() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // 30 runs of 30,000 segments (5 minutes at 100 segments/s).
        for p in [0.0, 0.005, 0.01] {
            let alarms = (0..30)
                .filter(|_| segments_to_leave(&mut rng, p, 30_000).is_some())
                .count();
            assert_eq!(alarms, 0, "{p}: {alarms} of 30 runs raised an alarm");
        }
        // 200 runs each: the median and the 99th percentile of the segments
        // it takes (at 100 segments/s, hundredths of a second).
        for (p, median, p99) in [(0.05, 220, 650), (0.10, 80, 200), (0.30, 25, 55)] {
            let mut n: Vec<u64> = (0..200)
                .map(|_| segments_to_leave(&mut rng, p, 100_000).unwrap_or(u64::MAX))
                .collect();
            n.sort_unstable();
            eprintln!("{p}: median {} p99 {} max {}", n[100], n[198], n[199]);
            assert!(
                n[100] <= median && n[198] <= p99,
                "{p}: median {} p99 {}",
                n[100],
                n[198]
            );
        }
    }

    #[test]
    fn the_back_test_proves_a_clean_path_and_never_a_lossy_one() {
        let mut rng = Rng(7);
        let mut clean = LossTest::default();
        let mut n = 0;
        while !clean.clean() || n == 0 {
            n += 1;
            clean.observe(Stream::Segments, 1, 0, 0.05);
        }
        // ln(10^4) / ln(0.9975 / 0.99): about 1,220 segments.
        assert!((1200..1250).contains(&n), "{n}");
        // 30 runs of 24,000 segments each (10 minutes of probing at 40
        // segments/s): a path at 2% is never judged clean, one at 1% (the
        // tolerated rate itself) seldom.
        for (p, most) in [(0.01, 1), (0.02, 0)] {
            let returned = (0..30)
                .filter(|_| {
                    let mut t = LossTest::default();
                    t.observe(Stream::Segments, 1, 1, 0.05);
                    (0..24_000).any(|_| {
                        t.observe(Stream::Segments, 1, u64::from(rng.chance(p)), 0.05);
                        t.clean()
                    })
                })
                .count();
            assert!(returned <= most, "{p}: judged clean in {returned} of 30 runs");
        }
    }

    #[test]
    fn a_stream_that_saw_nothing_does_not_block_a_return() {
        let mut t = LossTest::default();
        assert!(t.clean());
        t.observe(Stream::Exchanges, 1, 0, 0.05);
        assert!(!t.clean());
        t.restart();
        assert!(t.clean());
    }
}

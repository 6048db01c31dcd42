//! The retry budget: retries and hedges are capped to a share of recent
//! requests plus a floor, so an outage cannot become a retry storm.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::time::Instant;

/// Caps retries and hedges to a share of recent requests plus a floor, so an
/// outage cannot turn into a retry storm on the peers.
pub struct RetryBudget {
    ratio: f64,
    floor_per_sec: u32,
    /// Per second: (second, requests, extra attempts).
    window: Mutex<VecDeque<(u64, u32, u32)>>,
    epoch: Instant,
}

const BUDGET_WINDOW_SECS: u64 = 10;

impl RetryBudget {
    pub fn new(ratio: f64, floor_per_sec: u32) -> RetryBudget {
        RetryBudget {
            ratio,
            floor_per_sec,
            window: Mutex::new(VecDeque::new()),
            epoch: Instant::now(),
        }
    }

    fn with_bucket<R>(&self, f: impl FnOnce(&mut VecDeque<(u64, u32, u32)>) -> R) -> R {
        let sec = Instant::now().saturating_duration_since(self.epoch).as_secs();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        while w.front().is_some_and(|b| b.0 + BUDGET_WINDOW_SECS <= sec) {
            w.pop_front();
        }
        if w.back().is_none_or(|b| b.0 != sec) {
            w.push_back((sec, 0, 0));
        }
        f(&mut w)
    }

    /// Counts one incoming request.
    pub fn request(&self) {
        self.with_bucket(|w| {
            if let Some(b) = w.back_mut() {
                b.1 += 1;
            }
        });
    }

    /// Takes one retry or hedge from the budget, if there is one left.
    pub fn try_spend(&self) -> bool {
        let (ratio, floor) = (self.ratio, self.floor_per_sec);
        self.with_bucket(|w| {
            let (reqs, extra) = w
                .iter()
                .fold((0u64, 0u64), |(r, e), b| (r + u64::from(b.1), e + u64::from(b.2)));
            let allowed = ratio * reqs as f64 + f64::from(floor) * BUDGET_WINDOW_SECS as f64;
            if (extra as f64) < allowed {
                if let Some(b) = w.back_mut() {
                    b.2 += 1;
                }
                true
            } else {
                false
            }
        })
    }
}

//! A path's evidence and state as plain data, so that a restarted or
//! upgraded agent starts where the old process left off (a dead uplink stays
//! down, a lossy one keeps its clean run to serve) instead of from "no
//! evidence yet". Instants become ages at the moment of writing.

use std::collections::VecDeque;
use std::time::Duration;

use detour_wire::PathState;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{LossTest, PathStats};

/// One path as a snapshot keeps it. Ages and times left are milliseconds as
/// of when the snapshot was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathMemory {
    pub name: String,
    pub state: PathState,
    pub reason: Option<String>,
    pub rtt: Option<f64>,
    pub rtt_samples: Vec<f64>,
    pub request_samples: Vec<f64>,
    /// Recent exchanges: (age, bad).
    pub exchanges: Vec<(u64, bool)>,
    pub consecutive_failures: u32,
    pub consecutive_ok: u32,
    pub hold_left_ms: Option<u64>,
    pub flaps: u32,
    pub up_for_ms: Option<u64>,
    pub ok_since_out: bool,
    pub mixed: bool,
    pub never_up: bool,
    pub last_bad_age_ms: Option<u64>,
    pub answering_for_ms: Option<u64>,
    /// The loss tests (absent in snapshots of older agents: no evidence).
    #[serde(default)]
    pub segments: LossTest,
    #[serde(default)]
    pub exchanges_test: LossTest,
    #[serde(default)]
    pub out_for_ms: Option<u64>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The instant `age` before `now`, as of `elapsed` ago.
fn back(now: Instant, age_ms: u64, elapsed: Duration) -> Instant {
    now.checked_sub(Duration::from_millis(age_ms) + elapsed)
        .unwrap_or(now)
}

impl PathStats {
    /// This path's evidence and state as of `now`.
    pub fn memory(&self, now: Instant) -> PathMemory {
        let age = |t: Instant| ms(now.saturating_duration_since(t));
        PathMemory {
            name: self.info.name.to_string(),
            state: self.state,
            reason: self.reason.clone(),
            rtt: self.ewma,
            rtt_samples: self.recent.iter().copied().collect(),
            request_samples: self.req_recent.iter().copied().collect(),
            exchanges: self.exchanges.iter().map(|&(t, bad)| (age(t), bad)).collect(),
            consecutive_failures: self.consecutive_failures,
            consecutive_ok: self.consecutive_ok,
            hold_left_ms: self.hold_until.map(|t| ms(t.saturating_duration_since(now))),
            flaps: self.flaps,
            up_for_ms: self.up_since.map(age),
            ok_since_out: self.ok_since_out,
            mixed: self.mixed,
            never_up: self.never_up,
            last_bad_age_ms: self.last_bad.map(age),
            answering_for_ms: self.answering_since.map(age),
            segments: self.segments,
            exchanges_test: self.exchanges_test,
            out_for_ms: self.out_since.map(age),
        }
    }

    /// Takes over `m`, written `elapsed` ago, as this path's evidence and
    /// state. The kernel's counters are not carried over: they belong to the
    /// old process's connections.
    pub fn remember(&mut self, m: &PathMemory, now: Instant, elapsed: Duration) {
        let at = |age: u64| back(now, age, elapsed);
        self.state = m.state;
        self.reason = m.reason.clone();
        self.ewma = m.rtt;
        self.recent = m.rtt_samples.iter().copied().collect();
        self.req_recent = m.request_samples.iter().copied().collect();
        self.exchanges = m
            .exchanges
            .iter()
            .map(|&(age, bad)| (at(age), bad))
            .collect::<VecDeque<_>>();
        self.consecutive_failures = m.consecutive_failures;
        self.consecutive_ok = m.consecutive_ok;
        self.hold_until = m
            .hold_left_ms
            .and_then(|left| Duration::from_millis(left).checked_sub(elapsed))
            .map(|left| now + left);
        self.flaps = m.flaps;
        self.up_since = m.up_for_ms.map(at);
        self.ok_since_out = m.ok_since_out;
        self.mixed = m.mixed;
        self.never_up = m.never_up;
        self.last_bad = m.last_bad_age_ms.map(at);
        self.answering_since = m.answering_for_ms.map(at);
        self.segments = m.segments;
        self.exchanges_test = m.exchanges_test;
        self.out_since = m.out_for_ms.map(at);
        self.transport.clear();
        self.down_repeats = None;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::health::{FailureKind, Outcome, PathInfo};

    fn stats() -> PathStats {
        PathStats::new(PathInfo {
            name: Arc::from("direct"),
            direct: true,
            endpoint: "".into(),
            priority: 1,
            weight: 100,
            enabled: true,
            drained: false,
        })
    }

    #[test]
    fn a_path_remembered_is_the_path_that_was() {
        let cfg = crate::config::AgentConfig::from_str_at(
            std::path::Path::new("agent.toml"),
            "pop = \"blr\"\n[control_plane]\nurl = \"http://127.0.0.1:1\"\n",
        )
        .unwrap()
        .health;
        let mut s = stats();
        let epoch = Instant::now();
        let mut now = epoch;
        for _ in 0..10 {
            now += Duration::from_millis(500);
            s.record(Outcome::Ok(Duration::from_millis(20)), now, epoch, &cfg);
        }
        for _ in 0..3 {
            now += Duration::from_millis(500);
            s.record(Outcome::Failed(FailureKind::Timeout), now, epoch, &cfg);
        }
        assert_eq!(s.state(), PathState::Down);
        let m = s.memory(now);
        assert!(m.hold_left_ms.is_some(), "a path that fell is held down: {m:?}");
        let json = serde_json::to_string(&m).unwrap();
        let back: PathMemory = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);

        let mut fresh = stats();
        fresh.remember(&back, now, Duration::ZERO);
        assert_eq!(fresh.state(), PathState::Down);
        assert_eq!(fresh.memory(now), m);
        assert_eq!(fresh.loss(now, epoch), s.loss(now, epoch));
        assert_eq!(fresh.score(now, epoch), s.score(now, epoch));

        // Time spent between writing and reading counts against hold-downs.
        let mut later = stats();
        later.remember(&back, now, Duration::from_secs(3600));
        assert_eq!(later.memory(now).hold_left_ms, None);
    }
}

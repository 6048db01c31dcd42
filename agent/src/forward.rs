//! Forwarding: sends one call-handler request to the control plane over the
//! ranked paths, with adaptive attempt timeouts, retries on another path,
//! hedging, and a retry budget. `docs/failover.md` describes this policy; keep
//! the two in step.
//!
//! [`Forwarder::forward`] runs one request's race ([`race`]) of attempts
//! ([`attempt`]) under the [`budget`].

mod attempt;
mod budget;
mod race;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, Method, Response};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::time::Instant;

pub use attempt::classify;
pub use budget::RetryBudget;

use crate::config::AgentConfig;
use crate::health::{HealthTable, Snapshot};
use crate::metrics::Metrics;
use crate::paths::PathClient;
use race::{Event, Race};

/// Everything a request needs that may change on reload.
pub struct Runtime {
    pub config: Arc<AgentConfig>,
    pub paths: Vec<Arc<PathClient>>,
    pub health: Arc<HealthTable>,
}

/// A request ready to be sent on any path.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub method: Method,
    /// Path and query as the call handler sent them; each path puts its
    /// endpoint's base path before them.
    pub path_and_query: http::uri::PathAndQuery,
    /// Headers to send (hop-by-hop removed, keys added); each path sets its
    /// endpoint's `Host` (the first endpoint's is here, so that the entry
    /// exists).
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Emergency requests go to the two best paths at once.
    pub emergency: bool,
    /// `direct` or `via:<peer>`: only this path.
    pub pin: Option<String>,
    /// When the agent received the request.
    pub received: Instant,
}

/// One attempt, as reported in a 503 body and in logs.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptRecord {
    pub path: String,
    /// `first`, `retry` or `hedge`.
    pub kind: &'static str,
    /// What happened: `answered 200`, `timed out after 150ms`, `connect failed: …`.
    pub result: String,
    /// Milliseconds from the request's arrival to this attempt's end.
    pub elapsed_ms: u64,
}

/// A response from the control plane and the path that carried it.
pub struct Answer {
    pub response: Response<Incoming>,
    pub path: Arc<PathClient>,
    /// How many attempts were recorded, this one included (more than one:
    /// a retry, a hedge or a timeout came first).
    pub attempts: usize,
}

/// Why no response could be had.
#[derive(Debug)]
pub enum Failure {
    /// The pin names no configured path.
    UnknownPin(String),
    /// Every attempt failed, or the deadline passed.
    Exhausted {
        attempts: Vec<AttemptRecord>,
        deadline_passed: bool,
    },
}

/// Sends requests over the best paths.
pub struct Forwarder {
    runtime: ArcSwap<Runtime>,
    budget: RetryBudget,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    pub fn new(runtime: Runtime, metrics: Arc<Metrics>) -> Forwarder {
        let f = &runtime.config.forward;
        let budget = RetryBudget::new(f.retry_budget_ratio, f.retry_budget_min_per_sec);
        Forwarder {
            runtime: ArcSwap::from_pointee(runtime),
            budget,
            metrics,
        }
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Swaps in a new runtime (reload). Requests in flight keep the old one.
    pub fn replace(&self, runtime: Runtime) {
        self.runtime.store(Arc::new(runtime));
    }

    /// Sends `out` and returns the first response, or why there is none.
    ///
    /// An attempt that has no answer within its attempt timeout does not stop:
    /// the next path is tried beside it and the first answer wins, so a slow
    /// but working control plane is never turned into a failure. An attempt
    /// that fails outright (connect error, reset, refusal) moves the request
    /// on at once. Emergency requests race the two best paths from the start
    /// and skip the budget. See `docs/failover.md`.
    pub async fn forward(&self, out: Outbound) -> Result<Answer, Failure> {
        let rt = self.runtime.load_full();
        let candidates = self.candidates(&rt, &out)?;
        let Some(&first) = candidates.first() else {
            return Err(Failure::Exhausted {
                attempts: Vec::new(),
                deadline_passed: false,
            });
        };
        self.budget.request();
        let mut race = Race::new(self, &rt, &out, candidates, attempt::run_attempt);
        race.launch("first");
        if out.emergency {
            race.launch("hedge");
        }
        let mut hedge_at = (rt.config.forward.hedge && !out.emergency && race.more())
            .then(|| Instant::now() + self.hedge_delay(&rt, first));
        loop {
            match race.next_event(hedge_at).await {
                Event::Done(id, Ok(resp)) => {
                    if let Some(answer) = race.answered(id, resp) {
                        return Ok(answer);
                    }
                }
                Event::Done(id, Err((kind, msg))) => {
                    if let Some(failure) = race.failed(id, kind, msg) {
                        return Err(failure);
                    }
                }
                Event::TimedOut(id) => race.timed_out(id),
                Event::Hedge => {
                    hedge_at = None;
                    race.extra("hedge", false);
                }
                Event::Deadline => return Err(race.deadline_passed()),
            }
        }
    }

    /// The paths `out` may take, best first: the pinned one, or all enabled.
    fn candidates(&self, rt: &Runtime, out: &Outbound) -> Result<Candidates, Failure> {
        candidates(rt, out.pin.as_ref())
    }

    /// Attempt timeout for path `i`: `factor` x its recent p99, within the
    /// configured bounds, and never past the request's deadline.
    fn attempt_timeout(&self, rt: &Runtime, i: usize, deadline: Instant) -> Duration {
        let f = &rt.config.forward;
        let adaptive = match rt.health.p99(i) {
            Some(p99) => p99
                .mul_f64(f.attempt_timeout_factor)
                .clamp(f.attempt_timeout_min, f.attempt_timeout_max),
            None => f.attempt_timeout_max,
        };
        adaptive.min(deadline.saturating_duration_since(Instant::now()))
    }

    /// Hedge delay for a request on path `i`: twice the median of its
    /// recent request latencies plus [`HEDGE_MARGIN`], at most a third of
    /// the minimum attempt timeout (50 ms by default). The median, not a
    /// tail quantile: a lossy path's stalls fill its tail, and a delay made
    /// of the tail would grow with the very fault it should cut short.
    fn hedge_delay(&self, rt: &Runtime, i: usize) -> Duration {
        let f = &rt.config.forward;
        let ceiling = f.attempt_timeout_min / 3;
        let snap = rt.health.snapshot();
        snap.paths
            .get(i)
            .and_then(|p| p.request_p50.or(p.rtt))
            .map_or(ceiling, |p50| {
                (Duration::from_secs_f64(p50 * 2.0) + HEDGE_MARGIN).min(ceiling)
            })
    }
}

/// What a hedge waits beyond twice a path's median request latency: above
/// the healthy spread of a quiet path, so few healthy requests are hedged,
/// and far below a lost segment's repair (a tail-loss probe or a timeout).
pub const HEDGE_MARGIN: Duration = Duration::from_millis(3);

/// The paths a request pinned to `pin` (its `X-Detour-Pin`, else
/// `forward.pin`) may take, best first: the pinned one, or every enabled
/// path in rank order. Upgraded streams choose theirs the same way.
pub(crate) fn candidates(rt: &Runtime, pin: Option<&String>) -> Result<Candidates, Failure> {
    match pin.or(rt.config.forward.pin.as_ref()) {
        Some(p) => {
            // `via:maa` names that route to every endpoint (best first);
            // `via:maa@<endpoint>` one path.
            let pinned = |i: &usize| {
                rt.paths.get(*i).is_some_and(|c| {
                    *c.name == **p
                        || c.name
                            .strip_prefix(p.as_str())
                            .is_some_and(|r| r.starts_with('@'))
                })
            };
            let snapshot = rt.health.snapshot();
            let ranked = &snapshot.ranked;
            let mut v: Vec<usize> = ranked.iter().copied().filter(pinned).collect();
            // A drained (disabled) path is not ranked, yet may be pinned.
            let drained: Vec<usize> = (0..rt.paths.len())
                .filter(|i| pinned(i) && !ranked.contains(i))
                .collect();
            v.extend(drained);
            if v.is_empty() {
                Err(Failure::UnknownPin(p.clone()))
            } else {
                Ok(Candidates::Own(v))
            }
        }
        None => Ok(Candidates::Ranked(rt.health.snapshot())),
    }
}

/// The paths a request may take, best first (indices into the path table):
/// the health table's ranking itself, shared rather than copied (most
/// requests take it whole, and a copy cost each an allocation), or a list
/// of the request's own (a pin; a path put back for a second try).
pub(crate) enum Candidates {
    Ranked(Arc<Snapshot>),
    Own(Vec<usize>),
}

impl Candidates {
    /// Puts path `i` at position `at`, copying the ranking first if shared.
    fn insert(&mut self, at: usize, i: usize) {
        if let Candidates::Ranked(s) = self {
            *self = Candidates::Own(s.ranked.clone());
        }
        if let Candidates::Own(v) = self {
            v.insert(at, i);
        }
    }
}

impl std::ops::Deref for Candidates {
    type Target = [usize];

    fn deref(&self) -> &[usize] {
        match self {
            Candidates::Ranked(s) => &s.ranked,
            Candidates::Own(v) => v,
        }
    }
}

#[cfg(test)]
mod tests;

//! One request's race: attempts on the candidate paths in rank order, each
//! with its own timeout, the first answer winning. Every attempt's end is
//! evidence for its path's health, including the losers', which are watched
//! in the background after the winner has been returned.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use smallvec::SmallVec;
use tokio::time::Instant;

use super::attempt::{AttemptResult, build_request};
use super::{Answer, AttemptRecord, Candidates, Failure, Forwarder, Outbound, Runtime};
use crate::health::{FailureKind, Outcome};
use crate::paths::PathClient;

/// How an attempt is started (`attempt::run_attempt`, whose future's type
/// has no name: the race is generic over it, so its boxes hold that type
/// rather than a `dyn Future`).
type Start<F> = fn(u64, Arc<PathClient>, Request<Full<Bytes>>) -> F;

/// The attempts in flight. A request has one, or a few with retries and
/// hedges, so each is boxed once and all are polled when any of them wakes.
/// A `FuturesUnordered` cost every request three allocations, two of them
/// 1.5 KB (its queue's stub and the attempt's task).
struct InFlight<F>(SmallVec<[Pin<Box<F>>; 3]>);

impl<F> Default for InFlight<F> {
    fn default() -> Self {
        InFlight(SmallVec::new())
    }
}

impl<F: Future<Output = AttemptResult>> InFlight<F> {
    fn push(&mut self, attempt: F) {
        self.0.push(Box::pin(attempt));
    }

    /// The next attempt to end; `None` once there are none (as a stream's
    /// end, so that a `select!` branch waiting on it is disabled).
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<AttemptResult>> {
        for i in 0..self.0.len() {
            if let Poll::Ready(out) = self.0[i].as_mut().poll(cx) {
                self.0.swap_remove(i);
                return Poll::Ready(Some(out));
            }
        }
        if self.0.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }

    async fn next(&mut self) -> Option<AttemptResult> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

/// An attempt still waiting for its answer.
#[derive(Debug, Clone)]
struct Pending {
    path: usize,
    kind: &'static str,
    started: Instant,
    /// Past this the attempt counts as timed out: the next path is tried,
    /// but this one may still win.
    timeout_at: Instant,
    timed_out: bool,
}

/// What the race waits for next.
pub(super) enum Event {
    /// Attempt `id` ended.
    Done(u64, Result<Response<Incoming>, (FailureKind, String)>),
    /// Attempt `id` ran past its timeout (it keeps running).
    TimedOut(u64),
    /// Time to hedge.
    Hedge,
    /// The request's deadline passed.
    Deadline,
}

pub(super) struct Race<'a, F> {
    fwd: &'a Forwarder,
    rt: &'a Arc<Runtime>,
    out: &'a Outbound,
    candidates: Candidates,
    /// Index into `candidates` of the next path to try.
    next: usize,
    ids: u64,
    deadline: Instant,
    start: Start<F>,
    inflight: InFlight<F>,
    pending: Vec<(u64, Pending)>,
    attempts: Vec<AttemptRecord>,
    /// Whether a path whose connection broke was put back (once a request).
    again: bool,
    /// That path's failure, held until its second try tells whether the
    /// path or only the connection failed.
    deferred: Option<(usize, FailureKind)>,
}

impl<'a, F> Race<'a, F>
where
    F: Future<Output = AttemptResult> + Send + 'static,
{
    pub(super) fn new(
        fwd: &'a Forwarder,
        rt: &'a Arc<Runtime>,
        out: &'a Outbound,
        candidates: Candidates,
        start: Start<F>,
    ) -> Race<'a, F> {
        Race {
            fwd,
            rt,
            out,
            candidates,
            next: 0,
            ids: 0,
            deadline: out.received + rt.config.forward.deadline,
            start,
            inflight: InFlight::default(),
            pending: Vec::new(),
            attempts: Vec::new(),
            again: false,
            deferred: None,
        }
    }

    /// Whether a candidate path is left to try.
    pub(super) fn more(&self) -> bool {
        self.next < self.candidates.len()
    }

    /// Starts an attempt on the next candidate path, if there is one.
    pub(super) fn launch(&mut self, kind: &'static str) {
        let Some(&i) = self.candidates.get(self.next) else {
            return;
        };
        self.next += 1;
        let path = self.rt.paths[i].clone();
        let started = Instant::now();
        let timeout = self.fwd.attempt_timeout(self.rt, i, self.deadline);
        let req = build_request(&path, self.out);
        self.ids += 1;
        self.pending.push((
            self.ids,
            Pending {
                path: i,
                kind,
                started,
                timeout_at: started + timeout,
                timed_out: false,
            },
        ));
        self.inflight.push((self.start)(self.ids, path, req));
    }

    /// A retry or hedge on the next path, paid from the retry budget unless
    /// `free`.
    pub(super) fn extra(&mut self, kind: &'static str, free: bool) {
        if !self.more() {
            return;
        }
        if free || self.fwd.budget.try_spend() {
            self.launch(kind);
        } else {
            self.fwd.metrics.budget_exhausted.inc();
        }
    }

    /// Waits for the next attempt to end, the earliest attempt timeout, the
    /// hedge time, or the deadline. One timer, at the earliest of the three:
    /// a request answered in time registers and cancels one, not three.
    pub(super) async fn next_event(&mut self, hedge_at: Option<Instant>) -> Event {
        let next_timeout = self
            .pending
            .iter()
            .filter(|(_, p)| !p.timed_out)
            .map(|(id, p)| (p.timeout_at, *id))
            .min();
        let wake = [next_timeout.map(|t| t.0), hedge_at]
            .into_iter()
            .flatten()
            .fold(self.deadline, Instant::min);
        tokio::select! {
            biased;
            Some((id, result)) = self.inflight.next() => Event::Done(id, result),
            () = tokio::time::sleep_until(wake) => match next_timeout {
                // The deadline ends everything, even an attempt timing out
                // at the same moment (an attempt's timeout is capped at it).
                _ if self.deadline <= wake => Event::Deadline,
                Some((at, id)) if at <= wake => Event::TimedOut(id),
                _ => Event::Hedge,
            },
        }
    }

    fn take(&mut self, id: u64) -> Option<Pending> {
        let pos = self.pending.iter().position(|(x, _)| *x == id)?;
        Some(self.pending.remove(pos).1)
    }

    /// Attempt `id` was answered: the request's answer. The attempts still
    /// running are settled in the background.
    pub(super) fn answered(&mut self, id: u64, resp: Response<Incoming>) -> Option<Answer> {
        let p = self.take(id)?;
        let path = &self.rt.paths[p.path];
        // A path put back after its connection broke, and answered on a new
        // one: the connection failed (a relay restarted on purpose, a
        // replica went away), not the path. Another path's answer proves
        // nothing about it.
        if let Some((dp, dk)) = self.deferred.take()
            && dp != p.path
        {
            self.rt.health.record(dp, Outcome::Failed(dk));
        }
        // A late winner proves little about its path; an answer in time is
        // good evidence.
        if !p.timed_out {
            self.rt
                .health
                .record(p.path, Outcome::Answered(p.started.elapsed()));
        }
        let metrics = &self.fwd.metrics;
        match path.counters(metrics).attempt_ok(p.kind) {
            Some(c) => c.inc(),
            None => metrics
                .attempts
                .with_label_values(&[&*path.name, p.kind, "ok"])
                .inc(),
        }
        // The records of the attempts before this one, and this one.
        let attempts = self.attempts.len() + 1;
        self.settle_losers();
        Some(Answer {
            response: resp,
            path: path.clone(),
            attempts,
        })
    }

    /// Attempt `id` failed outright: the next path is tried at once. The
    /// request fails when nothing is left running.
    pub(super) fn failed(&mut self, id: u64, kind: FailureKind, msg: String) -> Option<Failure> {
        let p = self.take(id)?;
        let path = &self.rt.paths[p.path];
        let connection_gone = matches!(kind, FailureKind::Broken | FailureKind::Refused);
        let again = connection_gone && !self.again && !self.pending.iter().any(|(_, q)| q.path == p.path);
        if again {
            self.deferred = Some((p.path, kind));
        } else {
            if let Some((dp, dk)) = self.deferred.take_if(|(dp, _)| *dp == p.path) {
                self.rt.health.record(dp, Outcome::Failed(dk));
            }
            self.rt.health.record(p.path, Outcome::Failed(kind));
        }
        self.fwd
            .metrics
            .attempts
            .with_label_values(&[&*path.name, p.kind, "failed"])
            .inc();
        tracing::debug!(path = %path.name, kind = p.kind, error = %msg, "attempt failed");
        self.attempts.push(record(path, p.kind, msg, self.out.received));
        if again {
            // The connection under the attempt broke (a peer's relay that
            // restarted and closed its tunnels) or is going away (a control
            // plane replica's GOAWAY as it shuts down): the path may well
            // work on a new connection, and the next attempt on it finds
            // out. Once a request.
            self.again = true;
            self.candidates.insert(self.next, p.path);
        }
        if Instant::now() < self.deadline {
            // Nothing was sent when a connect fails, so the retry duplicates
            // no work and costs no budget.
            self.extra("retry", self.out.emergency || kind == FailureKind::Connect);
        }
        if !self
            .pending
            .iter()
            .any(|(_, q)| Some(q.path) == self.deferred.map(|d| d.0))
            && let Some((dp, dk)) = self.deferred.take()
        {
            // Its second try did not start (no budget, no time): the failure
            // counts as it was.
            self.rt.health.record(dp, Outcome::Failed(dk));
        }
        self.pending.is_empty().then(|| Failure::Exhausted {
            attempts: std::mem::take(&mut self.attempts),
            deadline_passed: false,
        })
    }

    /// Attempt `id` ran past its timeout: the next path is tried beside it.
    pub(super) fn timed_out(&mut self, id: u64) {
        if let Some((_, p)) = self.pending.iter_mut().find(|(x, _)| *x == id) {
            p.timed_out = true;
            let name = self.rt.paths[p.path].name.clone();
            tracing::debug!(path = %name, "attempt timed out; trying the next path beside it");
            let waited = p.timeout_at.duration_since(p.started).as_millis();
            self.attempts.push(AttemptRecord {
                path: name.to_string(),
                kind: p.kind,
                result: format!("no answer within {waited}ms (kept waiting)"),
                elapsed_ms: self.out.received.elapsed().as_millis() as u64,
            });
        }
        self.extra("retry", self.out.emergency);
    }

    /// The deadline passed: every attempt still running failed.
    pub(super) fn deadline_passed(&mut self) -> Failure {
        if let Some((dp, dk)) = self.deferred.take() {
            self.rt.health.record(dp, Outcome::Failed(dk));
        }
        for (_, p) in &self.pending {
            self.rt
                .health
                .record(p.path, Outcome::Failed(FailureKind::Timeout));
            let path = &self.rt.paths[p.path];
            self.fwd
                .metrics
                .attempts
                .with_label_values(&[&*path.name, p.kind, "failed"])
                .inc();
            self.attempts.push(record(
                path,
                p.kind,
                "still no answer at the deadline".to_owned(),
                self.out.received,
            ));
        }
        Failure::Exhausted {
            attempts: std::mem::take(&mut self.attempts),
            deadline_passed: true,
        }
    }

    /// Decides what the attempts that lost the race say about their paths.
    /// One that had already run past its timeout when another path answered
    /// failed. The others are watched in the background until their own
    /// timeout: an answer in time is good evidence, none is a failure. Their
    /// responses are discarded.
    fn settle_losers(&mut self) {
        let (rt, metrics) = (self.rt.clone(), self.fwd.metrics.clone());
        let mut pending = std::mem::take(&mut self.pending);
        pending.retain(|(_, p)| {
            if p.timed_out {
                rt.health.record(p.path, Outcome::Failed(FailureKind::Timeout));
                metrics
                    .attempts
                    .with_label_values(&[&*rt.paths[p.path].name, p.kind, "failed"])
                    .inc();
            }
            !p.timed_out
        });
        if pending.is_empty() {
            return;
        }
        let mut inflight = std::mem::take(&mut self.inflight);
        tokio::spawn(async move {
            while let Some((first_deadline, first_id)) =
                pending.iter().map(|(id, p)| (p.timeout_at, *id)).min()
            {
                tokio::select! {
                    Some((id, result)) = inflight.next() => {
                        let Some(pos) = pending.iter().position(|(x, _)| *x == id) else { continue };
                        let (_, p) = pending.remove(pos);
                        let (outcome, label) = match result {
                            Ok(_) => (Outcome::Answered(p.started.elapsed()), "discarded"),
                            Err((k, _)) => (Outcome::Failed(k), "failed"),
                        };
                        rt.health.record(p.path, outcome);
                        metrics.attempts.with_label_values(&[&*rt.paths[p.path].name, p.kind, label]).inc();
                    }
                    _ = tokio::time::sleep_until(first_deadline) => {
                        if let Some(pos) = pending.iter().position(|(x, _)| *x == first_id) {
                            let (_, p) = pending.remove(pos);
                            rt.health.record(p.path, Outcome::Failed(FailureKind::Timeout));
                            metrics.attempts.with_label_values(&[&*rt.paths[p.path].name, p.kind, "failed"]).inc();
                        }
                    }
                }
            }
        });
    }
}

fn record(path: &PathClient, kind: &'static str, result: String, received: Instant) -> AttemptRecord {
    AttemptRecord {
        path: path.name.to_string(),
        kind,
        result,
        elapsed_ms: received.elapsed().as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;
    use tokio::sync::oneshot;

    use super::*;

    async fn attempt(id: u64, done: oneshot::Receiver<()>) -> AttemptResult {
        let _ = done.await;
        (id, Err((FailureKind::Timeout, String::new())))
    }

    #[tokio::test]
    async fn attempts_end_as_they_finish_and_the_set_ends_when_all_have() {
        let mut set = InFlight::default();
        assert!(set.next().await.is_none(), "an empty set has ended");
        let (first, first_rx) = oneshot::channel();
        let (second, second_rx) = oneshot::channel();
        set.push(attempt(1, first_rx));
        set.push(attempt(2, second_rx));
        assert!(set.next().now_or_never().is_none(), "nothing has finished yet");
        second.send(()).unwrap();
        assert_eq!(set.next().await.map(|r| r.0), Some(2));
        assert!(set.next().now_or_never().is_none(), "the first is still running");
        first.send(()).unwrap();
        assert_eq!(set.next().await.map(|r| r.0), Some(1));
        assert!(set.next().await.is_none());
    }
}

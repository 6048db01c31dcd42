//! Forwarding: sends one call-handler request to the control plane over the
//! ranked paths, with adaptive attempt timeouts, retries on another path,
//! hedging, and a retry budget. `docs/failover.md` describes this policy; keep
//! the two in step.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;
use tokio::time::Instant;

use crate::config::AgentConfig;
use crate::health::{FailureKind, HealthTable, Outcome};
use crate::metrics::Metrics;
use crate::paths::{PathClient, dial_error};

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
    /// Path and query on the control plane, base path included.
    pub path_and_query: http::uri::PathAndQuery,
    /// Headers to send (hop-by-hop removed, `Host` set, keys added).
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
    pub path: Arc<str>,
    pub attempts: Vec<AttemptRecord>,
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

/// Sends requests over the best paths.
pub struct Forwarder {
    runtime: ArcSwap<Runtime>,
    budget: RetryBudget,
    metrics: Arc<Metrics>,
}

type AttemptResult = (u64, Result<Response<Incoming>, (FailureKind, String)>);

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
    /// on at once. See `docs/failover.md`.
    pub async fn forward(&self, out: Outbound) -> Result<Answer, Failure> {
        let rt = self.runtime.load_full();
        let cfg = &rt.config.forward;
        let snap = rt.health.snapshot();
        let pin = out.pin.clone().or_else(|| cfg.pin.clone());
        let candidates: Vec<usize> = match &pin {
            Some(p) => match rt.paths.iter().position(|c| &*c.name == p) {
                Some(i) => vec![i],
                None => return Err(Failure::UnknownPin(p.clone())),
            },
            None => snap.ranked.clone(),
        };
        let deadline = out.received + cfg.deadline;
        let mut attempts = Vec::new();
        if candidates.is_empty() {
            return Err(Failure::Exhausted {
                attempts,
                deadline_passed: false,
            });
        }
        self.budget.request();

        let mut inflight = FuturesUnordered::new();
        let mut pending: Vec<(u64, Pending)> = Vec::new();
        let mut next = 0usize;
        let mut ids = 0u64;
        let mut launch = |i: usize,
                          kind: &'static str,
                          inflight: &mut FuturesUnordered<_>,
                          pending: &mut Vec<(u64, Pending)>| {
            let path = rt.paths[i].clone();
            let started = Instant::now();
            let timeout = self.attempt_timeout(&rt, i, deadline);
            let req = build_request(&path, &out);
            ids += 1;
            pending.push((
                ids,
                Pending {
                    path: i,
                    kind,
                    started,
                    timeout_at: started + timeout,
                    timed_out: false,
                },
            ));
            inflight.push(run_attempt(ids, path, req));
        };
        launch(candidates[next], "first", &mut inflight, &mut pending);
        next += 1;
        if out.emergency && next < candidates.len() {
            // Emergency requests do not wait: the two best paths race. They
            // are few and must never be refused, so they skip the budget.
            launch(candidates[next], "hedge", &mut inflight, &mut pending);
            next += 1;
        }
        let mut hedge_at = if cfg.hedge && !out.emergency && next < candidates.len() {
            Some(Instant::now() + self.hedge_delay(&rt, candidates[0]))
        } else {
            None
        };

        loop {
            let next_timeout = pending
                .iter()
                .filter(|(_, p)| !p.timed_out)
                .map(|(id, p)| (p.timeout_at, *id))
                .min();
            tokio::select! {
                Some((id, result)) = inflight.next() => {
                    let Some(pos) = pending.iter().position(|(x, _)| *x == id) else { continue };
                    let (_, p) = pending.remove(pos);
                    let path = &rt.paths[p.path];
                    match result {
                        Ok(resp) => {
                            // A late winner proves little about its path; an
                            // answer in time is good evidence.
                            if !p.timed_out {
                                rt.health.record(p.path, Outcome::Answered(p.started.elapsed()));
                            }
                            self.metrics.attempts.with_label_values(&[&*path.name, p.kind, "ok"]).inc();
                            let status = resp.status().as_u16();
                            attempts.push(record(path, p.kind, format!("answered {status}"), out.received));
                            self.settle_losers(&rt, inflight, pending);
                            return Ok(Answer { response: resp, path: path.name.clone(), attempts });
                        }
                        Err((kind_failed, msg)) => {
                            rt.health.record(p.path, Outcome::Failed(kind_failed));
                            self.metrics.attempts.with_label_values(&[&*path.name, p.kind, "failed"]).inc();
                            tracing::debug!(path = %path.name, kind = p.kind, error = %msg, "attempt failed");
                            attempts.push(record(path, p.kind, msg, out.received));
                            if next < candidates.len() && Instant::now() < deadline {
                                // Nothing was sent when a connect fails, so the
                                // retry duplicates no work and costs no budget.
                                let free = out.emergency || kind_failed == FailureKind::Connect;
                                if free || self.budget.try_spend() {
                                    launch(candidates[next], "retry", &mut inflight, &mut pending);
                                    next += 1;
                                } else {
                                    self.metrics.budget_exhausted.inc();
                                }
                            }
                            if pending.is_empty() {
                                return Err(Failure::Exhausted { attempts, deadline_passed: false });
                            }
                        }
                    }
                }
                _ = sleep_until_opt(next_timeout.map(|t| t.0)), if next_timeout.is_some() => {
                    let id = next_timeout.map(|t| t.1).unwrap_or_default();
                    if let Some((_, p)) = pending.iter_mut().find(|(x, _)| *x == id) {
                        p.timed_out = true;
                        let name = rt.paths[p.path].name.clone();
                        tracing::debug!(path = %name, "attempt timed out; trying the next path beside it");
                        let waited = p.timeout_at.duration_since(p.started).as_millis();
                        attempts.push(AttemptRecord {
                            path: name.to_string(),
                            kind: p.kind,
                            result: format!("no answer within {waited}ms (kept waiting)"),
                            elapsed_ms: out.received.elapsed().as_millis() as u64,
                        });
                    }
                    if next < candidates.len() {
                        if out.emergency || self.budget.try_spend() {
                            launch(candidates[next], "retry", &mut inflight, &mut pending);
                            next += 1;
                        } else {
                            self.metrics.budget_exhausted.inc();
                        }
                    }
                }
                _ = sleep_until_opt(hedge_at), if hedge_at.is_some() => {
                    hedge_at = None;
                    if next < candidates.len() {
                        if self.budget.try_spend() {
                            launch(candidates[next], "hedge", &mut inflight, &mut pending);
                            next += 1;
                        } else {
                            self.metrics.budget_exhausted.inc();
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    for (_, p) in &pending {
                        rt.health.record(p.path, Outcome::Failed(FailureKind::Timeout));
                        let path = &rt.paths[p.path];
                        self.metrics.attempts.with_label_values(&[&*path.name, p.kind, "failed"]).inc();
                        attempts.push(record(path, p.kind, "still no answer at the deadline".to_owned(), out.received));
                    }
                    return Err(Failure::Exhausted { attempts, deadline_passed: true });
                }
            }
        }
    }

    /// Decides what the attempts that lost the race say about their paths.
    /// One that had already run past its timeout when another path answered
    /// failed. The others are watched in the background until their own
    /// timeout: an answer in time is good evidence, none is a failure. Their
    /// responses are discarded.
    fn settle_losers<F>(
        &self,
        rt: &Arc<Runtime>,
        mut inflight: FuturesUnordered<F>,
        mut pending: Vec<(u64, Pending)>,
    ) where
        F: Future<Output = AttemptResult> + Send + 'static,
    {
        pending.retain(|(_, p)| {
            if p.timed_out {
                rt.health.record(p.path, Outcome::Failed(FailureKind::Timeout));
                self.metrics
                    .attempts
                    .with_label_values(&[&*rt.paths[p.path].name, p.kind, "failed"])
                    .inc();
            }
            !p.timed_out
        });
        if pending.is_empty() {
            return;
        }
        let rt = rt.clone();
        let metrics = self.metrics.clone();
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

    /// Hedge delay for a request on path `i`: the p95 of its recent request
    /// latencies, at least a third of the minimum attempt timeout.
    fn hedge_delay(&self, rt: &Runtime, i: usize) -> Duration {
        let f = &rt.config.forward;
        let floor = f.attempt_timeout_min / 3;
        let snap = rt.health.snapshot();
        snap.paths
            .get(i)
            .and_then(|p| p.request_p95.or(p.p95))
            .map_or(floor, |p95| Duration::from_secs_f64(p95).max(floor))
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
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

fn build_request(path: &PathClient, out: &Outbound) -> Request<Full<Bytes>> {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(path.scheme.clone());
    uri.authority = path.authority.clone();
    uri.path_and_query = Some(out.path_and_query.clone());
    let mut req = Request::new(Full::new(out.body.clone()));
    *req.method_mut() = out.method.clone();
    *req.uri_mut() = http::Uri::from_parts(uri).unwrap_or_default();
    *req.headers_mut() = out.headers.clone();
    req
}

async fn run_attempt(id: u64, path: Arc<PathClient>, req: Request<Full<Bytes>>) -> AttemptResult {
    let result = match path.client.request(req).await {
        Ok(resp) => Ok(resp),
        Err(e) => Err(classify(&e)),
    };
    (id, result)
}

/// Turns a client error into a failure kind and a message a person can read.
pub fn classify(e: &hyper_util::client::legacy::Error) -> (FailureKind, String) {
    if let Some(d) = dial_error(e) {
        let kind = if matches!(d, crate::paths::DialError::Timeout { .. }) {
            FailureKind::Timeout
        } else {
            FailureKind::Connect
        };
        return (kind, d.to_string());
    }
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    if e.is_connect() {
        (FailureKind::Connect, msg)
    } else if refused_by_far_end(e) {
        (FailureKind::Refused, msg)
    } else {
        (FailureKind::Broken, msg)
    }
}

/// Whether the control plane's HTTP/2 side refused this stream or closed the
/// connection with a GOAWAY: it answered at the protocol level, so the bytes
/// got through and the path is not to blame.
fn refused_by_far_end(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_remote() && (h2.is_go_away() || h2.is_reset());
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    /// An HTTP/2 server on loopback that refuses every stream with an
    /// RST_STREAM carrying `reason`.
    async fn refusing_server(reason: h2::Reason) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                respond.send_reset(reason);
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_refusal_by_the_control_plane_is_not_a_broken_path() {
        for reason in [h2::Reason::REFUSED_STREAM, h2::Reason::ENHANCE_YOUR_CALM] {
            let addr = refusing_server(reason).await;
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http();
            let err = client
                .get(format!("http://{addr}/v1/x").parse().unwrap())
                .await
                .expect_err("refused");
            let (kind, msg) = classify(&err);
            assert_eq!(kind, FailureKind::Refused, "{reason:?}: {msg}");
        }
        // A connection that cannot be made stays a connect failure.
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = dead.local_addr().unwrap();
        drop(dead);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let err = client
            .get(format!("http://{addr}/").parse().unwrap())
            .await
            .expect_err("nothing listens");
        assert_eq!(classify(&err).0, FailureKind::Connect);
    }
}

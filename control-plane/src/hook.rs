//! Hook: the optional external routing hook of a rule, with a short timeout
//! and a per-URL circuit breaker. Any failure means the rule's static choice
//! is used and the decision says it fell back.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::HookConfig;
use crate::metrics::Metrics;
use crate::routing::{Decision, HookSpec, Rule};

/// Circuit breaker of one hook URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Breaker {
    /// Consecutive failures since the last success.
    pub failures: u32,
    /// While set and in the future, calls are skipped.
    pub open_until: Option<Instant>,
    /// A half-open trial call is in flight; others keep skipping.
    pub trial: bool,
}

/// Whether a hook call may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Closed: call.
    Call,
    /// Half-open: this call is the single trial.
    Trial,
    /// Open: skip and fall back.
    Skip,
}

impl Breaker {
    /// Decides whether a call may go out at `now`.
    pub fn permit(&mut self, now: Instant) -> Permit {
        match self.open_until {
            None => Permit::Call,
            Some(until) if now < until => Permit::Skip,
            Some(_) if self.trial => Permit::Skip,
            Some(_) => {
                self.trial = true;
                Permit::Trial
            }
        }
    }

    /// Records an outcome: a success closes the breaker; `threshold`
    /// consecutive failures, or a failed trial, open it for `open_for`.
    pub fn record(&mut self, ok: bool, now: Instant, threshold: u32, open_for: Duration) {
        let was_trial = self.trial;
        self.trial = false;
        if ok {
            *self = Breaker::default();
            return;
        }
        self.failures = self.failures.saturating_add(1);
        if was_trial || self.failures >= threshold {
            self.open_until = Some(now + open_for);
        }
    }
}

/// What the hook is sent.
#[derive(Debug, Serialize)]
pub struct HookRequest<'a> {
    pub call_id: &'a str,
    pub rule: &'a str,
    pub caller: Option<&'a str>,
    pub destination: &'a str,
    pub call_type: &'a str,
    pub priority: &'a str,
    pub metadata: &'a serde_json::Value,
    /// The rule's own choice, for hooks that only sometimes override it.
    #[serde(rename = "static")]
    pub static_decision: &'a Decision,
}

/// What the hook answers (HTTP 2xx, JSON).
#[derive(Debug, Deserialize)]
struct HookAnswer {
    trunk: String,
    #[serde(default)]
    pop: Option<String>,
}

/// The routing decision after the hook.
#[derive(Debug, Clone, PartialEq)]
pub struct HookOutcome {
    pub decision: Decision,
    /// `None` when the hook answered; otherwise why the static route was used.
    pub fallback: Option<String>,
}

/// Calls hooks and keeps their breakers.
pub struct Hooks {
    client: reqwest::Client,
    config: HookConfig,
    breakers: Mutex<HashMap<String, Breaker>>,
}

impl Hooks {
    /// A hook caller; `rustls` must have a process-wide provider (ring) or
    /// HTTPS hooks fail (and fall back).
    pub fn new(config: HookConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(30))
            .connect_timeout(config.timeout)
            .build()?;
        Ok(Self {
            client,
            config,
            breakers: Mutex::new(HashMap::new()),
        })
    }

    /// Asks the rule's hook for the trunk; falls back to `fallback` on
    /// timeout, error, a bad answer or an open breaker.
    pub async fn decide(
        &self,
        hook: &HookSpec,
        rule: &Rule,
        request: &HookRequest<'_>,
        fallback: Decision,
        metrics: &Metrics,
    ) -> HookOutcome {
        let permit = self
            .breakers
            .lock()
            .await
            .entry(hook.url.clone())
            .or_default()
            .permit(Instant::now());
        if permit == Permit::Skip {
            metrics.hook.with_label_values(&["breaker_open"]).inc();
            return HookOutcome {
                decision: fallback,
                fallback: Some("hook circuit breaker open".into()),
            };
        }
        let timeout = hook.timeout.unwrap_or(self.config.timeout);
        let result = tokio::time::timeout(timeout, self.call(&hook.url, request)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(("timeout", format!("hook timed out after {timeout:?}"))),
        };
        let ok = result.is_ok();
        self.breakers
            .lock()
            .await
            .entry(hook.url.clone())
            .or_default()
            .record(
                ok,
                Instant::now(),
                self.config.failure_threshold,
                self.config.open_for,
            );
        match result {
            Ok(answer) => {
                metrics.hook.with_label_values(&["ok"]).inc();
                let mut decision = rule.decision_with(answer.trunk);
                if let Some(pop) = answer.pop {
                    decision.pop = pop;
                }
                HookOutcome {
                    decision,
                    fallback: None,
                }
            }
            Err((outcome, reason)) => {
                metrics.hook.with_label_values(&[outcome]).inc();
                HookOutcome {
                    decision: fallback,
                    fallback: Some(reason),
                }
            }
        }
    }

    async fn call(&self, url: &str, request: &HookRequest<'_>) -> Result<HookAnswer, (&'static str, String)> {
        let resp = self
            .client
            .post(url)
            .json(request)
            .send()
            .await
            .map_err(|e| ("error", format!("hook request failed: {e}")))?;
        if !resp.status().is_success() {
            return Err(("error", format!("hook answered HTTP {}", resp.status().as_u16())));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ("error", format!("hook body: {e}")))?;
        let answer: HookAnswer = serde_json::from_slice(&bytes)
            .map_err(|e| ("bad_answer", format!("hook answer is not {{\"trunk\": …}}: {e}")))?;
        let valid = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        if !valid(&answer.trunk) || !answer.pop.as_deref().is_none_or(valid) {
            return Err(("bad_answer", "hook answered an invalid trunk or pop name".into()));
        }
        Ok(answer)
    }

    /// The breaker state of a hook URL (tests, status).
    pub async fn breaker(&self, url: &str) -> Breaker {
        self.breakers.lock().await.get(url).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_threshold_and_half_opens_once() {
        let open_for = Duration::from_secs(10);
        let mut b = Breaker::default();
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.permit(t0), Permit::Call);
            b.record(false, t0, 3, open_for);
        }
        assert_eq!(b.permit(t0), Permit::Call);
        b.record(false, t0, 3, open_for);
        assert_eq!(b.permit(t0), Permit::Skip);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(b.permit(Instant::now()), Permit::Skip);
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = Instant::now();
        assert_eq!(b.permit(now), Permit::Trial);
        assert_eq!(b.permit(now), Permit::Skip, "one trial at a time");
        b.record(false, now, 3, open_for);
        assert_eq!(b.permit(now), Permit::Skip, "failed trial reopens");
        tokio::time::advance(open_for).await;
        let now = Instant::now();
        assert_eq!(b.permit(now), Permit::Trial);
        b.record(true, now, 3, open_for);
        assert_eq!(b, Breaker::default());
        assert_eq!(b.permit(now), Permit::Call);
    }

    #[test]
    fn success_resets_the_failure_count() {
        let mut b = Breaker::default();
        let now = Instant::now();
        b.record(false, now, 2, Duration::from_secs(1));
        b.record(true, now, 2, Duration::from_secs(1));
        b.record(false, now, 2, Duration::from_secs(1));
        assert_eq!(b.permit(now), Permit::Call);
    }
}

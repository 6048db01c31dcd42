//! Shedding: per-PoP token buckets and the slots for call initiations.
//! Emergency calls are exempt from the one and have reserved room in the
//! other.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::{Mutex, SemaphorePermit};
use tokio::time::Instant;

use super::App;
use super::error::ApiError;
use crate::auth::Principal;
use crate::intake::Priority;

/// Takes one of `who`'s request tokens, or answers 429 with `Retry-After`.
/// The admin token is not limited.
pub(super) async fn rate_limit(app: &App, who: &Principal) -> Result<(), ApiError> {
    if *who == Principal::Admin {
        return Ok(());
    }
    let pop = who.pop();
    if let Err(wait) = app.limiter.check(pop).await {
        app.metrics.rate_limited.with_label_values(&[pop]).inc();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Rate limited",
            format!(
                "PoP {pop} is over {} requests/s on this replica; emergency calls are exempt",
                app.config.limits.per_pop_rps
            ),
        )
        .retry_after(wait.as_secs().max(1)));
    }
    Ok(())
}

/// A slot for one call initiation; dropped when the answer is ready.
pub(super) struct Slot<'a> {
    _permit: SemaphorePermit<'a>,
    gauge: prometheus::IntGauge,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Emergency calls take a reserved slot (or a free normal one) and wait
/// rather than being shed. Normal calls wait in a bounded queue for a
/// bounded time; beyond either bound they are shed with 503.
pub(super) async fn acquire_slot(app: &App, priority: Priority) -> Result<Slot<'_>, ApiError> {
    let class = priority.as_str();
    let permit = if priority == Priority::Emergency {
        match app
            .emergency_slots
            .try_acquire()
            .or_else(|_| app.normal_slots.try_acquire())
        {
            Ok(p) => p,
            Err(_) => app.emergency_slots.acquire().await.map_err(|_| shutting_down())?,
        }
    } else if let Ok(p) = app.normal_slots.try_acquire() {
        p
    } else {
        let waiting = app.normal_waiting.fetch_add(1, Ordering::SeqCst);
        let result = if waiting >= app.config.limits.max_queue {
            Err("queue_full")
        } else {
            match tokio::time::timeout(app.config.limits.queue_timeout, app.normal_slots.acquire()).await {
                Ok(Ok(p)) => Ok(p),
                Ok(Err(_)) => Err("closed"),
                Err(_) => Err("queue_timeout"),
            }
        };
        app.normal_waiting.fetch_sub(1, Ordering::SeqCst);
        match result {
            Ok(p) => p,
            Err(reason) => {
                app.metrics.shed.with_label_values(&[reason]).inc();
                app.metrics.calls.with_label_values(&["normal", "shed"]).inc();
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "Overloaded",
                    "the control plane is saturated and shed this normal-priority call; \
                     retry after the indicated delay",
                )
                .with("reason", reason)
                .retry_after(1));
            }
        }
    };
    let gauge = app.metrics.in_flight.with_label_values(&[class]);
    gauge.inc();
    Ok(Slot {
        _permit: permit,
        gauge,
    })
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting-down",
        "Shutting down",
        "this replica is shutting down; retry on another",
    )
    .retry_after(1)
}

/// Token buckets per PoP. State is per replica: N replicas behind a load
/// balancer allow up to N times the configured rate in total.
pub(super) struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<std::collections::HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub(super) fn new(rps: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rps),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(Default::default()),
        }
    }

    /// Takes one token for `pop`, or says how long until one is available.
    async fn check(&self, pop: &str) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().await;
        let (tokens, last) = buckets.entry(pop.to_owned()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_refills_at_the_configured_rate() {
        let l = RateLimiter::new(10, 5);
        for _ in 0..5 {
            assert!(l.check("blr").await.is_ok());
        }
        let wait = l.check("blr").await.unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(l.check("maa").await.is_ok(), "buckets are per PoP");
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(l.check("blr").await.is_ok());
        assert!(l.check("blr").await.is_ok());
        assert!(l.check("blr").await.is_err());
    }
}

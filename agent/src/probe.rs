//! Gathering evidence about the paths: health probes (the paths a failover
//! would take every `health.interval`, the others every
//! `health.standby_interval`), and the kernel's retransmission counters of
//! the paths' connections (those same paths every 100 ms, the others every
//! second). Both feed the health table.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::forward::{self, Runtime};
use crate::health::{self, Outcome};
use crate::paths;
use crate::runtime::Shared;
use crate::transport;

/// Probes paths with a `GET health.path` on each path's own pooled
/// connection. Every interval (jittered by up to 10%): every `direct` path
/// and the first `health.watched` of the ranking (the active path and its
/// nearest stand-ins, the paths a failover would take), so those are always
/// known to the interval. The other paths (an agent with 100 peers has 97
/// of them) once every `health.standby_interval`, their turns spread over
/// the rounds. And the paths under suspicion
/// ([`crate::health::PathStats::suspect`]) [`BOOST`] times as often as the
/// interval, whatever their rank: a loss test halfway to its verdict, or a
/// path left for loss proving itself clean, decides sooner with more
/// evidence.
pub async fn probe_loop(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut next_round = tokio::time::Instant::now();
    let mut rounds: u64 = 0;
    loop {
        let rt = shared.forwarder.runtime();
        let h = &rt.config.health;
        let interval = h.interval;
        let now = tokio::time::Instant::now();
        let round = now >= next_round;
        if round {
            let jitter = interval.mul_f64(rand::random::<f64>() * 0.1);
            next_round = now + interval - jitter;
            rounds += 1;
        }
        let snapshot = rt.health.snapshot();
        let standby_every = standby_every(h.interval, h.standby_interval);
        for (i, path) in rt.paths.iter().enumerate() {
            let due = round
                && (snapshot.watched(i, h.watched) || (rounds + i as u64).is_multiple_of(standby_every));
            if !(due || snapshot.suspect(i)) {
                continue;
            }
            let rt = rt.clone();
            let path = path.clone();
            let metrics = shared.metrics.clone();
            tokio::spawn(async move {
                let outcome = probe(&rt, &path, i).await;
                let label = match outcome {
                    Outcome::Ok(_) | Outcome::Answered(_) => "ok",
                    Outcome::Slow(_) => "slow",
                    Outcome::Failed(_) => "failed",
                };
                metrics.probes.with_label_values(&[&*path.name, label]).inc();
                rt.health.record(i, outcome);
            });
        }
        let tick = (interval / BOOST).max(Duration::from_millis(10));
        tokio::select! {
            _ = tokio::time::sleep(tick.min(next_round.saturating_duration_since(tokio::time::Instant::now()))) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// A path out of watch is probed every this many rounds: `standby` in
/// rounds of `interval`, rounded up, at least every round.
fn standby_every(interval: Duration, standby: Duration) -> u64 {
    let rounds = standby.as_nanos().div_ceil(interval.as_nanos().max(1));
    u64::try_from(rounds).unwrap_or(u64::MAX).max(1)
}

/// A path out of watch has its TCP counters read every this many refreshes
/// (every second).
const STANDBY_SAMPLE: u64 = 10;

/// How much more often a suspect path is probed.
pub const BOOST: u32 = 10;

/// One probe of path `i`. The timeout adapts: 3x the path's recent p99,
/// within `health.timeout_min..=timeout_max`.
pub async fn probe(rt: &Runtime, path: &paths::PathClient, i: usize) -> Outcome {
    use http_body_util::BodyExt;
    let h = &rt.config.health;
    let timeout = rt.health.p99(i).map_or(h.timeout_max, |p| {
        p.mul_f64(3.0).clamp(h.timeout_min, h.timeout_max)
    });
    let cp = &rt.config.control_plane;
    let uri = format!("{}{}{}", path.origin, path.base_path, h.path);
    let mut req = http::Request::new(http_body_util::Full::new(bytes::Bytes::new()));
    *req.uri_mut() = uri.parse().unwrap_or_default();
    if let Some(v) = &path.host_value {
        req.headers_mut().insert(http::header::HOST, v.clone());
    }
    if let Some(t) = &cp.token
        && let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {t}"))
    {
        req.headers_mut().insert(http::header::AUTHORIZATION, v);
    }
    req.headers_mut()
        .insert("user-agent", http::HeaderValue::from_static("detour-agent-probe"));
    let started = tokio::time::Instant::now();
    let exchange = async {
        let sent = path.client().request(req);
        let resp = sent.await.map_err(|e| forward::classify(&e).0)?;
        // Any answer proves the path; read it whole so the connection stays pooled.
        let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await;
        Ok::<_, health::FailureKind>(())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(())) => {
            let elapsed = started.elapsed();
            if elapsed > timeout / 2 {
                Outcome::Slow(elapsed)
            } else {
                Outcome::Ok(elapsed)
            }
        }
        Ok(Err(kind)) => Outcome::Failed(kind),
        Err(_) => Outcome::Failed(health::FailureKind::Timeout),
    }
}

/// Every 100 ms: reads the kernel's retransmission counters of the watched
/// and suspect paths' connections into the health table (of the others,
/// probed every `health.standby_interval`, every [`STANDBY_SAMPLE`]-th
/// time: the counters are cumulative, so their evidence is late, never
/// lost), and republishes the snapshot if any evidence arrived.
pub async fn refresh_loop(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut diag = match transport::Diag::new() {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read TCP statistics (NETLINK_SOCK_DIAG); packet loss is judged from exchanges alone");
            None
        }
    };
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                ticks += 1;
                let rt = shared.forwarder.runtime();
                if let Some(diag) = diag.as_mut() {
                    let snapshot = rt.health.snapshot();
                    let watched = rt.config.health.watched;
                    for (i, path) in rt.paths.iter().enumerate() {
                        let due = snapshot.watched(i, watched)
                            || snapshot.suspect(i)
                            || (ticks + i as u64).is_multiple_of(STANDBY_SAMPLE);
                        if !due {
                            continue;
                        }
                        let delta = path.sockets.sample(diag);
                        if !delta.is_empty() {
                            rt.health.record_transport(i, delta);
                        }
                    }
                }
                rt.health.refresh();
            }
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_paths_are_probed_every_standby_interval_in_rounds() {
        let ms = Duration::from_millis;
        assert_eq!(standby_every(ms(500), ms(5000)), 10);
        assert_eq!(
            standby_every(ms(500), ms(5200)),
            11,
            "rounded up: never more often than asked"
        );
        assert_eq!(standby_every(ms(500), ms(500)), 1);
        assert_eq!(standby_every(ms(500), ms(100)), 1, "at least every round");
    }
}

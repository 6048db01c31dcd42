//! Prometheus metrics of one agent (prefix `detour_`, base units). Each agent
//! has its own registry so several agents can run in one process (the lab).

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Every metric the agent exports.
pub struct Metrics {
    pub registry: Registry,
    /// Requests answered to the call handler, by the path that answered
    /// (`none` when no path did) and outcome (`ok`, `failed`, `rejected`).
    pub requests: IntCounterVec,
    /// Time from request received to response headers sent, by path.
    pub request_duration: HistogramVec,
    /// Attempts sent, by path and kind (`first`, `retry`, `hedge`) and result.
    pub attempts: IntCounterVec,
    /// Retries or hedges not sent because the retry budget was spent.
    pub budget_exhausted: IntCounter,
    /// 2 = up, 1 = degraded, 0 = down.
    pub path_state: IntGaugeVec,
    /// 1 for a path requests may take, 0 for a drained peer's
    /// (`enabled = false` or `detour-agent peer drain`): still probed, not
    /// used, not counted by `/readyz` or the path alerts.
    pub path_enabled: IntGaugeVec,
    pub path_rtt: GaugeVec,
    pub path_loss: GaugeVec,
    pub path_retransmit: GaugeVec,
    /// Data segments the kernel sent on the path's connections, and of
    /// those, sent again: the evidence the loss test judges.
    pub path_segments: IntCounterVec,
    /// 1 for the path new requests use first, else 0.
    pub active_path: IntGaugeVec,
    pub active_endpoint: IntGaugeVec,
    /// 1 for the most preferred control-plane endpoint(s) (the lowest
    /// `priority`), 0 for the others: with `detour_active_endpoint`, says
    /// whether a PoP runs on a secondary region.
    pub endpoint_preferred: IntGaugeVec,
    pub path_switches: IntCounter,
    pub probes: IntCounterVec,
    /// Call-handler connections open now.
    pub local_connections: IntGauge,
    /// Call-handler connections closed at once because
    /// `ingress.max_connections` were open.
    pub local_connections_refused: IntCounter,
    pub relay_tunnels_active: IntGauge,
    /// Upgraded streams (WebSockets) open now, by the path they ride.
    pub streams_active: IntGaugeVec,
    /// Upgraded streams by path and outcome: `opened`, `closed` (an end
    /// closed it), `cut_path_down`, `cut_path_removed`, `cut_stopping`
    /// (the agent cut it), `failed` (its handshake failed on that path).
    pub streams: IntCounterVec,
    pub relay_tunnels_total: IntCounterVec,
    pub path_pool_renewals: IntCounterVec,
    pub recordings_pending: IntGauge,
    pub recordings_pending_bytes: IntGauge,
    pub recordings_oldest_pending_age: Gauge,
    pub recordings_uploaded: IntCounter,
    pub recordings_failed: IntCounterVec,
    pub recordings_bytes: IntCounterVec,
    pub deferred_pending: IntGauge,
    pub deferred_pending_bytes: IntGauge,
    pub deferred_oldest_age: Gauge,
    pub deferred_accepted: IntCounter,
    pub deferred_delivered: IntCounter,
    pub deferred_refused: IntCounterVec,
    pub deferred_dropped: IntCounterVec,
    pub relay_rejected: IntCounterVec,
    pub config_reloads: IntCounterVec,
    /// When each certificate the agent uses stops being valid, by role
    /// (`identity`: its own on the mesh, `fleet_ca`, `control_plane_ca`)
    /// and subject; set at start and on every reload.
    pub certificate_expiry: GaugeVec,
    /// 1 when the most recent reload applied (or found the files valid and
    /// unchanged), 0 when it was refused; 1 at start (the files validated).
    pub config_last_reload_successful: IntGauge,
    /// When the running config was last loaded or reloaded successfully.
    pub config_last_reload_success_timestamp: Gauge,
    /// Tasks alive in the agent's tokio runtime, read at each scrape (a
    /// number that only grows is a leak).
    pub runtime_tasks: IntGauge,
}

/// The series a request answered on one path touches, resolved once per
/// path: a label lookup hashes every label under the vector's lock, three
/// times a request otherwise.
pub struct PathCounters {
    /// `detour_requests_total{path, outcome="ok"}`.
    pub answered: IntCounter,
    /// `detour_request_duration_seconds{path}`.
    pub duration: Histogram,
    /// `detour_attempts_total{path, kind, result="ok"}` for the kinds
    /// `first`, `retry` and `hedge`.
    answered_attempts: [IntCounter; 3],
}

impl PathCounters {
    /// `detour_attempts_total{path, kind, result="ok"}`; `None` for a kind
    /// not in [`ATTEMPT_KINDS`].
    pub fn attempt_ok(&self, kind: &str) -> Option<&IntCounter> {
        let i = ATTEMPT_KINDS.iter().position(|k| *k == kind)?;
        self.answered_attempts.get(i)
    }
}

/// The kinds of attempt (`detour_attempts_total`'s `kind`).
const ATTEMPT_KINDS: [&str; 3] = ["first", "retry", "hedge"];

impl Metrics {
    /// Path `path`'s [`PathCounters`].
    pub fn path_counters(&self, path: &str) -> PathCounters {
        PathCounters {
            answered: self.requests.with_label_values(&[path, "ok"]),
            duration: self.request_duration.with_label_values(&[path]),
            answered_attempts: ATTEMPT_KINDS.map(|k| self.attempts.with_label_values(&[path, k, "ok"])),
        }
    }

    pub fn new(pop: &str) -> Metrics {
        let registry =
            Registry::new_custom(None, Some([("pop".to_owned(), pop.to_owned())].into())).unwrap_or_default();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definitions are static and valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        // The build, for rollouts: a gate reads the version a host now runs.
        reg!(IntGaugeVec::new(
            Opts::new("detour_build_info", "Always 1; the labels say which build runs."),
            &["version", "binary"]
        ))
        .with_label_values(&[env!("CARGO_PKG_VERSION"), "detour-agent"])
        .set(1);
        // CPU, RSS, open file descriptors and their limit, start time
        // (`process_*`, as every Prometheus exporter names them).
        let _ = registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        let latency_buckets = vec![
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
        ];
        let metrics = Metrics {
            requests: reg!(IntCounterVec::new(
                Opts::new("detour_requests_total", "Requests answered to the call handler."),
                &["path", "outcome"]
            )),
            request_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "detour_request_duration_seconds",
                    "Time from request received to response headers sent."
                )
                .buckets(latency_buckets),
                &["path"]
            )),
            attempts: reg!(IntCounterVec::new(
                Opts::new("detour_attempts_total", "Attempts sent to the control plane."),
                &["path", "kind", "result"]
            )),
            budget_exhausted: reg!(IntCounter::new(
                "detour_retry_budget_exhausted_total",
                "Retries or hedges not sent because the retry budget was spent."
            )),
            path_state: reg!(IntGaugeVec::new(
                Opts::new("detour_path_state", "Path state: 2 up, 1 degraded, 0 down."),
                &["path", "endpoint"]
            )),
            path_enabled: reg!(IntGaugeVec::new(
                Opts::new(
                    "detour_path_enabled",
                    "1 for a path requests may take, 0 for a drained peer's path."
                ),
                &["path", "endpoint"]
            )),
            path_rtt: reg!(GaugeVec::new(
                Opts::new("detour_path_rtt_seconds", "Smoothed round-trip time of the path."),
                &["path", "endpoint"]
            )),
            path_loss: reg!(GaugeVec::new(
                Opts::new(
                    "detour_path_loss_ratio",
                    "Share of recent exchanges lost or stalled."
                ),
                &["path", "endpoint"]
            )),
            path_retransmit: reg!(GaugeVec::new(
                Opts::new(
                    "detour_path_retransmit_ratio",
                    "Share of the path's recent data segments the kernel sent again (this side only)."
                ),
                &["path", "endpoint"]
            )),
            path_segments: reg!(IntCounterVec::new(
                Opts::new(
                    "detour_path_segments_total",
                    "Data segments the kernel sent on the path's connections (kind sent), and of those sent again (kind again)."
                ),
                &["path", "endpoint", "kind"]
            )),
            active_path: reg!(IntGaugeVec::new(
                Opts::new("detour_active_path", "1 for the path new requests use first."),
                &["path"]
            )),
            active_endpoint: reg!(IntGaugeVec::new(
                Opts::new(
                    "detour_active_endpoint",
                    "1 for the control-plane endpoint new requests go to first."
                ),
                &["endpoint"]
            )),
            endpoint_preferred: reg!(IntGaugeVec::new(
                Opts::new(
                    "detour_endpoint_preferred",
                    "1 for the most preferred control-plane endpoint (lowest priority), 0 for the others."
                ),
                &["endpoint"]
            )),
            path_switches: reg!(IntCounter::new(
                "detour_path_switches_total",
                "Changes of the active path."
            )),
            probes: reg!(IntCounterVec::new(
                Opts::new("detour_probes_total", "Health probes sent, by path and result."),
                &["path", "result"]
            )),
            local_connections: reg!(IntGauge::new(
                "detour_local_connections",
                "Call-handler connections open on the local listener."
            )),
            local_connections_refused: reg!(IntCounter::new(
                "detour_local_connections_refused_total",
                "Call-handler connections closed at once because ingress.max_connections were open."
            )),
            relay_tunnels_active: reg!(IntGauge::new(
                "detour_relay_tunnels_active",
                "Peer tunnels open through this agent's relay."
            )),
            streams_active: reg!(IntGaugeVec::new(
                Opts::new(
                    "detour_streams_active",
                    "Upgraded streams (WebSockets) open through the agent, by path."
                ),
                &["path"]
            )),
            streams: reg!(IntCounterVec::new(
                Opts::new(
                    "detour_streams_total",
                    "Upgraded streams by path and outcome: opened, closed, cut_path_down, cut_path_removed, cut_stopping, failed."
                ),
                &["path", "outcome"]
            )),
            recordings_pending: reg!(IntGauge::new(
                "detour_recordings_pending",
                "Complete recordings in the directory not yet stored, recorded and done with."
            )),
            recordings_pending_bytes: reg!(IntGauge::new(
                "detour_recordings_pending_bytes",
                "Bytes of the pending recordings."
            )),
            recordings_oldest_pending_age: reg!(Gauge::new(
                "detour_recordings_oldest_pending_age_seconds",
                "Age of the oldest pending recording (since it was written or first seen)."
            )),
            recordings_uploaded: reg!(IntCounter::new(
                "detour_recordings_uploaded_total",
                "Recordings stored in the object store."
            )),
            recordings_failed: reg!(IntCounterVec::new(
                Opts::new(
                    "detour_recordings_failed_total",
                    "Recording steps that failed, by reason; the recording is tried again and never deleted."
                ),
                &["reason"]
            )),
            recordings_bytes: reg!(IntCounterVec::new(
                Opts::new(
                    "detour_recordings_bytes_total",
                    "Recording bytes the object store accepted, by path."
                ),
                &["path"]
            )),
            deferred_pending: reg!(IntGauge::new(
                "detour_deferred_pending",
                "Deferred requests in the journal, not yet delivered."
            )),
            deferred_pending_bytes: reg!(IntGauge::new(
                "detour_deferred_pending_bytes",
                "Bytes of the deferred requests waiting (bodies, paths and headers)."
            )),
            deferred_oldest_age: reg!(Gauge::new(
                "detour_deferred_oldest_age_seconds",
                "Age of the oldest deferred request waiting (0 when none)."
            )),
            deferred_accepted: reg!(IntCounter::new(
                "detour_deferred_accepted_total",
                "Requests no path delivered in time, journalled and answered 202."
            )),
            deferred_delivered: reg!(IntCounter::new(
                "detour_deferred_delivered_total",
                "Deferred requests delivered to the control plane."
            )),
            deferred_refused: reg!(IntCounterVec::new(
                Opts::new(
                    "detour_deferred_refused_total",
                    "Deferrable requests that could not be deferred (answered 503), by reason: full, io."
                ),
                &["reason"]
            )),
            deferred_dropped: reg!(IntCounterVec::new(
                Opts::new(
                    "detour_deferred_dropped_total",
                    "Deferred requests given up, by reason: refused (the control plane answered 4xx)."
                ),
                &["reason"]
            )),
            path_pool_renewals: reg!(IntCounterVec::new(
                Opts::new(
                    "detour_path_pool_renewals_total",
                    "Times a peer's relay said it was draining (its agent is being restarted or upgraded) and the path moved new requests to fresh tunnels."
                ),
                &["path"]
            )),
            relay_tunnels_total: reg!(IntCounterVec::new(
                Opts::new(
                    "detour_relay_tunnels_total",
                    "Peer tunnels opened through this agent's relay."
                ),
                &["peer"]
            )),
            relay_rejected: reg!(IntCounterVec::new(
                Opts::new(
                    "detour_relay_rejected_total",
                    "Relay connections or tunnels refused, by reason."
                ),
                &["reason"]
            )),
            config_reloads: reg!(IntCounterVec::new(
                Opts::new("detour_config_reloads_total", "Configuration reloads, by result."),
                &["result"]
            )),
            certificate_expiry: reg!(GaugeVec::new(
                Opts::new(
                    "detour_certificate_expiry_timestamp_seconds",
                    "Unix time at which the certificate stops being valid (its notAfter), by role and subject."
                ),
                &["cert", "subject"]
            )),
            config_last_reload_successful: reg!(IntGauge::new(
                "detour_config_last_reload_successful",
                "1 when the most recent config reload succeeded, 0 when the agent runs on its previous config."
            )),
            config_last_reload_success_timestamp: reg!(Gauge::new(
                "detour_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful config load or reload."
            )),
            runtime_tasks: reg!(IntGauge::new(
                "detour_runtime_tasks",
                "Tasks alive in the agent's tokio runtime."
            )),
            registry,
        };
        metrics.reload_succeeded();
        metrics
    }

    /// Publishes the expiry of every certificate in `config` and which
    /// endpoints are preferred, replacing what an earlier config published.
    pub fn set_config_gauges(&self, config: &crate::config::AgentConfig) {
        self.certificate_expiry.reset();
        let set = |role: &str, certs: &[rustls::pki_types::CertificateDer<'_>]| {
            for (subject, not_after) in certs.iter().filter_map(crate::tls::cert_expiry) {
                self.certificate_expiry
                    .with_label_values(&[role, &subject])
                    .set(not_after as f64);
            }
        };
        if let Some(tls) = &config.tls {
            set("identity", &tls.chain[..tls.chain.len().min(1)]);
            set("fleet_ca", &tls.ca_certs);
        }
        set("control_plane_ca", &config.control_plane.ca_certs);
        self.endpoint_preferred.reset();
        let best = config.control_plane.endpoints.iter().map(|e| e.priority).min();
        for e in &config.control_plane.endpoints {
            self.endpoint_preferred
                .with_label_values(&[&e.name])
                .set(i64::from(Some(e.priority) == best));
        }
    }

    /// Records a successful load or reload of the config files.
    pub fn reload_succeeded(&self) {
        self.config_last_reload_successful.set(1);
        self.config_last_reload_success_timestamp.set(unix_now());
    }

    /// `detour_relay_rejected_total` by reason, for the fleet report.
    pub fn relay_rejected_counts(&self) -> std::collections::BTreeMap<String, u64> {
        use prometheus::core::Collector;
        self.relay_rejected
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .filter_map(|m| {
                let reason = m.get_label().iter().find(|l| l.name() == "reason")?;
                Some((reason.value().to_owned(), m.get_counter().get_value() as u64))
            })
            .collect()
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.runtime_tasks.set(rt.metrics().num_alive_tasks() as i64);
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

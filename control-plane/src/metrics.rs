//! Metrics: the Prometheus registry behind `/metrics` (prefix `detour_cp_`,
//! base units).

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the control plane exports.
pub struct Metrics {
    registry: Registry,
    /// Series outside the `detour_cp_` prefix: `detour_build_info` and
    /// `detour_certificate_expiry_timestamp_seconds`, named as the agent's
    /// so one rollout gate and one alert read both.
    unprefixed: Registry,
    /// `detour_certificate_expiry_timestamp_seconds{cert="server",subject}`:
    /// when the HTTPS certificate in use stops being valid (Unix seconds).
    /// Set at start and on every rotation ([`Metrics::set_server_certificate`]).
    pub certificate_expiry: GaugeVec,
    /// Certificate rotations by result: `rotated` (a new pair serves new
    /// connections), `error` (the files did not load or match; the pair in
    /// use stays).
    pub tls_reloads: IntCounterVec,
    /// Requests by matched route and status code.
    pub requests: IntCounterVec,
    /// Request latency by matched route.
    pub duration: HistogramVec,
    /// Call initiations by priority and outcome (`created`, `replayed`, `shed`, …).
    pub calls: IntCounterVec,
    /// Normal calls shed, by reason (`queue_full`, `queue_timeout`).
    pub shed: IntCounterVec,
    /// Requests refused by the per-PoP rate limit.
    pub rate_limited: IntCounterVec,
    /// Hook calls by outcome (`ok`, `timeout`, `error`, `bad_answer`, `breaker_open`).
    pub hook: IntCounterVec,
    /// Route version this replica routes with.
    pub route_version: IntGauge,
    /// Rules this replica routes with.
    pub route_rules: IntGauge,
    /// 1 when the last database check succeeded.
    pub db_up: IntGauge,
    /// Call initiations in progress, by class (`normal`, `emergency`).
    pub in_flight: IntGaugeVec,
    /// Emergency calls answered while the database was down, not yet written.
    pub spooled: IntGauge,
    /// Group-commit statements that wrote new calls (Postgres; store/batch.rs).
    pub db_batches: IntCounter,
    /// New calls those statements carried (÷ batches = average batch).
    pub db_batched_calls: IntCounter,
    /// Client connections open now.
    pub connections: IntGauge,
    /// Connections closed at once because `limits.max_connections` were open.
    pub connections_refused: IntCounter,
    /// Rows the retention sweep deleted, by table.
    pub retention_deleted: IntCounterVec,
    /// When the last retention sweep finished without an error (Unix time).
    pub retention_last_success: IntGauge,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("detour_cp".into()), None).unwrap_or_else(|_| Registry::new());
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "HTTP requests by route and status."),
            &["route", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "HTTP request latency by route.").buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["route"],
        )
        .expect("valid metric");
        let calls = IntCounterVec::new(
            Opts::new("calls_total", "Call initiations by priority and outcome."),
            &["priority", "outcome"],
        )
        .expect("valid metric");
        let shed = IntCounterVec::new(
            Opts::new("shed_total", "Normal calls shed with 503, by reason."),
            &["reason"],
        )
        .expect("valid metric");
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "rate_limited_total",
                "Requests refused by the per-PoP rate limit.",
            ),
            &["pop"],
        )
        .expect("valid metric");
        let hook = IntCounterVec::new(
            Opts::new("hook_requests_total", "External routing hook calls by outcome."),
            &["outcome"],
        )
        .expect("valid metric");
        let route_version =
            IntGauge::new("route_version", "Route version in use on this replica.").expect("valid metric");
        let route_rules =
            IntGauge::new("route_rules", "Routing rules in use on this replica.").expect("valid metric");
        let db_up =
            IntGauge::new("db_up", "1 when the last database check succeeded.").expect("valid metric");
        let in_flight = IntGaugeVec::new(
            Opts::new("calls_in_flight", "Call initiations in progress by class."),
            &["class"],
        )
        .expect("valid metric");
        let spooled = IntGauge::new(
            "emergency_deferred_calls",
            "Emergency calls answered while the database was down and not yet written.",
        )
        .expect("valid metric");
        let db_batches = IntCounter::new(
            "db_batches_total",
            "Group-commit statements that wrote new calls (Postgres).",
        )
        .expect("valid metric");
        let db_batched_calls = IntCounter::new(
            "db_batched_calls_total",
            "New calls written by group-commit statements; divided by db_batches_total, the average batch.",
        )
        .expect("valid metric");
        let connections =
            IntGauge::new("connections", "Client connections open on this replica.").expect("valid metric");
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "tls_reloads_total",
                "TLS certificate reloads that found a new pair, by result (rotated, error).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let certificate_expiry = GaugeVec::new(
            Opts::new(
                "detour_certificate_expiry_timestamp_seconds",
                "Unix time at which a certificate in use stops being valid, by role and subject.",
            ),
            &["cert", "subject"],
        )
        .expect("valid metric");
        let unprefixed = build_info();
        unprefixed.register(Box::new(certificate_expiry.clone())).ok();
        let connections_refused = IntCounter::new(
            "connections_refused_total",
            "Connections closed at once because limits.max_connections were open.",
        )
        .expect("valid metric");
        let retention_deleted = IntCounterVec::new(
            Opts::new(
                "retention_deleted_rows_total",
                "Rows deleted by the retention sweep, by table.",
            ),
            &["table"],
        )
        .expect("valid metric");
        let retention_last_success = IntGauge::new(
            "retention_last_success_timestamp_seconds",
            "When the last retention sweep finished without an error (Unix time; 0: none yet).",
        )
        .expect("valid metric");
        for c in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(retention_deleted.clone()),
            Box::new(retention_last_success.clone()),
            Box::new(connections_refused.clone()),
            Box::new(requests.clone()),
            Box::new(duration.clone()),
            Box::new(calls.clone()),
            Box::new(shed.clone()),
            Box::new(rate_limited.clone()),
            Box::new(hook.clone()),
            Box::new(route_version.clone()),
            Box::new(route_rules.clone()),
            Box::new(db_up.clone()),
            Box::new(in_flight.clone()),
            Box::new(spooled.clone()),
            Box::new(db_batches.clone()),
            Box::new(db_batched_calls.clone()),
            Box::new(tls_reloads.clone()),
        ] {
            // Names are fixed and distinct, so registration cannot collide.
            registry.register(c).ok();
        }
        Self {
            registry,
            requests,
            duration,
            calls,
            shed,
            rate_limited,
            hook,
            route_version,
            route_rules,
            db_up,
            in_flight,
            spooled,
            db_batches,
            db_batched_calls,
            connections,
            connections_refused,
            retention_deleted,
            retention_last_success,
            unprefixed,
            certificate_expiry,
            tls_reloads,
        }
    }

    /// Publishes the expiry of the HTTPS certificate in use (its leaf),
    /// replacing the one published before.
    pub fn set_server_certificate(&self, chain: &[rustls_pki_types::CertificateDer<'_>]) {
        self.certificate_expiry.reset();
        if let Some((subject, not_after)) = chain.first().and_then(crate::tls::cert_expiry) {
            self.certificate_expiry
                .with_label_values(&["server", &subject])
                .set(not_after as f64);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let mut families = self.registry.gather();
        families.extend(self.unprefixed.gather());
        TextEncoder::new().encode(&families, &mut buf).ok();
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// `detour_build_info{version,binary}`, always 1, and the process's CPU,
/// RSS and file descriptors (`process_*`, as every exporter names them).
fn build_info() -> Registry {
    let registry = Registry::new();
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .ok();
    if let Ok(info) = prometheus::IntGaugeVec::new(
        Opts::new("detour_build_info", "Always 1; the labels say which build runs."),
        &["version", "binary"],
    ) {
        info.with_label_values(&[env!("CARGO_PKG_VERSION"), "detour-control-plane"])
            .set(1);
        registry.register(Box::new(info)).ok();
    }
    registry
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix() {
        let m = Metrics::new();
        m.calls.with_label_values(&["normal", "created"]).inc();
        m.db_up.set(1);
        let text = m.render();
        assert!(
            text.contains("detour_cp_calls_total{outcome=\"created\",priority=\"normal\"} 1"),
            "{text}"
        );
        assert!(text.contains("detour_cp_db_up 1"));
        assert!(
            text.contains("detour_build_info{binary=\"detour-control-plane\""),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("process_open_fds "), "{text}");
    }
}

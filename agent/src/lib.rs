//! Detour agent: keeps a telephony server talking to its control plane over
//! the best working path.
//!
//! A request meets the modules in this order: [`ingress`] (call handler ->
//! agent) -> [`forward`] (attempts, retries, hedging) -> [`paths`] (`direct`,
//! `via:<peer>`), with [`health`] beside them publishing a ranked snapshot.
//! [`relay`] serves the peers; [`config`], [`tls`], [`pki`], [`admin`],
//! [`metrics`] and [`reload`] support them. `main.rs` only parses the command
//! line and calls into this library, so tests and the lab drive the same code.

pub mod admin;
pub mod config;
pub mod forward;
pub mod health;
pub mod ingress;
pub mod metrics;
pub mod paths;
pub mod pki;
pub mod relay;
pub mod reload;
pub mod status;
pub mod tls;
pub mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::{ArcSwap, ArcSwapOption};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::AgentConfig;
use crate::forward::{Forwarder, Runtime};
use crate::health::{HealthTable, Outcome, PathInfo};
use crate::metrics::Metrics;

/// State shared by the listeners and background tasks of one agent.
pub struct Shared {
    pub forwarder: Arc<Forwarder>,
    pub metrics: Arc<Metrics>,
    pub relay: Option<Arc<ArcSwap<relay::Relay>>>,
    /// The last reload error, shown in `/status` until a reload succeeds.
    pub config_error: ArcSwapOption<String>,
}

/// A running agent. Dropping it does not stop it; call [`Agent::shutdown`].
pub struct Agent {
    pub local_addr: SocketAddr,
    pub relay_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: tokio::sync::Mutex<JoinSet<()>>,
    drain_timeout: Duration,
}

/// Builds the runtime (paths and health table) for a config, reusing the
/// connection pools and evidence of paths that already exist in `old`.
pub fn build_runtime(
    config: Arc<AgentConfig>,
    metrics: &Arc<Metrics>,
    old: Option<&Runtime>,
) -> anyhow::Result<Runtime> {
    let mut paths = paths::build_paths(&config).map_err(|e| anyhow::anyhow!(e))?;
    if let Some(old) = old {
        let (a, b) = (&old.config.control_plane, &config.control_plane);
        // The token is sent per request, so it does not matter here; what
        // the connections were made with does (address, TLS trust).
        let same_cp =
            a.url == b.url && a.addresses == b.addresses && a.ca == b.ca && a.ca_certs == b.ca_certs;
        // Tunnels through peers were set up with this agent's certificate
        // and the fleet CA: a rotated one needs new tunnels.
        let same_mesh = reload::same_tls(&old.config, &config);
        if same_cp {
            for p in paths.iter_mut() {
                let via = matches!(p.route, paths::Route::Via { .. });
                if via && !same_mesh {
                    continue;
                }
                if let Some(o) = old
                    .paths
                    .iter()
                    .find(|o| o.name == p.name && same_route(&o.route, &p.route))
                {
                    // Same path, same endpoint: keep its warm connections.
                    *p = o.clone();
                }
            }
        }
    }
    let infos = paths
        .iter()
        .map(|p| {
            let peer = config.peers.iter().find(|x| x.path_name() == *p.name);
            PathInfo {
                name: p.name.clone(),
                direct: peer.is_none(),
                weight: peer.map_or(100, |x| x.weight),
                enabled: peer.is_none_or(|x| x.enabled),
            }
        })
        .collect();
    let health = Arc::new(HealthTable::new(config.health.clone(), infos, metrics.clone()));
    if let Some(old) = old {
        health.inherit(&old.health);
    }
    Ok(Runtime {
        config,
        paths,
        health,
    })
}

fn same_route(a: &paths::Route, b: &paths::Route) -> bool {
    match (a, b) {
        (paths::Route::Direct, paths::Route::Direct) => true,
        (paths::Route::Via { peer: p1, relay: r1 }, paths::Route::Via { peer: p2, relay: r2 }) => {
            p1 == p2 && r1 == r2
        }
        _ => false,
    }
}

fn relay_state(
    config: &Arc<AgentConfig>,
    metrics: &Arc<Metrics>,
    counts: Arc<relay::TunnelCounts>,
) -> anyhow::Result<Option<relay::Relay>> {
    let (Some(_), Some(tls)) = (config.listen.relay, &config.tls) else {
        return Ok(None);
    };
    let server = tls.relay_server_config().context("relay TLS configuration")?;
    Ok(Some(relay::Relay {
        config: config.clone(),
        acceptor: tokio_rustls::TlsAcceptor::from(server),
        metrics: metrics.clone(),
        counts,
    }))
}

impl Agent {
    /// Binds the listeners and starts every task. Port 0 in a listen address
    /// picks a free port; the bound addresses are in the returned value.
    pub async fn start(config: AgentConfig) -> anyhow::Result<Agent> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new(&config.pop));
        let runtime = build_runtime(config.clone(), &metrics, None)?;
        let forwarder = Arc::new(Forwarder::new(runtime, metrics.clone()));

        let local = TcpListener::bind(config.listen.local)
            .await
            .with_context(|| format!("binding listen.local {}", config.listen.local))?;
        let admin = TcpListener::bind(config.listen.admin)
            .await
            .with_context(|| format!("binding listen.admin {}", config.listen.admin))?;
        let relay_listener = match config.listen.relay {
            Some(addr) if config.tls.is_some() => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding listen.relay {addr}"))?,
            ),
            _ => None,
        };
        let counts = Arc::new(relay::TunnelCounts::default());
        let relay = relay_state(&config, &metrics, counts)?.map(|r| Arc::new(ArcSwap::from_pointee(r)));

        let shared = Arc::new(Shared {
            forwarder,
            metrics,
            relay: relay.clone(),
            config_error: ArcSwapOption::empty(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let local_addr = local.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let relay_addr = relay_listener.as_ref().map(|l| l.local_addr()).transpose()?;

        tasks.spawn(serve_local(
            local,
            shared.clone(),
            shutdown_rx.clone(),
            config.ingress.clone(),
        ));
        tasks.spawn(serve_admin(admin, shared.clone(), shutdown_rx.clone()));
        if let (Some(l), Some(r)) = (relay_listener, relay) {
            tasks.spawn(relay::serve(l, r, shutdown_rx.clone()));
        }
        tasks.spawn(probe_loop(shared.clone(), shutdown_rx.clone()));
        tasks.spawn(refresh_loop(shared.clone(), shutdown_rx.clone()));
        tasks.spawn(report_loop(shared.clone(), shutdown_rx.clone()));
        tracing::info!(pop = %config.pop, local = %local_addr, admin = %admin_addr, relay = ?relay_addr, paths = shared.forwarder.runtime().paths.len(), "agent started");
        Ok(Agent {
            local_addr,
            relay_addr,
            admin_addr,
            shared,
            shutdown,
            tasks: tokio::sync::Mutex::new(tasks),
            drain_timeout: config.ingress.drain_timeout,
        })
    }

    /// Applies a new, already validated config. Listener addresses and the
    /// PoP name cannot change live: such a change is refused with a reason
    /// and nothing of the new config is applied. A rotated certificate, key
    /// or CA is applied: the relay presents and checks the new ones on new
    /// handshakes, and tunnels through peers are set up again with them.
    pub fn apply(&self, new: AgentConfig) -> Result<(), String> {
        let rt = self.shared.forwarder.runtime();
        let old = &rt.config;
        let mut needs_restart = Vec::new();
        if old.listen != new.listen {
            needs_restart.push("listen addresses");
        }
        if old.pop != new.pop {
            needs_restart.push("pop");
        }
        if old.ingress.max_connections != new.ingress.max_connections {
            needs_restart.push("ingress.max_connections");
        }
        if !needs_restart.is_empty() {
            return Err(format!(
                "needs restart: {} changed; the running config is unchanged",
                needs_restart.join(", ")
            ));
        }
        let new = Arc::new(new);
        // Everything is built before anything is swapped, so a failure
        // leaves the running config whole.
        let runtime =
            build_runtime(new.clone(), &self.shared.metrics, Some(&rt)).map_err(|e| e.to_string())?;
        let relay_next = match &self.shared.relay {
            Some(relay) => relay_state(&new, &self.shared.metrics, relay.load().counts.clone())
                .map_err(|e| format!("{e:#}"))?,
            None => None,
        };
        if let (Some(relay), Some(r)) = (&self.shared.relay, relay_next) {
            relay.store(Arc::new(r));
        }
        let gone: Vec<Arc<str>> = rt
            .paths
            .iter()
            .filter(|o| !runtime.paths.iter().any(|p| p.name == o.name))
            .map(|o| o.name.clone())
            .collect();
        self.shared.forwarder.replace(runtime);
        for name in &gone {
            HealthTable::forget(&self.shared.metrics, name);
        }
        Ok(())
    }

    /// A receiver that turns `true` when shutdown starts.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain
    /// timeout), then stops every task.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        let drain = self.drain_timeout + Duration::from_secs(1);
        let mut tasks = self.tasks.lock().await;
        if tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tasks.abort_all();
        }
    }
}

/// Runs an agent until `shutdown` completes, reloading on SIGHUP and file
/// changes. This is what `detour-agent run` does.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let files = config.files.clone();
    let agent = Arc::new(Agent::start(config).await?);
    let reloader = reload::spawn(agent.clone(), files);
    shutdown.await;
    tracing::info!("shutting down: draining in-flight requests");
    reloader.abort();
    let _ = reloader.await;
    agent.shutdown().await;
    Ok(())
}

async fn serve_local(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    cfg: config::Ingress,
) {
    use detour_wire::conn::{self, ConnLimits, Tracked};

    let graceful = GracefulShutdown::new();
    let ingress = Arc::new(ingress::Ingress {
        forwarder: shared.forwarder.clone(),
        metrics: shared.metrics.clone(),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "local accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.metrics.local_connections_refused.inc();
            tracing::warn!(
                max = cfg.max_connections,
                "ingress.max_connections are open; closed a new connection"
            );
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // Limits as of now: a reload applies them to new connections.
        let now = shared.forwarder.runtime().config.ingress.clone();
        let limits = ConnLimits {
            header_timeout: now.header_timeout,
            idle_timeout: now.idle_timeout,
        };
        let rejection = ingress::rejection(shared.metrics.clone(), now.max_header_bytes);
        let mut builder = http1::Builder::new();
        // The guard owns the head and idle timeouts: hyper's header_read_timeout
        // also runs between requests and would close pooled connections early.
        builder
            .timer(TokioTimer::new())
            .max_buf_size(now.max_header_bytes)
            .keep_alive(true);
        let (io, tracker) = conn::guard(tcp, limits, rejection);
        let ingress = ingress.clone();
        let service = service_fn(move |req| {
            let ingress = ingress.clone();
            let flight = tracker.begin();
            async move {
                let resp = ingress.handle(req).await;
                Ok::<_, std::convert::Infallible>(resp.map(|b| Tracked::new(b, flight)))
            }
        });
        let conn = builder.serve_connection(TokioIo::new(io), service);
        let conn = graceful.watch(conn);
        let gauge = shared.metrics.local_connections.clone();
        gauge.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "local connection ended");
            }
            gauge.dec();
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(cfg.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout passed with requests still in flight");
    }
}

async fn serve_admin(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| admin::handle(shared.clone(), req));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// Probes every path each interval (jittered by up to 10%) with a
/// `GET health.path` on the path's own pooled connection.
async fn probe_loop(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let rt = shared.forwarder.runtime();
        let interval = rt.config.health.interval;
        for (i, path) in rt.paths.iter().enumerate() {
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
        let jitter = interval.mul_f64(rand::random::<f64>() * 0.1);
        tokio::select! {
            _ = tokio::time::sleep(interval - jitter) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One probe of path `i`. The timeout adapts: 3x the path's recent p99,
/// within `health.timeout_min..=timeout_max`.
pub async fn probe(rt: &Runtime, path: &paths::PathClient, i: usize) -> Outcome {
    use http_body_util::BodyExt;
    let h = &rt.config.health;
    let timeout = rt.health.p99(i).map_or(h.timeout_max, |p| {
        p.mul_f64(3.0).clamp(h.timeout_min, h.timeout_max)
    });
    let cp = &rt.config.control_plane;
    let uri = format!("{}{}{}", path.origin, cp.base_path, h.path);
    let mut req = http::Request::new(http_body_util::Full::new(bytes::Bytes::new()));
    *req.uri_mut() = uri.parse().unwrap_or_default();
    if let Ok(v) = http::HeaderValue::from_str(&cp.host_header()) {
        req.headers_mut().insert(http::header::HOST, v);
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
        let resp = path
            .client
            .request(req)
            .await
            .map_err(|e| forward::classify(&e).0)?;
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

/// Every 100 ms: reads the kernel's retransmission counters of every path's
/// connections into the health table, and republishes the snapshot if any
/// evidence arrived.
async fn refresh_loop(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut diag = match transport::Diag::new() {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read TCP statistics (NETLINK_SOCK_DIAG); packet loss is judged from exchanges alone");
            None
        }
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                let rt = shared.forwarder.runtime();
                if let Some(diag) = diag.as_mut() {
                    for (i, path) in rt.paths.iter().enumerate() {
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

/// Reports the path table to the control plane (the fleet view) every
/// `control_plane.report_interval`, over the best path like any request.
async fn report_loop(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let Some(every) = shared.forwarder.runtime().config.control_plane.report_interval else {
            // Reporting is off; a reload may turn it on.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                _ = shutdown.changed() => return,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let report = admin::report(&shared);
        let rt = shared.forwarder.runtime();
        let cp = &rt.config.control_plane;
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = http::HeaderValue::from_str(&cp.host_header()) {
            headers.insert(http::header::HOST, v);
        }
        if let Some(t) = &cp.token
            && let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {t}"))
        {
            headers.insert(http::header::AUTHORIZATION, v);
        }
        if let Ok(v) = http::HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
            headers.insert(detour_wire::headers::IDEMPOTENCY_KEY, v);
        }
        let body = bytes::Bytes::from(serde_json::to_vec(&report).unwrap_or_default());
        headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(body.len()));
        let Ok(path_and_query) = format!("{}/v1/agents/{}/report", cp.base_path, rt.config.pop).parse()
        else {
            continue;
        };
        let out = forward::Outbound {
            method: http::Method::POST,
            path_and_query,
            headers,
            body,
            emergency: false,
            pin: None,
            received: tokio::time::Instant::now(),
        };
        match shared.forwarder.forward(out).await {
            Ok(a) if a.response.status().is_success() => {}
            Ok(a) => tracing::debug!(status = %a.response.status(), "fleet report not accepted"),
            Err(e) => tracing::debug!(error = ?e, "fleet report not delivered"),
        }
    }
}

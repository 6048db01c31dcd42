//! The local listener: accepts the call handler's connections and serves
//! each with HTTP/1.1 under the connection guard ([`detour_wire::conn`]),
//! every request through [`Ingress::handle`].

use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use detour_wire::accept::{ConnCap, accept};
use detour_wire::conn::{self, ConnLimits, Tracked};

use super::{Ingress, rejection};
use crate::config;
use crate::runtime::Shared;

/// Serves the local listener until `shutdown` turns true, then lets the
/// requests in flight finish (up to `ingress.drain_timeout`).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    cfg: config::Ingress,
) {
    let graceful = GracefulShutdown::new();
    let ingress = Arc::new(Ingress {
        forwarder: shared.forwarder.clone(),
        metrics: shared.metrics.clone(),
    });
    let cap = ConnCap::new(cfg.max_connections, "ingress.max_connections");
    loop {
        let (tcp, _) = tokio::select! {
            c = accept(&listener, "local") => c,
            _ = shutdown.changed() => break,
        };
        let Some(slot) = cap.admit() else {
            shared.metrics.local_connections_refused.inc();
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // Limits as of now: a reload applies them to new connections.
        let now = shared.forwarder.runtime().config.ingress.clone();
        let limits = ConnLimits {
            header_timeout: now.header_timeout,
            idle_timeout: now.idle_timeout,
        };
        let rejection = rejection(shared.metrics.clone(), now.max_header_bytes);
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

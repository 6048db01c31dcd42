//! The listener: accepts connections (capped by `limits.max_connections`),
//! terminates TLS when `[tls]` is set (each handshake with the certificate
//! in use then, `App::cert`), and serves HTTP/1.1 and HTTP/2 on each
//! behind `detour_wire::conn`'s guard (head and idle timeouts, problem+json for
//! unparsable heads). Shutdown is graceful: connections finish what they carry
//! for up to `shutdown.drain_timeout`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use detour_wire::accept::{self, ConnCap};
use detour_wire::conn::{self, ConnLimits};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;

use crate::api::{self, App};

/// What every connection is served with.
#[derive(Clone)]
struct Serving {
    app: Arc<App>,
    tls: Option<Arc<crate::tls::ServerCert>>,
    router: axum::Router,
    builder: Arc<Builder<TokioExecutor>>,
    limits: ConnLimits,
    handshake_timeout: Duration,
    rejection: conn::Rejection,
}

/// Serves `listener` until `shutdown` resolves, then closes it and drains the
/// open connections (at most `shutdown.drain_timeout`).
pub async fn run(app: Arc<App>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let serving = Serving::new(app.clone());
    let graceful = GracefulShutdown::new();
    let cap = ConnCap::new(app.config.limits.max_connections, "limits.max_connections");
    let mut shutdown = std::pin::pin!(shutdown);
    tracing::info!(addr = ?listener.local_addr().ok(), tls = serving.tls.is_some(), "control plane serving");
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            c = accept::accept(&listener, "control plane") => c,
        };
        let Some(slot) = cap.admit() else {
            app.metrics.connections_refused.inc();
            continue;
        };
        tokio::spawn(serving.clone().connection(stream, slot, graceful.watcher()));
    }
    drop(listener);
    let drain = app.config.shutdown.drain_timeout;
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after {drain:?} (shutdown.drain_timeout); closing them");
    }
}

impl Serving {
    fn new(app: Arc<App>) -> Serving {
        let limits = app.config.limits.clone();
        let rejection: conn::Rejection = {
            let (app, max) = (app.clone(), limits.max_header_bytes);
            Arc::new(move |status| {
                app.metrics
                    .requests
                    .with_label_values(&["unparsable", &status.to_string()])
                    .inc();
                conn::problem_response(&conn::parse_problem(status, max, "limits.max_header_bytes"))
            })
        };
        let mut builder = Builder::new(TokioExecutor::new());
        // The guard owns the head and idle timeouts. hyper's HTTP/1 head
        // timeout is off: given a timer it runs 30 s by default, also while a
        // kept-alive connection waits for its next request, and closed a load
        // balancer's quiet connections at 30 s instead of
        // `limits.idle_timeout`, racing its next request on them.
        builder
            .http1()
            .header_read_timeout(None)
            .max_buf_size(limits.max_header_bytes)
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        Serving {
            router: api::router(app.clone()),
            tls: app.cert.clone(),
            app,
            builder: Arc::new(builder),
            limits: ConnLimits {
                header_timeout: limits.header_timeout,
                idle_timeout: limits.idle_timeout,
            },
            handshake_timeout: limits.header_timeout,
            rejection,
        }
    }

    /// One connection, from the TLS handshake (bounded by the head timeout)
    /// to its close.
    async fn connection(self, stream: TcpStream, slot: OwnedSemaphorePermit, watcher: Watcher) {
        stream.set_nodelay(true).ok();
        self.app.metrics.connections.inc();
        let result = match &self.tls {
            None => self.http(stream, watcher).await,
            Some(cert) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(cert.config());
                match tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => self.http(s, watcher).await,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        Ok(())
                    }
                    Err(_) => Ok(()),
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        self.app.metrics.connections.dec();
        drop(slot);
    }

    async fn http<S>(&self, io: S, watcher: Watcher) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (io, tracker) = conn::guard(io, self.limits, self.rejection.clone());
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), tracked(self.router.clone(), tracker))
            .into_owned();
        watcher.watch(conn).await
    }
}

/// The router as one connection's service: each request is marked in the
/// connection guard from its start to the end of its response body.
fn tracked(
    router: axum::Router,
    tracker: conn::ConnTracker,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<conn::Tracked<axum::body::Body>>,
    Error = std::convert::Infallible,
    Future = impl Future<
        Output = Result<http::Response<conn::Tracked<axum::body::Body>>, std::convert::Infallible>,
    > + Send,
> + Clone {
    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let flight = tracker.begin();
        let mut router = router.clone();
        let tracker = tracker.clone();
        async move {
            // A Router is always ready, and its error type is Infallible.
            let resp = tower_service::Service::call(&mut router, req).await?;
            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                // A WebSocket (`/v1/streams/echo`): no longer HTTP/1 once
                // this is written; the handler owns its life.
                tracker.upgraded();
            }
            Ok(resp.map(|b| conn::Tracked::new(b, flight)))
        }
    })
}

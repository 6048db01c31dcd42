//! The local listener: accepts the call handler's connections and serves
//! each with HTTP/1.1 under the connection guard ([`detour_wire::conn`]),
//! every request through [`Ingress::handle`]. A connection upgraded by a
//! `101` (a WebSocket) leaves HTTP here and becomes a stream
//! ([`crate::streams`]). On shutdown it drains without closing a connection
//! under a request (see [`serve`]), then cuts the streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderValue;
use http::StatusCode;
use http::header::CONNECTION;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use detour_wire::accept::{ConnCap, accept};
use detour_wire::conn::{self, ConnLimits, Tracked};

use super::{Ingress, rejection};
use crate::agent::Stop;
use crate::config;
use crate::runtime::Shared;

/// How long a connection accepted at the end of the drain's accepting
/// stays open for its first request.
const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(250);

/// What every connection of the listener shares.
struct Conns {
    shared: Arc<Shared>,
    ingress: Arc<Ingress>,
    cap: ConnCap,
    /// Set when the drain ends: every connection shuts down gracefully
    /// (an idle one at once, one under a request after its answer).
    closing: watch::Sender<bool>,
    /// Set when shutdown begins: every answer from then on says
    /// `Connection: close`, so each kept-alive connection closes right after
    /// its next request is answered.
    draining: Arc<AtomicBool>,
    /// Connections open now.
    open: Arc<AtomicUsize>,
}

/// Serves the local listener until `stop` says how the agent stops, then
/// drains:
/// 1. Every answer from now on says `Connection: close`.
/// 2. On [`Stop::Terminate`] (the last process serving this host) new
///    connections are still accepted for `ingress.drain_idle`, so a systemd
///    restart keeps them waiting in the backlog only while the process
///    starts again; on [`Stop::HandedOver`] the new process accepts them and
///    this one stops at once.
/// 3. Kept-alive connections close on their own after their next answer;
///    those that stay idle for all of `ingress.drain_idle` are closed then.
/// 4. Requests still in flight get up to `ingress.drain_timeout`.
/// 5. Streams (upgraded connections) are cut: they would never end on
///    their own, and the call handler reconnects to whoever serves next.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Option<Stop>>,
    cfg: config::Ingress,
) {
    let conns = Conns {
        ingress: Arc::new(Ingress {
            forwarder: shared.forwarder.clone(),
            metrics: shared.metrics.clone(),
            shared: shared.clone(),
            streams: Arc::new(crate::streams::Streams::new(
                shared.forwarder.clone(),
                shared.metrics.clone(),
            )),
        }),
        cap: ConnCap::new(cfg.max_connections, "ingress.max_connections"),
        shared,
        closing: watch::channel(false).0,
        draining: Arc::new(AtomicBool::new(false)),
        open: Arc::new(AtomicUsize::new(0)),
    };
    loop {
        tokio::select! {
            (tcp, _) = accept(&listener, "local") => conns.serve(tcp),
            _ = stop.changed() => break,
        }
    }
    let how = (*stop.borrow()).unwrap_or(Stop::Terminate);
    conns.draining.store(true, Ordering::Relaxed);
    let linger_end = Instant::now() + cfg.drain_idle;
    if how == Stop::Terminate {
        loop {
            tokio::select! {
                (tcp, _) = accept(&listener, "local") => conns.serve(tcp),
                _ = tokio::time::sleep_until(linger_end) => break,
            }
        }
    }
    drop(listener);
    // A connection accepted just now has its request on the way: it gets
    // the time to send it before idle connections are closed.
    let close_idle_at = linger_end.max(Instant::now() + FIRST_REQUEST_GRACE);
    while conns.open.load(Ordering::Relaxed) > 0 && Instant::now() < close_idle_at {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let idle = conns.open.load(Ordering::Relaxed);
    if idle > 0 {
        tracing::info!(
            connections = idle,
            "closing kept-alive connections that stayed idle through ingress.drain_idle"
        );
    }
    let _ = conns.closing.send(true);
    let open = conns.open.clone();
    let closed = async {
        while open.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(cfg.drain_timeout, closed).await.is_err() {
        tracing::warn!("drain timeout passed with requests still in flight");
    }
    let streams = conns.ingress.streams.live();
    if streams > 0 {
        tracing::info!(streams, "cutting the streams still open at the end of the drain");
    }
    conns.ingress.streams.close_all().await;
}

/// hyper's server for the call handler's connections.
///
/// The guard (`wire::conn`) owns the head and idle timeouts, so hyper gets
/// no timer and no head timeout of its own: given a timer, hyper runs a
/// 30 s head timeout by default, which also runs while a kept-alive
/// connection waits for its next request, and closed quiet connections at
/// 30 s instead of `ingress.idle_timeout`, racing the call handler's next
/// request on them.
///
/// Half-close: hyper does not read a connection for a hang-up while a
/// request is in flight. That read took a second 8 KiB buffer per request
/// (the first is still held by the request's headers), and a request goes
/// on to its answer or deadline anyway (ARCHITECTURE.md).
fn http1_builder(max_header_bytes: usize) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .header_read_timeout(None)
        .max_buf_size(max_header_bytes)
        .half_close(true)
        .keep_alive(true);
    builder
}

impl Conns {
    /// Serves one accepted connection on its own task.
    fn serve(&self, tcp: TcpStream) {
        let Some(slot) = self.cap.admit() else {
            self.shared.metrics.local_connections_refused.inc();
            return;
        };
        // Shared with the streams this connection may become, which hold
        // it for their life.
        let slot = Arc::new(slot);
        let _ = tcp.set_nodelay(true);
        // Limits as of now: a reload applies them to new connections.
        let now = self.shared.forwarder.runtime().config.ingress.clone();
        let limits = ConnLimits {
            header_timeout: now.header_timeout,
            idle_timeout: now.idle_timeout,
        };
        let rejection = rejection(self.shared.metrics.clone(), now.max_header_bytes);
        let builder = http1_builder(now.max_header_bytes);
        let (io, tracker) = conn::guard(tcp, limits, rejection);
        let (ingress, draining) = (self.ingress.clone(), self.draining.clone());
        let stream_slot = slot.clone();
        let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let (ingress, draining, tracker) = (ingress.clone(), draining.clone(), tracker.clone());
            let flight = tracker.begin();
            // Only an upgrade takes the connection's stream slot: inserting
            // it into every request's extensions would cost each request
            // three allocations for nothing.
            if crate::streams::is_upgrade(req.headers()) {
                req.extensions_mut()
                    .insert(crate::streams::Slot(stream_slot.clone()));
            }
            async move {
                let mut resp = ingress.handle(req).await;
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    // The connection becomes a stream once this is written.
                    tracker.upgraded();
                } else if draining.load(Ordering::Relaxed) {
                    resp.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, std::convert::Infallible>(resp.map(|b| Tracked::new(b, flight)))
            }
        });
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let mut closing = self.closing.subscribe();
        let gauge = self.shared.metrics.local_connections.clone();
        let open = self.open.clone();
        gauge.inc();
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                () = async { let _ = closing.wait_for(|c| *c).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "local connection ended");
            }
            gauge.dec();
            open.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A kept-alive connection quiet for longer than hyper's own default
    /// head timeout (30 s) still serves its next request: only the guard
    /// closes quiet connections, at `ingress.idle_timeout`. Time is paused,
    /// so the two minutes of quiet take none.
    #[tokio::test(start_paused = true)]
    async fn hyper_closes_no_quiet_connection_on_its_own() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let service = service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(crate::ingress::full("ok")))
            });
            let _ = http1_builder(32 * 1024)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1024];
        for round in 0..3 {
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
            let n = s.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]);
            assert!(head.starts_with("HTTP/1.1 200"), "round {round}: {head:?}");
            tokio::time::sleep(Duration::from_secs(120)).await;
        }
    }
}

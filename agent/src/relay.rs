//! Relay: the peers' side (Squid's role, done safely). Accepts mutual TLS
//! from fleet members only, then exactly one `CONNECT` per connection, and only
//! to the control plane this agent is configured with (or the object store
//! of its own `[recordings]`). The tunnel is spliced
//! over this agent's own direct uplink (one hop, never through its own peers)
//! and its bytes are never read: TLS to the control plane is end to end.
//! A peer certificate on the fleet CA's revocation list (`tls.crl`) is
//! refused at the handshake, and an open tunnel whose peer a new list
//! revokes is closed.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use detour_wire::Problem;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::config::AgentConfig;
use crate::ingress::{Body, problem};
use crate::metrics::Metrics;
use crate::paths::Target;

pub mod frames;

/// Counts open tunnels, in total and per peer.
#[derive(Default)]
pub struct TunnelCounts {
    per_peer: Mutex<HashMap<String, usize>>,
    /// Of those, the framed ones: their peers are told when this relay
    /// drains and close them themselves.
    framed: AtomicUsize,
}

/// Counts one framed tunnel while it lives.
struct FramedTunnel(Arc<TunnelCounts>);

impl FramedTunnel {
    fn new(counts: Arc<TunnelCounts>) -> FramedTunnel {
        counts.framed.fetch_add(1, Ordering::Relaxed);
        FramedTunnel(counts)
    }
}

impl Drop for FramedTunnel {
    fn drop(&mut self) {
        self.0.framed.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A slot in the tunnel limits, released on drop.
pub struct TunnelSlot {
    counts: Arc<TunnelCounts>,
    peer: String,
    metrics: Arc<Metrics>,
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        let mut m = self.counts.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
        self.metrics.relay_tunnels_active.dec();
    }
}

impl TunnelCounts {
    /// Open tunnels whose peers were told of a drain (framed ones).
    pub fn framed(&self) -> usize {
        self.framed.load(Ordering::Relaxed)
    }

    /// Takes a slot, or says which limit is full.
    fn acquire(
        self: &Arc<Self>,
        peer: &str,
        max_total: usize,
        max_peer: usize,
        metrics: &Arc<Metrics>,
    ) -> Result<TunnelSlot, &'static str> {
        let mut m = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = m.values().sum();
        if total >= max_total {
            return Err("tunnel_limit");
        }
        let n = m.entry(peer.to_owned()).or_insert(0);
        if *n >= max_peer {
            return Err("peer_tunnel_limit");
        }
        *n += 1;
        metrics.relay_tunnels_active.inc();
        Ok(TunnelSlot {
            counts: self.clone(),
            peer: peer.to_owned(),
            metrics: metrics.clone(),
        })
    }
}

/// Maps a failed TLS handshake to the `reason` label.
fn handshake_reason(e: &io::Error) -> &'static str {
    let Some(inner) = e.get_ref() else {
        return "handshake_error";
    };
    match inner.downcast_ref::<rustls::Error>() {
        Some(rustls::Error::NoCertificatesPresented) => "no_client_cert",
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Expired))
        | Some(rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. })) => {
            "expired_cert"
        }
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) => "revoked",
        Some(rustls::Error::InvalidCertificate(_)) => "untrusted_cert",
        Some(_) => "tls_error",
        None => "handshake_error",
    }
}

/// Everything the relay needs; swapped whole on reload.
pub struct Relay {
    pub config: Arc<AgentConfig>,
    pub acceptor: TlsAcceptor,
    /// How `acceptor` checks a peer's certificate (fleet CA, revocation lists).
    pub verifier: Arc<dyn ClientCertVerifier>,
    /// The newest of those checks, for open tunnels: sent when a reload
    /// changes the fleet CA or the revocation lists, and kept across reloads
    /// (like `counts`).
    pub trust: Arc<watch::Sender<Arc<dyn ClientCertVerifier>>>,
    pub metrics: Arc<Metrics>,
    pub counts: Arc<TunnelCounts>,
}

/// Accepts peer connections until `shutdown` turns true. Tunnels open then
/// carry on: each framed one tells its peer at once that this relay is
/// draining, so the peer sends new requests on fresh tunnels (to the process
/// that took over) and closes this one when its requests in flight are
/// answered. Whatever is still open when `close` turns true (the agent's
/// drain time is over) is closed.
pub async fn serve(
    listener: TcpListener,
    relay: Arc<arc_swap::ArcSwap<Relay>>,
    mut shutdown: watch::Receiver<bool>,
    close: watch::Receiver<bool>,
) {
    loop {
        let (tcp, remote) = tokio::select! {
            c = detour_wire::accept::accept(&listener, "relay") => c,
            _ = shutdown.changed() => return,
        };
        let relay = relay.load_full();
        let mut stop = close.clone();
        let drain = shutdown.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            // Tunnels end with the agent at the latest: a peer sees the close
            // and moves its requests to another path.
            tokio::select! {
                _ = handle_conn(relay, tcp, remote, drain, stop.clone()) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

async fn handle_conn(
    relay: Arc<Relay>,
    tcp: TcpStream,
    remote: std::net::SocketAddr,
    drain: watch::Receiver<bool>,
    close: watch::Receiver<bool>,
) {
    let limits = &relay.config.relay;
    let started = Instant::now();
    let tls = match tokio::time::timeout(limits.handshake_timeout, relay.acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = handshake_reason(&e);
            relay.metrics.relay_rejected.with_label_values(&[reason]).inc();
            tracing::warn!(%remote, reason, error = %e, "relay refused a TLS handshake");
            return;
        }
        Err(_) => {
            relay
                .metrics
                .relay_rejected
                .with_label_values(&["handshake_timeout"])
                .inc();
            tracing::warn!(%remote, "relay handshake timed out");
            return;
        }
    };
    // The fleet CA is the trust boundary: any PoP it certified may relay
    // through here, listed in this agent's peers file or not (peer lists
    // differ between PoPs during a rollout). A certificate that names no PoP
    // cannot be told apart in logs and limits, so it is refused.
    let peer_certs = tls.get_ref().1.peer_certificates();
    let Some(peer) = crate::tls::peer_name(peer_certs) else {
        relay
            .metrics
            .relay_rejected
            .with_label_values(&["no_pop_name"])
            .inc();
        tracing::warn!(%remote, "relay refused a fleet certificate that names no PoP");
        return;
    };
    let chain: Arc<[CertificateDer<'static>]> = peer_certs
        .unwrap_or_default()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    // The CONNECT head must arrive within what is left of the handshake budget.
    let head_budget = limits
        .handshake_timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(10));
    let relay2 = relay.clone();
    let peer2 = peer.clone();
    let service = service_fn(move |req| {
        let relay = relay2.clone();
        let peer = Peer {
            name: peer2.clone(),
            chain: chain.clone(),
        };
        let (drain, close) = (drain.clone(), close.clone());
        async move {
            Ok::<_, std::convert::Infallible>(handle_connect(relay, peer, remote, req, drain, close).await)
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_budget)
        .keep_alive(false)
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        if e.is_timeout() {
            relay
                .metrics
                .relay_rejected
                .with_label_values(&["handshake_timeout"])
                .inc();
            tracing::warn!(%remote, %peer, "peer sent no CONNECT in time");
        } else if e.is_parse() || e.is_parse_too_large() {
            relay
                .metrics
                .relay_rejected
                .with_label_values(&["malformed"])
                .inc();
            tracing::warn!(%remote, %peer, error = %e, "relay refused a malformed CONNECT");
        } else {
            tracing::debug!(%remote, %peer, error = %e, "relay connection ended");
        }
    }
}

fn refuse(relay: &Relay, status: u16, reason: &'static str, title: &str, detail: String) -> Response<Body> {
    relay.metrics.relay_rejected.with_label_values(&[reason]).inc();
    let mut resp = problem(Problem::new(status, title, detail).with("reason", reason));
    resp.headers_mut()
        .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    resp
}

/// The peer on the other end of a relay connection: the PoP its certificate
/// names, and that certificate's chain (checked again when trust changes).
struct Peer {
    name: String,
    chain: Arc<[CertificateDer<'static>]>,
}

/// Resolves when a new check of peer certificates (a reload that changed the
/// fleet CA or the revocation lists) finds `chain` revoked; never otherwise.
async fn until_revoked(
    mut trust: watch::Receiver<Arc<dyn ClientCertVerifier>>,
    chain: Arc<[CertificateDer<'static>]>,
) {
    let Some((end_entity, intermediates)) = chain.split_first() else {
        return std::future::pending().await;
    };
    loop {
        if trust.changed().await.is_err() {
            return std::future::pending().await;
        }
        let verifier = trust.borrow_and_update().clone();
        let now = rustls::pki_types::UnixTime::now();
        if let Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) =
            verifier.verify_client_cert(end_entity, intermediates, now)
        {
            return;
        }
    }
}

async fn handle_connect(
    relay: Arc<Relay>,
    peer: Peer,
    remote: std::net::SocketAddr,
    req: Request<Incoming>,
    drain: watch::Receiver<bool>,
    mut close: watch::Receiver<bool>,
) -> Response<Body> {
    let Peer { name: peer, chain } = peer;
    if req.method() != Method::CONNECT {
        return refuse(
            &relay,
            405,
            "not_connect",
            "Only CONNECT",
            "this relay only carries CONNECT tunnels".to_owned(),
        );
    }
    let target = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let Some(dest) = allowed_target(&relay.config, &target) else {
        tracing::warn!(%remote, %peer, %target, "relay refused a CONNECT to a forbidden target");
        return refuse(
            &relay,
            403,
            "forbidden_target",
            "Forbidden tunnel target",
            format!(
                "this relay only tunnels to the control plane and its recordings store, not to `{target}`"
            ),
        );
    };
    let limits = &relay.config.relay;
    let slot = match relay.counts.acquire(
        &peer,
        limits.max_tunnels,
        limits.max_tunnels_per_peer,
        &relay.metrics,
    ) {
        Ok(s) => s,
        Err(reason) => {
            tracing::warn!(%peer, reason, "relay refused a tunnel over its limit");
            return refuse(
                &relay,
                503,
                reason,
                "Relay busy",
                format!("tunnel refused: {reason}"),
            );
        }
    };
    let upstream = match dial(&relay, &dest).await {
        Ok(s) => s,
        Err((status, reason, detail)) => {
            return refuse(&relay, status, reason, "Control plane unreachable", detail);
        }
    };
    relay
        .metrics
        .relay_tunnels_total
        .with_label_values(&[&peer])
        .inc();
    let idle = limits.idle_timeout;
    let framed = req
        .headers()
        .get(frames::HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(frames::FRAMED.as_bytes()));
    let counts = relay.counts.clone();
    let mut trust = relay.trust.subscribe();
    if !Arc::ptr_eq(&*trust.borrow(), &relay.verifier) {
        // Trust changed since this connection's handshake: check now.
        trust.mark_changed();
    }
    tokio::spawn(async move {
        let _slot = slot;
        let framed = framed.then(|| FramedTunnel::new(counts));
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let down = TokioIo::new(upgraded);
                let spliced = async {
                    if let Some(framed) = framed {
                        splice_framed(down, upstream, idle, drain, framed).await
                    } else {
                        splice(down, upstream, idle).await
                    }
                };
                tokio::select! {
                    r = spliced => match r {
                        Ok((up_bytes, down_bytes)) => {
                            tracing::debug!(%peer, up_bytes, down_bytes, "tunnel closed");
                        }
                        Err(e) => tracing::debug!(%peer, error = %e, "tunnel ended"),
                    },
                    _ = close.wait_for(|c| *c) => tracing::info!(%peer, "tunnel still open at the end of the drain: closed"),
                    _ = until_revoked(trust, chain) => tracing::warn!(
                        %peer,
                        "tunnel closed: the peer's certificate is revoked (tls.crl)"
                    ),
                }
            }
            Err(e) => tracing::debug!(%peer, error = %e, "tunnel upgrade failed"),
        }
    });
    let mut resp = Response::builder().status(StatusCode::OK);
    if framed {
        resp = resp.header(frames::HEADER, frames::FRAMED);
    }
    resp.body(crate::ingress::full(bytes::Bytes::new()))
        .unwrap_or_default()
}

/// The target a CONNECT to `authority` may reach: an endpoint of this
/// agent's own control plane, or the object store of its own
/// `[recordings]`; nothing else.
pub fn allowed_target(config: &AgentConfig, authority: &str) -> Option<Target> {
    if let Some(e) = config
        .control_plane
        .endpoints
        .iter()
        .find(|e| authority_matches(authority, &e.host, e.port))
    {
        return Some(e.into());
    }
    let store = &config.recordings.as_ref()?.store;
    authority_matches(authority, &store.host, store.port).then(|| store.into())
}

/// Connects to the target's configured addresses (or its resolved host),
/// the first that answers, within `forward.connect_timeout`. The relay
/// dials only its own configured targets: never an address a peer names.
async fn dial(relay: &Relay, target: &Target) -> Result<TcpStream, (u16, &'static str, String)> {
    let unreachable = |detail: String| (502, "upstream_unreachable", detail);
    let addrs: Vec<std::net::SocketAddr> = if target.addresses.is_empty() {
        tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| unreachable(format!("resolving {}: {e}", target.host)))?
            .collect()
    } else {
        target.addresses.clone()
    };
    let connect = async {
        let mut last = None;
        for a in &addrs {
            match TcpStream::connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")))
    };
    match tokio::time::timeout(relay.config.forward.connect_timeout, connect).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(unreachable(format!("connecting: {e}"))),
        Err(_) => Err((504, "upstream_timeout", "connect timed out".to_owned())),
    }
}

/// `host:port` equality with the configured control plane (host
/// case-insensitive; an IPv6 host in brackets). The target must be exactly
/// that authority: a looser parse let `HOST[:x:]:443` pass (found by the
/// `relay_target` fuzz target; the relay dials its configured address in any
/// case, so it was never an open proxy).
pub fn authority_matches(target: &str, host: &str, port: u16) -> bool {
    let expected = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    target.eq_ignore_ascii_case(&expected)
}

/// Copies both ways until both sides close, or nothing moves for `idle`.
/// Returns bytes copied (client to upstream, upstream to client).
pub async fn splice<A, B>(a: A, b: B, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Activity {
        inner: a,
        last: last.clone(),
        epoch,
    };
    let mut b = Activity {
        inner: b,
        last: last.clone(),
        epoch,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    until_idle(copy, last, epoch, idle).await
}

/// [`splice`] with the downstream (to the peer, `a`) framed, so the relay can
/// announce that it is draining when `drain` turns true (see [`frames`]).
/// `held` is dropped when the peer has closed its side: a draining relay
/// waits for its peers, not for a control plane that never closes its side
/// (e.g. behind a blackholed uplink).
pub async fn splice_framed<A, B, H>(
    a: A,
    b: B,
    idle: Duration,
    drain: watch::Receiver<bool>,
    held: H,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (mut a_read, mut a_write) = tokio::io::split(Activity {
        inner: a,
        last: last.clone(),
        epoch,
    });
    let (mut b_read, mut b_write) = tokio::io::split(Activity {
        inner: b,
        last: last.clone(),
        epoch,
    });
    let up = async {
        let copied = tokio::io::copy(&mut a_read, &mut b_write).await;
        drop(held);
        let n = copied?;
        b_write.shutdown().await?;
        Ok::<_, io::Error>(n)
    };
    let down = frames::copy_framed(&mut b_read, &mut a_write, drain);
    until_idle(async { tokio::try_join!(up, down) }, last, epoch, idle).await
}

/// Runs `copy` to its end, or fails it when no read has moved a byte for
/// `idle` (`last`: milliseconds after `epoch` of the latest read).
async fn until_idle<F>(
    copy: F,
    last: Arc<AtomicU64>,
    epoch: Instant,
    idle: Duration,
) -> io::Result<(u64, u64)>
where
    F: Future<Output = io::Result<(u64, u64)>>,
{
    tokio::pin!(copy);
    loop {
        let since = Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = epoch + since + idle;
        tokio::select! {
            r = &mut copy => return r,
            _ = tokio::time::sleep_until(deadline) => {
                let since_now = Duration::from_millis(last.load(Ordering::Relaxed));
                if epoch + since_now + idle <= Instant::now() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "tunnel idle"));
                }
            }
        }
    }
}

/// Notes the time of every read, for the idle timeout.
struct Activity<T> {
    inner: T,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.last
                .store(this.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_control_plane_authority_matches() {
        assert!(authority_matches(
            "cp.example.internal:443",
            "cp.example.internal",
            443
        ));
        assert!(authority_matches(
            "CP.Example.Internal:443",
            "cp.example.internal",
            443
        ));
        assert!(!authority_matches(
            "cp.example.internal:22",
            "cp.example.internal",
            443
        ));
        assert!(!authority_matches(
            "cp.example.internal",
            "cp.example.internal",
            443
        ));
        assert!(!authority_matches("evil.example:443", "cp.example.internal", 443));
        assert!(!authority_matches(
            "cp.example.internal.evil:443",
            "cp.example.internal",
            443
        ));
        assert!(!authority_matches(
            "user@cp.example.internal:443",
            "cp.example.internal",
            443
        ));
        assert!(authority_matches("[::1]:8443", "::1", 8443));
        // Found by the relay_target fuzz target: a bracket inside the host.
        assert!(!authority_matches(
            "CP.EXAMPLE.INTERNAL[:4:004:]:443",
            "cp.example.internal",
            443
        ));
        assert!(!authority_matches(
            "cp.example.internal[:443",
            "cp.example.internal",
            443
        ));
        assert!(!authority_matches("::1:8443", "::1", 8443));
    }
}

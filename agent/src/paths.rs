//! Paths to the control plane: `direct` (this server's own uplink) and
//! `via:<peer>` (mutual TLS to a peer's relay, CONNECT, then TLS to the control
//! plane inside the tunnel). Each path owns a connection pool ([`pool`])
//! that the health probes keep warm, so a switch costs no handshakes.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::{AgentConfig, Endpoint, Peer, Store};
use crate::relay::frames::{self, Deframer};
use crate::tls::ClientTlsError;
use crate::transport::{Registration, Sockets};

pub mod pool;
pub use pool::{Pool, PoolError};

/// Why a connection on a path could not be set up. Nothing of the request
/// was sent when any of these happens, so another path may always be tried.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("resolving {target}: {source}")]
    Resolve { target: String, source: io::Error },
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connect to {target} timed out after {elapsed:?}")]
    Timeout { target: String, elapsed: Duration },
    #[error("TLS to peer relay {peer}: {source}")]
    PeerTls { peer: String, source: io::Error },
    #[error("peer {peer} refused the tunnel: {status}")]
    Refused { peer: String, status: String },
    #[error("peer {peer} relay spoke no HTTP: {detail}")]
    Protocol { peer: String, detail: String },
    /// The HTTP connection setup with the target (HTTP/2's preface and
    /// settings) failed.
    #[error("HTTP handshake with {target}: {detail}")]
    Handshake { target: String, detail: String },
    /// TLS to the target failed (a pool's connection, or one of
    /// [`PathClient::dial_http1`]).
    #[error("TLS to the control plane {target}: {source}")]
    ControlPlaneTls { target: String, source: io::Error },
}

impl DialError {
    /// A relay that answered but said no: the peer is up, yet cannot carry us.
    pub fn is_refusal(&self) -> bool {
        matches!(self, DialError::Refused { .. })
    }
}

/// What a path carries requests to: the control plane, or the recordings'
/// object store. A path only ever dials its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// Addresses to dial instead of resolving `host`.
    pub addresses: Vec<SocketAddr>,
    pub tls: bool,
}

impl Target {
    /// `host:port` as in a CONNECT request.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl From<&Endpoint> for Target {
    fn from(cp: &Endpoint) -> Target {
        Target {
            host: cp.host.clone(),
            port: cp.port,
            addresses: cp.addresses.clone(),
            tls: cp.tls,
        }
    }
}

impl From<&Store> for Target {
    fn from(s: &Store) -> Target {
        Target {
            host: s.host.clone(),
            port: s.port,
            addresses: s.addresses.clone(),
            tls: s.tls,
        }
    }
}

/// Where a path dials.
#[derive(Debug, Clone)]
pub enum Route {
    /// This server's own uplink.
    Direct,
    /// Through a peer agent's relay.
    Via {
        /// The peer's PoP name, which its relay certificate must carry.
        peer: String,
        /// `host:port` of the peer's relay.
        relay: String,
    },
}

/// A byte stream to the control plane, before TLS to it (if any).
///
/// Each holds the registration of its TCP connection with the path's
/// [`Sockets`], so the kernel's retransmission counters are read for exactly
/// as long as the connection lives.
pub enum DialStream {
    Tcp(TcpStream, Option<Registration>),
    /// Through a relay; its downstream is framed when the relay agreed to.
    Tunnel(Box<TlsStream<TcpStream>>, Option<Registration>, Option<Deframer>),
}

impl AsyncRead for DialStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DialStream::Tcp(s, _) => Pin::new(s).poll_read(cx, buf),
            DialStream::Tunnel(s, _, Some(f)) => f.poll_read(Pin::new(s.as_mut()), cx, buf),
            DialStream::Tunnel(s, _, None) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl DialStream {
    /// Tells the connection's registration that bytes went out after a
    /// write that returned `result`, so its counters are read again.
    fn note(&self, result: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = result
            && *n > 0
            && let DialStream::Tcp(_, Some(r)) | DialStream::Tunnel(_, Some(r), _) = self
        {
            r.wrote();
        }
    }
}

impl AsyncWrite for DialStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = match this {
            DialStream::Tcp(s, _) => Pin::new(s).poll_write(cx, buf),
            DialStream::Tunnel(s, ..) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        this.note(&result);
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DialStream::Tcp(s, _) => Pin::new(s).poll_flush(cx),
            DialStream::Tunnel(s, reg, _) => {
                // TLS may hold records a write accepted until a flush sends
                // them.
                if let Some(r) = reg {
                    r.wrote();
                }
                Pin::new(s.as_mut()).poll_flush(cx)
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DialStream::Tcp(s, _) => Pin::new(s).poll_shutdown(cx),
            DialStream::Tunnel(s, reg, _) => {
                if let Some(r) = reg {
                    r.wrote();
                }
                Pin::new(s.as_mut()).poll_shutdown(cx)
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = match this {
            DialStream::Tcp(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            DialStream::Tunnel(s, ..) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        };
        this.note(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            DialStream::Tcp(s, _) => s.is_write_vectored(),
            DialStream::Tunnel(s, ..) => s.is_write_vectored(),
        }
    }
}

/// Sets up raw connections for one path: a path only ever goes to its
/// target.
struct DialerInner {
    route: Route,
    target_host: String,
    target_port: u16,
    target_authority: String,
    target_addresses: Vec<SocketAddr>,
    connect_timeout: Duration,
    peer_tls: Option<TlsConnector>,
    sockets: Arc<Sockets>,
    retirement: Arc<Retirement>,
    /// What the last TLS handshake with the peer's relay said about
    /// certificates (revoked, untrusted, refused), until one succeeds: the
    /// reason `/status` gives for a `via:` path that is down.
    cert_problem: ArcSwapOption<String>,
}

/// When a peer's relay says it is draining (its process is being replaced),
/// the path's pool is retired at once: requests in flight on its tunnels
/// finish there, each old tunnel closes as its last request ends (its idle
/// ones at once), which lets the old process exit early, and the next request
/// gets a fresh pool whose tunnels reach the process that took over. Nothing
/// is cut, so nothing counts against the path.
#[derive(Debug)]
pub struct Retirement {
    path: Arc<str>,
    /// The generation of the pool in use (or the next one, when none is).
    current: AtomicU64,
    /// The path's pool (weak: the pool's dialer holds this).
    pool: OnceLock<Weak<Pool<Full<Bytes>>>>,
    /// The path's pool for streamed bodies, retired with the other.
    stream_pool: OnceLock<Weak<Pool<StreamBody>>>,
    /// Counts retirements (`detour_path_pool_renewals_total`), once the
    /// runtime has given it one.
    renewals: OnceLock<prometheus::IntCounter>,
    lock: Mutex<()>,
}

impl Retirement {
    fn new(path: &str) -> Retirement {
        Retirement {
            path: Arc::from(path),
            current: AtomicU64::new(1),
            pool: OnceLock::new(),
            stream_pool: OnceLock::new(),
            renewals: OnceLock::new(),
            lock: Mutex::new(()),
        }
    }

    /// A relay said "draining" on a tunnel of pool `generation`.
    fn signal(&self, generation: u64) {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.current.load(Ordering::Relaxed) != generation {
            // Another tunnel of that pool said so first.
            return;
        }
        self.current.store(generation + 1, Ordering::Relaxed);
        if let Some(pool) = self.pool.get().and_then(Weak::upgrade) {
            pool.retire(generation + 1);
        }
        if let Some(pool) = self.stream_pool.get().and_then(Weak::upgrade) {
            pool.retire(generation + 1);
        }
        if let Some(c) = self.renewals.get() {
            c.inc();
        }
        tracing::info!(path = %self.path, "the peer's relay is draining: new requests go on fresh tunnels, those in flight finish");
    }
}

async fn tcp_connect(addrs: &[SocketAddr], target: &str) -> Result<TcpStream, DialError> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, source) = match last {
        Some((a, e)) => (a.to_string(), e),
        None => (
            target.to_owned(),
            io::Error::new(io::ErrorKind::NotFound, "no addresses"),
        ),
    };
    Err(DialError::Connect { addr, source })
}

async fn resolve(target: &str) -> Result<Vec<SocketAddr>, DialError> {
    if let Ok(a) = target.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    tokio::net::lookup_host(target)
        .await
        .map(|it| it.collect())
        .map_err(|source| DialError::Resolve {
            target: target.to_owned(),
            source,
        })
}

impl DialerInner {
    /// Remembers what a tunnel setup said about certificates: a refused one
    /// (either side's) is kept for `/status` and logged when it is new; a
    /// relay that answered clears it.
    fn note_certificates(&self, peer: &str, err: Option<&DialError>) {
        match err {
            None | Some(DialError::Refused { .. }) => {
                if self.cert_problem.swap(None).is_some() {
                    tracing::info!(path = %self.retirement.path, "certificates accepted again by {peer}'s relay");
                }
            }
            Some(DialError::PeerTls { source, .. }) => {
                if let Some(problem) = crate::tls::certificate_problem(source) {
                    let problem = format!("{peer}'s relay: {problem}");
                    let old = self.cert_problem.swap(Some(Arc::new(problem.clone())));
                    if old.as_deref().map(String::as_str) != Some(problem.as_str()) {
                        tracing::warn!(path = %self.retirement.path, "{problem}");
                    }
                }
            }
            Some(_) => {}
        }
    }

    async fn dial(&self, generation: u64) -> Result<DialStream, DialError> {
        let target = match &self.route {
            Route::Direct => self.target_authority.clone(),
            Route::Via { relay, .. } => relay.clone(),
        };
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(self.connect_timeout, self.dial_inner(generation)).await {
            Ok(r) => r,
            Err(_) => Err(DialError::Timeout {
                target,
                elapsed: started.elapsed(),
            }),
        }
    }

    async fn dial_inner(&self, generation: u64) -> Result<DialStream, DialError> {
        match &self.route {
            Route::Direct => {
                let addrs = if self.target_addresses.is_empty() {
                    resolve(&format!("{}:{}", self.target_host, self.target_port)).await?
                } else {
                    self.target_addresses.clone()
                };
                let tcp = tcp_connect(&addrs, &self.target_authority).await?;
                let reg = self.sockets.register(&tcp);
                Ok(DialStream::Tcp(tcp, reg))
            }
            // Boxed: a tunnel's dial (TLS to the peer, the CONNECT exchange)
            // is a large future, and a `direct` dial would carry it inline.
            Route::Via { peer, relay } => Box::pin(self.dial_via(peer, relay, generation)).await,
        }
    }

    async fn dial_via(&self, peer: &str, relay: &str, generation: u64) -> Result<DialStream, DialError> {
        let addrs = resolve(relay).await?;
        let tcp = tcp_connect(&addrs, relay).await?;
        let reg = self.sockets.register(&tcp);
        let Some(tls) = &self.peer_tls else {
            return Err(DialError::PeerTls {
                peer: peer.to_owned(),
                source: io::Error::other("no [tls] identity configured"),
            });
        };
        let name = ServerName::try_from(peer.to_owned()).map_err(|e| DialError::PeerTls {
            peer: peer.to_owned(),
            source: io::Error::other(e),
        })?;
        let tunnel = match tls.connect(name, tcp).await {
            Ok(stream) => connect_tunnel(stream, peer, &self.target_authority).await,
            Err(source) => Err(DialError::PeerTls {
                peer: peer.to_owned(),
                source,
            }),
        };
        self.note_certificates(peer, tunnel.as_ref().err());
        let (stream, framed) = tunnel?;
        let deframer = framed.then(|| {
            let retirement = self.retirement.clone();
            Deframer::new(Box::new(move || retirement.signal(generation)))
        });
        Ok(DialStream::Tunnel(Box::new(stream), reg, deframer))
    }
}

/// Asks the relay for a tunnel to `authority` (an HTTP/1.1 `CONNECT`, with
/// hyper's client) and, when it answers 200, hands the stream back for TLS to
/// the control plane inside the tunnel, with whether the relay agreed to
/// frame the downstream ([`frames`]). The relay sends nothing after its
/// answer until we speak (TLS starts with our ClientHello); bytes read past
/// the answer would break that and are refused.
async fn connect_tunnel<S>(stream: S, peer: &str, authority: &str) -> Result<(S, bool), DialError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use hyper::client::conn::http1;
    let proto = |detail: String| DialError::Protocol {
        peer: peer.to_owned(),
        detail,
    };
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .header(http::header::HOST, authority)
        .header(frames::HEADER, frames::FRAMED)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| proto(format!("cannot ask for {authority}: {e}")))?;
    // With TLS 1.3 the relay checks our certificate after our side of the
    // handshake is done: its refusal (an alert) arrives here, and is a TLS
    // error, not a protocol one.
    let fail = |e: hyper::Error| match tls_cause(&e) {
        Some(source) => DialError::PeerTls {
            peer: peer.to_owned(),
            source,
        },
        None => proto(e.to_string()),
    };
    let (mut sender, conn) = http1::Builder::new()
        .max_buf_size(8192)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(fail)?;
    // The connection task answers the request and, after a 200, hands the
    // stream over to the upgrade; it ends then (or when the relay closes).
    let mut conn = std::pin::pin!(conn.with_upgrades());
    let mut send = std::pin::pin!(sender.send_request(req));
    let mut conn_done = false;
    let resp = tokio::select! {
        biased;
        r = send.as_mut() => r.map_err(fail)?,
        r = conn.as_mut() => {
            r.map_err(fail)?;
            conn_done = true;
            // Ended cleanly: the answer (if any) is already with `send`.
            send.await.map_err(fail)?
        }
    };
    if resp.status() != http::StatusCode::OK {
        return Err(DialError::Refused {
            peer: peer.to_owned(),
            status: format!("{:?} {}", resp.version(), resp.status()),
        });
    }
    let framed = resp
        .headers()
        .get(frames::HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(frames::FRAMED.as_bytes()));
    let upgraded = if conn_done {
        hyper::upgrade::on(resp).await
    } else {
        let (upgraded, done) = tokio::join!(hyper::upgrade::on(resp), conn);
        done.map_err(|e| proto(e.to_string()))?;
        upgraded
    };
    let upgraded = upgraded.map_err(|e| proto(e.to_string()))?;
    let parts = upgraded
        .downcast::<TokioIo<S>>()
        .map_err(|_| proto("tunnel stream of an unexpected type".to_owned()))?;
    if !parts.read_buf.is_empty() {
        return Err(proto(format!(
            "relay sent {} bytes after its answer, before the tunnel was used",
            parts.read_buf.len()
        )));
    }
    Ok((parts.io.into_inner(), framed))
}

/// The TLS error that ended a hyper exchange, if one did (as an `io::Error`
/// around the `rustls::Error`, the way tokio-rustls reports them).
fn tls_cause(e: &hyper::Error) -> Option<io::Error> {
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        if let Some(tls) = err
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(io::Error::other(tls.clone()));
        }
        cur = err.source();
    }
    None
}

/// A byte stream of [`PathClient::dial_http1`].
pub trait Http1Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Http1Io for T {}

/// A request body produced while it is sent (a recording's part read from
/// disk), rather than held whole in memory.
pub type StreamBody = http_body_util::combinators::UnsyncBoxBody<Bytes, io::Error>;

/// One path to the control plane with its own connection pool.
pub struct PathClient {
    /// `direct` or `via:<peer>`, with `@<endpoint>` when the control plane
    /// has several endpoints: unique among the paths.
    pub name: Arc<str>,
    /// The name as an `X-Detour-Path` value, built once.
    pub name_value: Option<http::HeaderValue>,
    pub route: Route,
    /// The control-plane endpoint this path goes to (its name), and that
    /// endpoint's priority (lower is preferred); empty and 1 for paths to
    /// other targets.
    pub endpoint: Arc<str>,
    pub priority: u32,
    /// The endpoint's base path, put before every request path on this path.
    pub base_path: Arc<str>,
    /// `Host` for requests on this path.
    pub host_value: Option<http::HeaderValue>,
    /// Where this path dials.
    pub target: Target,
    /// The path's connections; retired when a relay announces it is
    /// draining.
    pool: Arc<Pool<Full<Bytes>>>,
    /// The connections for streamed bodies (only the recordings' paths to
    /// the object store send them), retired with the other.
    stream_pool: Arc<Pool<StreamBody>>,
    dialer: Arc<DialerInner>,
    cp_tls: Arc<rustls::ClientConfig>,
    /// `http(s)://host:port`, the prefix of every request URI on this path.
    pub origin: String,
    /// The same, parsed once: every request URI is built from these parts.
    pub scheme: http::uri::Scheme,
    pub authority: Option<http::uri::Authority>,
    /// The path's live TCP connections (to the control plane for `direct`,
    /// to the peer's relay for `via:<peer>`), for retransmission counts.
    pub sockets: Arc<Sockets>,
    /// This path's series in the agent's metrics, resolved at first use.
    counters: OnceLock<crate::metrics::PathCounters>,
}

impl fmt::Debug for PathClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathClient").field("name", &self.name).finish()
    }
}

impl PathClient {
    /// Builds the client for `route` from the agent's config.
    pub fn new(
        name: &str,
        route: Route,
        target: &Target,
        connect_timeout: Duration,
        cp_tls: Arc<rustls::ClientConfig>,
        peer_tls: Option<Arc<rustls::ClientConfig>>,
    ) -> PathClient {
        let sockets = Arc::new(Sockets::default());
        let dialer = Arc::new(DialerInner {
            route: route.clone(),
            target_host: target.host.clone(),
            target_port: target.port,
            target_authority: target.authority(),
            target_addresses: target.addresses.clone(),
            connect_timeout,
            peer_tls: peer_tls.map(TlsConnector::from),
            sockets: sockets.clone(),
            retirement: Arc::new(Retirement::new(name)),
            cert_problem: ArcSwapOption::empty(),
        });
        let tls = target.tls.then(|| {
            let mut cfg = (*cp_tls).clone();
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            TlsConnector::from(Arc::new(cfg))
        });
        let pool = Arc::new(Pool::new(dialer.clone(), tls.clone()));
        let _ = dialer.retirement.pool.set(Arc::downgrade(&pool));
        let stream_pool = Arc::new(Pool::new(dialer.clone(), tls));
        let _ = dialer.retirement.stream_pool.set(Arc::downgrade(&stream_pool));
        let scheme = if target.tls { "https" } else { "http" };
        PathClient {
            name: Arc::from(name),
            name_value: http::HeaderValue::from_str(name).ok(),
            route,
            endpoint: Arc::from(""),
            priority: 1,
            base_path: Arc::from(""),
            host_value: None,
            target: target.clone(),
            pool,
            stream_pool,
            dialer,
            cp_tls,
            origin: format!("{scheme}://{}", target.authority()),
            scheme: if target.tls {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            authority: target.authority().parse().ok(),
            sockets,
            counters: OnceLock::new(),
        }
    }

    /// This path's series in `metrics` (always the same agent's metrics: a
    /// path client belongs to one agent).
    pub fn counters(&self, metrics: &crate::metrics::Metrics) -> &crate::metrics::PathCounters {
        self.counters.get_or_init(|| metrics.path_counters(&self.name))
    }
}

impl PathClient {
    /// Marks this path as one to control-plane endpoint `e`.
    pub fn to_endpoint(mut self, e: &Endpoint) -> PathClient {
        self.endpoint = Arc::from(e.name.as_str());
        self.priority = e.priority;
        self.base_path = Arc::from(e.base_path.as_str());
        self.host_value = e.host_value.clone();
        self
    }

    /// The path's connections, to send a request on.
    pub fn client(&self) -> &Pool<Full<Bytes>> {
        &self.pool
    }

    /// The path's connections for requests with streamed bodies: its own
    /// connections, retired with the others when a relay drains.
    pub fn stream_client(&self) -> &Pool<StreamBody> {
        &self.stream_pool
    }

    /// A fresh connection to the path's target, outside the pool, that
    /// speaks HTTP/1.1 only: the same dialer as the pool (TCP, or a tunnel
    /// through the peer's relay), then TLS with ALPN `http/1.1` (plain when
    /// the URL is `http`). An upgraded stream (a WebSocket) needs one of its
    /// own: the pool's connections negotiate h2, which cannot carry an
    /// HTTP/1.1 upgrade, and a stream holds its connection for its life.
    pub async fn dial_http1(&self) -> Result<Box<dyn Http1Io>, DialError> {
        let generation = self.dialer.retirement.current.load(Ordering::Relaxed);
        let stream = self.dialer.dial(generation).await?;
        if self.scheme != http::uri::Scheme::HTTPS {
            return Ok(Box::new(stream));
        }
        let target = self.dialer.target_authority.clone();
        let mut cfg = (*self.cp_tls).clone();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(self.dialer.target_host.clone()).map_err(|e| {
            DialError::ControlPlaneTls {
                target: target.clone(),
                source: io::Error::other(e),
            }
        })?;
        let tls = TlsConnector::from(Arc::new(cfg))
            .connect(name, stream)
            .await
            .map_err(|source| DialError::ControlPlaneTls { target, source })?;
        Ok(Box::new(tls))
    }

    /// What the last handshake with this path's peer relay said about
    /// certificates (e.g. "maa's relay: its certificate is revoked
    /// (tls.crl)"), until a handshake succeeds; `None` for `direct`.
    pub fn cert_problem(&self) -> Option<Arc<String>> {
        self.dialer.cert_problem.load_full()
    }

    /// Counts this path's pool retirements on `counter`.
    pub fn count_renewals(&self, counter: prometheus::IntCounter) {
        let _ = self.dialer.retirement.renewals.set(counter);
    }
}

/// A path's name: the route's (`direct`, `via:<peer>`), and `@<endpoint>`
/// when the control plane has several endpoints.
pub fn path_name(route: &str, config: &AgentConfig, endpoint: &Endpoint) -> String {
    if config.control_plane.endpoints.len() > 1 {
        format!("{route}@{}", endpoint.name)
    } else {
        route.to_owned()
    }
}

/// Builds every path of a config: for each control-plane endpoint (most
/// preferred first), `direct`, then one per enabled or draining peer, in
/// file order.
pub fn build_paths(config: &AgentConfig) -> Result<Vec<Arc<PathClient>>, ClientTlsError> {
    let cp_tls = crate::tls::control_plane_client_config(&config.control_plane.ca_certs)?;
    let peer_tls = match &config.tls {
        Some(m) => Some(m.peer_client_config().map_err(ClientTlsError::Peer)?),
        None => None,
    };
    let mut paths = Vec::new();
    for e in &config.control_plane.endpoints {
        paths.push(Arc::new(
            PathClient::new(
                &path_name("direct", config, e),
                Route::Direct,
                &e.into(),
                config.forward.connect_timeout,
                cp_tls.clone(),
                None,
            )
            .to_endpoint(e),
        ));
        for p in &config.peers {
            paths.push(Arc::new(peer_path(
                p,
                e,
                config,
                cp_tls.clone(),
                peer_tls.clone(),
            )));
        }
    }
    Ok(paths)
}

/// The path through one peer to endpoint `e`.
pub fn peer_path(
    p: &Peer,
    e: &Endpoint,
    config: &AgentConfig,
    cp_tls: Arc<rustls::ClientConfig>,
    peer_tls: Option<Arc<rustls::ClientConfig>>,
) -> PathClient {
    PathClient::new(
        &path_name(&p.path_name(), config, e),
        Route::Via {
            peer: p.pop.clone(),
            relay: p.relay.clone(),
        },
        &e.into(),
        config.forward.connect_timeout,
        cp_tls,
        peer_tls,
    )
    .to_endpoint(e)
}

#[cfg(test)]
mod tests;

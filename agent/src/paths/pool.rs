//! A path's connections to its target, and the requests sent on them.
//!
//! HTTP/1.1 connections sit in one list. A request takes the most recently
//! opened one that is ready (its last answer read to the end), or dials a new
//! one; no key is hashed, no task is spawned per request and nothing is
//! handed back: hyper's handle says by itself when its connection is free
//! again. An HTTP/2 connection (TLS with ALPN `h2`) carries every request
//! of the path at once.
//!
//! Connections that sit unused for [`IDLE_TIMEOUT`] are closed, and so are
//! idle ones beyond what the path needed lately ([`TRIM_EVERY`]): after a
//! burst the path keeps what its steady traffic uses, not the burst's peak.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{DialError, DialStream, DialerInner};

/// How long an unused connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How often idle connections beyond the path's recent need are closed:
/// half of those that stayed unused through a whole period go each time.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// How often a request also drops closed and expired connections (a closed
/// one is never ready, so it is skipped meanwhile).
const TIDY_EVERY: Duration = Duration::from_millis(250);

/// Why a request got no answer on a path.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be set up; nothing of the request was sent.
    #[error(transparent)]
    Dial(DialError),
    /// The exchange failed on a connection.
    #[error("{0}")]
    Http(hyper::Error),
}

/// A connection's byte stream: TLS to the target, or plain.
enum Stream {
    Plain(DialStream),
    Tls(Box<TlsStream<DialStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// An HTTP/1.1 connection's handle in the pool.
struct H1<B> {
    tx: http1::SendRequest<B>,
    /// When a request last went out on it.
    used: Instant,
}

struct Conns<B> {
    /// Oldest first; requests take the newest ready one, so the oldest are
    /// the first to stay unused and be closed.
    h1: Vec<H1<B>>,
    h2: Option<http2::SendRequest<B>>,
    /// The target spoke HTTP/2 on the last connection made.
    h2_seen: bool,
    /// A request is dialing the path's HTTP/2 connection; others wait for
    /// it rather than each dialing one of their own.
    h2_dialing: bool,
    /// The generation (see [`super::Retirement`]) the connections above
    /// belong to.
    generation: u64,
    /// The fewest HTTP/1.1 connections that were idle at once since
    /// `trimmed`: that many were not needed in the period.
    least_idle: usize,
    trimmed: Instant,
    /// When closed and expired connections were last dropped.
    tidied: Instant,
}

impl<B: Send + 'static> Conns<B> {
    /// The newest ready HTTP/1.1 connection, and how many are ready.
    fn idle(&self) -> (Option<usize>, usize) {
        let mut newest = None;
        let mut count = 0;
        for (i, c) in self.h1.iter().enumerate() {
            if c.tx.is_ready() {
                newest = Some(i);
                count += 1;
            }
        }
        (newest, count)
    }

    /// Drops what is closed, unused for too long, or not needed lately.
    fn tidy(&mut self, now: Instant) {
        self.tidied = now;
        let expired = |c: &H1<B>| c.tx.is_ready() && now.duration_since(c.used) > IDLE_TIMEOUT;
        self.h1.retain(|c| !c.tx.is_closed() && !expired(c));
        if self.h2.as_ref().is_some_and(|tx| tx.is_closed()) {
            self.h2 = None;
        }
        if now.duration_since(self.trimmed) >= TRIM_EVERY {
            // Half of those that stayed idle throughout, the oldest first;
            // the newest is always kept, for the next request.
            let (_, idle) = self.idle();
            let mut surplus = self.least_idle.div_ceil(2).min(idle.saturating_sub(1));
            self.h1.retain(|c| {
                if surplus > 0 && c.tx.is_ready() {
                    surplus -= 1;
                    false
                } else {
                    true
                }
            });
            self.least_idle = usize::MAX;
            self.trimmed = now;
        }
    }

    /// Everything goes: idle connections close now, busy ones once their
    /// answers are read.
    fn retire(&mut self, generation: u64) {
        for c in self.h1.drain(..) {
            close_when_idle(c.tx);
        }
        self.h2 = None;
        self.least_idle = 0;
        self.generation = generation;
    }
}

/// The connections of one path, to one target.
pub struct Pool<B> {
    dialer: Arc<DialerInner>,
    /// TLS to the target (ALPN `h2`, then `http/1.1`), when it speaks TLS.
    tls: Option<TlsConnector>,
    /// `Host` for HTTP/1.1 requests that carry none.
    host: Option<HeaderValue>,
    conns: Mutex<Conns<B>>,
    /// Told when a dial for the HTTP/2 connection ended.
    h2_dialed: tokio::sync::Notify,
}

/// Ends a request's lead in dialing the HTTP/2 connection, however the
/// request ends (it may be given up while it dials), and wakes the others.
struct H2Lead<'a, B>(&'a Pool<B>);

impl<B> Drop for H2Lead<'_, B> {
    fn drop(&mut self) {
        self.0.lock().h2_dialing = false;
        self.0.h2_dialed.notify_waiters();
    }
}

/// What a request found in the pool.
enum Found<'a, F, B> {
    /// Sent on a pooled HTTP/1.1 connection.
    H1(F),
    H2(http2::SendRequest<B>, Request<B>),
    /// Nothing ready: a new connection is needed (this request leads the
    /// dial for the HTTP/2 connection when it is `true`).
    None(Request<B>, bool),
    /// Another request is dialing the HTTP/2 connection.
    Wait(Request<B>, Pin<Box<tokio::sync::futures::Notified<'a>>>),
}

/// A new connection's handle.
enum Fresh<B> {
    H1(http1::SendRequest<B>),
    H2(http2::SendRequest<B>),
}

/// How often a request goes to another connection when the one it was given
/// turned out to be closing before it took the request.
const MAX_UNSENT: usize = 3;

impl<B> Pool<B> {
    fn lock(&self) -> MutexGuard<'_, Conns<B>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B> Pool<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub(super) fn new(dialer: Arc<DialerInner>, tls: Option<TlsConnector>) -> Pool<B> {
        let host = HeaderValue::from_str(&default_port_free(
            &dialer.target_authority,
            dialer.target_port,
            tls.is_some(),
        ))
        .ok();
        let generation = dialer.retirement.current.load(Ordering::Relaxed);
        Pool {
            dialer,
            tls,
            host,
            h2_dialed: tokio::sync::Notify::new(),
            conns: Mutex::new(Conns {
                h1: Vec::new(),
                h2: None,
                h2_seen: false,
                h2_dialing: false,
                generation,
                least_idle: usize::MAX,
                trimmed: Instant::now(),
                tidied: Instant::now(),
            }),
        }
    }

    /// How many connections are open (idle or busy, retired ones aside).
    pub fn open(&self) -> usize {
        let c = self.lock();
        c.h1.iter().filter(|c| !c.tx.is_closed()).count() + usize::from(c.h2.is_some())
    }

    /// What a request at `now` would tidy (closed, expired, surplus).
    #[cfg(test)]
    fn tidy_at(&self, now: Instant) {
        self.lock().tidy(now);
    }

    /// Closes every idle connection now and every busy one once its answer
    /// is read; later requests dial afresh (generation `generation`).
    pub(super) fn retire(&self, generation: u64) {
        self.lock().retire(generation);
    }

    /// Sends `req` and returns the answer's head; its body streams after.
    pub async fn request(&self, mut req: Request<B>) -> Result<Response<Incoming>, PoolError> {
        let mut waited = false;
        for _ in 0..MAX_UNSENT {
            let generation = self.dialer.retirement.current.load(Ordering::Relaxed);
            let found = {
                let now = Instant::now();
                let mut c = self.lock();
                if c.generation != generation {
                    c.retire(generation);
                }
                if now.duration_since(c.tidied) >= TIDY_EVERY {
                    c.tidy(now);
                }
                if let Some(tx) = c.h2.as_ref().filter(|tx| tx.is_ready()) {
                    Found::H2(tx.clone(), req)
                } else if c.h2_seen && c.h2_dialing && !waited {
                    let mut dialed = Box::pin(self.h2_dialed.notified());
                    dialed.as_mut().enable();
                    Found::Wait(req, dialed)
                } else {
                    let (ready, idle) = c.idle();
                    c.least_idle = c.least_idle.min(idle.saturating_sub(1));
                    match ready {
                        Some(i) => {
                            let h = &mut c.h1[i];
                            h.used = now;
                            self.prepare_h1(&mut req);
                            Found::H1(h.tx.try_send_request(req))
                        }
                        None => {
                            let lead = c.h2_seen && !c.h2_dialing;
                            c.h2_dialing |= lead;
                            Found::None(req, lead)
                        }
                    }
                }
            };
            req = match found {
                Found::H2(mut tx, req) => return tx.send_request(req).await.map_err(PoolError::Http),
                Found::H1(sent) => match sent.await {
                    Ok(resp) => return Ok(resp),
                    // The connection closed before it took the request:
                    // nothing was sent, another connection may carry it.
                    Err(mut e) => match e.take_message() {
                        Some(req) => self.restore_uri(req),
                        None => return Err(PoolError::Http(e.into_error())),
                    },
                },
                // Boxed: a new connection is the rare case, and its future
                // (TLS, HTTP/2 setup) is large; every request's would carry it.
                Found::None(req, lead) => return Box::pin(self.send_fresh(req, generation, lead)).await,
                // Once only: if that dial failed, or spoke HTTP/1.1, this
                // request dials for itself.
                Found::Wait(req, dialed) => {
                    dialed.await;
                    waited = true;
                    req
                }
            };
        }
        let generation = self.dialer.retirement.current.load(Ordering::Relaxed);
        Box::pin(self.send_fresh(req, generation, false)).await
    }

    /// Sends `req` on a new connection, which then joins the pool.
    async fn send_fresh(
        &self,
        mut req: Request<B>,
        generation: u64,
        lead: bool,
    ) -> Result<Response<Incoming>, PoolError> {
        let lead = lead.then(|| H2Lead(self));
        let fresh = self.connect(generation).await;
        {
            let mut c = self.lock();
            match &fresh {
                Ok(Fresh::H1(_)) => c.h2_seen = false,
                Ok(Fresh::H2(tx)) => {
                    c.h2_seen = true;
                    if c.generation == generation && c.h2.as_ref().is_none_or(|old| !old.is_ready()) {
                        c.h2 = Some(tx.clone());
                    }
                }
                Err(_) => {}
            }
        }
        // After the lock is let go: the lead takes it to end.
        drop(lead);
        let fresh = fresh?;
        match fresh {
            Fresh::H1(mut tx) => {
                self.prepare_h1(&mut req);
                let sent = tx.try_send_request(req);
                {
                    let mut c = self.lock();
                    if c.generation == generation {
                        c.h1.push(H1 {
                            tx,
                            used: Instant::now(),
                        });
                    } else {
                        close_when_idle(tx);
                    }
                }
                sent.await.map_err(|e| PoolError::Http(e.into_error()))
            }
            Fresh::H2(mut tx) => tx.send_request(req).await.map_err(PoolError::Http),
        }
    }

    /// HTTP/1.1 takes the path alone as the request target, and a `Host`.
    fn prepare_h1(&self, req: &mut Request<B>) {
        if req.uri().scheme().is_some() {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = req.uri().path_and_query().cloned();
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        if let Some(host) = &self.host
            && !req.headers().contains_key(http::header::HOST)
        {
            req.headers_mut().insert(http::header::HOST, host.clone());
        }
    }

    /// A request handed back unsent has the path-only target HTTP/1.1
    /// wanted; the next connection may speak HTTP/2, which needs it whole.
    fn restore_uri(&self, mut req: Request<B>) -> Request<B> {
        if req.uri().scheme().is_none() {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(if self.tls.is_some() {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            });
            parts.authority = self.dialer.target_authority.parse().ok();
            parts.path_and_query = req.uri().path_and_query().cloned();
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        req
    }

    /// A new connection: the path's dial (TCP, or a tunnel through the
    /// peer's relay), TLS to the target, and HTTP/2 when it offers it.
    /// Within the path's connect timeout, all of it.
    async fn connect(&self, generation: u64) -> Result<Fresh<B>, PoolError> {
        let d = &self.dialer;
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(d.connect_timeout, self.connect_inner(generation)).await {
            Ok(r) => r,
            Err(_) => Err(PoolError::Dial(DialError::Timeout {
                target: match &d.route {
                    super::Route::Direct => d.target_authority.clone(),
                    super::Route::Via { relay, .. } => relay.clone(),
                },
                elapsed: started.elapsed(),
            })),
        }
    }

    async fn connect_inner(&self, generation: u64) -> Result<Fresh<B>, PoolError> {
        let stream = self
            .dialer
            .dial_inner(generation)
            .await
            .map_err(PoolError::Dial)?;
        let (stream, h2) = match &self.tls {
            None => (Stream::Plain(stream), false),
            Some(tls) => {
                let target = || self.dialer.target_authority.clone();
                // Checked when dialing, like `dial_http1`: a name that is
                // not one fails the connection, never downgrades it.
                let name = ServerName::try_from(self.dialer.target_host.clone()).map_err(|e| {
                    PoolError::Dial(DialError::ControlPlaneTls {
                        target: target(),
                        source: io::Error::other(e),
                    })
                })?;
                // Boxed, like the h2 handshake below: a plain target's
                // connection would carry these large futures inline.
                let tls = Box::pin(tls.connect(name, stream)).await.map_err(|source| {
                    PoolError::Dial(DialError::ControlPlaneTls {
                        target: target(),
                        source,
                    })
                })?;
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                (Stream::Tls(Box::new(tls)), h2)
            }
        };
        let io = TokioIo::new(stream);
        // A handshake that fails has sent no request either.
        let handshake = |e: hyper::Error| {
            PoolError::Dial(DialError::Handshake {
                target: self.dialer.target_authority.clone(),
                detail: e.to_string(),
            })
        };
        if h2 {
            let (tx, conn) = Box::pin(
                http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .handshake(io),
            )
            .await
            .map_err(handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("HTTP/2 connection ended: {e}");
                }
            });
            Ok(Fresh::H2(tx))
        } else {
            let (tx, conn) = http1::handshake(io).await.map_err(handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("HTTP/1.1 connection ended: {e}");
                }
            });
            Ok(Fresh::H1(tx))
        }
    }
}

/// Lets an HTTP/1.1 connection finish the exchange it carries, then closes
/// it (at once when it is idle).
fn close_when_idle<B: Send + 'static>(mut tx: http1::SendRequest<B>) {
    if tx.is_ready() || tx.is_closed() {
        return;
    }
    tokio::spawn(async move {
        let _ = tx.ready().await;
    });
}

/// `host:port` without the port when it is the scheme's default, as `Host`
/// carries it.
fn default_port_free(authority: &str, port: u16, tls: bool) -> String {
    let default = if tls { 443 } else { 80 };
    if port == default {
        authority
            .strip_suffix(&format!(":{port}"))
            .unwrap_or(authority)
            .to_owned()
    } else {
        authority.to_owned()
    }
}

#[cfg(test)]
pub(crate) mod tests;

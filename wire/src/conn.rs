//! The connection guard: what every Detour HTTP server (the agent's local
//! entry point, its admin listener and control socket, and the control plane)
//! enforces on every connection it accepts, below hyper, which has no such
//! rules of its own.
//!
//! - A request head must arrive whole within `header_timeout` of its first
//!   byte (or of the connection's start, for the first request). One byte a
//!   second, an idle connection after the TLS handshake, or hundreds of
//!   unfinished heads are closed after that time.
//! - A kept-alive connection with nothing in flight is closed only after
//!   `idle_timeout` without a byte. hyper's own `header_read_timeout` also
//!   runs while a connection is idle between requests, so a call handler's
//!   pooled connection was closed after a few seconds of quiet, racing the
//!   handler's next request; the idle limit here is long instead, and every
//!   server turns hyper's off (it is 30 s by default once hyper has a timer).
//! - hyper answers a request head it cannot parse (400, 414, 431) itself,
//!   with an empty body. Such an answer is replaced by a problem+json one
//!   (written by the server's `rejection` function) before it leaves.
//!
//! The service tells the guard when a request starts and when its response
//! has been handed over in full ([`ConnTracker::begin`], [`Tracked`]), so the
//! guard knows whether bytes it reads start a new head and whether bytes
//! hyper writes answer a request or a parse error.
//!
//! An HTTP/1 connection upgraded by a `101` (a WebSocket) stops being HTTP/1
//! after that answer: the service says so ([`ConnTracker::upgraded`]) before
//! it returns the `101`, and from then on the guard times nothing out, reads
//! no bytes as a head and takes no write for hyper's. Whoever owns the
//! upgraded stream bounds its life.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::{PROBLEM_JSON, Problem};

/// The time limits of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// A request head must be complete this long after its first byte (and
    /// the first request's head this long after the connection started).
    pub header_timeout: Duration,
    /// A connection with no request in flight and no byte read for this long
    /// is closed. Longer than the clients' own pool idle timeouts, so that a
    /// client closes first and never sends into a closing connection.
    pub idle_timeout: Duration,
}

/// Writes the answer that replaces hyper's empty one for an unparsable
/// request head, given hyper's status code (400, 414, 431 and the like).
pub type Rejection = Arc<dyn Fn(u16) -> Vec<u8> + Send + Sync>;

#[derive(Debug)]
struct Track {
    started_at: Instant,
    /// Requests started on this connection so far.
    started: u64,
    in_flight: usize,
    /// When the last response was handed over and nothing was in flight.
    quiet_since: Instant,
    /// HTTP/1: the first byte of the next head, read while quiet.
    head_since: Option<Instant>,
    /// HTTP/1: a flush completed after the last response was handed over,
    /// so everything hyper writes from now on until the next request is its
    /// own answer to a head it could not parse.
    flushed: bool,
    /// The connection speaks HTTP/2 (its first bytes were the preface).
    h2: bool,
    /// A `101` switched the connection to another protocol: no HTTP rule
    /// applies to it any more.
    upgraded: bool,
    last_read: Instant,
    waker: Option<Waker>,
}

/// Shared between a connection's IO ([`Guarded`]) and its service.
#[derive(Debug, Clone)]
pub struct ConnTracker {
    track: Arc<Mutex<Track>>,
}

impl ConnTracker {
    fn new() -> ConnTracker {
        let now = Instant::now();
        ConnTracker {
            track: Arc::new(Mutex::new(Track {
                started_at: now,
                started: 0,
                in_flight: 0,
                quiet_since: now,
                head_since: None,
                flushed: false,
                h2: false,
                upgraded: false,
                last_read: now,
                waker: None,
            })),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Track) -> R) -> R {
        let mut t = self.track.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut t)
    }

    /// A request's head was parsed and its service called. Returns the
    /// token that ends the request when it is dropped; wrap the response
    /// body with it ([`Tracked::new`]) so it ends when the body does.
    pub fn begin(&self) -> InFlight {
        self.with(|t| {
            t.started += 1;
            t.in_flight += 1;
            t.head_since = None;
            t.flushed = false;
        });
        InFlight {
            tracker: Some(self.clone()),
        }
    }

    /// The response being returned switches protocols (`101`): once it is
    /// written, the connection carries the new protocol's bytes until its
    /// owner closes it. Call it before returning the `101`, so the guard
    /// never sees the connection quiet between the answer and the stream.
    pub fn upgraded(&self) {
        self.with(|t| t.upgraded = true);
    }

    fn finish(&self) {
        let waker = self.with(|t| {
            t.in_flight = t.in_flight.saturating_sub(1);
            if t.in_flight == 0 {
                t.quiet_since = Instant::now();
                t.flushed = false;
            }
            t.waker.take()
        });
        // The idle timer starts now; the IO must be polled to arm it.
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// One request in flight; ends it when dropped or when its body ends.
#[derive(Debug)]
pub struct InFlight {
    tracker: Option<ConnTracker>,
}

impl InFlight {
    fn end(&mut self) {
        if let Some(t) = self.tracker.take() {
            t.finish();
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.end();
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends its request's [`InFlight`] when the last
    /// frame has been handed to hyper (or when it is dropped).
    pub struct Tracked<B> {
        #[pin]
        inner: B,
        flight: InFlight,
    }
}

impl<B> Tracked<B> {
    pub fn new(inner: B, flight: InFlight) -> Tracked<B> {
        Tracked { inner, flight }
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = r {
            this.flight.end();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's IO with the guard's rules applied. Build one per accepted
/// connection with [`guard`], and give the tracker to the service.
pub struct Guarded<T> {
    io: T,
    tracker: ConnTracker,
    limits: ConnLimits,
    rejection: Rejection,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    /// The first bytes read (up to four), to tell HTTP/2 from HTTP/1.
    first: [u8; 4],
    first_len: usize,
    /// hyper's automatic answer is being swallowed; this replaces it.
    replacement: Option<Vec<u8>>,
    /// How much of the replacement has been written.
    replaced: usize,
}

/// Wraps an accepted connection. `rejection` writes the problem+json answer
/// that replaces hyper's empty one for a request head it could not parse.
pub fn guard<T>(io: T, limits: ConnLimits, rejection: Rejection) -> (Guarded<T>, ConnTracker) {
    let tracker = ConnTracker::new();
    let deadline = Instant::now() + limits.header_timeout;
    let g = Guarded {
        io,
        tracker: tracker.clone(),
        limits,
        rejection,
        sleep: Box::pin(tokio::time::sleep_until(deadline)),
        armed: Some(deadline),
        first: [0; 4],
        first_len: 0,
        replacement: None,
        replaced: 0,
    };
    (g, tracker)
}

/// Why the guard closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// A head did not arrive whole in time.
    Head,
    /// Nothing happened for the idle timeout.
    Idle,
}

impl Track {
    fn deadline(&self, limits: &ConnLimits) -> Option<(Instant, Expiry)> {
        if self.in_flight > 0 || self.upgraded {
            None
        } else if self.started == 0 {
            Some((self.started_at + limits.header_timeout, Expiry::Head))
        } else if self.h2 {
            Some((
                self.last_read.max(self.quiet_since) + limits.idle_timeout,
                Expiry::Idle,
            ))
        } else if let Some(h) = self.head_since {
            Some((h + limits.header_timeout, Expiry::Head))
        } else {
            Some((self.quiet_since + limits.idle_timeout, Expiry::Idle))
        }
    }

    /// HTTP/1 and nothing in flight, the last answer flushed: whatever hyper
    /// writes now is its own answer to an unparsable head.
    fn writes_are_hypers(&self) -> bool {
        !self.h2 && !self.upgraded && self.in_flight == 0 && (self.started == 0 || self.flushed)
    }
}

/// The status code at the start of an HTTP/1 response head.
fn status_of(head: &[u8]) -> u16 {
    head.get(9..12)
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse().ok())
        .unwrap_or(400)
}

impl<T: AsyncRead + AsyncWrite + Unpin> Guarded<T> {
    /// Writes what is left of the replacement answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(out) = &self.replacement {
            while self.replaced < out.len() {
                let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &out[self.replaced..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.replaced += n;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Takes a write from hyper. Returns `None` when it goes out unchanged.
    fn swallow(&mut self, first_bytes: &[u8], len: usize) -> Option<usize> {
        if self.replacement.is_none() {
            if !self.tracker.with(|t| t.writes_are_hypers()) {
                return None;
            }
            self.replacement = Some((self.rejection)(status_of(first_bytes)));
        }
        Some(len)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let limits = this.limits;
        let deadline = this.tracker.with(|t| {
            t.waker = Some(cx.waker().clone());
            t.deadline(&limits)
        });
        if let Some((at, why)) = deadline {
            if this.armed != Some(at) {
                this.sleep.as_mut().reset(at);
                this.armed = Some(at);
            }
            if this.sleep.as_mut().poll(cx).is_ready() {
                return match why {
                    // A quiet close: the client sees the connection end
                    // between requests, as after any server's idle timeout.
                    Expiry::Idle => Poll::Ready(Ok(())),
                    Expiry::Head => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head not complete within the header timeout",
                    ))),
                };
            }
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let got = &buf.filled()[before..];
        if !got.is_empty() {
            let now = Instant::now();
            if this.first_len < this.first.len() {
                let take = (this.first.len() - this.first_len).min(got.len());
                this.first[this.first_len..this.first_len + take].copy_from_slice(&got[..take]);
                this.first_len += take;
            }
            let h2 = this.first_len == 4 && &this.first == b"PRI ";
            this.tracker.with(|t| {
                t.h2 = h2;
                t.last_read = now;
                if t.in_flight == 0 && t.started > 0 && t.head_since.is_none() && !h2 && !t.upgraded {
                    t.head_since = Some(now);
                }
            });
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(n) = this.swallow(buf, buf.len()) {
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        // A status line's first 12 bytes ("HTTP/1.1 400"), without allocating.
        let mut first = [0u8; 12];
        let mut n = 0;
        for (slot, byte) in first.iter_mut().zip(bufs.iter().flat_map(|b| b.iter())) {
            *slot = *byte;
            n += 1;
        }
        if let Some(n) = this.swallow(&first[..n], len) {
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_replacement(cx))?;
        std::task::ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        this.tracker.with(|t| {
            if t.in_flight == 0 && t.started > 0 {
                t.flushed = true;
            }
        });
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// A complete HTTP/1.1 answer with a problem+json body that closes the
/// connection: what [`Rejection`] functions return.
pub fn problem_response(problem: &Problem) -> Vec<u8> {
    let body = problem.to_json();
    let reason = http::StatusCode::from_u16(problem.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {PROBLEM_JSON}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        problem.status,
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// The problem a server reports for hyper's status on an unparsable head,
/// given the server's head limit in bytes (for the 431 detail).
pub fn parse_problem(status: u16, max_head_bytes: usize, limit_key: &str) -> Problem {
    match status {
        431 => Problem::new(
            431,
            "Request head too large",
            format!(
                "the request line and headers are over the limit of {max_head_bytes} bytes ({limit_key})"
            ),
        ),
        414 => Problem::new(
            414,
            "Request target too long",
            format!("the request line is over the limit of {max_head_bytes} bytes ({limit_key})"),
        ),
        s => Problem::new(
            if (400..500).contains(&s) { s } else { 400 },
            "Malformed request",
            "the request head is not valid HTTP/1.1 (request line, header syntax, or framing headers)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_requests() {
        let tracker = ConnTracker::new();
        let t0 = Instant::now();
        let dl = |tr: &ConnTracker| tr.with(|t| t.deadline(&limits()));
        assert_eq!(dl(&tracker), Some((t0 + Duration::from_secs(5), Expiry::Head)));
        let flight = tracker.begin();
        assert_eq!(
            dl(&tracker),
            None,
            "nothing closes a connection with a request in flight"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        drop(flight);
        let quiet = Instant::now();
        assert_eq!(
            dl(&tracker),
            Some((quiet + Duration::from_secs(300), Expiry::Idle))
        );
        // The first byte of the next head starts the header timer.
        tracker.with(|t| t.head_since = Some(quiet + Duration::from_secs(1)));
        assert_eq!(dl(&tracker), Some((quiet + Duration::from_secs(6), Expiry::Head)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_upgraded_connection_is_no_longer_http() {
        let tracker = ConnTracker::new();
        let flight = tracker.begin();
        tracker.upgraded();
        drop(flight);
        tracker.with(|t| t.flushed = true);
        tokio::time::advance(Duration::from_secs(3600)).await;
        tracker.with(|t| {
            assert_eq!(t.deadline(&limits()), None, "a stream is never timed out");
            assert!(
                !t.writes_are_hypers(),
                "the stream's bytes are not hyper's answer"
            );
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_upgraded_stream_keeps_its_bytes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(1024);
        let rejection: Rejection = Arc::new(|_| b"REPLACED".to_vec());
        let (mut io, tracker) = guard(server, limits(), rejection);
        let flight = tracker.begin();
        tracker.upgraded();
        let head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        io.write_all(head).await.unwrap();
        io.flush().await.unwrap();
        drop(flight);
        io.flush().await.unwrap();
        // Far past both timeouts, the stream still carries bytes both ways.
        tokio::time::advance(Duration::from_secs(1000)).await;
        let (mut cr, mut cw) = tokio::io::split(client);
        cw.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        io.write_all(b"pong").await.unwrap();
        io.flush().await.unwrap();
        let mut out = vec![0u8; head.len() + 4];
        cr.read_exact(&mut out).await.unwrap();
        assert!(out.ends_with(b"pong"), "{:?}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn hypers_status_is_read_from_its_head() {
        assert_eq!(
            status_of(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            431
        );
        assert_eq!(status_of(b"HTTP/1.1 400 Bad Request\r\n"), 400);
        assert_eq!(status_of(b"garbage"), 400);
        let out = String::from_utf8(problem_response(&parse_problem(
            431,
            32768,
            "ingress.max_header_bytes",
        )))
        .unwrap();
        assert!(
            out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{out}"
        );
        assert!(out.contains("content-type: application/problem+json\r\n"));
        assert!(out.contains("connection: close\r\n"));
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(body.contains("32768"));
    }
}

//! Streams: an upgraded connection (a WebSocket) between the call handler and
//! the control plane. Its handshake goes over the best path at that moment
//! (or the pinned one), on a fresh HTTP/1.1 connection of its own
//! ([`PathClient::dial_http1`]); after a `101` the bytes are copied both ways
//! until an end closes the stream or the agent cuts it: its path was judged
//! down or was removed, or the agent stops. Cutting the call handler's side
//! at once is the point: it reconnects now, and its new handshake goes over
//! a path that works, instead of waiting on a dead socket. docs/streams.md
//! is the operator's view.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use detour_wire::{PathState, Problem};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::time::Instant;

use crate::forward::{AttemptRecord, Failure, Forwarder};
use crate::metrics::Metrics;
use crate::paths::{DialError, PathClient};

/// How often a stream looks at its path in the health snapshot (a
/// lock-free load). The snapshot is refreshed every 100 ms, so a stream is
/// cut within about 200 ms of its path being judged down.
pub const WATCH_EVERY: Duration = Duration::from_millis(100);

/// How long a stopping agent waits for the streams it cut to wind up.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How long the call handler's side may take to become a stream after its
/// `101` was handed to hyper (it is written at once; this only bounds a
/// connection that vanished in between).
const SWITCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The call handler's connection slot (`ingress.max_connections`), put in
/// the request's extensions by the listener: a stream holds it for its life,
/// so streams count against the cap like any connection.
#[derive(Clone)]
pub struct Slot(pub Arc<OwnedSemaphorePermit>);

/// Whether a request asks to switch protocols: `Connection: upgrade` and an
/// `Upgrade` header.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(tokens)
            .any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The comma-separated tokens of a header value (none when it is not text).
fn tokens(v: &HeaderValue) -> impl Iterator<Item = &str> {
    v.to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Checks an upgrade request before anything is dialed. `h2c` is refused:
/// the agent speaks HTTP/2 to the control plane itself, and an HTTP/2
/// connection from the call handler would bypass everything the agent does
/// per request. An upgrade request carries no body (a WebSocket handshake is
/// a `GET`), so one that declares a body is refused rather than half-read.
pub fn admit(headers: &HeaderMap) -> Result<(), Problem> {
    let protocols: Vec<&str> = headers.get_all(header::UPGRADE).iter().flat_map(tokens).collect();
    if protocols.iter().any(|p| {
        let name = p.split('/').next().unwrap_or(p);
        name.eq_ignore_ascii_case("h2c")
    }) {
        return Err(Problem::new(
            400,
            "HTTP/2 upgrade (h2c) is not carried",
            "the agent speaks HTTP/2 to the control plane itself; send plain HTTP/1.1 requests without `Upgrade: h2c`",
        )
        .with_type("https://detour.dev/problems/h2c-upgrade"));
    }
    if protocols.is_empty() {
        return Err(Problem::new(
            400,
            "Bad Upgrade header",
            "`Upgrade` must name the protocol to switch to, e.g. `websocket`",
        ));
    }
    let declared_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if declared_body {
        return Err(Problem::new(
            400,
            "An upgrade request has no body",
            "send the handshake without a body (no Content-Length or Transfer-Encoding)",
        ));
    }
    Ok(())
}

/// A handshake ready to be sent on any path.
#[derive(Debug, Clone)]
pub struct Handshake {
    pub method: Method,
    /// Path and query on the control plane, base path included.
    pub path_and_query: http::uri::PathAndQuery,
    /// As for any request (hop-by-hop removed, `Host`, token and request id
    /// set), with `Connection: upgrade` and `Upgrade` put back.
    pub headers: HeaderMap,
    /// `X-Detour-Pin`: only this path.
    pub pin: Option<String>,
    pub received: Instant,
    pub request_id: String,
}

/// What the control plane answered a handshake.
pub enum Opened {
    /// `101`: the stream runs on `path`; answer the call handler with `head`.
    Switched {
        head: http::response::Parts,
        path: Arc<str>,
    },
    /// Any other answer, passed through as it is.
    Answered {
        response: Response<Incoming>,
        path: Arc<str>,
    },
}

/// Why a handshake got no answer on one path. Nothing was answered, so the
/// next path may be tried.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("{0}")]
    Dial(#[from] DialError),
    #[error("handshake: {0}")]
    Http(#[from] hyper::Error),
}

/// Why a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// An end closed it (or broke it).
    Closed,
    /// Its path was judged down.
    PathDown(String),
    /// Its path is no longer configured (a reload removed the peer).
    PathRemoved,
    /// The agent is stopping.
    Stopping,
}

impl End {
    fn outcome(&self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::PathDown(_) => "cut_path_down",
            End::PathRemoved => "cut_path_removed",
            End::Stopping => "cut_stopping",
        }
    }
}

/// The streams of one local listener.
pub struct Streams {
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    /// Turns `true` when the agent stops: every stream is cut.
    stop: watch::Sender<bool>,
    /// Streams running now (their tasks).
    live: Arc<AtomicUsize>,
}

impl Streams {
    pub fn new(forwarder: Arc<Forwarder>, metrics: Arc<Metrics>) -> Streams {
        Streams {
            forwarder,
            metrics,
            stop: watch::channel(false).0,
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Streams running now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Sends the handshake over the candidate paths in rank order (or the
    /// pinned one) until one answers; a path that cannot be reached, or
    /// breaks before any answer, moves it to the next. On a `101` the stream
    /// starts on that path, joined to the call handler's side (`client`)
    /// once hyper has written the `101` to it; `slot` is held as long.
    pub async fn open(
        &self,
        hs: Handshake,
        client: OnUpgrade,
        slot: Option<Slot>,
    ) -> Result<Opened, Failure> {
        let rt = self.forwarder.runtime();
        let candidates = crate::forward::candidates(&rt, hs.pin.as_ref())?;
        let f = &rt.config.forward;
        let deadline = hs.received + f.deadline;
        // A fresh connection pays its handshakes (TCP, the relay's TLS and
        // CONNECT, TLS to the control plane) before the answer.
        let per_path = f.connect_timeout + f.attempt_timeout_max;
        let mut attempts = Vec::new();
        let mut deadline_passed = false;
        for (n, &i) in candidates.iter().enumerate() {
            let Some(path) = rt.paths.get(i).cloned() else {
                continue;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                deadline_passed = true;
                break;
            }
            let limit = per_path.min(left);
            let error = match tokio::time::timeout(limit, handshake(&path, &hs)).await {
                Ok(Ok(mut resp)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    let upstream = hyper::upgrade::on(&mut resp);
                    let (head, _) = resp.into_parts();
                    self.spawn(path.name.clone(), client, upstream, slot, hs.request_id.clone());
                    return Ok(Opened::Switched {
                        head,
                        path: path.name.clone(),
                    });
                }
                Ok(Ok(response)) => {
                    return Ok(Opened::Answered {
                        response,
                        path: path.name.clone(),
                    });
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {}ms", limit.as_millis()),
            };
            tracing::info!(request_id = %hs.request_id, path = %path.name, %error, "stream handshake failed on this path");
            self.metrics
                .streams
                .with_label_values(&[&*path.name, "failed"])
                .inc();
            attempts.push(AttemptRecord {
                path: path.name.to_string(),
                kind: if n == 0 { "first" } else { "retry" },
                result: error,
                elapsed_ms: hs.received.elapsed().as_millis() as u64,
            });
        }
        Err(Failure::Exhausted {
            attempts,
            deadline_passed,
        })
    }

    /// Cuts every stream (the agent stops) and waits a little for them to
    /// wind up, so their ends are counted and logged.
    pub async fn close_all(&self) {
        let _ = self.stop.send(true);
        let live = self.live.clone();
        let wound_up = async {
            while live.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(CLOSE_GRACE, wound_up).await.is_err() {
            tracing::warn!(
                streams = self.live(),
                "streams still winding up after the agent cut them"
            );
        }
    }

    fn spawn(
        &self,
        path: Arc<str>,
        client: OnUpgrade,
        upstream: OnUpgrade,
        slot: Option<Slot>,
        request_id: String,
    ) {
        let metrics = self.metrics.clone();
        metrics.streams.with_label_values(&[&*path, "opened"]).inc();
        metrics.streams_active.with_label_values(&[&*path]).inc();
        self.live.fetch_add(1, Ordering::Relaxed);
        let (forwarder, live, stop) = (self.forwarder.clone(), self.live.clone(), self.stop.subscribe());
        tokio::spawn(async move {
            let opened = Instant::now();
            let end = carry(&forwarder, &path, client, upstream, stop, &request_id).await;
            let age = opened.elapsed().as_secs_f64();
            match &end {
                End::Closed => tracing::debug!(request_id, %path, age_s = age, "stream closed"),
                End::PathDown(reason) => {
                    tracing::warn!(request_id, %path, age_s = age, reason = %reason, "stream cut: its path was judged down; the call handler reconnects over another")
                }
                End::PathRemoved => {
                    tracing::warn!(request_id, %path, age_s = age, "stream cut: its path was removed from the config")
                }
                End::Stopping => {
                    tracing::info!(request_id, %path, age_s = age, "stream cut: the agent is stopping")
                }
            }
            metrics.streams.with_label_values(&[&*path, end.outcome()]).inc();
            let gauge = metrics.streams_active.with_label_values(&[&*path]);
            gauge.dec();
            // Whoever publishes a series removes it: a removed path's gauge
            // goes with its last stream.
            let gone = forwarder.runtime().paths.iter().all(|p| p.name != path);
            if gone && gauge.get() <= 0 {
                let _ = metrics.streams_active.remove_label_values(&[&*path]);
            }
            drop(slot);
            live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Sends the handshake on a fresh HTTP/1.1 connection of `path` and returns
/// the answer. The connection is driven here until the answer's head
/// arrives, so a handshake given up (its timeout) leaves nothing behind; then
/// on a task of its own, which hands the stream over after a `101` or carries
/// another answer's body.
async fn handshake(path: &PathClient, hs: &Handshake) -> Result<Response<Incoming>, HandshakeError> {
    let io = path.dial_http1().await?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await?;
    let mut req = Request::new(Empty::<Bytes>::new());
    *req.method_mut() = hs.method.clone();
    // The path's endpoint decides the base path and `Host`, as for requests.
    *req.uri_mut() = if path.base_path.is_empty() {
        hs.path_and_query.clone().into()
    } else {
        format!("{}{}", path.base_path, hs.path_and_query)
            .parse()
            .unwrap_or_else(|_| hs.path_and_query.clone().into())
    };
    *req.headers_mut() = hs.headers.clone();
    if let Some(v) = &path.host_value {
        req.headers_mut().insert(header::HOST, v.clone());
    } else if let Some(a) = &path.authority
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    } else {
        // The headers carry the first endpoint's `Host`; not this path's.
        req.headers_mut().remove(header::HOST);
    }
    let mut conn = Box::pin(conn.with_upgrades());
    let mut conn_done = false;
    let resp = {
        let send = sender.send_request(req);
        tokio::pin!(send);
        tokio::select! {
            biased;
            r = &mut send => r?,
            r = &mut conn => {
                r?;
                // Ended cleanly (after a 101 it ends as soon as it has
                // handed the stream over): the answer is with `send`.
                conn_done = true;
                send.await?
            }
        }
    };
    // Nothing else goes on this connection: without its sender it ends
    // once the answer's body is read.
    drop(sender);
    if !conn_done {
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "stream connection to the control plane ended");
            }
        });
    }
    Ok(resp)
}

/// Joins the two sides and copies bytes both ways until an end closes the
/// stream, its path goes down or away, or the agent stops.
async fn carry(
    forwarder: &Forwarder,
    path: &str,
    client: OnUpgrade,
    upstream: OnUpgrade,
    mut stop: watch::Receiver<bool>,
    request_id: &str,
) -> End {
    let joined = tokio::time::timeout(SWITCH_TIMEOUT, async { tokio::try_join!(client, upstream) }).await;
    let (client, upstream) = match joined {
        Ok(Ok(sides)) => sides,
        Ok(Err(e)) => {
            tracing::debug!(request_id, path, error = %e, "stream ended before it started");
            return End::Closed;
        }
        Err(_) => {
            tracing::debug!(request_id, path, "stream did not start in time");
            return End::Closed;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Cut only on a change: a stream that opened while its path was still
    // marked down (it had just come back) is carried until the path is seen
    // alive and then goes down again.
    let mut seen_alive = false;
    loop {
        tokio::select! {
            r = &mut copy => {
                match r {
                    Ok((up, down)) => tracing::debug!(request_id, path, bytes_up = up, bytes_down = down, "stream ends closed"),
                    Err(e) => tracing::debug!(request_id, path, error = %e, "stream broke"),
                }
                return End::Closed;
            }
            _ = tick.tick() => {
                if let Some(end) = verdict(forwarder, path, &mut seen_alive) {
                    return end;
                }
            }
            () = async { let _ = stop.wait_for(|s| *s).await; } => return End::Stopping,
        }
    }
}

/// What the health snapshot says about a stream's path now: `Some` to cut.
fn verdict(forwarder: &Forwarder, path: &str, seen_alive: &mut bool) -> Option<End> {
    let rt = forwarder.runtime();
    let snap = rt.health.snapshot();
    match snap.by_name(path) {
        None => Some(End::PathRemoved),
        Some(v) if v.state == PathState::Down => {
            (*seen_alive).then(|| End::PathDown(v.reason.clone().unwrap_or_else(|| "judged down".to_owned())))
        }
        Some(_) => {
            *seen_alive = true;
            None
        }
    }
}

/// The headers of a handshake: those of any request (`upstream`, built by
/// the ingress), with the upgrade put back from the call handler's request.
pub fn with_upgrade(mut upstream: HeaderMap, original: &HeaderMap) -> HeaderMap {
    upstream.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    for v in original.get_all(header::UPGRADE) {
        upstream.append(header::UPGRADE, v.clone());
    }
    upstream
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn an_upgrade_needs_both_headers() {
        assert!(is_upgrade(&headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket")
        ])));
        assert!(!is_upgrade(&headers(&[("upgrade", "websocket")])));
        assert!(!is_upgrade(&headers(&[("connection", "upgrade")])));
        assert!(!is_upgrade(&headers(&[
            ("connection", "close"),
            ("upgrade", "websocket")
        ])));
    }

    #[test]
    fn h2c_and_bodies_are_refused() {
        let ws = headers(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert!(admit(&ws).is_ok());
        let other = headers(&[("connection", "upgrade"), ("upgrade", "foo/2")]);
        assert!(admit(&other).is_ok(), "other protocols are carried");
        for h2c in ["h2c", "H2C", "websocket, h2c"] {
            let p = admit(&headers(&[("connection", "upgrade"), ("upgrade", h2c)])).unwrap_err();
            assert_eq!(p.status, 400);
            assert!(p.title.contains("h2c"), "{}", p.title);
        }
        let body = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("content-length", "5"),
        ]);
        assert_eq!(admit(&body).unwrap_err().status, 400);
        let empty = headers(&[("connection", "upgrade"), ("upgrade", " , ")]);
        assert_eq!(admit(&empty).unwrap_err().status, 400);
    }

    #[test]
    fn the_upgrade_is_put_back() {
        let original = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        let upstream = headers(&[("host", "cp"), ("sec-websocket-key", "abc")]);
        let h = with_upgrade(upstream, &original);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "abc");
    }
}

//! Ingress: the call handler's side (HAProxy's frontend role). Accepts plain
//! HTTP/1.1 on `listen.local`, refuses anything that is not for the control
//! plane, buffers the body so it can be re-sent, adds the request's identity
//! headers and hands it to the forwarder. Responses stream back unchanged.

pub mod listener;
mod stream;

use std::sync::Arc;

use bytes::Bytes;
use detour_wire::{PROBLEM_JSON, Problem};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::config::AgentConfig;
use crate::forward::{Failure, Forwarder, Outbound};
use crate::metrics::Metrics;
use crate::paths::PathClient;

/// A response body: the control plane's answer, streamed as it comes, or
/// one the agent wrote whole. An enum rather than a boxed body: every
/// answered request has one, and boxing it cost each an allocation.
pub enum Body {
    Answer(Incoming),
    Whole(Full<Bytes>),
}

impl Default for Body {
    /// No body.
    fn default() -> Body {
        Body::Whole(Full::default())
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        // Both variants are Unpin.
        match self.get_mut() {
            Body::Answer(b) => std::pin::Pin::new(b).poll_frame(cx),
            Body::Whole(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Answer(b) => b.is_end_stream(),
            Body::Whole(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Answer(b) => b.size_hint(),
            Body::Whole(b) => b.size_hint(),
        }
    }
}

/// Hop-by-hop headers (RFC 9110 7.6.1) and proxy headers, never forwarded.
/// Header names are built once, not parsed on every request.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Detour's own headers as ready-made names.
pub(crate) mod names {
    use detour_wire::headers as dh;
    use http::HeaderName;

    pub const REQUEST_ID: HeaderName = HeaderName::from_static(dh::REQUEST_ID);
    pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static(dh::IDEMPOTENCY_KEY);
    pub const PATH: HeaderName = HeaderName::from_static(dh::PATH);
    pub const PIN: HeaderName = HeaderName::from_static(dh::PIN);
    pub const PRIORITY: HeaderName = HeaderName::from_static(dh::PRIORITY);
    pub const DEFERRED: HeaderName = HeaderName::from_static(dh::DEFERRED);
}

/// The path that carried a request's answer, for its metrics.
enum Carrier {
    /// No path: the agent answered itself (a refusal, no path, deferred).
    None,
    /// A request's path, with its series resolved once.
    Path(Arc<PathClient>),
    /// An upgraded stream's path, by name.
    Named(Arc<str>),
}

/// The shared state of the local entry point.
pub struct Ingress {
    pub forwarder: Arc<Forwarder>,
    pub metrics: Arc<Metrics>,
    /// For the deferred-delivery journal.
    pub shared: Arc<crate::runtime::Shared>,
    /// Upgraded streams (WebSockets) opened through this listener.
    pub streams: Arc<crate::streams::Streams>,
}

/// The answer that replaces hyper's empty one for a request head it could
/// not parse (400, 414, 431); counted as a rejection like any refused request.
pub fn rejection(metrics: Arc<Metrics>, max_header_bytes: usize) -> detour_wire::conn::Rejection {
    Arc::new(move |status| {
        metrics.requests.with_label_values(&["none", "rejected"]).inc();
        let p = detour_wire::conn::parse_problem(status, max_header_bytes, "ingress.max_header_bytes");
        tracing::debug!(
            status = p.status,
            "refused a request head that could not be parsed"
        );
        detour_wire::conn::problem_response(&p)
    })
}

/// The size of a request head as it came in: request line and header lines.
fn head_bytes(parts: &http::request::Parts) -> usize {
    let uri = &parts.uri;
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    // "METHOD target HTTP/1.1\r\n"
    let line = parts.method.as_str().len() + target + 11;
    parts
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
        + 2
}

/// What the request head says about how to carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Race the two best paths (`X-Detour-Priority: emergency` or a
    /// configured path prefix).
    pub emergency: bool,
    /// `X-Detour-Pin`: only this path.
    pub pin: Option<String>,
}

/// Checks a request head before anything is read or sent: its size, the
/// method, that the target is the control plane, and Detour's own headers.
/// No IO, so it can be fuzzed; every refusal is a problem a person can act on.
pub fn admit(parts: &http::request::Parts, config: &AgentConfig) -> Result<Admitted, Problem> {
    // hyper's buffer bounds the head too, but a head that arrived in one
    // read may overshoot it a little; this is the exact limit.
    let max_head = config.ingress.max_header_bytes;
    if head_bytes(parts) > max_head {
        return Err(detour_wire::conn::parse_problem(
            431,
            max_head,
            "ingress.max_header_bytes",
        ));
    }
    if parts.method == Method::CONNECT {
        return Err(Problem::new(
            405,
            "CONNECT is not supported here",
            "send plain HTTP requests to the agent; it carries them to the control plane over TLS itself",
        ));
    }
    if (parts.uri.scheme().is_some() || parts.uri.authority().is_some())
        && !is_control_plane(&parts.uri, config)
    {
        let target = parts.uri.authority().map_or("?".to_owned(), |a| a.to_string());
        tracing::warn!(target = %target, "refused a request for another host");
        return Err(Problem::new(
            403,
            "Destination is not the control plane",
            format!(
                "this agent only carries requests to {}; `{target}` is not it",
                config
                    .control_plane
                    .endpoints
                    .iter()
                    .map(|e| e.authority())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let Some(pq) = parts.uri.path_and_query() else {
        return Err(Problem::new(400, "Bad request target", "the request has no path"));
    };
    if !pq.as_str().starts_with('/') {
        return Err(Problem::new(
            400,
            "Bad request target",
            "the request path must start with '/'",
        ));
    }
    // Priority: an explicit header wins; else the configured path prefixes.
    let emergency = match parts
        .headers
        .get(names::PRIORITY)
        .map(|v| v.to_str().map(str::trim))
    {
        None => config
            .forward
            .emergency_path_prefixes
            .iter()
            .any(|p| pq.path().starts_with(p.as_str())),
        Some(Ok(v)) if v.eq_ignore_ascii_case("emergency") => true,
        Some(Ok(v)) if v.eq_ignore_ascii_case("normal") => false,
        Some(_) => {
            return Err(Problem::new(
                400,
                "Bad X-Detour-Priority",
                "X-Detour-Priority must be `emergency` or `normal`",
            ));
        }
    };
    let pin = match parts.headers.get(names::PIN).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v.trim().to_owned()),
        Some(Err(_)) => {
            return Err(Problem::new(
                400,
                "Bad X-Detour-Pin",
                "X-Detour-Pin must be `direct` or `via:<peer>`",
            ));
        }
    };
    Ok(Admitted { emergency, pin })
}

/// Builds a problem+json response.
pub fn problem(p: Problem) -> Response<Body> {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = Response::new(full(p.to_json()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    resp
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::Whole(Full::new(bytes.into()))
}

/// Whether `name` is one of [`HOP_BY_HOP`]. Only names of their lengths
/// are compared: most headers of a message are of other lengths, and are
/// passed over without nine comparisons each.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    let s = name.as_str();
    matches!(s.len(), 2 | 7 | 10 | 16..=19) && HOP_BY_HOP.iter().any(|h| h.as_str() == s)
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One look at the few headers a request carries, instead of a hashed
    // lookup per hop-by-hop name: most messages have none to remove.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
}

/// Whether an absolute-form target names the control plane (any of its
/// endpoints: the agent picks the endpoint itself).
pub fn is_control_plane(uri: &http::Uri, config: &AgentConfig) -> bool {
    let Some(host) = uri.host() else { return false };
    let cp = &config.control_plane;
    match uri.port_u16() {
        Some(p) => cp.endpoint_for(host, Some(p)).is_some(),
        // No port: the scheme's, or any port of that host (as before).
        None => {
            let host = host.trim_matches(['[', ']']);
            cp.endpoints.iter().any(|e| e.host.eq_ignore_ascii_case(host))
        }
    }
}

impl Ingress {
    /// Handles one request from the call handler. Never fails: every error
    /// becomes a problem+json response.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let received = Instant::now();
        let id = req
            .headers()
            .get(names::REQUEST_ID)
            .filter(|v| v.to_str().is_ok_and(|s| !s.is_empty() && s.len() <= 200))
            .cloned()
            .unwrap_or_else(new_uuid_value);
        let (mut resp, path) = self.handle_inner(req, received, &id).await;
        let took = received.elapsed().as_secs_f64();
        match path {
            // Answered on a path: its series, resolved once.
            Carrier::Path(path) => {
                let c = path.counters(&self.metrics);
                c.answered.inc();
                c.duration.observe(took);
            }
            Carrier::Named(path) => {
                self.metrics.requests.with_label_values(&[&*path, "ok"]).inc();
                self.metrics
                    .request_duration
                    .with_label_values(&[&*path])
                    .observe(took);
            }
            Carrier::None => {
                let outcome = if resp.headers().contains_key(names::DEFERRED) {
                    "deferred"
                } else if resp.status().is_server_error() {
                    "failed"
                } else {
                    "rejected"
                };
                self.metrics.requests.with_label_values(&["none", outcome]).inc();
                self.metrics
                    .request_duration
                    .with_label_values(&["none"])
                    .observe(took);
            }
        }
        resp.headers_mut().insert(names::REQUEST_ID, id);
        resp
    }

    async fn handle_inner(
        &self,
        req: Request<Incoming>,
        received: Instant,
        id: &HeaderValue,
    ) -> (Response<Body>, Carrier) {
        // Checked visible ASCII, or made from a UUID.
        let request_id = id.to_str().unwrap_or_default();
        let rt = self.forwarder.runtime();
        let config = rt.config.clone();
        let (parts, body) = req.into_parts();
        let rejected = |resp| (resp, Carrier::None);

        let Admitted { emergency, pin } = match admit(&parts, &config) {
            Ok(a) => a,
            Err(p) if p.status == 431 => return rejected(closing(problem(p))),
            Err(p) => return rejected(problem(p)),
        };
        let path_and_query = match target(&parts.uri) {
            Ok(pq) => pq,
            Err(p) => return rejected(problem(p)),
        };
        if crate::streams::is_upgrade(&parts.headers) {
            // Boxed, like the other rare branches below: a request's future
            // is moved into its connection's task, and would otherwise carry
            // the space of every branch (see `paths::pool`).
            return Box::pin(self.upgrade(parts, pin, path_and_query, received, id, &config)).await;
        }
        // Deferrable (and the journal open): its ordering key.
        let deferral = crate::deferred::key_of(&config.forward.deferrable, &parts.method, parts.uri.path())
            .and_then(|key| Some((key, self.shared.deferred.load_full()?)));
        let body = match read_body(&config.ingress, &parts.headers, body).await {
            Ok(b) => b,
            Err(resp) => return rejected(resp),
        };
        let headers = upstream_headers(parts.headers, &parts.method, &body, &config.control_plane, id);
        let out = Outbound {
            method: parts.method,
            path_and_query,
            headers,
            body,
            emergency,
            pin,
            received,
        };
        if let Some((key, journal)) = &deferral
            && journal.waiting(key)
        {
            // Older requests of this key wait for a path: this one goes
            // behind them, never ahead.
            return rejected(defer(journal, key, &out, &config, request_id));
        }
        let again = deferral.as_ref().map(|_| out.clone());
        match self.forwarder.forward(out).await {
            Ok(answer) => {
                let (mut rparts, rbody) = answer.response.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                if let Some(v) = &answer.path.name_value {
                    rparts.headers.insert(names::PATH, v.clone());
                }
                if answer.attempts > 1 {
                    tracing::info!(request_id, path = %answer.path.name, attempts = answer.attempts, "answered after more than one attempt");
                }
                (
                    Response::from_parts(rparts, Body::Answer(rbody)),
                    Carrier::Path(answer.path),
                )
            }
            Err(failure @ Failure::Exhausted { .. }) if deferral.is_some() => match (&deferral, again) {
                (Some((key, journal)), Some(out)) => {
                    tracing::info!(
                        request_id,
                        "no path delivered a deferrable request in time; journalled"
                    );
                    rejected(defer(journal, key, &out, &config, request_id))
                }
                _ => rejected(no_path(failure, request_id, config.forward.deadline)),
            },
            Err(failure) => rejected(no_path(failure, request_id, config.forward.deadline)),
        }
    }
}

/// The path and query to send upstream: the control plane's base path, then
/// the request's.
fn target(uri: &http::Uri) -> Result<http::uri::PathAndQuery, Problem> {
    uri.path_and_query()
        .cloned()
        .ok_or_else(|| Problem::new(400, "Bad request target", "the request has no path"))
}

/// Reads the body whole (so any path can re-send it), within
/// `ingress.max_body` and `ingress.body_timeout`. A refusal closes the
/// connection; of a body too long, declared or found as it came, what the
/// client is still sending is read and dropped first ([`discard`]).
async fn read_body(
    ingress: &crate::config::Ingress,
    headers: &http::HeaderMap,
    body: Incoming,
) -> Result<Bytes, Response<Body>> {
    let max = ingress.max_body;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        // A client that asked to be told first has sent nothing yet; reading
        // would tell it to go on (hyper answers `100 Continue` then).
        let waits = headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !waits {
            Box::pin(discard(body, max, ingress.body_timeout)).await;
        }
        return Err(closing(problem(too_large(max))));
    }
    let mut body = body;
    let started = Instant::now();
    let collected = tokio::time::timeout(
        ingress.body_timeout,
        collect(Limited::new(&mut body, max as usize)),
    )
    .await;
    let p = match collected {
        Ok(Ok(bytes)) => return Ok(bytes),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            // A body with no declared length (chunked) found too long as it
            // came: what the client is still sending is dropped first, as
            // for a declared one.
            let left = ingress.body_timeout.saturating_sub(started.elapsed());
            Box::pin(discard(body, max, left)).await;
            too_large(max)
        }
        Ok(Err(e)) => Problem::new(400, "Could not read the request body", e.to_string()),
        Err(_) => Problem::new(
            408,
            "Request body too slow",
            format!(
                "the body did not arrive within {}",
                humantime::format_duration(ingress.body_timeout)
            ),
        ),
    };
    Err(closing(problem(p)))
}

/// A body's data in one piece. A body that came as one chunk (a small
/// request's, read with its head) is that chunk, shared, not copied; the
/// chunks of a longer one are copied once into a buffer of their total size.
/// Trailers are dropped.
async fn collect<B>(mut body: B) -> Result<Bytes, B::Error>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut first = Bytes::new();
    let mut more: Vec<Bytes> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        if first.is_empty() {
            first = data;
        } else {
            more.push(data);
        }
    }
    if more.is_empty() {
        return Ok(first);
    }
    let total = first.len() + more.iter().map(Bytes::len).sum::<usize>();
    let mut joined = bytes::BytesMut::with_capacity(total);
    joined.extend_from_slice(&first);
    for chunk in &more {
        joined.extend_from_slice(chunk);
    }
    Ok(joined.freeze())
}

/// How long [`discard`] waits for more of a refused body.
const DISCARD_IDLE: std::time::Duration = std::time::Duration::from_millis(200);

/// Reads and drops what the client is still sending of a body declared
/// over the limit, before the 413: closing a connection with unread bytes
/// makes the kernel reset it, and a client still writing its body may then
/// see the reset instead of the answer. Up to `cap` bytes, within `within`,
/// and only while bytes keep coming (a client that waits for an answer
/// before sending gets it after [`DISCARD_IDLE`]).
async fn discard(mut body: Incoming, cap: u64, within: std::time::Duration) {
    let deadline = Instant::now() + within;
    let mut read = 0u64;
    while read <= cap {
        let wait = DISCARD_IDLE.min(deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, body.frame()).await {
            Ok(Some(Ok(frame))) => read += frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => return,
        }
    }
}

/// The headers sent upstream: hop-by-hop and the pin removed; `Host` the
/// first endpoint's (each path sets its own endpoint's); the request id, an
/// `Idempotency-Key` (when the caller sent none) and the agent's token (when
/// the caller sent no `Authorization`) set; the length of the buffered body.
fn upstream_headers(
    mut headers: http::HeaderMap,
    method: &Method,
    body: &Bytes,
    cp: &crate::config::ControlPlane,
    request_id: &HeaderValue,
) -> http::HeaderMap {
    strip_hop_by_hop(&mut headers);
    headers.remove(names::PIN);
    // Each path sets its endpoint's `Host` on its attempt's copy of these
    // headers. The first endpoint's is set here so that the entry exists:
    // setting it on the copy then replaces a value in place, where adding
    // it grew the copy (an allocation and a move of the map per attempt).
    match cp.endpoints.first().and_then(|e| e.host_value.clone()) {
        Some(host) => headers.insert(header::HOST, host),
        None => headers.remove(header::HOST),
    };
    headers.insert(names::REQUEST_ID, request_id.clone());
    if !headers.contains_key(names::IDEMPOTENCY_KEY) {
        headers.insert(names::IDEMPOTENCY_KEY, new_uuid_value());
    }
    if let Some(v) = &cp.auth_value
        && !headers.contains_key(header::AUTHORIZATION)
    {
        headers.insert(header::AUTHORIZATION, v.clone());
    }
    let length = (!body.is_empty()
        || !matches!(
            *method,
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
        ))
    .then_some(body.len());
    // The caller's own `Content-Length` is kept when it already says the
    // buffered body's length (most do): a new value costs two allocations.
    if length.is_none() || !says_length(&headers, body.len()) {
        headers.remove(header::CONTENT_LENGTH);
        if let Some(n) = length {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    headers
}

/// Whether `headers` carry exactly one `Content-Length`, and it is `len`
/// written as the agent would write it: digits only, no leading zero. hyper
/// accepts leading zeros, but an HTTP/2 peer may not (h2 refuses a value
/// of over 19 bytes), so any other form is written anew.
fn says_length(headers: &HeaderMap, len: usize) -> bool {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return false;
    };
    let digits = v.as_bytes();
    let canonical = digits.len() == 1 || digits.first().is_some_and(|d| *d != b'0');
    canonical
        && digits.len() <= 20
        && digits.iter().all(u8::is_ascii_digit)
        && digits.iter().try_fold(0usize, |n, d| {
            n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
        }) == Some(len)
}

/// A new random UUID as a header value (a request id, an idempotency key),
/// written without an intermediate string.
fn new_uuid_value() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    // Owned by the value itself: one allocation, and every clone (the
    // upstream request's, each attempt's, the answer's) only counts a
    // reference. A value copied from a `&str` allocates again on its first
    // clone. A UUID's text is visible ASCII, always a valid header value.
    HeaderValue::from_maybe_shared(Bytes::from_owner(buf)).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// The answer when no path delivered: 400 for an unknown pin, else 503 with
/// every attempt listed and `Retry-After: 1`.
fn no_path(failure: Failure, request_id: &str, deadline: std::time::Duration) -> Response<Body> {
    let (attempts, deadline_passed) = match failure {
        Failure::UnknownPin(p) => {
            return problem(Problem::new(
                400,
                "Unknown path",
                format!("X-Detour-Pin names `{p}`, which is not a configured path"),
            ));
        }
        Failure::Exhausted {
            attempts,
            deadline_passed,
        } => (attempts, deadline_passed),
    };
    let detail = if attempts.is_empty() {
        "no enabled path to the control plane".to_owned()
    } else if deadline_passed {
        format!(
            "no path delivered within the deadline of {}",
            humantime::format_duration(deadline)
        )
    } else {
        format!("all {} attempt(s) failed", attempts.len())
    };
    tracing::warn!(request_id, %detail, ?attempts, "request failed on every path");
    let p = Problem::new(503, "No path to the control plane", detail)
        .with_type("https://detour.dev/problems/no-path")
        .with("request_id", request_id)
        .with("attempts", &attempts);
    let mut resp = problem(p);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// Journals a deferrable request: 202 with its receipt, or 503 when the
/// journal cannot take it (full, or not writable), with why.
fn defer(
    journal: &crate::deferred::Deferred,
    key: &str,
    out: &Outbound,
    config: &AgentConfig,
    request_id: &str,
) -> Response<Body> {
    match journal.accept(key.to_owned(), out, config.control_plane.auth_value.as_ref()) {
        Ok(receipt) => {
            let body = serde_json::json!({
                "deferred": receipt,
                "detail": "no path delivered this request in time: it is journalled on the agent and will be delivered in order, once, when a path works",
            });
            let mut resp = Response::new(full(body.to_string()));
            *resp.status_mut() = StatusCode::ACCEPTED;
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Ok(v) = HeaderValue::from_str(&receipt) {
                resp.headers_mut().insert(names::DEFERRED, v);
            }
            resp
        }
        Err(why) => {
            tracing::warn!(request_id, %why, "a deferrable request could not be deferred");
            let p = Problem::new(503, "No path to the control plane", why.to_string())
                .with_type("https://detour.dev/problems/deferred-journal-full")
                .with("request_id", request_id);
            let mut resp = problem(p);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
    }
}

/// Marks an answer given before the request body was read to its end: the
/// connection closes after it (the rest of the body is never read), and the
/// client must know not to send its next request on it.
fn closing(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn too_large(max: u64) -> Problem {
    Problem::new(
        413,
        "Request body too large",
        format!("the body is over the limit of {max} bytes (ingress.max_body)"),
    )
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    fn control_plane() -> crate::config::ControlPlane {
        AgentConfig::from_str_at(
            std::path::Path::new("agent.toml"),
            "pop = \"blr\"\n[control_plane]\nurl = \"http://cp.example:8080/base\"\n",
        )
        .unwrap()
        .control_plane
    }

    fn request_headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_callers_content_length_is_kept_only_when_it_says_the_bodys_length() {
        let cp = control_plane();
        let id = HeaderValue::from_static("req-1");
        let body = Bytes::from_static(b"{\"a\":1}");
        let length = |pairs: &[(&str, &str)], method: &Method, body: &Bytes| {
            let h = upstream_headers(request_headers(pairs), method, body, &cp, &id);
            let v: Vec<_> = h
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            v
        };
        // Kept as sent: the length, written as the agent writes it.
        assert_eq!(length(&[("content-length", "7")], &Method::POST, &body), ["7"]);
        let empty = Bytes::new();
        assert_eq!(length(&[("content-length", "0")], &Method::POST, &empty), ["0"]);
        // Written anew: leading zeros (an HTTP/2 control plane refuses a
        // value of over 19 bytes), another length, not digits, two values,
        // none at all.
        assert_eq!(length(&[("content-length", "007")], &Method::POST, &body), ["7"]);
        let padded = [("content-length", "00000000000000000007")];
        assert_eq!(length(&padded, &Method::POST, &body), ["7"]);
        assert_eq!(length(&[("content-length", "70")], &Method::POST, &body), ["7"]);
        assert_eq!(length(&[("content-length", "+7")], &Method::POST, &body), ["7"]);
        assert_eq!(
            length(
                &[("content-length", "7"), ("content-length", "7")],
                &Method::POST,
                &body
            ),
            ["7"]
        );
        assert_eq!(
            length(
                &[("content-length", "99999999999999999999999")],
                &Method::POST,
                &body
            ),
            ["7"]
        );
        assert_eq!(length(&[], &Method::POST, &body), ["7"]);
        // A POST with no body says 0; a GET with none says nothing.
        assert_eq!(length(&[], &Method::POST, &Bytes::new()), ["0"]);
        assert!(length(&[("content-length", "0")], &Method::GET, &Bytes::new()).is_empty());
    }

    #[test]
    fn hop_by_hop_names_are_found_by_their_length_and_text() {
        for h in &HOP_BY_HOP {
            assert!(is_hop_by_hop(h), "{h}");
            assert!(is_hop_by_hop(
                &HeaderName::from_bytes(h.as_str().to_uppercase().as_bytes()).unwrap()
            ));
        }
        for other in [
            "user-agent",
            "content-length",
            "host",
            "x-detour-pin",
            "te-x",
            "upgrades",
            "proxy-connectio",
        ] {
            assert!(
                !is_hop_by_hop(&HeaderName::from_bytes(other.as_bytes()).unwrap()),
                "{other}"
            );
        }
        let mut h = request_headers(&[
            ("te", "trailers"),
            ("x-keep", "1"),
            ("connection", "x-named, keep-alive"),
            ("x-named", "2"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"]);
    }

    #[test]
    fn upstream_headers_carry_the_first_endpoints_host_and_the_request_identity() {
        let cp = control_plane();
        let id = HeaderValue::from_static("req-1");
        let h = upstream_headers(
            request_headers(&[
                ("host", "127.0.0.1:7000"),
                ("connection", "x-gone"),
                ("x-gone", "1"),
            ]),
            &Method::POST,
            &Bytes::new(),
            &cp,
            &id,
        );
        assert_eq!(h.get(header::HOST).unwrap(), "cp.example:8080");
        assert_eq!(h.get_all(header::HOST).iter().count(), 1);
        assert!(h.get("x-gone").is_none() && h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(names::REQUEST_ID).unwrap(), "req-1");
        let key = h.get(names::IDEMPOTENCY_KEY).unwrap().to_str().unwrap();
        assert!(uuid::Uuid::parse_str(key).is_ok(), "{key}");
    }

    #[test]
    fn a_new_uuid_value_is_a_uuid_and_its_clones_are_equal() {
        let v = new_uuid_value();
        let text = v.to_str().unwrap().to_owned();
        assert_eq!(
            uuid::Uuid::parse_str(&text).unwrap().hyphenated().to_string(),
            text
        );
        let copies = [v.clone(), v.clone()];
        drop(v);
        assert!(copies.iter().all(|c| c.to_str().unwrap() == text));
        assert_ne!(new_uuid_value(), copies[0]);
    }

    #[tokio::test]
    async fn an_answer_the_agent_writes_says_its_size_and_ends() {
        let b = full("abc");
        assert_eq!(hyper::body::Body::size_hint(&b).exact(), Some(3));
        assert!(!hyper::body::Body::is_end_stream(&b));
        assert_eq!(b.collect().await.unwrap().to_bytes(), "abc");
        assert!(hyper::body::Body::is_end_stream(&Body::default()));
    }

    #[tokio::test]
    async fn a_body_is_collected_whole_from_one_chunk_or_many() {
        use http_body_util::StreamBody;
        let frames = |chunks: &[&'static [u8]]| {
            let mut v: Vec<Result<hyper::body::Frame<Bytes>, Infallible>> = chunks
                .iter()
                .map(|c| Ok(hyper::body::Frame::data(Bytes::from_static(c))))
                .collect();
            v.push(Ok(hyper::body::Frame::trailers(HeaderMap::new())));
            StreamBody::new(futures_util::stream::iter(v))
        };
        let one = Bytes::from_static(b"one chunk");
        let got = collect(Full::new(one.clone())).await.unwrap();
        // The chunk itself: the same memory, not a copy.
        assert_eq!(got.as_ptr(), one.as_ptr());
        let joined = collect(frames(&[b"ab", b"", b"cd", b"e"])).await.unwrap();
        assert_eq!(joined, "abcde");
        // Copied once, into a buffer of the body's size.
        assert_eq!(bytes::BytesMut::from(joined).capacity(), 5);
        assert_eq!(collect(frames(&[b"", b"only"])).await.unwrap(), "only");
        assert!(collect(frames(&[])).await.unwrap().is_empty());
    }
}

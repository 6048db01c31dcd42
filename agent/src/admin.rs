//! Admin listener: `/metrics` (Prometheus text), `/healthz` (alive),
//! `/readyz` (serving, with a usable path), `/status` (JSON path table); and
//! the fleet report, the same path table sent to the control plane.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use detour_wire::accept::{ConnCap, accept};
use detour_wire::conn::{ConnLimits, Rejection, Tracked, guard, parse_problem, problem_response};
use detour_wire::{AgentReport, PathState, Problem};
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::forward;
use crate::ingress::{Body, full, problem};
use crate::runtime::Shared;

/// Serves the admin listener until `shutdown` turns true.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let cap = ConnCap::new(MAX_CONNECTIONS, "the admin listener's cap");
    loop {
        let (tcp, _) = tokio::select! {
            c = accept(&listener, "admin") => c,
            _ = shutdown.changed() => return,
        };
        let Some(slot) = cap.admit() else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_conn(tcp, move |req| handle(shared.clone(), req)).await;
            drop(slot);
        });
    }
}

/// Connections the admin listener keeps open at once (scrapers, `status`,
/// health gates); one more is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// The admin listener's and the control socket's limits. A head must come
/// whole within 5 s; a kept-alive connection may then stay quiet for 10
/// minutes, longer than any scraper keeps one (Prometheus: 5 minutes), so
/// the scraper closes first and never sends into a closing connection.
pub const LIMITS: ConnLimits = ConnLimits {
    header_timeout: Duration::from_secs(5),
    idle_timeout: Duration::from_secs(600),
};

/// The admin listener's and the control socket's longest request head.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Serves one admin or control connection with hyper, under the connection
/// guard (`wire::conn`), which owns the head and idle timeouts. hyper's own
/// head timeout is off: it also ran between requests, so it closed every
/// scraper's kept-alive connection 5 s after each scrape, and a scrape sent
/// as it fired failed.
pub(crate) async fn serve_conn<T, F, Fut>(io: T, handle: F)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let rejection: Rejection = Arc::new(|status| {
        problem_response(&parse_problem(
            status,
            MAX_HEAD_BYTES,
            "the admin listener's limit",
        ))
    });
    let (io, tracker) = guard(io, LIMITS, rejection);
    let service = service_fn(move |req| {
        let flight = tracker.begin();
        let answer = handle(req);
        async move {
            let resp = answer.await?;
            Ok::<_, Infallible>(resp.map(|b| Tracked::new(b, flight)))
        }
    });
    let _ = http1::Builder::new()
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(io), service)
        .await;
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r
}

/// The agent's report, as `/status` serves it.
pub fn report(shared: &Shared) -> AgentReport {
    let rt = shared.forwarder.runtime();
    let mut paths = rt.health.reports();
    for report in paths.iter_mut().filter(|r| r.state != PathState::Up) {
        // A path down because a certificate was refused says so: "3
        // consecutive failures (connect failed)" alone hides a revocation.
        let problem = rt
            .paths
            .iter()
            .find(|p| *p.name == *report.path)
            .and_then(|p| p.cert_problem());
        if let Some(problem) = problem {
            report.reason = Some(match report.reason.take() {
                Some(r) => format!("{r}: {problem}"),
                None => problem.to_string(),
            });
        }
    }
    AgentReport {
        pop: rt.config.pop.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        active_path: paths.iter().find(|p| p.active).map(|p| p.path.clone()),
        paths,
        config_error: shared.config_error.load().as_ref().map(|s| s.to_string()),
        recordings: shared.recordings.load().as_deref().cloned(),
        deferred: shared.deferred.load().as_ref().map(|d| d.report()),
        switches: rt.health.switches(),
        relay_rejected: shared.metrics.relay_rejected_counts(),
    }
}

pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return Ok(problem(Problem::new(
            405,
            "Method not allowed",
            "the admin endpoints are read-only (GET)",
        )));
    }
    let resp = match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let snap = shared.forwarder.runtime().health.snapshot();
            let usable = snap.paths.iter().any(|p| p.enabled && p.state != PathState::Down);
            if usable {
                text(StatusCode::OK, "text/plain", "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: no path to the control plane is up\n",
                )
            }
        }
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics.render(),
        ),
        "/status" => {
            let body = serde_json::to_vec_pretty(&report(&shared)).unwrap_or_default();
            text(StatusCode::OK, "application/json", body)
        }
        other => problem(Problem::new(
            404,
            "Not found",
            format!("no admin endpoint `{other}`; try /status, /metrics, /healthz, /readyz"),
        )),
    };
    Ok(resp)
}

/// Reports the path table to the control plane (the fleet view) every
/// `control_plane.report_interval`, over the best path like any request.
pub async fn report_loop(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
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
        let Some(out) = report_request(&shared) else {
            continue;
        };
        match shared.forwarder.forward(out).await {
            Ok(a) if a.response.status().is_success() => {}
            Ok(a) => tracing::debug!(status = %a.response.status(), "fleet report not accepted"),
            Err(e) => tracing::debug!(error = ?e, "fleet report not delivered"),
        }
    }
}

/// `POST /v1/agents/{pop}/report` with this agent's report, with its own
/// idempotency key like any request the agent may retry.
fn report_request(shared: &Shared) -> Option<forward::Outbound> {
    let report = report(shared);
    let rt = shared.forwarder.runtime();
    let cp = &rt.config.control_plane;
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
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
    let path_and_query = format!("/v1/agents/{}/report", rt.config.pop).parse().ok()?;
    Some(forward::Outbound {
        method: http::Method::POST,
        path_and_query,
        headers,
        body,
        emergency: false,
        pin: None,
        received: tokio::time::Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// An admin connection answering "ok" to every request, and a client
    /// connected to it.
    async fn connected() -> TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            serve_conn(tcp, |_req| async { Ok(text(StatusCode::OK, "text/plain", "ok")) }).await;
        });
        TcpStream::connect(addr).await.unwrap()
    }

    /// Sends one `GET` and returns what came back, empty when the server
    /// closed the connection instead.
    async fn get(s: &mut TcpStream) -> String {
        send(s, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await
    }

    /// Sends `bytes` and returns what came back, empty when the server
    /// closed the connection instead.
    async fn send(s: &mut TcpStream, bytes: &[u8]) -> String {
        let _ = s.write_all(bytes).await;
        read(s).await
    }

    /// What the server sends next, empty when it closed the connection.
    /// Fails the test, rather than hanging it, if the server neither answers
    /// nor closes within a minute.
    async fn read(s: &mut TcpStream) -> String {
        let mut buf = [0u8; 2048];
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf))
            .await
            .expect("the server neither answered nor closed")
            .unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// A scraper's kept-alive connection stays open between scrapes (hyper's
    /// own head timeout closed it 5 s after each one), and is closed only
    /// after `LIMITS.idle_timeout` of quiet. Time is paused, so the quiet
    /// takes none.
    #[tokio::test(start_paused = true)]
    async fn a_scrapers_connection_stays_open_between_scrapes() {
        let mut s = connected().await;
        for round in 0..3 {
            let answer = get(&mut s).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "scrape {round}: {answer:?}");
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        tokio::time::sleep(LIMITS.idle_timeout).await;
        assert_eq!(read(&mut s).await, "", "closed after the idle timeout");
    }

    /// A head still unfinished after `LIMITS.header_timeout` is closed.
    #[tokio::test(start_paused = true)]
    async fn a_head_that_never_ends_is_closed() {
        let mut s = connected().await;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost:").await.unwrap();
        tokio::time::sleep(LIMITS.header_timeout + Duration::from_secs(1)).await;
        let answer = read(&mut s).await;
        assert!(!answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert_eq!(read(&mut s).await, "", "closed");
    }

    /// A head that is not HTTP, or is over the limit, is answered with a
    /// problem that says why, and the connection is closed.
    #[tokio::test(start_paused = true)]
    async fn a_bad_head_is_answered_with_a_problem() {
        let mut s = connected().await;
        let answer = send(&mut s, b"NOT HTTP AT ALL\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
        assert!(answer.contains("application/problem+json"), "{answer:?}");
        assert_eq!(read(&mut s).await, "", "closed");

        let mut s = connected().await;
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nx-big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        let answer = send(&mut s, huge.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
        assert!(answer.contains("16384 bytes"), "{answer:?}");
    }
}

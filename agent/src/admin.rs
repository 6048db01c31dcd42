//! Admin listener: `/metrics` (Prometheus text), `/healthz` (alive),
//! `/readyz` (serving, with a usable path), `/status` (JSON path table).

use std::convert::Infallible;
use std::sync::Arc;

use detour_wire::{AgentReport, PathState, Problem};
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::Shared;
use crate::ingress::{Body, full, problem};

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
    let paths = rt.health.reports();
    AgentReport {
        pop: rt.config.pop.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        active_path: paths.iter().find(|p| p.active).map(|p| p.path.clone()),
        paths,
        config_error: shared.config_error.load().as_ref().map(|s| s.to_string()),
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

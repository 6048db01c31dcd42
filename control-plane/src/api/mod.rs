//! API: the axum router and what its handlers share. Each handler
//! authenticates, reads a bounded body, hands it to `intake`/`routing`/`store`,
//! and answers JSON or `application/problem+json` (never a bare 500 for bad
//! input). One module per resource: `calls`, `routes`, `audit` and
//! `fleet` (agent reports and the fleet view's data), `page` (the fleet
//! page, its login and assets), `streams` (the WebSocket
//! echo), plus `health` (probes and metrics); `state` holds the replica's shared state, `shed` the rate
//! limits and load shedding, `error` the problem answers.

mod audit;
mod calls;
mod error;
mod fleet;
mod health;
mod page;
mod routes;
mod shed;
mod state;
mod streams;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;
use tokio::time::Instant;

use crate::auth::Principal;
use crate::idempotency::{self, REPLAYED_HEADER};
use crate::store::{Idem, StoredResponse};

pub use calls::DEFERRED_HEADER;
pub use error::ApiError;
pub use state::App;

use error::forbidden;

type Shared = Arc<App>;

/// The router with every endpoint.
pub fn router(app: Shared) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/v1/calls", post(calls::create_call))
        .route("/v1/calls/{id}", get(calls::get_call))
        .route("/v1/calls/{id}/events", post(calls::post_event))
        .route("/v1/calls/{id}/recordings", post(calls::post_recording))
        .route("/v1/routes", get(routes::list_routes))
        .route(
            "/v1/routes/{name}",
            get(routes::get_route)
                .put(routes::put_route)
                .delete(routes::delete_route),
        )
        .route("/v1/audit", get(audit::audit_log))
        .route("/v1/agents/{pop}/report", post(fleet::post_report))
        .route("/v1/fleet", get(fleet::fleet))
        .route("/v1/fleet/view", get(fleet::view))
        .route("/fleet", get(page::page))
        .route("/fleet/login", get(page::login_form).post(page::login))
        .route("/fleet/logout", post(page::logout))
        .route("/fleet/fleet.js", get(page::script))
        .route("/fleet/fleet.css", get(page::style))
        .route("/v1/streams/echo", get(streams::echo))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(run_to_completion))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// The API contract, generated from the handlers' annotations and the
/// schemas in [`crate::openapi`].
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Detour control plane", description = "Call routing, call records and the fleet view. Errors are RFC 9457 problem+json."),
    paths(health::healthz, health::readyz, health::metrics, calls::create_call, calls::get_call,
          calls::post_event, calls::post_recording, routes::list_routes, routes::get_route, routes::put_route,
          routes::delete_route, audit::audit_log, fleet::post_report, fleet::fleet, fleet::view, streams::echo,
          page::page, page::login_form, page::login, page::logout),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// The OpenAPI document (3.1), built once.
pub fn openapi_document() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        use utoipa::OpenApi;
        ApiDoc::openapi().to_pretty_json().unwrap_or_default()
    })
}

async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_document()).into_response()
}

// ---- plumbing ----

/// Runs the handler in a task of its own, so that a client that goes away
/// (an agent cancelling the loser of a hedge, a deadline) cannot drop it
/// half-way through a database transaction. sqlx does not survive that:
/// a `BEGIN` cancelled before the server acknowledged it leaves the pooled
/// connection inside a transaction that nothing ever commits, and every
/// statement later run on that connection (the group commit's, other
/// requests') joins it, holding its rows' locks; seen as another region's
/// replica blocked for seconds on the same idempotency keys. A request that
/// started is finished and stored, whoever is still listening.
async fn run_to_completion(req: Request, next: Next) -> Response {
    match tokio::spawn(next.run(req)).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %e, "request handler panicked");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "the request failed inside the control plane; it has been logged",
            )
            .into_response()
        }
    }
}

async fn observe(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let start = Instant::now();
    let resp = next.run(req).await;
    app.metrics
        .duration
        .with_label_values(&[route.as_str()])
        .observe(start.elapsed().as_secs_f64());
    app.metrics
        .requests
        .with_label_values(&[route.as_str(), resp.status().as_str()])
        .inc();
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no such endpoint; see docs/control-plane.md",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "this endpoint does not accept that method; see docs/control-plane.md",
    )
}

// ---- what several handlers read ----

async fn read_body(app: &App, body: Body) -> Result<Bytes, ApiError> {
    let limit = app.config.limits.max_body_bytes;
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Body too large",
            format!("request bodies are limited to {limit} bytes"),
        )
    })
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed-json",
            "Malformed JSON",
            format!("the body is not valid JSON: {e}"),
        )
    })
}

async fn admin(app: &App, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let p = app.auth.authenticate(headers).await?;
    if p != Principal::Admin {
        return Err(forbidden("this endpoint needs the admin token"));
    }
    Ok(p)
}

fn idem_of(headers: &HeaderMap, path: &str, who: &Principal, body: &[u8]) -> Result<Option<Idem>, ApiError> {
    idempotency::from_request(headers, "POST", path, &who.name(), body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-idempotency-key",
            "Bad Idempotency-Key",
            e.to_string(),
        )
        .with("field", "Idempotency-Key")
    })
}

fn emergency_header(headers: &HeaderMap) -> bool {
    headers
        .get(detour_wire::headers::PRIORITY)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"emergency"))
}

// ---- what several handlers answer ----

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn stored_response(r: StoredResponse, replayed: bool) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK);
    let mut resp = (status, r.body).into_response();
    if let Ok(ct) = HeaderValue::from_str(&r.content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    if replayed {
        resp.headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    resp
}

fn rfc3339(ms: i64) -> Value {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

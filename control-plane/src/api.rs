//! API: the axum handlers. Each one authenticates, reads a bounded body,
//! hands it to `intake`/`routing`/`store`, and answers JSON or
//! `application/problem+json` (never a bare 500 for bad input).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use detour_wire::{AgentReport, PROBLEM_JSON, Problem};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::auth::{AuthError, Authenticator, Principal};
use crate::config::Config;
use crate::hook::{HookRequest, Hooks};
use crate::idempotency::{self, REPLAYED_HEADER};
use crate::intake::{self, FieldError, Numbers, Priority};
use crate::metrics::Metrics;
use crate::openapi;
use crate::routing::{self, RouteSpec, RuleSet};
use crate::spool::{Hold, Spool};
use crate::store::{self, Idem, NewCall, Outcome, Store, StoreError, StoredResponse};

/// Shared state of one replica.
/// On an emergency call answered while the database was down: its record is
/// written once the database is back.
pub const DEFERRED_HEADER: &str = "x-detour-deferred";

/// Emergency calls held in memory during a database outage, at most.
const EMERGENCY_SPOOL_MAX: usize = 10_000;

pub struct App {
    pub config: Config,
    pub store: Store,
    pub auth: Authenticator,
    /// Rules in use; swapped whole on every change, read without locks.
    pub rules: ArcSwap<RuleSet>,
    pub numbers: Numbers,
    pub tz: chrono_tz::Tz,
    pub hooks: Hooks,
    pub metrics: Metrics,
    limiter: RateLimiter,
    normal_slots: Semaphore,
    normal_waiting: AtomicUsize,
    emergency_slots: Semaphore,
    /// Serialises rule reloads so an older load never replaces a newer one.
    reload: Mutex<()>,
    /// Emergency calls answered while the database was down.
    pub spool: Spool,
}

impl App {
    /// State for `config` over an opened, migrated `store`.
    pub fn new(config: Config, store: Store, admin_token: Option<&str>) -> anyhow::Result<App> {
        let numbers = Numbers::new(
            config.numbers.default_region.get_ref(),
            config.numbers.emergency.iter().map(|e| e.get_ref().clone()),
        );
        let metrics = Metrics::new();
        let store = store.counting_batches(metrics.db_batches.clone(), metrics.db_batched_calls.clone());
        Ok(App {
            auth: Authenticator::new(admin_token, store.clone()),
            rules: ArcSwap::from_pointee(RuleSet::default()),
            numbers,
            tz: config.time_zone(),
            hooks: Hooks::new(config.hook.clone())?,
            metrics,
            limiter: RateLimiter::new(config.limits.per_pop_rps, config.limits.per_pop_burst),
            normal_slots: Semaphore::new(config.limits.max_in_flight),
            normal_waiting: AtomicUsize::new(0),
            emergency_slots: Semaphore::new(config.limits.emergency_reserved),
            reload: Mutex::new(()),
            spool: Spool::new(EMERGENCY_SPOOL_MAX),
            store,
            config,
        })
    }

    /// Reloads the rules if the database's route version differs from the
    /// one in use (or always, with `force`). Returns the version in use.
    pub async fn refresh_rules(&self, force: bool) -> Result<i64, StoreError> {
        let _one_at_a_time = self.reload.lock().await;
        let current = self.rules.load().version;
        if !force && self.store.route_version().await? == current {
            return Ok(current);
        }
        let (version, rows) = self.store.load_routes().await?;
        let mut rules = Vec::with_capacity(rows.len());
        for row in rows {
            let compiled = serde_json::from_str::<RouteSpec>(&row.spec)
                .map_err(|e| {
                    vec![FieldError {
                        field: "spec".into(),
                        reason: e.to_string(),
                    }]
                })
                .and_then(|spec| spec.compile(&row.name));
            match compiled {
                Ok(rule) => rules.push(rule),
                // Rules are validated on write; one that no longer compiles
                // (an older build wrote it) is skipped, not fatal.
                Err(e) => tracing::warn!(route = %row.name, ?e, "skipping invalid stored route"),
            }
        }
        let set = RuleSet::new(version, rules);
        self.metrics.route_version.set(version);
        self.metrics
            .route_rules
            .set(i64::try_from(set.len()).unwrap_or(i64::MAX));
        self.rules.store(Arc::new(set));
        Ok(version)
    }
}

type Shared = Arc<App>;

/// The router with every endpoint.
pub fn router(app: Shared) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/calls", post(create_call))
        .route("/v1/calls/{id}", get(get_call))
        .route("/v1/calls/{id}/events", post(post_event))
        .route("/v1/routes", get(list_routes))
        .route(
            "/v1/routes/{name}",
            get(get_route).put(put_route).delete(delete_route),
        )
        .route("/v1/audit", get(audit_log))
        .route("/v1/agents/{pop}/report", post(post_report))
        .route("/v1/fleet", get(fleet))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// The API contract, generated from the handlers' annotations and the
/// schemas in [`crate::openapi`].
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Detour control plane", description = "Call routing, call records and the fleet view. Errors are RFC 9457 problem+json."),
    paths(healthz, readyz, metrics, create_call, get_call, post_event, list_routes, get_route, put_route,
          delete_route, audit_log, post_report, fleet),
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

// ---- errors ----

/// An error answer: a problem body and, for overload, a retry hint.
#[derive(Debug)]
pub struct ApiError {
    problem: Problem,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, title: &str, detail: impl Into<String>) -> Self {
        ApiError {
            problem: Problem::new(status.as_u16(), title, detail)
                .with_type(format!("urn:detour:problem:{code}")),
            retry_after: None,
        }
    }

    fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    fn with(mut self, key: &str, value: impl serde::Serialize) -> Self {
        self.problem = self.problem.with(key, value);
        self
    }

    fn invalid(errors: Vec<FieldError>) -> Self {
        let first = errors.first().cloned().unwrap_or(FieldError {
            field: String::new(),
            reason: "is invalid".into(),
        });
        let detail = errors
            .iter()
            .map(|e| {
                if e.field.is_empty() {
                    e.reason.clone()
                } else {
                    format!("{} {}", e.field, e.reason)
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "Invalid request",
            detail,
        )
        .with("field", &first.field)
        .with("errors", &errors)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, self.problem.to_json()).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(why) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database-unavailable",
                "Database unavailable",
                format!("nothing was stored; retry later ({why})"),
            )
            .retry_after(1),
            StoreError::Conflict(why) => ApiError::new(StatusCode::CONFLICT, "conflict", "Conflict", why),
            StoreError::Other(why) => {
                tracing::error!(error = %why, "database error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "Internal error",
                    "the database rejected the operation; see the control-plane log",
                )
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Store(s) => s.into(),
            other => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                other.to_string(),
            ),
        }
    }
}

type ApiResult = Result<Response, ApiError>;

fn forbidden(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
}

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

fn mismatch() -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
        "Idempotency-Key reused",
        "this Idempotency-Key was used with a different request body or endpoint; \
         use a new key for a new request",
    )
    .with("field", "Idempotency-Key")
}

fn rfc3339(ms: i64) -> Value {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

// ---- plumbing ----

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

async fn rate_limit(app: &App, who: &Principal) -> Result<(), ApiError> {
    if *who == Principal::Admin {
        return Ok(());
    }
    let pop = who.pop();
    if let Err(wait) = app.limiter.check(pop).await {
        app.metrics.rate_limited.with_label_values(&[pop]).inc();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Rate limited",
            format!(
                "PoP {pop} is over {} requests/s on this replica; emergency calls are exempt",
                app.config.limits.per_pop_rps
            ),
        )
        .retry_after(wait.as_secs().max(1)));
    }
    Ok(())
}

/// A slot for one call initiation; dropped when the answer is ready.
struct Slot<'a> {
    _permit: SemaphorePermit<'a>,
    gauge: prometheus::IntGauge,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Emergency calls take a reserved slot (or a free normal one) and wait
/// rather than being shed. Normal calls wait in a bounded queue for a
/// bounded time; beyond either bound they are shed with 503.
async fn acquire_slot(app: &App, priority: Priority) -> Result<Slot<'_>, ApiError> {
    let class = priority.as_str();
    let permit = if priority == Priority::Emergency {
        match app
            .emergency_slots
            .try_acquire()
            .or_else(|_| app.normal_slots.try_acquire())
        {
            Ok(p) => p,
            Err(_) => app.emergency_slots.acquire().await.map_err(|_| shutting_down())?,
        }
    } else if let Ok(p) = app.normal_slots.try_acquire() {
        p
    } else {
        let waiting = app.normal_waiting.fetch_add(1, Ordering::SeqCst);
        let result = if waiting >= app.config.limits.max_queue {
            Err("queue_full")
        } else {
            match tokio::time::timeout(app.config.limits.queue_timeout, app.normal_slots.acquire()).await {
                Ok(Ok(p)) => Ok(p),
                Ok(Err(_)) => Err("closed"),
                Err(_) => Err("queue_timeout"),
            }
        };
        app.normal_waiting.fetch_sub(1, Ordering::SeqCst);
        match result {
            Ok(p) => p,
            Err(reason) => {
                app.metrics.shed.with_label_values(&[reason]).inc();
                app.metrics.calls.with_label_values(&["normal", "shed"]).inc();
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "Overloaded",
                    "the control plane is saturated and shed this normal-priority call; \
                     retry after the indicated delay",
                )
                .with("reason", reason)
                .retry_after(1));
            }
        }
    };
    let gauge = app.metrics.in_flight.with_label_values(&[class]);
    gauge.inc();
    Ok(Slot {
        _permit: permit,
        gauge,
    })
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting-down",
        "Shutting down",
        "this replica is shutting down; retry on another",
    )
    .retry_after(1)
}

// ---- health ----

#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is up (no database check).", body = String, content_type = "text/plain")))]
async fn healthz() -> Response {
    // Agents probe this through every path twice a second: no database, no auth.
    ([(header::CONTENT_TYPE, "text/plain")], "ok\n").into_response()
}

#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Migrated and the database answers.", body = openapi::ReadySchema),
              (status = 503, description = "The database does not answer.", body = openapi::ProblemSchema, content_type = "application/problem+json")))]
async fn readyz(State(app): State<Shared>) -> Response {
    let check = tokio::time::timeout(Duration::from_secs(2), app.store.ready()).await;
    let result = match check {
        Ok(r) => r,
        Err(_) => Err("database did not answer within 2s".to_owned()),
    };
    match result {
        Ok(()) => {
            app.metrics.db_up.set(1);
            json_response(
                StatusCode::OK,
                &json!({"status": "ready", "route_version": app.rules.load().version}),
            )
        }
        Err(why) => {
            app.metrics.db_up.set(0);
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready", why).into_response()
        }
    }
}

#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format.", body = String, content_type = "text/plain")))]
async fn metrics(State(app): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

// ---- calls ----

#[utoipa::path(post, path = "/v1/calls", tag = "calls", security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeats with this key get the first answer.")),
    request_body = openapi::CallRequestSchema,
    responses((status = 201, description = "Routed and stored (or replayed for a repeated key).", body = openapi::CallCreatedSchema), openapi::Errors))]
async fn create_call(State(app): State<Shared>, headers: HeaderMap, body: Body) -> ApiResult {
    let who = app.auth.authenticate(&headers).await?;
    let bytes = read_body(&app, body).await?;
    let value = parse_json(&bytes)?;
    let call = intake::call_request(&value, &app.numbers).map_err(ApiError::invalid)?;
    let idem = idem_of(&headers, "/v1/calls", &who, &bytes)?;
    let priority = call.priority;
    if priority == Priority::Normal {
        rate_limit(&app, &who).await?;
    }
    let _slot = acquire_slot(&app, priority).await?;

    let call_id = uuid::Uuid::now_v7().to_string();
    let now = chrono::Utc::now();
    let local = now.with_timezone(&app.tz);
    let rules = app.rules.load();
    let query = routing::Query::at(&call.destination, &call.call_type, priority, &local);
    let decided = rules.decide(&query, &mut rand::rng());
    let (route, fallback, fallback_reason) = match decided {
        None if priority == Priority::Normal => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "no-route",
                "No route",
                format!(
                    "no routing rule matches destination {} ({} call)",
                    call.destination, call.call_type
                ),
            )
            .with("field", "destination"));
        }
        // An emergency call is never refused for want of a rule: the call
        // handler gets `route: null` and uses its local emergency trunk.
        None => (
            Value::Null,
            true,
            Some("no rule matches this emergency number".to_owned()),
        ),
        Some((rule, decision)) => match &rule.spec.hook {
            None => (
                serde_json::to_value(&decision).unwrap_or(Value::Null),
                false,
                None,
            ),
            Some(hook) => {
                let request = HookRequest {
                    call_id: &call_id,
                    rule: &rule.name,
                    caller: call.caller.as_deref(),
                    destination: &call.destination,
                    call_type: &call.call_type,
                    priority: priority.as_str(),
                    metadata: &call.metadata,
                    static_decision: &decision,
                };
                let out = app
                    .hooks
                    .decide(hook, &rule, &request, decision.clone(), &app.metrics)
                    .await;
                (
                    serde_json::to_value(&out.decision).unwrap_or(Value::Null),
                    out.fallback.is_some(),
                    out.fallback,
                )
            }
        },
    };
    let created_at = now.timestamp_millis();
    let mut body = json!({
        "call_id": call_id,
        "caller": call.caller,
        "destination": call.destination,
        "call_type": call.call_type,
        "priority": priority.as_str(),
        "route": route,
        "fallback": fallback,
        "route_version": rules.version,
        "created_at": rfc3339(created_at),
    });
    if let Some(reason) = &fallback_reason {
        body["fallback_reason"] = Value::String(reason.clone());
    }
    let decision = json!({"route": route, "fallback": fallback,
                          "fallback_reason": fallback_reason, "route_version": rules.version});
    let response = StoredResponse {
        status: 201,
        content_type: "application/json".into(),
        body: body.to_string(),
    };
    let new = NewCall {
        id: call_id,
        created_at,
        pop: who.pop().to_owned(),
        caller: call.caller,
        destination: call.destination,
        call_type: call.call_type,
        priority: priority.as_str().to_owned(),
        metadata: call.metadata.to_string(),
        decision: decision.to_string(),
    };
    let retention = app.config.idempotency.retention;
    let outcome = match app
        .store
        .create_call(idem.as_ref(), &new, &response, retention)
        .await
    {
        Ok(o) => o,
        // Never refused, not even for want of a database: answered from the
        // rules in memory, written when the database is back (spool.rs).
        Err(StoreError::Unavailable(_)) if priority == Priority::Emergency => {
            return match app.spool.hold(idem, new, response, &app.metrics) {
                Hold::Answer(r) => {
                    let mut resp = stored_response(r, false);
                    resp.headers_mut()
                        .insert(DEFERRED_HEADER, HeaderValue::from_static("true"));
                    Ok(resp)
                }
                Hold::Replay(r) => {
                    let mut resp = stored_response(r, true);
                    resp.headers_mut()
                        .insert(DEFERRED_HEADER, HeaderValue::from_static("true"));
                    Ok(resp)
                }
                Hold::Mismatch => Err(mismatch()),
            };
        }
        Err(e) => {
            app.metrics
                .calls
                .with_label_values(&[priority.as_str(), "db_error"])
                .inc();
            return Err(e.into());
        }
    };
    match outcome {
        Outcome::Done(()) => {
            app.metrics
                .calls
                .with_label_values(&[priority.as_str(), "created"])
                .inc();
            Ok(stored_response(response, false))
        }
        Outcome::Replay(r) => {
            app.metrics
                .calls
                .with_label_values(&[priority.as_str(), "replayed"])
                .inc();
            Ok(stored_response(r, true))
        }
        Outcome::Mismatch => Err(mismatch()),
    }
}

fn call_json(row: &store::CallRow) -> Value {
    let c = &row.call;
    let decision: Value = serde_json::from_str(&c.decision).unwrap_or(Value::Null);
    let metadata: Value = serde_json::from_str(&c.metadata).unwrap_or(Value::Null);
    let f = &row.folded;
    let opt = |v: Option<i64>| v.map_or(Value::Null, rfc3339);
    json!({
        "call_id": c.id,
        "created_at": rfc3339(c.created_at),
        "pop": c.pop,
        "caller": c.caller,
        "destination": c.destination,
        "call_type": c.call_type,
        "priority": c.priority,
        "metadata": metadata,
        "route": decision.get("route").cloned().unwrap_or(Value::Null),
        "fallback": decision.get("fallback").cloned().unwrap_or(Value::Bool(false)),
        "fallback_reason": decision.get("fallback_reason").cloned().unwrap_or(Value::Null),
        "state": f.state,
        "ringing_at": opt(f.ringing_at),
        "answered_at": opt(f.answered_at),
        "ended_at": opt(f.ended_at),
        "duration_seconds": f.duration_ms.map(|d| d as f64 / 1000.0),
        "events": row.events.iter().map(|(k, at)| json!({"event": k.as_str(), "at": rfc3339(*at)})).collect::<Vec<_>>(),
    })
}

fn unknown_call(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown-call",
        "Unknown call",
        format!("no call with id {id:?}"),
    )
}

#[utoipa::path(get, path = "/v1/calls/{id}", tag = "calls", security(("bearer" = [])),
    params(("id" = String, Path, description = "The call id from POST /v1/calls.")),
    responses((status = 200, description = "The call and its events.", body = openapi::CallRecordSchema), openapi::Errors))]
async fn get_call(State(app): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult {
    let who = app.auth.authenticate(&headers).await?;
    if id.len() > 64 {
        return Err(unknown_call(&id));
    }
    match app.store.get_call(&id).await? {
        // A PoP sees its own calls only; another PoP's call is as unknown
        // to it as a call that does not exist.
        Some(row) if may_see(&who, &row.call.pop) => Ok(json_response(StatusCode::OK, &call_json(&row))),
        _ => Err(unknown_call(&id)),
    }
}

/// Whether `who` may read or add to a call made by `pop`.
fn may_see(who: &Principal, pop: &str) -> bool {
    match who {
        Principal::Admin => true,
        Principal::Agent { pop: own } => own == pop,
    }
}

#[utoipa::path(post, path = "/v1/calls/{id}/events", tag = "calls", security(("bearer" = [])),
    params(("id" = String, Path, description = "The call id."),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeats with this key get the first answer.")),
    request_body = openapi::EventRequestSchema,
    responses((status = 200, description = "The call record folded from all its events.", body = openapi::CallRecordSchema), openapi::Errors))]
async fn post_event(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let who = app.auth.authenticate(&headers).await?;
    let bytes = read_body(&app, body).await?;
    let value = parse_json(&bytes)?;
    let (kind, at) = intake::event_request(value, store::now_ms()).map_err(ApiError::invalid)?;
    if id.len() > 64 {
        return Err(unknown_call(&id));
    }
    if let Principal::Agent { .. } = &who
        && !app
            .store
            .call_pop(&id)
            .await?
            .is_some_and(|pop| may_see(&who, &pop))
    {
        return Err(unknown_call(&id));
    }
    let path = format!("/v1/calls/{id}/events");
    let idem = idem_of(&headers, &path, &who, &bytes)?;
    if !emergency_header(&headers) {
        rate_limit(&app, &who).await?;
    }
    let retention = app.config.idempotency.retention;
    let outcome = app
        .store
        .record_event(idem.as_ref(), &id, kind, at, retention, |row| StoredResponse {
            status: 200,
            content_type: "application/json".into(),
            body: call_json(row).to_string(),
        })
        .await?;
    match outcome {
        Outcome::Done(Some(row)) => Ok(json_response(StatusCode::OK, &call_json(&row))),
        Outcome::Done(None) => Err(unknown_call(&id)),
        Outcome::Replay(r) => Ok(stored_response(r, true)),
        Outcome::Mismatch => Err(mismatch()),
    }
}

// ---- routes ----

fn route_json(row: &store::RouteRow) -> Value {
    let mut v: Value = serde_json::from_str(&row.spec).unwrap_or_else(|_| json!({}));
    if let Some(obj) = v.as_object_mut() {
        obj.insert("name".into(), json!(row.name));
        obj.insert("revision".into(), json!(row.revision));
        obj.insert("route_version".into(), json!(row.route_version));
        obj.insert("updated_at".into(), rfc3339(row.updated_at));
        obj.insert("updated_by".into(), json!(row.updated_by));
    }
    v
}

fn actor(headers: &HeaderMap) -> String {
    match headers
        .get("x-detour-actor")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic()))
    {
        Some(name) => format!("admin:{name}"),
        None => "admin".to_owned(),
    }
}

fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(detour_wire::headers::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| s.len() <= 128)
        .map(str::to_owned)
}

#[utoipa::path(get, path = "/v1/routes", tag = "routes", security(("bearer" = [])),
    responses((status = 200, description = "Every route and the route version.", body = openapi::RouteListSchema), openapi::Errors))]
async fn list_routes(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    admin(&app, &headers).await?;
    let (version, rows) = app.store.load_routes().await?;
    let routes: Vec<Value> = rows.iter().map(route_json).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"route_version": version, "routes": routes}),
    ))
}

fn unknown_route(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown-route",
        "Unknown route",
        format!("no route named {name:?}"),
    )
}

#[utoipa::path(get, path = "/v1/routes/{name}", tag = "routes", security(("bearer" = [])),
    params(("name" = String, Path, pattern = "^[A-Za-z0-9._-]{1,64}$", description = "1 to 64 letters, digits, '.', '_' or '-', not dots only.")),
    responses((status = 200, description = "The route.", body = openapi::RouteSchema), openapi::Errors))]
async fn get_route(State(app): State<Shared>, Path(name): Path<String>, headers: HeaderMap) -> ApiResult {
    admin(&app, &headers).await?;
    match app.store.get_route(&name).await? {
        Some(row) => Ok(json_response(StatusCode::OK, &route_json(&row))),
        None => Err(unknown_route(&name)),
    }
}

#[utoipa::path(put, path = "/v1/routes/{name}", tag = "routes", security(("bearer" = [])),
    params(("name" = String, Path, pattern = "^[A-Za-z0-9._-]{1,64}$", description = "1 to 64 letters, digits, '.', '_' or '-', not dots only.")),
    request_body = openapi::RouteSpecSchema,
    responses((status = 200, description = "Replaced.", body = openapi::RouteSchema),
              (status = 201, description = "Created.", body = openapi::RouteSchema), openapi::Errors))]
async fn put_route(
    State(app): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    admin(&app, &headers).await?;
    let bytes = read_body(&app, body).await?;
    let value = parse_json(&bytes)?;
    let spec: RouteSpec = serde_json::from_value(value).map_err(|e| {
        let msg = e.to_string();
        let field = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.contains("field"))
            .unwrap_or("")
            .to_owned();
        ApiError::invalid(vec![FieldError { field, reason: msg }])
    })?;
    spec.compile(&name).map_err(ApiError::invalid)?;
    let text = serde_json::to_string(&spec).unwrap_or_default();
    let (row, created) = app
        .store
        .put_route(
            &name,
            &text,
            &spec.matcher_key(),
            &actor(&headers),
            request_id(&headers).as_deref(),
        )
        .await?;
    // This replica uses the change at once; others within one poll interval.
    if let Err(e) = app.refresh_rules(true).await {
        tracing::warn!(error = %e, "route stored but local reload failed; the poll will retry");
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_response(status, &route_json(&row)))
}

#[utoipa::path(delete, path = "/v1/routes/{name}", tag = "routes", security(("bearer" = [])),
    params(("name" = String, Path, description = "The route's name.")),
    responses((status = 204, description = "Deleted."), openapi::Errors))]
async fn delete_route(State(app): State<Shared>, Path(name): Path<String>, headers: HeaderMap) -> ApiResult {
    admin(&app, &headers).await?;
    match app
        .store
        .delete_route(&name, &actor(&headers), request_id(&headers).as_deref())
        .await?
    {
        Some(_) => {
            if let Err(e) = app.refresh_rules(true).await {
                tracing::warn!(error = %e, "route deleted but local reload failed");
            }
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        None => Err(unknown_route(&name)),
    }
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "routes", security(("bearer" = [])),
    params(("limit" = Option<i64>, Query, description = "Newest entries first; 1 to 1000, default 100.")),
    responses((status = 200, description = "Route changes, newest first.", body = openapi::AuditLogSchema), openapi::Errors))]
async fn audit_log(
    State(app): State<Shared>,
    headers: HeaderMap,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    admin(&app, &headers).await?;
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-query",
            "Bad query string",
            e.body_text(),
        )
    })?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let rows = app.store.audit_log(limit).await?;
    let parse = |s: &Option<String>| {
        s.as_deref()
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
            .unwrap_or(Value::Null)
    };
    let entries: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "at": rfc3339(r.at), "actor": r.actor, "request_id": r.request_id,
                "action": r.action, "name": r.name, "route_version": r.route_version,
                "before": parse(&r.before), "after": parse(&r.after),
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({"entries": entries})))
}

// ---- fleet ----

#[utoipa::path(post, path = "/v1/agents/{pop}/report", tag = "fleet", security(("bearer" = [])),
    params(("pop" = String, Path, example = "blr", description = "The reporting PoP; its token's PoP."),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeats with this key get the first answer.")),
    request_body = detour_wire::AgentReport,
    responses((status = 200, description = "Stored.", body = openapi::ReportStoredSchema), openapi::Errors))]
async fn post_report(
    State(app): State<Shared>,
    Path(pop): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let who = app.auth.authenticate(&headers).await?;
    if let Principal::Agent { pop: mine } = &who
        && *mine != pop
    {
        return Err(forbidden(format!(
            "this token belongs to PoP {mine:?} and cannot report for {pop:?}"
        )));
    }
    let bytes = read_body(&app, body).await?;
    let report: AgentReport = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid(vec![FieldError {
            field: String::new(),
            reason: format!("the body is not an agent report: {e}"),
        }])
    })?;
    if report.pop != pop {
        return Err(ApiError::invalid(vec![FieldError {
            field: "pop".into(),
            reason: format!("is {:?} but the URL says {pop:?}", report.pop),
        }]));
    }
    rate_limit(&app, &who).await?;
    let path = format!("/v1/agents/{pop}/report");
    let idem = idem_of(&headers, &path, &who, &bytes)?;
    let response = StoredResponse {
        status: 200,
        content_type: "application/json".into(),
        body: json!({"status": "stored", "pop": pop}).to_string(),
    };
    let text = serde_json::to_string(&report).unwrap_or_default();
    let retention = app.config.idempotency.retention;
    match app
        .store
        .put_report(idem.as_ref(), &pop, &text, &response, retention)
        .await?
    {
        Outcome::Done(()) => Ok(stored_response(response, false)),
        Outcome::Replay(r) => Ok(stored_response(r, true)),
        Outcome::Mismatch => Err(mismatch()),
    }
}

#[utoipa::path(get, path = "/v1/fleet", tag = "fleet", security(("bearer" = [])),
    responses((status = 200, description = "Every PoP's last report.", body = openapi::FleetSchema), openapi::Errors))]
async fn fleet(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    admin(&app, &headers).await?;
    let now = store::now_ms();
    let rows = app.store.fleet().await?;
    let pops: Vec<Value> = rows
        .iter()
        .map(|(pop, at, report)| {
            json!({
                "pop": pop,
                "received_at": rfc3339(*at),
                "age_seconds": ((now - at).max(0) as f64) / 1000.0,
                "report": serde_json::from_str::<Value>(report).unwrap_or(Value::Null),
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"generated_at": rfc3339(now), "pops": pops}),
    ))
}

// ---- rate limiting ----

/// Token buckets per PoP. State is per replica: N replicas behind a load
/// balancer allow up to N times the configured rate in total.
struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<std::collections::HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    fn new(rps: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rps),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(Default::default()),
        }
    }

    /// Takes one token for `pop`, or says how long until one is available.
    async fn check(&self, pop: &str) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().await;
        let (tokens, last) = buckets.entry(pop.to_owned()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_refills_at_the_configured_rate() {
        let l = RateLimiter::new(10, 5);
        for _ in 0..5 {
            assert!(l.check("blr").await.is_ok());
        }
        let wait = l.check("blr").await.unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(l.check("maa").await.is_ok(), "buckets are per PoP");
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(l.check("blr").await.is_ok());
        assert!(l.check("blr").await.is_ok());
        assert!(l.check("blr").await.is_err());
    }

    #[test]
    fn problems_are_problem_json_with_retry_after() {
        let r = ApiError::from(StoreError::Unavailable("down".into())).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}

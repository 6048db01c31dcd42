//! Calls: `POST /v1/calls` (route a call and store it), `GET /v1/calls/{id}`
//! and `POST /v1/calls/{id}/events` (the call handler's progress reports).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult, mismatch};
use super::shed::{acquire_slot, rate_limit};
use super::{
    App, Shared, emergency_header, idem_of, json_response, parse_json, read_body, rfc3339, stored_response,
};
use crate::auth::Principal;
use crate::hook::HookRequest;
use crate::intake::{self, CallRequest, Priority};
use crate::openapi;
use crate::routing::{self, RuleSet};
use crate::spool::Hold;
use crate::store::{self, Idem, NewCall, Outcome, StoreError, StoredResponse};

/// On an emergency call answered while the database was down: its record is
/// written once the database is back.
pub const DEFERRED_HEADER: &str = "x-detour-deferred";

#[utoipa::path(post, path = "/v1/calls", tag = "calls", security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeats with this key get the first answer.")),
    request_body = openapi::CallRequestSchema,
    responses((status = 201, description = "Routed and stored (or replayed for a repeated key).", body = openapi::CallCreatedSchema), openapi::Errors))]
pub(super) async fn create_call(State(app): State<Shared>, headers: HeaderMap, body: Body) -> ApiResult {
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

    let call_id = call_id_for(idem.as_ref());
    let now = chrono::Utc::now();
    let local = now.with_timezone(&app.tz);
    let rules = app.rules.load();
    let routed = route_call(&app, &rules, &call_id, &call, &local, idem.as_ref()).await?;
    let (new, response) = created(call_id, now.timestamp_millis(), &who, call, routed, rules.version);
    store_call(&app, idem, new, response, priority).await
}

/// The id of a new call. With an Idempotency-Key it is derived from the key
/// and the request's fingerprint, so every attempt of one request gets the
/// same id on every replica: an emergency call answered from memory during a
/// database outage (spool.rs) while another attempt of it was written to the
/// database is stored under the id its caller was given, whichever attempt
/// wins the key. Without a key: a time-ordered random id.
fn call_id_for(idem: Option<&Idem>) -> String {
    match idem {
        Some(idem) => {
            let digest = key_digest(idem);
            let mut bytes = [0u8; 16];
            bytes.copy_from_slice(&digest[..16]);
            uuid::Uuid::new_v8(bytes).to_string()
        }
        None => uuid::Uuid::now_v7().to_string(),
    }
}

/// SHA-256 over the key and its request fingerprint: the seed of a keyed
/// call's id and of its weighted route choice.
fn key_digest(idem: &Idem) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"detour call\0");
    h.update((idem.key.len() as u64).to_be_bytes());
    h.update(idem.key.as_bytes());
    h.update(idem.request_hash.as_bytes());
    h.finalize().into()
}

/// The route a call gets: the matching rule's decision (or its hook's).
struct Routed {
    /// The decision as JSON; `null` when no rule matches an emergency call.
    route: Value,
    fallback: bool,
    fallback_reason: Option<String>,
}

/// Decides the call's route from `rules` (asking the rule's hook, if it has
/// one). A normal call no rule matches is a 422.
async fn route_call(
    app: &App,
    rules: &RuleSet,
    call_id: &str,
    call: &CallRequest,
    local: &chrono::DateTime<chrono_tz::Tz>,
    idem: Option<&Idem>,
) -> Result<Routed, ApiError> {
    let priority = call.priority;
    let query = routing::Query::at(&call.destination, &call.call_type, priority, local);
    // Attempts of one keyed request pick the same weighted trunk, so the
    // answer a caller used and the record stored agree.
    let decided = match idem {
        Some(idem) => rules.decide(&query, &mut StdRng::from_seed(key_digest(idem))),
        None => rules.decide(&query, &mut rand::rng()),
    };
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
                    call_id,
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
    Ok(Routed {
        route,
        fallback,
        fallback_reason,
    })
}

/// The call row to store and the 201 answer (kept for the Idempotency-Key).
fn created(
    call_id: String,
    created_at: i64,
    who: &Principal,
    call: CallRequest,
    routed: Routed,
    route_version: i64,
) -> (NewCall, StoredResponse) {
    let Routed {
        route,
        fallback,
        fallback_reason,
    } = routed;
    let priority = call.priority;
    let mut body = json!({
        "call_id": call_id,
        "caller": call.caller,
        "destination": call.destination,
        "call_type": call.call_type,
        "priority": priority.as_str(),
        "route": route,
        "fallback": fallback,
        "route_version": route_version,
        "created_at": rfc3339(created_at),
    });
    if let Some(reason) = &fallback_reason {
        body["fallback_reason"] = Value::String(reason.clone());
    }
    let decision = json!({"route": route, "fallback": fallback,
                          "fallback_reason": fallback_reason, "route_version": route_version});
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
    (new, response)
}

/// Stores the call with its answer and answers. An emergency call is never
/// refused, not even for want of a database: it is answered from the rules
/// in memory and written when the database is back (spool.rs).
async fn store_call(
    app: &App,
    idem: Option<Idem>,
    mut new: NewCall,
    mut response: StoredResponse,
    priority: Priority,
) -> ApiResult {
    if let Some(earlier) = idem.as_ref().and_then(|i| app.spool.held(i)) {
        return answer_held(earlier);
    }
    let retention = app.config.idempotency.retention;
    let mut result = app
        .store
        .create_call(idem.as_ref(), &new, &response, retention)
        .await;
    if idem.is_some() && matches!(result, Err(StoreError::Conflict(_))) {
        // The id derived from the key is taken: the key was used for a call
        // before and has outlived its retention. A new call gets a new id.
        tracing::warn!(call_id = %new.id, "Idempotency-Key reused after its retention: the call gets a fresh id");
        reid(&mut new, &mut response, uuid::Uuid::now_v7().to_string());
        result = app
            .store
            .create_call(idem.as_ref(), &new, &response, retention)
            .await;
    }
    let outcome = match result {
        Ok(o) => o,
        Err(StoreError::Unavailable(_)) if priority == Priority::Emergency => {
            return answer_held(app.spool.hold(idem, new, response, &app.metrics));
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

/// The answer for an emergency call held in the spool.
fn answer_held(hold: Hold) -> ApiResult {
    match hold {
        Hold::Answer(r) => Ok(deferred(stored_response(r, false))),
        Hold::Replay(r) => Ok(deferred(stored_response(r, true))),
        Hold::Mismatch => Err(mismatch()),
    }
}

/// Gives a call, and the answer that names it, another id.
fn reid(call: &mut NewCall, response: &mut StoredResponse, id: String) {
    if let Ok(mut body) = serde_json::from_str::<Value>(&response.body) {
        body["call_id"] = Value::String(id.clone());
        response.body = body.to_string();
    }
    call.id = id;
}

/// Marks an answer whose call record is written later.
fn deferred(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(DEFERRED_HEADER, HeaderValue::from_static("true"));
    resp
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
        "recordings": row.recordings.iter().map(recording_json).collect::<Vec<_>>(),
    })
}

fn recording_json(r: &crate::intake::Recording) -> Value {
    json!({
        "bucket": r.bucket,
        "key": r.key,
        "size": r.size,
        "sha256": r.sha256,
        "duration_seconds": r.duration_ms.map(|d| d as f64 / 1000.0),
        "content_type": r.content_type,
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
pub(super) async fn get_call(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
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

/// An agent may add to its own PoP's calls only; any other call, and one
/// that does not exist, is the same 404 (ids cannot be probed).
async fn check_call_access(app: &App, who: &Principal, id: &str) -> Result<(), ApiError> {
    if id.len() > 64 {
        return Err(unknown_call(id));
    }
    if let Principal::Agent { .. } = who
        && !app
            .store
            .call_pop(id)
            .await?
            .is_some_and(|pop| may_see(who, &pop))
    {
        return Err(unknown_call(id));
    }
    Ok(())
}

/// Whether `who` may read or add to a call made by `pop`.
fn may_see(who: &Principal, pop: &str) -> bool {
    match who {
        Principal::Admin => true,
        Principal::Agent { pop: own } => own == pop,
        // Never reached: `authenticate` refuses operator tokens.
        Principal::Operator { .. } => false,
    }
}

#[utoipa::path(post, path = "/v1/calls/{id}/events", tag = "calls", security(("bearer" = [])),
    params(("id" = String, Path, description = "The call id."),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeats with this key get the first answer.")),
    request_body = openapi::EventRequestSchema,
    responses((status = 200, description = "The call record folded from all its events.", body = openapi::CallRecordSchema), openapi::Errors))]
pub(super) async fn post_event(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let who = app.auth.authenticate(&headers).await?;
    let bytes = read_body(&app, body).await?;
    let value = parse_json(&bytes)?;
    let (kind, at) = intake::event_request(value, store::now_ms()).map_err(ApiError::invalid)?;
    check_call_access(&app, &who, &id).await?;
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

#[utoipa::path(post, path = "/v1/calls/{id}/recordings", tag = "calls", security(("bearer" = [])),
    params(("id" = String, Path, description = "The call id."),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeats with this key get the first answer.")),
    request_body = openapi::RecordingRequestSchema,
    responses((status = 200, description = "The call record with all its recordings. Recording the same object again changes nothing.", body = openapi::CallRecordSchema),
              (status = 409, description = "Another object (size or checksum) is recorded under this key.", body = openapi::ProblemSchema, content_type = "application/problem+json"),
              openapi::Errors))]
pub(super) async fn post_recording(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let who = app.auth.authenticate(&headers).await?;
    let bytes = read_body(&app, body).await?;
    let value = parse_json(&bytes)?;
    let rec = intake::recording_request(value).map_err(ApiError::invalid)?;
    check_call_access(&app, &who, &id).await?;
    let path = format!("/v1/calls/{id}/recordings");
    let idem = idem_of(&headers, &path, &who, &bytes)?;
    rate_limit(&app, &who).await?;
    let retention = app.config.idempotency.retention;
    let outcome = app
        .store
        .record_recording(idem.as_ref(), &id, &rec, retention, |row| StoredResponse {
            status: 200,
            content_type: "application/json".into(),
            body: call_json(row).to_string(),
        })
        .await?;
    match outcome {
        Outcome::Done(store::Recorded::Stored(row)) => Ok(json_response(StatusCode::OK, &call_json(&row))),
        Outcome::Done(store::Recorded::NoCall) => Err(unknown_call(&id)),
        Outcome::Done(store::Recorded::Conflict(other)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "recording-conflict",
            "Another recording under this key",
            format!(
                "s3://{}/{} is already recorded for this call with {} bytes and SHA-256 {}",
                other.bucket, other.key, other.size, other.sha256
            ),
        )),
        Outcome::Replay(r) => Ok(stored_response(r, true)),
        Outcome::Mismatch => Err(mismatch()),
    }
}

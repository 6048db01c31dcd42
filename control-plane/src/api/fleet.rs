//! Fleet: `POST /v1/agents/{pop}/report` (an agent's report of its paths,
//! latest per PoP) and `GET /v1/fleet` (every PoP's last report, admin only).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use detour_wire::AgentReport;
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult, forbidden, mismatch};
use super::shed::rate_limit;
use super::{Shared, admin, idem_of, json_response, read_body, rfc3339, stored_response};
use crate::auth::Principal;
use crate::intake::FieldError;
use crate::openapi;
use crate::store::{self, Outcome, StoredResponse};

#[utoipa::path(post, path = "/v1/agents/{pop}/report", tag = "fleet", security(("bearer" = [])),
    params(("pop" = String, Path, example = "blr", description = "The reporting PoP; its token's PoP."),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeats with this key get the first answer.")),
    request_body = detour_wire::AgentReport,
    responses((status = 200, description = "Stored.", body = openapi::ReportStoredSchema), openapi::Errors))]
pub(super) async fn post_report(
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
pub(super) async fn fleet(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
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

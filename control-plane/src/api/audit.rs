//! Audit: `GET /v1/audit`, the route changes, newest first (admin only).

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult};
use super::{Shared, admin, json_response, rfc3339};
use crate::openapi;

#[derive(Deserialize)]
pub(super) struct AuditQuery {
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "routes", security(("bearer" = [])),
    params(("limit" = Option<i64>, Query, description = "Newest entries first; 1 to 1000, default 100.")),
    responses((status = 200, description = "Route changes, newest first.", body = openapi::AuditLogSchema), openapi::Errors))]
pub(super) async fn audit_log(
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

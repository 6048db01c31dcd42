//! Routes: the admin's `/v1/routes` (list) and `/v1/routes/{name}` (read,
//! create or replace, delete). A change is audited in the store and used by
//! this replica at once, by the others within one poll interval.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult};
use super::{Shared, admin, json_response, parse_json, read_body, rfc3339};
use crate::intake::FieldError;
use crate::openapi;
use crate::routing::RouteSpec;
use crate::store;

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

/// Who the audit entry names: `admin`, or `admin:<X-Detour-Actor>`.
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
pub(super) async fn list_routes(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
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
pub(super) async fn get_route(
    State(app): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
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
pub(super) async fn put_route(
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
pub(super) async fn delete_route(
    State(app): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
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

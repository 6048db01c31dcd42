//! Health: `/healthz` (the process is up), `/readyz` (the database answers
//! and is migrated) and `/metrics`. None of them needs a token.

use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::ApiError;
use super::{Shared, json_response};
use crate::openapi;

#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is up (no database check).", body = String, content_type = "text/plain")))]
pub(super) async fn healthz() -> Response {
    // Agents probe this through every path twice a second: no database, no auth.
    ([(header::CONTENT_TYPE, "text/plain")], "ok\n").into_response()
}

#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Migrated and the database answers.", body = openapi::ReadySchema),
              (status = 503, description = "The database does not answer, or the replica is shutting down.", body = openapi::ProblemSchema, content_type = "application/problem+json")))]
pub(super) async fn readyz(State(app): State<Shared>) -> Response {
    if app.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        let why = "shutting down: this replica takes no new traffic (shutdown.grace)";
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready", why).into_response();
    }
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
pub(super) async fn metrics(State(app): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

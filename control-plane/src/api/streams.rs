//! Streams: `GET /v1/streams/echo`, a WebSocket that sends every message
//! back, for checking that streams are carried (through agents, peers and
//! their cuts) end to end. Any agent or admin token may open one.

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use std::time::Duration;

use super::Shared;
use super::error::{ApiError, ApiResult};
use crate::openapi;

#[utoipa::path(get, path = "/v1/streams/echo", tag = "streams", security(("bearer" = [])),
    description = "A WebSocket (HTTP/1.1 `Upgrade: websocket`) that answers every text or binary message with the same message. Closed after `limits.idle_timeout` without a message.",
    responses((status = 101, description = "Switched to the WebSocket protocol."),
              (status = 426, description = "Not a WebSocket handshake.", body = openapi::ProblemSchema, content_type = "application/problem+json"),
              openapi::Errors))]
pub(super) async fn echo(
    State(app): State<Shared>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult {
    app.auth.authenticate(&headers).await?;
    let ws = ws.map_err(|e| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade-required",
            "WebSocket handshake required",
            format!("this endpoint is a WebSocket: {e}"),
        )
    })?;
    let idle = app.config.limits.idle_timeout;
    Ok(ws.on_upgrade(move |socket| echo_loop(socket, idle)))
}

/// Sends each message back until the client closes, the connection breaks,
/// or nothing arrives for `idle`.
async fn echo_loop(mut socket: WebSocket, idle: Duration) {
    loop {
        let msg = match tokio::time::timeout(idle, socket.recv()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "echo stream broke");
                return;
            }
            Ok(None) => return,
            Err(_) => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        };
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                if socket.send(msg).await.is_err() {
                    return;
                }
            }
            // Pings are answered by the protocol layer; a close ends it.
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Close(_) => return,
        }
    }
}

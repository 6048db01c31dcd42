//! Ingress of an upgrade request (a WebSocket handshake): its checks, its
//! headers (those of any request, with the upgrade kept) and the answer to
//! the call handler. The stream itself is [`crate::streams`]'s.

use bytes::Bytes;
use detour_wire::Problem;
use http::header::HeaderValue;
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use tokio::time::Instant;

use super::{Body, Carrier, Ingress, full, names, no_path, problem, strip_hop_by_hop, upstream_headers};
use crate::config::AgentConfig;
use crate::streams::{self, Handshake, Opened, Slot};

impl Ingress {
    /// Carries an upgrade request (`Connection: upgrade` + `Upgrade`) to the
    /// control plane and answers the call handler: its `101` as it is (the
    /// stream then runs), any other answer as for a plain request, or a
    /// problem. Returns the answer and the path that carried it.
    pub(super) async fn upgrade(
        &self,
        mut parts: http::request::Parts,
        pin: Option<String>,
        path_and_query: http::uri::PathAndQuery,
        received: Instant,
        id: &HeaderValue,
        config: &AgentConfig,
    ) -> (Response<Body>, Carrier) {
        let rejected = |resp| (resp, Carrier::None);
        let request_id = id.to_str().unwrap_or_default();
        if let Err(p) = streams::admit(&parts.headers) {
            return rejected(problem(p));
        }
        let Some(client) = parts.extensions.remove::<OnUpgrade>() else {
            return rejected(problem(Problem::new(
                400,
                "Upgrade not possible",
                "this connection cannot switch protocols; send the handshake over HTTP/1.1",
            )));
        };
        let slot = parts.extensions.remove::<Slot>();
        let headers = upstream_headers(
            parts.headers.clone(),
            &parts.method,
            &Bytes::new(),
            &config.control_plane,
            id,
        );
        let hs = Handshake {
            method: parts.method,
            path_and_query,
            headers: streams::with_upgrade(headers, &parts.headers),
            pin,
            received,
            request_id: request_id.to_owned(),
        };
        match self.streams.open(hs, client, slot).await {
            Ok(Opened::Switched { head, path }) => {
                // The control plane's 101 as it is: its Connection, Upgrade
                // and Sec-WebSocket-* headers are the handshake's answer.
                let mut resp = Response::from_parts(head, full(Bytes::new()));
                *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                if let Ok(v) = HeaderValue::from_str(&path) {
                    resp.headers_mut().insert(names::PATH, v);
                }
                (resp, Carrier::Named(path))
            }
            Ok(Opened::Answered { response, path }) => {
                let (mut rparts, rbody) = response.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                if let Ok(v) = HeaderValue::from_str(&path) {
                    rparts.headers.insert(names::PATH, v);
                }
                (
                    Response::from_parts(rparts, Body::Answer(rbody)),
                    Carrier::Named(path),
                )
            }
            Err(failure) => rejected(no_path(failure, request_id, config.forward.deadline)),
        }
    }
}

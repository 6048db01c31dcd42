//! One attempt on one path: the request as that path sends it, and what a
//! failed attempt says (its [`FailureKind`] and a message for people).

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;

use super::Outbound;
use crate::health::FailureKind;
use crate::paths::{PathClient, PoolError};

/// An attempt's id and what it came to.
pub(super) type AttemptResult = (u64, Result<Response<Incoming>, (FailureKind, String)>);

pub(super) fn build_request(path: &PathClient, out: &Outbound) -> Request<Full<Bytes>> {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(path.scheme.clone());
    uri.authority = path.authority.clone();
    uri.path_and_query = Some(if path.base_path.is_empty() {
        out.path_and_query.clone()
    } else {
        // A valid URL path before a valid path and query is valid.
        format!("{}{}", path.base_path, out.path_and_query)
            .parse()
            .unwrap_or_else(|_| out.path_and_query.clone())
    });
    let mut req = Request::new(Full::new(out.body.clone()));
    *req.method_mut() = out.method.clone();
    *req.uri_mut() = http::Uri::from_parts(uri).unwrap_or_default();
    *req.headers_mut() = out.headers.clone();
    match &path.host_value {
        Some(host) => req.headers_mut().insert(http::header::HOST, host.clone()),
        None => req.headers_mut().remove(http::header::HOST),
    };
    req
}

pub(super) async fn run_attempt(id: u64, path: Arc<PathClient>, req: Request<Full<Bytes>>) -> AttemptResult {
    let result = match path.client().request(req).await {
        Ok(resp) => Ok(resp),
        Err(e) => Err(classify(&e)),
    };
    (id, result)
}

/// Turns a path's error into a failure kind and a message a person can read.
pub fn classify(e: &PoolError) -> (FailureKind, String) {
    match e {
        PoolError::Dial(d) => {
            let kind = if matches!(d, crate::paths::DialError::Timeout { .. }) {
                FailureKind::Timeout
            } else {
                FailureKind::Connect
            };
            (kind, d.to_string())
        }
        PoolError::Http(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            if refused_by_far_end(e) {
                (FailureKind::Refused, msg)
            } else {
                (FailureKind::Broken, msg)
            }
        }
    }
}

/// Whether the control plane's HTTP/2 side refused this stream or closed the
/// connection with a GOAWAY: it answered at the protocol level, so the bytes
/// got through and the path is not to blame.
fn refused_by_far_end(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_remote() && (h2.is_go_away() || h2.is_reset());
        }
        cur = err.source();
    }
    false
}

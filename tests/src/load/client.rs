//! One call handler's HTTP client: a keep-alive client with a timeout, the
//! request it sends ([`Call`]) and what it saw ([`CallResult`]).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

/// The small JSON call initiation the benchmarks send (`POST /v1/calls`).
pub const SMALL_CALL: &str = r#"{"caller":"+919876543210","destination":"08041234567"}"#;

/// What one request saw.
#[derive(Debug, Clone)]
pub struct CallResult {
    /// When it was sent, from the start of the run.
    pub at: Duration,
    pub latency: Duration,
    pub status: Option<u16>,
    /// `X-Detour-Path` of the answer.
    pub path: Option<String>,
    pub error: Option<String>,
    pub body: Bytes,
}

impl CallResult {
    /// A call handler counts this request as done.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.status.is_some_and(|s| s < 500)
    }
}

/// A keep-alive HTTP/1.1 client like a call handler's.
#[derive(Clone)]
pub struct CallClient {
    client: Client<HttpConnector, Full<Bytes>>,
    pub timeout: Duration,
}

impl Default for CallClient {
    fn default() -> Self {
        Self::new(Duration::from_secs(2))
    }
}

impl CallClient {
    pub fn new(timeout: Duration) -> CallClient {
        Self::build(timeout, true)
    }

    /// A client that never sends a request twice: hyper's client otherwise
    /// re-sends, on a new connection, a request whose pooled connection was
    /// found closed before it was written. A server that closes a kept-alive
    /// connection under such a client fails the request.
    pub fn strict(timeout: Duration) -> CallClient {
        Self::build(timeout, false)
    }

    fn build(timeout: Duration, retry_canceled: bool) -> CallClient {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(512)
            .retry_canceled_requests(retry_canceled)
            .build(http);
        CallClient { client, timeout }
    }

    /// Sends one request to `url` and reads the whole answer.
    pub async fn send(&self, method: Method, url: &str, headers: &[(&str, &str)], body: Bytes) -> CallResult {
        let started = Instant::now();
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = match url.parse() {
            Ok(u) => u,
            Err(e) => {
                return CallResult {
                    at: Duration::ZERO,
                    latency: Duration::ZERO,
                    status: None,
                    path: None,
                    error: Some(e.to_string()),
                    body: Bytes::new(),
                };
            }
        };
        for (k, v) in headers {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                req.headers_mut().append(k, v);
            }
        }
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| format!("{e:?}"))?;
            let status = resp.status().as_u16();
            let path = resp
                .headers()
                .get("x-detour-path")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, path, body))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok((status, path, body))) => CallResult {
                at: Duration::ZERO,
                latency: started.elapsed(),
                status: Some(status),
                path,
                error: None,
                body,
            },
            Ok(Err(e)) => CallResult {
                at: Duration::ZERO,
                latency: started.elapsed(),
                status: None,
                path: None,
                error: Some(e),
                body: Bytes::new(),
            },
            Err(_) => CallResult {
                at: Duration::ZERO,
                latency: started.elapsed(),
                status: None,
                path: None,
                error: Some(format!("client timeout after {:?}", self.timeout)),
                body: Bytes::new(),
            },
        }
    }
}

/// One request of a load run.
#[derive(Clone)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Call {
    /// The headers as borrowed pairs, as [`CallClient::send`] takes them.
    pub fn headers_ref(&self) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    pub fn post(path: &str, body: &str) -> Call {
        Call {
            method: Method::POST,
            path: path.to_owned(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body.to_owned()),
        }
    }
}

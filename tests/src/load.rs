//! A call handler's traffic: requests at a steady rate with a client
//! timeout, every result recorded. Bounded in count and time.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

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
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(512)
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

/// Sends `make(n)` at `rate` per second for `duration` (so `rate x duration`
/// requests, each on its own task) and returns every result in send order.
pub async fn steady(
    client: &CallClient,
    base: &str,
    rate: u32,
    duration: Duration,
    make: impl Fn(u64) -> Call,
) -> Vec<CallResult> {
    let runs = paced(rate, duration, |n| {
        let call = make(n);
        let client = client.clone();
        let url = format!("{base}{}", call.path);
        async move {
            let headers = call.headers_ref();
            client
                .send(call.method.clone(), &url, &headers, call.body.clone())
                .await
        }
    })
    .await;
    runs.into_iter()
        .map(|(at, mut r)| {
            r.at = at;
            r
        })
        .collect()
}

/// A call handler that retries: each call carries its own Idempotency-Key
/// and, when it is not answered (no response, or a 5xx), is sent again with
/// the same key every `pause` until it is answered or `give_up_after` has
/// passed. Returns the last result and every failure before it, as
/// `"<status> <body>"` or the client error.
pub async fn call_with_retries(
    client: &CallClient,
    url: &str,
    call: &Call,
    key: &str,
    give_up_after: Duration,
    pause: Duration,
) -> (CallResult, Vec<String>) {
    let start = Instant::now();
    let mut failures = Vec::new();
    let mut headers = call.headers_ref();
    headers.push(("idempotency-key", key));
    loop {
        let r = client
            .send(call.method.clone(), url, &headers, call.body.clone())
            .await;
        let answered = r.error.is_none() && r.status.is_some_and(|s| s < 500);
        if answered || start.elapsed() + pause > give_up_after {
            return (r, failures);
        }
        failures.push(match r.status {
            Some(s) => format!("{s} {}", String::from_utf8_lossy(&r.body)),
            None => r.error.unwrap_or_default(),
        });
        tokio::time::sleep(pause).await;
    }
}

/// Starts `start(n)` for n in `0..rate x duration`, one every `1/rate`
/// seconds, each on its own task; returns (when it started, its output) in
/// start order. Bounded: the count is fixed before the first request.
pub async fn paced<T, F, Fut>(rate: u32, duration: Duration, mut start: F) -> Vec<(Duration, T)>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let count = (f64::from(rate) * duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let begin = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for n in 0..count {
        tokio::time::sleep_until(begin + period.mul_f64(n as f64)).await;
        let fut = start(n);
        let at = begin.elapsed();
        set.spawn(async move { (n, at, fut.await) });
    }
    let mut out = Vec::with_capacity(count as usize);
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out.sort_by_key(|(n, _, _)| *n);
    out.into_iter().map(|(_, at, t)| (at, t)).collect()
}

/// The `q` quantile of latencies.
pub fn quantile(results: &[CallResult], q: f64) -> Duration {
    let mut v: Vec<Duration> = results.iter().map(|r| r.latency).collect();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

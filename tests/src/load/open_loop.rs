//! Open-loop load: requests started on a fixed schedule whatever the answers
//! do, as a call handler's traffic arrives. Every run is bounded: the count is
//! `rate x duration`, fixed before the first request.

use std::time::Duration;

use tokio::time::Instant;

use super::client::{Call, CallClient, CallResult, SMALL_CALL};

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

/// The small call-initiation POST of the benchmarks at `rate` per second
/// for `dur` against `url`, with `headers` added and a 2 s client timeout.
/// Returns every result and how many failed.
pub async fn fixed_rate(
    url: &str,
    headers: &[(&str, &str)],
    rate: u32,
    dur: Duration,
) -> (Vec<CallResult>, usize) {
    let client = CallClient::new(Duration::from_secs(2));
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let results = steady(&client, url, rate, dur, |_| {
        let mut c = Call::post("/v1/calls", SMALL_CALL);
        c.headers.extend(headers.iter().cloned());
        c
    })
    .await;
    let failed = results.iter().filter(|r| !r.ok()).count();
    (results, failed)
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
        if r.ok() || start.elapsed() + pause > give_up_after {
            return (r, failures);
        }
        failures.push(match r.status {
            Some(s) => format!("{s} {}", String::from_utf8_lossy(&r.body)),
            None => r.error.unwrap_or_default(),
        });
        tokio::time::sleep(pause).await;
    }
}

/// What one retried call ended with: its last result and the failures
/// before it (see [`call_with_retries`]), by when it was first sent.
pub type Retried = (Duration, (CallResult, Vec<String>));

/// `make(n)` at `rate` per second for `duration`, each call retried every
/// 200 ms with its own Idempotency-Key (`load-<run>-<n>`) for up to
/// `give_up`: `detour-lab load --retry-for`.
pub async fn retrying(
    client: &CallClient,
    base: &str,
    rate: u32,
    duration: Duration,
    give_up: Duration,
    make: impl Fn(u64) -> Call,
) -> Vec<Retried> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    paced(rate, duration, |n| {
        let call = make(n);
        let client = client.clone();
        let url = format!("{base}{}", call.path);
        let key = format!("load-{}-{n}", &run[..12]);
        async move { call_with_retries(&client, &url, &call, &key, give_up, Duration::from_millis(200)).await }
    })
    .await
}

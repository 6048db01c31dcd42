//! Closed-loop load: keep-alive connections that each send the next request
//! as soon as the last is answered, for throughput.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::client::SMALL_CALL;
use super::latency::histogram;

/// Closed loop: `conns` keep-alive connections each sending one request after
/// another for `dur`. Returns (requests/s, latency histogram in µs, errors).
pub async fn closed_loop(
    target: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    conns: usize,
    dur: Duration,
) -> anyhow::Result<(f64, Histogram<u64>, u64)> {
    let deadline = Instant::now() + dur;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let path = path.to_owned();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        set.spawn(one_connection(target, path, headers, deadline));
    }
    let mut total = histogram();
    let mut errors = 0;
    while let Some(r) = set.join_next().await {
        let (h, e) = r?;
        total.add(&h)?;
        errors += e;
    }
    Ok((total.len() as f64 / dur.as_secs_f64(), total, errors))
}

/// One connection of [`closed_loop`] until `deadline`: the latencies of its
/// answered requests and how many failed. A connection that breaks stops.
async fn one_connection(
    target: SocketAddr,
    path: String,
    headers: Vec<(String, String)>,
    deadline: Instant,
) -> (Histogram<u64>, u64) {
    let mut hist = histogram();
    let mut errors = 0u64;
    let Ok(stream) = TcpStream::connect(target).await else {
        return (hist, 1u64);
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut send, conn)) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(stream)).await
    else {
        return (hist, 1);
    };
    tokio::spawn(conn);
    while Instant::now() < deadline {
        let mut req = http::Request::post(path.as_str())
            .header("host", target.to_string())
            .header("content-type", "application/json");
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let Ok(req) = req.body(Full::new(Bytes::from_static(SMALL_CALL.as_bytes()))) else {
            break;
        };
        if send.ready().await.is_err() {
            errors += 1;
            break;
        }
        let started = Instant::now();
        match send.send_request(req).await {
            Ok(resp) => {
                let ok = resp.status().is_success();
                let _ = resp.into_body().collect().await;
                if ok {
                    let _ = hist.record(started.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            Err(_) => {
                errors += 1;
                break;
            }
        }
    }
    (hist, errors)
}

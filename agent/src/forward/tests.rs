use bytes::Bytes;
use http_body_util::Full;

use super::*;
use crate::health::FailureKind;
use crate::paths::PoolError;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// An HTTP/2 server on loopback that refuses every stream with an
/// RST_STREAM carrying `reason`.
async fn refusing_server(reason: h2::Reason) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = h2::server::handshake(tcp).await.unwrap();
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            respond.send_reset(reason);
        }
    });
    addr
}

#[tokio::test]
async fn a_refusal_by_the_control_plane_is_not_a_broken_path() {
    for reason in [h2::Reason::REFUSED_STREAM, h2::Reason::ENHANCE_YOUR_CALM] {
        let addr = refusing_server(reason).await;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = format!("http://{addr}/v1/x").parse().unwrap();
        let err = tx.send_request(req).await.expect_err("refused");
        let (kind, msg) = classify(&PoolError::Http(err));
        assert_eq!(kind, FailureKind::Refused, "{reason:?}: {msg}");
    }
    // A connection that cannot be made stays a connect failure.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let path = crate::paths::pool::tests::direct_path(addr, "127.0.0.1", None);
    let mut req = http::Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = format!("http://{addr}/").parse().unwrap();
    let err = path.client().request(req).await.expect_err("nothing listens");
    assert_eq!(classify(&err).0, FailureKind::Connect, "{err}");
}

#[test]
fn each_attempt_carries_its_own_paths_host_or_none() {
    use http::header::{HOST, HeaderValue};
    let addr = "127.0.0.1:9".parse().unwrap();
    let mut path = crate::paths::pool::tests::direct_path(addr, "127.0.0.1", None);
    let mut headers = HeaderMap::new();
    headers.insert(HOST, HeaderValue::from_static("cp-first.example"));
    headers.insert("x-other", HeaderValue::from_static("1"));
    let out = Outbound {
        method: Method::POST,
        path_and_query: "/v1/calls".parse().unwrap(),
        headers,
        body: Bytes::from_static(b"{}"),
        emergency: false,
        pin: None,
        received: Instant::now(),
    };
    // A path with no `Host` of its own sends none, not the first endpoint's.
    let req = attempt::build_request(&path, &out);
    assert!(req.headers().get(HOST).is_none());
    assert_eq!(req.headers()["x-other"], "1");
    // A path with one replaces it: one value, its own.
    path.host_value = Some(HeaderValue::from_static("cp-second.example:8443"));
    let req = attempt::build_request(&path, &out);
    let hosts: Vec<_> = req.headers().get_all(HOST).iter().collect();
    assert_eq!(hosts, ["cp-second.example:8443"]);
    // The request's own headers, which the next attempt copies, are as they were.
    assert_eq!(out.headers[HOST], "cp-first.example");
}

#[test]
fn a_request_shares_the_ranking_until_it_puts_a_path_back() {
    let snapshot = Arc::new(Snapshot {
        paths: Vec::new(),
        ranked: vec![2, 0, 1],
    });
    let mut c = Candidates::Ranked(snapshot.clone());
    assert_eq!(&*c, [2, 0, 1]);
    c.insert(1, 2);
    assert_eq!(&*c, [2, 2, 0, 1]);
    assert!(matches!(c, Candidates::Own(_)));
    assert_eq!(snapshot.ranked, [2, 0, 1], "the shared ranking is not changed");
    c.insert(4, 0);
    assert_eq!(&*c, [2, 2, 0, 1, 0]);
}

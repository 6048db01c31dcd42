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

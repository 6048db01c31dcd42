//! The pool against a plain HTTP/1.1 server on loopback that counts its
//! connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::TRIM_EVERY;
use crate::paths::{PathClient, Route, Target};

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    open: AtomicUsize,
}

/// Listens on loopback and runs `conn` for every connection accepted,
/// counting them.
async fn listen<F, Fut>(conn: F) -> (SocketAddr, Arc<Counts>, tokio::task::JoinHandle<()>)
where
    F: Fn(tokio::net::TcpStream, Arc<Counts>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            c.accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(conn(tcp, c.clone()));
        }
    });
    (addr, counts, task)
}

/// Answers every request after `delay`, on keep-alive connections.
async fn server(delay: Duration) -> (SocketAddr, Arc<Counts>) {
    let (addr, counts, _) = listen(move |tcp, c| async move {
        c.open.fetch_add(1, Ordering::SeqCst);
        let service = hyper::service::service_fn(move |_req| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), service)
            .await;
        c.open.fetch_sub(1, Ordering::SeqCst);
    })
    .await;
    (addr, counts)
}

/// A `direct` path to `host` at `addr`, over TLS trusting `ca` when given.
pub(crate) fn direct_path(
    addr: SocketAddr,
    host: &str,
    ca: Option<rustls::pki_types::CertificateDer<'static>>,
) -> PathClient {
    let target = Target {
        host: host.into(),
        port: addr.port(),
        addresses: vec![addr],
        tls: ca.is_some(),
    };
    let tls = crate::tls::control_plane_client_config(ca.as_slice()).unwrap();
    PathClient::new(
        "direct",
        Route::Direct,
        &target,
        Duration::from_secs(2),
        tls,
        None,
    )
}

fn path(addr: SocketAddr) -> PathClient {
    direct_path(addr, "127.0.0.1", None)
}

async fn get(p: &PathClient) -> Bytes {
    let mut req = http::Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = format!("{}/x", p.origin).parse().unwrap();
    let resp = p.client().request(req).await.expect("answered");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap().to_bytes()
}

/// Waits (at most 2 s) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(2);
    while !f() {
        assert!(Instant::now() < until, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn requests_one_after_another_share_one_connection() {
    let (addr, counts) = server(Duration::ZERO).await;
    let p = path(addr);
    for _ in 0..20 {
        assert_eq!(get(&p).await, "ok");
    }
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(p.client().open(), 1);
}

#[tokio::test]
async fn a_burst_opens_what_it_needs_and_idle_ones_beyond_later_needs_are_closed() {
    let (addr, counts) = server(Duration::from_millis(100)).await;
    let p = path(addr);
    let burst: Vec<_> = (0..8).map(|_| get(&p)).collect();
    futures_util::future::join_all(burst).await;
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 8);
    assert_eq!(p.client().open(), 8);
    // Steady traffic, one request at a time, reuses them and needs one.
    for _ in 0..3 {
        get(&p).await;
    }
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 8, "reused, none opened");
    // Each period closes half of those that were never needed in it (the
    // first period held the burst, which needed them all), the newest kept;
    // never all of them.
    let mut open = vec![p.client().open()];
    let mut now = Instant::now();
    for _ in 0..5 {
        now += TRIM_EVERY;
        p.client().tidy_at(now);
        open.push(p.client().open());
        get(&p).await;
    }
    assert_eq!(open, [8, 8, 4, 2, 1, 1], "open connections after each period");
    eventually("the server sees them closed", || {
        counts.open.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 8);
}

/// Answers one request per connection as if keeping it alive, then closes
/// it shortly after (a restart, an idle timeout shorter than ours).
async fn closing_server() -> (SocketAddr, Arc<Counts>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, counts, _) = listen(|mut tcp, _| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tcp
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    })
    .await;
    (addr, counts)
}

#[tokio::test]
async fn a_connection_the_server_closed_is_not_used_again() {
    let (addr, counts) = closing_server().await;
    let p = path(addr);
    for i in 1..=5 {
        assert_eq!(get(&p).await, "ok");
        eventually("the server's close is seen", || p.client().open() == 0).await;
        assert_eq!(counts.accepted.load(Ordering::SeqCst), i);
    }
}

#[tokio::test]
async fn a_retired_pool_closes_idle_connections_at_once_and_busy_ones_after_their_answer() {
    let (addr, counts) = server(Duration::from_millis(300)).await;
    let p = Arc::new(path(addr));
    // Two connections: one idle, one busy when the pool retires.
    futures_util::future::join(get(&p), get(&p)).await;
    assert_eq!(counts.open.load(Ordering::SeqCst), 2);
    let busy = tokio::spawn({
        let p = p.clone();
        async move { get(&p).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    p.client().retire(99);
    eventually("the idle one closes at once", || {
        counts.open.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(busy.await.unwrap(), "ok", "the busy one finished its answer");
    eventually("then it closes too", || counts.open.load(Ordering::SeqCst) == 0).await;
    assert_eq!(p.client().open(), 0);
}

/// An HTTPS server for "localhost" that speaks HTTP/2 (ALPN), answering
/// every request after `delay`; with the CA's certificate for the client.
async fn h2_server(
    delay: Duration,
) -> (
    SocketAddr,
    Arc<Counts>,
    rustls::pki_types::CertificateDer<'static>,
    tokio::task::JoinHandle<()>,
) {
    use rustls::pki_types::pem::PemObject;
    let now = time::OffsetDateTime::now_utc();
    let (ca, ca_key) = crate::pki::new_ca("test CA", now - time::Duration::hours(1), 1).unwrap();
    let (cert, key) = crate::pki::issue_pem(
        &ca,
        &ca_key,
        "localhost",
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
    .unwrap();
    let chain = vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let mut cfg =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let (addr, counts, task) = listen(move |tcp, _| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |_req| async move {
                tokio::time::sleep(delay).await;
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        }
    })
    .await;
    let ca = rustls::pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap();
    (addr, counts, ca, task)
}

fn h2_path(addr: SocketAddr, ca: rustls::pki_types::CertificateDer<'static>) -> PathClient {
    direct_path(addr, "localhost", Some(ca))
}

#[tokio::test]
async fn over_http2_every_request_shares_one_connection_and_a_burst_waits_for_the_one_being_dialed() {
    let (addr, counts, ca, _server) = h2_server(Duration::from_millis(50)).await;
    let p = h2_path(addr, ca);
    // The first request learns that the target speaks HTTP/2.
    assert_eq!(get(&p).await, "ok");
    let burst: Vec<_> = (0..20).map(|_| get(&p)).collect();
    futures_util::future::join_all(burst).await;
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        1,
        "one connection for all"
    );
    // With the connection gone (a relay drained), a burst dials one, not 20.
    p.client().retire(99);
    let burst: Vec<_> = (0..20).map(|_| get(&p)).collect();
    futures_util::future::join_all(burst).await;
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        2,
        "one more connection for the burst"
    );
    assert_eq!(p.client().open(), 1);
}

/// A request's future is moved (copied) several times on its way into a
/// task: setting up a connection, a large future, is boxed so that it is not
/// part of every request's. At 8 KB, copying it took 40% of the agent's
/// instructions per request (tests/instructions).
#[tokio::test]
async fn a_requests_future_stays_small() {
    let (addr, _counts) = server(Duration::ZERO).await;
    let p = path(addr);
    let mut req = http::Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = format!("{}/x", p.origin).parse().unwrap();
    let sent = p.client().request(req);
    let size = std::mem::size_of_val(&sent);
    assert!(size <= 1536, "a request's future is {size} bytes");
}

#[tokio::test]
async fn when_the_http2_dial_a_burst_waits_for_fails_every_request_fails_at_once() {
    let (addr, _counts, ca, server) = h2_server(Duration::ZERO).await;
    let p = h2_path(addr, ca);
    get(&p).await;
    // The control plane goes away: the burst's one dial is refused, and the
    // requests that waited for it are not left waiting.
    server.abort();
    let _ = server.await;
    p.client().retire(99);
    let started = Instant::now();
    let burst = (0..10).map(|_| {
        let mut req = http::Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = format!("{}/x", p.origin).parse().unwrap();
        p.client().request(req)
    });
    for r in futures_util::future::join_all(burst).await {
        let e = r.expect_err("nothing listens");
        assert_eq!(
            crate::forward::classify(&e).0,
            crate::health::FailureKind::Connect,
            "{e}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_tls_target_whose_name_is_not_one_fails_and_is_never_sent_in_plain_text() {
    let (addr, counts) = server(Duration::ZERO).await;
    let (ca, _) = crate::pki::new_ca("test CA", time::OffsetDateTime::now_utc(), 1).unwrap();
    let ca = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()
    };
    let p = direct_path(addr, "not a host name", Some(ca));
    let mut req = http::Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = format!("https://127.0.0.1:{}/x", addr.port()).parse().unwrap();
    let e = p.client().request(req).await.expect_err("no TLS, no request");
    let (kind, msg) = crate::forward::classify(&e);
    assert_eq!(kind, crate::health::FailureKind::Connect, "{msg}");
    assert!(msg.contains("TLS to the control plane"), "{msg}");
    // The plain-HTTP server saw a connection, and no request on it.
    eventually("the connection is closed", || {
        counts.open.load(Ordering::SeqCst) == 0
    })
    .await;
}

/// A burst of requests dials a burst of connections, and each dial's future
/// lives on the heap until its connection is up: 100 call handlers arriving
/// at once held 700 KB of them (valgrind's massif) when every dial carried
/// the large futures only a tunnel (TLS to the peer, `CONNECT`), TLS to the
/// target or HTTP/2 need. Those are boxed where they are used.
#[tokio::test]
async fn a_plain_dials_future_carries_no_tunnel_tls_or_http2() {
    let (addr, _counts) = server(Duration::ZERO).await;
    let p = path(addr);
    let mut req = http::Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = format!("{}/x", p.origin).parse().unwrap();
    let pool = p.client();
    let dial = std::mem::size_of_val(&pool.dialer.dial_inner(0));
    assert!(dial <= 512, "a direct dial's future is {dial} bytes");
    let fresh = std::mem::size_of_val(&pool.send_fresh(req, 0, false));
    assert!(fresh <= 1536, "a new connection's future is {fresh} bytes");
}

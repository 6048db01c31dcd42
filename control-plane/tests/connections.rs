//! Hostile and careless connections, on HTTP and HTTPS: slow heads, silent
//! connections after the handshake, many unfinished heads, too many
//! connections, oversized heads (issue 12, defect 2). Each is bounded while
//! normal requests are served, and a quiet kept-alive connection is not cut
//! early.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Backend, Db, Instance};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A control plane with short limits, over HTTPS when `ca` is returned.
struct Setup {
    cp: Instance,
    tls: Option<tokio_rustls::TlsConnector>,
    _db: Db,
}

const LIMITS: &str = "[limits]\nheader_timeout = \"1s\"\nidle_timeout = \"3s\"\nmax_connections = 300\n";

async fn setup(tls: bool, name: &str, limits: &str) -> Setup {
    support::init();
    let db = Db::new(Backend::Sqlite, name).await.unwrap();
    if !tls {
        let cp = Instance::start(db.config("", limits)).await;
        return Setup {
            cp,
            tls: None,
            _db: db,
        };
    }
    let (cert, key, ca) = support::tls_files(db.dir.path());
    let config = db.config(
        "",
        &format!(
            "{limits}[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let ca_cert = reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([ca_cert])
        .build()
        .unwrap();
    let cp = Instance::start_with(config, client, "https").await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Setup {
        cp,
        tls: Some(tokio_rustls::TlsConnector::from(Arc::new(cfg))),
        _db: db,
    }
}

impl Setup {
    /// A raw connection, after the TLS handshake when the server speaks TLS.
    async fn connect(&self) -> Box<dyn Stream> {
        let tcp = TcpStream::connect(self.cp.addr).await.unwrap();
        match &self.tls {
            None => Box::new(tcp),
            Some(c) => {
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                Box::new(c.connect(name, tcp).await.unwrap())
            }
        }
    }

    async fn healthy(&self) {
        let r = self.cp.client.get(self.cp.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// Reads until the server closes; returns what it sent and how long it took.
async fn until_closed(s: &mut Box<dyn Stream>, within: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(started + within, s.read(&mut buf)).await {
            Err(_) => panic!("still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, started.elapsed()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

async fn slow_and_silent_connections_are_closed(tls: bool) {
    let s = setup(tls, &format!("slow_{tls}"), LIMITS).await;
    // Silent after the handshake.
    let mut silent = s.connect().await;
    // One byte a second.
    let mut drip = s.connect().await;
    let dripper = tokio::spawn(async move {
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" {
            if drip.write_all(&[*b]).await.is_err() {
                return drip;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        drip
    });
    // Many unfinished heads.
    let mut unfinished = Vec::new();
    for _ in 0..200 {
        let mut c = s.connect().await;
        c.write_all(b"POST /v1/calls HTTP/1.1\r\nHost: x\r\nX-Never: ")
            .await
            .unwrap();
        unfinished.push(c);
    }
    // Normal requests are served meanwhile.
    s.healthy().await;
    let (_, took) = until_closed(&mut silent, Duration::from_secs(4)).await;
    assert!(
        took < Duration::from_secs(3),
        "silent connection closed after {took:?}"
    );
    for c in &mut unfinished {
        until_closed(c, Duration::from_secs(4)).await;
    }
    let mut drip = dripper.await.unwrap();
    let (got, _) = until_closed(&mut drip, Duration::from_secs(5)).await;
    assert!(got.is_empty(), "the dripped request was never answered");
    s.healthy().await;
    s.cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_connections_are_closed_on_http() {
    slow_and_silent_connections_are_closed(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_connections_are_closed_on_https() {
    slow_and_silent_connections_are_closed(true).await;
}

/// Asks `/healthz` on a kept-alive connection and checks the 200.
async fn healthz_on(c: &mut Box<dyn Stream>, round: usize) {
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "round {round}: {}",
        String::from_utf8_lossy(&buf[..n])
    );
}

async fn quiet_keep_alive_lasts_until_the_idle_timeout(tls: bool) {
    let s = setup(tls, &format!("idle_{tls}"), LIMITS).await;
    let mut c = s.connect().await;
    for round in 0..2 {
        healthz_on(&mut c, round).await;
        // Quiet for longer than the header timeout: still open.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let (_, took) = until_closed(&mut c, Duration::from_secs(4)).await;
    assert!(
        took > Duration::from_millis(1000),
        "closed at the idle timeout, not before ({took:?})"
    );
    s.cp.stop().await;
}

/// hyper's own HTTP/1 head timeout (30 s by default once it has a timer)
/// ran while a kept-alive connection was quiet and closed it at 30 s, below
/// `limits.idle_timeout`: a load balancer's next request on it then failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_keep_alive_outlasts_hypers_own_head_timeout() {
    let limits = "[limits]\nheader_timeout = \"1s\"\nidle_timeout = \"60s\"\n";
    let s = setup(false, "idle_past_30s", limits).await;
    let mut c = s.connect().await;
    for round in 0..2 {
        healthz_on(&mut c, round).await;
        if round == 0 {
            // Quiet past hyper's 30 s: still open and serving.
            tokio::time::sleep(Duration::from_secs(32)).await;
        }
    }
    s.cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_keep_alive_lasts_until_the_idle_timeout_on_http() {
    quiet_keep_alive_lasts_until_the_idle_timeout(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_keep_alive_lasts_until_the_idle_timeout_on_https() {
    quiet_keep_alive_lasts_until_the_idle_timeout(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_at_once() {
    let s = setup(
        false,
        "cap",
        "[limits]\nheader_timeout = \"5s\"\nmax_connections = 4\n",
    )
    .await;
    // The readiness check's pooled connection may hold one slot.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(s.connect().await);
    }
    let mut extra = s.connect().await;
    let (_, took) = until_closed(&mut extra, Duration::from_secs(2)).await;
    assert!(took < Duration::from_secs(1));
    drop(held);
    let body = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut c = s.connect().await;
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = Vec::new();
            let _ = c.read_to_end(&mut out).await;
            if out.starts_with(b"HTTP/1.1 200") {
                return String::from_utf8_lossy(&out).into_owned();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("served again once connections closed");
    let refused = body
        .lines()
        .find_map(|l| l.strip_prefix("detour_cp_connections_refused_total "))
        .expect("the refusal counter is exported");
    assert!(refused.trim().parse::<u64>().unwrap() >= 1);
    s.cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_heads_get_problem_json() {
    let s = setup(false, "heads", LIMITS).await;
    for (request, status) in [
        (
            format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "b".repeat(70_000)
            ),
            431,
        ),
        (
            "GET /healthz HTTP/1.1\r\nHost: x\r\nNo Colon\r\n\r\n".to_owned(),
            400,
        ),
    ] {
        let mut c = s.connect().await;
        let _ = c.write_all(request.as_bytes()).await;
        let (got, _) = until_closed(&mut c, Duration::from_secs(3)).await;
        let text = String::from_utf8_lossy(&got);
        let (head, body) = text.split_once("\r\n\r\n").expect("an answer");
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        assert!(head.contains("application/problem+json"), "{head}");
        let p: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(p["status"], status);
    }
    // Under the limit is served.
    let r =
        s.cp.client
            .get(s.cp.url("/healthz"))
            .header("x-big", "b".repeat(40_000))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 200);
    s.cp.stop().await;
}

/// Issue 12, defect 4: a route named `.` or `..` could be stored but never
/// read or deleted again (clients normalise dot segments away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segment_route_names_are_refused() {
    let s = setup(false, "dots", LIMITS).await;
    let body = r#"{"prefix": "+9180", "trunk": "t", "pop": "blr"}"#;
    for name in [".", "..", "...", "%2E", "%2e%2E"] {
        let mut c = s.connect().await;
        let req = format!(
            "PUT /v1/routes/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            support::ADMIN_TOKEN,
            body.len()
        );
        c.write_all(req.as_bytes()).await.unwrap();
        let (got, _) = until_closed(&mut c, Duration::from_secs(3)).await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 4") && !text.starts_with("HTTP/1.1 404"),
            "{name}: {text}"
        );
        assert!(text.contains("problem+json"), "{name}: {text}");
    }
    let r =
        s.cp.client
            .get(s.cp.url("/v1/routes"))
            .bearer_auth(support::ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
    let listed = r.text().await.unwrap();
    assert!(!listed.contains("\"name\":\".\""), "{listed}");
    s.cp.stop().await;
}

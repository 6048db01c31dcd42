//! The agent's data path with real sockets: every method and body through
//! `direct` and `via:<peer>`, streaming, limits, the relay's refusals, end to
//! end TLS through the relay, and slow clients cut off.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use detour_lab::fleet::{CP_HOST, Fleet, FleetOptions};
use detour_lab::load::CallClient;
use detour_lab::mock_cp::stream_byte;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn fleet() -> Fleet {
    Fleet::start(FleetOptions::default()).await.expect("fleet starts")
}

fn body_of(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i * 7 % 256) as u8).collect::<Vec<u8>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_and_body_arrives_byte_for_byte_on_every_path() {
    let fleet = fleet().await;
    let blr = fleet.pop("blr");
    let client = CallClient::default();
    let cp = fleet.cp.as_ref().unwrap();
    let limit = 1024 * 1024;
    let mut n = 0;
    for pin in ["direct", "via:maa", "via:del"] {
        for method in [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            for len in [0usize, 1, 1000, 64 * 1024 + 3, limit] {
                if len > 0 && (method == Method::GET || method == Method::OPTIONS) && len > 1000 {
                    continue;
                }
                n += 1;
                let path = format!("/v1/echo/{n}?pin={pin}&q=a%20b");
                let body = body_of(len);
                let url = format!("{}{path}", blr.local_url());
                let r = client
                    .send(
                        method.clone(),
                        &url,
                        &[
                            ("x-detour-pin", pin),
                            ("x-custom", "kept"),
                            ("connection", "keep-alive, x-drop"),
                            ("x-drop", "hop"),
                        ],
                        body.clone(),
                    )
                    .await;
                assert_eq!(
                    r.status,
                    Some(200),
                    "{method} {len} bytes via {pin}: {:?} {:?}",
                    r.error,
                    r.body
                );
                assert_eq!(r.path.as_deref(), Some(pin));
                assert_eq!(r.body, body, "response body intact for {method} {len} via {pin}");
                let seen = cp
                    .recorder
                    .find(&format!("/v1/echo/{n}?"))
                    .expect("request reached the control plane");
                assert_eq!(seen.method, method);
                assert_eq!(seen.path_and_query, path);
                assert_eq!(seen.body, body, "request body byte for byte");
                assert!(seen.tls, "arrived over TLS");
                assert_eq!(seen.headers.get("x-custom").unwrap(), "kept");
                assert!(
                    seen.headers.get("x-drop").is_none(),
                    "headers named by Connection are hop-by-hop"
                );
                assert!(
                    seen.headers.get("x-detour-pin").is_none(),
                    "the pin header stays in the agent"
                );
                assert!(seen.headers.get("idempotency-key").is_some());
                assert!(seen.headers.get("x-request-id").is_some());
                if seen.version == http::Version::HTTP_11 {
                    assert_eq!(seen.headers.get("host").unwrap(), CP_HOST);
                }
            }
        }
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_are_kept_when_present_and_the_control_plane_speaks_h2() {
    let fleet = fleet().await;
    let blr = fleet.pop("blr");
    let client = CallClient::default();
    let url = format!("{}/v1/calls/keys", blr.local_url());
    let r = client
        .send(
            Method::POST,
            &url,
            &[("idempotency-key", "k-123"), ("x-request-id", "r-456")],
            Bytes::from_static(b"{}"),
        )
        .await;
    assert_eq!(r.status, Some(200));
    let seen = fleet
        .cp
        .as_ref()
        .unwrap()
        .recorder
        .find("/v1/calls/keys")
        .unwrap();
    assert_eq!(seen.headers.get("idempotency-key").unwrap(), "k-123");
    assert_eq!(seen.headers.get("x-request-id").unwrap(), "r-456");
    assert_eq!(seen.version, http::Version::HTTP_2, "HTTP/2 negotiated by ALPN");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_multi_megabyte_response_arrives_intact_on_every_path() {
    let fleet = fleet().await;
    let blr = fleet.pop("blr");
    let client = CallClient::new(Duration::from_secs(20));
    let size = 8 * 1024 * 1024 + 17;
    for pin in ["direct", "via:maa"] {
        let url = format!("{}/stream/{size}", blr.local_url());
        let r = client
            .send(Method::GET, &url, &[("x-detour-pin", pin)], Bytes::new())
            .await;
        assert_eq!(r.status, Some(200), "{:?}", r.error);
        assert_eq!(r.body.len(), size);
        assert!(
            r.body.iter().enumerate().all(|(i, b)| *b == stream_byte(i)),
            "bytes intact via {pin}"
        );
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_codes_pass_through_and_limits_answer_with_problems() {
    let fleet = fleet().await;
    let blr = fleet.pop("blr");
    let client = CallClient::default();
    // A redirect is the control plane's answer (call flows branch on 200
    // vs 302): passed through with its Location, never followed.
    for pin in ["direct", "via:maa"] {
        let head = raw(
            blr.agent().local_addr,
            &format!("GET /status/302 HTTP/1.1\r\nHost: x\r\nX-Detour-Pin: {pin}\r\n\r\n"),
        )
        .await
        .to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 302"), "{head}");
        assert!(head.contains("location: /v1/flows/branch-b\r\n"), "{head}");
    }
    assert!(
        fleet
            .cp
            .as_ref()
            .unwrap()
            .recorder
            .find("/v1/flows/branch-b")
            .is_none()
    );
    for code in [201u16, 404, 422, 500, 503] {
        let r = client
            .send(
                Method::GET,
                &format!("{}/status/{code}", blr.local_url()),
                &[],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, Some(code));
        assert_eq!(r.path.as_deref(), Some("direct"));
    }
    // Over the body limit: 413, and nothing reaches the control plane.
    let r = client
        .send(
            Method::POST,
            &format!("{}/v1/too-big", blr.local_url()),
            &[],
            body_of(1024 * 1024 + 1),
        )
        .await;
    assert_eq!(r.status, Some(413));
    let problem: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(problem["status"], 413);
    assert!(fleet.cp.as_ref().unwrap().recorder.find("/v1/too-big").is_none());
    // The rest of that body is never read, so the connection closes after the
    // answer, and the answer says so: a keep-alive client must not send its
    // next request on it (it did, and failed, before `Connection: close`).
    let head = raw(
        blr.agent().local_addr,
        "POST /v1/too-big HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    // A chunked body found too long as it came: 413 too, and nothing reaches
    // the control plane. (The agent also reads and drops the rest, up to the
    // limit again, so that the client is not reset while it writes; on
    // loopback the kernel's buffers hold that rest anyway, so this does not
    // tell a drained connection from one that was not.)
    let mut s = TcpStream::connect(blr.agent().local_addr).await.unwrap();
    s.write_all(b"POST /v1/too-big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..(2 * 1024 * 1024 / chunk.len()) {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(&chunk).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&answer);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(fleet.cp.as_ref().unwrap().recorder.find("/v1/too-big").is_none());
    // Unknown pin and bad priority: 400 with a reason.
    let r = client
        .send(
            Method::GET,
            &format!("{}/v1/x", blr.local_url()),
            &[("x-detour-pin", "via:nowhere")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, Some(400));
    assert!(String::from_utf8_lossy(&r.body).contains("via:nowhere"));
    let r = client
        .send(
            Method::GET,
            &format!("{}/v1/x", blr.local_url()),
            &[("x-detour-priority", "urgent")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, Some(400));
    fleet.shutdown().await;
}

/// Sends raw bytes to the local listener and returns the answer's head.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_is_accepted_only_for_the_control_plane() {
    let fleet = fleet().await;
    let blr = fleet.pop("blr");
    let canary = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let canary_addr = canary.local_addr().unwrap();
    let local = blr.agent().local_addr;
    // What a call handler configured for HAProxy + Squid sends: works unchanged.
    let ok = raw(
        local,
        &format!("GET http://{CP_HOST}/v1/abs HTTP/1.1\r\nHost: {CP_HOST}\r\n\r\n"),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    // Anything else is refused: another host, another port, CONNECT.
    for target in [
        format!("http://{canary_addr}/x"),
        format!("http://{CP_HOST}:8443/x"),
        "http://example.com/".to_owned(),
    ] {
        let resp = raw(local, &format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{target}: {resp}");
        assert!(resp.contains("application/problem+json"));
    }
    let resp = raw(
        local,
        &format!("CONNECT {canary_addr} HTTP/1.1\r\nHost: {canary_addr}\r\n\r\n"),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
    // Nothing ever reached the canary.
    let accepted = tokio::time::timeout(Duration::from_millis(200), canary.accept()).await;
    assert!(accepted.is_err(), "the canary was never contacted");
    fleet.shutdown().await;
}

/// A TLS client for the relay with the given identity (or none).
fn relay_client(roots: &std::path::Path, identity: Option<(&str, &str)>) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut store = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(roots).unwrap() {
        store.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store);
    let cfg = match identity {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
    };
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

async fn try_connect(
    relay: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    target: &str,
) -> Result<String, String> {
    let tcp = TcpStream::connect(relay).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("maa".to_owned()).unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(0)) => Err("closed".to_owned()),
        Ok(Ok(n)) => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err("no answer".to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_is_never_an_open_proxy() {
    let fleet = fleet().await;
    let maa = fleet.pop("maa");
    let relay = maa.relay_addr.unwrap();
    let certs = fleet.dir.path().join("certs");
    let canary = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let canary_addr = canary.local_addr().unwrap();
    let blr_cert = std::fs::read_to_string(certs.join("blr.pem")).unwrap();
    let blr_key = std::fs::read_to_string(certs.join("blr.key")).unwrap();
    let fleet_member = relay_client(&certs.join("ca.pem"), Some((&blr_cert, &blr_key)));

    // A fleet member may tunnel to the control plane...
    let ok = try_connect(relay, &fleet_member, &format!("{CP_HOST}:443"))
        .await
        .unwrap();
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    // ...and nowhere else: not another host, not another port, not by address.
    for target in [
        canary_addr.to_string(),
        format!("{CP_HOST}:22"),
        format!("{}", fleet.cp_addr),
        "example.com:443".to_owned(),
        format!("x@{CP_HOST}:443"),
    ] {
        let resp = try_connect(relay, &fleet_member, &target).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 403"), "{target}: {resp}");
    }

    let rejected = |reason: &str| {
        maa.agent()
            .shared
            .metrics
            .relay_rejected
            .with_label_values(&[reason])
            .get()
    };
    // No client certificate: the handshake fails.
    let anonymous = relay_client(&certs.join("ca.pem"), None);
    assert!(
        try_connect(relay, &anonymous, &format!("{CP_HOST}:443"))
            .await
            .is_err()
    );
    // A certificate from another CA: fails.
    let other = tempfile::tempdir().unwrap();
    detour_agent::pki::init(other.path()).unwrap();
    detour_agent::pki::issue(other.path(), "blr", other.path(), 30).unwrap();
    let foreign = relay_client(
        &certs.join("ca.pem"),
        Some((
            &std::fs::read_to_string(other.path().join("blr.pem")).unwrap(),
            &std::fs::read_to_string(other.path().join("blr.key")).unwrap(),
        )),
    );
    assert!(
        try_connect(relay, &foreign, &format!("{CP_HOST}:443"))
            .await
            .is_err()
    );
    // An expired certificate from the fleet CA: fails.
    let now = time::OffsetDateTime::now_utc();
    let (old_cert, old_key) = detour_agent::pki::issue_pem(
        &std::fs::read_to_string(certs.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(certs.join("ca.key")).unwrap(),
        "blr",
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    )
    .unwrap();
    let expired = relay_client(&certs.join("ca.pem"), Some((&old_cert, &old_key)));
    assert!(
        try_connect(relay, &expired, &format!("{CP_HOST}:443"))
            .await
            .is_err()
    );

    // A certificate from the fleet CA that names no PoP: refused, counted.
    let unnamed = {
        let ca_key =
            rcgen::KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).unwrap()).unwrap();
        let issuer =
            rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(certs.join("ca.pem")).unwrap(), ca_key)
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        relay_client(&certs.join("ca.pem"), Some((&cert.pem(), &key.serialize_pem())))
    };
    let r = try_connect(relay, &unnamed, &format!("{CP_HOST}:443")).await;
    assert!(
        !r.as_deref().is_ok_and(|a| a.starts_with("HTTP/1.1 200")),
        "{r:?}"
    );

    // A CONNECT head that is not HTTP: refused and counted.
    let tcp = TcpStream::connect(relay).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("maa".to_owned()).unwrap();
    let mut tls = fleet_member.connect(name, tcp).await.unwrap();
    tls.write_all(b"CONNECT \x01\x02 nonsense\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(
        !String::from_utf8_lossy(&rest).contains(" 200 "),
        "no tunnel for a malformed head"
    );

    // The refusals are counted by reason (the server side may finish a moment later).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while (rejected("no_client_cert") < 1
        || rejected("untrusted_cert") < 1
        || rejected("expired_cert") < 1
        || rejected("malformed") < 1
        || rejected("no_pop_name") < 1)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rejected("no_client_cert"), 1);
    assert_eq!(rejected("untrusted_cert"), 1);
    assert_eq!(rejected("expired_cert"), 1);
    assert_eq!(rejected("malformed"), 1);
    assert_eq!(rejected("no_pop_name"), 1);
    assert_eq!(rejected("forbidden_target"), 5);
    let accepted = tokio::time::timeout(Duration::from_millis(200), canary.accept()).await;
    assert!(accepted.is_err(), "nothing reached the canary");
    // The agent keeps serving.
    let r = CallClient::default()
        .send(
            Method::GET,
            &format!("{}/v1/after", fleet.pop("blr").local_url()),
            &[("x-detour-pin", "via:maa")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, Some(200));
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_sees_ciphertext_only() {
    let fleet = fleet().await;
    let maa = fleet.pop("maa");
    // Everything maa's relay sends towards the control plane passes maa's uplink.
    maa.uplink.start_recording();
    let secret_path = "/v1/secret-path-4f9a2c";
    let secret_body = "caller=+919876543210&secret-body-77d1";
    let r = CallClient::default()
        .send(
            Method::POST,
            &format!("{}{secret_path}", fleet.pop("blr").local_url()),
            &[("x-detour-pin", "via:maa")],
            Bytes::from(secret_body),
        )
        .await;
    assert_eq!(r.status, Some(200));
    assert_eq!(r.path.as_deref(), Some("via:maa"));
    let seen = fleet
        .cp
        .as_ref()
        .unwrap()
        .recorder
        .find(secret_path)
        .expect("arrived");
    assert!(seen.tls);
    assert_eq!(seen.body, secret_body);
    let bytes = maa.uplink.recorded();
    assert!(
        bytes.len() > 200,
        "the tunnel's bytes went through maa's uplink ({} bytes)",
        bytes.len()
    );
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        !text.contains("secret-path-4f9a2c"),
        "the relay's byte stream never holds the request path"
    );
    assert!(!text.contains("secret-body-77d1"), "nor the body");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_while_others_are_served() {
    let mut opts = FleetOptions::default();
    opts.extra
        .insert("ingress".into(), "header_timeout = \"300ms\"".into());
    opts.extra
        .insert("relay".into(), "handshake_timeout = \"300ms\"".into());
    let fleet = Fleet::start(opts).await.unwrap();
    let blr = fleet.pop("blr");
    let maa = fleet.pop("maa");
    // Slowloris on the local listener: half a request head, then silence.
    let mut slow_local = TcpStream::connect(blr.agent().local_addr).await.unwrap();
    slow_local
        .write_all(b"POST /v1/calls HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    // And on the relay: a TCP connection that never starts TLS.
    let mut slow_relay = TcpStream::connect(maa.relay_addr.unwrap()).await.unwrap();
    // Others are served meanwhile.
    let r = CallClient::default()
        .send(
            Method::GET,
            &format!("{}/v1/ok", blr.local_url()),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, Some(200));
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(3), slow_local.read(&mut buf))
        .await
        .expect("local cut off in time");
    assert!(started.elapsed() < Duration::from_secs(2));
    // hyper answers 408 or just closes; either way the connection ends.
    if let Ok(n) = n {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), slow_local.read_to_end(&mut rest)).await;
        let _ = n;
    }
    let n = tokio::time::timeout(Duration::from_secs(3), slow_relay.read(&mut buf))
        .await
        .expect("relay cut off in time");
    assert!(matches!(n, Ok(0) | Err(_)), "relay closed the silent connection");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while maa
        .agent()
        .shared
        .metrics
        .relay_rejected
        .with_label_values(&["handshake_timeout"])
        .get()
        < 1
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        maa.agent()
            .shared
            .metrics
            .relay_rejected
            .with_label_values(&["handshake_timeout"])
            .get(),
        1
    );
    let _ = fleet
        .cp
        .as_ref()
        .unwrap()
        .recorder
        .healthz
        .load(Ordering::Relaxed);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_metrics_and_readiness_tell_the_truth() {
    let fleet = fleet().await;
    let blr = fleet.pop("blr");
    let admin = blr.agent().admin_addr;
    let _ = CallClient::default()
        .send(
            Method::POST,
            &format!("{}/v1/calls", blr.local_url()),
            &[],
            Bytes::from("{}"),
        )
        .await;
    let report = tokio::task::spawn_blocking(move || detour_agent::status::fetch(&admin.to_string()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.pop, "blr");
    assert_eq!(report.active_path.as_deref(), Some("direct"));
    let names: Vec<&str> = report.paths.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        names,
        ["direct", "via:del", "via:maa"],
        "direct, then the peers in file order"
    );
    let table = detour_agent::status::table(&report);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("* direct") && l.contains(" up ")),
        "{table}"
    );
    let client = CallClient::default();
    let metrics = client
        .send(Method::GET, &format!("http://{admin}/metrics"), &[], Bytes::new())
        .await;
    let text = String::from_utf8_lossy(&metrics.body);
    for name in [
        "detour_requests_total{outcome=\"ok\",path=\"direct\",pop=\"blr\"} 1",
        "detour_active_path{path=\"direct\",pop=\"blr\"} 1",
        "detour_path_state{endpoint=\"cp.detour.test\",path=\"via:maa\",pop=\"blr\"} 2",
        "detour_request_duration_seconds_bucket",
        "detour_path_rtt_seconds",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    let ready = client
        .send(Method::GET, &format!("http://{admin}/readyz"), &[], Bytes::new())
        .await;
    assert_eq!(ready.status, Some(200));
    // With every path down the agent is not ready.
    for p in fleet.pops.values() {
        p.uplink.set(detour_lab::link::Fault::Reset);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = client
            .send(Method::GET, &format!("http://{admin}/readyz"), &[], Bytes::new())
            .await;
        if r.status == Some(503) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz turns 503 when no path is up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_and_stops_accepting() {
    let fleet = fleet().await;
    let blr = fleet.pop("blr");
    let url = format!("{}/slow/400", blr.local_url());
    let in_flight = tokio::spawn(async move {
        CallClient::default()
            .send(Method::POST, &url, &[], Bytes::from("{}"))
            .await
    });
    // Let the request reach the control plane, then start draining.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while fleet.cp.as_ref().unwrap().recorder.find("/slow/400").is_none() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let local = blr.agent().local_addr;
    let agent = blr.agent().clone();
    let drain = tokio::spawn(async move { agent.shutdown(detour_agent::agent::Stop::Terminate).await });
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, Some(200), "the in-flight request finished: {r:?}");
    drain.await.unwrap();
    assert!(TcpStream::connect(local).await.is_err(), "no longer accepting");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_report_their_paths_to_the_fleet_view() {
    let mut opts = FleetOptions {
        real_cp: true,
        ..Default::default()
    };
    opts.extra
        .insert("control_plane".into(), "report_interval = \"200ms\"".into());
    let fleet = Fleet::start(opts).await.unwrap();
    let blr = fleet.pop("blr");
    let admin = format!("Bearer {}", fleet.admin_token.clone().unwrap());
    let client = CallClient::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = client
            .send(
                Method::GET,
                &format!("{}/v1/fleet", blr.local_url()),
                &[("authorization", &admin)],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, Some(200), "{}", String::from_utf8_lossy(&r.body));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let pops: Vec<String> = v["pops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["pop"].as_str().unwrap_or("").to_owned())
            .collect();
        if pops.len() == 3 {
            let text = v.to_string();
            assert!(
                text.contains("via:maa") && text.contains("\"active_path\":\"direct\""),
                "{text}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "every PoP reported: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_over_the_relay_limits_are_refused_with_a_reason() {
    let mut opts = FleetOptions::default();
    opts.extra
        .insert("relay".into(), "max_tunnels = 3\nmax_tunnels_per_peer = 1".into());
    let fleet = Fleet::start(opts).await.unwrap();
    let maa = fleet.pop("maa");
    let relay = maa.relay_addr.unwrap();
    let certs = fleet.dir.path().join("certs");
    let cert = std::fs::read_to_string(certs.join("blr.pem")).unwrap();
    let key = std::fs::read_to_string(certs.join("blr.key")).unwrap();
    let connector = relay_client(&certs.join("ca.pem"), Some((&cert, &key)));
    // blr's own agent already holds its one tunnel to maa (its warm pool), so
    // one more from blr is over the per-peer limit.
    let refused = try_connect(relay, &connector, &format!("{CP_HOST}:443"))
        .await
        .unwrap();
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("peer_tunnel_limit"), "{refused}");
    let m = &maa.agent().shared.metrics;
    assert!(m.relay_rejected.with_label_values(&["peer_tunnel_limit"]).get() >= 1);
    // Another peer (del) still gets its tunnel, and maa keeps serving.
    let r = CallClient::default()
        .send(
            Method::GET,
            &format!("{}/v1/still", fleet.pop("del").local_url()),
            &[("x-detour-pin", "via:maa")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, Some(200));
    assert!(m.relay_tunnels_active.get() >= 2);
    fleet.shutdown().await;
}

/// Issue 12, defect 1: one request with a huge header used to reach the
/// control plane's HTTP/2 side, which dropped the whole connection (GOAWAY),
/// failing every request multiplexed on it and marking the paths down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_header_is_refused_at_the_door_and_hurts_no_other_request() {
    let fleet = fleet().await;
    let blr = fleet.pop("blr");
    let client = CallClient::new(Duration::from_secs(5));
    let base = blr.local_url();
    let calls: Vec<_> = (0..5)
        .map(|i| {
            let (client, url) = (client.clone(), format!("{base}/slow/100?n={i}"));
            tokio::spawn(async move { client.send(Method::GET, &url, &[], Bytes::new()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let big = "x".repeat(70_000);
    let r = client
        .send(
            Method::GET,
            &format!("{base}/healthz"),
            &[("x-big", &big)],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, Some(431), "{r:?}");
    let problem: serde_json::Value = serde_json::from_slice(&r.body).expect("problem+json body");
    assert_eq!(problem["status"], 431);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("ingress.max_header_bytes")
    );
    for c in calls {
        let r = c.await.unwrap();
        assert_eq!(r.status, Some(200), "a request beside the big one: {r:?}");
    }
    // Just over the limit is refused too, just under goes through.
    let limit = detour_agent::config::DEFAULT_MAX_HEADER_BYTES;
    let over = "y".repeat(limit);
    let r = client
        .send(
            Method::GET,
            &format!("{base}/v1/x"),
            &[("x-big", &over)],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, Some(431));
    let under = "y".repeat(limit - 1024);
    let r = client
        .send(
            Method::GET,
            &format!("{base}/v1/x"),
            &[("x-big", &under)],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, Some(200), "{r:?}");
    let m = &blr.agent().shared.metrics;
    assert_eq!(m.requests.with_label_values(&["none", "rejected"]).get(), 2);
    assert_eq!(m.requests.with_label_values(&["none", "failed"]).get(), 0);
    let snap = blr.agent().shared.forwarder.runtime().health.snapshot();
    assert!(
        snap.paths.iter().all(|p| p.state == detour_wire::PathState::Up),
        "no path was judged by the refused requests: {:?}",
        snap.paths
    );
    fleet.shutdown().await;
}

/// Issue 12, defect 7: a request head hyper cannot parse is answered with
/// problem+json like every other error the agent makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_heads_get_problem_json_answers() {
    let fleet = fleet().await;
    let blr = fleet.pop("blr");
    let local = blr.agent().local_addr;
    let huge = format!(
        "GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "z".repeat(200_000)
    );
    for (request, status) in [
        ("GET /v1/x HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (
            "GET /v1/x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
        ),
        ("\x16\x03\x01\x00\x05\x01\x00\x00\x01\x03\x03\r\n\r\n", 400),
        (huge.as_str(), 431),
    ] {
        let answer = raw_whole(local, request).await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        assert!(head.contains("application/problem+json"), "{head}");
        assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
        let problem: serde_json::Value = serde_json::from_str(body).expect("a problem+json body");
        assert_eq!(problem["status"], status);
    }
    // A good request on a kept-alive connection is not mistaken for one.
    let mut s = TcpStream::connect(local).await.unwrap();
    for _ in 0..3 {
        s.write_all(b"GET /v1/ok HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    fleet.shutdown().await;
}

/// Issue 12, defect 6: a kept-alive connection was closed after 5 s of quiet
/// (hyper's header timer runs between requests), racing the call handler's
/// next request. Quiet connections now stay open for `ingress.idle_timeout`,
/// while a head that starts and stalls is still cut at `header_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_keep_alive_connections_stay_open_and_stalled_heads_do_not() {
    let mut opts = FleetOptions::default();
    opts.extra.insert(
        "ingress".into(),
        "header_timeout = \"300ms\"\nidle_timeout = \"2s\"".into(),
    );
    let fleet = Fleet::start(opts).await.unwrap();
    let local = fleet.pop("blr").agent().local_addr;
    let mut s = TcpStream::connect(local).await.unwrap();
    s.write_all(b"GET /v1/ok HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    // Quiet for three header timeouts: still open and serving.
    tokio::time::sleep(Duration::from_millis(900)).await;
    s.write_all(b"GET /v1/ok HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_head(&mut s).await.starts_with("HTTP/1.1 200"),
        "served after 900 ms of quiet"
    );
    // A head that starts and stalls is cut off at the header timeout.
    let started = tokio::time::Instant::now();
    s.write_all(b"GET /v1/ok HTTP/1.1\r\nHo").await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "closed, not answered");
    assert!(started.elapsed() < Duration::from_millis(1500));
    // And a connection quiet past the idle timeout is closed.
    let mut q = TcpStream::connect(local).await.unwrap();
    q.write_all(b"GET /v1/ok HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut q).await.starts_with("HTTP/1.1 200"));
    let started = tokio::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), q.read(&mut buf))
        .await
        .expect("idle connection closed");
    assert!(matches!(n, Ok(0)), "a quiet close at the idle timeout: {n:?}");
    let waited = started.elapsed();
    assert!(
        waited > Duration::from_millis(1500),
        "not before the idle timeout ({waited:?})"
    );
    fleet.shutdown().await;
}

/// Writes `request` and reads until the peer closes (or 5 s pass).
async fn raw_whole(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The peer may answer and close before reading everything we send.
    let _ = s.write_all(request.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response (head and Content-Length body) from a kept-alive connection.
async fn read_head(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "connection closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return head.to_owned();
            }
        }
    }
}

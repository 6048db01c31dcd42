//! The command line (`check-config`, `migrate`, `token create`) and HTTPS
//! with HTTP/2 from a configured certificate.

mod support;

use std::process::Command;

use serde_json::json;
use support::{Backend, Db, Instance};

const BIN: &str = env!("CARGO_BIN_EXE_detour-control-plane");

#[test]
fn check_config_accepts_the_example_and_locates_errors() {
    // The example names the production admin token file; check-config reads
    // it, so the copy under test points at one made here.
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/cp.toml")).unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "example-admin-token\n").unwrap();
    assert!(example.contains("\"/etc/detour/admin.token\""));
    let example = example.replace("/etc/detour/admin.token", &token.display().to_string());
    let copy = dir.path().join("example.toml");
    std::fs::write(&copy, example).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config", copy.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let bad = dir.path().join("cp.toml");
    std::fs::write(
        &bad,
        "listen = \"127.0.0.1:8000\"\n[routing]\ntime_zone = \"Mars/Base\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with(&format!("{}:3:13: ", bad.display())), "{err}");
    assert!(err.contains("time_zone"), "{err}");

    std::fs::write(&bad, "listen = 8000\n").unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":1:10: "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_create_prints_a_working_token_once() {
    let db = Db::new(Backend::Sqlite, "token_create").await.unwrap();
    let config = db.config("", "");
    let file = db.dir.path().join("cp.toml");
    let out = Command::new(BIN)
        .args(["migrate", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(BIN)
        .args([
            "token",
            "create",
            "--pop",
            "blr",
            "--config",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("dtr_blr_"), "{token}");
    let out_create_stderr = out.stderr;
    let out = Command::new(BIN)
        .args([
            "token",
            "create",
            "--pop",
            "Bad/Name",
            "--config",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    let cp = Instance::start(config).await;
    let r = cp
        .client
        .post(cp.url("/v1/agents/blr/report"))
        .bearer_auth(&token)
        .json(&json!({"pop": "blr", "version": "t", "active_path": null, "paths": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    cp.stop().await;

    // The token shows in `token list` by id, never itself; revoked, a
    // replica that has not cached it refuses it.
    let id = String::from_utf8_lossy(&out_create_stderr)
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_owned();
    let list = Command::new(BIN)
        .args(["token", "list", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let listed = String::from_utf8(list.stdout).unwrap();
    assert!(listed.contains(&id) && listed.contains("blr"), "{listed}");
    assert!(!listed.contains(&token));
    let revoke = |id: &str| {
        Command::new(BIN)
            .args(["token", "revoke", "--id", id, "--config", file.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = revoke(&id);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = revoke(&id);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no token has id"));
    let cp = Instance::start(db.config("", "")).await;
    let r = cp
        .client
        .post(cp.url("/v1/agents/blr/report"))
        .bearer_auth(&token)
        .json(&json!({"pop": "blr", "version": "t", "active_path": null, "paths": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_with_http2_and_http1() {
    support::init();
    let db = Db::new(Backend::Sqlite, "https").await.unwrap();
    let (cert, key, ca) = support::tls_files(db.dir.path());
    let config = db.config(
        "",
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let ca_cert = reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap();
    let h2 = reqwest::Client::builder()
        .tls_certs_only([ca_cert.clone()])
        .build()
        .unwrap();
    let cp = Instance::start_with(config, h2, "https").await;
    let r = cp.client.get(cp.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN picked h2");
    let h1 = reqwest::Client::builder()
        .tls_certs_only([ca_cert])
        .http1_only()
        .build()
        .unwrap();
    let r = h1.get(cp.url("/healthz")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    // Plain HTTP to the TLS port does not get an answer.
    let plain = reqwest::Client::new();
    assert!(
        plain
            .get(format!("http://{}/healthz", cp.addr))
            .send()
            .await
            .is_err()
    );
    cp.stop().await;
}

#[tokio::test]
async fn readiness_requires_migrations() {
    let db = Db::new(Backend::Sqlite, "readiness_requires_migrations")
        .await
        .unwrap();
    let config = db.config("", "");
    let store = detour_control_plane::store::Store::open(&config).await.unwrap();
    let err = store.ready().await.unwrap_err();
    assert!(err.contains("migrations"), "{err}");
    store.migrate().await.unwrap();
    store.ready().await.unwrap();
    store.close().await;
}

/// Bad input of every shape is a 4xx, never a 5xx or a dropped connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bodies_never_cause_a_server_error() {
    use rand::{Rng, SeedableRng};
    let db = Db::new(Backend::Sqlite, "random_bodies").await.unwrap();
    let cp = Instance::start(db.config("", "[limits]\nper_pop_rps = 0\n")).await;
    cp.put_route("all", json!({"prefix": "", "trunk": "t", "pop": "blr"}))
        .await;
    let token = cp.token("blr").await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let pieces = [
        json!(null),
        json!(true),
        json!(-1),
        json!(1e308),
        json!(""),
        json!("+"),
        json!("112"),
        json!("+919876543210"),
        json!("08041234567"),
        json!("٣٤٥"),
        json!("+91 (80) 4123-4567 ext. 9"),
        json!("\u{0}"),
        json!([1, 2]),
        json!({"a": {}}),
        json!("x".repeat(300)),
        json!("emergency"),
        json!("normal"),
        json!("outbound"),
    ];
    let fields = [
        "caller",
        "destination",
        "call_type",
        "priority",
        "metadata",
        "zzz",
    ];
    for i in 0..300 {
        let body = if i % 10 == 0 {
            let n = rng.random_range(0..64);
            (0..n).map(|_| rng.random::<u8>()).collect::<Vec<u8>>()
        } else {
            let mut obj = serde_json::Map::new();
            for f in fields {
                if rng.random_bool(0.6) {
                    obj.insert(f.into(), pieces[rng.random_range(0..pieces.len())].clone());
                }
            }
            serde_json::to_vec(&obj).unwrap()
        };
        let path = if i % 7 == 0 {
            "/v1/calls/some-id/events"
        } else {
            "/v1/calls"
        };
        let r = cp
            .client
            .post(cp.url(path))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        let status = r.status().as_u16();
        assert!(
            (200..500).contains(&status),
            "body {:?} got {status}",
            String::from_utf8_lossy(&body)
        );
        if status >= 400 {
            let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
            assert_eq!(ct, "application/problem+json");
        }
    }
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_does_not_stop_the_service_and_sigterm_stops_it_cleanly() {
    support::init();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(d.join("admin.token"), "a-long-enough-admin-token-for-tests\n").unwrap();
    std::fs::write(
        d.join("cp.toml"),
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nadmin_token_file = \"{}\"\n",
            d.join("data").display(),
            d.join("admin.token").display()
        ),
    )
    .unwrap();
    // Killed on drop, so a failing assertion leaves no server running.
    struct Server(std::process::Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut server = Server(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(d.join("cp.toml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut server.0;
    let url = format!("http://127.0.0.1:{port}/healthz");
    let healthy = || async { reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !healthy().await {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the control plane exited at start"
        );
        assert!(std::time::Instant::now() < deadline, "never became healthy");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pid = child.id().to_string();
    let kill = |sig: &str| {
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    };
    kill("-HUP");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP stopped the control plane"
    );
    assert!(healthy().await, "not serving after SIGHUP");
    kill("-TERM");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "SIGTERM did not stop it");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "a SIGTERM stop is a clean exit: {status}");
}

/// Issue 12, defect 3: check-config loads every file serve loads, and says
/// where in cp.toml the setting that names a bad file is.
#[test]
fn check_config_loads_the_files_serve_loads() {
    let dir = tempfile::tempdir().unwrap();
    let pem = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (cert_a, key_a) = pem("a.example");
    let (_, key_b) = pem("b.example");
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let cert = file("cp.pem", &cert_a);
    let key = file("cp.key", &key_a);
    let other_key = file("other.key", &key_b);
    let token = file("admin.token", "secret\n");
    let empty = file("empty.token", "\n");
    let missing = dir.path().join("missing.key").display().to_string();
    let check = |body: String| {
        let config = file("cp.toml", &body);
        let out = Command::new(BIN)
            .args(["check-config", "--config", &config])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let good = format!("admin_token_file = \"{token}\"\n[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n");
    let (code, err) = check(good);
    assert_eq!(code, Some(0), "{err}");
    for (body, line, needle) in [
        (
            format!("admin_token_file = \"{token}\"\n[tls]\ncert = \"{cert}\"\nkey = \"{missing}\"\n"),
            4,
            "tls.key",
        ),
        (
            format!("admin_token_file = \"{}\"\n", dir.path().join("nope").display()),
            1,
            "admin_token_file",
        ),
        (format!("\nadmin_token_file = \"{empty}\"\n"), 2, "is empty"),
        (
            format!("[tls]\ncert = \"{cert}\"\nkey = \"{other_key}\"\n"),
            3,
            "is not the key of tls.cert",
        ),
        (
            format!("[tls]\ncert = \"{key}\"\nkey = \"{key}\"\n"),
            2,
            "no certificate",
        ),
        (
            format!("[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nreload_interval = \"0s\"\n"),
            4,
            "tls.reload_interval must be above 0",
        ),
    ] {
        let (code, err) = check(body);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(&format!("cp.toml:{line}:")), "{line}: {err}");
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

/// The leaf certificate the control plane at `addr` presents on a new
/// handshake, trusting `ca`.
async fn served_leaf(addr: std::net::SocketAddr, ca: &rustls_pki_types::CertificateDer<'static>) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// The `detour_certificate_expiry_timestamp_seconds` lines of `/metrics`.
async fn expiry_lines(cp: &Instance) -> Vec<String> {
    let text = cp
        .client
        .get(cp.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("detour_certificate_expiry_timestamp_seconds{"))
        .map(str::to_owned)
        .collect()
}

/// The server certificate rotates without a restart: a renewed pair in the
/// same files serves new handshakes after the next read (`reload_interval`),
/// and `detour_certificate_expiry_timestamp_seconds{cert="server"}` follows.
/// A pair that does not match (the key copied before the certificate) is
/// not used: the old one keeps serving and the failure is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_certificate_rotates_without_a_restart() {
    support::init();
    let db = Db::new(Backend::Sqlite, "tls_rotation").await.unwrap();
    let (cert, key, ca) = support::tls_files(db.dir.path());
    let config = db.config(
        "",
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nreload_interval = \"100ms\"\n",
            cert.display(),
            key.display()
        ),
    );
    let ca_der = ca.der().clone();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_der(&ca_der).unwrap()])
        .build()
        .unwrap();
    let cp = Instance::start_with(config, client, "https").await;
    let expiry = |der: &[u8]| {
        let (subject, not_after) =
            detour_control_plane::tls::cert_expiry(&rustls_pki_types::CertificateDer::from(der.to_vec()))
                .unwrap();
        format!(
            "detour_certificate_expiry_timestamp_seconds{{cert=\"server\",subject=\"{subject}\"}} {not_after}"
        )
    };
    let first = served_leaf(cp.addr, &ca_der).await;
    assert_eq!(expiry_lines(&cp).await, vec![expiry(&first)]);

    // A renewed pair, valid for another 10 days: the key lands first.
    let new_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(10);
    let renewed = params.signed_by(&new_key, &ca).unwrap();
    std::fs::write(&key, new_key.serialize_pem()).unwrap();
    let errors = || async {
        let text = cp
            .client
            .get(cp.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.contains("detour_cp_tls_reloads_total{result=\"error\"}")
    };
    support::wait_until(
        "the mismatched pair is refused",
        std::time::Duration::from_secs(5),
        errors,
    )
    .await;
    assert_eq!(
        served_leaf(cp.addr, &ca_der).await,
        first,
        "the old pair still serves"
    );
    assert_eq!(expiry_lines(&cp).await, vec![expiry(&first)]);

    // Then the certificate: the next read swaps them in.
    std::fs::write(&cert, renewed.pem()).unwrap();
    let new_leaf = renewed.der().to_vec();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while served_leaf(cp.addr, &ca_der).await != new_leaf {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate never served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(expiry_lines(&cp).await, vec![expiry(&new_leaf)]);
    let r = cp.client.get(cp.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    cp.stop().await;
}

/// `systemctl reload` (SIGHUP) reads the certificate at once, whatever
/// `reload_interval` says, in the real binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_the_server_certificate_again() {
    support::init();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (cert, key, ca) = support::tls_files(d);
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(
        d.join("cp.toml"),
        format!(
            "listen = \"{addr}\"\ndata_dir = \"{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nreload_interval = \"1h\"\n",
            d.join("data").display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    struct Server(std::process::Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut server = Server(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(d.join("cp.toml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ca_der = ca.der().clone();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_der(&ca_der).unwrap()])
        .build()
        .unwrap();
    let url = format!("https://{addr}/healthz");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !client.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(server.0.try_wait().unwrap().is_none(), "exited at start");
        assert!(std::time::Instant::now() < deadline, "never became healthy");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let first = served_leaf(addr, &ca_der).await;

    let new_key = rcgen::KeyPair::generate().unwrap();
    let renewed = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&new_key, &ca)
        .unwrap();
    std::fs::write(&key, new_key.serialize_pem()).unwrap();
    std::fs::write(&cert, renewed.pem()).unwrap();
    assert_eq!(served_leaf(addr, &ca_der).await, first, "not read before the HUP");
    let pid = server.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while served_leaf(addr, &ca_der).await != renewed.der().to_vec() {
        assert!(server.0.try_wait().unwrap().is_none(), "SIGHUP stopped it");
        assert!(std::time::Instant::now() < deadline, "the HUP did not rotate it");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

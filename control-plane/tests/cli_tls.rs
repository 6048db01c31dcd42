//! The command line (`check-config`, `migrate`, `token create`) and HTTPS
//! with HTTP/2 from a configured certificate.

mod support;

use std::process::Command;

use serde_json::json;
use support::{Backend, Db, Instance};

const BIN: &str = env!("CARGO_BIN_EXE_detour-control-plane");

#[test]
fn check_config_accepts_the_example_and_locates_errors() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/cp.toml");
    let out = Command::new(BIN)
        .args(["check-config", "--config", example])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_with_http2_and_http1() {
    support::init();
    let db = Db::new(Backend::Sqlite, "https").await.unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let cert = db.dir.path().join("cp.pem");
    let key = db.dir.path().join("cp.key");
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
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

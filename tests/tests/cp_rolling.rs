//! A control-plane deploy behind a real load balancer: two replicas on one
//! Postgres behind HAProxy (TCP mode, so TLS stays end to end; each replica
//! health-checked on `/readyz`), steady call traffic through an agent from
//! a call handler that never retries, and each replica restarted in turn
//! (SIGTERM's sequence: `/readyz` 503 for `shutdown.grace`, then the listener
//! closes and requests in flight drain). Zero failed calls, zero duplicates,
//! every call stored once.
//!
//! Needs root, the Debian `postgresql` and `haproxy` packages: otherwise it
//! prints SKIPPED, and in CI (`DETOUR_REQUIRE_POSTGRES=1`,
//! `DETOUR_REQUIRE_TOOLS=1`) it fails instead.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use detour_agent::Agent;
use detour_agent::config::AgentConfig;
use detour_lab::fleet::{CP_HOST, check_stored_once, counter_sum, cp_server_config, init_crypto};
use detour_lab::haproxy_squid::haproxy_balancer;
use detour_lab::load::{CallClient, CallResult, paced};
use detour_lab::pg::PrivatePostgres;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

fn skip() -> bool {
    let why = detour_lab::pg::unavailable().or_else(|| {
        std::process::Command::new("haproxy")
            .arg("-v")
            .output()
            .is_err()
            .then(|| "haproxy is not installed (apt-get install haproxy)".to_owned())
    });
    match why {
        None => false,
        Some(why) => {
            let required = std::env::var("DETOUR_REQUIRE_POSTGRES").as_deref() == Ok("1")
                || std::env::var("DETOUR_REQUIRE_TOOLS").as_deref() == Ok("1");
            assert!(
                !required,
                "the rolling-restart suite is required but cannot run: {why}"
            );
            eprintln!("SKIPPED: control-plane rolling restart: {why}");
            true
        }
    }
}

/// One control-plane replica served in-process, as `detour-control-plane
/// serve` does.
struct Replica {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

async fn start_replica(config: &detour_control_plane::Config, addr: SocketAddr) -> Replica {
    // The port was this replica's a moment ago: bind again until it is free.
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let config = config.clone();
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop_rx.await;
        };
        if let Err(e) = detour_control_plane::serve(config, listener, shutdown).await {
            panic!("replica stopped with an error: {e:#}");
        }
    });
    Replica { addr, stop, task }
}

/// `detour_cp_calls_total{outcome="created",priority="normal"}` on the
/// replica at `addr`.
async fn calls_created(addr: SocketAddr, ca: &Path) -> u64 {
    metric(
        addr,
        ca,
        "detour_cp_calls_total{outcome=\"created\",priority=\"normal\"}",
    )
    .await
}

/// The value of `series` on the replica at `addr` (its own `/metrics`, over
/// TLS); 0 when it has none.
async fn metric(addr: SocketAddr, ca: &Path, series: &str) -> u64 {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from(CP_HOST).unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header("host", CP_HOST)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let body = sender
        .send_request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_behind_haproxy_fails_and_duplicates_no_call() {
    if skip() {
        return;
    }
    init_crypto();
    let pg = tokio::task::spawn_blocking(PrivatePostgres::start)
        .await
        .unwrap()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    detour_agent::pki::init(&certs).unwrap();
    cp_server_config(&certs).unwrap();
    let admin_token = format!("lab-admin-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(dir.path().join("admin.token"), &admin_token).unwrap();
    let cp_toml = dir.path().join("cp.toml");
    std::fs::write(
        &cp_toml,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{data}\"\nadmin_token_file = \"{admin}\"\ndatabase_url = \"{url}\"\n\
             [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [shutdown]\ngrace = \"1s\"      # the balancer sees /readyz fail within 400 ms\ndrain_timeout = \"5s\"\n",
            data = dir.path().display(),
            admin = dir.path().join("admin.token").display(),
            url = pg.url(),
            cert = certs.join("cp.pem").display(),
            key = certs.join("cp.key").display(),
        ),
    )
    .unwrap();
    let config = detour_control_plane::Config::load(&cp_toml).unwrap();
    let token = detour_control_plane::create_agent_token(&config, "blr")
        .await
        .unwrap();
    std::fs::write(dir.path().join("agent.token"), token).unwrap();

    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut replicas = vec![
        start_replica(&config, any).await,
        start_replica(&config, any).await,
    ];
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let (_haproxy, front) = haproxy_balancer(dir.path(), &addrs).await.unwrap();

    std::fs::write(
        dir.path().join("agent.toml"),
        format!(
            "pop = \"blr\"\n[listen]\nlocal = \"127.0.0.1:0\"\nrelay = \"off\"\nadmin = \"127.0.0.1:0\"\n\
             [control_plane]\nurl = \"https://{CP_HOST}\"\naddresses = [\"{front}\"]\nca = \"certs/ca.pem\"\n\
             token_file = \"agent.token\"\nreport_interval = \"off\"\n[health]\ninterval = \"200ms\"\n"
        ),
    )
    .unwrap();
    let agent = Agent::start(AgentConfig::load(&dir.path().join("agent.toml")).unwrap())
        .await
        .unwrap();
    let local = format!("http://{}", agent.local_addr);
    let client = CallClient::strict(Duration::from_secs(3));
    let admin = format!("Bearer {admin_token}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = client
            .send(
                http::Method::PUT,
                &format!("{local}/v1/routes/india"),
                &[("authorization", &admin), ("content-type", "application/json")],
                Bytes::from_static(br#"{"prefix":"+91","trunk":"t1","pop":"blr"}"#),
            )
            .await;
        if r.status.is_some_and(|s| s < 300) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no route stored: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The other replica uses the route within `routing.refresh_interval`
    // (documented); calls start once both do.
    for r in &replicas {
        while metric(r.addr, &certs.join("ca.pem"), "detour_cp_route_rules").await < 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica {} never loaded the route",
                r.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // 25 calls/s for 14 s, each with its own key, never re-sent by the
    // client; replica 0 is restarted at 2 s, replica 1 once 0 is back.
    let calls = paced(25, Duration::from_secs(14), |n| {
        let (client, url) = (client.clone(), format!("{local}/v1/calls"));
        async move {
            let key = format!("rolling-{n}");
            let r = client
                .send(
                    http::Method::POST,
                    &url,
                    &[("idempotency-key", &key), ("content-type", "application/json")],
                    Bytes::from_static(br#"{"caller":"+919876543210","destination":"+918041234567"}"#),
                )
                .await;
            (key, r)
        }
    });
    let ca = certs.join("ca.pem");
    let roll = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut carried = 0;
        for replica in replicas.iter_mut() {
            let addr = replica.addr;
            carried += calls_created(addr, &ca).await;
            let old = std::mem::replace(replica, start_placeholder());
            let _ = old.stop.send(());
            old.task.await.unwrap();
            *replica = start_replica(&config, addr).await;
            // Back in the balancer after two passed checks.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        carried
    };
    let (done, carried) = tokio::join!(calls, roll);

    let failed: Vec<&(String, CallResult)> = done
        .iter()
        .map(|(_, r)| r)
        .filter(|(_, r)| r.status != Some(201))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed, first: {:?}",
        failed.len(),
        done.len(),
        failed.first()
    );
    assert!(
        carried > 0,
        "the restarted replicas carried no calls: the test proves nothing"
    );
    let ids: Vec<String> = done
        .iter()
        .map(|(_, (_, r))| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            v["call_id"].as_str().unwrap().to_owned()
        })
        .collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    check_stored_once(&config, &ids).await.unwrap();
    eprintln!(
        "rolling restart of 2 replicas behind HAProxy: {} calls, none failed, all stored once; \
         the restarted replicas had created {carried} before their restart",
        done.len()
    );
    let failed_attempts = counter_sum(&agent, "detour_attempts_total", "result", "failed");
    eprintln!("attempts that failed and were sent again by the agent: {failed_attempts}");
    agent.shutdown(detour_agent::agent::Stop::HandedOver).await;
    for r in replicas {
        let _ = r.stop.send(());
        let _ = r.task.await;
    }
}

/// A stand-in while a replica is being restarted.
fn start_placeholder() -> Replica {
    let (stop, _) = oneshot::channel();
    Replica {
        addr: "127.0.0.1:0".parse().unwrap(),
        stop,
        task: tokio::spawn(async {}),
    }
}

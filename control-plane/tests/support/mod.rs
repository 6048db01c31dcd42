//! Test support: control-plane instances on loopback sockets over SQLite or
//! a fresh Postgres database, a cuttable TCP proxy for "database down", and
//! waiting for conditions with deadlines.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use detour_control_plane::Config;
use detour_control_plane::store::Store;
use serde_json::Value;
use sqlx::Connection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, oneshot};
use tokio::task::JoinHandle;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// `DATABASE_URL` for the Postgres suite, or `None` (with a clear message)
/// when it is not set. With `DETOUR_REQUIRE_POSTGRES=1` a missing URL fails.
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if std::env::var("DETOUR_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!("{test}: DETOUR_REQUIRE_POSTGRES=1 but DATABASE_URL is not set");
            }
            eprintln!("SKIPPED: DATABASE_URL not set ({test} needs Postgres)");
            None
        }
    }
}

pub fn init() {
    rustls::crypto::ring::default_provider().install_default().ok();
}

/// A database for one test: a temp dir (SQLite) or a fresh Postgres database.
pub struct Db {
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    /// For Postgres: the URL of this test's own database.
    pub url: Option<String>,
    admin_url: Option<String>,
    name: Option<String>,
}

fn with_path(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let stem = match base.rfind('/') {
        Some(i) if i > base.find("://").map_or(0, |s| s + 2) => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{stem}/{db}?{q}"),
        None => format!("{stem}/{db}"),
    }
}

impl Db {
    /// `None` when the backend is Postgres and `DATABASE_URL` is not set.
    pub async fn new(backend: Backend, test: &str) -> Option<Db> {
        init();
        let dir = tempfile::tempdir().expect("tempdir");
        match backend {
            Backend::Sqlite => Some(Db {
                backend,
                dir,
                url: None,
                admin_url: None,
                name: None,
            }),
            Backend::Postgres => {
                let admin_url = postgres_url(test)?;
                let name = format!("t_{}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::PgConnection::connect(&admin_url)
                    .await
                    .expect("connect to DATABASE_URL");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("CREATE DATABASE");
                conn.close().await.ok();
                Some(Db {
                    backend,
                    dir,
                    url: Some(with_path(&admin_url, &name)),
                    admin_url: Some(admin_url),
                    name: Some(name),
                })
            }
        }
    }

    /// Drops the Postgres database (SQLite's temp dir goes with `self`).
    pub async fn finish(self) {
        if let (Some(admin), Some(name)) = (&self.admin_url, &self.name)
            && let Ok(mut conn) = sqlx::PgConnection::connect(admin).await
        {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await
            .ok();
            conn.close().await.ok();
        }
    }

    /// A config for this database, with `extra` TOML appended (it may add
    /// sections; top-level keys must come before any section, so `top` is
    /// inserted first).
    pub fn config(&self, top: &str, extra: &str) -> Config {
        self.config_with_url(self.url.as_deref(), top, extra)
    }

    pub fn config_with_url(&self, url: Option<&str>, top: &str, extra: &str) -> Config {
        let token_file = self.dir.path().join("admin.token");
        std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).expect("write admin token");
        let mut text = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nadmin_token_file = \"{}\"\n",
            self.dir.path().join("data").display(),
            token_file.display()
        );
        if let Some(url) = url {
            text.push_str(&format!("database_url = \"{url}\"\n"));
        }
        text.push_str(top);
        text.push('\n');
        text.push_str(extra);
        let file = self.dir.path().join("cp.toml");
        std::fs::write(&file, &text).expect("write cp.toml");
        Config::load(&file).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
    }
}

/// One running control plane.
pub struct Instance {
    pub addr: SocketAddr,
    pub base: String,
    pub config: Config,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Instance {
    pub async fn start(config: Config) -> Instance {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client");
        Self::start_with(config, client, "http").await
    }

    /// Starts with a given client and URL scheme (`https` for TLS tests).
    pub async fn start_with(config: Config, client: reqwest::Client, scheme: &str) -> Instance {
        init();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(detour_control_plane::serve(
            config.clone(),
            listener,
            async move {
                rx.await.ok();
            },
        ));
        let inst = Instance {
            addr,
            base: format!("{scheme}://{addr}"),
            config,
            client,
            stop: Some(tx),
            task: Some(task),
        };
        let client = inst.client.clone();
        let url = inst.url("/readyz");
        wait_until("instance ready", Duration::from_secs(20), || {
            let client = client.clone();
            let url = url.clone();
            async move {
                client
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        inst
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn token(&self, pop: &str) -> String {
        detour_control_plane::create_agent_token(&self.config, pop)
            .await
            .expect("create token")
    }

    pub async fn store(&self) -> Store {
        let s = Store::open(&self.config).await.expect("open store");
        s.migrate().await.expect("migrate");
        s
    }

    /// Starts the shutdown (what SIGTERM does) without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            tx.send(()).ok();
        }
    }

    pub async fn stop(mut self) {
        self.begin_stop();
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(Duration::from_secs(10), task).await {
                Ok(Ok(Ok(()))) => {}
                other => panic!("serve did not stop cleanly: {other:?}"),
            }
        }
    }

    pub async fn put_route(&self, name: &str, body: Value) -> reqwest::Response {
        self.client
            .put(self.url(&format!("/v1/routes/{name}")))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("PUT route")
    }

    pub async fn post_call(&self, token: &str, body: &Value, key: Option<&str>) -> reqwest::Response {
        let mut req = self
            .client
            .post(self.url("/v1/calls"))
            .bearer_auth(token)
            .json(body);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        req.send().await.expect("POST /v1/calls")
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            tx.send(()).ok();
        }
    }
}

/// Waits until `check` is true, polling every 20 ms; panics after `deadline`.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if check().await {
            return;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts a problem+json response and returns its body.
pub async fn problem(resp: reqwest::Response, status: u16) -> Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    assert_eq!(ct, "application/problem+json");
    let body: Value = resp.json().await.expect("problem body");
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string() && body["detail"].is_string(), "{body}");
    body
}

/// A loopback TCP proxy in front of a database that a test can cut (close
/// every connection and refuse new ones) and heal.
pub struct DbProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl DbProxy {
    pub async fn start(target: SocketAddr) -> DbProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (c2, conns2) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if c2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                            .await
                            .ok();
                    }
                });
                conns2.lock().await.push(task);
            }
        });
        DbProxy {
            addr,
            cut,
            conns,
            accept,
        }
    }

    /// The database is "down": every open connection is closed, new ones are
    /// closed on accept.
    pub async fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for t in self.conns.lock().await.drain(..) {
            t.abort();
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Host and port of a postgres:// URL.
pub fn pg_addr(url: &str) -> SocketAddr {
    let after = url.split("://").nth(1).expect("url");
    let hostport = after.rsplit('@').next().unwrap_or(after);
    let hostport = hostport.split('/').next().unwrap_or(hostport);
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport
        .parse()
        .expect("DATABASE_URL host must be a loopback IP:port")
}

/// `url` with its host:port replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("url");
    let (creds, hostpath) = match rest.rsplit_once('@') {
        Some((c, h)) => (format!("{c}@"), h),
        None => (String::new(), rest),
    };
    let path = hostpath.find('/').map_or("", |i| &hostpath[i..]);
    format!("{scheme}://{creds}{addr}{path}")
}

pub fn temp_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// A CA and a leaf for `127.0.0.1` issued by it, written as `cp.pem` and
/// `cp.key` in `dir`: for a control plane serving HTTPS in a test. Returns
/// the certificate and key paths and the CA.
pub fn tls_files(
    dir: &std::path::Path,
) -> (PathBuf, PathBuf, rcgen::CertifiedIssuer<'static, rcgen::KeyPair>) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf");
    let cert = dir.join("cp.pem");
    let key = dir.join("cp.key");
    std::fs::write(&cert, leaf.pem()).expect("write cert");
    std::fs::write(&key, leaf_key.serialize_pem()).expect("write key");
    (cert, key, ca)
}

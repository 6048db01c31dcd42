//! A fast stand-in for the control plane: HTTPS (HTTP/2 and HTTP/1.1 by
//! ALPN) or plain HTTP, recording every request it receives. In-process
//! ([`MockCp::start`]) for the loopback fleet and tests; as its own
//! `detour-lab mock-cp` process ([`MockCpProcess::start`] on loopback,
//! [`command_args`] for other hosts such as network namespaces), which keeps
//! nothing, for runs that must not share a runtime with it.
//!
//! Routes: `GET /healthz` -> 200; `/stream/{bytes}` -> a streamed body of that
//! many bytes; `/status/{code}` -> that status; `/slow/{ms}` -> answers after
//! that long; anything else echoes the request body with `x-echo-*` headers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::process::{Proc, free_port, loopback, sibling, wait_listening};

/// One request as the control plane saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub remote: SocketAddr,
    /// Whether it arrived over TLS.
    pub tls: bool,
    pub version: http::Version,
}

#[derive(Default)]
pub struct Recorder {
    pub seen: Mutex<Vec<Seen>>,
    /// Requests per Idempotency-Key (the real control plane deduplicates on it).
    pub by_key: Mutex<HashMap<String, u32>>,
    pub healthz: AtomicU64,
    /// Answer without keeping anything: a long-running `detour-lab mock-cp`
    /// process (benchmarks, namespaces) would otherwise grow by every request.
    pub forgetful: AtomicBool,
}

impl Recorder {
    /// Requests other than health probes.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn find(&self, path_fragment: &str) -> Option<Seen> {
        self.requests()
            .into_iter()
            .find(|s| s.path_and_query.contains(path_fragment))
    }
}

/// A running mock control plane.
pub struct MockCp {
    pub addr: SocketAddr,
    pub recorder: Arc<Recorder>,
    stop: watch::Sender<bool>,
}

impl Drop for MockCp {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

impl MockCp {
    /// Starts on a free loopback port; TLS when `tls` is given.
    pub async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> std::io::Result<MockCp> {
        Self::start_on("127.0.0.1:0".parse().expect("static address"), tls).await
    }

    /// Starts on `addr` (to restart a control plane on the same port).
    pub async fn start_on(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<MockCp> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let recorder = Arc::new(Recorder::default());
        let (stop, stop_rx) = watch::channel(false);
        let rec = recorder.clone();
        let acceptor = tls.map(TlsAcceptor::from);
        tokio::spawn(async move {
            let mut stop_rx = stop_rx;
            loop {
                let (tcp, remote) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stop_rx.changed() => return,
                };
                let _ = tcp.set_nodelay(true);
                let rec = rec.clone();
                let acceptor = acceptor.clone();
                let mut conn_stop = stop_rx.clone();
                tokio::spawn(async move {
                    let is_tls = acceptor.is_some();
                    let service = service_fn(move |req| handle(rec.clone(), remote, is_tls, req));
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    // The real control plane's head limit (limits.max_header_bytes).
                    builder.http2().max_header_list_size(64 * 1024);
                    builder.http1().max_buf_size(64 * 1024);
                    match acceptor {
                        Some(a) => {
                            let Ok(Ok(tls)) =
                                tokio::time::timeout(Duration::from_secs(5), a.accept(tcp)).await
                            else {
                                return;
                            };
                            tokio::select! {
                                _ = builder.serve_connection(TokioIo::new(tls), service) => {}
                                _ = conn_stop.changed() => {}
                            }
                        }
                        None => {
                            tokio::select! {
                                _ = builder.serve_connection(TokioIo::new(tcp), service) => {}
                                _ = conn_stop.changed() => {}
                            }
                        }
                    }
                });
            }
        });
        Ok(MockCp { addr, recorder, stop })
    }
}

async fn handle(
    rec: Arc<Recorder>,
    remote: SocketAddr,
    tls: bool,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        rec.healthz.fetch_add(1, Ordering::Relaxed);
        return Ok(Response::new(full("ok\n")));
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let keep = !rec.forgetful.load(Ordering::Relaxed);
    if keep && let Some(k) = parts.headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        *rec.by_key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(k.to_owned())
            .or_insert(0) += 1;
    }
    if keep {
        rec.seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
            method: parts.method.clone(),
            path_and_query: pq,
            headers: parts.headers.clone(),
            body: body.clone(),
            remote,
            tls,
            version: parts.version,
        });
    }
    if let Some(n) = path.strip_prefix("/stream/") {
        let total: usize = n.parse().unwrap_or(0);
        let chunk = 64 * 1024;
        let stream = futures_util::stream::iter((0..total.div_ceil(chunk)).map(move |i| {
            let len = chunk.min(total - i * chunk);
            let bytes: Vec<u8> = (0..len).map(|j| ((i * chunk + j) % 251) as u8).collect();
            Ok::<_, Infallible>(Frame::data(Bytes::from(bytes)))
        }));
        return Ok(Response::new(BodyExt::boxed(StreamBody::new(stream))));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::OK);
        let mut r = Response::new(full(format!("status {}\n", status.as_u16())));
        *r.status_mut() = status;
        if status.is_redirection() {
            // Where a call flow's branch would go; nobody should follow it.
            r.headers_mut()
                .insert("location", "/v1/flows/branch-b".parse().expect("static"));
        }
        return Ok(r);
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        let ms: u64 = ms.parse().unwrap_or(0).min(10_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut r = Response::new(full(body));
    r.headers_mut().insert(
        "x-echo-method",
        parts.method.as_str().parse().expect("method is a header value"),
    );
    r.headers_mut()
        .insert("x-echo-tls", if tls { "1" } else { "0" }.parse().expect("static"));
    Ok(r)
}

/// The pattern of byte `i` in a `/stream/` body, for checking it arrived intact.
pub fn stream_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// A TLS server configuration (h2 + HTTP/1.1) from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(cert)?.collect::<Result<_, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)?;
    let mut cfg =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The arguments of `detour-lab mock-cp` listening on `listen`, serving
/// HTTPS with `tls` (certificate, key) when given.
pub fn command_args(listen: &str, tls: Option<(&Path, &Path)>) -> Vec<String> {
    let mut args = vec!["mock-cp".to_owned(), "--listen".to_owned(), listen.to_owned()];
    if let Some((cert, key)) = tls {
        args.extend(["--cert".to_owned(), cert.display().to_string()]);
        args.extend(["--key".to_owned(), key.display().to_string()]);
    }
    args
}

/// `detour-lab mock-cp` as its own process on loopback, plain HTTP or
/// HTTPS; killed on drop.
pub struct MockCpProcess {
    pub addr: SocketAddr,
    _proc: Proc,
}

impl MockCpProcess {
    /// Starts it on a free loopback port and waits until it listens.
    pub async fn start() -> anyhow::Result<MockCpProcess> {
        Self::start_with(None).await
    }

    /// The same, serving HTTPS with `tls` (certificate, key) when given.
    pub async fn start_with(tls: Option<(&Path, &Path)>) -> anyhow::Result<MockCpProcess> {
        let addr = loopback(free_port()?);
        let child = Command::new(sibling("detour-lab")?)
            .args(command_args(&addr.to_string(), tls))
            .stdout(Stdio::null())
            .spawn()
            .context("starting the mock control plane")?;
        let proc = Proc(child);
        wait_listening(addr).await.context("mock control plane")?;
        Ok(MockCpProcess { addr, _proc: proc })
    }
}

/// What `detour-lab mock-cp` runs: the stand-in on `listen` (HTTPS with
/// `cert` and `key`), keeping nothing, until Ctrl-C.
pub async fn serve(listen: SocketAddr, cert: Option<PathBuf>, key: Option<PathBuf>) -> anyhow::Result<()> {
    let tls = match (cert, key) {
        (Some(c), Some(k)) => Some(server_config(&c, &k)?),
        _ => None,
    };
    let cp = MockCp::start_on(listen, tls).await?;
    cp.recorder.forgetful.store(true, Ordering::Relaxed);
    println!("mock control plane listening on {}", cp.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}

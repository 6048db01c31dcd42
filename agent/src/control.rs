//! The control socket (`listen.control`): runtime changes to a running
//! agent, on a Unix socket whose file mode is the access control (like
//! HAProxy's admin socket). `detour-agent peer drain|undrain NAME` speaks
//! to it.
//!
//! - `GET /peers`: each peer, whether the peers file enables it and whether
//!   it is drained at runtime.
//! - `POST /peers/{name}/drain`, `POST /peers/{name}/undrain`: see
//!   [`Shared::set_drained`].

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use detour_wire::Problem;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::ingress::{Body, full, problem};
use crate::runtime::{DrainError, Shared};

/// File mode of the socket: the agent's user and group may change it.
const MODE: u32 = 0o660;

/// One peer as `GET /peers` and the drain calls describe it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerControl {
    pub name: String,
    /// `enabled` in the peers file.
    pub enabled: bool,
    /// Drained at runtime.
    pub drained: bool,
}

/// Binds the control socket at `path`, replacing a socket file left by an
/// earlier process (never any other kind of file).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    // systemd makes the runtime directory (0700); elsewhere the agent does.
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "listen.control: {} exists and is not a socket",
                path.display()
            )));
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("listen.control: {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(MODE))?;
    Ok(listener)
}

/// Serves the control socket until `shutdown` turns true.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            c = listener.accept() => match c {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(crate::admin::serve_conn(stream, move |req| {
            handle(shared.clone(), req)
        }));
    }
}

/// Every peer of the running config with its drain state.
pub fn peers(shared: &Shared) -> Vec<PeerControl> {
    let rt = shared.forwarder.runtime();
    let drained = shared.drained();
    rt.config
        .peers
        .iter()
        .map(|p| PeerControl {
            name: p.name.clone(),
            enabled: p.enabled,
            drained: drained.contains(&p.name),
        })
        .collect()
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let resp = match (req.method(), parts.as_slice()) {
        (&Method::GET, ["peers"]) => json(StatusCode::OK, &peers(&shared)),
        (&Method::POST, ["peers", name, action @ ("drain" | "undrain")]) => {
            let drain = *action == "drain";
            match shared.set_drained(name, drain) {
                Ok(changed) => {
                    let peer = peers(&shared).into_iter().find(|p| p.name == *name);
                    json(
                        StatusCode::OK,
                        &serde_json::json!({"peer": peer, "changed": changed}),
                    )
                }
                Err(DrainError::UnknownPeer(n)) => problem(Problem::new(
                    404,
                    "Unknown peer",
                    format!("no peer named `{n}` in the running config (see `detour-agent status`)"),
                )),
                Err(e) => problem(Problem::new(
                    500,
                    "Drain not applied",
                    format!("{e}; the running config is unchanged"),
                )),
            }
        }
        // A known resource asked with the wrong method.
        (m, ["peers"]) => not_allowed(m, "GET"),
        (m, ["peers", _, "drain" | "undrain"]) => not_allowed(m, "POST"),
        _ => problem(Problem::new(
            404,
            "Not found",
            "the control socket serves GET /peers and POST /peers/{name}/drain|undrain",
        )),
    };
    Ok(resp)
}

/// 405 with the method that resource takes in `Allow`.
fn not_allowed(method: &Method, allow: &'static str) -> Response<Body> {
    let mut r = problem(Problem::new(
        405,
        "Method not allowed",
        format!("{method} is not served here; use {allow}"),
    ));
    r.headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    r
}

/// Sends one request to the control socket at `socket`: the status code
/// and the body. For `detour-agent peer`.
pub async fn call(socket: &Path, method: Method, path: &str) -> anyhow::Result<(StatusCode, String)> {
    use http_body_util::BodyExt;
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the agent's control socket {}: {e} (is the agent running with listen.control set, and may this user open the socket?)",
            socket.display()
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "detour-agent")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| anyhow::anyhow!("the agent did not answer on {} within 10 s", socket.display()))??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `detour-agent peer list|drain|undrain`: asks the agent at `socket` and
/// prints the outcome. Errors say what to do.
pub async fn peer_command(socket: &Path, action: &str, name: Option<&str>) -> anyhow::Result<()> {
    let (method, path) = match (action, name) {
        ("list", _) => (Method::GET, "/peers".to_owned()),
        ("drain" | "undrain", Some(n)) => (Method::POST, format!("/peers/{n}/{action}")),
        _ => anyhow::bail!("usage: detour-agent peer list | drain NAME | undrain NAME"),
    };
    let (status, body) = call(socket, method, &path).await?;
    if !status.is_success() {
        let detail = serde_json::from_str::<Problem>(&body)
            .ok()
            .and_then(|p| p.detail)
            .unwrap_or(body);
        anyhow::bail!("{detail}");
    }
    if action == "list" {
        let peers: Vec<PeerControl> = serde_json::from_str(&body)?;
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::NOTHING);
        table.set_header(["PEER", "IN FILE", "RUNTIME"]);
        for p in &peers {
            table.add_row([
                p.name.as_str(),
                if p.enabled { "enabled" } else { "disabled" },
                if p.drained { "drained" } else { "-" },
            ]);
        }
        println!("{table}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let name = name.unwrap_or_default();
    let changed = v["changed"].as_bool().unwrap_or(false);
    match (action, changed) {
        ("drain", true) => println!(
            "{name}: drained; no new requests go through it (`detour-agent peer undrain {name}` to restore)"
        ),
        ("drain", false) => println!("{name}: already drained"),
        (_, true) => println!("{name}: undrained; it takes requests again when its paths are up"),
        (_, false) => println!("{name}: was not drained"),
    }
    if v["peer"]["enabled"] == false {
        println!("{name}: note: `enabled = false` in the peers file keeps it out of service anyway");
    }
    Ok(())
}

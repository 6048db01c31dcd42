//! Configuration: `agent.toml` and the peers file, parsed, validated as a whole
//! and turned into the runtime [`AgentConfig`].
//!
//! Loading happens in two steps. The files are first read into `raw` structs
//! that keep every value's location, then `validate` checks everything at once
//! and reports each problem as `file:line:col: message`, the way `haproxy -c`
//! and `nginx -t` do. Only a config without a single problem becomes an
//! [`AgentConfig`]; the running agent never sees a half-valid one.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::tls::{self, TlsMaterial};

/// One problem in a config file, with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            detour_wire::printable(&self.file.display().to_string()),
            self.line,
            self.col,
            detour_wire::printable(&self.message)
        )
    }
}

/// Every problem found in one load, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The validated configuration a running agent uses.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This agent's PoP name; also the name in its certificate.
    pub pop: String,
    pub listen: Listen,
    pub control_plane: ControlPlane,
    /// This agent's identity on the peer mesh. Present whenever the relay
    /// listens or peers are configured.
    pub tls: Option<Arc<TlsMaterial>>,
    pub health: Health,
    pub forward: Forward,
    pub ingress: Ingress,
    pub relay: RelayLimits,
    /// The peer list, in file order.
    pub peers: Vec<Peer>,
    /// Where the config came from, for reloads and messages.
    pub files: ConfigFiles,
}

/// The files a config was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFiles {
    pub agent: PathBuf,
    pub peers: Option<PathBuf>,
}

/// Listener addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Call handler -> agent, plain HTTP/1.1.
    pub local: SocketAddr,
    /// Peers -> agent, mutual TLS. `None` turns the relay off.
    pub relay: Option<SocketAddr>,
    /// `/metrics`, `/status`, `/healthz`, `/readyz`.
    pub admin: SocketAddr,
}

/// Where the control plane is and how to talk to it.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// Base URL; request paths are appended to its path.
    pub url: http::Uri,
    /// `true` for `https`.
    pub tls: bool,
    /// Host name from the URL, used for SNI, certificate checks and `Host`.
    pub host: String,
    pub port: u16,
    /// The path part of the URL without a trailing slash (often empty).
    pub base_path: String,
    /// Addresses to dial instead of resolving `host` (pinned IPs, labs).
    pub addresses: Vec<SocketAddr>,
    /// Extra CA certificates trusted for the control plane, besides the system roots.
    pub ca: Option<PathBuf>,
    /// That file's certificates as read at load (a reload compares contents).
    pub ca_certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Bearer token sent on every request when set.
    pub token: Option<String>,
    /// How often the agent reports its path table to the control plane
    /// (`POST /v1/agents/{pop}/report`, the fleet view); `None` = never.
    pub report_interval: Option<Duration>,
    /// `host_header()` as a header value, built once (request path).
    pub host_value: Option<http::HeaderValue>,
    /// `Bearer <token>` as a header value, built once (request path).
    pub auth_value: Option<http::HeaderValue>,
}

impl ControlPlane {
    /// `host:port` as it appears in a CONNECT request and in `Host`.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The `Host` header value: the port is left out when it is the default.
    pub fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            self.authority()
        }
    }
}

/// Health checking of every path.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// Time between probes of one path (jittered by up to 10%).
    pub interval: Duration,
    /// Path probed on the control plane through every path.
    pub path: String,
    /// Bounds of the adaptive probe timeout.
    pub timeout_min: Duration,
    pub timeout_max: Duration,
    /// Consecutive good probes a path needs to come back up.
    pub rise: u32,
    /// Consecutive hard failures that take a path down.
    pub fall: u32,
    /// Failure ratio over the window above which a path is degraded.
    pub degraded_loss: f64,
    /// Number of recent exchanges (probes and requests) the loss ratio is over.
    pub window: usize,
    /// First hold-down after a path flaps; doubles on every flap.
    pub hold_down_min: Duration,
    /// Upper bound of the hold-down.
    pub hold_down_max: Duration,
}

/// How requests are sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// Force one path: `direct` or `via:<peer>`.
    pub pin: Option<String>,
    /// Total time a request may take in the agent before it fails with 503.
    pub deadline: Duration,
    /// Bounds of one attempt's time to response headers.
    pub attempt_timeout_min: Duration,
    pub attempt_timeout_max: Duration,
    /// Attempt timeout = this factor x the path's recent p99 RTT, within the bounds.
    pub attempt_timeout_factor: f64,
    /// Connect timeout to the control plane or a peer relay.
    pub connect_timeout: Duration,
    /// Hedge normal requests on the next path once they exceed the path's p95.
    pub hedge: bool,
    /// Retries and hedges may add this share of recent requests...
    pub retry_budget_ratio: f64,
    /// ...plus this many per second, whatever the traffic.
    pub retry_budget_min_per_sec: u32,
    /// Requests whose path starts with one of these are emergency requests.
    pub emergency_path_prefixes: Vec<String>,
}

/// The call handler side.
#[derive(Debug, Clone, PartialEq)]
pub struct Ingress {
    /// Largest request body accepted; beyond it the answer is 413.
    pub max_body: u64,
    /// Largest request head (request line and headers) accepted; beyond it
    /// the answer is 431. Kept below what the control plane accepts (64 KiB,
    /// `limits.max_header_bytes`): over four times that, HTTP/2 drops the
    /// whole connection, and every request multiplexed on it.
    pub max_header_bytes: usize,
    /// A client must send its complete request head within this time of
    /// its first byte.
    pub header_timeout: Duration,
    /// A kept-alive connection with nothing in flight is closed after this
    /// long without a byte. Long, so that a call handler's pool (Go's 90 s,
    /// most others less) closes idle connections before the agent does.
    pub idle_timeout: Duration,
    /// Connections from call handlers open at once; more are closed at once.
    pub max_connections: usize,
    /// A client must send its complete body within this time.
    pub body_timeout: Duration,
    /// On SIGTERM, in-flight requests get this long to finish.
    pub drain_timeout: Duration,
}

/// Limits of the peer relay.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayLimits {
    /// A peer must finish its TLS handshake and send CONNECT within this time.
    pub handshake_timeout: Duration,
    /// A tunnel with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Tunnels open at once from all peers.
    pub max_tunnels: usize,
    /// Tunnels open at once from one peer.
    pub max_tunnels_per_peer: usize,
}

/// One peer agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's PoP name, which its certificate must carry.
    pub name: String,
    /// `host:port` of the peer's relay listener.
    pub relay: String,
    /// Preference among healthy peers; higher is preferred.
    pub weight: u32,
    /// `false` drains the peer without deleting it.
    pub enabled: bool,
}

impl Peer {
    /// The path name: `via:<name>`.
    pub fn path_name(&self) -> String {
        format!("via:{}", self.name)
    }
}

mod raw {
    //! The files as written, with locations.

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Agent {
        pub pop: Spanned<String>,
        pub listen: Option<Listen>,
        pub control_plane: Spanned<ControlPlane>,
        pub tls: Option<Spanned<Tls>>,
        #[serde(default)]
        pub health: Health,
        #[serde(default)]
        pub forward: Forward,
        #[serde(default)]
        pub ingress: Ingress,
        #[serde(default)]
        pub relay: Relay,
        pub peers: Option<PeersRef>,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Listen {
        pub local: Option<Spanned<String>>,
        pub relay: Option<Spanned<String>>,
        pub admin: Option<Spanned<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ControlPlane {
        pub url: Spanned<String>,
        #[serde(default)]
        pub addresses: Vec<Spanned<String>>,
        pub ca: Option<Spanned<String>>,
        pub token_file: Option<Spanned<String>>,
        pub report_interval: Option<Spanned<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tls {
        pub ca: Spanned<String>,
        pub cert: Spanned<String>,
        pub key: Spanned<String>,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Health {
        pub interval: Option<Spanned<String>>,
        pub path: Option<Spanned<String>>,
        pub timeout_min: Option<Spanned<String>>,
        pub timeout_max: Option<Spanned<String>>,
        pub rise: Option<Spanned<u32>>,
        pub fall: Option<Spanned<u32>>,
        pub degraded_loss: Option<Spanned<f64>>,
        pub window: Option<Spanned<u32>>,
        pub hold_down_min: Option<Spanned<String>>,
        pub hold_down_max: Option<Spanned<String>>,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Forward {
        pub pin: Option<Spanned<String>>,
        pub deadline: Option<Spanned<String>>,
        pub attempt_timeout_min: Option<Spanned<String>>,
        pub attempt_timeout_max: Option<Spanned<String>>,
        pub attempt_timeout_factor: Option<Spanned<f64>>,
        pub connect_timeout: Option<Spanned<String>>,
        pub hedge: Option<bool>,
        pub retry_budget_ratio: Option<Spanned<f64>>,
        pub retry_budget_min_per_sec: Option<u32>,
        #[serde(default)]
        pub emergency_path_prefixes: Vec<Spanned<String>>,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Ingress {
        pub max_body: Option<Spanned<toml::Value>>,
        pub max_header_bytes: Option<Spanned<toml::Value>>,
        pub header_timeout: Option<Spanned<String>>,
        pub idle_timeout: Option<Spanned<String>>,
        pub max_connections: Option<Spanned<u32>>,
        pub body_timeout: Option<Spanned<String>>,
        pub drain_timeout: Option<Spanned<String>>,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Relay {
        pub handshake_timeout: Option<Spanned<String>>,
        pub idle_timeout: Option<Spanned<String>>,
        pub max_tunnels: Option<Spanned<u32>>,
        pub max_tunnels_per_peer: Option<Spanned<u32>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct PeersRef {
        pub file: Spanned<String>,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct PeersFile {
        #[serde(default)]
        pub peer: Vec<Spanned<Peer>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Peer {
        pub name: Spanned<String>,
        pub relay: Spanned<String>,
        pub weight: Option<Spanned<i64>>,
        pub enabled: Option<bool>,
    }
}

/// Collects problems against one file's text.
struct Diag<'a> {
    file: &'a Path,
    text: &'a str,
    errors: &'a mut Vec<ConfigError>,
}

impl Diag<'_> {
    fn at(&mut self, offset: usize, message: impl Into<String>) {
        let (line, col) = line_col(self.text, offset);
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            col,
            message: message.into(),
        });
    }

    fn span<T>(&mut self, value: &Spanned<T>, message: impl Into<String>) {
        self.at(value.span().start, message);
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

fn parse_toml<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    match toml::from_str::<T>(text) {
        Ok(v) => Some(v),
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            let message = e.message().trim().to_owned();
            Diag { file, text, errors }.at(offset, message);
            None
        }
    }
}

/// Parses a human duration such as `500ms`, `2s` or `1m 30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. \"500ms\" or \"2s\""))
}

/// Parses a byte size: an integer, or a number with `B`, `KiB`, `MiB`, `KB`, `MB`.
/// Default of `ingress.max_header_bytes`: nginx's default request-head
/// limit too (4 x 8 KiB).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// hyper's smallest read buffer.
const MIN_HEADER_BYTES: usize = 8 * 1024;
/// Below the control plane's 64 KiB by room for what the agent adds: its
/// own headers (`Authorization`, `Idempotency-Key`, `X-Request-Id`) and
/// HTTP/2's 32 bytes of accounting per header (100 headers: 3.2 KiB).
const MAX_HEADER_BYTES: usize = 48 * 1024;

pub fn parse_size(value: &toml::Value) -> Result<u64, String> {
    match value {
        toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64),
        toml::Value::String(s) => {
            let t = s.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let n: u64 = num
                .parse()
                .map_err(|_| format!("`{s}` is not a size; write e.g. \"1MiB\" or 1048576"))?;
            let mult = match unit.trim() {
                "" | "B" => 1,
                "KiB" => 1024,
                "MiB" => 1024 * 1024,
                "KB" | "kB" => 1000,
                "MB" => 1_000_000,
                other => return Err(format!("unknown size unit `{other}`; use B, KiB, MiB, KB or MB")),
            };
            n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
        }
        _ => Err("expected a size such as \"1MiB\" or a number of bytes".to_owned()),
    }
}

/// Whether `s` is a usable PoP name: lowercase letters, digits and `-`, 1 to 32 characters.
pub fn valid_pop_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Checks `host:port` where host is an IP address or a DNS name.
pub fn valid_host_port(s: &str) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("`{s}` is not host:port"));
    };
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("`{s}` has no valid port"));
    }
    let ok_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok_host {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not host:port (host must be an IP address or DNS name)"
        ))
    }
}

impl AgentConfig {
    /// Reads and validates `agent.toml` and the peers file it names.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line: 1,
                col: 1,
                message: format!("cannot read config: {e}"),
            }])
        })?;
        Self::from_str_at(path, &text)
    }

    /// Validates `agent.toml` given as text; `path` locates relative file
    /// names and messages.
    pub fn from_str_at(path: &Path, text: &str) -> Result<AgentConfig, ConfigErrors> {
        let mut errors = Vec::new();
        let config = validate(path, text, &mut errors);
        match config {
            Some(c) if errors.is_empty() => Ok(c),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(p)
    }
}

fn duration_or(d: &mut Diag<'_>, key: &str, v: &Option<Spanned<String>>, default: Duration) -> Duration {
    match v {
        None => default,
        Some(s) => match parse_duration(s.get_ref()) {
            Ok(dur) if dur > Duration::ZERO => dur,
            Ok(_) => {
                d.span(s, format!("{key}: must be greater than zero"));
                default
            }
            Err(e) => {
                d.span(s, format!("{key}: {e}"));
                default
            }
        },
    }
}

fn addr_or(d: &mut Diag<'_>, key: &str, v: &Option<Spanned<String>>, default: &str) -> SocketAddr {
    let fallback: SocketAddr = default.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
    match v {
        None => fallback,
        Some(s) => s.get_ref().parse().unwrap_or_else(|_| {
            d.span(
                s,
                format!("{key}: `{}` is not an IP:port socket address", s.get_ref()),
            );
            fallback
        }),
    }
}

fn validate(path: &Path, text: &str, errors: &mut Vec<ConfigError>) -> Option<AgentConfig> {
    let raw: raw::Agent = parse_toml(path, text, errors)?;
    let mut d = Diag {
        file: path,
        text,
        errors,
    };

    let pop = raw.pop.get_ref().clone();
    if !valid_pop_name(&pop) {
        d.span(
            &raw.pop,
            format!("pop: `{pop}` is not a PoP name (lowercase letters, digits and '-', at most 32)"),
        );
    }

    let rl = raw.listen.unwrap_or_default();
    let listen = Listen {
        local: addr_or(&mut d, "listen.local", &rl.local, "127.0.0.1:8080"),
        relay: match &rl.relay {
            None => None,
            Some(s) if s.get_ref().is_empty() || s.get_ref() == "off" => None,
            Some(_) => Some(addr_or(&mut d, "listen.relay", &rl.relay, "0.0.0.0:4443")),
        },
        admin: addr_or(&mut d, "listen.admin", &rl.admin, "127.0.0.1:9090"),
    };
    {
        let mut seen: Vec<(SocketAddr, &str)> =
            vec![(listen.local, "listen.local"), (listen.admin, "listen.admin")];
        if let Some(r) = listen.relay {
            seen.push((r, "listen.relay"));
        }
        for i in 0..seen.len() {
            for j in i + 1..seen.len() {
                if seen[i].0 == seen[j].0 && seen[i].0.port() != 0 {
                    d.at(
                        0,
                        format!("{} and {} are both {}", seen[i].1, seen[j].1, seen[i].0),
                    );
                }
            }
        }
    }

    let control_plane = control_plane(&mut d, path, &raw.control_plane);

    let tls = match &raw.tls {
        None => None,
        Some(t) => {
            let t_ref = t.get_ref();
            let ca = resolve(path, t_ref.ca.get_ref());
            let cert = resolve(path, t_ref.cert.get_ref());
            let key = resolve(path, t_ref.key.get_ref());
            let mut ok = true;
            for (k, v, p) in [
                ("tls.ca", &t_ref.ca, &ca),
                ("tls.cert", &t_ref.cert, &cert),
                ("tls.key", &t_ref.key, &key),
            ] {
                if let Err(e) = std::fs::metadata(p).and_then(|_| std::fs::File::open(p).map(|_| ())) {
                    d.span(v, format!("{k}: cannot read {}: {e}", p.display()));
                    ok = false;
                }
            }
            if ok {
                match tls::TlsMaterial::load(&ca, &cert, &key) {
                    Ok(m) => {
                        if valid_pop_name(&pop) && !m.names.iter().any(|n| n == &pop) {
                            d.span(
                                &t_ref.cert,
                                format!(
                                    "tls.cert: certificate is for {:?}, not for this PoP `{pop}`",
                                    m.names
                                ),
                            );
                        }
                        Some(Arc::new(m))
                    }
                    Err(e) => {
                        let at = match e.field {
                            tls::Field::Ca => &t_ref.ca,
                            tls::Field::Cert => &t_ref.cert,
                            tls::Field::Key => &t_ref.key,
                        };
                        d.span(at, e.message);
                        None
                    }
                }
            } else {
                None
            }
        }
    };

    let h = &raw.health;
    let health = Health {
        interval: duration_or(&mut d, "health.interval", &h.interval, Duration::from_millis(500)),
        path: match &h.path {
            Some(p) if !p.get_ref().starts_with('/') => {
                d.span(p, "health.path: must start with '/'");
                "/healthz".to_owned()
            }
            Some(p) => p.get_ref().clone(),
            None => "/healthz".to_owned(),
        },
        timeout_min: duration_or(
            &mut d,
            "health.timeout_min",
            &h.timeout_min,
            Duration::from_millis(150),
        ),
        timeout_max: duration_or(
            &mut d,
            "health.timeout_max",
            &h.timeout_max,
            Duration::from_secs(1),
        ),
        rise: positive(&mut d, "health.rise", &h.rise, 3),
        fall: positive(&mut d, "health.fall", &h.fall, 2),
        degraded_loss: ratio(&mut d, "health.degraded_loss", &h.degraded_loss, 0.05),
        window: positive(&mut d, "health.window", &h.window, 40) as usize,
        hold_down_min: duration_or(
            &mut d,
            "health.hold_down_min",
            &h.hold_down_min,
            Duration::from_secs(2),
        ),
        hold_down_max: duration_or(
            &mut d,
            "health.hold_down_max",
            &h.hold_down_max,
            Duration::from_secs(60),
        ),
    };
    if health.timeout_min > health.timeout_max
        && let Some(s) = &h.timeout_min
    {
        d.span(s, "health.timeout_min: is greater than health.timeout_max");
    }
    if health.hold_down_min > health.hold_down_max
        && let Some(s) = &h.hold_down_min
    {
        d.span(s, "health.hold_down_min: is greater than health.hold_down_max");
    }

    let f = &raw.forward;
    let forward = Forward {
        pin: f.pin.as_ref().map(|p| p.get_ref().clone()),
        deadline: duration_or(
            &mut d,
            "forward.deadline",
            &f.deadline,
            Duration::from_millis(1800),
        ),
        attempt_timeout_min: duration_or(
            &mut d,
            "forward.attempt_timeout_min",
            &f.attempt_timeout_min,
            Duration::from_millis(150),
        ),
        attempt_timeout_max: duration_or(
            &mut d,
            "forward.attempt_timeout_max",
            &f.attempt_timeout_max,
            Duration::from_secs(1),
        ),
        attempt_timeout_factor: match &f.attempt_timeout_factor {
            Some(v) if !(*v.get_ref() >= 1.0 && v.get_ref().is_finite()) => {
                d.span(v, "forward.attempt_timeout_factor: must be at least 1.0");
                3.0
            }
            Some(v) => *v.get_ref(),
            None => 3.0,
        },
        connect_timeout: duration_or(
            &mut d,
            "forward.connect_timeout",
            &f.connect_timeout,
            Duration::from_millis(500),
        ),
        hedge: f.hedge.unwrap_or(true),
        retry_budget_ratio: ratio(&mut d, "forward.retry_budget_ratio", &f.retry_budget_ratio, 0.2),
        retry_budget_min_per_sec: f.retry_budget_min_per_sec.unwrap_or(10),
        emergency_path_prefixes: f
            .emergency_path_prefixes
            .iter()
            .filter_map(|p| {
                if p.get_ref().starts_with('/') {
                    Some(p.get_ref().clone())
                } else {
                    d.span(
                        p,
                        "forward.emergency_path_prefixes: each prefix must start with '/'",
                    );
                    None
                }
            })
            .collect(),
    };
    if forward.attempt_timeout_min > forward.attempt_timeout_max
        && let Some(s) = &f.attempt_timeout_min
    {
        d.span(
            s,
            "forward.attempt_timeout_min: is greater than forward.attempt_timeout_max",
        );
    }

    let i = &raw.ingress;
    let ingress = Ingress {
        max_body: match &i.max_body {
            None => 1024 * 1024,
            Some(v) => parse_size(v.get_ref()).unwrap_or_else(|e| {
                d.span(v, format!("ingress.max_body: {e}"));
                1024 * 1024
            }),
        },
        max_header_bytes: match &i.max_header_bytes {
            None => DEFAULT_MAX_HEADER_BYTES,
            Some(v) => match parse_size(v.get_ref()) {
                Ok(n) if (MIN_HEADER_BYTES as u64..=MAX_HEADER_BYTES as u64).contains(&n) => n as usize,
                Ok(n) => {
                    d.span(
                        v,
                        format!(
                            "ingress.max_header_bytes: {n} is outside {MIN_HEADER_BYTES}..={MAX_HEADER_BYTES} \
                             (the control plane accepts request heads up to 64 KiB)"
                        ),
                    );
                    DEFAULT_MAX_HEADER_BYTES
                }
                Err(e) => {
                    d.span(v, format!("ingress.max_header_bytes: {e}"));
                    DEFAULT_MAX_HEADER_BYTES
                }
            },
        },
        header_timeout: duration_or(
            &mut d,
            "ingress.header_timeout",
            &i.header_timeout,
            Duration::from_secs(5),
        ),
        idle_timeout: duration_or(
            &mut d,
            "ingress.idle_timeout",
            &i.idle_timeout,
            Duration::from_secs(300),
        ),
        max_connections: positive(&mut d, "ingress.max_connections", &i.max_connections, 4096) as usize,
        body_timeout: duration_or(
            &mut d,
            "ingress.body_timeout",
            &i.body_timeout,
            Duration::from_secs(10),
        ),
        drain_timeout: duration_or(
            &mut d,
            "ingress.drain_timeout",
            &i.drain_timeout,
            Duration::from_secs(10),
        ),
    };

    let r = &raw.relay;
    let relay = RelayLimits {
        handshake_timeout: duration_or(
            &mut d,
            "relay.handshake_timeout",
            &r.handshake_timeout,
            Duration::from_secs(5),
        ),
        idle_timeout: duration_or(
            &mut d,
            "relay.idle_timeout",
            &r.idle_timeout,
            Duration::from_secs(120),
        ),
        max_tunnels: positive(&mut d, "relay.max_tunnels", &r.max_tunnels, 1024) as usize,
        max_tunnels_per_peer: positive(&mut d, "relay.max_tunnels_per_peer", &r.max_tunnels_per_peer, 256)
            as usize,
    };

    // The peers file is validated against its own text.
    let (peers, peers_path) = match &raw.peers {
        None => (Vec::new(), None),
        Some(pr) => {
            let p = resolve(path, pr.file.get_ref());
            match std::fs::read_to_string(&p) {
                Err(e) => {
                    d.span(&pr.file, format!("peers.file: cannot read {}: {e}", p.display()));
                    (Vec::new(), Some(p))
                }
                Ok(ptext) => {
                    let peers = validate_peers(&p, &ptext, &pop, listen.relay, d.errors);
                    (peers, Some(p))
                }
            }
        }
    };

    if let Some(pin) = &f.pin {
        let v = pin.get_ref();
        let known = v == "direct" || peers.iter().any(|p| &p.path_name() == v);
        if !known {
            d.span(pin, format!("forward.pin: `{v}` is not a path; use \"direct\" or \"via:<peer>\" with a configured peer"));
        }
    }

    if tls.is_none() && raw.tls.is_none() {
        if listen.relay.is_some() {
            let at = rl.relay.as_ref().map_or(0, |s| s.span().start);
            d.at(
                at,
                "listen.relay is set but [tls] is missing: the relay only accepts mutual TLS",
            );
        }
        if !peers.is_empty() {
            let at = raw.peers.as_ref().map_or(0, |p| p.file.span().start);
            d.at(
                at,
                "peers are configured but [tls] is missing: peer tunnels need this agent's certificate",
            );
        }
    }

    Some(AgentConfig {
        pop,
        listen,
        control_plane,
        tls,
        health,
        forward,
        ingress,
        relay,
        peers,
        files: ConfigFiles {
            agent: path.to_path_buf(),
            peers: peers_path,
        },
    })
}

fn positive(d: &mut Diag<'_>, key: &str, v: &Option<Spanned<u32>>, default: u32) -> u32 {
    match v {
        None => default,
        Some(n) if *n.get_ref() == 0 => {
            d.span(n, format!("{key}: must be at least 1"));
            default
        }
        Some(n) => *n.get_ref(),
    }
}

fn ratio(d: &mut Diag<'_>, key: &str, v: &Option<Spanned<f64>>, default: f64) -> f64 {
    match v {
        None => default,
        Some(x) if !(0.0..=1.0).contains(x.get_ref()) => {
            d.span(x, format!("{key}: must be between 0.0 and 1.0"));
            default
        }
        Some(x) => *x.get_ref(),
    }
}

fn control_plane(d: &mut Diag<'_>, path: &Path, raw: &Spanned<raw::ControlPlane>) -> ControlPlane {
    let r = raw.get_ref();
    let mut cp = ControlPlane {
        url: http::Uri::from_static("http://invalid"),
        tls: false,
        host: String::new(),
        port: 0,
        base_path: String::new(),
        addresses: Vec::new(),
        ca: r.ca.as_ref().map(|c| resolve(path, c.get_ref())),
        ca_certs: Vec::new(),
        token: None,
        report_interval: Some(Duration::from_secs(10)),
        host_value: None,
        auth_value: None,
    };
    if let Some(v) = &r.report_interval {
        if v.get_ref() == "off" {
            cp.report_interval = None;
        } else {
            cp.report_interval = Some(duration_or(
                d,
                "control_plane.report_interval",
                &r.report_interval,
                Duration::from_secs(10),
            ));
        }
    }
    match r.url.get_ref().parse::<http::Uri>() {
        Err(e) => d.span(&r.url, format!("control_plane.url: not a URL: {e}")),
        Ok(uri) => {
            let scheme = uri.scheme_str().unwrap_or("");
            if scheme != "https" && scheme != "http" {
                d.span(
                    &r.url,
                    "control_plane.url: must start with https:// (or http:// in a lab)",
                );
            } else if uri.host().is_none() {
                d.span(&r.url, "control_plane.url: has no host");
            } else if uri.query().is_some() {
                d.span(&r.url, "control_plane.url: must not have a query");
            } else {
                cp.tls = scheme == "https";
                cp.host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
                cp.port = uri.port_u16().unwrap_or(if cp.tls { 443 } else { 80 });
                cp.base_path = uri.path().trim_end_matches('/').to_owned();
                cp.url = uri;
            }
        }
    }
    for a in &r.addresses {
        match a.get_ref().parse::<SocketAddr>() {
            Ok(sa) => cp.addresses.push(sa),
            Err(_) => d.span(
                a,
                format!(
                    "control_plane.addresses: `{}` is not an IP:port socket address",
                    a.get_ref()
                ),
            ),
        }
    }
    if let (Some(c), Some(p)) = (&r.ca, &cp.ca) {
        match tls::load_certs(p) {
            Ok(certs) => cp.ca_certs = certs,
            Err(e) => d.span(c, format!("control_plane.ca: {e}")),
        }
    }
    if let Some(t) = &r.token_file {
        let p = resolve(path, t.get_ref());
        match std::fs::read_to_string(&p) {
            Err(e) => d.span(
                t,
                format!("control_plane.token_file: cannot read {}: {e}", p.display()),
            ),
            Ok(s) => {
                let token = s.trim();
                if token.is_empty() {
                    d.span(t, format!("control_plane.token_file: {} is empty", p.display()));
                } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
                    d.span(
                        t,
                        format!(
                            "control_plane.token_file: {} holds characters a bearer token cannot carry",
                            p.display()
                        ),
                    );
                } else {
                    cp.token = Some(token.to_owned());
                }
            }
        }
    }
    cp.host_value = http::HeaderValue::from_str(&cp.host_header()).ok();
    cp.auth_value = cp
        .token
        .as_ref()
        .and_then(|t| http::HeaderValue::from_str(&format!("Bearer {t}")).ok());
    cp
}

/// Whether `relay` (a peer's `host:port`) is this agent's own relay listener:
/// the same address (IPv4-mapped IPv6 counted as IPv4), or the same port on
/// loopback or the unspecified address when the listener is on every address
/// or on loopback. Host names other than `localhost` are not resolved.
fn is_own_relay(relay: &str, own: Option<SocketAddr>) -> bool {
    let Some(own) = own else { return false };
    let Some((host, port)) = relay.rsplit_once(':') else {
        return false;
    };
    let Ok(port) = port.parse::<u16>() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = if host.eq_ignore_ascii_case("localhost") {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.to_canonical(),
            Err(_) => return false,
        }
    };
    let own_ip = own.ip().to_canonical();
    let local = |ip: std::net::IpAddr| ip.is_loopback() || ip.is_unspecified();
    port == own.port() && (ip == own_ip || (local(own_ip) && local(ip)))
}

/// An IPv4 address in a form other than four decimal parts (`127.1`,
/// `0x7f.0.0.1`, `2130706433`): the resolver accepts these, so they would
/// hide which address is meant (this agent's own relay, for one).
fn non_canonical_ipv4(relay: &str) -> bool {
    let host = relay.rsplit_once(':').map_or(relay, |(h, _)| h);
    let numeric = !host.is_empty()
        && host.starts_with(|c: char| c.is_ascii_digit())
        && host
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'.' || b == b'x' || b == b'X');
    numeric && host.parse::<std::net::Ipv4Addr>().is_err()
}

/// Validates a peers file given as text, for `pop` whose relay listens on
/// `own_relay` (what a reload does with the file).
pub fn parse_peers(
    path: &Path,
    text: &str,
    pop: &str,
    own_relay: Option<SocketAddr>,
) -> Result<Vec<Peer>, ConfigErrors> {
    let mut errors = Vec::new();
    let peers = validate_peers(path, text, pop, own_relay, &mut errors);
    if errors.is_empty() {
        Ok(peers)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn validate_peers(
    path: &Path,
    text: &str,
    pop: &str,
    own_relay: Option<SocketAddr>,
    errors: &mut Vec<ConfigError>,
) -> Vec<Peer> {
    let Some(raw): Option<raw::PeersFile> = parse_toml(path, text, errors) else {
        return Vec::new();
    };
    let mut d = Diag {
        file: path,
        text,
        errors,
    };
    let mut peers = Vec::new();
    let mut names = HashSet::new();
    let mut relays = HashSet::new();
    for p in &raw.peer {
        let p = p.get_ref();
        let name = p.name.get_ref();
        if !valid_pop_name(name) {
            d.span(
                &p.name,
                format!(
                    "peer.name: `{name}` is not a PoP name (lowercase letters, digits and '-', at most 32)"
                ),
            );
        } else if name == pop {
            d.span(
                &p.name,
                format!("peer.name: `{name}` is this agent itself; an agent cannot be its own peer"),
            );
        } else if !names.insert(name.clone()) {
            d.span(&p.name, format!("peer.name: `{name}` is listed twice"));
        }
        if let Err(e) = valid_host_port(p.relay.get_ref()) {
            d.span(&p.relay, format!("peer.relay: {e}"));
        } else if non_canonical_ipv4(p.relay.get_ref()) {
            d.span(
                &p.relay,
                format!(
                    "peer.relay: `{}` is not an IPv4 address in dotted-quad form (write all four parts, e.g. 10.1.2.3)",
                    p.relay.get_ref()
                ),
            );
        } else if is_own_relay(p.relay.get_ref(), own_relay) {
            d.span(
                &p.relay,
                format!(
                    "peer.relay: `{}` is this agent's own relay listener (listen.relay); a peer must be another agent",
                    p.relay.get_ref()
                ),
            );
        } else if !relays.insert(p.relay.get_ref().clone()) {
            d.span(
                &p.relay,
                format!(
                    "peer.relay: `{}` is already used by another peer",
                    p.relay.get_ref()
                ),
            );
        }
        let weight = match &p.weight {
            None => 100,
            Some(w) if !(1..=1000).contains(w.get_ref()) => {
                d.span(w, "peer.weight: must be between 1 and 1000");
                100
            }
            Some(w) => *w.get_ref() as u32,
        };
        peers.push(Peer {
            name: name.clone(),
            relay: p.relay.get_ref().clone(),
            weight,
            enabled: p.enabled.unwrap_or(true),
        });
    }
    peers
}

#[cfg(test)]
mod tests;

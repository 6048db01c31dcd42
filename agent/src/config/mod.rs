//! Configuration: `agent.toml` and the peers file, parsed, validated as a whole
//! and turned into the runtime [`AgentConfig`].
//!
//! Loading happens in two steps. The files are first read into `raw` structs
//! that keep every value's location, then `validate` checks everything at
//! once and reports each problem as `file:line:col: message` (the shared
//! [`detour_wire::diag`] type), the way `haproxy -c` and `nginx -t` do. Only a
//! config without a single problem becomes an [`AgentConfig`]; the running
//! agent never sees a half-valid one.
//!
//! This file holds the validated types, each section's defaults beside it
//! (`Health::DEFAULT_INTERVAL` is what an unset `health.interval` means), and
//! [`AgentConfig::load`]. The rest: `raw` (the files as written), `diag`
//! (collecting problems against one file's text), `validate` (one function
//! per section), `peers` (the peers file, also read alone on reload) and
//! `values` (how durations, sizes, names and addresses are written).

mod diag;
mod peers;
mod raw;
mod validate;
mod values;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::tls::TlsMaterial;

pub use detour_wire::diag::{ConfigError, ConfigErrors};
pub use peers::parse_peers;
pub use values::{parse_duration, parse_size, valid_host_port, valid_pop_name};

#[cfg(test)]
use peers::{is_own_relay, non_canonical_ipv4};

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
    pub upgrade: Upgrade,
    /// `None`: recordings are not carried.
    pub recordings: Option<Recordings>,
    /// Where the config came from, for reloads and messages.
    pub files: ConfigFiles,
}

/// The files a config was read from, and watched for changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFiles {
    pub agent: PathBuf,
    pub peers: Option<PathBuf>,
    /// `tls.crl`: a new revocation list applies as soon as it is written,
    /// like an edit of the peers file. (The certificate and key are read
    /// again on reload but not watched: they change as a pair, and a reload
    /// between the two copies would be refused.)
    pub crl: Option<PathBuf>,
}

impl ConfigFiles {
    /// Every file a change of which triggers a reload.
    pub fn watched(&self) -> impl Iterator<Item = &PathBuf> {
        [Some(&self.agent), self.peers.as_ref(), self.crl.as_ref()]
            .into_iter()
            .flatten()
    }
}

/// Listener addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Call handler -> agent, plain HTTP/1.1.
    pub local: SocketAddr,
    /// Peers -> agent, mutual TLS. `None` (unset, `""` or `"off"`, the
    /// default) turns the relay off.
    pub relay: Option<SocketAddr>,
    /// `/metrics`, `/status`, `/healthz`, `/readyz`.
    pub admin: SocketAddr,
    /// The control socket (a Unix socket; its file mode is the access
    /// control): runtime changes such as `detour-agent peer drain`. `None`
    /// turns it off.
    pub control: Option<PathBuf>,
}

impl Listen {
    /// Default of `listen.local`: loopback, so only call handlers on this
    /// host reach the agent.
    pub const DEFAULT_LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
    /// Default of `listen.admin`.
    pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
}

/// Where the control plane is and how to talk to it: one endpoint
/// (`control_plane.url`) or several (`[[control_plane.endpoints]]`, regions).
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// Every endpoint, most preferred (lowest `priority`) first; never empty
    /// in a config that validated.
    pub endpoints: Vec<Endpoint>,
    /// Extra CA certificates trusted for the control plane, besides the system roots.
    pub ca: Option<PathBuf>,
    /// That file's certificates as read at load (a reload compares contents).
    pub ca_certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Bearer token sent on every request when set (every endpoint shares
    /// one database, so one token).
    pub token: Option<String>,
    /// How often the agent reports its path table to the control plane
    /// (`POST /v1/agents/{pop}/report`, the fleet view); `None` = never.
    pub report_interval: Option<Duration>,
    /// `Bearer <token>` as a header value, built once (request path).
    pub auth_value: Option<http::HeaderValue>,
}

impl ControlPlane {
    /// Default of `control_plane.report_interval` (`"off"` turns reports off).
    pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(10);

    /// The most preferred endpoint.
    pub fn primary(&self) -> &Endpoint {
        &self.endpoints[0]
    }

    /// Whether `authority` (`host[:port]`, as in a CONNECT or `Host`) names
    /// one of the endpoints.
    pub fn endpoint_for(&self, host: &str, port: Option<u16>) -> Option<&Endpoint> {
        let host = host.trim_matches(['[', ']']);
        self.endpoints.iter().find(|e| {
            e.host.eq_ignore_ascii_case(host) && port.unwrap_or(if e.tls { 443 } else { 80 }) == e.port
        })
    }
}

/// One control-plane endpoint (a region, a zone).
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `name`, or the URL's host: the `endpoint` label, and the `@name` in
    /// path names when there are several endpoints.
    pub name: String,
    /// Lower is preferred; equal priorities share traffic by path score.
    pub priority: u32,
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
    /// `host_header()` as a header value, built once (request path).
    pub host_value: Option<http::HeaderValue>,
}

impl Endpoint {
    /// `host:port` as it appears in a CONNECT request.
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

    /// Whether two endpoints are dialed the same way (connections made for
    /// one are good for the other).
    pub fn same_connections(&self, other: &Endpoint) -> bool {
        self.url == other.url && self.addresses == other.addresses
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
    /// Loss rate the sequential loss tests leave an `up` path at (p1; a
    /// fifth of it is tolerated; docs/failover.md, "Judging loss").
    pub degraded_loss: f64,
    /// Number of recent exchanges (probes and requests) the displayed loss
    /// ratio is over (it no longer decides anything).
    pub window: usize,
    /// First hold-down after a path flaps; doubles on every flap.
    pub hold_down_min: Duration,
    /// Upper bound of the hold-down.
    pub hold_down_max: Duration,
    /// Paths probed every `interval`: the first this many of the ranking
    /// (the active path and its nearest stand-ins), and every `direct`.
    pub watched: usize,
    /// Time between probes of the other paths (an agent with many peers
    /// does not probe them all twice a second).
    pub standby_interval: Duration,
}

impl Health {
    /// Default of `health.interval`.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);
    /// Default of `health.path`.
    pub const DEFAULT_PATH: &str = "/healthz";
    /// Default of `health.timeout_min`.
    pub const DEFAULT_TIMEOUT_MIN: Duration = Duration::from_millis(150);
    /// Default of `health.timeout_max`.
    pub const DEFAULT_TIMEOUT_MAX: Duration = Duration::from_secs(1);
    /// Default of `health.rise`.
    pub const DEFAULT_RISE: u32 = 3;
    /// Default of `health.fall`.
    pub const DEFAULT_FALL: u32 = 2;
    /// Default of `health.degraded_loss`: 5%.
    pub const DEFAULT_DEGRADED_LOSS: f64 = 0.05;
    /// Default of `health.window`.
    pub const DEFAULT_WINDOW: usize = 40;
    /// Default of `health.hold_down_min`.
    pub const DEFAULT_HOLD_DOWN_MIN: Duration = Duration::from_secs(2);
    /// Default of `health.hold_down_max`.
    pub const DEFAULT_HOLD_DOWN_MAX: Duration = Duration::from_secs(60);
    /// Default of `health.watched`.
    pub const DEFAULT_WATCHED: usize = 4;
    /// Default of `health.standby_interval`.
    pub const DEFAULT_STANDBY_INTERVAL: Duration = Duration::from_secs(5);
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
    /// Time to set up a connection on a path: TCP (and, through a peer,
    /// its relay's TLS and tunnel), then TLS to the target.
    pub connect_timeout: Duration,
    /// Hedge normal requests on the next path once they exceed the path's p95.
    pub hedge: bool,
    /// Retries and hedges may add this share of recent requests...
    pub retry_budget_ratio: f64,
    /// ...plus this many per second, whatever the traffic.
    pub retry_budget_min_per_sec: u32,
    /// Requests whose path starts with one of these are emergency requests.
    pub emergency_path_prefixes: Vec<String>,
    /// Requests delivered later when no path delivers them now
    /// (`[[forward.deferrable]]`; docs/deferred.md).
    pub deferrable: Vec<Deferrable>,
    /// Where deferred requests wait.
    pub deferred_journal: PathBuf,
    /// The most the deferred requests may take (new ones get 503 beyond).
    pub deferred_max_bytes: u64,
}

/// A kind of request that may be deferred: a method and a path whose `*`
/// segments are its ordering key.
#[derive(Debug, Clone, PartialEq)]
pub struct Deferrable {
    pub method: http::Method,
    /// The path's segments; `None` for `*`.
    pub segments: Vec<Option<String>>,
}

impl Deferrable {
    pub fn new(method: http::Method, path: &str) -> Deferrable {
        Deferrable {
            method,
            segments: path
                .split('/')
                .map(|s| (s != "*").then(|| s.to_owned()))
                .collect(),
        }
    }
}

impl Forward {
    /// Default of `forward.deadline`.
    pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(1800);
    /// Default of `forward.attempt_timeout_min`.
    pub const DEFAULT_ATTEMPT_TIMEOUT_MIN: Duration = Duration::from_millis(150);
    /// Default of `forward.attempt_timeout_max`.
    pub const DEFAULT_ATTEMPT_TIMEOUT_MAX: Duration = Duration::from_secs(1);
    /// Default of `forward.attempt_timeout_factor`.
    pub const DEFAULT_ATTEMPT_TIMEOUT_FACTOR: f64 = 3.0;
    /// Default of `forward.connect_timeout`.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
    /// Default of `forward.hedge`.
    pub const DEFAULT_HEDGE: bool = true;
    /// Default of `forward.retry_budget_ratio`: retries and hedges may add 20%.
    pub const DEFAULT_RETRY_BUDGET_RATIO: f64 = 0.2;
    /// Default of `forward.retry_budget_min_per_sec`.
    pub const DEFAULT_RETRY_BUDGET_MIN_PER_SEC: u32 = 10;
    /// Default of `forward.deferred_journal` (systemd's StateDirectory).
    pub const DEFAULT_DEFERRED_JOURNAL: &str = "/var/lib/detour-agent/deferred.journal";
    /// Default of `forward.deferred_max_bytes`.
    pub const DEFAULT_DEFERRED_MAX_BYTES: u64 = 64 * 1024 * 1024;
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
    /// On shutdown, in-flight requests get this long to finish.
    pub drain_timeout: Duration,
    /// On shutdown, how long kept-alive connections go on being served
    /// (every answer then says `Connection: close`) before the ones that
    /// stayed idle are closed. A call handler's next request on a connection
    /// is answered, never met by a close.
    pub drain_idle: Duration,
}

impl Ingress {
    /// Default of `ingress.max_body`: 1 MiB.
    pub const DEFAULT_MAX_BODY: u64 = 1024 * 1024;
    /// Default of `ingress.max_header_bytes`: nginx's default request-head
    /// limit too (4 x 8 KiB).
    pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
    /// Smallest `ingress.max_header_bytes`: hyper's smallest read buffer.
    pub const MIN_HEADER_BYTES: usize = 8 * 1024;
    /// Largest `ingress.max_header_bytes`: below the control plane's 64 KiB
    /// by room for what the agent adds, its own headers (`Authorization`,
    /// `Idempotency-Key`, `X-Request-Id`) and HTTP/2's 32 bytes of accounting
    /// per header (100 headers: 3.2 KiB).
    pub const MAX_HEADER_BYTES: usize = 48 * 1024;
    /// Default of `ingress.header_timeout`.
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default of `ingress.idle_timeout`.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    /// Default of `ingress.max_connections`.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
    /// Default of `ingress.body_timeout`.
    pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default of `ingress.drain_timeout`.
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default of `ingress.drain_idle`.
    pub const DEFAULT_DRAIN_IDLE: Duration = Duration::from_secs(1);
}

/// Restarts and upgrades without a refused or failed call: where the
/// handover socket and the health snapshot live (docs/operations.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// `handover.sock` (a new process takes the listeners from the running
    /// one) and `health.json` (the path table at the last shutdown). `None`:
    /// neither; a restart starts with no memory of the paths.
    pub dir: Option<PathBuf>,
    /// A snapshot older than this is ignored (the paths are probed afresh).
    pub snapshot_max_age: Duration,
}

impl Upgrade {
    /// Default of `upgrade.snapshot_max_age`: longer than a restart takes,
    /// shorter than the evidence a health decision rests on stays true.
    pub const DEFAULT_SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(60);
    /// The handover socket's file name in `dir`.
    pub const SOCKET: &str = "handover.sock";
    /// The health snapshot's file name in `dir`.
    pub const SNAPSHOT: &str = "health.json";
}

/// Call recordings carried to object storage (`[recordings]`; off when
/// absent). See docs/recordings.md.
#[derive(Debug, Clone)]
pub struct Recordings {
    /// Where the call handler leaves finished recordings.
    pub dir: PathBuf,
    /// File-name patterns (`*.wav`); other files are left alone.
    pub patterns: Vec<glob::Pattern>,
    /// How a file is known to be finished.
    pub complete: Complete,
    /// Takes the call id from a file name: the `call_id` group, else the
    /// whole match.
    pub call_id: regex::Regex,
    /// The journal of every file seen and its state.
    pub journal: PathBuf,
    /// What happens to a file once the store and the control plane have it.
    pub after_upload: AfterUpload,
    /// Multipart part size (S3: at least 5 MiB); smaller files go in one PUT.
    pub part_size: u64,
    /// Parts of one recording uploaded at once. Parts are read from disk as
    /// they are sent, not buffered: each in flight holds two 256 KiB chunks,
    /// whatever `part_size` is.
    pub parallel_parts: u16,
    /// How often the directory is scanned.
    pub scan_interval: Duration,
    /// Upload bytes per second, all paths together (`None`: no cap).
    pub max_rate: Option<u64>,
    /// Upload bytes per second through any one peer (`None`: no cap).
    pub max_rate_per_peer: Option<u64>,
    pub store: Store,
}

impl Recordings {
    /// Whether two sections say the same (the call-id pattern compared by
    /// its text; the store's keys by the credentials file's contents).
    pub fn same_as(&self, other: &Recordings) -> bool {
        self.dir == other.dir
            && self.patterns == other.patterns
            && self.complete == other.complete
            && self.call_id.as_str() == other.call_id.as_str()
            && self.journal == other.journal
            && self.after_upload == other.after_upload
            && self.part_size == other.part_size
            && self.parallel_parts == other.parallel_parts
            && self.scan_interval == other.scan_interval
            && self.max_rate == other.max_rate
            && self.max_rate_per_peer == other.max_rate_per_peer
            && self.store == other.store
    }
}

/// When a recording is finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Complete {
    /// As soon as it appears under a matching name (the call handler writes
    /// elsewhere or under another name, then renames it).
    Renamed,
    /// When its size and modification time have not changed for this long.
    Settled(Duration),
}

/// What is done with a local file after a confirmed upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterUpload {
    Delete,
    Keep,
    Move(PathBuf),
}

/// The S3-compatible object store.
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    /// `http(s)://host[:port]`.
    pub endpoint: url::Url,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Addresses to dial instead of resolving `host`.
    pub addresses: Vec<SocketAddr>,
    pub bucket: String,
    pub region: String,
    /// Path-style URLs (`endpoint/bucket/key`), as S3-compatible servers
    /// want; `false`: virtual-host style (`bucket.endpoint/key`).
    pub path_style: bool,
    pub credentials_file: PathBuf,
    pub access_key: String,
    pub secret_key: String,
    /// Object key with `{pop}`, `{date}` (YYYY-MM-DD, UTC), `{call_id}` and
    /// `{file}` filled in.
    pub key_template: String,
    pub ca: Option<PathBuf>,
    pub ca_certs: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl Store {
    /// `host:port` as in a CONNECT request.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl Recordings {
    pub const DEFAULT_PATTERNS: [&str; 4] = ["*.wav", "*.mp3", "*.ogg", "*.opus"];
    /// Default of `recordings.settle`.
    pub const DEFAULT_SETTLE: Duration = Duration::from_secs(5);
    /// Default of `recordings.part_size`.
    pub const DEFAULT_PART_SIZE: u64 = 8 * 1024 * 1024;
    /// Default of `recordings.parallel_parts`.
    pub const DEFAULT_PARALLEL_PARTS: u16 = 4;
    /// S3's smallest part (all but the last).
    pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
    /// Default of `recordings.scan_interval`.
    pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_millis(250);
    /// Default of `recordings.store.key_template`.
    pub const DEFAULT_KEY_TEMPLATE: &str = "{pop}/{date}/{call_id}/{file}";
    /// Default journal file name, in `dir`.
    pub const JOURNAL: &str = ".detour-recordings.journal";
}

/// [`Ingress::DEFAULT_MAX_HEADER_BYTES`], at the path the lab's tests size
/// their request heads from.
pub const DEFAULT_MAX_HEADER_BYTES: usize = Ingress::DEFAULT_MAX_HEADER_BYTES;

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

impl RelayLimits {
    /// Default of `relay.handshake_timeout`.
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default of `relay.idle_timeout`.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
    /// Default of `relay.max_tunnels`.
    pub const DEFAULT_MAX_TUNNELS: usize = 1024;
    /// Default of `relay.max_tunnels_per_peer`.
    pub const DEFAULT_MAX_TUNNELS_PER_PEER: usize = 256;
}

/// One peer agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's name, unique in the file: the path is `via:<name>`.
    pub name: String,
    /// The PoP its certificate names; `name` unless set. Several agents of
    /// one PoP (telephony servers of one city) share its certificate name and
    /// are listed under names of their own, e.g. `maa-1` and `maa-2`.
    pub pop: String,
    /// `host:port` of the peer's relay listener.
    pub relay: String,
    /// Preference among healthy peers; higher is preferred.
    pub weight: u32,
    /// `false` drains the peer without deleting it.
    pub enabled: bool,
}

impl Peer {
    /// Default of a peer's `weight`.
    pub const DEFAULT_WEIGHT: u32 = 100;
    /// Default of a peer's `enabled`.
    pub const DEFAULT_ENABLED: bool = true;

    /// The path name: `via:<name>`.
    pub fn path_name(&self) -> String {
        format!("via:{}", self.name)
    }
}

impl AgentConfig {
    /// Reads and validates `agent.toml` and the peers file it names.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                position: Some((1, 1)),
                message: format!("cannot read config: {e}"),
            }])
        })?;
        Self::from_str_at(path, &text)
    }

    /// Validates `agent.toml` given as text; `path` locates relative file
    /// names and messages.
    pub fn from_str_at(path: &Path, text: &str) -> Result<AgentConfig, ConfigErrors> {
        let mut errors = Vec::new();
        let config = validate::validate(path, text, &mut errors);
        match config {
            Some(c) if errors.is_empty() => Ok(c),
            _ => Err(ConfigErrors(errors)),
        }
    }

    /// What is valid but needs a person: printed by `check-config`, logged
    /// when the config is applied (at start and on every reload).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let (Some(tls), Some(crl)) = (&self.tls, &self.files.crl)
            && tls.own_revoked
        {
            warnings.push(format!(
                "tls.cert: this PoP's certificate is revoked by {}: peers with that list refuse its \
                 tunnels and its relay (the direct path still works); give it a new certificate",
                crl.display()
            ));
        }
        warnings
    }
}

#[cfg(test)]
mod tests;

//! Configuration: `cp.toml` parsed with serde, then validated as a whole so
//! every problem is reported at once as `file:line:col: message`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The control plane's configuration (`cp.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP(S) API listens on. Default `127.0.0.1:8000`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory for the embedded SQLite database (`detour-cp.sqlite3`).
    /// Relative paths are resolved against the config file's directory.
    /// Default `data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// `postgres://user:pass@host/db` for a shared Postgres (several replicas),
    /// or `sqlite://path`. Unset: SQLite in `data_dir`.
    #[serde(default)]
    pub database_url: Option<Spanned<String>>,
    /// File holding the admin bearer token (one line). Unset: admin endpoints
    /// answer 403 to everyone.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub numbers: NumbersConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub hook: HookConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) from this certificate and key.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// Database pool settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Connections to Postgres per replica. Keep it above
    /// `limits.max_in_flight + limits.emergency_reserved` divided by the
    /// average statements in flight, or calls wait for connections. Default 16.
    /// SQLite always uses one connection: it has one writer anyway.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Postgres only: how many group-commit statements for new calls run at
    /// once (each on one pooled connection). Calls that arrive while these
    /// are busy are written together by the next one (`store/batch.rs`), so fewer
    /// writers mean bigger batches and fewer commits. Default 2, the best of
    /// 1, 2, 4 and 8 on a 2-core machine running Postgres beside the
    /// service (see docs/benchmarks.md); raise it for a database on more cores
    /// or further away. At most `max_connections`.
    #[serde(default = "default_batch_writers")]
    pub batch_writers: u32,
    /// How long a request waits for a database connection before it fails
    /// with 503. Default `2s`.
    #[serde(default = "default_acquire_timeout", with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// SQLite only: how often a background task copies the write-ahead log
    /// into the database file. `"0s"` leaves it to SQLite, which does it
    /// inside whichever commit crosses 1,000 log pages (a latency spike for
    /// that request). Default `200ms`.
    #[serde(default = "default_checkpoint", with = "humantime_serde")]
    pub sqlite_checkpoint_interval: Duration,
}

/// Phone-number handling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumbersConfig {
    /// ISO 3166 region used for numbers written without a country code.
    /// Default `IN`.
    #[serde(default = "default_region")]
    pub default_region: Spanned<String>,
    /// Destinations that take the emergency workflow: relaxed validation,
    /// reserved capacity, never shed or rate limited.
    #[serde(default = "default_emergency")]
    pub emergency: Vec<Spanned<String>>,
}

/// Route evaluation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// IANA time zone in which rule time windows are read. Default `Asia/Kolkata`.
    #[serde(default = "default_time_zone")]
    pub time_zone: Spanned<String>,
    /// How often each replica checks the route version in the database; a
    /// change made on another replica is used within this interval plus one
    /// reload. Default `500ms`.
    #[serde(default = "default_refresh", with = "humantime_serde")]
    pub refresh_interval: Duration,
}

/// External routing hooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// Hook timeout when the rule does not set one. Default `200ms`.
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures (timeouts, errors, bad answers) of one hook URL
    /// that open its circuit breaker. Default 5.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// How long an open breaker skips the hook before one trial call.
    /// Default `10s`.
    #[serde(default = "default_open_for", with = "humantime_serde")]
    pub open_for: Duration,
}

/// Load shedding and rate limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Normal call initiations processed at once per replica. Default 64.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Normal calls allowed to wait for a slot; one more is shed at once with
    /// 503 and `Retry-After`. Default 256.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Longest wait for a slot before a queued normal call is shed. Default `250ms`.
    #[serde(default = "default_queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Slots only emergency calls use, on top of `max_in_flight`. Emergency
    /// calls wait for one rather than being shed. Default 16.
    #[serde(default = "default_emergency_reserved")]
    pub emergency_reserved: usize,
    /// Sustained requests per second per PoP token (per replica); 0 disables.
    /// Default 1000.
    #[serde(default = "default_per_pop_rps")]
    pub per_pop_rps: u32,
    /// Requests a PoP may send in a burst above the sustained rate. Default 2000.
    #[serde(default = "default_per_pop_burst")]
    pub per_pop_burst: u32,
    /// Largest request body accepted, in bytes; larger is 413. Default 65536.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Largest request head (HTTP/1.1 request line and headers, or an HTTP/2
    /// header list), in bytes; larger is 431. Agents cap theirs below this.
    /// Default 65536.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// A request head must be whole this long after its first byte, and a
    /// new connection's first request this long after the TLS handshake.
    /// Default `10s`.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection with nothing in flight and no byte read for this long is
    /// closed. Keep it above the load balancer's idle timeout (60 s on an AWS
    /// ALB), so the balancer never reuses a connection as it closes. Default `75s`.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections open at once per replica; a new one past this is closed
    /// at once. Default 8192.
    #[serde(default = "default_max_connections_open")]
    pub max_connections: usize,
}

/// Idempotency-Key handling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a stored response is replayed for its key. Default `24h`.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
}

/// HTTPS termination in the service itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Where the file settings are in the text, for messages about the files.
#[derive(Debug, Default, Deserialize)]
struct FilePlaces {
    admin_token_file: Option<Spanned<toml::Value>>,
    tls: Option<TlsPlaces>,
}

#[derive(Debug, Default, Deserialize)]
struct TlsPlaces {
    cert: Option<Spanned<toml::Value>>,
    key: Option<Spanned<toml::Value>>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8000))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_max_connections() -> u32 {
    16
}
fn default_batch_writers() -> u32 {
    2
}
fn default_acquire_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_checkpoint() -> Duration {
    Duration::from_millis(200)
}
fn default_region() -> Spanned<String> {
    Spanned::new(0..0, "IN".to_owned())
}
fn default_emergency() -> Vec<Spanned<String>> {
    ["100", "101", "102", "108", "112"]
        .iter()
        .map(|s| Spanned::new(0..0, (*s).to_owned()))
        .collect()
}
fn default_time_zone() -> Spanned<String> {
    Spanned::new(0..0, "Asia/Kolkata".to_owned())
}
fn default_refresh() -> Duration {
    Duration::from_millis(500)
}
fn default_hook_timeout() -> Duration {
    Duration::from_millis(200)
}
fn default_failure_threshold() -> u32 {
    5
}
fn default_open_for() -> Duration {
    Duration::from_secs(10)
}
fn default_max_in_flight() -> usize {
    64
}
fn default_max_queue() -> usize {
    256
}
fn default_queue_timeout() -> Duration {
    Duration::from_millis(250)
}
fn default_emergency_reserved() -> usize {
    16
}
fn default_per_pop_rps() -> u32 {
    1000
}
fn default_per_pop_burst() -> u32 {
    2000
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(75)
}
fn default_max_connections_open() -> usize {
    8192
}
fn default_retention() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            batch_writers: default_batch_writers(),
            acquire_timeout: default_acquire_timeout(),
            sqlite_checkpoint_interval: default_checkpoint(),
        }
    }
}
impl Default for NumbersConfig {
    fn default() -> Self {
        Self {
            default_region: default_region(),
            emergency: default_emergency(),
        }
    }
}
impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            time_zone: default_time_zone(),
            refresh_interval: default_refresh(),
        }
    }
}
impl Default for HookConfig {
    fn default() -> Self {
        Self {
            timeout: default_hook_timeout(),
            failure_threshold: default_failure_threshold(),
            open_for: default_open_for(),
        }
    }
}
impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_in_flight: default_max_in_flight(),
            max_queue: default_max_queue(),
            queue_timeout: default_queue_timeout(),
            emergency_reserved: default_emergency_reserved(),
            per_pop_rps: default_per_pop_rps(),
            per_pop_burst: default_per_pop_burst(),
            max_body_bytes: default_max_body(),
            max_header_bytes: default_max_header_bytes(),
            header_timeout: default_header_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections_open(),
        }
    }
}
impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            retention: default_retention(),
        }
    }
}

/// One problem in a config file, with its location when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based line and column; `None` for problems without a place in the file.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (file, message) = (
            detour_wire::printable(&self.file),
            detour_wire::printable(&self.message),
        );
        match self.position {
            Some((line, col)) => write!(f, "{file}:{line}:{col}: {message}"),
            None => write!(f, "{file}: {message}"),
        }
    }
}

/// Every problem found in a config file.
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

/// 1-based line and column of a byte offset.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

impl Config {
    /// Reads, parses and validates `path`. Relative paths inside are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: name.clone(),
                position: None,
                message: format!("cannot read: {e}"),
            }])
        })?;
        Self::from_toml_str(&text, &name)
    }

    /// Parses and validates config text; `file_name` is used in error
    /// messages and its directory anchors relative paths.
    pub fn from_toml_str(text: &str, file_name: &str) -> Result<Config, ConfigErrors> {
        let err_at = |span: Option<std::ops::Range<usize>>, message: String| ConfigError {
            file: file_name.to_owned(),
            position: span.map(|s| line_col(text, s.start)),
            message,
        };
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigErrors(vec![err_at(e.span(), e.message().to_owned())]))?;
        let base = Path::new(file_name)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        config.resolve_paths(&base);

        let mut errors = Vec::new();
        let span = |s: &Spanned<String>| {
            let r = s.span();
            // Defaults carry an empty span at 0: they have no place in the file.
            if r == (0..0) { None } else { Some(r) }
        };
        if let Some(url) = &config.database_url {
            let v = url.get_ref();
            if !(v.starts_with("postgres://") || v.starts_with("postgresql://") || v.starts_with("sqlite:")) {
                errors.push(err_at(
                    span(url),
                    format!("database_url must start with postgres:// or sqlite: (got {v:?})"),
                ));
            }
        }
        let region = &config.numbers.default_region;
        if crate::intake::region(region.get_ref()).is_none() {
            errors.push(err_at(
                span(region),
                format!(
                    "numbers.default_region {:?} is not an ISO 3166 region code such as \"IN\"",
                    region.get_ref()
                ),
            ));
        }
        for e in &config.numbers.emergency {
            let v = e.get_ref();
            if v.is_empty() || v.len() > 8 || !v.bytes().all(|b| b.is_ascii_digit()) {
                errors.push(err_at(
                    span(e),
                    format!("numbers.emergency entry {v:?} must be 1 to 8 digits"),
                ));
            }
        }
        let tz = &config.routing.time_zone;
        if tz.get_ref().parse::<chrono_tz::Tz>().is_err() {
            errors.push(err_at(
                span(tz),
                format!(
                    "routing.time_zone {:?} is not an IANA time zone such as \"Asia/Kolkata\"",
                    tz.get_ref()
                ),
            ));
        }
        if config.routing.refresh_interval.is_zero() {
            errors.push(err_at(None, "routing.refresh_interval must be above 0".into()));
        }
        if config.hook.timeout.is_zero() || config.hook.failure_threshold == 0 {
            errors.push(err_at(
                None,
                "hook.timeout and hook.failure_threshold must be above 0".into(),
            ));
        }
        if config.limits.max_in_flight == 0 || config.limits.emergency_reserved == 0 {
            errors.push(err_at(
                None,
                "limits.max_in_flight and limits.emergency_reserved must be above 0".into(),
            ));
        }
        if config.database.max_connections == 0 {
            errors.push(err_at(None, "database.max_connections must be above 0".into()));
        }
        if config.database.batch_writers == 0
            || config.database.batch_writers > config.database.max_connections
        {
            errors.push(err_at(
                None,
                format!(
                    "database.batch_writers must be between 1 and database.max_connections ({})",
                    config.database.max_connections
                ),
            ));
        }
        if !(16 * 1024..=1024 * 1024).contains(&config.limits.max_header_bytes) {
            errors.push(err_at(
                None,
                "limits.max_header_bytes must be between 16384 and 1048576 (agents send up to 49152)".into(),
            ));
        }
        if config.limits.header_timeout.is_zero() || config.limits.idle_timeout.is_zero() {
            errors.push(err_at(
                None,
                "limits.header_timeout and limits.idle_timeout must be above 0".into(),
            ));
        }
        if config.limits.max_connections == 0 {
            errors.push(err_at(None, "limits.max_connections must be above 0".into()));
        }
        if config.limits.max_body_bytes < 256 {
            errors.push(err_at(None, "limits.max_body_bytes must be at least 256".into()));
        }
        // The files `serve` reads are read here too, so `check-config` fails
        // exactly when `serve` would, and says where.
        let places: FilePlaces = toml::from_str(text).unwrap_or_default();
        let place = |s: &Option<Spanned<toml::Value>>| s.as_ref().map(|v| v.span());
        if let Some(path) = &config.admin_token_file
            && let Err(e) = crate::read_admin_token_file(path)
        {
            errors.push(err_at(
                place(&places.admin_token_file),
                format!("admin_token_file: {e:#}"),
            ));
        }
        if let Some(tls) = &config.tls {
            let t = places.tls.unwrap_or_default();
            match (crate::tls::load_certs(&tls.cert), crate::tls::load_key(&tls.key)) {
                (Ok(certs), Ok(key)) => {
                    if let Err(e) = crate::tls::server_config_from(certs, key) {
                        errors.push(err_at(place(&t.key), format!("{e:#}")));
                    }
                }
                (certs, key) => {
                    if let Err(e) = certs {
                        errors.push(err_at(place(&t.cert), format!("{e:#}")));
                    }
                    if let Err(e) = key {
                        errors.push(err_at(place(&t.key), format!("{e:#}")));
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        if let Some(p) = &mut self.admin_token_file {
            fix(p);
        }
        if let Some(tls) = &mut self.tls {
            fix(&mut tls.cert);
            fix(&mut tls.key);
        }
    }

    /// The database URL in use: `database_url`, or an SQLite file in `data_dir`.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.get_ref().clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("detour-cp.sqlite3").display()
            ),
        }
    }

    /// The time zone rule windows are read in (validated at load).
    pub fn time_zone(&self) -> chrono_tz::Tz {
        self.routing
            .time_zone
            .get_ref()
            .parse()
            .unwrap_or(chrono_tz::Asia::Kolkata)
    }

    /// A config with every default, for tests and the lab: SQLite in `data_dir`.
    pub fn for_data_dir(data_dir: &Path) -> Config {
        let mut c = Self::from_toml_str("", "<defaults>").unwrap_or_else(|e| {
            // The empty document is valid by construction; this is unreachable.
            panic!("defaults do not validate: {e}")
        });
        c.data_dir = data_dir.to_path_buf();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        // The example names the production admin token file, which the
        // load reads: a copy points at one made here.
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/cp.toml")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("admin.token");
        std::fs::write(&token, "example\n").unwrap();
        let text = text.replace("/etc/detour/admin.token", &token.display().to_string());
        let path = dir.path().join("cp.toml");
        let c = Config::from_toml_str(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.numbers.default_region.get_ref(), "IN");
        assert_eq!(c.numbers.emergency.len(), 5);
        assert_eq!(c.time_zone(), chrono_tz::Asia::Kolkata);
    }

    #[test]
    fn unknown_key_reports_line_and_column() {
        let text = "listen = \"127.0.0.1:8000\"\n[numbers]\ndefault_regoin = \"IN\"\n";
        let err = Config::from_toml_str(text, "cp.toml").unwrap_err().to_string();
        assert!(err.starts_with("cp.toml:3:1: "), "{err}");
        assert!(err.contains("default_regoin"), "{err}");
    }

    #[test]
    fn every_semantic_problem_is_reported_with_its_place() {
        let text = "[numbers]\ndefault_region = \"XX\"\nemergency = [\"112\", \"1a\"]\n\
                    [routing]\ntime_zone = \"Mars/Olympus\"\n";
        let errs = Config::from_toml_str(text, "cp.toml").unwrap_err();
        let shown: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 3, "{shown:?}");
        assert!(shown[0].starts_with("cp.toml:2:18: "), "{shown:?}");
        assert!(shown[1].starts_with("cp.toml:3:21: "), "{shown:?}");
        assert!(shown[2].starts_with("cp.toml:5:13: "), "{shown:?}");
    }

    #[test]
    fn batch_writers_must_fit_the_pool() {
        for (writers, ok) in [(0, false), (1, true), (16, true), (17, false)] {
            let text = format!("[database]\nmax_connections = 16\nbatch_writers = {writers}\n");
            let result = Config::from_toml_str(&text, "cp.toml");
            assert_eq!(result.is_ok(), ok, "batch_writers = {writers}");
            if let Err(e) = result {
                let e = e.to_string();
                assert!(
                    e.contains("database.batch_writers must be between 1 and database.max_connections (16)"),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn bad_duration_is_a_located_error() {
        let text = "[routing]\nrefresh_interval = \"soon\"\n";
        let err = Config::from_toml_str(text, "cp.toml").unwrap_err().to_string();
        assert!(err.starts_with("cp.toml:2:"), "{err}");
    }

    #[test]
    fn defaults_use_sqlite_in_data_dir() {
        let c = Config::for_data_dir(Path::new("/tmp/x"));
        assert_eq!(c.database_url(), "sqlite:///tmp/x/detour-cp.sqlite3?mode=rwc");
    }
}

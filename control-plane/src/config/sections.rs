//! The sections of `cp.toml` below the top level, each with its defaults
//! beside it. These serde structs are also what the service reads at run
//! time: they are checked in place ([`super::validate`]) rather than
//! converted, so an unset field is filled from the section's `Default`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Database pool settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Connections to Postgres per replica. Keep it above
    /// `limits.max_in_flight + limits.emergency_reserved` divided by the
    /// average statements in flight, or calls wait for connections. Default 16.
    /// SQLite always uses one connection: it has one writer anyway.
    pub max_connections: u32,
    /// Postgres only: how many group-commit statements for new calls run at
    /// once (each on one pooled connection). Calls that arrive while these
    /// are busy are written together by the next one (`store/batch.rs`), so fewer
    /// writers mean bigger batches and fewer commits. Default 2, the best of
    /// 1, 2, 4 and 8 on a 2-core machine running Postgres beside the
    /// service (see docs/benchmarks.md); raise it for a database on more cores
    /// or further away. At most `max_connections`.
    pub batch_writers: u32,
    /// How long a request waits for a database connection before it fails
    /// with 503. Default `2s`.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// SQLite only: how often a background task copies the write-ahead log
    /// into the database file. `"0s"` leaves it to SQLite, which does it
    /// inside whichever commit crosses 1,000 log pages (a latency spike for
    /// that request). Default `200ms`.
    #[serde(with = "humantime_serde")]
    pub sqlite_checkpoint_interval: Duration,
}

impl DatabaseConfig {
    /// Default of `database.max_connections`.
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;
    /// Default of `database.batch_writers`.
    pub const DEFAULT_BATCH_WRITERS: u32 = 2;
    /// Default of `database.acquire_timeout`.
    pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default of `database.sqlite_checkpoint_interval`.
    pub const DEFAULT_SQLITE_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            batch_writers: Self::DEFAULT_BATCH_WRITERS,
            acquire_timeout: Self::DEFAULT_ACQUIRE_TIMEOUT,
            sqlite_checkpoint_interval: Self::DEFAULT_SQLITE_CHECKPOINT_INTERVAL,
        }
    }
}

/// Phone-number handling.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NumbersConfig {
    /// ISO 3166 region used for numbers written without a country code.
    /// Default `IN`.
    pub default_region: Spanned<String>,
    /// Destinations that take the emergency workflow: relaxed validation,
    /// reserved capacity, never shed or rate limited.
    pub emergency: Vec<Spanned<String>>,
}

impl NumbersConfig {
    /// Default of `numbers.default_region`.
    pub const DEFAULT_REGION: &str = "IN";
    /// Default of `numbers.emergency`.
    pub const DEFAULT_EMERGENCY: &[&str] = &["100", "101", "102", "108", "112"];
}

/// Defaults carry an empty span at 0: they have no place in the file.
impl Default for NumbersConfig {
    fn default() -> Self {
        Self {
            default_region: Spanned::new(0..0, Self::DEFAULT_REGION.to_owned()),
            emergency: Self::DEFAULT_EMERGENCY
                .iter()
                .map(|s| Spanned::new(0..0, (*s).to_owned()))
                .collect(),
        }
    }
}

/// Route evaluation.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// IANA time zone in which rule time windows are read. Default `Asia/Kolkata`.
    pub time_zone: Spanned<String>,
    /// How often each replica checks the route version in the database; a
    /// change made on another replica is used within this interval plus one
    /// reload. Default `500ms`.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
}

impl RoutingConfig {
    /// Default of `routing.time_zone`.
    pub const DEFAULT_TIME_ZONE: &str = "Asia/Kolkata";
    /// Default of `routing.refresh_interval`.
    pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_millis(500);
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            time_zone: Spanned::new(0..0, Self::DEFAULT_TIME_ZONE.to_owned()),
            refresh_interval: Self::DEFAULT_REFRESH_INTERVAL,
        }
    }
}

/// External routing hooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HookConfig {
    /// Hook timeout when the rule does not set one. Default `200ms`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures (timeouts, errors, bad answers) of one hook URL
    /// that open its circuit breaker. Default 5.
    pub failure_threshold: u32,
    /// How long an open breaker skips the hook before one trial call.
    /// Default `10s`.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
}

impl HookConfig {
    /// Default of `hook.timeout`.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);
    /// Default of `hook.failure_threshold`.
    pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
    /// Default of `hook.open_for`.
    pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(10);
}

impl Default for HookConfig {
    fn default() -> Self {
        Self {
            timeout: Self::DEFAULT_TIMEOUT,
            failure_threshold: Self::DEFAULT_FAILURE_THRESHOLD,
            open_for: Self::DEFAULT_OPEN_FOR,
        }
    }
}

/// Load shedding and rate limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Normal call initiations processed at once per replica. Default 64.
    pub max_in_flight: usize,
    /// Normal calls allowed to wait for a slot; one more is shed at once with
    /// 503 and `Retry-After`. Default 256.
    pub max_queue: usize,
    /// Longest wait for a slot before a queued normal call is shed. Default `250ms`.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Slots only emergency calls use, on top of `max_in_flight`. Emergency
    /// calls wait for one rather than being shed. Default 16.
    pub emergency_reserved: usize,
    /// Sustained requests per second per PoP token (per replica); 0 disables.
    /// Default 1000.
    pub per_pop_rps: u32,
    /// Requests a PoP may send in a burst above the sustained rate. Default 2000.
    pub per_pop_burst: u32,
    /// Largest request body accepted, in bytes; larger is 413. Default 65536.
    pub max_body_bytes: usize,
    /// Largest request head (HTTP/1.1 request line and headers, or an HTTP/2
    /// header list), in bytes; larger is 431. Agents cap theirs below this.
    /// Default 65536.
    pub max_header_bytes: usize,
    /// A request head must be whole this long after its first byte, and a
    /// new connection's first request this long after the TLS handshake.
    /// Default `10s`.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection with nothing in flight and no byte read for this long is
    /// closed. Keep it above the load balancer's idle timeout (60 s on an AWS
    /// ALB), so the balancer never reuses a connection as it closes. Default `75s`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections open at once per replica; a new one past this is closed
    /// at once. Default 8192.
    pub max_connections: usize,
}

impl LimitsConfig {
    /// Default of `limits.max_in_flight`.
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
    /// Default of `limits.max_queue`.
    pub const DEFAULT_MAX_QUEUE: usize = 256;
    /// Default of `limits.queue_timeout`.
    pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_millis(250);
    /// Default of `limits.emergency_reserved`.
    pub const DEFAULT_EMERGENCY_RESERVED: usize = 16;
    /// Default of `limits.per_pop_rps`.
    pub const DEFAULT_PER_POP_RPS: u32 = 1000;
    /// Default of `limits.per_pop_burst`.
    pub const DEFAULT_PER_POP_BURST: u32 = 2000;
    /// Default of `limits.max_body_bytes`.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
    /// Default of `limits.max_header_bytes`.
    pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
    /// Default of `limits.header_timeout`.
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default of `limits.idle_timeout`.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
    /// Default of `limits.max_connections`.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_in_flight: Self::DEFAULT_MAX_IN_FLIGHT,
            max_queue: Self::DEFAULT_MAX_QUEUE,
            queue_timeout: Self::DEFAULT_QUEUE_TIMEOUT,
            emergency_reserved: Self::DEFAULT_EMERGENCY_RESERVED,
            per_pop_rps: Self::DEFAULT_PER_POP_RPS,
            per_pop_burst: Self::DEFAULT_PER_POP_BURST,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            max_header_bytes: Self::DEFAULT_MAX_HEADER_BYTES,
            header_timeout: Self::DEFAULT_HEADER_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Idempotency-Key handling.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a stored response is replayed for its key. Default `24h`.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl IdempotencyConfig {
    /// Default of `idempotency.retention`: a day.
    pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            retention: Self::DEFAULT_RETENTION,
        }
    }
}

/// The fleet view (`GET /fleet`, `/v1/fleet/view`) and its history.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// A PoP whose last report is older than this is shown stale, with its
    /// age. Keep it at two or three of the agents'
    /// `control_plane.report_interval` (default 10 s). Default `30s`.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    /// How long switches and relay refusals are kept in the database.
    /// Default `24h`.
    #[serde(with = "humantime_serde")]
    pub events_retention: Duration,
    /// At most this many switches and refusals are kept (the newest), so a
    /// flapping fleet cannot grow the table without bound. Default 10000.
    pub max_events: u32,
    /// How long a login on the fleet page lasts. Default `12h`.
    #[serde(with = "humantime_serde")]
    pub session_lifetime: Duration,
}

impl FleetConfig {
    /// Default of `fleet.stale_after`.
    pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(30);
    /// Default of `fleet.events_retention`.
    pub const DEFAULT_EVENTS_RETENTION: Duration = Duration::from_secs(24 * 3600);
    /// Default of `fleet.max_events`.
    pub const DEFAULT_MAX_EVENTS: u32 = 10_000;
    /// Default of `fleet.session_lifetime`.
    pub const DEFAULT_SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            stale_after: Self::DEFAULT_STALE_AFTER,
            events_retention: Self::DEFAULT_EVENTS_RETENTION,
            max_events: Self::DEFAULT_MAX_EVENTS,
            session_lifetime: Self::DEFAULT_SESSION_LIFETIME,
        }
    }
}

/// HTTPS termination in the service itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// How often `cert` and `key` are read again: a renewed pair serves new
    /// connections from then on, without a restart (SIGHUP reads them at
    /// once). A pair that does not load or match is not used; the replica
    /// keeps serving the one it has. Default `60s`, which also catches a
    /// Kubernetes Secret update (the kubelet rewrites mounted files within
    /// about a minute).
    #[serde(default = "TlsConfig::default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl TlsConfig {
    /// Default of `tls.reload_interval`.
    pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(60);

    fn default_reload_interval() -> Duration {
        Self::DEFAULT_RELOAD_INTERVAL
    }
}

/// What `serve` does on SIGTERM (a deploy or `systemctl stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long the replica keeps serving after SIGTERM with `/readyz`
    /// answering 503, so its load balancer takes it out of rotation before
    /// the listener closes. Set it to the load balancer's time to mark a
    /// backend down (HAProxy: `inter` x `fall`; a Kubernetes readiness
    /// probe: `periodSeconds` x `failureThreshold`). Default `0s`: the
    /// default setup is one replica on SQLite with no load balancer.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// After the listener closes, how long requests in flight may finish
    /// before their connections are closed. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl ShutdownConfig {
    /// Default of `shutdown.grace`.
    pub const DEFAULT_GRACE: Duration = Duration::ZERO;
    /// Default of `shutdown.drain_timeout`.
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Self::DEFAULT_GRACE,
            drain_timeout: Self::DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// How long a kind of row is kept: a duration, or `"forever"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep(pub Option<Duration>);

impl Keep {
    /// Rows older than this go; `None`: kept forever.
    pub fn limit(self) -> Option<Duration> {
        self.0
    }
}

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "forever" {
            return Ok(Keep(None));
        }
        humantime_serde::re::humantime::parse_duration(&s)
            .map(|d| Keep(Some(d)))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{e}: expected a duration such as \"400d\", or \"forever\""
                ))
            })
    }
}

/// How long rows are kept, and how the background sweep deletes the older
/// ones: in statements of at most `batch_size` rows with a `pause` between
/// them, every `interval`, on every replica (replicas skip the rows another
/// is deleting). Idempotency keys follow `idempotency.retention`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Calls, with their events and recordings (the objects in the bucket
    /// are not touched), by creation time. Default `400d`: a year of
    /// records and a month to reconcile it. At least
    /// `idempotency.retention`.
    pub calls: Keep,
    /// Route audit entries (`GET /v1/audit`). Default `400d`.
    pub audit: Keep,
    /// The latest report of a PoP that has not reported since: its entry in
    /// `GET /v1/fleet` goes. Default `30d`.
    pub agent_reports: Keep,
    /// How often a sweep starts. Default `1m`.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Rows one statement deletes at most (a call takes its events and
    /// recordings with it). On SQLite the statement holds the database's
    /// one connection, so requests wait while it runs: keep it small.
    /// Default 500.
    pub batch_size: u32,
    /// Pause between two statements of a sweep. With the defaults a sweep
    /// deletes at most 2,500 rows a second per table, far above what a
    /// fleet writes. Default `200ms`.
    #[serde(with = "humantime_serde")]
    pub pause: Duration,
}

impl RetentionConfig {
    /// Default of `retention.calls`.
    pub const DEFAULT_CALLS: Duration = Duration::from_secs(400 * 24 * 3600);
    /// Default of `retention.audit`.
    pub const DEFAULT_AUDIT: Duration = Duration::from_secs(400 * 24 * 3600);
    /// Default of `retention.agent_reports`.
    pub const DEFAULT_AGENT_REPORTS: Duration = Duration::from_secs(30 * 24 * 3600);
    /// Default of `retention.interval`.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
    /// Default of `retention.batch_size`.
    pub const DEFAULT_BATCH_SIZE: u32 = 500;
    /// Default of `retention.pause`.
    pub const DEFAULT_PAUSE: Duration = Duration::from_millis(200);
    /// The shortest retention accepted: a typo such as `"40s"` for
    /// `"40d"` must not empty a table.
    pub const MIN_KEEP: Duration = Duration::from_secs(3600);
    /// The largest `batch_size`.
    pub const MAX_BATCH_SIZE: u32 = 10_000;
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            calls: Keep(Some(Self::DEFAULT_CALLS)),
            audit: Keep(Some(Self::DEFAULT_AUDIT)),
            agent_reports: Keep(Some(Self::DEFAULT_AGENT_REPORTS)),
            interval: Self::DEFAULT_INTERVAL,
            batch_size: Self::DEFAULT_BATCH_SIZE,
            pause: Self::DEFAULT_PAUSE,
        }
    }
}

//! The checks serde cannot do on `cp.toml`, each reported with its place
//! when the value has one in the text: one function per concern, in the
//! order the problems are printed.

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::{
    Config, ConfigError, DatabaseConfig, HookConfig, LimitsConfig, NumbersConfig, RetentionConfig,
    RoutingConfig, secret,
};

/// A problem at `place` (a byte range of `text`), or with the file as a whole.
pub(super) fn problem(file: &Path, text: &str, place: Option<Range<usize>>, message: String) -> ConfigError {
    match place {
        Some(r) => ConfigError::at(file, text, r.start, message),
        None => ConfigError::in_file(file, message),
    }
}

/// Every problem with `config`, parsed from `text` (the contents of `file`),
/// and the warnings. Reads the secrets the config names into it (the
/// database password).
pub(super) fn validate(config: &mut Config, file: &Path, text: &str) -> (Vec<ConfigError>, Vec<ConfigError>) {
    let mut p = Problems {
        file,
        text,
        list: Vec::new(),
        warnings: Vec::new(),
    };
    database(&mut p, config);
    numbers(&mut p, &config.numbers);
    routing(&mut p, &config.routing);
    hook(&mut p, &config.hook);
    capacity(&mut p, &config.limits, &config.database);
    connections(&mut p, &config.limits);
    retention(&mut p, config);
    if config.shutdown.drain_timeout.is_zero() {
        p.push(
            None,
            "shutdown.drain_timeout must be above 0 (requests in flight need time to finish)",
        );
    }
    if config.shutdown.grace > std::time::Duration::from_secs(600) {
        p.push(None, "shutdown.grace must be at most 10m");
    }
    fleet(&mut p, &config.fleet);
    files(&mut p, config);
    (p.list, p.warnings)
}

/// Collects problems against one file's text.
struct Problems<'a> {
    file: &'a Path,
    text: &'a str,
    list: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
}

impl Problems<'_> {
    fn push(&mut self, place: Option<Range<usize>>, message: impl Into<String>) {
        self.list
            .push(problem(self.file, self.text, place, message.into()));
    }

    fn warn(&mut self, place: Option<Range<usize>>, message: impl Into<String>) {
        let message = format!("warning: {}", message.into());
        self.warnings.push(problem(self.file, self.text, place, message));
    }
}

/// Where `s` is in the text; `None` for a default, which has no place there
/// (defaults carry an empty span at 0).
fn place(s: &Spanned<String>) -> Option<Range<usize>> {
    let r = s.span();
    if r == (0..0) { None } else { Some(r) }
}

/// `database_url` and its password. Messages show the URL redacted.
fn database(p: &mut Problems<'_>, config: &mut Config) {
    let url = config
        .database_url
        .as_ref()
        .map(|u| (u.as_str().to_owned(), place(&u.0)));
    if let Some((v, at)) = &url
        && !(v.starts_with("postgres://") || v.starts_with("postgresql://") || v.starts_with("sqlite:"))
    {
        p.push(
            at.clone(),
            format!(
                "database_url must start with postgres:// or sqlite: (got {:?})",
                secret::redact(v)
            ),
        );
    }
    let postgres = url
        .as_ref()
        .is_some_and(|(v, _)| v.starts_with("postgres://") || v.starts_with("postgresql://"));
    let inline = url.as_ref().is_some_and(|(v, _)| secret::has_password(v));
    let url_at = url.and_then(|(_, at)| at);
    let Some(path) = config.database_password_file.clone() else {
        if inline {
            p.warn(
                url_at,
                "database_url carries a password, so cp.toml holds a secret: put it in \
                 database_password_file (or PGPASSWORD) and leave it out of the URL",
            );
        }
        return;
    };
    let places: FilePlaces = toml::from_str(p.text).unwrap_or_default();
    let file_at = places.database_password_file.as_ref().map(|v| v.span());
    if !postgres {
        p.push(
            file_at,
            "database_password_file needs a postgres:// database_url (SQLite has no password)",
        );
    } else if inline {
        p.push(
            url_at,
            "database_url carries a password and database_password_file names another: \
             remove the password from the URL",
        );
    } else {
        match secret::read_password_file(&path) {
            Ok(pw) => config.database_password = Some(pw),
            Err(e) => p.push(file_at, format!("database_password_file: {e}")),
        }
    }
}

fn fleet(p: &mut Problems<'_>, fleet: &super::FleetConfig) {
    use std::time::Duration;
    if fleet.stale_after < Duration::from_secs(1) {
        p.push(None, "fleet.stale_after must be at least 1s");
    }
    if fleet.max_events < 100 {
        p.push(None, "fleet.max_events must be at least 100");
    }
    if fleet.events_retention < Duration::from_secs(60) {
        p.push(None, "fleet.events_retention must be at least 1m");
    }
    if !(Duration::from_secs(60)..=Duration::from_secs(30 * 86_400)).contains(&fleet.session_lifetime) {
        p.push(None, "fleet.session_lifetime must be between 1m and 30d");
    }
}

fn numbers(p: &mut Problems<'_>, numbers: &NumbersConfig) {
    let region = &numbers.default_region;
    if crate::intake::region(region.get_ref()).is_none() {
        p.push(
            place(region),
            format!(
                "numbers.default_region {:?} is not an ISO 3166 region code such as \"IN\"",
                region.get_ref()
            ),
        );
    }
    for e in &numbers.emergency {
        let v = e.get_ref();
        if v.is_empty() || v.len() > 8 || !v.bytes().all(|b| b.is_ascii_digit()) {
            p.push(
                place(e),
                format!("numbers.emergency entry {v:?} must be 1 to 8 digits"),
            );
        }
    }
}

fn routing(p: &mut Problems<'_>, routing: &RoutingConfig) {
    let tz = &routing.time_zone;
    if tz.get_ref().parse::<chrono_tz::Tz>().is_err() {
        p.push(
            place(tz),
            format!(
                "routing.time_zone {:?} is not an IANA time zone such as \"Asia/Kolkata\"",
                tz.get_ref()
            ),
        );
    }
    if routing.refresh_interval.is_zero() {
        p.push(None, "routing.refresh_interval must be above 0");
    }
}

fn hook(p: &mut Problems<'_>, hook: &HookConfig) {
    if hook.timeout.is_zero() || hook.failure_threshold == 0 {
        p.push(None, "hook.timeout and hook.failure_threshold must be above 0");
    }
}

/// Call slots and the database pool that serves them.
fn capacity(p: &mut Problems<'_>, limits: &LimitsConfig, database: &DatabaseConfig) {
    if limits.max_in_flight == 0 || limits.emergency_reserved == 0 {
        p.push(
            None,
            "limits.max_in_flight and limits.emergency_reserved must be above 0",
        );
    }
    if database.max_connections == 0 {
        p.push(None, "database.max_connections must be above 0");
    }
    if database.batch_writers == 0 || database.batch_writers > database.max_connections {
        p.push(
            None,
            format!(
                "database.batch_writers must be between 1 and database.max_connections ({})",
                database.max_connections
            ),
        );
    }
}

/// What one connection may send, and how many may be open.
fn connections(p: &mut Problems<'_>, limits: &LimitsConfig) {
    if !(16 * 1024..=1024 * 1024).contains(&limits.max_header_bytes) {
        p.push(
            None,
            "limits.max_header_bytes must be between 16384 and 1048576 (agents send up to 49152)",
        );
    }
    if limits.header_timeout.is_zero() || limits.idle_timeout.is_zero() {
        p.push(
            None,
            "limits.header_timeout and limits.idle_timeout must be above 0",
        );
    }
    if limits.max_connections == 0 {
        p.push(None, "limits.max_connections must be above 0");
    }
    if limits.max_body_bytes < 256 {
        p.push(None, "limits.max_body_bytes must be at least 256");
    }
}

/// How long rows are kept and how fast the sweep deletes them.
fn retention(p: &mut Problems<'_>, config: &Config) {
    let r = &config.retention;
    let min = RetentionConfig::MIN_KEEP;
    for (key, keep) in [
        ("calls", r.calls),
        ("audit", r.audit),
        ("agent_reports", r.agent_reports),
    ] {
        if let Some(d) = keep.limit()
            && d < min
        {
            p.push(
                None,
                format!("retention.{key} must be at least 1h, or \"forever\" to keep every row"),
            );
        }
    }
    if let Some(d) = r.calls.limit()
        && d < config.idempotency.retention
    {
        p.push(
            None,
            "retention.calls must be at least idempotency.retention (a replayed answer names its call)",
        );
    }
    if r.interval.is_zero() {
        p.push(None, "retention.interval must be above 0");
    }
    if !(1..=RetentionConfig::MAX_BATCH_SIZE).contains(&r.batch_size) {
        p.push(
            None,
            format!(
                "retention.batch_size must be between 1 and {}",
                RetentionConfig::MAX_BATCH_SIZE
            ),
        );
    }
    if r.pause > std::time::Duration::from_secs(60) {
        p.push(None, "retention.pause must be at most 1m");
    }
}

/// Where the file settings are in the text, for messages about the files
/// (the typed [`Config`] keeps paths, not places).
#[derive(Debug, Default, Deserialize)]
struct FilePlaces {
    admin_token_file: Option<Spanned<toml::Value>>,
    database_password_file: Option<Spanned<toml::Value>>,
    tls: Option<TlsPlaces>,
}

#[derive(Debug, Default, Deserialize)]
struct TlsPlaces {
    cert: Option<Spanned<toml::Value>>,
    key: Option<Spanned<toml::Value>>,
    reload_interval: Option<Spanned<toml::Value>>,
}

/// The files `serve` reads are read here too, so `check-config` fails
/// exactly when `serve` would, and says where.
fn files(p: &mut Problems<'_>, config: &Config) {
    let places: FilePlaces = toml::from_str(p.text).unwrap_or_default();
    let at = |s: &Option<Spanned<toml::Value>>| s.as_ref().map(|v| v.span());
    if let Some(path) = &config.admin_token_file
        && let Err(e) = crate::read_admin_token_file(path)
    {
        p.push(at(&places.admin_token_file), format!("admin_token_file: {e:#}"));
    }
    let Some(tls) = &config.tls else { return };
    let t = places.tls.unwrap_or_default();
    if tls.reload_interval.is_zero() {
        p.push(at(&t.reload_interval), "tls.reload_interval must be above 0");
    }
    match (crate::tls::load_certs(&tls.cert), crate::tls::load_key(&tls.key)) {
        (Ok(certs), Ok(key)) => {
            if let Err(e) = crate::tls::server_config_from(certs, key) {
                p.push(at(&t.key), format!("{e:#}"));
            }
        }
        (certs, key) => {
            if let Err(e) = certs {
                p.push(at(&t.cert), format!("{e:#}"));
            }
            if let Err(e) = key {
                p.push(at(&t.key), format!("{e:#}"));
            }
        }
    }
}

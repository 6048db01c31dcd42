//! Configuration: `cp.toml` parsed with serde, then validated as a whole so
//! every problem is reported at once as `file:line:col: message` (the shared
//! [`detour_wire::diag`] type, as the agent's).
//!
//! This file holds the top level ([`Config`]) and loading; `sections` the
//! tables below it with their defaults, `validate` the checks.

mod secret;
mod sections;
mod validate;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use detour_wire::diag::{ConfigError, ConfigErrors};
pub use secret::{DatabaseUrl, Secret, redact};
pub use sections::{
    DatabaseConfig, FleetConfig, HookConfig, IdempotencyConfig, Keep, LimitsConfig, NumbersConfig,
    RetentionConfig, RoutingConfig, ShutdownConfig, TlsConfig,
};

/// The control plane's configuration (`cp.toml`). An unset field is filled
/// from [`Config::default`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP(S) API listens on. Default `127.0.0.1:8000`.
    pub listen: SocketAddr,
    /// Directory for the embedded SQLite database (`detour-cp.sqlite3`).
    /// Relative paths are resolved against the config file's directory.
    /// Default `data`.
    pub data_dir: PathBuf,
    /// `postgres://user@host/db` for a shared Postgres (several replicas),
    /// or `sqlite://path`. Unset: SQLite in `data_dir`. Keep the password
    /// out of it: `database_password_file`, or `PGPASSWORD` in the
    /// environment (a password here works, with a warning).
    pub database_url: Option<DatabaseUrl>,
    /// File holding the Postgres password (one line). A relative path is
    /// looked up in `$CREDENTIALS_DIRECTORY` when systemd sets it
    /// (`LoadCredential=db-password:/etc/detour-cp/db-password` with
    /// `database_password_file = "db-password"`), else beside this file.
    /// Read at start: after changing the password, restart.
    pub database_password_file: Option<PathBuf>,
    /// The password read from `database_password_file` at load.
    #[serde(skip)]
    pub database_password: Option<Secret>,
    /// File holding the admin bearer token (one line). Unset: admin endpoints
    /// answer 403 to everyone.
    pub admin_token_file: Option<PathBuf>,
    pub database: DatabaseConfig,
    pub numbers: NumbersConfig,
    pub routing: RoutingConfig,
    pub hook: HookConfig,
    pub limits: LimitsConfig,
    pub idempotency: IdempotencyConfig,
    pub retention: RetentionConfig,
    pub shutdown: ShutdownConfig,
    pub fleet: FleetConfig,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) from this certificate and key.
    pub tls: Option<TlsConfig>,
    /// What validation found questionable but not wrong, each as
    /// `file:line:col: warning: …`; `check-config` and `serve` print them.
    #[serde(skip)]
    pub warnings: Vec<ConfigError>,
}

impl Config {
    /// Default of `listen`.
    pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8000);
    /// Default of `data_dir`.
    pub const DEFAULT_DATA_DIR: &str = "data";
}

/// What an empty `cp.toml` means, before its relative paths are resolved
/// and before validation ([`Config::for_data_dir`] gives a validated one).
impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            data_dir: PathBuf::from(Self::DEFAULT_DATA_DIR),
            database_url: None,
            database_password_file: None,
            database_password: None,
            admin_token_file: None,
            database: DatabaseConfig::default(),
            numbers: NumbersConfig::default(),
            routing: RoutingConfig::default(),
            hook: HookConfig::default(),
            limits: LimitsConfig::default(),
            idempotency: IdempotencyConfig::default(),
            retention: RetentionConfig::default(),
            shutdown: ShutdownConfig::default(),
            fleet: FleetConfig::default(),
            tls: None,
            warnings: Vec::new(),
        }
    }
}

impl Config {
    /// Reads, parses and validates `path`. Relative paths inside are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![ConfigError::in_file(path, format!("cannot read: {e}"))]))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `file_name` is used in error
    /// messages and its directory anchors relative paths (a relative
    /// `database_password_file` is looked up in `$CREDENTIALS_DIRECTORY`
    /// when that is set).
    pub fn from_toml_str(text: &str, file_name: &str) -> Result<Config, ConfigErrors> {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        Self::parse(text, file_name, credentials.as_deref())
    }

    fn parse(text: &str, file_name: &str, credentials: Option<&Path>) -> Result<Config, ConfigErrors> {
        let file = Path::new(file_name);
        let mut config: Config = toml::from_str(text).map_err(|e| {
            ConfigErrors(vec![validate::problem(
                file,
                text,
                e.span(),
                e.message().to_owned(),
            )])
        })?;
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        config.resolve_paths(&base, credentials);
        let (errors, warnings) = validate::validate(&mut config, file, text);
        if errors.is_empty() {
            config.warnings = warnings;
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn resolve_paths(&mut self, base: &Path, credentials: Option<&Path>) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        if let Some(p) = &mut self.admin_token_file {
            fix(p);
        }
        if let Some(p) = &mut self.database_password_file {
            *p = secret::resolve_password_file(p, base, credentials);
        }
        if let Some(tls) = &mut self.tls {
            fix(&mut tls.cert);
            fix(&mut tls.key);
        }
    }

    /// The database URL in use as written: `database_url`, or an SQLite
    /// file in `data_dir`. It may hold a password written into cp.toml:
    /// messages show it through [`redact`].
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.as_str().to_owned(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("detour-cp.sqlite3").display()
            ),
        }
    }

    /// The SQLite file in use: `data_dir/detour-cp.sqlite3`, or the file
    /// a `sqlite:` `database_url` names (read as sqlx reads it); `None` for
    /// Postgres or an in-memory database.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        let Some(url) = &self.database_url else {
            return Some(self.data_dir.join("detour-cp.sqlite3"));
        };
        let rest = url.as_str().strip_prefix("sqlite:")?;
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let file = rest.split('?').next().unwrap_or(rest);
        if file.is_empty() || file == ":memory:" || rest.contains("mode=memory") {
            return None;
        }
        Some(PathBuf::from(secret::percent_decode(file)))
    }

    /// The URL to connect with: [`Config::database_url`] with the password
    /// from `database_password_file`, if any. For the driver only.
    pub fn database_connect_url(&self) -> Secret {
        let url = self.database_url();
        self.database_password
            .as_ref()
            .and_then(|pw| secret::with_password(&url, pw))
            .unwrap_or_else(|| Secret::new(url))
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
mod tests;

//! The files as written: serde structs that keep every value's location
//! (`Spanned`), so that [`super::validate`] can say where a problem is. A
//! setting that may be left out is an `Option` here; what leaving it out
//! means is the section's default, beside the validated type in [`super`].

use serde::Deserialize;
use toml::Spanned;

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
    #[serde(default)]
    pub upgrade: Upgrade,
    pub recordings: Option<Spanned<Recordings>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recordings {
    pub dir: Spanned<String>,
    pub patterns: Option<Vec<Spanned<String>>>,
    pub complete: Option<Spanned<String>>,
    pub settle: Option<Spanned<String>>,
    pub call_id: Option<Spanned<String>>,
    pub journal: Option<Spanned<String>>,
    pub after_upload: Option<Spanned<String>>,
    pub move_to: Option<Spanned<String>>,
    pub part_size: Option<Spanned<toml::Value>>,
    pub parallel_parts: Option<Spanned<i64>>,
    pub scan_interval: Option<Spanned<String>>,
    pub max_rate: Option<Spanned<toml::Value>>,
    pub max_rate_per_peer: Option<Spanned<toml::Value>>,
    pub store: Spanned<Store>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    pub endpoint: Spanned<String>,
    pub bucket: Spanned<String>,
    pub region: Option<Spanned<String>>,
    pub credentials_file: Spanned<String>,
    pub profile: Option<Spanned<String>>,
    pub key_template: Option<Spanned<String>>,
    pub path_style: Option<bool>,
    pub addresses: Option<Vec<Spanned<String>>>,
    pub ca: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Upgrade {
    pub dir: Option<Spanned<String>>,
    pub snapshot_max_age: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub local: Option<Spanned<String>>,
    pub relay: Option<Spanned<String>>,
    pub admin: Option<Spanned<String>>,
    pub control: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlane {
    pub url: Option<Spanned<String>>,
    #[serde(default)]
    pub addresses: Vec<Spanned<String>>,
    pub endpoints: Option<Spanned<Vec<Spanned<Endpoint>>>>,
    pub ca: Option<Spanned<String>>,
    pub token_file: Option<Spanned<String>>,
    pub report_interval: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub name: Option<Spanned<String>>,
    pub url: Spanned<String>,
    pub priority: Option<Spanned<u32>>,
    #[serde(default)]
    pub addresses: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub ca: Spanned<String>,
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub crl: Option<Spanned<String>>,
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
    pub watched: Option<Spanned<u32>>,
    pub standby_interval: Option<Spanned<String>>,
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
    #[serde(default)]
    pub deferrable: Vec<Spanned<Deferrable>>,
    pub deferred_journal: Option<Spanned<String>>,
    pub deferred_max_bytes: Option<Spanned<toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deferrable {
    pub method: Spanned<String>,
    pub path: Spanned<String>,
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
    pub drain_idle: Option<Spanned<String>>,
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
    pub pop: Option<Spanned<String>>,
    pub relay: Spanned<String>,
    pub weight: Option<Spanned<i64>>,
    pub enabled: Option<bool>,
}

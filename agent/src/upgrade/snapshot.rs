//! The path table handed from an old agent process to the next: written to
//! `upgrade.dir/health.json` when the old one stops or hands over, read by
//! the new one before it serves its first request. A snapshot that is
//! missing, unreadable, too old or from another PoP is ignored and the
//! paths are probed afresh, as on a first start.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::Upgrade;
use crate::health::{HealthTable, PathMemory};

#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub pop: String,
    /// The version of the agent that wrote it.
    pub version: String,
    /// Wall-clock time of writing, milliseconds since the Unix epoch.
    pub written_at_ms: u64,
    pub active: Option<String>,
    pub paths: Vec<PathMemory>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes `health`'s table for `pop` to `dir/health.json` (whole or not at
/// all: written beside it, then renamed).
pub fn save(dir: &Path, pop: &str, health: &HealthTable) -> std::io::Result<()> {
    let (paths, active) = health.memory();
    let snap = Snapshot {
        pop: pop.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        written_at_ms: now_ms(),
        active,
        paths,
    };
    let json = serde_json::to_vec(&snap).map_err(std::io::Error::other)?;
    let path = dir.join(Upgrade::SNAPSHOT);
    let tmp = dir.join(format!("{}.tmp", Upgrade::SNAPSHOT));
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, &path)
}

/// What [`restore`] did, for the start-up log line.
#[derive(Debug, PartialEq, Eq)]
pub enum Restored {
    /// Paths known from a snapshot this old.
    Used { paths: usize, age: Duration },
    /// No snapshot, or one that does not apply; why.
    Ignored(String),
}

/// Starts `health` from `dir/health.json` if there is a fresh one for `pop`.
pub fn restore(dir: &Path, pop: &str, max_age: Duration, health: &HealthTable) -> Restored {
    let path = dir.join(Upgrade::SNAPSHOT);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Restored::Ignored("no snapshot".to_owned());
        }
        Err(e) => return Restored::Ignored(format!("{}: {e}", path.display())),
    };
    let snap: Snapshot = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => return Restored::Ignored(format!("{}: {e}", path.display())),
    };
    if snap.pop != pop {
        return Restored::Ignored(format!("written for pop {:?}", snap.pop));
    }
    let age = Duration::from_millis(now_ms().saturating_sub(snap.written_at_ms));
    if age > max_age {
        return Restored::Ignored(format!("{}s old, over upgrade.snapshot_max_age", age.as_secs()));
    }
    let paths = health.remember(&snap.paths, snap.active.as_deref(), age);
    Restored::Used { paths, age }
}

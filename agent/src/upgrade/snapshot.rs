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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::AgentConfig;
    use crate::health::{FailureKind, Outcome, PathInfo};
    use crate::metrics::Metrics;

    fn table() -> HealthTable {
        let cfg = AgentConfig::from_str_at(
            Path::new("agent.toml"),
            "pop = \"blr\"\n[control_plane]\nurl = \"http://127.0.0.1:1\"\n",
        )
        .unwrap()
        .health;
        let info = PathInfo {
            name: Arc::from("direct"),
            direct: true,
            endpoint: "".into(),
            priority: 1,
            weight: 100,
            enabled: true,
            drained: false,
        };
        HealthTable::new(cfg, vec![info], Arc::new(Metrics::new("blr")))
    }

    #[tokio::test]
    async fn a_fresh_snapshot_is_used_and_a_stale_or_foreign_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            restore(dir.path(), "blr", Duration::from_secs(60), &table()),
            Restored::Ignored("no snapshot".to_owned())
        );
        let old = table();
        for _ in 0..5 {
            old.record(0, Outcome::Ok(Duration::from_millis(10)));
        }
        old.record(0, Outcome::Failed(FailureKind::Timeout));
        old.record(0, Outcome::Failed(FailureKind::Timeout));
        save(dir.path(), "blr", &old).unwrap();

        let new = table();
        assert!(matches!(
            restore(dir.path(), "blr", Duration::from_secs(60), &new),
            Restored::Used { paths: 1, .. }
        ));
        assert_eq!(new.snapshot().paths[0].state, old.snapshot().paths[0].state);
        assert_eq!(new.snapshot().paths[0].consecutive_failures, 2);

        // Written two minutes ago: over a 60 s snapshot_max_age.
        let path = dir.path().join(Upgrade::SNAPSHOT);
        let mut snap: Snapshot = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        snap.written_at_ms -= 120_000;
        std::fs::write(&path, serde_json::to_vec(&snap).unwrap()).unwrap();
        let stale = restore(dir.path(), "blr", Duration::from_secs(60), &table());
        assert!(
            matches!(&stale, Restored::Ignored(why) if why.contains("snapshot_max_age")),
            "{stale:?}"
        );
        let foreign = restore(dir.path(), "maa", Duration::from_secs(60), &table());
        assert!(
            matches!(&foreign, Restored::Ignored(why) if why.contains("\"blr\"")),
            "{foreign:?}"
        );
        std::fs::write(dir.path().join(Upgrade::SNAPSHOT), "{torn").unwrap();
        assert!(matches!(
            restore(dir.path(), "blr", Duration::from_secs(60), &table()),
            Restored::Ignored(_)
        ));
    }
}

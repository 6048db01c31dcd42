//! `[upgrade]`: where a restart finds the running agent's listeners and its
//! view of the paths.

use std::path::Path;

use super::{Diag, duration_or};
use crate::config::values::resolve;
use crate::config::{Upgrade, raw};

pub(super) fn validate(d: &mut Diag<'_>, u: &raw::Upgrade, config_path: &Path) -> Upgrade {
    let dir = u.dir.as_ref().and_then(|v| {
        let s = v.get_ref();
        if s.is_empty() {
            d.span(
                v,
                "upgrade.dir: must not be empty (leave it out to turn handover off)",
            );
            return None;
        }
        Some(resolve(config_path, s))
    });
    Upgrade {
        dir,
        snapshot_max_age: duration_or(
            d,
            "upgrade.snapshot_max_age",
            &u.snapshot_max_age,
            Upgrade::DEFAULT_SNAPSHOT_MAX_AGE,
        ),
    }
}

//! How single values are written in the config files: durations, byte sizes,
//! PoP names, `host:port` and relative file names. Pure functions; the
//! validators add the key and the place to what they return.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Parses a human duration such as `500ms`, `2s` or `1m 30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. \"500ms\" or \"2s\""))
}

/// Parses a byte size: an integer, or a number with `B`, `KiB`, `MiB`, `KB`, `MB`.
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

/// A file named in `base` (a config file): a relative path is relative to
/// `base`'s directory, not to wherever the agent was started.
pub(super) fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(p)
    }
}

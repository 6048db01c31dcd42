//! `[listen]`: the three listener addresses, none of them the same.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use super::{Diag, addr_or};
use crate::config::values::resolve;
use crate::config::{Listen, raw};

/// Stands in for a `listen.relay` that does not parse while the rest is
/// checked (against `listen.local`, say). It is not a default: an unset
/// relay is off.
const RELAY_PLACEHOLDER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 4443);

pub(super) fn validate(d: &mut Diag<'_>, rl: &raw::Listen, config_path: &Path) -> Listen {
    let listen = Listen {
        local: addr_or(d, "listen.local", &rl.local, Listen::DEFAULT_LOCAL),
        relay: match &rl.relay {
            None => None,
            Some(s) if s.get_ref().is_empty() || s.get_ref() == "off" => None,
            Some(_) => Some(addr_or(d, "listen.relay", &rl.relay, RELAY_PLACEHOLDER)),
        },
        admin: addr_or(d, "listen.admin", &rl.admin, Listen::DEFAULT_ADMIN),
        control: rl.control.as_ref().and_then(|v| {
            let s = v.get_ref();
            if s.is_empty() || s == "off" {
                return None;
            }
            if s.contains(':') && !s.contains('/') {
                d.span(
                    v,
                    "listen.control: is a Unix socket path (e.g. /run/detour-agent/control.sock), not an address",
                );
                return None;
            }
            Some(resolve(config_path, s))
        }),
    };
    let mut seen: Vec<(SocketAddr, &str)> =
        vec![(listen.local, "listen.local"), (listen.admin, "listen.admin")];
    if let Some(r) = listen.relay {
        seen.push((r, "listen.relay"));
    }
    for i in 0..seen.len() {
        for j in i + 1..seen.len() {
            if seen[i].0 == seen[j].0 && seen[i].0.port() != 0 {
                // Two settings, no one place: reported at the top of the file.
                d.at(
                    0,
                    format!("{} and {} are both {}", seen[i].1, seen[j].1, seen[i].0),
                );
            }
        }
    }
    listen
}

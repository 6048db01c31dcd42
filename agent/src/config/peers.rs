//! The peers file: the other agents this one may relay through, validated
//! against its own text. It is read with `agent.toml` at load and alone on a
//! reload that only touched it ([`parse_peers`]).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use super::diag::Diag;
use super::values::{resolve, valid_host_port, valid_pop_name};
use super::{ConfigErrors, Peer, raw};

/// Validates a peers file given as text, for `pop` whose relay listens on
/// `own_relay` (what a reload does with the file).
pub fn parse_peers(
    path: &Path,
    text: &str,
    pop: &str,
    own_relay: Option<SocketAddr>,
) -> Result<Vec<Peer>, ConfigErrors> {
    let mut errors = Vec::new();
    let peers = validate(&mut Diag::new(path, text, &mut errors), pop, own_relay);
    if errors.is_empty() {
        Ok(peers)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The peers file `agent.toml` names in `[peers]`, read and validated with
/// its problems reported against its own text; the path is `None` when there
/// is no `[peers]`.
pub(super) fn named_in(
    d: &mut Diag<'_>,
    peers: Option<&raw::PeersRef>,
    pop: &str,
    own_relay: Option<SocketAddr>,
) -> (Vec<Peer>, Option<PathBuf>) {
    let Some(pr) = peers else {
        return (Vec::new(), None);
    };
    let p = resolve(d.file(), pr.file.get_ref());
    match std::fs::read_to_string(&p) {
        Err(e) => {
            d.span(&pr.file, format!("peers.file: cannot read {}: {e}", p.display()));
            (Vec::new(), Some(p))
        }
        Ok(text) => {
            let peers = validate(&mut d.other(&p, &text), pop, own_relay);
            (peers, Some(p))
        }
    }
}

/// Every `[[peer]]`, in file order; `d` is on the peers file's text.
fn validate(d: &mut Diag<'_>, pop: &str, own_relay: Option<SocketAddr>) -> Vec<Peer> {
    let Some(raw): Option<raw::PeersFile> = d.parse() else {
        return Vec::new();
    };
    let mut peers = Vec::new();
    let mut names = HashSet::new();
    let mut relays = HashSet::new();
    for p in &raw.peer {
        let p = p.get_ref();
        check_name(d, &p.name, pop, &mut names);
        if let Some(cert) = &p.pop {
            check_pop(d, cert, pop);
        }
        check_relay(d, &p.relay, own_relay, &mut relays);
        let weight = match &p.weight {
            None => Peer::DEFAULT_WEIGHT,
            Some(w) if !(1..=1000).contains(w.get_ref()) => {
                d.span(w, "peer.weight: must be between 1 and 1000");
                Peer::DEFAULT_WEIGHT
            }
            Some(w) => *w.get_ref() as u32,
        };
        peers.push(Peer {
            name: p.name.get_ref().clone(),
            pop: p.pop.as_ref().unwrap_or(&p.name).get_ref().clone(),
            relay: p.relay.get_ref().clone(),
            weight,
            enabled: p.enabled.unwrap_or(Peer::DEFAULT_ENABLED),
        });
    }
    peers
}

/// `peer.name`: a PoP name, not this agent's, not listed before (`seen`).
fn check_name(d: &mut Diag<'_>, name: &toml::Spanned<String>, pop: &str, seen: &mut HashSet<String>) {
    let v = name.get_ref();
    if !valid_pop_name(v) {
        d.span(
            name,
            format!("peer.name: `{v}` is not a PoP name (lowercase letters, digits and '-', at most 32)"),
        );
    } else if v == pop {
        d.span(
            name,
            format!("peer.name: `{v}` is this agent itself; an agent cannot be its own peer"),
        );
    } else if !seen.insert(v.clone()) {
        d.span(name, format!("peer.name: `{v}` is listed twice"));
    }
}

/// `peer.pop`: a PoP name, not this agent's.
fn check_pop(d: &mut Diag<'_>, cert: &toml::Spanned<String>, pop: &str) {
    let v = cert.get_ref();
    if !valid_pop_name(v) {
        d.span(
            cert,
            format!("peer.pop: `{v}` is not a PoP name (lowercase letters, digits and '-', at most 32)"),
        );
    } else if v == pop {
        d.span(
            cert,
            format!(
                "peer.pop: `{v}` is this agent's own PoP; a detour must leave through another city's uplink"
            ),
        );
    }
}

/// `peer.relay`: a `host:port` that is plainly written, not this agent's own
/// relay listener, and not another peer's (`seen`).
fn check_relay(
    d: &mut Diag<'_>,
    relay: &toml::Spanned<String>,
    own_relay: Option<SocketAddr>,
    seen: &mut HashSet<String>,
) {
    let v = relay.get_ref();
    if let Err(e) = valid_host_port(v) {
        d.span(relay, format!("peer.relay: {e}"));
    } else if non_canonical_ipv4(v) {
        d.span(
            relay,
            format!(
                "peer.relay: `{v}` is not an IPv4 address in dotted-quad form (write all four parts, e.g. 10.1.2.3)"
            ),
        );
    } else if is_own_relay(v, own_relay) {
        d.span(
            relay,
            format!(
                "peer.relay: `{v}` is this agent's own relay listener (listen.relay); a peer must be another agent"
            ),
        );
    } else if !seen.insert(v.clone()) {
        d.span(
            relay,
            format!("peer.relay: `{v}` is already used by another peer"),
        );
    }
}

/// Whether `relay` (a peer's `host:port`) is this agent's own relay listener:
/// the same address (IPv4-mapped IPv6 counted as IPv4), or the same port on
/// loopback or the unspecified address when the listener is on every address
/// or on loopback. Host names other than `localhost` are not resolved.
pub(super) fn is_own_relay(relay: &str, own: Option<SocketAddr>) -> bool {
    let Some(own) = own else { return false };
    let Some((host, port)) = relay.rsplit_once(':') else {
        return false;
    };
    let Ok(port) = port.parse::<u16>() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::from([127, 0, 0, 1])
    } else {
        match host.parse::<IpAddr>() {
            Ok(ip) => ip.to_canonical(),
            Err(_) => return false,
        }
    };
    let own_ip = own.ip().to_canonical();
    let local = |ip: IpAddr| ip.is_loopback() || ip.is_unspecified();
    port == own.port() && (ip == own_ip || (local(own_ip) && local(ip)))
}

/// An IPv4 address in a form other than four decimal parts (`127.1`,
/// `0x7f.0.0.1`, `2130706433`): the resolver accepts these, so they would
/// hide which address is meant (this agent's own relay, for one).
pub(super) fn non_canonical_ipv4(relay: &str) -> bool {
    let host = relay.rsplit_once(':').map_or(relay, |(h, _)| h);
    let numeric = !host.is_empty()
        && host.starts_with(|c: char| c.is_ascii_digit())
        && host
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'.' || b == b'x' || b == b'X');
    numeric && host.parse::<Ipv4Addr>().is_err()
}

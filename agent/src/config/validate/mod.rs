//! Validation of `agent.toml` as a whole: one function per section (a file
//! each below), then the checks that span sections (a pinned path must
//! exist, the relay and peers need `[tls]`). Every problem is reported, not
//! just the first; a section with a bad value carries on with the default so
//! that the rest can still be checked.

mod control_plane;
mod forward;
mod health;
mod ingress;
mod listen;
mod recordings;
mod relay;
mod tls;
mod upgrade;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::diag::Diag;
use super::values::{parse_duration, valid_pop_name};
use super::{AgentConfig, ConfigError, ConfigFiles, Peer, peers, raw};

/// `agent.toml` (`text`, read from `path`) and the peers file it names;
/// `None` when the text does not even parse. Problems go to `errors`, and a
/// config comes back only to be used when there are none.
pub(super) fn validate(path: &Path, text: &str, errors: &mut Vec<ConfigError>) -> Option<AgentConfig> {
    let mut d = Diag::new(path, text, errors);
    let raw: raw::Agent = d.parse()?;
    let pop = pop(&mut d, &raw.pop);
    let raw_listen = raw.listen.unwrap_or_default();
    let listen = listen::validate(&mut d, &raw_listen, path);
    let control_plane = control_plane::validate(&mut d, &raw.control_plane);
    let tls = raw.tls.as_ref().and_then(|t| tls::validate(&mut d, t, &pop));
    let health = health::validate(&mut d, &raw.health);
    let forward = forward::validate(&mut d, &raw.forward);
    let ingress = ingress::validate(&mut d, &raw.ingress);
    let relay = relay::validate(&mut d, &raw.relay);
    let upgrade = upgrade::validate(&mut d, &raw.upgrade, path);
    let recordings = raw
        .recordings
        .as_ref()
        .and_then(|r| recordings::validate(&mut d, r));
    // The peers file is validated against its own text.
    let (peers, peers_path) = peers::named_in(&mut d, raw.peers.as_ref(), &pop, listen.relay);

    if let Some(pin) = &raw.forward.pin {
        known_pin(&mut d, pin, &peers, &control_plane);
    }
    if raw.tls.is_none() {
        if listen.relay.is_some()
            && let Some(at) = &raw_listen.relay
        {
            d.span(
                at,
                "listen.relay is set but [tls] is missing: the relay only accepts mutual TLS",
            );
        }
        if !peers.is_empty()
            && let Some(pr) = &raw.peers
        {
            d.span(
                &pr.file,
                "peers are configured but [tls] is missing: peer tunnels need this agent's certificate",
            );
        }
    }

    Some(AgentConfig {
        pop,
        listen,
        control_plane,
        tls,
        health,
        forward,
        ingress,
        relay,
        peers,
        upgrade,
        recordings,
        files: ConfigFiles {
            agent: path.to_path_buf(),
            peers: peers_path,
            crl: raw
                .tls
                .as_ref()
                .and_then(|t| t.get_ref().crl.as_ref())
                .map(|c| super::values::resolve(path, c.get_ref())),
        },
    })
}

/// `pop`: this agent's name, which its certificate must carry.
fn pop(d: &mut Diag<'_>, pop: &Spanned<String>) -> String {
    let v = pop.get_ref();
    if !valid_pop_name(v) {
        d.span(
            pop,
            format!("pop: `{v}` is not a PoP name (lowercase letters, digits and '-', at most 32)"),
        );
    }
    v.clone()
}

/// `forward.pin` names a path this config has.
/// With several control-plane endpoints a pin may name a route (every
/// endpoint) or one path (`via:maa@<endpoint>`).
fn known_pin(d: &mut Diag<'_>, pin: &Spanned<String>, peers: &[Peer], cp: &super::ControlPlane) {
    let v = pin.get_ref();
    let (route, endpoint) = match v.split_once('@') {
        Some((r, e)) if cp.endpoints.len() > 1 => (r, Some(e)),
        _ => (v.as_str(), None),
    };
    let known_route = route == "direct" || peers.iter().any(|p| p.path_name() == route);
    let known_endpoint = endpoint.is_none_or(|e| cp.endpoints.iter().any(|x| x.name == e));
    if !(known_route && known_endpoint) {
        d.span(
            pin,
            format!(
                "forward.pin: `{v}` is not a path; use \"direct\" or \"via:<peer>\" with a configured peer{}",
                if cp.endpoints.len() > 1 {
                    ", optionally with @<endpoint>"
                } else {
                    ""
                }
            ),
        );
    }
}

/// A duration setting: unset is `default`, and so is a bad or zero value
/// (after saying so).
fn duration_or(d: &mut Diag<'_>, key: &str, v: &Option<Spanned<String>>, default: Duration) -> Duration {
    match v {
        None => default,
        Some(s) => match parse_duration(s.get_ref()) {
            Ok(dur) if dur > Duration::ZERO => dur,
            Ok(_) => {
                d.span(s, format!("{key}: must be greater than zero"));
                default
            }
            Err(e) => {
                d.span(s, format!("{key}: {e}"));
                default
            }
        },
    }
}

/// A socket address setting: unset is `default`, and so is one that does not
/// parse (after saying so).
fn addr_or(d: &mut Diag<'_>, key: &str, v: &Option<Spanned<String>>, default: SocketAddr) -> SocketAddr {
    match v {
        None => default,
        Some(s) => s.get_ref().parse().unwrap_or_else(|_| {
            d.span(
                s,
                format!("{key}: `{}` is not an IP:port socket address", s.get_ref()),
            );
            default
        }),
    }
}

/// A count that must be at least 1: unset is `default`, and so is 0 (after
/// saying so).
fn positive<T: TryFrom<u32> + Copy>(d: &mut Diag<'_>, key: &str, v: &Option<Spanned<u32>>, default: T) -> T {
    match v {
        None => default,
        Some(n) if *n.get_ref() == 0 => {
            d.span(n, format!("{key}: must be at least 1"));
            default
        }
        Some(n) => T::try_from(*n.get_ref()).unwrap_or(default),
    }
}

/// A share between 0.0 and 1.0: unset is `default`, and so is one outside
/// (after saying so).
fn ratio(d: &mut Diag<'_>, key: &str, v: &Option<Spanned<f64>>, default: f64) -> f64 {
    match v {
        None => default,
        Some(x) if !(0.0..=1.0).contains(x.get_ref()) => {
            d.span(x, format!("{key}: must be between 0.0 and 1.0"));
            default
        }
        Some(x) => *x.get_ref(),
    }
}

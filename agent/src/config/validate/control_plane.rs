//! `[control_plane]`: the endpoint (`url`, pinned `addresses`) or the
//! endpoints (`[[control_plane.endpoints]]`: regions with a priority), the
//! extra CA and bearer token, and how often the fleet report goes out.

use std::net::SocketAddr;

use toml::Spanned;

use super::{Diag, duration_or};
use crate::config::values::{resolve, valid_pop_name};
use crate::config::{ControlPlane, Endpoint, raw};
use crate::tls;

pub(super) fn validate(d: &mut Diag<'_>, raw: &Spanned<raw::ControlPlane>) -> ControlPlane {
    let r = raw.get_ref();
    let mut cp = ControlPlane {
        endpoints: Vec::new(),
        ca: r.ca.as_ref().map(|c| resolve(d.file(), c.get_ref())),
        ca_certs: Vec::new(),
        token: None,
        report_interval: Some(ControlPlane::DEFAULT_REPORT_INTERVAL),
        auth_value: None,
    };
    if let Some(v) = &r.report_interval {
        cp.report_interval = if v.get_ref() == "off" {
            None
        } else {
            Some(duration_or(
                d,
                "control_plane.report_interval",
                &r.report_interval,
                ControlPlane::DEFAULT_REPORT_INTERVAL,
            ))
        };
    }
    match (&r.url, &r.endpoints) {
        (Some(u), None) => {
            let mut e = endpoint(d, "control_plane", u, &r.addresses);
            e.priority = 1;
            cp.endpoints.push(e);
        }
        (None, Some(list)) => {
            if let Some(a) = r.addresses.first() {
                d.span(
                    a,
                    "control_plane.addresses: goes with control_plane.url; with [[control_plane.endpoints]] give each endpoint its own addresses",
                );
            }
            endpoints(d, list, &mut cp.endpoints);
        }
        (Some(u), Some(_)) => d.span(
            u,
            "control_plane.url and [[control_plane.endpoints]] are both set: use one (url for one endpoint, endpoints for several)",
        ),
        (None, None) => d.span(
            raw,
            "[control_plane] needs `url` (one endpoint) or [[control_plane.endpoints]] (several)",
        ),
    }
    if cp.endpoints.is_empty() {
        // Keeps the rest of validation going; the errors above stop the load.
        cp.endpoints.push(placeholder());
    }
    if let (Some(c), Some(p)) = (&r.ca, &cp.ca) {
        match tls::load_certs(p) {
            Ok(certs) => cp.ca_certs = certs,
            Err(e) => d.span(c, format!("control_plane.ca: {e}")),
        }
    }
    if let Some(t) = &r.token_file {
        cp.token = token(d, t);
    }
    cp.auth_value = cp
        .token
        .as_ref()
        .and_then(|t| http::HeaderValue::from_str(&format!("Bearer {t}")).ok());
    cp
}

fn placeholder() -> Endpoint {
    Endpoint {
        name: "invalid".to_owned(),
        priority: 1,
        url: http::Uri::from_static("http://invalid"),
        tls: false,
        host: "invalid".to_owned(),
        port: 80,
        base_path: String::new(),
        addresses: Vec::new(),
        host_value: None,
    }
}

/// `[[control_plane.endpoints]]`: each endpoint, then the checks across
/// them (names unique, no endpoint twice); sorted by priority, file order
/// among equals.
fn endpoints(d: &mut Diag<'_>, list: &Spanned<Vec<Spanned<raw::Endpoint>>>, out: &mut Vec<Endpoint>) {
    if list.get_ref().is_empty() {
        d.span(list, "[[control_plane.endpoints]] lists no endpoint");
        return;
    }
    for (i, item) in list.get_ref().iter().enumerate() {
        let r = item.get_ref();
        let key = "control_plane.endpoints";
        let mut e = endpoint(d, key, &r.url, &r.addresses);
        // Unset: file order (the first listed is the primary).
        e.priority = u32::try_from(i + 1).unwrap_or(u32::MAX);
        if let Some(p) = &r.priority {
            if *p.get_ref() == 0 {
                d.span(
                    p,
                    "control_plane.endpoints.priority: must be 1 or more (1 is tried first)",
                );
            } else {
                e.priority = *p.get_ref();
            }
        }
        if let Some(n) = &r.name {
            if valid_pop_name(n.get_ref()) {
                e.name = n.get_ref().clone();
            } else {
                d.span(
                    n,
                    format!(
                        "control_plane.endpoints.name: `{}` must be 1-32 characters of a-z, 0-9 and '-'",
                        n.get_ref()
                    ),
                );
            }
        }
        if let Some(other) = out.iter().find(|o| o.name == e.name) {
            let what = if r.name.is_some() {
                "name"
            } else {
                "host (give each a `name`)"
            };
            let at: &Spanned<String> = r.name.as_ref().unwrap_or(&r.url);
            d.span(
                at,
                format!(
                    "control_plane.endpoints: the {what} `{}` is already used by {}",
                    e.name, other.url
                ),
            );
        } else if let Some(other) = out
            .iter()
            .find(|o| o.authority().eq_ignore_ascii_case(&e.authority()) && !e.host.is_empty())
        {
            d.span(
                &r.url,
                format!(
                    "control_plane.endpoints: {} is already listed as `{}`",
                    e.authority(),
                    other.name
                ),
            );
        }
        out.push(e);
    }
    out.sort_by_key(|e| e.priority);
}

/// One endpoint's URL and addresses; its name defaults to the URL's host.
fn endpoint(d: &mut Diag<'_>, key: &str, u: &Spanned<String>, addresses: &[Spanned<String>]) -> Endpoint {
    let mut e = placeholder();
    url(d, key, u, &mut e);
    e.name = e.host.clone();
    for a in addresses {
        match a.get_ref().parse::<SocketAddr>() {
            Ok(sa) => e.addresses.push(sa),
            Err(_) => d.span(
                a,
                format!(
                    "{key}.addresses: `{}` is not an IP:port socket address",
                    a.get_ref()
                ),
            ),
        }
    }
    e.host_value = http::HeaderValue::from_str(&e.host_header()).ok();
    e
}

/// `url`: fills in the scheme, host, port and base path of `e` when the URL
/// is usable, and leaves them alone when it is not.
fn url(d: &mut Diag<'_>, key: &str, url: &Spanned<String>, e: &mut Endpoint) {
    let uri = match url.get_ref().parse::<http::Uri>() {
        Ok(uri) => uri,
        Err(err) => {
            d.span(url, format!("{key}.url: not a URL: {err}"));
            return;
        }
    };
    let scheme = uri.scheme_str().unwrap_or("");
    if scheme != "https" && scheme != "http" {
        d.span(
            url,
            format!("{key}.url: must start with https:// (or http:// in a lab)"),
        );
    } else if uri.host().is_none() {
        d.span(url, format!("{key}.url: has no host"));
    } else if uri.query().is_some() {
        d.span(url, format!("{key}.url: must not have a query"));
    } else {
        e.tls = scheme == "https";
        e.host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
        e.port = uri.port_u16().unwrap_or(if e.tls { 443 } else { 80 });
        e.base_path = uri.path().trim_end_matches('/').to_owned();
        e.url = uri;
    }
}

/// `control_plane.token_file`: the bearer token in it (one line, printable
/// ASCII), or `None` after saying what is wrong with the file.
fn token(d: &mut Diag<'_>, file: &Spanned<String>) -> Option<String> {
    let p = resolve(d.file(), file.get_ref());
    let text = match std::fs::read_to_string(&p) {
        Ok(text) => text,
        Err(e) => {
            d.span(
                file,
                format!("control_plane.token_file: cannot read {}: {e}", p.display()),
            );
            return None;
        }
    };
    let token = text.trim();
    if token.is_empty() {
        d.span(
            file,
            format!("control_plane.token_file: {} is empty", p.display()),
        );
        None
    } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
        d.span(
            file,
            format!(
                "control_plane.token_file: {} holds characters a bearer token cannot carry",
                p.display()
            ),
        );
        None
    } else {
        Some(token.to_owned())
    }
}

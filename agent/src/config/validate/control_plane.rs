//! `[control_plane]`: the URL, pinned addresses, extra CA and bearer token,
//! and how often the fleet report goes out.

use std::net::SocketAddr;

use toml::Spanned;

use super::{Diag, duration_or};
use crate::config::values::resolve;
use crate::config::{ControlPlane, raw};
use crate::tls;

pub(super) fn validate(d: &mut Diag<'_>, raw: &Spanned<raw::ControlPlane>) -> ControlPlane {
    let r = raw.get_ref();
    let mut cp = ControlPlane {
        url: http::Uri::from_static("http://invalid"),
        tls: false,
        host: String::new(),
        port: 0,
        base_path: String::new(),
        addresses: Vec::new(),
        ca: r.ca.as_ref().map(|c| resolve(d.file(), c.get_ref())),
        ca_certs: Vec::new(),
        token: None,
        report_interval: Some(ControlPlane::DEFAULT_REPORT_INTERVAL),
        host_value: None,
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
    url(d, &r.url, &mut cp);
    for a in &r.addresses {
        match a.get_ref().parse::<SocketAddr>() {
            Ok(sa) => cp.addresses.push(sa),
            Err(_) => d.span(
                a,
                format!(
                    "control_plane.addresses: `{}` is not an IP:port socket address",
                    a.get_ref()
                ),
            ),
        }
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
    cp.host_value = http::HeaderValue::from_str(&cp.host_header()).ok();
    cp.auth_value = cp
        .token
        .as_ref()
        .and_then(|t| http::HeaderValue::from_str(&format!("Bearer {t}")).ok());
    cp
}

/// `control_plane.url`: fills in the scheme, host, port and base path of
/// `cp` when the URL is usable, and leaves them alone when it is not.
fn url(d: &mut Diag<'_>, url: &Spanned<String>, cp: &mut ControlPlane) {
    let uri = match url.get_ref().parse::<http::Uri>() {
        Ok(uri) => uri,
        Err(e) => {
            d.span(url, format!("control_plane.url: not a URL: {e}"));
            return;
        }
    };
    let scheme = uri.scheme_str().unwrap_or("");
    if scheme != "https" && scheme != "http" {
        d.span(
            url,
            "control_plane.url: must start with https:// (or http:// in a lab)",
        );
    } else if uri.host().is_none() {
        d.span(url, "control_plane.url: has no host");
    } else if uri.query().is_some() {
        d.span(url, "control_plane.url: must not have a query");
    } else {
        cp.tls = scheme == "https";
        cp.host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
        cp.port = uri.port_u16().unwrap_or(if cp.tls { 443 } else { 80 });
        cp.base_path = uri.path().trim_end_matches('/').to_owned();
        cp.url = uri;
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

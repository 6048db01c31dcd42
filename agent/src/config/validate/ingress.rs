//! `[ingress]`: what the agent accepts from call handlers (body and head
//! sizes, timeouts, connections) and how long it drains on shutdown.

use toml::Spanned;

use super::{Diag, duration_or, positive};
use crate::config::values::parse_size;
use crate::config::{Ingress, raw};

pub(super) fn validate(d: &mut Diag<'_>, i: &raw::Ingress) -> Ingress {
    Ingress {
        max_body: match &i.max_body {
            None => Ingress::DEFAULT_MAX_BODY,
            Some(v) => parse_size(v.get_ref()).unwrap_or_else(|e| {
                d.span(v, format!("ingress.max_body: {e}"));
                Ingress::DEFAULT_MAX_BODY
            }),
        },
        max_header_bytes: i
            .max_header_bytes
            .as_ref()
            .map_or(Ingress::DEFAULT_MAX_HEADER_BYTES, |v| max_header_bytes(d, v)),
        header_timeout: duration_or(
            d,
            "ingress.header_timeout",
            &i.header_timeout,
            Ingress::DEFAULT_HEADER_TIMEOUT,
        ),
        idle_timeout: duration_or(
            d,
            "ingress.idle_timeout",
            &i.idle_timeout,
            Ingress::DEFAULT_IDLE_TIMEOUT,
        ),
        max_connections: positive(
            d,
            "ingress.max_connections",
            &i.max_connections,
            Ingress::DEFAULT_MAX_CONNECTIONS,
        ),
        body_timeout: duration_or(
            d,
            "ingress.body_timeout",
            &i.body_timeout,
            Ingress::DEFAULT_BODY_TIMEOUT,
        ),
        drain_timeout: duration_or(
            d,
            "ingress.drain_timeout",
            &i.drain_timeout,
            Ingress::DEFAULT_DRAIN_TIMEOUT,
        ),
        drain_idle: duration_or(
            d,
            "ingress.drain_idle",
            &i.drain_idle,
            Ingress::DEFAULT_DRAIN_IDLE,
        ),
    }
}

/// `ingress.max_header_bytes`: a size within what hyper can read and what
/// the control plane accepts after the agent adds its own headers.
fn max_header_bytes(d: &mut Diag<'_>, v: &Spanned<toml::Value>) -> usize {
    const MIN: usize = Ingress::MIN_HEADER_BYTES;
    const MAX: usize = Ingress::MAX_HEADER_BYTES;
    match parse_size(v.get_ref()) {
        Ok(n) if (MIN as u64..=MAX as u64).contains(&n) => n as usize,
        Ok(n) => {
            d.span(
                v,
                format!(
                    "ingress.max_header_bytes: {n} is outside {MIN}..={MAX} \
                     (the control plane accepts request heads up to 64 KiB)"
                ),
            );
            Ingress::DEFAULT_MAX_HEADER_BYTES
        }
        Err(e) => {
            d.span(v, format!("ingress.max_header_bytes: {e}"));
            Ingress::DEFAULT_MAX_HEADER_BYTES
        }
    }
}

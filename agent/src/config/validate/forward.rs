//! `[forward]`: deadlines, attempt timeouts, hedging, the retry budget and
//! which requests are emergencies. (`forward.pin` names a path, so it is
//! checked once the peers are known.)

use super::{Diag, duration_or, ratio};
use crate::config::values::{parse_size, resolve};
use crate::config::{Deferrable, Forward, raw};

pub(super) fn validate(d: &mut Diag<'_>, f: &raw::Forward) -> Forward {
    let forward = Forward {
        pin: f.pin.as_ref().map(|p| p.get_ref().clone()),
        deadline: duration_or(d, "forward.deadline", &f.deadline, Forward::DEFAULT_DEADLINE),
        attempt_timeout_min: duration_or(
            d,
            "forward.attempt_timeout_min",
            &f.attempt_timeout_min,
            Forward::DEFAULT_ATTEMPT_TIMEOUT_MIN,
        ),
        attempt_timeout_max: duration_or(
            d,
            "forward.attempt_timeout_max",
            &f.attempt_timeout_max,
            Forward::DEFAULT_ATTEMPT_TIMEOUT_MAX,
        ),
        attempt_timeout_factor: match &f.attempt_timeout_factor {
            Some(v) if !(*v.get_ref() >= 1.0 && v.get_ref().is_finite()) => {
                d.span(v, "forward.attempt_timeout_factor: must be at least 1.0");
                Forward::DEFAULT_ATTEMPT_TIMEOUT_FACTOR
            }
            Some(v) => *v.get_ref(),
            None => Forward::DEFAULT_ATTEMPT_TIMEOUT_FACTOR,
        },
        connect_timeout: duration_or(
            d,
            "forward.connect_timeout",
            &f.connect_timeout,
            Forward::DEFAULT_CONNECT_TIMEOUT,
        ),
        hedge: f.hedge.unwrap_or(Forward::DEFAULT_HEDGE),
        retry_budget_ratio: ratio(
            d,
            "forward.retry_budget_ratio",
            &f.retry_budget_ratio,
            Forward::DEFAULT_RETRY_BUDGET_RATIO,
        ),
        retry_budget_min_per_sec: f
            .retry_budget_min_per_sec
            .unwrap_or(Forward::DEFAULT_RETRY_BUDGET_MIN_PER_SEC),
        emergency_path_prefixes: f
            .emergency_path_prefixes
            .iter()
            .filter_map(|p| {
                if p.get_ref().starts_with('/') {
                    Some(p.get_ref().clone())
                } else {
                    d.span(
                        p,
                        "forward.emergency_path_prefixes: each prefix must start with '/'",
                    );
                    None
                }
            })
            .collect(),
        deferrable: f
            .deferrable
            .iter()
            .filter_map(|rule| deferrable(d, rule.get_ref()))
            .collect(),
        deferred_journal: resolve(
            d.file(),
            f.deferred_journal
                .as_ref()
                .map_or(Forward::DEFAULT_DEFERRED_JOURNAL, |j| j.get_ref()),
        ),
        deferred_max_bytes: match &f.deferred_max_bytes {
            None => Forward::DEFAULT_DEFERRED_MAX_BYTES,
            Some(v) => match parse_size(v.get_ref()) {
                Ok(n) if n >= 64 * 1024 => n,
                Ok(_) => {
                    d.span(v, "forward.deferred_max_bytes: at least 64KiB");
                    Forward::DEFAULT_DEFERRED_MAX_BYTES
                }
                Err(e) => {
                    d.span(v, format!("forward.deferred_max_bytes: {e}"));
                    Forward::DEFAULT_DEFERRED_MAX_BYTES
                }
            },
        },
    };
    if forward.attempt_timeout_min > forward.attempt_timeout_max
        && let Some(s) = &f.attempt_timeout_min
    {
        d.span(
            s,
            "forward.attempt_timeout_min: is greater than forward.attempt_timeout_max",
        );
    }
    forward
}

/// One `[[forward.deferrable]]`: a method and a path of `/`-separated
/// segments, `*` for one segment (the ordering key).
fn deferrable(d: &mut Diag<'_>, rule: &raw::Deferrable) -> Option<Deferrable> {
    let method = match http::Method::from_bytes(rule.method.get_ref().to_ascii_uppercase().as_bytes()) {
        Ok(m) if !matches!(m, http::Method::GET | http::Method::HEAD | http::Method::CONNECT) => m,
        _ => {
            d.span(
                &rule.method,
                "forward.deferrable.method: a method that changes something (POST, PUT, PATCH, DELETE)",
            );
            return None;
        }
    };
    let path = rule.path.get_ref();
    let segments_ok = path
        .split('/')
        .skip(1)
        .all(|s| !s.is_empty() && (s == "*" || !s.contains('*')));
    if !path.starts_with('/') || path.contains('?') || !segments_ok {
        d.span(
            &rule.path,
            "forward.deferrable.path: a path like /v1/calls/*/events (`*` is one whole segment)",
        );
        return None;
    }
    Some(Deferrable::new(method, path))
}

//! `[health]`: how every path is probed and when it changes state.

use super::{Diag, duration_or, positive, ratio};
use crate::config::{Health, raw};

pub(super) fn validate(d: &mut Diag<'_>, h: &raw::Health) -> Health {
    let health = Health {
        interval: duration_or(d, "health.interval", &h.interval, Health::DEFAULT_INTERVAL),
        path: match &h.path {
            Some(p) if !p.get_ref().starts_with('/') => {
                d.span(p, "health.path: must start with '/'");
                Health::DEFAULT_PATH.to_owned()
            }
            Some(p) => p.get_ref().clone(),
            None => Health::DEFAULT_PATH.to_owned(),
        },
        timeout_min: duration_or(
            d,
            "health.timeout_min",
            &h.timeout_min,
            Health::DEFAULT_TIMEOUT_MIN,
        ),
        timeout_max: duration_or(
            d,
            "health.timeout_max",
            &h.timeout_max,
            Health::DEFAULT_TIMEOUT_MAX,
        ),
        rise: positive(d, "health.rise", &h.rise, Health::DEFAULT_RISE),
        fall: positive(d, "health.fall", &h.fall, Health::DEFAULT_FALL),
        degraded_loss: ratio(
            d,
            "health.degraded_loss",
            &h.degraded_loss,
            Health::DEFAULT_DEGRADED_LOSS,
        ),
        window: positive(d, "health.window", &h.window, Health::DEFAULT_WINDOW),
        hold_down_min: duration_or(
            d,
            "health.hold_down_min",
            &h.hold_down_min,
            Health::DEFAULT_HOLD_DOWN_MIN,
        ),
        hold_down_max: duration_or(
            d,
            "health.hold_down_max",
            &h.hold_down_max,
            Health::DEFAULT_HOLD_DOWN_MAX,
        ),
        watched: positive(d, "health.watched", &h.watched, Health::DEFAULT_WATCHED),
        standby_interval: duration_or(
            d,
            "health.standby_interval",
            &h.standby_interval,
            Health::DEFAULT_STANDBY_INTERVAL,
        ),
    };
    if health.timeout_min > health.timeout_max
        && let Some(s) = &h.timeout_min
    {
        d.span(s, "health.timeout_min: is greater than health.timeout_max");
    }
    if health.hold_down_min > health.hold_down_max
        && let Some(s) = &h.hold_down_min
    {
        d.span(s, "health.hold_down_min: is greater than health.hold_down_max");
    }
    if health.standby_interval < health.interval
        && let Some(s) = &h.standby_interval
    {
        d.span(s, "health.standby_interval: is shorter than health.interval");
    }
    health
}

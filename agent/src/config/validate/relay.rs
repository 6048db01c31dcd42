//! `[relay]`: the limits of the peer relay (handshake and idle timeouts,
//! tunnels in all and per peer).

use super::{Diag, duration_or, positive};
use crate::config::{RelayLimits, raw};

pub(super) fn validate(d: &mut Diag<'_>, r: &raw::Relay) -> RelayLimits {
    RelayLimits {
        handshake_timeout: duration_or(
            d,
            "relay.handshake_timeout",
            &r.handshake_timeout,
            RelayLimits::DEFAULT_HANDSHAKE_TIMEOUT,
        ),
        idle_timeout: duration_or(
            d,
            "relay.idle_timeout",
            &r.idle_timeout,
            RelayLimits::DEFAULT_IDLE_TIMEOUT,
        ),
        max_tunnels: positive(
            d,
            "relay.max_tunnels",
            &r.max_tunnels,
            RelayLimits::DEFAULT_MAX_TUNNELS,
        ),
        max_tunnels_per_peer: positive(
            d,
            "relay.max_tunnels_per_peer",
            &r.max_tunnels_per_peer,
            RelayLimits::DEFAULT_MAX_TUNNELS_PER_PEER,
        ),
    }
}

//! Path health: what probes and real requests saw on every path, the
//! `up`/`degraded`/`down` state machine with hysteresis and hold-down, scoring,
//! and the ranked snapshot the request path reads without locks.
//!
//! Evidence arrives as [`Outcome`]s, from the prober (one `GET /healthz` per
//! path per interval) and from every request attempt (passive health). Each
//! outcome updates that path's stats under a short per-path lock that is never
//! held across an `.await`; then a fresh [`Snapshot`] is published through
//! `ArcSwap`, which the forwarder loads for free on every request.

//!
//! [`stats`] keeps one path's evidence and state machine; [`table`] holds
//! every path's, ranks them and publishes the snapshot and the per-path
//! metrics.

mod stats;
mod table;

use std::sync::Arc;
use std::time::Duration;

pub use stats::{CLEAN_RUN, PathMemory, PathStats};
pub use table::{HealthTable, PathView, Snapshot, rank};

/// What one exchange on a path showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// A probe's answer arrived after this long (a network RTT sample).
    Ok(Duration),
    /// A request was answered after this long. Good evidence, but its time
    /// includes the control plane's work, so it feeds the hedge delay, not RTT.
    Answered(Duration),
    /// Slow enough to count as a lost exchange, though it completed
    /// (a stall like a retransmission).
    Slow(Duration),
    /// Timed out, reset, refused, or could not connect.
    Failed(FailureKind),
}

/// Why an exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// TCP or TLS connect failed, or the peer's relay refused the tunnel.
    Connect,
    /// No response headers within the timeout.
    Timeout,
    /// The connection broke during the exchange.
    Broken,
    /// The control plane itself refused the request or its connection
    /// (HTTP/2 RST_STREAM or GOAWAY): the path carried the bytes, so this is
    /// no evidence against it. One bad request cannot take a path down.
    Refused,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect failed",
            FailureKind::Timeout => "timed out",
            FailureKind::Broken => "connection broke",
            FailureKind::Refused => "refused by the control plane",
        }
    }
}

/// How a path is used, for scoring.
#[derive(Debug, Clone, PartialEq)]
pub struct PathInfo {
    /// `direct` or `via:<peer>` (with `@<endpoint>` when there are several).
    pub name: Arc<str>,
    /// The control-plane endpoint it goes to, and that endpoint's priority
    /// (lower is preferred).
    pub endpoint: Arc<str>,
    pub priority: u32,
    pub direct: bool,
    /// Preference among peers (1..=1000, default 100).
    pub weight: u32,
    /// `false` while a peer is drained: never chosen for new requests.
    pub enabled: bool,
    /// Drained at runtime (`detour-agent peer drain`), not in the file.
    pub drained: bool,
}

//! Restarts and upgrades that refuse and fail no call.
//!
//! A new `detour-agent` process never binds ports the old one holds; it
//! gets the very same listening sockets, so the local port never stops
//! accepting:
//! - from systemd, when `detour-agent.socket` holds them (socket activation:
//!   `LISTEN_FDS`; a restart is stop + start, and connections that arrive in
//!   between wait in the socket's backlog), or
//! - from the running agent itself (`detour-agent run --takeover`): the new
//!   process asks for them on `upgrade.dir/handover.sock`, gets them over
//!   the Unix socket (`SCM_RIGHTS`), starts serving, and the old one drains
//!   and exits.
//!
//! Either way the old process writes its path table to
//! `upgrade.dir/health.json` before it lets go, and the new one starts from
//! it ([`snapshot`]), so an upgrade in the middle of an outage does not send
//! a single request back to a dead uplink. How the old process drains is the
//! listeners' business (`ingress::listener`, `relay`); when is [`Agent`]'s.
//!
//! [`Agent`]: crate::Agent

pub mod handover;
pub mod listeners;
pub mod snapshot;

pub use listeners::Inherited;

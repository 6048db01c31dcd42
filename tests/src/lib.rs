//! The Detour lab: whole fleets on one machine. [`fleet`] builds a control
//! plane and agents on loopback joined by fault-injecting [`link`]s;
//! [`mock_cp`] is a fast control-plane stand-in; [`load`] is a call
//! handler's traffic and its latencies; [`process`] and [`report`] are the
//! helpers for processes the lab starts and for what it writes;
//! [`haproxy_squid`] runs the design Detour replaces. The scenario tests in
//! `tests/` and the `detour-lab` binary (demo, [`bench`](mod@bench)) are
//! built on these.

pub mod bench;
pub mod demo;
pub mod fleet;
pub mod haproxy_squid;
pub mod link;
pub mod load;
pub mod mock_cp;
pub mod netns;
pub mod ns;
pub mod pg;
pub mod plot;
pub mod process;
pub mod report;
pub mod soak;

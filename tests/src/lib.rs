//! The Detour lab: whole fleets on one machine. Lowest first:
//! [`process`] (built binaries, children, ports, `/proc`) and [`report`]
//! (Markdown tables, docs/benchmarks.md blocks) are the helpers; [`load`] is
//! a call handler's traffic and its latencies; [`link`] a fault-injecting
//! TCP link; [`mock_cp`] a fast control-plane stand-in (in-process or as the
//! `detour-lab mock-cp` process); [`plot`] draws latency over time; [`pg`] a
//! private PostgreSQL; [`ws`] a call handler's WebSocket. [`fleet`] builds a control plane and agents on loopback
//! joined by links, [`ns`] the same fleet in network namespaces;
//! [`haproxy_squid`] runs the design Detour replaces; [`soak`] is the long
//! run of faults on the namespace fleet. On top: [`demo`], the outage story,
//! and [`bench`](mod@bench), the benchmarks. The scenario tests in `tests/` and the
//! `detour-lab` binary are built on these.

pub mod bench;
pub mod cpus;
pub mod demo;
pub mod fleet;
pub mod haproxy_squid;
pub mod link;
pub mod load;
pub mod mock_cp;
pub mod ns;
pub mod pg;
pub mod plot;
pub mod process;
pub mod report;
pub mod s3;
pub mod soak;
pub mod ws;

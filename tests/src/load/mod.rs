//! A call handler's traffic, lowest first: [`CallClient`] sends one request
//! and records what it saw ([`CallResult`]); [`Latencies`] reads quantiles
//! of what was seen; the open loop ([`steady`], [`paced`], [`fixed_rate`],
//! [`call_with_retries`], [`retrying`]) starts requests at a fixed rate with
//! a client timeout, bounded in count and time; the [`closed_loop`] measures
//! throughput; [`summary`] is the JSON line `detour-lab load` prints.

mod client;
mod closed_loop;
mod latency;
mod open_loop;
pub mod summary;

pub use client::{Call, CallClient, CallResult, SMALL_CALL};
pub use closed_loop::closed_loop;
pub use latency::{Latencies, histogram, q3, quantile};
pub use open_loop::{Retried, call_with_retries, fixed_rate, paced, retrying, steady};

//! Benchmark of the intake alone: validation and E.164 normalisation of the
//! call benchmark's bodies (`bench.rs`), in µs per call on one thread, then
//! on two threads at once (which the old global regex-cache mutex
//! serialised). For stable numbers on a shared machine count instructions:
//!
//! valgrind --tool=callgrind target/release/examples/intake_cost 2000
//!
//! (the difference between two iteration counts, divided by three times
//! their difference, is the cost of one call without the one-time load of
//! the crate's metadata).
use detour_control_plane::intake::{self, Numbers};
use std::time::Instant;

fn body(n: u64, rules: u64) -> serde_json::Value {
    let prefix = 70_000 + (n % rules);
    let rest = (n * 7919) % 100_000;
    serde_json::json!({"caller": "+919876543210", "destination": format!("+91{prefix}{rest:05}"),
        "call_type": "outbound", "metadata": {"bench": n}})
}

fn run(iters: u64, off: u64) -> f64 {
    let numbers = Numbers::new("IN", ["100", "112"].map(String::from));
    let bodies: Vec<_> = (0..iters).map(|n| body(n + off, 10_000)).collect();
    let t = Instant::now();
    for b in &bodies {
        std::hint::black_box(intake::call_request(b, &numbers).unwrap());
    }
    t.elapsed().as_secs_f64() * 1e6 / iters as f64
}

fn main() {
    let iters: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    run(1000, 0);
    println!("1 thread: {:.2} µs/call", run(iters, 1_000_000));
    let h: Vec<_> = (0..2)
        .map(|i| std::thread::spawn(move || run(iters, 2_000_000 + i * iters)))
        .collect();
    for h in h {
        println!("2 threads: {:.2} µs/call", h.join().unwrap());
    }
}

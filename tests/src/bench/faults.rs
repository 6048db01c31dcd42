//! What the `failover` and `compare` benchmarks share: the faults they put on
//! blr's uplink, and a run of steady load with one fault in the middle.

use std::time::Duration;

use crate::link::Fault;
use crate::load::{Call, CallClient, CallResult, steady};

/// The faults both benchmarks put on blr's uplink, in order.
pub fn faults() -> Vec<(&'static str, Fault)> {
    vec![
        ("blackhole", Fault::Blackhole),
        (
            "10% loss",
            Fault::Lossy {
                percent: 10,
                stall: Duration::from_millis(300),
            },
        ),
        (
            "30% loss",
            Fault::Lossy {
                percent: 30,
                stall: Duration::from_millis(300),
            },
        ),
    ]
}

/// The timing of one fault run.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Healthy, before the fault.
    pub before: Duration,
    /// The fault.
    pub fault_for: Duration,
    /// Healed, after it.
    pub after: Duration,
    /// What the uplink is outside the fault (`Pass`, or a WAN's delay).
    pub healthy: Fault,
}

impl Window {
    /// 5 s healthy, `seconds` (at least 5) of fault, 5 s healed.
    pub fn new(seconds: u64) -> Window {
        Window {
            before: Duration::from_secs(5),
            fault_for: Duration::from_secs(seconds.max(5)),
            after: Duration::from_secs(5),
            healthy: Fault::Pass,
        }
    }

    /// Whether `r` was sent while the fault was on.
    pub fn during(&self, r: &CallResult) -> bool {
        r.at >= self.before && r.at < self.before + self.fault_for
    }

    /// Steady load on `url` (50 small POSTs/s, 2 s client timeout) for the
    /// whole window, with `fault` set through `set` from `before` for
    /// `fault_for` (then `healthy` again). `watch(fault_for)` runs from the moment the fault is set
    /// and the fault is lifted when it returns, so it should take `fault_for`;
    /// its output comes back with every request's result.
    pub async fn run<T, W>(
        &self,
        url: &str,
        set: impl Fn(Fault),
        fault: Fault,
        watch: impl FnOnce(Duration) -> W,
    ) -> (Vec<CallResult>, T)
    where
        W: Future<Output = T>,
    {
        let client = CallClient::new(Duration::from_secs(2));
        let total = self.before + self.fault_for + self.after;
        let load = steady(&client, url, 50, total, |n| {
            Call::post("/v1/calls", &format!("{{\"n\":{n}}}"))
        });
        let script = async {
            tokio::time::sleep(self.before).await;
            set(fault);
            let seen = watch(self.fault_for).await;
            set(self.healthy);
            seen
        };
        tokio::join!(load, script)
    }
}

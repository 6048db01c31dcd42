//! The fleet view: what the fleet page (`GET /fleet`) shows, built from the
//! stored reports and history by `GET /v1/fleet/view`. Pure: the handler
//! reads the store and passes the clock, so the view is tested without one.
//!
//! Per PoP: its active path, each path's state, RTT, loss and reason, and a
//! 15-minute history per path ([`WINDOW_BUCKETS`] points of
//! [`BUCKET_MS`](crate::store::BUCKET_MS)); a PoP silent for
//! `fleet.stale_after` is stale. Beside them: the detours (which PoP goes
//! through which peer), the recent switches and relay refusals.

use std::collections::HashMap;

use detour_wire::AgentReport;
use serde_json::{Value, json};

use crate::store::{BUCKET_MS, EventRow, ReportRow, SampleRow};

/// Points in a sparkline: 30 buckets of 30 s, the last 15 minutes.
pub const WINDOW_BUCKETS: i64 = 30;
/// Switches and refusals the view lists, at most, each.
pub const EVENTS_SHOWN: i64 = 50;

/// What the view is built from.
pub struct Inputs<'a> {
    /// Now, ms since the epoch.
    pub now_ms: i64,
    /// `fleet.stale_after` in ms.
    pub stale_after_ms: i64,
    pub reports: &'a [ReportRow],
    /// Samples of the window (older ones are ignored).
    pub samples: &'a [&'a SampleRow],
    /// Newest first.
    pub switches: &'a [EventRow],
    /// Newest first.
    pub refusals: &'a [EventRow],
}

/// The first bucket of the window ending at `now_ms`.
pub fn first_bucket(now_ms: i64) -> i64 {
    now_ms.div_euclid(BUCKET_MS) - WINDOW_BUCKETS + 1
}

/// One path's history over the window, oldest point first.
struct History {
    rtt_ms: Vec<Value>,
    loss: Vec<Value>,
    state: Vec<u8>,
}

impl History {
    fn new() -> History {
        let n = WINDOW_BUCKETS as usize;
        History {
            rtt_ms: vec![Value::Null; n],
            loss: vec![Value::Null; n],
            state: vec![b'-'; n],
        }
    }
}

fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

/// The peer of a `via:<peer>` path (without an `@endpoint` suffix).
pub fn peer_of(path: &str) -> Option<&str> {
    let route = path.split('@').next().unwrap_or(path);
    route.strip_prefix("via:")
}

/// How much a PoP needs a look, for the order of the page: stale first,
/// then off its own uplink (or without any path), then with a path not
/// up, then the rest; by name within each.
fn attention(stale: bool, report: Option<&AgentReport>) -> u8 {
    let Some(r) = report else { return 0 };
    if stale {
        return 0;
    }
    let on_direct = r.active_path.as_deref().is_some_and(|a| peer_of(a).is_none());
    if !on_direct {
        return 1;
    }
    if r.paths.iter().any(|p| p.state != detour_wire::PathState::Up) || r.config_error.is_some() {
        return 2;
    }
    3
}

/// Builds the view (the JSON body of `GET /v1/fleet/view`).
pub fn view(inputs: &Inputs<'_>) -> Value {
    let first = first_bucket(inputs.now_ms);
    // By PoP, then path.
    let mut history: HashMap<&str, HashMap<&str, History>> = HashMap::new();
    for s in inputs.samples {
        let i = s.bucket - first;
        if !(0..WINDOW_BUCKETS).contains(&i) {
            continue;
        }
        let i = i as usize;
        let h = history
            .entry(s.pop.as_str())
            .or_default()
            .entry(s.path.as_str())
            .or_insert_with(History::new);
        h.rtt_ms[i] = s
            .rtt_us
            .map_or(Value::Null, |us| json!(round(us as f64 / 1000.0, 1)));
        h.loss[i] = json!(round(s.loss_ppm as f64 / 1e6, 3));
        h.state[i] = match s.state {
            0 => b'u',
            1 => b'g',
            _ => b'd',
        };
    }
    let mut pops = Vec::with_capacity(inputs.reports.len());
    let (mut direct, mut detoured, mut stale_n, mut no_path) = (0, 0, 0, 0);
    let mut detours = Vec::new();
    for (pop, received_at, text) in inputs.reports {
        let age_ms = (inputs.now_ms - received_at).max(0);
        let stale = age_ms > inputs.stale_after_ms;
        let report: Option<AgentReport> = serde_json::from_str(text).ok();
        let active = report.as_ref().and_then(|r| r.active_path.clone());
        match (stale, active.as_deref()) {
            (true, _) => stale_n += 1,
            (false, None) => no_path += 1,
            (false, Some(a)) if peer_of(a).is_some() => detoured += 1,
            (false, Some(_)) => direct += 1,
        }
        if let Some(peer) = active.as_deref().and_then(peer_of) {
            detours.push(json!({"from": pop, "via": peer, "stale": stale}));
        }
        let mut mine = history.remove(pop.as_str()).unwrap_or_default();
        let paths: Vec<Value> = report
            .as_ref()
            .map(|r| {
                r.paths
                    .iter()
                    .map(|p| {
                        let h = mine.remove(p.path.as_str()).unwrap_or_else(History::new);
                        json!({
                            "path": p.path,
                            "state": p.state.as_str(),
                            "active": p.active,
                            "rtt_ms": p.rtt_seconds.map(|s| round(s * 1000.0, 1)),
                            "loss": round(p.loss_ratio, 3),
                            "reason": p.reason,
                            "history": {
                                "rtt_ms": h.rtt_ms,
                                "loss": h.loss,
                                "state": String::from_utf8_lossy(&h.state),
                            },
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let order = attention(stale, report.as_ref());
        pops.push((
            order,
            pop.clone(),
            json!({
                "pop": pop,
                "received_at_ms": received_at,
                "age_s": round(age_ms as f64 / 1000.0, 1),
                "stale": stale,
                "version": report.as_ref().map(|r| r.version.clone()),
                "active": active,
                "config_error": report.as_ref().and_then(|r| r.config_error.clone()),
                "last_switch": report.as_ref().and_then(|r| r.switches.last()).map(|s| json!({
                    "at_ms": s.at_ms, "from": s.from, "to": s.to, "reason": s.reason,
                })),
                "paths": paths,
            }),
        ));
    }
    pops.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let event = |e: &EventRow| {
        json!({
            "at_ms": e.at, "pop": e.pop, "from": e.from_path, "to": e.to_path,
            "reason": e.reason, "n": e.n,
        })
    };
    json!({
        "now_ms": inputs.now_ms,
        "stale_after_s": round(inputs.stale_after_ms as f64 / 1000.0, 1),
        "bucket_s": BUCKET_MS / 1000,
        "window_s": BUCKET_MS / 1000 * WINDOW_BUCKETS,
        "summary": {"pops": inputs.reports.len(), "direct": direct, "detoured": detoured,
                    "stale": stale_n, "no_path": no_path},
        "pops": pops.into_iter().map(|(_, _, v)| v).collect::<Vec<_>>(),
        "detours": detours,
        "switches": inputs.switches.iter().map(event).collect::<Vec<_>>(),
        "refusals": inputs.refusals.iter().map(event).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests;

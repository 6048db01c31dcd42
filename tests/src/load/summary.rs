//! The one JSON line `detour-lab load` prints. Runs in other namespaces
//! (`demo --netns`, `bench netns`, `bench soak`) read these fields.

use std::collections::BTreeMap;

use super::client::CallResult;
use super::latency::quantile;
use super::open_loop::Retried;

/// A steady run: `requests`, `failed`, `p50_ms`, `p99_ms`, `max_ms`,
/// `by_path` (answers per `x-detour-path`), and with `call_ids` the
/// `call_id` of every answer.
pub fn steady(results: &[CallResult], call_ids: bool) -> serde_json::Value {
    let failed = results.iter().filter(|r| !r.ok()).count();
    let mut by_path: BTreeMap<&str, usize> = BTreeMap::new();
    for r in results {
        if let Some(path) = &r.path {
            *by_path.entry(path).or_default() += 1;
        }
    }
    let mut summary = serde_json::json!({
        "requests": results.len(),
        "failed": failed,
        "p50_ms": quantile(results, 0.5).as_secs_f64() * 1000.0,
        "p99_ms": quantile(results, 0.99).as_secs_f64() * 1000.0,
        "max_ms": quantile(results, 1.0).as_secs_f64() * 1000.0,
        "by_path": by_path,
    });
    if call_ids {
        let ids: Vec<String> = results
            .iter()
            .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
            .filter_map(|v| v["call_id"].as_str().map(str::to_owned))
            .collect();
        summary["call_ids"] = ids.into();
    }
    summary
}

/// A retrying run (`--retry-for`): `calls`, `failed` (never answered),
/// `retried` (answered after a failure), the failures seen in between by
/// status (`error` when there was no answer) with up to three examples
/// each, and the `call_id` of every answer.
pub fn retrying(outcomes: &[Retried]) -> serde_json::Value {
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut examples: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let (mut failed, mut retried) = (0, 0);
    let mut call_ids = Vec::new();
    for (_, (last, failures)) in outcomes {
        if !last.ok() {
            failed += 1;
        }
        if !failures.is_empty() {
            retried += 1;
        }
        for f in failures {
            let status = f
                .split(' ')
                .next()
                .filter(|s| s.parse::<u16>().is_ok())
                .unwrap_or("error");
            *by_status.entry(status.to_owned()).or_default() += 1;
            let ex = examples.entry(status.to_owned()).or_default();
            if ex.len() < 3 {
                ex.push(f.chars().take(300).collect());
            }
        }
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&last.body)
            && let Some(id) = v["call_id"].as_str()
        {
            call_ids.push(id.to_owned());
        }
    }
    serde_json::json!({
        "calls": outcomes.len(),
        "failed": failed,
        "retried": retried,
        "failures_by_status": by_status,
        "failure_examples": examples,
        "call_ids": call_ids,
    })
}

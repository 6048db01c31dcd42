//! The demo's call handler: routes seeded through blr, then call initiations
//! at a steady rate (one in ten an emergency) and events for calls already
//! made, every result sent to the timeline.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::load::{CallClient, CallResult};

/// The seeded routing rules: a route per city prefix, emergency, and a catch-all.
pub const ROUTES: &[(&str, &str)] = &[
    (
        "blr-landline",
        r#"{"prefix": "+9180", "trunk": "blr-carrier-1", "pop": "blr"}"#,
    ),
    (
        "chennai-landline",
        r#"{"prefix": "+9144", "trunk": "maa-carrier-1", "pop": "maa"}"#,
    ),
    (
        "delhi-landline",
        r#"{"prefix": "+9111", "trunk": "del-carrier-1", "pop": "del"}"#,
    ),
    (
        "mobile",
        r#"{"prefix": "+919", "trunks": [{"name": "mobile-a", "weight": 70}, {"name": "mobile-b", "weight": 30}], "pop": "blr"}"#,
    ),
    (
        "emergency",
        r#"{"prefix": "112", "trunk": "psap-blr", "pop": "blr", "priority": "emergency"}"#,
    ),
    (
        "catch-all",
        r#"{"prefix": "", "trunk": "default-carrier", "pop": "blr"}"#,
    ),
];

const DESTINATIONS: &[&str] = &[
    "08041234567",
    "04423456789",
    "01123456789",
    "+919845012345",
    "9876501234",
];

/// Stores [`ROUTES`] on the control plane through the agent at `url` with
/// the admin token.
pub async fn seed_routes(client: &CallClient, url: &str, admin: &str) -> anyhow::Result<()> {
    for (name, body) in ROUTES {
        let r = client
            .send(
                Method::PUT,
                &format!("{url}/v1/routes/{name}"),
                &[
                    ("authorization", &format!("Bearer {admin}")),
                    ("content-type", "application/json"),
                ],
                Bytes::from(*body),
            )
            .await;
        anyhow::ensure!(
            r.ok(),
            "seeding route {name}: {:?} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    Ok(())
}

/// Calls made and not yet given every event: (call id, next event).
type Made = Arc<Mutex<VecDeque<(String, &'static str)>>>;

/// Starts the traffic: `rate` requests/s to `url` for `total`, each result
/// (its `at` counted from the returned start) on the channel.
pub fn spawn(
    client: CallClient,
    url: String,
    rate: u32,
    total: Duration,
) -> (JoinHandle<()>, mpsc::UnboundedReceiver<CallResult>, Instant) {
    let (tx, rx) = mpsc::unbounded_channel::<CallResult>();
    let calls: Made = Arc::new(Mutex::new(VecDeque::new()));
    let start = Instant::now();
    let rate = rate.max(1);
    let traffic = tokio::spawn(async move {
        let period = Duration::from_secs_f64(1.0 / f64::from(rate));
        let count = (total.as_secs_f64() * f64::from(rate)) as u64;
        for n in 0..count {
            tokio::time::sleep_until(start + period.mul_f64(n as f64)).await;
            let (client, tx, calls, url) = (client.clone(), tx.clone(), calls.clone(), url.clone());
            tokio::spawn(async move {
                let at = start.elapsed();
                let mut r = one(&client, &url, n, &calls).await;
                r.at = at;
                let _ = tx.send(r);
            });
        }
    });
    (traffic, rx, start)
}

/// Request `n`: every fourth an event for a call already made (when there
/// is one), else a new call.
async fn one(client: &CallClient, url: &str, n: u64, calls: &Made) -> CallResult {
    let event_for = if n % 4 == 3 {
        calls.lock().map(|mut c| c.pop_front()).ok().flatten()
    } else {
        None
    };
    if let Some((id, kind)) = event_for {
        let body = format!("{{\"event\": \"{kind}\"}}");
        return client
            .send(
                Method::POST,
                &format!("{url}/v1/calls/{id}/events"),
                &[("content-type", "application/json")],
                Bytes::from(body),
            )
            .await;
    }
    let emergency = n.is_multiple_of(10);
    let dest = if emergency {
        "112"
    } else {
        DESTINATIONS[(n as usize) % DESTINATIONS.len()]
    };
    let body = format!(r#"{{"caller": "+919812345678", "destination": "{dest}", "call_type": "outbound"}}"#);
    let mut headers = vec![("content-type", "application/json")];
    if emergency {
        headers.push(("x-detour-priority", "emergency"));
    }
    let r = client
        .send(
            Method::POST,
            &format!("{url}/v1/calls"),
            &headers,
            Bytes::from(body),
        )
        .await;
    if r.status == Some(201)
        && let Some(id) = serde_json::from_slice::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v["call_id"].as_str().map(str::to_owned))
        && let Ok(mut c) = calls.lock()
    {
        // Its events, in order, for later requests; at most 300 wait, the
        // oldest are dropped.
        c.push_back((id.clone(), "ringing"));
        c.push_back((id.clone(), "answered"));
        c.push_back((id, "completed"));
        while c.len() > 300 {
            c.pop_front();
        }
    }
    r
}

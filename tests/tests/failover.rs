//! Failover under load, with faults injected by in-process links: a call
//! handler's steady stream (50 requests/s, 2 s client timeout) through `blr`
//! while its uplink is blackholed, made lossy, healed, or its best peer dies.
//! These assert behaviour (no failed request, where traffic went, bounded
//! latency); the numbers for docs/benchmarks.md come from `detour-lab bench`.

use std::time::Duration;

use bytes::Bytes;
use detour_lab::fleet::{Fleet, FleetOptions};
use detour_lab::link::Fault;
use detour_lab::load::{Call, CallClient, CallResult, quantile, steady};
use http::Method;
use tokio::time::Instant;

const RATE: u32 = 50;

fn call(n: u64) -> Call {
    Call::post("/v1/calls", &format!("{{\"n\":{n}}}"))
}

fn failed(results: &[CallResult]) -> Vec<&CallResult> {
    results.iter().filter(|r| !r.ok()).collect()
}

/// Runs load for `total`, calling `script` concurrently; returns the results.
async fn under_load<F>(fleet: &Fleet, total: Duration, script: F) -> Vec<CallResult>
where
    F: Future<Output = ()>,
{
    let client = CallClient::default();
    let base = fleet.pop("blr").local_url();
    let load = steady(&client, &base, RATE, total, call);
    let (results, ()) = tokio::join!(load, script);
    results
}

fn summary(results: &[CallResult]) -> String {
    let f = failed(results);
    format!(
        "{} requests, {} failed (first: {:?}), p50 {:?}, p99 {:?}, max {:?}",
        results.len(),
        f.len(),
        f.first().map(|r| (
            r.at,
            r.status,
            r.error.clone(),
            String::from_utf8_lossy(&r.body).into_owned()
        )),
        quantile(results, 0.5),
        quantile(results, 0.99),
        quantile(results, 1.0)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_uplink_under_load_fails_nothing_and_moves_within_a_second() {
    let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    let fault_at = Duration::from_secs(2);
    let results = under_load(&fleet, Duration::from_secs(8), async {
        tokio::time::sleep(fault_at).await;
        fleet.pop("blr").uplink.set(Fault::Blackhole);
        let moved = fleet
            .wait_active("blr", "via:", Duration::from_secs(1))
            .await
            .unwrap();
        assert!(moved <= Duration::from_secs(1));
    })
    .await;
    assert!(failed(&results).is_empty(), "{}", summary(&results));
    let after: Vec<&CallResult> = results
        .iter()
        .filter(|r| r.at > fault_at + Duration::from_secs(1))
        .collect();
    assert!(
        after
            .iter()
            .all(|r| r.path.as_deref().is_some_and(|p| p.starts_with("via:"))),
        "traffic on a peer"
    );
    assert!(
        quantile(&results, 1.0) < Duration::from_millis(1000),
        "no request waits near the 2 s timeout: {}",
        summary(&results)
    );
    let state = fleet
        .pop("blr")
        .agent()
        .shared
        .forwarder
        .runtime()
        .health
        .snapshot();
    assert_eq!(
        state.by_name("direct").unwrap().state,
        detour_wire::PathState::Down
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_uplink_is_left_within_five_seconds_without_failures_then_traffic_returns() {
    let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    let blr = fleet.pop("blr");
    // Healthy baseline.
    let healthy = under_load(&fleet, Duration::from_secs(3), async {}).await;
    assert!(failed(&healthy).is_empty(), "{}", summary(&healthy));
    let healthy_p99 = quantile(&healthy, 0.99);
    // 10% of chunks stall like a lost segment (300 ms, a retransmission).
    let lossy = under_load(&fleet, Duration::from_secs(10), async {
        blr.uplink.set(Fault::Lossy {
            percent: 10,
            stall: Duration::from_millis(300),
        });
        let t = Instant::now();
        loop {
            let snap = blr.agent().shared.forwarder.runtime().health.snapshot();
            if snap.active().is_some_and(|a| a.name.starts_with("via:")) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "left the lossy path within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(failed(&lossy).is_empty(), "{}", summary(&lossy));
    let p99 = quantile(&lossy, 0.99);
    assert!(
        p99 <= healthy_p99 * 2 + Duration::from_millis(100),
        "p99 during loss {p99:?} vs healthy {healthy_p99:?}: {}",
        summary(&lossy)
    );
    let snap = blr.agent().shared.forwarder.runtime().health.snapshot();
    assert_ne!(snap.by_name("direct").unwrap().state, detour_wire::PathState::Up);
    // Heal: traffic returns to direct after the clean run, and stays.
    blr.uplink.set(Fault::Pass);
    let back = fleet
        .wait_active(
            "blr",
            "direct",
            detour_agent::health::CLEAN_RUN + Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(
        back >= Duration::from_secs(5),
        "a lossy path is not trusted again at once ({back:?})"
    );
    let r = CallClient::default()
        .send(
            Method::POST,
            &format!("{}/v1/calls", blr.local_url()),
            &[],
            Bytes::from("{}"),
        )
        .await;
    assert_eq!(r.path.as_deref(), Some("direct"));
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermittent_loss_does_not_make_traffic_flap() {
    let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    let blr = fleet.pop("blr");
    let switches_before = blr.agent().shared.metrics.path_switches.get();
    let results = under_load(&fleet, Duration::from_secs(60), async {
        for _ in 0..10 {
            blr.uplink.set(Fault::Lossy {
                percent: 20,
                stall: Duration::from_millis(300),
            });
            tokio::time::sleep(Duration::from_secs(3)).await;
            blr.uplink.set(Fault::Pass);
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    })
    .await;
    let switches = blr.agent().shared.metrics.path_switches.get() - switches_before;
    assert!(failed(&results).is_empty(), "{}", summary(&results));
    assert!(switches <= 4, "{switches} switches in a minute of on/off loss");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_best_peer_dying_mid_traffic_fails_nothing() {
    let mut fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    fleet.pop("blr").uplink.set(Fault::Blackhole);
    let t = Instant::now();
    loop {
        let snap = fleet
            .pop("blr")
            .agent()
            .shared
            .forwarder
            .runtime()
            .health
            .snapshot();
        if snap.active().is_some_and(|a| a.name.starts_with("via:")) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim = {
        let snap = fleet
            .pop("blr")
            .agent()
            .shared
            .forwarder
            .runtime()
            .health
            .snapshot();
        snap.active()
            .unwrap()
            .name
            .strip_prefix("via:")
            .unwrap()
            .to_owned()
    };
    let client = CallClient::default();
    let base = fleet.pop("blr").local_url();
    // Slow answers keep requests in flight on the victim's tunnels when it dies.
    let load = steady(&client, &base, RATE, Duration::from_secs(6), |n| {
        if n % 5 == 0 {
            Call::post("/slow/100", "{}")
        } else {
            call(n)
        }
    });
    let kill = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        fleet.stop_agent(&victim).await;
    };
    let (results, ()) = tokio::join!(load, kill);
    assert!(failed(&results).is_empty(), "{}", summary(&results));
    let late: Vec<&CallResult> = results.iter().filter(|r| r.at > Duration::from_secs(4)).collect();
    assert!(
        late.iter()
            .all(|r| r.path.as_deref() != Some(&format!("via:{victim}")))
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_down_fails_fast_and_clearly_then_recovers_without_restart() {
    let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    for p in fleet.pops.values() {
        p.uplink.set(Fault::Blackhole);
    }
    let client = CallClient::default();
    let base = fleet.pop("blr").local_url();
    for i in 0..5 {
        let started = Instant::now();
        let r = client
            .send(
                Method::POST,
                &format!("{base}/v1/calls"),
                &[],
                Bytes::from(format!("{{\"i\":{i}}}")),
            )
            .await;
        assert_eq!(r.status, Some(503), "{r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "within the deadline, before the client gives up"
        );
        let p: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let attempts = p["attempts"].as_array().unwrap();
        assert!(!attempts.is_empty(), "{p}");
        assert!(
            attempts
                .iter()
                .all(|a| a["path"].is_string() && a["result"].is_string() && a["elapsed_ms"].is_u64()),
            "{p}"
        );
    }
    for p in fleet.pops.values() {
        p.uplink.set(Fault::Pass);
    }
    fleet
        .wait_active("blr", "direct", Duration::from_secs(10))
        .await
        .unwrap();
    let r = client
        .send(Method::POST, &format!("{base}/v1/calls"), &[], Bytes::from("{}"))
        .await;
    // Seen once as a 503 (a flake under investigation): the body lists the attempts.
    assert_eq!(r.status, Some(200), "{r:?}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emergency_requests_race_two_paths_and_never_wait_for_a_timeout() {
    let mut opts = FleetOptions {
        pops: vec!["blr".into(), "maa".into()],
        ..Default::default()
    };
    // Probes too rare to help: only the emergency race can save these requests.
    opts.extra.insert("health".into(), "interval = \"10s\"".into());
    let fleet = Fleet::start(opts).await.unwrap();
    let blr = fleet.pop("blr");
    let client = CallClient::default();
    // Warm RTT figures on both paths.
    for pin in ["direct", "via:maa"] {
        for _ in 0..20 {
            client
                .send(
                    Method::GET,
                    &format!("{}/v1/warm", blr.local_url()),
                    &[("x-detour-pin", pin)],
                    Bytes::new(),
                )
                .await;
        }
    }
    blr.uplink.set(Fault::Blackhole);
    for i in 0..20 {
        let started = Instant::now();
        let r = client
            .send(
                Method::POST,
                &format!("{}/v1/calls", blr.local_url()),
                &[("x-detour-priority", "emergency")],
                Bytes::from(format!("{{\"e\":{i}}}")),
            )
            .await;
        let took = started.elapsed();
        assert_eq!(r.status, Some(200), "{r:?}");
        assert!(
            took < Duration::from_millis(100),
            "emergency request {i} took {took:?} via {:?}",
            r.path
        );
    }
    fleet.shutdown().await;
}

#[test]
fn the_demo_tells_the_story_and_exits_zero_when_nothing_failed() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_detour-lab"))
        .args(["demo", "--scenario", "cut", "--duration", "3", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let phases: Vec<&serde_json::Value> = lines.iter().filter(|v| v.get("requests").is_some()).collect();
    assert_eq!(phases.len(), 3, "healthy, cut, restored: {stdout}");
    assert_eq!(phases[1]["phase"], "cut");
    assert!(phases[1]["requests"].as_u64().unwrap() >= 140);
    assert_eq!(phases[1]["failed"], 0);
    assert!(
        phases[1]["active_at_end"].as_str().unwrap().starts_with("via:"),
        "{stdout}"
    );
    assert!(phases[1]["reroute_s"].as_f64().unwrap() < 1.0);
    assert_eq!(lines.last().unwrap()["ok"], true);
    // Where to watch it: the control plane's fleet page and a token for it.
    let page = lines
        .iter()
        .find(|v| v.get("fleet_page").is_some())
        .expect(&stdout);
    let url = page["fleet_page"].as_str().unwrap();
    assert!(
        url.starts_with("https://127.0.0.1:") && url.ends_with("/fleet"),
        "{url}"
    );
    assert!(page["operator_token"].as_str().unwrap().starts_with("dto_demo_"));
}

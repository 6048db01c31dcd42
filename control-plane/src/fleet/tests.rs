use detour_wire::{AgentReport, PathReport, PathState, SwitchReport};

use super::*;

fn path(name: &str, state: PathState, active: bool) -> PathReport {
    PathReport {
        path: name.into(),
        endpoint: None,
        state,
        rtt_seconds: Some(0.0123),
        rtt_p95_seconds: None,
        loss_ratio: if state == PathState::Up { 0.0 } else { 1.0 },
        score: 1.0,
        active,
        consecutive_failures: 0,
        reason: (state != PathState::Up).then(|| "3 consecutive failures (timeout)".into()),
    }
}

fn report(pop: &str, active: &str, paths: Vec<PathReport>) -> String {
    serde_json::to_string(&AgentReport {
        pop: pop.into(),
        version: "0.1.0".into(),
        active_path: Some(active.into()),
        paths,
        config_error: None,
        recordings: None,
        deferred: None,
        switches: vec![SwitchReport {
            at_ms: 1,
            from: "direct".into(),
            to: active.into(),
            reason: "direct down: 3 consecutive failures (timeout)".into(),
        }],
        relay_rejected: Default::default(),
    })
    .unwrap()
}

const NOW: i64 = 1_800_000_000_000;

#[test]
fn a_detour_a_stale_pop_and_history_in_their_places() {
    let reports = vec![
        (
            "blr".to_owned(),
            NOW - 1_000,
            report(
                "blr",
                "via:maa",
                vec![
                    path("direct", PathState::Down, false),
                    path("via:maa", PathState::Up, true),
                ],
            ),
        ),
        (
            "del".to_owned(),
            NOW - 60_000,
            report("del", "direct", vec![path("direct", PathState::Up, true)]),
        ),
        (
            "maa".to_owned(),
            NOW - 2_000,
            report("maa", "direct", vec![path("direct", PathState::Up, true)]),
        ),
        ("xyz".to_owned(), NOW, "not a report".to_owned()),
    ];
    let now_bucket = NOW / BUCKET_MS;
    let samples = [
        SampleRow {
            pop: "blr".into(),
            path: "direct".into(),
            bucket: now_bucket,
            rtt_us: None,
            loss_ppm: 1_000_000,
            state: 2,
            active: false,
        },
        SampleRow {
            pop: "blr".into(),
            path: "direct".into(),
            bucket: now_bucket - 1,
            rtt_us: Some(12_345),
            loss_ppm: 0,
            state: 0,
            active: true,
        },
        // Outside the window: ignored.
        SampleRow {
            pop: "blr".into(),
            path: "direct".into(),
            bucket: now_bucket - WINDOW_BUCKETS,
            rtt_us: Some(1),
            loss_ppm: 0,
            state: 0,
            active: true,
        },
    ];
    let v = view(&Inputs {
        now_ms: NOW,
        stale_after_ms: 30_000,
        reports: &reports,
        samples: &samples.iter().collect::<Vec<_>>(),
        switches: &[],
        refusals: &[],
    });
    let order: Vec<&str> = v["pops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pop"].as_str().unwrap())
        .collect();
    // Unreadable and stale first, then the detour, then the healthy.
    assert_eq!(order, ["del", "xyz", "blr", "maa"]);
    assert_eq!(v["pops"][0]["stale"], true);
    assert_eq!(v["pops"][0]["age_s"], 60.0);
    assert_eq!(v["summary"]["stale"], 1);
    assert_eq!(v["summary"]["detoured"], 1);
    assert_eq!(v["summary"]["direct"], 1);
    assert_eq!(
        v["detours"],
        json!([{"from": "blr", "via": "maa", "stale": false}])
    );
    let blr = &v["pops"][2];
    assert_eq!(blr["active"], "via:maa");
    assert_eq!(
        blr["last_switch"]["reason"],
        "direct down: 3 consecutive failures (timeout)"
    );
    let direct = &blr["paths"][0];
    assert_eq!(direct["state"], "down");
    let h = &direct["history"];
    let n = WINDOW_BUCKETS as usize;
    assert_eq!(h["rtt_ms"].as_array().unwrap().len(), n);
    assert_eq!(h["rtt_ms"][n - 2], 12.3);
    assert_eq!(h["rtt_ms"][n - 1], Value::Null);
    assert_eq!(h["loss"][n - 1], 1.0);
    let states = h["state"].as_str().unwrap();
    assert!(states.ends_with("ud") && states.starts_with("---"), "{states}");
    // A path with no samples has an empty history, not a missing one.
    assert_eq!(blr["paths"][1]["history"]["state"], "-".repeat(n));
}

#[test]
fn peers_are_read_from_via_paths_with_or_without_an_endpoint() {
    assert_eq!(peer_of("via:maa"), Some("maa"));
    assert_eq!(peer_of("via:maa@mumbai"), Some("maa"));
    assert_eq!(peer_of("direct"), None);
    assert_eq!(peer_of("direct@singapore"), None);
}

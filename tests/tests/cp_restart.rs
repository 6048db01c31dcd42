//! The control plane restarted under traffic: a call handler that retries
//! with the same Idempotency-Key gets every call made exactly once; while the
//! control plane is away it gets a clear 503, never a hang or a 500.

use std::collections::BTreeMap;
use std::time::Duration;

use detour_lab::fleet::{Fleet, FleetOptions};
use detour_lab::load::{Call, CallClient, call_with_retries};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restart_loses_and_duplicates_nothing() {
    let mut fleet = Fleet::start(FleetOptions {
        real_cp: true,
        ..Default::default()
    })
    .await
    .unwrap();
    fleet.wait_all_up(Duration::from_secs(10)).await.unwrap();
    let blr = fleet.pop("blr").local_url();
    fleet
        .put_route("blr", "india", r#"{"prefix":"+91","trunk":"t1","pop":"blr"}"#)
        .await
        .unwrap();
    let client = CallClient::new(Duration::from_secs(2));

    // 30 calls/s for 8 s; the control plane is restarted 2 s in and is away
    // for 2 s.
    let url = format!("{blr}/v1/calls");
    let calls = async {
        let mut set = tokio::task::JoinSet::new();
        let start = Instant::now();
        for n in 0..240u32 {
            tokio::time::sleep_until(start + Duration::from_millis(u64::from(n) * 1000 / 30)).await;
            let (client, url) = (client.clone(), url.clone());
            set.spawn(async move {
                let key = format!("restart-{n}");
                let call = Call::post("", r#"{"caller":"+919876543210","destination":"+918041234567"}"#);
                let (last, failures) = call_with_retries(
                    &client,
                    &url,
                    &call,
                    &key,
                    Duration::from_secs(15),
                    Duration::from_millis(200),
                )
                .await;
                (key, (last.status, last.body, failures))
            });
        }
        let mut done = BTreeMap::new();
        while let Some(r) = set.join_next().await {
            let (key, out) = r.unwrap();
            done.insert(key, out);
        }
        done
    };
    let restart = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        fleet.restart_cp(Duration::from_secs(2)).await.unwrap();
    };
    let (done, ()) = tokio::join!(calls, restart);

    let mut ids = Vec::new();
    let mut retried = 0;
    for (key, (status, body, failures)) in &done {
        assert_eq!(
            *status,
            Some(201),
            "{key} never succeeded; failures: {failures:?}"
        );
        // While the control plane was away: a clear 503 from the agent or
        // the control plane, nothing else.
        for f in failures {
            assert!(f.starts_with("503 "), "{key}: {f}");
            assert!(f.contains("\"status\":503"), "{key}: not problem+json: {f}");
        }
        if !failures.is_empty() {
            retried += 1;
        }
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        ids.push(v["call_id"].as_str().unwrap().to_owned());
    }
    assert!(retried > 0, "the restart was not felt; the test proves nothing");
    // None lost, none duplicated: exactly one stored call per key, and every
    // answered call id is stored.
    let config = detour_control_plane::Config::load(&fleet.dir.path().join("cp").join("cp.toml")).unwrap();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    detour_lab::fleet::check_stored_once(&config, &ids).await.unwrap();
    eprintln!(
        "control plane restarted: {} calls, {retried} needed a retry, all stored once",
        done.len()
    );
    fleet.shutdown().await;
}

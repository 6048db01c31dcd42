//! The control plane's database fails under call traffic through the agent:
//! a private Postgres is restarted, then made read-only (a primary demoted in
//! a failover), then writable again. A call handler that retries with each
//! call's Idempotency-Key gets every normal call made exactly once and sees
//! nothing but 503 problem+json in between; emergency calls are answered at
//! once throughout (held by the control plane, written when the database
//! takes writes again), and are stored exactly once too.
//!
//! Needs root and the Debian `postgresql` package: otherwise it prints
//! SKIPPED, and with DETOUR_REQUIRE_POSTGRES=1 (CI) it fails instead.

use std::collections::BTreeMap;
use std::time::Duration;

use detour_lab::fleet::{Fleet, FleetOptions};
use detour_lab::load::{Call, CallClient, call_with_retries};
use detour_lab::pg::PrivatePostgres;
use tokio::time::Instant;

fn skip() -> bool {
    match detour_lab::pg::unavailable() {
        None => false,
        Some(why) => {
            assert!(
                std::env::var("DETOUR_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "the database-fault suite is required but cannot run: {why}"
            );
            eprintln!("SKIPPED: database-fault suite: {why}");
            true
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_and_read_only_loses_and_duplicates_no_call() {
    if skip() {
        return;
    }
    let pg = tokio::task::spawn_blocking(PrivatePostgres::start)
        .await
        .unwrap()
        .unwrap();
    let fleet = Fleet::start(FleetOptions {
        real_cp: true,
        database_url: Some(pg.url()),
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

    // 20 calls/s for 12 s, every fifth an emergency call (112); each is
    // re-sent with its key every 200 ms while unanswered, for up to 20 s.
    let url = format!("{blr}/v1/calls");
    let calls = async {
        let mut set = tokio::task::JoinSet::new();
        let start = Instant::now();
        for n in 0..240u32 {
            tokio::time::sleep_until(start + Duration::from_millis(u64::from(n) * 50)).await;
            let (client, url) = (client.clone(), url.clone());
            set.spawn(async move {
                let emergency = n % 5 == 0;
                let key = format!("dbfault-{n}");
                let body = if emergency {
                    r#"{"caller":"+919876543210","destination":"112"}"#
                } else {
                    r#"{"caller":"+919876543210","destination":"+918041234567"}"#
                };
                let (last, failures) = call_with_retries(
                    &client,
                    &url,
                    &Call::post("", body),
                    &key,
                    Duration::from_secs(20),
                    Duration::from_millis(200),
                )
                .await;
                (key, (emergency, last.status, last.body, failures))
            });
        }
        let mut done = BTreeMap::new();
        while let Some(r) = set.join_next().await {
            let (key, out) = r.unwrap();
            done.insert(key, out);
        }
        done
    };
    let faults = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pg = &pg;
        tokio::task::block_in_place(|| pg.restart()).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        tokio::task::block_in_place(|| pg.set_read_only(true)).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        tokio::task::block_in_place(|| pg.set_read_only(false)).unwrap();
    };
    let (done, ()) = tokio::join!(calls, faults);

    let mut ids = Vec::new();
    let (mut retried, mut emergency_failures) = (0, 0);
    for (key, (emergency, status, body, failures)) in &done {
        assert_eq!(
            *status,
            Some(201),
            "{key} never succeeded; failures: {failures:?}\n{}",
            pg.log()
        );
        for f in failures {
            assert!(f.starts_with("503 "), "{key}: {f}");
            assert!(f.contains("\"status\":503"), "{key}: not problem+json: {f}");
        }
        if *emergency {
            emergency_failures += failures.len();
        } else if !failures.is_empty() {
            retried += 1;
        }
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        ids.push(v["call_id"].as_str().unwrap().to_owned());
    }
    assert!(
        retried > 0,
        "the database faults were not felt; the test proves nothing"
    );
    assert_eq!(
        emergency_failures, 0,
        "an emergency call was refused while the database failed"
    );
    // The control plane writes held emergency calls once the database takes
    // writes again; then every answered call is stored, exactly once.
    let config = detour_control_plane::Config::load(&fleet.dir.path().join("cp").join("cp.toml")).unwrap();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match detour_lab::fleet::check_stored_once(&config, &ids).await {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => panic!("{e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    eprintln!(
        "Postgres restarted and read-only: {} calls ({} emergency, none refused), {retried} normal calls needed a retry, all stored once",
        done.len(),
        done.values().filter(|v| v.0).count()
    );
    fleet.shutdown().await;
}

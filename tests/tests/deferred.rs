//! Deferred delivery: call events sent while every path of blr is down are
//! answered 202, journalled, and delivered once a path works, each once and
//! in order per call; call initiation is never deferred; a full journal
//! answers 503 and keeps what it holds. Against the mock control plane,
//! which records every request in arrival order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use detour_lab::fleet::{Fleet, FleetOptions};
use detour_lab::link::Fault;
use detour_lab::load::CallClient;

const CALLS: usize = 10;
const EVENTS: usize = 100;

fn options(forward: &str) -> FleetOptions {
    let mut extra = BTreeMap::new();
    extra.insert(
        "forward".to_owned(),
        format!(
            "deadline = \"800ms\"\n{forward}\ndeferred_journal = \"deferred.journal\"\n\
             [[forward.deferrable]]\nmethod = \"POST\"\npath = \"/v1/calls/*/events\"\n"
        ),
    );
    FleetOptions {
        extra,
        ..Default::default()
    }
}

fn cut_everything(fleet: &Fleet, fault: Fault) {
    for p in fleet.pops.values() {
        p.uplink.set(fault);
    }
}

async fn event(client: &CallClient, local: &str, call: usize, n: usize) -> detour_lab::load::CallResult {
    client
        .send(
            http::Method::POST,
            &format!("{local}/v1/calls/call-{call}/events"),
            &[
                ("content-type", "application/json"),
                ("idempotency-key", &format!("ev-{call}-{n}")),
            ],
            Bytes::from(format!("{{\"event\":\"ringing\",\"n\":{n}}}")),
        )
        .await
}

/// Each key at its first arrival, in arrival order.
fn first_arrivals(keys: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    keys.iter().filter(|k| seen.insert(k.as_str())).cloned().collect()
}

fn pending(fleet: &Fleet) -> i64 {
    fleet.pop("blr").agent().shared.metrics.deferred_pending.get()
}

async fn wait_drained(fleet: &Fleet, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while pending(fleet) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} deferred requests still waiting",
            pending(fleet)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_while_every_path_is_down_arrive_later_once_each_and_in_order_per_call() {
    let fleet = Arc::new(Fleet::start(options("")).await.unwrap());
    let local = fleet.pop("blr").local_url();
    cut_everything(&fleet, Fault::Blackhole);

    // Ten calls' events, each call's in order, the calls side by side.
    let mut tasks = Vec::new();
    for call in 0..CALLS {
        let local = local.clone();
        tasks.push(tokio::spawn(async move {
            let client = CallClient::new(Duration::from_secs(5));
            let mut answers = Vec::new();
            for n in 0..EVENTS {
                answers.push(event(&client, &local, call, n).await);
            }
            answers
        }));
    }
    for t in tasks {
        for r in t.await.unwrap() {
            assert_eq!(r.status, Some(202), "{r:?}");
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert!(v["deferred"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
        }
    }
    assert_eq!(pending(&fleet), (CALLS * EVENTS) as i64);
    let status = detour_agent::status::table(&detour_agent::admin::report(&fleet.pop("blr").agent().shared));
    assert!(status.contains("deferred: 1000 waiting"), "{status}");

    // Call initiation is never deferred: 503 with its attempts, as before.
    let client = CallClient::new(Duration::from_secs(5));
    let r = client
        .send(
            http::Method::POST,
            &format!("{local}/v1/calls"),
            &[("content-type", "application/json")],
            Bytes::from_static(br#"{"caller":"+919876543210","destination":"+918041234567"}"#),
        )
        .await;
    assert_eq!(r.status, Some(503), "{r:?}");
    assert!(String::from_utf8_lossy(&r.body).contains("attempts"), "{r:?}");
    assert_eq!(pending(&fleet), (CALLS * EVENTS) as i64);

    cut_everything(&fleet, Fault::Pass);
    wait_drained(&fleet, Duration::from_secs(60)).await;

    // Each event once, and each call's in the order they were sent.
    let recorder = &fleet.cp.as_ref().unwrap().recorder;
    let seen = recorder.requests();
    let by_key = recorder.by_key.lock().unwrap().clone();
    for call in 0..CALLS {
        let keys: Vec<String> = seen
            .iter()
            .filter(|s| s.path_and_query == format!("/v1/calls/call-{call}/events"))
            .filter_map(|s| s.headers.get("idempotency-key")?.to_str().ok().map(str::to_owned))
            .collect();
        let want: Vec<String> = (0..EVENTS).map(|n| format!("ev-{call}-{n}")).collect();
        assert_eq!(first_arrivals(&keys), want, "call-{call}'s events out of order");
        // Every one arrived. Those attempted before the agent judged every
        // path down (timeouts in a row take a path down only after 300 ms
        // without an answer, so that a lossy path's stalls do not) were sent
        // into the dead links, which deliver their bytes when they heal, as
        // TCP would; the deferred copy follows. Both carry the event's
        // Idempotency-Key, so the control plane applies it once.
        for k in &want {
            assert!(by_key.get(k).is_some_and(|n| *n >= 1), "{k} never arrived");
        }
    }
    let m = &fleet.pop("blr").agent().shared.metrics;
    assert_eq!(m.deferred_delivered.get(), (CALLS * EVENTS) as u64);
    assert_eq!(m.deferred_oldest_age.get(), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_answers_503_and_keeps_what_it_holds() {
    let fleet = Fleet::start(options("deferred_max_bytes = \"64KiB\""))
        .await
        .unwrap();
    let local = fleet.pop("blr").local_url();
    cut_everything(&fleet, Fault::Blackhole);
    let client = CallClient::new(Duration::from_secs(5));
    let mut accepted = 0;
    let full = loop {
        let r = event(&client, &local, 0, accepted).await;
        match r.status {
            Some(202) => accepted += 1,
            _ => break r,
        }
        assert!(accepted < 2_000, "the journal never filled");
    };
    assert_eq!(full.status, Some(503), "{full:?}");
    assert!(
        String::from_utf8_lossy(&full.body).contains("the deferred journal is full"),
        "{full:?}"
    );
    assert!(accepted > 10, "only {accepted} fit in 64 KiB");
    let m = &fleet.pop("blr").agent().shared.metrics;
    assert_eq!(m.deferred_refused.with_label_values(&["full"]).get(), 1);
    assert_eq!(pending(&fleet), accepted as i64);

    cut_everything(&fleet, Fault::Pass);
    wait_drained(&fleet, Duration::from_secs(30)).await;
    let seen = fleet.cp.as_ref().unwrap().recorder.requests();
    let keys: Vec<String> = seen
        .iter()
        .filter(|s| s.path_and_query == "/v1/calls/call-0/events")
        .filter_map(|s| s.headers.get("idempotency-key")?.to_str().ok().map(str::to_owned))
        .collect();
    let want: Vec<String> = (0..accepted).map(|n| format!("ev-0-{n}")).collect();
    assert_eq!(
        first_arrivals(&keys),
        want,
        "the old records were not all kept, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_events_survive_a_sigkill_and_a_torn_line_and_are_delivered_after_the_restart() {
    let mut fleet = Fleet::start(options("")).await.unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_detour-lab")).with_file_name("detour-agent");
    assert!(bin.exists(), "build the agent first: cargo build -p detour-agent");
    // blr as its own process, so that it can be killed for real.
    fleet.stop_agent("blr").await;
    let (mut proc, local) = fleet.spawn_agent_process("blr", &bin).await.unwrap();
    cut_everything(&fleet, Fault::Blackhole);
    let calls = 5;
    let events = 40;
    let mut tasks = Vec::new();
    for call in 0..calls {
        let local = local.clone();
        tasks.push(tokio::spawn(async move {
            let client = CallClient::new(Duration::from_secs(5));
            let mut statuses = Vec::new();
            for n in 0..events {
                statuses.push(event(&client, &local, call, n).await.status);
            }
            statuses
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().iter().all(|s| *s == Some(202)));
    }

    // SIGKILL with everything waiting, and a line torn as by a crash mid-write.
    proc.0.kill().unwrap();
    proc.0.wait().unwrap();
    let journal = fleet
        .pop("blr")
        .config_path
        .parent()
        .unwrap()
        .join("deferred.journal");
    let mut text = std::fs::read(&journal).unwrap();
    text.extend_from_slice(b"{\"put\":{\"seq\":9999,\"id\":\"torn\",\"key\":\"call-0\",\"meth");
    std::fs::write(&journal, text).unwrap();
    let (restarted, _) = fleet.spawn_agent_process("blr", &bin).await.unwrap();
    cut_everything(&fleet, Fault::Pass);

    let recorder = &fleet.cp.as_ref().unwrap().recorder;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen = recorder.requests();
        let done = (0..calls).all(|call| {
            let keys: Vec<String> = seen
                .iter()
                .filter(|s| s.path_and_query == format!("/v1/calls/call-{call}/events"))
                .filter_map(|s| s.headers.get("idempotency-key")?.to_str().ok().map(str::to_owned))
                .collect();
            first_arrivals(&keys).len() == events
        });
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every journalled event arrived after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = recorder.requests();
    for call in 0..calls {
        let keys: Vec<String> = seen
            .iter()
            .filter(|s| s.path_and_query == format!("/v1/calls/call-{call}/events"))
            .filter_map(|s| s.headers.get("idempotency-key")?.to_str().ok().map(str::to_owned))
            .collect();
        let want: Vec<String> = (0..events).map(|n| format!("ev-{call}-{n}")).collect();
        assert_eq!(first_arrivals(&keys), want, "call-{call}");
    }
    // The torn record was never answered 202: nothing half was sent.
    assert!(
        seen.iter()
            .all(|s| s.headers.get("idempotency-key").is_some() || !s.path_and_query.contains("/events")),
        "an event without its key arrived"
    );
    drop(restarted);
}

//! Postgres-only behaviour: replicas sharing one database, and the database
//! going away and coming back; and group commit, on SQLite too. Skipped (with a SKIPPED line) without
//! `DATABASE_URL`; failing instead when `DETOUR_REQUIRE_POSTGRES=1`.

mod support;

use std::time::{Duration, Instant};

use detour_control_plane::store::{Idem, NewCall, Outcome, StoreError, StoredResponse};
use serde_json::{Value, json};
use support::{Backend, Db, DbProxy, Instance, pg_addr, problem, via, wait_until};

fn call_body() -> Value {
    json!({"caller": "+919876543210", "destination": "08041234567"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_sees_route_change_within_two_seconds() {
    let Some(db) = Db::new(Backend::Postgres, "replica_consistency").await else {
        return;
    };
    let a = Instance::start(db.config("", "")).await;
    let b = Instance::start(db.config("", "")).await;
    let token = a.token("blr").await;
    assert_eq!(
        a.put_route("blr", json!({"prefix": "+9180", "trunk": "old", "pop": "blr"}))
            .await
            .status(),
        201
    );
    wait_until(
        "replica B routes with the first rule",
        Duration::from_secs(2),
        || async {
            let r = b.post_call(&token, &call_body(), None).await;
            r.status() == 201 && r.json::<Value>().await.unwrap()["route"]["trunk"] == "old"
        },
    )
    .await;

    let changed = Instant::now();
    assert_eq!(
        a.put_route("blr", json!({"prefix": "+9180", "trunk": "new", "pop": "blr"}))
            .await
            .status(),
        200
    );
    wait_until("replica B uses the change", Duration::from_secs(2), || async {
        let r = b.post_call(&token, &call_body(), None).await;
        r.json::<Value>().await.unwrap()["route"]["trunk"] == "new"
    })
    .await;
    let took = changed.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    eprintln!("replica B used the route change after {took:?}");

    // The same key on both replicas: one call, one answer.
    let ra = a.post_call(&token, &call_body(), Some("cross-replica")).await;
    let rb = b.post_call(&token, &call_body(), Some("cross-replica")).await;
    assert_eq!(ra.status(), 201);
    assert_eq!(rb.headers()["idempotent-replayed"], "true");
    assert_eq!(ra.text().await.unwrap(), rb.text().await.unwrap());
    a.stop().await;
    b.stop().await;
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_fails_ready_and_writes_then_recovers_without_restart() {
    let Some(db) = Db::new(Backend::Postgres, "database_down").await else {
        return;
    };
    let url = db.url.clone().expect("postgres url");
    let proxy = DbProxy::start(pg_addr(&url)).await;
    let config = db.config_with_url(
        Some(&via(&url, proxy.addr)),
        "",
        "[database]\nacquire_timeout = \"500ms\"\nmax_connections = 4\n",
    );
    let cp = Instance::start(config).await;
    cp.put_route("all", json!({"prefix": "+91", "trunk": "t", "pop": "blr"}))
        .await;
    let token = cp.token("blr").await;
    assert_eq!(
        cp.post_call(&token, &call_body(), Some("before")).await.status(),
        201
    );

    proxy.cut().await;
    wait_until("/readyz fails", Duration::from_secs(10), || async {
        cp.client.get(cp.url("/readyz")).send().await.unwrap().status() == 503
    })
    .await;
    let r = cp.client.get(cp.url("/readyz")).send().await.unwrap();
    problem(r, 503).await;
    // Liveness does not depend on the database.
    assert_eq!(
        cp.client.get(cp.url("/healthz")).send().await.unwrap().status(),
        200
    );
    let r = cp.post_call(&token, &call_body(), Some("during")).await;
    assert!(r.headers().contains_key("retry-after"));
    let p = problem(r, 503).await;
    assert_eq!(p["type"], "urn:detour:problem:database-unavailable");
    // An emergency call is never refused: routed from memory, answered, its
    // write deferred; a retry with its key gets the same answer.
    let emergency = json!({"destination": "112"});
    let r = cp.post_call(&token, &emergency, Some("sos")).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-detour-deferred"], "true");
    let first = r.text().await.unwrap();
    let call_id = serde_json::from_str::<Value>(&first).unwrap()["call_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = cp.post_call(&token, &emergency, Some("sos")).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.text().await.unwrap(), first);
    let m = cp
        .client
        .get(cp.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("detour_cp_emergency_deferred_calls 1"), "{m}");

    proxy.heal();
    wait_until("/readyz recovers", Duration::from_secs(10), || async {
        cp.client.get(cp.url("/readyz")).send().await.unwrap().status() == 200
    })
    .await;
    // The failed attempt left nothing behind: its retry creates the call.
    let r = cp.post_call(&token, &call_body(), Some("during")).await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().get("idempotent-replayed").is_none());
    // The deferred emergency call is written once the database is back, and
    // its key now replays from the database with the same answer.
    wait_until(
        "the deferred call is written",
        Duration::from_secs(10),
        || async {
            cp.client
                .get(cp.url(&format!("/v1/calls/{call_id}")))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .status()
                == 200
        },
    )
    .await;
    let r = cp.post_call(&token, &emergency, Some("sos")).await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert!(r.headers().get("x-detour-deferred").is_none());
    assert_eq!(r.text().await.unwrap(), first);
    let store = cp.store().await;
    assert_eq!(store.count_calls().await.unwrap(), 3);
    store.close().await;
    cp.stop().await;
    drop(proxy);
    db.finish().await;
}

/// The agent sends an emergency call on two paths at once, and a retry may
/// reach another replica: one attempt can be held in memory by a replica that
/// lost its database while another is written by a replica that has it. The
/// call the caller was told about must be the one stored (CI once saw 239
/// calls stored for 240 answered when the two attempts got different ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emergency_call_held_on_one_replica_and_written_by_another_is_stored_once() {
    let Some(db) = Db::new(Backend::Postgres, "held_and_written").await else {
        return;
    };
    let url = db.url.clone().expect("postgres url");
    let proxy = DbProxy::start(pg_addr(&url)).await;
    let cut_off = Instance::start(db.config_with_url(
        Some(&via(&url, proxy.addr)),
        "",
        "[database]\nacquire_timeout = \"500ms\"\nmax_connections = 4\n",
    ))
    .await;
    cut_off
        .put_route(
            "weighted",
            json!({"prefix": "", "pop": "blr",
                   "trunks": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]}),
        )
        .await;
    // Started after the route is stored, so it routes with it from the start.
    let healthy = Instance::start(db.config("", "")).await;
    let token = cut_off.token("blr").await;
    // The replica knows the token before its database goes (as a replica
    // that has been serving does).
    assert_eq!(cut_off.post_call(&token, &call_body(), None).await.status(), 201);
    proxy.cut().await;

    let emergency = json!({"destination": "112"});
    let held = cut_off.post_call(&token, &emergency, Some("sos-two-paths")).await;
    assert_eq!(held.status(), 201);
    assert_eq!(held.headers()["x-detour-deferred"], "true");
    let held: Value = held.json().await.unwrap();
    let written = healthy.post_call(&token, &emergency, Some("sos-two-paths")).await;
    assert_eq!(written.status(), 201);
    assert!(written.headers().get("x-detour-deferred").is_none());
    let written: Value = written.json().await.unwrap();
    assert_eq!(held["call_id"], written["call_id"], "two ids for one call");
    assert_eq!(held["route"], written["route"], "two routes for one call");

    // A keyed normal call made twice on one replica names one call too, and
    // weighted trunks are chosen the same way for its every attempt.
    let mut trunks = std::collections::BTreeSet::new();
    for n in 0..8 {
        let key = format!("weighted-{n}");
        let first: Value = healthy
            .post_call(&token, &call_body(), Some(&key))
            .await
            .json()
            .await
            .unwrap();
        let again: Value = healthy
            .post_call(&token, &call_body(), Some(&key))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(first, again);
        trunks.insert(first["route"]["trunk"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        trunks.len(),
        2,
        "keyed calls still spread over the weighted trunks: {trunks:?}"
    );

    proxy.heal();
    wait_until("the held copy is flushed", Duration::from_secs(10), || async {
        let m = cut_off.client.get(cut_off.url("/metrics")).send().await.unwrap();
        m.text()
            .await
            .unwrap()
            .contains("detour_cp_emergency_deferred_calls 0")
    })
    .await;
    let id = held["call_id"].as_str().unwrap();
    let r = cut_off
        .client
        .get(cut_off.url(&format!("/v1/calls/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the call its caller was given is not stored");
    let store = cut_off.store().await;
    assert_eq!(store.count_calls().await.unwrap(), 10);
    store.close().await;
    cut_off.stop().await;
    healthy.stop().await;
    drop(proxy);
    db.finish().await;
}

fn new_call(n: usize, metadata: &str) -> (Idem, NewCall, StoredResponse) {
    let id = format!("call-{n:04}");
    let idem = Idem {
        key: format!("key-{n:04}"),
        request_hash: "h".to_owned(),
    };
    let call = NewCall {
        id: id.clone(),
        created_at: detour_control_plane::store::now_ms(),
        pop: "blr".to_owned(),
        caller: Some("+919876543210".to_owned()),
        destination: "+918041234567".to_owned(),
        call_type: "outbound".to_owned(),
        priority: "normal".to_owned(),
        metadata: metadata.to_owned(),
        decision: "{}".to_owned(),
    };
    let response = StoredResponse {
        status: 201,
        content_type: "application/json".to_owned(),
        body: format!("{{\"call_id\":\"{id}\"}}"),
    };
    (idem, call, response)
}

/// New calls that arrive together are written together (store/batch.rs);
/// a duplicate key in the crowd still gets one call and replays, a different
/// body under a taken key is a mismatch, and a row the database refuses does
/// not take its neighbours down with it: they are written one by one instead.
#[tokio::test]
async fn concurrent_new_calls_are_group_committed_exactly_once() {
    group_commit(Backend::Postgres).await;
}

/// The same on SQLite, whose batches are one transaction of two statements.
#[tokio::test]
async fn sqlite_concurrent_new_calls_are_group_committed_exactly_once() {
    group_commit(Backend::Sqlite).await;
}

async fn group_commit(backend: Backend) {
    let Some(db) = Db::new(backend, "group_commit").await else {
        return;
    };
    let config = db.config("", "[database]\nbatch_writers = 1\n");
    let store = detour_control_plane::store::Store::open(&config)
        .await
        .expect("open");
    store.migrate().await.expect("migrate");
    let retention = Duration::from_secs(3600);
    // A call without a key, stored first: its id is taken.
    let (_, mut taken, taken_resp) = new_call(300, "{}");
    taken.id = "taken".to_owned();
    assert_eq!(
        store
            .create_call(None, &taken, &taken_resp, retention)
            .await
            .expect("taken"),
        Outcome::Done(())
    );

    // 40 distinct calls, 5 copies of one more key, one body mismatch on it,
    // one call whose id is taken, and on Postgres one call whose metadata
    // it cannot store as text (a NUL).
    let mut jobs: Vec<(Idem, NewCall, StoredResponse)> = (0..40).map(|n| new_call(n, "{}")).collect();
    for copy in 0..5 {
        let (idem, mut call, resp) = new_call(100, "{}");
        call.id = format!("dup-{copy}");
        jobs.push((idem, call, resp));
    }
    let (mut idem, mut call, resp) = new_call(100, "{}");
    idem.request_hash = "other".to_owned();
    call.id = "mismatch".to_owned();
    jobs.push((idem, call, resp));
    let (idem, mut call, resp) = new_call(201, "{}");
    call.id = "taken".to_owned();
    jobs.push((idem, call, resp));
    if backend == Backend::Postgres {
        jobs.push(new_call(200, "{\"bad\":\"\u{0}\"}"));
    }

    let results = futures_util::future::join_all(
        jobs.iter()
            .map(|(idem, call, resp)| store.create_call(Some(idem), call, resp, retention)),
    )
    .await;

    for (n, r) in results[..40].iter().enumerate() {
        assert!(matches!(r, Ok(Outcome::Done(()))), "call {n}: {r:?}");
    }
    // One key, six requests: the first copy (sent first) claims it and
    // creates the call, the other copies replay its answer, the different
    // body is refused as a mismatch.
    assert!(matches!(results[40], Ok(Outcome::Done(()))), "{:?}", results[40]);
    for (n, r) in results[41..45].iter().enumerate() {
        assert!(matches!(r, Ok(Outcome::Replay(_))), "copy {}: {r:?}", n + 1);
    }
    assert!(matches!(results[45], Ok(Outcome::Mismatch)), "{:?}", results[45]);
    assert!(
        matches!(results[46], Err(StoreError::Conflict(_))),
        "the call with a taken id fails on its own: {:?}",
        results[46]
    );
    if backend == Backend::Postgres {
        assert!(
            matches!(results[47], Err(StoreError::Other(_))),
            "the unstorable call fails on its own: {:?}",
            results[47]
        );
    }
    assert_eq!(
        store.count_calls().await.expect("count"),
        42,
        "the call stored first, 40 calls, and one for the duplicated key"
    );
    let (batches, calls) = store.call_batches();
    eprintln!("{calls} calls in {batches} statements");
    assert!(
        batches < calls,
        "calls sent together were written together ({calls} calls, {batches} statements)"
    );
    store.close().await;
    db.finish().await;
}

/// Agents give up on requests all the time (the loser of a hedge, a
/// deadline). A client that goes away mid-request must not leave a pooled
/// connection inside a transaction: sqlx cannot recover a `BEGIN` cancelled
/// before the server acknowledged it, and such a connection then runs every
/// later statement inside one transaction that is never committed, its
/// rows locked. Here 900 calls (each key sent three times at once, so most
/// take the transactional path) and 300 fleet reports are abandoned by their clients after
/// 0–4 ms; afterwards no connection may sit inside a transaction and every
/// key must answer promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_give_up_mid_request_leave_no_transaction_open() {
    const KEYS: usize = 300;
    let Some(db) = Db::new(Backend::Postgres, "abandoned_requests").await else {
        return;
    };
    let a = Instance::start(db.config("", "")).await;
    let token = a.token("blr").await;
    let route = json!({"prefix": "+9180", "trunk": "t1", "pop": "blr"});
    assert_eq!(a.put_route("blr", route).await.status(), 201);
    let url = a.url("/v1/calls");
    let mut tasks = Vec::new();
    // HTTP/2, as agents speak it: giving up resets the stream and the
    // server drops the handler's future at once.
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let report = serde_json::to_value(detour_wire::AgentReport {
        pop: "blr".into(),
        version: "0.1.0".into(),
        active_path: Some("direct".into()),
        paths: Vec::new(),
        config_error: None,
        recordings: None,
        deferred: None,
        switches: Vec::new(),
        relay_rejected: Default::default(),
    })
    .unwrap();
    for n in 0..KEYS {
        // The agent's fleet report, written in a transaction.
        let (report_url, report_token, report_client, report) = (
            a.url("/v1/agents/blr/report"),
            token.clone(),
            client.clone(),
            report.clone(),
        );
        let give_up = Duration::from_micros(rand::random_range(200..3000));
        tasks.push(tokio::spawn(async move {
            let send = report_client
                .post(&report_url)
                .bearer_auth(&report_token)
                .json(&report)
                .send();
            let _ = tokio::time::timeout(give_up, send).await;
        }));
        for _ in 0..3 {
            let (url, token, client) = (url.clone(), token.clone(), client.clone());
            let give_up = Duration::from_micros(rand::random_range(200..3000));
            tasks.push(tokio::spawn(async move {
                let send = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("idempotency-key", format!("abandoned-{n}"))
                    .json(&call_body())
                    .send();
                let _ = tokio::time::timeout(give_up, send).await;
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Whatever was in flight finishes (or is rolled back) well within this.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let url_db = db.config("", "").database_url();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url_db)
        .await
        .unwrap();
    let open: Vec<(String, String)> = sqlx::query_as(
        "SELECT state, left(query, 80) FROM pg_stat_activity WHERE datname = current_database() \
         AND state LIKE 'idle in transaction%' AND now() - state_change > interval '500 milliseconds'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(open.is_empty(), "connections left inside a transaction: {open:?}");
    // Every key answers at once: nothing holds its row.
    for n in 0..KEYS {
        let started = Instant::now();
        let r = a
            .post_call(&token, &call_body(), Some(&format!("abandoned-{n}")))
            .await;
        let took = started.elapsed();
        assert!(
            matches!(r.status().as_u16(), 200 | 201),
            "{}",
            r.text().await.unwrap()
        );
        assert!(took < Duration::from_secs(1), "key {n} took {took:?}");
    }
    a.stop().await;
    db.finish().await;
}

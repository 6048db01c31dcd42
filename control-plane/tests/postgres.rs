//! Postgres-only behaviour: replicas sharing one database, and the database
//! going away and coming back. Skipped (with a SKIPPED line) without
//! `DATABASE_URL`; failing instead when `DETOUR_REQUIRE_POSTGRES=1`.

mod support;

use std::time::{Duration, Instant};

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

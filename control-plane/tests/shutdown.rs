//! What a deploy does to a replica (issue 14): on SIGTERM `/readyz` fails at
//! once while the replica keeps serving for `shutdown.grace`, so its load
//! balancer takes it out before the listener closes; then it drains and
//! stops cleanly.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Backend, Db, Instance};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_readiness_first_serves_through_the_grace_then_closes() {
    support::init();
    let db = Db::new(Backend::Sqlite, "shutdown_grace").await.unwrap();
    let config = db.config("", "[shutdown]\ngrace = \"2s\"\ndrain_timeout = \"3s\"\n");
    let mut cp = Instance::start(config).await;
    let token = cp.token("blr").await;
    let route = json!({"prefix": "+9180", "trunk": "blr-carrier-1", "pop": "blr"});
    assert_eq!(cp.put_route("blr", route).await.status(), 201);
    let addr = cp.addr;
    let call = json!({"caller": "+919876543210", "destination": "08041234567",
                      "call_type": "outbound", "priority": "normal"});

    cp.begin_stop();
    let began = Instant::now();
    // Out of rotation at once (a task of the server's takes the stop
    // signal, so it may need a scheduling turn: 500 ms at most)...
    let ready = loop {
        let r = cp.client.get(cp.url("/readyz")).send().await.unwrap();
        if r.status() == 503 || began.elapsed() > Duration::from_millis(500) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(ready.status(), 503);
    let problem: serde_json::Value = ready.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap_or("").contains("shutting down"),
        "{problem}"
    );
    // ...but still serving, on new connections too, until the grace ends.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut served: i64 = 0;
    while began.elapsed() < Duration::from_millis(1500) {
        let r = fresh
            .post(cp.url("/v1/calls"))
            .bearer_auth(&token)
            .json(&call)
            .send()
            .await
            .expect("served during the grace");
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served >= 10, "{served}");
    // Then the listener closes.
    support::wait_until("listener closed", Duration::from_secs(4), || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    let closed_after = began.elapsed();
    assert!(
        closed_after >= Duration::from_millis(1900),
        "closed before the grace ended: {closed_after:?}"
    );
    cp.stop().await;
    // Every call served during the grace is stored.
    let store = db_store(&db).await;
    let n = store.count_calls().await.unwrap();
    assert_eq!(n, served, "calls stored");
}

async fn db_store(db: &Db) -> detour_control_plane::store::Store {
    let config = db.config("", "");
    let s = detour_control_plane::store::Store::open(&config).await.unwrap();
    s.migrate().await.unwrap();
    s
}

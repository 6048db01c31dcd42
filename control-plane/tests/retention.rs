//! Retention: old calls (with their events and recordings), audit entries,
//! idempotency keys and agent reports go, in batches no bigger than
//! `retention.batch_size`, while recent rows stay; and with the background
//! sweep running, the tables stay bounded as rows keep arriving. On SQLite
//! and Postgres (skipped without `DATABASE_URL`).

mod support;

use std::time::Duration;

use detour_control_plane::store::{PurgedCalls, Store, Table, now_ms};
use serde_json::json;
use sqlx::AnyPool;
use support::{ADMIN_TOKEN, Backend, Db, Instance, wait_until};

const DAY: i64 = 24 * 3600 * 1000;

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Postgres).await })*
        }
    };
}

both!(
    batches_are_bounded_and_only_old_rows_go,
    the_sweep_keeps_the_tables_bounded_while_serving,
);

/// A pool of the test's own on the database the control plane uses.
async fn pool(config: &detour_control_plane::Config) -> AnyPool {
    sqlx::any::install_default_drivers();
    std::fs::create_dir_all(&config.data_dir).unwrap();
    AnyPool::connect(&config.database_url()).await.expect("connect")
}

/// A call made `age` ms ago, with `events` events and one recording, in one
/// transaction (a sweep running meanwhile sees all of it or none).
async fn old_call(pool: &AnyPool, id: &str, age: i64, events: usize) {
    let at = now_ms() - age;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO calls (id, created_at, pop, caller, destination, call_type, priority, metadata, \
         decision, state, updated_at) VALUES ($1, $2, 'blr', NULL, '+918041234567', 'outbound', \
         'normal', '{}', '{}', 'initiated', $3)",
    )
    .bind(id)
    .bind(at)
    .bind(at)
    .execute(&mut *tx)
    .await
    .unwrap();
    for kind in ["ringing", "answered", "completed"].iter().take(events) {
        sqlx::query("INSERT INTO call_events (call_id, kind, at, received_at) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(*kind)
            .bind(at)
            .bind(at)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO call_recordings (call_id, bucket, object_key, size, sha256, recorded_at) \
         VALUES ($1, 'recordings', $2, 1, '00', $3)",
    )
    .bind(id)
    .bind(format!("blr/{id}.wav"))
    .bind(at)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

async fn other_rows(pool: &AnyPool, n: usize, age: i64, tag: &str) {
    let at = now_ms() - age;
    for i in 0..n {
        let id = format!("{tag}-{i}");
        sqlx::query(
            "INSERT INTO route_audit (id, at, actor, action, name, route_version) \
             VALUES ($1, $2, 'test', 'create', 'r', 1)",
        )
        .bind(&id)
        .bind(at)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO idempotency (key, request_hash, created_at, status, content_type, body) \
             VALUES ($1, 'h', $2, 201, 'application/json', '{}')",
        )
        .bind(&id)
        .bind(at)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query("INSERT INTO agent_reports (pop, received_at, report) VALUES ($1, $2, '{}')")
            .bind(&id)
            .bind(at)
            .execute(pool)
            .await
            .unwrap();
    }
}

async fn count(pool: &AnyPool, sql: &'static str) -> i64 {
    use sqlx::Row;
    sqlx::query(sql).fetch_one(pool).await.unwrap().get::<i64, _>(0)
}

async fn batches_are_bounded_and_only_old_rows_go(backend: Backend) {
    let Some(db) = Db::new(backend, "retention_batches").await else {
        return;
    };
    let config = db.config("", "");
    let store = Store::open(&config).await.unwrap();
    store.migrate().await.unwrap();
    let pool = pool(&config).await;
    for i in 0..25 {
        old_call(&pool, &format!("old-{i:02}"), 401 * DAY + i * 1000, 2).await;
    }
    for i in 0..5 {
        old_call(&pool, &format!("new-{i}"), DAY, 3).await;
    }
    other_rows(&pool, 12, 401 * DAY, "old").await;
    other_rows(&pool, 3, 3600 * 1000, "new").await;

    // Calls: 25 old in batches of at most 10, each with its events and
    // recordings; then nothing more.
    let before = now_ms() - 400 * DAY;
    let mut batches = Vec::new();
    loop {
        let p = store.purge_calls(before, 10).await.unwrap();
        batches.push(p);
        if p.calls < 10 {
            break;
        }
    }
    let b = |calls, events, recordings| PurgedCalls {
        calls,
        events,
        recordings,
    };
    assert_eq!(batches, [b(10, 20, 10), b(10, 20, 10), b(5, 10, 5)]);
    assert_eq!(store.purge_calls(before, 10).await.unwrap(), b(0, 0, 0));
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM calls").await, 5);
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM call_events").await, 15);
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM call_recordings").await, 5);
    assert_eq!(
        count(&pool, "SELECT COUNT(*) FROM calls WHERE id LIKE 'old-%'").await,
        0
    );
    // A recent call is whole.
    let kept = store.get_call("new-0").await.unwrap().expect("recent call kept");
    assert_eq!((kept.events.len(), kept.recordings.len()), (3, 1));

    // The other tables, in batches of 5: 12 old rows each go as 5, 5, 2.
    for table in [Table::Audit, Table::Idempotency, Table::AgentReports] {
        let before = now_ms() - 400 * DAY;
        let mut sizes = Vec::new();
        loop {
            let n = store.purge(table, before, 5).await.unwrap();
            sizes.push(n);
            if n < 5 {
                break;
            }
        }
        assert_eq!(sizes, [5, 5, 2], "{}", table.name());
    }
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM route_audit").await, 3);
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM idempotency").await, 3);
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM agent_reports").await, 3);
    pool.close().await;
    store.close().await;
    db.finish().await;
}

/// Rows of every age keep arriving (a year and more of them per round, as
/// if the control plane had run that long); after each round's sweep only
/// rows within retention remain, so each table holds at most what arrives
/// within its retention, however many rounds run. On Postgres two
/// replicas sweep the same tables at once.
async fn the_sweep_keeps_the_tables_bounded_while_serving(backend: Backend) {
    let Some(db) = Db::new(backend, "retention_sweep").await else {
        return;
    };
    let config = db.config(
        "",
        "[retention]\ncalls = \"400d\"\naudit = \"200d\"\nagent_reports = \"30d\"\n\
         interval = \"50ms\"\nbatch_size = 7\npause = \"5ms\"\n\
         [idempotency]\nretention = \"24h\"\n",
    );
    let a = Instance::start(config.clone()).await;
    let b = match backend {
        Backend::Postgres => Some(Instance::start(config.clone()).await),
        Backend::Sqlite => None,
    };
    let token = a.token("blr").await;
    let r = a
        .put_route("all", json!({"prefix": "+91", "trunk": "t", "pop": "blr"}))
        .await;
    assert_eq!(r.status(), 201);
    let made: serde_json::Value = a
        .post_call(
            &token,
            &json!({"caller": "+919876543210", "destination": "08041234567"}),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    let pool = pool(&config).await;

    let (mut young_calls, mut old_calls) = (0, 0);
    for round in 0..3 {
        // 40 calls, one every 20 days: ages 0 to 780 days (plus the round).
        for i in 0..40i64 {
            let age = i * 20 * DAY + round * 3600 * 1000 + 1000;
            old_call(&pool, &format!("r{round}-{i}"), age, 2).await;
            if age < 400 * DAY {
                young_calls += 1;
            } else {
                old_calls += 1;
            }
        }
        other_rows(&pool, 10, 250 * DAY, &format!("old{round}")).await;
        other_rows(&pool, 2, 3600 * 1000, &format!("new{round}")).await;
        wait_until("the sweep deleted every old row", Duration::from_secs(20), || {
            let pool = &pool;
            async move {
                count(pool, "SELECT COUNT(*) FROM calls").await == young_calls + 1
                    && count(pool, "SELECT COUNT(*) FROM route_audit").await == 2 * (round + 1) + 1
                    && count(pool, "SELECT COUNT(*) FROM idempotency").await == 2 * (round + 1)
                    && count(pool, "SELECT COUNT(*) FROM agent_reports").await == 2 * (round + 1)
            }
        })
        .await;
        // Events and recordings went with their calls.
        assert_eq!(
            count(&pool, "SELECT COUNT(*) FROM call_events").await,
            2 * young_calls
        );
        assert_eq!(
            count(&pool, "SELECT COUNT(*) FROM call_recordings").await,
            young_calls
        );
    }
    assert_eq!((young_calls, old_calls), (60, 60));

    // What was deleted is counted, per table, over the replicas.
    let mut deleted = std::collections::BTreeMap::<String, u64>::new();
    for cp in std::iter::once(&a).chain(b.as_ref()) {
        let text = cp
            .client
            .get(cp.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for line in text
            .lines()
            .filter(|l| l.starts_with("detour_cp_retention_deleted_rows_total{"))
        {
            let table = line.split('"').nth(1).unwrap().to_owned();
            let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            *deleted.entry(table).or_default() += n;
        }
        assert!(
            text.contains("detour_cp_retention_last_success_timestamp_seconds "),
            "{text}"
        );
    }
    let want: std::collections::BTreeMap<String, u64> = [
        ("calls", 60),
        ("call_events", 120),
        ("call_recordings", 60),
        ("route_audit", 30),
        ("idempotency", 30),
        ("agent_reports", 30),
    ]
    .into_iter()
    .map(|(t, n)| (t.to_owned(), n))
    .collect();
    assert_eq!(deleted, want);

    // The call made through the API is recent, and still there.
    let got = a
        .client
        .get(a.url(&format!("/v1/calls/{}", made["call_id"].as_str().unwrap())))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    pool.close().await;
    a.stop().await;
    if let Some(b) = b {
        b.stop().await;
    }
    db.finish().await;
}

//! The migration policy (docs/operations.md, "Migrations"): a database that
//! a newer release has migrated (expand only) still serves calls with this
//! build, which is what a rollback needs; `migrate` refuses to take it
//! backwards; `/readyz` wants this build's migrations, not the newest.
//! On SQLite and on Postgres (skipped without `DATABASE_URL`).

mod support;

use std::borrow::Cow;
use std::process::Command;

use detour_control_plane::store::{MIGRATOR, Store};
use serde_json::{Value, json};
use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use support::{ADMIN_TOKEN, Backend, Db, Instance};

const BIN: &str = env!("CARGO_BIN_EXE_detour-control-plane");

/// A version no release of this one will have.
const NEWER: i64 = 29_991_231_000_001;

/// What a newer release's migration could be under the policy: a new table
/// and a new nullable column on a table this build writes.
const NEWER_SQL: &str = "CREATE TABLE call_tags (call_id TEXT NOT NULL, tag TEXT NOT NULL, \
                         PRIMARY KEY (call_id, tag));\nALTER TABLE calls ADD COLUMN tag TEXT;\n";

/// Migrates `url` as the newer release would: this build's migrations, then
/// one more.
async fn migrate_as_newer_release(config: &detour_control_plane::Config) {
    sqlx::any::install_default_drivers();
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let pool = sqlx::AnyPool::connect(&config.database_url())
        .await
        .expect("connect");
    let mut all: Vec<Migration> = MIGRATOR.iter().cloned().collect();
    all.push(Migration::new(
        NEWER,
        Cow::Borrowed("newer release expand"),
        MigrationType::Simple,
        sqlx::AssertSqlSafe(NEWER_SQL.to_owned()).into_sql_str(),
        false,
    ));
    Migrator::with_migrations(all)
        .run(&pool)
        .await
        .expect("the newer release migrates");
    pool.close().await;
}

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
    serves_a_database_migrated_by_a_newer_release,
    ready_wants_every_migration_of_this_build,
    rolling_back_past_the_release_that_tolerates_newer_schemas,
);

async fn serves_a_database_migrated_by_a_newer_release(backend: Backend) {
    let Some(db) = Db::new(backend, "newer_release").await else {
        return;
    };
    let config = db.config("", "");
    migrate_as_newer_release(&config).await;

    // The previous release (this build, from the database's point of view)
    // starts, is ready and serves calls, events and reads.
    let cp = Instance::start(config.clone()).await;
    let ready = cp.client.get(cp.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
    let r = cp
        .put_route("all", json!({"prefix": "+91", "trunk": "t", "pop": "blr"}))
        .await;
    assert_eq!(r.status(), 201);
    let token = cp.token("blr").await;
    let body = json!({"caller": "+919876543210", "destination": "08041234567"});
    let made: Value = {
        let r = cp.post_call(&token, &body, Some("rollback-1")).await;
        assert_eq!(r.status(), 201);
        r.json().await.unwrap()
    };
    let id = made["call_id"].as_str().unwrap().to_owned();
    let r = cp
        .client
        .post(cp.url(&format!("/v1/calls/{id}/events")))
        .bearer_auth(&token)
        .json(&json!({"event": "answered"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got: Value = cp
        .client
        .get(cp.url(&format!("/v1/calls/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["state"], "answered", "{got}");
    assert_eq!(got["destination"], "+918041234567");
    cp.stop().await;

    // `migrate` does not take the schema backwards, and says why.
    let err = detour_control_plane::migrate(&config)
        .await
        .expect_err("migrate must refuse a newer schema");
    let text = format!("{err:#}");
    assert!(text.contains("newer release"), "{text}");
    assert!(
        text.contains(&format!("{NEWER} (newer release expand)")),
        "{text}"
    );
    if backend == Backend::Sqlite {
        let out = Command::new(BIN)
            .args(["migrate", "--config"])
            .arg(db.dir.path().join("cp.toml"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("never takes a schema backwards"), "{stderr}");
    }
    db.finish().await;
}

async fn ready_wants_every_migration_of_this_build(backend: Backend) {
    let Some(db) = Db::new(backend, "ready_migrations").await else {
        return;
    };
    let config = db.config("", "");
    migrate_as_newer_release(&config).await;
    let store = Store::open(&config).await.unwrap();
    // A newer release's migration beside this build's: ready.
    store.ready().await.expect("ready on a newer schema");

    // One of this build's migrations missing (even with a newer one
    // applied, which a `MAX(version)` check would take for "migrated"):
    // not ready, and the answer names it.
    let oldest = MIGRATOR.iter().map(|m| m.version).min().unwrap();
    let pool = sqlx::AnyPool::connect(&config.database_url()).await.unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(oldest)
        .execute(&pool)
        .await
        .unwrap();
    let why = store.ready().await.expect_err("not ready without migration 1");
    assert!(
        why.contains(&oldest.to_string()) && why.contains("lacks"),
        "{why}"
    );
    pool.close().await;
    store.close().await;
    db.finish().await;
}

/// docs/operations.md, "Migrations": a release from before the tolerance
/// (simulated: this build's migrations up to `20261205000001`, strict as
/// sqlx is by default) refuses the migrated database; with the rows of the
/// migrations it does not know deleted (the retention index's and the fleet
/// page's) it runs; this build then migrates again, finding the index and
/// the tables already there.
async fn rolling_back_past_the_release_that_tolerates_newer_schemas(backend: Backend) {
    const RETENTION_INDEX: i64 = 20_261_206_000_001;
    let Some(db) = Db::new(backend, "rollback_past").await else {
        return;
    };
    let config = db.config("", "");
    detour_control_plane::migrate(&config)
        .await
        .expect("this build migrates");
    let old = Migrator::with_migrations(
        MIGRATOR
            .iter()
            .filter(|m| m.version < RETENTION_INDEX)
            .cloned()
            .collect(),
    );
    // The refused start exits (sqlx keeps its Postgres advisory lock on a
    // connection that refuses; the process's end lets it go).
    let refused = sqlx::AnyPool::connect(&config.database_url()).await.unwrap();
    let err = old.run(&refused).await.expect_err("the old release refuses");
    refused.close().await;
    assert!(
        err.to_string().contains("previously applied but is missing"),
        "{err}"
    );
    let pool = sqlx::AnyPool::connect(&config.database_url()).await.unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version >= $1")
        .bind(RETENTION_INDEX)
        .execute(&pool)
        .await
        .unwrap();
    old.run(&pool).await.expect("the old release starts");
    detour_control_plane::migrate(&config)
        .await
        .expect("the next upgrade records the index migration again");
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE version >= $1")
        .bind(RETENTION_INDEX)
        .fetch_one(&pool)
        .await
        .unwrap();
    let newer = MIGRATOR.iter().filter(|m| m.version >= RETENTION_INDEX).count();
    assert_eq!(n, newer as i64);
    pool.close().await;
    db.finish().await;
}

//! Backup and restore (docs/operations.md, "Backup and restore"): the
//! SQLite database backed up by the real binary while the control plane
//! serves and takes calls, restored into a fresh `data_dir`, served from
//! there with every call of before the backup readable; the refusals; and
//! Postgres through `pg_dump` and `pg_restore` as the docs say.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use detour_control_plane::Config;
use serde_json::{Value, json};
use support::{ADMIN_TOKEN, Backend, Db, Instance, postgres_url};

const BIN: &str = env!("CARGO_BIN_EXE_detour-control-plane");

fn run(args: &[&str], config: &std::path::Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn call_body(n: u64) -> Value {
    json!({"caller": "+919876543210", "destination": format!("0804123{:04}", n % 10_000)})
}

/// Calls with an `answered` event each; returns their ids.
async fn calls(cp: &Instance, token: &str, n: u64, tag: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let r = cp
            .post_call(token, &call_body(i), Some(&format!("{tag}-{i}")))
            .await;
        assert_eq!(r.status(), 201);
        let id = r.json::<Value>().await.unwrap()["call_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let r = cp
            .client
            .post(cp.url(&format!("/v1/calls/{id}/events")))
            .bearer_auth(token)
            .json(&json!({"event": "answered"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        ids.push(id);
    }
    ids
}

async fn read_back(cp: &Instance, ids: &[String]) {
    for id in ids {
        let r = cp
            .client
            .get(cp.url(&format!("/v1/calls/{id}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "call {id}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["state"], "answered", "{v}");
        assert_eq!(v["caller"], "+919876543210", "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_backup_while_serving_restores_into_a_fresh_data_dir_that_serves() {
    let db = Db::new(Backend::Sqlite, "backup").await.unwrap();
    let config = db.config("", "");
    let cp_toml = db.dir.path().join("cp.toml");
    let cp = Instance::start(config.clone()).await;
    let r = cp
        .put_route("all", json!({"prefix": "+91", "trunk": "t", "pop": "blr"}))
        .await;
    assert_eq!(r.status(), 201);
    let token = cp.token("blr").await;
    let before = calls(&cp, &token, 30, "before").await;

    // A call handler keeps calling while the backup runs.
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let writer = {
        let (client, url, token) = (cp.client.clone(), cp.url("/v1/calls"), token.clone());
        let (stop, made) = (stop.clone(), made.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("idempotency-key", format!("during-{n}"))
                    .json(&call_body(n))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201, "a call during the backup");
                made.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        })
    };
    while made.load(Ordering::Relaxed) < 5 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let backups = db.dir.path().join("backups");
    std::fs::create_dir(&backups).unwrap();
    let out = backups.join("cp-1.sqlite3");
    let args = ["backup", "--out", out.to_str().unwrap()];
    let done = {
        let (cp_toml, out) = (cp_toml.clone(), out.clone());
        tokio::task::spawn_blocking(move || run(&["backup", "--out", out.to_str().unwrap()], &cp_toml))
            .await
            .unwrap()
    };
    let during_backup = made.load(Ordering::Relaxed);
    // A few more after it, then the writer stops.
    while made.load(Ordering::Relaxed) < during_backup + 5 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let total_made = made.load(Ordering::Relaxed);
    eprintln!("{}{total_made} calls made while it ran", text(&done));
    assert!(done.status.success(), "{}", text(&done));
    let said = String::from_utf8_lossy(&done.stdout);
    assert!(
        said.starts_with(&format!("backed up to {}: ", out.display())),
        "{said}"
    );
    assert!(
        said.contains("integrity ok") && said.contains("1 routes, 1 agent tokens"),
        "{said}"
    );
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600,
        "a backup holds every call: owner only"
    );
    assert!(!backups.join("cp-1.sqlite3.partial").exists());
    // Never over an existing file.
    let again = run(&args, &cp_toml);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again).contains("a backup never overwrites"),
        "{}",
        text(&again)
    );

    // Restore into a fresh data_dir, as on a new machine.
    let fresh = tempfile::tempdir().unwrap();
    let fresh_toml = fresh.path().join("cp.toml");
    std::fs::write(
        &fresh_toml,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nadmin_token_file = \"{}\"\n",
            fresh.path().join("data").display(),
            db.dir.path().join("admin.token").display()
        ),
    )
    .unwrap();
    let from = ["restore", "--from", out.to_str().unwrap()];
    let restored = run(&from, &fresh_toml);
    assert!(restored.status.success(), "{}", text(&restored));
    assert!(String::from_utf8_lossy(&restored.stdout).starts_with(&format!(
        "restored {}: ",
        fresh.path().join("data/detour-cp.sqlite3").display()
    )));
    let again = run(&from, &fresh_toml);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again).contains("restore never overwrites a database"),
        "{}",
        text(&again)
    );

    let cp2 = Instance::start(Config::load(&fresh_toml).unwrap()).await;
    read_back(&cp2, &before).await;
    // Everything answered before the backup began; nothing made after it
    // ended (the writer has at most one call in flight, answered or not).
    let restored_calls = cp2.store().await.count_calls().await.unwrap();
    let before_backup = before.len() as i64 + 5;
    assert!(
        (before_backup..=before.len() as i64 + during_backup as i64 + 1).contains(&restored_calls),
        "{restored_calls} calls restored; {before_backup} before the backup, {} when it ended, {total_made} made",
        before.len() as u64 + during_backup
    );
    // The agent tokens came along: the PoP's token works on the restored one.
    let r = cp2.post_call(&token, &call_body(1), Some("after-restore")).await;
    assert_eq!(r.status(), 201);
    // And the original went on serving throughout.
    let r = cp.post_call(&token, &call_body(2), Some("after-backup")).await;
    assert_eq!(r.status(), 201);
    cp2.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn backup_and_restore_refuse_what_they_cannot_do_safely() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("cp.toml");
    // Postgres: pg_dump's job, said without the password.
    std::fs::write(
        &toml,
        "database_url = \"postgres://detour:hunter2@127.0.0.1:1/detour\"\n",
    )
    .unwrap();
    let out = run(&["backup", "--out", "x.sqlite3"], &toml);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("pg_dump") && !text(&out).contains("hunter2"),
        "{}",
        text(&out)
    );
    // No database yet: nothing to copy.
    std::fs::write(
        &toml,
        format!("data_dir = \"{}\"\n", dir.path().join("data").display()),
    )
    .unwrap();
    let target = dir.path().join("b.sqlite3");
    let out = run(&["backup", "--out", target.to_str().unwrap()], &toml);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("no database at"), "{}", text(&out));
    // A file that is not a control-plane database is not restored.
    std::fs::write(&target, "not a database").unwrap();
    let out = run(&["restore", "--from", target.to_str().unwrap()], &toml);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("is not a readable SQLite database"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("data/detour-cp.sqlite3").exists());
}

/// docs/operations.md: `pg_dump --format=custom`, a new database,
/// `pg_restore --no-owner`, and the control plane serving from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pg_dump_and_pg_restore_as_documented() {
    let Some(db) = Db::new(Backend::Postgres, "pg_dump").await else {
        return;
    };
    if Command::new("pg_dump").arg("--version").output().is_err() {
        assert!(
            std::env::var("DETOUR_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "pg_dump is required with DETOUR_REQUIRE_POSTGRES=1"
        );
        eprintln!("SKIPPED: pg_dump not installed");
        db.finish().await;
        return;
    }
    let url = db.url.clone().unwrap();
    let cp = Instance::start(db.config("", "")).await;
    let r = cp
        .put_route("all", json!({"prefix": "+91", "trunk": "t", "pop": "blr"}))
        .await;
    assert_eq!(r.status(), 201);
    let token = cp.token("blr").await;
    let ids = calls(&cp, &token, 10, "pg").await;
    let dump = db.dir.path().join("detour.dump");
    let out = Command::new("pg_dump")
        .args(["--format=custom", "--file"])
        .arg(&dump)
        .arg(format!("--dbname={url}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    cp.stop().await;

    // Restore into a new, empty database.
    let admin = postgres_url("pg_dump").unwrap();
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let new_url = format!("{}/{name}", url.rsplit_once('/').unwrap().0);
    let out = Command::new("pg_restore")
        .args(["--no-owner", "--exit-on-error"])
        .arg(format!("--dbname={new_url}"))
        .arg(&dump)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let cp2 = Instance::start(db.config_with_url(Some(&new_url), "", "")).await;
    read_back(&cp2, &ids).await;
    let r = cp2
        .post_call(&token, &call_body(3), Some("after-pg-restore"))
        .await;
    assert_eq!(r.status(), 201);
    cp2.stop().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await
    .ok();
    db.finish().await;
}

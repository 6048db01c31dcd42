//! The database password: from `database_password_file` (or systemd's
//! credentials directory) into a real Postgres that demands it, and never
//! out again: not in the log (at trace level), not in an error, not in
//! `/readyz`. Postgres only; skipped without `DATABASE_URL`.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sqlx::Connection;
use support::{Backend, Db, DbProxy, Instance, pg_addr, postgres_url, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_detour-control-plane");

/// Everything a URL needs escaped, and a quote for SQL.
const PASSWORD: &str = "Pa55 w@rd:/?#%&'=x";

/// A login role of its own with [`PASSWORD`], owning `db`'s database, so
/// the control plane gets in only with that password.
struct Role {
    name: String,
    admin: String,
}

impl Role {
    async fn create(db: &Db, admin: &str) -> Role {
        let name = format!("r_{}", uuid::Uuid::new_v4().simple());
        let database = db_name(db);
        let mut conn = sqlx::PgConnection::connect(admin).await.expect("admin connect");
        let literal = PASSWORD.replace('\'', "''");
        for sql in [
            format!("CREATE ROLE {name} LOGIN PASSWORD '{literal}'"),
            format!("ALTER DATABASE {database} OWNER TO {name}"),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .expect("role");
        }
        conn.close().await.ok();
        Role {
            name,
            admin: admin.to_owned(),
        }
    }

    /// The role's URL for `db`, without a password.
    fn url(&self, db: &Db) -> String {
        let url = db.url.as_deref().expect("postgres");
        format!("postgres://{}@{}/{}", self.name, pg_addr(url), db_name(db))
    }

    async fn drop_after(self, db: Db) {
        db.finish().await;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin).await {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {}", self.name)))
                .execute(&mut conn)
                .await
                .ok();
        }
    }
}

fn db_name(db: &Db) -> String {
    let url = db.url.as_deref().expect("postgres");
    let path = url.rsplit('/').next().expect("database");
    path.split('?').next().unwrap_or(path).to_owned()
}

/// Every form the password could leak in.
fn leaks(text: &str) -> bool {
    let encoded: String = PASSWORD
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    text.contains(PASSWORD)
        || text.contains("Pa55 w@rd")
        || text.contains(&encoded)
        || text.contains("Pa55%20")
}

fn cp_toml(db: &Db, top: &str) -> std::path::PathBuf {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = db.dir.path().join("cp.toml");
    let token = db.dir.path().join("admin.token");
    std::fs::write(&token, format!("{}\n", support::ADMIN_TOKEN)).unwrap();
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nadmin_token_file = \"{}\"\n{top}\n\
             [database]\nacquire_timeout = \"500ms\"\n",
            db.dir.path().join("data").display(),
            token.display()
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_file_gets_the_control_plane_into_postgres() {
    let Some(db) = Db::new(Backend::Postgres, "password_file").await else {
        return;
    };
    let admin = postgres_url("password_file").expect("checked by Db::new");
    let role = Role::create(&db, &admin).await;
    std::fs::write(db.dir.path().join("db-password"), format!("{PASSWORD}\n")).unwrap();
    let url = role.url(&db);

    // Without the password Postgres refuses (so the file is what lets it in).
    let path = cp_toml(&db, &format!("database_url = \"{url}\""));
    let config = detour_control_plane::Config::load(&path).unwrap();
    let err = detour_control_plane::migrate(&config)
        .await
        .expect_err("no password");
    assert!(format!("{err:#}").contains("password"), "{err:#}");

    let path = cp_toml(
        &db,
        &format!("database_url = \"{url}\"\ndatabase_password_file = \"db-password\""),
    );
    let config = detour_control_plane::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.warnings.is_empty());
    let cp = Instance::start(config).await;
    let token = cp.token("blr").await;
    let r = cp
        .put_route("all", json!({"prefix": "+91", "trunk": "t", "pop": "blr"}))
        .await;
    assert_eq!(r.status(), 201);
    let r = cp
        .post_call(
            &token,
            &json!({"caller": "+919876543210", "destination": "08041234567"}),
            None,
        )
        .await;
    assert_eq!(r.status(), 201);
    cp.stop().await;

    // systemd's LoadCredential=: the same relative name, found in
    // $CREDENTIALS_DIRECTORY instead of beside cp.toml.
    let creds = db.dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::rename(db.dir.path().join("db-password"), creds.join("db-password")).unwrap();
    let check = |with_creds: bool| {
        let mut cmd = Command::new(BIN);
        cmd.args(["check-config", "--config"]).arg(&path);
        if with_creds {
            cmd.env("CREDENTIALS_DIRECTORY", &creds);
        } else {
            cmd.env_remove("CREDENTIALS_DIRECTORY");
        }
        cmd.output().unwrap()
    };
    let out = check(false);
    assert_eq!(out.status.code(), Some(1), "no file beside cp.toml");
    assert!(String::from_utf8_lossy(&out.stderr).contains("database_password_file: "));
    let out = check(true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(BIN)
        .args(["token", "create", "--pop", "maa", "--config"])
        .arg(&path)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    role.drop_after(db).await;
}

/// `serve` with the log at trace level, a request, the database cut (so
/// errors and `/readyz` speak of it), `migrate` failing, SIGTERM: the
/// password shows nowhere. Once with the password in the URL (which
/// check-config warns about) and once from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_error_or_readyz_body_shows_the_password() {
    let Some(db) = Db::new(Backend::Postgres, "password_leaks").await else {
        return;
    };
    let admin = postgres_url("password_leaks").expect("checked by Db::new");
    let role = Role::create(&db, &admin).await;
    let proxy = DbProxy::start(pg_addr(db.url.as_deref().unwrap())).await;
    std::fs::write(db.dir.path().join("db-password"), PASSWORD).unwrap();
    let plain = support::via(&role.url(&db), proxy.addr);
    let encoded: String = PASSWORD
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let inline = plain.replacen('@', &format!(":{encoded}@"), 1);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for (how, top) in [
        ("inline", format!("database_url = \"{inline}\"")),
        (
            "file",
            format!("database_url = \"{plain}\"\ndatabase_password_file = \"db-password\""),
        ),
    ] {
        proxy.heal();
        let path = cp_toml(&db, &top);
        let listen = detour_control_plane::Config::load(&path).unwrap().listen;
        let check = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let check_err = String::from_utf8_lossy(&check.stderr).into_owned();
        assert!(check.status.success(), "{how}: {check_err}");
        assert_eq!(
            check_err.contains("warning: database_url carries a password"),
            how == "inline"
        );
        assert!(
            !leaks(&check_err),
            "{how}: check-config printed the password: {check_err}"
        );

        let log = db.dir.path().join(format!("serve-{how}.log"));
        let mut serve = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let base = format!("http://{listen}");
        wait_until("serve ready", Duration::from_secs(20), || {
            let (client, url) = (client.clone(), format!("{base}/readyz"));
            async move { client.get(url).send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
        proxy.cut().await;
        let mut bodies = String::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = client.get(format!("{base}/readyz")).send().await.unwrap();
            let status = r.status();
            bodies.push_str(&r.text().await.unwrap());
            if status == 503 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{how}: /readyz stayed 200 with the database cut"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(bodies.contains("database"), "{bodies}");
        assert!(!leaks(&bodies), "{how}: /readyz showed the password: {bodies}");
        let migrate = Command::new(BIN)
            .args(["migrate", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let migrate_err = String::from_utf8_lossy(&migrate.stderr).into_owned();
        assert_eq!(
            migrate.status.code(),
            Some(1),
            "{how}: migrate with the database cut"
        );
        assert!(
            !leaks(&migrate_err),
            "{how}: migrate printed the password: {migrate_err}"
        );

        Command::new("kill")
            .args(["-TERM", &serve.id().to_string()])
            .status()
            .unwrap();
        let status = serve.wait().unwrap();
        assert!(status.success(), "{how}: serve exit {status:?}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("TRACE"), "{how}: the log is at trace level");
        eprintln!("{how}: {} log lines without the password", text.lines().count());
        assert!(!leaks(&text), "{how}: the log shows the password");
    }
    drop(proxy);
    role.drop_after(db).await;
}

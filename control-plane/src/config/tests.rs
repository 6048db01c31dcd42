use std::time::Duration;

use super::*;

#[test]
fn example_config_parses() {
    // The example names the production admin token file, which the
    // load reads: a copy points at one made here.
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/cp.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "example\n").unwrap();
    let text = text.replace("/etc/detour/admin.token", &token.display().to_string());
    let path = dir.path().join("cp.toml");
    let c = Config::from_toml_str(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.numbers.default_region.get_ref(), "IN");
    assert_eq!(c.numbers.emergency.len(), 5);
    assert_eq!(c.time_zone(), chrono_tz::Asia::Kolkata);
}

#[test]
fn unknown_key_reports_line_and_column() {
    let text = "listen = \"127.0.0.1:8000\"\n[numbers]\ndefault_regoin = \"IN\"\n";
    let err = Config::from_toml_str(text, "cp.toml").unwrap_err().to_string();
    assert!(err.starts_with("cp.toml:3:1: "), "{err}");
    assert!(err.contains("default_regoin"), "{err}");
}

#[test]
fn every_semantic_problem_is_reported_with_its_place() {
    let text = "[numbers]\ndefault_region = \"XX\"\nemergency = [\"112\", \"1a\"]\n\
                [routing]\ntime_zone = \"Mars/Olympus\"\n";
    let errs = Config::from_toml_str(text, "cp.toml").unwrap_err();
    let shown: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 3, "{shown:?}");
    assert!(shown[0].starts_with("cp.toml:2:18: "), "{shown:?}");
    assert!(shown[1].starts_with("cp.toml:3:21: "), "{shown:?}");
    assert!(shown[2].starts_with("cp.toml:5:13: "), "{shown:?}");
}

#[test]
fn batch_writers_must_fit_the_pool() {
    for (writers, ok) in [(0, false), (1, true), (16, true), (17, false)] {
        let text = format!("[database]\nmax_connections = 16\nbatch_writers = {writers}\n");
        let result = Config::from_toml_str(&text, "cp.toml");
        assert_eq!(result.is_ok(), ok, "batch_writers = {writers}");
        if let Err(e) = result {
            let e = e.to_string();
            assert!(
                e.contains("database.batch_writers must be between 1 and database.max_connections (16)"),
                "{e}"
            );
        }
    }
}

#[test]
fn bad_duration_is_a_located_error() {
    let text = "[routing]\nrefresh_interval = \"soon\"\n";
    let err = Config::from_toml_str(text, "cp.toml").unwrap_err().to_string();
    assert!(err.starts_with("cp.toml:2:"), "{err}");
}

#[test]
fn defaults_use_sqlite_in_data_dir() {
    let c = Config::for_data_dir(Path::new("/tmp/x"));
    assert_eq!(c.database_url(), "sqlite:///tmp/x/detour-cp.sqlite3?mode=rwc");
}

#[test]
fn columns_count_characters_as_the_agents_do() {
    // `१` (a Devanagari digit) is three bytes: `"1a"` starts at the 26th
    // character of line 2 and its 28th byte.
    let text = "[numbers]\nemergency = [\"112\", \"१\", \"1a\"]\n";
    let errs = Config::from_toml_str(text, "cp.toml").unwrap_err();
    let shown: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert!(shown[0].starts_with("cp.toml:2:21: "), "{shown:?}");
    assert!(shown[1].starts_with("cp.toml:2:26: "), "{shown:?}");
}

#[test]
fn shutdown_defaults_and_limits() {
    let c = Config::from_toml_str("", "cp.toml").unwrap();
    assert_eq!(c.shutdown.grace, Duration::ZERO);
    assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(5));
    let c =
        Config::from_toml_str("[shutdown]\ngrace = \"6s\"\ndrain_timeout = \"20s\"\n", "cp.toml").unwrap();
    assert_eq!(c.shutdown.grace, Duration::from_secs(6));
    assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(20));
    let err = Config::from_toml_str("[shutdown]\ndrain_timeout = \"0s\"\n", "cp.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("shutdown.drain_timeout must be above 0"), "{err}");
    let err = Config::from_toml_str("[shutdown]\ngrace = \"soon\"\n", "cp.toml")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("cp.toml:2:"), "{err}");
}

/// A Postgres config with a password file (`file` is its contents, if any).
fn with_password_file(url: &str, file: Option<&str>) -> (tempfile::TempDir, Result<Config, ConfigErrors>) {
    let dir = tempfile::tempdir().unwrap();
    if let Some(text) = file {
        std::fs::write(dir.path().join("db-password"), text).unwrap();
    }
    let text = format!("database_url = \"{url}\"\ndatabase_password_file = \"db-password\"\n");
    let path = dir.path().join("cp.toml");
    let c = Config::parse(&text, &path.display().to_string(), None);
    (dir, c)
}

#[test]
fn the_database_password_comes_from_its_file_into_the_connect_url_only() {
    let (_dir, c) = with_password_file("postgres://detour@db:5432/detour", Some("s3cr3t:@/\n"));
    let c = c.unwrap_or_else(|e| panic!("{e}"));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.database_url(), "postgres://detour@db:5432/detour");
    assert_eq!(
        c.database_connect_url().expose(),
        "postgres://detour:s3cr3t%3A%40%2F@db:5432/detour"
    );
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cr3t"), "{debug}");
}

#[test]
fn a_password_in_the_url_and_a_file_is_an_error_and_alone_a_warning() {
    let (_dir, c) = with_password_file("postgres://detour:inline-pw@db/detour", Some("s3cr3t\n"));
    let err = c.unwrap_err().to_string();
    assert!(
        err.contains("cp.toml:1:16: database_url carries a password"),
        "{err}"
    );
    assert!(!err.contains("inline-pw") && !err.contains("s3cr3t"), "{err}");

    let text = "database_url = \"postgres://detour:inline-pw@db/detour\"\n";
    let c = Config::parse(text, "cp.toml", None).unwrap();
    assert_eq!(c.warnings.len(), 1);
    let w = c.warnings[0].to_string();
    assert!(
        w.starts_with("cp.toml:1:16: warning: database_url carries a password"),
        "{w}"
    );
    assert!(!w.contains("inline-pw"), "{w}");
    // The password written into the URL works as before, and never prints.
    assert_eq!(
        c.database_connect_url().expose(),
        "postgres://detour:inline-pw@db/detour"
    );
    assert!(!format!("{c:?}").contains("inline-pw"));
}

#[test]
fn password_file_problems_are_located_and_quote_no_secret() {
    let (dir, c) = with_password_file("postgres://detour@db/detour", None);
    let err = c.unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "{}:2:26: database_password_file: {}",
            dir.path().join("cp.toml").display(),
            dir.path().join("db-password").display()
        )),
        "{err}"
    );
    let (_dir, c) = with_password_file("postgres://detour@db/detour", Some("one\ntwo\n"));
    let err = c.unwrap_err().to_string();
    assert!(
        err.contains("more than one line") && !err.contains("one\ntwo"),
        "{err}"
    );
    let (_dir, c) = with_password_file("sqlite:///tmp/x.sqlite3", Some("pw\n"));
    let err = c.unwrap_err().to_string();
    assert!(err.contains("needs a postgres:// database_url"), "{err}");
    // A bad scheme is reported without the password in it.
    let err = Config::parse("database_url = \"mysql://u:hunter2@h/d\"\n", "cp.toml", None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("must start with postgres://") && !err.contains("hunter2"),
        "{err}"
    );
}

#[test]
fn a_relative_password_file_is_taken_from_the_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("db-password"), "from-systemd\n").unwrap();
    let text = "database_url = \"postgres://detour@db/detour\"\ndatabase_password_file = \"db-password\"\n";
    let path = dir.path().join("cp.toml").display().to_string();
    let c = Config::parse(text, &path, Some(&creds)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.database_connect_url().expose(),
        "postgres://detour:from-systemd@db/detour"
    );
    // Without $CREDENTIALS_DIRECTORY it is beside cp.toml, where there is none.
    assert!(Config::parse(text, &path, None).is_err());
}

#[test]
fn retention_defaults_forever_and_limits() {
    let c = Config::from_toml_str("", "cp.toml").unwrap();
    assert_eq!(c.retention.calls.limit(), Some(Duration::from_secs(400 * 86_400)));
    assert_eq!(
        c.retention.agent_reports.limit(),
        Some(Duration::from_secs(30 * 86_400))
    );
    assert_eq!(c.retention.batch_size, 500);
    let c = Config::from_toml_str(
        "[retention]\ncalls = \"forever\"\naudit = \"2y\"\nbatch_size = 50\npause = \"1s\"\n",
        "cp.toml",
    )
    .unwrap();
    assert_eq!(c.retention.calls.limit(), None);
    assert!(c.retention.audit.limit() > Some(Duration::from_secs(700 * 86_400)));
    for (text, want) in [
        (
            "[retention]\ncalls = \"0s\"\n",
            "retention.calls must be at least 1h",
        ),
        (
            "[retention]\naudit = \"40s\"\n",
            "retention.audit must be at least 1h",
        ),
        ("[retention]\ncalls = \"12h\"\n", "at least idempotency.retention"),
        (
            "[retention]\nbatch_size = 0\n",
            "retention.batch_size must be between 1 and 10000",
        ),
        (
            "[retention]\ninterval = \"0s\"\n",
            "retention.interval must be above 0",
        ),
        (
            "[retention]\npause = \"5m\"\n",
            "retention.pause must be at most 1m",
        ),
    ] {
        let err = Config::from_toml_str(text, "cp.toml").unwrap_err().to_string();
        assert!(err.contains(want), "{text}: {err}");
    }
    let err = Config::from_toml_str("[retention]\ncalls = \"always\"\n", "cp.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("cp.toml:2:9: ") && err.contains("or \"forever\""),
        "{err}"
    );
}

#[test]
fn the_sqlite_file_is_found_as_sqlx_finds_it() {
    let c = Config::for_data_dir(Path::new("/var/lib/detour-cp"));
    assert_eq!(
        c.sqlite_path(),
        Some(PathBuf::from("/var/lib/detour-cp/detour-cp.sqlite3"))
    );
    for (url, want) in [
        ("sqlite:///srv/cp.db?mode=rwc", Some("/srv/cp.db")),
        ("sqlite://rel/cp.db", Some("rel/cp.db")),
        ("sqlite:cp.db", Some("cp.db")),
        ("sqlite:///srv/a%3Fb%25.db", Some("/srv/a?b%.db")),
        ("sqlite::memory:", None),
        ("sqlite://x.db?mode=memory", None),
        ("postgres://detour@db/detour", None),
    ] {
        let c = Config::parse(&format!("database_url = \"{url}\"\n"), "cp.toml", None).unwrap();
        assert_eq!(c.sqlite_path(), want.map(PathBuf::from), "{url}");
    }
}

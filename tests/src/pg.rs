//! A private PostgreSQL server for one test: its own data directory, port
//! and socket, so the test can restart it or make it read-only without
//! touching any other test's database. Needs the Debian `postgresql` package
//! (`initdb`, `pg_ctl`) and root (the server runs as the `postgres` user).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// A running private server; stopped when dropped.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// The network namespace the server runs in (`start_in_namespace`).
    netns: Option<String>,
    /// The TCP address it listens on.
    listen: String,
}

/// Why a private server cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if bin_dir().is_none() {
        return Some("PostgreSQL's server binaries are not installed (apt-get install postgresql)".into());
    }
    if Command::new("runuser").arg("--help").output().is_err() {
        return Some("`runuser` is missing".into());
    }
    if !crate::process::is_root() {
        return Some("not running as root (the server runs as the postgres user)".into());
    }
    None
}

fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn as_postgres(netns: Option<&str>, bin: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "runuser"]);
            c
        }
        None => Command::new("runuser"),
    };
    let out = cmd
        .args(["-u", "postgres", "--"])
        .arg(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed: {}{}",
            bin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl PrivatePostgres {
    /// initdb, start on a free loopback port, create the `detour` database.
    pub fn start() -> anyhow::Result<PrivatePostgres> {
        PrivatePostgres::start_on(None, "127.0.0.1", crate::process::free_port()?, None)
    }

    /// Like [`PrivatePostgres::start`], inside network namespace `netns`,
    /// listening on `addr`:5432 and trusting clients from `clients` (a CIDR
    /// such as `10.203.0.0/24`). Processes outside the namespace reach it
    /// through its Unix socket ([`PrivatePostgres::socket_url`]).
    pub fn start_in_namespace(netns: &str, addr: &str, clients: &str) -> anyhow::Result<PrivatePostgres> {
        PrivatePostgres::start_on(Some(netns), addr, 5432, Some(clients))
    }

    fn start_on(
        netns: Option<&str>,
        listen: &str,
        port: u16,
        clients: Option<&str>,
    ) -> anyhow::Result<PrivatePostgres> {
        let bin = bin_dir().context("no PostgreSQL server binaries")?;
        let dir = tempfile::Builder::new().prefix("detour-pg-").tempdir()?;
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status()?;
        let data = dir.path().join("data");
        let data_s = data.display().to_string();
        as_postgres(
            None,
            &bin.join("initdb"),
            &["-D", &data_s, "--auth=trust", "-U", "postgres", "--no-sync"],
        )?;
        if let Some(cidr) = clients {
            use std::io::Write;
            let mut hba = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))?;
            writeln!(hba, "host all all {cidr} trust")?;
        }
        let pg = PrivatePostgres {
            dir,
            bin,
            port,
            netns: netns.map(str::to_owned),
            listen: listen.to_owned(),
        };
        pg.ctl(&["start"])?;
        pg.psql("CREATE ROLE detour LOGIN SUPERUSER")?;
        pg.psql("CREATE DATABASE detour OWNER detour")?;
        Ok(pg)
    }

    fn ctl(&self, what: &[&str]) -> anyhow::Result<()> {
        let data = self.dir.path().join("data").display().to_string();
        let log = self.dir.path().join("server.log").display().to_string();
        let opts = format!(
            "-p {} -k {} -c listen_addresses={} -c fsync=off",
            self.port,
            self.dir.path().display(),
            self.listen,
        );
        let mut args = vec!["-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "30"];
        args.extend_from_slice(what);
        as_postgres(self.netns.as_deref(), &self.bin.join("pg_ctl"), &args).map(|_| ())
    }

    /// Runs one SQL statement as the superuser.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let socket_dir = self.dir.path().display().to_string();
        as_postgres(
            None,
            &self.bin.join("psql"),
            &[
                "-h",
                &socket_dir,
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-qAtc",
                sql,
            ],
        )
    }

    /// The server's (postmaster's) process id, from its pid file.
    pub fn server_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    pub fn url(&self) -> String {
        format!("postgres://detour@{}:{}/detour", self.listen, self.port)
    }

    /// The `detour` database through the server's Unix socket, which works
    /// from any network namespace.
    pub fn socket_url(&self) -> String {
        format!(
            "postgres://detour@localhost/detour?host={}&port={}",
            self.dir.path().display(),
            self.port
        )
    }

    /// A fast restart: every session is cut, the server is away for as long
    /// as a restart takes.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.ctl(&["restart", "-m", "fast"])
    }

    /// Every new transaction read-only, as on a primary demoted in a
    /// failover; sessions are cut so none keeps writing.
    pub fn set_read_only(&self, on: bool) -> anyhow::Result<()> {
        self.psql(&format!(
            "ALTER SYSTEM SET default_transaction_read_only = {}",
            if on { "on" } else { "off" }
        ))?;
        self.psql("SELECT pg_reload_conf()")?;
        self.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = 'detour'")?;
        Ok(())
    }

    /// From now on the `detour` role logs in over TCP only with `password`
    /// (SCRAM, as on RDS); the superuser `postgres` stays trusted for
    /// [`PrivatePostgres::psql`].
    pub fn require_password(&self, password: &str) -> anyhow::Result<()> {
        self.psql(&format!(
            "ALTER ROLE detour PASSWORD '{}'",
            password.replace('\'', "''")
        ))?;
        let hba = self.dir.path().join("data").join("pg_hba.conf");
        std::fs::write(
            &hba,
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        )
        .with_context(|| format!("writing {}", hba.display()))?;
        self.psql("SELECT pg_reload_conf()")?;
        Ok(())
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop", "-m", "immediate"]);
    }
}

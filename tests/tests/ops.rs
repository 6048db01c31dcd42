//! The operations kit, checked for real: the Ansible roles installed into a
//! temporary prefix and the installed agent started from what they rendered,
//! the canary health gate, rollback, idempotency, `ansible-lint`, the
//! Prometheus alert rules with their unit tests, and the Grafana dashboard's
//! structure.
//!
//! A missing tool (`ansible-playbook`, `ansible-lint`, `promtool`) makes its
//! test print `SKIPPED: …` and pass; with `DETOUR_REQUIRE_TOOLS=1` (CI) it fails
//! instead.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

fn ansible_dir() -> PathBuf {
    repo().join("ansible")
}

/// The directory holding the workspace binaries (`detour-agent`, …).
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_detour-lab"))
        .parent()
        .expect("binaries live in a directory")
        .to_path_buf();
    for bin in ["detour-agent", "detour-control-plane"] {
        assert!(
            dir.join(bin).exists(),
            "build the workspace binaries first: cargo build --workspace ({bin} missing)"
        );
    }
    dir
}

/// True when `tool` runs. Otherwise prints SKIPPED and returns false, or
/// panics when the tools are required (CI).
async fn have(tool: &str, why: &str) -> bool {
    let runs = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if runs {
        return true;
    }
    assert!(
        std::env::var("DETOUR_REQUIRE_TOOLS").as_deref() != Ok("1"),
        "{tool} is required (DETOUR_REQUIRE_TOOLS=1) but does not run"
    );
    eprintln!("SKIPPED: {why}: `{tool} --version` does not run (install it, see docs/operations.md)");
    false
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn run(cmd: &mut Command) -> Output {
    cmd.kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// A free loopback port, kept from other tests until this one exits.
fn free_port() -> u16 {
    detour_lab::process::free_port().expect("a free loopback port")
}

/// `GET path` over HTTP/1.1; the status code and the body.
async fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Waits until `GET path` answers `want`, or panics after `within`.
async fn wait_status(addr: &str, path: &str, want: u16, within: Duration, log: &Path) -> String {
    let start = Instant::now();
    loop {
        let got = get(addr, path).await;
        if let Ok((status, body)) = &got
            && *status == want
        {
            return body.clone();
        }
        assert!(
            start.elapsed() < within,
            "GET {addr}{path}: wanted {want} within {within:?}, last {got:?}\nagent log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The counters of the PLAY RECAP line for `host`.
fn recap(stdout: &str, host: &str) -> Option<Vec<(String, u64)>> {
    let line = stdout
        .lines()
        .skip_while(|l| !l.starts_with("PLAY RECAP"))
        .find(|l| l.split_whitespace().next() == Some(host))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect(),
    )
}

fn count(recap: &[(String, u64)], key: &str) -> u64 {
    recap.iter().find(|(k, _)| k == key).map_or(u64::MAX, |(_, v)| *v)
}

/// A copy of a workspace binary without debug info: the same program, a
/// tenth of the size, so the roles' copies and checksums take seconds.
async fn slim_copy(from: &Path, to: &Path) {
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(to)
        .arg(from)
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(from, to).unwrap();
    }
}

/// One Ansible fixture: a prefix, certificates, an inventory and variables.
struct Lab {
    dir: tempfile::TempDir,
    prefix: PathBuf,
    admin: String,
}

impl Lab {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn installed(&self, p: &str) -> PathBuf {
        self.prefix.join(p.trim_start_matches('/'))
    }

    /// `ansible-playbook` on a playbook of ansible/ with the lab's inventory
    /// and variables, plus `extra` (JSON).
    async fn playbook(&self, playbook: &str, extra: serde_json::Value) -> Output {
        self.playbook_args(&[], playbook, extra).await
    }

    /// [`Lab::playbook`] with more `ansible-playbook` arguments (`--check`).
    async fn playbook_args(&self, args: &[&str], playbook: &str, extra: serde_json::Value) -> Output {
        let extra_file = self.path("extra.json");
        std::fs::write(&extra_file, extra.to_string()).unwrap();
        let started = Instant::now();
        let out = run(Command::new("ansible-playbook")
            .current_dir(ansible_dir())
            .env("ANSIBLE_CONFIG", ansible_dir().join("ansible.cfg"))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_FORCE_COLOR", "0")
            .env("ANSIBLE_LOCAL_TEMP", self.path("ansible-tmp"))
            .env("ANSIBLE_REMOTE_TEMP", self.path("ansible-tmp"))
            .args(args)
            .arg("-i")
            .arg(self.path("inventory.yml"))
            .arg(playbook)
            .arg("-e")
            .arg(format!("@{}", self.path("vars.json").display()))
            .arg("-e")
            .arg(format!("@{}", extra_file.display()))
            .args(["-e", "ansible_python_interpreter=/usr/bin/python3"]))
        .await;
        eprintln!("ansible-playbook {playbook} {extra}: {:.1?}", started.elapsed());
        out
    }
}

fn whoami(flag: &str) -> String {
    let out = std::process::Command::new("id").arg(flag).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Certificates from `detour-agent pki`, slim binaries, a fleet inventory in
/// which this machine is `blr`, and variables rooting everything in a prefix.
async fn lab(bins: &Path, cp_url: &str) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s);
    let agent = p("release/detour-agent");
    std::fs::create_dir_all(p("release")).unwrap();
    slim_copy(&bins.join("detour-agent"), &agent).await;
    slim_copy(
        &bins.join("detour-control-plane"),
        &p("release/detour-control-plane"),
    )
    .await;
    let pki = p("pki");
    for args in [
        vec!["pki", "init", "--out", pki.to_str().unwrap()],
        vec![
            "pki",
            "issue",
            "--ca",
            pki.to_str().unwrap(),
            "--name",
            "blr",
            "--out",
            pki.to_str().unwrap(),
        ],
        // A revoked PoP, so the fleet CA has a revocation list to install.
        vec![
            "pki",
            "issue",
            "--ca",
            pki.to_str().unwrap(),
            "--name",
            "gone",
            "--out",
            dir.path().join("gone").to_str().unwrap(),
        ],
        vec!["pki", "revoke", "--ca", pki.to_str().unwrap(), "--name", "gone"],
    ] {
        let out = run(Command::new(&agent).args(&args)).await;
        assert!(out.status.success(), "detour-agent {args:?}: {}", text(&out));
    }
    // blr is this machine; maa and del are peers (never contacted by Ansible);
    // blr's host vars weigh maa up and exclude hyd.
    std::fs::write(
        p("inventory.yml"),
        r#"all:
  hosts:
    localhost:
      ansible_connection: local
      ansible_python_interpreter: /usr/bin/python3
      detour_pop: blr
  children:
    detour_agents:
      hosts:
        localhost:
          detour_agent_peer_weights: {maa: 250}
          detour_agent_peer_exclude: [hyd]
          detour_agent_peer_disabled: [del]
        maa-test: {detour_pop: maa, detour_agent_relay_advertise: "127.0.0.1:1"}
        maa-test-2: {detour_pop: maa, detour_agent_relay_advertise: "127.0.0.1:4"}
        del-test: {detour_pop: del, ansible_host: 127.0.0.2, detour_agent_relay_port: 2}
        hyd-test: {detour_pop: hyd, detour_agent_relay_advertise: "127.0.0.1:3"}
"#,
    )
    .unwrap();
    let prefix = p("root");
    let admin = format!("127.0.0.1:{}", free_port());
    let (user, group) = (whoami("-un"), whoami("-gn"));
    let vars = serde_json::json!({
        "detour_prefix": prefix,
        "detour_manage_service": false,
        "detour_agent_binary_src": agent,
        "detour_agent_pki_dir": pki,
        "detour_agent_crl_src": pki.join("crl.pem"),
        "detour_agent_file_owner": user,
        "detour_agent_file_group": group,
        "detour_agent_token": "ops-test-token",
        "detour_agent_cp_url": cp_url,
        "detour_agent_listen_local": format!("127.0.0.1:{}", free_port()),
        "detour_agent_listen_relay": format!("127.0.0.1:{}", free_port()),
        "detour_agent_listen_admin": admin,
        "detour_agent_health_interval": "200ms",
        "detour_agent_report_interval": "off",
        "detour_control_plane_binary_src": p("release/detour-control-plane"),
        "detour_control_plane_file_owner": user,
        "detour_control_plane_file_group": group,
        "detour_control_plane_listen": format!("127.0.0.1:{}", free_port()),
        "detour_control_plane_admin_token": "ops-test-admin-token",
        // Postgres (never dialled here: nothing starts the control plane),
        // so the role writes the password file and its credential.
        "detour_control_plane_database_url": "postgres://detour@127.0.0.1:1/detour",
        "detour_control_plane_database_password": "ops-test-db-password",
    });
    std::fs::write(p("vars.json"), vars.to_string()).unwrap();
    Lab { dir, prefix, admin }
}

/// Kills the agent when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_role_installs_an_agent_that_runs_passes_the_gate_and_rolls_back() {
    if !have("ansible-playbook", "Ansible role test").await {
        return;
    }
    let bins = bin_dir();
    // A stand-in control plane, so the installed agent's direct path comes up.
    let cp = detour_lab::mock_cp::MockCp::start(None).await.unwrap();
    let lab = lab(&bins, &format!("http://{}", cp.addr)).await;

    // First run: everything is installed.
    let first = lab.playbook("tests/local.yml", serde_json::json!({})).await;
    let stdout = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(first.status.success(), "first run: {}", text(&first));
    let r = recap(&stdout, "localhost").expect("a PLAY RECAP line");
    assert_eq!(count(&r, "failed"), 0, "{stdout}");
    assert!(
        count(&r, "changed") > 0,
        "the first run installs things: {stdout}"
    );

    let agent = lab.installed("/usr/local/bin/detour-agent");
    let agent_toml = lab.installed("/etc/detour/agent.toml");
    for f in [
        "/etc/detour/peers.toml",
        "/etc/detour/agent.token",
        "/etc/detour/certs/ca.pem",
        "/etc/detour/certs/blr.pem",
        "/etc/detour/certs/blr.key",
        "/etc/detour/certs/crl.pem",
        "/etc/detour-cp/cp.toml",
        "/etc/detour-cp/admin.token",
        "/usr/local/bin/detour-control-plane",
    ] {
        assert!(lab.installed(f).exists(), "{f} installed under the prefix");
    }

    // Peers: the other PoPs of the group, with blr's overrides.
    let peers = std::fs::read_to_string(lab.installed("/etc/detour/peers.toml")).unwrap();
    // maa runs two telephony servers: each is a peer under a name of its
    // own, with the PoP name its certificate carries.
    assert!(
        peers.contains("name = \"maa-1\"\npop = \"maa\"\nrelay = \"127.0.0.1:1\"\nweight = 250"),
        "{peers}"
    );
    assert!(
        peers.contains("name = \"maa-2\"\npop = \"maa\"\nrelay = \"127.0.0.1:4\"\nweight = 250"),
        "{peers}"
    );
    assert!(
        peers.contains("name = \"del\"\nrelay = \"127.0.0.2:2\"\nweight = 100\nenabled = false"),
        "{peers}"
    );
    assert!(!peers.contains("name = \"hyd\""), "hyd is excluded: {peers}");
    assert!(
        !peers.contains("name = \"blr\""),
        "blr is not its own peer: {peers}"
    );

    // The unit: validated start, SIGHUP reload, hardening.
    let unit = std::fs::read_to_string(lab.installed("/etc/systemd/system/detour-agent.service")).unwrap();
    for line in [
        format!(
            "ExecStartPre={} check-config --config {}",
            agent.display(),
            agent_toml.display()
        ),
        "ExecReload=/bin/kill -HUP $MAINPID".to_owned(),
        "NoNewPrivileges=yes".to_owned(),
        "ProtectSystem=strict".to_owned(),
        "ProtectHome=yes".to_owned(),
        "PrivateTmp=yes".to_owned(),
        "CapabilityBoundingSet=".to_owned(),
        "User=detour".to_owned(),
        "Requires=detour-agent.socket".to_owned(),
        "RuntimeDirectoryPreserve=restart".to_owned(),
    ] {
        assert!(unit.lines().any(|l| l == line), "unit has `{line}`:\n{unit}");
    }
    // The listening sockets live in the socket unit, so a restart refuses
    // no connection (tests/upgrade.rs restarts an agent the way it does).
    let socket = std::fs::read_to_string(lab.installed("/etc/systemd/system/detour-agent.socket")).unwrap();
    let listens: Vec<&str> = socket
        .lines()
        .filter(|l| l.starts_with("ListenStream="))
        .collect();
    assert_eq!(listens.len(), 3, "local, relay and admin:\n{socket}");
    let toml = std::fs::read_to_string(&agent_toml).unwrap();
    let crl = lab.installed("/etc/detour/certs/crl.pem");
    assert!(
        toml.contains(&format!("crl = \"{}\"\n", crl.display())),
        "[tls] crl is set:\n{toml}"
    );
    for l in listens {
        let addr = l.trim_start_matches("ListenStream=");
        assert!(
            toml.contains(&format!("\"{addr}\"")),
            "{addr} is a [listen] address:\n{toml}"
        );
    }
    let cp_unit =
        std::fs::read_to_string(lab.installed("/etc/systemd/system/detour-control-plane.service")).unwrap();
    assert!(
        cp_unit
            .lines()
            .any(|l| l.starts_with("ExecStartPre=") && l.contains("check-config")),
        "{cp_unit}"
    );
    // The database password: a file of its own, handed over as a systemd
    // credential; cp.toml names it and holds no secret.
    let password_file = lab.installed("/etc/detour-cp/db-password");
    assert_eq!(
        std::fs::read_to_string(&password_file).unwrap(),
        "ops-test-db-password\n"
    );
    let load = format!("LoadCredential=db-password:{}", password_file.display());
    assert!(
        cp_unit.lines().any(|l| l == load),
        "unit has `{load}`:\n{cp_unit}"
    );
    let cp_toml = std::fs::read_to_string(lab.installed("/etc/detour-cp/cp.toml")).unwrap();
    assert!(
        cp_toml.contains("database_password_file = \"db-password\""),
        "{cp_toml}"
    );
    assert!(!cp_toml.contains("ops-test-db-password"), "{cp_toml}");

    // systemd's own parser finds nothing to warn about (it exits 0 even on
    // bad values, so read what it prints about the files).
    for unit in [
        "detour-agent.service",
        "detour-agent.socket",
        "detour-control-plane.service",
    ] {
        let path = lab.installed(&format!("/etc/systemd/system/{unit}"));
        match Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .await
        {
            Ok(out) => {
                let said = String::from_utf8_lossy(&out.stderr).into_owned();
                let about: Vec<_> = said.lines().filter(|l| l.contains(unit)).collect();
                assert!(about.is_empty(), "systemd-analyze verify {unit}:\n{said}");
            }
            Err(e) => eprintln!("not verifying {unit}: systemd-analyze does not run ({e})"),
        }
    }

    // The rendered configs pass the installed binaries' own checks.
    let check = run(Command::new(&agent)
        .arg("check-config")
        .arg("--config")
        .arg(&agent_toml))
    .await;
    assert!(check.status.success(), "{}", text(&check));
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(said.contains("OK (pop blr, 3 peer(s)"), "{said}");
    let cp_check = run(Command::new(lab.installed("/usr/local/bin/detour-control-plane"))
        .arg("check-config")
        .arg("--config")
        .arg(lab.installed("/etc/detour-cp/cp.toml")))
    .await;
    assert!(cp_check.status.success(), "{}", text(&cp_check));
    assert!(
        !String::from_utf8_lossy(&cp_check.stderr).contains("warning"),
        "{}",
        text(&cp_check)
    );

    // The installed agent starts with the rendered config and serves.
    let log = lab.path("agent.log");
    let mut running = Running(
        Command::new(&agent)
            .arg("run")
            .arg("--config")
            .arg(&agent_toml)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap(),
    );
    wait_status(&lab.admin, "/healthz", 200, Duration::from_secs(20), &log).await;
    let metrics = wait_status(&lab.admin, "/metrics", 200, Duration::from_secs(5), &log).await;
    assert!(
        metrics.contains("path=\"direct\",pop=\"blr\"}") && metrics.contains("detour_path_state{endpoint="),
        "{metrics}"
    );
    // The installed binary says which build it is (what a rollout gate checks).
    assert!(
        metrics.lines().any(
            |l| l.starts_with("detour_build_info{binary=\"detour-agent\",version=\"")
                && l.ends_with(",pop=\"blr\"} 1")
        ),
        "{metrics}"
    );

    // The canary gate passes once the direct path is up…
    let gate = lab
        .playbook(
            "tests/gate.yml",
            serde_json::json!({"detour_agent_gate_retries": 40, "detour_agent_gate_delay": 0.5}),
        )
        .await;
    assert!(gate.status.success(), "gate on a healthy agent: {}", text(&gate));

    // …and fails the host once no path is usable (control plane gone).
    drop(cp);
    wait_status(&lab.admin, "/readyz", 503, Duration::from_secs(30), &log).await;
    let gate = lab
        .playbook(
            "tests/gate.yml",
            serde_json::json!({"detour_agent_gate_retries": 1, "detour_agent_gate_delay": 0.2}),
        )
        .await;
    let stdout = String::from_utf8_lossy(&gate.stdout).into_owned();
    assert!(
        !gate.status.success(),
        "gate on a broken agent must fail: {}",
        text(&gate)
    );
    assert_eq!(
        count(&recap(&stdout, "localhost").unwrap(), "failed"),
        1,
        "{stdout}"
    );
    running.0.kill().await.ok();

    // Second identical run: nothing to change.
    let second = lab.playbook("tests/local.yml", serde_json::json!({})).await;
    let stdout = String::from_utf8_lossy(&second.stdout).into_owned();
    assert!(second.status.success(), "second run: {}", text(&second));
    let r = recap(&stdout, "localhost").expect("a PLAY RECAP line");
    assert_eq!(count(&r, "changed"), 0, "the second run is idempotent:\n{stdout}");
    assert_eq!(count(&r, "failed"), 0, "{stdout}");
    eprintln!(
        "second run: {}",
        stdout
            .lines()
            .find(|l| l.starts_with("localhost "))
            .unwrap_or_default()
    );

    // A new release keeps the old binary as .prev; rollback swaps them back.
    let old = std::fs::read(&agent).unwrap();
    let mut new = old.clone();
    new.extend_from_slice(b"\0release-2");
    let new_src = lab.path("release/detour-agent-2");
    std::fs::write(&new_src, &new).unwrap();
    std::fs::set_permissions(&new_src, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let upgrade = lab
        .playbook(
            "tests/upgrade.yml",
            serde_json::json!({"detour_agent_binary_src": new_src}),
        )
        .await;
    assert!(upgrade.status.success(), "upgrade: {}", text(&upgrade));
    let prev = lab.installed("/usr/local/bin/detour-agent.prev");
    assert!(
        std::fs::read(&agent).unwrap() == new,
        "the new release is installed"
    );
    assert!(
        std::fs::read(&prev).unwrap() == old,
        "the old release is kept as .prev"
    );
    let rollback = lab.playbook("tests/rollback.yml", serde_json::json!({})).await;
    assert!(rollback.status.success(), "rollback: {}", text(&rollback));
    assert!(
        std::fs::read(&agent).unwrap() == old,
        "rollback restores the old release"
    );
    assert!(
        std::fs::read(&prev).unwrap() == new,
        "and keeps the rolled-back one as .prev"
    );
}

/// A copy of `bin` that reports another version (same length, so nothing
/// else in the binary moves): the release a rollout installs.
fn other_version(bin: &Path, to: &Path) -> String {
    const VERSION: &str = env!("CARGO_PKG_VERSION");
    let mut next = VERSION.to_owned();
    let last = next.pop().unwrap();
    next.push(if last == '9' { '8' } else { '9' });
    let mut bytes = std::fs::read(bin).unwrap();
    let mut i = 0;
    while let Some(at) = bytes[i..]
        .windows(VERSION.len())
        .position(|w| w == VERSION.as_bytes())
    {
        bytes[i + at..i + at + VERSION.len()].copy_from_slice(next.as_bytes());
        i += at + VERSION.len();
    }
    std::fs::write(to, bytes).unwrap();
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    next
}

/// Kills the agents a rollout started detached (their pid files) when the
/// test ends.
struct Detached(Vec<PathBuf>);

impl Drop for Detached {
    fn drop(&mut self) {
        for f in &self.0 {
            if let Ok(pid) = std::fs::read_to_string(f) {
                let _ = std::process::Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_bakes_each_batch_and_stops_at_the_first_host_that_fails() {
    if !have("ansible-playbook", "Ansible rollout test").await {
        return;
    }
    let bins = bin_dir();
    let cp = detour_lab::mock_cp::MockCp::start(None).await.unwrap();
    let lab = lab(&bins, &format!("http://{}", cp.addr)).await;
    let old_bin = lab.path("release/detour-agent");
    let new_bin = lab.path("release/detour-agent-next");
    let new_version = other_version(&old_bin, &new_bin);
    let pki = lab.path("pki");
    for pop in ["maa", "del"] {
        let out = run(Command::new(&old_bin)
            .args(["pki", "issue", "--ca"])
            .arg(&pki)
            .args(["--name", pop, "--out"])
            .arg(&pki))
        .await;
        assert!(out.status.success(), "{}", text(&out));
    }
    // Three telephony servers on this machine, each under its own prefix
    // with its own ports. Without systemd the role restarts an agent with
    // detour_agent_restart_command: a detached `run --takeover`. maa-1's
    // restart does nothing, as when a restart silently did not happen: its
    // bake gate must catch the old version still running.
    let mut hosts = String::new();
    let mut admins = Vec::new();
    let mut pidfiles = Vec::new();
    for (host, pop) in [("blr-1", "blr"), ("maa-1", "maa"), ("del-1", "del")] {
        let prefix = lab.path(host);
        let admin = format!("127.0.0.1:{}", free_port());
        let restart = if pop == "maa" {
            "true".to_owned()
        } else {
            format!(
                "setsid nohup {p}/usr/local/bin/detour-agent run --takeover --config {p}/etc/detour/agent.toml \
                 >> {p}/agent.log 2>&1 < /dev/null & echo $! > {p}/agent.pid",
                p = prefix.display()
            )
        };
        hosts.push_str(&format!(
            "        {host}:\n          detour_pop: {pop}\n          detour_prefix: \"{}\"\n          \
             detour_agent_listen_local: \"127.0.0.1:{}\"\n          detour_agent_listen_relay: \"off\"\n          \
             detour_agent_listen_admin: \"{admin}\"\n          detour_agent_relay_advertise: \"127.0.0.1:{}\"\n          \
             detour_agent_restart_command: \"{}\"\n",
            prefix.display(),
            free_port(),
            free_port(),
            restart.replace('"', "\\\"")
        ));
        admins.push((host, prefix, admin));
        pidfiles.push(lab.path(host).join("agent.pid"));
    }
    let _detached = Detached(pidfiles);
    std::fs::write(
        lab.path("inventory.yml"),
        format!(
            "all:\n  vars:\n    ansible_connection: local\n    ansible_python_interpreter: /usr/bin/python3\n  \
             children:\n    detour_agents:\n      hosts:\n{hosts}"
        ),
    )
    .unwrap();
    let mut vars: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lab.path("vars.json")).unwrap()).unwrap();
    let o = vars.as_object_mut().unwrap();
    for k in [
        "detour_prefix",
        "detour_agent_listen_local",
        "detour_agent_listen_relay",
        "detour_agent_listen_admin",
    ] {
        o.remove(k);
    }
    o.insert("detour_agent_peers_extra".into(), serde_json::json!([]));
    std::fs::write(lab.path("vars.json"), vars.to_string()).unwrap();

    // The fleet as it runs today: the old release installed and running.
    let install = lab
        .playbook("rollout.yml", serde_json::json!({"detour_health_gate": false}))
        .await;
    assert!(install.status.success(), "first install: {}", text(&install));
    let mut old_agents = Vec::new();
    for (_, prefix, admin) in &admins {
        let log = prefix.join("agent.log");
        old_agents.push(Running(
            Command::new(prefix.join("usr/local/bin/detour-agent"))
                .arg("run")
                .arg("--config")
                .arg(prefix.join("etc/detour/agent.toml"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        ));
        wait_status(admin, "/readyz", 200, Duration::from_secs(20), &log).await;
    }

    // A dry run (what an operator runs first) changes nothing and passes.
    let new_src = serde_json::json!({"detour_agent_binary_src": new_bin, "detour_health_gate": true});
    let dry = lab
        .playbook_args(&["--check", "--diff"], "rollout.yml", new_src.clone())
        .await;
    assert!(dry.status.success(), "rollout.yml --check --diff: {}", text(&dry));
    let old = std::fs::read(&old_bin).unwrap();
    for (_, prefix, _) in &admins {
        let installed = std::fs::read(prefix.join("usr/local/bin/detour-agent")).unwrap();
        assert!(installed == old, "check mode installed nothing");
    }

    // The rollout: one host a batch, a 2 s bake after each.
    let mut extra = new_src;
    extra["detour_rollout_serial"] = serde_json::json!([1]);
    extra["detour_rollout_bake"] = serde_json::json!(2);
    extra["detour_agent_gate_retries"] = serde_json::json!(40);
    extra["detour_agent_gate_delay"] = serde_json::json!(0.5);
    let roll = lab.playbook("rollout.yml", extra).await;
    let stdout = String::from_utf8_lossy(&roll.stdout).into_owned();
    assert!(
        !roll.status.success(),
        "maa-1 must stop the rollout: {}",
        text(&roll)
    );
    // blr-1: upgraded in place, serving the new version.
    let (_, blr_prefix, blr_admin) = &admins[0];
    let metrics = wait_status(
        blr_admin,
        "/metrics",
        200,
        Duration::from_secs(5),
        &blr_prefix.join("agent.log"),
    )
    .await;
    assert!(
        metrics.contains(&format!("version=\"{new_version}\"")),
        "blr-1 runs the new release:\n{metrics}"
    );
    assert_eq!(count(&recap(&stdout, "blr-1").unwrap(), "failed"), 0, "{stdout}");
    // maa-1: the new binary is installed but the old process still runs;
    // the bake gate says so and stops the rollout.
    assert_eq!(count(&recap(&stdout, "maa-1").unwrap(), "failed"), 1, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "maa-1 failed the bake gate: runs {} (installed {new_version})",
            env!("CARGO_PKG_VERSION")
        )),
        "the failure says why:\n{stdout}"
    );
    // del-1: never reached, still the old release, still serving.
    let (_, del_prefix, del_admin) = &admins[2];
    assert!(
        std::fs::read(del_prefix.join("usr/local/bin/detour-agent")).unwrap() == old,
        "del-1 was left untouched"
    );
    let metrics = wait_status(
        del_admin,
        "/metrics",
        200,
        Duration::from_secs(5),
        &del_prefix.join("agent.log"),
    )
    .await;
    assert!(
        metrics.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{metrics}"
    );
    drop(old_agents);
}

#[tokio::test]
async fn ansible_lint_is_clean() {
    if !have("ansible-lint", "ansible-lint").await {
        return;
    }
    let out = run(Command::new("ansible-lint")
        .current_dir(ansible_dir())
        .env("ANSIBLE_CONFIG", ansible_dir().join("ansible.cfg"))
        .env("NO_COLOR", "1")
        .args(["--offline", "--nocolor"]))
    .await;
    let all = text(&out);
    assert!(out.status.success(), "ansible-lint: {all}");
    assert!(
        all.contains("Profile 'production' was required, and it passed"),
        "{all}"
    );
}

/// Names of every metric the code registers: the first string argument of
/// each `…::new(` in the metrics modules. The control plane's registry adds
/// the `detour_cp_` prefix to its names.
fn known_metrics() -> HashSet<String> {
    let names = |file: &str| -> Vec<String> {
        let src = std::fs::read_to_string(repo().join(file)).unwrap();
        src.split("::new(")
            .skip(1)
            .filter_map(|rest| rest.trim_start().strip_prefix('"')?.split('"').next())
            .map(str::to_owned)
            .collect()
    };
    let mut known: HashSet<String> = names("agent/src/metrics.rs").into_iter().collect();
    known.extend(
        names("control-plane/src/metrics.rs")
            .into_iter()
            .map(|n| format!("detour_cp_{n}")),
    );
    known
}

/// Every `detour_…` metric name an expression uses, histogram suffixes
/// removed (recording rules are `detour:…` and not matched).
fn metric_tokens(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"detour_") && (i == 0 || !word(b[i - 1])) {
            let len = b[i..].iter().take_while(|c| word(**c) && **c != b':').count();
            let name = &expr[i..i + len];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(base.to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    out
}

fn assert_known(what: &str, used: &BTreeSet<String>, known: &HashSet<String>) {
    let unknown: Vec<_> = used.iter().filter(|m| !known.contains(*m)).collect();
    assert!(
        unknown.is_empty(),
        "{what} uses metrics no code exports: {unknown:?} (known: {known:?})"
    );
}

/// GitHub's anchor for a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[tokio::test]
async fn alert_rules_use_real_metrics_link_runbooks_and_pass_their_unit_tests() {
    let rules_file = repo().join("config/prometheus/alerts.yml");
    let rules = std::fs::read_to_string(&rules_file).unwrap();
    let tests = std::fs::read_to_string(repo().join("config/prometheus/alerts_test.yml")).unwrap();
    let ops = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let anchors: HashSet<String> = ops
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();

    // Metrics: only names the code registers (text check: no YAML parser here).
    assert_known("alerts.yml", &metric_tokens(&rules), &known_metrics());

    // Each alert: summary, description, a runbook anchor that exists, and
    // unit tests where it fires and where it must not.
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 8, "{alerts:?}");
    let blocks: Vec<&str> = rules.split("- alert: ").skip(1).collect();
    for (name, block) in alerts.iter().zip(&blocks) {
        let block = block.split("- record: ").next().unwrap_or(block);
        for key in ["summary:", "description:", "runbook_url:"] {
            assert!(block.contains(key), "{name} has no {key}");
        }
        let url = block
            .lines()
            .find_map(|l| l.trim().strip_prefix("runbook_url: "))
            .unwrap()
            .trim_matches('"');
        let fragment = url.rsplit_once('#').map(|(_, f)| f).unwrap_or_default();
        assert_eq!(
            url,
            format!("https://github.com/detour/detour/blob/main/docs/operations.md#{fragment}"),
            "{name}: runbook links are absolute and point into docs/operations.md"
        );
        assert!(
            anchors.contains(fragment),
            "{name}: docs/operations.md has no heading for #{fragment}"
        );
        let mut fires = false;
        let mut quiet = false;
        let mut lines = tests.lines().peekable();
        while let Some(l) = lines.next() {
            if l.trim() == format!("alertname: {name}")
                && let Some(next) = lines.peek()
            {
                match next.trim() {
                    "exp_alerts: []" => quiet = true,
                    "exp_alerts:" => fires = true,
                    _ => {}
                }
            }
        }
        assert!(
            fires && quiet,
            "{name}: alerts_test.yml needs a firing case and a quiet case"
        );
    }

    if !have("promtool", "Prometheus rule checks").await {
        return;
    }
    let check = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules_file))
    .await;
    assert!(check.status.success(), "promtool check rules: {}", text(&check));
    let test = run(Command::new("promtool")
        .current_dir(repo().join("config/prometheus"))
        .args(["test", "rules", "alerts_test.yml"]))
    .await;
    assert!(test.status.success(), "promtool test rules: {}", text(&test));
}

fn panels(v: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in v["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(panels(p));
    }
    out
}

#[test]
fn grafana_dashboard_queries_real_metrics_through_variables() {
    let text = std::fs::read_to_string(repo().join("config/grafana/detour.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("detour.json is valid JSON");
    assert!(
        dash["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "dashboard uid"
    );
    assert!(
        dash["title"].as_str().is_some_and(|t| !t.is_empty()),
        "dashboard title"
    );

    let vars = dash["templating"]["list"].as_array().expect("template variables");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    let ds = var("datasource").expect("a `datasource` variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let pop = var("pop").expect("a `pop` variable");
    assert_eq!(pop["type"], "query");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(
            v["datasource"]["uid"], "${datasource}",
            "variable {} queries through the datasource variable",
            v["name"]
        );
    }

    let known = known_metrics();
    let all = panels(&dash);
    let queries: Vec<_> = all.iter().filter(|p| p["type"] != "row").collect();
    assert!(queries.len() >= 8, "{} panels", queries.len());
    let mut ids = HashSet::new();
    for p in &all {
        let title = p["title"].as_str().unwrap_or_default();
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?} has no id"));
        assert!(ids.insert(id), "panel id {id} ({title:?}) is not unique");
        assert!(p["gridPos"].is_object(), "panel {title:?} has a gridPos");
    }
    for p in queries {
        let title = p["title"].as_str().unwrap_or_default();
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title:?} uses the datasource variable"
        );
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title:?} has targets"));
        assert!(!targets.is_empty(), "panel {title:?} has targets");
        let mut refs = HashSet::new();
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title:?}: target without expr"));
            assert!(
                refs.insert(t["refId"].as_str().unwrap_or_default()),
                "{title:?}: refIds unique"
            );
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{title:?}: target datasource"
            );
            let used = metric_tokens(expr);
            assert!(!used.is_empty(), "{title:?}: `{expr}` queries no Detour metric");
            assert_known(&format!("panel {title:?}"), &used, &known);
            if used.iter().any(|m| !m.starts_with("detour_cp_")) {
                assert!(
                    expr.contains("pop=~\"$pop\""),
                    "{title:?}: `{expr}` filters by $pop"
                );
            }
        }
    }
}

#[test]
fn the_metric_name_check_knows_real_names_and_catches_invented_ones() {
    let known = known_metrics();
    for real in [
        "detour_path_state",
        "detour_request_duration_seconds",
        "detour_config_reloads_total",
        "detour_cp_requests_total",
        "detour_cp_request_duration_seconds",
    ] {
        assert!(known.contains(real), "{real} in {known:?}");
    }
    let used = metric_tokens(
        "histogram_quantile(0.99, sum by (le) (rate(detour_cp_http_request_duration_seconds_bucket[5m]))) \
         and detour:config_reload_last_timestamp_seconds and detour_path_state",
    );
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        ["detour_cp_http_request_duration_seconds", "detour_path_state"]
    );
    assert!(!known.contains("detour_cp_http_request_duration_seconds"));
}

/// `GET path` over HTTP/1.0, so that the body is not chunked.
async fn get_unchunked(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `POST path` with a JSON body over HTTP/1.1; the status code.
async fn post_json(addr: &str, path: &str, body: &serde_json::Value) -> std::io::Result<u16> {
    let body = body.to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))
}

/// The example Alertmanager config: `amtool check-config`, routing by
/// severity (`amtool config routes test`), and its inhibitions on a real
/// Alertmanager (Debian's `prometheus-alertmanager`, on loopback, no
/// cluster): one dead PoP pages once, not once per path; a control plane
/// that nobody can reach silences every PoP's path alerts; a certificate's
/// page supersedes its warning.
#[tokio::test]
async fn alertmanager_example_routes_by_severity_and_inhibits_the_echoes() {
    if !have("amtool", "Alertmanager config checks").await
        || !have("prometheus-alertmanager", "Alertmanager inhibition test").await
    {
        return;
    }
    let config = repo().join("config/alertmanager/alertmanager.yml");
    let check = run(Command::new("amtool").arg("check-config").arg(&config)).await;
    assert!(check.status.success(), "amtool check-config: {}", text(&check));
    for (labels, receiver) in [
        (
            ["severity=critical", "alertname=DetourAllPathsDown", "pop=blr"],
            "pager",
        ),
        (
            ["severity=warning", "alertname=DetourPathDown", "pop=blr"],
            "chat",
        ),
        (
            [
                "severity=critical",
                "alertname=DetourCallRecordsLost",
                "job=detour-control-plane",
            ],
            "pager",
        ),
    ] {
        let out = run(Command::new("amtool")
            .args(["config", "routes", "test"])
            .arg(format!("--config.file={}", config.display()))
            .args(labels))
        .await;
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            receiver,
            "{labels:?}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("alertmanager.log");
    let _am: Child = Command::new("prometheus-alertmanager")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", dir.path().display()))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--cluster.listen-address=")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("alertmanager.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus-alertmanager");
    wait_status(&addr, "/-/ready", 200, Duration::from_secs(20), &log).await;

    let alert = |labels: serde_json::Value| serde_json::json!({"labels": labels});
    let post = |alerts: serde_json::Value| {
        let addr = addr.clone();
        async move {
            let status = post_json(&addr, "/api/v2/alerts", &alerts).await.unwrap();
            assert_eq!(status, 200);
        }
    };
    // Which of the alerts now firing are inhibited, by name and PoP.
    let inhibited = || {
        let addr = addr.clone();
        async move {
            let (status, body) = get_unchunked(&addr, "/api/v2/alerts").await.unwrap();
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let mut out: Vec<(String, String, bool)> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|a| {
                    let l = &a["labels"];
                    let key = l["pop"].as_str().or(l["cert"].as_str()).unwrap_or("-");
                    let by = a["status"]["inhibitedBy"]
                        .as_array()
                        .is_some_and(|b| !b.is_empty());
                    (l["alertname"].as_str().unwrap().to_owned(), key.to_owned(), by)
                })
                .collect();
            out.sort();
            out
        }
    };
    post(serde_json::json!([
        alert(serde_json::json!({"alertname": "DetourAllPathsDown", "severity": "critical", "pop": "blr", "instance": "blr:9090"})),
        alert(serde_json::json!({"alertname": "DetourPathDown", "severity": "warning", "pop": "blr", "path": "direct", "instance": "blr:9090"})),
        alert(serde_json::json!({"alertname": "DetourPathDown", "severity": "warning", "pop": "blr", "path": "via:maa", "instance": "blr:9090"})),
        alert(serde_json::json!({"alertname": "DetourPathDown", "severity": "warning", "pop": "maa", "path": "direct", "instance": "maa:9090"})),
        alert(serde_json::json!({"alertname": "DetourCertificateExpiresSoon", "severity": "critical", "instance": "del:9090", "cert": "identity", "subject": "CN=del"})),
        alert(serde_json::json!({"alertname": "DetourCertificateExpiring", "severity": "warning", "instance": "del:9090", "cert": "identity", "subject": "CN=del"})),
    ]))
    .await;
    let s = |a: &str, k: &str, b: bool| (a.to_owned(), k.to_owned(), b);
    assert_eq!(
        inhibited().await,
        vec![
            s("DetourAllPathsDown", "blr", false),
            s("DetourCertificateExpiresSoon", "identity", false),
            s("DetourCertificateExpiring", "identity", true),
            s("DetourPathDown", "blr", true),
            s("DetourPathDown", "blr", true),
            s("DetourPathDown", "maa", false),
        ],
        "one dead PoP pages once; another PoP's path still alerts"
    );

    // Nobody reaches the control plane: every PoP's path alerts are echoes.
    post(serde_json::json!([alert(
        serde_json::json!({"alertname": "DetourControlPlaneDown", "severity": "critical", "job": "detour-control-plane"})
    )]))
    .await;
    let now = inhibited().await;
    assert!(now.contains(&s("DetourPathDown", "maa", true)), "{now:?}");
    assert!(now.contains(&s("DetourAllPathsDown", "blr", true)), "{now:?}");
    assert!(now.contains(&s("DetourControlPlaneDown", "-", false)), "{now:?}");
}

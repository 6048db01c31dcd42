//! Restarts and upgrades of the agent under steady call traffic, from a
//! plain keep-alive client that never sends a request twice (so a connection
//! refused, or a kept-alive connection closed under a request, is a failed
//! request):
//! - five upgrades in a row by `detour-agent run --takeover`, alternating
//!   with a copy of the binary that reports another version;
//! - five restarts with the listening sockets held the way systemd's
//!   `detour-agent.socket` holds them (`LISTEN_FDS`);
//! - three upgrades while blr's uplink is blackholed: the new agent sends no
//!   request to `direct`, the old one's health snapshot says it is down.
//!
//! In the first two, one request in ten takes 300 ms at the control plane,
//! so requests are in flight at every handover.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use detour_lab::fleet::{Fleet, counter_sum};
use detour_lab::link::Fault;
use detour_lab::load::{Call, CallClient, CallResult, SMALL_CALL, steady};
use detour_lab::mock_cp::MockCp;
use detour_lab::process::{Proc, free_port, loopback, wait_listening};
use tokio::time::Instant;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn agent_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_detour-lab")).with_file_name("detour-agent");
    assert!(bin.exists(), "build the agent first: cargo build -p detour-agent");
    bin
}

/// A copy of `bin` that reports another version (the same length, so the
/// binary's layout is untouched): what an upgrade installs.
fn other_version(bin: &Path, dir: &Path) -> (PathBuf, String) {
    let mut next = VERSION.to_owned();
    let last = next.pop().unwrap();
    next.push(if last == '9' { '8' } else { '9' });
    let mut bytes = std::fs::read(bin).unwrap();
    let mut patched = 0;
    let mut i = 0;
    while let Some(at) = bytes[i..]
        .windows(VERSION.len())
        .position(|w| w == VERSION.as_bytes())
    {
        bytes[i + at..i + at + VERSION.len()].copy_from_slice(next.as_bytes());
        patched += 1;
        i += at + VERSION.len();
    }
    assert!(patched > 0, "the version string is not in {}", bin.display());
    let path = dir.join("detour-agent-next");
    std::fs::write(&path, bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    (path, next)
}

fn write_config(dir: &Path, cp: SocketAddr, local: u16, admin: u16) -> PathBuf {
    std::fs::write(dir.join("peers.toml"), "").unwrap();
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "pop = \"blr\"\n[listen]\nlocal = \"127.0.0.1:{local}\"\nrelay = \"off\"\nadmin = \"127.0.0.1:{admin}\"\n\
             [control_plane]\nurl = \"http://{cp}\"\nreport_interval = \"off\"\n\
             [health]\ninterval = \"200ms\"\n[peers]\nfile = \"peers.toml\"\n[upgrade]\ndir = \"run\"\n"
        ),
    )
    .unwrap();
    path
}

/// Starts `bin` with `args`, its log appended to `log`.
fn spawn(cmd: &mut Command, log: &Path) -> Proc {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = cmd
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap();
    Proc(child)
}

/// Waits (at most 20 s) for `p` to exit; its exit code.
async fn exited(p: &mut Proc, log: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "the old agent did not exit:\n{}",
            tail(log)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The version `detour_build_info` reports on `admin`, with the pid of the
/// process answering (`process_id` is not a metric, so the version is what
/// tells two builds apart).
async fn version_at(admin: SocketAddr) -> Option<String> {
    let r = CallClient::new(Duration::from_secs(1))
        .send(
            http::Method::GET,
            &format!("http://{admin}/metrics"),
            &[],
            bytes::Bytes::new(),
        )
        .await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let line = text.lines().find(|l| l.starts_with("detour_build_info{"))?;
    let v = line.split("version=\"").nth(1)?;
    Some(v.split('"').next()?.to_owned())
}

async fn wait_version(admin: SocketAddr, want: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while version_at(admin).await.as_deref() != Some(want) {
        assert!(
            Instant::now() < deadline,
            "version {want} never answered:\n{}",
            tail(log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 50 requests/s to `local` for `secs` from a client that never retries;
/// with `slow`, one in ten takes 300 ms at the control plane.
fn load(local: SocketAddr, secs: u64, slow: bool) -> tokio::task::JoinHandle<Vec<CallResult>> {
    tokio::spawn(async move {
        let client = CallClient::strict(Duration::from_secs(3));
        steady(
            &client,
            &format!("http://{local}"),
            50,
            Duration::from_secs(secs),
            |n| {
                if slow && n % 10 == 0 {
                    Call::post("/slow/300", "{}")
                } else {
                    Call::post("/v1/calls", SMALL_CALL)
                }
            },
        )
        .await
    })
}

fn assert_none_failed(results: &[CallResult], what: &str, log: &str) {
    let failed: Vec<&CallResult> = results.iter().filter(|r| !r.ok()).collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed, first: {:?}\n{log}",
        failed.len(),
        results.len(),
        failed.first()
    );
    assert!(results.len() >= 500, "{what}: only {} requests", results.len());
    let slow = results
        .iter()
        .filter(|r| r.latency > Duration::from_millis(250))
        .count();
    eprintln!(
        "{what}: {} requests, none failed; p99 {:?}, {slow} over 250 ms",
        results.len(),
        p99(results)
    );
}

fn p99(results: &[CallResult]) -> Duration {
    let mut l: Vec<Duration> = results.iter().map(|r| r.latency).collect();
    l.sort();
    l[(l.len() * 99 / 100).min(l.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_takeovers_by_a_new_binary_fail_and_refuse_nothing() {
    let cp = MockCp::start(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (local, admin) = (free_port().unwrap(), free_port().unwrap());
    let config = write_config(dir.path(), cp.addr, local, admin);
    let log = dir.path().join("agent.log");
    let (old_bin, new_bin) = (agent_bin(), other_version(&agent_bin(), dir.path()));
    let run = |bin: &Path, takeover: bool| {
        let mut cmd = Command::new(bin);
        cmd.arg("run").arg("--config").arg(&config);
        if takeover {
            cmd.arg("--takeover");
        }
        spawn(&mut cmd, &log)
    };
    let mut current = run(&old_bin, false);
    wait_listening(loopback(local)).await.unwrap();
    wait_version(loopback(admin), VERSION, &log).await;

    let traffic = load(loopback(local), 16, true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..5 {
        let (bin, version) = if i % 2 == 0 {
            (new_bin.0.as_path(), new_bin.1.as_str())
        } else {
            (old_bin.as_path(), VERSION)
        };
        let mut next = run(bin, true);
        assert_eq!(
            exited(&mut current, &log).await,
            0,
            "the old agent exits cleanly:\n{}",
            tail(&log)
        );
        wait_version(loopback(admin), version, &log).await;
        current = next;
        next = run(bin, false); // a plain start beside a running agent must fail, not steal
        assert_ne!(
            exited(&mut next, &log).await,
            0,
            "a second agent bound the same ports"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let results = traffic.await.unwrap();
    assert_none_failed(&results, "five takeovers", &tail(&log));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("path health taken from the previous process")
            .count(),
        5,
        "every new process started from its predecessor's health snapshot:\n{}",
        tail(&log)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_socket_activated_restarts_fail_and_refuse_nothing() {
    let cp = MockCp::start(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The sockets as `detour-agent.socket` holds them: bound and listening
    // before the service starts, open across its restarts.
    let local_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (local, admin) = (local_l.local_addr().unwrap(), admin_l.local_addr().unwrap());
    let config = write_config(dir.path(), cp.addr, local.port(), admin.port());
    let log = dir.path().join("agent.log");
    let bin = agent_bin();
    // What systemd does for a socket-activated service: the sockets from
    // fd 3 on, LISTEN_FDS their count, LISTEN_PID the service's pid.
    let start = || {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$ LISTEN_FDS=2 exec "$0" "$@""#)
            .arg(&bin)
            .arg("run")
            .arg("--config")
            .arg(&config);
        cmd.fd_mappings(vec![
            FdMapping {
                parent_fd: OwnedFd::from(local_l.try_clone().unwrap()),
                child_fd: 3,
            },
            FdMapping {
                parent_fd: OwnedFd::from(admin_l.try_clone().unwrap()),
                child_fd: 4,
            },
        ])
        .unwrap();
        spawn(&mut cmd, &log)
    };
    let mut current = start();
    wait_version(admin, VERSION, &log).await;
    let traffic = load(local, 16, true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..5 {
        // systemctl restart: SIGTERM, wait for the exit, start again.
        let pid = current.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        assert_eq!(exited(&mut current, &log).await, 0, "{}", tail(&log));
        current = start();
        wait_version(admin, VERSION, &log).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let results = traffic.await.unwrap();
    assert_none_failed(&results, "five socket-activated restarts", &tail(&log));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("listening on an inherited socket").count(),
        12,
        "every start used systemd's sockets:\n{}",
        tail(&log)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_during_an_outage_keep_to_the_peer_from_the_first_request() {
    let mut fleet = Fleet::start(Default::default()).await.unwrap();
    fleet.pop("blr").uplink.set(Fault::Blackhole);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = fleet
            .pop("blr")
            .agent()
            .shared
            .forwarder
            .runtime()
            .health
            .snapshot();
        let direct_down = snap
            .by_name("direct")
            .is_some_and(|p| p.state == detour_wire::PathState::Down);
        if direct_down && snap.active().is_some_and(|p| p.name.starts_with("via:")) {
            break;
        }
        assert!(Instant::now() < deadline, "blr never left its blackholed uplink");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Fast requests only: a slow answer is hedged onto every path, the
    // down one last, which is no decision of the new agent's.
    let traffic = load(fleet.pop("blr").agent().local_addr, 12, false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut drains = Vec::new();
    for _ in 0..3 {
        drains.push(fleet.hand_over("blr").await.unwrap());
        let agent = fleet.pop("blr").agent().clone();
        // The new agent's very first requests, before any probe of its own
        // has come back: only the snapshot can tell it where not to go.
        let client = CallClient::strict(Duration::from_secs(3));
        let url = format!("http://{}/v1/calls", agent.local_addr);
        let first = futures_util::future::join_all((0..10).map(|_| {
            client.send(
                http::Method::POST,
                &url,
                &[],
                bytes::Bytes::from_static(SMALL_CALL.as_bytes()),
            )
        }))
        .await;
        assert!(first.iter().all(CallResult::ok), "{first:?}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            agent
                .shared
                .metrics
                .requests
                .with_label_values(&["via:maa", "ok"])
                .get()
                + agent
                    .shared
                    .metrics
                    .requests
                    .with_label_values(&["via:del", "ok"])
                    .get()
                > 50,
            "the new agent carried the traffic"
        );
        assert_eq!(
            counter_sum(&agent, "detour_attempts_total", "path", "direct"),
            0,
            "the new agent sent requests to the uplink its predecessor knew was down"
        );
    }
    for d in drains {
        d.await.unwrap();
    }
    let results = traffic.await.unwrap();
    assert_none_failed(&results, "three upgrades during an outage", "");
    assert!(
        results
            .iter()
            .all(|r| r.path.as_deref().is_some_and(|p| p.starts_with("via:")))
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_upgraded_while_blr_relays_through_it_fails_nothing_on_blr() {
    let mut fleet = Fleet::start(Default::default()).await.unwrap();
    // blr off its uplink and onto maa, the one peer it may use.
    fleet.write_peers("blr", &["del"]).unwrap();
    fleet.pop("blr").uplink.set(Fault::Blackhole);
    fleet
        .wait_active("blr", "via:maa", Duration::from_secs(10))
        .await
        .unwrap();
    // One request in ten is slow, so requests are in flight through maa's
    // relay at every handover.
    let traffic = load(fleet.pop("blr").agent().local_addr, 12, true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let blr = fleet.pop("blr").agent().clone();
    let switches = blr.shared.metrics.path_switches.get();
    let m = &blr.shared.metrics;
    let failed_attempts = || {
        m.attempts
            .with_label_values(&["via:maa", "first", "failed"])
            .get()
            + m.attempts
                .with_label_values(&["via:maa", "retry", "failed"])
                .get()
            + m.attempts
                .with_label_values(&["via:maa", "hedge", "failed"])
                .get()
    };
    let failed_before = failed_attempts();
    let mut drains = Vec::new();
    for _ in 0..3 {
        let started = tokio::time::Instant::now();
        let drain = fleet.hand_over("maa").await.unwrap();
        drains.push(tokio::spawn(async move {
            drain.await.unwrap();
            started.elapsed()
        }));
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let mut took = Vec::new();
    for d in drains {
        took.push(d.await.unwrap());
    }
    let results = traffic.await.unwrap();
    assert_none_failed(&results, "three upgrades of the peer blr relays through", "");
    // Drained, not cut: maa's relay said it was draining on every tunnel,
    // blr moved new requests to fresh tunnels (to the new process) at once,
    // finished those in flight on the old ones and closed them, so no
    // attempt through maa failed and each old process was gone long before
    // its drain time (11 s) ran out.
    assert_eq!(
        m.path_pool_renewals.with_label_values(&["via:maa"]).get(),
        3,
        "blr heard maa drain once per upgrade"
    );
    assert_eq!(
        failed_attempts(),
        failed_before,
        "an attempt through maa failed: a tunnel was cut"
    );
    assert!(
        took.iter().all(|t| *t < Duration::from_secs(5)),
        "an old maa process waited for its tunnels until the drain time: {took:?}"
    );
    // A tunnel closed by a planned restart is no failure of the path: the
    // requests on it were answered on a new one, so via:maa stayed up.
    assert_eq!(
        blr.shared.metrics.path_switches.get(),
        switches,
        "blr moved off via:maa while maa was upgraded"
    );
    let state = blr.shared.forwarder.runtime().health.snapshot();
    assert_eq!(
        state.by_name("via:maa").map(|p| p.state),
        Some(detour_wire::PathState::Up)
    );
    fleet.shutdown().await;
}

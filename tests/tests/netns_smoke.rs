//! Failover on the real kernel network: the fleet in Linux network
//! namespaces, the control plane behind an "internet" bridge, faults from
//! nftables on blr's uplink (a blackhole, then `numgen random` packet loss).
//! Root only: without root, `ip` or `nft` it prints SKIPPED and why, and with
//! DETOUR_REQUIRE_NETNS=1 (CI) it fails instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use detour_lab::ns::NsFleet;

fn skip() -> bool {
    match detour_lab::ns::unavailable() {
        None => false,
        Some(why) => {
            assert!(
                std::env::var("DETOUR_REQUIRE_NETNS").as_deref() != Ok("1"),
                "netns suite required but cannot run: {why}"
            );
            eprintln!("SKIPPED: network-namespace suite: {why}");
            true
        }
    }
}

fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_detour-lab"))
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(
        dir.join("detour-agent").exists(),
        "build the agent first: cargo build -p detour-agent"
    );
    dir
}

/// Starts `detour-lab load` inside blr's namespace: `rate` calls/s for
/// `seconds`, 2 s client timeout, plus `extra` arguments.
fn load_with(fleet: &NsFleet, bins: &Path, seconds: u32, rate: u32, extra: &[&str]) -> std::process::Child {
    Command::new("ip")
        .args(["netns", "exec", &fleet.ns("blr")])
        .arg(bins.join("detour-lab"))
        .args(["load", "--url", "http://127.0.0.1:8080", "--timeout", "2s"])
        .args(["--rate", &rate.to_string(), "--duration", &format!("{seconds}s")])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn load(fleet: &NsFleet, bins: &Path, seconds: u32) -> std::process::Child {
    load_with(fleet, bins, seconds, 50, &[])
}

fn summary(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| panic!("load printed: {text}"))
}

fn active(fleet: &NsFleet, bins: &Path) -> String {
    let out = fleet
        .exec("blr", &bins.join("detour-agent"), &["status", "--json"])
        .unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v["active_path"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

async fn wait_active(
    fleet: &NsFleet,
    bins: &Path,
    want: impl Fn(&str) -> bool,
    within: Duration,
) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        let a = active(fleet, bins);
        if want(&a) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "blr's active path is {a:?} after {within:?}\n{}",
            fleet.log("blr")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_then_packet_loss_on_the_kernel_network_fail_no_request() {
    if skip() {
        return;
    }
    let bins = bin_dir();
    let fleet = NsFleet::start(&bins).unwrap();
    for (pop, _) in detour_lab::ns::POPS {
        fleet
            .wait_ready(pop, &bins, Duration::from_secs(20))
            .await
            .unwrap();
    }

    // Blackhole: every packet on blr's uplink dropped, both ways.
    let traffic = load(&fleet, &bins, 12);
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet.uplink_loss("blr", 100).unwrap();
    let moved = wait_active(&fleet, &bins, |a| a.starts_with("via:"), Duration::from_secs(3)).await;
    assert!(
        moved < Duration::from_secs(1),
        "rerouted within 1 s (took {moved:?})"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    fleet.heal("blr").unwrap();
    wait_active(&fleet, &bins, |a| a == "direct", Duration::from_secs(10)).await;
    let s = summary(traffic);
    assert_eq!(s["failed"], 0, "blackhole: {s}");
    assert_eq!(s["requests"], 600, "{s}");

    // 10% then 30% packet loss from nftables `numgen random`.
    for percent in [10, 30] {
        // A lossy path is trusted again only after a clean run; start from direct.
        wait_active(&fleet, &bins, |a| a == "direct", Duration::from_secs(45)).await;
        let traffic = load(&fleet, &bins, 10);
        tokio::time::sleep(Duration::from_secs(2)).await;
        fleet.uplink_loss("blr", percent).unwrap();
        let left = wait_active(&fleet, &bins, |a| a.starts_with("via:"), Duration::from_secs(8)).await;
        eprintln!("{percent}% loss: left direct after {left:?}");
        assert!(
            left < Duration::from_secs(5),
            "{percent}% loss: left the lossy path within 5 s (took {left:?})\n{}",
            fleet.log("blr")
        );
        let s = summary(traffic);
        fleet.heal("blr").unwrap();
        assert_eq!(s["failed"], 0, "{percent}% loss: {s}");
        assert!(s["p99_ms"].as_f64().unwrap() < 1000.0, "{percent}% loss: {s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_mid_traffic_fails_nothing_and_is_used_again_after_restart() {
    if skip() {
        return;
    }
    let bins = bin_dir();
    let mut fleet = NsFleet::start(&bins).unwrap();
    for (pop, _) in detour_lab::ns::POPS {
        fleet
            .wait_ready(pop, &bins, Duration::from_secs(20))
            .await
            .unwrap();
    }
    // blr relies on its peers.
    fleet.uplink_loss("blr", 100).unwrap();
    wait_active(&fleet, &bins, |a| a.starts_with("via:"), Duration::from_secs(3)).await;
    let victim = active(&fleet, &bins).trim_start_matches("via:").to_owned();
    let traffic = load(&fleet, &bins, 10);
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet.kill(&victim);
    let other = wait_active(
        &fleet,
        &bins,
        |a| a.starts_with("via:") && a != format!("via:{victim}"),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        other < Duration::from_secs(1),
        "moved off the dead peer within 1 s ({other:?})"
    );
    let s = summary(traffic);
    assert_eq!(s["failed"], 0, "peer {victim} killed: {s}");
    // Restarted, the peer's path comes back up in blr's table.
    fleet.restart(&victim, &bins).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = fleet
            .exec("blr", &bins.join("detour-agent"), &["status", "--json"])
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let up = v["paths"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["path"] == format!("via:{victim}") && p["state"] == "up")
        });
        if up {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "via:{victim} up again after restart: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `openssl s_client` in `ns` against `target`, sending `input`; returns stdout.
fn s_client(fleet: &NsFleet, ns: &str, target: &str, extra: &[String], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &fleet.ns(ns),
            "timeout",
            "5",
            "openssl",
            "s_client",
            "-quiet",
            "-connect",
            target,
            "-servername",
            "blr",
        ])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl is installed (apt-get install openssl)");
    let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_refuses_strangers_and_other_targets_inside_the_namespaces() {
    if skip() {
        return;
    }
    let bins = bin_dir();
    let fleet = NsFleet::start(&bins).unwrap();
    fleet
        .wait_ready("blr", &bins, Duration::from_secs(20))
        .await
        .unwrap();
    let relay = NsFleet::relay("blr").to_string();
    let certs = fleet.dir().join("certs");
    let connect = |target: &str| format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    // A client without a fleet certificate gets no tunnel at all.
    let stranger = s_client(
        &fleet,
        "maa",
        &relay,
        &[],
        &connect(&format!("{}:443", detour_lab::fleet::CP_HOST)),
    );
    assert!(
        !stranger.contains("200"),
        "no tunnel without a client certificate: {stranger:?}"
    );
    // A fleet member may not tunnel to anything but the control plane.
    let member: Vec<String> = [
        "-cert".to_owned(),
        certs.join("maa.pem").display().to_string(),
        "-key".to_owned(),
        certs.join("maa.key").display().to_string(),
        "-CAfile".to_owned(),
        certs.join("ca.pem").display().to_string(),
    ]
    .into();
    for target in ["10.202.0.13:4443", "10.201.0.100:22", "10.201.0.100:443"] {
        let answer = s_client(&fleet, "maa", &relay, &member, &connect(target));
        assert!(answer.starts_with("HTTP/1.1 403"), "CONNECT {target}: {answer:?}");
    }
    let ok = s_client(
        &fleet,
        "maa",
        &relay,
        &member,
        &connect(&format!("{}:443", detour_lab::fleet::CP_HOST)),
    );
    assert!(
        ok.starts_with("HTTP/1.1 200"),
        "the control plane itself is allowed: {ok:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermittent_loss_does_not_flap_and_heals_back_to_direct() {
    if skip() {
        return;
    }
    let bins = bin_dir();
    let fleet = NsFleet::start(&bins).unwrap();
    for (pop, _) in detour_lab::ns::POPS {
        fleet
            .wait_ready(pop, &bins, Duration::from_secs(20))
            .await
            .unwrap();
    }
    wait_active(&fleet, &bins, |a| a == "direct", Duration::from_secs(10)).await;

    // 30% loss on blr's uplink in bursts: 3 s lossy, 3 s clean, five times,
    // under steady load; the active path is sampled every 100 ms.
    // The load outlasts the bursts by 31 s, so the move back to direct
    // happens under traffic too.
    let traffic = load(&fleet, &bins, 62);
    let mut seen: Vec<String> = Vec::new();
    let sample = |seen: &mut Vec<String>| {
        let a = active(&fleet, &bins);
        if !a.is_empty() && seen.last() != Some(&a) {
            seen.push(a);
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..5 {
        fleet.uplink_loss("blr", 30).unwrap();
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < until {
            sample(&mut seen);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        fleet.heal("blr").unwrap();
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < until {
            sample(&mut seen);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // `seen` is the sequence of distinct active paths: direct, then off it
    // once and never back while the loss kept recurring (a lossy path is
    // trusted again only after a clean run).
    assert_eq!(seen.first().map(String::as_str), Some("direct"), "{seen:?}");
    assert!(
        seen.iter().skip(1).all(|a| a.starts_with("via:")),
        "went back to the lossy direct path during intermittent loss: {seen:?}"
    );
    assert!(seen.len() <= 3, "flapping: {seen:?}");
    // Loss gone for good: back on direct after the clean run, and nothing
    // failed at any point.
    let back = wait_active(&fleet, &bins, |a| a == "direct", Duration::from_secs(45)).await;
    eprintln!("intermittent loss: active paths {seen:?}; back on direct {back:?} after the last burst");
    let s = summary(traffic);
    assert_eq!(s["failed"], 0, "intermittent loss: {s}");
}

/// Scenario 5: the real control plane (`detour-control-plane serve`, SQLite,
/// HTTPS) in its own namespace, restarted twice under traffic from blr:
/// gracefully (SIGTERM, like `systemctl restart`) and by a crash (SIGKILL).
/// The call handler retries with each call's Idempotency-Key: every call ends
/// up answered and stored exactly once, and the only failure it ever sees in
/// between is a clear 503 problem+json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restarts_lose_and_duplicate_no_call() {
    if skip() {
        return;
    }
    let bins = bin_dir();
    assert!(
        bins.join("detour-control-plane").exists(),
        "build the control plane first: cargo build -p detour-control-plane"
    );
    let route = r#"{"prefix":"+91","trunk":"t1","pop":"blr"}"#;
    let mut fleet = NsFleet::start_with_control_plane(&bins, &[("india", route)])
        .await
        .unwrap();
    for (pop, _) in detour_lab::ns::POPS {
        fleet
            .wait_ready(pop, &bins, Duration::from_secs(20))
            .await
            .unwrap();
    }

    // 30 calls/s for 12 s, each retried with its key for up to 20 s.
    let traffic = load_with(
        &fleet,
        &bins,
        12,
        30,
        &[
            "--retry-for",
            "20s",
            "--body",
            r#"{"caller":"+919876543210","destination":"+918041234567"}"#,
        ],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet
        .restart_control_plane(&bins, true, Duration::from_secs(2))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    fleet
        .restart_control_plane(&bins, false, Duration::from_secs(1))
        .await
        .unwrap();
    let s = summary(traffic);

    let calls = s["calls"].as_u64().unwrap();
    assert_eq!(calls, 360, "{s}");
    assert_eq!(
        s["failed"],
        0,
        "every call answered in the end: {s}\n{}",
        fleet.log("cp")
    );
    assert!(
        s["retried"].as_u64().unwrap() > 0,
        "the restarts were not felt; the test proves nothing: {s}"
    );
    let by_status = s["failures_by_status"].as_object().unwrap();
    assert!(
        by_status.keys().all(|k| k == "503"),
        "while the control plane was away the only failure is 503: {s}"
    );
    for example in s["failure_examples"]["503"].as_array().unwrap() {
        assert!(
            example.as_str().unwrap().contains("\"status\":503"),
            "a 503 that is not problem+json: {example}"
        );
    }

    // None lost, none duplicated: one stored call per call, and every call id
    // the handler was given is stored.
    let ids: Vec<&str> = s["call_ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(ids.len() as u64, calls, "{s}");
    let config = fleet.control_plane_config().unwrap();
    detour_lab::fleet::check_stored_once(&config, &ids).await.unwrap();
    eprintln!(
        "control plane restarted twice (SIGTERM, SIGKILL): {calls} calls, {} retried, {by_status:?} in between, each stored once",
        s["retried"]
    );
}

/// The soak in short (`detour-lab bench soak` runs it for an hour): 200
/// calls/s through blr for 150 s with a fault every 22 s (blackhole, 10%
/// loss, a peer restart, 30% loss, a control-plane restart, a peer-list
/// edit). Every call is answered, and blr's agent does not grow: file
/// descriptors and tokio tasks end where they started after warm-up, give
/// or take what one set of pooled connections and tunnels holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_fails_no_call_and_leaks_nothing() {
    if skip() {
        return;
    }
    let bins = bin_dir();
    let r = detour_lab::soak::run(&bins, Duration::from_secs(150), Duration::from_secs(22))
        .await
        .unwrap();
    eprintln!("soak: {}", serde_json::to_string(&r).unwrap());
    assert_eq!(r.faults.len(), 6, "{r:?}");
    assert!(r.calls >= 29_000, "{r:?}");
    assert_eq!(r.failed, 0, "{r:?}");
    // Connections come and go with the faults (a peer's tunnel, the control
    // plane's connections); what must not happen is growth with every fault.
    assert!(r.end.fds <= r.start.fds + 8, "fds grew: {r:?}");
    assert!(r.end.tasks <= r.start.tasks + 16, "tasks grew: {r:?}");
}

/// Scenario 7: two control-plane regions on the kernel network, both real
/// `detour-control-plane serve` processes on one Postgres (each region in
/// its own namespace, the database in a third). Under 50 calls/s from blr
/// the primary region is killed (SIGKILL): no request fails, blr is on the
/// secondary within a second, and back on `direct@mumbai` after the primary
/// returns and its paths rise. Then blr's uplink to the primary alone is
/// blackholed: blr goes through a peer to the primary, not direct to the
/// secondary. Every call is stored once in the shared database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_on_postgres_the_primary_killed_fails_nothing() {
    if skip() {
        return;
    }
    if let Some(why) = detour_lab::pg::unavailable() {
        assert!(
            std::env::var("DETOUR_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "the two-region suite needs Postgres: {why}"
        );
        eprintln!("SKIPPED: two regions on Postgres: {why}");
        return;
    }
    let bins = bin_dir();
    let route = r#"{"prefix":"+91","trunk":"t1","pop":"blr"}"#;
    let mut fleet = NsFleet::start_two_regions(&bins, &[("india", route)])
        .await
        .unwrap();
    for (pop, _) in detour_lab::ns::POPS {
        fleet
            .wait_ready(pop, &bins, Duration::from_secs(30))
            .await
            .unwrap();
    }
    assert_eq!(active(&fleet, &bins), "direct@mumbai");

    // 50 calls/s for 14 s, no retries by the call handler; the primary is
    // killed 3 s in and started again 4 s later.
    let body = r#"{"caller":"+919876543210","destination":"+918041234567"}"#;
    let traffic = load_with(&fleet, &bins, 14, 50, &["--body", body, "--call-ids"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet.stop_control_plane("cp");
    let moved = wait_active(
        &fleet,
        &bins,
        |a| a.ends_with("@singapore"),
        Duration::from_secs(5),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    fleet.spawn_control_plane("cp", &bins).unwrap();
    // A path that lost exchanges while the new process started (a debug
    // build on a busy machine) waits for a clean run (30 s) before it is
    // trusted again; usually it rises at once.
    let back = wait_active(&fleet, &bins, |a| a == "direct@mumbai", Duration::from_secs(45)).await;
    let s = summary(traffic);
    eprintln!(
        "primary killed: on the secondary after {moved:?}; back on direct@mumbai {back:?} after its restart; {} requests, {} failed, p99 {} ms, by path {}",
        s["requests"], s["failed"], s["p99_ms"], s["by_path"]
    );
    assert_eq!(s["requests"], 700, "{s}");
    assert_eq!(
        s["failed"],
        0,
        "{s}\nblr:\n{}\ncp2:\n{}",
        fleet.log("blr"),
        fleet.log("cp2")
    );
    assert!(
        moved < Duration::from_secs(1),
        "on the secondary within 1 s (took {moved:?})"
    );
    // The return waits for the primary's paths to rise (`health.rise` = 3
    // good probes, 200 ms apart here), not for its first answer.
    assert!(back >= Duration::from_millis(400), "returned after only {back:?}");
    let by_path = s["by_path"].as_object().unwrap();
    let on = |region: &str| -> u64 {
        by_path
            .iter()
            .filter(|(p, _)| p.ends_with(region))
            .map(|(_, n)| n.as_u64().unwrap())
            .sum()
    };
    assert!(
        on("@singapore") > 100,
        "the secondary carried the outage: {by_path:?}"
    );
    assert!(on("@mumbai") > 100, "the primary carried the rest: {by_path:?}");

    // blr's own uplink to the primary blackholed, the primary up: through a
    // peer to the primary, not direct to the secondary.
    fleet.uplink_block("blr", detour_lab::ns::CP_ADDR).unwrap();
    wait_active(
        &fleet,
        &bins,
        |a| a.starts_with("via:") && a.ends_with("@mumbai"),
        Duration::from_secs(5),
    )
    .await;
    let more = summary(load_with(&fleet, &bins, 3, 50, &["--body", body, "--call-ids"]));
    fleet.heal("blr").unwrap();
    assert_eq!(more["failed"], 0, "{more}");
    for (path, _) in more["by_path"].as_object().unwrap() {
        assert!(
            path.starts_with("via:") && path.ends_with("@mumbai"),
            "went over {path}: {more}"
        );
    }

    // One database: every answered call stored exactly once.
    let mut ids: Vec<&str> = Vec::new();
    for run in [&s, &more] {
        ids.extend(
            run["call_ids"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str()),
        );
    }
    assert_eq!(ids.len(), 850);
    let config = fleet.control_plane_config().unwrap();
    detour_lab::fleet::check_stored_once(&config, &ids).await.unwrap();
}

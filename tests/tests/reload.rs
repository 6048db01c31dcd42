//! Live peer-list edits: the agent applies a valid edit within a second,
//! drains removed or disabled peers without failing requests, and keeps
//! running on its old config when an edit is broken.

use std::time::Duration;

use bytes::Bytes;
use detour_lab::fleet::{Fleet, FleetOptions};
use detour_lab::link::Fault;
use detour_lab::load::{Call, CallClient, steady};
use detour_wire::PathState;
use http::Method;
use tokio::time::Instant;

fn peers_path(fleet: &Fleet, pop: &str) -> std::path::PathBuf {
    fleet.dir.path().join(pop).join("peers.toml")
}

fn peer_entry(fleet: &Fleet, name: &str, extra: &str) -> String {
    format!(
        "[[peer]]\nname = \"{name}\"\nrelay = \"{}\"\n{extra}\n",
        fleet.pop(name).relay_addr.unwrap()
    )
}

/// Writes like an editor that saves to a temporary file and renames it over.
fn save_by_rename(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("toml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn paths_of(fleet: &Fleet, pop: &str) -> Vec<(String, PathState, bool)> {
    let snap = fleet
        .pop(pop)
        .agent()
        .shared
        .forwarder
        .runtime()
        .health
        .snapshot();
    snap.paths
        .iter()
        .map(|p| (p.name.to_string(), p.state, p.enabled))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_disabling_and_removing_peers_applies_live_without_failures() {
    let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    let blr = fleet.pop("blr");
    let metrics = &blr.agent().shared.metrics;
    // Start blr with maa only.
    save_by_rename(&peers_path(&fleet, "blr"), &peer_entry(&fleet, "maa", ""));
    wait_for("del removed", Duration::from_secs(2), || {
        paths_of(&fleet, "blr").len() == 2
    })
    .await;

    // Add del: it starts probing and comes up.
    let ok_before = metrics.config_reloads.with_label_values(&["ok"]).get();
    let started = Instant::now();
    save_by_rename(
        &peers_path(&fleet, "blr"),
        &(peer_entry(&fleet, "maa", "") + &peer_entry(&fleet, "del", "")),
    );
    wait_for("via:del up", Duration::from_secs(3), || {
        paths_of(&fleet, "blr")
            .iter()
            .any(|(n, s, _)| n == "via:del" && *s == PathState::Up)
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "applied within a second or so: {:?}",
        started.elapsed()
    );
    assert!(metrics.config_reloads.with_label_values(&["ok"]).get() > ok_before);

    // Traffic on the peers: blr's uplink is down.
    blr.uplink.set(Fault::Blackhole);
    fleet
        .wait_active("blr", "via:", Duration::from_secs(2))
        .await
        .unwrap();
    let active = blr
        .agent()
        .shared
        .forwarder
        .runtime()
        .health
        .snapshot()
        .active()
        .unwrap()
        .name
        .to_string();
    let (victim, keep) = if active == "via:maa" {
        ("maa", "del")
    } else {
        ("del", "maa")
    };

    // Under load: disable the active peer, then remove it.
    let client = CallClient::default();
    let url = blr.local_url();
    let load = steady(&client, &url, 50, Duration::from_secs(4), |n| {
        Call::post("/v1/calls", &format!("{{\"n\":{n}}}"))
    });
    let edits = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        save_by_rename(
            &peers_path(&fleet, "blr"),
            &(peer_entry(&fleet, victim, "enabled = false") + &peer_entry(&fleet, keep, "")),
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        save_by_rename(&peers_path(&fleet, "blr"), &peer_entry(&fleet, keep, ""));
    };
    let (results, ()) = tokio::join!(load, edits);
    let failed: Vec<_> = results.iter().filter(|r| !r.ok()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        results.len(),
        failed.first()
    );
    let late = results.iter().filter(|r| r.at > Duration::from_millis(2000));
    for r in late {
        assert_ne!(
            r.path.as_deref(),
            Some(format!("via:{victim}").as_str()),
            "a disabled peer gets no new requests"
        );
    }
    let paths = paths_of(&fleet, "blr");
    assert!(
        paths.iter().all(|(n, _, _)| n != &format!("via:{victim}")),
        "{paths:?}"
    );
    // Its path series are gone from /metrics, not frozen at their last values.
    let metrics = String::from_utf8(blr.agent().shared.metrics.render()).unwrap();
    let gauges = [
        "detour_path_state",
        "detour_path_rtt_seconds",
        "detour_path_loss_ratio",
        "detour_path_retransmit_ratio",
        "detour_active_path",
        "detour_path_segments_total",
    ];
    let stale: Vec<&str> = metrics
        .lines()
        .filter(|l| gauges.iter().any(|g| l.starts_with(&format!("{g}{{"))))
        .filter(|l| l.contains(&format!("path=\"via:{victim}\"")))
        .collect();
    assert!(
        stale.is_empty(),
        "removed peer's gauges still in /metrics: {stale:?}"
    );
    // Counters keep their history (the requests it carried stay counted).
    assert!(metrics.contains(&format!("path=\"via:{victim}\"")));
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_edit_keeps_the_old_config_and_says_why_until_fixed() {
    let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    let blr = fleet.pop("blr");
    let shared = &blr.agent().shared;
    let errors_before = shared.metrics.config_reloads.with_label_values(&["error"]).get();
    let good = std::fs::read_to_string(peers_path(&fleet, "blr")).unwrap();
    // An editor writing in several steps: first a half-written file...
    std::fs::write(
        peers_path(&fleet, "blr"),
        "[[peer]]\nname = \"maa\"\nrelay = \"nowhere\"\n",
    )
    .unwrap();
    wait_for("the error is visible", Duration::from_secs(3), || {
        shared.config_error.load().is_some()
    })
    .await;
    let err = shared.config_error.load().as_ref().unwrap().to_string();
    assert!(err.contains("peers.toml:3:9: peer.relay"), "{err}");
    let errors_seen = shared.metrics.config_reloads.with_label_values(&["error"]).get();
    assert!(errors_seen > errors_before);
    assert_eq!(shared.metrics.config_last_reload_successful.get(), 0);
    let last_success = shared.metrics.config_last_reload_success_timestamp.get();
    assert!(last_success > 1.7e9, "loaded at start: {last_success}");
    // One bad edit is one rejected reload: the agent's own reads of the file
    // must not trigger another reload (that loop flooded logs and counters).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let errors_later = shared.metrics.config_reloads.with_label_values(&["error"]).get();
    assert!(
        errors_later <= errors_seen + 1,
        "one edit, {} rejected reloads",
        errors_later - errors_before
    );
    let ok_before_fix = shared.metrics.config_reloads.with_label_values(&["ok"]).get();
    // ...the agent still runs on the old peers and serves.
    assert_eq!(paths_of(&fleet, "blr").len(), 3);
    let r = CallClient::default()
        .send(
            Method::POST,
            &format!("{}/v1/calls", blr.local_url()),
            &[("x-detour-pin", "via:del")],
            Bytes::from("{}"),
        )
        .await;
    assert_eq!(r.status, Some(200));
    let status = detour_agent::admin::report(shared);
    assert!(
        status
            .config_error
            .as_deref()
            .is_some_and(|e| e.contains("peer.relay"))
    );
    // Fixing the file clears the error.
    std::fs::write(peers_path(&fleet, "blr"), &good).unwrap();
    wait_for("the error clears", Duration::from_secs(3), || {
        shared.config_error.load().is_none()
    })
    .await;
    // Back to exactly the running config: nothing to swap, but the reload
    // succeeded, so alerts on the last reload's result clear.
    assert!(shared.metrics.config_reloads.with_label_values(&["ok"]).get() > ok_before_fix);
    assert_eq!(shared.metrics.config_last_reload_successful.get(), 1);
    assert!(shared.metrics.config_last_reload_success_timestamp.get() > last_success);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_cannot_be_applied_live_are_reported_as_needing_a_restart() {
    let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    let blr = fleet.pop("blr");
    let shared = &blr.agent().shared;
    let path = blr.config_path.clone();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("admin = \"127.0.0.1:0\"", "admin = \"127.0.0.1:1\""),
    )
    .unwrap();
    wait_for("needs restart reported", Duration::from_secs(3), || {
        shared.config_error.load().is_some()
    })
    .await;
    let err = shared.config_error.load().as_ref().unwrap().to_string();
    assert!(err.contains("needs restart") && err.contains("listen"), "{err}");
    // Nothing of it was applied; the agent still serves on its old listeners.
    let r = CallClient::default()
        .send(
            Method::GET,
            &format!("{}/v1/x", blr.local_url()),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, Some(200));
    fleet.shutdown().await;
}

/// A CA file whose contents change under the same name (a rotated bundle) is
/// read again by a reload and used for new connections. With a CA that did
/// not sign the control plane's certificate every path fails (TLS to the
/// control plane is end to end, through peers too) and the 503 says why;
/// with the right one back, calls are answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_rewritten_in_place_is_read_again_on_reload() {
    let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    fleet.wait_all_up(Duration::from_secs(10)).await.unwrap();
    let blr = fleet.pop("blr");
    let agent = blr.agent();
    let dir = fleet.dir.path().join("blr");
    let cp_ca = dir.join("cp-ca.pem");
    let good = std::fs::read(fleet.dir.path().join("certs").join("ca.pem")).unwrap();
    std::fs::write(&cp_ca, &good).unwrap();
    let text = std::fs::read_to_string(&blr.config_path).unwrap();
    // The first `ca =` is [control_plane]'s; [tls] keeps the fleet CA.
    save_by_rename(
        &blr.config_path,
        &text.replacen("ca = \"../certs/ca.pem\"", "ca = \"cp-ca.pem\"", 1),
    );
    let runtime = || agent.shared.forwarder.runtime();
    wait_for("blr reads cp-ca.pem", Duration::from_secs(3), || {
        runtime()
            .config
            .control_plane
            .ca
            .as_ref()
            .is_some_and(|p| p.ends_with("cp-ca.pem"))
    })
    .await;
    let direct_is = |want: PathState| {
        paths_of(&fleet, "blr")
            .iter()
            .any(|(n, s, _)| n == "direct" && *s == want)
    };
    wait_for("direct up", Duration::from_secs(10), || direct_is(PathState::Up)).await;

    // Same name, another CA inside.
    let other = tempfile::tempdir().unwrap();
    detour_agent::pki::init(other.path()).unwrap();
    std::fs::copy(other.path().join("ca.pem"), &cp_ca).unwrap();
    let files = runtime().config.files.clone();
    detour_agent::reload::reload_now(agent, &files);
    wait_for(
        "direct down with a CA that did not sign the control plane",
        Duration::from_secs(5),
        || direct_is(PathState::Down),
    )
    .await;
    let call = || async {
        CallClient::default()
            .send(
                Method::POST,
                &format!("{}/v1/calls", blr.local_url()),
                &[],
                Bytes::from_static(b"{}"),
            )
            .await
    };
    let r = call().await;
    let body = String::from_utf8_lossy(&r.body).to_string();
    assert_eq!(r.status, Some(503), "{body}");
    assert!(body.contains("invalid peer certificate"), "{body}");

    // The right CA back in the same file.
    std::fs::write(&cp_ca, &good).unwrap();
    detour_agent::reload::reload_now(agent, &files);
    wait_for("direct up again", Duration::from_secs(15), || {
        direct_is(PathState::Up)
    })
    .await;
    let r = call().await;
    assert_eq!(r.status, Some(200), "{:?}", String::from_utf8_lossy(&r.body));
    fleet.shutdown().await;
}

/// The first certificate of a PEM file, as DER.
fn first_cert(path: &std::path::Path) -> Vec<u8> {
    detour_agent::tls::load_certs(path).unwrap()[0].to_vec()
}

/// The certificate `relay` presents to maa on a new handshake.
async fn served_cert(certs: &std::path::Path, relay: std::net::SocketAddr) -> Vec<u8> {
    let maa = detour_agent::tls::TlsMaterial::load(
        &certs.join("ca.pem"),
        &certs.join("maa.pem"),
        &certs.join("maa.key"),
        None,
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(maa.peer_client_config().unwrap());
    let tcp = tokio::net::TcpStream::connect(relay).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("blr").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A rotated certificate and key (same PoP, same fleet CA) are applied by a
/// reload, no restart: blr's relay presents the new certificate on new
/// handshakes, and blr's tunnels through maa, set up again with it, carry
/// calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_applied_by_a_reload() {
    let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    fleet.wait_all_up(Duration::from_secs(10)).await.unwrap();
    let certs = fleet.dir.path().join("certs");
    let blr = fleet.pop("blr");
    let agent = blr.agent();
    let relay = blr.relay_addr.unwrap();
    let before = served_cert(&certs, relay).await;
    assert_eq!(before, first_cert(&certs.join("blr.pem")));

    detour_agent::pki::issue(&certs, "blr", &certs, 30).unwrap();
    let rotated = first_cert(&certs.join("blr.pem"));
    assert_ne!(before, rotated, "pki issue made a new certificate");
    let files = agent.shared.forwarder.runtime().config.files.clone();
    let r = detour_agent::reload::reload_now(agent, &files);
    assert_eq!(r, detour_agent::reload::ReloadResult::Applied);
    assert!(agent.shared.config_error.load().is_none());
    assert_eq!(
        served_cert(&certs, relay).await,
        rotated,
        "the relay presents the new certificate"
    );
    // Its expiry is what the metric says now, and the only identity series.
    let der = rustls::pki_types::CertificateDer::from(rotated.clone());
    let (subject, not_after) = detour_agent::tls::cert_expiry(&der).unwrap();
    let text = String::from_utf8(agent.shared.metrics.render()).unwrap();
    let identity: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("detour_certificate_expiry_timestamp_seconds{cert=\"identity\""))
        .collect();
    assert_eq!(identity.len(), 1, "{identity:?}");
    assert!(identity[0].contains(&subject), "{identity:?}");
    assert!(
        identity[0].ends_with(&format!(" {not_after}")),
        "{identity:?} vs {not_after}"
    );
    assert!(
        text.contains("detour_certificate_expiry_timestamp_seconds{cert=\"fleet_ca\""),
        "{text}"
    );

    let r = CallClient::default()
        .send(
            Method::POST,
            &format!("{}/v1/calls", blr.local_url()),
            &[("x-detour-pin", "via:maa")],
            Bytes::from_static(b"{}"),
        )
        .await;
    assert_eq!(r.status, Some(200), "{:?}", String::from_utf8_lossy(&r.body));
    fleet.shutdown().await;
}

/// A PoP with two telephony servers: blr lists two agents of maa under names
/// of their own (`pop = "maa"`, the name their certificates carry; the lab
/// has one maa agent, so both entries reach it, through two relay
/// addresses). Both paths come up and carry requests. A peer whose `pop`
/// does not match its certificate never comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_agents_of_one_pop_are_separate_paths() {
    let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    let maa = fleet.pop("maa").relay_addr.unwrap();
    // A second address for maa's relay: a link in front of it.
    let second = detour_lab::link::Link::start(maa).await.unwrap();
    let del = fleet.pop("del").relay_addr.unwrap();
    save_by_rename(
        &peers_path(&fleet, "blr"),
        &format!(
            "[[peer]]\nname = \"maa-1\"\npop = \"maa\"\nrelay = \"{maa}\"\n\n\
             [[peer]]\nname = \"maa-2\"\npop = \"maa\"\nrelay = \"{}\"\n\n\
             [[peer]]\nname = \"impostor\"\npop = \"maa\"\nrelay = \"{del}\"\n",
            second.addr
        ),
    );
    wait_for("via:maa-1 and via:maa-2 up", Duration::from_secs(10), || {
        let p = paths_of(&fleet, "blr");
        ["via:maa-1", "via:maa-2"]
            .iter()
            .all(|n| p.iter().any(|(name, s, _)| name == n && *s == PathState::Up))
    })
    .await;
    // del's relay presents del's certificate, not maa's.
    let p = paths_of(&fleet, "blr");
    assert!(
        p.iter()
            .any(|(n, s, _)| n == "via:impostor" && *s == PathState::Down),
        "{p:?}"
    );
    let client = CallClient::default();
    for pin in ["via:maa-1", "via:maa-2"] {
        let r = client
            .send(
                Method::POST,
                &format!("{}/v1/calls", fleet.pop("blr").local_url()),
                &[("x-detour-pin", pin)],
                Bytes::from_static(b"{}"),
            )
            .await;
        assert_eq!(r.status, Some(200), "{pin}: {r:?}");
        assert_eq!(r.path.as_deref(), Some(pin));
    }
    fleet.shutdown().await;
}

/// `detour-agent peer drain` without editing files: through blr's control
/// socket, with blr's own uplink blackholed (so every request goes through
/// a peer), maa is drained under load: no request fails, none goes through
/// maa after the drain, its path stays probed and says why in `/status`,
/// its series carry `detour_path_enabled 0`, `/readyz` is still ready. A
/// reload keeps the drain; an unknown peer is a clear 404; undrain brings
/// maa back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_drained_at_runtime_takes_no_requests_and_stays_drained_across_a_reload() {
    use detour_lab::link::Fault;
    let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    fleet.wait_all_up(Duration::from_secs(10)).await.unwrap();
    let blr = fleet.pop("blr");
    let agent = blr.agent();
    let socket = fleet.dir.path().join("blr").join("control.sock");
    blr.uplink.set(Fault::Blackhole);
    wait_for("blr on a peer", Duration::from_secs(5), || {
        paths_of(&fleet, "blr")
            .iter()
            .any(|(n, _, a)| *a && n.starts_with("via:"))
    })
    .await;

    let client = CallClient::default();
    let url = blr.local_url();
    let load = steady(&client, &url, 50, Duration::from_secs(4), |n| {
        Call::post("/v1/calls", &format!("{{\"n\":{n}}}"))
    });
    let drain = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (status, body) = detour_agent::control::call(&socket, Method::POST, "/peers/maa/drain")
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["changed"], true, "{body}");
        assert_eq!(v["peer"]["drained"], true, "{body}");
    };
    let (results, ()) = tokio::join!(load, drain);
    let failed: Vec<_> = results.iter().filter(|r| !r.ok()).collect();
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), failed.first());
    let late: Vec<_> = results
        .iter()
        .filter(|r| r.at > Duration::from_millis(1500))
        .filter(|r| r.path.as_deref() == Some("via:maa"))
        .collect();
    assert!(late.is_empty(), "requests through a drained peer: {late:?}");
    assert!(
        results.iter().any(|r| r.path.as_deref() == Some("via:del")),
        "del carried the traffic"
    );

    let check_drained = || {
        let report = detour_agent::admin::report(&agent.shared);
        let maa = report.paths.iter().find(|p| p.path == "via:maa").unwrap();
        assert!(
            maa.reason
                .as_deref()
                .is_some_and(|r| r.contains("drained at runtime")),
            "{maa:?}"
        );
        assert!(!maa.active);
        let text = String::from_utf8(agent.shared.metrics.render()).unwrap();
        assert!(
            text.contains("detour_path_enabled{endpoint=\"cp.detour.test\",path=\"via:maa\",pop=\"blr\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("detour_path_enabled{endpoint=\"cp.detour.test\",path=\"via:del\",pop=\"blr\"} 1")
        );
    };
    check_drained();
    let (status, _) = get_admin(agent, "/readyz").await;
    assert_eq!(status, 200, "ready while del carries the traffic");

    // A reload (a weight edited) keeps the drain.
    let ok_before = agent
        .shared
        .metrics
        .config_reloads
        .with_label_values(&["ok"])
        .get();
    save_by_rename(
        &peers_path(&fleet, "blr"),
        &(peer_entry(&fleet, "maa", "weight = 90") + &peer_entry(&fleet, "del", "")),
    );
    wait_for("the edit reloaded", Duration::from_secs(3), || {
        agent
            .shared
            .metrics
            .config_reloads
            .with_label_values(&["ok"])
            .get()
            > ok_before
    })
    .await;
    check_drained();
    let (status, body) = detour_agent::control::call(&socket, Method::GET, "/peers")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let peers: Vec<detour_agent::control::PeerControl> = serde_json::from_str(&body).unwrap();
    assert!(
        peers.iter().any(|p| p.name == "maa" && p.drained && p.enabled),
        "{body}"
    );

    // An unknown peer is a clear error, and changes nothing.
    let (status, body) = detour_agent::control::call(&socket, Method::POST, "/peers/pune/drain")
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no peer named `pune`"), "{body}");
    // A known resource with the wrong method: 405, and nothing changes.
    let (status, body) = detour_agent::control::call(&socket, Method::GET, "/peers/maa/undrain")
        .await
        .unwrap();
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("use POST"), "{body}");
    check_drained();

    // Undrained: maa takes requests again (del's relay goes away).
    let (status, body) = detour_agent::control::call(&socket, Method::POST, "/peers/maa/undrain")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // The same through the command an operator types, finding the socket
    // from the agent's config.
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_detour-lab"))
        .parent()
        .unwrap()
        .join("detour-agent");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(&bin)
            .args(["peer"])
            .args(args)
            .arg("--config")
            .arg(&blr.config_path)
            .output()
            .expect("run detour-agent peer");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = cli(&["drain", "del"]);
    assert!(ok && out.contains("del: drained"), "{out}");
    let (ok, out) = cli(&["list"]);
    assert!(ok, "{out}");
    let del_row = out
        .lines()
        .find(|l| l.trim_start().starts_with("del"))
        .unwrap_or_default();
    assert!(del_row.contains("drained"), "{out}");
    let (ok, out) = cli(&["undrain", "del"]);
    assert!(ok && out.contains("del: undrained"), "{out}");
    let (ok, out) = cli(&["drain", "pune"]);
    assert!(!ok && out.contains("no peer named `pune`"), "{out}");
    fleet.pop("del").uplink.set(Fault::Blackhole);
    wait_for("blr back on maa", Duration::from_secs(10), || {
        paths_of(&fleet, "blr")
            .iter()
            .any(|(n, _, a)| *a && n == "via:maa")
    })
    .await;
    fleet.shutdown().await;
}

/// `GET path` on an agent's admin listener: status and body.
async fn get_admin(agent: &detour_agent::agent::Agent, path: &str) -> (u16, String) {
    let r = CallClient::default()
        .send(
            Method::GET,
            &format!("http://{}{path}", agent.admin_addr),
            &[],
            Bytes::new(),
        )
        .await;
    (
        r.status.unwrap_or(0),
        String::from_utf8_lossy(&r.body).into_owned(),
    )
}

/// Copies `from` over `to` the way an install does (a temporary file
/// renamed over the old one), so a watcher never sees half a list.
fn install(from: &std::path::Path, to: &std::path::Path) {
    let tmp = to.with_extension("pem.new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// `pop`'s `/status` reason for `path`.
fn reason_of(fleet: &Fleet, pop: &str, path: &str) -> Option<String> {
    detour_agent::admin::report(&fleet.pop(pop).agent().shared)
        .paths
        .into_iter()
        .find(|p| p.path == path)
        .and_then(|p| p.reason)
}

fn path_is(fleet: &Fleet, pop: &str, path: &str, want: PathState) -> bool {
    paths_of(fleet, pop)
        .iter()
        .any(|(n, s, _)| n == path && *s == want)
}

/// The fleet CA's revocation list applies on the next handshake, no restart.
/// blr and del check a list (`[tls] crl`); maa's certificate is revoked and
/// the new list written where they read it, while blr's uplink is down and
/// its calls go through maa. Then blr's via:maa cannot be set up (maa's relay
/// certificate is revoked) and its calls move to del without one failing;
/// blr's and del's relays refuse maa's tunnels and close the ones it had
/// open (`detour_relay_rejected_total{reason="revoked"}`), and both sides'
/// `/status` say "revoked". A list without maa lets it back in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_pop_is_refused_on_the_next_handshake_and_a_list_without_it_lets_it_back() {
    let fleet = Fleet::start(FleetOptions::default()).await.unwrap();
    let certs = fleet.dir.path().join("certs");
    let ca_pem = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
    let ca_key = std::fs::read_to_string(certs.join("ca.key")).unwrap();
    let empty_list = |number| {
        detour_agent::pki::crl_pem(&ca_pem, &ca_key, &[], number, time::OffsetDateTime::now_utc()).unwrap()
    };
    let crl_of = |pop: &str| fleet.dir.path().join(pop).join("crl.pem");
    let crls_of = |pop: &str| {
        let rt = fleet.pop(pop).agent().shared.forwarder.runtime();
        rt.config.tls.as_ref().unwrap().crls.clone()
    };
    // blr and del check a list, empty for now: added by a reload.
    for pop in ["blr", "del"] {
        std::fs::write(crl_of(pop), empty_list(1)).unwrap();
        let p = fleet.pop(pop);
        let text = std::fs::read_to_string(&p.config_path).unwrap();
        let key = format!("key = \"../certs/{pop}.key\"\n");
        save_by_rename(
            &p.config_path,
            &text.replacen(&key, &format!("{key}crl = \"crl.pem\"\n"), 1),
        );
    }
    wait_for("blr and del read their lists", Duration::from_secs(3), || {
        crls_of("blr").len() == 1 && crls_of("del").len() == 1
    })
    .await;
    fleet.wait_all_up(Duration::from_secs(10)).await.unwrap();

    // blr's calls go through maa.
    let blr = fleet.pop("blr");
    save_by_rename(
        &peers_path(&fleet, "blr"),
        &(peer_entry(&fleet, "maa", "weight = 1000") + &peer_entry(&fleet, "del", "weight = 1")),
    );
    blr.uplink.set(Fault::Blackhole);
    fleet
        .wait_active("blr", "via:maa", Duration::from_secs(5))
        .await
        .unwrap();
    let revoked = |pop: &str| {
        detour_lab::fleet::counter_sum(
            fleet.pop(pop).agent(),
            "detour_relay_rejected_total",
            "reason",
            "revoked",
        )
    };
    assert_eq!((revoked("blr"), revoked("del")), (0, 0));

    let client = CallClient::default();
    let url = blr.local_url();
    let lists_before = (crls_of("blr"), crls_of("del"));
    let load = steady(&client, &url, 50, Duration::from_secs(5), |n| {
        Call::post("/v1/calls", &format!("{{\"n\":{n}}}"))
    });
    let revoke = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = detour_agent::pki::revoke(
            &certs,
            Some("maa"),
            None,
            detour_agent::pki::Reason::KeyCompromise,
        )
        .unwrap();
        assert_eq!(r.added.len(), 1, "{r:?}");
        for pop in ["blr", "del"] {
            install(&r.crl, &crl_of(pop));
        }
        let written = Instant::now();
        // The file watch applies it: no SIGHUP, no restart.
        wait_for("blr and del apply the new list", Duration::from_secs(3), || {
            crls_of("blr") != lists_before.0 && crls_of("del") != lists_before.1
        })
        .await;
        wait_for("blr's via:maa down", Duration::from_secs(5), || {
            path_is(&fleet, "blr", "via:maa", PathState::Down)
        })
        .await;
        written.elapsed()
    };
    let (results, down_after) = tokio::join!(load, revoke);
    eprintln!("blr's via:maa down {down_after:?} after the list was written");
    let failed: Vec<_> = results.iter().filter(|r| !r.ok()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        results.len(),
        failed.first()
    );
    let late: Vec<_> = results
        .iter()
        .filter(|r| r.at > Duration::from_secs(4))
        .map(|r| r.path.as_deref())
        .collect();
    assert!(
        !late.is_empty() && late.iter().all(|p| *p == Some("via:del")),
        "calls move to del: {late:?}"
    );

    // blr cannot set up via:maa, and says why.
    let why = reason_of(&fleet, "blr", "via:maa").unwrap_or_default();
    assert!(why.contains("maa's relay: its certificate is revoked"), "{why}");
    assert!(path_is(&fleet, "blr", "via:del", PathState::Up));
    let pinned = |pin: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .send(
                    Method::POST,
                    &format!("{url}/v1/calls"),
                    &[("x-detour-pin", pin)],
                    Bytes::from_static(b"{}"),
                )
                .await
        }
    };
    let r = pinned("via:maa").await;
    let body = String::from_utf8_lossy(&r.body).to_lowercase();
    assert_eq!(r.status, Some(503), "{body}");
    assert!(body.contains("revoked"), "{body}");
    assert_eq!(pinned("via:del").await.status, Some(200));

    // blr's and del's relays refuse maa, whose open tunnels to del were
    // closed (maa's via:del would stay up on them otherwise).
    wait_for("maa's via:del down", Duration::from_secs(5), || {
        path_is(&fleet, "maa", "via:del", PathState::Down)
    })
    .await;
    wait_for(
        "both relays count revoked handshakes",
        Duration::from_secs(5),
        || revoked("blr") > 0 && revoked("del") > 0,
    )
    .await;
    let why = reason_of(&fleet, "maa", "via:del").unwrap_or_default();
    assert!(
        why.contains("del's relay: it refused this agent's certificate as revoked"),
        "{why}"
    );
    // maa itself keeps its own uplink.
    let r = CallClient::default()
        .send(
            Method::POST,
            &format!("{}/v1/calls", fleet.pop("maa").local_url()),
            &[],
            Bytes::from_static(b"{}"),
        )
        .await;
    assert_eq!(r.status, Some(200));

    // A list without maa (a newer one): maa is back on the next handshakes.
    for pop in ["blr", "del"] {
        let tmp = crl_of(pop).with_extension("pem.new");
        std::fs::write(&tmp, empty_list(100)).unwrap();
        std::fs::rename(&tmp, crl_of(pop)).unwrap();
    }
    wait_for(
        "blr's via:maa and maa's via:del up",
        Duration::from_secs(15),
        || {
            path_is(&fleet, "blr", "via:maa", PathState::Up)
                && path_is(&fleet, "maa", "via:del", PathState::Up)
        },
    )
    .await;
    assert_eq!(pinned("via:maa").await.status, Some(200));
    assert_eq!(reason_of(&fleet, "blr", "via:maa"), None);
    blr.uplink.set(Fault::Pass);
    fleet.shutdown().await;
}

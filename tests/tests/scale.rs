//! An agent with a hundred peers: the config validates, the agent starts
//! with a path per peer, and serves requests on `direct` while every peer's
//! relay is unreachable; the peers out of watch are probed every
//! `health.standby_interval`, none forgotten. (`detour-lab bench scale` measures what such an
//! agent costs.)

use std::time::Duration;

use bytes::Bytes;
use detour_agent::Agent;
use detour_agent::config::AgentConfig;
use detour_lab::fleet::init_crypto;
use detour_lab::load::CallClient;
use detour_lab::mock_cp::MockCp;
use detour_lab::process::free_ports;
use detour_wire::PathState;
use http::Method;
use tokio::time::Instant;

const PEERS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_hundred_peers_starts_and_serves_on_direct() {
    init_crypto();
    let cp = MockCp::start(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    detour_agent::pki::init(&certs).unwrap();
    detour_agent::pki::issue(&certs, "hub", &certs, 30).unwrap();
    let hub = dir.path().join("hub");
    std::fs::create_dir_all(&hub).unwrap();
    // Peers whose relays nobody listens on: their paths are down, and
    // nothing about them may keep the agent from serving on `direct`.
    let mut peers = String::new();
    for (i, port) in free_ports(PEERS).unwrap().into_iter().enumerate() {
        peers.push_str(&format!(
            "[[peer]]\nname = \"s{i:03}\"\nrelay = \"127.0.0.1:{port}\"\n\n"
        ));
    }
    std::fs::write(hub.join("peers.toml"), peers).unwrap();
    std::fs::write(
        hub.join("agent.toml"),
        format!(
            "pop = \"hub\"\n[listen]\nlocal = \"127.0.0.1:0\"\nrelay = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [control_plane]\nurl = \"http://cp.detour.test\"\naddresses = [\"{}\"]\n\
             [tls]\nca = \"../certs/ca.pem\"\ncert = \"../certs/hub.pem\"\nkey = \"../certs/hub.key\"\n\
             [health]\ninterval = \"200ms\"\nstandby_interval = \"2s\"\n[peers]\nfile = \"peers.toml\"\n[upgrade]\ndir = \"run\"\n",
            cp.addr
        ),
    )
    .unwrap();

    let config = AgentConfig::load(&hub.join("agent.toml")).expect("a config with 100 peers is valid");
    let agent = Agent::start(config).await.expect("the agent starts");
    let snapshot = || agent.shared.forwarder.runtime().health.snapshot();
    assert_eq!(snapshot().paths.len(), PEERS + 1, "a path per peer, and direct");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = snapshot();
        let direct_up = snap
            .paths
            .iter()
            .any(|p| &*p.name == "direct" && p.state == PathState::Up);
        if direct_up {
            break;
        }
        assert!(Instant::now() < deadline, "direct up within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = CallClient::new(Duration::from_secs(2));
    for n in 0..5 {
        let r = client
            .send(
                Method::POST,
                &format!("http://{}/v1/calls", agent.local_addr),
                &[("content-type", "application/json")],
                Bytes::from(format!("{{\"n\":{n}}}")),
            )
            .await;
        assert!(r.ok(), "request {n}: {r:?}");
        assert_eq!(r.path.as_deref(), Some("direct"), "request {n}");
    }

    // Probes: `direct` and the first `health.watched` (4) of the ranking
    // every 200 ms, the other peers every 2 s, and none forgotten.
    let probes = |name: &str| {
        ["ok", "slow", "failed"]
            .iter()
            .map(|r| agent.shared.metrics.probes.with_label_values(&[name, r]).get())
            .sum::<u64>()
    };
    let names: Vec<String> = (0..PEERS).map(|i| format!("via:s{i:03}")).collect();
    let before: Vec<u64> = names.iter().map(|n| probes(n)).collect();
    let direct_before = probes("direct");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after: Vec<u64> = names.iter().map(|n| probes(n)).collect();
    let direct = probes("direct") - direct_before;
    let peers: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    // About 25; the margin is for a busy machine's late timers (out of
    // watch, direct would be probed 2 or 3 times).
    assert!(direct >= 15, "direct probed every 200 ms: {direct} probes in 5 s");
    let forgotten: Vec<&String> = names
        .iter()
        .zip(after.iter().zip(&before))
        .filter(|(_, (a, b))| a == b)
        .map(|(n, _)| n)
        .collect();
    assert!(
        forgotten.is_empty(),
        "every peer probed within 5 s: not {forgotten:?}"
    );
    // Every peer at the interval would be 2,500; four watched at the
    // interval and the rest every 2 s is about 100 + 240.
    assert!(
        peers <= 600,
        "peers out of watch probed every 2 s: {peers} probes in 5 s"
    );

    agent.shutdown(detour_agent::agent::Stop::HandedOver).await;
}

//! An agent with a hundred peers: the config validates, the agent starts
//! with a path per peer, and serves requests on `direct` while every peer's
//! relay is unreachable. (`detour-lab bench scale` measures what such an
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
             [health]\ninterval = \"200ms\"\n[peers]\nfile = \"peers.toml\"\n[upgrade]\ndir = \"run\"\n",
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
    agent.shutdown(detour_agent::agent::Stop::HandedOver).await;
}

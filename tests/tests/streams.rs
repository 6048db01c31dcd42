//! Streams (WebSockets) through the agent, against the real control plane's
//! echo (`GET /v1/streams/echo`): carried direct and through a peer, kept
//! through quiet spells longer than the ingress idle timeout, cut when the
//! path under them dies or is removed or the agent stops (so the call
//! handler reconnects at once, over a path that works), h2c refused, and a
//! handshake the control plane does not take answered as it is.

use std::time::Duration;

use detour_agent::Agent;
use detour_lab::fleet::{Fleet, FleetOptions};
use detour_lab::link::Fault;
use detour_lab::ws::{ECHO, Handshake, Stream, handshake, open_echo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const ECHO_WITHIN: Duration = Duration::from_secs(5);

async fn fleet(ingress: &str) -> Fleet {
    let mut opts = FleetOptions {
        real_cp: true,
        ..Default::default()
    };
    opts.extra.insert("ingress".into(), ingress.into());
    Fleet::start(opts).await.unwrap()
}

/// `detour_streams_total{path, outcome}` on `agent`.
fn streams(agent: &Agent, path: &str, outcome: &str) -> u64 {
    value(agent, "detour_streams_total", path, Some(outcome)).map_or(0, |v| v as u64)
}

/// `detour_streams_active{path}` on `agent`; `None` when the series is gone.
fn active(agent: &Agent, path: &str) -> Option<i64> {
    value(agent, "detour_streams_active", path, None).map(|v| v as i64)
}

fn value(agent: &Agent, name: &str, path: &str, outcome: Option<&str>) -> Option<f64> {
    agent
        .shared
        .metrics
        .registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .find(|m| {
            let has = |k: &str, v: &str| m.get_label().iter().any(|l| l.name() == k && l.value() == v);
            has("path", path) && outcome.is_none_or(|o| has("outcome", o))
        })
        .map(|m| match outcome {
            Some(_) => m.get_counter().get_value(),
            None => m.get_gauge().get_value(),
        })
}

/// Waits until `cond` holds, at most `within`.
async fn until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn hundred_round_trips(s: &mut Stream) {
    for i in 0..100 {
        let msg = if i % 2 == 0 {
            Message::text(format!("message {i}"))
        } else {
            Message::binary(vec![i as u8; 1 + i * 37])
        };
        s.echo(msg, ECHO_WITHIN).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_messages_round_trip_direct_and_via_a_peer() {
    // An idle timeout shorter than the quiet spell below: a stream is not
    // an idle kept-alive connection.
    let fleet = fleet("idle_timeout = \"1s\"\nheader_timeout = \"1s\"").await;
    let blr = fleet.pop("blr");
    let agent = blr.agent();

    let mut direct = open_echo(&blr.local_url(), Some("direct")).await.unwrap();
    assert_eq!(direct.path, "direct");
    hundred_round_trips(&mut direct).await;
    assert_eq!(active(agent, "direct"), Some(1));

    let mut via = open_echo(&blr.local_url(), Some("via:maa")).await.unwrap();
    assert_eq!(via.path, "via:maa");
    hundred_round_trips(&mut via).await;

    // Quiet for longer than the ingress idle and header timeouts.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    direct
        .echo(Message::text("after a quiet spell"), ECHO_WITHIN)
        .await
        .unwrap();
    via.echo(Message::text("after a quiet spell"), ECHO_WITHIN)
        .await
        .unwrap();

    direct.ws.close(None).await.unwrap();
    via.ws.close(None).await.unwrap();
    until(Duration::from_secs(5), "both streams counted closed", || {
        streams(agent, "direct", "closed") == 1 && streams(agent, "via:maa", "closed") == 1
    })
    .await;
    assert_eq!(streams(agent, "direct", "opened"), 1);
    assert_eq!(streams(agent, "via:maa", "opened"), 1);
    assert_eq!(active(agent, "direct"), Some(0));
    assert_eq!(active(agent, "via:maa"), Some(0));
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_uplink_closes_the_stream_and_the_reconnect_goes_via_a_peer() {
    let fleet = fleet("").await;
    let blr = fleet.pop("blr");
    let agent = blr.agent();
    let mut s = open_echo(&blr.local_url(), None).await.unwrap();
    assert_eq!(s.path, "direct", "the best path at handshake time");
    s.echo(Message::text("before the cut"), ECHO_WITHIN)
        .await
        .unwrap();

    blr.uplink.set(Fault::Blackhole);
    let cut = Instant::now();
    // Without the agent, the handler would wait on a socket that carries
    // nothing (a blackhole sends no FIN and no RST).
    s.closed(Duration::from_secs(10)).await.unwrap();
    let closed_after = cut.elapsed();
    let judged = agent.shared.forwarder.runtime().health.snapshot();
    assert_eq!(
        judged.by_name("direct").unwrap().state,
        detour_wire::PathState::Down,
        "closed because the path was judged down"
    );
    assert!(
        closed_after < Duration::from_secs(5),
        "the handler's side closed {closed_after:?} after the cut"
    );
    assert_eq!(streams(agent, "direct", "cut_path_down"), 1);

    let mut again = open_echo(&blr.local_url(), None).await.unwrap();
    assert!(again.path.starts_with("via:"), "reconnected over {}", again.path);
    again
        .echo(Message::text("after the cut"), ECHO_WITHIN)
        .await
        .unwrap();
    assert_eq!(active(agent, "direct"), Some(0));
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_peer_and_a_stopping_agent_close_their_streams() {
    let fleet = fleet("").await;
    let agent = fleet.pop("blr").agent().clone();
    let local = fleet.pop("blr").local_url();
    let mut via = open_echo(&local, Some("via:maa")).await.unwrap();
    via.echo(Message::text("hello"), ECHO_WITHIN).await.unwrap();
    // maa leaves blr's peer list (the file watcher reloads it).
    fleet.write_peers("blr", &["maa"]).unwrap();
    via.closed(Duration::from_secs(10)).await.unwrap();
    until(
        Duration::from_secs(5),
        "counted as removed, and a removed path leaves no series",
        || streams(&agent, "via:maa", "cut_path_removed") == 1 && active(&agent, "via:maa").is_none(),
    )
    .await;

    let mut direct = open_echo(&local, None).await.unwrap();
    direct.echo(Message::text("hello"), ECHO_WITHIN).await.unwrap();
    let stopped = Instant::now();
    let stop = tokio::spawn(async move { fleet.shutdown().await });
    direct.closed(Duration::from_secs(15)).await.unwrap();
    stop.await.unwrap();
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "the drain did not wait on the stream"
    );
    assert_eq!(streams(&agent, "direct", "cut_stopping"), 1);
}

/// Sends a raw request head to the agent and reads the answer to its end.
async fn raw(local: &str, head: &str) -> String {
    let mut tcp = TcpStream::connect(local.trim_start_matches("http://"))
        .await
        .unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out))
        .await
        .expect("the agent answers and closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_is_refused_and_other_answers_pass_through() {
    let fleet = fleet("").await;
    let local = fleet.pop("blr").local_url();

    let answer = raw(
        &local,
        "GET /v1/calls HTTP/1.1\r\nhost: agent\r\nconnection: Upgrade, HTTP2-Settings, close\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.contains("content-type: application/problem+json"),
        "{answer}"
    );
    assert!(answer.contains("h2c"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("x-detour-path"),
        "nothing was sent: {answer}"
    );

    // A handshake the control plane does not take: its answer, as it is.
    match handshake(&local, "/v1/no-such-stream", None).await.unwrap() {
        Handshake::Refused(r) => {
            assert_eq!(r.status(), 404);
            assert_eq!(r.headers()["x-detour-path"], "direct");
            // The control plane's own problem (the agent's have no X-Detour-Path).
            assert_eq!(r.headers()["content-type"], "application/problem+json");
        }
        Handshake::Open(s) => panic!("opened a stream on {}", s.path),
    }
    // The echo refuses a request that is no handshake, with its problem.
    let answer = raw(
        &local,
        &format!("GET {ECHO} HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 426 "), "{answer}");
    // An unknown pin is the agent's own 400, as for any request.
    match handshake(&local, ECHO, Some("via:nowhere")).await.unwrap() {
        Handshake::Refused(r) => assert_eq!(r.status(), 400),
        Handshake::Open(_) => panic!("opened a stream on an unknown path"),
    }
    fleet.shutdown().await;
}

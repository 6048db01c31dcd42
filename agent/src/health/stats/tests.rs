use std::time::Duration;

use proptest::prelude::*;

use detour_wire::PathState;
use tokio::time::Instant;

use super::*;
use crate::config::Health as HealthConfig;
use crate::health::{FailureKind, Outcome, PathInfo};
use crate::transport::Delta;

fn cfg() -> HealthConfig {
    HealthConfig {
        interval: Duration::from_millis(500),
        path: "/healthz".into(),
        timeout_min: Duration::from_millis(150),
        timeout_max: Duration::from_secs(1),
        rise: 3,
        fall: 2,
        degraded_loss: 0.05,
        window: 40,
        hold_down_min: Duration::from_secs(2),
        hold_down_max: Duration::from_secs(60),
        watched: 4,
        standby_interval: Duration::from_secs(5),
    }
}

fn stats() -> PathStats {
    PathStats::new(PathInfo {
        name: "direct".into(),
        direct: true,
        endpoint: "".into(),
        priority: 1,
        weight: 100,
        enabled: true,
        drained: false,
    })
}

const OK: Outcome = Outcome::Ok(Duration::from_millis(2));
const FAIL: Outcome = Outcome::Failed(FailureKind::Timeout);
/// An unambiguous failure: the connection broke.
const DEAD: Outcome = Outcome::Failed(FailureKind::Broken);

/// Feeds `outcome` every `every` for `for_`, advancing paused time.
async fn feed(
    s: &mut PathStats,
    epoch: Instant,
    outcome: impl Fn(u32) -> Outcome,
    every: Duration,
    for_: Duration,
) {
    let n = (for_.as_millis() / every.as_millis()) as u32;
    for i in 0..n {
        tokio::time::advance(every).await;
        s.record(outcome(i), Instant::now(), epoch, &cfg());
    }
}

/// A suspect path's probing for `for_`: a good probe every 50 ms (the
/// boosted rate) and, every 100 ms, the kernel's view of its connections
/// (4 segments sent and delivered, none again).
async fn probing(s: &mut PathStats, epoch: Instant, for_: Duration) -> Option<Duration> {
    let start = Instant::now();
    for i in 0..(for_.as_millis() / 50) as u32 {
        tokio::time::advance(Duration::from_millis(50)).await;
        s.record(OK, Instant::now(), epoch, &cfg());
        if i % 2 == 1 {
            s.record_transport(tick(4, 0, 4), Instant::now(), &cfg());
        }
        if s.state() == PathState::Up {
            return Some(Instant::now() - start);
        }
    }
    None
}

#[tokio::test(start_paused = true)]
async fn a_fresh_path_is_up_on_its_first_good_answer() {
    let epoch = Instant::now();
    let mut s = stats();
    assert_eq!(s.state(), PathState::Down);
    assert_eq!(s.record(OK, Instant::now(), epoch, &cfg()), Some(PathState::Up));
}

#[tokio::test(start_paused = true)]
async fn hard_failures_take_a_path_down_fast() {
    let epoch = Instant::now();
    let mut s = stats();
    s.record(OK, Instant::now(), epoch, &cfg());
    assert_eq!(
        s.record(DEAD, Instant::now(), epoch, &cfg()),
        None,
        "one failure is not enough"
    );
    assert_eq!(
        s.record(DEAD, Instant::now(), epoch, &cfg()),
        Some(PathState::Down)
    );
}

#[tokio::test(start_paused = true)]
async fn timeouts_in_a_row_take_a_path_down_only_when_nothing_answers_meanwhile() {
    let epoch = Instant::now();
    let mut s = stats();
    s.record(OK, Instant::now(), epoch, &cfg());
    // A lost segment stalls the connection: the requests on it time out
    // 150 ms after they were sent, 20 ms apart; the repair comes at 200 ms.
    tokio::time::advance(Duration::from_millis(150)).await;
    for _ in 0..3 {
        assert_eq!(s.record(FAIL, Instant::now(), epoch, &cfg()), None);
        tokio::time::advance(Duration::from_millis(20)).await;
    }
    s.record(
        Outcome::Answered(Duration::from_millis(200)),
        Instant::now(),
        epoch,
        &cfg(),
    );
    assert_eq!(s.state(), PathState::Up);
    // A blackhole: nothing answers again; down 300 ms after the last answer.
    let mut down = None;
    for i in 0..20 {
        tokio::time::advance(Duration::from_millis(20)).await;
        if i >= 7 && s.record(FAIL, Instant::now(), epoch, &cfg()) == Some(PathState::Down) {
            down = Some(i);
            break;
        }
    }
    assert_eq!(
        down,
        Some(14),
        "down at the first timeout 300 ms after the last answer"
    );
}

#[tokio::test(start_paused = true)]
async fn a_clean_outage_recovers_after_hold_down_and_rise() {
    let epoch = Instant::now();
    let mut s = stats();
    s.record(OK, Instant::now(), epoch, &cfg());
    feed(
        &mut s,
        epoch,
        |_| FAIL,
        Duration::from_millis(500),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(s.state(), PathState::Down);
    // Three good probes right after the outage: up (the first hold-down is 2 s +-20%,
    // which passed during the outage).
    feed(
        &mut s,
        epoch,
        |_| OK,
        Duration::from_millis(500),
        Duration::from_millis(1500),
    )
    .await;
    assert_eq!(s.state(), PathState::Up);
}

#[tokio::test(start_paused = true)]
async fn loss_greylists_a_path_and_it_needs_a_long_clean_run_to_return() {
    let epoch = Instant::now();
    let mut s = stats();
    feed(
        &mut s,
        epoch,
        |_| OK,
        Duration::from_millis(20),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(s.state(), PathState::Up);
    // 10% of exchanges stall, under load (50/s).
    feed(
        &mut s,
        epoch,
        |i| {
            if i % 10 == 0 {
                Outcome::Slow(Duration::from_millis(300))
            } else {
                OK
            }
        },
        Duration::from_millis(20),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(s.state(), PathState::Degraded);
    assert!(s.suspect(), "a path left for loss is probed harder");
    // The loss stops; only probes reach it now. 10 s of probes every 500 ms
    // prove nothing yet...
    feed(
        &mut s,
        epoch,
        |_| OK,
        Duration::from_millis(500),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(s.state(), PathState::Degraded);
    // ...the boosted probes do, in some 450 good exchanges.
    let took = probing(&mut s, epoch, Duration::from_secs(40)).await;
    assert!(took.is_some_and(|t| t >= Duration::from_secs(20)), "{took:?}");
    assert!(!s.suspect());
}

#[tokio::test(start_paused = true)]
async fn intermittent_loss_does_not_flap() {
    let epoch = Instant::now();
    let mut s = stats();
    feed(
        &mut s,
        epoch,
        |_| OK,
        Duration::from_millis(20),
        Duration::from_secs(2),
    )
    .await;
    let mut changes = 0;
    // On 3 s (25% of probes fail), off 3 s, for a minute; probes every 500 ms.
    for cycle in 0..10 {
        let _ = cycle;
        for i in 0..6u32 {
            tokio::time::advance(Duration::from_millis(500)).await;
            let o = if i % 2 == 0 { FAIL } else { OK };
            if s.record(o, Instant::now(), epoch, &cfg()).is_some() {
                changes += 1;
            }
        }
        for _ in 0..6 {
            tokio::time::advance(Duration::from_millis(500)).await;
            if s.record(OK, Instant::now(), epoch, &cfg()).is_some() {
                changes += 1;
            }
        }
    }
    assert!(
        changes <= 4,
        "state changed {changes} times in a minute of intermittent loss"
    );
    assert_ne!(
        s.state(),
        PathState::Up,
        "still not trusted while the loss keeps coming back"
    );
}

#[tokio::test(start_paused = true)]
async fn flapping_waits_longer_each_time() {
    let epoch = Instant::now();
    let mut s = stats();
    s.record(OK, Instant::now(), epoch, &cfg());
    let mut holds = Vec::new();
    for _ in 0..4 {
        s.record(DEAD, Instant::now(), epoch, &cfg());
        s.record(DEAD, Instant::now(), epoch, &cfg());
        assert_eq!(s.state(), PathState::Down);
        let fell = Instant::now();
        // Probe every 100 ms until up again.
        while s.state() != PathState::Up {
            tokio::time::advance(Duration::from_millis(100)).await;
            s.record(OK, Instant::now(), epoch, &cfg());
        }
        holds.push(Instant::now() - fell);
    }
    for w in holds.windows(2) {
        assert!(w[1] > w[0], "hold-down grows: {holds:?}");
    }
    assert!(holds[3] >= Duration::from_secs(10), "{holds:?}");
}

proptest! {
    #[test]
    fn score_prefers_lower_latency_less_loss_and_more_weight(rtt in 0.001f64..1.0, w in 1u32..1000) {
        let epoch = Instant::now();
        let mut a = PathStats::new(PathInfo { name: "via:a".into(), direct: false, endpoint: "".into(), priority: 1, weight: w, enabled: true, drained: false });
        let mut b = PathStats::new(PathInfo { name: "via:b".into(), direct: false, endpoint: "".into(), priority: 1, weight: w, enabled: true, drained: false });
        a.sample(Duration::from_secs_f64(rtt));
        b.sample(Duration::from_secs_f64(rtt * 2.0));
        a.state = PathState::Up;
        b.state = PathState::Up;
        let now = Instant::now();
        prop_assert!(a.score(now, epoch) < b.score(now, epoch));
        let mut heavy = PathStats::new(PathInfo { name: "via:h".into(), direct: false, endpoint: "".into(), priority: 1, weight: (w + 1).min(1000), enabled: true, drained: false });
        heavy.sample(Duration::from_secs_f64(rtt));
        heavy.state = PathState::Up;
        prop_assert!(heavy.score(now, epoch) <= a.score(now, epoch));
    }
}

#[tokio::test(start_paused = true)]
async fn a_lossy_path_that_falls_hard_still_needs_the_clean_run() {
    let epoch = Instant::now();
    let mut s = stats();
    feed(
        &mut s,
        epoch,
        |_| OK,
        Duration::from_millis(20),
        Duration::from_secs(2),
    )
    .await;
    // Loss: a failure, good answers, then two failures in a row.
    for o in [DEAD, OK, OK, DEAD, DEAD] {
        tokio::time::advance(Duration::from_millis(20)).await;
        s.record(o, Instant::now(), epoch, &cfg());
    }
    assert_eq!(s.state(), PathState::Down);
    // Clean probes after the hold-down are not enough...
    feed(
        &mut s,
        epoch,
        |_| OK,
        Duration::from_millis(500),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(s.state(), PathState::Degraded);
    // ...proof that its loss is negligible is.
    assert!(probing(&mut s, epoch, Duration::from_secs(40)).await.is_some());
}

/// One 100 ms sample of a path's connections: `sent` data segments, of which
/// `again` were repeats, `delivered` acknowledged.
fn tick(sent: u64, again: u64, delivered: u64) -> Delta {
    Delta {
        sent,
        repeats: again,
        delivered,
    }
}

/// Feeds one exchange outcome and one transport sample every 100 ms for
/// `for_`; `loss(i)` decides whether sample `i` carries a repeated segment.
async fn traffic(
    s: &mut PathStats,
    epoch: Instant,
    for_: Duration,
    loss: impl Fn(u32) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    for i in 0..(for_.as_millis() / 100) as u32 {
        tokio::time::advance(Duration::from_millis(100)).await;
        let now = Instant::now();
        s.record(Outcome::Answered(Duration::from_millis(2)), now, epoch, &cfg());
        let again = u64::from(loss(i));
        s.record_transport(tick(10, again, 10 - again), now, &cfg());
        if s.state() == PathState::Degraded {
            return Some(now - start);
        }
    }
    None
}

#[tokio::test(start_paused = true)]
async fn packets_sent_again_make_a_path_degraded_though_every_exchange_answers() {
    let epoch = Instant::now();
    let mut s = stats();
    s.record(OK, Instant::now(), epoch, &cfg());
    // Healthy: nothing sent twice, for a minute.
    assert_eq!(
        traffic(&mut s, epoch, Duration::from_secs(60), |_| false).await,
        None
    );
    // Then one segment in ten is sent again (10% loss repaired in time):
    // degraded after 8 samples (80 segments) of it.
    let took = traffic(&mut s, epoch, Duration::from_secs(5), |_| true).await;
    assert!(took.is_some_and(|t| t <= Duration::from_millis(1000)), "{took:?}");
    assert_eq!(s.reason(), Some("10% of packets sent again (8 of the last 80)"));
    assert!(s.loss(Instant::now(), epoch) >= 0.04);
}

#[tokio::test(start_paused = true)]
async fn a_few_repeats_on_a_quiet_or_busy_healthy_path_are_not_loss() {
    let epoch = Instant::now();
    let mut s = stats();
    s.record(OK, Instant::now(), epoch, &cfg());
    // Probes only (4 segments/s): two repeats in ten seconds are not enough.
    for i in 0..100u64 {
        tokio::time::advance(Duration::from_millis(100)).await;
        let again = u64::from(i == 10 || i == 60);
        let d = tick(u64::from(i % 3 == 0), again, 1);
        assert_eq!(s.record_transport(d, Instant::now(), &cfg()), None, "sample {i}");
    }
    assert_eq!(s.state(), PathState::Up);
    // Under traffic, 1% of segments sent again stays up.
    let mut s = stats();
    s.record(OK, Instant::now(), epoch, &cfg());
    assert_eq!(
        traffic(&mut s, epoch, Duration::from_secs(60), |i| i % 10 == 5).await,
        None
    );
    assert_eq!(s.state(), PathState::Up);
}

#[tokio::test(start_paused = true)]
async fn an_outage_is_judged_by_exchanges_not_by_its_retransmissions() {
    let epoch = Instant::now();
    let mut s = stats();
    s.record(OK, Instant::now(), epoch, &cfg());
    // Blackhole: the kernel resends into the void and nothing is delivered.
    for _ in 0..2 {
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(s.record_transport(tick(5, 5, 0), Instant::now(), &cfg()), None);
        s.record(FAIL, Instant::now(), epoch, &cfg());
    }
    assert_eq!(s.state(), PathState::Down);
    // Healed: the first answer arrives with the backlog resent just before.
    tokio::time::advance(Duration::from_secs(3)).await;
    s.record(OK, Instant::now(), epoch, &cfg());
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(s.record_transport(tick(20, 15, 20), Instant::now(), &cfg()), None);
    // A second connection's retransmission timer (backed off during the
    // outage) fires later and sends its backlog too.
    tokio::time::advance(Duration::from_millis(1200)).await;
    assert_eq!(s.record_transport(tick(8, 6, 8), Instant::now(), &cfg()), None);
    // A clean outage: up again after `rise` good answers, no 30 s clean run.
    feed(
        &mut s,
        epoch,
        |_| OK,
        Duration::from_millis(500),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(s.state(), PathState::Up, "{:?}", s.reason());
}

#[tokio::test(start_paused = true)]
async fn a_down_path_that_answers_while_losing_packets_must_show_a_clean_run() {
    let epoch = Instant::now();
    let mut s = stats();
    s.record(OK, Instant::now(), epoch, &cfg());
    // A burst of loss begins with two exchanges broken back to back: down,
    // looking like an outage.
    s.record(DEAD, Instant::now(), epoch, &cfg());
    s.record(DEAD, Instant::now(), epoch, &cfg());
    assert_eq!(s.state(), PathState::Down);
    // It answers again, but keeps losing packets.
    for i in 0..30u32 {
        tokio::time::advance(Duration::from_millis(100)).await;
        if i % 5 == 0 {
            s.record(OK, Instant::now(), epoch, &cfg());
        }
        s.record_transport(tick(4, 1, 3), Instant::now(), &cfg());
    }
    // Clean again: it must prove so before it is trusted.
    assert_eq!(probing(&mut s, epoch, Duration::from_secs(20)).await, None);
    assert!(
        probing(&mut s, epoch, Duration::from_secs(15)).await.is_some(),
        "{:?}",
        s.reason()
    );
}

#[tokio::test(start_paused = true)]
async fn a_path_left_for_packet_loss_returns_after_the_clean_run_and_proof() {
    let epoch = Instant::now();
    let mut s = stats();
    s.record(OK, Instant::now(), epoch, &cfg());
    assert!(
        traffic(&mut s, epoch, Duration::from_secs(5), |_| true)
            .await
            .is_some()
    );
    // Healed at once; traffic has moved away, only the boosted probes flow.
    // The proof takes ~23 s, so the 30 s clean run is what waits.
    let took = probing(&mut s, epoch, Duration::from_secs(60)).await;
    assert!(
        took.is_some_and(|t| t >= CLEAN_RUN && t < CLEAN_RUN + Duration::from_secs(1)),
        "{took:?}"
    );

    // Again, but 28 s in three segments are sent again: the proof starts
    // over from most of the way back, and takes longer than the clean run.
    assert!(
        traffic(&mut s, epoch, Duration::from_secs(5), |_| true)
            .await
            .is_some()
    );
    let left = Instant::now();
    assert_eq!(probing(&mut s, epoch, Duration::from_secs(28)).await, None);
    s.record_transport(tick(4, 3, 4), Instant::now(), &cfg());
    assert!(probing(&mut s, epoch, Duration::from_secs(60)).await.is_some());
    assert!(Instant::now() - left > CLEAN_RUN + Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_loss_burst_that_looks_like_an_outage_to_the_probes_still_needs_the_clean_run() {
    let epoch = Instant::now();
    let mut s = stats();
    s.record(OK, Instant::now(), epoch, &cfg());
    // 30% loss: the requests on the stalled connection time out together,
    // and nothing answers for long enough, so the path goes down looking
    // like an outage.
    tokio::time::advance(Duration::from_millis(300)).await;
    s.record(FAIL, Instant::now(), epoch, &cfg());
    s.record(FAIL, Instant::now(), epoch, &cfg());
    assert_eq!(s.state(), PathState::Down);
    // For 2.5 s every probe times out behind retransmissions, but the kernel
    // keeps delivering data between the segments it sends again.
    for i in 0..25u32 {
        tokio::time::advance(Duration::from_millis(100)).await;
        if i % 2 == 0 {
            s.record(FAIL, Instant::now(), epoch, &cfg());
        }
        s.record_transport(tick(6, 2, 4), Instant::now(), &cfg());
    }
    // Clean again: answering, but not trusted before it proves so.
    assert_eq!(probing(&mut s, epoch, Duration::from_secs(20)).await, None);
    assert!(
        probing(&mut s, epoch, Duration::from_secs(15)).await.is_some(),
        "{:?}",
        s.reason()
    );
}

#[tokio::test(start_paused = true)]
async fn one_stall_that_spoils_several_exchanges_is_one_trial_for_the_loss_test() {
    let epoch = Instant::now();
    let slow = Outcome::Slow(Duration::from_millis(400));
    // Five exchanges ending together after one stall (within 150 ms, the
    // `timeout_min`)...
    let mut burst = stats();
    burst.record(OK, Instant::now(), epoch, &cfg());
    for _ in 0..5 {
        tokio::time::advance(Duration::from_millis(20)).await;
        burst.record(slow, Instant::now(), epoch, &cfg());
    }
    // ...weigh as much as one.
    let mut one = stats();
    one.record(OK, Instant::now(), epoch, &cfg());
    one.record(slow, Instant::now(), epoch, &cfg());
    assert!(burst.exchanges_test.leave > 0.0);
    assert_eq!(burst.exchanges_test.leave, one.exchanges_test.leave);
    // Stalls further apart than that are separate trials.
    let mut apart = stats();
    apart.record(OK, Instant::now(), epoch, &cfg());
    for _ in 0..5 {
        tokio::time::advance(Duration::from_millis(200)).await;
        apart.record(slow, Instant::now(), epoch, &cfg());
    }
    assert!(apart.exchanges_test.leave > 4.0 * one.exchanges_test.leave);
}

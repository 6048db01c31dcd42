use detour_wire::PathState;
use proptest::prelude::*;

use super::*;

fn view(i: usize, name: &str, state: PathState, score: f64, enabled: bool) -> PathView {
    PathView {
        index: i,
        name: name.into(),
        endpoint: "".into(),
        priority: 1,
        direct: name == "direct",
        state,
        enabled,
        drained: false,
        rtt: None,
        p95: None,
        p99: None,
        request_p50: None,
        request_p95: None,
        loss: 0.0,
        retransmit: None,
        score,
        consecutive_failures: 0,
        reason: None,
        suspect: false,
    }
}

#[test]
fn direct_wins_when_up_then_peers_by_score() {
    let paths = vec![
        view(0, "direct", PathState::Up, 50.0, true),
        view(1, "via:maa", PathState::Up, 1.0, true),
        view(2, "via:del", PathState::Up, 2.0, true),
    ];
    assert_eq!(rank(&paths), vec![0, 1, 2]);
    let paths = vec![
        view(0, "direct", PathState::Degraded, 1.0, true),
        view(1, "via:maa", PathState::Up, 9.0, true),
        view(2, "via:del", PathState::Up, 2.0, true),
    ];
    assert_eq!(rank(&paths), vec![2, 1, 0]);
    let paths = vec![
        view(0, "direct", PathState::Down, 1.0, true),
        view(1, "via:maa", PathState::Degraded, 9.0, true),
        view(2, "via:del", PathState::Up, 2.0, false),
    ];
    assert_eq!(
        rank(&paths),
        vec![1, 0],
        "disabled paths are never chosen; fail static keeps down ones last"
    );
}

/// A path to endpoint `primary` (priority 1) or `secondary` (2).
fn to(i: usize, route: &str, primary: bool, state: PathState, score: f64) -> PathView {
    let (endpoint, priority) = if primary { ("primary", 1) } else { ("secondary", 2) };
    PathView {
        name: format!("{route}@{endpoint}").into(),
        endpoint: endpoint.into(),
        priority,
        ..view(i, route, state, score, true)
    }
}

#[test]
fn the_primary_endpoint_wins_over_any_route_while_some_path_reaches_it() {
    use PathState::*;
    // direct is blackholed; the primary is up behind maa: via:maa to the
    // primary beats direct to the secondary.
    let paths = vec![
        to(0, "direct", true, Down, 1.0),
        to(1, "via:maa", true, Up, 30.0),
        to(2, "direct", false, Up, 1.0),
        to(3, "via:maa", false, Up, 30.0),
    ];
    assert_eq!(rank(&paths), vec![1, 2, 3, 0]);
    // A degraded path still reaches the primary.
    let paths = vec![
        to(0, "direct", true, Degraded, 1.0),
        to(1, "via:maa", true, Down, 30.0),
        to(2, "direct", false, Up, 1.0),
    ];
    assert_eq!(rank(&paths)[0], 0);
    // No route reaches the primary: the secondary's paths first, the
    // primary's after them (fail static).
    let paths = vec![
        to(0, "direct", true, Down, 1.0),
        to(1, "via:maa", true, Down, 3.0),
        to(2, "direct", false, Up, 5.0),
        to(3, "via:maa", false, Up, 2.0),
    ];
    assert_eq!(rank(&paths), vec![2, 3, 0, 1]);
    // Nothing reaches anything: by priority, the primary first.
    let paths = vec![
        to(0, "direct", false, Down, 1.0),
        to(1, "direct", true, Down, 3.0),
    ];
    assert_eq!(rank(&paths), vec![1, 0]);
}

fn state() -> impl Strategy<Value = PathState> {
    prop_oneof![
        Just(PathState::Up),
        Just(PathState::Degraded),
        Just(PathState::Down)
    ]
}

proptest! {
    #[test]
    fn selection_never_picks_a_worse_state_while_a_better_one_exists(
        states in proptest::collection::vec((state(), 0.0f64..1e6, any::<bool>()), 1..8)
    ) {
        let paths: Vec<PathView> = states
            .iter()
            .enumerate()
            .map(|(i, (s, score, enabled))| view(i, if i == 0 { "direct" } else { "via:p" }, *s, *score, *enabled))
            .collect();
        let ranked = rank(&paths);
        let rankv = |s: PathState| match s { PathState::Up => 0, PathState::Degraded => 1, PathState::Down => 2 };
        for w in ranked.windows(2) {
            prop_assert!(rankv(paths[w[0]].state) <= rankv(paths[w[1]].state));
        }
        if let Some(&first) = ranked.first() {
            if paths.iter().any(|p| p.enabled && p.state == PathState::Up) {
                prop_assert_eq!(paths[first].state, PathState::Up);
            }
            if paths[0].enabled && paths[0].state == PathState::Up {
                prop_assert_eq!(first, 0, "direct first when it is up");
            }
        }
        prop_assert!(ranked.iter().all(|&i| paths[i].enabled));
        prop_assert_eq!(ranked.len(), paths.iter().filter(|p| p.enabled).count());
    }
}

#[test]
fn a_switch_says_what_is_wrong_with_the_path_left_or_better_about_the_one_taken() {
    let mut down = view(0, "direct", PathState::Down, 9.0, true);
    down.reason = Some("3 consecutive failures (timed out)".into());
    let snap = Snapshot {
        paths: vec![down, view(1, "via:maa", PathState::Up, 2.0, true)],
        ranked: vec![1, 0],
    };
    assert_eq!(
        switch_reason(&snap, Some("direct")),
        "direct down: 3 consecutive failures (timed out)"
    );
    assert_eq!(switch_reason(&snap, Some("via:del")), "via:del removed");
    let back = Snapshot {
        paths: vec![
            view(0, "direct", PathState::Up, 1.0, true),
            view(1, "via:maa", PathState::Up, 2.0, true),
        ],
        ranked: vec![0, 1],
    };
    assert_eq!(
        switch_reason(&back, Some("via:maa")),
        "direct up again, preferred"
    );
    let drained = Snapshot {
        paths: vec![
            view(0, "direct", PathState::Up, 1.0, true),
            view(1, "via:maa", PathState::Up, 2.0, false),
        ],
        ranked: vec![0],
    };
    assert_eq!(
        switch_reason(&drained, Some("via:maa")),
        "via:maa disabled (drained)"
    );
    assert_eq!(
        switch_reason(&Snapshot::default(), Some("direct")),
        "direct removed"
    );
}

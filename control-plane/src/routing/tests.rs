//! Tests of the routing rules: validation, matching and the weighted draw.

use super::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;

#[test]
fn route_names_are_never_dot_segments() {
    for bad in [".", "..", "...", "", "a/b", "a b"] {
        assert!(!super::valid_route_name(bad), "{bad:?}");
    }
    for good in ["blr-1", ".hidden", "a..b", "v1.2"] {
        assert!(super::valid_route_name(good), "{good:?}");
    }
}

fn rule(name: &str, spec: serde_json::Value) -> Rule {
    let spec: RouteSpec = serde_json::from_value(spec).unwrap();
    spec.compile(name).unwrap()
}

fn q(dest: &str) -> Query<'_> {
    Query {
        destination: dest,
        call_type: "outbound",
        priority: Priority::Normal,
        weekday: Weekday::Wed,
        minute: 12 * 60,
    }
}

fn set() -> RuleSet {
    RuleSet::new(
        1,
        [
            rule("india", json!({"prefix": "+91", "trunk": "in-1", "pop": "del"})),
            rule("blr", json!({"prefix": "+9180", "trunk": "blr-1", "pop": "blr"})),
            rule(
                "blr-night",
                json!({"prefix": "+9180", "trunk": "blr-night", "pop": "maa",
                       "window": {"start": "22:00", "end": "06:00"}}),
            ),
            rule(
                "blr-inbound",
                json!({"prefix": "+9180", "trunk": "blr-in", "pop": "blr",
                       "call_type": "inbound"}),
            ),
            rule(
                "emergency",
                json!({"prefix": "1", "trunk": "psap", "pop": "blr",
                       "priority": "emergency"}),
            ),
            rule("default", json!({"prefix": "", "trunk": "world", "pop": "del"})),
        ],
    )
}

#[test]
fn longest_prefix_wins() {
    let s = set();
    let mut rng = StdRng::seed_from_u64(1);
    let pick = |d: &str, rng: &mut StdRng| s.decide(&q(d), rng).unwrap().1.rule;
    assert_eq!(pick("+918041234567", &mut rng), "blr");
    assert_eq!(pick("+912212345678", &mut rng), "india");
    assert_eq!(pick("+14155550100", &mut rng), "default");
}

#[test]
fn call_type_priority_and_window_filter_then_fall_through() {
    let s = set();
    let mut query = q("+918041234567");
    query.call_type = "inbound";
    assert_eq!(s.matching(&query).unwrap().name, "blr-inbound");
    let mut night = q("+918041234567");
    night.minute = 23 * 60;
    assert_eq!(s.matching(&night).unwrap().name, "blr-night");
    night.minute = 5 * 60 + 59;
    assert_eq!(s.matching(&night).unwrap().name, "blr-night");
    night.minute = 6 * 60;
    assert_eq!(s.matching(&night).unwrap().name, "blr");
    // Emergency-only rule does not catch normal calls to "1…".
    let mut e = q("112");
    assert_eq!(s.matching(&e).unwrap().name, "default");
    e.priority = Priority::Emergency;
    assert_eq!(s.matching(&e).unwrap().name, "emergency");
}

#[test]
fn window_days_and_local_time() {
    let r = rule(
        "weekday",
        json!({"prefix": "+91", "trunk": "t", "pop": "p",
               "window": {"start": "09:00", "end": "18:00", "days": ["mon", "fri"]}}),
    );
    let s = RuleSet::new(1, [r]);
    let mut query = q("+918041234567");
    query.weekday = Weekday::Mon;
    query.minute = 9 * 60;
    assert!(s.matching(&query).is_some());
    query.minute = 18 * 60;
    assert!(s.matching(&query).is_none());
    query.minute = 10 * 60;
    query.weekday = Weekday::Tue;
    assert!(s.matching(&query).is_none());
    // 04:00 UTC on a Monday is 09:30 IST: inside the window.
    let utc = chrono::DateTime::parse_from_rfc3339("2026-11-23T04:00:00Z").unwrap();
    let ist = utc.with_timezone(&chrono_tz::Asia::Kolkata);
    let at = Query::at("+918041234567", "outbound", Priority::Normal, &ist);
    assert_eq!((at.weekday, at.minute), (Weekday::Mon, 9 * 60 + 30));
    assert!(s.matching(&at).is_some());
}

#[test]
fn ties_are_broken_by_specificity_then_name() {
    let s = RuleSet::new(
        1,
        [
            rule(
                "b-type",
                json!({"prefix": "+91", "trunk": "t1", "pop": "p", "call_type": "outbound"}),
            ),
            rule(
                "a-prio",
                json!({"prefix": "+91", "trunk": "t2", "pop": "p", "priority": "normal"}),
            ),
            rule(
                "z-both",
                json!({"prefix": "+91", "trunk": "t3", "pop": "p", "priority": "normal", "call_type": "outbound"}),
            ),
        ],
    );
    assert_eq!(s.matching(&q("+918041234567")).unwrap().name, "z-both");
    let s = RuleSet::new(
        1,
        [
            rule(
                "b-type",
                json!({"prefix": "+91", "trunk": "t1", "pop": "p", "call_type": "outbound"}),
            ),
            rule(
                "a-prio",
                json!({"prefix": "+91", "trunk": "t2", "pop": "p", "priority": "normal"}),
            ),
        ],
    );
    assert_eq!(s.matching(&q("+918041234567")).unwrap().name, "a-prio");
}

#[test]
fn weights_hold_within_tolerance_over_many_draws() {
    let r = rule(
        "w",
        json!({"prefix": "+91", "pop": "p", "failover": ["backup"],
               "trunks": [{"name": "a", "weight": 70}, {"name": "b", "weight": 20},
                          {"name": "c", "weight": 10}, {"name": "drained", "weight": 0}]}),
    );
    let mut rng = StdRng::seed_from_u64(7);
    let n = 100_000;
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..n {
        *counts.entry(r.pick(&mut rng).trunk).or_default() += 1;
    }
    for (t, share) in [("a", 0.7), ("b", 0.2), ("c", 0.1)] {
        let got = f64::from(counts[t]) / f64::from(n);
        assert!((got - share).abs() < 0.01, "{t}: {got}");
    }
    assert!(!counts.contains_key("drained"));
}

#[test]
fn failover_order_is_other_trunks_by_weight_then_the_list() {
    let r = rule(
        "w",
        json!({"prefix": "+91", "pop": "p", "failover": ["backup", "a"],
               "trunks": [{"name": "a", "weight": 1}, {"name": "b", "weight": 5}]}),
    );
    assert_eq!(r.decision_with("b".into()).failover, ["a", "backup"]);
    assert_eq!(r.decision_with("a".into()).failover, ["b", "backup"]);
}

#[test]
fn invalid_specs_name_their_fields() {
    let spec: RouteSpec = serde_json::from_value(json!({
        "prefix": "+91x", "pop": "", "trunk": "a", "trunks": [{"name": "b"}],
        "priority": "high", "window": {"start": "25:00", "end": "01:00"},
        "hook": {"url": "ftp://x"}
    }))
    .unwrap();
    let errs = spec.compile("bad name").unwrap_err();
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "name", "prefix", "pop", "trunks", "priority", "window", "hook.url"
        ]
    );
}

#[test]
fn ten_thousand_rules_index() {
    let rules = (0..10_000).map(|i| {
        rule(
            &format!("r{i}"),
            json!({"prefix": format!("+91{}", 10_000 + i), "trunk": "t", "pop": "p"}),
        )
    });
    let s = RuleSet::new(1, rules);
    assert_eq!(s.len(), 10_000);
    assert_eq!(s.matching(&q("+911234512345")).unwrap().name, "r2345");
}

proptest::proptest! {
    #[test]
    fn pick_is_always_a_positive_weight_trunk(seed in 0u64..1000, wa in 0u32..10, wb in 1u32..10) {
        let r = rule("p", json!({"prefix": "+9", "pop": "p",
            "trunks": [{"name": "a", "weight": wa}, {"name": "b", "weight": wb}]}));
        let d = r.pick(&mut StdRng::seed_from_u64(seed));
        proptest::prop_assert!(d.trunk == "b" || (d.trunk == "a" && wa > 0));
        proptest::prop_assert_eq!(d.failover.len(), 1);
    }
}

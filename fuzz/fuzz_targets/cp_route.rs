//! A route body (`PUT /v1/routes/{name}`) from arbitrary bytes: parse,
//! validate, compile, index and route a call with it: no panic, and a
//! decision always names a trunk of the rule.
#![no_main]

use detour_control_plane::intake::Priority;
use detour_control_plane::routing::{Query, RouteSpec, RuleSet};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;

fuzz_target!(|data: &[u8]| {
    let (name, body) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"r"[..], data),
    };
    let name = String::from_utf8_lossy(name);
    let _ = detour_control_plane::routing::valid_route_name(&name);
    let Ok(spec) = serde_json::from_slice::<RouteSpec>(body) else {
        return;
    };
    let Ok(rule) = spec.compile(&name) else { return };
    assert!(detour_control_plane::routing::valid_route_name(&name));
    let set = RuleSet::new(1, [rule]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let now = chrono::DateTime::from_timestamp(1_764_000_000, 0).unwrap();
    for destination in [spec.prefix.as_str(), "+919876543210", "112"] {
        for priority in [Priority::Normal, Priority::Emergency] {
            let q = Query::at(destination, "outbound", priority, &now);
            if let Some((rule, decision)) = set.decide(&q, &mut rng) {
                assert_eq!(decision.rule, rule.name);
                assert!(!decision.trunk.is_empty());
            }
        }
    }
});

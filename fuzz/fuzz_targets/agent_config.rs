//! agent.toml and peers.toml from arbitrary bytes: no panic, and no
//! diagnostic ever carries a control character (a crafted peer name must not
//! reach the operator's terminal raw).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fn clean(errors: &detour_agent::config::ConfigErrors) {
    for e in &errors.0 {
        let text = e.to_string();
        assert!(!text.chars().any(char::is_control), "{text:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (agent, peers) = text.split_once('\u{0}').unwrap_or((&text, &text));
    let dir = Path::new("/nonexistent-detour-fuzz");
    if let Err(e) = detour_agent::config::AgentConfig::from_str_at(&dir.join("agent.toml"), agent) {
        clean(&e);
    }
    let own = Some("0.0.0.0:4443".parse().unwrap());
    match detour_agent::config::parse_peers(&dir.join("peers.toml"), peers, "blr", own) {
        Ok(list) => {
            for p in list {
                assert!(detour_agent::config::valid_pop_name(&p.name) && p.name != "blr");
            }
        }
        Err(e) => clean(&e),
    }
});

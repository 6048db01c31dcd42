//! The relay's CONNECT target check: only exactly the control plane's
//! `host:port` passes, whatever the spelling of the rest.
#![no_main]

use libfuzzer_sys::fuzz_target;

const HOST: &str = "cp.example.internal";
const PORT: u16 = 443;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    if detour_agent::relay::authority_matches(target, HOST, PORT) {
        let auth: http::uri::Authority = target.parse().expect("it parsed for the check");
        assert!(auth.host().eq_ignore_ascii_case(HOST), "{target}");
        assert_eq!(auth.port_u16(), Some(PORT), "{target}");
        assert!(!target.contains('@'), "{target}");
    }
    // The same for an IPv6 control plane.
    if detour_agent::relay::authority_matches(target, "::1", PORT) {
        let auth: http::uri::Authority = target.parse().expect("it parsed for the check");
        assert_eq!(auth.host().trim_matches(['[', ']']), "::1", "{target}");
    }
});

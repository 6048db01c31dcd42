//! The ingress's check of a request head (method, target, Detour's headers,
//! size) on arbitrary heads: no panic; whatever is admitted is for the
//! control plane; hop-by-hop headers never survive stripping.
#![no_main]

use std::sync::OnceLock;

use detour_agent::config::AgentConfig;
use libfuzzer_sys::fuzz_target;

fn config() -> &'static AgentConfig {
    static CONFIG: OnceLock<AgentConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let text = "pop = \"blr\"\n[control_plane]\nurl = \"http://cp.example.internal:8000\"\n[forward]\nemergency_path_prefixes = [\"/v1/calls/emergency\"]\n";
        AgentConfig::from_str_at(std::path::Path::new("/nonexistent/agent.toml"), text)
            .expect("the fuzz config is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let method = lines.next().unwrap_or_default();
    let uri = lines.next().unwrap_or_default();
    let mut req = http::Request::builder().method(method).uri(uri);
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            req = req.header(k.trim(), v.trim());
        }
    }
    let Ok(req) = req.body(()) else { return };
    let (mut parts, ()) = req.into_parts();
    let config = config();
    if let Ok(admitted) = detour_agent::ingress::admit(&parts, config) {
        assert!(parts.method != http::Method::CONNECT);
        if parts.uri.authority().is_some() {
            assert!(detour_agent::ingress::is_control_plane(&parts.uri, config));
        }
        assert!(
            parts
                .uri
                .path_and_query()
                .is_some_and(|p| p.as_str().starts_with('/'))
        );
        if let Some(pin) = admitted.pin {
            assert_eq!(pin, pin.trim());
        }
    }
    detour_agent::ingress::strip_hop_by_hop(&mut parts.headers);
    for h in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(!parts.headers.contains_key(h), "{h} survived");
    }
});

//! The HAProxy + Squid configs of `detour-lab bench compare` stay valid:
//! each is checked by the tool's own parser. Without haproxy or squid this
//! prints SKIPPED, unless DETOUR_REQUIRE_TOOLS=1 (CI), where it fails.

use std::net::SocketAddr;

use detour_lab::haproxy_squid::{Profile, haproxy_cfg, squid_conf, validate};

fn tools_missing() -> Option<String> {
    for tool in ["haproxy", "squid"] {
        let found = std::process::Command::new(tool).arg("-v").output().is_ok();
        if !found {
            return Some(format!("{tool} is not installed (apt-get install haproxy squid)"));
        }
    }
    None
}

#[test]
fn the_exotel_style_configs_pass_haproxy_and_squid_checks() {
    if let Some(why) = tools_missing() {
        assert!(
            std::env::var("DETOUR_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "compare configs cannot be checked: {why}"
        );
        eprintln!("SKIPPED: compare configs: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cp: SocketAddr = "127.0.0.1:18080".parse().unwrap();
    let uplink: SocketAddr = "127.0.0.1:18081".parse().unwrap();
    let squid = d.join("squid.conf");
    let conf = squid_conf(d, 13128, cp, uplink);
    // Only the control plane, through this PoP's own uplink.
    assert!(conf.contains("http_access deny all"));
    assert!(conf.contains("cache_peer 127.0.0.1 parent 18081"));
    std::fs::write(&squid, conf).unwrap();
    for profile in [Profile::Design, Profile::Tuned] {
        let cfg = haproxy_cfg(
            d,
            18090,
            cp,
            &[("direct", 13128), ("via-maa", 13129), ("via-del", 13130)],
            profile,
        );
        assert_eq!(cfg.matches(" backup").count(), 2, "{cfg}");
        assert!(cfg.contains("http-check send meth GET uri http://127.0.0.1:18080/healthz"));
        let path = d.join("haproxy.cfg");
        std::fs::write(&path, &cfg).unwrap();
        validate(&squid, &path).unwrap();
    }
    // And a broken one is caught, so the check above can fail.
    let bad = d.join("bad.cfg");
    std::fs::write(&bad, "backend x\n    server y 127.0.0.1:1 chekc\n").unwrap();
    assert!(validate(&squid, &bad).is_err());
}

use std::path::Path;

use rustls::pki_types::pem::PemObject;

use super::*;

/// A directory with a fleet CA, certificates for blr and maa, a token and
/// a valid agent.toml + peers.toml for blr.
fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    crate::pki::init(&certs).unwrap();
    crate::pki::issue(&certs, "blr", &certs, 30).unwrap();
    crate::pki::issue(&certs, "maa", &certs, 30).unwrap();
    std::fs::write(dir.path().join("agent.token"), "tok-123\n").unwrap();
    std::fs::write(dir.path().join("agent.toml"), VALID).unwrap();
    std::fs::write(dir.path().join("peers.toml"), PEERS).unwrap();
    dir
}

const VALID: &str = r#"pop = "blr"
[listen]
local = "127.0.0.1:8080"
relay = "0.0.0.0:4443"
admin = "127.0.0.1:9090"
[control_plane]
url = "https://cp.example.internal"
token_file = "agent.token"
[tls]
ca = "certs/ca.pem"
cert = "certs/blr.pem"
key = "certs/blr.key"
[health]
interval = "500ms"
[peers]
file = "peers.toml"
"#;

const PEERS: &str = r#"[[peer]]
name = "maa"
relay = "10.1.2.3:4443"
weight = 100
"#;

fn load(dir: &Path) -> Result<AgentConfig, ConfigErrors> {
    AgentConfig::load(&dir.join("agent.toml"))
}

fn errors_with(dir: &Path, agent: &str, peers: &str) -> Vec<String> {
    std::fs::write(dir.join("agent.toml"), agent).unwrap();
    std::fs::write(dir.join("peers.toml"), peers).unwrap();
    match load(dir) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn a_valid_config_loads_with_defaults() {
    let dir = setup();
    let c = load(dir.path()).unwrap();
    assert_eq!(c.pop, "blr");
    assert_eq!(c.control_plane.primary().host, "cp.example.internal");
    assert_eq!(c.control_plane.primary().port, 443);
    assert_eq!(c.control_plane.token.as_deref(), Some("tok-123"));
    assert_eq!(c.control_plane.primary().authority(), "cp.example.internal:443");
    assert_eq!(c.control_plane.primary().host_header(), "cp.example.internal");
    assert_eq!(c.peers.len(), 1);
    assert_eq!(c.peers[0].path_name(), "via:maa");
    assert_eq!(c.ingress.max_body, 1024 * 1024);
    assert_eq!(c.health.interval, Duration::from_millis(500));
    assert_eq!(c.forward.pin, None);
}

#[test]
fn every_problem_is_reported_at_once_with_its_location() {
    let dir = setup();
    let agent = VALID
        .replace("interval = \"500ms\"", "interval = \"fast\"")
        .replace("local = \"127.0.0.1:8080\"", "local = \"localhost:80:80\"");
    let peers = "[[peer]]\nname = \"blr\"\nrelay = \"10.0.0.1:4443\"\n\n[[peer]]\nname = \"maa\"\nrelay = \"not an address\"\n\n[[peer]]\nname = \"maa\"\nrelay = \"10.0.0.3:4443\"\n";
    let errs = errors_with(dir.path(), &agent, peers);
    let agent_toml = dir.path().join("agent.toml").display().to_string();
    let peers_toml = dir.path().join("peers.toml").display().to_string();
    assert!(
        errs.iter()
            .any(|e| e.starts_with(&format!("{agent_toml}:3:9: listen.local"))),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with(&format!("{agent_toml}:14:12: health.interval"))),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with(&format!("{peers_toml}:2:8:")) && e.contains("this agent itself")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with(&format!("{peers_toml}:7:9:")) && e.contains("peer.relay")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with(&format!("{peers_toml}:10:8:")) && e.contains("listed twice")),
        "{errs:#?}"
    );
    assert_eq!(errs.len(), 5, "{errs:#?}");
}

#[test]
fn a_peer_that_is_this_agents_own_relay_is_refused() {
    // VALID listens for peers on 0.0.0.0:4443.
    let dir = setup();
    let cases = [
        ("0.0.0.0:4443", true),
        ("127.0.0.1:4443", true),
        ("localhost:4443", true),
        ("127.0.0.1:4444", false),
        ("10.9.9.9:4443", false),
    ];
    for (relay, refused) in cases {
        let peers = format!("[[peer]]\nname = \"maa\"\nrelay = \"{relay}\"\n");
        let errs = errors_with(dir.path(), VALID, &peers);
        let hit = errs.iter().any(|e| e.contains("own relay listener"));
        assert_eq!(hit, refused, "relay {relay}: {errs:#?}");
        if !refused {
            assert!(errs.is_empty(), "relay {relay}: {errs:#?}");
        }
    }
}

#[test]
fn unknown_keys_and_syntax_errors_point_at_the_spot() {
    let dir = setup();
    let errs = errors_with(
        dir.path(),
        &VALID.replace("[health]\n", "[health]\nintervall = \"1s\"\n"),
        PEERS,
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains(":14:1:") && errs[0].contains("unknown field `intervall`"),
        "{errs:#?}"
    );
    let errs = errors_with(dir.path(), VALID, "[[peer]\nname = \"maa\"\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].contains("peers.toml:1:"), "{errs:#?}");
}

#[test]
fn certificate_problems_are_caught() {
    let dir = setup();
    // Missing file.
    let errs = errors_with(
        dir.path(),
        &VALID.replace("certs/blr.pem", "certs/nope.pem"),
        PEERS,
    );
    assert!(
        errs.iter().any(|e| e.contains(":11:8: tls.cert: cannot read")),
        "{errs:#?}"
    );
    // A certificate that does not match its key.
    let errs = errors_with(
        dir.path(),
        &VALID.replace("certs/blr.key", "certs/maa.key"),
        PEERS,
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("tls.key") && e.contains("does not match")),
        "{errs:#?}"
    );
    // A certificate for another PoP.
    let errs = errors_with(
        dir.path(),
        &VALID
            .replace("certs/blr.pem", "certs/maa.pem")
            .replace("certs/blr.key", "certs/maa.key"),
        PEERS,
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("tls.cert") && e.contains("not for this PoP `blr`")),
        "{errs:#?}"
    );
    // A certificate from another CA.
    let other = tempfile::tempdir().unwrap();
    crate::pki::init(other.path()).unwrap();
    crate::pki::issue(other.path(), "blr", other.path(), 30).unwrap();
    let agent = VALID
        .replace(
            "certs/blr.pem",
            &other.path().join("blr.pem").display().to_string(),
        )
        .replace(
            "certs/blr.key",
            &other.path().join("blr.key").display().to_string(),
        );
    let errs = errors_with(dir.path(), &agent, PEERS);
    assert!(
        errs.iter().any(|e| e.contains("not valid under the fleet CA")),
        "{errs:#?}"
    );
    // A key file that holds no key.
    std::fs::write(dir.path().join("certs/garbage.key"), "hello").unwrap();
    let errs = errors_with(
        dir.path(),
        &VALID.replace("certs/blr.key", "certs/garbage.key"),
        PEERS,
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("tls.key") && e.contains("not a PEM private key")),
        "{errs:#?}"
    );
}

#[test]
fn control_plane_and_forward_mistakes_are_caught() {
    let dir = setup();
    let errs = errors_with(
        dir.path(),
        &VALID.replace("https://cp.example.internal", "ftp://cp"),
        PEERS,
    );
    assert!(errs.iter().any(|e| e.contains("control_plane.url")), "{errs:#?}");
    let errs = errors_with(
        dir.path(),
        &VALID.replace("[peers]", "[forward]\npin = \"via:del\"\n[peers]"),
        PEERS,
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("forward.pin") && e.contains("via:del")),
        "{errs:#?}"
    );
    let errs = errors_with(dir.path(), &VALID.replace("agent.token", "missing.token"), PEERS);
    assert!(
        errs.iter()
            .any(|e| e.contains("control_plane.token_file: cannot read")),
        "{errs:#?}"
    );
    let errs = errors_with(
        dir.path(),
        &VALID.replace("[peers]", "[ingress]\nmax_body = \"1 GB\"\n[peers]"),
        PEERS,
    );
    assert!(errs.iter().any(|e| e.contains("ingress.max_body")), "{errs:#?}");
    let errs = errors_with(
        dir.path(),
        &VALID.replace("pop = \"blr\"", "pop = \"Bangalore!\""),
        PEERS,
    );
    assert!(errs.iter().any(|e| e.contains(":1:7: pop:")), "{errs:#?}");
}

#[test]
fn the_example_configs_in_the_repo_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    for pop in ["blr", "maa", "del"] {
        let dir = tempfile::tempdir().unwrap();
        for f in ["agent.toml", "peers.toml"] {
            std::fs::copy(root.join(pop).join(f), dir.path().join(f)).unwrap();
        }
        let certs = dir.path().join("certs");
        crate::pki::init(&certs).unwrap();
        crate::pki::issue(&certs, pop, &certs, 30).unwrap();
        std::fs::write(dir.path().join("agent.token"), "example-token").unwrap();
        let c = load(dir.path()).unwrap_or_else(|e| panic!("config/{pop}: {e}"));
        assert_eq!(c.pop, pop);
        assert_eq!(c.peers.len(), 2);
        assert!(c.peers.iter().all(|p| p.name != pop));
    }
}

#[test]
fn sizes_and_durations_parse_like_people_write_them() {
    assert_eq!(parse_size(&toml::Value::String("1MiB".into())), Ok(1024 * 1024));
    assert_eq!(parse_size(&toml::Value::String("512 KiB".into())), Ok(512 * 1024));
    assert_eq!(parse_size(&toml::Value::Integer(100)), Ok(100));
    assert!(parse_size(&toml::Value::Integer(-1)).is_err());
    assert!(parse_size(&toml::Value::String("lots".into())).is_err());
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
    assert!(parse_duration("soon").is_err());
    assert!(valid_host_port("relay.maa.example:4443").is_ok());
    assert!(valid_host_port("[::1]:4443").is_ok());
    assert!(valid_host_port("10.0.0.1").is_err());
    assert!(valid_host_port("a b:1").is_err());
    assert!(valid_host_port("x:0").is_err());
}

#[test]
fn a_peer_relay_that_reaches_this_agent_is_refused_in_every_spelling() {
    let own: SocketAddr = "0.0.0.0:4443".parse().unwrap();
    for relay in [
        "0.0.0.0:4443",
        "127.0.0.1:4443",
        "127.0.0.2:4443",
        "localhost:4443",
        "[::1]:4443",
        "[::ffff:127.0.0.1]:4443",
        "[::]:4443",
    ] {
        assert!(super::is_own_relay(relay, Some(own)), "{relay}");
    }
    for relay in ["10.1.2.3:4443", "127.0.0.1:4444", "relay.maa.example:4443"] {
        assert!(!super::is_own_relay(relay, Some(own)), "{relay}");
    }
    let lo: SocketAddr = "127.0.0.1:4443".parse().unwrap();
    assert!(super::is_own_relay("0.0.0.0:4443", Some(lo)));
    for relay in ["127.1:4443", "0x7f.0.0.1:4443", "2130706433:4443", "10.1.2:4443"] {
        assert!(super::non_canonical_ipv4(relay), "{relay}");
    }
    for relay in ["10.1.2.3:4443", "maa.example:4443", "relay-1:4443", "[::1]:4443"] {
        assert!(!super::non_canonical_ipv4(relay), "{relay}");
    }
}

#[test]
fn diagnostics_never_print_control_characters() {
    let dir = setup();
    let errs = errors_with(
        dir.path(),
        VALID,
        "[[peer]]\nname = \"m\\u0007a\\u001b[31ma\\u0000\"\nrelay = \"10.0.0.1:4443\"\n",
    );
    let text = errs.join("\n");
    assert!(text.contains("peer.name"), "{text}");
    assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
    assert!(
        text.contains("\\u{7}") && text.contains("\\u{1b}") && text.contains("\\u{0}"),
        "{text}"
    );
}

#[test]
fn several_agents_of_one_pop_are_peers_under_names_of_their_own() {
    let dir = setup();
    let peers = "[[peer]]\nname = \"maa-1\"\npop = \"maa\"\nrelay = \"10.1.2.3:4443\"\n\
                 [[peer]]\nname = \"maa-2\"\npop = \"maa\"\nrelay = \"10.1.2.4:4443\"\n\
                 [[peer]]\nname = \"del\"\nrelay = \"10.1.3.3:4443\"\n";
    std::fs::write(dir.path().join("peers.toml"), peers).unwrap();
    let c = load(dir.path()).unwrap();
    let got: Vec<(&str, &str)> = c
        .peers
        .iter()
        .map(|p| (p.name.as_str(), p.pop.as_str()))
        .collect();
    assert_eq!(got, [("maa-1", "maa"), ("maa-2", "maa"), ("del", "del")]);
    // The certificate name is the PoP's, not this agent's own.
    let errs = errors_with(
        dir.path(),
        VALID,
        "[[peer]]\nname = \"blr-2\"\npop = \"blr\"\nrelay = \"10.1.2.3:4443\"\n",
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("peer.pop: `blr` is this agent's own PoP")),
        "{errs:#?}"
    );
}

#[test]
fn a_recordings_section_is_read_with_its_defaults_and_every_mistake_is_named() {
    let dir = setup();
    std::fs::write(
        dir.path().join("s3.credentials"),
        "# comment\n[other]\naws_access_key_id = X\n[lab]\naws_access_key_id = AK\naws_secret_access_key = SK\n",
    )
    .unwrap();
    let good = format!(
        "{VALID}[recordings]\ndir = \"rec\"\nmax_rate = \"2MB\"\n[recordings.store]\nendpoint = \"https://s3.ap-south-1.amazonaws.com\"\n\
         bucket = \"calls-blr\"\nregion = \"ap-south-1\"\ncredentials_file = \"s3.credentials\"\nprofile = \"lab\"\npath_style = false\n"
    );
    std::fs::write(dir.path().join("agent.toml"), &good).unwrap();
    let c = load(dir.path()).unwrap();
    let r = c.recordings.unwrap();
    assert_eq!(r.dir, dir.path().join("rec"));
    assert_eq!(r.complete, Complete::Renamed);
    assert_eq!(r.after_upload, AfterUpload::Delete);
    assert_eq!(r.part_size, Recordings::DEFAULT_PART_SIZE);
    assert_eq!(r.parallel_parts, Recordings::DEFAULT_PARALLEL_PARTS);
    assert_eq!((r.max_rate, r.max_rate_per_peer), (Some(2_000_000), None));
    assert_eq!(r.journal, dir.path().join("rec").join(Recordings::JOURNAL));
    assert!(r.patterns.iter().any(|p| p.matches("abc.wav")));
    assert_eq!(&r.call_id.captures("abc-123.wav").unwrap()["call_id"], "abc-123");
    // Virtual-host style: the bucket is in the host dialled and signed.
    assert_eq!(r.store.host, "calls-blr.s3.ap-south-1.amazonaws.com");
    assert_eq!(r.store.port, 443);
    assert_eq!(
        (r.store.access_key.as_str(), r.store.secret_key.as_str()),
        ("AK", "SK")
    );

    let bad = format!(
        "{VALID}[recordings]\ndir = \"rec\"\ncomplete = \"closed\"\nafter_upload = \"move\"\npart_size = \"1MiB\"\nparallel_parts = 0\n\
         patterns = [\"a/*.wav\"]\ncall_id = \"(\"\nmax_rate_per_peer = \"1KB\"\n[recordings.store]\nendpoint = \"ftp://x\"\nbucket = \"Bad_Bucket\"\n\
         credentials_file = \"missing.credentials\"\nkey_template = \"{{pop}}/{{when}}\"\n"
    );
    let errs = errors_with(dir.path(), &bad, PEERS);
    for want in [
        "recordings.complete: `closed`",
        "recordings.after_upload = \"move\" needs recordings.move_to",
        "recordings.part_size: must be from 5MiB",
        "recordings.parallel_parts: must be from 1 to 16",
        "recordings.patterns: a pattern matches file names",
        "recordings.call_id: not a regular expression",
        "recordings.max_rate_per_peer: at least 64KiB",
        "recordings.store.endpoint: must be https://",
        "recordings.store.bucket: must be an S3 bucket name",
        "recordings.store.credentials_file: cannot read",
        "recordings.store.key_template: unknown field `{when}`",
    ] {
        assert!(errs.iter().any(|e| e.contains(want)), "no `{want}` in {errs:#?}");
    }
}

#[test]
fn deferrable_rules_are_checked_and_their_journal_is_relative_to_the_config() {
    let dir = setup();
    let good = VALID.replace(
        "[peers]",
        "[forward]\ndeferred_journal = \"state/deferred.journal\"\n\
         [[forward.deferrable]]\nmethod = \"post\"\npath = \"/v1/calls/*/events\"\n[peers]",
    );
    assert_eq!(errors_with(dir.path(), &good, PEERS), Vec::<String>::new());
    let c = load(dir.path()).unwrap();
    assert_eq!(c.forward.deferrable.len(), 1);
    assert_eq!(c.forward.deferrable[0].method, http::Method::POST);
    assert_eq!(
        c.forward.deferred_journal,
        dir.path().join("state/deferred.journal")
    );
    assert_eq!(c.forward.deferred_max_bytes, Forward::DEFAULT_DEFERRED_MAX_BYTES);

    let bad = VALID.replace(
        "[peers]",
        "[forward]\ndeferred_max_bytes = \"1KiB\"\n\
         [[forward.deferrable]]\nmethod = \"GET\"\npath = \"/v1/calls/*/events\"\n\
         [[forward.deferrable]]\nmethod = \"POST\"\npath = \"/v1/calls/x*/events\"\n[peers]",
    );
    let errs = errors_with(dir.path(), &bad, PEERS);
    for want in [
        "forward.deferred_max_bytes: at least 64KiB",
        "forward.deferrable.method: a method that changes something",
        "forward.deferrable.path: a path like /v1/calls/*/events",
    ] {
        assert!(errs.iter().any(|e| e.contains(want)), "no `{want}` in {errs:#?}");
    }
}

#[test]
fn several_control_plane_endpoints_are_read_in_priority_order_and_name_their_paths() {
    let dir = setup();
    let text = VALID.replace(
        "url = \"https://cp.example.internal\"\n",
        "[[control_plane.endpoints]]\nname = \"singapore\"\nurl = \"https://cp-sg.example.internal/api/\"\npriority = 2\n\
         [[control_plane.endpoints]]\nname = \"mumbai\"\nurl = \"https://cp-mum.example.internal\"\npriority = 1\naddresses = [\"10.0.0.5:443\"]\n\
         [control_plane.x]\n",
    );
    // (`[control_plane.x]` is not a key: fixed below; it keeps the table open.)
    let text = text.replace("[control_plane.x]\n", "");
    // token_file now follows the array of tables: move it above.
    let text = text.replace("token_file = \"agent.token\"\n", "").replace(
        "[control_plane]\n",
        "[control_plane]\ntoken_file = \"agent.token\"\n",
    );
    std::fs::write(dir.path().join("agent.toml"), &text).unwrap();
    let c = load(dir.path()).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let names: Vec<_> = c
        .control_plane
        .endpoints
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(names, ["mumbai", "singapore"]);
    assert_eq!(
        c.control_plane.primary().addresses,
        ["10.0.0.5:443".parse().unwrap()]
    );
    assert_eq!(c.control_plane.endpoints[1].base_path, "/api");
    assert_eq!(c.control_plane.token.as_deref(), Some("tok-123"));
    let paths = crate::paths::build_paths(&c).unwrap();
    let names: Vec<_> = paths.iter().map(|p| p.name.to_string()).collect();
    assert_eq!(
        names,
        [
            "direct@mumbai",
            "via:maa@mumbai",
            "direct@singapore",
            "via:maa@singapore"
        ]
    );
    assert_eq!(&*paths[2].base_path, "/api");
    // The relay allows CONNECT to every endpoint and nothing else.
    assert!(crate::relay::allowed_target(&c, "cp-sg.example.internal:443").is_some());
    assert!(crate::relay::allowed_target(&c, "cp-mum.example.internal:443").is_some());
    assert!(crate::relay::allowed_target(&c, "cp-mum.example.internal:22").is_none());
    // A pin may name a route (all endpoints) or one path.
    for pin in ["via:maa", "via:maa@singapore"] {
        let t = text.replace("[peers]", &format!("[forward]\npin = \"{pin}\"\n[peers]"));
        assert!(errors_with(dir.path(), &t, PEERS).is_empty(), "{pin}");
    }
    let t = text.replace("[peers]", "[forward]\npin = \"via:maa@tokyo\"\n[peers]");
    assert!(
        errors_with(dir.path(), &t, PEERS)
            .iter()
            .any(|e| e.contains("forward.pin"))
    );
}

#[test]
fn control_plane_endpoint_mistakes_are_named() {
    let dir = setup();
    let with = |section: &str| {
        let t = VALID.replace("token_file = \"agent.token\"\n", "").replace(
            "[control_plane]\nurl = \"https://cp.example.internal\"\n",
            &format!("[control_plane]\ntoken_file = \"agent.token\"\n{section}"),
        );
        errors_with(dir.path(), &t, PEERS)
    };
    let has = |errs: &[String], what: &str| {
        assert!(errs.iter().any(|e| e.contains(what)), "{what}: {errs:#?}");
    };
    has(&with(""), "needs `url`");
    has(
        &with("url = \"https://a.example\"\n[[control_plane.endpoints]]\nurl = \"https://b.example\"\n"),
        "both set",
    );
    has(
        &with(
            "[[control_plane.endpoints]]\nurl = \"https://a.example\"\n[[control_plane.endpoints]]\nurl = \"https://a.example:8443\"\n",
        ),
        "already used",
    );
    has(
        &with(
            "[[control_plane.endpoints]]\nname = \"x\"\nurl = \"https://a.example\"\n[[control_plane.endpoints]]\nname = \"y\"\nurl = \"https://A.example\"\n",
        ),
        "already listed",
    );
    has(
        &with("[[control_plane.endpoints]]\nurl = \"https://a.example\"\npriority = 0\n"),
        "must be 1 or more",
    );
    has(
        &with("[[control_plane.endpoints]]\nname = \"Bad Name\"\nurl = \"https://a.example\"\n"),
        "control_plane.endpoints.name",
    );
    has(
        &with("addresses = [\"10.0.0.1:443\"]\n[[control_plane.endpoints]]\nurl = \"https://a.example\"\n"),
        "goes with control_plane.url",
    );
    has(
        &with("[[control_plane.endpoints]]\nurl = \"ftp://a.example\"\n"),
        "control_plane.endpoints.url",
    );
}

#[test]
fn a_revocation_list_must_come_from_the_fleet_ca_and_is_watched() {
    let dir = setup();
    let certs = dir.path().join("certs");
    let agent_toml = dir.path().join("agent.toml").display().to_string();
    crate::pki::revoke(&certs, Some("maa"), None, crate::pki::Reason::Unspecified).unwrap();
    let with_crl = |file: &str| {
        VALID.replace(
            "key = \"certs/blr.key\"\n",
            &format!("key = \"certs/blr.key\"\ncrl = \"{file}\"\n"),
        )
    };
    std::fs::write(dir.path().join("agent.toml"), with_crl("certs/crl.pem")).unwrap();
    let c = load(dir.path()).unwrap();
    let tls = c.tls.as_ref().unwrap();
    assert_eq!(tls.crls.len(), 1);
    assert!(!tls.own_revoked);
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    assert_eq!(c.files.crl.as_deref(), Some(certs.join("crl.pem").as_path()));
    assert!(c.files.watched().any(|f| f.ends_with("certs/crl.pem")));

    let at_crl = format!("{agent_toml}:13:7: tls.crl");
    let expect = |file: &str, what: &str| {
        let errs = errors_with(dir.path(), &with_crl(file), PEERS);
        assert!(
            errs.len() == 1 && errs[0].starts_with(&at_crl) && errs[0].contains(what),
            "{file}: want {at_crl} … {what}, got {errs:#?}"
        );
    };
    expect("certs/missing.pem", "cannot read");
    std::fs::write(certs.join("garbage.pem"), "hello\n").unwrap();
    expect("certs/garbage.pem", "holds no PEM CRL");
    // Another CA of the same name: the name matches, the signature does not.
    let impostor = dir.path().join("impostor");
    std::fs::create_dir_all(&impostor).unwrap();
    let fleet_ca = std::fs::read(certs.join("ca.pem")).unwrap();
    let fleet_ca = rustls::pki_types::CertificateDer::from_pem_slice(&fleet_ca).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(fleet_ca.as_ref()).unwrap();
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    let now = time::OffsetDateTime::now_utc();
    let (pem, key) = crate::pki::new_ca(&cn, now, 30).unwrap();
    let forged = crate::pki::crl_pem(&pem, &key, &[], 7, now).unwrap();
    std::fs::write(impostor.join("crl.pem"), forged).unwrap();
    expect(
        &impostor.join("crl.pem").display().to_string(),
        "key did not sign it",
    );
    // A CA of another name.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (pem, key) = crate::pki::new_ca("Other CA", time::OffsetDateTime::now_utc(), 30).unwrap();
    let crl = crate::pki::crl_pem(&pem, &key, &[], 1, time::OffsetDateTime::now_utc()).unwrap();
    std::fs::write(other.join("crl.pem"), crl).unwrap();
    expect(&other.join("crl.pem").display().to_string(), "not a CA in tls.ca");
    // A bundle of two CAs of one name (made alike): lists cannot be told apart.
    let twin = dir.path().join("twin");
    std::fs::create_dir_all(&twin).unwrap();
    let (a, a_key) = crate::pki::new_ca("Twin CA", now, 30).unwrap();
    let (b, _) = crate::pki::new_ca("Twin CA", now, 30).unwrap();
    let (leaf, leaf_key) = crate::pki::issue_pem(
        &a,
        &a_key,
        "blr",
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
    .unwrap();
    std::fs::write(twin.join("blr.pem"), leaf).unwrap();
    std::fs::write(twin.join("blr.key"), leaf_key).unwrap();
    std::fs::write(twin.join("ca.pem"), format!("{a}{b}")).unwrap();
    std::fs::write(
        twin.join("crl.pem"),
        crate::pki::crl_pem(&a, &a_key, &[], 1, now).unwrap(),
    )
    .unwrap();
    let t = |f: &str| twin.join(f).display().to_string();
    let errs = errors_with(
        dir.path(),
        &with_crl(&t("crl.pem"))
            .replace("certs/ca.pem", &t("ca.pem"))
            .replace("certs/blr.pem", &t("blr.pem"))
            .replace("certs/blr.key", &t("blr.key")),
        PEERS,
    );
    assert!(
        errs.len() == 1 && errs[0].contains("two different CAs named `CN=Twin CA"),
        "{errs:#?}"
    );

    // This PoP's own certificate on the list: valid (the direct path still
    // works), with a warning.
    crate::pki::revoke(&certs, Some("blr"), None, crate::pki::Reason::Unspecified).unwrap();
    std::fs::write(dir.path().join("agent.toml"), with_crl("certs/crl.pem")).unwrap();
    let c = load(dir.path()).unwrap();
    assert!(c.tls.as_ref().unwrap().own_revoked);
    let w = c.warnings();
    assert!(w.len() == 1 && w[0].contains("revoked"), "{w:?}");
}

#[test]
fn standby_probing_defaults_and_bounds() {
    let dir = setup();
    let c = load(dir.path()).unwrap();
    assert_eq!(c.health.watched, 4);
    assert_eq!(c.health.standby_interval, Duration::from_secs(5));
    let agent = VALID.replace(
        "interval = \"500ms\"",
        "interval = \"500ms\"\nwatched = 0\nstandby_interval = \"100ms\"",
    );
    let errs = errors_with(dir.path(), &agent, PEERS);
    assert!(
        errs.iter()
            .any(|e| e.contains("health.watched: must be at least 1")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("health.standby_interval: is shorter than health.interval")),
        "{errs:#?}"
    );
}

//! The `detour-agent` command line as an operator uses it.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_detour-agent"))
}

#[test]
fn pki_then_check_config_then_a_broken_edit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = agent()
        .args(["pki", "init", "--out"])
        .arg(d.join("certs"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A second init never overwrites the fleet CA.
    let again = agent()
        .args(["pki", "init", "--out"])
        .arg(d.join("certs"))
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    let out = agent()
        .args(["pki", "issue", "--ca"])
        .arg(d.join("certs"))
        .args(["--name", "blr", "--out"])
        .arg(d.join("certs"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.join("certs/blr.pem").exists() && d.join("certs/blr.key").exists());
    let bad_name = agent()
        .args(["pki", "issue", "--ca"])
        .arg(d.join("certs"))
        .args(["--name", "B L R", "--out"])
        .arg(d)
        .output()
        .unwrap();
    assert_eq!(bad_name.status.code(), Some(1));

    std::fs::write(
        d.join("agent.toml"),
        "pop = \"blr\"\n[listen]\nrelay = \"127.0.0.1:0\"\n[control_plane]\nurl = \"http://127.0.0.1:1\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/blr.pem\"\nkey = \"certs/blr.key\"\n[peers]\nfile = \"peers.toml\"\n",
    )
    .unwrap();
    std::fs::write(
        d.join("peers.toml"),
        "[[peer]]\nname = \"maa\"\nrelay = \"127.0.0.1:4443\"\n",
    )
    .unwrap();
    let ok = agent()
        .arg("check-config")
        .arg("--config")
        .arg(d.join("agent.toml"))
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("OK"));

    std::fs::write(
        d.join("peers.toml"),
        "[[peer]]\nname = \"maa\"\nrelay = \"127.0.0.1:4443\"\n[[peer]]\nname = \"maa\"\nrelay = \"nowhere\"\n",
    )
    .unwrap();
    let bad = agent()
        .arg("check-config")
        .arg("--config")
        .arg(d.join("agent.toml"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    let peers = d.join("peers.toml").display().to_string();
    assert!(
        stderr.contains(&format!("{peers}:5:8: peer.name: `maa` is listed twice")),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{peers}:6:9: peer.relay")), "{stderr}");
}

#[test]
fn status_says_clearly_when_no_agent_answers() {
    let out = agent()
        .args(["status", "--admin", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the agent's admin listener"));
}

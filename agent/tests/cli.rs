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

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on the admin listener, the body as text (None if it does not answer).
fn admin_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[tokio::test]
async fn sighup_reloads_the_running_agent_instead_of_killing_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let admin = free_port();
    std::fs::write(
        d.join("agent.toml"),
        format!(
            "pop = \"blr\"\n[listen]\nlocal = \"127.0.0.1:{}\"\nrelay = \"off\"\nadmin = \"127.0.0.1:{admin}\"\n\
             [control_plane]\nurl = \"http://127.0.0.1:9\"\nreport_interval = \"off\"\n[peers]\nfile = \"peers.toml\"\n",
            free_port()
        ),
    )
    .unwrap();
    std::fs::write(d.join("peers.toml"), "").unwrap();
    let mut child = agent()
        .args(["run", "--config"])
        .arg(d.join("agent.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let reloads_ok = || {
        admin_get(admin, "/metrics").map(|m| {
            m.lines()
                .filter(|l| l.starts_with("detour_config_reloads_total") && l.contains("result=\"ok\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while reloads_ok().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent's admin listener never answered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The signal handler is installed as the agent starts; give it a moment.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let before = reloads_ok().unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "SIGHUP killed the agent instead of reloading it"
        );
        if reloads_ok().is_some_and(|n| n > before) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload the config"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    child.kill().ok();
    child.wait().ok();
}

/// `status --watch` asks again every second: piped with `--json`, one line
/// per answer, from a stand-in admin listener that serves `/status`.
#[test]
fn status_watch_asks_again_every_second() {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let body = r#"{"pop":"blr","version":"0.1.0","active_path":"direct","paths":[]}"#;
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut head = [0u8; 1024];
            let _ = conn.read(&mut head);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let mut child = agent()
        .args(["status", "--watch", "--json", "--admin", &addr.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a first answer").unwrap();
    let second = lines.next();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let second = second
        .unwrap_or_else(|| panic!("no second answer: {}", String::from_utf8_lossy(&out.stderr)))
        .unwrap();
    for line in [first, second] {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["active_path"], "direct", "{line}");
    }
}

/// `pki revoke` writes the CA's list, `check-config` reads it from
/// `[tls] crl`: a list from the fleet CA passes, one listing this PoP's own
/// certificate passes with a warning, a broken one fails at its line.
#[test]
fn pki_revoke_then_check_config_reads_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = d.join("certs");
    let run = |args: &[&str]| {
        let out = agent().args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let c = certs.to_str().unwrap();
    assert_eq!(run(&["pki", "init", "--out", c]).0, Some(0));
    for pop in ["blr", "maa"] {
        assert_eq!(
            run(&["pki", "issue", "--ca", c, "--name", pop, "--out", c]).0,
            Some(0)
        );
    }
    let (code, out, err) = run(&[
        "pki",
        "revoke",
        "--ca",
        c,
        "--name",
        "maa",
        "--reason",
        "key-compromise",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("revoked maa") && out.contains("CRL number 1"),
        "{out}"
    );
    let (code, _, err) = run(&["pki", "revoke", "--ca", c]);
    assert_eq!(code, Some(2), "--name or --cert is required: {err}");

    let config = d.join("agent.toml");
    std::fs::write(
        &config,
        "pop = \"blr\"\n[control_plane]\nurl = \"http://127.0.0.1:1\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/blr.pem\"\nkey = \"certs/blr.key\"\ncrl = \"certs/crl.pem\"\n",
    )
    .unwrap();
    let check = || run(&["check-config", "--config", config.to_str().unwrap()]);
    let (code, out, err) = check();
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("OK") && err.is_empty(), "{out}{err}");

    assert_eq!(run(&["pki", "revoke", "--ca", c, "--name", "blr"]).0, Some(0));
    let (code, _, err) = check();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning: tls.cert: this PoP's certificate is revoked"),
        "{err}"
    );

    std::fs::write(certs.join("crl.pem"), "not a list\n").unwrap();
    let (code, _, err) = check();
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with(&format!("{}:8:7: tls.crl:", config.display())),
        "{err}"
    );
}

//! The fleet page in a real browser: headless Chromium (Debian's
//! `chromium`, driven by `playwright-core` from npm, tests/browser/) logs in
//! to the real control plane of a loopback fleet, sees blr, maa and del on
//! `direct`; blr's uplink is cut and the page shows blr via a peer with the
//! reason within a few seconds; healed, blr is back on `direct`; del's agent
//! stops and del turns stale. Chromium reaches nothing but loopback.
//!
//! `DETOUR_SCREENSHOT=docs/img/fleet-page.png` also writes the page during
//! the cut (the screenshot in docs/control-plane.md):
//!
//! ```text
//! DETOUR_SCREENSHOT=docs/img/fleet-page.png cargo nextest run -p detour-lab --test fleet_page
//! ```
//!
//! Without `node`, Chromium or tests/browser/node_modules the test prints
//! `SKIPPED: …` and passes; with `DETOUR_REQUIRE_TOOLS=1` (CI) it fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use detour_lab::fleet::{Fleet, FleetOptions};
use detour_lab::link::Fault;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

/// Agents report every this often here (10 s by default).
const REPORT_EVERY: &str = "1s";
/// What "within a few seconds" means for the page to show a change: the
/// agent's detection (about a second), its next report (1 s), the view's
/// cache (0.5 s) and the page's poll (1 s), with room for a busy machine.
const SHOWN_WITHIN: Duration = Duration::from_secs(10);

/// The browser's pieces, or why the test cannot run.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("`node --version` does not run (apt-get install nodejs)".into());
    }
    let chromium =
        std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    if !chromium.exists() {
        return Err(format!(
            "{} is missing (apt-get install chromium)",
            chromium.display()
        ));
    }
    let dir = repo().join("tests/browser");
    if !dir.join("node_modules/playwright-core").exists() {
        return Err(
            "tests/browser/node_modules/playwright-core is missing (npm ci --prefix tests/browser)".into(),
        );
    }
    Ok((chromium, dir.join("fleet_page.mjs")))
}

/// True when the browser can run. Otherwise prints SKIPPED and returns
/// false, or panics when the tools are required (CI).
fn have_browser() -> Option<(PathBuf, PathBuf)> {
    match browser() {
        Ok(b) => Some(b),
        Err(why) => {
            assert!(
                std::env::var("DETOUR_REQUIRE_TOOLS").as_deref() != Ok("1"),
                "the browser test is required (DETOUR_REQUIRE_TOOLS=1) but cannot run: {why}"
            );
            eprintln!("SKIPPED: the fleet page in Chromium: {why}");
            None
        }
    }
}

/// Reads the script's lines until `STEP <name>`; returns its details.
async fn expect_step(out: &mut Lines<BufReader<ChildStdout>>, name: &str, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let line = tokio::time::timeout_at(deadline, out.next_line())
            .await
            .unwrap_or_else(|_| panic!("the page did not reach `{name}` within {within:?}"))
            .expect("read the browser script")
            .unwrap_or_else(|| panic!("the browser script ended before `{name}`"));
        eprintln!("browser: {line}");
        if let Some(rest) = line.strip_prefix("FAIL ") {
            panic!("the browser script failed before `{name}`: {rest}");
        }
        if let Some(rest) = line.strip_prefix(&format!("STEP {name}")) {
            return rest.trim().to_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_page_shows_a_cut_a_heal_and_a_silent_pop() {
    let Some((chromium, script)) = have_browser() else {
        return;
    };
    let mut opts = FleetOptions {
        real_cp: true,
        cp_extra: "[fleet]\nstale_after = \"4s\"\n".into(),
        ..Default::default()
    };
    opts.extra.insert(
        "control_plane".into(),
        format!("report_interval = \"{REPORT_EVERY}\""),
    );
    let mut fleet = Fleet::start(opts).await.expect("fleet");
    let token = fleet.operator_token("noc").await.expect("operator token");
    let screenshot = std::env::var_os("DETOUR_SCREENSHOT").map(|p| {
        let p = PathBuf::from(p);
        if p.is_relative() { repo().join(p) } else { p }
    });
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .env("FLEET_URL", fleet.page_url())
        .env("FLEET_TOKEN", &token)
        .env("CHROMIUM", &chromium)
        .env("STEP_TIMEOUT_MS", SHOWN_WITHIN.as_millis().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(p) = &screenshot {
        cmd.env("SCREENSHOT", p);
    }
    let mut child = cmd.spawn().expect("start node");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    // Chromium's first start on a cold machine takes a few seconds.
    expect_step(&mut out, "login-required", Duration::from_secs(60)).await;
    expect_step(&mut out, "all-direct", Duration::from_secs(30)).await;

    fleet.pop("blr").uplink.set(Fault::Blackhole);
    let cut = Instant::now();
    stdin.write_all(b"cut\n").await.unwrap();
    let seen = expect_step(&mut out, "blr-detoured", SHOWN_WITHIN + Duration::from_secs(5)).await;
    let shown = cut.elapsed();
    eprintln!("blr shown via a peer {shown:?} after the cut: {seen}");
    assert!(shown <= SHOWN_WITHIN, "shown after {shown:?}");
    if screenshot.is_some() {
        expect_step(&mut out, "screenshot", Duration::from_secs(15)).await;
    }

    fleet.pop("blr").uplink.set(Fault::Pass);
    stdin.write_all(b"heal\n").await.unwrap();
    expect_step(&mut out, "blr-direct", Duration::from_secs(70)).await;

    fleet.stop_agent("del").await;
    stdin.write_all(b"silence\n").await.unwrap();
    expect_step(&mut out, "del-stale", SHOWN_WITHIN + Duration::from_secs(5)).await;

    stdin.write_all(b"done\n").await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the browser script ends")
        .expect("wait for node");
    assert!(status.success(), "the browser script failed: {status}");
    fleet.shutdown().await;
}

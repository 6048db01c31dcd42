//! `detour-lab bench compare`: Detour against HAProxy + Squid (the Exotel
//! design it replaces, see [`crate::haproxy_squid`]) on the same topology,
//! load and faults.
//!
//! Detour side: the lab's in-process fleet (blr, maa, del agents, a control
//! plane stand-in over TLS, a fault-injecting link on blr's uplink).
//! HAProxy + Squid side: the chain for blr in front of an in-process
//! stand-in, blr's Squid reaching it through the same kind of link.
//!
//! Both get the same steady load through blr and the same faults on blr's
//! uplink. The healthy-path overhead compares a `detour-agent` process and
//! the HAProxy + Squid processes against the stand-in reached directly.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;

use super::BenchArgs;
use super::faults::{Window, faults};
use crate::fleet::{Fleet, FleetOptions};
use crate::haproxy_squid::{Profile, start_chain};
use crate::link::{Fault, Link};
use crate::load::{CallResult, closed_loop, fixed_rate, q3};
use crate::mock_cp::{MockCp, MockCpProcess};
use crate::plot::{Panel, Point, Series};
use crate::process::{Proc, free_ports, loopback, rss_kib, sibling, spawn_agent, wait_listening};
use crate::report::{Table, machine, ms};

/// `detour-lab bench compare`.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let window = Window::new(args.seconds);
    let mut rows = Vec::new();
    let mut panels = Vec::new();
    for (name, fault) in faults() {
        let mut panel = Panel {
            title: format!("{name} on blr's uplink: latency of each request (× = failed)"),
            fault: (
                window.before.as_secs_f64(),
                (window.before + window.fault_for).as_secs_f64(),
            ),
            series: Vec::new(),
        };
        eprintln!("compare: Detour, {name} …");
        let results = detour_under(fault, &window).await?;
        rows.push(row("Detour", name, &results, &window));
        panel.series.push(series("Detour", &results));
        for profile in [Profile::Design, Profile::Tuned] {
            eprintln!("compare: {}, {name} …", profile.label());
            let results = chain_under(profile, fault, &window).await?;
            rows.push(row(profile.label(), name, &results, &window));
            panel.series.push(series(profile.label(), &results));
        }
        panels.push(panel);
    }
    let plotted = plot(args, &panels);

    eprintln!("compare: healthy-path overhead …");
    let healthy_rows = healthy_rows(Duration::from_secs(args.seconds.clamp(3, 10))).await?;
    let md = render(&window, &rows, plotted, &healthy_rows, &machine());
    args.publish("compare", &md)
}

/// Detour's fleet with `fault` on blr's uplink for the window.
async fn detour_under(fault: Fault, window: &Window) -> anyhow::Result<Vec<CallResult>> {
    let fleet = Fleet::start(FleetOptions {
        cp_tls: true,
        ..Default::default()
    })
    .await?;
    fleet.wait_all_up(Duration::from_secs(10)).await?;
    let blr = fleet.pop("blr");
    let set = |f| blr.uplink.set(f);
    let (results, ()) = window.run(&blr.local_url(), set, fault, tokio::time::sleep).await;
    fleet.shutdown().await;
    Ok(results)
}

/// HAProxy + Squid with `profile`, `fault` on blr's Squid's uplink.
async fn chain_under(profile: Profile, fault: Fault, window: &Window) -> anyhow::Result<Vec<CallResult>> {
    let cp = MockCp::start(None).await?;
    let link = Link::start(cp.addr).await?;
    let chain = start_chain(cp.addr, link.addr, profile).await?;
    let set = |f| link.set(f);
    let url = format!("http://{}", chain.frontend);
    let (results, ()) = window.run(&url, set, fault, tokio::time::sleep).await;
    drop(chain);
    Ok(results)
}

/// A system's requests as plot points.
fn series(label: &str, results: &[CallResult]) -> Series {
    let points: Vec<Point> = results
        .iter()
        .map(|r| (r.at.as_secs_f64(), r.latency.as_secs_f64() * 1000.0, r.ok()))
        .collect();
    Series {
        label: label.to_owned(),
        points,
    }
}

/// Draws the panels next to the doc (`img/compare.png`), or to the temporary
/// directory with `--no-write`; whether it worked.
fn plot(args: &BenchArgs, panels: &[Panel]) -> bool {
    // With --no-write the doc and its image stay as they are.
    let png = if args.no_write {
        std::env::temp_dir().join("detour-compare.png")
    } else {
        args.doc
            .parent()
            .unwrap_or(Path::new("."))
            .join("img")
            .join("compare.png")
    };
    match crate::plot::latency_png(&png, panels, 2000.0) {
        Ok(()) => {
            eprintln!("compare: plot written to {}", png.display());
            true
        }
        Err(e) => {
            eprintln!("compare: no plot: {e:#}");
            false
        }
    }
}

struct Row {
    system: String,
    fault: &'static str,
    requests: usize,
    failed: usize,
    reroute: Option<Duration>,
    during: (Duration, Duration, Duration),
}

/// One system under one fault; reroute = first request sent after the fault
/// began that was answered by another PoP.
fn row(system: &str, fault: &'static str, results: &[CallResult], window: &Window) -> Row {
    let during: Vec<&CallResult> = results.iter().filter(|r| window.during(r)).collect();
    let reroute = during
        .iter()
        .find(|r| r.ok() && r.path.as_deref().is_some_and(|p| p != "direct"))
        .map(|r| r.at - window.before);
    Row {
        system: system.to_owned(),
        fault,
        requests: results.len(),
        failed: results.iter().filter(|r| !r.ok()).count(),
        reroute,
        during: q3(&during),
    }
}

struct Healthy {
    target: &'static str,
    p50: Duration,
    p99: Duration,
    rps: f64,
    rss_mib: Option<f64>,
}

/// The healthy path, `dur` per measurement: the stand-in (its own process)
/// directly, through a `detour-agent` process, and through HAProxy + Squid.
async fn healthy_rows(dur: Duration) -> anyhow::Result<Vec<Healthy>> {
    let cp = MockCpProcess::start().await?;
    let mut rows = vec![healthy("control plane directly", cp.addr, &[], dur).await?];
    let dir = tempfile::tempdir()?;
    {
        let (agent, addr) = agent_process(cp.addr, dir.path()).await?;
        rows.push(healthy("Detour (`detour-agent`, direct path)", addr, &[agent.id()], dur).await?);
    }
    {
        let chain = start_chain(cp.addr, cp.addr, Profile::Design).await?;
        rows.push(
            healthy(
                "HAProxy + Squid (blr's HAProxy and Squid)",
                chain.frontend,
                &chain.blr_pids(),
                dur,
            )
            .await?,
        );
    }
    Ok(rows)
}

/// A fixed 1,000 requests/s for latency, then a closed loop of 100
/// connections for throughput and the peak RSS of `pids` meanwhile.
async fn healthy(
    name: &'static str,
    addr: SocketAddr,
    pids: &[u32],
    dur: Duration,
) -> anyhow::Result<Healthy> {
    let url = format!("http://{addr}");
    let _ = fixed_rate(&url, &[], 200, Duration::from_secs(1)).await;
    let (results, _) = fixed_rate(&url, &[], 1000, dur).await;
    let ok: Vec<&CallResult> = results.iter().filter(|r| r.ok()).collect();
    let (p50, p99, _) = q3(&ok);
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (pids, peak) = (pids.to_vec(), peak.clone());
        tokio::spawn(async move {
            loop {
                let now: u64 = pids.iter().map(|p| rss_kib(*p).0).sum();
                peak.fetch_max(now, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let (rps, _, _) = closed_loop(addr, "/v1/calls", &[], 100, dur).await?;
    sampler.abort();
    let kib = peak.load(Ordering::Relaxed);
    Ok(Healthy {
        target: name,
        p50,
        p99,
        rps,
        rss_mib: (!pids.is_empty()).then_some(kib as f64 / 1024.0),
    })
}

/// A single-PoP `detour-agent` process in front of `cp` (direct path only).
async fn agent_process(cp: SocketAddr, dir: &Path) -> anyhow::Result<(Proc, SocketAddr)> {
    let ports = free_ports(2)?;
    let (local, admin) = (ports[0], ports[1]);
    std::fs::write(dir.join("peers.toml"), "")?;
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "pop = \"blr\"\n[listen]\nlocal = \"127.0.0.1:{local}\"\nrelay = \"off\"\nadmin = \"127.0.0.1:{admin}\"\n\
             [control_plane]\nurl = \"http://{cp}\"\nreport_interval = \"off\"\n[peers]\nfile = \"peers.toml\"\n"
        ),
    )?;
    let agent = spawn_agent(&sibling("detour-agent")?, &dir.join("agent.toml"), None)?;
    let addr = loopback(local);
    wait_listening(addr).await.context("detour-agent")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok((agent, addr))
}

fn render(window: &Window, rows: &[Row], plotted: bool, healthy: &[Healthy], machine: &str) -> String {
    let mut md = String::new();
    md.push_str(&format!(
        "## Detour vs HAProxy + Squid (issue: the lab)\n\nMeasured {machine} with `cargo build --release -p detour-agent -p detour-lab && \
         target/release/detour-lab bench compare` ({} s of fault per run). Same load for every system: 50 small POSTs/s \
         through blr, 2 s client timeout, {} s healthy, the fault on blr's uplink, {} s healed; the faults come from the \
         same lab link (a blackhole holds every byte; loss stalls that share of chunks for 300 ms, like a retransmission). \
         HAProxy 2.6 and Squid 5.7 from Debian, configured as the Exotel design: HAProxy on blr with blr's Squid as its \
         server and maa's and del's Squids as `backup`, `option httpchk` through each Squid, `timeout server 2s`, \
         `retries 2`, `option redispatch`; the generated configs are in `tests/src/haproxy_squid.rs` (`haproxy_cfg`, \
         `squid_conf`) and are checked by `haproxy -c` and `squid -k parse` before every run and in a test. Detour's \
         control plane is reached over TLS end to end, HAProxy + Squid's over plain HTTP (Squid forwards it).\n\n",
        window.fault_for.as_secs(),
        window.before.as_secs(),
        window.after.as_secs(),
    ));
    md.push_str(&faults_table(rows));
    md.push_str(
        "\nLatencies during the fault include failed requests at the time they failed (at most the 2 s client \
         timeout).\n\n",
    );
    if plotted {
        md.push_str(
            "![Latency of each request over time, Detour and HAProxy + Squid, fault windows shaded](img/compare.png)\n\n",
        );
    }
    md.push_str(
        "### Healthy path\n\nA small POST to the plain-HTTP stand-in at a fixed 1,000 requests/s, then a \
         closed loop with 100 connections; memory is the peak RSS during the closed loop (for HAProxy + Squid, blr's \
         HAProxy plus blr's Squid).\n\n",
    );
    md.push_str(&healthy_table(healthy));
    md
}

fn faults_table(rows: &[Row]) -> String {
    let mut table = Table::new(&[
        "fault",
        "system",
        "requests",
        "failed",
        "success",
        "fault → answered via another PoP",
        "p50 / p99 / max during fault (ms)",
    ]);
    for r in rows {
        table.row(&[
            r.fault.to_owned(),
            r.system.clone(),
            r.requests.to_string(),
            r.failed.to_string(),
            format!(
                "{:.1}%",
                100.0 * (r.requests - r.failed) as f64 / r.requests.max(1) as f64
            ),
            r.reroute.map_or("never".to_owned(), |d| format!("{} ms", ms(d))),
            format!("{} / {} / {}", ms(r.during.0), ms(r.during.1), ms(r.during.2)),
        ]);
    }
    table.finish()
}

/// The healthy-path table; the first row (the stand-in directly) is the
/// baseline.
fn healthy_table(rows: &[Healthy]) -> String {
    let mut table = Table::new(&["target", "p50", "p99", "added p50", "closed loop", "peak RSS"]);
    let base = rows.first().map_or(Duration::ZERO, |h| h.p50);
    for h in rows {
        table.row(&[
            h.target.to_owned(),
            format!("{:.0} µs", h.p50.as_secs_f64() * 1e6),
            format!("{:.0} µs", h.p99.as_secs_f64() * 1e6),
            if h.p50 == base && h.rss_mib.is_none() {
                "—".to_owned()
            } else {
                format!("{:+.0} µs", (h.p50.as_secs_f64() - base.as_secs_f64()) * 1e6)
            },
            format!("{:.0} req/s", h.rps),
            h.rss_mib.map_or("—".to_owned(), |m| format!("{m:.1} MiB")),
        ]);
    }
    table.finish()
}

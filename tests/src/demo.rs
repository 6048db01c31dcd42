//! `detour-lab demo`: the scripted outage story on a loopback fleet — the real
//! control plane (embedded SQLite, HTTPS), agents for blr, maa and del, a
//! call handler's steady traffic through blr, and blr's uplink cut, made
//! lossy, healed, and a peer killed. A live timeline, then a table per phase.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http::Method;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::fleet::{Fleet, FleetOptions};
use crate::link::Fault;
use crate::load::{CallClient, CallResult};

/// Options of `detour-lab demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Seconds per phase.
    #[arg(long, default_value_t = 8)]
    pub duration: u64,
    /// Requests per second through blr.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Run one fault only (with a healthy phase before and a healed one after):
    /// cut, lossy, peer-dies.
    #[arg(long)]
    pub scenario: Option<String>,
    /// Print JSON lines (one per second and one per phase) instead of the timeline.
    #[arg(long)]
    pub json: bool,
    /// The same story in Linux network namespaces with nftables faults (root).
    #[arg(long)]
    pub netns: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    None,
    Cut,
    Lossy,
    Heal,
    KillPeer,
    RestartPeer,
}

struct Phase {
    name: &'static str,
    action: Action,
    story: &'static str,
}

fn script(scenario: Option<&str>) -> anyhow::Result<Vec<Phase>> {
    let p = |name, action, story| Phase { name, action, story };
    let all = vec![
        p("healthy", Action::None, "all paths up; blr uses its own uplink"),
        p("cut", Action::Cut, "blr's internet path cut (blackhole)"),
        p("restored", Action::Heal, "blr's uplink restored"),
        p(
            "lossy",
            Action::Lossy,
            "10% of blr's uplink exchanges stall (packet loss)",
        ),
        p(
            "restored",
            Action::Heal,
            "loss cleared; direct must stay clean 30 s before it is trusted",
        ),
        p(
            "peer-dies",
            Action::KillPeer,
            "the peer blr relies on most is killed",
        ),
        p("restored", Action::RestartPeer, "the peer is restarted"),
    ];
    let Some(s) = scenario else { return Ok(all) };
    let fault = match s {
        "cut" => p("cut", Action::Cut, "blr's internet path cut (blackhole)"),
        "lossy" => p(
            "lossy",
            Action::Lossy,
            "10% of blr's uplink exchanges stall (packet loss)",
        ),
        "peer-dies" => p(
            "peer-dies",
            Action::KillPeer,
            "the peer blr relies on most is killed",
        ),
        other => anyhow::bail!("unknown scenario `{other}`; choose cut, lossy or peer-dies"),
    };
    let heal = if fault.action == Action::KillPeer {
        Action::RestartPeer
    } else {
        Action::Heal
    };
    let mut v = vec![p("healthy", Action::None, "all paths up")];
    if fault.action == Action::KillPeer {
        // A peer only matters to blr while blr relies on it.
        v.push(p(
            "cut",
            Action::Cut,
            "blr's uplink cut, so blr relies on its peers",
        ));
    }
    v.push(fault);
    v.push(p("restored", heal, "healed"));
    Ok(v)
}

/// One phase's results.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSummary {
    pub phase: String,
    pub requests: usize,
    pub failed: usize,
    /// Seconds from the phase's fault to blr's active path changing, if it did.
    pub reroute_s: Option<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub switches: u64,
    /// blr's active path at the end of the phase.
    pub active_at_end: String,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

fn quantile_ms(lat: &[Duration], q: f64) -> f64 {
    if lat.is_empty() {
        return 0.0;
    }
    let mut v = lat.to_vec();
    v.sort();
    ms(v[((v.len() - 1) as f64 * q).round() as usize])
}

/// The seeded routing rules: a route per city prefix, emergency, and a catch-all.
const ROUTES: &[(&str, &str)] = &[
    (
        "blr-landline",
        r#"{"prefix": "+9180", "trunk": "blr-carrier-1", "pop": "blr"}"#,
    ),
    (
        "chennai-landline",
        r#"{"prefix": "+9144", "trunk": "maa-carrier-1", "pop": "maa"}"#,
    ),
    (
        "delhi-landline",
        r#"{"prefix": "+9111", "trunk": "del-carrier-1", "pop": "del"}"#,
    ),
    (
        "mobile",
        r#"{"prefix": "+919", "trunks": [{"name": "mobile-a", "weight": 70}, {"name": "mobile-b", "weight": 30}], "pop": "blr"}"#,
    ),
    (
        "emergency",
        r#"{"prefix": "112", "trunk": "psap-blr", "pop": "blr", "priority": "emergency"}"#,
    ),
    (
        "catch-all",
        r#"{"prefix": "", "trunk": "default-carrier", "pop": "blr"}"#,
    ),
];

const DESTINATIONS: &[&str] = &[
    "08041234567",
    "04423456789",
    "01123456789",
    "+919845012345",
    "9876501234",
];

/// Runs the demo; `Ok(true)` when no request failed.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    if args.netns {
        return crate::netns::demo(&args).await;
    }
    let phases = script(args.scenario.as_deref())?;
    let say = |line: String| {
        if !args.json {
            println!("{line}");
        }
    };
    say("starting: control plane (SQLite, HTTPS) + agents blr, maa, del on loopback…".to_owned());
    let mut fleet = Fleet::start(FleetOptions {
        real_cp: true,
        ..Default::default()
    })
    .await?;
    let blr_url = fleet.pop("blr").local_url();
    let client = CallClient::new(Duration::from_secs(2));
    let admin = fleet.admin_token.clone().unwrap_or_default();
    for (name, body) in ROUTES {
        let r = client
            .send(
                Method::PUT,
                &format!("{blr_url}/v1/routes/{name}"),
                &[
                    ("authorization", &format!("Bearer {admin}")),
                    ("content-type", "application/json"),
                ],
                Bytes::from(*body),
            )
            .await;
        anyhow::ensure!(
            r.ok(),
            "seeding route {name}: {:?} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    say(format!(
        "ready: {} routes; {} requests/s through blr ({}), 2 s client timeout, {} s per phase\n",
        ROUTES.len(),
        args.rate,
        blr_url,
        args.duration
    ));

    // Traffic: initiations (10% emergency) and events for calls already made.
    let (tx, mut rx) = mpsc::unbounded_channel::<CallResult>();
    let total = Duration::from_secs(args.duration * phases.len() as u64);
    let calls: Arc<Mutex<VecDeque<(String, &'static str)>>> = Arc::new(Mutex::new(VecDeque::new()));
    let start = Instant::now();
    let traffic = {
        let client = client.clone();
        let calls = calls.clone();
        let rate = args.rate.max(1);
        let url = blr_url.clone();
        tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / f64::from(rate));
            let count = (total.as_secs_f64() * f64::from(rate)) as u64;
            for n in 0..count {
                tokio::time::sleep_until(start + period.mul_f64(n as f64)).await;
                let client = client.clone();
                let tx = tx.clone();
                let calls = calls.clone();
                let url = url.clone();
                tokio::spawn(async move {
                    let at = start.elapsed();
                    let event_for = if n % 4 == 3 {
                        calls.lock().map(|mut c| c.pop_front()).ok().flatten()
                    } else {
                        None
                    };
                    let mut r = match event_for {
                        Some((id, kind)) => {
                            let body = format!("{{\"event\": \"{kind}\"}}");
                            client
                                .send(
                                    Method::POST,
                                    &format!("{url}/v1/calls/{id}/events"),
                                    &[("content-type", "application/json")],
                                    Bytes::from(body),
                                )
                                .await
                        }
                        None => {
                            let emergency = n % 10 == 0;
                            let dest = if emergency {
                                "112"
                            } else {
                                DESTINATIONS[(n as usize) % DESTINATIONS.len()]
                            };
                            let body = format!(
                                r#"{{"caller": "+919812345678", "destination": "{dest}", "call_type": "outbound"}}"#
                            );
                            let mut headers = vec![("content-type", "application/json")];
                            if emergency {
                                headers.push(("x-detour-priority", "emergency"));
                            }
                            let r = client
                                .send(
                                    Method::POST,
                                    &format!("{url}/v1/calls"),
                                    &headers,
                                    Bytes::from(body),
                                )
                                .await;
                            if r.status == Some(201)
                                && let Some(id) = serde_json::from_slice::<serde_json::Value>(&r.body)
                                    .ok()
                                    .and_then(|v| v["call_id"].as_str().map(str::to_owned))
                                && let Ok(mut c) = calls.lock()
                            {
                                c.push_back((id.clone(), "ringing"));
                                c.push_back((id.clone(), "answered"));
                                c.push_back((id, "completed"));
                                while c.len() > 300 {
                                    c.pop_front();
                                }
                            }
                            r
                        }
                    };
                    r.at = at;
                    let _ = tx.send(r);
                });
            }
        })
    };
    // `calls` holds (id, event) pairs.
    let _ = &calls;

    let mut summaries = Vec::new();
    let mut killed: Option<String> = None;
    let mut all_ok = true;
    let header = format!(
        "{:>5}  {:<10} {:<9} {:>4} {:>6} {:>8}  {}",
        "t", "phase", "active", "ok", "failed", "p99", "events"
    );
    say(header);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    'phases: for phase in &phases {
        let phase_start = Instant::now();
        let switches_before = fleet.pop("blr").agent().shared.metrics.path_switches.get();
        let active_before = active(&fleet);
        match phase.action {
            Action::None => {}
            Action::Cut => fleet.pop("blr").uplink.set(Fault::Blackhole),
            Action::Lossy => fleet.pop("blr").uplink.set(Fault::Lossy {
                percent: 10,
                stall: Duration::from_millis(300),
            }),
            Action::Heal => fleet.pop("blr").uplink.set(Fault::Pass),
            Action::KillPeer => {
                let victim = active_before.strip_prefix("via:").unwrap_or("maa").to_owned();
                fleet.stop_agent(&victim).await;
                killed = Some(victim);
            }
            Action::RestartPeer => {
                if let Some(v) = killed.take() {
                    fleet.restart_agent(&v).await?;
                }
            }
        }
        let mut events = vec![format!("{} — {}", phase.name, phase.story)];
        let mut reroute = None;
        let mut phase_results: Vec<CallResult> = Vec::new();
        let mut last_active = active_before.clone();
        for sec in 0..args.duration {
            let second_end = phase_start + Duration::from_secs(sec + 1);
            let mut this_second: Vec<CallResult> = Vec::new();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(second_end) => break,
                    Some(r) = rx.recv() => this_second.push(r),
                    _ = &mut interrupted => {
                        say("interrupted: shutting the fleet down".to_owned());
                        all_ok = false;
                        break 'phases;
                    }
                }
                let now_active = active(&fleet);
                if now_active != last_active {
                    if reroute.is_none() {
                        reroute = Some(phase_start.elapsed());
                    }
                    events.push(format!(
                        "switch {last_active} -> {now_active} after {:.2}s",
                        phase_start.elapsed().as_secs_f64()
                    ));
                    last_active = now_active;
                }
            }
            let failed = this_second.iter().filter(|r| !r.ok()).count();
            let lat: Vec<Duration> = this_second.iter().map(|r| r.latency).collect();
            let line = format!(
                "{:>4}s  {:<10} {:<9} {:>4} {:>6} {:>6.1}ms  {}",
                start.elapsed().as_secs(),
                phase.name,
                last_active,
                this_second.len() - failed,
                failed,
                quantile_ms(&lat, 0.99),
                events.join("; ")
            );
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"t": start.elapsed().as_secs(), "phase": phase.name, "active": last_active, "ok": this_second.len() - failed, "failed": failed, "p99_ms": quantile_ms(&lat, 0.99), "events": events})
                );
            } else {
                println!("{line}");
            }
            events.clear();
            phase_results.extend(this_second);
        }
        let lat: Vec<Duration> = phase_results.iter().map(|r| r.latency).collect();
        let failed = phase_results.iter().filter(|r| !r.ok()).count();
        all_ok &= failed == 0;
        summaries.push(PhaseSummary {
            phase: phase.name.to_owned(),
            requests: phase_results.len(),
            failed,
            reroute_s: reroute.map(|d| (d.as_secs_f64() * 100.0).round() / 100.0),
            p50_ms: quantile_ms(&lat, 0.5),
            p99_ms: quantile_ms(&lat, 0.99),
            max_ms: quantile_ms(&lat, 1.0),
            switches: fleet.pop("blr").agent().shared.metrics.path_switches.get() - switches_before,
            active_at_end: last_active,
        });
    }
    traffic.abort();
    // Requests still in flight finish within the client timeout.
    let drain_until = Instant::now() + Duration::from_millis(2500);
    while let Ok(Some(r)) = tokio::time::timeout_at(drain_until, rx.recv()).await {
        if !r.ok() {
            all_ok = false;
        }
    }
    fleet.shutdown().await;

    if args.json {
        for s in &summaries {
            println!("{}", serde_json::to_string(s)?);
        }
        println!("{}", serde_json::json!({"ok": all_ok}));
    } else {
        println!();
        println!(
            "{:<10} {:>8} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8}  active at end",
            "phase", "requests", "failed", "reroute", "p50", "p99", "max", "switches"
        );
        for s in &summaries {
            println!(
                "{:<10} {:>8} {:>6} {:>9} {:>6.1}ms {:>6.1}ms {:>6.1}ms {:>8}  {}",
                s.phase,
                s.requests,
                s.failed,
                s.reroute_s.map_or("-".to_owned(), |r| format!("{r:.2}s")),
                s.p50_ms,
                s.p99_ms,
                s.max_ms,
                s.switches,
                s.active_at_end
            );
        }
        let total: usize = summaries.iter().map(|s| s.requests).sum();
        let failed: usize = summaries.iter().map(|s| s.failed).sum();
        println!(
            "\n{total} requests, {failed} failed: {}",
            if all_ok { "PASS" } else { "FAIL" }
        );
    }
    Ok(all_ok)
}

fn active(fleet: &Fleet) -> String {
    fleet
        .pop("blr")
        .agent()
        .shared
        .forwarder
        .runtime()
        .health
        .snapshot()
        .active()
        .map_or_else(|| "none".to_owned(), |p| p.name.to_string())
}

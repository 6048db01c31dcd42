//! `detour-lab demo`: the scripted outage story on a loopback fleet — the real
//! control plane (embedded SQLite, HTTPS), agents for blr, maa and del, a
//! call handler's steady traffic through blr, and blr's uplink cut, made
//! lossy, healed, and a peer killed. A live timeline, then a table per phase.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::DemoArgs;
use super::recordings::Recordings;
use super::traffic::{ROUTES, seed_routes};
use crate::fleet::{Fleet, FleetOptions};
use crate::link::Fault;
use crate::load::{CallClient, CallResult, Latencies};

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
    ms(Latencies::new(lat.iter().copied()).at(q))
}

/// Prints a line of the timeline (not with `--json`).
fn say(args: &DemoArgs, line: &str) {
    if !args.json {
        println!("{line}");
    }
}

/// Runs the demo on loopback; `Ok(true)` when no request failed.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let phases = script(args.scenario.as_deref())?;
    say(
        &args,
        "starting: control plane (SQLite, HTTPS) + agents blr, maa, del on loopback…",
    );
    let recordings = match Recordings::start().await? {
        Ok(r) => Some(r),
        Err(why) => {
            say(&args, &format!("recordings: left out of this run ({why})"));
            None
        }
    };
    let defaults = FleetOptions::default();
    let mut extra = defaults.extra.clone();
    // Every second, so the fleet page follows the story as it happens.
    extra.insert("control_plane".into(), "report_interval = \"1s\"".into());
    let mut fleet = Fleet::start(FleetOptions {
        real_cp: true,
        tail: recordings
            .as_ref()
            .map(|r| r.tails(&defaults.pops))
            .unwrap_or_default(),
        extra,
        cp_extra: "[fleet]\nstale_after = \"5s\"\n".into(),
        ..defaults
    })
    .await?;
    let operator = fleet.operator_token("demo").await?;
    let blr_url = fleet.pop("blr").local_url();
    let client = CallClient::new(Duration::from_secs(2));
    let admin = fleet.admin_token.clone().unwrap_or_default();
    seed_routes(&client, &blr_url, &admin).await?;
    say(
        &args,
        &format!(
            "ready: {} routes; {} requests/s through blr ({}), 2 s client timeout, {} s per phase",
            ROUTES.len(),
            args.rate,
            blr_url,
            args.duration
        ),
    );
    say(
        &args,
        &format!(
            "fleet page: {}  (log in with operator token {operator}; the certificate is the lab CA's, \
             {}/certs/ca.pem: let the browser accept it)\n",
            fleet.page_url(),
            fleet.dir.path().display()
        ),
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({"fleet_page": fleet.page_url(), "operator_token": operator})
        );
    }

    // Traffic: initiations (10% emergency) and events for calls already made.
    let total = Duration::from_secs(args.duration * phases.len() as u64);
    let (traffic, rx, start) = super::traffic::spawn(client, blr_url, args.rate, total);
    let writer = recordings.as_ref().map(|r| {
        say(
            &args,
            "recordings: blr's call handler leaves one every 2 s; blr carries them to the bucket over its paths\n",
        );
        r.spawn_writer(&fleet, total)
    });
    let mut timeline = Timeline {
        args: &args,
        rx,
        start,
        killed: None,
        recordings: recordings.as_ref(),
    };
    let mut summaries = Vec::new();
    let mut all_ok = true;
    say(
        &args,
        &format!(
            "{:>5}  {:<10} {:<9} {:>4} {:>6} {:>8}  {}",
            "t", "phase", "active", "ok", "failed", "p99", "events"
        ),
    );
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    for phase in &phases {
        let Some(s) = timeline.phase(&mut fleet, phase, &mut interrupted).await? else {
            say(&args, "interrupted: shutting the fleet down");
            all_ok = false;
            break;
        };
        all_ok &= s.failed == 0;
        summaries.push(s);
    }
    traffic.abort();
    // Requests still in flight finish within the client timeout.
    let drain_until = Instant::now() + Duration::from_millis(2500);
    while let Ok(Some(r)) = tokio::time::timeout_at(drain_until, timeline.rx.recv()).await {
        if !r.ok() {
            all_ok = false;
        }
    }
    let outcome = match (&recordings, writer) {
        (Some(r), Some(writer)) => {
            writer.abort();
            Some(r.finish(&fleet, Duration::from_secs(60)).await?)
        }
        _ => None,
    };
    if args.hold && story_finished(&summaries, &phases) {
        say(
            &args,
            &format!(
                "\nthe fleet keeps running for the page ({}); Ctrl-C to stop",
                fleet.page_url()
            ),
        );
        tokio::signal::ctrl_c().await.ok();
    }
    fleet.shutdown().await;
    if let Some(o) = &outcome {
        all_ok &= o.stored == o.written;
    }
    print_summaries(&args, &summaries, outcome.as_ref(), all_ok)?;
    Ok(all_ok)
}

/// Whether the story ran to its end (it was not interrupted).
fn story_finished(summaries: &[PhaseSummary], phases: &[Phase]) -> bool {
    summaries.len() == phases.len()
}

/// The story as it is told: results arriving, the killed peer to restart.
struct Timeline<'a> {
    args: &'a DemoArgs,
    rx: mpsc::UnboundedReceiver<CallResult>,
    /// When the traffic started: the timeline's `t`.
    start: Instant,
    /// The peer a `KillPeer` phase stopped, for the `RestartPeer` after it.
    killed: Option<String>,
    /// blr's way to the object store shares its uplink's faults.
    recordings: Option<&'a Recordings>,
}

impl Timeline<'_> {
    /// Runs one phase: its action, then a line a second while it lasts.
    /// `None` when interrupted.
    async fn phase(
        &mut self,
        fleet: &mut Fleet,
        phase: &Phase,
        interrupted: &mut (impl Future<Output = std::io::Result<()>> + Unpin),
    ) -> anyhow::Result<Option<PhaseSummary>> {
        let phase_start = Instant::now();
        let switches_before = fleet.pop("blr").agent().shared.metrics.path_switches.get();
        let active_before = active(fleet);
        self.act(fleet, phase.action, &active_before).await?;
        let mut watch = Watch {
            phase_start,
            last_active: active_before,
            reroute: None,
            events: vec![format!("{} — {}", phase.name, phase.story)],
        };
        let mut phase_results: Vec<CallResult> = Vec::new();
        for sec in 0..self.args.duration {
            let second_end = phase_start + Duration::from_secs(sec + 1);
            let mut this_second: Vec<CallResult> = Vec::new();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(second_end) => break,
                    Some(r) = self.rx.recv() => this_second.push(r),
                    _ = &mut *interrupted => return Ok(None),
                }
                watch.look(fleet);
            }
            self.print_second(phase, &watch, &this_second);
            watch.events.clear();
            phase_results.extend(this_second);
        }
        let lat: Vec<Duration> = phase_results.iter().map(|r| r.latency).collect();
        Ok(Some(PhaseSummary {
            phase: phase.name.to_owned(),
            requests: phase_results.len(),
            failed: phase_results.iter().filter(|r| !r.ok()).count(),
            reroute_s: watch.reroute.map(|d| (d.as_secs_f64() * 100.0).round() / 100.0),
            p50_ms: quantile_ms(&lat, 0.5),
            p99_ms: quantile_ms(&lat, 0.99),
            max_ms: quantile_ms(&lat, 1.0),
            switches: fleet.pop("blr").agent().shared.metrics.path_switches.get() - switches_before,
            active_at_end: watch.last_active,
        }))
    }

    /// Does what a phase does to the fleet.
    async fn act(&mut self, fleet: &mut Fleet, action: Action, active_before: &str) -> anyhow::Result<()> {
        let uplink = |fault: Fault| {
            fleet.pop("blr").uplink.set(fault);
            if let Some(r) = self.recordings {
                r.set(fault);
            }
        };
        match action {
            Action::None => {}
            Action::Cut => uplink(Fault::Blackhole),
            Action::Lossy => uplink(Fault::Lossy {
                percent: 10,
                stall: Duration::from_millis(300),
            }),
            Action::Heal => uplink(Fault::Pass),
            Action::KillPeer => {
                let victim = active_before.strip_prefix("via:").unwrap_or("maa").to_owned();
                fleet.stop_agent(&victim).await;
                self.killed = Some(victim);
            }
            Action::RestartPeer => {
                if let Some(v) = self.killed.take() {
                    fleet.restart_agent(&v).await?;
                }
            }
        }
        Ok(())
    }

    /// The second's line: a timeline row, or a JSON line with `--json`.
    fn print_second(&self, phase: &Phase, watch: &Watch, this_second: &[CallResult]) {
        let failed = this_second.iter().filter(|r| !r.ok()).count();
        let lat: Vec<Duration> = this_second.iter().map(|r| r.latency).collect();
        if self.args.json {
            println!(
                "{}",
                serde_json::json!({"t": self.start.elapsed().as_secs(), "phase": phase.name, "active": watch.last_active, "ok": this_second.len() - failed, "failed": failed, "p99_ms": quantile_ms(&lat, 0.99), "events": watch.events})
            );
        } else {
            println!(
                "{:>4}s  {:<10} {:<9} {:>4} {:>6} {:>6.1}ms  {}",
                self.start.elapsed().as_secs(),
                phase.name,
                watch.last_active,
                this_second.len() - failed,
                failed,
                quantile_ms(&lat, 0.99),
                watch.events.join("; ")
            );
        }
    }
}

/// blr's active path during a phase, and what happened to it.
struct Watch {
    phase_start: Instant,
    last_active: String,
    /// From the phase's start to the first change of path.
    reroute: Option<Duration>,
    /// For the current second's line.
    events: Vec<String>,
}

impl Watch {
    /// Notes a change of blr's active path since the last look.
    fn look(&mut self, fleet: &Fleet) {
        let now_active = active(fleet);
        if now_active != self.last_active {
            if self.reroute.is_none() {
                self.reroute = Some(self.phase_start.elapsed());
            }
            self.events.push(format!(
                "switch {} -> {now_active} after {:.2}s",
                self.last_active,
                self.phase_start.elapsed().as_secs_f64()
            ));
            self.last_active = now_active;
        }
    }
}

/// The table of phases at the end (JSON lines with `--json`).
fn print_summaries(
    args: &DemoArgs,
    summaries: &[PhaseSummary],
    recordings: Option<&super::recordings::Outcome>,
    all_ok: bool,
) -> anyhow::Result<()> {
    if args.json {
        for s in summaries {
            println!("{}", serde_json::to_string(s)?);
        }
        if let Some(o) = recordings {
            println!(
                "{}",
                serde_json::json!({"recordings": {"written": o.written, "stored": o.stored, "bytes_by_path": o.bytes_by_path}})
            );
        }
        println!("{}", serde_json::json!({"ok": all_ok}));
        return Ok(());
    }
    println!();
    println!(
        "{:<10} {:>8} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8}  active at end",
        "phase", "requests", "failed", "reroute", "p50", "p99", "max", "switches"
    );
    for s in summaries {
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
    if let Some(o) = recordings {
        let paths: Vec<String> = o
            .bytes_by_path
            .iter()
            .map(|(p, b)| format!("{p} {:.1} MB", *b as f64 / 1e6))
            .collect();
        println!(
            "\nrecordings: {} written, {} in the bucket whole and on their calls; carried over {}",
            o.written,
            o.stored,
            paths.join(", ")
        );
    }
    let total: usize = summaries.iter().map(|s| s.requests).sum();
    let failed: usize = summaries.iter().map(|s| s.failed).sum();
    println!(
        "\n{total} requests, {failed} failed: {}",
        if all_ok { "PASS" } else { "FAIL" }
    );
    Ok(())
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

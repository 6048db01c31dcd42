//! `detour-lab bench scale`: the agent and the control plane at fleet size.
//!
//! The agent half: one "hub" agent with 100 peers, each peer ("spoke") a
//! real `detour-agent` release process whose only peer is the hub, in front
//! of the control-plane stand-in (`detour-lab mock-cp`, its own process,
//! HTTPS).
//! The hub's `direct` path goes through a lab [`Link`] in this process, so
//! the bench can blackhole it. Measured: the hub's CPU with only its own 101
//! paths probed (the spokes have no peers yet), then with its relay carrying
//! the spokes' probe tunnels (their `via:hub` paths), its RSS, and failovers
//! under a light load when its uplink is blackholed.
//!
//! The control-plane half is `bench fleet`'s measurement on SQLite (1,000
//! PoPs reporting every 5 s, pages open): [`super::fleet::measure`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use detour_wire::{AgentReport, PathState};
use tokio::time::Instant;

use super::BenchArgs;
use super::fleet::{self, Reading};
use crate::fleet::CP_HOST;
use crate::link::{Fault, Link};
use crate::load::{Latencies, fixed_rate};
use crate::mock_cp::MockCpProcess;
use crate::process::{Proc, cpu_us, free_ports, loopback, rss_kib, sibling, spawn_agent, wait_listening};
use crate::report::{Table, machine, ms};

/// Peers of the hub, each its own agent process.
const SPOKES: usize = 100;
/// The light load through the hub while its uplink is cut.
const LOAD_RATE: u32 = 50;
/// How long the load runs in one failover round; the cut comes
/// [`CUT_AFTER`] into it and lasts to the end.
const LOAD_FOR: Duration = Duration::from_secs(6);
const CUT_AFTER: Duration = Duration::from_secs(2);
/// How long the hub may take to see all its paths up, or its tunnels open.
const SETTLE_WITHIN: Duration = Duration::from_secs(90);
/// How long the hub may take to return to `direct` after a heal (its
/// hold-down grows with each cut, up to `health.hold_down_max`).
const RETURN_WITHIN: Duration = Duration::from_secs(90);

/// The issue's goals for the hub.
const GOAL_CPU_PCT: f64 = 2.0;
const GOAL_RSS_MIB: f64 = 32.0;
const GOAL_FAILOVER: Duration = Duration::from_secs(1);

/// `detour-lab bench scale`.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let machine = machine();
    let hub = hub_half(args).await?;
    println!("scale: the control plane with {} PoPs …", args.pops);
    let cp = fleet::measure(args, None).await?;
    args.publish("scale", &render(args, &machine, &hub, &cp))
}

/// What the hub did.
struct HubReading {
    /// Share of one core (%) with its 101 paths probed and no tunnels.
    probe_cpu: f64,
    /// The spokes' CPU in the same window, all together (% of one core).
    spokes_cpu: f64,
    /// Share of one core (%) with the relay carrying the spokes' tunnels.
    relay_cpu: f64,
    /// Tunnels open through the hub's relay in that window.
    tunnels: u64,
    /// RSS after the steady windows and the high-water mark at the end, KiB.
    rss_kib: u64,
    hwm_kib: u64,
    rounds: Vec<Round>,
    /// Why the failover rounds stopped early, if they did.
    cut_short: Option<String>,
}

/// One failover: the uplink blackholed under [`LOAD_RATE`] requests/s.
struct Round {
    /// From the cut until `/status` names a `via:` path active.
    switched: Option<Duration>,
    /// The path it switched to.
    to: String,
    requests: usize,
    failed: usize,
    p99: Duration,
    max: Duration,
}

/// The hub, its spokes and the uplink; every process is killed on drop.
struct Mesh {
    _cp: MockCpProcess,
    uplink: Link,
    hub: Proc,
    hub_local: SocketAddr,
    hub_admin: SocketAddr,
    hub_relay: SocketAddr,
    spokes: Vec<Proc>,
    /// Each spoke's admin listener.
    spoke_admins: Vec<SocketAddr>,
    /// Each spoke's directory (its peers file is rewritten to add the hub).
    spoke_dirs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

/// A spoke's name: `s000` … `s099`.
fn spoke_name(i: usize) -> String {
    format!("s{i:03}")
}

/// Ports an agent listens on.
struct Ports {
    local: u16,
    relay: u16,
    admin: u16,
}

impl Ports {
    fn free() -> anyhow::Result<Ports> {
        let p = free_ports(3)?;
        Ok(Ports {
            local: p[0],
            relay: p[1],
            admin: p[2],
        })
    }
}

/// An agent.toml: this PoP on `ports`, the control plane at [`CP_HOST`]
/// (port `cp_port`, dialled at `dial`), certificates in `../certs`.
fn agent_toml(pop: &str, ports: &Ports, cp_port: u16, dial: SocketAddr) -> String {
    format!(
        "pop = \"{pop}\"\n\
         [listen]\nlocal = \"127.0.0.1:{}\"\nrelay = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{}\"\n\
         [control_plane]\nurl = \"https://{CP_HOST}:{cp_port}\"\naddresses = [\"{dial}\"]\nca = \"../certs/ca.pem\"\n\
         [tls]\nca = \"../certs/ca.pem\"\ncert = \"../certs/{pop}.pem\"\nkey = \"../certs/{pop}.key\"\n\
         [peers]\nfile = \"peers.toml\"\n\
         [upgrade]\ndir = \"run\"\n",
        ports.local, ports.relay, ports.admin
    )
}

fn peer_entry(name: &str, relay: SocketAddr) -> String {
    format!("[[peer]]\nname = \"{name}\"\nrelay = \"{relay}\"\n\n")
}

/// Starts the stand-in, the spokes (no peers yet) and the hub (every spoke
/// its peer, its uplink through a [`Link`]), and waits until the hub sees
/// all 101 paths up.
async fn start_mesh(args: &BenchArgs) -> anyhow::Result<Mesh> {
    let bin = sibling("detour-agent")?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let certs = d.join("certs");
    detour_agent::pki::init(&certs)?;
    detour_agent::pki::issue(&certs, "hub", &certs, 30)?;
    for i in 0..SPOKES {
        detour_agent::pki::issue(&certs, &spoke_name(i), &certs, 30)?;
    }
    // HTTPS, as a real control plane: every probe pays its TLS, and inside
    // a peer's tunnel the TLS runs over the mesh's own.
    crate::fleet::cp_cert(&certs, CP_HOST, "cp")?;
    let cp = MockCpProcess::start_with(Some((&certs.join("cp.pem"), &certs.join("cp.key")))).await?;
    let uplink = Link::start(cp.addr).await?;

    let mut spokes = Vec::with_capacity(SPOKES);
    let mut spoke_dirs = Vec::with_capacity(SPOKES);
    let mut spoke_admins = Vec::with_capacity(SPOKES);
    let mut hub_peers = String::new();
    for i in 0..SPOKES {
        let name = spoke_name(i);
        let sd = d.join(&name);
        std::fs::create_dir_all(&sd)?;
        std::fs::write(sd.join("peers.toml"), "")?;
        let (proc, ports) =
            start_agent(&bin, &sd, &name, cp.addr.port(), cp.addr, args.agent_threads).await?;
        spokes.push(proc);
        hub_peers.push_str(&peer_entry(&name, loopback(ports.relay)));
        spoke_admins.push(loopback(ports.admin));
        spoke_dirs.push(sd);
    }
    let hd = d.join("hub");
    std::fs::create_dir_all(&hd)?;
    std::fs::write(hd.join("peers.toml"), hub_peers)?;
    let (hub, ports) = start_agent(&bin, &hd, "hub", cp.addr.port(), uplink.addr, args.agent_threads).await?;
    let mesh = Mesh {
        _cp: cp,
        uplink,
        hub,
        hub_local: loopback(ports.local),
        hub_admin: loopback(ports.admin),
        hub_relay: loopback(ports.relay),
        spokes,
        spoke_admins,
        spoke_dirs,
        _dir: dir,
    };
    let http = client()?;
    let deadline = Instant::now() + SETTLE_WITHIN;
    loop {
        let report = status(&http, mesh.hub_admin).await;
        let up = report
            .as_ref()
            .map_or(0, |r| r.paths.iter().filter(|p| p.state == PathState::Up).count());
        if up == SPOKES + 1 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the hub saw {up} of {} paths up after {SETTLE_WITHIN:?}",
                SPOKES + 1
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(mesh)
}

/// Starts `pop`'s agent from `dir` (its peers file already there) on
/// fresh ports and waits until it listens on all three. A port taken
/// between [`free_ports`] and the agent's bind makes it exit: then again on
/// other ports, three tries in all.
async fn start_agent(
    bin: &Path,
    dir: &Path,
    pop: &str,
    cp_port: u16,
    dial: SocketAddr,
    threads: Option<u16>,
) -> anyhow::Result<(Proc, Ports)> {
    let mut last = None;
    for _ in 0..3 {
        let ports = Ports::free()?;
        std::fs::write(dir.join("agent.toml"), agent_toml(pop, &ports, cp_port, dial))?;
        let mut proc = spawn_agent(bin, &dir.join("agent.toml"), threads)?;
        let mut listening = Ok(());
        for port in [ports.local, ports.relay, ports.admin] {
            listening = listening.and(wait_listening(loopback(port)).await);
        }
        match (listening, proc.0.try_wait()) {
            (Ok(()), Ok(None)) => return Ok((proc, ports)),
            (Err(e), _) => last = Some(e),
            (Ok(()), exited) => last = Some(anyhow::anyhow!("it exited: {exited:?}")),
        }
    }
    Err(last
        .unwrap_or_else(|| anyhow::anyhow!("no try"))
        .context(format!("starting {pop}'s agent")))
}

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()?)
}

/// The hub's `/status`, or `None` when it does not answer.
async fn status(http: &reqwest::Client, admin: SocketAddr) -> Option<AgentReport> {
    let r = http.get(format!("http://{admin}/status")).send().await.ok()?;
    r.json().await.ok()
}

/// `detour_relay_tunnels_active` on an agent's `/metrics`.
async fn open_tunnels(http: &reqwest::Client, admin: SocketAddr) -> u64 {
    let Ok(r) = http.get(format!("http://{admin}/metrics")).send().await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    // `detour_relay_tunnels_active{pop="hub"} 100`
    text.lines()
        .filter(|l| l.starts_with("detour_relay_tunnels_active"))
        .find_map(|l| l.rsplit(' ').next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// CPU time over wall time of `pids` during `dur`, as % of one core.
async fn cpu_share(pids: &[u32], dur: Duration) -> f64 {
    let sum = || pids.iter().map(|p| cpu_us(*p)).sum::<u64>();
    let (before, t0) = (sum(), Instant::now());
    tokio::time::sleep(dur).await;
    let used = sum().saturating_sub(before);
    used as f64 / t0.elapsed().as_micros().max(1) as f64 * 100.0
}

async fn hub_half(args: &BenchArgs) -> anyhow::Result<HubReading> {
    let dur = Duration::from_secs(args.seconds);
    println!("scale: a hub with {SPOKES} peers, each its own agent …");
    let mesh = start_mesh(args).await?;
    let http = client()?;
    let hub = mesh.hub.id();
    let spokes: Vec<u32> = mesh.spokes.iter().map(Proc::id).collect();
    // Past start-up: pools warm, every path's first probes behind it.
    tokio::time::sleep(Duration::from_secs(5)).await;

    println!("scale: the hub probing its {} paths, {dur:?} …", SPOKES + 1);
    let sum = |pids: &[u32]| pids.iter().map(|p| cpu_us(*p)).sum::<u64>();
    let (s0, t0) = (sum(&spokes), Instant::now());
    let probe_cpu = cpu_share(&[hub], dur).await;
    let spokes_cpu = sum(&spokes).saturating_sub(s0) as f64 / t0.elapsed().as_micros().max(1) as f64 * 100.0;
    println!("scale: probes: {probe_cpu:.2}% of a core (spokes together {spokes_cpu:.1}%)");

    // Every spoke takes the hub as its peer; their `via:hub` probes open a
    // tunnel each through the hub's relay.
    for sd in &mesh.spoke_dirs {
        std::fs::write(sd.join("peers.toml"), peer_entry("hub", mesh.hub_relay))?;
    }
    let deadline = Instant::now() + SETTLE_WITHIN;
    while open_tunnels(&http, mesh.hub_admin).await < SPOKES as u64 {
        if Instant::now() > deadline {
            // What the first spoke thinks of its path through the hub.
            let first = status(&http, mesh.spoke_admins[0]).await.map(|r| {
                r.paths
                    .iter()
                    .map(|p| {
                        format!(
                            "{} {:?} {}",
                            p.path,
                            p.state,
                            p.reason.clone().unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            });
            bail!(
                "{} of {SPOKES} tunnels through the hub after {SETTLE_WITHIN:?}; {}: {}",
                open_tunnels(&http, mesh.hub_admin).await,
                spoke_name(0),
                first.unwrap_or_else(|| "no /status".to_owned())
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!("scale: the hub's relay carrying the spokes' tunnels, {dur:?} …");
    let relay_cpu = cpu_share(&[hub], dur).await;
    let tunnels = open_tunnels(&http, mesh.hub_admin).await;
    println!("scale: with {tunnels} tunnels: {relay_cpu:.2}% of a core");
    let (steady_kib, _) = rss_kib(hub);

    let mut rounds = Vec::new();
    let mut cut_short = None;
    for n in 0..args.runs.max(1) {
        println!("scale: failover {} of {} …", n + 1, args.runs.max(1));
        let round = failover(&mesh, &http).await?;
        mesh.uplink.set(Fault::Pass);
        rounds.push(round);
        if let Err(e) = back_on_direct(&http, mesh.hub_admin).await {
            cut_short = Some(format!("{e:#}"));
            break;
        }
    }
    let (_, hwm_kib) = rss_kib(hub);
    Ok(HubReading {
        probe_cpu,
        spokes_cpu,
        relay_cpu,
        tunnels,
        rss_kib: steady_kib,
        hwm_kib,
        rounds,
        cut_short,
    })
}

/// One round: [`LOAD_RATE`] requests/s through the hub's local entry point
/// for [`LOAD_FOR`], its uplink blackholed [`CUT_AFTER`] in; how long until
/// its `/status` names a `via:` path active, and what the requests saw.
async fn failover(mesh: &Mesh, http: &reqwest::Client) -> anyhow::Result<Round> {
    let url = format!("http://{}", mesh.hub_local);
    let load = tokio::spawn(async move { fixed_rate(&url, &[], LOAD_RATE, LOAD_FOR).await });
    tokio::time::sleep(CUT_AFTER).await;
    mesh.uplink.set(Fault::Blackhole);
    let cut = Instant::now();
    let mut switched = None;
    let mut to = String::new();
    while cut.elapsed() < LOAD_FOR {
        if let Some(active) = status(http, mesh.hub_admin).await.and_then(|r| r.active_path)
            && active.starts_with("via:")
        {
            switched = Some(cut.elapsed());
            to = active;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (results, failed) = load.await.context("the load task")?;
    let lat = Latencies::new(results.iter().filter(|r| r.ok()).map(|r| r.latency));
    Ok(Round {
        switched,
        to,
        requests: results.len(),
        failed,
        p99: lat.at(0.99),
        max: lat.at(1.0),
    })
}

/// Waits (at most [`RETURN_WITHIN`]) until the hub is on `direct` again.
async fn back_on_direct(http: &reqwest::Client, admin: SocketAddr) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let report = status(http, admin).await;
        let active = report.as_ref().and_then(|r| r.active_path.clone());
        if active.as_deref() == Some("direct") {
            return Ok(());
        }
        if started.elapsed() > RETURN_WITHIN {
            let direct = report
                .iter()
                .flat_map(|r| &r.paths)
                .find(|p| p.path == "direct")
                .map(|p| format!("{} ({})", p.state.as_str(), p.reason.clone().unwrap_or_default()))
                .unwrap_or_default();
            bail!(
                "the hub was not back on `direct` {RETURN_WITHIN:?} after the heal (active: {}; `direct`: {direct})",
                active.unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

fn render(args: &BenchArgs, machine: &str, hub: &HubReading, cp: &Reading) -> String {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let switched: Vec<Duration> = hub.rounds.iter().filter_map(|r| r.switched).collect();
    let worst = switched.iter().max().copied();
    let all_switched = switched.len() == hub.rounds.len() && !hub.rounds.is_empty();
    let failed: usize = hub.rounds.iter().map(|r| r.failed).sum();
    let requests: usize = hub.rounds.iter().map(|r| r.requests).sum();

    let mut t = Table::new(&["the hub (100 peers)", "reading", "goal"]);
    t.row(&[
        format!(
            "CPU, probes only ({} paths, no tunnels), share of one core",
            SPOKES + 1
        ),
        format!("{:.2}%", hub.probe_cpu),
        format!("≤ {GOAL_CPU_PCT}%: {}", met(hub.probe_cpu <= GOAL_CPU_PCT)),
    ]);
    t.row(&[
        format!(
            "CPU, probes and the relay carrying {} tunnels (the spokes' `via:hub` probes)",
            hub.tunnels
        ),
        format!("{:.2}%", hub.relay_cpu),
        String::new(),
    ]);
    t.row(&[
        "RSS after both windows / high-water mark at the end".to_owned(),
        format!("{:.1} / {:.1} MiB", mib(hub.rss_kib), mib(hub.hwm_kib)),
        format!("≤ {GOAL_RSS_MIB} MiB: {}", met(mib(hub.hwm_kib) <= GOAL_RSS_MIB)),
    ]);
    t.row(&[
        format!(
            "failover: uplink blackholed under {LOAD_RATE} req/s, until `/status` names a `via:` path (worst of {})",
            hub.rounds.len()
        ),
        worst.map_or("never".to_owned(), |w| format!("{} ms", ms(w))),
        format!(
            "≤ 1 s: {}",
            met(all_switched && worst.is_some_and(|w| w <= GOAL_FAILOVER))
        ),
    ]);
    t.row(&[
        "failed requests in those rounds".to_owned(),
        format!("{failed} of {requests}"),
        String::new(),
    ]);

    let mut rounds = Table::new(&[
        "round",
        "switched after",
        "to",
        "requests",
        "failed",
        "p99",
        "max",
    ]);
    for (i, r) in hub.rounds.iter().enumerate() {
        rounds.row(&[
            (i + 1).to_string(),
            r.switched.map_or("never".to_owned(), |s| format!("{} ms", ms(s))),
            format!("`{}`", r.to),
            r.requests.to_string(),
            r.failed.to_string(),
            format!("{} ms", ms(r.p99)),
            format!("{} ms", ms(r.max)),
        ]);
    }
    let cut_short = hub.cut_short.as_ref().map_or(String::new(), |why| {
        format!("\nThe rounds stopped early: {why}.\n")
    });

    let mut c = Table::new(&["control plane (SQLite)", "reading"]);
    c.row(&[
        format!(
            "CPU, {} PoPs reporting every 5 s, no page (one core = 100%)",
            cp.pops
        ),
        format!("{:.1}%", cp.reports_only),
    ]);
    c.row(&[
        format!("CPU, the same with {} fleet pages open", cp.viewers),
        format!("{:.1}%", cp.with_pages),
    ]);
    let (rp50, rp99, _) = cp.reports.p50_p99_max();
    c.row(&[
        "`POST /v1/agents/{pop}/report` p50 / p99 (pages open)".to_owned(),
        format!(
            "{} / {} ms ({} reports, {} failed)",
            ms(rp50),
            ms(rp99),
            cp.reports.len(),
            cp.report_failed
        ),
    ]);
    let (vp50, vp99, _) = cp.views.p50_p99_max();
    c.row(&[
        "`GET /v1/fleet/view` p50 / p99".to_owned(),
        format!(
            "{} / {} ms ({} views, {} failed)",
            ms(vp50),
            ms(vp99),
            cp.views.len(),
            cp.view_failed
        ),
    ]);

    format!(
        "## Scale: one agent with 100 peers, one control plane with 1,000 PoPs (issue 19)\n\n\
         Measured {machine} with `cargo build --release -p detour-agent -p detour-lab -p detour-control-plane && \
         target/release/detour-lab bench scale --seconds {secs} --runs {runs}`. \
         One hub agent with {SPOKES} peers; each peer is its own `detour-agent` release process (default \
         `health.interval`, 500 ms) whose only peer is the hub, all in front of the control-plane stand-in \
         (`detour-lab mock-cp`, HTTPS with a certificate from the lab CA, so every probe pays its TLS, inside the mesh's own on `via:` paths). The hub's uplink goes through a lab link in the benchmark process. \
         CPU is user + system time from /proc over {secs} s, as a share of one core: first with the spokes \
         having no peers (the hub probing its {paths} paths, nothing else: with the default `health.watched` and `health.standby_interval`, `direct` and 4 paths every 500 ms and the others every 5 s), then with every spoke taking the hub \
         as its peer, so the hub's relay carries a tunnel per spoke for its `via:hub` probes. The {SPOKES} spokes \
         together used {spokes:.1}% of a core in the first window, on the same 2 cores. Then {rounds} rounds of \
         {LOAD_RATE} requests/s through the hub for {load} s, the uplink blackholed {cut} s in (the hub's relay \
         tunnels go through that uplink too) and healed at the end; the next round starts once the hub is back \
         on `direct`.\n\n{hub_table}\n{rounds_table}{cut_short}\n\
         The control plane: `bench fleet`'s measurement on SQLite ({pops} PoPs, three paths each, reporting every \
         5 s with an Idempotency-Key each, 15 minutes of history in the database, {viewers} fleet pages polling \
         every second; the PoPs simulated by the benchmark process on the same cores), {secs} s per window, \
         its RSS {rss} MiB at the end.\n\n{cp_table}\n\
         Goals (issue 19): one agent with 100 peers: probe CPU ≤ 2% of one core, RSS ≤ 32 MiB, a failover \
         still within 1 s; one relay carrying tunnels for 100 peers. One control plane with 1,000 PoPs \
         reporting every 5 s: its CPU share and the fleet endpoint's p99 (no number set).\n",
        secs = args.seconds,
        runs = args.runs,
        paths = SPOKES + 1,
        spokes = hub.spokes_cpu,
        rounds = hub.rounds.len(),
        load = LOAD_FOR.as_secs(),
        cut = CUT_AFTER.as_secs(),
        hub_table = t.finish(),
        rounds_table = rounds.finish(),
        pops = cp.pops,
        viewers = cp.viewers,
        rss = cp.rss_mib,
        cp_table = c.finish(),
    )
}

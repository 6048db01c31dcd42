//! `detour-lab bench overhead`: a small POST's latency at a fixed 1,000
//! requests/s and the closed-loop throughput, straight to a fast control-plane
//! stand-in, through the agent's `direct` path and through `via:<peer>`; the
//! agent's RSS with 100 concurrent clients. The control plane and the agents
//! run as separate release processes; the load comes from this process, on
//! the same 2 cores.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use super::BenchArgs;
use crate::fleet::CP_HOST;
use crate::haproxy_squid::haproxy_alone;
use crate::load::{Latencies, closed_loop, fixed_rate};
use crate::mock_cp::MockCpProcess;
use crate::process::{
    Proc, cpu_us, free_ports, loopback, rss_kib, rss_split_kib, sibling, spawn_agent, wait_listening,
};
use crate::report::{Table, machine, us};

/// `detour-lab bench overhead`.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let dur = Duration::from_secs(args.seconds);
    let agent_bin = sibling("detour-agent")?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let certs = d.join("certs");
    detour_agent::pki::init(&certs)?;
    for pop in ["blr", "maa"] {
        detour_agent::pki::issue(&certs, pop, &certs, 30)?;
    }
    // The control-plane stand-in: plain HTTP, so the direct baseline and the
    // agent compare like for like (HAProxy + Squid was measured the same way).
    let cp = MockCpProcess::start().await?;
    let agents = start_agents(d, cp.addr, &agent_bin, args.agent_threads).await?;
    // Let probes warm every path.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A reference for what one proxy hop costs on this machine: HAProxy alone
    // (HTTP mode, keep-alive both sides, connection reuse), when installed.
    let haproxy = match haproxy_alone(d, cp.addr).await {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("overhead: no HAProxy reference row: {e:#}");
            None
        }
    };
    let mut rows = Vec::new();
    for target in targets(cp.addr, &agents, haproxy.as_ref()) {
        rows.push(measure(&target, dur).await?);
    }
    let memory = memory(agents.blr_pid(), agents.blr_local, agents.blr_admin).await?;
    // Stopped as systemd stops them, so an instrumented build
    // (`packaging/pgo`) writes its profile at exit.
    for agent in agents.procs {
        agent.terminate(Duration::from_secs(10)).await;
    }
    args.publish("overhead", &render(args, &rows, &memory, &machine()))
}

/// blr and maa as `detour-agent` processes.
struct Agents {
    /// blr's, then maa's.
    procs: Vec<Proc>,
    /// blr's local listener (the call handler's side).
    blr_local: SocketAddr,
    /// blr's admin listener (`/metrics`).
    blr_admin: SocketAddr,
}

impl Agents {
    fn blr_pid(&self) -> u32 {
        self.procs[0].id()
    }

    fn maa_pid(&self) -> u32 {
        self.procs[1].id()
    }
}

/// Starts blr and maa, each the other's peer, in front of the stand-in at
/// `cp` over plain HTTP; configs in `d/<pop>`, certificates in `d/certs`.
async fn start_agents(d: &Path, cp: SocketAddr, bin: &Path, threads: Option<u16>) -> anyhow::Result<Agents> {
    let (cp_port, cp_addr) = (cp.port(), cp);
    let free = free_ports(6)?;
    let mut ports = BTreeMap::new();
    for (pop, p) in ["blr", "maa"].into_iter().zip(free.chunks(3)) {
        ports.insert(pop, (p[0], p[1], p[2]));
    }
    let mut procs = Vec::new();
    for pop in ["blr", "maa"] {
        let (local, relay, admin) = ports[pop];
        let peer = if pop == "blr" { "maa" } else { "blr" };
        let peer_relay = ports[peer].1;
        let pop_dir = d.join(pop);
        std::fs::create_dir_all(&pop_dir)?;
        std::fs::write(
            pop_dir.join("peers.toml"),
            format!("[[peer]]\nname = \"{peer}\"\nrelay = \"127.0.0.1:{peer_relay}\"\n"),
        )?;
        std::fs::write(
            pop_dir.join("agent.toml"),
            format!(
                "pop = \"{pop}\"\n[listen]\nlocal = \"127.0.0.1:{local}\"\nrelay = \"127.0.0.1:{relay}\"\nadmin = \"127.0.0.1:{admin}\"\n\
                 [control_plane]\nurl = \"http://{CP_HOST}:{cp_port}\"\naddresses = [\"{cp_addr}\"]\n\
                 [tls]\nca = \"../certs/ca.pem\"\ncert = \"../certs/{pop}.pem\"\nkey = \"../certs/{pop}.key\"\n\
                 [peers]\nfile = \"peers.toml\"\n"
            ),
        )?;
        procs.push(spawn_agent(bin, &pop_dir.join("agent.toml"), threads)?);
        wait_listening(loopback(local)).await?;
    }
    Ok(Agents {
        procs,
        blr_local: loopback(ports["blr"].0),
        blr_admin: loopback(ports["blr"].2),
    })
}

/// Where the load goes, and which proxy processes are on that path.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    headers: Vec<(&'static str, &'static str)>,
    pids: Vec<u32>,
}

fn targets(cp: SocketAddr, agents: &Agents, haproxy: Option<&(Proc, SocketAddr)>) -> Vec<Target> {
    let target = |name, addr, headers, pids| Target {
        name,
        addr,
        headers,
        pids,
    };
    let mut targets = vec![
        target("control plane directly", cp, vec![], vec![]),
        target(
            "agent, `direct` path",
            agents.blr_local,
            vec![("x-detour-pin", "direct")],
            vec![agents.blr_pid()],
        ),
        target(
            "agent, `via:maa` path",
            agents.blr_local,
            vec![("x-detour-pin", "via:maa")],
            vec![agents.blr_pid(), agents.maa_pid()],
        ),
    ];
    if let Some((proc, addr)) = haproxy {
        targets.push(target(
            "HAProxy alone (reference: one hop, HTTP mode)",
            *addr,
            vec![],
            vec![proc.id()],
        ));
    }
    targets
}

struct OverheadRow {
    target: &'static str,
    p50_us: f64,
    p99_us: f64,
    failed: usize,
    rps: f64,
    c_p50_us: f64,
    c_p99_us: f64,
    errors: u64,
    /// Agent CPU per request in the closed loop (all agents on the path).
    cpu_per_req_us: Option<f64>,
    /// The same at the fixed 1,000 requests/s (a wake-up per request).
    cpu_fixed_us: Option<f64>,
}

/// CPU time the processes `pids` have used so far, in microseconds.
fn cpu(pids: &[u32]) -> u64 {
    pids.iter().map(|p| cpu_us(*p)).sum()
}

/// One target: warm-up, `dur` at a fixed 1,000 requests/s, then `dur` of
/// closed loop with 64 connections, with the CPU its proxies used in each.
async fn measure(t: &Target, dur: Duration) -> anyhow::Result<OverheadRow> {
    eprintln!("overhead: {} …", t.name);
    let url = format!("http://{}", t.addr);
    // Warm-up, then a fixed 1,000 requests/s.
    let _ = fixed_rate(&url, &t.headers, 200, Duration::from_secs(1)).await;
    let cpu_before = cpu(&t.pids);
    let (results, failed) = fixed_rate(&url, &t.headers, 1000, dur).await;
    let cpu_fixed = cpu(&t.pids) - cpu_before;
    let fixed_done = results.len();
    let lat = Latencies::new(results.iter().filter(|r| r.ok()).map(|r| r.latency));
    let cpu_before = cpu(&t.pids);
    let (rps, hist, errors) = closed_loop(t.addr, "/v1/calls", &t.headers, 64, dur).await?;
    let cpu_used = cpu(&t.pids) - cpu_before;
    let done = hist.len();
    let has_pids = !t.pids.is_empty();
    Ok(OverheadRow {
        cpu_per_req_us: (has_pids && done > 0).then(|| cpu_used as f64 / done as f64),
        cpu_fixed_us: (has_pids && fixed_done > 0).then(|| cpu_fixed as f64 / fixed_done as f64),
        target: t.name,
        p50_us: us(lat.at(0.5)),
        p99_us: us(lat.at(0.99)),
        failed,
        rps,
        c_p50_us: hist.value_at_quantile(0.5) as f64,
        c_p99_us: hist.value_at_quantile(0.99) as f64,
        errors,
    })
}

/// blr's memory idle and under 100 concurrent clients.
struct Memory {
    idle_kib: u64,
    /// Of the idle RSS: (anonymous, file-backed).
    idle_split: (u64, u64),
    /// The most seen during 5 s of closed loop with 100 connections.
    peak_kib: u64,
    /// Of the peak: (anonymous, file-backed), read with it.
    peak_split: (u64, u64),
    rps: f64,
    errors: u64,
    /// The high-water mark for the whole run: the kernel's (`VmHWM`, which it
    /// updates lazily, so it can lag a sample), or the peak sampled if higher.
    hwm_kib: u64,
    /// Hedged and retried attempts blr counted during the closed loop (an
    /// attempt is counted when it ends, so this is a lower bound); each in
    /// flight is one more upstream connection's memory at the peak. `None`
    /// when blr's `/metrics` did not answer.
    extra_attempts: Option<(u64, u64)>,
}

async fn memory(blr_pid: u32, blr_local: SocketAddr, blr_admin: SocketAddr) -> anyhow::Result<Memory> {
    eprintln!("overhead: agent RSS with 100 concurrent clients …");
    let (idle_kib, idle_anon, idle_file) = rss_split_kib(blr_pid);
    // After the idle reading: answering this takes memory too.
    let before = extra_attempts(blr_admin).await;
    let idle_split = (idle_anon, idle_file);
    let rss_probe = tokio::spawn(async move {
        let mut peak = (0, (0, 0));
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            let (rss, anon, file) = rss_split_kib(blr_pid);
            if rss > peak.0 {
                peak = (rss, (anon, file));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak
    });
    let (rps, _, errors) = closed_loop(blr_local, "/v1/calls", &[], 100, Duration::from_secs(5)).await?;
    let (peak_kib, peak_split) = rss_probe.await.unwrap_or_default();
    let (_, hwm_kib) = rss_kib(blr_pid);
    let after = extra_attempts(blr_admin).await;
    Ok(Memory {
        extra_attempts: before
            .zip(after)
            .map(|(b, a)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1))),
        idle_kib,
        idle_split,
        peak_kib,
        peak_split,
        rps,
        errors,
        hwm_kib: hwm_kib.max(peak_kib),
    })
}

/// blr's hedges and retries so far (`detour_attempts_total` by kind, on
/// every path and with any result), from its `/metrics`; `None` if it did
/// not answer.
async fn extra_attempts(admin: SocketAddr) -> Option<(u64, u64)> {
    let http = reqwest::Client::builder().no_proxy().build().ok()?;
    let resp = http.get(format!("http://{admin}/metrics")).send().await.ok()?;
    let text = resp.error_for_status().ok()?.text().await.ok()?;
    let sum = |kind: &str| {
        let label = format!("kind=\"{kind}\"");
        text.lines()
            .filter(|l| l.starts_with("detour_attempts_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Some((sum("hedge"), sum("retry")))
}

fn render(args: &BenchArgs, rows: &[OverheadRow], mem: &Memory, machine: &str) -> String {
    let mut md = String::new();
    // `packaging/pgo` puts the lab beside the agent it built.
    let pgo = crate::process::exe_dir().is_ok_and(|d| d.ends_with("pgo/release"));
    let (command, build) = if pgo {
        (
            "packaging/pgo && target/pgo/release/detour-lab bench overhead",
            "The agents are the build `packaging/pgo` makes (profile-guided optimisation), as shipped.",
        )
    } else {
        (
            "cargo build --release -p detour-agent -p detour-lab && target/release/detour-lab bench overhead",
            "The agents are a plain release build (the shipped one is `packaging/pgo`'s).",
        )
    };
    md.push_str(&format!(
        "## Agent overhead (issue: data path)\n\nMeasured {machine} with `{command}` \
         ({} s per measurement). {build} A small JSON POST to a fast control-plane stand-in (`detour-lab mock-cp`, plain HTTP); \
         the agents (blr, and maa as blr's peer) are separate release processes ({}); the load generator runs in the \
         benchmark process on the same cores, so every number includes its CPU contention.\n\n",
        args.seconds,
        match args.agent_threads {
            None => "default `--threads`".to_owned(),
            Some(n) => format!("`--threads {n}`"),
        }
    ));
    md.push_str(&table(rows));
    md.push_str(&format!(
        "\nAgent (blr) memory: {:.1} MiB RSS idle ({:.1} anonymous, {:.1} file-backed: mostly the binary's code), {:.1} MiB peak RSS with 100 concurrent clients ({:.1} anonymous, {:.1} file-backed; closed loop, 5 s, {:.0} req/s, {} errors, {}), {:.1} MiB high-water mark for the whole run.\n\n",
        mem.idle_kib as f64 / 1024.0,
        mem.idle_split.0 as f64 / 1024.0,
        mem.idle_split.1 as f64 / 1024.0,
        mem.peak_kib as f64 / 1024.0,
        mem.peak_split.0 as f64 / 1024.0,
        mem.peak_split.1 as f64 / 1024.0,
        mem.rps,
        mem.errors,
        match mem.extra_attempts {
            Some((hedges, retries)) => format!("at least {hedges} hedges and {retries} retries"),
            None => "hedges and retries not known: blr's /metrics did not answer".to_owned(),
        },
        mem.hwm_kib as f64 / 1024.0
    ));
    md.push_str(
        "\"Proxy CPU per request\" is the user + system CPU time of the proxy processes on the path (blr; blr and \
         maa for `via:maa`; HAProxy for its row) divided by the requests answered, at the fixed rate (every request its own wake-ups) and \
         in the closed loop (many requests per wake-up); unlike the throughput it does not depend on how much of \
         the two cores the load generator and the stand-in took. The HAProxy row (when `haproxy` is installed) is \
         HAProxy alone in HTTP mode with keep-alive and connection reuse in front of the same stand-in: the \
         cheapest well-known proxy hop, measured by the same harness as a yardstick for what any extra hop costs \
         on this machine (it does no TLS, no health checks, no failover).\n\n",
    );
    md.push_str(
        "Targets (issue 2): under 150 µs added at p50 and under 1 ms at p99 on `direct` at 1,000 req/s; at least \
         15,000 req/s; under 20 MiB RSS with 100 concurrent clients. Reference, HAProxy + Squid on this kind of \
         machine: about +1.4 ms at p50, 1,550 req/s (6,900 with Squid's POST connection reuse), about 43 MB.\n",
    );
    md
}

/// The targets' table; the first row (the stand-in reached directly) is the
/// baseline the others add to.
fn table(rows: &[OverheadRow]) -> String {
    let mut table = Table::new(&[
        "target",
        "p50 at 1,000 req/s",
        "p99 at 1,000 req/s",
        "added p50",
        "added p99",
        "failed",
        "closed loop, 64 conns",
        "p50 / p99 there",
        "errors",
        "proxy CPU per request at 1,000 req/s / closed loop",
    ]);
    let Some(base) = rows.first() else {
        return table.finish();
    };
    for (i, r) in rows.iter().enumerate() {
        let added = |now: f64, then: f64| {
            if i == 0 {
                "—".to_owned()
            } else {
                format!("{:+.0} µs", now - then)
            }
        };
        table.row(&[
            r.target.to_owned(),
            format!("{:.0} µs", r.p50_us),
            format!("{:.0} µs", r.p99_us),
            added(r.p50_us, base.p50_us),
            added(r.p99_us, base.p99_us),
            r.failed.to_string(),
            format!("{:.0} req/s", r.rps),
            format!("{:.0} / {:.0} µs", r.c_p50_us, r.c_p99_us),
            r.errors.to_string(),
            match (r.cpu_fixed_us, r.cpu_per_req_us) {
                (Some(f), Some(c)) => format!("{f:.0} / {c:.0} µs"),
                _ => "—".to_owned(),
            },
        ]);
    }
    table.finish()
}

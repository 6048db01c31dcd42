//! A whole fleet on loopback: a control plane, one agent per PoP with a
//! fault-injecting uplink link each, certificates from `detour-agent pki`, and
//! peer lists that name every other PoP. Agents run in-process through the
//! same library `detour-agent run` uses, configured from real TOML files.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use detour_agent::Agent;
use detour_agent::config::AgentConfig;
use detour_wire::PathState;

use crate::link::Link;
use crate::mock_cp::MockCp;
use crate::process::{Proc, free_ports, spawn_agent, wait_listening};

/// The control plane's name in every agent's URL; each agent dials it
/// through its own uplink link.
pub const CP_HOST: &str = "cp.detour.test";
/// The second control-plane region's name (`FleetOptions::second_region`).
pub const CP2_HOST: &str = "cp2.detour.test";

/// One PoP of the fleet.
pub struct Pop {
    pub name: String,
    pub agent: Option<Arc<Agent>>,
    /// Watches the agent's files (and SIGHUP), as `detour-agent run` does.
    reloader: Option<tokio::task::JoinHandle<()>>,
    /// This PoP's internet path to the control plane.
    pub uplink: Link,
    /// Its internet path to the second region, when there is one.
    pub uplink2: Option<Link>,
    pub config_path: PathBuf,
    pub relay_addr: Option<SocketAddr>,
}

impl Pop {
    pub fn agent(&self) -> &Arc<Agent> {
        self.agent.as_ref().expect("agent is running")
    }

    /// The call handler's URL base for this PoP.
    pub fn local_url(&self) -> String {
        format!("http://{}", self.agent().local_addr)
    }
}

/// How to build a fleet.
#[derive(Clone)]
pub struct FleetOptions {
    pub pops: Vec<String>,
    /// Extra TOML appended to every agent.toml's tables, keyed by table name
    /// (e.g. `forward` -> `hedge = false`).
    pub extra: BTreeMap<String, String>,
    /// Where the control plane listens when it is not the mock (the lab's
    /// real control plane); `None` starts a [`MockCp`].
    pub external_cp: Option<SocketAddr>,
    /// Whether the control plane speaks TLS.
    pub cp_tls: bool,
    /// Run the real `detour-control-plane` in-process (embedded SQLite, agent
    /// tokens, HTTPS) instead of the mock.
    pub real_cp: bool,
    /// The real control plane's `database_url` (default: SQLite in its dir).
    pub database_url: Option<String>,
    /// TOML appended as it is to one PoP's agent.toml (e.g. its
    /// `[recordings]` section), keyed by PoP.
    pub tail: BTreeMap<String, String>,
    /// A second region of the real control plane ([`CP2_HOST`], its own
    /// instance on the same database), which every agent lists as endpoint
    /// `singapore` (priority 2) after `mumbai` ([`CP_HOST`], priority 1).
    pub second_region: bool,
    /// TOML appended to the real control plane's cp.toml (its sections,
    /// e.g. `[fleet]\nstale_after = "3s"`).
    pub cp_extra: String,
    /// Run the real control plane on a runtime of its own, every thread of
    /// it (and its database's) kept on this CPU: a control plane in another
    /// datacentre, off the PoP's CPU (see [`crate::cpus`]).
    pub cp_cpu: Option<usize>,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            pops: vec!["blr".into(), "maa".into(), "del".into()],
            extra: BTreeMap::new(),
            external_cp: None,
            cp_tls: true,
            real_cp: false,
            database_url: None,
            tail: BTreeMap::new(),
            second_region: false,
            cp_extra: String::new(),
            cp_cpu: None,
        }
    }
}

/// A running fleet. Dropping it stops the links; call [`Fleet::shutdown`] to
/// drain the agents.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub cp: Option<MockCp>,
    /// The admin token of the real control plane, when it runs.
    pub admin_token: Option<String>,
    real_cp_stop: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
    pub cp_addr: SocketAddr,
    /// The second region's address and stop switch, when it runs.
    pub cp2_addr: Option<SocketAddr>,
    cp2_stop: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
    pub pops: BTreeMap<String, Pop>,
    pub opts: FleetOptions,
}

/// TLS material for a test control plane named [`CP_HOST`], issued by the
/// fleet CA in `certs` and written there as `cp.pem` and `cp.key`.
pub fn cp_server_config(certs: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    cp_cert(certs, CP_HOST, "cp")?;
    crate::mock_cp::server_config(&certs.join("cp.pem"), &certs.join("cp.key"))
}

/// A server certificate for `host` from the fleet CA in `certs`, written
/// there as `<stem>.pem` and `<stem>.key`.
pub fn cp_cert(certs: &Path, host: &str, stem: &str) -> anyhow::Result<()> {
    let ca_pem = std::fs::read_to_string(certs.join("ca.pem"))?;
    let ca_key = std::fs::read_to_string(certs.join("ca.key"))?;
    let now = time::OffsetDateTime::now_utc();
    let (pem, key) = detour_agent::pki::issue_pem(
        &ca_pem,
        &ca_key,
        host,
        now - time::Duration::hours(1),
        now + time::Duration::days(30),
    )?;
    std::fs::write(certs.join(format!("{stem}.pem")), &pem)?;
    std::fs::write(certs.join(format!("{stem}.key")), &key)?;
    Ok(())
}

/// The sum of counter `metric` on `agent` over every series whose `label`
/// has `value` (e.g. `detour_attempts_total` with `path` = `direct`).
pub fn counter_sum(agent: &Agent, metric: &str, label: &str, value: &str) -> u64 {
    agent
        .shared
        .metrics
        .registry
        .gather()
        .iter()
        .filter(|f| f.name() == metric)
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == label && l.value() == value)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// Installs the ring crypto provider once per process.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Fleet {
    pub async fn start(opts: FleetOptions) -> anyhow::Result<Fleet> {
        init_crypto();
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("certs");
        detour_agent::pki::init(&certs)?;
        for pop in &opts.pops {
            detour_agent::pki::issue(&certs, pop, &certs, 30)?;
        }
        let mut admin_token = None;
        let mut real_cp_stop = None;
        let (cp, cp_addr) = match opts.external_cp {
            Some(addr) => (None, addr),
            None if opts.real_cp => {
                let (addr, token, stop) = start_real_cp(
                    dir.path(),
                    &opts.pops,
                    opts.database_url.as_deref(),
                    &opts.cp_extra,
                    opts.cp_cpu,
                )
                .await?;
                admin_token = Some(token);
                real_cp_stop = Some(stop);
                (None, addr)
            }
            None => {
                let tls = if opts.cp_tls {
                    Some(cp_server_config(&certs)?)
                } else {
                    None
                };
                let cp = MockCp::start(tls).await?;
                let addr = cp.addr;
                (Some(cp), addr)
            }
        };
        let (mut cp2_addr, mut cp2_stop) = (None, None);
        if opts.second_region {
            anyhow::ensure!(opts.real_cp, "a second region needs the real control plane");
            let (addr, stop) = start_second_region(dir.path()).await?;
            cp2_addr = Some(addr);
            cp2_stop = Some(stop);
        }
        let mut fleet = Fleet {
            dir,
            cp,
            admin_token,
            real_cp_stop,
            cp_addr,
            cp2_addr,
            cp2_stop,
            pops: BTreeMap::new(),
            opts: opts.clone(),
        };
        for pop in &opts.pops {
            let uplink = Link::start(cp_addr).await?;
            let uplink2 = match cp2_addr {
                Some(a) => Some(Link::start(a).await?),
                None => None,
            };
            let config_path = fleet.write_config(pop, uplink.addr, uplink2.as_ref().map(|l| l.addr))?;
            let config = AgentConfig::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
            let files = config.files.clone();
            let agent = Arc::new(Agent::start(config).await?);
            let relay_addr = agent.relay_addr;
            let reloader = Some(detour_agent::reload::spawn(agent.clone(), files));
            fleet.pops.insert(
                pop.clone(),
                Pop {
                    name: pop.clone(),
                    agent: Some(agent),
                    reloader,
                    uplink,
                    uplink2,
                    config_path,
                    relay_addr,
                },
            );
        }
        for pop in opts.pops.clone() {
            fleet.write_peers(&pop, &[])?;
            let p = &fleet.pops[&pop];
            let files = p.agent().shared.forwarder.runtime().config.files.clone();
            if let detour_agent::reload::ReloadResult::Rejected(e) =
                detour_agent::reload::reload_now(p.agent(), &files)
            {
                bail!("peers for {pop}: {e}")
            }
        }
        fleet.wait_all_up(Duration::from_secs(10)).await?;
        Ok(fleet)
    }

    fn scheme(&self) -> &'static str {
        if self.opts.cp_tls { "https" } else { "http" }
    }

    fn write_config(
        &self,
        pop: &str,
        uplink: SocketAddr,
        uplink2: Option<SocketAddr>,
    ) -> anyhow::Result<PathBuf> {
        let dir = self.dir.path().join(pop);
        std::fs::create_dir_all(&dir)?;
        let extra = |table: &str| self.opts.extra.get(table).cloned().unwrap_or_default();
        let text = format!(
            r#"pop = "{pop}"

[listen]
local = "127.0.0.1:0"
relay = "127.0.0.1:0"
admin = "127.0.0.1:0"
control = "control.sock"

[control_plane]
ca = "../certs/ca.pem"
{cp_extra}
{endpoints}

[tls]
ca = "../certs/ca.pem"
cert = "../certs/{pop}.pem"
key = "../certs/{pop}.key"

[health]
{health_extra}

[forward]
{forward_extra}

[ingress]
{ingress_extra}

[relay]
{relay_extra}

[peers]
file = "peers.toml"

[upgrade]
dir = "run"
{tail}
"#,
            tail = self.opts.tail.get(pop).cloned().unwrap_or_default(),
            endpoints = match uplink2 {
                None => format!(
                    "url = \"{}://{CP_HOST}\"\naddresses = [\"{uplink}\"]\n",
                    self.scheme()
                ),
                Some(u2) => format!(
                    "[[control_plane.endpoints]]\nname = \"mumbai\"\nurl = \"https://{CP_HOST}\"\naddresses = [\"{uplink}\"]\npriority = 1\n\n\
                     [[control_plane.endpoints]]\nname = \"singapore\"\nurl = \"https://{CP2_HOST}\"\naddresses = [\"{u2}\"]\npriority = 2\n"
                ),
            },
            cp_extra = {
                let mut c = extra("control_plane");
                if self.opts.real_cp {
                    c.push_str("\ntoken_file = \"agent.token\"\n");
                }
                c
            },
            health_extra = {
                let h = extra("health");
                if h.contains("interval") {
                    h
                } else {
                    format!("interval = \"200ms\"\n{h}")
                }
            },
            forward_extra = extra("forward"),
            ingress_extra = extra("ingress"),
            relay_extra = extra("relay"),
        );
        let path = dir.join("agent.toml");
        std::fs::write(&path, text)?;
        if !dir.join("peers.toml").exists() {
            std::fs::write(dir.join("peers.toml"), "")?;
        }
        Ok(path)
    }

    /// Writes `pop`'s peers file naming every other PoP (minus `exclude`).
    pub fn write_peers(&self, pop: &str, exclude: &[&str]) -> anyhow::Result<()> {
        let mut text = String::new();
        for (name, p) in &self.pops {
            if name == pop || exclude.contains(&name.as_str()) {
                continue;
            }
            let relay = p.relay_addr.context("peer has no relay")?;
            text.push_str(&format!("[[peer]]\nname = \"{name}\"\nrelay = \"{relay}\"\n\n"));
        }
        std::fs::write(self.dir.path().join(pop).join("peers.toml"), text)?;
        Ok(())
    }

    pub fn pop(&self, name: &str) -> &Pop {
        &self.pops[name]
    }

    /// Waits until every running agent sees every enabled path `up`.
    pub async fn wait_all_up(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut pending = Vec::new();
            for p in self.pops.values() {
                let Some(a) = &p.agent else { continue };
                let snap = a.shared.forwarder.runtime().health.snapshot();
                for v in &snap.paths {
                    let route = v.name.split('@').next().unwrap_or_default();
                    let peer_running = match route.strip_prefix("via:") {
                        Some(peer) => self.pops.get(peer).is_some_and(|x| x.agent.is_some()),
                        None => true,
                    };
                    if v.enabled && peer_running && v.state != PathState::Up {
                        pending.push(format!("{}:{}={}", p.name, v.name, v.state.as_str()));
                    }
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("paths not up within {within:?}: {}", pending.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `pop`'s active path is `path`; `via:` matches any peer.
    pub async fn wait_active(&self, pop: &str, path: &str, within: Duration) -> anyhow::Result<Duration> {
        let started = tokio::time::Instant::now();
        loop {
            let snap = self.pop(pop).agent().shared.forwarder.runtime().health.snapshot();
            let matches = |name: &str| name == path || (path == "via:" && name.starts_with("via:"));
            if snap.active().is_some_and(|a| matches(&a.name)) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                let now = snap.active().map(|a| a.name.to_string()).unwrap_or_default();
                bail!("{pop} did not switch to {path} within {within:?} (active: {now})");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops `pop`'s agent (its relay and tunnels close).
    pub async fn stop_agent(&mut self, pop: &str) {
        let Some(p) = self.pops.get_mut(pop) else { return };
        if let Some(r) = p.reloader.take() {
            r.abort();
        }
        if let Some(a) = p.agent.take() {
            // At once: no successor is coming, and nothing waits in a
            // socket unit's backlog for one.
            a.shutdown(detour_agent::agent::Stop::HandedOver).await;
        }
    }

    /// Starts `pop`'s agent again from its files, on the same relay port.
    pub async fn restart_agent(&mut self, pop: &str) -> anyhow::Result<()> {
        let p = self.pops.get_mut(pop).context("no such pop")?;
        let text = std::fs::read_to_string(&p.config_path)?;
        let relay = p.relay_addr.context("no relay")?;
        let text = text.replace("relay = \"127.0.0.1:0\"", &format!("relay = \"{relay}\""));
        std::fs::write(&p.config_path, text)?;
        let config = AgentConfig::load(&p.config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let files = config.files.clone();
        let agent = Arc::new(Agent::start(config).await?);
        p.reloader = Some(detour_agent::reload::spawn(agent.clone(), files));
        p.agent = Some(agent);
        Ok(())
    }

    /// Runs `pop`'s agent as its own `detour-agent run` process (from `bin`,
    /// with `pop`'s files) instead of in-process: stop the in-process agent
    /// first. The relay keeps its port; the local and admin listeners get
    /// fixed ports the first time, so every later process has the same ones.
    /// Returns once the local listener answers, with the local URL; the
    /// process is killed when the returned [`Proc`] is dropped.
    pub async fn spawn_agent_process(&mut self, pop: &str, bin: &Path) -> anyhow::Result<(Proc, String)> {
        let p = self.pops.get(pop).context("no such pop")?;
        anyhow::ensure!(p.agent.is_none(), "{pop}'s in-process agent is still running");
        let mut text = std::fs::read_to_string(&p.config_path)?;
        let relay = p.relay_addr.context("no relay")?;
        text = text.replace("relay = \"127.0.0.1:0\"", &format!("relay = \"{relay}\""));
        for (listener, port) in ["local", "admin"].into_iter().zip(free_ports(2)?) {
            let any = format!("{listener} = \"127.0.0.1:0\"");
            if text.contains(&any) {
                text = text.replace(&any, &format!("{listener} = \"127.0.0.1:{port}\""));
            }
        }
        std::fs::write(&p.config_path, &text)?;
        let local: SocketAddr = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("local = \""))
            .and_then(|l| l.strip_suffix('"'))
            .context("no local listener in the config")?
            .parse()?;
        let proc = spawn_agent(bin, &p.config_path, None)?;
        wait_listening(local).await?;
        Ok((proc, format!("http://{local}")))
    }

    /// Upgrades `pop`'s agent as `detour-agent run --takeover` does: a new
    /// agent, loaded from the same files, takes the listening sockets and the
    /// path table over from the running one, which drains and stops. Returns
    /// the old agent's drain, done when it has stopped.
    pub async fn hand_over(&mut self, pop: &str) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let p = self.pops.get_mut(pop).context("no such pop")?;
        let old = p.agent.clone().context("the agent is not running")?;
        let dir = old
            .shared
            .forwarder
            .runtime()
            .config
            .upgrade
            .dir
            .clone()
            .context("no upgrade.dir")?;
        // The running agent offers its sockets, as `run` does all along.
        let listener = detour_agent::upgrade::handover::listen(&dir)?;
        let drain = tokio::spawn(async move {
            detour_agent::upgrade::handover::serve(listener, &old).await;
            old.shutdown(detour_agent::agent::Stop::HandedOver).await;
        });
        let config = AgentConfig::load(&p.config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let files = config.files.clone();
        let agent = detour_agent::start(config, true).await?;
        if let Some(r) = p.reloader.take() {
            r.abort();
        }
        p.reloader = Some(detour_agent::reload::spawn(agent.clone(), files));
        p.relay_addr = agent.relay_addr;
        p.agent = Some(agent);
        Ok(drain)
    }

    /// Drains every agent, then stops the control plane.
    pub async fn shutdown(mut self) {
        let names: Vec<String> = self.pops.keys().cloned().collect();
        for n in names {
            self.stop_agent(&n).await;
        }
        for (stop, _) in [self.real_cp_stop.take(), self.cp2_stop.take()]
            .into_iter()
            .flatten()
        {
            let _ = stop.send(());
        }
    }

    /// Stores a route on the real control plane through `pop`'s agent with
    /// the admin token (`spec` is the JSON body of `PUT /v1/routes/{name}`).
    pub async fn put_route(&self, pop: &str, name: &str, spec: &str) -> anyhow::Result<()> {
        let admin = self
            .admin_token
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the fleet runs no real control plane"))?;
        let r = crate::load::CallClient::new(Duration::from_secs(2))
            .send(
                http::Method::PUT,
                &format!("{}/v1/routes/{name}", self.pop(pop).local_url()),
                &[
                    ("authorization", &format!("Bearer {admin}")),
                    ("content-type", "application/json"),
                ],
                bytes::Bytes::from(spec.to_owned()),
            )
            .await;
        anyhow::ensure!(r.ok(), "storing route {name}: {r:?}");
        Ok(())
    }

    /// A read-only operator token named `name` for the real control plane's
    /// fleet page, as `token create --operator` makes one.
    pub async fn operator_token(&self, name: &str) -> anyhow::Result<String> {
        let path = self.dir.path().join("cp").join("cp.toml");
        let config = detour_control_plane::Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(detour_control_plane::create_operator_token(&config, name)
            .await?
            .0)
    }

    /// The real control plane's fleet page (HTTPS with the lab CA's
    /// certificate for [`CP_HOST`], here on its loopback address).
    pub fn page_url(&self) -> String {
        format!("https://{}/fleet", self.cp_addr)
    }

    /// Restarts the real control plane as `systemctl restart` would: a
    /// graceful stop (in-flight requests finish, connections close, the
    /// database is closed), `down` with nothing listening, then a new
    /// instance on the same address and database.
    pub async fn restart_cp(&mut self, down: Duration) -> anyhow::Result<()> {
        self.stop_region(1).await?;
        tokio::time::sleep(down).await;
        self.start_region(1).await
    }

    /// Stops region `n`'s control plane (1: [`CP_HOST`], 2: [`CP2_HOST`])
    /// gracefully; nothing listens on its address until [`Fleet::start_region`].
    pub async fn stop_region(&mut self, n: u8) -> anyhow::Result<()> {
        let slot = if n == 1 {
            &mut self.real_cp_stop
        } else {
            &mut self.cp2_stop
        };
        let (stop, task) = slot
            .take()
            .ok_or_else(|| anyhow::anyhow!("region {n}'s control plane is not running"))?;
        let _ = stop.send(());
        let _ = task.await;
        Ok(())
    }

    /// Starts region `n`'s control plane again on its address and database.
    pub async fn start_region(&mut self, n: u8) -> anyhow::Result<()> {
        let (dir, addr) = if n == 1 {
            ("cp", self.cp_addr)
        } else {
            ("cp2", self.cp2_addr.context("the fleet has no second region")?)
        };
        let path = self.dir.path().join(dir).join("cp.toml");
        let config = detour_control_plane::Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let stop = Some(spawn_cp(config, listener));
        if n == 1 {
            self.real_cp_stop = stop;
        } else {
            self.cp2_stop = stop;
        }
        Ok(())
    }
}

/// After a run of calls each answered with a distinct id: the control plane's
/// database holds exactly those calls, no more (nothing duplicated) and none
/// missing (nothing lost).
pub async fn check_stored_once(config: &detour_control_plane::Config, ids: &[&str]) -> anyhow::Result<()> {
    let distinct: std::collections::BTreeSet<&str> = ids.iter().copied().collect();
    anyhow::ensure!(
        distinct.len() == ids.len(),
        "two calls were answered with the same id"
    );
    let store = detour_control_plane::store::Store::open(config).await?;
    let result = async {
        // Which answered call is missing says more than a count.
        for id in ids {
            anyhow::ensure!(
                store.get_call(id).await?.is_some(),
                "call {id} was answered but not stored"
            );
        }
        let stored = store.count_calls().await?;
        anyhow::ensure!(
            stored == ids.len() as i64,
            "{stored} calls stored for {} answered calls",
            ids.len()
        );
        Ok(())
    }
    .await;
    store.close().await;
    result
}

fn spawn_cp(
    config: detour_control_plane::Config,
    listener: tokio::net::TcpListener,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_cp(config, listener, stop_rx));
    (stop, task)
}

/// Serves the control plane on `listener` until `stop` fires or is dropped.
async fn serve_cp(
    config: detour_control_plane::Config,
    listener: tokio::net::TcpListener,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let shutdown = async move {
        let _ = stop.await;
    };
    if let Err(e) = detour_control_plane::serve(config, listener, shutdown).await {
        tracing::error!("control plane stopped: {e:#}");
    }
}

/// Starts the real control plane on SQLite in `dir/cp`, serving HTTPS as
/// [`CP_HOST`], with an agent token written to `dir/<pop>/agent.token` for
/// every PoP. Returns its address, the admin token and its stop switch.
async fn start_real_cp(
    dir: &Path,
    pops: &[String],
    database_url: Option<&str>,
    extra: &str,
    cpu: Option<usize>,
) -> anyhow::Result<(
    SocketAddr,
    String,
    (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>),
)> {
    let certs = dir.join("certs");
    cp_server_config(&certs)?;
    let cp_dir = dir.join("cp");
    std::fs::create_dir_all(&cp_dir)?;
    let admin_token = format!("lab-admin-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(cp_dir.join("admin.token"), &admin_token)?;
    let db = database_url.map_or_else(String::new, |u| format!("database_url = \"{u}\"\n"));
    let text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{data}\"\nadmin_token_file = \"{admin}\"\n{db}\n[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\n{extra}\n",
        data = cp_dir.join("data").display(),
        admin = cp_dir.join("admin.token").display(),
        cert = certs.join("cp.pem").display(),
        key = certs.join("cp.key").display(),
    );
    std::fs::create_dir_all(cp_dir.join("data"))?;
    let path = cp_dir.join("cp.toml");
    std::fs::write(&path, text)?;
    let config = detour_control_plane::Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    for pop in pops {
        let token = detour_control_plane::create_agent_token(&config, pop).await?;
        let pop_dir = dir.join(pop);
        std::fs::create_dir_all(&pop_dir)?;
        std::fs::write(pop_dir.join("agent.token"), token)?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = match cpu {
        None => spawn_cp(config, listener),
        Some(cpu) => spawn_cp_apart(config, listener.into_std()?, cpu)?,
    };
    Ok((addr, admin_token, stop))
}

/// [`spawn_cp`] on a thread and runtime of its own, every thread of it kept
/// on `cpu` (threads the control plane starts, such as SQLite's, inherit
/// it). The handle returned ends when that runtime has stopped.
fn spawn_cp_apart(
    config: detour_control_plane::Config,
    listener: std::net::TcpListener,
    cpu: usize,
) -> anyhow::Result<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)> {
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("lab-cp".to_owned())
        .spawn(move || {
            let pin = move || {
                if let Err(e) = crate::cpus::pin_current_thread(cpu) {
                    tracing::warn!("control plane: cannot keep to CPU {cpu}: {e}");
                }
            };
            pin();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("lab-cp")
                .on_thread_start(pin)
                .enable_all()
                .build();
            match rt {
                Ok(rt) => rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => serve_cp(config, l, stop_rx).await,
                        Err(e) => tracing::error!("control plane: its listener: {e}"),
                    }
                }),
                Err(e) => tracing::error!("control plane: no runtime: {e}"),
            }
            let _ = done_tx.send(());
        })?;
    let task = tokio::spawn(async move {
        let _ = done_rx.await;
    });
    Ok((stop, task))
}

/// The second region: its own control-plane instance serving HTTPS as
/// [`CP2_HOST`] on the first region's database (`dir/cp/cp.toml`'s), with
/// its config in `dir/cp2`. Returns its address and stop switch.
async fn start_second_region(
    dir: &Path,
) -> anyhow::Result<(
    SocketAddr,
    (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>),
)> {
    let certs = dir.join("certs");
    cp_cert(&certs, CP2_HOST, "cp2")?;
    let first = std::fs::read_to_string(dir.join("cp").join("cp.toml"))?;
    let text = first
        .replace(
            &certs.join("cp.pem").display().to_string(),
            &certs.join("cp2.pem").display().to_string(),
        )
        .replace(
            &certs.join("cp.key").display().to_string(),
            &certs.join("cp2.key").display().to_string(),
        );
    std::fs::create_dir_all(dir.join("cp2"))?;
    let path = dir.join("cp2").join("cp.toml");
    std::fs::write(&path, text)?;
    let config = detour_control_plane::Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((addr, spawn_cp(config, listener)))
}

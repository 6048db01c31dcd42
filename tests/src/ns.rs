//! A fleet in Linux network namespaces (root only): one namespace per PoP and
//! one for the control plane, an "internet" bridge joining every PoP's uplink
//! and the control plane, and a separate "backbone" bridge joining the PoPs,
//! so cutting blr's uplink leaves its peer links intact. Faults are nftables
//! rules inside blr's namespace on its uplink only. Everything (namespaces,
//! links, processes) is removed on drop, also when a test fails.
//!
//! Addresses are 10.201.0.0/24 (internet) and 10.202.0.0/24 (backbone),
//! inside these namespaces only; nothing routes anywhere else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// Why the namespace lab cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    // Only root may create namespaces.
    if !crate::process::is_root() {
        return Some("not running as root".to_owned());
    }
    for tool in ["ip", "nft"] {
        let ok = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !ok {
            return Some(format!(
                "`{tool}` is not installed (apt-get install iproute2 nftables)"
            ));
        }
    }
    None
}

fn run(cmd: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The PoPs of the namespace fleet and their addresses.
pub const POPS: [(&str, u8); 3] = [("blr", 11), ("maa", 12), ("del", 13)];
/// The control plane's internet address.
pub const CP_ADDR: &str = "10.201.0.100";

/// A running namespace fleet.
pub struct NsFleet {
    /// Suffix making every name unique to this run.
    pub id: String,
    pub dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
    namespaces: Vec<String>,
}

impl NsFleet {
    /// Namespace name of `pop` (or `cp`, `sw`).
    pub fn ns(&self, name: &str) -> String {
        format!("dt{}{name}", self.id)
    }

    /// Builds the topology, certificates and configs, and starts the control
    /// plane stand-in and the three agents (binaries from `bin_dir`).
    pub fn start(bin_dir: &Path) -> anyhow::Result<NsFleet> {
        let mut f = NsFleet::prepare(false)?;
        let d = f.dir.path().to_path_buf();
        let args = crate::mock_cp::command_args(
            &format!("{CP_ADDR}:443"),
            Some((&d.join("certs/cp.pem"), &d.join("certs/cp.key"))),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        f.spawn("cp", &bin_dir.join("detour-lab"), &args)?;
        f.spawn_agents(bin_dir)?;
        Ok(f)
    }

    /// Like [`NsFleet::start`], with the real `detour-control-plane serve`
    /// (SQLite in `dir/cp/data`, HTTPS as [`crate::fleet::CP_HOST`]) in the
    /// control plane's namespace instead of the stand-in. Every agent gets
    /// its own PoP token; `routes` (name, JSON spec) are stored before the
    /// control plane starts. The admin token is in `dir/cp/admin.token`.
    pub async fn start_with_control_plane(
        bin_dir: &Path,
        routes: &[(&str, &str)],
    ) -> anyhow::Result<NsFleet> {
        let mut f = NsFleet::prepare(true)?;
        let d = f.dir.path().to_path_buf();
        let cp_dir = d.join("cp");
        std::fs::create_dir_all(cp_dir.join("data"))?;
        let admin = format!("lab-admin-{}", uuid::Uuid::new_v4().simple());
        std::fs::write(cp_dir.join("admin.token"), &admin)?;
        std::fs::write(
            cp_dir.join("cp.toml"),
            format!(
                "listen = \"{CP_ADDR}:443\"\ndata_dir = \"{data}\"\nadmin_token_file = \"{admin}\"\n\n[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n",
                data = cp_dir.join("data").display(),
                admin = cp_dir.join("admin.token").display(),
                cert = d.join("certs/cp.pem").display(),
                key = d.join("certs/cp.key").display(),
            ),
        )?;
        let config = f.control_plane_config()?;
        for (pop, _) in POPS {
            let token = detour_control_plane::create_agent_token(&config, pop).await?;
            std::fs::write(d.join(pop).join("agent.token"), token)?;
        }
        let store = detour_control_plane::store::Store::open(&config).await?;
        for (name, json) in routes {
            let spec: detour_control_plane::routing::RouteSpec =
                serde_json::from_str(json).with_context(|| format!("route {name}"))?;
            if let Err(e) = spec.compile(name) {
                bail!("route {name}: {e:?}");
            }
            let text = serde_json::to_string(&spec)?;
            store
                .put_route(name, &text, &spec.matcher_key(), "lab", None)
                .await?;
        }
        store.close().await;
        f.spawn_control_plane(bin_dir)?;
        f.spawn_agents(bin_dir)?;
        Ok(f)
    }

    /// The real control plane's configuration (after
    /// [`NsFleet::start_with_control_plane`]).
    pub fn control_plane_config(&self) -> anyhow::Result<detour_control_plane::Config> {
        let path = self.dir.path().join("cp").join("cp.toml");
        detour_control_plane::Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Restarts the real control plane process: `graceful` sends SIGTERM and
    /// waits for it to finish what it has (like `systemctl restart`), else
    /// SIGKILL (a crash). Nothing listens for `down`, then it starts again on
    /// the same address and database.
    pub async fn restart_control_plane(
        &mut self,
        bin_dir: &Path,
        graceful: bool,
        down: Duration,
    ) -> anyhow::Result<()> {
        let Some(pos) = self.children.iter().position(|(n, _)| n == "cp") else {
            bail!("no control plane is running");
        };
        let (_, mut child) = self.children.remove(pos);
        if graceful {
            run(&["kill", "-TERM", &child.id().to_string()])?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while child.try_wait()?.is_none() {
                if tokio::time::Instant::now() > deadline {
                    let _ = child.kill();
                    bail!(
                        "the control plane did not stop within 15 s of SIGTERM:\n{}",
                        self.log("cp")
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } else {
            let _ = child.kill();
            let _ = child.wait();
        }
        tokio::time::sleep(down).await;
        self.spawn_control_plane(bin_dir)
    }

    fn spawn_control_plane(&mut self, bin_dir: &Path) -> anyhow::Result<()> {
        let cfg = self.dir.path().join("cp").join("cp.toml").display().to_string();
        self.spawn(
            "cp",
            &bin_dir.join("detour-control-plane"),
            &["serve", "--config", &cfg],
        )
    }

    fn spawn_agents(&mut self, bin_dir: &Path) -> anyhow::Result<()> {
        let agent = bin_dir.join("detour-agent");
        for (pop, _) in POPS {
            let cfg = self.dir.path().join(pop).join("agent.toml").display().to_string();
            self.spawn(pop, &agent, &["run", "--config", &cfg])?;
        }
        Ok(())
    }

    /// Namespaces, links, certificates and agent configs; no processes yet.
    fn prepare(with_tokens: bool) -> anyhow::Result<NsFleet> {
        let id = format!("{:04x}", rand::random::<u16>());
        let mut f = NsFleet {
            id,
            dir: tempfile::tempdir()?,
            children: Vec::new(),
            namespaces: Vec::new(),
        };
        f.topology()?;
        f.configs(with_tokens)?;
        Ok(f)
    }

    fn topology(&mut self) -> anyhow::Result<()> {
        let sw = self.ns("sw");
        for name in ["sw", "cp", "blr", "maa", "del"] {
            let ns = self.ns(name);
            run(&["ip", "netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        for br in ["inet", "bb"] {
            run(&["ip", "-n", &sw, "link", "add", br, "type", "bridge"])?;
            run(&["ip", "-n", &sw, "link", "set", br, "up"])?;
        }
        // (namespace, interface inside it, bridge, address)
        let mut links: Vec<(String, &str, &str, String)> =
            vec![(self.ns("cp"), "up0", "inet", format!("{CP_ADDR}/24"))];
        for (pop, n) in POPS {
            links.push((self.ns(pop), "up0", "inet", format!("10.201.0.{n}/24")));
            links.push((self.ns(pop), "bb0", "bb", format!("10.202.0.{n}/24")));
        }
        for (i, (ns, ifname, br, addr)) in links.iter().enumerate() {
            let outer = format!("v{}{i}", self.id);
            let inner = format!("w{}{i}", self.id);
            run(&[
                "ip", "link", "add", &outer, "netns", &sw, "type", "veth", "peer", "name", &inner, "netns",
                ns,
            ])?;
            run(&["ip", "-n", ns, "link", "set", &inner, "name", ifname])?;
            run(&["ip", "-n", ns, "addr", "add", addr, "dev", ifname])?;
            run(&["ip", "-n", ns, "link", "set", ifname, "up"])?;
            run(&["ip", "-n", &sw, "link", "set", &outer, "master", br])?;
            run(&["ip", "-n", &sw, "link", "set", &outer, "up"])?;
        }
        Ok(())
    }

    fn configs(&self, with_tokens: bool) -> anyhow::Result<()> {
        let d = self.dir.path();
        let certs = d.join("certs");
        detour_agent::pki::init(&certs)?;
        for (pop, _) in POPS {
            detour_agent::pki::issue(&certs, pop, &certs, 30)?;
        }
        crate::fleet::cp_server_config(&certs)?;
        for (pop, n) in POPS {
            let dir = d.join(pop);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(
                dir.join("agent.toml"),
                format!(
                    "pop = \"{pop}\"\n[listen]\nlocal = \"127.0.0.1:8080\"\nrelay = \"10.202.0.{n}:4443\"\nadmin = \"127.0.0.1:9090\"\n\
                     [control_plane]\nurl = \"https://{}\"\naddresses = [\"{CP_ADDR}:443\"]\nca = \"../certs/ca.pem\"\n{token}\
                     [tls]\nca = \"../certs/ca.pem\"\ncert = \"../certs/{pop}.pem\"\nkey = \"../certs/{pop}.key\"\n\
                     [health]\ninterval = \"200ms\"\n[peers]\nfile = \"peers.toml\"\n",
                    crate::fleet::CP_HOST,
                    token = if with_tokens {
                        "token_file = \"agent.token\"\n"
                    } else {
                        ""
                    },
                ),
            )?;
            let mut peers = String::new();
            for (other, m) in POPS {
                if other != pop {
                    peers.push_str(&format!(
                        "[[peer]]\nname = \"{other}\"\nrelay = \"10.202.0.{m}:4443\"\n\n"
                    ));
                }
            }
            std::fs::write(dir.join("peers.toml"), peers)?;
        }
        Ok(())
    }

    fn spawn(&mut self, name: &str, bin: &Path, args: &[&str]) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(name)])
            .arg(bin)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("DETOUR_LAB_AGENT_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} in {}", bin.display(), self.ns(name)))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// A process's log, for failure messages.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Runs `args` inside `name`'s namespace and returns its stdout.
    pub fn exec(&self, name: &str, bin: &Path, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(name)])
            .arg(bin)
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `pop`'s active path as its agent reports it (`detour-agent status`),
    /// `?` when the agent does not answer.
    pub fn active_path(&self, pop: &str, bin_dir: &Path) -> String {
        let out = self
            .exec(pop, &bin_dir.join("detour-agent"), &["status", "--json"])
            .unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| v["active_path"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "?".to_owned())
    }

    /// Waits until `pop`'s agent reports every path up (via its admin /status).
    pub async fn wait_ready(&self, pop: &str, bin_dir: &Path, within: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let out = self
                .exec(pop, &bin_dir.join("detour-agent"), &["status", "--json"])
                .unwrap_or_default();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) {
                let paths = v["paths"].as_array().cloned().unwrap_or_default();
                if paths.len() == 3 && paths.iter().all(|p| p["state"] == "up") {
                    return Ok(());
                }
            }
            if std::time::Instant::now() > deadline {
                bail!("{pop} not ready within {within:?}: {out}\n{}", self.log(pop));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Drops `percent`% of packets (100 = blackhole) both ways on `pop`'s uplink.
    pub fn uplink_loss(&self, pop: &str, percent: u32) -> anyhow::Result<()> {
        let ns = self.ns(pop);
        self.heal(pop)?;
        run(&["ip", "netns", "exec", &ns, "nft", "add", "table", "inet", "chaos"])?;
        for (chain, hook, dir) in [("in", "input", "iifname"), ("out", "output", "oifname")] {
            let spec = format!("{{ type filter hook {hook} priority 0 ; }}");
            run(&[
                "ip", "netns", "exec", &ns, "nft", "add", "chain", "inet", "chaos", chain, &spec,
            ])?;
            let pct = percent.to_string();
            let mut rule = vec![
                "ip", "netns", "exec", &ns, "nft", "add", "rule", "inet", "chaos", chain, dir, "up0",
            ];
            if percent < 100 {
                rule.extend(["numgen", "random", "mod", "100", "<", pct.as_str()]);
            }
            rule.push("drop");
            run(&rule)?;
        }
        Ok(())
    }

    /// Removes every fault on `pop`'s uplink.
    pub fn heal(&self, pop: &str) -> anyhow::Result<()> {
        let ns = self.ns(pop);
        // Deleting a table that is not there fails; that is fine.
        let _ = run(&[
            "ip", "netns", "exec", &ns, "nft", "delete", "table", "inet", "chaos",
        ]);
        Ok(())
    }

    /// Starts `detour-lab load` in blr's namespace against its agent (2 s
    /// client timeout) with `args` (`--rate`, `--duration`, …); its stdout
    /// is the JSON summary.
    pub fn spawn_load(&self, bin_dir: &Path, args: &[&str]) -> anyhow::Result<Child> {
        Command::new("ip")
            .args(["netns", "exec", &self.ns("blr")])
            .arg(bin_dir.join("detour-lab"))
            .args(["load", "--url", "http://127.0.0.1:8080", "--timeout", "2s"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting detour-lab load")
    }

    /// The process id of `name`'s process (`ip netns exec` execs into it).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children.iter().find(|(n, _)| n == name).map(|(_, c)| c.id())
    }

    /// Stops `pop`'s agent process.
    pub fn kill(&mut self, name: &str) {
        for (n, c) in self.children.iter_mut() {
            if n == name {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Starts `pop`'s agent again from its config (after [`NsFleet::kill`]).
    pub fn restart(&mut self, pop: &str, bin_dir: &Path) -> anyhow::Result<()> {
        self.children.retain(|(n, _)| n != pop);
        let cfg = self.dir.path().join(pop).join("agent.toml").display().to_string();
        self.spawn(pop, &bin_dir.join("detour-agent"), &["run", "--config", &cfg])
    }

    /// The blr agent's relay address on the backbone.
    pub fn relay(pop: &str) -> SocketAddr {
        let n = POPS.iter().find(|(p, _)| *p == pop).map_or(11, |(_, n)| *n);
        SocketAddr::from(([10, 202, 0, n], 4443))
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for NsFleet {
    fn drop(&mut self) {
        for (_, c) in self.children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespaces removes their veths, bridges and rules.
        for ns in &self.namespaces {
            let _ = run(&["ip", "netns", "delete", ns]);
        }
    }
}

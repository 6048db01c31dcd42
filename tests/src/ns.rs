//! A fleet in Linux network namespaces (root only): one namespace per PoP and
//! one for the control plane, an "internet" bridge joining every PoP's uplink
//! and the control plane, and a separate "backbone" bridge joining the PoPs,
//! so cutting blr's uplink leaves its peer links intact. Faults are nftables
//! rules inside blr's namespace on its uplink only. Everything (namespaces,
//! links, processes) is removed on drop, also when a test fails.
//!
//! With two control-plane regions ([`NsFleet::start_two_regions`]) there is
//! a namespace per region and one for their shared Postgres, on a third
//! "datacentre" bridge that the PoPs do not join.
//!
//! Addresses are 10.201.0.0/24 (internet), 10.202.0.0/24 (backbone) and
//! 10.203.0.0/24 (datacentre), inside these namespaces only; nothing routes
//! anywhere else.

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
/// The second region's control plane ([`NsFleet::start_two_regions`]).
pub const CP2_ADDR: &str = "10.201.0.101";
/// Postgres, on a "datacentre" bridge (10.203.0.0/24) that only the two
/// regions' control planes join.
pub const DB_ADDR: &str = "10.203.0.1";

/// A running namespace fleet.
pub struct NsFleet {
    /// Suffix making every name unique to this run.
    pub id: String,
    pub dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
    namespaces: Vec<String>,
    /// Control-plane regions: 1, or 2 with [`NsFleet::start_two_regions`].
    regions: usize,
    /// The regions' shared database, when it is Postgres.
    postgres: Option<crate::pg::PrivatePostgres>,
}

impl NsFleet {
    /// Namespace name of `pop` (or `cp`, `sw`).
    pub fn ns(&self, name: &str) -> String {
        format!("dt{}{name}", self.id)
    }

    /// Builds the topology, certificates and configs, and starts the control
    /// plane stand-in and the three agents (binaries from `bin_dir`).
    pub fn start(bin_dir: &Path) -> anyhow::Result<NsFleet> {
        let mut f = NsFleet::prepare(false, 1)?;
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
        let mut f = NsFleet::prepare(true, 1)?;
        f.write_cp_config("cp", CP_ADDR, "cp", None)?;
        f.seed(routes).await?;
        f.spawn_control_plane("cp", bin_dir)?;
        f.spawn_agents(bin_dir)?;
        Ok(f)
    }

    /// Two control-plane regions on one Postgres: `mumbai` (priority 1,
    /// [`CP_ADDR`], `cp.detour.test`) and `singapore` (priority 2,
    /// [`CP2_ADDR`], `cp2.detour.test`), each `detour-control-plane serve`
    /// in its own namespace, the database in a third one ([`DB_ADDR`]).
    /// Every agent lists both endpoints, so it has six paths.
    pub async fn start_two_regions(bin_dir: &Path, routes: &[(&str, &str)]) -> anyhow::Result<NsFleet> {
        let mut f = NsFleet::prepare(true, 2)?;
        let pg = crate::pg::PrivatePostgres::start_in_namespace(&f.ns("db"), DB_ADDR, "10.203.0.0/24")?;
        let url = format!("postgres://detour@{DB_ADDR}:5432/detour");
        f.write_cp_config("cp", CP_ADDR, "cp", Some(&url))?;
        f.write_cp_config("cp2", CP2_ADDR, "cp2", Some(&url))?;
        // This process is outside the namespaces: it reaches the database
        // through the server's Unix socket.
        f.write_cp_config("local", CP_ADDR, "cp", Some(&pg.socket_url()))?;
        f.postgres = Some(pg);
        f.seed(routes).await?;
        f.spawn_control_plane("cp", bin_dir)?;
        f.spawn_control_plane("cp2", bin_dir)?;
        f.spawn_agents(bin_dir)?;
        Ok(f)
    }

    /// `dir/<name>/cp.toml`: a control plane listening on `addr`:443 with
    /// the certificate `certs/<cert>.pem`, on `database_url` (else SQLite in
    /// `dir/cp/data`), the admin token in `dir/cp/admin.token`.
    fn write_cp_config(
        &self,
        name: &str,
        addr: &str,
        cert: &str,
        database_url: Option<&str>,
    ) -> anyhow::Result<()> {
        let d = self.dir.path();
        let cp_dir = d.join("cp");
        std::fs::create_dir_all(cp_dir.join("data"))?;
        std::fs::create_dir_all(d.join(name))?;
        let admin = cp_dir.join("admin.token");
        if !admin.exists() {
            std::fs::write(&admin, format!("lab-admin-{}", uuid::Uuid::new_v4().simple()))?;
        }
        let db = database_url.map_or(String::new(), |u| format!("database_url = \"{u}\"\n"));
        std::fs::write(
            d.join(name).join("cp.toml"),
            format!(
                "listen = \"{addr}:443\"\ndata_dir = \"{data}\"\n{db}admin_token_file = \"{admin}\"\n\n[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n",
                data = cp_dir.join("data").display(),
                admin = admin.display(),
                cert = d.join(format!("certs/{cert}.pem")).display(),
                key = d.join(format!("certs/{cert}.key")).display(),
            ),
        )?;
        Ok(())
    }

    /// A PoP token per agent and `routes` (name, JSON spec), stored before
    /// any control plane starts.
    async fn seed(&self, routes: &[(&str, &str)]) -> anyhow::Result<()> {
        let d = self.dir.path();
        let config = self.control_plane_config()?;
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
        Ok(())
    }

    /// The real control plane's configuration as this process can use it
    /// (after [`NsFleet::start_with_control_plane`] or
    /// [`NsFleet::start_two_regions`]).
    pub fn control_plane_config(&self) -> anyhow::Result<detour_control_plane::Config> {
        let local = self.dir.path().join("local").join("cp.toml");
        let path = if local.exists() {
            local
        } else {
            self.dir.path().join("cp").join("cp.toml")
        };
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
        self.spawn_control_plane("cp", bin_dir)
    }

    /// Kills region `name`'s control plane (`cp` or `cp2`) with SIGKILL, as
    /// a region that is suddenly gone.
    pub fn stop_control_plane(&mut self, name: &str) {
        self.kill(name);
        self.children.retain(|(n, _)| n != name);
    }

    /// Starts region `name`'s control plane (`cp` or `cp2`) from its config.
    pub fn spawn_control_plane(&mut self, name: &str, bin_dir: &Path) -> anyhow::Result<()> {
        let cfg = self.dir.path().join(name).join("cp.toml").display().to_string();
        self.spawn(
            name,
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
    fn prepare(with_tokens: bool, regions: usize) -> anyhow::Result<NsFleet> {
        let id = format!("{:04x}", rand::random::<u16>());
        let mut f = NsFleet {
            id,
            dir: tempfile::tempdir()?,
            children: Vec::new(),
            namespaces: Vec::new(),
            regions,
            postgres: None,
        };
        f.topology()?;
        f.configs(with_tokens)?;
        Ok(f)
    }

    fn topology(&mut self) -> anyhow::Result<()> {
        let sw = self.ns("sw");
        let mut names = vec!["sw", "cp", "blr", "maa", "del"];
        if self.regions == 2 {
            names.extend(["cp2", "db"]);
        }
        for name in names {
            let ns = self.ns(name);
            run(&["ip", "netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        for br in ["inet", "bb", "dc"] {
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
        if self.regions == 2 {
            links.push((self.ns("cp2"), "up0", "inet", format!("{CP2_ADDR}/24")));
            links.push((self.ns("cp"), "dc0", "dc", "10.203.0.100/24".to_owned()));
            links.push((self.ns("cp2"), "dc0", "dc", "10.203.0.101/24".to_owned()));
            links.push((self.ns("db"), "dc0", "dc", format!("{DB_ADDR}/24")));
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
        let token = if with_tokens {
            "token_file = \"agent.token\"\n"
        } else {
            ""
        };
        let control_plane = if self.regions == 2 {
            crate::fleet::cp_cert(&certs, crate::fleet::CP2_HOST, "cp2")?;
            format!(
                "[control_plane]\nca = \"../certs/ca.pem\"\n{token}\
                 [[control_plane.endpoints]]\nname = \"mumbai\"\nurl = \"https://{}\"\naddresses = [\"{CP_ADDR}:443\"]\n\
                 [[control_plane.endpoints]]\nname = \"singapore\"\nurl = \"https://{}\"\naddresses = [\"{CP2_ADDR}:443\"]\n",
                crate::fleet::CP_HOST,
                crate::fleet::CP2_HOST,
            )
        } else {
            format!(
                "[control_plane]\nurl = \"https://{}\"\naddresses = [\"{CP_ADDR}:443\"]\nca = \"../certs/ca.pem\"\n{token}",
                crate::fleet::CP_HOST,
            )
        };
        for (pop, n) in POPS {
            let dir = d.join(pop);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(
                dir.join("agent.toml"),
                format!(
                    "pop = \"{pop}\"\n[listen]\nlocal = \"127.0.0.1:8080\"\nrelay = \"10.202.0.{n}:4443\"\nadmin = \"127.0.0.1:9090\"\n\
                     [tls]\nca = \"../certs/ca.pem\"\ncert = \"../certs/{pop}.pem\"\nkey = \"../certs/{pop}.key\"\n\
                     [health]\ninterval = \"200ms\"\n[peers]\nfile = \"peers.toml\"\n{control_plane}",
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
                if paths.len() == 3 * self.regions && paths.iter().all(|p| p["state"] == "up") {
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
        self.uplink_loss_permille(pop, percent * 10)
    }

    /// Drops `permille` of every thousand packets (1000 = blackhole) both
    /// ways on `pop`'s uplink; 0 adds the rules without dropping anything.
    pub fn uplink_loss_permille(&self, pop: &str, permille: u32) -> anyhow::Result<()> {
        let ns = self.ns(pop);
        self.heal(pop)?;
        run(&["ip", "netns", "exec", &ns, "nft", "add", "table", "inet", "chaos"])?;
        for (chain, hook, dir) in [("in", "input", "iifname"), ("out", "output", "oifname")] {
            let spec = format!("{{ type filter hook {hook} priority 0 ; }}");
            run(&[
                "ip", "netns", "exec", &ns, "nft", "add", "chain", "inet", "chaos", chain, &spec,
            ])?;
            let n = permille.to_string();
            let mut rule = vec![
                "ip", "netns", "exec", &ns, "nft", "add", "rule", "inet", "chaos", chain, dir, "up0",
            ];
            if permille < 1000 {
                rule.extend(["numgen", "random", "mod", "1000", "<", n.as_str()]);
            }
            rule.push("drop");
            run(&rule)?;
        }
        Ok(())
    }

    /// Drops every packet between `pop`'s uplink and `addr` (one region's
    /// control plane), both ways; the rest of the uplink works.
    pub fn uplink_block(&self, pop: &str, addr: &str) -> anyhow::Result<()> {
        let ns = self.ns(pop);
        self.heal(pop)?;
        run(&["ip", "netns", "exec", &ns, "nft", "add", "table", "inet", "chaos"])?;
        for (chain, hook, dir, who) in [
            ("in", "input", "iifname", "saddr"),
            ("out", "output", "oifname", "daddr"),
        ] {
            let spec = format!("{{ type filter hook {hook} priority 0 ; }}");
            run(&[
                "ip", "netns", "exec", &ns, "nft", "add", "chain", "inet", "chaos", chain, &spec,
            ])?;
            run(&[
                "ip", "netns", "exec", &ns, "nft", "add", "rule", "inet", "chaos", chain, dir, "up0", "ip",
                who, addr, "drop",
            ])?;
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
        // Stopped through its namespace, so before that goes.
        drop(self.postgres.take());
        if std::thread::panicking() && std::env::var_os("DETOUR_LAB_KEEP_FAILED").is_some() {
            let dir = std::mem::replace(
                &mut self.dir,
                tempfile::TempDir::new().expect("a temporary directory"),
            );
            eprintln!(
                "DETOUR_LAB_KEEP_FAILED: logs and configs kept in {}",
                dir.keep().display()
            );
        }
        // Deleting the namespaces removes their veths, bridges and rules.
        for ns in &self.namespaces {
            let _ = run(&["ip", "netns", "delete", ns]);
        }
    }
}

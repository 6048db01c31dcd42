//! Processes the lab starts and looks at: the workspace's built binaries next
//! to the running executable, children killed on drop, free ports and waiting
//! for a listener, and what `/proc` says about a process (memory, CPU, file
//! descriptors, threads). Everything else in the lab builds on these.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Proc {
    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Stops the child with SIGTERM and waits up to `within` for it to exit
    /// (then it is killed): a process that writes something at exit, such as
    /// an instrumented build's profile (`packaging/pgo`), gets to write it.
    pub async fn terminate(mut self, within: Duration) {
        if let Ok(pid) = i32::try_from(self.0.id())
            && let Some(pid) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The directory of the running executable, where cargo also puts the
/// workspace's other binaries.
pub fn exe_dir() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default())
}

/// The built binary `name` next to the running executable; an error that
/// says how to build it when it is missing.
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} is missing; build it first: cargo build --release -p detour-agent -p detour-lab",
            p.display()
        );
    }
    Ok(p)
}

/// The directory holding the built binaries, once `detour-agent` is known
/// to be there (what the benchmarks on the namespace fleet run).
pub fn built_bins() -> anyhow::Result<PathBuf> {
    Ok(sibling("detour-agent")?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default())
}

/// Starts `detour-agent run --config CONFIG` from `bin` (`--threads` when
/// given), quiet: warnings only, and to nowhere. Returns at once; wait for
/// its local listener before sending to it.
pub fn spawn_agent(bin: &Path, config: &Path, threads: Option<u16>) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--config"]).arg(config);
    if let Some(n) = threads {
        cmd.arg("--threads").arg(n.to_string());
    }
    let child = cmd
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting detour-agent")?;
    Ok(Proc(child))
}

/// A loopback port for a process the lab starts: free now, and kept from
/// every other caller of this function on the machine until this process
/// exits.
///
/// Not port 0 bound and let go: such a port comes from the kernel's
/// ephemeral range, and any outgoing connection on the machine may take it as
/// its source port before the child binds it (CI saw an agent exit with
/// "Address already in use" 28 s after its port was chosen). These ports come
/// from below that range, which outgoing connections never use, and a locked
/// file per port keeps two tests (separate processes under nextest) from
/// choosing the same one.
pub fn free_port() -> anyhow::Result<u16> {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let (low, high) = port_range();
    let span = u32::from(high - low);
    let dir = std::env::temp_dir().join("detour-test-ports");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let start = rand::random_range(0..span);
    let mut unopened = None;
    for i in 0..span {
        let port = low + u16::try_from((start + i) % span).expect("below the span");
        let path = dir.join(port.to_string());
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path);
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                // Another user's lock file: that port is theirs.
                unopened = Some(format!("{}: {e}", path.display()));
                continue;
            }
        };
        if file.try_lock().is_err() {
            continue; // another process holds it
        }
        if std::net::TcpListener::bind(loopback(port)).is_err() {
            continue; // something outside the lab listens there; the lock goes with `file`
        }
        HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
        return Ok(port);
    }
    match unopened {
        Some(why) => bail!("no free loopback port in {low}..{high} (last lock file not opened: {why})"),
        None => bail!("no free loopback port in {low}..{high}"),
    }
}

/// The ports [`free_port`] hands out: from 10000 up to the kernel's ephemeral
/// range, or above it if it starts too low to leave room.
fn port_range() -> (u16, u16) {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    match ephemeral {
        (low, _) if low >= 12_000 => (10_000, low),
        (_, high) if high <= 63_000 => (high + 1, 65_535),
        _ => (10_000, 32_768), // the range covers nearly everything: take the old default's gap
    }
}

/// `n` distinct free loopback ports, each as [`free_port`].
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    (0..n).map(|_| free_port()).collect()
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until something accepts connections on `addr` (at most 10 s).
pub async fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Whether this process runs as root (namespaces, nftables and a private
/// PostgreSQL need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// `/proc/<pid>/status`: the kernel's summary of a process.
pub fn status(pid: u32) -> std::io::Result<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
}

/// How many file descriptors a process has open.
pub fn fd_count(pid: u32) -> std::io::Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// A numeric field of `/proc/<pid>/status` text (`VmRSS:`, `Threads:`…), 0
/// when it is missing.
pub fn status_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A process's resident memory now and its high-water mark, in KiB (0 when
/// it is gone).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = status(pid).unwrap_or_default();
    (status_field(&status, "VmRSS:"), status_field(&status, "VmHWM:"))
}

/// A process's resident memory now, from one reading: (total, anonymous,
/// file-backed), in KiB. File-backed pages are mostly its binary's code:
/// clean, shared with the page cache, and dropped first when memory is
/// short.
pub fn rss_split_kib(pid: u32) -> (u64, u64, u64) {
    let status = status(pid).unwrap_or_default();
    (
        status_field(&status, "VmRSS:"),
        status_field(&status, "RssAnon:"),
        status_field(&status, "RssFile:"),
    )
}

/// CPU time (user + system) a process has used so far, in microseconds.
pub fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    cpu_ticks(&stat) * 10_000
}

/// CPU time of a process and its children now running (a database server
/// and its backends), in microseconds.
pub fn tree_cpu_us(pid: u32) -> u64 {
    let mut total = cpu_us(pid);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return total;
    };
    for e in dir.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // The parent is the second field after the command name.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        if rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            total += cpu_ticks(&stat) * 10_000;
        }
    }
    total
}

/// User + system CPU of a `/proc/<pid>/stat` line, in clock ticks (10 ms).
fn cpu_ticks(stat: &str) -> u64 {
    // Fields after the command name, which is in parentheses and may hold
    // spaces. `rest` starts at field 3 (the state), so utime and stime, fields
    // 14 and 15 of the line, are at 11 and 12. Position matters: some fields
    // are negative (tpgid is -1 without a terminal), so nothing may be skipped.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_ticks_reads_utime_and_stime_even_without_a_terminal() {
        // A daemon's line: tty 0, tpgid -1; utime 452, stime 131.
        let line =
            "6771 (detour-agent x) S 6762 6762 6762 0 -1 4194560 1302 0 0 0 452 131 0 0 20 0 1 0 2930 0";
        assert_eq!(super::cpu_ticks(line), 583);
        assert_eq!(super::cpu_ticks("garbage"), 0);
    }

    #[test]
    fn status_fields_are_read_by_name() {
        let status = "Name:\tdetour-agent\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t5\n";
        assert_eq!(super::status_field(status, "VmRSS:"), 10240);
        assert_eq!(super::status_field(status, "VmHWM:"), 20480);
        assert_eq!(super::status_field(status, "RssAnon:"), 0, "absent: 0");
        assert_eq!(super::status_field(status, "Threads:"), 5);
        assert_eq!(super::status_field(status, "VmSwap:"), 0);
    }
}

//! Fault-injecting TCP links: a loopback proxy between an agent and what it
//! talks to, whose behaviour can be switched at any time (pass, blackhole,
//! reset, added latency, stalls that mimic retransmission under packet loss).
//! A mode change applies to connections already open, as a real link failure
//! would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How the link treats bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Bytes flow.
    Pass,
    /// A dead route: connections are accepted but nothing gets through; bytes
    /// wait, as unacknowledged segments would, and flow again when the link
    /// heals (TCP would retransmit them).
    Blackhole,
    /// Open connections are reset and new ones are refused.
    Reset,
    /// Every chunk waits this long.
    Latency(Duration),
    /// Each chunk is held for `stall` with probability `percent`/100, like a
    /// segment lost and retransmitted.
    Lossy { percent: u32, stall: Duration },
}

/// A running link.
pub struct Link {
    pub addr: SocketAddr,
    mode: watch::Sender<Fault>,
    record: Arc<Mutex<Option<Vec<u8>>>>,
    pub connections: Arc<AtomicU64>,
    /// Bytes forwarded from clients to the target (what the target received).
    pub bytes_up: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
}

impl Link {
    /// Starts a link on a free loopback port that forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(Fault::Pass);
        let (stop, stop_rx) = watch::channel(false);
        let record: Arc<Mutex<Option<Vec<u8>>>> = Arc::new(Mutex::new(None));
        let connections = Arc::new(AtomicU64::new(0));
        let bytes_up = Arc::new(AtomicU64::new(0));
        let rec = record.clone();
        let conns = connections.clone();
        let up = bytes_up.clone();
        tokio::spawn(async move {
            let mut stop_rx2 = stop_rx.clone();
            loop {
                let (client, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stop_rx2.changed() => return,
                };
                conns.fetch_add(1, Ordering::Relaxed);
                let mode_rx = mode_rx.clone();
                let rec = rec.clone();
                let stop_rx = stop_rx.clone();
                let up = up.clone();
                tokio::spawn(async move {
                    if *mode_rx.borrow() == Fault::Reset {
                        let _ = client.set_zero_linger();
                        return;
                    }
                    let _ = client.set_nodelay(true);
                    // A SYN into a dead route goes nowhere until the route heals.
                    let mut wait = mode_rx.clone();
                    if wait.wait_for(|m| *m != Fault::Blackhole).await.is_err() {
                        return;
                    }
                    let upstream = match TcpStream::connect(target).await {
                        Ok(s) => s,
                        Err(_) => {
                            let _ = client.set_zero_linger();
                            return;
                        }
                    };
                    let _ = upstream.set_nodelay(true);
                    pump(client, upstream, mode_rx, rec, up, stop_rx).await;
                });
            }
        });
        Ok(Link {
            addr,
            mode,
            record,
            connections,
            bytes_up,
            stop,
        })
    }

    /// Starts a link like [`Link::start`], run by a thread and runtime of
    /// its own. For a link that carries bulk traffic (recordings at 100 MB/s
    /// and more) beside an in-process agent: on a real PoP that forwarding
    /// is the kernel's work, not tasks queued on the agent's runtime, and
    /// copying it on the runtime that also serves the agent's calls would
    /// measure the lab, not the agent. With `cpu`, the thread is kept on
    /// that CPU in the `SCHED_IDLE` class, like the store it leads to: the
    /// network's work on the cloud's CPU, where it yields to the control
    /// plane at once (see [`crate::cpus`]).
    pub async fn start_apart(target: SocketAddr, cpu: Option<usize>) -> std::io::Result<Link> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("lab-link".to_owned())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = crate::cpus::pin_current_thread(cpu) {
                        tracing::warn!("link: cannot keep to CPU {cpu}: {e}");
                    }
                    if let Err(e) = detour_agent::recordings::idle_priority() {
                        tracing::warn!("link: cannot lower its priority: {e}");
                    }
                }
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    match Link::start(target).await {
                        Ok(link) => {
                            let mut stop = link.stop.subscribe();
                            if tx.send(Ok(link)).is_ok() {
                                // Until the link is dropped.
                                let _ = stop.wait_for(|s| *s).await;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            })?;
        rx.await
            .map_err(|_| std::io::Error::other("the link's thread ended before it started"))?
    }

    /// Switches the link's behaviour, for open and new connections alike.
    pub fn set(&self, fault: Fault) {
        let _ = self.mode.send(fault);
    }

    pub fn fault(&self) -> Fault {
        *self.mode.borrow()
    }

    /// Starts keeping a copy of every byte that passes (both directions).
    pub fn start_recording(&self) {
        *self.record.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// The bytes recorded so far.
    pub fn recorded(&self) -> Vec<u8> {
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn pump(
    client: TcpStream,
    upstream: TcpStream,
    mode: watch::Receiver<Fault>,
    rec: Arc<Mutex<Option<Vec<u8>>>>,
    up: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
) {
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let a = direction(cr, uw, mode.clone(), rec.clone(), Some(up));
    let b = direction(ur, cw, mode.clone(), rec, None);
    let mut mode2 = mode.clone();
    let mut stop = stop;
    let reset = async move {
        loop {
            if *mode2.borrow_and_update() == Fault::Reset {
                return;
            }
            if mode2.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(a, b) } => {}
        _ = reset => {}
        _ = stop.changed() => {}
    }
    // Dropping the halves closes both sockets; a reset sends RST through linger 0
    // where the socket still exists (the halves own it).
}

async fn direction(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mode: watch::Receiver<Fault>,
    rec: Arc<Mutex<Option<Vec<u8>>>>,
    count: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let fault = *mode.borrow();
        match fault {
            Fault::Pass | Fault::Blackhole => {}
            Fault::Reset => break,
            Fault::Latency(d) => tokio::time::sleep(d).await,
            Fault::Lossy { percent, stall } => {
                if rand::random::<u32>() % 100 < percent {
                    tokio::time::sleep(stall).await;
                }
            }
        }
        // While the route is dead the chunk waits (and so, by backpressure,
        // does everything behind it).
        let mut wait = mode.clone();
        match wait.wait_for(|m| *m != Fault::Blackhole).await {
            Ok(m) if *m == Fault::Reset => break,
            Ok(_) => {}
            Err(_) => break,
        }
        if let Some(v) = rec.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            v.extend_from_slice(&buf[..n]);
        }
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if let Some(c) = &count {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    let _ = w.shutdown().await;
}

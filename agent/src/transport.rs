//! What the kernel's TCP stack knows about each path: how many data segments
//! the path's connections sent, how many of them had to be retransmitted, and
//! how many were delivered.
//!
//! Why: on a short path a lost segment is often repaired by the kernel in a
//! few milliseconds (a tail-loss probe or fast retransmit), so a request on a
//! path with 10% packet loss is merely a little late, far below any timeout
//! that must also tolerate a slow control plane. Retransmissions are the
//! direct measure of that loss, and unlike latency they do not move when this
//! server's CPU is busy or the control plane is slow.
//!
//! Every TCP connection a path dials is registered here (its address pair)
//! for as long as the connection lives; [`Diag`] asks the kernel for each
//! one's `tcp_info` over a `NETLINK_SOCK_DIAG` socket (what `ss -ti` does),
//! without touching the connection itself. Only this server's sending side is
//! seen: loss on the way back shows up as late or missing answers instead.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::nlas::Nla;
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

/// Cumulative counters of one connection, from the kernel's `tcp_info`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Data segments sent, repeats included (`tcpi_data_segs_out`).
    pub sent: u32,
    /// Data segments delivered, i.e. acknowledged (`tcpi_delivered`).
    pub delivered: u32,
    /// Data segments in flight now (`tcpi_unacked`).
    pub unacked: u32,
    /// Bytes written but not yet sent (`tcpi_notsent_bytes`): held back by
    /// the peer's window or pacing, they go out later with no write.
    pub notsent: u32,
}

impl Counters {
    /// Segments sent more than once so far: every segment first sent is
    /// either delivered or still in flight, so the rest of what was sent are
    /// repeats (retransmissions and loss probes). Under 10% loss in the netns
    /// lab this tracked the loss while `tcpi_total_retrans` stayed near zero
    /// (it appears not to count the tail-loss probes that repair most losses
    /// on a short path), so the agent uses this.
    pub fn repeats(&self) -> i64 {
        i64::from(self.sent) - i64::from(self.delivered) - i64::from(self.unacked)
    }
}

/// What a path's connections did since the previous sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta {
    /// Data segments sent, repeats included.
    pub sent: u64,
    /// Of those, repeats: retransmissions and loss probes.
    pub repeats: u64,
    /// Data segments delivered.
    pub delivered: u64,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.sent == 0 && self.repeats == 0 && self.delivered == 0
    }
}

/// The live TCP connections of one path.
#[derive(Debug, Default)]
pub struct Sockets {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    live: HashMap<u64, Conn>,
}

#[derive(Debug)]
struct Conn {
    local: SocketAddr,
    peer: SocketAddr,
    /// Counters at the previous sample; `None` before the first one.
    last: Option<Counters>,
    /// Whether bytes went out since the previous sample.
    written: Arc<AtomicBool>,
}

impl Conn {
    /// Whether the kernel's counters may have moved since the previous
    /// sample: data was written since, or some was still in flight or
    /// waiting to be sent then (and may have been sent, delivered or sent
    /// again). A connection that was idle with everything sent and
    /// acknowledged has the same counters, so a pool of idle connections
    /// costs no lookups.
    fn due(&self) -> bool {
        let written = self.written.swap(false, Ordering::Relaxed);
        written || self.last.is_none_or(|c| c.unacked > 0 || c.notsent > 0)
    }
}

/// Keeps a connection registered; dropped with the connection.
#[derive(Debug)]
pub struct Registration {
    sockets: Arc<Sockets>,
    id: u64,
    written: Arc<AtomicBool>,
}

impl Registration {
    /// Bytes went out on the connection.
    pub fn wrote(&self) {
        self.written.store(true, Ordering::Relaxed);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.sockets.inner).live.remove(&self.id);
    }
}

impl Sockets {
    /// Registers a connected stream by its address pair. `None` when the
    /// stream has no addresses (it is already closed).
    pub fn register(self: &Arc<Self>, stream: &tokio::net::TcpStream) -> Option<Registration> {
        let (local, peer) = (stream.local_addr().ok()?, stream.peer_addr().ok()?);
        let mut inner = lock(&self.inner);
        inner.next += 1;
        let id = inner.next;
        let written = Arc::new(AtomicBool::new(false));
        inner.live.insert(
            id,
            Conn {
                local,
                peer,
                last: None,
                written: written.clone(),
            },
        );
        Some(Registration {
            sockets: self.clone(),
            id,
            written,
        })
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        lock(&self.inner).live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds up what every live connection did since the previous sample,
    /// looking up only those whose counters may have moved ([`Conn::due`]).
    /// A connection's first sample only sets its baseline (its handshake is
    /// not evidence about the path now).
    pub fn sample(&self, diag: &mut Diag) -> Delta {
        // The kernel is asked without holding the lock, so a connection being
        // dialed or closed meanwhile never waits for the lookups.
        let conns: Vec<(u64, SocketAddr, SocketAddr, Arc<AtomicBool>)> = lock(&self.inner)
            .live
            .iter()
            .filter(|(_, c)| c.due())
            .map(|(id, c)| (*id, c.local, c.peer, c.written.clone()))
            .collect();
        let counters: Vec<(u64, Counters)> = conns
            .into_iter()
            .filter_map(|(id, local, peer, written)| match diag.query(local, peer) {
                Ok(Some(c)) => Some((id, c)),
                _ => {
                    // Not read this time: looked up again at the next sample.
                    written.store(true, Ordering::Relaxed);
                    None
                }
            })
            .collect();
        let mut inner = lock(&self.inner);
        let mut total = Delta::default();
        for (id, now) in counters {
            // Closed meanwhile: its last figures go with it.
            let Some(conn) = inner.live.get_mut(&id) else {
                continue;
            };
            if let Some(last) = conn.last {
                total.sent += u64::from(now.sent.wrapping_sub(last.sent));
                total.delivered += u64::from(now.delivered.wrapping_sub(last.delivered));
                total.repeats += (now.repeats() - last.repeats()).max(0) as u64;
            }
            conn.last = Some(now);
        }
        total
    }
}

/// A `NETLINK_SOCK_DIAG` socket that looks up one TCP connection at a time.
pub struct Diag {
    socket: netlink_sys::Socket,
    buf: Vec<u8>,
    /// The request being sent, kept between lookups: an agent with 100
    /// peers makes over a thousand lookups a second.
    out: Vec<u8>,
    /// A lookup returned before its answer was read, which may still come
    /// and must not be taken for the next one's.
    unread: bool,
}

impl Diag {
    pub fn new() -> io::Result<Diag> {
        let mut socket = netlink_sys::Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        // The kernel answers a lookup before `send` returns; never wait.
        socket.set_non_blocking(true)?;
        Ok(Diag {
            socket,
            buf: vec![0; 8192],
            out: Vec::new(),
            unread: false,
        })
    }

    /// The counters of the connection from `local` to `peer`, or `None` when
    /// the kernel no longer has it.
    pub fn query(&mut self, local: SocketAddr, peer: SocketAddr) -> io::Result<Option<Counters>> {
        let family = match local.ip() {
            IpAddr::V4(_) => AF_INET,
            IpAddr::V6(_) => AF_INET6,
        };
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        let mut msg = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::INFO,
                states: StateFlags::all(),
                socket_id: SocketId {
                    source_port: local.port(),
                    destination_port: peer.port(),
                    source_address: local.ip(),
                    destination_address: peer.ip(),
                    interface_id: 0,
                    // INET_DIAG_NOCOOKIE: match by addresses alone.
                    cookie: [0xff; 8],
                },
            })
            .into(),
        );
        msg.finalize();
        self.out.resize(msg.buffer_len(), 0);
        msg.serialize(&mut self.out);
        // Drop any answer left over from an earlier lookup (a syscall saved
        // on every lookup when there is none, which is nearly always).
        if self.unread {
            while self.socket.recv(&mut &mut self.buf[..], 0).is_ok() {}
            self.unread = false;
        }
        self.unread = true;
        self.socket.send(&self.out, 0)?;
        let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        self.unread = false;
        let reply = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(resp)) = reply.payload else {
            // An error reply: the connection is gone.
            return Ok(None);
        };
        Ok(resp.nlas.iter().find_map(|nla| match nla {
            Nla::TcpInfo(info) => Some(Counters {
                sent: info.data_segs_out,
                delivered: info.delivered,
                unacked: info.unacked,
                notsent: info.notsent_bytes,
            }),
            _ => None,
        }))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The kernel's counters of a real loopback connection move as data is
    /// sent, and a connection is forgotten when its registration drops.
    #[tokio::test]
    async fn counts_the_segments_a_connection_sends() {
        let mut diag = Diag::new().expect("NETLINK_SOCK_DIAG socket");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let _ = s.write_all(&buf[..n]).await;
                    }
                }
            }
        });
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.set_nodelay(true).unwrap();
        let sockets = Arc::new(Sockets::default());
        let reg = sockets.register(&client).unwrap();
        assert_eq!(
            sockets.sample(&mut diag),
            Delta::default(),
            "the first sample is the baseline"
        );
        let mut buf = [0u8; 5];
        for _ in 0..10 {
            client.write_all(b"hello").await.unwrap();
            client.read_exact(&mut buf).await.unwrap();
        }
        // Idle since its baseline, with nothing in flight then, as far as
        // the registration knows: not looked up.
        assert_eq!(sockets.sample(&mut diag), Delta::default());
        // Told of the writes (as `DialStream` tells it), the next sample
        // reads the counters and finds all ten: late, never lost.
        reg.wrote();
        let d = sockets.sample(&mut diag);
        assert_eq!(d.sent, 10, "{d:?}");
        assert_eq!(d.repeats, 0, "{d:?}");
        assert_eq!(d.delivered, 10, "{d:?}");
        assert_eq!(
            sockets.sample(&mut diag),
            Delta::default(),
            "nothing written since and nothing in flight"
        );
        drop(reg);
        assert!(sockets.is_empty());
        drop(client);
        server.await.unwrap();
    }
}

//! The handover between two agent processes on one host, over the Unix
//! socket `upgrade.dir/handover.sock`:
//!
//! 1. the new process (`detour-agent run --takeover`) connects and says
//!    hello (its version);
//! 2. the running one writes its health snapshot, then sends the names of
//!    its listening sockets with the sockets themselves (`SCM_RIGHTS`);
//! 3. the new process starts serving on them and answers `ready`;
//! 4. the running one drains and exits, and the new one takes the handover
//!    socket for the next upgrade.
//!
//! If the new process dies or fails before `ready`, the running one keeps
//! serving as if nothing happened. Only a process of the same user may ask
//! (the socket is 0600 and the peer's uid is checked): whoever holds the
//! sockets holds the agent's ports.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::{UnixListener, UnixStream};

use crate::Agent;
use crate::config::Upgrade;

/// The most sockets an agent has: local, admin, relay.
const MAX_SOCKETS: usize = 3;
/// The longest line either side reads (hello, ready): a client that sends
/// more gets a parse error, not unbounded memory.
const MAX_LINE: u64 = 4096;
/// How long the new process may take to say hello, and then to start.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    version: String,
    pid: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Sockets {
    version: String,
    pid: u32,
    names: Vec<String>,
}

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(Upgrade::SOCKET)
}

/// Listens on `dir/handover.sock` for a successor (replacing a socket file
/// left by an earlier process).
pub fn listen(dir: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let path = socket_path(dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves successors until one has taken over: returns then, and the caller
/// drains. A successor that fails halfway is logged and forgotten.
pub async fn serve(listener: UnixListener, agent: &Agent) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "handover socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match give(stream, agent).await {
            Ok(successor) => {
                tracing::info!(successor, "a new process took over the listeners: draining");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "takeover abandoned; this process keeps serving"),
        }
    }
}

/// The running process's side of one handover.
async fn give(stream: UnixStream, agent: &Agent) -> anyhow::Result<u32> {
    let cred = stream.peer_cred()?;
    let own = rustix::process::geteuid().as_raw();
    anyhow::ensure!(
        cred.uid() == own,
        "refused a takeover by uid {} (this agent runs as {own})",
        cred.uid()
    );
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(HELLO_TIMEOUT, (&mut reader).take(MAX_LINE).read_line(&mut line)).await??;
    let hello: Hello = serde_json::from_str(line.trim())?;
    tracing::info!(version = %hello.version, pid = hello.pid, "a new process asks for the listeners");
    agent.save_snapshot();
    let sockets = agent.sockets()?;
    let msg = Sockets {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        names: sockets.iter().map(|(n, _)| (*n).to_owned()).collect(),
    };
    let mut bytes = serde_json::to_vec(&msg)?;
    bytes.push(b'\n');
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
    let stream = reader.into_inner();
    send_all(&stream, &bytes, &fds).await?;
    drop(sockets);
    let mut reader = BufReader::new(stream);
    line.clear();
    tokio::time::timeout(READY_TIMEOUT, (&mut reader).take(MAX_LINE).read_line(&mut line)).await??;
    anyhow::ensure!(
        line.trim() == "ready",
        "the new process did not start (it said {:?})",
        line.trim()
    );
    Ok(hello.pid)
}

/// Sends `bytes` with `fds` attached to the first part.
async fn send_all(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let attach = if sent == 0 { fds } else { &[] };
        let r = stream.try_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !attach.is_empty() && !control.push(SendAncillaryMessage::ScmRights(attach)) {
                return Err(io::Error::other("too many sockets for one message"));
            }
            let iov = [IoSlice::new(&bytes[sent..])];
            Ok(rustix::net::sendmsg(
                stream,
                &iov,
                &mut control,
                SendFlags::NOSIGNAL,
            )?)
        });
        match r {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A handover under way on the new process's side: the sockets are here,
/// the old process waits for [`Successor::ready`].
pub struct Successor {
    stream: UnixStream,
    pub sockets: Vec<(String, OwnedFd)>,
    pub old_version: String,
    pub old_pid: u32,
}

/// Asks the agent running with `dir` for its listening sockets. `None`
/// when no agent listens there (nothing to take over: start as usual).
pub async fn take(dir: &Path) -> anyhow::Result<Option<Successor>> {
    let path = socket_path(dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
    };
    let hello = Hello {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
    };
    let mut line = serde_json::to_vec(&hello)?;
    line.push(b'\n');
    let mut stream = stream;
    stream.write_all(&line).await?;
    let (bytes, fds) = tokio::time::timeout(READY_TIMEOUT, recv_line_with_fds(&stream)).await??;
    let msg: Sockets = serde_json::from_slice(&bytes)?;
    anyhow::ensure!(
        msg.names.len() == fds.len(),
        "the running agent named {} sockets and sent {}",
        msg.names.len(),
        fds.len()
    );
    Ok(Some(Successor {
        stream,
        sockets: msg.names.into_iter().zip(fds).collect(),
        old_version: msg.version,
        old_pid: msg.pid,
    }))
}

/// Reads one newline-ended message and the descriptors sent with it.
async fn recv_line_with_fds(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut bytes = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        stream.readable().await?;
        let r = stream.try_io(Interest::READABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let got = rustix::net::recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
            for msg in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = msg {
                    fds.extend(received);
                }
            }
            Ok(got.bytes)
        });
        match r {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                bytes.extend_from_slice(&buf[..n]);
                if bytes.last() == Some(&b'\n') {
                    bytes.pop();
                    return Ok((bytes, fds));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

impl Successor {
    /// Tells the old process that this one serves: it drains and exits.
    pub async fn ready(mut self) -> io::Result<()> {
        self.stream.write_all(b"ready\n").await?;
        self.stream.flush().await
    }
}

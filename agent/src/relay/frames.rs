//! The tunnel's downstream framing (relay -> peer), so a relay can tell its
//! peer something between the control plane's bytes without reading them.
//! Today it says one thing: "draining" (this process is about to exit, so send
//! new requests on fresh tunnels, which reach the process that took over).
//!
//! Negotiated per tunnel: the peer's `CONNECT` carries `detour-tunnel:
//! framed` and the relay's `200` answers with the same header. Either side
//! without it gets a raw tunnel, so agents of two versions interoperate
//! during a rollout. Only the downstream is framed; the peer's bytes go up
//! raw.
//!
//! A frame is a 4-byte big-endian header, then its payload. A header with
//! the top bit set is a control frame, with no payload, whose low bits are the
//! code; otherwise the header is the payload's length, 1..=[`MAX_DATA`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

/// The header on the `CONNECT` and its answer.
pub const HEADER: &str = "detour-tunnel";
/// Its value: the downstream is framed.
pub const FRAMED: &str = "framed";

const CONTROL: u32 = 0x8000_0000;
/// Control frame: the relay is draining.
pub const DRAINING: u32 = CONTROL | 1;
/// The largest data frame's payload.
pub const MAX_DATA: usize = 16 * 1024;

/// Copies `from` (the control plane's side) to `to` (the peer's) as data
/// frames. When `drain` turns true, one `DRAINING` frame goes between two
/// data frames and the copy carries on: the peer's requests in flight are
/// answered. At the end of `from`, `to` is shut down for writing. Returns the
/// payload bytes copied.
pub async fn copy_framed<R, W>(from: &mut R, to: &mut W, mut drain: watch::Receiver<bool>) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 4 + MAX_DATA];
    let mut announced = false;
    let mut total = 0u64;
    loop {
        let n = tokio::select! {
            // Said before more bytes are copied, so it is never lost to an
            // upstream that ends at the same moment.
            biased;
            draining = async { drain.wait_for(|d| *d).await.is_ok() }, if !announced => {
                // (A dropped sender means the agent is gone: nothing to say.)
                announced = true;
                if draining {
                    to.write_all(&DRAINING.to_be_bytes()).await?;
                    to.flush().await?;
                }
                continue;
            }
            r = from.read(&mut buf[4..]) => r?,
        };
        if n == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        buf[..4].copy_from_slice(&(n as u32).to_be_bytes());
        to.write_all(&buf[..4 + n]).await?;
        to.flush().await?;
        total += n as u64;
    }
}

/// The peer's side: strips the frames off a tunnel's downstream and calls
/// `on_draining` for a `DRAINING` frame. Unknown control codes are skipped,
/// so a newer relay may add some.
pub struct Deframer {
    header: [u8; 4],
    have: usize,
    /// Payload bytes of the current data frame not yet read.
    remaining: usize,
    on_draining: Box<dyn Fn() + Send + Sync>,
}

impl Deframer {
    pub fn new(on_draining: Box<dyn Fn() + Send + Sync>) -> Deframer {
        Deframer {
            header: [0; 4],
            have: 0,
            remaining: 0,
            on_draining,
        }
    }

    /// Reads payload bytes from `inner` into `buf`.
    pub fn poll_read<S: AsyncRead + Unpin>(
        &mut self,
        mut inner: Pin<&mut S>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.remaining > 0 {
                let want = self.remaining.min(buf.remaining());
                let n = {
                    let mut sub = ReadBuf::new(buf.initialize_unfilled_to(want));
                    ready!(inner.as_mut().poll_read(cx, &mut sub))?;
                    sub.filled().len()
                };
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tunnel ended inside a frame",
                    )));
                }
                buf.advance(n);
                self.remaining -= n;
                return Poll::Ready(Ok(()));
            }
            let n = {
                let mut sub = ReadBuf::new(&mut self.header[self.have..]);
                ready!(inner.as_mut().poll_read(cx, &mut sub))?;
                sub.filled().len()
            };
            if n == 0 {
                if self.have == 0 {
                    // A clean end between frames.
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tunnel ended inside a frame header",
                )));
            }
            self.have += n;
            if self.have < 4 {
                continue;
            }
            self.have = 0;
            let h = u32::from_be_bytes(self.header);
            if h & CONTROL != 0 {
                if h == DRAINING {
                    (self.on_draining)();
                }
                continue;
            }
            if h == 0 || h as usize > MAX_DATA {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("relay sent a frame of {h} bytes"),
                )));
            }
            self.remaining = h as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Reads everything through a deframer.
    struct Reader<S> {
        inner: S,
        deframer: Deframer,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Reader<S> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.deframer.poll_read(Pin::new(&mut this.inner), cx, buf)
        }
    }

    #[tokio::test]
    async fn bytes_survive_the_framing_and_draining_arrives_between_them() {
        let (mut cp, mut cp_far) = tokio::io::duplex(64);
        let (mut relay_side, peer_side) = tokio::io::duplex(64);
        let (drain_tx, drain_rx) = watch::channel(false);
        let copy = tokio::spawn(async move { copy_framed(&mut cp_far, &mut relay_side, drain_rx).await });
        let drained = Arc::new(AtomicUsize::new(0));
        let seen = drained.clone();
        let mut reader = Reader {
            inner: peer_side,
            deframer: Deframer::new(Box::new(move || {
                seen.fetch_add(1, Ordering::SeqCst);
            })),
        };
        let first: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let writer = {
            let first = first.clone();
            tokio::spawn(async move {
                cp.write_all(&first).await.unwrap();
                cp
            })
        };
        let mut got = vec![0u8; first.len()];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(got, first);
        let mut cp = writer.await.unwrap();
        drain_tx.send(true).unwrap();
        cp.write_all(b"after").await.unwrap();
        drop(cp);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"after");
        assert_eq!(drained.load(Ordering::SeqCst), 1, "one draining frame");
        assert_eq!(copy.await.unwrap().unwrap(), 40_005);
    }

    #[tokio::test]
    async fn a_frame_cut_short_or_oversized_is_an_error() {
        for wire in [
            vec![0, 0, 0, 9, 1, 2],
            vec![0, 0],
            (MAX_DATA as u32 + 1).to_be_bytes().to_vec(),
            vec![0, 0, 0, 0],
        ] {
            let mut reader = Reader {
                inner: &wire[..],
                deframer: Deframer::new(Box::new(|| {})),
            };
            let mut out = Vec::new();
            assert!(reader.read_to_end(&mut out).await.is_err(), "{wire:?}");
        }
        // Unknown control codes are skipped.
        let mut wire = (CONTROL | 7).to_be_bytes().to_vec();
        wire.extend_from_slice(&[0, 0, 0, 2, b'o', b'k']);
        let mut reader = Reader {
            inner: &wire[..],
            deframer: Deframer::new(Box::new(|| {})),
        };
        let mut out = Vec::new();
        reader.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"ok");
    }
}

//! Listening sockets a process inherits instead of binding: from systemd
//! (`LISTEN_FDS`, matched to `[listen]` by address) or from the agent it
//! takes over from (matched by name).

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;

/// One inherited listening socket.
#[derive(Debug)]
struct Socket {
    /// `local`, `relay` or `admin` when the giver said so.
    name: Option<String>,
    listener: TcpListener,
}

/// The listening sockets this process was given; empty when it was given none.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<Socket>,
    /// Where they came from, for messages.
    pub from: &'static str,
}

/// Why inherited sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("LISTEN_FDS socket {index}: {source}")]
    Systemd { index: usize, source: std::io::Error },
    #[error("inherited socket {index} is not a listening TCP socket: {source}")]
    NotTcp { index: usize, source: std::io::Error },
}

impl Inherited {
    /// The sockets systemd passed (socket activation); none when this
    /// process was not started by a socket unit.
    pub fn from_systemd() -> Result<Inherited, InheritError> {
        let mut fds = listenfd::ListenFd::from_env();
        let mut sockets = Vec::new();
        for index in 0..fds.len() {
            match fds.take_tcp_listener(index) {
                Ok(Some(listener)) => sockets.push(Socket { name: None, listener }),
                Ok(None) => {}
                Err(source) => return Err(InheritError::Systemd { index, source }),
            }
        }
        Ok(Inherited {
            sockets,
            from: "systemd",
        })
    }

    /// Sockets received from the agent this one takes over from, with the
    /// names it gave them.
    pub fn from_fds(named: Vec<(String, OwnedFd)>) -> Result<Inherited, InheritError> {
        let mut sockets = Vec::new();
        for (index, (name, fd)) in named.into_iter().enumerate() {
            let listener = TcpListener::from(fd);
            listener
                .local_addr()
                .map_err(|source| InheritError::NotTcp { index, source })?;
            sockets.push(Socket {
                name: Some(name),
                listener,
            });
        }
        Ok(Inherited {
            sockets,
            from: "the running agent",
        })
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Takes out the socket given for `name` (`local`, `relay`, `admin`), or
    /// else one listening on `addr`.
    pub fn take(&mut self, name: &str, addr: SocketAddr) -> Option<TcpListener> {
        let by_name = self.sockets.iter().position(|s| s.name.as_deref() == Some(name));
        let i = by_name.or_else(|| {
            self.sockets
                .iter()
                .position(|s| s.name.is_none() && s.listener.local_addr().is_ok_and(|a| same_addr(a, addr)))
        })?;
        Some(self.sockets.remove(i).listener)
    }

    /// Addresses of the sockets nothing took: a socket unit listening where
    /// the config does not.
    pub fn leftover(&self) -> Vec<String> {
        self.sockets
            .iter()
            .map(|s| match s.listener.local_addr() {
                Ok(a) => a.to_string(),
                Err(_) => "?".to_owned(),
            })
            .collect()
    }
}

/// Whether a socket bound to `bound` serves the configured `want`. Port 0
/// in the config takes whatever port was bound.
fn same_addr(bound: SocketAddr, want: SocketAddr) -> bool {
    bound.ip() == want.ip() && (want.port() == 0 || bound.port() == want.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_matched_by_name_then_by_address() {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut named = Inherited::from_fds(vec![
            ("local".to_owned(), OwnedFd::from(a)),
            ("admin".to_owned(), OwnedFd::from(b)),
        ])
        .unwrap();
        assert!(
            named.take("relay", a_addr).is_none(),
            "a named socket is taken by name only"
        );
        assert_eq!(named.take("admin", a_addr).unwrap().local_addr().unwrap(), b_addr);
        assert_eq!(named.take("local", b_addr).unwrap().local_addr().unwrap(), a_addr);
        assert!(named.is_empty());

        let c = TcpListener::bind("127.0.0.1:0").unwrap();
        let c_addr = c.local_addr().unwrap();
        let mut unnamed = Inherited {
            sockets: vec![Socket {
                name: None,
                listener: c,
            }],
            from: "systemd",
        };
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(unnamed.take("local", other).is_none());
        assert_eq!(unnamed.leftover(), vec![c_addr.to_string()]);
        assert_eq!(
            unnamed.take("local", c_addr).unwrap().local_addr().unwrap(),
            c_addr
        );
    }
}

//! Accepting connections, the same way on every Detour listener (the agent's
//! local entry point, relay and admin listeners, the control plane).
//!
//! - [`accept`] rides out errors from `accept(2)` (out of file descriptors,
//!   a connection reset before it was accepted) with a growing pause, so a
//!   listener under pressure neither spins nor stops, and says so in the log
//!   at most once a second.
//! - [`ConnCap`] bounds the connections open at once: one over the cap is
//!   closed as soon as it is accepted, and the warning about it is logged at
//!   most once a second however many arrive.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The first pause after a failed accept; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// Repeated warnings about one listener are at most this frequent.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// The next connection on `listener`. Errors are retried, never returned:
/// each one the listener can recover from by waiting. `what` names the
/// listener in the log (`local`, `relay`, …). Cancel-safe.
pub async fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    let mut pause = FIRST_PAUSE;
    let mut warned: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    tracing::warn!(listener = what, error = %e, retry_in = ?pause, "accept failed");
                    warned = Some(Instant::now());
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }
}

/// A cap on the connections one listener keeps open.
#[derive(Debug)]
pub struct ConnCap {
    slots: Arc<Semaphore>,
    max: usize,
    /// The config key that sets the cap, for the log line.
    key: &'static str,
    warned: Mutex<Option<Instant>>,
}

impl ConnCap {
    pub fn new(max: usize, key: &'static str) -> ConnCap {
        ConnCap {
            slots: Arc::new(Semaphore::new(max)),
            max,
            key,
            warned: Mutex::new(None),
        }
    }

    /// A slot for one more connection, held until the permit is dropped;
    /// `None` when the cap is reached (the caller closes the connection and
    /// counts it).
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.slots.clone().try_acquire_owned().ok();
        if permit.is_none() {
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                tracing::warn!(
                    max = self.max,
                    "{} connections are open (the cap); closing new connections until one ends",
                    self.key
                );
                *warned = Some(Instant::now());
            }
        }
        permit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_cap_refuses_the_connection_over_it_and_frees_a_slot_when_one_ends() {
        let cap = ConnCap::new(2, "limits.max_connections");
        let a = cap.admit().expect("first");
        let _b = cap.admit().expect("second");
        assert!(cap.admit().is_none(), "a third is over the cap");
        assert!(cap.admit().is_none(), "and stays refused (logged once)");
        drop(a);
        assert!(cap.admit().is_some(), "a slot is free again");
    }

    #[tokio::test]
    async fn accept_returns_each_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (_server_side, peer) = accept(&listener, "test").await;
        let client = client.await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
    }
}

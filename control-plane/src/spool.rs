//! Emergency calls while the database is down.
//!
//! An emergency call is never refused: when its write fails because the
//! database is unavailable, the call is still routed from the rules in memory
//! and answered (`201`, header `X-Detour-Deferred: true`), and the call with
//! its answer is held here until the database is back. A background task
//! writes held calls in arrival order, each with its Idempotency-Key, so a
//! retry on this replica during the outage gets the same answer, and a retry
//! after the flush is replayed from the database like any other.
//!
//! A keyed call's id is derived from its key and request (api/calls.rs), so
//! when another attempt of the same call reached the database first (the
//! agent sends emergency calls on two paths at once; a retry may land on
//! another replica), the call stored under the key has the id this replica
//! answered with, and the held copy is dropped at the flush.
//!
//! Limits, by design: held calls live in this replica's memory. A crash during
//! an outage loses their records (the calls themselves were answered).
//! `spool_max` bounds the memory; past it an emergency call is still answered
//! but its record is not kept (counted as `lost`).

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::metrics::Metrics;
use crate::store::{Idem, NewCall, Outcome, Store, StoredResponse};

/// One emergency call answered without being stored.
#[derive(Debug, Clone)]
struct Held {
    idem: Option<Idem>,
    call: NewCall,
    response: StoredResponse,
}

/// What [`Spool::hold`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Hold {
    /// Held (or, when full, answered unrecorded): send this response.
    Answer(StoredResponse),
    /// The key is held already with the same request: send its response.
    Replay(StoredResponse),
    /// The key is held already with a different request.
    Mismatch,
}

pub struct Spool {
    held: Mutex<VecDeque<Held>>,
    max: usize,
}

impl Spool {
    pub fn new(max: usize) -> Spool {
        Spool {
            held: Mutex::new(VecDeque::new()),
            max,
        }
    }

    /// Calls waiting for the database.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The answer for a key that is held here: a repeat of a held call is
    /// answered as it was the first time, even once the database is back
    /// and before the call is written.
    pub fn held(&self, idem: &Idem) -> Option<Hold> {
        Self::find(&self.lock(), idem)
    }

    fn find(held: &VecDeque<Held>, idem: &Idem) -> Option<Hold> {
        let h = held
            .iter()
            .find(|h| h.idem.as_ref().is_some_and(|i| i.key == idem.key))?;
        let same = h
            .idem
            .as_ref()
            .is_some_and(|i| i.request_hash == idem.request_hash);
        Some(if same {
            Hold::Replay(h.response.clone())
        } else {
            Hold::Mismatch
        })
    }

    /// Holds an emergency call whose write failed.
    pub fn hold(
        &self,
        idem: Option<Idem>,
        call: NewCall,
        response: StoredResponse,
        metrics: &Metrics,
    ) -> Hold {
        let mut held = self.lock();
        if let Some(earlier) = idem.as_ref().and_then(|idem| Self::find(&held, idem)) {
            return earlier;
        }
        if held.len() >= self.max {
            tracing::error!(call_id = %call.id, held = held.len(),
                "emergency call answered but NOT recorded: the deferred-write spool is full");
            metrics.calls.with_label_values(&["emergency", "lost"]).inc();
            return Hold::Answer(response);
        }
        tracing::warn!(call_id = %call.id, destination = %call.destination,
            "database unavailable: emergency call answered from memory, its write deferred");
        metrics.calls.with_label_values(&["emergency", "deferred"]).inc();
        held.push_back(Held {
            idem,
            call,
            response: response.clone(),
        });
        metrics.spooled.set(held.len() as i64);
        Hold::Answer(response)
    }

    /// Writes held calls in order until one fails; returns how many were
    /// written.
    pub async fn flush(&self, store: &Store, retention: std::time::Duration, metrics: &Metrics) -> usize {
        let mut written = 0;
        loop {
            let Some(next) = self.lock().front().cloned() else {
                return written;
            };
            match store
                .create_call(next.idem.as_ref(), &next.call, &next.response, retention)
                .await
            {
                Ok(outcome) => {
                    if !matches!(outcome, Outcome::Done(())) {
                        // Another attempt of the same call (same key, so
                        // the same id) was written first; a key reused for
                        // a different request keeps its own call.
                        tracing::info!(call_id = %next.call.id, ?outcome,
                            "deferred emergency call already written by another attempt");
                    }
                    let mut held = self.lock();
                    if held.front().is_some_and(|h| h.call.id == next.call.id) {
                        held.pop_front();
                    }
                    metrics.spooled.set(held.len() as i64);
                    written += 1;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "deferred emergency calls still waiting for the database");
                    return written;
                }
            }
        }
    }
}

//! Deferred delivery: a request the config marks deferrable
//! (`[[forward.deferrable]]`: call events, CDRs, status callbacks) that no
//! path delivered within its deadline is written to a journal on local disk
//! (synced before the agent answers), answered `202 Accepted` with
//! `X-Detour-Deferred: <receipt>`, and sent later by a background sender
//! when a path works, with its original headers (so its `Idempotency-Key`):
//! the control plane applies it once.
//!
//! Order: the journal is one queue; the sender delivers the oldest record
//! of up to 16 keys at once, so the records of any one key (the path's `*`
//! segments: the call id) arrive in the order they were accepted while keys
//! do not wait for each other. A new request whose key still has records waiting is
//! queued behind them rather than sent ahead.
//!
//! The journal is JSON lines: `{"put": record}` when a request is accepted,
//! `{"done": seq}` when it was delivered (or refused for good). A line that
//! does not parse (a crash mid-write, damage) is reported and skipped: a torn
//! `put` was never answered 202, so nobody is owed it, and it is never sent
//! half. The file is rewritten with the waiting records only once enough
//! `done` lines have gathered.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::config::Deferrable;
use crate::forward::{Failure, Outbound};
use crate::metrics::Metrics;
use crate::runtime::Shared;

/// One accepted request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// The receipt given to the caller.
    pub id: String,
    /// Records of one key are delivered in order.
    pub key: String,
    pub method: String,
    /// Path and query on the control plane.
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// Base64.
    pub body: String,
    /// When it was accepted (ms since the epoch).
    pub accepted_ms: i64,
}

impl Record {
    fn bytes(&self) -> u64 {
        (self.body.len()
            + self.path.len()
            + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()) as u64
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Line {
    Put(Record),
    Done(u64),
}

/// Why a request could not be deferred.
#[derive(Debug)]
pub enum Refused {
    /// The journal holds `forward.deferred_max_bytes` already.
    Full { pending: usize, bytes: u64 },
    /// The journal could not be written (a full disk, an I/O error).
    Io(std::io::Error),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Full { pending, bytes } => write!(
                f,
                "the deferred journal is full ({pending} requests, {bytes} bytes waiting; forward.deferred_max_bytes)"
            ),
            Refused::Io(e) => write!(f, "the deferred journal cannot be written: {e}"),
        }
    }
}

struct State {
    file: File,
    queue: VecDeque<Record>,
    bytes: u64,
    next_seq: u64,
    /// Lines in the file that no longer describe a waiting record.
    stale_lines: usize,
}

/// The journal and its queue.
pub struct Deferred {
    path: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    wake: Notify,
    metrics: Arc<Metrics>,
}

/// What opening the journal found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub pending: usize,
    /// Lines that did not parse (a torn last line after a crash, or damage).
    pub damaged: usize,
}

impl Deferred {
    /// Opens (or creates) the journal at `path`.
    pub fn open(path: &Path, max_bytes: u64, metrics: Arc<Metrics>) -> std::io::Result<(Deferred, Loaded)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut queue: VecDeque<Record> = VecDeque::new();
        let mut damaged = 0;
        let mut lines = 0;
        let mut next_seq = 1;
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).split(b'\n') {
                    let line = line?;
                    if line.is_empty() {
                        continue;
                    }
                    lines += 1;
                    match serde_json::from_slice::<Line>(&line) {
                        Ok(Line::Put(r)) => {
                            next_seq = next_seq.max(r.seq + 1);
                            queue.push_back(r);
                        }
                        Ok(Line::Done(seq)) => queue.retain(|r| r.seq != seq),
                        Err(_) => damaged += 1,
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let bytes = queue.iter().map(Record::bytes).sum();
        let stale_lines = lines - queue.len();
        let d = Deferred {
            path: path.to_path_buf(),
            max_bytes,
            state: Mutex::new(State {
                file,
                queue,
                bytes,
                next_seq,
                stale_lines,
            }),
            wake: Notify::new(),
            metrics,
        };
        let loaded = Loaded {
            pending: d.lock().queue.len(),
            damaged,
        };
        if damaged > 0 {
            // Start from a clean file: a torn line must not glue itself to
            // the next one written.
            let mut st = d.lock();
            d.compact(&mut st)?;
        }
        d.publish(&d.lock());
        Ok((d, loaded))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether records of `key` are waiting (a new one must queue behind them).
    pub fn waiting(&self, key: &str) -> bool {
        self.lock().queue.iter().any(|r| r.key == key)
    }

    /// Accepts `out` under `key`: journalled and synced before this returns.
    /// The receipt. The agent's own token (`agent_auth`) is not kept: the
    /// one current at delivery is sent instead (tokens rotate).
    pub fn accept(
        &self,
        key: String,
        out: &Outbound,
        agent_auth: Option<&HeaderValue>,
    ) -> Result<String, Refused> {
        let mut st = self.lock();
        let mut record = Record {
            seq: st.next_seq,
            id: uuid::Uuid::new_v4().to_string(),
            key,
            method: out.method.to_string(),
            path: out.path_and_query.to_string(),
            headers: out
                .headers
                .iter()
                .filter(|(k, v)| !(*k == http::header::AUTHORIZATION && Some(*v) == agent_auth))
                .filter(|(k, _)| *k != http::header::HOST)
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect(),
            body: base64::engine::general_purpose::STANDARD.encode(&out.body),
            accepted_ms: now_ms(),
        };
        if st.bytes + record.bytes() > self.max_bytes {
            self.metrics.deferred_refused.with_label_values(&["full"]).inc();
            return Err(Refused::Full {
                pending: st.queue.len(),
                bytes: st.bytes,
            });
        }
        record.seq = st.next_seq;
        let line = serde_json::to_vec(&Line::Put(record.clone()))
            .map_err(|e| Refused::Io(std::io::Error::other(e)))?;
        if let Err(e) = write_synced(&mut st.file, &line) {
            self.metrics.deferred_refused.with_label_values(&["io"]).inc();
            return Err(Refused::Io(e));
        }
        st.next_seq += 1;
        st.bytes += record.bytes();
        let id = record.id.clone();
        st.queue.push_back(record);
        self.metrics.deferred_accepted.inc();
        self.publish(&st);
        drop(st);
        self.wake.notify_one();
        Ok(id)
    }

    /// The oldest waiting record of each key not in `busy`, oldest first,
    /// at most `n`: what may be sent now without reordering any key.
    fn ready(&self, busy: &std::collections::HashSet<String>, n: usize) -> Vec<Record> {
        let st = self.lock();
        let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let mut out = Vec::new();
        for r in &st.queue {
            if out.len() >= n {
                break;
            }
            if seen.insert(r.key.as_str()) && !busy.contains(&r.key) {
                out.push(r.clone());
            }
        }
        out
    }

    /// The head is finished with (delivered or refused for good).
    fn finish(&self, seq: u64) {
        let mut st = self.lock();
        let Some(pos) = st.queue.iter().position(|r| r.seq == seq) else {
            return;
        };
        if let Some(r) = st.queue.remove(pos) {
            st.bytes -= r.bytes();
        }
        // Not synced: a `done` lost in a crash means one more delivery with
        // the same Idempotency-Key, which the control plane absorbs.
        if let Ok(line) = serde_json::to_vec(&Line::Done(seq)) {
            let mut line = line;
            line.push(b'\n');
            if let Err(e) = st.file.write_all(&line) {
                tracing::warn!(journal = %self.path.display(), error = %e, "deferred: cannot note a delivery; it may be sent again (same Idempotency-Key)");
            }
        }
        st.stale_lines += 2;
        if st.stale_lines > 1024 && st.stale_lines > 4 * st.queue.len() {
            let mut st = st;
            if let Err(e) = self.compact(&mut st) {
                tracing::warn!(journal = %self.path.display(), error = %e, "deferred: cannot compact the journal");
            }
            self.publish(&st);
            return;
        }
        self.publish(&st);
    }

    /// Rewrites the journal with the waiting records only.
    fn compact(&self, st: &mut State) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            for r in &st.queue {
                let mut line = serde_json::to_vec(&Line::Put(r.clone())).map_err(std::io::Error::other)?;
                line.push(b'\n');
                f.write_all(&line)?;
            }
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        st.file = OpenOptions::new().append(true).open(&self.path)?;
        st.stale_lines = 0;
        Ok(())
    }

    fn publish(&self, st: &State) {
        let m = &self.metrics;
        m.deferred_pending.set(st.queue.len() as i64);
        m.deferred_pending_bytes.set(st.bytes as i64);
        let oldest = st
            .queue
            .front()
            .map_or(0.0, |r| (now_ms() - r.accepted_ms).max(0) as f64 / 1000.0);
        m.deferred_oldest_age.set(oldest);
    }

    /// What `/status` shows.
    pub fn report(&self) -> detour_wire::DeferredReport {
        let st = self.lock();
        detour_wire::DeferredReport {
            pending: st.queue.len() as u64,
            pending_bytes: st.bytes,
            oldest_age_s: st
                .queue
                .front()
                .map_or(0.0, |r| (now_ms() - r.accepted_ms).max(0) as f64 / 1000.0),
            journal: self.path.display().to_string(),
        }
    }
}

fn write_synced(file: &mut File, line: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line);
    buf.push(b'\n');
    file.write_all(&buf)?;
    file.sync_data()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The ordering key of a request `method path` under the rules, if one
/// makes it deferrable: the path's segments matched by `*`, joined by `/`.
pub fn key_of(rules: &[Deferrable], method: &Method, path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or("");
    rules.iter().find_map(|rule| {
        // Checked before anything is allocated: most requests match no rule.
        if rule.method != *method || rule.segments.len() != path.split('/').count() {
            return None;
        }
        let mut key = Vec::new();
        for (want, got) in rule.segments.iter().zip(path.split('/')) {
            match want {
                None if !got.is_empty() => key.push(got),
                None => return None,
                Some(s) if s == got => {}
                Some(_) => return None,
            }
        }
        Some(key.join("/"))
    })
}

/// Deliveries in flight at once, each for a different key.
pub const DELIVERY_CONCURRENCY: usize = 16;

/// The background sender: whenever a path works, delivers the oldest
/// waiting record of up to [`DELIVERY_CONCURRENCY`] keys at once, so each
/// key's records go one after the other, in order, while keys do not wait
/// for each other's round trips. A record the control plane refuses for
/// good (a 4xx other than 401, 403, 408 and 429) is dropped and counted, so
/// that it does not hold up its key; anything else stays where it is and is
/// tried again after a pause that grows to 10 s while nothing gets through,
/// cut short when a path returns.
pub async fn send_loop(shared: Arc<Shared>, deferred: Arc<Deferred>, mut shutdown: watch::Receiver<bool>) {
    use futures_util::StreamExt;
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    let mut busy: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut pause = Duration::from_millis(200);
    let mut paused_until: Option<tokio::time::Instant> = None;
    loop {
        let paused = paused_until.is_some_and(|t| tokio::time::Instant::now() < t);
        if !paused {
            paused_until = None;
            for record in deferred.ready(&busy, DELIVERY_CONCURRENCY - in_flight.len()) {
                busy.insert(record.key.clone());
                let shared = shared.clone();
                in_flight.push(async move {
                    let outcome = deliver(&shared, &record).await;
                    (record, outcome)
                });
            }
        }
        if in_flight.is_empty() {
            let wait = paused_until.map_or(Duration::from_secs(1), |t| {
                t.saturating_duration_since(tokio::time::Instant::now())
            });
            tokio::select! {
                _ = deferred.wake.notified(), if !paused => {}
                _ = path_change(&shared, wait), if paused => paused_until = None,
                _ = tokio::time::sleep(wait), if !paused => {}
                _ = shutdown.changed() => return,
            }
            continue;
        }
        let (record, outcome) = tokio::select! {
            Some(done) = in_flight.next() => done,
            _ = shutdown.changed() => return,
        };
        busy.remove(&record.key);
        match outcome {
            Delivered::Yes => {
                deferred.metrics.deferred_delivered.inc();
                deferred.finish(record.seq);
                pause = Duration::from_millis(200);
            }
            Delivered::Refused(status) => {
                tracing::warn!(receipt = %record.id, status, method = %record.method, path = %record.path, "deferred: the control plane refused a deferred request; dropped");
                deferred
                    .metrics
                    .deferred_dropped
                    .with_label_values(&["refused"])
                    .inc();
                deferred.finish(record.seq);
            }
            Delivered::NotYet(why) => {
                tracing::debug!(receipt = %record.id, why, "deferred: not delivered yet");
                if paused_until.is_none() {
                    paused_until = Some(tokio::time::Instant::now() + pause);
                    pause = (pause * 2).min(Duration::from_secs(10));
                }
            }
        }
        deferred.publish(&deferred.lock());
    }
}

/// Waits `pause`, or less: until the path new requests would take changes
/// (a path came back), so a backlog starts draining as soon as a path
/// works, not at the end of a long pause.
async fn path_change(shared: &Shared, pause: Duration) {
    let active = |s: &Shared| {
        s.forwarder
            .runtime()
            .health
            .snapshot()
            .active()
            .map(|p| p.name.to_string())
    };
    let before = active(shared);
    let until = tokio::time::Instant::now() + pause;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if active(shared) != before {
            return;
        }
    }
}

enum Delivered {
    Yes,
    Refused(u16),
    NotYet(String),
}

async fn deliver(shared: &Shared, r: &Record) -> Delivered {
    let (Ok(method), Ok(path_and_query)) = (
        Method::from_bytes(r.method.as_bytes()),
        r.path.parse::<http::uri::PathAndQuery>(),
    ) else {
        return Delivered::Refused(400);
    };
    let mut headers = HeaderMap::new();
    for (k, v) in &r.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            headers.append(k, v);
        }
    }
    // The agent's token as the config says now (each path sets `Host`).
    let cp = &shared.forwarder.runtime().config.control_plane;
    if let Some(v) = &cp.auth_value
        && !headers.contains_key(http::header::AUTHORIZATION)
    {
        headers.insert(http::header::AUTHORIZATION, v.clone());
    }
    let body = base64::engine::general_purpose::STANDARD
        .decode(&r.body)
        .map(Bytes::from)
        .unwrap_or_default();
    let out = Outbound {
        method,
        path_and_query,
        headers,
        body,
        emergency: false,
        pin: None,
        received: tokio::time::Instant::now(),
    };
    match shared.forwarder.forward(out).await {
        Ok(answer) => {
            let status = answer.response.status().as_u16();
            // Read the answer through, so the connection can be reused.
            use http_body_util::BodyExt;
            let _ = answer.response.into_body().collect().await;
            match status {
                200..=399 => Delivered::Yes,
                // The agent's own standing (a token being rotated), or
                // "later": not the request's fault.
                401 | 403 | 408 | 429 => Delivered::NotYet(format!("answered {status}")),
                400..=499 => Delivered::Refused(status),
                _ => Delivered::NotYet(format!("answered {status}")),
            }
        }
        Err(Failure::UnknownPin(p)) => Delivered::NotYet(format!("unknown pin {p}")),
        Err(Failure::Exhausted { .. }) => Delivered::NotYet("no path answered".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(method: &str, path: &str) -> Deferrable {
        Deferrable::new(method.parse().unwrap(), path)
    }

    #[test]
    fn the_key_is_what_the_stars_matched_and_other_requests_are_not_deferrable() {
        let rules = [rule("POST", "/v1/calls/*/events")];
        assert_eq!(
            key_of(&rules, &Method::POST, "/v1/calls/c-1/events"),
            Some("c-1".to_owned())
        );
        assert_eq!(
            key_of(&rules, &Method::POST, "/v1/calls/c-1/events?x=1"),
            Some("c-1".to_owned())
        );
        assert_eq!(key_of(&rules, &Method::POST, "/v1/calls"), None);
        assert_eq!(key_of(&rules, &Method::GET, "/v1/calls/c-1/events"), None);
        assert_eq!(key_of(&rules, &Method::POST, "/v1/calls//events"), None);
        assert_eq!(key_of(&rules, &Method::POST, "/v1/calls/c-1/events/x"), None);
    }

    fn outbound(n: u32) -> Outbound {
        let mut headers = HeaderMap::new();
        headers.insert(
            "idempotency-key",
            HeaderValue::from_str(&format!("k-{n}")).unwrap(),
        );
        Outbound {
            method: Method::POST,
            path_and_query: "/v1/calls/c/events".parse().unwrap(),
            headers,
            body: Bytes::from(format!("{{\"n\":{n}}}")),
            emergency: false,
            pin: None,
            received: tokio::time::Instant::now(),
        }
    }

    #[test]
    fn records_survive_a_reopen_in_order_and_a_torn_line_is_reported_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deferred.journal");
        let metrics = Arc::new(Metrics::new("blr"));
        let (d, _) = Deferred::open(&path, 1 << 20, metrics.clone()).unwrap();
        for n in 0..5 {
            d.accept("c".to_owned(), &outbound(n), None).unwrap();
        }
        let first = d.ready(&Default::default(), 1).remove(0);
        d.finish(first.seq);
        drop(d);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"put\":{\"seq\":99,\"id\":\"torn");
        std::fs::write(&path, text).unwrap();
        let (d, loaded) = Deferred::open(&path, 1 << 20, metrics.clone()).unwrap();
        assert_eq!((loaded.pending, loaded.damaged), (4, 1));
        let keys: Vec<String> = d.lock().queue.iter().map(|r| r.headers[0].1.clone()).collect();
        assert_eq!(keys, ["k-1", "k-2", "k-3", "k-4"]);
        // The next record goes after them, and the file was cleaned.
        d.accept("c".to_owned(), &outbound(5), None).unwrap();
        drop(d);
        let (d, loaded) = Deferred::open(&path, 1 << 20, metrics).unwrap();
        assert_eq!((loaded.pending, loaded.damaged), (5, 0));
        assert_eq!(d.lock().queue.back().unwrap().headers[0].1, "k-5");
    }

    #[test]
    fn only_the_oldest_record_of_each_idle_key_is_ready() {
        let dir = tempfile::tempdir().unwrap();
        let (d, _) = Deferred::open(&dir.path().join("j"), 1 << 20, Arc::new(Metrics::new("blr"))).unwrap();
        for (n, key) in ["a", "a", "b", "c", "b", "d"].iter().enumerate() {
            d.accept((*key).to_owned(), &outbound(n as u32), None).unwrap();
        }
        let busy: std::collections::HashSet<String> = ["c".to_owned()].into();
        let ready: Vec<String> = d
            .ready(&busy, 10)
            .iter()
            .map(|r| r.headers[0].1.clone())
            .collect();
        assert_eq!(ready, ["k-0", "k-2", "k-5"]);
        assert_eq!(d.ready(&busy, 2).len(), 2);
    }

    #[test]
    fn a_full_journal_refuses_new_records_and_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new("blr"));
        let (d, _) = Deferred::open(&dir.path().join("j"), 200, metrics).unwrap();
        let mut accepted = 0;
        let refused = loop {
            match d.accept("c".to_owned(), &outbound(accepted), None) {
                Ok(_) => accepted += 1,
                Err(e) => break e,
            }
            assert!(accepted < 100);
        };
        assert!(matches!(refused, Refused::Full { .. }), "{refused}");
        assert!(accepted >= 1);
        assert_eq!(d.lock().queue.len(), accepted as usize);
    }
}

//! Recordings: finished call recordings in a local directory are carried to
//! the object store over the agent's own paths (`direct`, or a peer's relay
//! to the store, TLS end to end), then recorded on their call at the control
//! plane, and only then deleted or moved locally.
//!
//! One task scans the directory every `recordings.scan_interval` and takes
//! the complete files one at a time. Each step is written to the [`journal`]
//! before it is acted on, so a restart or crash resumes where it stopped:
//! a multipart upload goes on from its next part. Files are never forgotten:
//! the directory itself is the list of what is still to do, and the journal
//! only says how far each got.
//!
//! Uploads use their own connection pools (one per path, to the store), never
//! the call-control connections, ranked by the same health table as calls.

pub mod journal;
mod priority;
mod s3;

pub use priority::idle_priority;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::config::{AfterUpload, AgentConfig, Complete, Recordings};
use crate::runtime::Shared;
use journal::{Entry, Journal};
use notify_debouncer_full::notify;

/// How long a refused recording waits before it is tried again (the
/// operator fixes the bucket, the credentials, the control plane).
pub const REFUSED_RETRY: Duration = Duration::from_secs(10);

/// Why a recording is not done yet (`detour_recordings_failed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The file cannot be read.
    Unreadable,
    /// The file went away before it was uploaded.
    Vanished,
    /// The file changed while it was being uploaded: it starts again.
    Changed,
    /// No call id in the file name (`recordings.call_id`).
    NoCallId,
    /// The store refused (wrong credentials, no such bucket, a bad checksum).
    StoreRefused,
    /// No path reached the store.
    StoreUnreachable,
    /// The control plane refused the recording (unknown call, a conflict).
    ControlPlaneRefused,
    /// The control plane could not be reached through the agent.
    ControlPlaneUnreachable,
    /// The journal could not be written (a full disk).
    Journal,
    /// Deleting or moving the local file failed.
    LocalAction,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unreadable => "unreadable",
            Reason::Vanished => "vanished",
            Reason::Changed => "changed",
            Reason::NoCallId => "no_call_id",
            Reason::StoreRefused => "store_refused",
            Reason::StoreUnreachable => "store_unreachable",
            Reason::ControlPlaneRefused => "control_plane_refused",
            Reason::ControlPlaneUnreachable => "control_plane_unreachable",
            Reason::Journal => "journal",
            Reason::LocalAction => "local_action",
        }
    }
}

/// A failed step: why, and what to tell people.
#[derive(Debug)]
pub struct Failure {
    pub reason: Reason,
    pub detail: String,
}

impl Failure {
    fn new(reason: Reason, detail: impl Into<String>) -> Failure {
        Failure {
            reason,
            detail: detail.into(),
        }
    }
}

/// The backlog, for `/status` and `detour-agent status`.
pub type Backlog = detour_wire::RecordingsReport;

/// What a file looked like at one scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Look {
    size: u64,
    mtime_ms: i64,
}

/// The recorder's state between scans.
struct Recorder {
    shared: Arc<Shared>,
    local: std::net::SocketAddr,
    journal: Journal,
    /// For `settled` files: the last look and since when it was the same.
    settling: HashMap<String, (Look, tokio::time::Instant)>,
    /// The last failure of each pending file, and when to try it again.
    failing: HashMap<String, (Failure, tokio::time::Instant)>,
    store: Option<Arc<s3::Store>>,
    uploaded: u64,
    /// The recorder's CPU class, told of the backlog.
    class: Arc<priority::Class>,
    /// To the agent's own local listener (the control plane's record).
    local_client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
}

/// Runs the recorder on a thread and runtime of its own, so that uploads
/// never hold up one of the runtime workers that serve calls; its threads
/// get CPU as [`priority`] says (idle CPU while the recorder keeps up).
/// Returns when the recorder stops.
pub async fn run_apart(shared: Arc<Shared>, local: std::net::SocketAddr, shutdown: watch::Receiver<bool>) {
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let class = Arc::new(priority::Class::new());
    let c = class.clone();
    let spawned = std::thread::Builder::new()
        .name("detour-recordings".to_owned())
        .spawn(move || {
            c.join();
            let (joins, leaves) = (c.clone(), c.clone());
            match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("detour-recordings")
                // Every thread of this runtime: workers and blocking pool.
                .on_thread_start(move || joins.join())
                .on_thread_stop(move || leaves.leave())
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(run(shared, local, shutdown, c.clone())),
                Err(e) => tracing::error!(error = %e, "recordings: cannot start the recorder's runtime; recordings are not uploaded"),
            }
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "recordings: cannot start the recorder's thread; recordings are not uploaded");
        return;
    }
    // From this runtime, which the recorder's class never starves: the
    // recorder's threads leave idle CPU when a recording waits too long.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut done_rx => return,
            _ = tick.tick() => {
                class.check(now_ms());
            }
        }
    }
}

/// Runs the recorder until `shutdown` turns true. `local` is the agent's own
/// local listener: the control plane is told of each recording through it,
/// like any call-handler request (retried, hedged and deduplicated).
async fn run(
    shared: Arc<Shared>,
    local: std::net::SocketAddr,
    mut shutdown: watch::Receiver<bool>,
    class: Arc<priority::Class>,
) {
    loop {
        // A `[recordings]` section may come (or go, or move its journal)
        // with a reload.
        let journal = loop {
            if let Some(cfg) = &shared.forwarder.runtime().config.recordings {
                break cfg.journal.clone();
            }
            shared.recordings.store(None);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
        };
        class.note_oldest(None);
        if !watch_section(&shared, local, &journal, &mut shutdown, &class).await {
            return;
        }
    }
}

/// Runs the recorder with the journal at `journal` until shutdown (false)
/// or until a reload drops the section or moves the journal (true).
async fn watch_section(
    shared: &Arc<Shared>,
    local: std::net::SocketAddr,
    journal_path: &Path,
    shutdown: &mut watch::Receiver<bool>,
    class: &Arc<priority::Class>,
) -> bool {
    let (journal, loaded) = loop {
        match Journal::open(journal_path) {
            Ok(j) => break j,
            Err(e) => {
                tracing::error!(journal = %journal_path.display(), error = %e, "recordings: cannot open the journal; recordings are not uploaded until it can be");
                shared
                    .metrics
                    .recordings_failed
                    .with_label_values(&[Reason::Journal.as_str()])
                    .inc();
                tokio::select! {
                    _ = tokio::time::sleep(REFUSED_RETRY) => {}
                    _ = shutdown.changed() => return false,
                }
                let rt = shared.forwarder.runtime();
                if rt
                    .config
                    .recordings
                    .as_ref()
                    .is_none_or(|c| c.journal != journal_path)
                {
                    return true;
                }
            }
        }
    };
    if loaded.damaged > 0 {
        tracing::warn!(journal = %journal_path.display(), damaged = loaded.damaged, "recordings: damaged journal lines skipped; the files they described are found again by the rescan");
        shared
            .metrics
            .recordings_failed
            .with_label_values(&[Reason::Journal.as_str()])
            .inc_by(loaded.damaged as u64);
    }
    let rt = shared.forwarder.runtime();
    tracing::info!(journal = %journal_path.display(), known = loaded.entries, "recordings: watching");
    let mut r = Recorder {
        shared: shared.clone(),
        local,
        journal,
        settling: HashMap::new(),
        failing: HashMap::new(),
        store: None,
        uploaded: 0,
        class: class.clone(),
        local_client: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http(),
    };
    let mut seen_config = rt.config.clone();
    let dir = rt
        .config
        .recordings
        .as_ref()
        .map(|c| c.dir.clone())
        .unwrap_or_default();
    let (_watcher, wake) = watch_dir(&dir);
    loop {
        let rt = r.shared.forwarder.runtime();
        let Some(cfg) = rt.config.recordings.clone() else {
            return true;
        };
        if cfg.journal != journal_path || cfg.dir != dir {
            return true;
        }
        if !Arc::ptr_eq(&seen_config, &rt.config) {
            // A reload (new credentials, a bucket fixed): refused files are
            // tried again now, not after their wait.
            seen_config = rt.config.clone();
            let now = tokio::time::Instant::now();
            for (_, retry_at) in r.failing.values_mut() {
                *retry_at = now;
            }
        }
        r.scan(&rt.config, &cfg, shutdown).await;
        tokio::select! {
            _ = tokio::time::sleep(cfg.scan_interval) => {}
            _ = wake.notified() => {}
            _ = shutdown.changed() => return false,
        }
    }
}

/// Watches `dir` (inotify) so that a recording renamed or written into it
/// wakes the scan at once instead of at the next `scan_interval`, which
/// stays the fallback (and times `complete = "settled"`). Hidden names (the
/// journal, files still being written under a dot name) wake nothing.
/// Without a watcher (the directory is missing, no inotify watches left)
/// the scan interval alone does the job.
fn watch_dir(dir: &Path) -> (Option<notify::RecommendedWatcher>, Arc<tokio::sync::Notify>) {
    use notify_debouncer_full::notify::Watcher;
    let wake = Arc::new(tokio::sync::Notify::new());
    let w = wake.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let visible = event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        });
        if visible && !matches!(event.kind, notify::EventKind::Access(_)) {
            w.notify_one();
        }
    });
    let watcher = match watcher {
        Ok(mut watcher) => match watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            Ok(()) => Some(watcher),
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "recordings: not watching the directory; scanning only");
                None
            }
        },
        Err(e) => {
            tracing::debug!(error = %e, "recordings: no directory watcher; scanning only");
            None
        }
    };
    (watcher, wake)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn look(meta: &std::fs::Metadata) -> Look {
    let mtime_ms = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64);
    Look {
        size: meta.len(),
        mtime_ms,
    }
}

impl Recorder {
    /// One pass over the directory: every complete file not yet done is
    /// taken in turn (oldest first); then the backlog is published.
    async fn scan(
        &mut self,
        config: &Arc<AgentConfig>,
        cfg: &Recordings,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let mut files = match list(cfg) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(dir = %cfg.dir.display(), error = %e, "recordings: cannot list the directory");
                self.fail_count(Reason::Unreadable);
                return;
            }
        };
        files.sort_by_key(|(_, l)| l.mtime_ms);
        let present: std::collections::HashSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
        self.settling.retain(|n, _| present.contains(n));
        self.failing.retain(|n, _| present.contains(n));
        // Done files that are gone (deleted or moved by us, or by someone)
        // need no memory; a kept file stays known, so it is not sent again.
        // A file that went away before it was done is counted, and its
        // multipart upload, if any, given up.
        let gone: Vec<Entry> = self
            .journal
            .entries()
            .filter(|e| !present.contains(&e.file))
            .cloned()
            .collect();
        for e in gone {
            if !e.done {
                tracing::warn!(file = %e.file, "recordings: a recording went away before it was stored and recorded");
                self.fail_count(Reason::Vanished);
                if let (Some(id), false) = (&e.upload_id, e.stored)
                    && let Ok(store) = self.store(config, cfg)
                {
                    store.abort(&self.shared, &e.key, id).await;
                }
            }
            if let Err(err) = self.journal.forget(&e.file) {
                tracing::warn!(error = %err, "recordings: cannot compact the journal");
            }
        }
        let mut pending = Vec::new();
        for (name, l) in &files {
            if self
                .journal
                .get(name)
                .is_some_and(|e| e.done && e.size == l.size && e.mtime_ms == l.mtime_ms)
            {
                continue;
            }
            pending.push((name.clone(), *l));
        }
        self.publish(&pending);
        for (name, l) in pending {
            if *shutdown.borrow() {
                return;
            }
            if !self.complete(cfg, &name, l) {
                continue;
            }
            if let Some((_, retry_at)) = self.failing.get(&name)
                && tokio::time::Instant::now() < *retry_at
            {
                continue;
            }
            let result = tokio::select! {
                r = self.process(config, cfg, &name, l) => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match result {
                Ok(()) => {
                    self.failing.remove(&name);
                }
                Err(f) => {
                    tracing::warn!(file = %name, reason = f.reason.as_str(), detail = %f.detail, "recordings: not uploaded yet");
                    self.fail_count(f.reason);
                    let backoff = match f.reason {
                        Reason::Changed | Reason::Vanished => Duration::ZERO,
                        Reason::StoreUnreachable | Reason::ControlPlaneUnreachable => Duration::from_secs(1),
                        _ => REFUSED_RETRY,
                    };
                    self.failing
                        .insert(name.clone(), (f, tokio::time::Instant::now() + backoff));
                }
            }
        }
        let files = list(cfg).unwrap_or_default();
        let pending: Vec<(String, Look)> = files
            .into_iter()
            .filter(|(n, l)| {
                !self
                    .journal
                    .get(n)
                    .is_some_and(|e| e.done && e.size == l.size && e.mtime_ms == l.mtime_ms)
            })
            .collect();
        self.publish(&pending);
    }

    fn fail_count(&self, reason: Reason) {
        self.shared
            .metrics
            .recordings_failed
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Whether `name` is finished, as `recordings.complete` says.
    fn complete(&mut self, cfg: &Recordings, name: &str, l: Look) -> bool {
        match cfg.complete {
            Complete::Renamed => true,
            Complete::Settled(settle) => {
                let now = tokio::time::Instant::now();
                match self.settling.get(name) {
                    Some((seen, since)) if *seen == l => now.duration_since(*since) >= settle,
                    _ => {
                        self.settling.insert(name.to_owned(), (l, now));
                        false
                    }
                }
            }
        }
    }

    fn publish(&self, pending: &[(String, Look)]) {
        let m = &self.shared.metrics;
        m.recordings_pending.set(pending.len() as i64);
        m.recordings_pending_bytes
            .set(pending.iter().map(|(_, l)| l.size as i64).sum());
        let now = now_ms();
        let oldest_ms = pending
            .iter()
            .map(|(n, l)| {
                self.journal
                    .get(n)
                    .map_or(l.mtime_ms, |e| e.seen_ms.min(l.mtime_ms))
            })
            .min();
        self.class.note_oldest(oldest_ms);
        let oldest = oldest_ms.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
        m.recordings_oldest_pending_age.set(oldest);
        let backlog = Backlog {
            pending: pending.len() as u64,
            pending_bytes: pending.iter().map(|(_, l)| l.size).sum(),
            oldest_pending_seconds: oldest,
            uploaded: self.uploaded,
            failing: self
                .failing
                .iter()
                .map(|(n, (f, _))| detour_wire::RecordingFailure {
                    file: n.clone(),
                    reason: f.reason.as_str().to_owned(),
                    detail: f.detail.clone(),
                })
                .collect(),
        };
        self.shared.recordings.store(Some(Arc::new(backlog)));
    }

    /// Takes one complete file as far as it goes: stored, recorded, done.
    async fn process(
        &mut self,
        config: &Arc<AgentConfig>,
        cfg: &Recordings,
        name: &str,
        l: Look,
    ) -> Result<(), Failure> {
        let path = cfg.dir.join(name);
        let mut entry = match self.journal.get(name).cloned() {
            Some(e) if e.size == l.size && e.mtime_ms == l.mtime_ms => e,
            old => {
                // Changed since an upload began: that upload is given up.
                if let Some(old) = old
                    && let Some(id) = &old.upload_id
                    && !old.stored
                {
                    let store = self.store(config, cfg)?;
                    store.abort(&self.shared, &old.key, id).await;
                }
                self.begin(config, cfg, name, l).await?
            }
        };
        if !entry.stored {
            let store = self.store(config, cfg)?;
            let journal = &mut self.journal;
            let mut save = |e: &Entry| {
                journal
                    .put(e)
                    .map_err(|err| Failure::new(Reason::Journal, err.to_string()))
            };
            // The whole file's SHA-256 (for the call record) comes from the
            // same pass that hashes the parts, so each byte is read from disk
            // twice (hashed, sent) and hashed twice (file, part).
            entry.sha256 = store
                .upload(&self.shared, &path, &mut entry, l.size, l.mtime_ms, &mut save)
                .await?;
            // A file that changed after its last part was read is stored
            // again, whole (the next pass overwrites the key).
            unchanged(&path, l)?;
            entry.stored = true;
            self.save(&entry)?;
            self.uploaded += 1;
            self.shared.metrics.recordings_uploaded.inc();
            tracing::info!(file = %name, key = %entry.key, bytes = entry.size, "recordings: stored");
        }
        if entry.sha256.is_empty() {
            // Stored before a crash that came before the hash was saved.
            entry.sha256 = sha256_file(&path, l).await?;
            self.save(&entry)?;
        }
        if !entry.recorded {
            self.record(cfg, &entry).await?;
            entry.recorded = true;
            self.save(&entry)?;
        }
        // Nothing written since it was stored may be deleted with it.
        unchanged(&path, l)?;
        match &cfg.after_upload {
            AfterUpload::Keep => {}
            AfterUpload::Delete => std::fs::remove_file(&path).map_err(|e| {
                Failure::new(Reason::LocalAction, format!("deleting {}: {e}", path.display()))
            })?,
            AfterUpload::Move(to) => {
                std::fs::create_dir_all(to).map_err(|e| {
                    Failure::new(Reason::LocalAction, format!("creating {}: {e}", to.display()))
                })?;
                std::fs::rename(&path, to.join(name)).map_err(|e| {
                    Failure::new(Reason::LocalAction, format!("moving to {}: {e}", to.display()))
                })?;
            }
        }
        entry.done = true;
        self.save(&entry)
    }

    fn save(&mut self, e: &Entry) -> Result<(), Failure> {
        self.journal
            .put(e)
            .map_err(|err| Failure::new(Reason::Journal, err.to_string()))
    }

    /// A file seen complete for the first time (or changed since): its call
    /// id, key and checksum, journalled before any byte is sent.
    async fn begin(
        &mut self,
        config: &Arc<AgentConfig>,
        cfg: &Recordings,
        name: &str,
        l: Look,
    ) -> Result<Entry, Failure> {
        let call_id = call_id(cfg, name)?;
        let date = date_of(l.mtime_ms);
        let key = cfg
            .store
            .key_template
            .replace("{pop}", &config.pop)
            .replace("{date}", &date)
            .replace("{call_id}", &call_id)
            .replace("{file}", name);
        let entry = Entry {
            file: name.to_owned(),
            size: l.size,
            mtime_ms: l.mtime_ms,
            call_id,
            key,
            // Hashed while the upload runs (see `process`).
            sha256: String::new(),
            upload_id: None,
            parts: Vec::new(),
            stored: false,
            recorded: false,
            done: false,
            seen_ms: now_ms(),
        };
        self.save(&entry)?;
        Ok(entry)
    }

    /// The store client for the current config (rebuilt when it changes).
    fn store(&mut self, config: &Arc<AgentConfig>, cfg: &Recordings) -> Result<Arc<s3::Store>, Failure> {
        let stale = self.store.as_ref().is_none_or(|s| !s.built_from(config));
        if stale {
            let s = s3::Store::new(config.clone(), cfg)
                .map_err(|e| Failure::new(Reason::StoreRefused, format!("store TLS: {e}")))?;
            self.store = Some(Arc::new(s));
        }
        self.store
            .clone()
            .ok_or_else(|| Failure::new(Reason::StoreUnreachable, "no store"))
    }

    /// Tells the control plane, through the agent's own local listener.
    async fn record(&self, cfg: &Recordings, e: &Entry) -> Result<(), Failure> {
        use http_body_util::BodyExt;
        let body = serde_json::json!({
            "bucket": cfg.store.bucket,
            "key": e.key,
            "size": e.size,
            "sha256": e.sha256,
        })
        .to_string();
        let idem = format!(
            "recording-{}",
            &hex::encode(Sha256::digest(format!("{}\n{}\n{}", e.call_id, e.key, e.sha256)))[..32]
        );
        let req = http::Request::post(format!("http://{}/v1/calls/{}/recordings", self.local, e.call_id))
            .header("content-type", "application/json")
            .header("idempotency-key", idem)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|err| Failure::new(Reason::ControlPlaneRefused, err.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.local_client.request(req))
            .await
            .map_err(|_| Failure::new(Reason::ControlPlaneUnreachable, "no answer in 10 s"))?
            .map_err(|err| Failure::new(Reason::ControlPlaneUnreachable, err.to_string()))?;
        let status = resp.status();
        let text = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
            Err(Failure::new(
                Reason::ControlPlaneUnreachable,
                format!("{status}: {text}"),
            ))
        } else {
            Err(Failure::new(
                Reason::ControlPlaneRefused,
                format!("{status}: {text}"),
            ))
        }
    }
}

/// The matching files in the directory, with how they look now.
fn list(cfg: &Recordings) -> std::io::Result<Vec<(String, Look)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&cfg.dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !cfg.patterns.iter().any(|p| p.matches(&name)) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        out.push((name, look(&meta)));
    }
    Ok(out)
}

/// The call id in a file name, as `recordings.call_id` finds it.
fn call_id(cfg: &Recordings, name: &str) -> Result<String, Failure> {
    let caps = cfg.call_id.captures(name).ok_or_else(|| {
        Failure::new(
            Reason::NoCallId,
            format!("`{}` does not match {}", name.escape_debug(), cfg.call_id),
        )
    })?;
    let id = caps
        .name("call_id")
        .or_else(|| caps.get(0))
        .map_or("", |m| m.as_str());
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(Failure::new(
            Reason::NoCallId,
            format!(
                "`{}` is not a call id (1 to 64 of A-Z a-z 0-9 . _ -)",
                id.escape_debug()
            ),
        ));
    }
    Ok(id.to_owned())
}

/// `YYYY-MM-DD` (UTC) of a time in ms since the epoch.
fn date_of(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms / 1000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

/// The hex SHA-256 of the file, which must still look like `l` afterwards.
/// The file's SHA-256 (hex), read and hashed on the blocking pool (a
/// runtime worker also serves call control).
async fn sha256_file(path: &Path, l: Look) -> Result<String, Failure> {
    let owned = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || -> Result<String, Failure> {
        use std::io::Read;
        let mut f = std::fs::File::open(&owned).map_err(|e| open_failure(&owned, e))?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| Failure::new(Reason::Unreadable, format!("{}: {e}", owned.display())))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        Ok(hex::encode(hash.finalize()))
    })
    .await
    .map_err(|e| Failure::new(Reason::Unreadable, format!("{}: {e}", path.display())))??;
    unchanged(path, l)?;
    Ok(hashed)
}

fn open_failure(path: &Path, e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::NotFound {
        Failure::new(Reason::Vanished, format!("{} is gone", path.display()))
    } else {
        Failure::new(Reason::Unreadable, format!("{}: {e}", path.display()))
    }
}

/// Fails when the file no longer looks like `l`.
fn unchanged(path: &Path, l: Look) -> Result<(), Failure> {
    let meta = std::fs::metadata(path).map_err(|e| open_failure(path, e))?;
    if look(&meta) != l {
        return Err(Failure::new(
            Reason::Changed,
            format!("{} changed while it was read", path.display()),
        ));
    }
    Ok(())
}

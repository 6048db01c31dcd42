//! Live reload: watches `agent.toml`, the peers file and the revocation list
//! (`tls.crl`), and listens for SIGHUP; validates the whole new config, and
//! swaps it in only when it is valid. A bad edit leaves the agent running on its old config, logs every
//! problem as `file:line:col: message`, counts
//! `detour_config_reloads_total{result="error"}` and shows the error in `/status`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify_debouncer_full::notify::event::ModifyKind;
use notify_debouncer_full::notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc;

use crate::agent::Agent;
use crate::config::{AgentConfig, ConfigFiles};
use crate::runtime::{Applied, ApplyError};

/// Editors save in several steps (truncate, write, rename): events closer
/// than this are one edit.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadResult {
    Applied,
    /// Nothing changed.
    Unchanged,
    /// Invalid or not appliable live; the message says why.
    Rejected(String),
}

/// Reloads once from the files and applies the result.
pub fn reload_now(agent: &Agent, files: &ConfigFiles) -> ReloadResult {
    let metrics = &agent.shared.metrics;
    let applied = AgentConfig::load(&files.agent)
        .map_err(ApplyError::Invalid)
        .and_then(|new| agent.apply(new));
    let result = match applied {
        Ok(Applied::Swapped) => ReloadResult::Applied,
        Ok(Applied::Unchanged) => ReloadResult::Unchanged,
        Err(ApplyError::Invalid(errors)) => {
            for e in &errors.0 {
                tracing::error!("{e}");
            }
            ReloadResult::Rejected(errors.to_string())
        }
        Err(e) => {
            tracing::error!("{}: {e}", files.agent.display());
            ReloadResult::Rejected(format!("{}: {e}", files.agent.display()))
        }
    };
    match &result {
        ReloadResult::Applied => {
            metrics.config_reloads.with_label_values(&["ok"]).inc();
            metrics.reload_succeeded();
            agent.shared.config_error.store(None);
            let rt = agent.shared.forwarder.runtime();
            let peers: Vec<String> = rt
                .config
                .peers
                .iter()
                .map(|p| format!("{}{}", p.name, if p.enabled { "" } else { " (disabled)" }))
                .collect();
            tracing::info!(peers = ?peers, "config reloaded");
        }
        ReloadResult::Unchanged => {
            // The files are valid again (say, a bad edit was reverted): a
            // successful reload, even though there is nothing to swap.
            if agent.shared.config_error.swap(None).is_some() {
                tracing::info!("config files valid again; running config unchanged");
            }
            metrics.config_reloads.with_label_values(&["ok"]).inc();
            metrics.reload_succeeded();
        }
        ReloadResult::Rejected(msg) => {
            metrics.config_reloads.with_label_values(&["error"]).inc();
            metrics.config_last_reload_successful.set(0);
            agent.shared.config_error.store(Some(Arc::new(msg.clone())));
            tracing::warn!("config reload rejected; still running on the previous config");
        }
    }
    result
}

/// How long to wait until the newest of the config files has not been
/// modified for [`DEBOUNCE`]; `None` when they are all settled.
fn fresh_for(files: &ConfigFiles) -> Option<Duration> {
    let now = std::time::SystemTime::now();
    files
        .watched()
        .filter_map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .filter_map(|m| now.duration_since(m).ok())
        .filter(|age| *age < DEBOUNCE)
        .map(|age| DEBOUNCE - age)
        .max()
}

fn watch_dirs(files: &ConfigFiles) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = files
        .watched()
        .map(|f| f.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf))
        .map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            }
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

type Watcher = Debouncer<RecommendedWatcher, RecommendedCache>;

fn watch(files: &ConfigFiles, tx: mpsc::UnboundedSender<()>) -> Option<Watcher> {
    let file_names: Vec<std::ffi::OsString> = files
        .watched()
        .filter_map(|p| p.file_name().map(|n| n.to_owned()))
        .collect();
    let mut debouncer = match new_debouncer(DEBOUNCE, None, move |res: DebounceEventResult| {
        if let Ok(events) = res {
            // Only writes, renames, creations and removals: the agent's own
            // reads of the files raise access events, which would otherwise
            // trigger a reload after every reload.
            let relevant = events
                .iter()
                .filter(|e| {
                    matches!(
                        e.kind,
                        EventKind::Any
                            | EventKind::Create(_)
                            | EventKind::Remove(_)
                            | EventKind::Modify(ModifyKind::Any | ModifyKind::Data(_) | ModifyKind::Name(_))
                    )
                })
                .flat_map(|e| e.paths.iter())
                .any(|p| p.file_name().is_some_and(|n| file_names.iter().any(|f| f == n)));
            if relevant {
                let _ = tx.send(());
            }
        }
    }) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch config files; reload with SIGHUP");
            return None;
        }
    };
    for dir in watch_dirs(files) {
        // Watching the directory, not the file, survives editors that save by rename.
        if let Err(e) = debouncer.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch config directory; reload with SIGHUP");
        }
    }
    Some(debouncer)
}

/// Watches the files and SIGHUP until aborted.
pub fn spawn(agent: Arc<Agent>, files: ConfigFiles) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut files = files;
        let mut _watcher = watch(&files, tx.clone());
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hup_fut = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup_fut = std::future::pending::<Option<()>>();
            tokio::select! {
                Some(()) = rx.recv() => {}
                _ = hup_fut => tracing::info!("SIGHUP: reloading config"),
            }
            // Coalesce a burst of events into one reload, and never read a
            // file that is still being written: an event from an earlier
            // save can arrive while an editor is between truncating and
            // writing, and a half-written file may well be valid (an empty
            // peers file is) and would be applied.
            loop {
                while rx.try_recv().is_ok() {}
                match fresh_for(&files) {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => break,
                }
            }
            if reload_now(&agent, &files) == ReloadResult::Applied {
                let new_files = agent.shared.forwarder.runtime().config.files.clone();
                if new_files != files {
                    files = new_files;
                    _watcher = watch(&files, tx.clone());
                }
            }
        }
    })
}

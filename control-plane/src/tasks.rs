//! The control plane's background loops: the route-version poll, the
//! retention sweep (old calls, audit entries, idempotency keys, agent
//! reports), the fleet history's purge, writing emergency calls held during
//! a database outage, reading the TLS certificate again, and SQLite's
//! checkpoints. [`Tasks`] starts them with the server and stops
//! them in the order shutdown needs.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::App;

/// How often the fleet history is trimmed to its bounds.
const FLEET_PURGE_EVERY: Duration = Duration::from_secs(30);
/// History samples are kept this many buckets beyond the page's window
/// (5 minutes), so a replica with a slow clock still finds its window whole.
const SAMPLE_SLACK_BUCKETS: i64 = 10;

/// The running background loops.
pub struct Tasks {
    stop: watch::Sender<bool>,
    loops: Vec<JoinHandle<()>>,
    checkpoint: JoinHandle<()>,
}

impl Tasks {
    pub fn start(app: &Arc<App>) -> Tasks {
        let (stop, rx) = watch::channel(false);
        let mut loops = vec![
            tokio::spawn(poll_routes(app.clone(), rx.clone())),
            tokio::spawn(retention(app.clone(), rx.clone())),
            tokio::spawn(purge_fleet(app.clone(), rx.clone())),
            tokio::spawn(flush_deferred(app.clone(), rx.clone())),
        ];
        if let Some(cert) = &app.cert {
            loops.push(tokio::spawn(rotate_certificate(
                app.clone(),
                cert.clone(),
                rx.clone(),
            )));
        }
        let checkpoint = {
            let every = app.config.database.sqlite_checkpoint_interval;
            let (store, url) = (app.store.clone(), app.config.database_url());
            tokio::spawn(async move { store.checkpoint_sqlite(&url, every, rx).await })
        };
        Tasks {
            stop,
            loops,
            checkpoint,
        }
    }

    /// A handle that tells every loop to stop at its next turn (sent when
    /// shutdown begins).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }

    /// Stops the loops that use the database, so the final flush of held
    /// emergency calls runs alone. SQLite's checkpoints go on until
    /// [`Tasks::finish`].
    pub fn stop_loops(&mut self) {
        for h in self.loops.drain(..) {
            h.abort();
        }
    }

    pub fn finish(self) {
        self.checkpoint.abort();
    }
}

/// Reads the HTTPS certificate and key again every `tls.reload_interval` and
/// on SIGHUP: a renewed pair serves new connections from then on (open ones
/// keep theirs), and its expiry is published; a pair that does not load or
/// match is logged and counted, and the one in use stays.
async fn rotate_certificate(
    app: Arc<App>,
    cert: Arc<crate::tls::ServerCert>,
    mut stop: watch::Receiver<bool>,
) {
    use crate::tls::Reloaded;
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
            _ = tokio::time::sleep(cert.reload_interval()) => {}
            _ = hup_fut => tracing::info!("SIGHUP: reading the TLS certificate again"),
            _ = stop.changed() => return,
        }
        match cert.reload() {
            Ok(Reloaded::Unchanged) => {}
            Ok(Reloaded::Rotated) => {
                let chain = cert.chain();
                app.metrics.set_server_certificate(&chain);
                app.metrics.tls_reloads.with_label_values(&["rotated"]).inc();
                let (subject, not_after) = chain
                    .first()
                    .and_then(crate::tls::cert_expiry)
                    .unwrap_or_default();
                tracing::info!(%subject, not_after, "TLS certificate rotated: new connections get the new one");
            }
            Err(e) => {
                app.metrics.tls_reloads.with_label_values(&["error"]).inc();
                tracing::error!("TLS certificate not rotated, still serving the previous one: {e:#}");
            }
        }
    }
}

/// Writes emergency calls answered during a database outage once it is back.
async fn flush_deferred(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if app.spool.is_empty() {
            continue;
        }
        let retention = app.config.idempotency.retention;
        let n = app.spool.flush(&app.store, retention, &app.metrics).await;
        if n > 0 {
            tracing::info!(
                written = n,
                left = app.spool.len(),
                "deferred emergency calls written"
            );
        }
    }
}

/// A last try, at shutdown, for emergency calls answered during an outage.
pub async fn flush_held_calls(app: &App) {
    if app.spool.is_empty() {
        return;
    }
    let retention = app.config.idempotency.retention;
    app.spool.flush(&app.store, retention, &app.metrics).await;
    if !app.spool.is_empty() {
        tracing::error!(
            held = app.spool.len(),
            "stopping with emergency call records still unwritten"
        );
    }
}

/// Polls the route version so changes made on another replica are used
/// within `routing.refresh_interval`; also keeps the `db_up` gauge fresh.
async fn poll_routes(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(app.config.routing.refresh_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        match app.refresh_rules(false).await {
            Ok(_) => app.metrics.db_up.set(1),
            Err(e) => {
                app.metrics.db_up.set(0);
                tracing::debug!(error = %e, "route version poll failed; keeping current rules");
            }
        }
    }
}

/// Deletes rows older than their retention: a sweep every
/// `retention.interval` (more often when idempotency keys live shorter), each
/// table in batches of `retention.batch_size` with `retention.pause` between
/// them, until a batch comes back short.
async fn retention(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let every = app
        .config
        .retention
        .interval
        .min(app.config.idempotency.retention.max(Duration::from_secs(1)));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if sweep(&app, &mut stop).await.is_err() {
            return;
        }
    }
}

/// Shutdown began during a sweep.
struct Stopped;

/// One sweep over every table. Each batch runs in a task of its own, so
/// stopping the loop never cancels a statement half-way (see
/// `api::run_to_completion` for why that matters).
async fn sweep(app: &Arc<App>, stop: &mut watch::Receiver<bool>) -> Result<(), Stopped> {
    use crate::store::{Table, now_ms};
    let r = &app.config.retention;
    let now = now_ms();
    let before = |keep: Duration| now.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
    let limit = r.batch_size;
    let mut ok = true;

    if let Some(keep) = r.calls.limit() {
        let cutoff = before(keep);
        ok &= drain(app, stop, limit, "calls", || {
            let (store, deleted) = (app.store.clone(), app.metrics.retention_deleted.clone());
            async move {
                let p = store.purge_calls(cutoff, limit).await?;
                // Counted here: `drain` counts the calls.
                deleted.with_label_values(&["call_events"]).inc_by(p.events);
                deleted
                    .with_label_values(&["call_recordings"])
                    .inc_by(p.recordings);
                Ok(p.calls)
            }
        })
        .await?;
    }
    for (table, keep) in [
        (Table::Audit, r.audit.limit()),
        (Table::Idempotency, Some(app.config.idempotency.retention)),
        (Table::AgentReports, r.agent_reports.limit()),
    ] {
        let Some(keep) = keep else { continue };
        let cutoff = before(keep);
        ok &= drain(app, stop, limit, table.name(), || {
            let store = app.store.clone();
            async move { store.purge(table, cutoff, limit).await }
        })
        .await?;
    }
    if ok {
        app.metrics.retention_last_success.set(now / 1000);
    }
    Ok(())
}

/// Runs `batch` until it deletes fewer than `limit` rows, pausing between
/// batches; counts the rows under `table` and logs the sum. `Ok(false)`
/// when a batch failed (the next sweep tries again).
async fn drain<F, Fut>(
    app: &Arc<App>,
    stop: &mut watch::Receiver<bool>,
    limit: u32,
    table: &str,
    mut batch: F,
) -> Result<bool, Stopped>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, crate::store::StoreError>> + Send + 'static,
{
    let mut total = 0u64;
    let done = |total: u64| {
        if total > 0 {
            tracing::info!(
                table,
                rows = total,
                "retention: deleted rows older than the table's retention"
            );
        }
    };
    loop {
        let n = match tokio::spawn(batch()).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                done(total);
                tracing::warn!(table, error = %e, "retention: a batch failed; the next sweep tries again");
                return Ok(false);
            }
            Err(e) => {
                done(total);
                tracing::warn!(table, error = %e, "retention: a batch did not finish");
                return Ok(false);
            }
        };
        app.metrics
            .retention_deleted
            .with_label_values(&[table])
            .inc_by(n);
        total += n;
        if n < u64::from(limit) {
            done(total);
            return Ok(true);
        }
        tokio::select! {
            _ = stop.changed() => {
                done(total);
                return Err(Stopped);
            }
            _ = tokio::time::sleep(app.config.retention.pause) => {}
        }
    }
}

/// Keeps the fleet history bounded (every replica does it; the deletes are
/// idempotent): samples older than the page's 15 minutes plus slack,
/// events past `fleet.events_retention` or beyond the newest
/// `fleet.max_events`, and expired page sessions.
async fn purge_fleet(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(FLEET_PURGE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = purge_fleet_once(&app).await {
            tracing::debug!(error = %e, "fleet history purge failed; will retry");
        }
    }
}

/// One pass of [`purge_fleet`]; returns the rows deleted.
pub async fn purge_fleet_once(app: &App) -> Result<u64, crate::store::StoreError> {
    let now = crate::store::now_ms();
    let fleet = &app.config.fleet;
    let samples_from = crate::fleet::first_bucket(now) - SAMPLE_SLACK_BUCKETS;
    let events_from = now - fleet.events_retention.as_millis() as i64;
    let n = app
        .store
        .purge_fleet(samples_from, events_from, i64::from(fleet.max_events))
        .await?;
    Ok(n + app.store.purge_sessions().await?)
}

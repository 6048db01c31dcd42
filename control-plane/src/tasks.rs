//! The control plane's background loops: the route-version poll, the
//! idempotency purge, the fleet history's purge, writing emergency calls
//! held during a database outage, and SQLite's checkpoints. [`Tasks`] starts them with the server and stops
//! them in the order shutdown needs.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::App;

/// How often expired idempotency keys are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(60);
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
        let loops = vec![
            tokio::spawn(poll_routes(app.clone(), rx.clone())),
            tokio::spawn(purge_keys(app.clone(), rx.clone())),
            tokio::spawn(purge_fleet(app.clone(), rx.clone())),
            tokio::spawn(flush_deferred(app.clone(), rx.clone())),
        ];
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

async fn purge_keys(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let every = PURGE_EVERY.min(app.config.idempotency.retention.max(Duration::from_secs(1)));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = app
            .store
            .purge_idempotency(app.config.idempotency.retention)
            .await
        {
            tracing::debug!(error = %e, "idempotency purge failed; will retry");
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

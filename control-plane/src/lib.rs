//! Detour control plane: call routing, idempotent APIs and the fleet view.
//!
//! Library entry points (used by `main.rs`, the tests and the lab):
//! - [`Config`] (`Config::load`, `Config::from_toml_str`, `Config::for_data_dir`);
//! - [`serve`]`(config, listener, shutdown)`: runs the API on an already bound
//!   listener until `shutdown` resolves (migrations run first);
//! - [`migrate`]`(&config)`: applies migrations and returns;
//! - [`create_agent_token`]`(&config, pop)`: what `token create --pop` prints.
//!
//! A request meets the modules in this order: [`api`] (axum handlers, auth,
//! shedding) → [`intake`] (validation, E.164) → [`routing`] (pure rules, with
//! [`hook`] beside it) → [`store`] (sqlx, with [`idempotency`] claims in the
//! same transaction). [`record`] folds call events; [`metrics`], [`tls`] and
//! [`config`] serve them all.

pub mod api;
pub mod auth;
pub mod config;
pub mod hook;
pub mod idempotency;
pub mod intake;
pub mod metrics;
pub mod openapi;
pub mod record;
pub mod routing;
pub mod spool;
pub mod store;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use detour_wire::accept::{self, ConnCap};
use detour_wire::conn::{self, ConnLimits};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{Config, ConfigError, ConfigErrors};
// `config` checks the admin token file with this (its old path).
pub(crate) use auth::read_admin_token_file;

use crate::api::App;
use crate::store::Store;

/// How long in-flight requests may finish after shutdown is requested.
const DRAIN: Duration = Duration::from_secs(5);
/// How often expired idempotency keys are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(60);

fn read_admin_token(config: &Config) -> anyhow::Result<Option<String>> {
    config
        .admin_token_file
        .as_deref()
        .map(read_admin_token_file)
        .transpose()
}

/// Opens the database and applies pending migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let store = Store::open(config).await?;
    let r = store.migrate().await;
    store.close().await;
    r.with_context(|| format!("migrating {}", redact(&config.database_url())))
}

/// Creates an agent token for `pop`, stores its SHA-256 and returns the
/// token (shown once; it cannot be recovered later).
pub async fn create_agent_token(config: &Config, pop: &str) -> anyhow::Result<String> {
    create_agent_token_with_id(config, pop)
        .await
        .map(|(token, _)| token)
}

/// Like [`create_agent_token`], also returning the token's id (for `token
/// list` and `token revoke`).
pub async fn create_agent_token_with_id(config: &Config, pop: &str) -> anyhow::Result<(String, String)> {
    anyhow::ensure!(
        auth::valid_pop(pop),
        "PoP name {pop:?} must be 1 to 32 lowercase letters, digits, '-' or '_'"
    );
    let store = Store::open(config).await?;
    store.migrate().await?;
    let token = auth::new_token(pop);
    let id = uuid::Uuid::now_v7().to_string();
    let r = store.insert_token(&auth::hash_token(&token), &id, pop).await;
    store.close().await;
    r?;
    Ok((token, id))
}

/// `token list`: one line per token (id, PoP, creation time), never the token.
pub async fn list_agent_tokens(config: &Config, pop: Option<&str>) -> anyhow::Result<String> {
    let store = Store::open(config).await?;
    store.migrate().await?;
    let r = store.list_tokens(pop).await;
    store.close().await;
    let mut out = format!("{:<38} {:<12} CREATED\n", "ID", "POP");
    for (id, pop, created) in r? {
        let at = chrono::DateTime::from_timestamp_millis(created).map_or_else(
            || created.to_string(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        out.push_str(&format!("{id:<38} {pop:<12} {at}\n"));
    }
    Ok(out)
}

/// `token revoke --id`: deletes the token; replicas stop accepting it once
/// their cache entry expires (30 s).
pub async fn revoke_agent_token(config: &Config, id: &str) -> anyhow::Result<String> {
    let store = Store::open(config).await?;
    store.migrate().await?;
    let r = store.revoke_token(id).await;
    store.close().await;
    match r? {
        Some(pop) => Ok(pop),
        None => anyhow::bail!("no agent token has id {id:?} (see `token list`)"),
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Runs the control plane on `listener` until `shutdown` resolves: migrates,
/// loads the rules, starts the route-version poll and the idempotency purge,
/// and serves HTTP/1.1 and HTTP/2 (HTTPS with ALPN when `[tls]` is set).
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider().install_default().ok();
    let admin_token = read_admin_token(&config)?;
    let tls = match &config.tls {
        Some(t) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(t)?)),
        None => None,
    };
    let store = Store::open(&config).await?;
    store
        .migrate()
        .await
        .with_context(|| format!("migrating {}", redact(&config.database_url())))?;
    let app = Arc::new(App::new(config, store, admin_token.as_deref())?);
    app.refresh_rules(true).await.context("loading routes")?;
    app.metrics.db_up.set(1);

    let (stop_tx, stop_rx) = watch::channel(false);
    let poll = tokio::spawn(poll_routes(app.clone(), stop_rx.clone()));
    let purge = tokio::spawn(purge_keys(app.clone(), stop_rx.clone()));
    let deferred = tokio::spawn(flush_deferred(app.clone(), stop_rx.clone()));
    let checkpoint = {
        let every = app.config.database.sqlite_checkpoint_interval;
        let (store, url, stop) = (app.store.clone(), app.config.database_url(), stop_rx.clone());
        tokio::spawn(async move { store.checkpoint_sqlite(&url, every, stop).await })
    };

    let router = api::router(app.clone());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    tracing::info!(addr = ?listener.local_addr().ok(), tls = tls.is_some(), "control plane serving");
    let limits = app.config.limits.clone();
    let guard_limits = ConnLimits {
        header_timeout: limits.header_timeout,
        idle_timeout: limits.idle_timeout,
    };
    let rejection: conn::Rejection = {
        let (app, max) = (app.clone(), limits.max_header_bytes);
        Arc::new(move |status| {
            app.metrics
                .requests
                .with_label_values(&["unparsable", &status.to_string()])
                .inc();
            conn::problem_response(&conn::parse_problem(status, max, "limits.max_header_bytes"))
        })
    };
    let mut builder = Builder::new(TokioExecutor::new());
    // The guard owns the head and idle timeouts (hyper's header_read_timeout
    // would also close a load balancer's quiet kept-alive connections).
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(limits.max_header_bytes)
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let cap = ConnCap::new(limits.max_connections, "limits.max_connections");
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            c = accept::accept(&listener, "control plane") => c,
        };
        let Some(slot) = cap.admit() else {
            app.metrics.connections_refused.inc();
            continue;
        };
        stream.set_nodelay(true).ok();
        let watcher = graceful.watcher();
        let (tls, router, builder) = (tls.clone(), router.clone(), builder.clone());
        let (rejection, app) = (rejection.clone(), app.clone());
        let handshake_timeout = limits.header_timeout;
        app.metrics.connections.inc();
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let (io, tracker) = conn::guard(stream, guard_limits, rejection);
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(io), tracked(router, tracker))
                        .into_owned();
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => {
                            let (io, tracker) = conn::guard(s, guard_limits, rejection);
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(io), tracked(router, tracker))
                                .into_owned();
                            watcher.watch(conn).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            app.metrics.connections.dec();
            drop(slot);
        });
    }
    drop(listener);
    stop_tx.send(true).ok();
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after {DRAIN:?}; closing them");
    }
    poll.abort();
    purge.abort();
    deferred.abort();
    // A last try for emergency calls answered during an outage.
    if !app.spool.is_empty() {
        let retention = app.config.idempotency.retention;
        app.spool.flush(&app.store, retention, &app.metrics).await;
        if !app.spool.is_empty() {
            tracing::error!(
                held = app.spool.len(),
                "stopping with emergency call records still unwritten"
            );
        }
    }
    checkpoint.abort();
    app.store.close().await;
    Ok(())
}

/// The router as one connection's service: each request is marked in the
/// connection guard from its start to the end of its response body.
fn tracked(
    router: axum::Router,
    tracker: conn::ConnTracker,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<conn::Tracked<axum::body::Body>>,
    Error = std::convert::Infallible,
    Future = impl Future<
        Output = Result<http::Response<conn::Tracked<axum::body::Body>>, std::convert::Infallible>,
    > + Send,
> + Clone {
    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let flight = tracker.begin();
        let mut router = router.clone();
        async move {
            // A Router is always ready, and its error type is Infallible.
            let resp = tower_service::Service::call(&mut router, req).await?;
            Ok(resp.map(|b| conn::Tracked::new(b, flight)))
        }
    })
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

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://detour:secret@127.0.0.1:5432/detour"),
            "postgres://detour:***@127.0.0.1:5432/detour"
        );
        assert_eq!(super::redact("sqlite:///x?mode=rwc"), "sqlite:///x?mode=rwc");
    }
}

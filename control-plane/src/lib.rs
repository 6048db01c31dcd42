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
//! same transaction). [`record`] folds call events, [`fleet`] builds the fleet
//! page's view from the stored reports; [`metrics`], [`tls`] and
//! [`config`] serve them all. Around them: [`server`] (the listener and its
//! connections), [`tasks`] (the background loops), [`tokens`] (the `token`
//! subcommands), [`backup`] (`backup` and `restore` of the SQLite
//! database), [`cli`] (the command line `main.rs` parses).

pub mod api;
pub mod auth;
pub mod backup;
pub mod cli;
pub mod config;
pub mod fleet;
pub mod hook;
pub mod idempotency;
pub mod intake;
pub mod metrics;
pub mod openapi;
pub mod record;
pub mod routing;
pub mod server;
pub mod spool;
pub mod store;
pub mod tasks;
pub mod tls;
pub mod tokens;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

pub use config::{Config, ConfigError, ConfigErrors, redact};
pub use tokens::{
    create_agent_token, create_agent_token_with_id, create_operator_token, list_agent_tokens,
    revoke_agent_token,
};
// `config` checks the admin token file with this (its old path).
pub(crate) use auth::read_admin_token_file;

use crate::api::App;
use crate::store::Store;

fn read_admin_token(config: &Config) -> anyhow::Result<Option<String>> {
    config
        .admin_token_file
        .as_deref()
        .map(read_admin_token_file)
        .transpose()
}

/// Opens the database and applies pending migrations (`migrate`). Refuses
/// a database that a newer release has migrated: this command never takes
/// a schema backwards ([`store::MigrateRefused`]).
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let store = Store::open(config).await?;
    let r = store.migrate_strict().await;
    store.close().await;
    r.with_context(|| format!("migrating {}", redact(&config.database_url())))
}

/// Migrates for `serve` and the `token` commands: this build's pending
/// migrations, and a warning (not a refusal) for a database a newer release
/// has migrated further, which is how a rollback runs (docs/operations.md,
/// "Migrations").
pub(crate) async fn migrate_tolerant(store: &Store, config: &Config) -> anyhow::Result<()> {
    let newer = store
        .migrate()
        .await
        .with_context(|| format!("migrating {}", redact(&config.database_url())))?;
    if !newer.is_empty() {
        let names: Vec<String> = newer
            .iter()
            .map(|u| format!("{} ({})", u.version, u.description))
            .collect();
        tracing::warn!(
            migrations = %names.join(", "),
            "the database was migrated by a newer release; running against its schema \
             (migrations only add until no replica of the release before runs)"
        );
    }
    Ok(())
}

/// Runs the control plane on `listener` until `shutdown` resolves: migrates,
/// loads the rules, starts the background loops ([`tasks`]) and serves
/// HTTP/1.1 and HTTP/2 ([`server`]; HTTPS with ALPN when `[tls]` is set,
/// from a certificate [`tasks`] reads again on SIGHUP and every
/// `tls.reload_interval`).
/// On shutdown `/readyz` fails at once and the replica keeps serving for
/// `shutdown.grace`; then the listener closes, open requests drain (up to
/// `shutdown.drain_timeout`), and held emergency calls get a last write
/// before the database closes.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider().install_default().ok();
    let admin_token = read_admin_token(&config)?;
    // Read before the database opens, so a bad pair fails the start at once.
    let cert = config
        .tls
        .as_ref()
        .map(|t| tls::ServerCert::load(t).map(Arc::new))
        .transpose()?;
    let store = Store::open(&config).await?;
    migrate_tolerant(&store, &config).await?;
    let app = Arc::new(App::new(config, store, admin_token.as_deref(), cert)?);
    app.refresh_rules(true).await.context("loading routes")?;
    app.metrics.db_up.set(1);

    let mut tasks = tasks::Tasks::start(&app);
    let stopping = {
        let (app, stop) = (app.clone(), tasks.stopper());
        async move {
            shutdown.await;
            // Out of rotation first: /readyz fails while the replica still
            // serves, until the load balancer has noticed.
            app.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
            let grace = app.config.shutdown.grace;
            if !grace.is_zero() {
                tracing::info!(
                    ?grace,
                    "shutting down: /readyz answers 503; serving until the grace ends"
                );
                tokio::time::sleep(grace).await;
            }
            stop.send(true).ok();
        }
    };
    server::run(app.clone(), listener, stopping).await;
    tasks.stop_loops();
    tasks::flush_held_calls(&app).await;
    tasks.finish();
    app.store.close().await;
    Ok(())
}

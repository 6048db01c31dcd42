//! The shared state of one replica: config, store, auth, the rules in use,
//! hooks, metrics, the shedding limits and the emergency spool.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use arc_swap::ArcSwap;
use tokio::sync::{Mutex, Semaphore};

use super::shed::RateLimiter;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::hook::Hooks;
use crate::intake::{FieldError, Numbers};
use crate::metrics::Metrics;
use crate::routing::{RouteSpec, RuleSet};
use crate::spool::Spool;
use crate::store::{Store, StoreError};
use crate::tls::ServerCert;

/// Emergency calls held in memory during a database outage, at most.
const EMERGENCY_SPOOL_MAX: usize = 10_000;

/// Shared state of one replica.
pub struct App {
    pub config: Config,
    pub store: Store,
    pub auth: Authenticator,
    /// Rules in use; swapped whole on every change, read without locks.
    pub rules: ArcSwap<RuleSet>,
    pub numbers: Numbers,
    pub tz: chrono_tz::Tz,
    pub hooks: Hooks,
    pub metrics: Metrics,
    pub(super) limiter: RateLimiter,
    pub(super) normal_slots: Semaphore,
    pub(super) normal_waiting: AtomicUsize,
    pub(super) emergency_slots: Semaphore,
    /// Serialises rule reloads so an older load never replaces a newer one.
    reload: Mutex<()>,
    /// Emergency calls answered while the database was down.
    pub spool: Spool,
    /// The fleet page's data, built at most twice a second.
    pub(super) fleet_view: super::fleet::ViewCache,
    /// Set when shutdown begins: `/readyz` answers 503 from then on, so the
    /// load balancer stops sending while the replica still serves.
    pub stopping: std::sync::atomic::AtomicBool,
    /// The HTTPS certificate (with `[tls]`), read again by `tasks`.
    pub cert: Option<Arc<ServerCert>>,
}

impl App {
    /// State for `config` over an opened, migrated `store`, serving HTTPS
    /// with `cert` when `[tls]` is set.
    pub fn new(
        config: Config,
        store: Store,
        admin_token: Option<&str>,
        cert: Option<Arc<ServerCert>>,
    ) -> anyhow::Result<App> {
        let numbers = Numbers::new(
            config.numbers.default_region.get_ref(),
            config.numbers.emergency.iter().map(|e| e.get_ref().clone()),
        );
        let metrics = Metrics::new();
        if let Some(c) = &cert {
            metrics.set_server_certificate(&c.chain());
        }
        let store = store.counting_batches(metrics.db_batches.clone(), metrics.db_batched_calls.clone());
        Ok(App {
            auth: Authenticator::new(admin_token, store.clone()),
            rules: ArcSwap::from_pointee(RuleSet::default()),
            numbers,
            tz: config.time_zone(),
            hooks: Hooks::new(config.hook.clone())?,
            metrics,
            limiter: RateLimiter::new(config.limits.per_pop_rps, config.limits.per_pop_burst),
            normal_slots: Semaphore::new(config.limits.max_in_flight),
            normal_waiting: AtomicUsize::new(0),
            emergency_slots: Semaphore::new(config.limits.emergency_reserved),
            reload: Mutex::new(()),
            spool: Spool::new(EMERGENCY_SPOOL_MAX),
            stopping: std::sync::atomic::AtomicBool::new(false),
            fleet_view: Default::default(),
            cert,
            store,
            config,
        })
    }

    /// Reloads the rules if the database's route version differs from the
    /// one in use (or always, with `force`). Returns the version in use.
    pub async fn refresh_rules(&self, force: bool) -> Result<i64, StoreError> {
        let _one_at_a_time = self.reload.lock().await;
        let current = self.rules.load().version;
        if !force && self.store.route_version().await? == current {
            return Ok(current);
        }
        let (version, rows) = self.store.load_routes().await?;
        let mut rules = Vec::with_capacity(rows.len());
        for row in rows {
            let compiled = serde_json::from_str::<RouteSpec>(&row.spec)
                .map_err(|e| {
                    vec![FieldError {
                        field: "spec".into(),
                        reason: e.to_string(),
                    }]
                })
                .and_then(|spec| spec.compile(&row.name));
            match compiled {
                Ok(rule) => rules.push(rule),
                // Rules are validated on write; one that no longer compiles
                // (an older build wrote it) is skipped, not fatal.
                Err(e) => tracing::warn!(route = %row.name, ?e, "skipping invalid stored route"),
            }
        }
        let set = RuleSet::new(version, rules);
        self.metrics.route_version.set(version);
        self.metrics
            .route_rules
            .set(i64::try_from(set.len()).unwrap_or(i64::MAX));
        self.rules.store(Arc::new(set));
        Ok(version)
    }
}

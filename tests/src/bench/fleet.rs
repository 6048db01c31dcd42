//! `detour-lab bench fleet`: the fleet page's data under a big fleet. The
//! real control plane as its own release process (SQLite, plain HTTP), a
//! thousand PoPs reporting every 5 s (three paths each; some detoured, with
//! their switches and relay refusals), 15 minutes of history already in the
//! database (as after a quarter of an hour of such reports), and pages
//! polling `GET /v1/fleet/view` every second. Measured: the control plane's
//! CPU (share of one core) with the reports alone and with the pages too,
//! and the data endpoint's latency. Reports carry an Idempotency-Key each,
//! as the agent's do.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use detour_wire::{AgentReport, PathReport, PathState, SwitchReport};
use tokio::time::Instant;

use super::BenchArgs;
use crate::load::Latencies;
use crate::process::{Proc, cpu_us, free_port, loopback, rss_kib, sibling, tree_cpu_us, wait_listening};
use crate::report::{Table, machine, ms};

/// Each PoP reports this often (half the agents' default, as the issue asks).
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Each page asks this often (what the page's script does).
const POLL_EVERY: Duration = Duration::from_secs(1);
/// Reports and polls before the measurement, so caches and pools are warm.
const WARM_UP: Duration = Duration::from_secs(10);
/// One PoP in this many is off its uplink, through a peer.
const DETOURED_ONE_IN: usize = 50;

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let machine = machine();
    let mut readings = vec![measure(args, None).await?];
    let postgres = match crate::pg::unavailable() {
        None => {
            let pg = crate::pg::PrivatePostgres::start()?;
            readings.push(measure(args, Some(&pg)).await?);
            None
        }
        Some(why) => {
            println!("fleet: no Postgres run: {why}");
            Some(why)
        }
    };
    args.publish("fleet", &render(args, &machine, &readings, postgres.as_deref()))
}

/// One backend's run: SQLite in a temporary directory, or `pg`'s database
/// (`bench scale` takes the SQLite one for its control-plane half).
pub(crate) async fn measure(
    args: &BenchArgs,
    pg: Option<&crate::pg::PrivatePostgres>,
) -> anyhow::Result<Reading> {
    let pops = args.pops.max(3);
    let dur = Duration::from_secs(args.seconds);
    let backend = if pg.is_some() { "Postgres" } else { "SQLite" };
    let bin = sibling("detour-control-plane")?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let admin = format!("bench-admin-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(dir.path().join("admin.token"), &admin)?;
    let config_path = dir.path().join("cp.toml");
    let db = pg.map_or_else(String::new, |pg| format!("database_url = \"{}\"\n", pg.url()));
    std::fs::write(
        &config_path,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\nadmin_token_file = \"admin.token\"\n{db}"
        ),
    )?;
    let config = detour_control_plane::Config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("fleet ({backend}): {pops} PoPs: tokens and 15 minutes of history…");
    let (tokens, operator) = prepare(&config, pops).await?;
    let db_cpu = || pg.and_then(|p| p.server_pid()).map_or(0, tree_cpu_us);

    let cp = Proc(
        std::process::Command::new(&bin)
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?,
    );
    let addr = loopback(port);
    wait_listening(addr).await?;
    let base = format!("http://{addr}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(10))
        .build()?;

    let stop = Arc::new(tokio::sync::Notify::new());
    let report_lat = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let report_failed = Arc::new(AtomicU64::new(0));
    let reporters = tokio::spawn(report_loop(
        client.clone(),
        base.clone(),
        tokens,
        stop.clone(),
        report_lat.clone(),
        report_failed.clone(),
    ));
    println!("fleet ({backend}): warming up {WARM_UP:?}…");
    tokio::time::sleep(WARM_UP).await;

    // Reports alone.
    report_lat.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let (cpu0, db0, t0) = (cpu_us(cp.id()), db_cpu(), Instant::now());
    tokio::time::sleep(dur).await;
    let reports_only = share(cpu_us(cp.id()) - cpu0, t0.elapsed());
    let db_reports_only = share(db_cpu().saturating_sub(db0), t0.elapsed());
    println!("fleet ({backend}): reports alone: {reports_only:.1}% of a core");

    // Reports and pages.
    let viewers = args.viewers.max(1);
    let view_lat = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let view_failed = Arc::new(AtomicU64::new(0));
    let view_bytes = Arc::new(AtomicU64::new(0));
    let mut pages = Vec::new();
    for i in 0..viewers {
        pages.push(tokio::spawn(poll_loop(
            client.clone(),
            format!("{base}/v1/fleet/view"),
            operator.clone(),
            // Spread over the second, as pages opened at different times are.
            POLL_EVERY * i as u32 / viewers as u32,
            stop.clone(),
            view_lat.clone(),
            view_failed.clone(),
            view_bytes.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    view_lat.lock().unwrap_or_else(|e| e.into_inner()).clear();
    view_bytes.store(0, Ordering::Relaxed);
    report_lat.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let (cpu0, db0, t0) = (cpu_us(cp.id()), db_cpu(), Instant::now());
    tokio::time::sleep(dur).await;
    let with_pages = share(cpu_us(cp.id()) - cpu0, t0.elapsed());
    let db_with_pages = share(db_cpu().saturating_sub(db0), t0.elapsed());
    // What the window saw; requests still in flight when the control plane
    // is stopped below are not its failures.
    let views = Latencies::new(view_lat.lock().unwrap_or_else(|e| e.into_inner()).iter().copied());
    let reports = Latencies::new(
        report_lat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied(),
    );
    let (report_failed, view_failed) = (
        report_failed.load(Ordering::Relaxed),
        view_failed.load(Ordering::Relaxed),
    );
    let view_bytes = view_bytes.load(Ordering::Relaxed);
    stop.notify_waiters();
    let _ = reporters.await;
    for p in pages {
        let _ = p.await;
    }
    let rss = rss_kib(cp.id()).0;
    drop(cp);

    let n_views = views.len().max(1) as u64;
    Ok(Reading {
        backend,
        pops,
        viewers,
        reports_only,
        with_pages,
        db_cpu: pg.map(|_| (db_reports_only, db_with_pages)),
        views,
        view_failed,
        view_kib: view_bytes / n_views / 1024,
        reports,
        report_failed,
        rss_mib: rss / 1024,
    })
}

/// CPU time over wall time, as a percentage of one core.
fn share(cpu_us: u64, wall: Duration) -> f64 {
    cpu_us as f64 / wall.as_micros().max(1) as f64 * 100.0
}

fn pop_name(i: usize) -> String {
    format!("p{i:04}")
}

/// Agent tokens for every PoP, an operator token, and 15 minutes of
/// samples for every path (as a quarter of an hour of reports leaves them),
/// written straight into the database before the control plane starts.
async fn prepare(
    config: &detour_control_plane::Config,
    pops: usize,
) -> anyhow::Result<(Vec<(String, String)>, String)> {
    use detour_control_plane::auth;
    use detour_control_plane::store::{BUCKET_MS, Store, now_ms};
    let store = Store::open(config).await?;
    store.migrate().await?;
    let mut tokens = Vec::with_capacity(pops);
    for i in 0..pops {
        let pop = pop_name(i);
        let token = auth::new_token(&pop);
        store
            .insert_token(&auth::hash_token(&token), &uuid::Uuid::new_v4().to_string(), &pop)
            .await?;
        tokens.push((pop, token));
    }
    let operator = auth::new_operator_token("bench");
    store
        .insert_operator_token(
            &auth::hash_token(&operator),
            "bench",
            "bench",
            auth::OPERATOR_SCOPE,
        )
        .await?;
    store.close().await;
    // The history, as rows (the store has no bulk writer: reports write it).
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&config.database_url()).await?;
    let now_bucket = now_ms() / BUCKET_MS;
    let mut tx = sqlx::Connection::begin(&mut conn).await?;
    for i in 0..pops {
        for (path, rtt) in paths_of(i, pops) {
            for b in (now_bucket - 30)..now_bucket {
                sqlx::query(
                    "INSERT INTO fleet_samples (pop, path, bucket, rtt_us, loss_ppm, state, active) \
                     VALUES ($1, $2, $3, $4, 0, 0, $5)",
                )
                .bind(pop_name(i))
                .bind(&path)
                .bind(b)
                .bind((rtt * 1e6) as i64 + (b % 7) * 300)
                .bind(i64::from(path == "direct"))
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    tx.commit().await?;
    sqlx::Connection::close(conn).await?;
    Ok((tokens, operator))
}

/// A PoP's paths: its uplink and two peers, with RTTs in seconds.
fn paths_of(i: usize, pops: usize) -> Vec<(String, f64)> {
    vec![
        ("direct".to_owned(), 0.010 + (i % 13) as f64 * 0.001),
        (
            format!("via:{}", pop_name((i + 1) % pops)),
            0.018 + (i % 7) as f64 * 0.001,
        ),
        (
            format!("via:{}", pop_name((i + 2) % pops)),
            0.021 + (i % 5) as f64 * 0.001,
        ),
    ]
}

/// PoP `i`'s report number `n`: on its uplink, or (one in
/// [`DETOURED_ONE_IN`]) through its first peer with the switch that took it
/// there and a few refusals counted by its relay.
fn report_of(i: usize, pops: usize, n: u64, started_ms: i64) -> AgentReport {
    let detoured = i.is_multiple_of(DETOURED_ONE_IN);
    let paths: Vec<PathReport> = paths_of(i, pops)
        .into_iter()
        .enumerate()
        .map(|(k, (path, rtt))| {
            let down = detoured && k == 0;
            PathReport {
                path,
                endpoint: None,
                state: if down { PathState::Down } else { PathState::Up },
                rtt_seconds: (!down).then_some(rtt + (n % 5) as f64 * 0.0002),
                rtt_p95_seconds: (!down).then_some(rtt * 1.5),
                loss_ratio: if down { 1.0 } else { 0.0 },
                score: rtt * 1000.0,
                active: if detoured { k == 1 } else { k == 0 },
                consecutive_failures: if down { 12 } else { 0 },
                reason: down.then(|| "3 consecutive failures (timeout)".to_owned()),
            }
        })
        .collect();
    let active = paths.iter().find(|p| p.active).map(|p| p.path.clone());
    AgentReport {
        pop: pop_name(i),
        version: "0.1.0".into(),
        switches: if detoured {
            vec![SwitchReport {
                at_ms: started_ms,
                from: "direct".into(),
                to: active.clone().unwrap_or_default(),
                reason: "direct down: 3 consecutive failures (timeout)".into(),
            }]
        } else {
            Vec::new()
        },
        relay_rejected: if detoured {
            [("untrusted_cert".to_owned(), n)].into()
        } else {
            Default::default()
        },
        active_path: active,
        paths,
        config_error: None,
        recordings: None,
        deferred: None,
    }
}

/// Every PoP reports once per [`REPORT_EVERY`], spread evenly over it.
async fn report_loop(
    client: reqwest::Client,
    base: String,
    tokens: Vec<(String, String)>,
    stop: Arc<tokio::sync::Notify>,
    lat: Arc<std::sync::Mutex<Vec<Duration>>>,
    failed: Arc<AtomicU64>,
) {
    let started_ms = detour_control_plane::store::now_ms();
    let gap = REPORT_EVERY / tokens.len() as u32;
    let mut tick = tokio::time::interval(gap);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let stopped = stop.notified();
    tokio::pin!(stopped);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => {}
        }
        let i = (n % tokens.len() as u64) as usize;
        let round = n / tokens.len() as u64;
        n += 1;
        let (pop, token) = tokens[i].clone();
        let body = serde_json::to_vec(&report_of(i, tokens.len(), round, started_ms)).unwrap_or_default();
        let (client, url) = (client.clone(), format!("{base}/v1/agents/{pop}/report"));
        let (lat, failed) = (lat.clone(), failed.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let r = client
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                // As the agent sends it: every report with its own key.
                .header("idempotency-key", uuid::Uuid::new_v4().to_string())
                .body(body)
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => {
                    lat.lock().unwrap_or_else(|e| e.into_inner()).push(t.elapsed());
                }
                other => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    let why = match other {
                        Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
                        Err(e) => format!("{e:#}"),
                    };
                    eprintln!("fleet: a report of {pop} failed after {:?}: {why}", t.elapsed());
                }
            }
        });
    }
}

/// One page: `GET /v1/fleet/view` every [`POLL_EVERY`], as the page's
/// script does (the next poll a second after the answer).
#[allow(clippy::too_many_arguments)]
async fn poll_loop(
    client: reqwest::Client,
    url: String,
    token: String,
    offset: Duration,
    stop: Arc<tokio::sync::Notify>,
    lat: Arc<std::sync::Mutex<Vec<Duration>>>,
    failed: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
) {
    let stopped = stop.notified();
    tokio::pin!(stopped);
    tokio::select! {
        _ = &mut stopped => return,
        _ = tokio::time::sleep(offset) => {}
    }
    loop {
        let t = Instant::now();
        // As a browser asks: the bytes counted are the ones on the wire.
        let asked = client
            .get(&url)
            .bearer_auth(&token)
            .header("accept-encoding", "gzip");
        match asked.send().await {
            Ok(r) if r.status().is_success() => match r.bytes().await {
                Ok(b) => {
                    lat.lock().unwrap_or_else(|e| e.into_inner()).push(t.elapsed());
                    bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            },
            _ => {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(POLL_EVERY) => {}
        }
    }
}

/// One backend's run: CPU as % of one core, latencies of both endpoints.
pub(crate) struct Reading {
    pub(crate) backend: &'static str,
    pub(crate) pops: usize,
    pub(crate) viewers: usize,
    pub(crate) reports_only: f64,
    pub(crate) with_pages: f64,
    /// The database server's CPU (Postgres: its processes), both phases.
    pub(crate) db_cpu: Option<(f64, f64)>,
    pub(crate) views: Latencies,
    pub(crate) view_failed: u64,
    pub(crate) view_kib: u64,
    pub(crate) reports: Latencies,
    pub(crate) report_failed: u64,
    pub(crate) rss_mib: u64,
}

fn render(args: &BenchArgs, machine: &str, readings: &[Reading], no_pg: Option<&str>) -> String {
    let mut t = Table::new(&[
        "",
        "control plane CPU (one core = 100%)",
        "database CPU",
        "p50",
        "p99",
        "max",
        "requests",
        "failed",
    ]);
    for r in readings {
        let db = |phase: usize| {
            r.db_cpu.map_or("(in process)".to_owned(), |c| {
                format!("{:.1}%", if phase == 0 { c.0 } else { c.1 })
            })
        };
        t.row(&[
            format!("{}: {} PoPs reporting every 5 s, no page", r.backend, r.pops),
            format!("{:.1}%", r.reports_only),
            db(0),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
        let (rp50, rp99, rmax) = r.reports.p50_p99_max();
        t.row(&[
            format!("{}: the same, {} pages open: the reports", r.backend, r.viewers),
            format!("{:.1}%", r.with_pages),
            db(1),
            ms(rp50),
            ms(rp99),
            ms(rmax),
            r.reports.len().to_string(),
            r.report_failed.to_string(),
        ]);
        let (p50, p99, max) = r.views.p50_p99_max();
        t.row(&[
            format!(
                "{}: the same: `GET /v1/fleet/view` ({} KiB gzipped)",
                r.backend, r.view_kib
            ),
            String::new(),
            String::new(),
            ms(p50),
            ms(p99),
            ms(max),
            r.views.len().to_string(),
            r.view_failed.to_string(),
        ]);
    }
    let rss: Vec<String> = readings
        .iter()
        .map(|r| format!("{} {} MiB", r.backend, r.rss_mib))
        .collect();
    let pg_note = match no_pg {
        None => {
            " Postgres is a private server started for the run (Debian's, `fsync=off`, on the same 2 cores); \
                 its CPU is the server and its backends'."
                .to_owned()
        }
        Some(why) => format!(" No Postgres run: {why}."),
    };
    format!(
        "## The fleet page's data (issue: the fleet at a glance)\n\n\
         Measured {machine} with `cargo build --release -p detour-control-plane -p detour-lab && \
         target/release/detour-lab bench fleet --seconds {}` ({} PoPs, {} pages). The control plane is its own \
         release process, plain HTTP, on SQLite (its default) and then on Postgres.{pg_note} The PoPs are \
         simulated by the benchmark process (one report each every 5 s with its own Idempotency-Key, three paths \
         each, one in {DETOURED_ONE_IN} through a peer with its switch and relay refusals), which shares the 2 \
         cores. 15 minutes of history (30 points per path) are in the database before it starts. Each page asks \
         for the view every second (gzip accepted, as browsers do); a replica builds it at most twice a second \
         and serves every page from that. CPU is user + system time over {} s each (from /proc), latencies in \
         ms; the control plane's RSS at the end: {}.\n\n{}",
        args.seconds,
        args.pops,
        args.viewers,
        args.seconds,
        rss.join(", "),
        t.finish()
    )
}

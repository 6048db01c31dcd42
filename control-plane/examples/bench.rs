//! Benchmark: call initiations per second and latency on SQLite and Postgres
//! with 10,000 prefix rules, p99 at a fixed rate, and pgbench running the
//! same durable writes on the same Postgres as the ceiling.
//!
//! cargo run --release -p detour-control-plane --example bench -- \
//!     --backend both --database-url postgres://detour:detour@127.0.0.1:5432/detour
//!
//! The control plane and the load generator share this machine (and its
//! cores); the numbers include the generator's own cost.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use detour_control_plane::Config;
use detour_control_plane::routing::RouteSpec;
use detour_control_plane::store::Store;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use sqlx::Connection;
use tokio::sync::Mutex;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// sqlite, postgres or both.
    #[arg(long, default_value = "both")]
    backend: String,
    /// Admin URL of the Postgres to use (a fresh database is created in it).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Routing rules to seed.
    #[arg(long, default_value_t = 10_000)]
    rules: usize,
    /// Concurrent connections for the throughput run.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Length of each measured run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Fixed rate for the latency run, calls per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// pgbench clients for the ceiling run.
    #[arg(long, default_value_t = 16)]
    pgbench_clients: usize,
    /// SQLite background checkpoint interval ("0s": SQLite's automatic ones).
    #[arg(long, default_value = "200ms")]
    sqlite_checkpoint: String,
    /// Also run Postgres with `synchronous_commit = off` (commits do not wait
    /// for the disk; not durable, for reference only).
    #[arg(long)]
    pg_async_commit: bool,
    /// The closed loop's clients: `hyper` (a connection each, the request's
    /// fixed parts built once) or `reqwest` (its pooled client, as before
    /// 2026-12-07; to compare the load generator's own cost).
    #[arg(long, default_value = "hyper", value_parser = ["hyper", "reqwest"])]
    client: String,
    /// Skip the closed-loop run (latency investigations).
    #[arg(long)]
    skip_throughput: bool,
    /// Print the server's own latency histogram after the runs.
    #[arg(long)]
    server_histogram: bool,
    /// Replace the control-plane block of this markdown file with the results.
    #[arg(long)]
    write_docs: Option<PathBuf>,
}

/// pgbench on the same database: one call per statement (16 clients), at the
/// fixed rate (p50, p99 ms), and in batches like the service's group commit
/// (rows per statement, calls/s).
struct Ceiling {
    single_tps: f64,
    fixed: (f64, f64),
    batched: Option<(usize, f64)>,
}

struct RunResult {
    backend: &'static str,
    throughput: f64,
    ok: u64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
    fixed_rate: f64,
    fixed_p50_ms: f64,
    fixed_p99_ms: f64,
    fixed_errors: u64,
    /// Postgres: calls per group-commit statement in the closed loop.
    avg_batch: Option<f64>,
    /// `database.batch_writers` of the run.
    writers: u32,
}

fn main() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider().install_default().ok();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut results = Vec::new();
    let mut ceiling = None;
    if matches!(args.backend.as_str(), "sqlite" | "both") {
        let dir = tempfile::tempdir()?;
        results.push(bench_backend(&args, "sqlite", &dir, None).await?);
    }
    if matches!(args.backend.as_str(), "postgres" | "both") {
        let admin = args
            .database_url
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--database-url or DATABASE_URL is needed for postgres"))?;
        let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        let url = with_db(&admin, &name);
        let dir = tempfile::tempdir()?;
        let r = bench_backend(&args, "postgres", &dir, Some(&url)).await;
        if let Ok(run) = &r {
            let batched = match run.avg_batch {
                Some(k) => {
                    let rows = (k.round() as usize).max(1);
                    Some((
                        rows,
                        pgbench_batched(&args, &url, &dir, rows, run.writers as usize)?,
                    ))
                }
                None => None,
            };
            ceiling = Some(Ceiling {
                single_tps: pgbench(&args, &url, &dir)?,
                fixed: pgbench_fixed(&args, &url, &dir)?,
                batched,
            });
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await
        .ok();
        results.push(r?);
        if args.pg_async_commit {
            let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
            for sql in [
                format!("CREATE DATABASE {name}"),
                format!("ALTER DATABASE {name} SET synchronous_commit = off"),
            ] {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await?;
            }
            let dir = tempfile::tempdir()?;
            let url = with_db(&admin, &name);
            let r = bench_backend(&args, "postgres-async", &dir, Some(&url)).await;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await
            .ok();
            results.push(r?);
        }
    }
    let report = render(&args, &results, ceiling);
    println!("{report}");
    if let Some(path) = &args.write_docs {
        write_block(path, &report)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let stem = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{stem}/{db}?{q}"),
        None => format!("{stem}/{db}"),
    }
}

fn config(dir: &tempfile::TempDir, url: Option<&str>, checkpoint: &str) -> anyhow::Result<Config> {
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "bench-admin-token\n")?;
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nadmin_token_file = \"{}\"\n",
        dir.path().join("data").display(),
        token.display()
    );
    if let Some(url) = url {
        text.push_str(&format!("database_url = \"{url}\"\n"));
    }
    // Rate limiting off and a deep queue: this measures capacity, not policy.
    text.push_str(
        "[database]\nmax_connections = 24\nsqlite_checkpoint_interval = \"CKPT\"\n\
         [limits]\nper_pop_rps = 0\nmax_in_flight = 128\nmax_queue = 4096\nqueue_timeout = \"5s\"\n",
    );
    let text = text.replace("CKPT", checkpoint);
    let file = dir.path().join("cp.toml");
    std::fs::write(&file, &text)?;
    Config::load(&file).map_err(|e| anyhow::anyhow!("{e}"))
}

async fn seed(config: &Config, rules: usize) -> anyhow::Result<()> {
    let store = Store::open(config).await?;
    store.migrate().await?;
    let mut batch = Vec::with_capacity(rules);
    for i in 0..rules {
        let pop = ["blr", "maa", "del"][i % 3];
        let spec: RouteSpec = serde_json::from_value(serde_json::json!({
            "prefix": format!("+91{}", 70_000 + i),
            "trunks": [{"name": format!("trunk-{}", i % 50), "weight": 3},
                       {"name": format!("trunk-{}", (i + 1) % 50), "weight": 1}],
            "failover": ["backup-1"],
            "pop": pop,
        }))?;
        let name = format!("r{i:05}");
        spec.compile(&name).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        batch.push((name, serde_json::to_string(&spec)?, spec.matcher_key()));
    }
    for chunk in batch.chunks(2000) {
        store.bulk_insert_routes(chunk, "bench").await?;
    }
    store.close().await;
    Ok(())
}

fn call_body(n: u64, rules: usize) -> String {
    // +91 7xxxx xxxxx: a valid Indian mobile number under one of the rules.
    let prefix = 70_000 + (n % rules.max(1) as u64);
    let rest = (n * 7919) % 100_000;
    format!(
        "{{\"caller\":\"+919876543210\",\"destination\":\"+91{prefix}{rest:05}\",\
         \"call_type\":\"outbound\",\"metadata\":{{\"bench\":{n}}}}}"
    )
}

async fn bench_backend(
    args: &Args,
    backend: &'static str,
    dir: &tempfile::TempDir,
    url: Option<&str>,
) -> anyhow::Result<RunResult> {
    let config = config(dir, url, &args.sqlite_checkpoint)?;
    eprintln!("[{backend}] seeding {} rules", args.rules);
    seed(&config, args.rules).await?;
    let token = detour_control_plane::create_agent_token(&config, "blr").await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(detour_control_plane::serve(config.clone(), listener, async {
        stop_rx.await.ok();
    }));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = format!("http://{addr}/v1/calls");
    // Ready and routing with every rule.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client
            .post(&url)
            .bearer_auth(&token)
            .body(call_body(args.rules as u64 - 1, args.rules))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 201) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "control plane did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seq = Arc::new(AtomicU64::new(1_000_000));

    // Warm-up, then closed-loop throughput.
    eprintln!("[{backend}] warm-up 2s");
    closed_loop(&client, &url, &token, args, &seq, Duration::from_secs(2)).await;
    eprintln!(
        "[{backend}] throughput {:?} at concurrency {}",
        args.duration, args.concurrency
    );
    let before = batch_counters(&client, addr).await;
    let (ok, errors, hist, elapsed) = if args.skip_throughput {
        (0, 0, new_hist(), Duration::from_secs(1))
    } else {
        closed_loop(&client, &url, &token, args, &seq, args.duration).await
    };
    let after = batch_counters(&client, addr).await;
    let avg_batch = (after.0 > before.0).then(|| (after.1 - before.1) / (after.0 - before.0));
    let throughput = ok as f64 / elapsed.as_secs_f64();

    eprintln!("[{backend}] fixed rate {}/s for {:?}", args.rate, args.duration);
    let (fixed_ok, fixed_errors, fixed_hist, fixed_elapsed) =
        open_loop(&client, &url, &token, args, &seq).await;

    if args.server_histogram {
        let text = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        for line in text
            .lines()
            .filter(|l| l.starts_with("detour_cp_request_duration_seconds") && l.contains("/v1/calls\""))
        {
            eprintln!("{line}");
        }
    }
    stop_tx.send(()).ok();
    server.await??;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(RunResult {
        backend,
        throughput,
        ok,
        errors,
        p50_ms: ms(&hist, 0.5),
        p99_ms: ms(&hist, 0.99),
        fixed_rate: fixed_ok as f64 / fixed_elapsed.as_secs_f64(),
        fixed_p50_ms: ms(&fixed_hist, 0.5),
        fixed_p99_ms: ms(&fixed_hist, 0.99),
        fixed_errors,
        avg_batch,
        writers: config.database.batch_writers,
    })
}

/// (group-commit statements, calls they carried) from the service's metrics.
async fn batch_counters(client: &reqwest::Client, addr: std::net::SocketAddr) -> (f64, f64) {
    let Ok(r) = client.get(format!("http://{addr}/metrics")).send().await else {
        return (0.0, 0.0);
    };
    let text = r.text().await.unwrap_or_default();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("detour_cp_db_batches_total "),
        value("detour_cp_db_batched_calls_total "),
    )
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

async fn one(client: &reqwest::Client, url: &str, token: &str, n: u64, rules: usize) -> bool {
    client
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("idempotency-key", format!("bench-{n}"))
        .body(call_body(n, rules))
        .send()
        .await
        .is_ok_and(|r| r.status() == 201)
}

/// Closed loop: `concurrency` clients, each sending the next call as soon
/// as the last is answered.
async fn closed_loop(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    args: &Args,
    seq: &Arc<AtomicU64>,
    duration: Duration,
) -> (u64, u64, Histogram<u64>, Duration) {
    let hist = Arc::new(Mutex::new(new_hist()));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let mut caller = Caller::new(&args.client, client, url, token);
        let (hist, ok, errors, seq) = (hist.clone(), ok.clone(), errors.clone(), seq.clone());
        let rules = args.rules;
        tasks.push(tokio::spawn(async move {
            let mut local = new_hist();
            while Instant::now() < end {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                if caller.call(n, rules).await {
                    ok.fetch_add(1, Ordering::Relaxed);
                    local.saturating_record(t.elapsed().as_micros() as u64);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            hist.lock().await.add(&local).ok();
        }));
    }
    for t in tasks {
        t.await.ok();
    }
    let elapsed = start.elapsed();
    let hist = hist.lock().await.clone();
    (
        ok.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        hist,
        elapsed,
    )
}

/// One closed-loop client (`--client`). `hyper`: its own kept-alive HTTP/1.1
/// connection, driven by hyper's connection API, with the request's fixed
/// parts built once. `reqwest`: its pooled client, which parses the URL,
/// builds the headers and checks a connection out of its pool per request.
/// The default is `hyper` so that less of the two shared cores goes to the
/// load generator (pgbench, the ceiling, is a lean C client too).
enum Caller {
    Reqwest {
        client: reqwest::Client,
        url: String,
        token: String,
    },
    Hyper {
        uri: http::Uri,
        host: http::HeaderValue,
        auth: http::HeaderValue,
        conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    },
}

impl Caller {
    fn new(kind: &str, client: &reqwest::Client, url: &str, token: &str) -> Caller {
        if kind == "reqwest" {
            return Caller::Reqwest {
                client: client.clone(),
                url: url.to_owned(),
                token: token.to_owned(),
            };
        }
        let uri: http::Uri = url.parse().expect("the bench's own URL");
        let host = uri.authority().expect("an authority").as_str();
        Caller::Hyper {
            host: http::HeaderValue::from_str(host).expect("an address is ASCII"),
            auth: http::HeaderValue::from_str(&format!("Bearer {token}")).expect("a token is ASCII"),
            uri,
            conn: None,
        }
    }

    /// Sends call `n`; whether it was created (201).
    async fn call(&mut self, n: u64, rules: usize) -> bool {
        let (uri, host, auth, conn) = match self {
            Caller::Reqwest { client, url, token } => return one(client, url, token, n, rules).await,
            Caller::Hyper {
                uri,
                host,
                auth,
                conn,
            } => (uri, host, auth, conn),
        };
        let sender = match conn {
            Some(s) if !s.is_closed() => s,
            _ => match connect(host.to_str().unwrap_or_default()).await {
                Ok(s) => conn.insert(s),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    return false;
                }
            },
        };
        let mut req = http::Request::new(Full::new(Bytes::from(call_body(n, rules))));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri.clone();
        let h = req.headers_mut();
        h.insert(http::header::HOST, host.clone());
        h.insert(http::header::AUTHORIZATION, auth.clone());
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if let Ok(key) = http::HeaderValue::from_str(&format!("bench-{n}")) {
            h.insert("idempotency-key", key);
        }
        let answer = match sender.ready().await {
            Ok(()) => sender.send_request(req).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(resp) => resp.status() == 201 && resp.into_body().collect().await.is_ok(),
            Err(_) => {
                // A new connection for the next call.
                *conn = None;
                false
            }
        }
    }
}

/// One client connection of the closed loop; its driver runs on its own task.
async fn connect(addr: &str) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Open loop: request i is due at start + i/rate; latency counts from when
/// it was due, so a stall is not hidden (no coordinated omission).
async fn open_loop(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    args: &Args,
    seq: &Arc<AtomicU64>,
) -> (u64, u64, Histogram<u64>, Duration) {
    let total = args.rate * args.duration.as_secs().max(1);
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let hist = Arc::new(Mutex::new(new_hist()));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(2048));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let permit = in_flight.clone().acquire_owned().await;
        let (client, url, token) = (client.clone(), url.to_owned(), token.to_owned());
        let (hist, ok, errors) = (hist.clone(), ok.clone(), errors.clone());
        let n = seq.fetch_add(1, Ordering::Relaxed);
        let rules = args.rules;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            if one(&client, &url, &token, n, rules).await {
                ok.fetch_add(1, Ordering::Relaxed);
                hist.lock()
                    .await
                    .saturating_record(due.elapsed().as_micros() as u64);
            } else {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.ok();
    }
    let elapsed = start.elapsed();
    let hist = hist.lock().await.clone();
    (
        ok.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        hist,
        elapsed,
    )
}

/// pgbench with the same durable writes one call initiation makes on
/// Postgres: the statement `store::create_call` sends, inserting the
/// idempotency row and the call row in one implicit transaction.
fn pgbench(args: &Args, url: &str, dir: &tempfile::TempDir) -> anyhow::Result<f64> {
    let script = dir.path().join("calls.sql");
    std::fs::write(
        &script,
        // Keep in step with the single-call statement in `store::create_call`.
        "WITH claim AS (INSERT INTO idempotency \
         (key, request_hash, created_at, status, content_type, body) \
         VALUES (gen_random_uuid()::text, md5(random()::text), 0, 201, 'application/json', \
         repeat('x', 400)) ON CONFLICT (key) DO NOTHING RETURNING key) \
         INSERT INTO calls (id, created_at, pop, caller, destination, call_type, priority, \
         metadata, decision, state, updated_at) SELECT gen_random_uuid()::text, 0, 'blr', \
         '+919876543210', '+917000012345', 'outbound', 'normal', '{}', repeat('y', 200), \
         'initiated', 0 WHERE EXISTS (SELECT 1 FROM claim);\n",
    )?;
    run_pgbench(args, url, &script, args.pgbench_clients)
}

/// pgbench writing `rows` calls per statement the way the service's group
/// commit does (`store/batch.rs`: the claims and the calls of a batch in one
/// statement) from `clients` connections. Returns calls per second.
fn pgbench_batched(
    args: &Args,
    url: &str,
    dir: &tempfile::TempDir,
    rows: usize,
    clients: usize,
) -> anyhow::Result<f64> {
    let script = dir.path().join("calls_batched.sql");
    std::fs::write(
        &script,
        format!(
            "WITH v AS (SELECT gen_random_uuid()::text AS id, gen_random_uuid()::text AS key \
             FROM generate_series(1, {rows})), \
             claim AS (INSERT INTO idempotency (key, request_hash, created_at, status, content_type, body) \
             SELECT key, md5(random()::text), 0, 201, 'application/json', repeat('x', 400) FROM v \
             ON CONFLICT (key) DO NOTHING RETURNING key) \
             INSERT INTO calls (id, created_at, pop, caller, destination, call_type, priority, \
             metadata, decision, state, updated_at) SELECT v.id, 0, 'blr', '+919876543210', \
             '+917000012345', 'outbound', 'normal', '{{}}', repeat('y', 200), 'initiated', 0 \
             FROM v JOIN claim ON claim.key = v.key;\n"
        ),
    )?;
    Ok(run_pgbench(args, url, &script, clients)? * rows as f64)
}

fn run_pgbench(args: &Args, url: &str, script: &std::path::Path, clients: usize) -> anyhow::Result<f64> {
    let secs = args.duration.as_secs().max(1).to_string();
    let clients = clients.to_string();
    eprintln!("[pgbench] {clients} clients for {secs}s ({})", script.display());
    let out = Command::new("pgbench")
        .args(["-n", "-j", "2", "-c", &clients, "-T", &secs, "-f"])
        .arg(script)
        .arg("-d")
        .arg(url)
        .output()
        .map_err(|e| anyhow::anyhow!("pgbench: {e} (apt-get install postgresql-client)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<f64>().ok())
        })
        .ok_or_else(|| anyhow::anyhow!("no tps line in pgbench output:\n{text}"))
}

/// pgbench at the fixed rate, latency percentiles (ms) from its per-transaction
/// log: the database's own p50/p99 for the same writes at the same rate.
fn pgbench_fixed(args: &Args, url: &str, dir: &tempfile::TempDir) -> anyhow::Result<(f64, f64)> {
    let script = dir.path().join("calls.sql");
    let prefix = dir.path().join("pgbench_log");
    let secs = args.duration.as_secs().max(1).to_string();
    let clients = args.pgbench_clients.to_string();
    let rate = args.rate.to_string();
    eprintln!("[pgbench] fixed rate {rate}/s for {secs}s");
    let out = Command::new("pgbench")
        .args([
            "-n", "-j", "2", "-c", &clients, "-T", &secs, "-R", &rate, "--log", "-f",
        ])
        .arg(&script)
        .arg(format!("--log-prefix={}", prefix.display()))
        .arg("-d")
        .arg(url)
        .current_dir(dir.path())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pgbench -R failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut hist = new_hist();
    for entry in std::fs::read_dir(dir.path())? {
        let path = entry?.path();
        let is_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("pgbench_log"));
        if !is_log {
            continue;
        }
        // Columns: client_id transaction_no time(us) script_no time_epoch time_us [schedule_lag]
        for line in std::fs::read_to_string(&path)?.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let latency = cols.get(2).and_then(|v| v.parse::<u64>().ok());
            let lag = cols.get(6).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if let Some(us) = latency {
                hist.saturating_record(us + lag);
            }
        }
    }
    anyhow::ensure!(!hist.is_empty(), "pgbench wrote no transaction log");
    Ok((
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
    ))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    format!("{cores} cores ({cpu}), {mem} GiB RAM")
}

fn render(args: &Args, results: &[RunResult], ceiling: Option<Ceiling>) -> String {
    let mut s = String::new();
    s.push_str("### Control plane: call initiation\n\n");
    s.push_str(&format!(
        "Command: `DATABASE_URL=postgres://detour:detour@127.0.0.1:5432/detour \
         cargo run --release -p detour-control-plane --example bench -- --backend {}{}` \
         ({} rules, {} connections, {:?} per run, fixed rate {}/s; measured {}).\n\n",
        args.backend,
        if args.pg_async_commit {
            " --pg-async-commit"
        } else {
            ""
        },
        args.rules,
        args.concurrency,
        args.duration,
        args.rate,
        chrono::Utc::now().format("%Y-%m-%d")
    ));
    s.push_str(&format!(
        "Machine: {}; the load generator runs in the same process and shares the cores \
         (closed loop: `--client {}`, {}). Each call: auth (cached), validation, E.164 normalisation, routing over the rules, \
         and the Idempotency-Key claim with the response and the call row written together \
         with the other calls that arrived meanwhile (group commit, `store/batch.rs`: one \
         statement on Postgres, one transaction of two statements on SQLite).\n\n",
        machine(),
        args.client,
        if args.client == "reqwest" {
            "reqwest's pooled client"
        } else {
            "a kept-alive connection per client on hyper's connection API"
        },
    ));
    s.push_str("| backend | calls/s (closed loop) | p50 ms | p99 ms | errors | p50 ms @ fixed rate | p99 ms @ fixed rate | achieved rate | errors @ fixed rate |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in results {
        s.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.0}/s | {} |\n",
            r.backend,
            r.throughput,
            r.p50_ms,
            r.p99_ms,
            r.errors,
            r.fixed_p50_ms,
            r.fixed_p99_ms,
            r.fixed_rate,
            r.fixed_errors
        ));
        let _ = r.ok;
    }
    if let (Some(c), Some(pg)) = (ceiling, results.iter().find(|r| r.backend == "postgres")) {
        match (c.batched, pg.avg_batch) {
            (Some((rows, calls)), Some(avg)) => s.push_str(&format!(
                "\nCeiling: pgbench writing the same rows the way the service does (group commit: {rows} calls per \
                 statement, the service's average batch in its closed loop was {avg:.1}; {} clients like \
                 `database.batch_writers`; same database) {calls:.0} calls/s; the control plane reaches \
                 **{:.0}%** of it ({:.0} / {calls:.0}). One call per statement and transaction, as before group \
                 commit, pgbench ({} clients) does {:.0}/s.\n",
                pg.writers,
                100.0 * pg.throughput / calls,
                pg.throughput,
                args.pgbench_clients,
                c.single_tps,
            )),
            _ => s.push_str(&format!(
                "\nCeiling: pgbench ({} clients, the same single statement inserting the key and the call, same database) \
                 {:.0} transactions/s; the control plane reaches **{:.0}%** of it ({:.0} / {:.0}).\n",
                args.pgbench_clients,
                c.single_tps,
                100.0 * pg.throughput / c.single_tps,
                pg.throughput,
                c.single_tps
            )),
        }
        s.push_str(&format!(
            "pgbench alone at the fixed {}/s: p50 {:.2} ms, p99 {:.2} ms (the database's own \
             share of the control plane's fixed-rate latency).\n",
            args.rate, c.fixed.0, c.fixed.1
        ));
    }
    if results.iter().any(|r| r.backend == "postgres-async") {
        s.push_str(
            "\n`postgres-async` is the same Postgres database with `synchronous_commit = off` \
             (a commit returns before its WAL reaches the disk; a crash can lose the last \
             moments of acknowledged calls). It is not a supported setting, only a \
             measurement of how much of the limit is the disk's flush rate.\n",
        );
    }
    s.push_str("\nTargets: ≥5,000 calls/s on Postgres, ≥2,000 on SQLite, p99 < 20 ms at 1,000 calls/s.\n");
    for r in results.iter().filter(|r| r.backend != "postgres-async") {
        let target = if r.backend == "postgres" { 5000.0 } else { 2000.0 };
        s.push_str(&format!(
            "- {}: throughput target {}; fixed-rate p99 target {}.\n",
            r.backend,
            if r.throughput >= target { "met" } else { "NOT met" },
            if r.fixed_p99_ms < 20.0 { "met" } else { "NOT met" },
        ));
    }
    s
}

const BEGIN: &str = "<!-- control-plane:begin -->";
const END: &str = "<!-- control-plane:end -->";

/// Replaces the text between the control-plane markers (adding them at the
/// end when missing), leaving the rest of the file alone.
fn write_block(path: &PathBuf, block: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{BEGIN}\n{block}{}", &text[..b], &text[e..]),
        _ => {
            let sep = if text.is_empty() || text.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            format!("{text}{sep}\n{BEGIN}\n{block}{END}\n")
        }
    };
    std::fs::write(path, new)?;
    Ok(())
}

//! `detour-lab`: the lab's command line. `demo` runs the scripted outage story
//! on a whole fleet; `bench` measures; `mock-cp` and `load` are the building
//! blocks other hosts (network namespaces, HAProxy + Squid runs) use.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Parser, Subcommand};
use detour_lab::load::{Call, CallClient, call_with_retries, paced, quantile, steady};

#[derive(Parser)]
#[command(
    name = "detour-lab",
    about = "Whole Detour fleets on one machine, real faults, benchmarks."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Control plane + agents for blr, maa, del; traffic through blr while its
    /// uplink is cut, made lossy, healed, and a peer dies.
    Demo(detour_lab::demo::DemoArgs),
    /// Benchmarks; results go to docs/benchmarks.md.
    Bench(detour_lab::bench::BenchArgs),
    /// A fast stand-in control plane (for runs across processes or namespaces).
    MockCp {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// PEM certificate and key: serve HTTPS (h2 + HTTP/1.1) instead of HTTP.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
    },
    /// Steady call-handler load against a URL; prints one JSON summary line.
    Load {
        /// Base URL, e.g. http://127.0.0.1:8080
        #[arg(long)]
        url: String,
        /// Request path.
        #[arg(long, default_value = "/v1/calls")]
        path: String,
        #[arg(long, default_value_t = 50)]
        rate: u32,
        #[arg(long, default_value = "10s", value_parser = humantime_duration)]
        duration: Duration,
        #[arg(long, default_value = "2s", value_parser = humantime_duration)]
        timeout: Duration,
        /// Request body; `{n}` is replaced by the call's sequence number.
        #[arg(long, default_value = r#"{"n":{n}}"#)]
        body: String,
        /// Behave like a call handler that retries: every call gets its own
        /// Idempotency-Key and is re-sent with the same key every 200 ms while
        /// it is not answered (no response or a 5xx), for up to this long.
        /// The summary then adds what the retries saw and the `call_id` of
        /// every answer.
        #[arg(long, value_parser = humantime_duration)]
        retry_for: Option<Duration>,
    },
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    detour_agent::config::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    detour_lab::fleet::init_crypto();
    // Quiet by default so the timeline stays readable; RUST_LOG=info shows
    // every agent's path changes.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("detour-lab: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Demo(args) => detour_lab::demo::run(args).await,
            Command::Bench(args) => {
                // Interrupted, the benchmark future is dropped, and with it
                // every process it started (agents, stand-in, HAProxy, Squid).
                tokio::select! {
                    r = detour_lab::bench::run(args) => r.map(|()| true),
                    () = interrupted() => anyhow::bail!("interrupted; every process the benchmark started is stopped"),
                }
            }
            Command::MockCp { listen, cert, key } => mock_cp(listen, cert, key).await.map(|()| true),
            Command::Load {
                url,
                path,
                rate,
                duration,
                timeout,
                body,
                retry_for,
            } => {
                let client = CallClient::new(timeout);
                let make = |n: u64| Call::post(&path, &body.replace("{n}", &n.to_string()));
                match retry_for {
                    None => {
                        let results = steady(&client, &url, rate, duration, make).await;
                        let failed = results.iter().filter(|r| !r.ok()).count();
                        let summary = serde_json::json!({
                            "requests": results.len(),
                            "failed": failed,
                            "p50_ms": quantile(&results, 0.5).as_secs_f64() * 1000.0,
                            "p99_ms": quantile(&results, 0.99).as_secs_f64() * 1000.0,
                            "max_ms": quantile(&results, 1.0).as_secs_f64() * 1000.0,
                        });
                        println!("{summary}");
                        Ok(failed == 0)
                    }
                    Some(give_up) => retrying_load(&client, &url, rate, duration, give_up, make).await,
                }
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("detour-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `detour-lab load --retry-for`: calls that are retried with their own
/// Idempotency-Key until answered. Prints one JSON summary line.
async fn retrying_load(
    client: &CallClient,
    base: &str,
    rate: u32,
    duration: Duration,
    give_up: Duration,
    make: impl Fn(u64) -> Call,
) -> anyhow::Result<bool> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let outcomes = paced(rate, duration, |n| {
        let call = make(n);
        let client = client.clone();
        let url = format!("{base}{}", call.path);
        let key = format!("load-{}-{n}", &run[..12]);
        async move { call_with_retries(&client, &url, &call, &key, give_up, Duration::from_millis(200)).await }
    })
    .await;
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut examples: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let (mut failed, mut retried) = (0, 0);
    let mut call_ids = Vec::new();
    for (_, (last, failures)) in &outcomes {
        if !last.ok() {
            failed += 1;
        }
        if !failures.is_empty() {
            retried += 1;
        }
        for f in failures {
            let status = f
                .split(' ')
                .next()
                .filter(|s| s.parse::<u16>().is_ok())
                .unwrap_or("error");
            *by_status.entry(status.to_owned()).or_default() += 1;
            let ex = examples.entry(status.to_owned()).or_default();
            if ex.len() < 3 {
                ex.push(f.chars().take(300).collect());
            }
        }
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&last.body)
            && let Some(id) = v["call_id"].as_str()
        {
            call_ids.push(id.to_owned());
        }
    }
    let summary = serde_json::json!({
        "calls": outcomes.len(),
        "failed": failed,
        "retried": retried,
        "failures_by_status": by_status,
        "failure_examples": examples,
        "call_ids": call_ids,
    });
    println!("{summary}");
    Ok(failed == 0)
}

/// Ctrl-C or SIGTERM.
async fn interrupted() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            ctrl_c.await.ok();
        }
    }
}

async fn mock_cp(listen: SocketAddr, cert: Option<PathBuf>, key: Option<PathBuf>) -> anyhow::Result<()> {
    let tls = match (cert, key) {
        (Some(c), Some(k)) => Some(detour_lab::mock_cp::server_config(&c, &k)?),
        _ => None,
    };
    let cp = detour_lab::mock_cp::MockCp::start_on(listen, tls).await?;
    cp.recorder.forgetful.store(true, Ordering::Relaxed);
    println!("mock control plane listening on {}", cp.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}

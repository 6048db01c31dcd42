//! `detour-lab`: the lab's command line. `demo` runs the scripted outage story
//! on a whole fleet; `bench` measures; `mock-cp` and `load` are the building
//! blocks other hosts (network namespaces, HAProxy + Squid runs) use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use detour_lab::load::{Call, CallClient, retrying, steady, summary};

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
        /// Add the `call_id` of every answer to a steady run's summary
        /// (a retrying run always has them).
        #[arg(long)]
        call_ids: bool,
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
            Command::MockCp { listen, cert, key } => {
                detour_lab::mock_cp::serve(listen, cert, key).await.map(|()| true)
            }
            Command::Load {
                url,
                path,
                rate,
                duration,
                timeout,
                body,
                retry_for,
                call_ids,
            } => {
                let client = CallClient::new(timeout);
                let make = |n: u64| Call::post(&path, &body.replace("{n}", &n.to_string()));
                let summary = match retry_for {
                    None => summary::steady(&steady(&client, &url, rate, duration, make).await, call_ids),
                    Some(give_up) => summary::retrying(&retrying(&client, &url, rate, duration, give_up, make).await),
                };
                println!("{summary}");
                Ok(summary["failed"].as_u64() == Some(0))
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

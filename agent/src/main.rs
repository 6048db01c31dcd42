//! `detour-agent`: the command line. Parses arguments, sets up logging and
//! calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use detour_agent::config::AgentConfig;

#[derive(Parser)]
#[command(
    name = "detour-agent",
    version,
    about = "Keeps a telephony server talking to its control plane over the best working path."
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Plain, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Worker threads. 1 runs everything on one thread (no cross-core
        /// wake-ups on the request path); a request costs the agent tens of
        /// microseconds of CPU, so one thread carries thousands per second.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        threads: u16,
        /// Take the listening sockets and the path table over from the agent
        /// running with the same upgrade.dir, which then drains and exits (an
        /// upgrade or restart that refuses no connection). Starts on its own
        /// when no agent runs there.
        #[arg(long)]
        takeover: bool,
    },
    /// Validate agent.toml and the peers file; print every problem as file:line:col: message.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the path table of a running agent (from its admin /status).
    Status {
        /// Admin address of the agent.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Ask again every second and redraw in place, until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// A fleet CA and per-PoP certificates.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a fleet CA: DIR/ca.pem and DIR/ca.key.
    Init {
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a PoP certificate: OUT/NAME.pem and OUT/NAME.key.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// PoP name, e.g. blr.
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = detour_agent::pki::LEAF_VALIDITY_DAYS)]
        days: i64,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    rustls::crypto::ring::default_provider().install_default().ok();
    match cli.command {
        Command::CheckConfig { config } => match AgentConfig::load(&config) {
            Ok(c) => {
                println!(
                    "{}: OK (pop {}, {} peer(s), control plane {})",
                    config.display(),
                    c.pop,
                    c.peers.len(),
                    c.control_plane
                        .endpoints
                        .iter()
                        .map(|e| if c.control_plane.endpoints.len() > 1 {
                            format!("{} ({}, priority {})", e.url, e.name, e.priority)
                        } else {
                            e.url.to_string()
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            threads,
            takeover,
        } => {
            init_tracing(cli.log_format);
            let config = match AgentConfig::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::FAILURE;
                }
            };
            let built = if threads == 1 {
                tokio::runtime::Builder::new_current_thread().enable_all().build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(usize::from(threads))
                    .enable_all()
                    .build()
            };
            let rt = match built {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("detour-agent: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(detour_agent::run(config, takeover, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("detour-agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { admin, json, watch } => detour_agent::status::main(&admin, json, watch),
        Command::Pki { command } => {
            let result = match command {
                PkiCommand::Init { out } => detour_agent::pki::init(&out).map(|(c, k)| {
                    println!("wrote {} and {}", c.display(), k.display());
                }),
                PkiCommand::Issue { ca, name, out, days } => detour_agent::pki::issue(&ca, &name, &out, days)
                    .map(|(c, k)| {
                        println!("wrote {} and {}", c.display(), k.display());
                    }),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("detour-agent pki: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

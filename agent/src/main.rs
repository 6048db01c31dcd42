//! `detour-agent`: the command line. Parses arguments, sets up logging and
//! calls into the library.

use std::process::ExitCode;

use clap::Parser;
use detour_agent::cli::{Cli, Command, LogFormat, PeerCommand, PkiCommand};
use detour_agent::config::AgentConfig;

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
                for w in c.warnings() {
                    eprintln!("{}: warning: {w}", config.display());
                }
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
        Command::Peer {
            command,
            config,
            socket,
        } => {
            let socket = match socket {
                Some(s) => s,
                None => match AgentConfig::load(&config) {
                    Ok(c) => match c.listen.control {
                        Some(s) => s,
                        None => {
                            eprintln!(
                                "detour-agent peer: {} has no listen.control; set it (e.g. /run/detour-agent/control.sock) and restart the agent",
                                config.display()
                            );
                            return ExitCode::FAILURE;
                        }
                    },
                    Err(errors) => {
                        eprintln!("{errors}");
                        eprintln!(
                            "detour-agent peer: cannot read the control socket from {}; pass --socket PATH",
                            config.display()
                        );
                        return ExitCode::FAILURE;
                    }
                },
            };
            let (action, name) = match &command {
                PeerCommand::List => ("list", None),
                PeerCommand::Drain { name } => ("drain", Some(name.as_str())),
                PeerCommand::Undrain { name } => ("undrain", Some(name.as_str())),
            };
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("detour-agent peer: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(detour_agent::control::peer_command(&socket, action, name)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("detour-agent peer {action}: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Pki { command } => {
            let result = match command {
                PkiCommand::Init { out, days } => detour_agent::pki::init_for(&out, days).map(|(c, k)| {
                    println!("wrote {} and {}", c.display(), k.display());
                }),
                PkiCommand::Issue { ca, name, out, days } => detour_agent::pki::issue(&ca, &name, &out, days)
                    .map(|(c, k)| {
                        println!("wrote {} and {}", c.display(), k.display());
                    }),
                PkiCommand::Revoke {
                    ca,
                    name,
                    cert,
                    reason,
                } => detour_agent::pki::revoke(&ca, name.as_deref(), cert.as_deref(), reason).map(|r| {
                    for c in &r.added {
                        println!("revoked {} (serial {})", c.names.join(", "), c.serial);
                    }
                    for c in &r.already {
                        println!("already revoked: {} (serial {})", c.names.join(", "), c.serial);
                    }
                    println!(
                        "wrote {} (CRL number {}, {} revoked in all): install it where agents' [tls] crl points \
                         (they apply it as soon as the file changes)",
                        r.crl.display(),
                        r.number,
                        r.total
                    );
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

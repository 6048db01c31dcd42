//! `detour-control-plane`: parses the command line, loads config, sets up
//! tracing and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use detour_control_plane::Config;
use detour_control_plane::cli::{Cli, Command, TokenCommand};

/// Loads and validates the config; prints its errors, or its warnings
/// (`file:line:col: warning: …`) for every command that goes on.
fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    let config = Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(1)
    })?;
    for w in &config.warnings {
        eprintln!("{w}");
    }
    Ok(config)
}

#[tokio::main]
async fn main() -> ExitCode {
    rustls::crypto::ring::default_provider().install_default().ok();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { config } => match load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                return ExitCode::SUCCESS;
            }
            Err(code) => return code,
        },
        Command::Migrate { config } => match load(&config) {
            Ok(c) => detour_control_plane::migrate(&c).await,
            Err(code) => return code,
        },
        Command::Token {
            command:
                TokenCommand::Create {
                    pop,
                    operator,
                    config,
                },
        } => match load(&config) {
            Ok(c) => match operator {
                Some(name) => detour_control_plane::create_operator_token(&c, &name).await,
                None => {
                    detour_control_plane::create_agent_token_with_id(&c, pop.as_deref().unwrap_or_default())
                        .await
                }
            }
            .map(|(token, id)| {
                println!("{token}");
                eprintln!("token id {id} (for `token list` and `token revoke --id`)");
            }),
            Err(code) => return code,
        },
        Command::Token {
            command: TokenCommand::List { pop, config },
        } => match load(&config) {
            Ok(c) => detour_control_plane::list_agent_tokens(&c, pop.as_deref())
                .await
                .map(|table| print!("{table}")),
            Err(code) => return code,
        },
        Command::Token {
            command: TokenCommand::Revoke { id, config },
        } => match load(&config) {
            Ok(c) => detour_control_plane::revoke_agent_token(&c, &id)
                .await
                .map(|who| println!("revoked token {id} of {who}; replicas refuse it within 30 s")),
            Err(code) => return code,
        },
        Command::Backup { config, out } => match load(&config) {
            Ok(c) => detour_control_plane::backup::backup(&c, &out)
                .await
                .map(|r| println!("backed up to {r}")),
            Err(code) => return code,
        },
        Command::Restore { config, from } => match load(&config) {
            Ok(c) => detour_control_plane::backup::restore(&c, &from)
                .await
                .map(|r| println!("restored {r}; start the control plane")),
            Err(code) => return code,
        },
        Command::Serve { config } => match load(&config) {
            Ok(c) => serve(c).await,
            Err(code) => return code,
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("detour-control-plane: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listen {}: {e}", config.listen))?;
    let shutdown = async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut hup)) = (signal(SignalKind::terminate()), signal(SignalKind::hangup()))
            else {
                ctrl_c.await.ok();
                return;
            };
            tokio::pin!(ctrl_c);
            loop {
                tokio::select! {
                    _ = &mut ctrl_c => return,
                    _ = term.recv() => return,
                    // A HUP (log rotation, a reflexive `systemctl reload`) must
                    // not stop the service. Routes and tokens live in the
                    // database and apply without a restart, and the TLS
                    // certificate is read again (tasks.rs hears the HUP too);
                    // the rest of cp.toml needs a restart.
                    _ = hup.recv() => tracing::warn!(
                        "SIGHUP: the TLS certificate is read again ([tls]); routes and tokens apply without a restart; restart the service to apply other cp.toml changes"
                    ),
                }
            }
        }
        #[cfg(not(unix))]
        ctrl_c.await.ok();
    };
    detour_control_plane::serve(config, listener, shutdown).await
}

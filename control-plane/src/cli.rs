//! The command line `detour-control-plane` accepts (clap): parsed by
//! `main.rs`, rendered into man pages and shell completions by
//! `detour-packaging`, so the packaged documentation is the binary's own.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// `detour-control-plane`.
#[derive(Parser)]
#[command(name = "detour-control-plane", version, about = "Detour control plane")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Serve the API (runs migrations first).
    Serve {
        /// cp.toml to serve with.
        #[arg(long, default_value = "cp.toml")]
        config: PathBuf,
    },
    /// Apply database migrations and exit.
    Migrate {
        /// cp.toml naming the database.
        #[arg(long, default_value = "cp.toml")]
        config: PathBuf,
    },
    /// Validate cp.toml; prints `file:line:col: message` and exits 1 on error.
    CheckConfig {
        /// cp.toml to check.
        #[arg(long, default_value = "cp.toml")]
        config: PathBuf,
    },
    /// Copy the SQLite database to a new file while the control plane serves
    /// (a consistent snapshot, checked); Postgres: use pg_dump.
    Backup {
        /// cp.toml naming the database.
        #[arg(long, default_value = "cp.toml")]
        config: PathBuf,
        /// The backup to write; it must not exist (mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Put a backup where the SQLite database belongs; there must be none
    /// (stop the control plane and move the old one away first).
    Restore {
        /// cp.toml naming the database.
        #[arg(long, default_value = "cp.toml")]
        config: PathBuf,
        /// The backup to restore (checked before it is copied).
        #[arg(long)]
        from: PathBuf,
    },
    /// Agent tokens.
    Token {
        /// What to do with tokens.
        #[command(subcommand)]
        command: TokenCommand,
    },
}

/// `detour-control-plane token ...`: agent and operator tokens.
#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token for a PoP (or, with --operator, a read-only one for
    /// the fleet page); it is printed once, only its hash is stored.
    Create {
        /// PoP the token is for, e.g. blr.
        #[arg(long, required_unless_present = "operator")]
        pop: Option<String>,
        /// A read-only operator token for this person or team (the fleet
        /// page), instead of an agent's.
        #[arg(long, conflicts_with = "pop")]
        operator: Option<String>,
        /// cp.toml naming the database.
        #[arg(long, default_value = "cp.toml")]
        config: PathBuf,
    },
    /// List tokens: id, PoP (or operator:NAME), creation time (never the tokens).
    List {
        /// Only this PoP's tokens.
        #[arg(long)]
        pop: Option<String>,
        /// cp.toml naming the database.
        #[arg(long, default_value = "cp.toml")]
        config: PathBuf,
    },
    /// Revoke a token by id; every replica refuses it within 30 s.
    Revoke {
        /// Token id (from `token create` or `token list`).
        #[arg(long)]
        id: String,
        /// cp.toml naming the database.
        #[arg(long, default_value = "cp.toml")]
        config: PathBuf,
    },
}

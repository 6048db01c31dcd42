//! The command line `detour-agent` accepts (clap): parsed by `main.rs`,
//! rendered into man pages and shell completions by `detour-packaging`, so
//! the packaged documentation is the binary's own.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// `detour-agent` and its global options.
#[derive(Parser)]
#[command(
    name = "detour-agent",
    version,
    about = "Keeps a telephony server talking to its control plane over the best working path."
)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Plain,
    /// One JSON object per line (for the journal and log shippers).
    Json,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the agent.
    Run {
        /// agent.toml (its peers file is named inside it).
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
        /// agent.toml to check (with the peers file it names).
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
    /// Drain or undrain a peer of a running agent, without editing files
    /// (through its control socket, `listen.control`).
    Peer {
        /// What to do.
        #[command(subcommand)]
        command: PeerCommand,
        /// agent.toml of the running agent: where its control socket is.
        #[arg(long, short, global = true, default_value = "/etc/detour/agent.toml")]
        config: PathBuf,
        /// The control socket itself (instead of reading it from --config).
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
    },
    /// A fleet CA and per-PoP certificates.
    Pki {
        /// What to do with the CA.
        #[command(subcommand)]
        command: PkiCommand,
    },
}

/// `detour-agent peer ...`.
#[derive(Subcommand)]
pub enum PeerCommand {
    /// Every peer: enabled in the peers file, drained at runtime.
    List,
    /// No new requests through this peer (its paths stay probed) until
    /// undrained; survives reloads, and restarts when upgrade.dir is set.
    Drain {
        /// The peer's name in the peers file, e.g. maa.
        name: String,
    },
    /// Put a drained peer back in service.
    Undrain {
        /// The peer's name in the peers file, e.g. maa.
        name: String,
    },
}

/// `detour-agent pki ...`.
#[derive(Subcommand)]
pub enum PkiCommand {
    /// Create a fleet CA: DIR/ca.pem and DIR/ca.key.
    Init {
        /// Directory to write ca.pem and ca.key into.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days (replacing the CA is a fleet-wide change).
        #[arg(long, default_value_t = crate::pki::CA_VALIDITY_DAYS)]
        days: i64,
    },
    /// Issue a PoP certificate: OUT/NAME.pem and OUT/NAME.key (a copy of the
    /// certificate is kept in CA/issued/ for pki revoke).
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// PoP name, e.g. blr.
        #[arg(long)]
        name: String,
        /// Directory to write NAME.pem and NAME.key into.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days. Renew well before the end: agents apply a new
        /// certificate on reload.
        #[arg(long, default_value_t = crate::pki::LEAF_VALIDITY_DAYS)]
        days: i64,
    },
    /// Revoke a PoP's certificates: add them to CA/crl.pem, the fleet CA's
    /// revocation list, which agents read from [tls] crl.
    Revoke {
        /// Directory holding ca.pem and ca.key (and issued/, crl.pem).
        #[arg(long)]
        ca: PathBuf,
        /// PoP whose certificates to revoke: every one pki issue recorded in
        /// CA/issued/. With --cert, a check that the certificate names it.
        #[arg(long, required_unless_present = "cert")]
        name: Option<String>,
        /// Revoke only the certificate in this PEM file (one issued before
        /// CA/issued/ existed, or by other tools from the same CA).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// The reason the revocation list records.
        #[arg(long, value_enum, default_value_t = crate::pki::Reason::Unspecified)]
        reason: crate::pki::Reason,
    },
}

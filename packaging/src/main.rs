//! `detour-packaging OUT`: renders the man pages and shell completions the
//! Debian packages carry into OUT (see the library; run by packaging/check).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Renders the man pages and shell completions of the packaged programs.
#[derive(Parser)]
#[command(name = "detour-packaging", version)]
struct Cli {
    /// Directory to write man/ and completions/ into (created if missing).
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match detour_packaging::render(&cli.out) {
        Ok(files) => {
            println!("wrote {} files under {}", files.len(), cli.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("detour-packaging: {}: {e}", cli.out.display());
            ExitCode::FAILURE
        }
    }
}

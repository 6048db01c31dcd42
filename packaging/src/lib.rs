//! What the Debian packages carry besides the binaries and `packaging/`:
//! man pages and bash, zsh and fish completions, rendered from the two
//! command lines ([`detour_agent::cli`], [`detour_control_plane::cli`]).
//!
//! Rendering here, not in the binaries, keeps `clap_mangen` and
//! `clap_complete` out of what runs on the servers. The output depends only
//! on the command lines and the workspace version (no dates, no paths of
//! this machine, gzip without a timestamp), so two runs write the same bytes.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{Command, CommandFactory};
use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};

/// One packaged program: its command line and what its top-level man page
/// says beyond `--help`.
pub struct Program {
    /// The binary's name (also the man page's and the completions' name).
    pub name: &'static str,
    /// Its command line.
    pub command: fn() -> Command,
    /// FILES: (path, what it is), as installed by the package.
    pub files: &'static [(&'static str, &'static str)],
    /// SEE ALSO: other man pages, e.g. `systemctl(1)`.
    pub see_also: &'static [&'static str],
}

/// The two packaged programs.
pub fn programs() -> [Program; 2] {
    [
        Program {
            name: "detour-agent",
            command: detour_agent::cli::Cli::command,
            files: &[
                (
                    "/etc/detour/agent.toml",
                    "The configuration (a conffile). The service starts only when detour-agent check-config accepts it.",
                ),
                (
                    "/etc/detour/peers.toml",
                    "The peers; edits are applied without a restart.",
                ),
                (
                    "/etc/detour/certs/",
                    "ca.pem (the fleet CA), POP.pem and POP.key (this PoP's identity on the peer mesh).",
                ),
                (
                    "/etc/detour/agent.token",
                    "The bearer token for the control plane.",
                ),
                (
                    "/usr/lib/systemd/system/detour-agent.service, detour-agent.socket",
                    "The hardened service, and the listening sockets it keeps across restarts.",
                ),
                (
                    "/run/detour-agent/",
                    "upgrade.dir: the path table handed to the next process, and handover.sock.",
                ),
                (
                    "/var/lib/detour-agent/",
                    "The deferred-delivery journal, when enabled.",
                ),
            ],
            see_also: &["detour-control-plane(1)", "systemctl(1)", "journalctl(1)"],
        },
        Program {
            name: "detour-control-plane",
            command: detour_control_plane::cli::Cli::command,
            files: &[
                (
                    "/etc/detour-cp/cp.toml",
                    "The configuration (a conffile). The service starts only when detour-control-plane check-config accepts it.",
                ),
                (
                    "/etc/detour-cp/admin.token",
                    "The admin token for the routes API, when set in cp.toml.",
                ),
                (
                    "/etc/detour-cp/db-password",
                    "The Postgres password (database_password_file), readable by root only; a LoadCredential= drop-in hands it to the service.",
                ),
                (
                    "/usr/lib/systemd/system/detour-control-plane.service",
                    "The hardened service.",
                ),
                (
                    "/var/lib/detour-cp/",
                    "data_dir: the SQLite database when database_url is unset.",
                ),
            ],
            see_also: &["detour-agent(1)", "systemctl(1)", "journalctl(1)"],
        },
    ]
}

/// Writes every program's man pages to `out/man/` (one per subcommand, as
/// `git` does: `detour-agent-check-config.1.gz`, gzipped as Debian installs
/// man pages) and its completions to
/// `out/completions/{bash,zsh,fish}/` under the names each shell looks for.
/// Returns the files written.
pub fn render(out: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for program in programs() {
        written.extend(man_pages(&program, &out.join("man"))?);
        written.extend(completions(&program, &out.join("completions"))?);
    }
    Ok(written)
}

fn man_pages(program: &Program, dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    // As clap_mangen::generate_to does: no `help` subcommand, and a built
    // command so that subcommands are named `detour-agent-run`.
    let mut cmd = (program.command)().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        subcommand_pages(sub, dir, &mut written)?;
    }
    let page = top_page(program, cmd)?;
    written.push(write_gzipped(&dir.join(format!("{}.1.gz", program.name)), &page)?);
    Ok(written)
}

fn subcommand_pages(cmd: &Command, dir: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        subcommand_pages(sub, dir, written)?;
    }
    let man = Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render(&mut page)?;
    written.push(write_gzipped(
        &dir.join(format!("{}.gz", man.get_filename())),
        &page,
    )?);
    Ok(())
}

/// `gzip -9n`: no name, no timestamp.
fn write_gzipped(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(fs::File::create(path)?, flate2::Compression::best());
    gz.write_all(bytes)?;
    gz.finish()?.flush()?;
    Ok(path.to_path_buf())
}

/// clap_mangen's sections, then FILES and SEE ALSO.
fn top_page(program: &Program, cmd: Command) -> io::Result<Vec<u8>> {
    let man = Man::new(cmd);
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    man.render_subcommands_section(&mut page)?;
    let mut roff = Roff::new();
    roff.control("SH", ["FILES"]);
    for (path, what) in program.files {
        roff.control("TP", []).text([italic(*path)]).text([roman(*what)]);
    }
    roff.control("SH", ["SEE ALSO"]);
    let mut refs = Vec::new();
    for (i, page) in program.see_also.iter().enumerate() {
        if i > 0 {
            refs.push(roman(", "));
        }
        let (name, section) = page.split_once('(').unwrap_or((page, ""));
        refs.push(bold(name));
        refs.push(roman(format!("({section}")));
    }
    refs.push(roman(
        ". docs/operations.md in the source tree: install, upgrade, alerts and their runbooks.",
    ));
    roff.text(refs);
    roff.to_writer(&mut page)?;
    man.render_version_section(&mut page)?;
    Ok(one_preamble(&page))
}

/// Each of clap_mangen's sections starts with the same two-line preamble
/// (defining the apostrophe); a page needs it once.
fn one_preamble(page: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(page);
    let mut lines = text.lines();
    let preamble: Vec<&str> = lines.by_ref().take(2).collect();
    let mut out = preamble.join("\n");
    out.push('\n');
    let rest: Vec<&str> = lines.collect();
    let mut i = 0;
    while i < rest.len() {
        if rest[i..].starts_with(&preamble) {
            i += preamble.len();
        } else {
            out.push_str(rest[i]);
            out.push('\n');
            i += 1;
        }
    }
    out.into_bytes()
}

fn completions(program: &Program, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    // Named as bash-completion, zsh and fish look them up by command name.
    for (shell, sub, file) in [
        (Shell::Bash, "bash", program.name.to_owned()),
        (Shell::Zsh, "zsh", format!("_{}", program.name)),
        (Shell::Fish, "fish", format!("{}.fish", program.name)),
    ] {
        let dir = dir.join(sub);
        fs::create_dir_all(&dir)?;
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut (program.command)(), program.name, &mut script);
        let path = dir.join(file);
        fs::write(&path, script)?;
        written.push(path);
    }
    Ok(written)
}

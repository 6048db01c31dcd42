//! `detour-packaging OUT` as packaging/check runs it: a man page for every
//! subcommand, completions that know every subcommand, the same bytes twice.
//! (This test also makes `cargo nextest run --workspace` build the binary,
//! so CI packages what the suite built without a second build.)

use std::io::Read;
use std::path::Path;
use std::process::Command;

use clap::CommandFactory;

fn render(out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_detour-packaging"))
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success(), "detour-packaging {}: {status}", out.display());
}

fn subcommand_names(prefix: &str, cmd: &clap::Command, names: &mut Vec<String>) {
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("{prefix}-{}", sub.get_name());
        subcommand_names(&name, sub, names);
        names.push(name);
    }
}

fn man_page(dir: &Path, name: &str) -> String {
    let path = dir.join(format!("man/{name}.1.gz"));
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap();
    text
}

fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().display().to_string();
                files.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_subcommand_has_a_man_page_and_completions_know_them() {
    let dir = tempfile::tempdir().unwrap();
    render(dir.path());
    for (name, cmd) in [
        ("detour-agent", detour_agent::cli::Cli::command()),
        ("detour-control-plane", detour_control_plane::cli::Cli::command()),
    ] {
        let top = man_page(dir.path(), name);
        assert!(
            top.contains(".SH FILES") && top.contains(".SH \"SEE ALSO\""),
            "{top}"
        );
        let mut names = Vec::new();
        subcommand_names(name, &cmd, &mut names);
        assert!(!names.is_empty());
        for page in &names {
            let text = man_page(dir.path(), page);
            assert!(text.contains(".TH"), "man/{page}.1.gz is roff:\n{text}");
        }
        let bash = std::fs::read_to_string(dir.path().join(format!("completions/bash/{name}"))).unwrap();
        let zsh = std::fs::read_to_string(dir.path().join(format!("completions/zsh/_{name}"))).unwrap();
        let fish = std::fs::read_to_string(dir.path().join(format!("completions/fish/{name}.fish"))).unwrap();
        assert!(zsh.starts_with(&format!("#compdef {name}")), "{zsh}");
        for sub in cmd.get_subcommands() {
            for (shell, script) in [("bash", &bash), ("zsh", &zsh), ("fish", &fish)] {
                assert!(
                    script.contains(sub.get_name()),
                    "{shell} completion of {name} knows `{}`",
                    sub.get_name()
                );
            }
        }
    }
}

#[test]
fn two_runs_write_the_same_bytes() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    render(a.path());
    render(b.path());
    let (fa, fb) = (files_under(a.path()), files_under(b.path()));
    assert!(fa.len() > 10, "{:?}", fa.iter().map(|f| &f.0).collect::<Vec<_>>());
    assert_eq!(fa, fb);
}

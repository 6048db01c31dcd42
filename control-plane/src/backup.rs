//! `backup` and `restore`: the embedded SQLite database copied while the
//! control plane serves (`VACUUM INTO`, one read transaction beside the
//! writer), and a copy put back in place of a database that is not there.
//! Neither ever overwrites a file. Postgres is backed up with its own tools
//! (docs/operations.md, "Backup and restore").

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};

use crate::config::Config;
use crate::store::{Contents, Store};

/// What a backup or a restore wrote, checked.
#[derive(Debug, Clone)]
pub struct Report {
    /// The file written.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// What it holds.
    pub contents: Contents,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.contents;
        write!(
            f,
            "{}: {} bytes, integrity ok, {} calls, {} routes, {} agent tokens, schema {}{}",
            self.path.display(),
            self.bytes,
            c.calls,
            c.routes,
            c.tokens,
            c.schema,
            if c.current {
                ""
            } else {
                " (older than this build: serve or migrate brings it up)"
            }
        )
    }
}

/// The SQLite file `config` serves from, or why there is none to copy.
fn sqlite_file(config: &Config) -> anyhow::Result<PathBuf> {
    match config.sqlite_path() {
        Some(path) => Ok(path),
        None if config.database_url().starts_with("sqlite:") => {
            bail!("the database is in memory: there is no file to back up or restore")
        }
        None => bail!(
            "the database is Postgres ({}): back it up with pg_dump and restore it with pg_restore \
             (docs/operations.md, \"Backup and restore\")",
            crate::redact(&config.database_url())
        ),
    }
}

/// `path` with `suffix` added to its file name.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Makes `path` durable under its name: its bytes, then the directory entry.
fn sync(path: &Path) -> anyhow::Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        // A directory's entry is synced through the directory itself.
        File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(())
}

/// Opens `path` read-only and checks it is a sound control-plane database.
async fn check(path: &Path) -> anyhow::Result<Report> {
    let bytes = fs::metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .len();
    let store = Store::open_sqlite_file(path).await?;
    let checked = async {
        let integrity = store
            .integrity()
            .await
            .with_context(|| format!("{} is not a readable SQLite database", path.display()))?;
        ensure!(
            integrity == "ok",
            "{}: integrity check failed: {integrity}",
            path.display()
        );
        let contents = store
            .contents()
            .await
            .with_context(|| format!("{} is not a control-plane database", path.display()))?;
        Ok(contents)
    }
    .await;
    store.close().await;
    Ok(Report {
        path: path.to_path_buf(),
        bytes,
        contents: checked?,
    })
}

/// `backup --out FILE`: a consistent copy of the SQLite database, taken
/// while the control plane serves, written as `FILE.partial` and renamed to
/// `FILE` once it is on disk and checked (mode 0600: it holds every call).
pub async fn backup(config: &Config, out: &Path) -> anyhow::Result<Report> {
    let db = sqlite_file(config)?;
    ensure!(db.exists(), "no database at {}: nothing to back up", db.display());
    ensure!(
        !out.exists(),
        "{} exists: a backup never overwrites a file; choose a new name",
        out.display()
    );
    let partial = beside(out, ".partial");
    ensure!(
        !partial.exists(),
        "{} exists: another backup is writing it, or one was interrupted (then remove it)",
        partial.display()
    );
    let store = Store::open(config).await?;
    let copied = store.vacuum_into(&partial).await;
    store.close().await;
    let written = async {
        copied.with_context(|| format!("copying {} into {}", db.display(), partial.display()))?;
        fs::set_permissions(&partial, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("{}", partial.display()))?;
        sync(&partial)?;
        check(&partial).await
    }
    .await;
    let mut report = match written {
        Ok(report) => report,
        Err(e) => {
            fs::remove_file(&partial).ok();
            return Err(e);
        }
    };
    fs::rename(&partial, out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    sync(out)?;
    report.path = out.to_path_buf();
    Ok(report)
}

/// `restore --from FILE`: checks the backup, then copies it to where the
/// config's SQLite database belongs, which must be free (the control plane
/// stopped, the old database moved away). The copy gets the owner and
/// group of its directory (so a restore run as root leaves a file the
/// service's user can write) and mode 0600.
pub async fn restore(config: &Config, from: &Path) -> anyhow::Result<Report> {
    let db = sqlite_file(config)?;
    for taken in [db.clone(), beside(&db, "-wal"), beside(&db, "-shm")] {
        ensure!(
            !taken.exists(),
            "{} exists: restore never overwrites a database. Stop the control plane, move {} and \
             its -wal and -shm files away, then restore",
            taken.display(),
            db.display()
        );
    }
    let mut report = check(from).await?;
    let dir = db.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let partial = beside(&db, ".restoring");
    ensure!(
        !partial.exists(),
        "{} exists: another restore is writing it, or one was interrupted (then remove it)",
        partial.display()
    );
    let copied = (|| -> anyhow::Result<()> {
        let mut source = File::open(from).with_context(|| format!("{}", from.display()))?;
        let mut target = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .with_context(|| format!("{}", partial.display()))?;
        fs::set_permissions(&partial, fs::Permissions::from_mode(0o600))?;
        std::io::copy(&mut source, &mut target)
            .with_context(|| format!("copying into {}", partial.display()))?;
        let owner = fs::metadata(dir)?;
        let mine = fs::metadata(&partial)?;
        if (owner.uid(), owner.gid()) != (mine.uid(), mine.gid())
            && let Err(e) = std::os::unix::fs::chown(&partial, Some(owner.uid()), Some(owner.gid()))
        {
            eprintln!(
                "warning: {} stays owned by uid {} (chown to {}'s owner: {e}); the control plane must be able to write it",
                db.display(),
                mine.uid(),
                dir.display()
            );
        }
        sync(&partial)
    })();
    if let Err(e) = copied {
        fs::remove_file(&partial).ok();
        return Err(e);
    }
    fs::rename(&partial, &db)
        .with_context(|| format!("renaming {} to {}", partial.display(), db.display()))?;
    sync(&db)?;
    report.path = db;
    Ok(report)
}

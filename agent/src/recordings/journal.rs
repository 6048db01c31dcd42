//! The recordings journal: every file seen and how far it got, on local disk,
//! so that no recording is missed or uploaded twice across restarts and
//! crashes.
//!
//! An append-only file of JSON lines, each the whole state of one file after
//! a step; the last line for a file wins. Each line is written and synced
//! before the step it records is acted on. A torn last line (a crash while
//! writing) is reported and skipped: the directory is rescanned at start,
//! so the file it described is found again and its upload starts over.
//! The file is rewritten (to a temporary name, synced, renamed) when it has
//! grown to several times the number of files it describes.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One finished part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub number: u16,
    pub etag: String,
    /// Base64 SHA-256 of the part, as the store checks it.
    pub sha256: String,
}

/// What is known of one recording file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The file's name in the recordings directory.
    pub file: String,
    pub size: u64,
    /// Modification time (ms since the epoch) when the upload began: a file
    /// that changes afterwards is uploaded afresh.
    pub mtime_ms: i64,
    pub call_id: String,
    /// The object key.
    pub key: String,
    /// Hex SHA-256 of the whole file; empty until it is computed (beside
    /// the upload).
    pub sha256: String,
    /// The multipart upload in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<Part>,
    /// The object is complete in the store.
    #[serde(default)]
    pub stored: bool,
    /// The control plane recorded it on the call.
    #[serde(default)]
    pub recorded: bool,
    /// The local file was deleted, moved or (with `keep`) left for good.
    #[serde(default)]
    pub done: bool,
    /// When the file was first seen complete (ms since the epoch).
    pub seen_ms: i64,
}

/// The journal file and the state it holds.
pub struct Journal {
    path: PathBuf,
    file: File,
    entries: BTreeMap<String, Entry>,
    lines: usize,
}

/// What loading a journal found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Files described.
    pub entries: usize,
    /// Lines that did not parse (a torn last line after a crash, or damage).
    pub damaged: usize,
}

impl Journal {
    /// Opens (or creates) the journal at `path`.
    pub fn open(path: &Path) -> io::Result<(Journal, Loaded)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut entries = BTreeMap::new();
        let mut lines = 0;
        let mut damaged = 0;
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).split(b'\n') {
                    let line = line?;
                    if line.is_empty() {
                        continue;
                    }
                    lines += 1;
                    match serde_json::from_slice::<Entry>(&line) {
                        Ok(e) => {
                            entries.insert(e.file.clone(), e);
                        }
                        Err(_) => damaged += 1,
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let mut journal = Journal {
            path: path.to_path_buf(),
            file,
            entries,
            lines,
        };
        let loaded = Loaded {
            entries: journal.entries.len(),
            damaged,
        };
        if damaged > 0 {
            // Start from a clean file: a torn line must not glue itself to
            // the next one written.
            journal.compact()?;
        }
        Ok((journal, loaded))
    }

    pub fn get(&self, file: &str) -> Option<&Entry> {
        self.entries.get(file)
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Records `entry` durably (written and synced) before returning.
    pub fn put(&mut self, entry: &Entry) -> io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.entries.insert(entry.file.clone(), entry.clone());
        self.lines += 1;
        if self.lines > 64 && self.lines > 4 * self.entries.len() {
            self.compact()?;
        }
        Ok(())
    }

    /// Forgets a file that is gone from the directory and done with.
    pub fn forget(&mut self, file: &str) -> io::Result<()> {
        if self.entries.remove(file).is_some() {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the journal with one line per file.
    fn compact(&mut self) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            for e in self.entries.values() {
                let mut line = serde_json::to_vec(e).map_err(io::Error::other)?;
                line.push(b'\n');
                f.write_all(&line)?;
            }
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = self.entries.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(file: &str) -> Entry {
        Entry {
            file: file.to_owned(),
            size: 10,
            mtime_ms: 1,
            call_id: "c".to_owned(),
            key: format!("k/{file}"),
            sha256: "00".repeat(32),
            upload_id: None,
            parts: Vec::new(),
            stored: false,
            recorded: false,
            done: false,
            seen_ms: 5,
        }
    }

    #[test]
    fn the_last_state_of_each_file_survives_a_reopen_and_a_torn_line_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, loaded) = Journal::open(&path).unwrap();
        assert_eq!(loaded, Loaded::default());
        let mut a = entry("a.wav");
        j.put(&a).unwrap();
        a.stored = true;
        j.put(&a).unwrap();
        j.put(&entry("b.wav")).unwrap();
        drop(j);
        // A crash in the middle of a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"file\":\"c.wav\",\"si").unwrap();
        drop(f);
        let (mut j, loaded) = Journal::open(&path).unwrap();
        assert_eq!(
            loaded,
            Loaded {
                entries: 2,
                damaged: 1
            }
        );
        assert!(j.get("a.wav").unwrap().stored);
        assert!(!j.get("b.wav").unwrap().stored);
        // Written after the torn line, read back whole.
        j.put(&entry("d.wav")).unwrap();
        drop(j);
        let (j, loaded) = Journal::open(&path).unwrap();
        assert_eq!(
            loaded,
            Loaded {
                entries: 3,
                damaged: 0
            }
        );
        assert!(j.get("d.wav").is_some());
    }

    #[test]
    fn compaction_keeps_one_line_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path).unwrap();
        let mut a = entry("a.wav");
        for n in 0..200u16 {
            a.parts.push(Part {
                number: n + 1,
                etag: format!("e{n}"),
                sha256: "x".to_owned(),
            });
            j.put(&a).unwrap();
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 70, "{lines} lines for one file");
        drop(j);
        let (j, _) = Journal::open(&path).unwrap();
        assert_eq!(j.get("a.wav").unwrap().parts.len(), 200);
    }
}

//! Requests to the S3-compatible store, signed with `rusty-s3` (sans-IO:
//! it only builds presigned URLs) and sent on the agent's own paths to the
//! store, best-ranked first; a request that fails on one path (not
//! answered, or a 5xx) is sent again on the next. A file up to
//! `recordings.part_size` goes in one `PUT`; a larger one as a multipart
//! upload whose id and finished parts are journalled, so it resumes. Every
//! part carries its SHA-256 (`x-amz-checksum-sha256`) for the store to check.
//!
//! Parts are not held in memory. One pass reads the file in order and hashes
//! it (the whole file for the call record, and each part for its header,
//! which must be known before the body); each part is then read from disk
//! again, a chunk at a time, while it is sent ([`PartBody`]). The pass runs
//! at most a part or two ahead of the parts in flight. The file's identity
//! and timestamps are taken when it is opened: a part whose file changed
//! since (written, truncated, replaced, removed) ends its body with an error
//! before its last chunk, so the store never gets a whole part that is not
//! the one hashed; and a store that checks the checksum (S3 does) refuses
//! any part whose bytes are not those the header names.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use sha2::{Digest, Sha256};

use futures_util::StreamExt;

use super::journal::{Entry, Part};
use super::{Failure, Look, Reason, look, open_failure, unchanged};
use crate::config::{AgentConfig, Recordings};
use crate::paths::{PathClient, Route, StreamBody, Target};
use crate::runtime::Shared;

/// Bytes read from disk at a time, when hashing and when sending. A part in
/// flight holds at most two of these (the chunk being sent and the next).
const CHUNK: usize = 256 * 1024;

/// How long a presigned URL stays valid: longer than any one request.
const SIGNED_FOR: Duration = Duration::from_secs(3600);

/// The store and a pool per path to it.
pub(super) struct Store {
    config: Arc<AgentConfig>,
    bucket: Bucket,
    credentials: Credentials,
    part_size: u64,
    /// Parts of one recording in flight at once.
    parallel_parts: usize,
    paths: Vec<Arc<PathClient>>,
    /// `recordings.max_rate`, all paths together.
    total: Option<Pacer>,
    /// `recordings.max_rate_per_peer`, by path name.
    per_peer: std::collections::HashMap<Arc<str>, Pacer>,
}

/// Caps a rate of bytes per second, one request at a time: a request may
/// start when the bytes before it have had their time at the rate. So the
/// average over a few parts holds the cap; a single part still goes at the
/// link's speed (smaller parts pace more finely).
struct Pacer {
    rate: u64,
    next: std::sync::Mutex<tokio::time::Instant>,
}

impl Pacer {
    fn new(rate: u64) -> Pacer {
        Pacer {
            rate,
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits for the turn of a request of `bytes`.
    async fn take(&self, bytes: u64) {
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

impl Store {
    pub(super) fn new(config: Arc<AgentConfig>, cfg: &Recordings) -> Result<Store, String> {
        let s = &cfg.store;
        let style = if s.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(s.endpoint.clone(), style, s.bucket.clone(), s.region.clone())
            .map_err(|e| e.to_string())?;
        let tls = crate::tls::control_plane_client_config(&s.ca_certs).map_err(|e| e.to_string())?;
        let peer_tls = match &config.tls {
            Some(m) => Some(m.peer_client_config().map_err(|e| e.to_string())?),
            None => None,
        };
        let target = Target::from(s);
        let mut paths = vec![Arc::new(PathClient::new(
            "direct",
            Route::Direct,
            &target,
            config.forward.connect_timeout,
            tls.clone(),
            None,
        ))];
        for p in &config.peers {
            paths.push(Arc::new(PathClient::new(
                &p.path_name(),
                Route::Via {
                    peer: p.pop.clone(),
                    relay: p.relay.clone(),
                },
                &target,
                config.forward.connect_timeout,
                tls.clone(),
                peer_tls.clone(),
            )));
        }
        let per_peer = match cfg.max_rate_per_peer {
            Some(rate) => paths
                .iter()
                .filter(|p| matches!(p.route, Route::Via { .. }))
                .map(|p| (p.name.clone(), Pacer::new(rate)))
                .collect(),
            None => Default::default(),
        };
        Ok(Store {
            credentials: Credentials::new(s.access_key.clone(), s.secret_key.clone()),
            part_size: cfg.part_size,
            parallel_parts: usize::from(cfg.parallel_parts.max(1)),
            bucket,
            paths,
            config,
            total: cfg.max_rate.map(Pacer::new),
            per_peer,
        })
    }

    /// Whether this was built from `config` (a reload builds it again).
    pub(super) fn built_from(&self, config: &Arc<AgentConfig>) -> bool {
        Arc::ptr_eq(&self.config, config)
    }

    /// Stores the file at `path` (size `size`, modified at `mtime_ms`) under
    /// `entry.key`, resuming a multipart upload the entry records. `save`
    /// journals each step before the next. Returns the file's SHA-256 (hex),
    /// hashed in the same pass as the parts' checksums.
    pub(super) async fn upload(
        &self,
        shared: &Shared,
        path: &Path,
        entry: &mut Entry,
        size: u64,
        mtime_ms: i64,
        save: &mut (dyn FnMut(&Entry) -> Result<(), Failure> + Send),
    ) -> Result<String, Failure> {
        let look = Look { size, mtime_ms };
        let src = Source::open(path, look).await?;
        if size <= self.part_size {
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let whole = joined(hash_pass(src.clone(), size, self.part_size, tx)).await?;
            let (_, sum) = rx
                .recv()
                .await
                .ok_or_else(|| Failure::new(Reason::Unreadable, "the hash pass gave no checksum"))?;
            let mut action = self.bucket.put_object(Some(&self.credentials), &entry.key);
            action.headers_mut().insert("x-amz-checksum-sha256", sum.clone());
            let url = action.sign(SIGNED_FOR);
            let payload = Payload::Part {
                src,
                start: 0,
                len: size,
            };
            self.send(
                shared,
                Method::PUT,
                url,
                &[("x-amz-checksum-sha256", &sum)],
                &payload,
            )
            .await?;
            return Ok(whole);
        }
        let count = size.div_ceil(self.part_size);
        if count > u64::from(u16::MAX) {
            return Err(Failure::new(
                Reason::StoreRefused,
                "more than 65535 parts: raise recordings.part_size",
            ));
        }
        let upload_id = match entry.upload_id.clone() {
            Some(id) => {
                self.adopt_stored_parts(shared, &src, entry, &id, size, save)
                    .await?;
                id
            }
            None => {
                let mut action = self
                    .bucket
                    .create_multipart_upload(Some(&self.credentials), &entry.key);
                action.headers_mut().insert("x-amz-checksum-algorithm", "SHA256");
                let url = action.sign(SIGNED_FOR);
                let (_, body) = self
                    .send(
                        shared,
                        Method::POST,
                        url,
                        &[("x-amz-checksum-algorithm", "SHA256")],
                        &Payload::Bytes(Bytes::new()),
                    )
                    .await?;
                let text = String::from_utf8_lossy(&body);
                let id = rusty_s3::actions::CreateMultipartUpload::parse_response(&text)
                    .map_err(|e| {
                        Failure::new(Reason::StoreRefused, format!("CreateMultipartUpload answer: {e}"))
                    })?
                    .upload_id()
                    .to_owned();
                entry.upload_id = Some(id.clone());
                entry.parts.clear();
                save(entry)?;
                id
            }
        };
        // The hash pass hands over each part's checksum as it reads it;
        // `parallel_parts` parts are in flight, each journalled as soon as
        // the store has it, in whatever order they finish. Parts the store
        // already has are hashed (for the whole file's checksum), not sent.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let pass = hash_pass(src.clone(), size, self.part_size, tx);
        let stored: Vec<u16> = entry.parts.iter().map(|p| p.number).collect();
        let key = entry.key.clone();
        let sums = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|s| (s, rx))
        }));
        let mut sent = sums
            .filter(|(number, _)| std::future::ready(!stored.contains(number)))
            .map(|(number, sum)| self.send_part(shared, &src, &key, &upload_id, number, sum, size))
            .buffer_unordered(self.parallel_parts);
        while let Some(done) = sent.next().await {
            match done {
                Ok(part) => {
                    entry.parts.push(part);
                    save(entry)?;
                }
                Err(f) if f.detail.contains("NoSuchUpload") => {
                    // The store no longer has the upload (aborted, expired):
                    // start again with a new one.
                    entry.upload_id = None;
                    entry.parts.clear();
                    save(entry)?;
                    return Err(f);
                }
                Err(f) => return Err(f),
            }
        }
        drop(sent);
        // A pass that stopped (the file changed, or could not be read) ends
        // the parts early: its failure is the upload's.
        let whole = joined(pass).await?;
        if entry.parts.len() as u64 != count {
            return Err(Failure::new(
                Reason::Changed,
                format!(
                    "{}: {} of {count} parts stored",
                    path.display(),
                    entry.parts.len()
                ),
            ));
        }
        // A change after the parts were read must not be completed.
        unchanged(path, look)?;
        entry.parts.sort_by_key(|p| p.number);
        let action = self.bucket.complete_multipart_upload(
            Some(&self.credentials),
            &entry.key,
            &upload_id,
            std::iter::empty::<&str>(),
        );
        let url = action.sign(SIGNED_FOR);
        let body = complete_body(&entry.parts);
        let (_, answer) = self
            .send(shared, Method::POST, url, &[], &Payload::Bytes(Bytes::from(body)))
            .await?;
        // S3 may answer a failed completion with 200 and an error document.
        if String::from_utf8_lossy(&answer).contains("<Error>") {
            return Err(Failure::new(
                Reason::StoreRefused,
                format!("CompleteMultipartUpload: {}", String::from_utf8_lossy(&answer)),
            ));
        }
        Ok(whole)
    }

    /// Resuming an upload: the parts the store holds that the journal does
    /// not (finished by the store after a crash, with nobody left to hear
    /// its answer) are taken as done when their size and ETag (the MD5 of
    /// the part, as S3 gives it for unencrypted and SSE-S3 objects) match
    /// the file, so they are not sent again. Best effort: a store that
    /// cannot list, or an ETag that is not an MD5, only means those parts
    /// are sent again.
    async fn adopt_stored_parts(
        &self,
        shared: &Shared,
        src: &Arc<Source>,
        entry: &mut Entry,
        upload_id: &str,
        size: u64,
        save: &mut (dyn FnMut(&Entry) -> Result<(), Failure> + Send),
    ) -> Result<(), Failure> {
        let action = self
            .bucket
            .list_parts(Some(&self.credentials), &entry.key, upload_id);
        let url = action.sign(SIGNED_FOR);
        let Ok((_, body)) = self
            .send(shared, Method::GET, url, &[], &Payload::Bytes(Bytes::new()))
            .await
        else {
            return Ok(());
        };
        // S3 answers `<ListPartsResult>`; some S3-compatible servers (moto)
        // name the root `<ListPartsResponse>`, which the parser refuses.
        let text = String::from_utf8_lossy(&body)
            .replace("<ListPartsResponse", "<ListPartsResult")
            .replace("</ListPartsResponse>", "</ListPartsResult>");
        let Ok(listed) = rusty_s3::actions::ListParts::parse_response(&text) else {
            tracing::debug!(key = %entry.key, "recordings: the store's list of parts could not be read; parts it may hold are sent again");
            return Ok(());
        };
        for part in listed.parts {
            if part.number == 0 || entry.parts.iter().any(|p| p.number == part.number) {
                continue;
            }
            let start = (u64::from(part.number) - 1) * self.part_size;
            if start >= size || part.size != self.part_size.min(size - start) {
                continue;
            }
            let (md5, sum) = {
                let (src, len) = (src.clone(), part.size);
                blocking(move || {
                    use md5::Digest as _;
                    let mut md5 = md5::Md5::new();
                    let mut sha = Sha256::new();
                    let mut buf = vec![0u8; CHUNK];
                    let mut at = start;
                    while at < start + len {
                        let n = CHUNK.min((start + len - at) as usize);
                        src.read_exact_at(&mut buf[..n], at)?;
                        md5.update(&buf[..n]);
                        sha.update(&buf[..n]);
                        at += n as u64;
                    }
                    Ok((hex::encode(md5.finalize()), b64(&sha.finalize())))
                })
                .await?
            };
            if part.etag.trim_matches('"').eq_ignore_ascii_case(&md5) {
                tracing::info!(key = %entry.key, part = part.number, "recordings: the store already has this part; not sent again");
                entry.parts.push(Part {
                    number: part.number,
                    etag: part.etag,
                    sha256: sum,
                });
                save(entry)?;
            }
        }
        Ok(())
    }

    /// Sends part `number` of the file, whose checksum is `sum`, read from
    /// disk as it goes; the part as the journal records it.
    #[allow(clippy::too_many_arguments)]
    async fn send_part(
        &self,
        shared: &Shared,
        src: &Arc<Source>,
        key: &str,
        upload_id: &str,
        number: u16,
        sum: String,
        size: u64,
    ) -> Result<Part, Failure> {
        let start = (u64::from(number) - 1) * self.part_size;
        let len = self.part_size.min(size - start);
        let mut action = self
            .bucket
            .upload_part(Some(&self.credentials), key, number, upload_id);
        action.headers_mut().insert("x-amz-checksum-sha256", sum.clone());
        let url = action.sign(SIGNED_FOR);
        let payload = Payload::Part {
            src: src.clone(),
            start,
            len,
        };
        let (headers, _) = self
            .send(
                shared,
                Method::PUT,
                url,
                &[("x-amz-checksum-sha256", &sum)],
                &payload,
            )
            .await?;
        let etag = headers
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Failure::new(
                    Reason::StoreRefused,
                    format!("part {number}: no ETag in the answer"),
                )
            })?
            .to_owned();
        Ok(Part {
            number,
            etag,
            sha256: sum,
        })
    }

    /// Gives up a multipart upload (the file changed or went away), so the
    /// store does not keep its parts. Best effort: S3 lifecycle rules
    /// (`AbortIncompleteMultipartUpload`) clean up what this misses.
    pub(super) async fn abort(&self, shared: &Shared, key: &str, upload_id: &str) {
        let action = self
            .bucket
            .abort_multipart_upload(Some(&self.credentials), key, upload_id);
        let url = action.sign(SIGNED_FOR);
        match self
            .send(shared, Method::DELETE, url, &[], &Payload::Bytes(Bytes::new()))
            .await
        {
            Ok(_) => tracing::info!(%key, "recordings: abandoned multipart upload aborted"),
            Err(f) => {
                tracing::warn!(%key, detail = %f.detail, "recordings: could not abort an abandoned multipart upload")
            }
        }
    }

    /// Sends one request on the best path that carries it: a path that does
    /// not answer, or answers 5xx, passes it to the next. The answer's
    /// headers and body, or why no path stored it.
    async fn send(
        &self,
        shared: &Shared,
        method: Method,
        url: url::Url,
        headers: &[(&str, &str)],
        payload: &Payload,
    ) -> Result<(http::HeaderMap, Bytes), Failure> {
        let len = payload.len();
        let host = &url[url::Position::BeforeHost..url::Position::AfterPort];
        let path_and_query = &url[url::Position::BeforePath..];
        // Generous for a slow uplink: 30 s plus 64 KiB/s.
        let timeout = Duration::from_secs(30) + Duration::from_millis(len / 64);
        let snapshot = shared.forwarder.runtime().health.snapshot();
        let mut order: Vec<&Arc<PathClient>> = snapshot
            .ranked
            .iter()
            .filter_map(|&i| self.paths.iter().find(|p| p.name == snapshot.paths[i].name))
            .collect();
        for p in &self.paths {
            if !order.iter().any(|o| o.name == p.name) {
                order.push(p);
            }
        }
        if let Some(p) = &self.total {
            p.take(len).await;
        }
        let mut last = String::from("no path to the store");
        for path in order {
            if let Some(p) = self.per_peer.get(&path.name) {
                p.take(len).await;
            }
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(path.scheme.clone());
            uri.authority = path.authority.clone();
            uri.path_and_query = path_and_query.parse().ok();
            let Ok(uri) = http::Uri::from_parts(uri) else {
                return Err(Failure::new(Reason::StoreRefused, format!("bad URL {url}")));
            };
            let mut req = http::Request::new(payload.body());
            *req.method_mut() = method.clone();
            *req.uri_mut() = uri;
            if let Ok(v) = http::HeaderValue::from_str(host) {
                req.headers_mut().insert(http::header::HOST, v);
            }
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    http::HeaderValue::from_str(v),
                ) {
                    req.headers_mut().insert(k, v);
                }
            }
            if method == Method::PUT {
                req.headers_mut()
                    .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
            }
            let sent = path.stream_client().request(req);
            let exchange = async {
                let resp = sent.await.map_err(|e| crate::forward::classify(&e).1)?;
                let (parts, body) = resp.into_parts();
                let body = http_body_util::Limited::new(body, 1024 * 1024)
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                Ok::<_, String>((parts, body))
            };
            // The path's health is watched meanwhile: a path the probes find
            // down (a cut uplink) gives the request up at once, instead of
            // after a timeout long enough for a slow upload.
            let went_down = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let snap = shared.forwarder.runtime().health.snapshot();
                    if snap
                        .by_name(&path.name)
                        .is_some_and(|p| p.state == detour_wire::PathState::Down)
                    {
                        return;
                    }
                }
            };
            let outcome = tokio::select! {
                r = tokio::time::timeout(timeout, exchange) => r,
                _ = went_down => {
                    last = format!("{}: the path went down", path.name);
                    continue;
                }
            };
            if let Some(f) = payload.broken() {
                // The file changed under a part: no other path does better.
                return Err(f);
            }
            match outcome {
                Err(_) => last = format!("{}: no answer in {timeout:?}", path.name),
                Ok(Err(e)) => last = format!("{}: {e}", path.name),
                Ok(Ok((parts, answer))) if parts.status.is_success() => {
                    // Recording bytes (objects and parts), not the requests
                    // around them.
                    if method == Method::PUT {
                        shared
                            .metrics
                            .recordings_bytes
                            .with_label_values(&[&*path.name])
                            .inc_by(len);
                    }
                    return Ok((parts.headers, answer));
                }
                Ok(Ok((parts, answer))) if parts.status.is_server_error() => {
                    last = format!(
                        "{}: {} {}",
                        path.name,
                        parts.status,
                        String::from_utf8_lossy(&answer)
                    );
                }
                Ok(Ok((parts, answer))) => {
                    return Err(Failure::new(
                        Reason::StoreRefused,
                        format!(
                            "{method} {}: {} {}",
                            url.path(),
                            parts.status,
                            String::from_utf8_lossy(&answer).trim()
                        ),
                    ));
                }
            }
        }
        Err(Failure::new(Reason::StoreUnreachable, last))
    }
}

/// `CompleteMultipartUpload`'s body with each part's ETag and checksum.
fn complete_body(parts: &[Part]) -> String {
    let mut s = String::from("<CompleteMultipartUpload xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">");
    for p in parts {
        s.push_str(&format!(
            "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag><ChecksumSHA256>{}</ChecksumSHA256></Part>",
            p.number,
            xml_escape(&p.etag),
            xml_escape(&p.sha256)
        ));
    }
    s.push_str("</CompleteMultipartUpload>");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn b64(digest: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// Runs `f` on the blocking pool (file reads and hashing: a runtime worker
/// would stall every task it serves meanwhile).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    joined(tokio::task::spawn_blocking(f)).await
}

async fn joined<T>(task: tokio::task::JoinHandle<Result<T, Failure>>) -> Result<T, Failure> {
    task.await
        .map_err(|e| Failure::new(Reason::Unreadable, format!("reading the recording: {e}")))?
}

/// What identifies a file and its content as the kernel sees it: a write
/// changes the modification and change times (ns), a truncation the
/// length, a rename over it the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Print {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Print {
    fn of(m: &std::fs::Metadata) -> Print {
        Print {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// The file being uploaded, open for the whole upload, and how it was when
/// it was opened.
struct Source {
    file: std::fs::File,
    path: PathBuf,
    print: Print,
    /// Why a part's body stopped short (the file changed or went away): the
    /// request's failure, rather than the path's.
    broken: OnceLock<(Reason, String)>,
}

impl Source {
    /// Opens the file, which must still look like `l`.
    async fn open(path: &Path, l: Look) -> Result<Arc<Source>, Failure> {
        let path = path.to_path_buf();
        blocking(move || {
            let file = std::fs::File::open(&path).map_err(|e| open_failure(&path, e))?;
            let meta = file
                .metadata()
                .map_err(|e| Failure::new(Reason::Unreadable, format!("{}: {e}", path.display())))?;
            if look(&meta) != l {
                return Err(changed(&path));
            }
            Ok(Arc::new(Source {
                print: Print::of(&meta),
                file,
                path,
                broken: OnceLock::new(),
            }))
        })
        .await
    }

    /// Fails when the file at the path is no longer the one opened, as it
    /// was then. Blocking.
    fn check(&self) -> Result<(), Failure> {
        let at_path = std::fs::metadata(&self.path).map_err(|e| open_failure(&self.path, e))?;
        let open = self
            .file
            .metadata()
            .map_err(|e| Failure::new(Reason::Unreadable, format!("{}: {e}", self.path.display())))?;
        if Print::of(&at_path) != self.print || Print::of(&open) != self.print {
            return Err(changed(&self.path));
        }
        Ok(())
    }

    /// Fills `buf` from `offset`. Blocking.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Failure> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Failure::new(
                    Reason::Changed,
                    format!("{} got shorter while it was read", self.path.display()),
                )
            } else {
                Failure::new(Reason::Unreadable, format!("{}: {e}", self.path.display()))
            }
        })
    }
}

fn changed(path: &Path) -> Failure {
    Failure::new(
        Reason::Changed,
        format!("{} changed while it was uploaded", path.display()),
    )
}

/// Reads the file once, in order, on the blocking pool: sends each part's
/// SHA-256 (base64, part 1 first) on `sums` as soon as the part is read, and
/// returns the whole file's (hex). A file of one part is hashed once (its
/// part is the file). `sums` holds one checksum, so the pass runs at most a
/// part or two ahead of the parts in flight (its CPU spread over the upload,
/// not spent in a burst), and it stops when the upload is given up.
fn hash_pass(
    src: Arc<Source>,
    size: u64,
    part_size: u64,
    sums: tokio::sync::mpsc::Sender<(u16, String)>,
) -> tokio::task::JoinHandle<Result<String, Failure>> {
    tokio::task::spawn_blocking(move || {
        let given_up = || Failure::new(Reason::StoreUnreachable, "the upload was given up");
        let mut buf = vec![0u8; CHUNK];
        let mut whole = Sha256::new();
        let single = size <= part_size;
        let mut start = 0;
        let mut number: u16 = 0;
        while start < size || number == 0 {
            number = number.checked_add(1).ok_or_else(given_up)?;
            let len = part_size.min(size - start);
            let mut part = Sha256::new();
            let mut at = start;
            while at < start + len {
                let n = CHUNK.min((start + len - at) as usize);
                src.read_exact_at(&mut buf[..n], at)?;
                whole.update(&buf[..n]);
                if !single {
                    part.update(&buf[..n]);
                }
                at += n as u64;
            }
            start += len;
            if single {
                let digest = whole.finalize();
                src.check()?;
                sums.blocking_send((1, b64(&digest))).map_err(|_| given_up())?;
                return Ok(hex::encode(digest));
            }
            sums.blocking_send((number, b64(&part.finalize())))
                .map_err(|_| given_up())?;
        }
        src.check()?;
        Ok(hex::encode(whole.finalize()))
    })
}

/// A request's body, made again for each path the request is tried on.
enum Payload {
    Bytes(Bytes),
    /// `len` bytes of the file from `start`, read as they are sent.
    Part {
        src: Arc<Source>,
        start: u64,
        len: u64,
    },
}

impl Payload {
    fn len(&self) -> u64 {
        match self {
            Payload::Bytes(b) => b.len() as u64,
            Payload::Part { len, .. } => *len,
        }
    }

    fn body(&self) -> StreamBody {
        match self {
            Payload::Bytes(b) => Full::new(b.clone())
                .map_err(|never| match never {})
                .boxed_unsync(),
            Payload::Part { src, start, len } => PartBody {
                src: src.clone(),
                at: *start,
                unread: *len,
                unsent: *len,
                reading: None,
            }
            .boxed_unsync(),
        }
    }

    /// Why the body stopped short, when the file changed under it.
    fn broken(&self) -> Option<Failure> {
        match self {
            Payload::Part { src, .. } => src
                .broken
                .get()
                .map(|(reason, detail)| Failure::new(*reason, detail.clone())),
            Payload::Bytes(_) => None,
        }
    }
}

/// One part's bytes, read from the file a chunk at a time as the request
/// sends them: the next chunk is read (on the blocking pool) while the
/// current one is written, so a part in flight holds at most two chunks.
/// Before its last chunk is handed over, the file is checked against how it
/// was when it was opened (before it was hashed): if it changed, the body
/// ends with an error instead, the request is cut short of its
/// `Content-Length`, and the store keeps nothing of it.
struct PartBody {
    src: Arc<Source>,
    /// Where the next read starts, and how many bytes are still to read.
    at: u64,
    unread: u64,
    /// Bytes not yet handed to the request.
    unsent: u64,
    reading: Option<tokio::task::JoinHandle<Result<Bytes, Failure>>>,
}

impl PartBody {
    fn read_next(&mut self) {
        let n = (CHUNK as u64).min(self.unread);
        let last = n == self.unread;
        let (src, at) = (self.src.clone(), self.at);
        self.at += n;
        self.unread -= n;
        self.reading = Some(tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n as usize];
            src.read_exact_at(&mut buf, at)?;
            if last {
                src.check()?;
            }
            Ok(Bytes::from(buf))
        }));
    }
}

impl Body for PartBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if this.reading.is_none() {
            if this.unread == 0 {
                return Poll::Ready(None);
            }
            this.read_next();
        }
        let Some(reading) = this.reading.as_mut() else {
            return Poll::Ready(None);
        };
        let read = ready!(Pin::new(reading).poll(cx));
        this.reading = None;
        let chunk = match read {
            Ok(Ok(chunk)) => chunk,
            Ok(Err(f)) => {
                let err = std::io::Error::other(f.detail.clone());
                let _ = this.src.broken.set((f.reason, f.detail));
                return Poll::Ready(Some(Err(err)));
            }
            Err(e) => return Poll::Ready(Some(Err(std::io::Error::other(e)))),
        };
        this.unsent -= chunk.len() as u64;
        if this.unread > 0 {
            this.read_next();
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.unsent == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.unsent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_pacer_holds_the_average_rate_and_lets_the_first_request_go_at_once() {
        let pacer = Pacer::new(1024 * 1024);
        let started = tokio::time::Instant::now();
        pacer.take(1024 * 1024).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        for _ in 0..4 {
            pacer.take(512 * 1024).await;
        }
        // 1 MiB, then four half-MiB requests: the last starts after 3 s.
        assert_eq!(started.elapsed(), Duration::from_millis(2500));
        // Idle time is not saved up for a burst.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t = tokio::time::Instant::now();
        pacer.take(1024 * 1024).await;
        pacer.take(1).await;
        assert_eq!(t.elapsed(), Duration::from_secs(1));
    }

    /// A file of `len` bytes, last modified an hour ago, and how it looks.
    fn old_file(dir: &Path, len: usize) -> (PathBuf, Vec<u8>, Look) {
        let path = dir.join("r.wav");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 977) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
        drop(f);
        let l = look(&std::fs::metadata(&path).unwrap());
        (path, data, l)
    }

    async fn collect(payload: &Payload) -> Result<Vec<u8>, std::io::Error> {
        let body = payload.body();
        assert_eq!(body.size_hint().exact(), Some(payload.len()));
        body.collect().await.map(|b| b.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn one_pass_gives_each_parts_checksum_and_the_files_and_parts_are_sent_as_read() {
        let dir = tempfile::tempdir().unwrap();
        // Parts and chunks that do not divide each other or the file.
        let (size, part) = (3 * CHUNK + 1000, CHUNK as u64 + 4321);
        let (path, data, l) = old_file(dir.path(), size);
        let src = Source::open(&path, l).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let pass = hash_pass(src.clone(), size as u64, part, tx);
        let mut sums = Vec::new();
        while let Some(s) = rx.recv().await {
            sums.push(s);
        }
        assert_eq!(joined(pass).await.unwrap(), hex::encode(Sha256::digest(&data)));
        let parts: Vec<&[u8]> = data.chunks(part as usize).collect();
        assert_eq!(sums.len(), parts.len());
        for (i, (number, sum)) in sums.iter().enumerate() {
            assert_eq!(usize::from(*number), i + 1);
            assert_eq!(*sum, b64(&Sha256::digest(parts[i])));
            let start = i as u64 * part;
            let sent = collect(&Payload::Part {
                src: src.clone(),
                start,
                len: parts[i].len() as u64,
            })
            .await
            .unwrap();
            assert_eq!(sent, parts[i]);
        }
        // A file of one part is hashed once: its part's checksum is the file's.
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let whole = joined(hash_pass(src, size as u64, size as u64, tx))
            .await
            .unwrap();
        let (_, sum) = rx.recv().await.unwrap();
        assert_eq!(sum, b64(&hex::decode(&whole).unwrap()));
    }

    #[tokio::test]
    async fn a_part_of_a_file_written_after_it_was_hashed_is_cut_short_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data, l) = old_file(dir.path(), 2 * CHUNK + 10);
        let src = Source::open(&path, l).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        joined(hash_pass(src.clone(), data.len() as u64, data.len() as u64, tx))
            .await
            .unwrap();
        assert!(rx.recv().await.is_some());
        // Rewritten in place between hashing and sending, same size.
        {
            use std::io::{Seek, Write};
            let mut f = std::fs::File::options().write(true).open(&path).unwrap();
            f.seek(std::io::SeekFrom::Start(CHUNK as u64 + 1)).unwrap();
            f.write_all(b"not what was hashed").unwrap();
        }
        let payload = Payload::Part {
            src: src.clone(),
            start: 0,
            len: data.len() as u64,
        };
        assert!(collect(&payload).await.is_err(), "a changed part was sent whole");
        let f = payload.broken().expect("the request's failure names the change");
        assert_eq!(f.reason, Reason::Changed);

        // Truncated: the part cannot be read whole.
        let (path, data, l) = old_file(dir.path(), 2 * CHUNK + 10);
        let src = Source::open(&path, l).await.unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(CHUNK as u64)
            .unwrap();
        let payload = Payload::Part {
            src,
            start: 0,
            len: data.len() as u64,
        };
        assert!(collect(&payload).await.is_err());
        assert_eq!(payload.broken().unwrap().reason, Reason::Changed);

        // Replaced by another file under the same name (same size, same
        // times): the one opened is not the one at the path any more.
        let (path, data, l) = old_file(dir.path(), CHUNK);
        let src = Source::open(&path, l).await.unwrap();
        let other = dir.path().join("other.wav");
        std::fs::copy(&path, &other).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(std::fs::metadata(&path).unwrap().modified().unwrap())
            .unwrap();
        std::fs::rename(&other, &path).unwrap();
        let payload = Payload::Part {
            src,
            start: 0,
            len: data.len() as u64,
        };
        assert!(collect(&payload).await.is_err());
        assert_eq!(payload.broken().unwrap().reason, Reason::Changed);

        // Removed: reported as gone.
        let (path, data, l) = old_file(dir.path(), CHUNK);
        let src = Source::open(&path, l).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        let payload = Payload::Part {
            src,
            start: 0,
            len: data.len() as u64,
        };
        assert!(collect(&payload).await.is_err());
        assert_eq!(payload.broken().unwrap().reason, Reason::Vanished);
    }

    #[test]
    fn the_completion_names_every_part_with_its_checksum_escaped() {
        let body = complete_body(&[
            Part {
                number: 1,
                etag: "\"abc\"".into(),
                sha256: "x+y=".into(),
            },
            Part {
                number: 2,
                etag: "\"d&e\"".into(),
                sha256: "z".into(),
            },
        ]);
        assert_eq!(
            body,
            "<CompleteMultipartUpload xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <Part><PartNumber>1</PartNumber><ETag>&quot;abc&quot;</ETag><ChecksumSHA256>x+y=</ChecksumSHA256></Part>\
             <Part><PartNumber>2</PartNumber><ETag>&quot;d&amp;e&quot;</ETag><ChecksumSHA256>z</ChecksumSHA256></Part>\
             </CompleteMultipartUpload>"
        );
    }
}

//! Requests to the S3-compatible store, signed with `rusty-s3` (sans-IO:
//! it only builds presigned URLs) and sent on the agent's own paths to the
//! store, best-ranked first; a request that fails on one path (not
//! answered, or a 5xx) is sent again on the next. A file up to
//! `recordings.part_size` goes in one `PUT`; a larger one as a multipart
//! upload whose id and finished parts are journalled, so it resumes. Every
//! part carries its SHA-256 (`x-amz-checksum-sha256`) for the store to check.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use futures_util::StreamExt;

use super::journal::{Entry, Part};
use super::{Failure, Look, Reason, open_failure, unchanged};
use crate::config::{AgentConfig, Recordings};
use crate::paths::{PathClient, Route, Target};
use crate::runtime::Shared;

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
    /// journals each step before the next.
    pub(super) async fn upload(
        &self,
        shared: &Shared,
        path: &Path,
        entry: &mut Entry,
        size: u64,
        mtime_ms: i64,
        save: &mut (dyn FnMut(&Entry) -> Result<(), Failure> + Send),
    ) -> Result<(), Failure> {
        let look = Look { size, mtime_ms };
        if size <= self.part_size {
            let body = read_range(path, 0, size, look).await?;
            let sum = hash_off_the_runtime(&body).await;
            let mut action = self.bucket.put_object(Some(&self.credentials), &entry.key);
            action.headers_mut().insert("x-amz-checksum-sha256", sum.clone());
            let url = action.sign(SIGNED_FOR);
            self.send(shared, Method::PUT, url, &[("x-amz-checksum-sha256", &sum)], body)
                .await?;
            return Ok(());
        }
        let upload_id = match entry.upload_id.clone() {
            Some(id) => {
                self.adopt_stored_parts(shared, path, entry, &id, size, look, save)
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
                        Bytes::new(),
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
        let count = size.div_ceil(self.part_size);
        let mut todo = Vec::new();
        for n in 1..=count {
            let number = u16::try_from(n).map_err(|_| {
                Failure::new(
                    Reason::StoreRefused,
                    "more than 65535 parts: raise recordings.part_size",
                )
            })?;
            if !entry.parts.iter().any(|p| p.number == number) {
                todo.push(number);
            }
        }
        // `parallel_parts` parts in flight; each is journalled as soon as the
        // store has it, in whatever order they finish.
        let key = entry.key.clone();
        let mut sent = futures_util::stream::iter(
            todo.into_iter()
                .map(|number| self.send_part(shared, path, &key, &upload_id, number, size, look)),
        )
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
            .send(shared, Method::POST, url, &[], Bytes::from(body))
            .await?;
        // S3 may answer a failed completion with 200 and an error document.
        if String::from_utf8_lossy(&answer).contains("<Error>") {
            return Err(Failure::new(
                Reason::StoreRefused,
                format!("CompleteMultipartUpload: {}", String::from_utf8_lossy(&answer)),
            ));
        }
        Ok(())
    }

    /// Resuming an upload: the parts the store holds that the journal does
    /// not (finished by the store after a crash, with nobody left to hear
    /// its answer) are taken as done when their size and ETag (the MD5 of
    /// the part, as S3 gives it for unencrypted and SSE-S3 objects) match
    /// the file, so they are not sent again. Best effort: a store that
    /// cannot list, or an ETag that is not an MD5, only means those parts
    /// are sent again.
    #[allow(clippy::too_many_arguments)]
    async fn adopt_stored_parts(
        &self,
        shared: &Shared,
        path: &Path,
        entry: &mut Entry,
        upload_id: &str,
        size: u64,
        look: Look,
        save: &mut (dyn FnMut(&Entry) -> Result<(), Failure> + Send),
    ) -> Result<(), Failure> {
        let action = self
            .bucket
            .list_parts(Some(&self.credentials), &entry.key, upload_id);
        let url = action.sign(SIGNED_FOR);
        let Ok((_, body)) = self.send(shared, Method::GET, url, &[], Bytes::new()).await else {
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
            let data = read_range(path, start, part.size, look).await?;
            let (md5, sum) = {
                let owned = data.clone();
                tokio::task::spawn_blocking(move || {
                    use md5::Digest;
                    (hex::encode(md5::Md5::digest(&owned)), b64_sha256(&owned))
                })
                .await
                .map_err(|e| Failure::new(Reason::Unreadable, e.to_string()))?
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

    /// Sends part `number` of the file at `path` (read, hashed, sent); the
    /// part as the journal records it.
    #[allow(clippy::too_many_arguments)]
    async fn send_part(
        &self,
        shared: &Shared,
        path: &Path,
        key: &str,
        upload_id: &str,
        number: u16,
        size: u64,
        look: Look,
    ) -> Result<Part, Failure> {
        let start = (u64::from(number) - 1) * self.part_size;
        let len = self.part_size.min(size - start);
        let body = read_range(path, start, len, look).await?;
        let sum = hash_off_the_runtime(&body).await;
        let mut action = self
            .bucket
            .upload_part(Some(&self.credentials), key, number, upload_id);
        action.headers_mut().insert("x-amz-checksum-sha256", sum.clone());
        let url = action.sign(SIGNED_FOR);
        let (headers, _) = self
            .send(shared, Method::PUT, url, &[("x-amz-checksum-sha256", &sum)], body)
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
        match self.send(shared, Method::DELETE, url, &[], Bytes::new()).await {
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
        body: Bytes,
    ) -> Result<(http::HeaderMap, Bytes), Failure> {
        let host = &url[url::Position::BeforeHost..url::Position::AfterPort];
        let path_and_query = &url[url::Position::BeforePath..];
        // Generous for a slow uplink: 30 s plus 64 KiB/s.
        let timeout = Duration::from_secs(30) + Duration::from_millis(body.len() as u64 / 64);
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
            p.take(body.len() as u64).await;
        }
        let mut last = String::from("no path to the store");
        for path in order {
            if let Some(p) = self.per_peer.get(&path.name) {
                p.take(body.len() as u64).await;
            }
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(path.scheme.clone());
            uri.authority = path.authority.clone();
            uri.path_and_query = path_and_query.parse().ok();
            let Ok(uri) = http::Uri::from_parts(uri) else {
                return Err(Failure::new(Reason::StoreRefused, format!("bad URL {url}")));
            };
            let mut req = http::Request::new(Full::new(body.clone()));
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
            let sent = path.client().request(req);
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
                            .inc_by(body.len() as u64);
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

/// A part's checksum, computed on the blocking pool: hashing megabytes on a
/// runtime worker would hold up the call-control requests it also serves.
async fn hash_off_the_runtime(body: &Bytes) -> String {
    let owned = body.clone();
    match tokio::task::spawn_blocking(move || b64_sha256(&owned)).await {
        Ok(sum) => sum,
        Err(_) => b64_sha256(body),
    }
}

fn b64_sha256(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
}

/// `len` bytes of the file from `start`; the file must still look like `l`.
async fn read_range(path: &Path, start: u64, len: u64, l: Look) -> Result<Bytes, Failure> {
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| open_failure(path, e))?;
    let unreadable = |e: std::io::Error| Failure::new(Reason::Unreadable, format!("{}: {e}", path.display()));
    f.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(unreadable)?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Failure::new(
                Reason::Changed,
                format!("{} got shorter while it was read", path.display()),
            )
        } else {
            unreadable(e)
        }
    })?;
    unchanged(path, l)?;
    Ok(Bytes::from(buf))
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

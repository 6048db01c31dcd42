//! `[recordings]`: where finished call recordings appear, how they are known
//! to be finished, and the object store they go to.

use std::net::SocketAddr;

use toml::Spanned;

use super::{Diag, duration_or};
use crate::config::values::{parse_size, resolve};
use crate::config::{AfterUpload, Complete, Recordings, Store, raw};
use crate::tls;

pub(super) fn validate(d: &mut Diag<'_>, raw: &Spanned<raw::Recordings>) -> Option<Recordings> {
    let r = raw.get_ref();
    let mut ok = true;
    let mut fail = |d: &mut Diag<'_>, at: &dyn Fn(&mut Diag<'_>)| {
        at(d);
        ok = false;
    };
    let dir = resolve(d.file(), r.dir.get_ref());
    if r.dir.get_ref().is_empty() {
        fail(d, &|d| d.span(&r.dir, "recordings.dir: must not be empty"));
    }
    let mut patterns = Vec::new();
    match &r.patterns {
        None => {
            for p in Recordings::DEFAULT_PATTERNS {
                patterns.extend(glob::Pattern::new(p).ok());
            }
        }
        Some(list) => {
            if list.is_empty() {
                fail(d, &|d| {
                    d.span(
                        raw,
                        "recordings.patterns: list at least one pattern, e.g. \"*.wav\"",
                    )
                });
            }
            for p in list {
                match glob::Pattern::new(p.get_ref()) {
                    Ok(g) if !p.get_ref().contains('/') => patterns.push(g),
                    Ok(_) => fail(d, &|d| {
                        d.span(
                            p,
                            "recordings.patterns: a pattern matches file names, without '/'",
                        )
                    }),
                    Err(e) => fail(d, &|d| {
                        d.span(p, format!("recordings.patterns: `{}`: {e}", p.get_ref()))
                    }),
                }
            }
        }
    }
    let settle = duration_or(d, "recordings.settle", &r.settle, Recordings::DEFAULT_SETTLE);
    let complete = match r.complete.as_ref().map(|c| c.get_ref().as_str()) {
        None | Some("renamed") => Complete::Renamed,
        Some("settled") => Complete::Settled(settle),
        Some(other) => {
            let at = r.complete.as_ref();
            fail(d, &|d| {
                if let Some(at) = at {
                    d.span(
                        at,
                        format!("recordings.complete: `{other}` is not \"renamed\" or \"settled\""),
                    );
                }
            });
            Complete::Renamed
        }
    };
    let call_id = match &r.call_id {
        None => regex::Regex::new(r"^(?P<call_id>[^.]+)").ok(),
        Some(v) => match regex::Regex::new(v.get_ref()) {
            Ok(re) => Some(re),
            Err(e) => {
                fail(d, &|d| {
                    d.span(v, format!("recordings.call_id: not a regular expression: {e}"))
                });
                None
            }
        },
    };
    let journal = r.journal.as_ref().map_or_else(
        || dir.join(Recordings::JOURNAL),
        |j| resolve(d.file(), j.get_ref()),
    );
    let after_upload = match r.after_upload.as_ref().map(|a| a.get_ref().as_str()) {
        None | Some("delete") => AfterUpload::Delete,
        Some("keep") => AfterUpload::Keep,
        Some("move") => match &r.move_to {
            Some(m) => AfterUpload::Move(resolve(d.file(), m.get_ref())),
            None => {
                let at = r.after_upload.as_ref();
                fail(d, &|d| {
                    if let Some(at) = at {
                        d.span(at, "recordings.after_upload = \"move\" needs recordings.move_to");
                    }
                });
                AfterUpload::Keep
            }
        },
        Some(other) => {
            let at = r.after_upload.as_ref();
            fail(d, &|d| {
                if let Some(at) = at {
                    d.span(
                        at,
                        format!("recordings.after_upload: `{other}` is not \"delete\", \"keep\" or \"move\""),
                    );
                }
            });
            AfterUpload::Keep
        }
    };
    let part_size = match &r.part_size {
        None => Recordings::DEFAULT_PART_SIZE,
        Some(v) => match parse_size(v.get_ref()) {
            Ok(n) if (Recordings::MIN_PART_SIZE..=5 << 30).contains(&n) => n,
            Ok(_) => {
                fail(d, &|d| {
                    d.span(
                        v,
                        "recordings.part_size: must be from 5MiB (S3's minimum) to 5GiB",
                    )
                });
                Recordings::DEFAULT_PART_SIZE
            }
            Err(e) => {
                fail(d, &|d| d.span(v, format!("recordings.part_size: {e}")));
                Recordings::DEFAULT_PART_SIZE
            }
        },
    };
    let parallel_parts = match &r.parallel_parts {
        None => Recordings::DEFAULT_PARALLEL_PARTS,
        Some(v) => match u16::try_from(*v.get_ref()) {
            Ok(n) if (1..=16).contains(&n) => n,
            _ => {
                fail(d, &|d| {
                    d.span(v, "recordings.parallel_parts: must be from 1 to 16")
                });
                Recordings::DEFAULT_PARALLEL_PARTS
            }
        },
    };
    let scan_interval = duration_or(
        d,
        "recordings.scan_interval",
        &r.scan_interval,
        Recordings::DEFAULT_SCAN_INTERVAL,
    );
    let mut rate = |key: &str, v: &Option<Spanned<toml::Value>>| -> Option<u64> {
        let v = v.as_ref()?;
        match parse_size(v.get_ref()) {
            Ok(n) if n >= 64 * 1024 => Some(n),
            Ok(_) => {
                d.span(v, format!("{key}: at least 64KiB (bytes per second)"));
                ok = false;
                None
            }
            Err(e) => {
                d.span(v, format!("{key}: {e} (bytes per second)"));
                ok = false;
                None
            }
        }
    };
    let max_rate = rate("recordings.max_rate", &r.max_rate);
    let max_rate_per_peer = rate("recordings.max_rate_per_peer", &r.max_rate_per_peer);
    let store = store(d, &r.store);
    if !ok {
        return None;
    }
    Some(Recordings {
        dir,
        patterns,
        complete,
        call_id: call_id?,
        journal,
        after_upload,
        part_size,
        parallel_parts,
        scan_interval,
        max_rate,
        max_rate_per_peer,
        store: store?,
    })
}

/// `[recordings.store]`.
fn store(d: &mut Diag<'_>, raw: &Spanned<raw::Store>) -> Option<Store> {
    let s = raw.get_ref();
    let mut ok = true;
    let endpoint = match url::Url::parse(s.endpoint.get_ref()) {
        Ok(u)
            if matches!(u.scheme(), "https" | "http")
                && u.host_str().is_some()
                && u.path() == "/"
                && u.query().is_none() =>
        {
            Some(u)
        }
        Ok(_) => {
            d.span(&s.endpoint, "recordings.store.endpoint: must be https://host[:port] (or http:// in a lab), without a path");
            None
        }
        Err(e) => {
            d.span(&s.endpoint, format!("recordings.store.endpoint: not a URL: {e}"));
            None
        }
    };
    let bucket = s.bucket.get_ref();
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        d.span(&s.bucket, "recordings.store.bucket: must be an S3 bucket name (3 to 63 lower-case letters, digits, '-', '.')");
        ok = false;
    }
    let mut addresses = Vec::new();
    for a in s.addresses.iter().flatten() {
        match a.get_ref().parse::<SocketAddr>() {
            Ok(sa) => addresses.push(sa),
            Err(_) => {
                d.span(
                    a,
                    format!(
                        "recordings.store.addresses: `{}` is not an IP:port socket address",
                        a.get_ref()
                    ),
                );
                ok = false;
            }
        }
    }
    let key_template = s
        .key_template
        .as_ref()
        .map_or(Recordings::DEFAULT_KEY_TEMPLATE.to_owned(), |k| {
            k.get_ref().clone()
        });
    if let Err(e) = check_template(&key_template) {
        if let Some(k) = &s.key_template {
            d.span(k, format!("recordings.store.key_template: {e}"));
        }
        ok = false;
    }
    let credentials_file = resolve(d.file(), s.credentials_file.get_ref());
    let profile = s.profile.as_ref().map_or("default", |p| p.get_ref().as_str());
    let keys = match std::fs::read_to_string(&credentials_file) {
        Ok(text) => match credentials(&text, profile) {
            Ok(k) => Some(k),
            Err(e) => {
                d.span(
                    &s.credentials_file,
                    format!(
                        "recordings.store.credentials_file: {}: {e}",
                        credentials_file.display()
                    ),
                );
                None
            }
        },
        Err(e) => {
            d.span(
                &s.credentials_file,
                format!(
                    "recordings.store.credentials_file: cannot read {}: {e}",
                    credentials_file.display()
                ),
            );
            None
        }
    };
    let ca = s.ca.as_ref().map(|c| resolve(d.file(), c.get_ref()));
    let mut ca_certs = Vec::new();
    if let (Some(c), Some(p)) = (&s.ca, &ca) {
        match tls::load_certs(p) {
            Ok(certs) => ca_certs = certs,
            Err(e) => {
                d.span(c, format!("recordings.store.ca: {e}"));
                ok = false;
            }
        }
    }
    let endpoint = endpoint?;
    let (access_key, secret_key) = keys?;
    if !ok {
        return None;
    }
    let tls = endpoint.scheme() == "https";
    let path_style = s.path_style.unwrap_or(true);
    let endpoint_host = endpoint
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_owned();
    Some(Store {
        // Virtual-host style: the bucket is part of the host name dialled,
        // named in TLS and signed.
        host: if path_style {
            endpoint_host
        } else {
            format!("{bucket}.{endpoint_host}")
        },
        port: endpoint
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 }),
        tls,
        endpoint,
        addresses,
        bucket: bucket.clone(),
        region: s
            .region
            .as_ref()
            .map_or("us-east-1".to_owned(), |r| r.get_ref().clone()),
        path_style,
        credentials_file,
        access_key,
        secret_key,
        key_template,
        ca,
        ca_certs,
    })
}

/// A key template may use `{pop}`, `{date}`, `{call_id}` and `{file}`, and
/// must use `{file}` or `{call_id}` (else every recording gets one key).
pub fn check_template(t: &str) -> Result<(), String> {
    let mut rest = t;
    let mut names = Vec::new();
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err("an unclosed `{`".to_owned());
        };
        let name = &rest[open + 1..open + close];
        if !matches!(name, "pop" | "date" | "call_id" | "file") {
            return Err(format!(
                "unknown field `{{{name}}}`; use {{pop}}, {{date}}, {{call_id}}, {{file}}"
            ));
        }
        names.push(name);
        rest = &rest[open + close + 1..];
    }
    if !names.contains(&"file") && !names.contains(&"call_id") {
        return Err("must contain {file} or {call_id}, or every recording gets the same key".to_owned());
    }
    if t.is_empty() || t.starts_with('/') {
        return Err("must not be empty or start with '/'".to_owned());
    }
    Ok(())
}

/// The access and secret key of `profile` in an AWS shared credentials file
/// (`[default]` / `aws_access_key_id = …` / `aws_secret_access_key = …`).
pub fn credentials(text: &str, profile: &str) -> Result<(String, String), String> {
    let mut section = String::new();
    let (mut key, mut secret) = (None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
            continue;
        }
        if section != profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "aws_access_key_id" => key = Some(v.trim().to_owned()),
                "aws_secret_access_key" => secret = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    match (key, secret) {
        (Some(k), Some(s)) if !k.is_empty() && !s.is_empty() => Ok((k, s)),
        _ => Err(format!(
            "no aws_access_key_id and aws_secret_access_key in profile [{profile}]"
        )),
    }
}

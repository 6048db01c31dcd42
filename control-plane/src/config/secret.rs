//! The database password: read from `database_password_file` (or a systemd
//! credential), kept in a [`Secret`] that never prints, and put into the
//! connection URL only where the driver takes it. Also the URL redaction
//! every message about the database uses.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// A value that must never reach a log, an error message or `{:?}`: its
/// `Debug` prints `***` and it has no `Display`. [`Secret::expose`] is the
/// one way to read it, at the place that hands it to the driver.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub(crate) fn new(value: String) -> Self {
        Self(value)
    }

    /// The value, for the database driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// `database_url` as written in cp.toml. Its `Debug` hides the password, so
/// a `{:?}` of the config cannot print one.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(pub Spanned<String>);

impl DatabaseUrl {
    /// The URL as written (it may hold a password: not for messages; use
    /// [`redact`]).
    pub fn as_str(&self) -> &str {
        self.0.get_ref()
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({:?})", redact(self.as_str()))
    }
}

/// The URL without its password, for messages: `postgres://u:***@h/db`.
/// Errs on the side of hiding: anything between `://` and the last `@`
/// after a `:` is replaced, whether or not it parses as a URL.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Whether `url` carries a password itself.
pub fn has_password(url: &str) -> bool {
    match url::Url::parse(url) {
        Ok(u) => u.password().is_some(),
        // Not a URL the driver would take either; judge by its shape.
        Err(_) => redact(url) != url,
    }
}

/// `url` with `password` as its password, percent-encoded (the Postgres
/// driver decodes it). `None` when `url` is not a URL with a host, which
/// validation has refused before.
pub fn with_password(url: &str, password: &Secret) -> Option<Secret> {
    let mut u = url::Url::parse(url).ok()?;
    // Every byte but the unreserved ones is encoded, `%` too: `Url` would
    // take a `%` in the input for the start of an escape and keep it.
    let encoded: String = password
        .expose()
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    u.set_password(Some(&encoded)).ok()?;
    Some(Secret(u.to_string()))
}

/// `%XX` escapes decoded (invalid ones kept as they are), as sqlx reads an
/// SQLite URL's path.
pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where a relative `database_password_file` is: in the service's
/// credentials directory when systemd provides one (`LoadCredential=`
/// sets `$CREDENTIALS_DIRECTORY`), else beside cp.toml like every other
/// relative path.
pub(super) fn resolve_password_file(path: &Path, base: &Path, credentials: Option<&Path>) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    match credentials {
        Some(dir) => dir.join(path),
        None => base.join(path),
    }
}

/// Reads a password file: one line; a final line ending is not part of the
/// password. The error names the file, never its contents.
pub(super) fn read_password_file(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if value.contains(['\n', '\r']) {
        return Err(format!(
            "{} holds more than one line; the password is the whole of one line",
            path.display()
        ));
    }
    Ok(Secret(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://detour:secret@127.0.0.1:5432/detour"),
            "postgres://detour:***@127.0.0.1:5432/detour"
        );
        assert_eq!(redact("postgres://u:p@ss:w@rd@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://detour@h/db"), "postgres://detour@h/db");
        assert_eq!(redact("sqlite:///x?mode=rwc"), "sqlite:///x?mode=rwc");
    }

    #[test]
    fn knows_whether_a_url_has_a_password() {
        assert!(has_password("postgres://u:p@h/db"));
        assert!(has_password("postgres://:p@h/db"));
        assert!(!has_password("postgres://u@h/db"));
        assert!(!has_password("postgres://h:5432/db?options=a@b"));
        assert!(!has_password("sqlite:///x?mode=rwc"));
    }

    #[test]
    fn puts_the_password_into_the_url_encoded() {
        let pw = Secret("p@ss:w/rd %#?".to_owned());
        let url = with_password("postgres://detour@127.0.0.1:5432/detour?sslmode=disable", &pw).unwrap();
        assert_eq!(
            url.expose(),
            "postgres://detour:p%40ss%3Aw%2Frd%20%25%23%3F@127.0.0.1:5432/detour?sslmode=disable"
        );
        // Without a user name the driver's default user applies.
        let url = with_password("postgres://h/db", &pw).unwrap();
        assert!(
            url.expose().starts_with("postgres://:p%40ss"),
            "{:?}",
            url.expose()
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret("hunter2".to_owned());
        assert_eq!(format!("{s:?}"), "Secret(***)");
        #[derive(Debug, Deserialize)]
        struct T {
            #[allow(dead_code)]
            u: DatabaseUrl,
        }
        let t: T = toml::from_str("u = \"postgres://a:hunter2@h/d\"").unwrap();
        assert_eq!(format!("{t:?}"), "T { u: DatabaseUrl(\"postgres://a:***@h/d\") }");
    }

    #[test]
    fn reads_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        for (text, want) in [
            ("s3cret\n", Ok("s3cret")),
            ("s3cret\r\n", Ok("s3cret")),
            ("s3cret", Ok("s3cret")),
            (" spaced out \n", Ok(" spaced out ")),
            ("\n", Err("is empty")),
            ("a\nb\n", Err("more than one line")),
        ] {
            std::fs::write(&f, text).unwrap();
            match (read_password_file(&f), want) {
                (Ok(s), Ok(w)) => assert_eq!(s.expose(), w),
                (Err(e), Err(w)) => {
                    assert!(e.contains(w), "{e}");
                    assert!(!e.contains("s3cret"));
                }
                (got, want) => panic!("{text:?}: {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn relative_files_are_found_among_the_credentials() {
        let base = Path::new("/etc/detour-cp");
        let creds = Path::new("/run/credentials/detour-control-plane.service");
        assert_eq!(
            resolve_password_file(Path::new("db-password"), base, Some(creds)),
            creds.join("db-password")
        );
        assert_eq!(
            resolve_password_file(Path::new("db-password"), base, None),
            base.join("db-password")
        );
        assert_eq!(
            resolve_password_file(Path::new("/srv/pw"), base, Some(creds)),
            Path::new("/srv/pw")
        );
    }
}

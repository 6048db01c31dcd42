//! Config diagnostics, the one type both binaries print: a problem's file,
//! its place in the text and what is wrong, as `file:line:col: message`
//! (the form `haproxy -c` and `nginx -t` use, which editors can jump to).
//!
//! Lines and columns are 1-based, and a column counts characters, not bytes:
//! it is the column an editor shows, also after a multi-byte character such
//! as `ū` earlier on the line.

use std::fmt;
use std::path::PathBuf;

/// One problem in a config file, with its place when it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, as the operator named it.
    pub file: PathBuf,
    /// 1-based line and column (in characters) of the problem; `None` for a
    /// problem that has no place in the text (a setting left at a bad
    /// default, say).
    pub position: Option<(usize, usize)>,
    /// What is wrong, in words a person can act on.
    pub message: String,
}

impl ConfigError {
    /// A problem at byte `offset` of `text`, the contents of `file`.
    pub fn at(file: impl Into<PathBuf>, text: &str, offset: usize, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            position: Some(line_col(text, offset)),
            message: message.into(),
        }
    }

    /// A problem without a place in the text.
    pub fn in_file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            position: None,
            message: message.into(),
        }
    }
}

/// Control characters in the file name and the message (which quotes values
/// from the file) are escaped: a crafted value cannot reach the operator's
/// terminal raw.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display().to_string();
        let file = crate::printable(&file);
        let message = crate::printable(&self.message);
        match self.position {
            Some((line, col)) => write!(f, "{file}:{line}:{col}: {message}"),
            None => write!(f, "{file}: {message}"),
        }
    }
}

/// Every problem found in one load, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// 1-based line and column of byte `offset` in `text`, the column counted in
/// characters. An offset past the end is the end; one inside a multi-byte
/// character is that character.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = text.floor_char_boundary(offset.min(text.len()));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_count_characters_not_bytes() {
        // `ū` is two bytes: the second `=` of line 2 is its 20th character
        // and its 21st byte.
        let text = "pop = \"blr\"\ncity = \"Bengalūru\" = 1\n";
        let offset = text.rfind('=').unwrap();
        assert_eq!(line_col(text, offset), (2, 20));
        // The start of the text, a line start, and past the end.
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, text.find("city").unwrap()), (2, 1));
        assert_eq!(line_col(text, text.len() + 10), (3, 1));
        // Inside `ū` is at `ū`.
        let inside = text.find('ū').unwrap() + 1;
        assert_eq!(line_col(text, inside), (2, 15));
    }

    #[test]
    fn display_says_file_line_column_and_escapes_control_characters() {
        let text = "a = 1\nb = \"x\u{7}\"\n";
        let e = ConfigError::at("cp.toml", text, 10, "b: `x\u{7}` is not allowed");
        assert_eq!(e.to_string(), "cp.toml:2:5: b: `x\\u{7}` is not allowed");
        let e = ConfigError::in_file("dir\u{1b}[31m/cp.toml", "cannot read");
        assert_eq!(e.to_string(), "dir\\u{1b}[31m/cp.toml: cannot read");
        let both = ConfigErrors(vec![
            ConfigError::at("a.toml", "", 0, "one"),
            ConfigError::in_file("b.toml", "two"),
        ]);
        assert_eq!(both.to_string(), "a.toml:1:1: one\nb.toml: two");
    }
}

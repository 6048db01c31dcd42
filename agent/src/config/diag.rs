//! Collecting problems against one file's text: a [`Diag`] turns a value's
//! span into the shared [`ConfigError`] (`file:line:col: message`), so the
//! validators only say what is wrong and with which value.

use std::path::Path;

use toml::Spanned;

use super::ConfigError;

/// Collects problems against one file's text into a list shared by every
/// file of one load.
pub(super) struct Diag<'a> {
    file: &'a Path,
    text: &'a str,
    errors: &'a mut Vec<ConfigError>,
}

impl<'a> Diag<'a> {
    pub(super) fn new(file: &'a Path, text: &'a str, errors: &'a mut Vec<ConfigError>) -> Self {
        Self { file, text, errors }
    }

    /// The same list, for problems in another file (the peers file).
    pub(super) fn other<'b>(&'b mut self, file: &'b Path, text: &'b str) -> Diag<'b> {
        Diag {
            file,
            text,
            errors: &mut *self.errors,
        }
    }

    /// The file problems are reported against; relative paths in it are
    /// resolved against its directory.
    pub(super) fn file(&self) -> &'a Path {
        self.file
    }

    /// A problem at byte `offset` of the text.
    pub(super) fn at(&mut self, offset: usize, message: impl Into<String>) {
        self.errors
            .push(ConfigError::at(self.file, self.text, offset, message));
    }

    /// A problem with `value`, reported where it starts.
    pub(super) fn span<T>(&mut self, value: &Spanned<T>, message: impl Into<String>) {
        self.at(value.span().start, message);
    }

    /// The text as `T`; a syntax error or a field `T` does not have is
    /// reported (at its place) and gives `None`.
    pub(super) fn parse<T: serde::de::DeserializeOwned>(&mut self) -> Option<T> {
        match toml::from_str::<T>(self.text) {
            Ok(v) => Some(v),
            Err(e) => {
                let offset = e.span().map_or(0, |s| s.start);
                self.at(offset, e.message().trim().to_owned());
                None
            }
        }
    }
}

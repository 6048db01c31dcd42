//! How results leave the lab: Markdown tables, the machine line every
//! measurement starts with, and the `<!-- NAME:begin -->…<!-- NAME:end -->`
//! blocks of docs/benchmarks.md that each benchmark rewrites.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

/// A Markdown table, built a row at a time.
pub struct Table {
    text: String,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Table {
        let mut t = Table { text: String::new() };
        t.row(headers);
        t.text.push('|');
        for _ in headers {
            t.text.push_str("---|");
        }
        t.text.push('\n');
        t
    }

    /// Appends a row; an empty cell is written as `| |`.
    pub fn row<S: AsRef<str>>(&mut self, cells: &[S]) {
        self.text.push('|');
        for c in cells {
            let c = c.as_ref();
            if c.is_empty() {
                self.text.push_str(" |");
            } else {
                let _ = write!(self.text, " {c} |");
            }
        }
        self.text.push('\n');
    }

    /// The table's Markdown, each line ending in a newline.
    pub fn finish(self) -> String {
        self.text
    }
}

/// Milliseconds with one decimal, as the tables show latencies: `12.3`.
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Microseconds, for arithmetic before formatting.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`
/// in `doc` (appending the block when the markers are missing).
pub fn write_block(doc: &Path, name: &str, content: &str) -> anyhow::Result<()> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let text = std::fs::read_to_string(doc).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
    let new = replace_block(&text, &begin, &end, content);
    std::fs::write(doc, new).with_context(|| format!("writing {}", doc.display()))
}

fn replace_block(text: &str, begin: &str, end: &str, content: &str) -> String {
    let block = format!("{begin}\n{}\n{end}", content.trim_end());
    match (text.find(begin), text.find(end)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &text[..b], block, &text[e + end.len()..]),
        _ => format!("{}\n{}\n", text.trim_end(), block),
    }
}

/// What a measurement ran on: the date, the cores and CPU model, and how
/// busy the machine was, ending in "Linux loopback," for the sentence that
/// follows.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    // Other work on the machine moves these numbers; say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!("{date} on {cpus} cores ({model}, load average {load} at the start), Linux loopback,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_markdown_and_an_empty_cell_stays_narrow() {
        let mut t = Table::new(&["", "before", "after"]);
        t.row(&["RSS", "1.0", "2.0"]);
        assert_eq!(
            t.finish(),
            "| | before | after |\n|---|---|---|\n| RSS | 1.0 | 2.0 |\n"
        );
    }

    #[test]
    fn a_block_is_replaced_in_place_or_appended() {
        let (b, e) = ("<!-- x:begin -->", "<!-- x:end -->");
        let doc = "# Benchmarks\n\n<!-- x:begin -->\nold\n<!-- x:end -->\n\ntail\n";
        assert_eq!(
            replace_block(doc, b, e, "new\n\n"),
            "# Benchmarks\n\n<!-- x:begin -->\nnew\n<!-- x:end -->\n\ntail\n"
        );
        assert_eq!(
            replace_block("# Benchmarks\n", b, e, "new"),
            "# Benchmarks\n<!-- x:begin -->\nnew\n<!-- x:end -->\n"
        );
    }
}

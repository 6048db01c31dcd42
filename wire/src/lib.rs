//! What the agent and the control plane share, so it has one home: the wire
//! types that cross between Detour processes (RFC 9457 problem details, the
//! header names every part agrees on, the agent's fleet report), [`accept`],
//! the accept loop and connection cap of every listener, the [`conn`] guard
//! both HTTP servers put under hyper, and [`diag`], the config
//! diagnostics both binaries print (`file:line:col: message`, columns in
//! characters).

pub mod accept;
pub mod conn;
pub mod diag;

use serde::{Deserialize, Serialize};

/// Text from outside (a config value, a header) made safe to print on a
/// terminal or in a log line: control characters (C0 including NUL and
/// newlines, DEL, C1) are shown as `\u{..}` escapes, so a crafted value
/// cannot ring the bell, recolour the terminal or forge a log line.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Media type of every error body Detour produces.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Header names shared by the agent, the control plane and the lab.
pub mod headers {
    /// `emergency` or `normal`; emergency requests are hedged and never shed.
    pub const PRIORITY: &str = "x-detour-priority";
    /// Response header naming the path that carried the request: `direct` or `via:<peer>`.
    pub const PATH: &str = "x-detour-path";
    /// Request header that pins one request to a path (tests, maintenance).
    pub const PIN: &str = "x-detour-pin";
    /// Identical on every attempt of one request; the control plane deduplicates on it.
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    /// Correlates logs across the call handler, agents and control plane.
    pub const REQUEST_ID: &str = "x-request-id";
    /// On a `202 Accepted` from the agent: the request was journalled for
    /// later delivery; the value is its receipt.
    pub const DEFERRED: &str = "x-detour-deferred";
}

/// An RFC 9457 problem details object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// A URI reference naming the problem type; `about:blank` when only the status matters.
    #[serde(rename = "type", default = "about_blank")]
    pub kind: String,
    /// A short, human-readable summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this particular request, in words a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Extension members (for example `attempts`, `field`, `request_id`).
    #[serde(flatten)]
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

fn about_blank() -> String {
    "about:blank".to_owned()
}

impl Problem {
    /// A problem with the given status, title and detail.
    pub fn new(status: u16, title: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            kind: about_blank(),
            title: title.into(),
            status,
            detail: Some(detail.into()),
            extensions: serde_json::Map::new(),
        }
    }

    /// Sets the `type` URI.
    pub fn with_type(mut self, kind: impl Into<String>) -> Self {
        self.kind = kind.into();
        self
    }

    /// Adds an extension member.
    pub fn with(mut self, key: &str, value: impl Serialize) -> Self {
        let value = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        self.extensions.insert(key.to_owned(), value);
        self
    }

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a struct of strings, numbers and JSON values cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// State of one path as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum PathState {
    /// Answering probes and requests well.
    Up,
    /// Lossy or slow: used only when no path is up.
    Degraded,
    /// Failing: not used while anything else works.
    Down,
}

impl PathState {
    /// The lowercase name used in JSON, logs and the status table.
    pub fn as_str(self) -> &'static str {
        match self {
            PathState::Up => "up",
            PathState::Degraded => "degraded",
            PathState::Down => "down",
        }
    }
}

/// One path in an agent's `/status` and in its report to the control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PathReport {
    /// `direct` or `via:<peer>`; with `@<endpoint>` when the control plane
    /// has several endpoints.
    pub path: String,
    /// The control-plane endpoint the path goes to (its name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub state: PathState,
    /// Smoothed round-trip time of probes and requests, in seconds.
    pub rtt_seconds: Option<f64>,
    /// Recent high percentile of round-trip time, in seconds.
    pub rtt_p95_seconds: Option<f64>,
    /// Share of recent exchanges that failed (0.0 to 1.0).
    pub loss_ratio: f64,
    /// Lower is better; used to choose among paths.
    pub score: f64,
    /// Whether new requests go to this path first.
    pub active: bool,
    /// Consecutive failures right now.
    pub consecutive_failures: u32,
    /// Why the path is in its state, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What `POST /v1/agents/{pop}/report` carries and `/status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentReport {
    pub pop: String,
    pub version: String,
    /// The path new requests use first.
    pub active_path: Option<String>,
    pub paths: Vec<PathReport>,
    /// The last configuration reload error, if the running config is older than the files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    /// The recordings backlog, when the agent carries recordings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recordings: Option<RecordingsReport>,
    /// Deferred requests waiting, when some requests are deferrable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred: Option<DeferredReport>,
    /// The most recent changes of the active path, oldest first (at most
    /// [`AgentReport::MAX_SWITCHES`]). Every report repeats them, so one
    /// lost report loses none; the control plane keeps each once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub switches: Vec<SwitchReport>,
    /// Tunnels the relay refused since the agent started, by reason (the
    /// `reason` label of `detour_relay_rejected_total`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub relay_rejected: std::collections::BTreeMap<String, u64>,
}

impl AgentReport {
    /// The switches a report carries at most.
    pub const MAX_SWITCHES: usize = 16;
}

/// One change of an agent's active path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SwitchReport {
    /// When, in milliseconds since the Unix epoch (the agent's clock).
    pub at_ms: i64,
    /// The path left (`none` when there was none).
    pub from: String,
    /// The path taken (`none` when no path is usable).
    pub to: String,
    /// Why, for people: e.g. `direct down: 3 consecutive failures (timeout)`.
    pub reason: String,
}

/// The deferred-delivery journal, as `/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeferredReport {
    pub pending: u64,
    pub pending_bytes: u64,
    pub oldest_age_s: f64,
    pub journal: String,
}

/// Recordings not yet stored, recorded and done with, as `/status` and
/// `detour-agent status` show them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RecordingsReport {
    pub pending: u64,
    pub pending_bytes: u64,
    pub oldest_pending_seconds: f64,
    /// Stored since the agent started.
    pub uploaded: u64,
    /// Each pending file whose last step failed, with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failing: Vec<RecordingFailure>,
}

/// A pending recording and why its last step failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RecordingFailure {
    pub file: String,
    /// `detour_recordings_failed_total`'s reason label.
    pub reason: String,
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_every_control_character() {
        assert_eq!(printable("blr"), "blr");
        assert_eq!(
            printable("a\u{7}b\0c\u{1b}[31md\ne\u{9b}"),
            "a\\u{7}b\\u{0}c\\u{1b}[31md\\u{a}e\\u{9b}"
        );
        assert!(!printable("\u{7f}").chars().any(char::is_control));
    }

    #[test]
    fn problem_round_trips_with_extensions() {
        let p =
            Problem::new(503, "No path delivered", "all 2 attempts failed").with("attempts", vec!["direct"]);
        let json = p.to_json();
        let back: Problem = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, p);
        assert!(
            String::from_utf8(json)
                .unwrap()
                .contains("\"type\":\"about:blank\"")
        );
    }
}

//! `detour-agent status`: fetches `/status` from a running agent's admin
//! listener (hyper's client) and prints the path table (comfy-table).

use std::time::Duration;

use comfy_table::{CellAlignment, ColumnConstraint, Table, Width, presets};
use detour_wire::AgentReport;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Time allowed to connect to the admin listener and for its whole answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// `/status` of an agent with a hundred peers is about 40 KiB.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Fetches the report over plain HTTP/1.1 (the admin listener is local).
/// Blocking: it runs its own small runtime.
pub fn fetch(admin: &str) -> Result<AgentReport, String> {
    let addr: std::net::SocketAddr = admin
        .parse()
        .map_err(|_| format!("`{admin}` is not an IP:port address"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(get(addr))
}

async fn get(addr: std::net::SocketAddr) -> Result<AgentReport, String> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build(http);
    let uri: http::Uri = format!("http://{addr}/status")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let exchange = async {
        let resp = client.get(uri).await.map_err(|e| {
            format!(
                "cannot reach the agent's admin listener at {addr}: {}",
                source_chain(&e)
            )
        })?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading /status: {e}"))?
            .to_bytes();
        if status != http::StatusCode::OK {
            return Err(format!("admin listener answered: {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("unexpected /status body: {e}"))
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            format!("the agent's admin listener at {addr} did not answer within {ANSWER_TIMEOUT:?}")
        })?
}

/// An error with its causes, `a: b: c` (hyper's own message is only the outermost).
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn ms(s: Option<f64>) -> String {
    s.map_or_else(|| "-".to_owned(), |v| format!("{:.1}ms", v * 1000.0))
}

/// The table a network engineer reads at 3 a.m.: one line per path, the
/// active one marked `*`; columns widen to fit the longest path name.
pub fn table(r: &AgentReport) -> String {
    let mut out = format!(
        "pop {}  version {}  active {}\n",
        detour_wire::printable(&r.pop),
        r.version,
        r.active_path.as_deref().unwrap_or("none")
    );
    if let Some(e) = &r.config_error {
        out.push_str(&format!(
            "config reload FAILED (running on the previous config):\n  {}\n",
            e.replace('\n', "\n  ")
        ));
    }
    if let Some(d) = &r.deferred {
        out.push_str(&format!(
            "deferred: {} waiting ({:.1} KiB), oldest {:.0}s, journal {}\n",
            d.pending,
            d.pending_bytes as f64 / 1024.0,
            d.oldest_age_s,
            detour_wire::printable(&d.journal)
        ));
    }
    if let Some(rec) = &r.recordings {
        out.push_str(&format!(
            "recordings: {} pending ({:.1} MiB), oldest {:.0}s, {} uploaded since start\n",
            rec.pending,
            rec.pending_bytes as f64 / (1024.0 * 1024.0),
            rec.oldest_pending_seconds,
            rec.uploaded
        ));
        for f in &rec.failing {
            out.push_str(&format!(
                "  {}: {}: {}\n",
                detour_wire::printable(&f.file),
                f.reason,
                detour_wire::printable(&f.detail)
            ));
        }
    }
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header(["", "PATH", "STATE", "RTT", "P95", "LOSS", "SCORE", "REASON"]);
    for p in &r.paths {
        t.add_row([
            if p.active { "*" } else { "" }.to_owned(),
            detour_wire::printable(&p.path).into_owned(),
            p.state.as_str().to_owned(),
            ms(p.rtt_seconds),
            ms(p.rtt_p95_seconds),
            format!("{:.1}%", p.loss_ratio * 100.0),
            format!("{:.1}", p.score),
            detour_wire::printable(p.reason.as_deref().unwrap_or("")).into_owned(),
        ]);
    }
    for (i, col) in t.column_iter_mut().enumerate() {
        // `* direct`: the marker column is one wide with one space after it.
        col.set_padding(if i == 0 { (0, 1) } else { (0, 2) });
        if (3..=6).contains(&i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    if let Some(marker) = t.column_mut(0) {
        marker.set_constraint(ColumnConstraint::Absolute(Width::Fixed(1)));
    }
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use detour_wire::{PathReport, PathState};

    fn path(name: &str, active: bool) -> PathReport {
        PathReport {
            path: name.to_owned(),
            endpoint: None,
            state: PathState::Up,
            rtt_seconds: Some(0.0012),
            rtt_p95_seconds: Some(0.0025),
            loss_ratio: 0.0,
            score: 1.2,
            active,
            consecutive_failures: 0,
            reason: Some("probe ok".to_owned()),
        }
    }

    #[test]
    fn a_long_pop_name_keeps_the_columns_aligned() {
        let long = format!("via:{}", "a".repeat(40));
        let report = AgentReport {
            pop: "blr".into(),
            version: "0.1.0".into(),
            active_path: Some("direct".into()),
            paths: vec![path("direct", true), path(&long, false)],
            config_error: None,
            recordings: None,
            deferred: None,
        };
        let text = table(&report);
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert!(lines[1].starts_with("* direct"), "{text}");
        // STATE starts in the same column on every line, header included.
        let col = lines[0].find("STATE").unwrap();
        for l in &lines[1..] {
            assert_eq!(&l[col..col + 2], "up", "{text}");
        }
        assert!(lines[2].contains(&long), "{text}");
    }

    #[test]
    fn the_recordings_backlog_and_its_failures_are_shown_escaped() {
        let report = AgentReport {
            pop: "blr".into(),
            version: "0.1.0".into(),
            active_path: Some("direct".into()),
            paths: vec![path("direct", true)],
            config_error: None,
            recordings: Some(detour_wire::RecordingsReport {
                pending: 2,
                pending_bytes: 3 * 1024 * 1024,
                oldest_pending_seconds: 42.0,
                uploaded: 7,
                failing: vec![detour_wire::RecordingFailure {
                    file: "a\u{1b}[31m.wav".into(),
                    reason: "store_refused".into(),
                    detail: "404 NoSuchBucket".into(),
                }],
            }),
            deferred: Some(detour_wire::DeferredReport {
                pending: 12,
                pending_bytes: 3 * 1024,
                oldest_age_s: 61.0,
                journal: "/var/lib/detour-agent/deferred.journal".into(),
            }),
        };
        let text = table(&report);
        assert!(
            text.contains(
                "deferred: 12 waiting (3.0 KiB), oldest 61s, journal /var/lib/detour-agent/deferred.journal"
            ),
            "{text}"
        );
        assert!(
            text.contains("recordings: 2 pending (3.0 MiB), oldest 42s, 7 uploaded since start"),
            "{text}"
        );
        assert!(
            text.contains("  a\\u{1b}[31m.wav: store_refused: 404 NoSuchBucket"),
            "{text}"
        );
    }
}

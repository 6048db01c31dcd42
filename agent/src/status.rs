//! `detour-agent status`: fetches `/status` from a running agent's admin
//! listener (hyper's client) and prints the path table (comfy-table), or
//! the JSON; with `--watch`, again every second, redrawn in place.

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

/// How often `--watch` asks again.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Fetches the report over plain HTTP/1.1 (the admin listener is local).
/// Blocking: it runs its own small runtime.
pub fn fetch(admin: &str) -> Result<AgentReport, String> {
    let addr = parse_admin(admin)?;
    runtime()?.block_on(get(addr))
}

fn parse_admin(admin: &str) -> Result<std::net::SocketAddr, String> {
    admin
        .parse()
        .map_err(|_| format!("`{admin}` is not an IP:port address"))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))
}

/// `detour-agent status [--json] [--watch]`: the table (or the JSON) once;
/// with `watch`, every [`WATCH_EVERY`] until interrupted. On a terminal the
/// screen is redrawn in place; piped, each refresh is appended (one JSON
/// line each with `--json`, for `jq`). While watching, an agent that does
/// not answer (restarting, say) is shown as an error line and asked again.
pub fn main(admin: &str, json: bool, watch: bool) -> std::process::ExitCode {
    use std::io::{IsTerminal, Write};
    use std::process::ExitCode;
    let fail = |e: String| {
        eprintln!("detour-agent status: {e}");
        ExitCode::FAILURE
    };
    let (addr, rt) = match parse_admin(admin).and_then(|a| Ok((a, runtime()?))) {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    if !watch {
        return match rt.block_on(get(addr)) {
            Ok(r) if json => {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Ok(r) => {
                print!("{}", table(&r));
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    let tty = std::io::stdout().is_terminal();
    loop {
        let text = render_watch(rt.block_on(get(addr)), json, tty, admin);
        let mut out = std::io::stdout().lock();
        // Home, the frame, then clear whatever an earlier, longer frame
        // left below it: redrawn in place without a blank flash.
        let written = if tty {
            write!(out, "\x1b[H{}\x1b[J", text.replace('\n', "\x1b[K\n"))
        } else {
            write!(out, "{text}")
        };
        if written.and_then(|()| out.flush()).is_err() {
            // The reader went away (`| head`): done.
            return ExitCode::SUCCESS;
        }
        drop(out);
        // The timer is made inside the runtime (it needs its reactor).
        rt.block_on(async { tokio::time::sleep(WATCH_EVERY).await });
    }
}

/// One `--watch` frame: a header line with the time, then the table (or
/// the JSON: pretty on a terminal, one line when piped); an error instead
/// when the agent did not answer.
fn render_watch(report: Result<AgentReport, String>, json: bool, tty: bool, admin: &str) -> String {
    let now = utc_time_of_day();
    match (report, json) {
        (Ok(r), true) if !tty => format!("{}\n", serde_json::to_string(&r).unwrap_or_default()),
        (Ok(r), true) => format!(
            "{now}  {admin}  every {}s, Ctrl-C to stop\n{}\n",
            WATCH_EVERY.as_secs(),
            serde_json::to_string_pretty(&r).unwrap_or_default()
        ),
        (Ok(r), false) => format!(
            "{now}  {admin}  every {}s, Ctrl-C to stop\n{}",
            WATCH_EVERY.as_secs(),
            table(&r)
        ),
        (Err(e), true) if !tty => format!("{}\n", serde_json::json!({"error": e})),
        (Err(e), _) => format!("{now}  {admin}  no answer, asking again every second: {e}\n"),
    }
}

/// The wall-clock time of day now, UTC.
fn utc_time_of_day() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    time_of_day(ms)
}

/// `HH:MM:SS UTC` for milliseconds since the Unix epoch (no date crate in
/// the agent for a time of day).
fn time_of_day(unix_ms: i64) -> String {
    let day = unix_ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02} UTC", day / 3600, day % 3600 / 60, day % 60)
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
    if let Some(s) = r.switches.last() {
        out.push_str(&format!(
            "last switch {}: {} -> {} ({})\n",
            time_of_day(s.at_ms),
            detour_wire::printable(&s.from),
            detour_wire::printable(&s.to),
            detour_wire::printable(&s.reason)
        ));
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
            switches: Vec::new(),
            relay_rejected: Default::default(),
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
            switches: Vec::new(),
            relay_rejected: Default::default(),
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

    #[test]
    fn the_last_switch_and_watch_frames() {
        let mut report = AgentReport {
            pop: "blr".into(),
            version: "0.1.0".into(),
            active_path: Some("via:maa".into()),
            paths: vec![path("direct", false), path("via:maa", true)],
            config_error: None,
            recordings: None,
            deferred: None,
            switches: vec![detour_wire::SwitchReport {
                // 2026-12-06 05:17:22.5 UTC.
                at_ms: 1_796_534_242_500,
                from: "direct".into(),
                to: "via:maa".into(),
                reason: "direct down: 3 consecutive failures (timed out)".into(),
            }],
            relay_rejected: Default::default(),
        };
        let text = table(&report);
        assert!(
            text.contains("last switch 05:17:22 UTC: direct -> via:maa (direct down: 3 consecutive failures (timed out))"),
            "{text}"
        );
        // On a terminal: a header with the time, then the table.
        let frame = render_watch(Ok(report.clone()), false, true, "127.0.0.1:9090");
        let (head, rest) = frame.split_once('\n').unwrap();
        assert!(
            head.ends_with("127.0.0.1:9090  every 1s, Ctrl-C to stop"),
            "{head}"
        );
        assert_eq!(rest, table(&report));
        // Piped JSON: one line per refresh, errors too.
        report.switches.clear();
        let line = render_watch(Ok(report), true, false, "x");
        assert_eq!(line.lines().count(), 1);
        assert!(line.starts_with("{\"pop\":\"blr\""), "{line}");
        let err = render_watch(Err("refused".into()), true, false, "x");
        assert_eq!(err, "{\"error\":\"refused\"}\n");
        let err = render_watch(Err("refused".into()), false, true, "x");
        assert!(
            err.contains("no answer, asking again every second: refused"),
            "{err}"
        );
    }
}

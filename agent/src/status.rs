//! `detour-agent status`: fetches `/status` from a running agent's admin
//! listener and prints the path table.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use detour_wire::AgentReport;

/// Fetches the report over plain HTTP/1.1 (the admin listener is local).
pub fn fetch(admin: &str) -> Result<AgentReport, String> {
    let addr: std::net::SocketAddr = admin
        .parse()
        .map_err(|_| format!("`{admin}` is not an IP:port address"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("cannot reach the agent's admin listener at {admin}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("reading /status: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed answer from the admin listener")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "admin listener answered: {}",
            head.lines().next().unwrap_or_default()
        ));
    }
    serde_json::from_str(body).map_err(|e| format!("unexpected /status body: {e}"))
}

fn ms(s: Option<f64>) -> String {
    s.map_or_else(|| "-".to_owned(), |v| format!("{:.1}ms", v * 1000.0))
}

/// The table a network engineer reads at 3 a.m.
pub fn table(r: &AgentReport) -> String {
    let mut out = format!(
        "pop {}  version {}  active {}\n",
        r.pop,
        r.version,
        r.active_path.as_deref().unwrap_or("none")
    );
    if let Some(e) = &r.config_error {
        out.push_str(&format!(
            "config reload FAILED (running on the previous config):\n  {}\n",
            e.replace('\n', "\n  ")
        ));
    }
    out.push_str(&format!(
        "{:<2}{:<16} {:<9} {:>9} {:>9} {:>7} {:>10}  {}\n",
        "", "PATH", "STATE", "RTT", "P95", "LOSS", "SCORE", "REASON"
    ));
    for p in &r.paths {
        out.push_str(&format!(
            "{:<2}{:<16} {:<9} {:>9} {:>9} {:>6.1}% {:>10.1}  {}\n",
            if p.active { "*" } else { "" },
            p.path,
            p.state.as_str(),
            ms(p.rtt_seconds),
            ms(p.rtt_p95_seconds),
            p.loss_ratio * 100.0,
            p.score,
            p.reason.as_deref().unwrap_or("")
        ));
    }
    out
}

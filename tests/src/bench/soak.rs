//! `detour-lab bench soak --seconds N` (root): the [`crate::soak`] run,
//! by default an hour with a fault every 3 minutes; writes the `soak` block
//! of docs/benchmarks.md.

use std::time::Duration;

use super::BenchArgs;
use crate::process::built_bins;
use crate::report::{Table, machine, write_block};
use crate::soak::{FAULTS, Report, Sample};

/// `detour-lab bench soak`.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(why) = crate::ns::unavailable() {
        anyhow::bail!("bench soak needs root, `ip` and `nft`: {why}");
    }
    let bins = built_bins()?;
    let total = Duration::from_secs(args.seconds.max(60));
    let every = if total >= Duration::from_secs(1800) {
        Duration::from_secs(180)
    } else {
        (total / 8).max(Duration::from_secs(15))
    };
    let r = crate::soak::run(&bins, total, every).await?;
    let md = render(&r, every, &machine());
    // The report as JSON goes to stderr between the two, as it always has.
    println!("{md}");
    eprintln!("{}", serde_json::to_string(&r)?);
    if !args.no_write {
        write_block(&args.doc, "soak", &md)?;
    }
    Ok(())
}

fn render(r: &Report, every: Duration, machine: &str) -> String {
    let mut md = format!(
        "## Soak\n\nMeasured {machine} with `target/release/detour-lab bench soak --seconds {}` (root): the namespace \
         fleet with the real control plane (SQLite, HTTPS), 200 calls/s (`POST /v1/calls`) from blr's call handler, \
         each re-sent with its Idempotency-Key for up to 10 s while unanswered (2 s client timeout). A fault every \
         {} s, held for a third of that, then healed: {}.\n\n",
        r.seconds,
        every.as_secs(),
        FAULTS.join(", "),
    );
    let mut calls = Table::new(&[
        "calls",
        "failed",
        "answered after a retry",
        "failures seen in between",
    ]);
    calls.row(&[
        r.calls.to_string(),
        r.failed.to_string(),
        r.retried.to_string(),
        format!("`{}`", r.failures_by_status),
    ]);
    md.push_str(&calls.finish());
    md.push_str(
        "\nblr's agent process before the first fault, after one round of every fault (warm-up: the allocator's \
         high-water mark is reached at the control-plane restart, when retried calls pile up), at the end, and the \
         most seen at any sample; drift is from after the round to the end:\n\n",
    );
    md.push_str(&growth_table(r));
    if !r.rounds.is_empty() {
        let each: Vec<String> = r
            .rounds
            .iter()
            .map(|s| format!("{:.1}", s.rss_kib as f64 / 1024.0))
            .collect();
        md.push_str(&format!(
            "\nRSS at the same point of each round (MiB): {}.\n",
            each.join(", ")
        ));
    }
    md.push_str(
        "\nGoals (issue 12): zero failed; RSS and fds drift at most 5% after warm-up. Retries happen only around \
         the control-plane restarts (503 problem+json while it is away); network faults are absorbed by the agent.\n",
    );
    md
}

/// blr's agent before the faults, after one round, at the end, the drift
/// from the round to the end, and the most seen.
fn growth_table(r: &Report) -> String {
    let round = r.after_round.unwrap_or(r.start);
    let pct = |a: u64, b: u64| format!("{:+.1}%", Report::drift(a, b) * 100.0);
    let mut table = Table::new(&["", "before faults", "after one round", "end", "drift", "max"]);
    let mib = |s: &Sample| format!("{:.1}", s.rss_kib as f64 / 1024.0);
    table.row(&[
        "RSS (MiB)".to_owned(),
        mib(&r.start),
        mib(&round),
        mib(&r.end),
        pct(round.rss_kib, r.end.rss_kib),
        mib(&r.max),
    ]);
    let mut count = |name: &str, of: fn(&Sample) -> u64| {
        table.row(&[
            name.to_owned(),
            of(&r.start).to_string(),
            of(&round).to_string(),
            of(&r.end).to_string(),
            pct(of(&round), of(&r.end)),
            of(&r.max).to_string(),
        ])
    };
    count("open fds", |s| s.fds);
    count("OS threads", |s| s.threads);
    count("tokio tasks", |s| s.tasks);
    table.finish()
}

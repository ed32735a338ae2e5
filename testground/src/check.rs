//! Whether a finished run's output is complete and plausible: every metric file present
//! and not empty, the parameters recorded, and figures inside their possible ranges. CI's
//! smoke runs and the tests use it; it never judges whether the figures are *good*.

use crate::report::{METRIC_FILES, Summary};
use std::path::Path;

/// What is wrong with a run's output, one line each.
pub fn problems(out: &Path, nodes: u64) -> Vec<String> {
    let mut problems = Vec::new();
    for name in METRIC_FILES.iter().copied().chain(["params.json"]) {
        let path = out.join(name);
        match std::fs::metadata(&path) {
            Ok(m) if m.len() > 0 => {}
            Ok(_) => problems.push(format!("{name} is empty")),
            Err(_) => problems.push(format!("{name} is missing")),
        }
    }
    let summary: Summary = match std::fs::read_to_string(out.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
    {
        Some(s) => s,
        None => {
            problems.push("summary.json does not hold a summary".into());
            return problems;
        }
    };
    problems.extend(implausible(&summary, nodes));
    for series in ["cpu.csv", "memory.csv"] {
        let rows = std::fs::read_to_string(out.join(series))
            .map(|t| t.lines().count().saturating_sub(1))
            .unwrap_or(0);
        if rows < nodes as usize {
            problems.push(format!("{series} has {rows} samples for {nodes} nodes"));
        }
    }
    problems
}

/// Figures outside what any run can produce.
pub fn implausible(s: &Summary, nodes: u64) -> Vec<String> {
    let mut problems = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    expect(s.requests > 0, "no invocation was made".into());
    expect(
        s.succeeded <= s.requests,
        format!("{} succeeded of {} requests", s.succeeded, s.requests),
    );
    expect(
        (0.0..=1.0).contains(&s.success_rate),
        format!("success rate {}", s.success_rate),
    );
    expect(
        s.nodes >= nodes,
        format!("{} nodes sampled, {nodes} expected", s.nodes),
    );
    expect(
        s.joins >= nodes,
        format!("{} joins for {nodes} nodes", s.joins),
    );
    if s.succeeded > 0 {
        expect(
            s.mean_messages_per_placement >= 1.0,
            format!("{} messages per placement", s.mean_messages_per_placement),
        );
        expect(
            s.p50_execute_ms > 0.0 && s.p50_end_to_end_ms >= s.p50_execute_ms,
            format!(
                "end-to-end p50 {} ms below execution p50 {} ms",
                s.p50_end_to_end_ms, s.p50_execute_ms
            ),
        );
    }
    expect(
        s.peak_rss_mib > 1.0 && s.peak_rss_mib < 4096.0,
        format!("peak RSS {} MiB", s.peak_rss_mib),
    );
    expect(
        s.mean_kib_per_s_per_node > 0.0,
        "no bandwidth measured".into(),
    );
    problems
}

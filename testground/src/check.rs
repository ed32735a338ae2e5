//! Whether a finished run's output is complete and plausible: every metric file present
//! and not empty, the parameters recorded, figures inside their possible ranges, and what
//! the case is about — churn or a split — having happened. CI's smoke runs and the tests
//! use it; it never judges whether the figures are *good*.

use crate::records::{PARAMS_FILE, RunInfo};
use crate::report::{METRIC_FILES, Summary};
use crate::scenario::Case;
use std::path::Path;

/// What is wrong with a run's output, one line each. The case is read from the run's
/// `params.json`.
pub fn problems(out: &Path, nodes: u64) -> Vec<String> {
    let mut problems = Vec::new();
    for name in METRIC_FILES.iter().copied().chain([PARAMS_FILE]) {
        let path = out.join(name);
        match std::fs::metadata(&path) {
            Ok(m) if m.len() > 0 => {}
            Ok(_) => problems.push(format!("{name} is empty")),
            Err(_) => problems.push(format!("{name} is missing")),
        }
    }
    let info = match RunInfo::read(&out.join(PARAMS_FILE)) {
        Ok(info) => Some(info),
        Err(e) => {
            problems.push(format!("{PARAMS_FILE} does not describe a run: {e}"));
            None
        }
    };
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
    if let Some(info) = info {
        if u64::from(info.nodes) != nodes {
            problems.push(format!(
                "the run had {} nodes, {nodes} expected",
                info.nodes
            ));
        }
        problems.extend(case_problems(info.case, &summary, nodes));
    }
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

/// Departures of volunteers during the workload: every node leaves once at the end, the
/// other leaves and the crashes are churn.
pub fn departures(s: &Summary, nodes: u64) -> u64 {
    (s.leaves + s.crashes).saturating_sub(nodes)
}

/// Fresh peers that replaced departed ones: every instance's first node joins once.
pub fn replacements(s: &Summary, nodes: u64) -> u64 {
    s.joins.saturating_sub(nodes)
}

/// Whether what `case` is about happened: in the churn case at least one volunteer left
/// and one fresh peer joined; in the partition case the network split once and healed
/// once; in the others nobody was replaced and the network never split. A split or heal
/// that failed anywhere is a problem in every case.
pub fn case_problems(case: Case, s: &Summary, nodes: u64) -> Vec<String> {
    let mut problems = Vec::new();
    if s.link_failures > 0 {
        problems.push(format!(
            "{} splits or heals failed (split-failed or heal-failed in events.csv)",
            s.link_failures
        ));
    }
    let (departed, replaced) = (departures(s, nodes), replacements(s, nodes));
    match case {
        Case::Churn => {
            if departed == 0 {
                problems.push("churn: no volunteer left or crashed during the run".into());
            }
            if replaced == 0 {
                problems.push("churn: no fresh peer joined during the run".into());
            }
        }
        Case::Discovery | Case::Partition => {
            if departed > 0 || replaced > 0 {
                problems.push(format!(
                    "{}: {departed} departures and {replaced} replacements in a case without churn",
                    case.name()
                ));
            }
        }
    }
    let split_heal = (s.splits, s.heals);
    match case {
        Case::Partition if split_heal != (1, 1) => problems.push(format!(
            "partition: {} splits and {} heals recorded, 1 of each expected",
            s.splits, s.heals
        )),
        Case::Discovery | Case::Churn if split_heal != (0, 0) => problems.push(format!(
            "{}: {} splits and {} heals in a case without a partition",
            case.name(),
            s.splits,
            s.heals
        )),
        _ => {}
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
    expect(
        s.store_capacity_mib > 0.0 && s.peak_store_mib <= s.store_capacity_mib,
        format!(
            "a store held {} MiB of its {} MiB",
            s.peak_store_mib, s.store_capacity_mib
        ),
    );
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The membership and network events of a finished run of 6 nodes with `departed`
    /// volunteers replaced, `splits` splits and `heals` heals.
    fn run(departed: u64, splits: u64, heals: u64) -> Summary {
        Summary {
            joins: 6 + departed,
            leaves: 6 + departed / 2,
            crashes: departed - departed / 2,
            splits,
            heals,
            ..Summary::default()
        }
    }

    #[test]
    fn a_churn_run_must_have_churned() {
        assert_eq!(
            case_problems(Case::Churn, &run(3, 0, 0), 6),
            Vec::<String>::new()
        );
        assert_eq!(
            (departures(&run(3, 0, 0), 6), replacements(&run(3, 0, 0), 6)),
            (3, 3)
        );
        let none = case_problems(Case::Churn, &run(0, 0, 0), 6);
        assert_eq!(none.len(), 2, "{none:?}");
        assert!(none[0].contains("no volunteer left"), "{none:?}");
        // A departure whose replacement never joined.
        let mut unreplaced = run(0, 0, 0);
        unreplaced.crashes = 1;
        let problems = case_problems(Case::Churn, &unreplaced, 6);
        assert_eq!(problems, ["churn: no fresh peer joined during the run"]);
    }

    #[test]
    fn a_partition_run_must_split_and_heal_exactly_once() {
        assert!(case_problems(Case::Partition, &run(0, 1, 1), 6).is_empty());
        for (splits, heals) in [(0, 0), (0, 1), (1, 0), (2, 2)] {
            let problems = case_problems(Case::Partition, &run(0, splits, heals), 6);
            assert_eq!(problems.len(), 1, "{splits} {heals}: {problems:?}");
        }
        let mut failed = run(0, 1, 1);
        failed.link_failures = 2;
        let problems = case_problems(Case::Partition, &failed, 6);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("split-failed"), "{problems:?}");
    }

    #[test]
    fn the_other_cases_must_neither_churn_nor_split() {
        assert!(case_problems(Case::Discovery, &run(0, 0, 0), 6).is_empty());
        assert_eq!(case_problems(Case::Discovery, &run(1, 0, 0), 6).len(), 1);
        assert_eq!(case_problems(Case::Churn, &run(1, 1, 1), 6).len(), 1);
        assert_eq!(case_problems(Case::Partition, &run(2, 1, 1), 6).len(), 1);
    }

    #[test]
    fn a_run_without_params_is_a_problem() {
        let dir = tempfile::tempdir().expect("temp dir");
        let problems = problems(dir.path(), 6);
        assert!(
            problems.iter().any(|p| p == "params.json is missing"),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("params.json does not describe a run")),
            "{problems:?}"
        );
    }
}

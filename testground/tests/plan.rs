//! The plan binary runs each case at smoke size with real `flotilla node` processes, and
//! the churn case with 20 nodes replacing 20% of its volunteers per minute completes with
//! every metric produced (its success rate is printed as a figure, not asserted).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use flotilla_testground::check;
use flotilla_testground::links::netns;
use flotilla_testground::report::Summary;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The plan binary cargo built for this test.
fn plan() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flotilla-plan"))
}

/// The `flotilla` binary beside it, built first if this test runs alone.
fn flotilla() -> PathBuf {
    let path = plan().with_file_name("flotilla");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "flotilla-node", "--bin", "flotilla"])
            .status()
            .unwrap();
        assert!(status.success(), "building flotilla");
    }
    path
}

fn simulate(case: &str, nodes: u32, out: &Path, extra: &[&str]) -> Output {
    Command::new(plan())
        .args(["simulate", case, "--nodes", &nodes.to_string()])
        .arg("--out")
        .arg(out)
        .arg("--flotilla")
        .arg(flotilla())
        .args(extra)
        .output()
        .unwrap()
}

fn assert_complete(output: &Output, out: &Path, nodes: u64) -> Summary {
    assert!(
        output.status.success(),
        "the run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let problems = check::problems(out, nodes);
    assert!(problems.is_empty(), "{problems:?}");
    let printed: Summary = serde_json::from_slice(&output.stdout).unwrap();
    let written: Summary =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(printed, written);
    written
}

/// Short runs: a few seconds of workload after a short warm-up.
const SMOKE: &[&str] = &[
    "--duration",
    "8s",
    "--param",
    "warmup_s=2",
    "--param",
    "call_ms=500",
    "--utilisation",
    "0.5",
];

#[test]
fn each_case_runs_at_smoke_size_and_writes_every_metric() {
    let dir = tempfile::tempdir().unwrap();
    for case in ["discovery", "churn"] {
        let out = dir.path().join(case);
        let mut extra = SMOKE.to_vec();
        if case == "churn" {
            extra.extend(["--churn", "1", "--param", "session_shape=1.2"]);
        }
        let output = simulate(case, 6, &out, &extra);
        let summary = assert_complete(&output, &out, 6);
        println!(
            "{case}: {}/{} succeeded",
            summary.succeeded, summary.requests
        );
    }
    // A partition needs network namespaces; where they cannot be made, the run says so.
    let out = dir.path().join("partition");
    let mut extra = SMOKE.to_vec();
    extra.extend(["--param", "split_after_s=3", "--param", "heal_after_s=6"]);
    let output = simulate("partition", 6, &out, &extra);
    if netns::available() {
        let summary = assert_complete(&output, &out, 6);
        assert_eq!((summary.splits, summary.heals), (1, 1));
        assert!(
            netns::leftovers(flotilla_testground::simulate::NAMESPACE_PREFIX).is_empty(),
            "namespaces removed"
        );
    } else {
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("needs network namespaces"), "{stderr}");
    }
}

#[test]
fn bad_arguments_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (args, expected) in [
        (
            vec!["simulate", "discovery", "--nodes", "4"],
            "leaves no volunteer",
        ),
        (
            vec!["simulate", "churn", "--param", "utilization=0.3"],
            "unknown parameter 'utilization'",
        ),
        (vec!["simulate", "churn", "--churn", "2"], "churn_per_min=2"),
        (vec!["simulate", "ring"], "invalid value 'ring'"),
    ] {
        let output = Command::new(plan())
            .args(&args)
            .arg("--out")
            .arg(dir.path())
            .arg("--flotilla")
            .arg(flotilla())
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // Outside Testground, no command is a clear error too.
    let output = Command::new(plan())
        .env_remove("TEST_PLAN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no TEST_* environment"));
}

#[test]
fn churn_of_twenty_nodes_replacing_a_fifth_per_minute_completes_with_every_metric() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("churn");
    let output = simulate(
        "churn",
        20,
        &out,
        &[
            "--duration",
            "60s",
            "--churn",
            "0.2",
            "--param",
            "warmup_s=5",
        ],
    );
    let summary = assert_complete(&output, &out, 20);
    println!(
        "churn 20 nodes, 20%/min for 60 s: {}/{} succeeded ({:.1}%), {} joins, {} crashes",
        summary.succeeded,
        summary.requests,
        summary.success_rate * 100.0,
        summary.joins,
        summary.crashes
    );
}

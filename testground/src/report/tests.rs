//! Tests of the report on records of two instances written as a run writes them.

use std::path::Path;

use serde::Serialize;

use super::load::Records;
use super::summary::percentile;
use super::tables::{Event, Table, Tables};
use super::{METRIC_FILES, ReportError, Summary, plots, write_report};
use crate::records::{
    CsvLog, EVENTS_FILE, EventRow, INVOCATIONS_FILE, InvocationRow, RESOURCES_FILE, ResourceRow,
};

/// Writes `rows` to `dir/name`, creating `dir`.
fn write_rows<R: Serialize>(dir: &Path, name: &str, rows: &[R]) {
    std::fs::create_dir_all(dir).expect("create instance dir");
    let mut log = CsvLog::create(&dir.join(name)).expect("create log");
    for row in rows {
        log.append(row).expect("append row");
    }
}

/// An invocation by instance 1 at `unix_ms`.
fn call(
    unix_ms: u64,
    ok: bool,
    tries: u32,
    probes: u32,
    messages: u32,
    ms: [f64; 3],
    phase: &str,
) -> InvocationRow {
    InvocationRow {
        unix_ms,
        instance: 1,
        ok,
        error: if ok {
            String::new()
        } else {
            "no volunteer".into()
        },
        tries,
        probes,
        messages,
        discover_ms: ms[0],
        execute_ms: ms[1],
        end_to_end_ms: ms[2],
        phase: phase.into(),
    }
}

/// A resource sample of instance 2's node `generation`.
fn sample(
    unix_ms: u64,
    generation: u32,
    cpu_percent: f64,
    rss_mib: f64,
    bytes: [u64; 2],
) -> ResourceRow {
    ResourceRow {
        unix_ms,
        instance: 2,
        generation,
        cpu_percent,
        rss_mib,
        bytes_in: bytes[0],
        bytes_out: bytes[1],
        store_mib: rss_mib / 2.0,
        store_capacity_mib: 256.0,
    }
}

/// An event of `instance`.
fn event(unix_ms: u64, instance: u32, name: &str) -> EventRow {
    EventRow {
        unix_ms,
        instance,
        event: name.into(),
        detail: String::new(),
    }
}

/// A run of two instances, t0 = 500 ms: client 1 (invocations, a partition, a leave) in a
/// local layout, volunteer 2 (two node generations, a crash) in Testground's layout.
fn two_instance_run(dir: &Path) {
    let client = dir.join("instances").join("001");
    write_rows(
        &client,
        INVOCATIONS_FILE,
        &[
            call(1_000, true, 1, 2, 4, [10.0, 100.0, 150.0], "steady"),
            call(2_000, true, 2, 4, 8, [20.0, 200.0, 300.0], "steady"),
            call(12_000, false, 0, 3, 6, [5.0, 0.0, 50.0], "split"),
            call(13_000, true, 1, 1, 3, [30.0, 300.0, 400.0], "split"),
        ],
    );
    let client_events = [
        event(11_500, 1, "split"),
        event(14_000, 1, "heal"),
        event(15_000, 1, "leave"),
    ];
    write_rows(&client, EVENTS_FILE, &client_events);
    let volunteer = dir.join("outputs").join("volunteers").join("2");
    write_rows(
        &volunteer,
        RESOURCES_FILE,
        &[
            sample(500, 0, 10.0, 40.0, [0, 0]),
            sample(5_500, 0, 30.0, 60.0, [4_096, 8_192]),
            sample(10_500, 0, 20.0, 50.0, [10_240, 20_480]),
            sample(11_000, 1, 40.0, 30.0, [100, 100]),
        ],
    );
    let volunteer_events = [
        event(500, 2, "join"),
        event(11_000, 2, "crash"),
        event(11_000, 2, "join"),
    ];
    write_rows(&volunteer, EVENTS_FILE, &volunteer_events);
}

/// The rows of a report CSV, header first.
fn read_csv(path: &Path) -> Vec<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(path)
        .expect("open output csv");
    reader
        .records()
        .map(|r| r.expect("output row").iter().map(String::from).collect())
        .collect()
}

#[test]
fn every_metric_file_is_written_and_not_empty() {
    let run = tempfile::tempdir().expect("temp dir");
    two_instance_run(run.path());
    let out = tempfile::tempdir().expect("temp dir");
    write_report(run.path(), out.path()).expect("report");
    for name in METRIC_FILES {
        let len = std::fs::metadata(out.path().join(name)).map_or(0, |m| m.len());
        assert!(len > 0, "{name} missing or empty");
    }
}

#[test]
fn summary_counts_rates_and_percentiles() {
    let run = tempfile::tempdir().expect("temp dir");
    two_instance_run(run.path());
    let out = tempfile::tempdir().expect("temp dir");
    let summary = write_report(run.path(), out.path()).expect("report");
    assert_eq!((summary.requests, summary.succeeded), (4, 3));
    assert_eq!(summary.success_rate, 0.75);
    assert_eq!(summary.placements, 3);
    assert_eq!(summary.mean_messages_per_placement, 5.0);
    assert_eq!(summary.mean_probes_per_placement, 7.0 / 3.0);
    assert_eq!(summary.mean_tries_per_placement, 4.0 / 3.0);
    assert_eq!(
        (summary.p50_discover_ms, summary.p99_discover_ms),
        (20.0, 30.0)
    );
    assert_eq!(
        (summary.p50_execute_ms, summary.p99_execute_ms),
        (200.0, 300.0)
    );
    assert_eq!(
        (summary.p50_end_to_end_ms, summary.p99_end_to_end_ms),
        (300.0, 400.0)
    );
    assert_eq!(summary.nodes, 2);
    assert_eq!(summary.mean_kib_per_s_per_node, 3.0);
    assert_eq!(summary.mean_cpu_percent, 25.0);
    assert_eq!((summary.peak_rss_mib, summary.mean_rss_mib), (60.0, 45.0));
    assert_eq!(
        (summary.peak_store_mib, summary.store_capacity_mib),
        (30.0, 256.0)
    );
    assert_eq!((summary.joins, summary.leaves, summary.crashes), (2, 1, 1));
    assert_eq!((summary.splits, summary.heals), (1, 1));
    assert_eq!(summary.duration_s, 14.5);
}

#[test]
fn summary_files_hold_the_returned_summary() {
    let run = tempfile::tempdir().expect("temp dir");
    two_instance_run(run.path());
    let out = tempfile::tempdir().expect("temp dir");
    let summary = write_report(run.path(), out.path()).expect("report");
    let json = std::fs::read_to_string(out.path().join("summary.json")).expect("summary.json");
    let back: Summary = serde_json::from_str(&json).expect("parse summary.json");
    assert_eq!(back, summary);
    let rows = read_csv(&out.path().join("summary.csv"));
    assert_eq!(rows[0], ["metric", "value"]);
    assert_eq!(rows[1], ["requests", "4"]);
    assert_eq!(rows[3], ["success_rate", "0.75"]);
    assert!(rows.iter().any(|r| r[0] == "crashes" && r[1] == "1"));
}

#[test]
fn success_rate_per_window_and_per_phase() {
    let run = tempfile::tempdir().expect("temp dir");
    two_instance_run(run.path());
    let out = tempfile::tempdir().expect("temp dir");
    write_report(run.path(), out.path()).expect("report");
    let windows = read_csv(&out.path().join("success_rate.csv"));
    assert_eq!(
        windows,
        [
            vec!["window_start_s", "requests", "succeeded", "success_rate"],
            vec!["0.0", "2", "2", "1.0"],
            vec!["10.0", "2", "1", "0.5"],
        ]
    );
    let phases = read_csv(&out.path().join("phases.csv"));
    assert_eq!(
        phases,
        [
            vec!["phase", "requests", "succeeded", "success_rate"],
            vec!["steady", "2", "2", "1.0"],
            vec!["split", "2", "1", "0.5"],
        ]
    );
}

#[test]
fn placements_and_latencies_are_per_invocation() {
    let run = tempfile::tempdir().expect("temp dir");
    two_instance_run(run.path());
    let out = tempfile::tempdir().expect("temp dir");
    write_report(run.path(), out.path()).expect("report");
    let placements = read_csv(&out.path().join("placement.csv"));
    assert_eq!(
        placements.len(),
        4,
        "header and the three placed: {placements:?}"
    );
    assert_eq!(placements[1], ["0.5", "1", "1", "2", "4", "10.0"]);
    let latencies = read_csv(&out.path().join("latency.csv"));
    assert_eq!(
        latencies.len(),
        4,
        "header and the three successful: {latencies:?}"
    );
    assert_eq!(latencies[3], ["12.5", "300.0", "400.0"]);
}

#[test]
fn bandwidth_of_a_node_is_from_its_first_and_last_sample() {
    let run = tempfile::tempdir().expect("temp dir");
    two_instance_run(run.path());
    let out = tempfile::tempdir().expect("temp dir");
    write_report(run.path(), out.path()).expect("report");
    let rows = read_csv(&out.path().join("bandwidth.csv"));
    assert_eq!(
        rows,
        [
            vec![
                "instance",
                "generation",
                "seconds",
                "bytes_in",
                "bytes_out",
                "kib_per_s_in",
                "kib_per_s_out"
            ],
            vec!["2", "0", "10.0", "10240", "20480", "1.0", "2.0"],
            vec!["2", "1", "0.0", "0", "0", "0.0", "0.0"],
        ]
    );
}

#[test]
fn samples_and_events_are_merged_in_time_order() {
    let run = tempfile::tempdir().expect("temp dir");
    two_instance_run(run.path());
    let out = tempfile::tempdir().expect("temp dir");
    write_report(run.path(), out.path()).expect("report");
    let events = read_csv(&out.path().join("events.csv"));
    let names: Vec<&str> = events.iter().map(|r| r[2].as_str()).collect();
    assert_eq!(
        names,
        ["event", "join", "crash", "join", "split", "heal", "leave"]
    );
    assert_eq!(events[4][..2], ["11.0", "1"]);
    let memory = read_csv(&out.path().join("memory.csv"));
    assert_eq!(memory[0], ["t_s", "instance", "generation", "rss_mib"]);
    assert_eq!(memory[4], ["10.5", "2", "1", "30.0"]);
    assert_eq!(read_csv(&out.path().join("cpu.csv")).len(), 5);
}

#[test]
fn empty_records_dir_gives_zero_summary_and_every_file() {
    let run = tempfile::tempdir().expect("temp dir");
    let out = run.path().join("report");
    let summary = write_report(run.path(), &out).expect("report");
    assert_eq!(
        (summary.requests, summary.succeeded, summary.nodes),
        (0, 0, 0)
    );
    assert_eq!(summary.success_rate, 0.0);
    assert_eq!(summary.p99_end_to_end_ms, 0.0);
    for name in METRIC_FILES {
        let len = std::fs::metadata(out.join(name)).map_or(0, |m| m.len());
        assert!(len > 0, "{name} missing or empty");
    }
    assert_eq!(
        read_csv(&out.join("latency.csv")),
        [["t_s", "execute_ms", "end_to_end_ms"]]
    );
}

#[test]
fn a_report_inside_the_records_dir_is_not_read_back() {
    let run = tempfile::tempdir().expect("temp dir");
    two_instance_run(run.path());
    let out = run.path().join("report");
    let first = write_report(run.path(), &out).expect("first report");
    let second = write_report(run.path(), &out).expect("second report over the first");
    assert_eq!(first, second);
}

#[test]
fn a_report_into_the_records_own_dir_is_refused_and_writes_nothing() {
    let run = tempfile::tempdir().expect("temp dir");
    two_instance_run(run.path());
    let err = write_report(run.path(), run.path()).expect_err("same directory");
    assert!(matches!(err, ReportError::SameDir(_)), "{err}");
    // The same directory by another name is refused too.
    let other_name = run.path().join("instances").join("..");
    let err = write_report(run.path(), &other_name).expect_err("same directory");
    assert!(err.to_string().contains("e.g. DIR/report"), "{err}");
    assert!(!run.path().join("summary.json").exists());
}

#[test]
fn the_runs_params_are_carried_into_the_report() {
    let run = tempfile::tempdir().expect("temp dir");
    two_instance_run(run.path());
    // Instance 0 of a Testground run writes them into its outputs.
    let first = run.path().join("outputs").join("single").join("0");
    std::fs::create_dir_all(&first).expect("instance dir");
    std::fs::write(first.join("params.json"), "{\"case\":\"churn\"}").expect("params");
    let out = run.path().join("report");
    write_report(run.path(), &out).expect("report");
    assert_eq!(
        std::fs::read_to_string(out.join("params.json")).expect("carried"),
        "{\"case\":\"churn\"}"
    );
    // Written again, the report's own copy is not taken for the run's.
    std::fs::write(first.join("params.json"), "{\"case\":\"partition\"}").expect("params");
    write_report(run.path(), &out).expect("report again");
    assert!(
        std::fs::read_to_string(out.join("params.json"))
            .expect("carried")
            .contains("partition")
    );
}

#[test]
fn failed_splits_and_heals_are_counted() {
    let run = tempfile::tempdir().expect("temp dir");
    let events = [
        event(1_000, 0, "split-failed"),
        event(1_000, 3, "split-failed"),
        event(2_000, 0, "heal"),
        event(2_000, 1, "heal-failed"),
    ];
    write_rows(&run.path().join("instances"), EVENTS_FILE, &events);
    let summary = write_report(run.path(), &run.path().join("report")).expect("report");
    assert_eq!(
        (summary.splits, summary.heals, summary.link_failures),
        (0, 1, 3)
    );
}

#[test]
fn malformed_csv_is_an_error_naming_the_file() {
    let run = tempfile::tempdir().expect("temp dir");
    two_instance_run(run.path());
    let bad = run.path().join("instances").join("003");
    std::fs::create_dir_all(&bad).expect("create dir");
    let bad_file = bad.join(RESOURCES_FILE);
    std::fs::write(&bad_file, "unix_ms,instance\nsoon,3\n").expect("write bad csv");
    let out = tempfile::tempdir().expect("temp dir");
    let error = write_report(run.path(), out.path()).expect_err("malformed csv");
    assert!(matches!(error, ReportError::Records(_)), "{error:?}");
    let shown = bad_file.display().to_string();
    assert!(
        error.to_string().contains(&shown),
        "{error} does not name {shown}"
    );
}

#[test]
fn a_missing_records_dir_is_an_error_naming_it() {
    let run = tempfile::tempdir().expect("temp dir");
    let missing = run.path().join("nowhere");
    let error = write_report(&missing, &run.path().join("report")).expect_err("missing dir");
    assert!(error.to_string().contains("nowhere"), "{error}");
}

#[test]
fn percentiles_are_nearest_rank() {
    let values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
    assert_eq!(percentile(&values, 50), 5.0);
    assert_eq!(percentile(&values, 99), 10.0);
    assert_eq!(percentile(&values[..1], 50), 1.0);
    assert_eq!(percentile(&[], 50), 0.0);
    let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(percentile(&hundred, 99), 99.0);
}

#[test]
fn partitions_span_from_split_to_heal_or_to_the_end() {
    let at = |t_s: f64, name: &str| Event {
        t_s,
        instance: 0,
        event: name.into(),
        detail: String::new(),
    };
    let events = [
        at(1.0, "split"),
        at(1.5, "split"),
        at(3.0, "heal"),
        at(3.2, "heal"),
        at(5.0, "crash"),
        at(8.0, "split"),
    ];
    assert_eq!(plots::partitions(&events, 10.0), [(1.0, 3.0), (8.0, 10.0)]);
}

/// Checks that `R`'s header is what serde names its fields.
fn assert_columns<R: Table>(row: &R) {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.serialize(row).expect("serialize row");
    let bytes = writer.into_inner().expect("csv bytes");
    let text = String::from_utf8(bytes).expect("utf-8");
    let header = text.lines().next().unwrap_or_default();
    assert_eq!(header, R::COLUMNS.join(","));
}

#[test]
fn table_columns_are_the_row_fields() {
    let run = tempfile::tempdir().expect("temp dir");
    two_instance_run(run.path());
    let records = Records::load(run.path(), &run.path().join("report")).expect("load");
    let tables = Tables::from_records(&records);
    assert_columns(&tables.windows[0]);
    assert_columns(&tables.phases[0]);
    assert_columns(&tables.placements[0]);
    assert_columns(&tables.latencies[0]);
    assert_columns(&tables.bandwidth[0]);
    assert_columns(&tables.cpu[0]);
    assert_columns(&tables.memory[0]);
    assert_columns(&tables.events[0]);
}

#[test]
fn plots_are_svg_with_titles_and_axis_labels() {
    let run = tempfile::tempdir().expect("temp dir");
    two_instance_run(run.path());
    let out = tempfile::tempdir().expect("temp dir");
    write_report(run.path(), out.path()).expect("report");
    let svg = std::fs::read_to_string(out.path().join("success_rate.svg")).expect("svg");
    assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
    assert!(svg.contains("success rate (%)") && svg.contains("time since start (s)"));
    assert!(
        svg.contains("partitioned"),
        "the partition is shaded and labelled"
    );
}

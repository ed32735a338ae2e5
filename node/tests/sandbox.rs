//! The executor's sandbox, with small WAT modules under real wasmtime: deadlines, memory
//! limits, deep recursion, unknown imports and bad modules; after each, the executor
//! keeps running other modules.
#![allow(clippy::unwrap_used)]

use flotilla_node::executor::{ExecError, Executor, ExecutorConfig, Job};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

/// Writes "hello\n" on stdout, then exits with the number of its arguments.
const HELLO: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello\n")
  (func (export "_start")
    ;; iovec at 0: base 16, length 6
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (drop (call $args_sizes_get (i32.const 32) (i32.const 36)))
    (call $proc_exit (i32.sub (i32.load (i32.const 32)) (i32.const 1)))))
"#;

fn executor(dir: &std::path::Path) -> Arc<Executor> {
    Executor::new(ExecutorConfig::new(dir)).unwrap()
}

fn job(memory_bytes: u64) -> Job {
    Job {
        memory_bytes,
        timeout: Some(Duration::from_secs(5)),
        ..Job::default()
    }
}

/// The executor still runs a well-behaved module correctly.
fn still_serves(executor: &Executor) {
    let wasm = wat::parse_str(HELLO).unwrap();
    let outcome = executor
        .run(
            &wasm,
            Job {
                args: vec!["a".into(), "b".into()],
                ..job(MIB)
            },
        )
        .unwrap();
    assert_eq!(outcome.failure, None);
    assert_eq!(outcome.stdout, b"hello\n");
    assert_eq!(outcome.exit_code, 2);
}

#[test]
fn a_well_behaved_module_runs_and_its_compiled_code_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = wat::parse_str(HELLO).unwrap();
    let first = executor(dir.path());
    let outcome = first.run(&wasm, job(MIB)).unwrap();
    assert_eq!(
        (outcome.exit_code, outcome.stdout.as_slice()),
        (0, &b"hello\n"[..])
    );
    assert!(outcome.timings.compiled);
    assert!(!first.run(&wasm, job(MIB)).unwrap().timings.compiled);
    // A new executor (a restarted node) loads it from its own disk cache.
    drop(first);
    let second = executor(dir.path());
    assert!(!second.run(&wasm, job(MIB)).unwrap().timings.compiled);
    still_serves(&second);
}

#[test]
fn an_infinite_loop_is_stopped_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let executor = executor(dir.path());
    let wasm = wat::parse_str(r#"(module (func (export "_start") (loop (br 0))))"#).unwrap();
    let outcome = executor
        .run(
            &wasm,
            Job {
                timeout: Some(Duration::from_millis(200)),
                ..job(MIB)
            },
        )
        .unwrap();
    let failure = outcome.failure.unwrap();
    assert!(failure.contains("deadline of 200ms"), "{failure}");
    assert_eq!(outcome.exit_code, -1);
    still_serves(&executor);
}

#[test]
fn growing_memory_past_the_reservation_fails_inside_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let executor = executor(dir.path());
    // Asks for 64 more pages (4 MiB); exits 3 if refused, 0 if granted.
    let grow = r#"
    (module
      (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        (if (i32.eq (memory.grow (i32.const 64)) (i32.const -1))
          (then (call $proc_exit (i32.const 3))))
        (call $proc_exit (i32.const 0))))"#;
    let wasm = wat::parse_str(grow).unwrap();
    let refused = executor.run(&wasm, job(2 * MIB)).unwrap();
    assert_eq!((refused.exit_code, refused.failure), (3, None));
    let granted = executor.run(&wasm, job(8 * MIB)).unwrap();
    assert_eq!((granted.exit_code, granted.failure), (0, None));
    // A module whose initial memory is over the reservation does not start.
    let big = wat::parse_str(r#"(module (memory 64) (func (export "_start")))"#).unwrap();
    let failure = executor.run(&big, job(MIB)).unwrap().failure.unwrap();
    assert!(failure.starts_with("cannot instantiate"), "{failure}");
    still_serves(&executor);
}

#[test]
fn deep_recursion_traps_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let executor = executor(dir.path());
    let wasm = wat::parse_str(r#"(module (func $f (call $f)) (func (export "_start") (call $f)))"#)
        .unwrap();
    let outcome = executor.run(&wasm, job(MIB)).unwrap();
    let failure = outcome.failure.unwrap();
    assert!(failure.contains("call stack exhausted"), "{failure}");
    still_serves(&executor);
}

#[test]
fn unknown_imports_and_bad_modules_are_refused_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let executor = executor(dir.path());
    let sneaky = wat::parse_str(
        r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#,
    )
    .unwrap();
    let err = executor.run(&sneaky, job(MIB)).unwrap_err();
    assert!(
        matches!(&err, ExecError::Refused(m) if m.contains("launch_missiles")),
        "{err}"
    );
    let library = wat::parse_str(r#"(module (func (export "add")))"#).unwrap();
    assert!(matches!(
        executor.run(&library, job(MIB)),
        Err(ExecError::Refused(m)) if m.contains("_start")
    ));
    assert!(matches!(
        executor.run(b"#!/bin/sh\necho hi\n", job(MIB)),
        Err(ExecError::NotWasm(_))
    ));
    assert!(matches!(
        executor.run(b"\0asm\x01\0\0\0\x99garbage", job(MIB)),
        Err(ExecError::NotWasm(_))
    ));
    let huge = vec![0u8; executor.config().max_module_bytes + 1];
    assert!(matches!(
        executor.run(&huge, job(MIB)),
        Err(ExecError::TooLarge { .. })
    ));
    let bad_input = Job {
        inputs: vec![("../escape".into(), b"x".to_vec())],
        ..job(MIB)
    };
    assert!(
        executor
            .run(&wat::parse_str(HELLO).unwrap(), bad_input)
            .is_err()
    );
    still_serves(&executor);
}

/// Sleeps `ns` nanoseconds in `poll_oneoff` on the monotonic clock, then exits 0.
fn sleeper(ns: u64) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
          (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "_start")
            ;; one relative clock subscription at 0: clock 1 (monotonic), timeout at 24
            (i32.store (i32.const 16) (i32.const 1))
            (i64.store (i32.const 24) (i64.const {ns}))
            (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))"#
    ))
    .unwrap()
}

/// Runs `wasm` with a 200 ms deadline and checks that it was stopped there, not an hour
/// later (the bound is only there so that a regression fails instead of hanging).
fn stopped_at_200ms(executor: &Executor, wasm: &[u8]) {
    let started = std::time::Instant::now();
    let outcome = executor
        .run(
            wasm,
            Job {
                timeout: Some(Duration::from_millis(200)),
                ..job(MIB)
            },
        )
        .unwrap();
    let failure = outcome.failure.unwrap();
    assert!(failure.contains("deadline of 200ms"), "{failure}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_guest_sleeping_in_a_host_call_is_stopped_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let executor = executor(dir.path());
    stopped_at_200ms(&executor, &sleeper(3_600_000_000_000));
    // The same sleep in the module's start function, which runs while it is instantiated.
    let in_start = wat::parse_str(
        r#"(module
          (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func $sleep
            (i32.store (i32.const 16) (i32.const 1))
            (i64.store (i32.const 24) (i64.const 3600000000000))
            (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128))))
          (start $sleep)
          (func (export "_start")))"#,
    )
    .unwrap();
    stopped_at_200ms(&executor, &in_start);
    // A sleep that ends before the deadline still sleeps, and the guest goes on.
    let short = executor.run(&sleeper(20_000_000), job(MIB)).unwrap();
    assert_eq!((short.exit_code, short.failure), (0, None));
    still_serves(&executor);
}

#[test]
fn a_guest_filling_its_directory_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let executor = executor(dir.path());
    // Creates the file "big" in its directory (fd 3) and writes 64 KiB to it forever.
    let writer = wat::parse_str(
        r#"(module
          (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 2)
          (data (i32.const 0) "big")
          (func (export "_start")
            (drop (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 3)
                              (i32.const 1) (i64.const 0x1fffffff) (i64.const 0x1fffffff)
                              (i32.const 0) (i32.const 8)))
            ;; an iovec at 16: 64 KiB from 65536
            (i32.store (i32.const 16) (i32.const 65536))
            (i32.store (i32.const 20) (i32.const 65536))
            (loop
              (drop (call $write (i32.load (i32.const 8)) (i32.const 16) (i32.const 1) (i32.const 24)))
              (br 0))))"#,
    )
    .unwrap();
    let outcome = executor.run(&writer, job(MIB)).unwrap();
    let failure = outcome.failure.unwrap();
    assert!(
        failure.contains("wrote more than 1048576 bytes"),
        "{failure}"
    );
    // Makes directories "aaa", "baa", … as fast as it can.
    let mkdirs = wat::parse_str(
        r#"(module
          (import "wasi_snapshot_preview1" "path_create_directory" (func $mkdir (param i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "_start") (local $i i32)
            (loop
              (i32.store8 (i32.const 100) (i32.add (i32.const 97) (i32.rem_u (local.get $i) (i32.const 26))))
              (i32.store8 (i32.const 101) (i32.add (i32.const 97) (i32.rem_u (i32.div_u (local.get $i) (i32.const 26)) (i32.const 26))))
              (i32.store8 (i32.const 102) (i32.add (i32.const 97) (i32.rem_u (i32.div_u (local.get $i) (i32.const 676)) (i32.const 26))))
              (drop (call $mkdir (i32.const 3) (i32.const 100) (i32.const 3)))
              (local.set $i (i32.add (local.get $i) (i32.const 1)))
              (br 0))))"#,
    )
    .unwrap();
    let outcome = executor.run(&mkdirs, job(MIB)).unwrap();
    let failure = outcome.failure.unwrap();
    assert!(
        failure.contains("wrote more than 1024 files and directories"),
        "{failure}"
    );
    // Nothing is left behind in the executor's work directory.
    let left = std::fs::read_dir(dir.path().join("jobs")).unwrap().count();
    assert_eq!(left, 0);
    still_serves(&executor);
}

#[test]
fn a_job_never_sees_what_an_earlier_job_left_in_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let executor = executor(dir.path());
    // Opens "secret" in its directory (fd 3) with the flags `oflags`, and exits with
    // path_open's errno (0 if it opened).
    let opener = |oflags: u32| {
        wat::parse_str(format!(
            r#"(module
              (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
              (memory (export "memory") 1)
              (data (i32.const 0) "secret")
              (func (export "_start")
                (call $exit (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 6)
                                        (i32.const {oflags}) (i64.const 0x1fffffff) (i64.const 0x1fffffff)
                                        (i32.const 0) (i32.const 8)))))"#
        ))
        .unwrap()
    };
    let (create, open) = (opener(1), opener(0));
    // Nothing there at first; an empty directory serves the next job.
    assert_eq!(
        executor.run(&open, job(MIB)).unwrap().exit_code,
        44,
        "ENOENT"
    );
    // A job creates the file: it is its output, and the next jobs do not find it.
    let made = executor.run(&create, job(MIB)).unwrap();
    assert_eq!(made.exit_code, 0);
    assert!(made.outputs.contains_key("secret"));
    for _ in 0..2 {
        assert_eq!(
            executor.run(&open, job(MIB)).unwrap().exit_code,
            44,
            "ENOENT"
        );
    }
    // Only the empty directories stay, for the next jobs.
    let kept = std::fs::read_dir(dir.path().join("jobs")).unwrap().count();
    assert_eq!(kept, 1);
}

/// A module that calls `name` (a WASI call taking `params` i32s) only when given an
/// argument, after writing "hello\n"; `imports` adds more imports it never calls.
fn calls_only_with_an_argument(name: &str, params: usize, imports: &str) -> Vec<u8> {
    let params_ty = "i32 ".repeat(params);
    // The first argument 0 (a clock id, a buffer), the others 64 (a length, a buffer).
    let args = format!("(i32.const 0) {}", "(i32.const 64) ".repeat(params - 1));
    wat::parse_str(format!(
        r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "{name}" (func $impure (param {params_ty}) (result i32)))
  {imports}
  (memory (export "memory") 1)
  (data (i32.const 16) "hello\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (drop (call $args_sizes_get (i32.const 32) (i32.const 36)))
    (if (i32.gt_u (i32.load (i32.const 32)) (i32.const 1))
      (then (drop (call $impure {args}))))))
"#
    ))
    .unwrap()
}

#[test]
fn a_run_is_pure_unless_the_guest_reads_a_clock_or_random_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let executor = executor(dir.path());
    let run = |wasm: &[u8], args: &[&str]| {
        let job = Job {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..job(MIB)
        };
        let outcome = executor.run(wasm, job).unwrap();
        assert_eq!(outcome.failure, None);
        assert_eq!(outcome.stdout, b"hello\n");
        outcome.pure
    };
    assert!(run(&wat::parse_str(HELLO).unwrap(), &[]));
    // clock_time_get(id, precision: i64, out): the wall clock (0) and the monotonic (1).
    for clock_id in [0, 1] {
        let clock = wat::parse_str(format!(
            r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (drop (call $args_sizes_get (i32.const 32) (i32.const 36)))
    (if (i32.gt_u (i32.load (i32.const 32)) (i32.const 1))
      (then (drop (call $clock (i32.const {clock_id}) (i64.const 1) (i32.const 64)))))))
"#
        ))
        .unwrap();
        // Importing a clock is not reading it; calling it is.
        assert!(run(&clock, &[]));
        assert!(!run(&clock, &["read"]), "clock {clock_id}");
    }
    let random = calls_only_with_an_argument("random_get", 2, "");
    assert!(run(&random, &[]));
    assert!(!run(&random, &["read"]));
    let clock_res = calls_only_with_an_argument("clock_res_get", 2, "");
    assert!(run(&clock_res, &[]));
    assert!(!run(&clock_res, &["read"]));
    // A module that may ask for file times or a directory's order is never pure.
    let filestat = calls_only_with_an_argument("fd_filestat_get", 2, "");
    assert!(!run(&filestat, &[]));
}

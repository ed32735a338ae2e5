//! The committed example functions (`examples/wasm/*.wasm`, built from `examples/src` by
//! `scripts/build-examples`) run through the executor, with their real outputs checked:
//! echo, sha256 (against the sha2 crate), wordcount and its counts.txt, blur and its
//! blurred.pgm, fft and matmul in bench mode, exit statuses, noop and sleep.
#![allow(clippy::unwrap_used)]

use flotilla_node::executor::{Executor, ExecutorConfig, Job, Outcome};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn wasm(name: &str) -> Vec<u8> {
    let path = examples_dir().join("wasm").join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn job(args: &[&str]) -> Job {
    Job {
        memory_bytes: 128 << 20,
        timeout: Some(Duration::from_secs(20)),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Job::default()
    }
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

/// Runs `name` as `job`, failing the test if it could not run or trapped.
fn run(exec: &Executor, name: &str, job: Job) -> Outcome {
    let outcome = exec.run(&wasm(name), job).unwrap();
    assert_eq!(
        outcome.failure,
        None,
        "{name} failed; stderr: {}",
        String::from_utf8_lossy(&outcome.stderr)
    );
    outcome
}

/// Parses a binary PGM with maxval 255 as (width, height, pixels).
fn parse_pgm(bytes: &[u8]) -> (usize, usize, Vec<u8>) {
    let header_end = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| b.is_ascii_whitespace())
        .map(|(i, _)| i)
        .nth(3)
        .unwrap();
    let header: Vec<&str> = text(&bytes[..header_end]).split_whitespace().collect();
    assert_eq!(header[0], "P5");
    assert_eq!(header[3], "255");
    let (w, h): (usize, usize) = (header[1].parse().unwrap(), header[2].parse().unwrap());
    let pixels = bytes[header_end + 1..].to_vec();
    assert_eq!(pixels.len(), w * h);
    (w, h, pixels)
}

/// An executor with its cache and job directories in a fresh temporary directory (kept
/// for as long as the returned guard lives).
fn executor() -> (tempfile::TempDir, Arc<Executor>) {
    let dir = tempfile::tempdir().unwrap();
    let exec = Executor::new(ExecutorConfig::new(dir.path())).unwrap();
    (dir, exec)
}

#[test]
fn echo_joins_its_arguments_or_copies_stdin() {
    let (_dir, exec) = executor();
    let outcome = run(&exec, "echo", job(&["hello", "flotilla", "a  b"]));
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(text(&outcome.stdout), "hello flotilla a  b\n");

    let stdin: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    let outcome = run(
        &exec,
        "echo",
        Job {
            stdin: stdin.clone(),
            ..job(&[])
        },
    );
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(outcome.stdout, stdin);
    assert!(outcome.outputs.is_empty());
}

#[test]
fn sha256_matches_the_sha2_crate() {
    let (_dir, exec) = executor();
    for input in [
        &b""[..],
        b"abc",
        b"The quick brown fox jumps over the lazy dog",
        &[0x5a; 1000],
        &[7; 64 * 1024 + 55],
    ] {
        let outcome = run(
            &exec,
            "sha256",
            Job {
                stdin: input.to_vec(),
                ..job(&[])
            },
        );
        assert_eq!(outcome.exit_code, 0);
        let expected: String = Sha256::digest(input)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(text(&outcome.stdout), format!("{expected}  -\n"));
        // It reads no clock and no random numbers: its answer may be memoized.
        assert!(outcome.pure);
    }
    let outcome = run(&exec, "sha256", job(&["--bench", "1"]));
    assert_eq!(outcome.exit_code, 0);
    let digest = text(&outcome.stdout).trim_end();
    assert_eq!(digest.len(), 64);
    assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn wordcount_counts_stdin_and_files_and_writes_counts_txt() {
    let (_dir, exec) = executor();
    let outcome = run(
        &exec,
        "wordcount",
        Job {
            stdin: b"one two  three\n\tfour\nfive".to_vec(),
            ..job(&[])
        },
    );
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(text(&outcome.stdout), "2 5 25\n");
    assert_eq!(text(&outcome.outputs["counts.txt"]), "2 5 25\n");

    let words = std::fs::read(examples_dir().join("data/words.txt")).unwrap();
    let lines = words.iter().filter(|&&b| b == b'\n').count();
    let count = text(&words).split_whitespace().count();
    let outcome = run(
        &exec,
        "wordcount",
        Job {
            inputs: vec![
                ("words.txt".into(), words.clone()),
                ("short.txt".into(), b"a b\n".to_vec()),
            ],
            ..job(&["words.txt", "short.txt"])
        },
    );
    assert_eq!(outcome.exit_code, 0);
    let expected = format!(
        "{lines} {count} {} words.txt\n1 2 4 short.txt\n{} {} {} total\n",
        words.len(),
        lines + 1,
        count + 2,
        words.len() + 4
    );
    assert_eq!(text(&outcome.stdout), expected);
    let names: Vec<&str> = outcome.outputs.keys().map(String::as_str).collect();
    assert_eq!(names, ["counts.txt"], "the inputs are not outputs");
    assert_eq!(text(&outcome.outputs["counts.txt"]), expected);

    let outcome = run(&exec, "wordcount", job(&["missing.txt"]));
    assert_eq!(outcome.exit_code, 1);
    assert!(text(&outcome.stderr).contains("missing.txt"));
}

#[test]
fn blur_writes_a_blurred_pgm_of_the_same_size() {
    let (_dir, exec) = executor();
    let sample = std::fs::read(examples_dir().join("data/sample.pgm")).unwrap();
    let (w, h, before) = parse_pgm(&sample);
    let outcome = run(
        &exec,
        "blur",
        Job {
            inputs: vec![("input.pgm".into(), sample)],
            ..job(&[])
        },
    );
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(
        text(&outcome.stdout),
        format!("blurred {w}x{h} in 3 passes\n")
    );
    let names: Vec<&str> = outcome.outputs.keys().map(String::as_str).collect();
    assert_eq!(names, ["blurred.pgm"]);
    let (bw, bh, after) = parse_pgm(&outcome.outputs["blurred.pgm"]);
    assert_eq!((bw, bh), (w, h));
    // Blurring smooths: the sum of differences between horizontal neighbours falls.
    let roughness = |p: &[u8]| -> u64 {
        p.chunks(w)
            .flat_map(|row| row.windows(2).map(|x| x[0].abs_diff(x[1]) as u64))
            .sum()
    };
    assert!(roughness(&after) * 2 < roughness(&before));

    // A named file and a pass count; a flat image stays flat.
    let mut flat = b"P5\n# a comment\n4 3\n255\n".to_vec();
    flat.extend([77u8; 12]);
    let outcome = run(
        &exec,
        "blur",
        Job {
            inputs: vec![("flat.pgm".into(), flat)],
            ..job(&["flat.pgm", "5"])
        },
    );
    assert_eq!(text(&outcome.stdout), "blurred 4x3 in 5 passes\n");
    assert_eq!(parse_pgm(&outcome.outputs["blurred.pgm"]).2, [77u8; 12]);

    for bad in [
        &b"P6\n2 2\n255\n............"[..],
        b"P5\n2 2\n255\nabc",
        b"P5\n2 2\n65535\nabcdefgh",
        b"P5\nx 2\n255\nabcd",
    ] {
        let outcome = run(
            &exec,
            "blur",
            Job {
                inputs: vec![("input.pgm".into(), bad.to_vec())],
                ..job(&[])
            },
        );
        assert_eq!(outcome.exit_code, 1, "{}", String::from_utf8_lossy(bad));
        assert!(text(&outcome.stderr).starts_with("blur: input.pgm: "));
        assert!(outcome.outputs.is_empty());
    }
    let outcome = run(&exec, "blur", job(&[]));
    assert_eq!(outcome.exit_code, 1, "no input.pgm");
    assert!(text(&outcome.stderr).contains("cannot read"));

    let outcome = run(&exec, "blur", job(&["--bench", "1"]));
    assert_eq!(outcome.exit_code, 0);
    assert!(text(&outcome.stdout).starts_with("checksum "));
}

#[test]
fn fft_and_matmul_compute() {
    let (_dir, exec) = executor();
    // The spectrum of [1, 2, 3, 4]: |10|, |-2+2i|, |-2|, |-2-2i|.
    let outcome = run(
        &exec,
        "fft",
        Job {
            stdin: b"1 2\n3\t4\n".to_vec(),
            ..job(&[])
        },
    );
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(
        text(&outcome.stdout),
        "10.000000\n2.828427\n2.000000\n2.828427\n"
    );
    // An impulse, zero-padded to 8, has a flat spectrum.
    let outcome = run(
        &exec,
        "fft",
        Job {
            stdin: b"1 0 0 0 0".to_vec(),
            ..job(&[])
        },
    );
    assert_eq!(text(&outcome.stdout), "1.000000\n".repeat(8));
    let outcome = run(
        &exec,
        "fft",
        Job {
            stdin: b"1 two".to_vec(),
            ..job(&[])
        },
    );
    assert_eq!(outcome.exit_code, 1);

    let outcome = run(&exec, "fft", job(&["--bench", "2"]));
    assert_eq!(outcome.exit_code, 0);
    let checksum: f64 = text(&outcome.stdout)
        .trim_end()
        .strip_prefix("checksum ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(checksum > 0.0);

    // The same product computed here, in the same order, prints the same digits.
    for n in [2usize, 64] {
        let a = |i: usize, j: usize| ((i * 31 + j * 17) % 101) as f64 / 50.0 - 1.0;
        let b = |i: usize, j: usize| ((i * 13 + j * 7) % 97) as f64 / 48.0 - 1.0;
        let mut c = vec![0.0f64; n * n];
        for i in 0..n {
            for k in 0..n {
                for j in 0..n {
                    c[i * n + j] += a(i, k) * b(k, j);
                }
            }
        }
        let checksum: f64 = c.iter().sum();
        let outcome = run(&exec, "matmul", job(&["--bench", &n.to_string()]));
        assert_eq!(outcome.exit_code, 0);
        assert_eq!(text(&outcome.stdout), format!("checksum {checksum:.6}\n"));
    }
    let outcome = run(&exec, "matmul", job(&[]));
    assert_eq!(outcome.exit_code, 2);
    assert!(text(&outcome.stderr).starts_with("usage: matmul"));
}

#[test]
fn exit_returns_its_status_and_noop_exits_zero() {
    let (_dir, exec) = executor();
    for status in [0, 1, 3, 42, 125] {
        let arg = status.to_string();
        let outcome = run(&exec, "exit", job(&[&arg]));
        assert_eq!(outcome.exit_code, status);
        assert_eq!(text(&outcome.stderr), format!("exiting with {status}\n"));
    }
    // WASI statuses stop at 125; wasmtime reports a larger one as a failed run.
    let outcome = exec.run(&wasm("exit"), job(&["200"])).unwrap();
    assert_eq!(outcome.exit_code, -1);
    assert!(outcome.failure.is_some());

    let outcome = run(&exec, "noop", job(&[]));
    assert_eq!(outcome.exit_code, 0);
    assert!(outcome.stdout.is_empty() && outcome.stderr.is_empty());
    assert!(outcome.outputs.is_empty());
}

#[test]
fn sleep_waits_at_least_its_milliseconds_and_refuses_bad_ones() {
    let (_dir, exec) = executor();
    let started = std::time::Instant::now();
    let outcome = run(&exec, "sleep", job(&["50"]));
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(text(&outcome.stdout), "slept 50 ms\n");
    // Sleeping waits on the host's time (`poll_oneoff`): never memoized.
    assert!(!outcome.pure);
    for bad in ["-1", "x", "600001"] {
        let outcome = run(&exec, "sleep", job(&[bad]));
        assert_eq!(outcome.exit_code, 2, "{bad}");
        assert!(text(&outcome.stderr).starts_with("sleep: MS must be"));
    }
}

//! Wasm against native: the CPU kernels of `examples/src` (sha256, blur, fft, matmul in
//! `--bench` mode), each built natively and for wasm32-wasi by the same clang at -O2
//! (`scripts/build-examples --native target/native-examples`, run here if the native
//! binaries are missing or older than their sources). The native binary runs as a
//! process; the committed `examples/wasm` module runs through [`Executor::run`], warmed
//! once first so compiling is excluded. Median of 3 wall-clock runs each; both must print
//! the same checksum. Prints a Markdown table (the only lines starting with `|`);
//! `scripts/bench kernels` records it in docs/benchmarks.md.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use flotilla_node::executor::{Executor, ExecutorConfig, Job};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const RUNS: usize = 3;

/// A kernel: its example, its `--bench` argument, and what that means.
struct Kernel {
    name: &'static str,
    arg: &'static str,
    what: &'static str,
}

/// Sizes chosen so each native run takes roughly 0.3–1 s on the 2-core reference machine.
const KERNELS: [Kernel; 4] = [
    Kernel {
        name: "sha256",
        arg: "128",
        what: "128 MiB",
    },
    Kernel {
        name: "blur",
        arg: "400",
        what: "1024×1024, 400 passes",
    },
    Kernel {
        name: "fft",
        arg: "400",
        what: "65536 points, 400 times",
    },
    Kernel {
        name: "matmul",
        arg: "1280",
        what: "1280×1280 doubles",
    },
];

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The native binaries, built if any is missing or older than its source.
fn native_dir(root: &Path) -> PathBuf {
    let dir = root.join("target/native-examples");
    let stale = KERNELS.iter().any(|k| {
        let modified = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let source = modified(root.join(format!("examples/src/{}.c", k.name)));
        let binary = modified(dir.join(k.name));
        binary.is_none() || binary < source
    });
    if stale {
        eprintln!(
            "building the native examples: scripts/build-examples --native target/native-examples"
        );
        let status = Command::new(root.join("scripts/build-examples"))
            .args(["--native", "target/native-examples"])
            .current_dir(root)
            .stdout(std::process::Stdio::from(std::io::stderr()))
            .status()
            .unwrap_or_else(|e| panic!("cannot run scripts/build-examples: {e}"));
        assert!(
            status.success(),
            "scripts/build-examples --native target/native-examples failed ({status}); \
             it needs clang, lld, wasi-libc and libclang-rt-14-dev-wasm32"
        );
    }
    dir
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let native = native_dir(&root);
    let data = tempfile::tempdir().unwrap();
    let exec = Executor::new(ExecutorConfig::new(data.path())).unwrap();
    // The same executor with no epoch checks in the compiled code: what the deadline in
    // wasm code costs (the node never runs this way).
    let unchecked = Executor::new(ExecutorConfig {
        interruptible: false,
        ..ExecutorConfig::new(&data.path().join("unchecked"))
    })
    .unwrap();
    let job = |arg: &str| Job {
        memory_bytes: 512 << 20,
        timeout: Some(Duration::from_secs(300)),
        args: vec!["--bench".into(), arg.into()],
        ..Job::default()
    };

    println!(
        "| kernel | native (ms) | wasm (ms) | wasm / native | wasm without epoch checks (ms) | … / native |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut log_ratios = 0.0;
    let mut log_unchecked = 0.0;
    for kernel in &KERNELS {
        let mut native_times = Vec::new();
        let mut native_out = Vec::new();
        for _ in 0..RUNS {
            let started = Instant::now();
            let output = Command::new(native.join(kernel.name))
                .args(["--bench", kernel.arg])
                .output()
                .unwrap();
            native_times.push(started.elapsed());
            assert!(output.status.success(), "native {} failed", kernel.name);
            native_out = output.stdout;
        }

        let wasm = std::fs::read(root.join(format!("examples/wasm/{}.wasm", kernel.name))).unwrap();
        let time_wasm = |exec: &Executor| {
            let warm = exec.run(&wasm, job("1")).unwrap();
            assert!(warm.timings.compiled, "the warm-up compiles the module");
            let mut times = Vec::new();
            let mut out = Vec::new();
            for _ in 0..RUNS {
                let started = Instant::now();
                let outcome = exec.run(&wasm, job(kernel.arg)).unwrap();
                times.push(started.elapsed());
                assert!(
                    outcome.exit_code == 0 && outcome.failure.is_none(),
                    "wasm {} failed: {:?}",
                    kernel.name,
                    outcome.failure
                );
                assert!(!outcome.timings.compiled, "compiling is excluded");
                out = outcome.stdout;
            }
            (median(times), out)
        };
        let (w, wasm_out) = time_wasm(&exec);
        let (u, unchecked_out) = time_wasm(&unchecked);
        assert_eq!(wasm_out, unchecked_out, "{}", kernel.name);
        let checksum = String::from_utf8_lossy(&native_out).trim_end().to_string();
        assert_eq!(
            native_out,
            wasm_out,
            "{}: native printed {checksum:?}, wasm {:?}",
            kernel.name,
            String::from_utf8_lossy(&wasm_out).trim_end()
        );
        let n = median(native_times);
        let ratio = w.as_secs_f64() / n.as_secs_f64();
        let unchecked_ratio = u.as_secs_f64() / n.as_secs_f64();
        log_ratios += ratio.ln();
        log_unchecked += unchecked_ratio.ln();
        eprintln!("{}: {checksum} (both)", kernel.name);
        println!(
            "| {} ({}) | {:.0} | {:.0} | {ratio:.2} | {:.0} | {unchecked_ratio:.2} |",
            kernel.name,
            kernel.what,
            n.as_secs_f64() * 1e3,
            w.as_secs_f64() * 1e3,
            u.as_secs_f64() * 1e3
        );
    }
    let mean = (log_ratios / KERNELS.len() as f64).exp();
    let unchecked_mean = (log_unchecked / KERNELS.len() as f64).exp();
    println!("| geometric mean | | | {mean:.2} | | {unchecked_mean:.2} |");
}

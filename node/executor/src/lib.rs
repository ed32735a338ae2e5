//! The sandboxed WebAssembly executor: wasmtime with WASI preview 1, for strangers' code.
//!
//! A job runs a WASI command module (`_start`) with its stdin, args and env, stdout and
//! stderr captured (each bounded), and a fresh job directory preopened as `.` holding the
//! named inputs; files it leaves there are the outputs. The guest cannot hurt the host:
//!
//! * its memory is limited to the reserved amount (`StoreLimits`; growing past it fails
//!   inside the guest, as `memory.grow` returning -1), with one instance, one memory and
//!   bounded tables;
//! * a deadline is enforced wherever the guest is: in wasm code by epoch interruption
//!   ([`watchdog`]; a ticker thread advances the epoch every [`TICK`]), so a guest that
//!   loops forever is stopped; in a host call by a timeout around the run, which is
//!   asynchronous (WASI's async implementation on a fiber), so a guest blocked in
//!   `poll_oneoff` — sleeping for a year, say — is dropped at its deadline too;
//! * what it writes is bounded: stdout and stderr, and its job directory, measured while
//!   it runs — more bytes or entries than allowed stop it; stdout, stderr and output
//!   files are also bounded by its reservation, as they are held in the host's memory;
//! * modules are bounded in size and compile time; unknown imports are refused when the
//!   module is loaded; deep recursion traps on wasmtime's stack limit;
//! * traps are reported as a failed run with the trap message, never as a host error;
//! * compiled modules are cached by module hash and engine compatibility hash
//!   ([`cache`]), and instances come from a pooling allocator when the host allows one.
//!
//! [`Executor::run`] blocks; call it from `spawn_blocking`. The crate knows nothing of the
//! network or the market: it runs one job it is handed (the node's `market` fetches what
//! the job needs and decides whether it may run).

pub mod cache;
pub mod jobdir;
pub mod purity;
pub mod watchdog;

use cache::{ModuleCache, module_key};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, Store, StoreLimits, StoreLimitsBuilder, Trap,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};
use watchdog::{QuotaExceeded, Watch};

/// How the failure of a guest stopped at its deadline begins.
pub const DEADLINE_FAILURE: &str = "stopped at its deadline";
/// How often the epoch advances: the granularity of deadlines.
pub const TICK: Duration = Duration::from_millis(5);
/// The most memory a wasm32 guest can address.
const WASM32_MAX_MEMORY: u64 = 4 * 1024 * 1024 * 1024;
/// Instances the pooling allocator keeps ready: the most guests that run at once.
pub const POOL_SLOTS: u32 = 64;
/// Most compilations at once, those given up on at their timeout included (their threads
/// run on until the compiler returns); more wait for a place, at most the compile timeout.
const MAX_COMPILES: usize = 2;

/// Settings of the executor.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Where compiled modules are cached.
    pub cache_dir: PathBuf,
    /// Where job directories are made.
    pub work_dir: PathBuf,
    /// Largest module accepted, in bytes (default 16 MiB).
    pub max_module_bytes: usize,
    /// Deadline of a job that names none (default 30 s).
    pub default_timeout: Duration,
    /// Longest deadline a job may ask for (default 10 min).
    pub max_timeout: Duration,
    /// Longest a module may take to compile (default 30 s).
    pub compile_timeout: Duration,
    /// Most bytes kept of stdout, and of stderr (default 16 MiB each).
    pub max_stdio_bytes: usize,
    /// Most bytes of output files (default 256 MiB).
    pub max_output_bytes: u64,
    /// Most files and directories in a job directory, inputs included (default 1024).
    pub max_dir_entries: usize,
    /// Whether compiled code checks the epoch (default `true`). Turn it off only to
    /// measure what deadlines cost (the kernels benchmark): without it a guest that loops
    /// in wasm code runs past its deadline — forever, if it never returns — and its
    /// directory is not measured while it runs. The node never turns it off.
    pub interruptible: bool,
}

impl ExecutorConfig {
    /// Defaults, with the cache and job directories under `data_dir`.
    pub fn new(data_dir: &std::path::Path) -> ExecutorConfig {
        ExecutorConfig {
            cache_dir: data_dir.join("compiled"),
            work_dir: data_dir.join("jobs"),
            max_module_bytes: 16 * 1024 * 1024,
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(600),
            compile_timeout: Duration::from_secs(30),
            max_stdio_bytes: 16 * 1024 * 1024,
            max_output_bytes: 256 * 1024 * 1024,
            max_dir_entries: 1024,
            interruptible: true,
        }
    }
}

/// Why a module could not be run at all (as opposed to running and failing).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The module is over the size limit.
    #[error("the module is {size} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a valid WebAssembly module.
    #[error("not a WebAssembly module: {0}")]
    NotWasm(String),
    /// The module is valid but cannot run here (unknown imports, no `_start`).
    #[error("module refused: {0}")]
    Refused(String),
    /// Compiling took too long.
    #[error("compiling the module took longer than {0:?}")]
    CompileTimeout(Duration),
    /// The job asks for something impossible.
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// The job directory failed.
    #[error(transparent)]
    JobDir(#[from] jobdir::JobDirError),
    /// The executor itself failed.
    #[error("executor: {0}")]
    Internal(String),
}

/// One run of a module.
#[derive(Debug, Clone, Default)]
pub struct Job {
    /// Memory the guest may use, in bytes (the reservation).
    pub memory_bytes: u64,
    /// Deadline (the executor's default if `None`).
    pub timeout: Option<Duration>,
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Bytes on stdin.
    pub stdin: Vec<u8>,
    /// Files placed in the job directory, by name.
    pub inputs: Vec<(String, Vec<u8>)>,
}

/// Where the time of a run went.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    /// Compiling the module, or loading it from the cache, in µs.
    pub load_us: u64,
    /// Whether it was compiled now (not found in the cache).
    pub compiled: bool,
    /// Instantiating it, in µs.
    pub instantiate_us: u64,
    /// Running `_start`, in µs.
    pub execute_us: u64,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The exit status (`proc_exit`'s, 0 when `_start` returns, -1 after a trap).
    pub exit_code: i32,
    /// What it wrote on stdout (at most the configured bound).
    pub stdout: Vec<u8>,
    /// What it wrote on stderr (at most the configured bound).
    pub stderr: Vec<u8>,
    /// Files it left in its directory, by relative path.
    pub outputs: std::collections::BTreeMap<String, Vec<u8>>,
    /// Why it failed, when it trapped or ran past its deadline.
    pub failure: Option<String>,
    /// Where the time went.
    pub timings: Timings,
    /// Whether its outcome depends only on the job ([`purity`]): it read no clock and no
    /// random numbers, and its module imports no call whose answer differs between hosts.
    pub pure: bool,
}

/// What a guest's store holds: its WASI context, its limits and its watch.
pub struct GuestState {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
    watch: Watch,
}

/// The executor; share it behind an `Arc`.
pub struct Executor {
    engine: Engine,
    linker: Linker<GuestState>,
    cache: ModuleCache,
    config: ExecutorConfig,
    /// Places for compilations.
    compiling: Arc<CompileSlots>,
    /// Job directories left empty by the jobs before, for the next ones.
    spare_dirs: jobdir::SpareDirs,
}

/// A counting semaphore for compilations, which run on threads of their own.
#[derive(Default)]
struct CompileSlots {
    running: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

impl CompileSlots {
    /// Takes a place, waiting at most `patience`; `false` if none was freed in time.
    fn take(&self, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        while *running >= MAX_COMPILES {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            running = self
                .freed
                .wait_timeout(running, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *running += 1;
        true
    }

    /// Gives a place back.
    fn give_back(&self) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.freed.notify_one();
    }
}

fn engine_config(pooling: bool, interruptible: bool) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(interruptible);
    // Relaxed SIMD gives the same answers on every host, so that a pure run's result
    // does not depend on which CPU ran it (memoized results).
    config.relaxed_simd_deterministic(true);
    config.max_wasm_stack(1024 * 1024);
    if pooling {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(POOL_SLOTS)
            .total_stacks(POOL_SLOTS)
            .total_memories(POOL_SLOTS)
            .total_tables(POOL_SLOTS)
            .max_memories_per_module(1)
            .max_tables_per_module(4)
            .max_memory_size(WASM32_MAX_MEMORY as usize)
            .table_elements(100_000)
            .total_component_instances(0);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

impl Executor {
    /// Builds the engine (pooling instances if the host allows the reservation), the
    /// WASI linker, the cache, and starts the epoch ticker.
    pub fn new(config: ExecutorConfig) -> Result<Arc<Executor>, ExecError> {
        let engine = match Engine::new(&engine_config(true, config.interruptible)) {
            Ok(engine) => engine,
            Err(e) => {
                tracing::warn!(error = %e, "pooling allocator unavailable; allocating instances on demand");
                Engine::new(&engine_config(false, config.interruptible))
                    .map_err(|e| ExecError::Internal(e.to_string()))?
            }
        };
        let mut linker: Linker<GuestState> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut GuestState| &mut s.wasi)
            .map_err(|e| ExecError::Internal(e.to_string()))?;
        let cache = ModuleCache::open(&config.cache_dir, &engine)
            .map_err(|e| ExecError::Internal(format!("cache: {e}")))?;
        std::fs::create_dir_all(&config.work_dir)
            .and_then(|()| remove_leftovers(&config.work_dir))
            .map_err(|e| ExecError::Internal(format!("work dir: {e}")))?;
        start_ticker(&engine);
        Ok(Arc::new(Executor {
            engine,
            linker,
            cache,
            config,
            compiling: Arc::default(),
            spare_dirs: jobdir::SpareDirs::default(),
        }))
    }

    /// The settings.
    pub fn config(&self) -> &ExecutorConfig {
        &self.config
    }

    /// Compiles (or loads) a module and checks that it can run here: valid, a WASI
    /// command, importing nothing but WASI preview 1. Returns it ready to instantiate,
    /// and whether it was compiled now.
    pub fn prepare(&self, wasm: &[u8]) -> Result<(InstancePre<GuestState>, bool), ExecError> {
        if wasm.len() > self.config.max_module_bytes {
            return Err(ExecError::TooLarge {
                size: wasm.len(),
                max: self.config.max_module_bytes,
            });
        }
        let key = module_key(wasm);
        let (module, compiled) = match self.cache.get(&self.engine, &key) {
            Some(module) => (module, false),
            None => self.compile(wasm, &key)?,
        };
        if module.get_export("_start").is_none() {
            return Err(ExecError::Refused(
                "the module exports no _start (it is not a WASI command)".into(),
            ));
        }
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| ExecError::Refused(one_line(&format!("{e:#}"))))?;
        Ok((pre, compiled))
    }

    /// Compiles on a separate thread once a place is free (unless a call that waited for
    /// a place before this one compiled the same module meanwhile), caches the result,
    /// and gives up after the compile timeout. Returns the module and whether it was
    /// compiled now.
    fn compile(&self, wasm: &[u8], key: &str) -> Result<(Module, bool), ExecError> {
        if !wasm.starts_with(b"\0asm") {
            return Err(ExecError::NotWasm(
                "it does not start with the WebAssembly magic number".into(),
            ));
        }
        if !self.compiling.take(self.config.compile_timeout) {
            return Err(ExecError::Internal(format!(
                "busy: {MAX_COMPILES} modules were being compiled for {:?}",
                self.config.compile_timeout
            )));
        }
        if let Some(module) = self.cache.get(&self.engine, key) {
            self.compiling.give_back();
            return Ok((module, false));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let engine = self.engine.clone();
        let bytes = wasm.to_vec();
        let slots = self.compiling.clone();
        let spawned = std::thread::Builder::new()
            .name("flotilla-compile".into())
            .spawn(move || {
                let module = Module::new(&engine, &bytes);
                // The place is free before the answer goes out.
                slots.give_back();
                let _ = tx.send(module);
            });
        if let Err(e) = spawned {
            self.compiling.give_back();
            return Err(ExecError::Internal(e.to_string()));
        }
        match rx.recv_timeout(self.config.compile_timeout) {
            Ok(Ok(module)) => {
                self.cache.put(key, &module);
                Ok((module, true))
            }
            Ok(Err(e)) => Err(ExecError::NotWasm(one_line(&format!("{e:#}")))),
            Err(_) => Err(ExecError::CompileTimeout(self.config.compile_timeout)),
        }
    }

    /// Runs `wasm` as `job` asks. A guest that traps, exits non-zero or runs past its
    /// deadline is an `Ok` outcome saying so; an `Err` means it could not run at all.
    ///
    /// Blocks the calling thread: call it from `spawn_blocking` (or `block_in_place`),
    /// never from async code directly, or it panics.
    pub fn run(&self, wasm: &[u8], job: Job) -> Result<Outcome, ExecError> {
        let timeout = job.timeout.unwrap_or(self.config.default_timeout);
        if timeout > self.config.max_timeout || timeout.is_zero() {
            return Err(ExecError::InvalidJob(format!(
                "a timeout of {timeout:?} is outside (0, {:?}]",
                self.config.max_timeout
            )));
        }
        if job.memory_bytes == 0 {
            return Err(ExecError::InvalidJob("no memory reserved".into()));
        }
        for (name, _) in &job.inputs {
            jobdir::check_name(name)?;
        }
        let started = Instant::now();
        let (pre, compiled) = self.prepare(wasm)?;
        let load_us = started.elapsed().as_micros() as u64;

        let dir = self
            .spare_dirs
            .take(&self.config.work_dir)
            .map_err(|e| ExecError::Internal(format!("job directory: {e}")))?;
        jobdir::write_inputs(dir.path(), &job.inputs)?;
        // What the guest leaves is held in the host's memory: bounded by its reservation.
        let stdio_bytes = self.config.max_stdio_bytes.min(job.memory_bytes as usize);
        let stdout = MemoryOutputPipe::new(stdio_bytes);
        let stderr = MemoryOutputPipe::new(stdio_bytes);
        let input_bytes: u64 = job.inputs.iter().map(|(_, b)| b.len() as u64).sum();
        let dir_bytes = input_bytes + self.config.max_output_bytes.min(job.memory_bytes);
        let mut argv = vec!["main".to_string()];
        argv.extend(job.args.iter().cloned());
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdin(MemoryInputPipe::new(job.stdin.clone()))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .args(&argv)
            .envs(&job.env);
        let witness = purity::watch(&mut wasi);
        wasi.preopened_dir(dir.path(), ".", FsPerms::ReadWrite)
            .map_err(|e| ExecError::Internal(format!("job directory: {e}")))?;
        let limits = StoreLimitsBuilder::new()
            .memory_size(job.memory_bytes.min(WASM32_MAX_MEMORY) as usize)
            .instances(1)
            .memories(1)
            .tables(4)
            .table_elements(100_000)
            .trap_on_grow_failure(false)
            .build();
        let mut store = Store::new(
            &self.engine,
            GuestState {
                wasi: wasi.build_p1(),
                limits,
                watch: Watch {
                    deadline: Instant::now() + timeout,
                    dir: dir.path().to_path_buf(),
                    max_bytes: dir_bytes,
                    max_entries: self.config.max_dir_entries,
                    free_at_start: watchdog::free_disk(dir.path()),
                },
            },
        );
        store.limiter(|s| &mut s.limits);
        if self.config.interruptible {
            store.set_epoch_deadline(watchdog::CHECK_EVERY);
            store.epoch_deadline_callback(|store| store.data().watch.on_epoch());
        }

        let instantiating = Instant::now();
        let mut timings = Timings {
            load_us,
            compiled,
            ..Timings::default()
        };
        let deadline = store.data().watch.deadline;
        // Instantiating runs the module's start function, if it has one: the guest runs
        // from here on, so under its deadline too.
        let instance = block_on(by_deadline(deadline, pre.instantiate_async(&mut store)))?;
        timings.instantiate_us = instantiating.elapsed().as_micros() as u64;
        let ending = match instance {
            Err(e) => Ending::of(e, timeout, "cannot instantiate"),
            Ok(instance) => {
                let executing = Instant::now();
                let result = block_on(async {
                    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                    by_deadline(deadline, start.call_async(&mut store, ())).await
                })?;
                timings.execute_us = executing.elapsed().as_micros() as u64;
                match result {
                    Ok(()) => Ending::default(),
                    Err(e) => Ending::of(e, timeout, "trapped"),
                }
            }
        };
        let Ending {
            exit_code,
            failure,
            over_quota,
        } = ending;
        drop(store);
        let outputs = if over_quota {
            // Stopped for what it wrote: there is nothing to collect.
            Default::default()
        } else {
            jobdir::collect_outputs(
                dir.path(),
                &job.inputs,
                dir_bytes,
                self.config.max_dir_entries,
            )?
        };
        // Only a directory the guest left empty serves again; any other is removed.
        self.spare_dirs.give_back(dir);
        let pure = !witness.seen() && !purity::imports_host_dependent(pre.module());
        Ok(Outcome {
            pure,
            exit_code,
            stdout: stdout.contents().to_vec(),
            stderr: stderr.contents().to_vec(),
            outputs,
            failure,
            timings,
        })
    }
}

/// How a guest's run ended.
#[derive(Debug, Default)]
struct Ending {
    exit_code: i32,
    failure: Option<String>,
    /// Stopped for what it wrote (its outputs are not collected).
    over_quota: bool,
}

impl Ending {
    /// The ending an error of the guest's means: its exit status, its deadline, its
    /// quota, or a trap (`what` says which step trapped).
    fn of(e: wasmtime::Error, timeout: Duration, what: &str) -> Ending {
        let failed = |failure: String| Ending {
            exit_code: -1,
            failure: Some(failure),
            over_quota: false,
        };
        if let Some(exit) = e.downcast_ref::<I32Exit>() {
            Ending {
                exit_code: exit.0,
                ..Ending::default()
            }
        } else if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            failed(format!("{DEADLINE_FAILURE} of {timeout:?}"))
        } else if e.downcast_ref::<QuotaExceeded>().is_some() {
            Ending {
                over_quota: true,
                ..failed(one_line(&format!("stopped: {e:#}")))
            }
        } else {
            failed(one_line(&format!("{what}: {e:#}")))
        }
    }
}

/// `step` of a guest, dropped at `deadline` if it has not finished: in wasm code the
/// epoch callback stops the guest at its deadline, this stops it in a host call.
async fn by_deadline<T>(
    deadline: Instant,
    step: impl std::future::Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    match tokio::time::timeout_at(deadline.into(), step).await {
        Ok(result) => result,
        Err(_) => Err(Trap::Interrupt.into()),
    }
}

/// Runs `future` to completion on this thread: on the current Tokio runtime when there
/// is one (the executor runs in `spawn_blocking`), else on a runtime of this thread's.
fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, ExecError> {
    thread_local! {
        static RUNTIME: std::io::Result<tokio::runtime::Runtime> =
            tokio::runtime::Builder::new_current_thread().enable_time().build();
    }
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => Ok(handle.block_on(future)),
        Err(_) => RUNTIME.with(|runtime| match runtime {
            Ok(runtime) => Ok(runtime.block_on(future)),
            Err(e) => Err(ExecError::Internal(format!(
                "no runtime for the guest: {e}"
            ))),
        }),
    }
}

/// Removes the job directories a previous run of the node left (it stopped mid-job).
fn remove_leftovers(work_dir: &std::path::Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(work_dir)? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Advances the engine's epoch every [`TICK`] until the engine is dropped.
fn start_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("flotilla-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(TICK);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the epoch ticker; deadlines will not be enforced");
    }
}

/// `text` on one line, runs of whitespace (newlines included) made single spaces: how
/// wasmtime's multi-line errors are reported.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

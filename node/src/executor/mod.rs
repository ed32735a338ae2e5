//! The sandboxed WebAssembly executor: wasmtime with WASI preview 1, for strangers' code.
//!
//! A job runs a WASI command module (`_start`) with its stdin, args and env, stdout and
//! stderr captured (each bounded), and a fresh job directory preopened as `.` holding the
//! named inputs; files it leaves there are the outputs. The guest cannot hurt the host:
//!
//! * its memory is limited to the reserved amount (`StoreLimits`; growing past it fails
//!   inside the guest, as `memory.grow` returning -1), with one instance, one memory and
//!   bounded tables;
//! * a deadline is enforced by epoch interruption (a ticker thread advances the epoch
//!   every [`TICK`]), so a guest that loops forever is stopped;
//! * modules are bounded in size and compile time; unknown imports are refused when the
//!   module is loaded; deep recursion traps on wasmtime's stack limit;
//! * traps are reported as a failed run with the trap message, never as a host error;
//! * compiled modules are cached by module hash and engine compatibility hash
//!   ([`cache`]), and instances come from a pooling allocator when the host allows one.
//!
//! [`Executor::run`] blocks; call it from `spawn_blocking`.

pub mod cache;
pub mod jobdir;

use crate::one_line;
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

/// How the failure of a guest stopped at its deadline begins.
pub const DEADLINE_FAILURE: &str = "stopped at its deadline";
/// How often the epoch advances: the granularity of deadlines.
pub const TICK: Duration = Duration::from_millis(5);
/// The most memory a wasm32 guest can address.
const WASM32_MAX_MEMORY: u64 = 4 * 1024 * 1024 * 1024;
/// Instances the pooling allocator keeps ready.
const POOL_SLOTS: u32 = 64;

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
}

/// What a guest's store holds: its WASI context and its limits.
pub struct GuestState {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

/// The executor; share it behind an `Arc`.
pub struct Executor {
    engine: Engine,
    linker: Linker<GuestState>,
    cache: ModuleCache,
    config: ExecutorConfig,
}

fn engine_config(pooling: bool) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.max_wasm_stack(1024 * 1024);
    if pooling {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(POOL_SLOTS)
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
        let engine = match Engine::new(&engine_config(true)) {
            Ok(engine) => engine,
            Err(e) => {
                tracing::warn!(error = %e, "pooling allocator unavailable; allocating instances on demand");
                Engine::new(&engine_config(false))
                    .map_err(|e| ExecError::Internal(e.to_string()))?
            }
        };
        let mut linker: Linker<GuestState> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut GuestState| &mut s.wasi)
            .map_err(|e| ExecError::Internal(e.to_string()))?;
        let cache = ModuleCache::open(&config.cache_dir, &engine)
            .map_err(|e| ExecError::Internal(format!("cache: {e}")))?;
        std::fs::create_dir_all(&config.work_dir)
            .map_err(|e| ExecError::Internal(format!("work dir: {e}")))?;
        start_ticker(&engine);
        Ok(Arc::new(Executor {
            engine,
            linker,
            cache,
            config,
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
            None => {
                let module = self.compile(wasm)?;
                self.cache.put(&key, &module);
                (module, true)
            }
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

    /// Compiles on a separate thread, giving up after the compile timeout.
    fn compile(&self, wasm: &[u8]) -> Result<Module, ExecError> {
        if !wasm.starts_with(b"\0asm") {
            return Err(ExecError::NotWasm(
                "it does not start with the WebAssembly magic number".into(),
            ));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let engine = self.engine.clone();
        let bytes = wasm.to_vec();
        std::thread::Builder::new()
            .name("flotilla-compile".into())
            .spawn(move || {
                let _ = tx.send(Module::new(&engine, &bytes));
            })
            .map_err(|e| ExecError::Internal(e.to_string()))?;
        match rx.recv_timeout(self.config.compile_timeout) {
            Ok(Ok(module)) => Ok(module),
            Ok(Err(e)) => Err(ExecError::NotWasm(one_line(&format!("{e:#}")))),
            Err(_) => Err(ExecError::CompileTimeout(self.config.compile_timeout)),
        }
    }

    /// Runs `wasm` as `job` asks. A guest that traps, exits non-zero or runs past its
    /// deadline is an `Ok` outcome saying so; an `Err` means it could not run at all.
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

        let dir = tempfile::tempdir_in(&self.config.work_dir)
            .map_err(|e| ExecError::Internal(format!("job directory: {e}")))?;
        jobdir::write_inputs(dir.path(), &job.inputs)?;
        let stdout = MemoryOutputPipe::new(self.config.max_stdio_bytes);
        let stderr = MemoryOutputPipe::new(self.config.max_stdio_bytes);
        let mut argv = vec!["main".to_string()];
        argv.extend(job.args.iter().cloned());
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdin(MemoryInputPipe::new(job.stdin.clone()))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .args(&argv)
            .envs(&job.env);
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
            },
        );
        store.limiter(|s| &mut s.limits);
        let ticks = timeout.as_nanos().div_ceil(TICK.as_nanos()) as u64 + 1;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();

        let instantiating = Instant::now();
        let mut timings = Timings {
            load_us,
            compiled,
            ..Timings::default()
        };
        let instance = pre.instantiate(&mut store);
        timings.instantiate_us = instantiating.elapsed().as_micros() as u64;
        let (exit_code, failure) = match instance {
            Err(e) => (
                -1,
                Some(format!(
                    "cannot instantiate: {}",
                    one_line(&format!("{e:#}"))
                )),
            ),
            Ok(instance) => {
                let executing = Instant::now();
                let result = instance
                    .get_typed_func::<(), ()>(&mut store, "_start")
                    .and_then(|start| start.call(&mut store, ()));
                timings.execute_us = executing.elapsed().as_micros() as u64;
                match result {
                    Ok(()) => (0, None),
                    Err(e) => match e.downcast_ref::<I32Exit>() {
                        Some(exit) => (exit.0, None),
                        None if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) => {
                            (-1, Some(format!("{DEADLINE_FAILURE} of {timeout:?}")))
                        }
                        None => (-1, Some(one_line(&format!("trapped: {e:#}")))),
                    },
                }
            }
        };
        drop(store);
        let outputs =
            jobdir::collect_outputs(dir.path(), &job.inputs, self.config.max_output_bytes)?;
        Ok(Outcome {
            exit_code,
            stdout: stdout.contents().to_vec(),
            stderr: stderr.contents().to_vec(),
            outputs,
            failure,
            timings,
        })
    }
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

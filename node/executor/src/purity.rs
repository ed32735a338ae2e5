//! Whether a run's outcome depends only on what the call gave it, so that its result can
//! be memoized: the guest read no clock and no random numbers — the clocks and
//! generators its WASI context is given note every use ([`watch`]) — and its module
//! imports none of the calls whose answers differ between hosts and between runs: file
//! times, inode numbers and the order of a directory's entries, and which of several
//! events happened first (`poll_oneoff`, which sleeping uses too)
//! ([`HOST_DEPENDENT_IMPORTS`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wasmtime::Module;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtxBuilder};

/// WASI calls whose answers differ between hosts and runs although the call is the same:
/// a module importing any of them is never memoized.
pub const HOST_DEPENDENT_IMPORTS: &[&str] = &[
    "fd_filestat_get",
    "path_filestat_get",
    "fd_readdir",
    "poll_oneoff",
];

/// Set once the guest reads a clock or random numbers.
#[derive(Debug, Clone, Default)]
pub struct Witness(Arc<AtomicBool>);

impl Witness {
    fn saw(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether the guest read a clock or random numbers.
    pub fn seen(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Gives `wasi` clocks and generators that note their use on the returned [`Witness`].
pub fn watch(wasi: &mut WasiCtxBuilder) -> Witness {
    let witness = Witness::default();
    wasi.wall_clock(Watched {
        inner: wasmtime_wasi::clocks::wall_clock(),
        witness: witness.clone(),
    })
    .monotonic_clock(Watched {
        inner: wasmtime_wasi::clocks::monotonic_clock(),
        witness: witness.clone(),
    })
    .secure_random(Watched {
        inner: wasmtime_wasi::thread_rng(),
        witness: witness.clone(),
    })
    .insecure_random(Watched {
        inner: wasmtime_wasi::thread_rng(),
        witness: witness.clone(),
    });
    witness
}

/// Whether `module` imports a call of [`HOST_DEPENDENT_IMPORTS`].
pub fn imports_host_dependent(module: &Module) -> bool {
    module
        .imports()
        .any(|import| HOST_DEPENDENT_IMPORTS.contains(&import.name()))
}

/// A clock or generator that notes each use before passing it on.
struct Watched<T> {
    inner: T,
    witness: Witness,
}

impl HostWallClock for Watched<Box<dyn HostWallClock + Send>> {
    fn resolution(&self) -> Duration {
        self.witness.saw();
        self.inner.resolution()
    }

    fn now(&self) -> Duration {
        self.witness.saw();
        self.inner.now()
    }
}

impl HostMonotonicClock for Watched<Box<dyn HostMonotonicClock + Send>> {
    fn resolution(&self) -> u64 {
        self.witness.saw();
        self.inner.resolution()
    }

    fn now(&self) -> u64 {
        self.witness.saw();
        self.inner.now()
    }
}

impl rand_core_wasi::TryRng for Watched<Box<dyn wasmtime_wasi::Rng + Send>> {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        self.witness.saw();
        Ok(self.inner.next_u32())
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        self.witness.saw();
        Ok(self.inner.next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.witness.saw();
        self.inner.fill_bytes(dst);
        Ok(())
    }
}

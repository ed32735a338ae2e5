//! Compiled modules, kept in memory and on disk.
//!
//! A module is compiled once per engine: the compiled code is written to
//! `<cache_dir>/<module key>-<engine hash>.cwasm`, where the module key is the SHA-256 of
//! the module's bytes (what its CID names) and the engine hash is
//! [`wasmtime::Engine::precompile_compatibility_hash`], so code compiled by another
//! engine configuration or wasmtime version is never loaded. Only files this node wrote
//! itself are ever deserialized: compiled code never comes from a peer.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use wasmtime::{Engine, Module};

/// Compiled modules kept in memory.
const IN_MEMORY: usize = 64;

/// The key of a module: the SHA-256 of its bytes, hex.
pub fn module_key(wasm: &[u8]) -> String {
    Sha256::digest(wasm)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The compiled-module cache of one engine.
pub struct ModuleCache {
    dir: PathBuf,
    engine_hash: String,
    modules: Mutex<HashMap<String, Module>>,
}

impl ModuleCache {
    /// A cache in `dir` (created if missing) for modules compiled by `engine`.
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<ModuleCache> {
        std::fs::create_dir_all(dir)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(ModuleCache {
            dir: dir.to_path_buf(),
            engine_hash: format!("{:016x}", hasher.finish()),
            modules: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}-{}.cwasm", self.engine_hash))
    }

    /// The module under `key`, from memory or from this node's own disk cache.
    pub fn get(&self, engine: &Engine, key: &str) -> Option<Module> {
        if let Some(module) = self.lock().get(key) {
            return Some(module.clone());
        }
        let path = self.path(key);
        if !path.exists() {
            return None;
        }
        match load(engine, &path) {
            Ok(module) => {
                self.remember(key, module.clone());
                Some(module)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding a cached module that does not load");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Keeps a freshly compiled module, in memory and on disk.
    pub fn put(&self, key: &str, module: &Module) {
        self.remember(key, module.clone());
        let path = self.path(key);
        let written = module.serialize().and_then(|bytes| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)?;
            Ok(())
        });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache a compiled module");
        }
    }

    fn remember(&self, key: &str, module: Module) {
        let mut modules = self.lock();
        if modules.len() >= IN_MEMORY && !modules.contains_key(key) {
            // Forget an arbitrary one: the disk keeps them all.
            if let Some(victim) = modules.keys().next().cloned() {
                modules.remove(&victim);
            }
        }
        modules.insert(key.to_string(), module);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Module>> {
        self.modules
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Loads compiled code from this node's cache directory.
#[allow(unsafe_code)]
fn load(engine: &Engine, path: &Path) -> wasmtime::Result<Module> {
    // SAFETY: wasmtime requires that deserialized bytes come from `Module::serialize` of a
    // compatible engine and were not tampered with. The file was written by `put` above,
    // in this node's own data directory, under a name carrying the engine's
    // compatibility hash (wasmtime checks the version and configuration again); nothing
    // a peer sends is ever written there.
    unsafe { Module::deserialize_file(engine, path) }
}

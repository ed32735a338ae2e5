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
/// Compiled modules kept on disk; the least recently written go first.
const ON_DISK: usize = 512;

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
        // Temporary files a crash left half written (nothing writes before `open`).
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&path)?;
            }
        }
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
            // A temporary file of its own, so two threads caching the same module never
            // write into one file; the rename makes the whole file appear at once.
            let mut tmp = tempfile::Builder::new()
                .suffix(".tmp")
                .tempfile_in(&self.dir)?;
            std::io::Write::write_all(&mut tmp, &bytes)?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache a compiled module");
        }
        if let Err(e) = self.prune(ON_DISK) {
            tracing::warn!(error = %e, "cannot prune the compiled-module cache");
        }
    }

    /// Removes the oldest compiled files until at most `keep` remain.
    fn prune(&self, keep: usize) -> std::io::Result<()> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.path().extension().is_some_and(|e| e == "cwasm") {
                files.push((entry.metadata()?.modified()?, entry.path()));
            }
        }
        if files.len() <= keep {
            return Ok(());
        }
        files.sort();
        for (_, path) in &files[..files.len() - keep] {
            match std::fs::remove_file(path) {
                // Another thread pruning at the same time removed it first.
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_keeps_the_newest_modules_and_loads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let cache = ModuleCache::open(dir.path(), &engine).unwrap();
        let keys: Vec<String> = (0..3)
            .map(|i| {
                let wat = format!("(module (func (export \"f{i}\")))");
                let wasm = wat::parse_str(&wat).unwrap();
                let key = module_key(&wasm);
                cache.put(&key, &Module::new(&engine, &wasm).unwrap());
                key
            })
            .collect();
        cache.prune(2).unwrap();
        let on_disk = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(on_disk, 2, "no temporary files are left either");
        std::fs::write(dir.path().join("left-by-a-crash.tmp"), b"half").unwrap();
        // A fresh cache (empty memory) loads what the disk kept.
        let reopened = ModuleCache::open(dir.path(), &engine).unwrap();
        let kept = keys.iter().filter(|k| reopened.get(&engine, k).is_some());
        assert_eq!(kept.count(), 2);
        assert!(!dir.path().join("left-by-a-crash.tmp").exists());
    }
}

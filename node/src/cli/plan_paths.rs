//! Where a plan's files may be: inside the plan's own directory. A plan may come from a
//! stranger, and every file it names is added to the node, where anyone can fetch it, so
//! a plan naming `/home/me/.ssh/id_ed25519`, `../../etc/shadow` or a symlink that leads
//! out of its directory is refused, unless the user passes `--allow-paths-outside`.

use crate::plan::{Plan, Source};
use std::path::{Component, Path};

/// Checks that every file the plan names is inside its directory (unless `allow_outside`):
/// a relative path without `..`, which, symlinks resolved, stays under the directory.
pub fn check(plan: &Plan, allow_outside: bool) -> anyhow::Result<()> {
    if allow_outside {
        return Ok(());
    }
    let base = plan.base.canonicalize().map_err(|e| {
        anyhow::anyhow!(
            "cannot read the plan's directory {}: {e}",
            plan.base.display()
        )
    })?;
    for (name, job) in &plan.jobs {
        for source in job.sources() {
            if let Source::File { file } = source {
                inside(&base, &plan.base, file).map_err(|why| {
                    anyhow::anyhow!(
                        "job {name:?}: file {} {why}, outside the plan's directory {} (pass --allow-paths-outside to allow it)",
                        file.display(),
                        base.display()
                    )
                })?;
            }
        }
    }
    Ok(())
}

/// Why `file` (relative to `dir`, whose canonical form is `base`) is not inside it.
fn inside(base: &Path, dir: &Path, file: &Path) -> Result<(), &'static str> {
    for component in file.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err("goes up with '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("is absolute"),
        }
    }
    match dir.join(file).canonicalize() {
        Ok(real) if real.starts_with(base) => Ok(()),
        Ok(_) => Err("leads through a symlink"),
        // A file that is not there is reported when it is added.
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_refused_and_inside_files_pass() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("plan");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/in.txt"), "in").unwrap();
        std::fs::write(root.path().join("secret"), "secret").unwrap();
        let base = dir.canonicalize().unwrap();
        assert!(inside(&base, &dir, Path::new("sub/in.txt")).is_ok());
        assert!(inside(&base, &dir, Path::new("./sub/in.txt")).is_ok());
        assert!(inside(&base, &dir, Path::new("../secret")).is_err());
        assert!(inside(&base, &dir, Path::new("sub/../sub/in.txt")).is_err());
        let absolute = root.path().join("secret");
        assert!(inside(&base, &dir, &absolute).is_err());
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(root.path().join("secret"), dir.join("link")).unwrap();
            std::os::unix::fs::symlink(root.path(), dir.join("up")).unwrap();
            assert!(inside(&base, &dir, Path::new("link")).is_err());
            assert!(inside(&base, &dir, Path::new("up/secret")).is_err());
        }
    }
}

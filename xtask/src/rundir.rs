//! Fresh per-run temporary directories (the `tempfile` crate), so parallel
//! runs never collide. A directory is removed when its [`RunDir`] is
//! dropped, unless it is kept.

use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};

/// A fresh directory under the system temp dir, named `<prefix>-<random>`.
#[derive(Debug)]
pub struct RunDir {
    dir: tempfile::TempDir,
}

impl RunDir {
    pub fn create(prefix: &str) -> Result<RunDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .context(|| format!("cannot create a run directory in {}", std::env::temp_dir().display()))?;
        Ok(RunDir { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Leaves the directory on disk and returns its path.
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
    }

    /// Deletes the directory and everything in it.
    pub fn remove(self) -> Result<()> {
        let path = self.dir.path().to_path_buf();
        self.dir.close().context(|| format!("cannot remove {}", path.display()))
    }
}

/// Paths that end up in bochsrc or grub.cfg must be plain: no spaces,
/// commas, quotes or other characters those formats would split on.
pub fn check_plain_path(path: &Path) -> Result<()> {
    let s = path.to_string_lossy();
    match s.chars().find(|c| !(c.is_ascii_alphanumeric() || "/._-+".contains(*c))) {
        None => Ok(()),
        Some(c) => Err(Error::new(format!(
            "path `{s}` contains {c:?}; Bochs' config needs plain paths: set TMPDIR to a directory without spaces \
             or special characters"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dirs_are_distinct_and_removable() {
        let a = RunDir::create("xtask-unit").unwrap();
        let b = RunDir::create("xtask-unit").unwrap();
        assert_ne!(a.path(), b.path());
        assert!(a.path().is_dir());
        std::fs::write(a.join("f"), "x").unwrap();
        let p = a.path().to_path_buf();
        a.remove().unwrap();
        assert!(!p.exists());
        let kept = b.keep();
        assert!(kept.is_dir());
        std::fs::remove_dir(&kept).unwrap();
    }

    #[test]
    fn plain_paths() {
        assert!(check_plain_path(Path::new("/tmp/shadowcall-run-1-2-3/run.iso")).is_ok());
        assert!(check_plain_path(Path::new("/tmp/my dir/run.iso")).is_err());
        assert!(check_plain_path(Path::new("/tmp/a,b")).is_err());
    }
}

//! Fresh per-run temporary directories, so parallel runs never collide.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Context, Error, Result};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A directory under the system temp dir, named from the process id, the
/// time and a counter. It is created with `create_dir`, so two runs can
/// never share one.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    pub fn create(prefix: &str) -> Result<RunDir> {
        let base = std::env::temp_dir();
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        for _ in 0..100 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("{prefix}-{}-{nanos}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(RunDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::new(format!("cannot create run directory {}: {e}", path.display()))),
            }
        }
        Err(Error::new(format!("cannot find a free run directory name in {}", base.display())))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Deletes the directory and everything in it.
    pub fn remove(self) -> Result<()> {
        std::fs::remove_dir_all(&self.path).context(|| format!("cannot remove {}", self.path.display()))
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
        b.remove().unwrap();
    }

    #[test]
    fn plain_paths() {
        assert!(check_plain_path(Path::new("/tmp/shadowcall-run-1-2-3/run.iso")).is_ok());
        assert!(check_plain_path(Path::new("/tmp/my dir/run.iso")).is_err());
        assert!(check_plain_path(Path::new("/tmp/a,b")).is_err());
    }
}

//! A per-world scratch directory for logs and data files; removed on drop unless the test is
//! failing, in which case it is kept and its path printed.

use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// A scratch directory under the system temporary directory.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/sidecar-tests/<name>` (emptied first if a stale one exists).
    pub fn create(name: &str) -> Result<Self> {
        let path = std::env::temp_dir().join("sidecar-tests").join(name);
        if path.exists() {
            std::fs::remove_dir_all(&path).ctx(|| format!("clearing {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).ctx(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, file: &str) -> PathBuf {
        self.path.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test bed: keeping {} for inspection", self.path.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), error = %e, "could not remove scratch dir");
        }
    }
}

//! The test bed's error type: what went wrong while building or driving a test world.

use std::time::Duration;

/// Errors from the test bed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A system call wrapped by `nix` failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },
    /// A helper command exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status description.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// A prerequisite (root, a tool, the sidecar binary) is missing.
    #[error("missing prerequisite(s): {0}")]
    Missing(String),
    /// A process or file said something unexpected.
    #[error("{0}")]
    Unexpected(String),
}

/// Result alias for the test bed.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a description to I/O errors.
pub trait IoContext<T> {
    /// Wraps the error with `what`.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            what: what(),
            source,
        })
    }
}

/// Adds a description to `nix` errors.
pub trait SysContext<T> {
    /// Wraps the error with `what`.
    fn sys_ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> SysContext<T> for nix::Result<T> {
    fn sys_ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sys {
            what: what(),
            source,
        })
    }
}

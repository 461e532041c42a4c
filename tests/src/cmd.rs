//! Running helper commands with a time bound and capturing their output.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// How often a running command is checked for exit.
const POLL: Duration = Duration::from_millis(10);

/// Default bound for quick administrative commands (`ip`, `bpftool`).
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(20);

/// The outcome of a command run to completion (or killed at its time bound).
#[derive(Debug)]
pub struct Finished {
    /// The command line, for messages.
    pub command: String,
    /// Exit status (after a kill when `timed_out`).
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
    /// Whether the command was killed because it exceeded its bound.
    pub timed_out: bool,
    /// Wall time until exit.
    pub elapsed: Duration,
}

impl Finished {
    /// Exited with status 0 within its bound.
    pub fn success(&self) -> bool {
        !self.timed_out && self.status.success()
    }

    /// Exit code, if it exited normally.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Stdout as (lossy) UTF-8.
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stderr as (lossy) UTF-8.
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Turns an unsuccessful outcome into an error carrying stderr.
    pub fn ok(self) -> Result<Self> {
        if self.success() {
            return Ok(self);
        }
        let status = if self.timed_out {
            format!("timed out after {:?}", self.elapsed)
        } else {
            self.status.to_string()
        };
        Err(Error::Command {
            command: self.command.clone(),
            status,
            stderr: self.stderr_str().trim().to_owned(),
        })
    }
}

/// Renders a command line for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            // A read error ends capture; what was read so far is kept.
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Runs `cmd` (stdin closed, stdout and stderr captured) and kills it after `timeout`.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Finished> {
    let command = describe(cmd);
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| format!("spawning `{command}`"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .ctx(|| format!("waiting for `{command}`"))?
        {
            break status;
        }
        if started.elapsed() >= timeout {
            timed_out = true;
            // The child may exit between try_wait and kill; either way wait reaps it.
            let _ = child.kill();
            break child.wait().ctx(|| format!("reaping `{command}`"))?;
        }
        thread::sleep(POLL);
    };
    let elapsed = started.elapsed();
    // Grandchildren holding the pipes open could delay EOF; they are the caller's business.
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(Finished {
        command,
        status,
        stdout,
        stderr,
        timed_out,
        elapsed,
    })
}

/// Runs `cmd` with `timeout` and fails unless it exits 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Finished> {
    run_timeout(cmd, timeout)?.ok()
}

/// Runs `ip ARGS...` and fails unless it succeeds.
pub fn ip(args: &[&str]) -> Result<()> {
    run_ok(Command::new("ip").args(args), ADMIN_TIMEOUT).map(drop)
}

/// Finds `tool` in `PATH` (an executable regular file).
pub fn find_in_path(tool: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let f = run_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(f.stdout_str(), "out\n");
        assert_eq!(f.stderr_str(), "err\n");
        assert_eq!(f.code(), Some(3));
        assert!(!f.success());
        let e = f.ok().unwrap_err().to_string();
        assert!(e.contains("err"), "{e}");
    }

    #[test]
    fn kills_at_the_bound() {
        let f = run_timeout(
            Command::new("sh").args(["-c", "exec sleep 30"]),
            Duration::from_millis(200),
        )
        .unwrap();
        assert!(f.timed_out);
        assert!(f.elapsed < Duration::from_secs(5), "{:?}", f.elapsed);
        assert!(f.ok().is_err());
    }

    #[test]
    fn finds_sh_in_path() {
        assert!(find_in_path("sh").is_some());
        assert!(find_in_path("surely-not-a-tool-name-xyz").is_none());
    }
}

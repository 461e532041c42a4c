//! Child processes owned by a test: spawned (optionally) inside a cgroup and a network
//! namespace, output sent to a log file, killed and reaped on drop.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cgroup::Cgroup;
use crate::cmd::describe;
use crate::error::{Error, IoContext, Result, SysContext};
use crate::netns::Netns;

const POLL: Duration = Duration::from_millis(20);

/// Wrapper that joins the cgroup (first, while the mount namespace still shows it) and then the
/// network namespace before exec'ing the program, keeping one pid for the whole chain.
const LAUNCHER: &str = r#"cg=$1; ns=$2; shift 2
if [ -n "$cg" ]; then echo $$ > "$cg/cgroup.procs" || exit 125; fi
if [ -n "$ns" ]; then exec nsenter --net="$ns" -- "$@"; fi
exec "$@""#;

/// Builds a command that runs `program args...` in `cgroup` (if any) and `netns` (if any).
/// The spawned pid is the program's own pid.
pub fn command_in(
    netns: Option<&Netns>,
    cgroup: Option<&Cgroup>,
    program: impl AsRef<std::ffi::OsStr>,
    args: &[&str],
) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(LAUNCHER)
        .arg("sh")
        .arg(cgroup.map(|c| c.path().as_os_str()).unwrap_or_default())
        .arg(netns.map(|n| n.path().into_os_string()).unwrap_or_default())
        .arg(program)
        .args(args);
    cmd
}

/// A long-running child process; SIGKILLed and reaped on drop. Its stdout and stderr go to a
/// log file.
#[derive(Debug)]
pub struct Child {
    name: String,
    command: String,
    inner: std::process::Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Child {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let command = describe(&cmd);
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .ctx(|| format!("opening log {}", log.display()))?;
        let err = out
            .try_clone()
            .ctx(|| format!("duplicating log {}", log.display()))?;
        let inner = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .ctx(|| format!("spawning {name}: `{command}`"))?;
        tracing::debug!(name, pid = inner.id(), %command, "spawned");
        Ok(Self {
            name: name.to_owned(),
            command,
            inner,
            log: log.to_owned(),
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.inner.id()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log file path.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far (lossy UTF-8; empty if unreadable).
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Sends `signal` unless the process was already reaped.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        let pid = i32::try_from(self.pid())
            .map_err(|_| Error::Unexpected(format!("pid {} out of range", self.pid())))?;
        kill(Pid::from_raw(pid), signal)
            .sys_ctx(|| format!("sending {signal} to {} ({pid})", self.name))
    }

    /// The exit status if it has exited (reaps it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .inner
                .try_wait()
                .ctx(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for exit; `None` if still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until the log contains `needle`, failing early if the process exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                // It may have written the line just before exiting.
                if self.log().contains(needle) {
                    return Ok(());
                }
                return Err(Error::Unexpected(format!(
                    "{} exited ({status}) before logging {needle:?}; `{}`; log:\n{}",
                    self.name,
                    self.command,
                    self.log()
                )));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{} to log {needle:?}; log:\n{}", self.name, self.log()),
                    after: timeout,
                });
            }
            thread::sleep(POLL);
        }
    }

    /// SIGKILLs and reaps the process (idempotent).
    pub fn kill(&mut self) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        // It may exit on its own between the check and the kill.
        let _ = self.inner.kill();
        self.status = Some(self.inner.wait().ctx(|| format!("reaping {}", self.name))?);
        Ok(())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            tracing::warn!(name = %self.name, error = %e, "could not kill child");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_log(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("sct-proc-{tag}-{}.log", std::process::id()))
    }

    #[test]
    fn launcher_without_namespace_or_cgroup_runs_the_program() {
        let log = temp_log("plain");
        let cmd = command_in(None, None, "sh", &["-c", "echo hello $0", "arg0"]);
        let mut c = Child::spawn("echo", cmd, &log).unwrap();
        c.wait_for_log("hello arg0", Duration::from_secs(10))
            .unwrap();
        let st = c.wait_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert!(st.success());
        let _ = fs::remove_file(&log);
    }

    #[test]
    fn drop_kills_a_running_child() {
        let log = temp_log("kill");
        let c = Child::spawn("sleeper", command_in(None, None, "sleep", &["60"]), &log).unwrap();
        let pid = c.pid();
        drop(c);
        let alive = Path::new(&format!("/proc/{pid}")).exists()
            && fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false);
        assert!(!alive, "pid {pid} still running");
        let _ = fs::remove_file(&log);
    }

    #[test]
    fn wait_for_log_reports_early_exit() {
        let log = temp_log("early");
        let mut c = Child::spawn(
            "quitter",
            command_in(None, None, "sh", &["-c", "echo bye; exit 2"]),
            &log,
        )
        .unwrap();
        let e = c
            .wait_for_log("never printed", Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("exited") && e.contains("bye"), "{e}");
        let _ = fs::remove_file(&log);
    }
}

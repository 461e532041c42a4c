//! A tmux server of the test's own (`tmux -L <unique socket>`) running one command in a
//! detached session of a fixed size: capture the screen, send keys, read the pane's exit status.
//! Panes stay after their command exits (`remain-on-exit`), so the status and the final screen
//! can be read. The server, and with it the command, is killed on drop.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmd::{find_in_path, run_ok, Finished};
use crate::error::{Error, IoContext, Result};
use crate::netns::unique_name;

/// Bound of one tmux client command.
const TMUX_CMD: Duration = Duration::from_secs(10);

/// Poll period of the `wait_*` helpers.
const POLL: Duration = Duration::from_millis(100);

/// A tmux server with one session.
#[derive(Debug)]
pub struct Tmux {
    socket: String,
    session: String,
    /// The server's socket file, removed on drop (tmux leaves it behind).
    socket_path: Option<std::path::PathBuf>,
}

/// What tmux reports of the session's pane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaneState {
    /// The pane's command has exited.
    pub dead: bool,
    /// Its exit status, once dead and reaped (absent when killed by a signal).
    pub exit_status: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// The application has the alternate screen on.
    pub alternate_on: bool,
    /// The cursor is visible.
    pub cursor_visible: bool,
}

impl Tmux {
    /// Fails with [`Error::Missing`] when `tmux` is not installed.
    pub fn require() -> Result<()> {
        find_in_path("tmux")
            .map(|_| ())
            .ok_or_else(|| Error::Missing("tmux (Debian package `tmux`)".into()))
    }

    /// Starts a server on a unique socket and a `width`×`height` session running `command`
    /// (a shell command line) without a status line; its configuration is written into `dir`.
    pub fn start(tag: &str, dir: &Path, width: u16, height: u16, command: &str) -> Result<Self> {
        Self::require()?;
        let socket = unique_name(tag);
        let conf = dir.join(format!("{socket}.tmux.conf"));
        std::fs::write(
            &conf,
            "set -g remain-on-exit on\nset -g status off\nset -g history-limit 100\n",
        )
        .ctx(|| format!("writing {}", conf.display()))?;
        let mut tmux = Self {
            socket,
            session: "test".into(),
            socket_path: None,
        };
        let mut cmd = Command::new("tmux");
        cmd.arg("-L")
            .arg(&tmux.socket)
            .arg("-f")
            .arg(&conf)
            .args(["new-session", "-d", "-s", &tmux.session])
            .args(["-x", &width.to_string(), "-y", &height.to_string()])
            .arg(command)
            .env("TERM", "xterm-256color")
            .env_remove("TMUX");
        run_ok(&mut cmd, TMUX_CMD)?;
        let path = tmux
            .tmux(&["display-message", "-p", "#{socket_path}"])?
            .stdout_str();
        tmux.socket_path =
            Some(path.trim().into()).filter(|p: &std::path::PathBuf| p.is_absolute());
        Ok(tmux)
    }

    fn tmux(&self, args: &[&str]) -> Result<Finished> {
        let mut cmd = Command::new("tmux");
        cmd.arg("-L").arg(&self.socket).args(args);
        run_ok(&mut cmd, TMUX_CMD)
    }

    /// The socket name (`tmux -L <name>`).
    pub fn socket(&self) -> &str {
        &self.socket
    }

    /// The visible screen, one line per row, trailing spaces removed.
    pub fn capture(&self) -> Result<String> {
        Ok(self
            .tmux(&["capture-pane", "-p", "-t", &self.session])?
            .stdout_str())
    }

    /// `tmux send-keys` (key names as tmux spells them: `q`, `Escape`, `C-c`).
    pub fn send_keys(&self, keys: &[&str]) -> Result<()> {
        let mut args = vec!["send-keys", "-t", self.session.as_str()];
        args.extend_from_slice(keys);
        self.tmux(&args).map(|_| ())
    }

    /// Resizes the session's window.
    pub fn resize(&self, width: u16, height: u16) -> Result<()> {
        self.tmux(&[
            "resize-window",
            "-t",
            &self.session,
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
        ])
        .map(|_| ())
    }

    /// The pane's state.
    pub fn pane(&self) -> Result<PaneState> {
        let out = self
            .tmux(&[
                "display-message",
                "-p",
                "-t",
                &self.session,
                "#{pane_dead}|#{pane_dead_status}|#{pane_dead_signal}|#{alternate_on}|#{cursor_flag}",
            ])?
            .stdout_str();
        let fields: Vec<&str> = out.trim().split('|').collect();
        let [dead, status, signal, alternate, cursor] = fields[..] else {
            return Err(Error::Unexpected(format!("tmux pane state `{out}`")));
        };
        Ok(PaneState {
            dead: dead == "1",
            exit_status: status.parse().ok(),
            signal: signal.parse().ok().filter(|s| *s != 0),
            alternate_on: alternate == "1",
            cursor_visible: cursor == "1",
        })
    }

    /// Captures the screen until `ready` accepts it; the last capture in the error otherwise.
    pub fn wait_for_screen(
        &self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture()?;
            if ready(&screen) {
                return Ok(screen);
            }
            if Instant::now() >= deadline {
                return Err(Error::Unexpected(format!(
                    "timed out after {timeout:?} waiting for {what}; last screen:\n{screen}"
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the pane's command has exited, then up to a second more for tmux to learn
    /// how (it may see the pane's end of file before it reaps the process, and tmux 3.3 does
    /// not always record the status then: callers that need the exit code should have the
    /// command write it to a file).
    pub fn wait_dead(&self, timeout: Duration) -> Result<PaneState> {
        let deadline = Instant::now() + timeout;
        let mut dead_since: Option<Instant> = None;
        loop {
            let state = self.pane()?;
            if state.dead {
                let since = *dead_since.get_or_insert_with(Instant::now);
                if state.exit_status.is_some()
                    || state.signal.is_some()
                    || since.elapsed() >= Duration::from_secs(1)
                {
                    return Ok(state);
                }
            } else if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "the tmux pane's command to exit".into(),
                    after: timeout,
                });
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let mut cmd = Command::new("tmux");
        cmd.arg("-L").arg(&self.socket).arg("kill-server");
        if let Err(e) = run_ok(&mut cmd, TMUX_CMD) {
            tracing::warn!(socket = %self.socket, error = %e, "could not kill the tmux server");
        }
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

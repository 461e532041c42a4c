//! The real `sidecar` binary as a process: where to find it, how to configure it from a test and
//! a guard that stops it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::error::Result;
use crate::process::Child;

/// The log line the sidecar prints once programs are attached and listeners are up.
pub const READY_LINE: &str = "sidecar ready";

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The sidecar binary: `$SIDECAR_BIN`, else `<workspace>/target/release/sidecar`.
pub fn sidecar_bin() -> PathBuf {
    match std::env::var_os("SIDECAR_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join("target/release/sidecar"),
    }
}

/// Options for `sidecar run`; `None` leaves the sidecar's default.
#[derive(Clone, Debug)]
pub struct SidecarConfig {
    /// `--otlp-endpoint`.
    pub otlp_endpoint: Option<String>,
    /// `--service-name`.
    pub service_name: Option<String>,
    /// `--outbound-port`.
    pub outbound_port: Option<u16>,
    /// `--sink-file`.
    pub sink_file: Option<PathBuf>,
    /// `--summary-interval` in seconds (0 = off).
    pub summary_interval_secs: Option<u64>,
    /// `--metric-export-interval` in milliseconds.
    pub metric_export_interval_ms: Option<u64>,
    /// `--bsp-schedule-delay` in milliseconds.
    pub bsp_schedule_delay_ms: Option<u64>,
    /// `--drain-timeout` in seconds.
    pub drain_timeout_secs: Option<u64>,
    /// `--annotations-file` (the pod's Downward API annotations).
    pub annotations_file: Option<PathBuf>,
    /// More arguments, appended as given.
    pub extra_args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// How long to wait for [`READY_LINE`].
    pub ready_timeout: Duration,
}

impl Default for SidecarConfig {
    /// Short export intervals suited to tests, no terminal summary.
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: None,
            outbound_port: None,
            sink_file: None,
            summary_interval_secs: Some(0),
            metric_export_interval_ms: Some(500),
            bsp_schedule_delay_ms: Some(100),
            drain_timeout_secs: Some(10),
            annotations_file: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            ready_timeout: Duration::from_secs(30),
        }
    }
}

impl SidecarConfig {
    /// The `sidecar run ...` arguments for the pod cgroup `cgroup`.
    pub fn run_args(&self, cgroup: &Path) -> Vec<String> {
        let mut a = vec![
            "run".to_owned(),
            "--cgroup".to_owned(),
            cgroup.to_string_lossy().into_owned(),
        ];
        let mut opt = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                a.push(flag.to_owned());
                a.push(v);
            }
        };
        opt("--otlp-endpoint", self.otlp_endpoint.clone());
        opt("--service-name", self.service_name.clone());
        opt("--outbound-port", self.outbound_port.map(|v| v.to_string()));
        opt(
            "--sink-file",
            self.sink_file
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
        );
        opt(
            "--summary-interval",
            self.summary_interval_secs.map(|v| v.to_string()),
        );
        opt(
            "--metric-export-interval",
            self.metric_export_interval_ms.map(|v| v.to_string()),
        );
        opt(
            "--bsp-schedule-delay",
            self.bsp_schedule_delay_ms.map(|v| v.to_string()),
        );
        opt(
            "--drain-timeout",
            self.drain_timeout_secs.map(|v| v.to_string()),
        );
        opt(
            "--annotations-file",
            self.annotations_file
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
        );
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// A running sidecar. SIGKILLed on drop if still running; its log is printed when the test is
/// failing.
#[derive(Debug)]
pub struct Sidecar {
    child: Child,
}

impl Sidecar {
    /// Spawns `cmd` (a prepared `sidecar run` command) logging to `log` and waits for
    /// [`READY_LINE`].
    pub fn spawn(cmd: Command, log: &Path, ready_timeout: Duration) -> Result<Self> {
        let mut child = Child::spawn("sidecar", cmd, log)?;
        child.wait_for_log(READY_LINE, ready_timeout)?;
        Ok(Self { child })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The log (stdout and stderr) so far.
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) -> Result<()> {
        self.child.signal(Signal::SIGTERM)
    }

    /// Sends SIGINT.
    pub fn interrupt(&self) -> Result<()> {
        self.child.signal(Signal::SIGINT)
    }

    /// SIGKILLs and reaps it (no chance to clean up).
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()
    }

    /// Waits up to `timeout` for exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        self.child.wait_timeout(timeout)
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- sidecar log ({}) ----\n{}\n---- end of sidecar log ----",
                self.child.log_path().display(),
                self.child.log()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_args_carry_every_option() {
        let cfg = SidecarConfig {
            otlp_endpoint: Some("http://127.0.0.1:4317".into()),
            service_name: Some("svc".into()),
            outbound_port: Some(15001),
            drain_timeout_secs: Some(3),
            extra_args: vec!["--x".into()],
            ..SidecarConfig::default()
        };
        let a = cfg.run_args(Path::new("/cg/pod"));
        let s = a.join(" ");
        assert!(s.starts_with("run --cgroup /cg/pod "), "{s}");
        for part in [
            "--otlp-endpoint http://127.0.0.1:4317",
            "--service-name svc",
            "--outbound-port 15001",
            "--summary-interval 0",
            "--metric-export-interval 500",
            "--bsp-schedule-delay 100",
            "--drain-timeout 3",
        ] {
            assert!(s.contains(part), "{part} missing in {s}");
        }
        assert!(s.ends_with(" --x"), "{s}");
        assert!(!s.contains("--sink-file"));
    }
}

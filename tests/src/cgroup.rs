//! Cgroup v2 directories owned by a test: created under the cgroup2 mount, emptied (processes
//! killed) and removed, children first, on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{Error, IoContext, Result};

/// Directory under the cgroup2 mount holding every test cgroup.
pub const TOP: &str = "sidecar-tests";

/// How long drop waits for killed processes to leave a cgroup.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(5);

/// The cgroup2 mount point, read from `/proc/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ctx(|| "reading /proc/mounts".into())?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .ok_or_else(|| Error::Missing("no cgroup2 filesystem in /proc/mounts".into()))
}

/// A cgroup directory removed (with everything below it) on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 mount>/sidecar-tests/<name>`.
    pub fn create(name: &str) -> Result<Self> {
        let top = cgroup2_mount()?.join(TOP);
        // Another test may remove the shared top directory between the two steps; retry.
        let mut attempts = 0;
        loop {
            fs::create_dir_all(&top).ctx(|| format!("creating {}", top.display()))?;
            match Self::create_at(top.join(name)) {
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && attempts < 3 =>
                {
                    attempts += 1;
                }
                other => return other,
            }
        }
    }

    fn create_at(path: PathBuf) -> Result<Self> {
        fs::create_dir(&path).ctx(|| format!("creating cgroup {}", path.display()))?;
        tracing::debug!(cgroup = %path.display(), "created cgroup");
        Ok(Self { path })
    }

    /// Creates the child cgroup `name` (also removed when this parent drops).
    pub fn child(&self, name: &str) -> Result<Self> {
        Self::create_at(self.path.join(name))
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path relative to the cgroup2 mount, as iptables' `-m cgroup --path` takes it.
    pub fn relative_path(&self) -> Result<String> {
        let mount = cgroup2_mount()?;
        let rel = self.path.strip_prefix(&mount).map_err(|_| {
            Error::Unexpected(format!(
                "cgroup {} is not under the cgroup2 mount {}",
                self.path.display(),
                mount.display()
            ))
        })?;
        Ok(rel.to_string_lossy().into_owned())
    }

    /// Process ids currently in this cgroup (not its children).
    pub fn procs(&self) -> Result<Vec<i32>> {
        read_procs(&self.path)
    }

    /// Names of the programs attached directly to this cgroup, comma-separated (empty when
    /// none).
    pub fn attached_programs(&self) -> Result<String> {
        attached_programs(&self.path)
    }
}

/// Names of the programs attached directly to `dir` (not inherited), sorted and
/// comma-separated; empty when none. Asked of the kernel ([`crate::bpf`]), so it works on
/// every kernel the VM tests boot.
pub fn attached_programs(dir: &Path) -> Result<String> {
    Ok(crate::bpf::cgroup_program_names(dir)?.join(","))
}

/// Waits until no program is attached directly to any of `dirs` (bounded: 5 s); panics with
/// what is still attached otherwise.
pub fn assert_nothing_attached(dirs: &[&Path]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let shown: Vec<(String, String)> = dirs
            .iter()
            .map(|d| {
                let out = attached_programs(d).expect("querying the cgroup's programs");
                (d.display().to_string(), out)
            })
            .filter(|(_, out)| !out.is_empty())
            .collect();
        if shown.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "programs still attached after the sidecar exited: {shown:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_procs(dir: &Path) -> Result<Vec<i32>> {
    let p = dir.join("cgroup.procs");
    let text = fs::read_to_string(&p).ctx(|| format!("reading {}", p.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Kills every process in `dir` (not recursive) and waits, bounded, until it is empty.
fn empty(dir: &Path) {
    let deadline = Instant::now() + EMPTY_TIMEOUT;
    loop {
        let procs = match read_procs(dir) {
            Ok(p) => p,
            Err(_) => return,
        };
        if procs.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(cgroup = %dir.display(), ?procs, "processes survived SIGKILL");
            return;
        }
        for pid in procs {
            // The process may already be gone; nothing to do then.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Empties and removes `dir` and every cgroup below it, deepest first.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    empty(dir);
    for _ in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            // EBUSY while exiting processes are still being released.
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
    tracing::warn!(cgroup = %dir.display(), "could not remove cgroup");
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_tree(&self.path);
        // Remove the shared top directory when this was the last test using it.
        if let Some(parent) = self.path.parent() {
            if parent.file_name().is_some_and(|n| n == TOP) {
                let _ = fs::remove_dir(parent);
            }
        }
    }
}

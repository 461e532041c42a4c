//! Network namespaces owned by a test (`ip netns add`/`del`), veth links between them and
//! running code or commands inside them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{setns, CloneFlags};

use crate::cmd::ip;
use crate::error::{Error, IoContext, Result, SysContext};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `sct-<tag>-<pid>-<n>`.
pub fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tag: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(24)
        .collect();
    format!("sct-{tag}-{}-{n}", std::process::id())
}

/// A network namespace, deleted on drop. Its `lo` is up.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` (see [`unique_name`]) and brings `lo` up.
    pub fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        tracing::debug!(netns = name, "created network namespace");
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, usable with `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Adds `cidr` to `ifname` (IPv6 addresses without duplicate address detection).
    pub fn add_addr(&self, ifname: &str, cidr: &str) -> Result<()> {
        if cidr.contains(':') {
            self.ip(&["addr", "add", cidr, "dev", ifname, "nodad"])
        } else {
            self.ip(&["addr", "add", cidr, "dev", ifname])
        }
    }

    /// A command that runs `program` inside this namespace via `nsenter --net` (which, unlike
    /// `ip netns exec`, leaves the mount namespace and so the cgroup filesystem alone).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` on a fresh thread that has joined this namespace. Sockets created in `f` belong
    /// to the namespace and stay usable from any thread afterwards.
    pub fn enter<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        enter_path(&self.path(), f)
    }
}

/// [`Netns::enter`] for the namespace at `path` (e.g. one kept by path, not by a [`Netns`]).
pub fn enter_path<T, F>(path: &Path, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .sys_ctx(|| format!("entering network namespace {}", path.display()))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(Error::Unexpected(
                "a closure run inside a network namespace panicked".into(),
            ))
        })
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            tracing::warn!(netns = %self.name, error = %e, "could not delete network namespace");
        }
    }
}

/// Creates a veth pair with one end (`a_if`) in `a` and the other (`b_if`) in `b`, both up.
/// The pair vanishes with the namespaces.
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    ip(&[
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

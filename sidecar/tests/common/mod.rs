//! The test world shared by the privileged kernel tests (`ebpf_*.rs`): preconditions, network
//! namespaces and per-test cgroups (guards of the `sidecar-tests` test bed), helper processes
//! started in a cgroup and then a namespace, attaching the programs, and bpftool queries.
//!
//! Helper processes are Python scripts started in a cgroup (pid written to `cgroup.procs`) and
//! then in the namespace with `nsenter --net=` (not `ip netns exec`, which remounts /sys and
//! hides the cgroup fs). Guards remove namespaces, kill helpers and remove cgroups even when a
//! test fails.

// Each test binary compiles its own copy of this module and uses only part of it.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver},
    thread,
    time::Duration,
};

use sidecar::ebpf::{self, InterceptConfig, Interception};
use sidecar_tests::{cmd::find_in_path, Cgroup};

pub use sidecar_tests::Netns;

// ---------------------------------------------------------------------------------------------
// Preconditions

/// Fails the test unless it runs as root, the eBPF object is embedded and every one of `tools`
/// is installed; `what` names the tests in the message ("these eBPF {what} tests need root").
pub fn require_privileges_and_object(what: &str, tools: &[&str]) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "these eBPF {what} tests need root (uid 0, CAP_BPF/CAP_NET_ADMIN/CAP_SYS_ADMIN); \
         running as uid {uid}"
    );
    assert!(
        ebpf::object_is_embedded(),
        "the eBPF object is not embedded in this test build: build it first with \
         `cargo xtask build-ebpf` (or set SIDECAR_EBPF_OBJECT) and rebuild the tests"
    );
    for tool in tools {
        assert!(
            find_in_path(tool).is_some(),
            "required tool `{tool}` is not installed"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces and cgroups

/// Creates the network namespace `name` with `lo` up (deleted when the guard drops), removing
/// first one left over by an earlier crashed run of the same pid.
pub fn netns(name: &str) -> Netns {
    // Usually there is none to delete: the error is expected and ignored.
    let _ = sidecar_tests::cmd::ip(&["netns", "del", name]);
    Netns::create(name).unwrap_or_else(|e| panic!("network namespace {name}: {e}"))
}

/// Runs `ip -n NETNS ARGS...`, failing the test if it fails.
pub fn ip(netns: &Netns, args: &[&str]) {
    if let Err(e) = netns.ip(args) {
        panic!("ip -n {} {}: {e}", netns.name(), args.join(" "));
    }
}

/// Joins `a` and `b` with a veth pair, `a_if` in `a` and `b_if` in `b`, both up.
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    if let Err(e) = sidecar_tests::netns::veth_pair(a, a_if, b, b_if) {
        panic!("veth pair {a_if}/{b_if}: {e}");
    }
}

/// Adds each of `cidrs` to `dev` in `netns` (IPv6 ones without duplicate address detection).
pub fn add_addrs(netns: &Netns, dev: &str, cidrs: &[&str]) {
    for cidr in cidrs {
        if let Err(e) = netns.add_addr(dev, cidr) {
            panic!("adding {cidr} to {dev} in {}: {e}", netns.name());
        }
    }
}

/// A per-test parent cgroup (under the test bed's directory of the cgroup2 mount) with `app`
/// (the target), `proxy` (the sidecar cgroup) and `peer` (real servers) children; on drop every
/// process left in them is killed and the directories are removed.
pub struct Cgroups {
    // Children first: fields drop in declaration order.
    app: Cgroup,
    proxy: Cgroup,
    peer: Cgroup,
    parent: Cgroup,
}

impl Cgroups {
    pub fn new(name: &str) -> Self {
        let parent = Cgroup::create(name).unwrap_or_else(|e| panic!("cgroup {name}: {e}"));
        let child = |child: &str| {
            parent
                .child(child)
                .unwrap_or_else(|e| panic!("child cgroup {child} of {name}: {e}"))
        };
        let (app, proxy, peer) = (child("app"), child("proxy"), child("peer"));
        Self {
            app,
            proxy,
            peer,
            parent,
        }
    }

    pub fn parent(&self) -> &Path {
        self.parent.path()
    }
    pub fn app(&self) -> PathBuf {
        self.app.path().to_path_buf()
    }
    pub fn proxy(&self) -> PathBuf {
        self.proxy.path().to_path_buf()
    }
    pub fn peer(&self) -> PathBuf {
        self.peer.path().to_path_buf()
    }
}

// ---------------------------------------------------------------------------------------------
// Programs

/// Interception of the `app` cgroup, the sidecar cgroup being `proxy`.
pub fn intercept_config(cgroups: &Cgroups, outbound_port: u16) -> InterceptConfig {
    InterceptConfig {
        target_cgroup: cgroups.app(),
        sidecar_cgroup: Some(cgroups.proxy()),
        outbound_port,
    }
}

/// Attaches the programs, failing the test if that fails.
pub fn attach(config: &InterceptConfig) -> Interception {
    Interception::attach(config).unwrap_or_else(|e| panic!("attach: {e}"))
}

/// `bpftool -j ARGS...` as JSON (an empty array when it prints nothing).
pub fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("bpftool {args:?} (bpftool is needed: apt-get install -y bpftool): {e}")
        });
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        // In JSON mode bpftool reports its errors on stdout.
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return serde_json::Value::Array(Vec::new());
    }
    serde_json::from_str(&text).expect("bpftool JSON")
}

/// Names of the programs attached to a cgroup directory, sorted (asked of the kernel, not of
/// bpftool: see [`sidecar_tests::bpf`]).
pub fn attached_programs(dir: &Path) -> Vec<String> {
    sidecar_tests::bpf::cgroup_program_names(dir)
        .unwrap_or_else(|e| panic!("programs attached to {}: {e}", dir.display()))
}

// ---------------------------------------------------------------------------------------------
// Helper processes

/// A helper process with line-oriented stdin/stdout; killed on drop.
pub struct Helper {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    wait: Duration,
}

impl Helper {
    /// Starts `python3 -u -c script args...` in `cgroup`, then (if given) in the namespace
    /// `netns`. Each output line is awaited at most `wait`.
    pub fn start(
        what: &str,
        cgroup: &Path,
        netns: Option<&Netns>,
        script: &str,
        args: &[&str],
        wait: Duration,
    ) -> Self {
        let ns = netns.map(|n| n.path().into_os_string()).unwrap_or_default();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(
                r#"cg=$1; ns=$2; py=$3; shift 3
                echo $$ > "$cg/cgroup.procs" || exit 1
                if [ -n "$ns" ]; then exec nsenter --net="$ns" python3 -u -c "$py" "$@"; fi
                exec python3 -u -c "$py" "$@""#,
            )
            .arg("sh")
            .arg(cgroup)
            .arg(ns)
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Self {
            what: what.to_string(),
            child,
            stdin,
            lines,
            wait,
        }
    }

    /// Waits for the script's `ready` line.
    pub fn ready(self) -> Self {
        assert_eq!(self.line(), "ready", "{} did not start", self.what);
        self
    }

    /// The next output line, at most `wait` away.
    pub fn line(&self) -> String {
        let wait = self.wait;
        self.lines
            .recv_timeout(wait)
            .unwrap_or_else(|e| panic!("{}: no output line within {wait:?} ({e})", self.what))
    }

    /// Sends one command and returns the reply line.
    pub fn ask(&mut self, cmd: &str) -> String {
        let stdin = self.stdin.as_mut().expect("helper stdin");
        writeln!(stdin, "{cmd}").expect("write to helper");
        stdin.flush().expect("flush helper stdin");
        self.line()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Preconditions of the privileged end-to-end tests. A test that cannot run must fail and say
//! what is missing, never skip.

use crate::cgroup::cgroup2_mount;
use crate::cmd::find_in_path;
use crate::error::{Error, Result};
use crate::sidecar::sidecar_bin;

/// External tools the test bed and the end-to-end tests drive.
pub const TOOLS: &[&str] = &["sh", "ip", "nsenter", "curl", "python3", "bpftool"];

/// Checks root, the cgroup2 mount, the external tools and the sidecar binary; the error lists
/// everything missing.
pub fn check() -> Result<()> {
    let mut missing = missing_for_test_bed();
    missing.extend(missing_sidecar_bin());
    report(missing)
}

fn missing_sidecar_bin() -> Option<String> {
    let bin = sidecar_bin();
    (!bin.is_file()).then(|| {
        format!(
            "the sidecar binary at {} (build it with `cargo xtask build` or set SIDECAR_BIN)",
            bin.display()
        )
    })
}

/// Checks what the test bed alone needs (root, cgroup2, tools), not the sidecar binary.
pub fn check_test_bed() -> Result<()> {
    report(missing_for_test_bed())
}

fn report(missing: Vec<String>) -> Result<()> {
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Missing(missing.join("; ")))
    }
}

fn missing_for_test_bed() -> Vec<String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root privileges (run the end-to-end tests as root)".to_owned());
    }
    if let Err(e) = cgroup2_mount() {
        missing.push(e.to_string());
    }
    for tool in TOOLS {
        if find_in_path(tool).is_none() {
            let hint = match *tool {
                "bpftool" => " (Debian package `bpftool`)",
                "nsenter" => " (Debian package `util-linux`)",
                "ip" => " (Debian package `iproute2`)",
                _ => "",
            };
            missing.push(format!("`{tool}` in PATH{hint}"));
        }
    }
    missing
}

/// Tools the HTTP/2, gRPC and websocket tests drive, with the Debian package of each.
pub const HTTP2_TOOLS: &[(&str, &str)] = &[
    ("nghttpd", "nghttp2-server"),
    ("nghttpx", "nghttp2-proxy"),
    ("h2load", "nghttp2-client"),
    ("nghttp", "nghttp2-client"),
];

/// What the HTTP/2, gRPC and websocket peers need beyond the test bed: the nghttp2 tools and
/// the Python virtualenv with grpcio and websockets.
fn missing_for_http2_peers() -> Vec<String> {
    let mut missing = Vec::new();
    for (tool, package) in HTTP2_TOOLS {
        if find_in_path(tool).is_none() {
            missing.push(format!(
                "`{tool}` in PATH (Debian package `{package}`; `cargo xtask setup` installs it)"
            ));
        }
    }
    if let Err(e) = crate::venv::check() {
        missing.push(e.to_string());
    }
    missing
}

/// Checks everything the HTTP/2, gRPC and websocket end-to-end tests need, the sidecar binary
/// included.
pub fn check_http2() -> Result<()> {
    let mut missing = missing_for_test_bed();
    missing.extend(missing_sidecar_bin());
    missing.extend(missing_for_http2_peers());
    report(missing)
}

/// Like [`check_http2`] without the sidecar binary (peers on the direct path only).
pub fn check_http2_test_bed() -> Result<()> {
    let mut missing = missing_for_test_bed();
    missing.extend(missing_for_http2_peers());
    report(missing)
}

/// Panics unless [`check_http2`] passes.
pub fn require_http2() {
    if let Err(e) = check_http2() {
        panic!("HTTP/2 end-to-end prerequisites not met: {e}");
    }
}

/// Panics unless [`check_http2_test_bed`] passes.
pub fn require_http2_test_bed() {
    if let Err(e) = check_http2_test_bed() {
        panic!("HTTP/2 peer prerequisites not met: {e}");
    }
}

/// Panics with the list of missing prerequisites, so the calling test fails loudly.
pub fn require() {
    if let Err(e) = check() {
        panic!("end-to-end prerequisites not met: {e}");
    }
}

/// Like [`require`] for tests of the test bed itself (no sidecar binary needed).
pub fn require_test_bed() {
    if let Err(e) = check_test_bed() {
        panic!("test bed prerequisites not met: {e}");
    }
}

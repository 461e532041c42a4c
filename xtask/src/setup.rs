//! `cargo xtask setup`: installs, idempotently, everything the build and the tests need:
//! Debian's compiler and library sources, the matching LLVM, bpf-linker built against it, the
//! linked rustup toolchain, and the test peers.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, sh};

/// bpf-linker release known to work with the pinned aya set.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Name of the rustup toolchain linked to Debian's compiler in /usr.
pub const BPF_TOOLCHAIN: &str = "system-bpf";

/// Debian packages of the eBPF compiler (rustc + library sources + cargo, same release).
const COMPILER_PACKAGES: &[&str] = &["rustc-web", "rust-web-src", "cargo-web"];
/// Packages for the tests and the demo: clients, servers, namespace and BPF inspection tools.
const PEER_PACKAGES: &[&str] = &[
    "curl",
    "iproute2",
    "util-linux",
    "bpftool",
    "python3",
    "openssl",
    "python3-venv",
    "procps",
];

/// Runs every set-up step; each one skips what is already present.
pub fn run() -> Result<()> {
    if !util::is_root() {
        bail!(
            "set-up needs root: it installs Debian packages with apt-get and the tests load eBPF \
             programs (run as root)"
        );
    }
    if which("apt-get").is_none() || which("dpkg-query").is_none() {
        bail!(
            "set-up needs a Debian-based system with apt-get; elsewhere install by hand: a rustc \
             with its library sources and the LLVM it was built with, bpf-linker {BPF_LINKER_VERSION} \
             for that LLVM, curl, iproute2, bpftool, python3"
        );
    }
    let mut apt = Apt::default();
    apt.ensure(COMPILER_PACKAGES)?;
    let major = debian_llvm_major()?;
    let llvm_dev = format!("llvm-{major}-dev");
    let mut packages: Vec<&str> = vec![&llvm_dev, "libzstd-dev", "zlib1g-dev"];
    packages.extend_from_slice(PEER_PACKAGES);
    apt.ensure(&packages)?;
    ensure_bpf_linker(major)?;
    ensure_toolchain_link()?;
    ensure_python_venv()?;
    eprintln!("setup: toolchain and test peers ready (LLVM {major})");
    Ok(())
}

/// Installs missing Debian packages, running `apt-get update` at most once.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn ensure(&mut self, packages: &[&str]) -> Result<()> {
        let missing: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|p| !is_installed(p))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if !self.updated {
            sh(Command::new("apt-get").args(["update", "-q"]))
                .context("apt-get update failed: is a Debian package registry reachable?")?;
            self.updated = true;
        }
        sh(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))
        .with_context(|| format!("cannot install {}", missing.join(" ")))
    }
}

fn is_installed(package: &str) -> bool {
    util::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.trim() == "install ok installed")
}

/// LLVM major version of Debian's rustc (`LLVM version: 22.1.8` in `rustc -vV`).
fn debian_llvm_major() -> Result<u32> {
    let out = util::output(Command::new("/usr/bin/rustc").arg("-vV"))
        .context("/usr/bin/rustc -vV failed although rustc-web is installed")?;
    parse_llvm_major(&out).context("cannot find `LLVM version:` in /usr/bin/rustc -vV")
}

fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|m| m.parse().ok())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// The LLVM major an installed bpf-linker is linked against (from its libLLVM soname).
fn bpf_linker_llvm_major(bin: &Path) -> Option<u32> {
    let ldd = util::output(Command::new("ldd").arg(bin))?;
    ldd.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("libLLVM")?;
        let digits: String = rest
            .trim_start_matches(['.', '-', 's', 'o'])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    })
}

fn ensure_bpf_linker(major: u32) -> Result<()> {
    let bin = cargo_home().join("bin").join("bpf-linker");
    if bin.exists() && bpf_linker_llvm_major(&bin) == Some(major) {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (a few minutes)"
    );
    sh(util::cargo()
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{major}"))
        .args([
            "install",
            "--force",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ]))
    .context("building bpf-linker failed")
}

fn ensure_toolchain_link() -> Result<()> {
    let list = util::output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to link Debian's compiler as a toolchain")?;
    if list
        .lines()
        .any(|l| l.split_whitespace().next() == Some(BPF_TOOLCHAIN))
    {
        return Ok(());
    }
    sh(Command::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]))
}

/// Project-local virtualenv for the Python test peers listed in tests/peers/requirements.txt.
fn ensure_python_venv() -> Result<()> {
    let root = util::workspace_root();
    let requirements = root.join("tests/peers/requirements.txt");
    if !requirements.exists() {
        return Ok(());
    }
    let venv = root.join(".venv");
    let python = venv.join("bin/python3");
    if !python.exists() {
        sh(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    let wanted = std::fs::read_to_string(&requirements)?;
    let stamp = venv.join(".requirements.installed");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(());
    }
    sh(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements))?;
    std::fs::write(&stamp, wanted)?;
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc_output() {
        let out = "rustc 1.96.0 (ac68faa20 2026-05-25)\nhost: x86_64-unknown-linux-gnu\n\
                   release: 1.96.0\nLLVM version: 22.1.8\n";
        assert_eq!(parse_llvm_major(out), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }
}

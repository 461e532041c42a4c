//! `cargo xtask setup`: installs, idempotently, everything the build and the tests need:
//! Debian's compiler and library sources, the matching LLVM, bpf-linker built against it, the
//! linked rustup toolchain, cargo-fuzz and its C++ compiler, and the test peers.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, sh};

/// bpf-linker release known to work with the pinned aya set.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz release installed when none is (`cargo xtask fuzz`, the fuzz smoke test).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Name of the rustup toolchain linked to Debian's compiler in /usr.
pub const BPF_TOOLCHAIN: &str = "system-bpf";

/// Debian packages of the eBPF compiler (rustc + library sources + cargo, same release).
const COMPILER_PACKAGES: &[&str] = &["rustc-web", "rust-web-src", "cargo-web"];
/// C++ compiler for libFuzzer, which the fuzz targets build from source (`cc` crate).
const FUZZ_PACKAGES: &[&str] = &["g++"];
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
    // HTTP/2 peers: h2load and nghttp (client), nghttpd (server), nghttpx (the HTTP/1.1
    // `Upgrade: h2c` server, which nghttpd lacks).
    "nghttp2-client",
    "nghttp2-server",
    "nghttp2-proxy",
    // promtool and a real Prometheus server for the admin server's /metrics tests.
    "prometheus",
    // The terminal `sidecar top` is tested in.
    "tmux",
    // The benchmarks (`cargo xtask bench`, and its smoke run in the tests): the HTTP/1.1 load
    // generator, the server, and the iptables REDIRECT variants (sidecar and Envoy).
    "wrk",
    "nginx-light",
    "iptables",
];

/// What `cargo xtask integration-test vm` needs: qemu (software emulation), a static busybox
/// for the initramfs, cpio, depmod, xz/zstd for compressed modules, strip.
const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "xz-utils",
    "zstd",
    "binutils",
];

/// Installs what the VM tests need (idempotent).
pub fn ensure_vm_packages() -> Result<()> {
    Apt::default().ensure(VM_PACKAGES)
}

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
    packages.extend_from_slice(FUZZ_PACKAGES);
    apt.ensure(&packages)?;
    ensure_bpf_linker(major)?;
    ensure_toolchain_link()?;
    ensure_cargo_fuzz()?;
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

/// Installs cargo-fuzz unless a `cargo fuzz` already runs. Needs no root.
pub fn ensure_cargo_fuzz() -> Result<()> {
    if util::output(util::cargo().args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    sh(util::cargo().args([
        "install",
        "--locked",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
    ]))
    .context("installing cargo-fuzz failed: is crates.io reachable?")
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

/// The interpreter of the peers' virtualenv (`<workspace>/.venv`); `cargo xtask test` passes
/// it to the end-to-end tests as `SIDECAR_TESTS_PYTHON`.
pub fn venv_python() -> PathBuf {
    util::workspace_root().join(".venv/bin/python3")
}

/// Modules the peers import from the virtualenv (what tests/peers/requirements.txt provides).
const VENV_IMPORTS: &str = "import grpc, websockets, kubernetes_validate, yaml, envoy";

/// Project-local virtualenv for the Python test peers listed in tests/peers/requirements.txt,
/// made with the `python3` first on PATH. Recreated when its interpreter no longer runs (e.g.
/// that Python was upgraded or removed); packages reinstalled when requirements.txt changed or
/// they do not import.
fn ensure_python_venv() -> Result<()> {
    let root = util::workspace_root();
    let requirements = root.join("tests/peers/requirements.txt");
    if !requirements.exists() {
        bail!("{} is missing", requirements.display());
    }
    let venv = root.join(".venv");
    let python = venv_python();
    let runs = util::output(Command::new(&python).args(["-c", "import sys"])).is_some();
    if !runs {
        let base = which("python3").context("python3 is not in PATH")?;
        eprintln!(
            "setup: creating the peers' virtualenv {} with {}",
            venv.display(),
            base.display()
        );
        sh(Command::new(&base)
            .args(["-m", "venv", "--clear"])
            .arg(&venv))
        .context("cannot create the virtualenv (on Debian the python3-venv package provides it)")?;
    }
    let wanted = std::fs::read_to_string(&requirements)?;
    let stamp = venv.join(".requirements.installed");
    let imports = || util::output(Command::new(&python).args(["-c", VENV_IMPORTS])).is_some();
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) && imports() {
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
        .arg(&requirements))
    .context("cannot install the peers' Python packages: is PyPI reachable?")?;
    if !imports() {
        bail!(
            "`{} -c '{VENV_IMPORTS}'` fails after installing {}",
            python.display(),
            requirements.display()
        );
    }
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

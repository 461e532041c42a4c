//! `cargo xtask build` / `build-ebpf`: the eBPF object (Debian toolchain, bpf-linker) and the
//! agent binary that embeds it.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

use crate::setup::BPF_TOOLCHAIN;
use crate::util::{self, sh};

/// Where the eBPF object lands.
pub fn ebpf_object() -> PathBuf {
    util::workspace_root().join("target/bpfel-unknown-none/release/sidecar-ebpf")
}

/// Where the agent binary lands.
pub fn sidecar_binary() -> PathBuf {
    util::workspace_root().join("target/release/sidecar")
}

/// Builds the eBPF object with Debian's compiler (which ships the `core` sources).
pub fn ebpf() -> Result<()> {
    // `cargo` here is rustup's proxy so that `+system-bpf` selects the linked toolchain.
    let mut cmd = Command::new("cargo");
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    util::strip_cargo_run_env(&mut cmd);
    cmd.current_dir(util::workspace_root())
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .args([
            &format!("+{BPF_TOOLCHAIN}"),
            "build",
            "--package",
            "sidecar-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
    sh(&mut cmd).context("building the eBPF programs failed (run `cargo xtask setup` first?)")?;
    let obj = ebpf_object();
    if !obj.exists() {
        bail!("the eBPF build succeeded but {} is missing", obj.display());
    }
    Ok(())
}

/// The packages every release build and test run of the agent selects, always all three
/// together. Cargo unifies dependency features over the packages it builds in one command, so
/// building `-p sidecar` alone, then testing `-p sidecar-tests` alone, compiled the whole tree
/// (libc, tokio, rustls, tonic, the OTel SDK, ...) again with slightly different features each
/// time, and the next build flipped it back. With one selection there is one set of artifacts.
/// xtask stays apart: `cargo xtask` builds it alone, and its tests select it alone.
pub const PACKAGES: &[&str] = &["sidecar-common", "sidecar", "sidecar-tests"];

/// `--package X` for each of [`PACKAGES`].
pub fn package_args() -> Vec<&'static str> {
    PACKAGES.iter().flat_map(|p| ["--package", p]).collect()
}

/// A cargo command in the workspace with the eBPF object to embed.
pub fn cargo_with_object() -> Command {
    let mut cmd = util::cargo();
    cmd.env("SIDECAR_EBPF_OBJECT", ebpf_object());
    cmd
}

/// Builds the eBPF object, then the release agent with the object embedded, with the
/// binaries and examples of [`PACKAGES`] (the benchmark driver and the span-export benchmark
/// among them). Examples need the dev-dependencies, which is what makes this selection's
/// features the same as the test runs'.
pub fn all() -> Result<()> {
    ebpf()?;
    sh(cargo_with_object()
        .args(["build", "--release"])
        .args(package_args())
        .args(["--bins", "--examples"]))?;
    let bin = sidecar_binary();
    let size = std::fs::metadata(&bin)
        .with_context(|| format!("{} missing after build", bin.display()))?
        .len();
    eprintln!(
        "build: {} ({:.1} MiB, eBPF object embedded)",
        bin.display(),
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// One test binary cargo built.
#[derive(Clone, Debug)]
pub struct TestExe {
    /// Package name.
    pub package: String,
    /// Target name (the file name under tests/ for integration tests, the crate for unit tests).
    pub name: String,
    /// `lib`, `bin`, `test`, `example`, ...
    pub kind: String,
    /// The executable.
    pub path: PathBuf,
    /// The package's directory, where cargo would run it.
    pub dir: PathBuf,
}

/// Builds every test binary of [`PACKAGES`] (release, not run) and lists them.
pub fn test_executables() -> Result<Vec<TestExe>> {
    let out = cargo_with_object()
        .args(["test", "--release"])
        .args(package_args())
        .args(["--no-run", "--message-format=json-render-diagnostics"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed ({})", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(name), Some(kind), Some(manifest), Some(id)) = (
            msg["executable"].as_str(),
            msg["target"]["name"].as_str(),
            msg["target"]["kind"][0].as_str(),
            msg["manifest_path"].as_str(),
            msg["package_id"].as_str(),
        ) else {
            continue;
        };
        let dir = PathBuf::from(manifest)
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        let package = PACKAGES
            .iter()
            .find(|p| dir.ends_with(package_dir(p)))
            .map_or_else(|| package_of(id), |p| (*p).to_string());
        found.push(TestExe {
            package,
            name: name.to_string(),
            kind: kind.to_string(),
            path: PathBuf::from(exe),
            dir,
        });
    }
    Ok(found)
}

/// The directory of a workspace package.
fn package_dir(package: &str) -> &str {
    match package {
        "sidecar-tests" => "tests",
        other => other,
    }
}

/// The package name in a cargo package id (`path+file:///x/tests#sidecar-tests@0.1.0` or
/// `path+file:///x/sidecar#0.1.0`).
fn package_of(id: &str) -> String {
    let tail = id.rsplit('/').next().unwrap_or(id);
    let name = tail.split(['#', '@']).next().unwrap_or(tail);
    name.to_string()
}

/// Runs test binaries one after the other from their package directories with `args`; runs
/// them all, then fails naming those that failed.
pub fn run_tests(tests: &[&TestExe], args: &[&str], env: &[(&str, PathBuf)]) -> Result<()> {
    let mut failed = Vec::new();
    for t in tests {
        eprintln!(
            "\n     Running {} ({} {})",
            t.path.display(),
            t.package,
            t.name
        );
        let mut cmd = Command::new(&t.path);
        cmd.current_dir(&t.dir).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let status = cmd
            .status()
            .with_context(|| format!("cannot start {}", t.path.display()))?;
        if !status.success() {
            failed.push(format!("{} {} ({status})", t.package, t.name));
        }
    }
    if !failed.is_empty() {
        bail!("test binaries failed: {}", failed.join(", "));
    }
    Ok(())
}

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

/// Builds the eBPF object, then the release agent with the object embedded.
pub fn all() -> Result<()> {
    ebpf()?;
    sh(util::cargo()
        .env("SIDECAR_EBPF_OBJECT", ebpf_object())
        .args([
            "build",
            "--release",
            "--package",
            "sidecar",
            "--bin",
            "sidecar",
        ]))?;
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

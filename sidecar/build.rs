//! Embeds the eBPF object (`sidecar-ebpf`, built for `bpfel-unknown-none`) into the agent.
//!
//! The object comes from `SIDECAR_EBPF_OBJECT` when set, else from
//! `<workspace>/target/bpfel-unknown-none/release/sidecar-ebpf`. It is copied into `OUT_DIR` as
//! `sidecar-ebpf.o`, which `src/ebpf.rs` includes 8-byte aligned. When no object exists yet an
//! empty placeholder is written instead, so `cargo check`/`clippy` work before the eBPF build;
//! the agent then refuses to attach with a message saying how to build it.

use std::{
    env,
    error::Error,
    fs,
    path::{Path, PathBuf},
};

const OBJECT_ENV: &str = "SIDECAR_EBPF_OBJECT";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-env-changed={OBJECT_ENV}");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    println!("cargo:rerun-if-changed=build.rs");

    let source = object_path()?;
    // Also reruns the script once a missing object appears.
    println!("cargo:rerun-if-changed={}", source.display());

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let embedded = out_dir.join("sidecar-ebpf.o");
    if source.is_file() {
        fs::copy(&source, &embedded)
            .map_err(|e| format!("cannot copy {} to OUT_DIR: {e}", source.display()))?;
    } else {
        fs::write(&embedded, [])?;
        println!(
            "cargo:warning=eBPF object {} not found: embedding an empty placeholder; this \
             build cannot attach its programs (build it with `cargo xtask build`, or set {OBJECT_ENV})",
            source.display()
        );
    }
    Ok(())
}

/// Where the eBPF object is read from.
fn object_path() -> Result<PathBuf, Box<dyn Error>> {
    if let Some(path) = env::var_os(OBJECT_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("no manifest dir")?);
    let workspace = manifest_dir.parent().unwrap_or(Path::new("."));
    let target_dir = match env::var_os("CARGO_TARGET_DIR").filter(|p| !p.is_empty()) {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    Ok(target_dir.join("bpfel-unknown-none/release/sidecar-ebpf"))
}

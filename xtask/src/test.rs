//! `cargo xtask test`: set-up, formatting, clippy, unit tests, a bounded fuzz run, privileged
//! end-to-end tests.

use anyhow::{Context, Result};

use crate::bench;
use crate::build;
use crate::fuzz;
use crate::setup;
use crate::util::{self, sh};
use crate::vm;

/// The kernel series CI boots: the oldest one supported.
const CI_VM_KERNEL: &str = "5.10";

/// Flags of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {}

/// Runs every check CI runs, failing at the first failing step.
pub fn run_all() -> Result<()> {
    let started = std::time::Instant::now();
    setup::run()?;
    step("formatting", || {
        sh(util::cargo().args(["fmt", "--all", "--", "--check"]))?;
        // The fuzz crate is a workspace of its own.
        sh(util::cargo().args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"]))
    })?;
    // One build of everything the later steps run (see `build::PACKAGES`): the agent, the
    // benchmark driver, the examples and every test binary.
    let mut tests = Vec::new();
    step("build (eBPF object, agent, test binaries)", || {
        build::all()?;
        tests = build::test_executables()?;
        Ok(())
    })?;
    let obj = build::ebpf_object();
    step("clippy -D warnings", || {
        sh(util::cargo().env("SIDECAR_EBPF_OBJECT", &obj).args([
            "clippy",
            "--release",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    let e2e_env = [
        ("SIDECAR_EBPF_OBJECT", obj.clone()),
        ("SIDECAR_BIN", build::sidecar_binary()),
        // The peers' virtualenv (grpcio, websockets, Envoy) made by the set-up step above.
        ("SIDECAR_TESTS_PYTHON", setup::venv_python()),
    ];
    step("unit and kernel tests", || {
        let unit: Vec<&build::TestExe> = tests
            .iter()
            .filter(|t| t.package != "sidecar-tests")
            .collect();
        build::run_tests(&unit, &[], &e2e_env)?;
        // The tests crate's own unit tests (parsers, reports); its end-to-end tests come later.
        let bed: Vec<&build::TestExe> = tests
            .iter()
            .filter(|t| t.package == "sidecar-tests" && t.kind == "lib")
            .collect();
        build::run_tests(&bed, &[], &e2e_env)?;
        sh(build::cargo_with_object()
            .args(["test", "--release", "--doc"])
            .args(build::package_args()))?;
        // xtask alone, as `cargo xtask` builds it (no rebuild of its dependencies).
        sh(util::cargo().args(["test", "--release", "--package", "xtask"]))
    })?;
    step("fuzz smoke (bounded)", || {
        fuzz::run_plan(&fuzz::Plan::all(fuzz::SMOKE_SECONDS, fuzz::SMOKE_SANITIZER))
    })?;
    step("end-to-end tests (root, network namespaces, eBPF)", || {
        let e2e: Vec<&build::TestExe> = tests
            .iter()
            .filter(|t| t.package == "sidecar-tests" && t.kind == "test")
            .collect();
        build::run_tests(&e2e, &["--test-threads=1"], &e2e_env)
    })
    .context("end-to-end tests failed")?;
    step(
        "benchmark harness smoke (every scenario and variant, 1 s each)",
        bench::smoke_prebuilt,
    )?;
    // The oldest supported kernel, in qemu: the kernel programs and their tests on 5.10 (the
    // end-to-end test in the VM adds 2.5 min, beyond CI's budget; `integration-test vm` runs it).
    step("kernel suite in a VM (Linux 5.10, qemu TCG)", || {
        vm::run_default_vms(&[CI_VM_KERNEL], vm::SuiteKind::Kernel)
    })?;
    eprintln!(
        "xtask test: every step passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Entry point of `cargo xtask test`.
pub fn run(_args: &TestArgs) -> Result<()> {
    run_all()
}

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    eprintln!("\n=== {name}");
    let started = std::time::Instant::now();
    let result = f().with_context(|| format!("step failed: {name}"));
    eprintln!("--- {name}: {:.0} s", started.elapsed().as_secs_f64());
    result
}

//! `cargo xtask`: the single entry point for every workflow a contributor needs.

mod bench;
mod build;
mod demo;
mod fuzz;
mod setup;
mod test;
mod util;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Workflows of the sidecar project")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install (idempotently) the eBPF toolchain and the test peers. Needs root and apt.
    Setup,
    /// Build the eBPF object only (target/bpfel-unknown-none/release/sidecar-ebpf).
    BuildEbpf,
    /// Build target/release/sidecar with the eBPF object embedded (runs setup first).
    Build,
    /// Set up, build, and run a throwaway pod with the sidecar for a bounded time.
    Demo(demo::DemoArgs),
    /// Build the cargo-fuzz targets (fuzz/) and run each for a bounded time; fails on a crash.
    Fuzz(fuzz::FuzzArgs),
    /// Set up, check formatting and clippy, run unit and privileged end-to-end tests.
    Test(test::TestArgs),
    /// Benchmarks: the direct path, the sidecar (eBPF and iptables redirection) and Envoy on
    /// this machine, reported as ratios in docs/benchmarks.md (`--check`: fail on a missed
    /// target; `--smoke`: prove the harness in a second per run).
    Bench(bench::BenchArgs),
    /// Run the privileged kernel suite on the host kernel (`local`) or in qemu on Debian's
    /// kernels (`vm --kernel 5.10 --kernel 6.1 --kernel 6.12`).
    IntegrationTest(vm::IntegrationArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::BuildEbpf => build::ebpf(),
        Command::Build => setup::run().and_then(|()| build::all()),
        Command::Demo(args) => demo::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Test(args) => test::run(&args),
        Command::IntegrationTest(args) => vm::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

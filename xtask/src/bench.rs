//! `cargo xtask bench`: builds the agent, the benchmark driver (`sidecar-bench`, in the tests
//! crate) and the span-export benchmark (`sidecar/examples/span_export.rs`), then runs the
//! driver as root. The full run writes docs/benchmarks.md, docs/benchmarks/results.json and
//! the SVG plots; `--smoke` (CI) runs everything once for a second into target/bench-smoke.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};

use crate::build;
use crate::setup;
use crate::util::{self, sh};

/// Flags of `cargo xtask bench`.
#[derive(Debug, Default, clap::Args)]
pub struct BenchArgs {
    /// Exit non-zero when a documented target (docs/benchmarks.md) is missed.
    #[arg(long)]
    pub check: bool,
    /// A tiny run proving the harness works (every scenario and variant once, one second):
    /// writes to target/bench-smoke, checks that every figure was produced, not the targets.
    #[arg(long)]
    pub smoke: bool,
    /// Repetitions of every (scenario, variant) [default: 3].
    #[arg(long)]
    pub reps: Option<u32>,
    /// Seconds of each throughput and latency run [default: 5].
    #[arg(long)]
    pub secs: Option<f64>,
    /// Fixed request rate of the latency runs, requests per second [default: 2000].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Worker threads of each proxy (sidecar --worker-threads, Envoy --concurrency)
    /// [default: 1].
    #[arg(long)]
    pub workers: Option<u32>,
    /// Only these scenarios (comma-separated: http1-1k, http1-64k, http2, grpc, conn-rate).
    #[arg(long)]
    pub scenarios: Option<String>,
    /// Only these variants (comma-separated: direct, sidecar-ebpf, sidecar-iptables, envoy).
    #[arg(long)]
    pub variants: Option<String>,
    /// Repetitions of the observation-overhead comparison [default: 5; 0 skips it].
    #[arg(long)]
    pub observation_reps: Option<u32>,
    /// Skip the span-export benchmark.
    #[arg(long)]
    pub no_spans: bool,
    /// Where the report goes [default: docs, or target/bench-smoke with --smoke].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Re-render the report from a results.json, measuring nothing.
    #[arg(long, value_name = "RESULTS_JSON")]
    pub render: Option<PathBuf>,
}

/// Entry point of `cargo xtask bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    if args.render.is_none() && !util::is_root() {
        bail!("the benchmarks need root (network namespaces, cgroups, eBPF, iptables)");
    }
    setup::run()?;
    // The agent, the driver (`sidecar-bench`) and the span-export example.
    build::all()?;
    sh(&mut driver(args))
}

/// The CI smoke run, with everything already built by `cargo xtask test`'s build step.
pub fn smoke_prebuilt() -> Result<()> {
    sh(&mut driver(&BenchArgs {
        smoke: true,
        ..BenchArgs::default()
    }))
}

/// The driver's command line for `args`.
fn driver(args: &BenchArgs) -> Command {
    let root = util::workspace_root();
    let target = root.join("target/release");
    let out = args.out.clone().unwrap_or_else(|| {
        if args.smoke {
            root.join("target/bench-smoke")
        } else {
            root.join("docs")
        }
    });
    let mut cmd = Command::new(target.join("sidecar-bench"));
    cmd.current_dir(&root)
        .env("SIDECAR_BIN", build::sidecar_binary())
        .env("SIDECAR_TESTS_PYTHON", setup::venv_python())
        .arg("--out")
        .arg(&out);
    if args.smoke {
        cmd.arg("--smoke");
    }
    if args.check {
        cmd.arg("--check");
    }
    let mut opt = |flag: &str, value: Option<String>| {
        if let Some(v) = value {
            cmd.arg(flag).arg(v);
        }
    };
    opt("--reps", args.reps.map(|v| v.to_string()));
    opt("--secs", args.secs.map(|v| v.to_string()));
    opt("--rate", args.rate.map(|v| v.to_string()));
    opt("--workers", args.workers.map(|v| v.to_string()));
    opt("--scenarios", args.scenarios.clone());
    opt("--variants", args.variants.clone());
    opt(
        "--observation-reps",
        args.observation_reps.map(|v| v.to_string()),
    );
    opt(
        "--render",
        args.render
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
    );
    if !args.no_spans {
        cmd.arg("--spans-bin")
            .arg(target.join("examples/span_export"));
    }
    cmd
}

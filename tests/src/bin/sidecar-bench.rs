//! `sidecar-bench`: the benchmark driver behind `cargo xtask bench` (which builds it, the
//! sidecar, the eBPF object and the span-export benchmark, then runs this as root).
//!
//! ```text
//! sidecar-bench [--out DIR] [--smoke] [--check] [--reps N] [--secs S] [--rate RPS]
//!               [--workers N] [--scenarios a,b] [--variants a,b] [--observation-reps N]
//!               [--spans-bin PATH] [--render RESULTS.json]
//! ```
//! Writes `DIR/benchmarks.md`, `DIR/benchmarks/results.json` and the SVG plots in
//! `DIR/benchmarks/`. `--check` exits 1 when a documented target is missed; `--smoke` runs
//! everything once for a second and only checks that every figure was produced.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use sidecar_tests::bench::model::{Results, RunInfo, Scenario, Variant};
use sidecar_tests::bench::runner::{self, Options};
use sidecar_tests::bench::{envoy, report, targets};

/// The hand-written top of docs/benchmarks.md: what is measured and how.
const METHOD: &str = include_str!("../bench/method.md");

struct Cli {
    out: PathBuf,
    check: bool,
    render: Option<PathBuf>,
    opts: Options,
}

fn usage(msg: &str) -> String {
    format!(
        "{msg}\nusage: sidecar-bench [--out DIR] [--smoke] [--check] [--reps N] [--secs S] \
         [--rate RPS] [--workers N] [--scenarios a,b] [--variants a,b] [--observation-reps N] \
         [--spans-bin PATH] [--render RESULTS.json]"
    )
}

fn parse_list<T: Copy>(
    value: &str,
    all: &[T],
    name: fn(T) -> &'static str,
) -> Result<Vec<T>, String> {
    value
        .split(',')
        .map(|v| {
            all.iter()
                .copied()
                .find(|x| name(*x) == v.trim())
                .ok_or_else(|| {
                    let names: Vec<&str> = all.iter().map(|x| name(*x)).collect();
                    format!("unknown {v:?}; expected one of {}", names.join(", "))
                })
        })
        .collect()
}

fn parse_cli() -> Result<Cli, String> {
    let mut args = std::env::args().skip(1);
    let mut out = PathBuf::from("docs");
    let mut check = false;
    let mut render = None;
    let mut smoke = false;
    let mut set: Vec<(String, String)> = Vec::new();
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--smoke" => smoke = true,
            "--check" => check = true,
            "-h" | "--help" => return Err(usage("")),
            _ => {
                let value = args
                    .next()
                    .ok_or_else(|| usage(&format!("{flag} needs a value")))?;
                match flag.as_str() {
                    "--out" => out = PathBuf::from(value),
                    "--render" => render = Some(PathBuf::from(value)),
                    _ => set.push((flag, value)),
                }
            }
        }
    }
    let mut opts = if smoke {
        Options::smoke()
    } else {
        Options::full()
    };
    for (flag, value) in set {
        let num = |v: &str| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| usage(&format!("{flag}: not a non-negative number: {v}")))
        };
        match flag.as_str() {
            "--reps" => opts.reps = num(&value)?.max(1.0) as usize,
            "--secs" => {
                let d = Duration::from_secs_f64(num(&value)?.max(1.0));
                opts.throughput = d;
                opts.latency = d;
            }
            "--rate" => opts.rate = num(&value)?.max(1.0),
            "--workers" => opts.proxy_workers = num(&value)?.max(1.0) as u32,
            "--observation-reps" => opts.observation_reps = num(&value)? as usize,
            "--scenarios" => {
                opts.scenarios = parse_list(&value, &Scenario::ALL, Scenario::as_str)
                    .map_err(|e| usage(&format!("--scenarios: {e}")))?
            }
            "--variants" => {
                opts.variants = parse_list(&value, &Variant::ALL, Variant::as_str)
                    .map_err(|e| usage(&format!("--variants: {e}")))?
            }
            "--spans-bin" => opts.spans = Some((PathBuf::from(value), Vec::new())),
            _ => return Err(usage(&format!("unknown argument {flag}"))),
        }
    }
    if smoke {
        if let Some((_, args)) = &mut opts.spans {
            *args = ["--step-secs", "1", "--start", "2000", "--max", "2000"]
                .map(String::from)
                .to_vec();
        }
    }
    Ok(Cli {
        out,
        check,
        render,
        opts,
    })
}

/// First line of a command's output (stdout, else stderr), or what went wrong.
fn version_line(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        }
        Err(e) => format!("{program}: {e}"),
    }
}

fn run_info(opts: &Options) -> RunInfo {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let root = sidecar_tests::sidecar::workspace_root();
    RunInfo {
        started: version_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cpu,
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        revision: version_line(
            "git",
            &[
                "-C",
                &root.to_string_lossy(),
                "describe",
                "--always",
                "--dirty",
            ],
        ),
        envoy_version: envoy::envoy_version().unwrap_or_else(|e| format!("unavailable: {e}")),
        load_generators: vec![
            version_line("wrk", &["-v"]),
            version_line("h2load", &["--version"]),
        ],
        repetitions: opts.reps,
        throughput_secs: opts.throughput.as_secs_f64(),
        latency_secs: opts.latency.as_secs_f64(),
        connections: opts.connections,
        proxy_workers: opts.proxy_workers,
        smoke: opts.smoke,
    }
}

/// Everything a smoke run must have produced; returns what is missing.
fn smoke_gaps(results: &Results, opts: &Options) -> Vec<String> {
    let mut gaps = Vec::new();
    for &scenario in &opts.scenarios {
        for &variant in &opts.variants {
            let Some(m) = results.get(scenario, variant) else {
                gaps.push(format!(
                    "{} over {}: not measured",
                    scenario.as_str(),
                    variant.as_str()
                ));
                continue;
            };
            for (i, s) in m.samples.iter().enumerate() {
                let what = format!(
                    "{} over {} rep {}",
                    scenario.as_str(),
                    variant.as_str(),
                    i + 1
                );
                if s.requests == 0 || s.throughput_rps <= 0.0 {
                    gaps.push(format!("{what}: no request completed"));
                }
                if s.errors > 0 {
                    gaps.push(format!("{what}: {} failed requests", s.errors));
                }
                if scenario != Scenario::ConnRate && s.latency.is_none() {
                    gaps.push(format!("{what}: no latency"));
                }
                if variant.has_proxy() && (s.cpu_s_per_1k.is_none() || s.peak_rss_kib.is_none()) {
                    gaps.push(format!("{what}: no CPU time or RSS of the proxy"));
                }
            }
        }
    }
    if opts.observation_reps > 0 && results.observation.len() < 2 {
        gaps.push("observation overhead: not measured".into());
    }
    if opts.spans.is_some() {
        match &results.spans {
            Some(s) if s.max_lossless_per_s > 0.0 => {}
            Some(_) => gaps.push("span export: no lossless step".into()),
            None => gaps.push("span export: not run".into()),
        }
    }
    gaps
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Writes the report, results and plots under `out`.
fn publish(
    out: &Path,
    results: &Results,
    evaluated: &[targets::TargetResult],
) -> Result<(), String> {
    let plots_dir = out.join("benchmarks");
    std::fs::create_dir_all(&plots_dir)
        .map_err(|e| format!("creating {}: {e}", plots_dir.display()))?;
    let json = serde_json::to_string_pretty(results).map_err(|e| e.to_string())?;
    write(&plots_dir.join("results.json"), &(json + "\n"))?;
    let svgs = report::render_svgs(results);
    for (name, svg) in &svgs {
        write(&plots_dir.join(name), svg)?;
    }
    let alts: Vec<(String, String)> = svgs
        .iter()
        .map(|(name, _)| {
            (
                name.clone(),
                name.trim_end_matches(".svg").replace('-', " "),
            )
        })
        .collect();
    let plots: Vec<(&str, &str)> = alts.iter().map(|(n, a)| (n.as_str(), a.as_str())).collect();
    let md = format!(
        "{}\n{}",
        METHOD.trim_end(),
        report::render_markdown(results, evaluated, &plots)
    );
    write(&out.join("benchmarks.md"), &md)
}

extern "C" fn stop_handler(_: libc::c_int) {
    runner::request_stop();
}

/// SIGINT and SIGTERM stop the run before its next measurement, so every namespace, cgroup,
/// program and process it made is removed on the way out.
fn on_stop_signals() -> Result<(), String> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(stop_handler),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.map_err(|e| format!("{sig}: {e}"))?;
    }
    Ok(())
}

/// Root, the test bed's tools, the sidecar binary, and the benchmark's own tools.
fn prerequisites() -> Result<(), String> {
    let mut missing = Vec::new();
    if let Err(e) = sidecar_tests::prereq::check() {
        missing.push(e.to_string());
    }
    for tool in ["wrk", "h2load", "iptables"] {
        if sidecar_tests::cmd::find_in_path(tool).is_none() {
            missing.push(format!("`{tool}` in PATH (run `cargo xtask setup`)"));
        }
    }
    if let Err(e) = envoy::envoy_bin() {
        missing.push(e.to_string());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("; "))
    }
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sidecar-bench: {e}");
            return ExitCode::from(64);
        }
    };
    let results = if let Some(path) = &cli.render {
        match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<Results>(&t).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("sidecar-bench: cannot read {}: {e}", path.display());
                return ExitCode::from(66);
            }
        }
    } else {
        if let Err(e) = prerequisites() {
            eprintln!("sidecar-bench: {e}");
            return ExitCode::FAILURE;
        }
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("sidecar-bench: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = on_stop_signals() {
            eprintln!("sidecar-bench: cannot handle SIGINT/SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
        let info = run_info(&cli.opts);
        match runner::run(&rt, &cli.opts, info) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("sidecar-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let evaluated = targets::evaluate(&results);
    if let Err(e) = publish(&cli.out, &results, &evaluated) {
        eprintln!("sidecar-bench: {e}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "sidecar-bench: report written to {}",
        cli.out.join("benchmarks.md").display()
    );
    if results.info.smoke {
        let gaps = smoke_gaps(&results, &cli.opts);
        if !gaps.is_empty() {
            eprintln!("sidecar-bench: the smoke run is incomplete:");
            for g in &gaps {
                eprintln!("  - {g}");
            }
            return ExitCode::FAILURE;
        }
        eprintln!("sidecar-bench: smoke run complete (targets are not checked on a smoke run)");
        return ExitCode::SUCCESS;
    }
    for t in &evaluated {
        eprintln!("  {} {}", if t.pass { "PASS" } else { "FAIL" }, t.sentence);
    }
    let failed = evaluated.iter().filter(|t| !t.pass).count();
    if cli.check && failed > 0 {
        eprintln!("sidecar-bench: {failed} target(s) missed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

//! `cargo xtask fuzz`: builds the cargo-fuzz targets of `fuzz/` and runs each one for a bounded
//! time on its committed seed corpus, failing (with the crashing input's path) on a crash.
//!
//! The targets need nightly compiler flags (`-Z sanitizer`, sanitizer coverage); they are built
//! with the stable toolchain and `RUSTC_BOOTSTRAP=1`, in `target/fuzz/<sanitizer>` so later runs
//! reuse the build. New inputs libFuzzer finds go to `target/fuzz/corpus/<target>`; the
//! committed corpus in `fuzz/corpus/<target>` is only read.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::setup;
use crate::util::{self, sh};

/// The fuzz targets of `fuzz/Cargo.toml`, in the order they run.
pub const TARGETS: &[&str] = &[
    "http1_request_head",
    "http1_response_head",
    "http1_chunked",
    "http2",
];

/// Seconds each target runs in the fuzz smoke step of `cargo xtask test`.
pub const SMOKE_SECONDS: u64 = 10;
/// Sanitizer of the fuzz smoke step: none. AddressSanitizer works with the stable toolchain
/// too, but costs about half again the build's CPU time, which the step's budget has not got.
pub const SMOKE_SANITIZER: Sanitizer = Sanitizer::None;

/// Codegen units for the fuzz build: cargo-fuzz's default of 1 makes a cold build of the agent
/// crate several times slower, for a small gain in executions per second.
const CODEGEN_UNITS: &str = "16";
/// libFuzzer's limit on one input, in seconds: a parser that spins on an input is a bug too.
const INPUT_TIMEOUT_SECS: u64 = 10;
/// Lines of a failing run's log shown on the console.
const LOG_TAIL_LINES: usize = 60;

/// Flags of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Fuzz target to run; repeat for several (default: all of them).
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
    /// How long each target runs, in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    seconds: u64,
    /// Sanitizer the targets are built with.
    #[arg(long, value_enum, default_value_t = Sanitizer::Address)]
    sanitizer: Sanitizer,
}

/// Sanitizer of a fuzz build (cargo-fuzz's `--sanitizer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Sanitizer {
    /// AddressSanitizer: catches memory errors in unsafe code and C dependencies.
    Address,
    /// Coverage instrumentation only: builds and runs faster.
    None,
}

impl fmt::Display for Sanitizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sanitizer::Address => "address",
            Sanitizer::None => "none",
        })
    }
}

/// What one fuzzing session does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Targets to run, in order, each once.
    pub targets: Vec<&'static str>,
    /// Time each target runs.
    pub seconds: u64,
    /// Sanitizer of the build.
    pub sanitizer: Sanitizer,
}

impl Plan {
    /// Every target for `seconds` each.
    pub fn all(seconds: u64, sanitizer: Sanitizer) -> Self {
        Self {
            targets: TARGETS.to_vec(),
            seconds,
            sanitizer,
        }
    }

    /// The plan the flags ask for: the named targets (in [`TARGETS`] order, once each), or all.
    pub fn from_args(args: &FuzzArgs) -> Result<Self> {
        Ok(Self {
            targets: select_targets(&args.targets)?,
            seconds: args.seconds,
            sanitizer: args.sanitizer,
        })
    }
}

fn select_targets(names: &[String]) -> Result<Vec<&'static str>> {
    if let Some(unknown) = names.iter().find(|n| !TARGETS.contains(&n.as_str())) {
        bail!(
            "unknown fuzz target `{unknown}`; the targets are: {}",
            TARGETS.join(", ")
        );
    }
    if names.is_empty() {
        return Ok(TARGETS.to_vec());
    }
    Ok(TARGETS
        .iter()
        .copied()
        .filter(|t| names.iter().any(|n| n == t))
        .collect())
}

/// Entry point of `cargo xtask fuzz`.
pub fn run(args: &FuzzArgs) -> Result<()> {
    let plan = Plan::from_args(args)?;
    setup::ensure_cargo_fuzz()?;
    run_plan(&plan)
}

/// Builds the plan's targets, then runs each; fails after the last one if any crashed.
pub fn run_plan(plan: &Plan) -> Result<()> {
    let started = std::time::Instant::now();
    let dirs = Dirs::new(plan.sanitizer);
    std::fs::create_dir_all(&dirs.target)
        .with_context(|| format!("cannot create {}", dirs.target.display()))?;
    // The fuzz targets never load the eBPF programs: an empty object keeps the fuzz build from
    // depending on (and being rebuilt with) the eBPF build.
    let no_ebpf = dirs.target.join("no-ebpf.o");
    if !no_ebpf.exists() {
        std::fs::write(&no_ebpf, [])?;
    }

    if plan.targets.len() == TARGETS.len() {
        // Without a target name, one cargo invocation builds them all.
        sh(&mut fuzz_command("build", plan.sanitizer, &dirs, &no_ebpf))
            .context("building the fuzz targets failed")?;
    } else {
        for target in &plan.targets {
            sh(fuzz_command("build", plan.sanitizer, &dirs, &no_ebpf).arg(target))
                .with_context(|| format!("building fuzz target {target} failed"))?;
        }
    }
    let built = started.elapsed();

    let mut failures = Vec::new();
    for target in &plan.targets {
        match run_target(target, plan, &dirs, &no_ebpf)? {
            Outcome::Clean(summary) => eprintln!("fuzz: {target}: no crash ({summary})"),
            Outcome::Failed(failure) => {
                eprintln!("fuzz: {target}: FAILED\n{failure}");
                failures.push(*target);
            }
        }
    }
    eprintln!(
        "fuzz: build {:.0} s, {} target(s) × {} s, {:.0} s in all (sanitizer {})",
        built.as_secs_f64(),
        plan.targets.len(),
        plan.seconds,
        started.elapsed().as_secs_f64(),
        plan.sanitizer
    );
    if !failures.is_empty() {
        bail!("fuzz target(s) failed: {}", failures.join(", "));
    }
    Ok(())
}

/// Directories of a fuzzing session.
struct Dirs {
    /// The cargo-fuzz project (`fuzz/`).
    project: PathBuf,
    /// Cargo target directory of the fuzz build.
    target: PathBuf,
    /// Where libFuzzer writes new corpus entries, per target.
    scratch_corpus: PathBuf,
    /// Run logs, per target.
    logs: PathBuf,
}

impl Dirs {
    fn new(sanitizer: Sanitizer) -> Self {
        let root = util::workspace_root();
        let fuzz = root.join("target/fuzz");
        Self {
            project: root.join("fuzz"),
            target: fuzz.join(sanitizer.to_string()),
            scratch_corpus: fuzz.join("corpus"),
            logs: fuzz.join("logs"),
        }
    }
}

/// `cargo fuzz <sub>` with the build settings every call must share (any difference would
/// rebuild the targets).
fn fuzz_command(sub: &str, sanitizer: Sanitizer, dirs: &Dirs, no_ebpf: &Path) -> Command {
    let mut cmd = util::cargo();
    cmd.env("RUSTC_BOOTSTRAP", "1")
        .env("SIDECAR_EBPF_OBJECT", no_ebpf)
        .args(["fuzz", sub, "--fuzz-dir"])
        .arg(&dirs.project)
        .arg("--target-dir")
        .arg(&dirs.target)
        .args(["--sanitizer", &sanitizer.to_string()])
        .args(["--codegen-units", CODEGEN_UNITS]);
    cmd
}

/// How one target's run ended.
enum Outcome {
    /// Ran its time without a failure; the libFuzzer summary.
    Clean(String),
    /// What to tell about the failure: crashing inputs, how to reproduce, the log's end.
    Failed(String),
}

fn run_target(target: &str, plan: &Plan, dirs: &Dirs, no_ebpf: &Path) -> Result<Outcome> {
    let seeds = dirs.project.join("corpus").join(target);
    let scratch = dirs.scratch_corpus.join(target);
    std::fs::create_dir_all(&scratch)?;
    std::fs::create_dir_all(&dirs.logs)?;
    let log_path = dirs.logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;

    let mut cmd = fuzz_command("run", plan.sanitizer, dirs, no_ebpf);
    // libFuzzer writes new inputs to the first corpus directory and only reads the others.
    cmd.arg(target)
        .arg(&scratch)
        .arg(&seeds)
        .arg("--")
        .args(libfuzzer_args(plan.seconds))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    eprintln!(
        "+ {}\nfuzz: {target}: {} s, log in {}",
        util::describe(&cmd),
        plan.seconds,
        log_path.display()
    );
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", util::describe(&cmd)))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    if status.success() {
        return Ok(Outcome::Clean(
            run_summary(&text).unwrap_or_else(|| "no libFuzzer summary".into()),
        ));
    }
    let artifacts = artifact_paths(&text);
    let mut report = tail(&text, LOG_TAIL_LINES);
    report.push('\n');
    for panic in panic_messages(&text) {
        report.push_str(&format!("panic: {panic}\n"));
    }
    if artifacts.is_empty() {
        report.push_str(&format!(
            "`cargo fuzz run {target}` failed ({status}) without writing a crashing input; full \
             log: {}",
            log_path.display()
        ));
    }
    for artifact in &artifacts {
        let path = dirs.project.join(artifact);
        let path = if path.exists() {
            path
        } else {
            PathBuf::from(artifact)
        };
        report.push_str(&format!(
            "crashing input: {}\nreproduce: RUSTC_BOOTSTRAP=1 SIDECAR_EBPF_OBJECT={} cargo fuzz run \
             --fuzz-dir fuzz --target-dir {} --sanitizer {} --codegen-units {CODEGEN_UNITS} \
             {target} {}\n",
            path.display(),
            no_ebpf.display(),
            dirs.target.display(),
            plan.sanitizer,
            path.display()
        ));
    }
    report.push_str(&format!("full log: {}", log_path.display()));
    Ok(Outcome::Failed(report))
}

/// libFuzzer flags of a bounded run.
fn libfuzzer_args(seconds: u64) -> Vec<String> {
    vec![
        format!("-max_total_time={seconds}"),
        format!("-timeout={INPUT_TIMEOUT_SECS}"),
        "-print_final_stats=1".into(),
    ]
}

/// Inputs libFuzzer saved for a failure (`Test unit written to <path>`), as written.
fn artifact_paths(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split_once("Test unit written to "))
        .map(|(_, path)| path.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Rust panics in a run's log: the `panicked at <place>:` line joined with the message after it.
fn panic_messages(log: &str) -> Vec<String> {
    let mut lines = log.lines();
    let mut out = Vec::new();
    while let Some(line) = lines.next() {
        if let Some((_, place)) = line.split_once(" panicked at ") {
            let message = lines.next().unwrap_or_default();
            out.push(format!("{} {}", place.trim(), message.trim()));
        }
    }
    out
}

/// libFuzzer's closing line of a clean run: `Done 123 runs in 15 second(s)`.
fn run_summary(log: &str) -> Option<String> {
    log.lines()
        .rev()
        .find(|l| l.starts_with("Done ") && l.contains(" runs in "))
        .map(|l| l.trim().to_string())
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FuzzArgs,
    }

    fn plan(argv: &[&str]) -> Result<Plan> {
        let cli = Cli::try_parse_from(std::iter::once("fuzz").chain(argv.iter().copied()))?;
        Plan::from_args(&cli.args)
    }

    #[test]
    fn defaults_run_every_target_for_a_minute_with_asan() {
        assert_eq!(plan(&[]).unwrap(), Plan::all(60, Sanitizer::Address));
    }

    #[test]
    fn named_targets_run_once_each_in_table_order() {
        let p = plan(&[
            "--target",
            "http2",
            "--target",
            "http1_chunked",
            "--target",
            "http2",
            "--seconds",
            "5",
            "--sanitizer",
            "none",
        ])
        .unwrap();
        assert_eq!(p.targets, ["http1_chunked", "http2"]);
        assert_eq!(p.seconds, 5);
        assert_eq!(p.sanitizer, Sanitizer::None);
    }

    #[test]
    fn bad_flags_are_refused() {
        let err = plan(&["--target", "http3"]).unwrap_err().to_string();
        assert!(
            err.contains("http3") && err.contains("http1_chunked"),
            "{err}"
        );
        assert!(plan(&["--seconds", "0"]).is_err());
        assert!(plan(&["--seconds", "x"]).is_err());
        assert!(plan(&["--sanitizer", "memory"]).is_err());
    }

    #[test]
    fn libfuzzer_is_bounded() {
        let args = libfuzzer_args(15);
        assert!(args.contains(&"-max_total_time=15".to_string()));
        assert!(args.iter().any(|a| a.starts_with("-timeout=")));
    }

    #[test]
    fn crashing_inputs_are_found_in_the_log() {
        let log = "==123== ERROR: libFuzzer: deadly signal\n\
                   MS: 1 ChangeByte-; base unit: 0123\n\
                   artifact_prefix='/w/fuzz/artifacts/http2/'; Test unit written to \
                   /w/fuzz/artifacts/http2/crash-da39a3ee\n\
                   Base64: AAAA\n";
        assert_eq!(
            artifact_paths(log),
            ["/w/fuzz/artifacts/http2/crash-da39a3ee"]
        );
        assert!(artifact_paths("Done 10 runs in 1 second(s)\n").is_empty());
    }

    #[test]
    fn panics_are_found_in_the_log() {
        let log =
            "INFO: seed corpus\nthread '<unnamed>' panicked at sidecar/src/fuzzing.rs:81:5:\n\
                   traceparent moved\nstack backtrace:\n";
        assert_eq!(
            panic_messages(log),
            ["sidecar/src/fuzzing.rs:81:5: traceparent moved"]
        );
        assert!(panic_messages("==1== ERROR: AddressSanitizer\n").is_empty());
    }

    #[test]
    fn clean_runs_are_summarised() {
        let log = "#1024 pulse cov: 1 ft: 2\nDone 4242 runs in 16 second(s)\nstat::x: 1\n";
        assert_eq!(
            run_summary(log).as_deref(),
            Some("Done 4242 runs in 16 second(s)")
        );
        assert_eq!(run_summary("nothing"), None);
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }

    #[test]
    fn targets_match_the_fuzz_project() {
        let root = util::workspace_root().join("fuzz");
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let bins: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.strip_prefix("name = \""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|n| *n != "sidecar-fuzz")
            .collect();
        assert_eq!(bins, TARGETS);
        for target in TARGETS {
            assert!(
                root.join("fuzz_targets")
                    .join(format!("{target}.rs"))
                    .is_file(),
                "{target}: no source"
            );
            let seeds = std::fs::read_dir(root.join("corpus").join(target))
                .map(|d| d.count())
                .unwrap_or(0);
            assert!(seeds > 0, "{target}: no seed corpus");
        }
    }
}

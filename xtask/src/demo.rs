//! `cargo xtask demo`: the main job on a fresh machine. Sets up, builds, makes a throwaway pod
//! (network namespace + cgroup) whose unmodified curl calls a real HTTP server in another
//! namespace, runs the sidecar on it with the default local sink, shows its live summary and
//! where the OTLP-JSON went, and cleans everything up.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sidecar_tests::{PodWorld, SidecarConfig};

use crate::{build, setup, util};

/// Flags of `cargo xtask demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long the demo pod sends traffic, in seconds.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(3..=600))]
    seconds: u64,
}

/// The app's request mix: (curl arguments, what it shows).
const REQUESTS: &[&[&str]] = &[
    &["-o", "/dev/null", "{v4}/bytes/1024"],
    &["-o", "/dev/null", "{v4}/bytes/65536"],
    &["-o", "/dev/null", "{v4}/status/404"],
    &["-o", "/dev/null", "{v4}/status/503"],
    &["-o", "/dev/null", "{v4}/slow?ms=40"],
    &["-o", "/dev/null", "-d", "hello sidecar", "{v4}/sha256"],
    &["-o", "/dev/null", "{v6}/bytes/2048"],
];

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    setup::run()?;
    build::all()?;
    sidecar_tests::prereq::check().context("the demo needs these")?;

    let out_dir = util::workspace_root().join("target/demo");
    std::fs::create_dir_all(&out_dir)?;
    let sink = out_dir.join("telemetry.otlp.jsonl");
    if sink.exists() {
        std::fs::remove_file(&sink)?;
    }

    println!(
        "\n== demo: building a throwaway pod (network namespaces, veth, cgroups, HTTP server)"
    );
    let world = PodWorld::new("demo")?;
    println!(
        "   pod cgroup {}; app calls {} and {}",
        world.pod_cgroup.path().display(),
        world.url("/"),
        world.url_v6("/")
    );
    let cfg = SidecarConfig {
        sink_file: Some(sink.clone()),
        summary_interval_secs: Some(5),
        metric_export_interval_ms: Some(5_000),
        bsp_schedule_delay_ms: Some(1_000),
        drain_timeout_secs: Some(5),
        ..SidecarConfig::default()
    };
    let mut sidecar = world.start_sidecar(&cfg)?;
    println!(
        "== sidecar running (pid {}); its log and live summary follow\n",
        sidecar.pid()
    );
    let mut shown = 0usize;
    show_new(&sidecar.log(), &mut shown);

    let v4 = world.url("");
    let v6 = world.url_v6("");
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let (mut sent, mut failed) = (0u64, 0u64);
    // Bounded: at most ~10 requests a second for `seconds`, each with its own timeout.
    'outer: while Instant::now() < deadline {
        for template in REQUESTS {
            if Instant::now() >= deadline {
                break 'outer;
            }
            let argv: Vec<String> = template
                .iter()
                .map(|a| a.replace("{v4}", &v4).replace("{v6}", &v6))
                .collect();
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let done = world.curl(&argv, Duration::from_secs(5))?;
            sent += 1;
            if !done.success() {
                failed += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        show_new(&sidecar.log(), &mut shown);
    }
    println!("\n== the app sent {sent} requests ({failed} failed at the client); stopping the sidecar (SIGTERM)");
    sidecar.terminate()?;
    let status = sidecar.wait_exit(Duration::from_secs(20))?;
    show_new(&sidecar.log(), &mut shown);
    match status {
        Some(s) if s.success() => println!("== sidecar exited cleanly ({s})"),
        Some(s) => anyhow::bail!("the sidecar exited with {s}"),
        None => anyhow::bail!("the sidecar did not exit within 20 s of SIGTERM"),
    }
    report_sink(&sink)?;
    drop(world);
    println!("== cleaned up: namespaces, cgroups and processes removed");
    Ok(())
}

fn show_new(log: &str, shown: &mut usize) {
    if let Some(new) = log.get(*shown..) {
        print!("{new}");
        *shown = log.len();
    }
}

fn report_sink(sink: &Path) -> Result<()> {
    let text = std::fs::read_to_string(sink)
        .with_context(|| format!("the default sink wrote nothing to {}", sink.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let spans = lines
        .iter()
        .filter(|l| l.contains("\"resourceSpans\""))
        .count();
    let metrics = lines
        .iter()
        .filter(|l| l.contains("\"resourceMetrics\""))
        .count();
    println!(
        "\n== OTLP-JSON written to {} ({} lines: {spans} span batches, {metrics} metric exports)",
        sink.display(),
        lines.len()
    );
    if let Some(first) = lines.iter().find(|l| l.contains("\"resourceSpans\"")) {
        let cut: String = first.chars().take(400).collect();
        println!("   first span batch begins: {cut}...");
    }
    if spans == 0 || metrics == 0 {
        anyhow::bail!("expected both spans and metrics in {}", sink.display());
    }
    Ok(())
}

//! Command line: `sidecar run` and `sidecar check`, every flag with its environment variable.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Exit code for invalid usage or configuration (EX_USAGE from sysexits.h).
pub const EXIT_USAGE: u8 = 64;

/// eBPF-backed observability and traffic-interception sidecar.
///
/// Redirects the outbound TCP connections of a cgroup (the pod) to a local proxy, forwards them
/// unchanged, measures every HTTP/1.x request (other TCP as connections) and exports metrics and
/// traces over OTLP gRPC, or to a local OTLP-JSON file when no endpoint is configured.
#[derive(Debug, Parser)]
#[command(name = "sidecar", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the interception programs to a cgroup and run the proxy until SIGTERM/SIGINT.
    ///
    /// Run it inside the pod's network namespace, from a cgroup of its own that is not the
    /// target cgroup (a sibling or a child of it, as a Kubernetes sidecar container is).
    Run(RunArgs),
    /// Report each kernel feature the sidecar needs; exit non-zero when one is missing.
    Check,
}

/// Flags of `sidecar run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// cgroup v2 directory whose processes' outbound TCP connections are redirected (the pod).
    #[arg(long, env = "SIDECAR_CGROUP", value_name = "DIR")]
    pub cgroup: PathBuf,

    /// cgroup v2 directory of the proxy itself, whose connections are never redirected
    /// [default: this process's own cgroup, from /proc/self/cgroup].
    #[arg(long, env = "SIDECAR_PROXY_CGROUP", value_name = "DIR")]
    pub proxy_cgroup: Option<PathBuf>,

    /// Port of the proxy's outbound listeners on 127.0.0.1 and [::1].
    #[arg(long, env = "SIDECAR_OUTBOUND_PORT", default_value_t = 15001,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,

    /// OTLP gRPC endpoint of an OpenTelemetry Collector, e.g. http://otel-collector:4317.
    /// Without it, telemetry goes to the local sink file and a periodic summary on stdout.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL",
          value_parser = parse_endpoint)]
    pub otlp_endpoint: Option<String>,

    /// `service.name` resource attribute of the exported telemetry.
    #[arg(long, env = "OTEL_SERVICE_NAME", value_name = "NAME")]
    pub service_name: Option<String>,

    /// Interval between metric exports, in milliseconds.
    #[arg(long, env = "OTEL_METRIC_EXPORT_INTERVAL", value_name = "MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub metric_export_interval: u64,

    /// Delay between span batch exports, in milliseconds.
    #[arg(long, env = "OTEL_BSP_SCHEDULE_DELAY", value_name = "MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub bsp_schedule_delay: u64,

    /// File the default sink appends OTLP-JSON lines to (used when no OTLP endpoint is set).
    #[arg(
        long,
        env = "SIDECAR_SINK_FILE",
        value_name = "PATH",
        default_value = "/tmp/sidecar/telemetry.otlp.jsonl"
    )]
    pub sink_file: PathBuf,

    /// Seconds between the human summaries printed by the default sink; 0 turns them off.
    #[arg(
        long,
        env = "SIDECAR_SUMMARY_INTERVAL",
        value_name = "SECS",
        default_value_t = 10
    )]
    pub summary_interval: u64,

    /// Seconds to wait, after SIGTERM/SIGINT, for in-flight connections to finish.
    #[arg(
        long,
        env = "SIDECAR_DRAIN_TIMEOUT",
        value_name = "SECS",
        default_value_t = 5
    )]
    pub drain_timeout: u64,

    /// Seconds to wait for an upstream connection to be established.
    #[arg(long, env = "SIDECAR_CONNECT_TIMEOUT", value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout: u64,
}

impl RunArgs {
    /// Drain bound after a stop signal.
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_timeout)
    }
}

fn parse_endpoint(s: &str) -> Result<String, String> {
    let s = s.trim();
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("`{s}` is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("`{s}` has no host"));
    }
    Ok(s.to_string())
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            // Printing can only fail when stdout/stderr are gone; nothing better to do then.
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging();
    match cli.command {
        Command::Check => {
            let report = crate::kernel::check();
            println!("{report}");
            if report.all_ok() {
                ExitCode::SUCCESS
            } else {
                eprintln!("sidecar check: at least one required kernel feature is missing");
                ExitCode::FAILURE
            }
        }
        Command::Run(args) => crate::run::main(args),
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sidecar").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults() {
        let cli = parse(&["run", "--cgroup", "/sys/fs/cgroup/pod"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.outbound_port, 15001);
        assert_eq!(args.summary_interval, 10);
        assert_eq!(args.drain(), Duration::from_secs(5));
        assert_eq!(args.cgroup, PathBuf::from("/sys/fs/cgroup/pod"));
    }

    #[test]
    fn rejects_bad_values_with_usage_errors() {
        assert!(parse(&["run"]).is_err(), "--cgroup is required");
        assert!(parse(&["run", "--cgroup", "/x", "--outbound-port", "0"]).is_err());
        assert!(parse(&["run", "--cgroup", "/x", "--outbound-port", "70000"]).is_err());
        assert!(parse(&["run", "--cgroup", "/x", "--otlp-endpoint", "collector:4317"]).is_err());
        assert!(parse(&["run", "--cgroup", "/x", "--metric-export-interval", "0"]).is_err());
        assert!(parse(&["run", "--cgroup", "/x", "--bogus"]).is_err());
    }

    #[test]
    fn endpoint_validation() {
        assert_eq!(
            parse_endpoint(" http://127.0.0.1:4317 ").as_deref(),
            Ok("http://127.0.0.1:4317")
        );
        assert!(parse_endpoint("https://collector.example:4317").is_ok());
        assert!(parse_endpoint("http://").is_err());
        assert!(parse_endpoint("grpc://x:4317").is_err());
    }
}

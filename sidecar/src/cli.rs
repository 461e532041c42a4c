//! Command line: `sidecar run` and `sidecar check`, every flag with its environment variable.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::policy::{CidrSelection, CidrSet, PolicyConfig, PortSelection, PortSet};
use crate::telemetry::sampling::{parse_ratio, SamplerKind};

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
// Parsed once per process: the size of `RunArgs` inline costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
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
    /// cgroup v2 directory whose processes' outbound TCP connections are redirected (the pod)
    /// [default: the parent of this container's own cgroup, found from /proc/self/cgroup; see
    /// --host-cgroup-root].
    #[arg(long, env = "SIDECAR_CGROUP", value_name = "DIR")]
    pub cgroup: Option<PathBuf>,

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

    /// Trace sampler: always_on, always_off, traceidratio, parentbased_always_on,
    /// parentbased_always_off or parentbased_traceidratio. Metrics are never sampled.
    #[arg(long, env = "OTEL_TRACES_SAMPLER", value_name = "SAMPLER",
          default_value = "parentbased_always_on", value_parser = parse_sampler)]
    pub traces_sampler: SamplerKind,

    /// Ratio of traces the traceidratio samplers keep, from 0 to 1.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", value_name = "RATIO", default_value = "1.0",
          value_parser = parse_sampler_arg)]
    pub traces_sampler_arg: f64,

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

    /// Route templates of inbound requests, comma-separated (`/users/{id},/orders/{o}/items/{i}`):
    /// a `{name}` segment matches one path segment; the first match is `http.route`. Paths no
    /// template matches get a heuristic route (identifier-like segments become `{id}`).
    #[arg(long, env = "SIDECAR_ROUTES", value_name = "TEMPLATES", value_delimiter = ',',
          value_parser = parse_route_template)]
    pub routes: Vec<String>,

    /// Cap on distinct `http.route` values per sidecar; later new routes are recorded as
    /// `_OTHER`.
    #[arg(long, env = "SIDECAR_MAX_ROUTES", value_name = "N",
          default_value_t = crate::telemetry::route::DEFAULT_MAX_ROUTES)]
    pub max_routes: usize,

    /// Query parameters whose values are replaced by `REDACTED` in `url.full` and `url.query`,
    /// comma-separated, case-insensitive; replaces the default list
    /// (token,access_token,password,secret,api_key,sig).
    #[arg(
        long,
        env = "SIDECAR_REDACT_QUERY_PARAMS",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    pub redact_query_params: Option<Vec<String>>,

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

    /// Port of the proxy's inbound listener, where steered inbound connections arrive.
    #[arg(long, env = "SIDECAR_INBOUND_PORT", value_name = "PORT", default_value_t = 15006,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,

    /// Outbound destination ports never redirected: a comma list of ports and ranges, e.g.
    /// `5432,8000-8100`. Added to the ports the pod's annotations exclude.
    #[arg(long, env = "SIDECAR_EXCLUDE_OUTBOUND_PORTS", value_name = "PORTS")]
    pub exclude_outbound_ports: Option<PortSet>,

    /// Outbound destination networks never redirected: a comma list of CIDRs or addresses,
    /// IPv4 and IPv6, e.g. `169.254.169.254/32,10.0.0.0/8`. Added to the annotations' ones.
    #[arg(long, env = "SIDECAR_EXCLUDE_OUTBOUND_CIDRS", value_name = "CIDRS")]
    pub exclude_outbound_cidrs: Option<CidrSet>,

    /// Only outbound destinations inside these networks are redirected (exclusions still
    /// apply); `*` = all. Overrides the annotations' include list [default: the annotation's,
    /// else `*`].
    #[arg(long, env = "SIDECAR_INCLUDE_OUTBOUND_CIDRS", value_name = "CIDRS")]
    pub include_outbound_cidrs: Option<CidrSelection>,

    /// Inbound ports never steered to the proxy: a comma list of ports and ranges. Added to the
    /// ports the annotations exclude.
    #[arg(long, env = "SIDECAR_EXCLUDE_INBOUND_PORTS", value_name = "PORTS")]
    pub exclude_inbound_ports: Option<PortSet>,

    /// Inbound ports steered to the proxy; `*` = every port the pod listens on (discovered).
    /// Overrides the annotations' include list [default: the annotation's, else `*`].
    #[arg(long, env = "SIDECAR_INCLUDE_INBOUND_PORTS", value_name = "PORTS")]
    pub include_inbound_ports: Option<PortSelection>,

    /// The pod's annotations as the Downward API writes them (`key="value"` lines); read at
    /// start, every 2 s and on SIGHUP. A missing file means no annotations.
    #[arg(
        long,
        env = "SIDECAR_ANNOTATIONS_FILE",
        value_name = "PATH",
        default_value = "/etc/podinfo/annotations"
    )]
    pub annotations_file: PathBuf,

    /// The host's cgroup v2 hierarchy as mounted in this container; searched for the sidecar's
    /// own cgroup when `--cgroup` is not given and the container has a private cgroup
    /// namespace.
    #[arg(
        long,
        env = "SIDECAR_HOST_CGROUP_ROOT",
        value_name = "DIR",
        default_value = "/sys/fs/cgroup"
    )]
    pub host_cgroup_root: PathBuf,
}

impl RunArgs {
    /// Drain bound after a stop signal.
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_timeout)
    }

    /// The sidecar's own ports (outbound and inbound listeners), never steered inbound.
    pub fn own_ports(&self) -> std::collections::BTreeSet<u16> {
        [self.outbound_port, self.inbound_port]
            .into_iter()
            .collect()
    }

    /// The interception policy as set by flags and environment.
    pub fn policy_config(&self) -> PolicyConfig {
        PolicyConfig {
            exclude_outbound_ports: self
                .exclude_outbound_ports
                .clone()
                .map(|s| s.0)
                .unwrap_or_default(),
            exclude_outbound_cidrs: self
                .exclude_outbound_cidrs
                .clone()
                .map(|s| s.0)
                .unwrap_or_default(),
            include_outbound_cidrs: self.include_outbound_cidrs.clone(),
            exclude_inbound_ports: self
                .exclude_inbound_ports
                .clone()
                .map(|s| s.0)
                .unwrap_or_default(),
            include_inbound_ports: self.include_inbound_ports.clone(),
        }
    }
}

fn parse_sampler(s: &str) -> Result<SamplerKind, String> {
    s.parse()
        .map_err(|e: crate::telemetry::sampling::SamplingError| e.to_string())
}

fn parse_sampler_arg(s: &str) -> Result<f64, String> {
    parse_ratio(s).map_err(|e| e.to_string())
}

fn parse_route_template(s: &str) -> Result<String, String> {
    let s = s.trim();
    crate::telemetry::route::RouteTable::new([s], 1)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
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
        assert_eq!(args.cgroup, Some(PathBuf::from("/sys/fs/cgroup/pod")));
    }

    #[test]
    fn rejects_bad_values_with_usage_errors() {
        let Command::Run(args) = parse(&["run"]).unwrap().command else {
            panic!("expected run")
        };
        assert_eq!(
            args.cgroup, None,
            "--cgroup is optional: discovered when absent"
        );
        assert!(parse(&["run", "--cgroup", "/x", "--outbound-port", "0"]).is_err());
        assert!(parse(&["run", "--cgroup", "/x", "--outbound-port", "70000"]).is_err());
        assert!(parse(&["run", "--cgroup", "/x", "--otlp-endpoint", "collector:4317"]).is_err());
        assert!(parse(&["run", "--cgroup", "/x", "--metric-export-interval", "0"]).is_err());
        assert!(parse(&["run", "--cgroup", "/x", "--bogus"]).is_err());
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let all: Vec<&str> = ["run", "--cgroup", "/x"]
            .iter()
            .chain(args)
            .copied()
            .collect();
        match parse(&all).unwrap().command {
            Command::Run(args) => args,
            Command::Check => panic!("expected run"),
        }
    }

    fn ports(p: &[u16]) -> std::collections::BTreeSet<u16> {
        p.iter().copied().collect()
    }

    #[test]
    fn policy_flags_parse_comma_lists() {
        let args = run_args(&[
            "--exclude-outbound-ports",
            " 5432, ,8000-8002 ",
            "--exclude-outbound-cidrs",
            "169.254.169.254, fd00::/8",
            "--include-outbound-cidrs",
            "10.96.0.0/12",
            "--exclude-inbound-ports",
            "9090",
            "--include-inbound-ports",
            "*",
            "--inbound-port",
            "16006",
            "--annotations-file",
            "/run/podinfo/annotations",
            "--host-cgroup-root",
            "/host/sys/fs/cgroup",
        ]);
        let policy = args.policy_config();
        assert_eq!(
            policy.exclude_outbound_ports,
            ports(&[5432, 8000, 8001, 8002])
        );
        assert_eq!(
            policy.exclude_outbound_cidrs,
            crate::policy::parse_cidrs("169.254.169.254/32,fd00::/8").unwrap()
        );
        assert_eq!(
            policy.include_outbound_cidrs,
            Some(CidrSelection::Only(
                crate::policy::parse_cidrs("10.96.0.0/12").unwrap()
            ))
        );
        assert_eq!(policy.exclude_inbound_ports, ports(&[9090]));
        assert_eq!(policy.include_inbound_ports, Some(PortSelection::All));
        assert_eq!(args.inbound_port, 16006);
        assert_eq!(args.own_ports(), ports(&[15001, 16006]));
        assert_eq!(
            args.annotations_file,
            PathBuf::from("/run/podinfo/annotations")
        );
        assert_eq!(args.host_cgroup_root, PathBuf::from("/host/sys/fs/cgroup"));
    }

    #[test]
    fn bad_policy_items_are_usage_errors_naming_flag_and_items() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "--exclude-outbound-ports",
                "80,http,0,9-1",
                &["`http`", "`0`", "`9-1`"],
            ),
            ("--exclude-inbound-ports", "70000", &["`70000`"]),
            ("--include-inbound-ports", "80,abc", &["`abc`"]),
            (
                "--exclude-outbound-cidrs",
                "10.0.0.0/8, 10.0.0.0/99",
                &["`10.0.0.0/99`"],
            ),
            ("--include-outbound-cidrs", "nope", &["`nope`"]),
            ("--include-outbound-cidrs", ",", &["the list is empty"]),
            ("--include-inbound-ports", "", &["the list is empty"]),
        ];
        for (flag, value, items) in cases {
            let err = parse(&["run", "--cgroup", "/x", flag, value]).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{flag}"
            );
            // `main` turns every error printed to stderr into EXIT_USAGE (64).
            assert!(err.use_stderr(), "{flag}");
            let text = err.to_string();
            assert!(text.contains(flag), "{flag}: {text}");
            for item in *items {
                assert!(text.contains(item), "{flag}: {item} not in {text}");
            }
        }
        assert!(parse(&["run", "--cgroup", "/x", "--inbound-port", "0"]).is_err());
    }

    #[test]
    fn policy_flags_default_to_unset_and_read_the_environment() {
        // The only test that sets these variables (tests run in parallel); all values valid.
        let vars = [
            ("SIDECAR_EXCLUDE_OUTBOUND_PORTS", "3306"),
            ("SIDECAR_EXCLUDE_OUTBOUND_CIDRS", "10.0.0.0/8"),
            ("SIDECAR_INCLUDE_OUTBOUND_CIDRS", "*"),
            ("SIDECAR_EXCLUDE_INBOUND_PORTS", "9000-9001"),
            ("SIDECAR_INCLUDE_INBOUND_PORTS", "8080"),
            ("SIDECAR_INBOUND_PORT", "15106"),
            ("SIDECAR_ANNOTATIONS_FILE", "/a"),
            ("SIDECAR_HOST_CGROUP_ROOT", "/h"),
        ];
        let defaults = run_args(&[]);
        assert_eq!(defaults.policy_config(), PolicyConfig::default());
        assert_eq!(defaults.inbound_port, 15006);
        assert_eq!(
            defaults.annotations_file,
            PathBuf::from("/etc/podinfo/annotations")
        );
        assert_eq!(defaults.host_cgroup_root, PathBuf::from("/sys/fs/cgroup"));
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let args = run_args(&[]);
        let flag_wins = run_args(&["--exclude-outbound-ports", "25"]);
        for (k, _) in vars {
            std::env::remove_var(k);
        }
        let policy = args.policy_config();
        assert_eq!(policy.exclude_outbound_ports, ports(&[3306]));
        assert_eq!(policy.exclude_outbound_cidrs.len(), 1);
        assert_eq!(policy.include_outbound_cidrs, Some(CidrSelection::All));
        assert_eq!(policy.exclude_inbound_ports, ports(&[9000, 9001]));
        assert_eq!(
            policy.include_inbound_ports,
            Some(PortSelection::Only(ports(&[8080])))
        );
        assert_eq!(args.inbound_port, 15106);
        assert_eq!(args.annotations_file, PathBuf::from("/a"));
        assert_eq!(args.host_cgroup_root, PathBuf::from("/h"));
        assert_eq!(
            flag_wins.policy_config().exclude_outbound_ports,
            ports(&[25])
        );
    }

    #[test]
    fn route_and_redaction_flags() {
        let defaults = run_args(&[]);
        assert!(defaults.routes.is_empty());
        assert_eq!(defaults.max_routes, 100);
        assert_eq!(defaults.redact_query_params, None);
        let flags = run_args(&[
            "--routes",
            "/users/{id}, /orders/{o}/items/{i}",
            "--max-routes",
            "5",
            "--redact-query-params",
            "x,Session",
        ]);
        assert_eq!(flags.routes, ["/users/{id}", "/orders/{o}/items/{i}"]);
        assert_eq!(flags.max_routes, 5);
        assert_eq!(
            flags.redact_query_params,
            Some(vec!["x".to_owned(), "Session".to_owned()])
        );
        assert_eq!(
            run_args(&["--redact-query-params", ""]).redact_query_params,
            Some(vec![String::new()]),
            "an empty list (the redactor ignores empty names)"
        );
        for bad in [
            &["--routes", "users/{id}"][..],
            &["--routes", "/a/{"],
            &["--max-routes", "-1"],
        ] {
            let all: Vec<&str> = ["run", "--cgroup", "/x"]
                .iter()
                .chain(bad)
                .copied()
                .collect();
            assert!(parse(&all).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn traces_sampler_flags_default_read_the_environment_and_reject_bad_values() {
        let defaults = run_args(&[]);
        assert_eq!(defaults.traces_sampler, SamplerKind::ParentBasedAlwaysOn);
        assert_eq!(defaults.traces_sampler_arg, 1.0);
        let flags = run_args(&[
            "--traces-sampler",
            "traceidratio",
            "--traces-sampler-arg",
            "0.5",
        ]);
        assert_eq!(flags.traces_sampler, SamplerKind::TraceIdRatio);
        assert_eq!(flags.traces_sampler_arg, 0.5);

        // The only test that sets these variables (tests run in parallel); all values valid.
        let vars = [
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ];
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let env = run_args(&[]);
        let flag_wins = run_args(&["--traces-sampler", "always_off"]);
        for (k, _) in vars {
            std::env::remove_var(k);
        }
        assert_eq!(env.traces_sampler, SamplerKind::ParentBasedTraceIdRatio);
        assert_eq!(env.traces_sampler_arg, 0.25);
        assert_eq!(flag_wins.traces_sampler, SamplerKind::AlwaysOff);

        let cases: &[(&str, &str, &[&str])] = &[
            (
                "--traces-sampler",
                "sometimes",
                &[
                    "`sometimes`",
                    "OTEL_TRACES_SAMPLER",
                    "always_on",
                    "parentbased_traceidratio",
                ],
            ),
            (
                "--traces-sampler-arg",
                "1.5",
                &["`1.5`", "OTEL_TRACES_SAMPLER_ARG"],
            ),
            ("--traces-sampler-arg", "x", &["`x`", "from 0 to 1"]),
        ];
        for (flag, value, items) in cases {
            let err = parse(&["run", "--cgroup", "/x", flag, value]).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{flag}"
            );
            assert!(err.use_stderr(), "{flag}");
            let text = err.to_string();
            assert!(text.contains(flag), "{flag}: {text}");
            for item in *items {
                assert!(text.contains(item), "{flag}: {item} not in {text}");
            }
        }
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

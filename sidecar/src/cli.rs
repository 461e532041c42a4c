//! Command line: `sidecar run`, `sidecar config`, `sidecar check`, `sidecar top` and
//! `sidecar inject`; every flag of `run` with its environment variable and config-file key
//! (see [`crate::config`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{LoadError, Loaded};
pub use crate::ebpf::RedirectMode;
use crate::export::config::{ExportOptions, OtlpRawOptions};
use crate::policy::{CidrSelection, CidrSet, PolicyConfig, PortSelection, PortSet};
use crate::telemetry::resource::ResourceOptions;
use crate::telemetry::sampling::{parse_ratio, SamplerKind};

/// Exit code for invalid usage or configuration (EX_USAGE from sysexits.h).
pub const EXIT_USAGE: u8 = 64;

/// Largest `--worker-threads`.
pub const MAX_WORKER_THREADS: i64 = 256;

/// The settings (long flag names) of the eBPF interception policy, which only the `ebpf`
/// redirect mode applies.
pub const POLICY_KEYS: [&str; 5] = [
    "exclude-outbound-ports",
    "exclude-outbound-cidrs",
    "include-outbound-cidrs",
    "exclude-inbound-ports",
    "include-inbound-ports",
];

/// eBPF-backed observability and traffic-interception sidecar.
///
/// Redirects the outbound TCP connections of a cgroup (the pod) to a local proxy, forwards them
/// unchanged, measures every HTTP/1.x request (other TCP as connections) and exports metrics and
/// traces over OTLP (gRPC or http/protobuf), or to a local OTLP-JSON file when no endpoint is
/// configured.
///
/// Every flag of `run` can also be set by its environment variable or in a TOML config file
/// (`--config`); precedence: flag > environment variable > config file > default.
#[derive(Debug, Parser)]
#[command(name = "sidecar", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
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
    /// Print the effective configuration of `sidecar run` (takes the same flags, environment
    /// and config file) with the source of every value; exit 64 when it is invalid.
    Config(ConfigArgs),
    /// Report each kernel feature the sidecar needs; exit non-zero when one is missing.
    Check,
    /// Live terminal view of a running sidecar's traffic (from its admin server's `/stats`).
    Top(crate::top::TopArgs),
    /// Add the sidecar to the pod templates of Kubernetes YAML (Deployment, StatefulSet,
    /// DaemonSet, ReplicaSet, Job, CronJob, Pod, List), like `istioctl kube-inject`.
    Inject(crate::inject::InjectArgs),
}

/// Format of the sidecar's own log lines (on stderr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Output format of `sidecar config`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ShowFormat {
    /// `key = value  (source)` lines.
    #[default]
    Text,
    /// One JSON document.
    Json,
}

/// Flags of `sidecar config`: every flag of `run`, plus the output format.
#[derive(Clone, Debug, Args)]
pub struct ConfigArgs {
    /// The configuration to show.
    #[command(flatten)]
    pub run: RunArgs,

    /// Output format.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = ShowFormat::Text)]
    pub format: ShowFormat,
}

const OTLP: &str = "OTLP export (OpenTelemetry environment variables)";
const RESOURCE: &str = "Resource (service and Kubernetes attributes)";
const OPS: &str = "Configuration, logging and admin server";

/// Flags of `sidecar run` (and `sidecar config`). Each can also come from its environment
/// variable or from the config file, under its long name without `--`.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// TOML config file: top-level keys are the long flag names without `--`
    /// (`outbound-port = 15001`). Flags and environment variables override it.
    #[arg(long, env = "SIDECAR_CONFIG", value_name = "FILE", help_heading = OPS)]
    pub config: Option<PathBuf>,

    /// Address of the admin server (`/metrics`, `/healthz`, `/readyz`, `/stats`); port 0 picks
    /// a free port.
    #[arg(long, env = "SIDECAR_ADMIN_ADDR", value_name = "ADDR", default_value = "0.0.0.0:15020",
          help_heading = OPS)]
    pub admin_addr: SocketAddr,

    /// Format of the sidecar's log lines on stderr.
    #[arg(long, env = "SIDECAR_LOG_FORMAT", value_name = "FORMAT", value_enum,
          default_value_t = LogFormat::Text, help_heading = OPS)]
    pub log_format: LogFormat,

    /// Log filter, as `RUST_LOG` directives: a level (`debug`) and/or `target=level` items,
    /// comma-separated, e.g. `info,sidecar::proxy=debug`.
    #[arg(long, env = "RUST_LOG", value_name = "FILTER", default_value = "info",
          value_parser = parse_log_filter, help_heading = OPS)]
    pub log_level: String,

    /// cgroup v2 directory whose processes' outbound TCP connections are redirected (the pod)
    /// [default: the parent of this container's own cgroup, found from /proc/self/cgroup; see
    /// --host-cgroup-root].
    #[arg(long, env = "SIDECAR_CGROUP", value_name = "DIR")]
    pub cgroup: Option<PathBuf>,

    /// cgroup v2 directory of the proxy itself, whose connections are never redirected
    /// [default: this process's own cgroup, from /proc/self/cgroup].
    #[arg(long, env = "SIDECAR_PROXY_CGROUP", value_name = "DIR")]
    pub proxy_cgroup: Option<PathBuf>,

    /// How connections reach the proxy. `ebpf`: the eBPF programs redirect outbound connects
    /// and steer inbound connections. `iptables`: your iptables/nftables rules REDIRECT the
    /// traffic to the outbound and inbound ports (the original destination comes from
    /// conntrack, `SO_ORIGINAL_DST`; the inbound listener binds every address); only the
    /// observation programs attach. `off`: no redirection at all, observation only. With
    /// `iptables` and `off`, the --exclude-*/--include-* interception flags are refused.
    #[arg(long, env = "SIDECAR_REDIRECT", value_name = "MODE", value_enum,
          default_value_t = RedirectMode::Ebpf)]
    pub redirect: RedirectMode,

    /// Port of the proxy's outbound listeners on 127.0.0.1 and [::1].
    #[arg(long, env = "SIDECAR_OUTBOUND_PORT", default_value_t = 15001,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,

    /// OTLP endpoint of an OpenTelemetry Collector, e.g. http://otel-collector:4317 (gRPC) or
    /// http://otel-collector:4318 (http/protobuf: `/v1/traces`, `/v1/metrics` are appended).
    /// Without any endpoint, telemetry goes to the local sink file and a periodic summary.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL", help_heading = OTLP)]
    pub otlp_endpoint: Option<String>,

    /// OTLP transport: `grpc` (default) or `http/protobuf`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_name = "PROTOCOL", help_heading = OTLP)]
    pub otlp_protocol: Option<String>,

    /// Extra request headers / gRPC metadata: `key=value` pairs, comma-separated, values
    /// percent-encoded. Values are secrets: never printed.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_HEADERS", value_name = "HEADERS", help_heading = OTLP, hide_env_values = true)]
    pub otlp_headers: Option<String>,

    /// Timeout of one export, in milliseconds [default: 10000].
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TIMEOUT", value_name = "MS", help_heading = OTLP)]
    pub otlp_timeout: Option<String>,

    /// Request body compression: `gzip` or `none` (default).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_COMPRESSION", value_name = "COMPRESSION", help_heading = OTLP)]
    pub otlp_compression: Option<String>,

    /// PEM file of the CA certificate(s) that verify the collector [default: the system roots].
    #[arg(long, env = "OTEL_EXPORTER_OTLP_CERTIFICATE", value_name = "PEM", help_heading = OTLP)]
    pub otlp_certificate: Option<PathBuf>,

    /// PEM private key for mutual TLS to the collector.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_CLIENT_KEY", value_name = "PEM", help_heading = OTLP)]
    pub otlp_client_key: Option<PathBuf>,

    /// PEM certificate chain for mutual TLS to the collector.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", value_name = "PEM", help_heading = OTLP)]
    pub otlp_client_certificate: Option<PathBuf>,

    /// `true`: plaintext gRPC to an endpoint given without a scheme (default `false`: TLS).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_INSECURE", value_name = "BOOL", help_heading = OTLP)]
    pub otlp_insecure: Option<String>,

    /// OTLP endpoint for traces, used as is (no path appended).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", value_name = "URL", help_heading = OTLP)]
    pub otlp_traces_endpoint: Option<String>,

    /// OTLP transport for traces: `grpc` or `http/protobuf`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", value_name = "PROTOCOL", help_heading = OTLP)]
    pub otlp_traces_protocol: Option<String>,

    /// Extra headers for traces exports (`key=value,...`); replaces the generic list.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_HEADERS", value_name = "HEADERS", help_heading = OTLP, hide_env_values = true)]
    pub otlp_traces_headers: Option<String>,

    /// Timeout of one traces export, in milliseconds.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", value_name = "MS", help_heading = OTLP)]
    pub otlp_traces_timeout: Option<String>,

    /// Body compression of traces exports: `gzip` or `none`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", value_name = "COMPRESSION", help_heading = OTLP)]
    pub otlp_traces_compression: Option<String>,

    /// CA certificate(s) (PEM) that verify the traces collector.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", value_name = "PEM", help_heading = OTLP)]
    pub otlp_traces_certificate: Option<PathBuf>,

    /// PEM private key for mutual TLS on traces exports.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", value_name = "PEM", help_heading = OTLP)]
    pub otlp_traces_client_key: Option<PathBuf>,

    /// PEM certificate chain for mutual TLS on traces exports.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", value_name = "PEM", help_heading = OTLP)]
    pub otlp_traces_client_certificate: Option<PathBuf>,

    /// Like --otlp-insecure, for traces.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_INSECURE", value_name = "BOOL", help_heading = OTLP)]
    pub otlp_traces_insecure: Option<String>,

    /// OTLP endpoint for metrics, used as is (no path appended).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", value_name = "URL", help_heading = OTLP)]
    pub otlp_metrics_endpoint: Option<String>,

    /// OTLP transport for metrics: `grpc` or `http/protobuf`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", value_name = "PROTOCOL", help_heading = OTLP)]
    pub otlp_metrics_protocol: Option<String>,

    /// Extra headers for metrics exports (`key=value,...`); replaces the generic list.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_METRICS_HEADERS", value_name = "HEADERS", help_heading = OTLP, hide_env_values = true)]
    pub otlp_metrics_headers: Option<String>,

    /// Timeout of one metrics export, in milliseconds.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", value_name = "MS", help_heading = OTLP)]
    pub otlp_metrics_timeout: Option<String>,

    /// Body compression of metrics exports: `gzip` or `none`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", value_name = "COMPRESSION", help_heading = OTLP)]
    pub otlp_metrics_compression: Option<String>,

    /// CA certificate(s) (PEM) that verify the metrics collector.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", value_name = "PEM", help_heading = OTLP)]
    pub otlp_metrics_certificate: Option<PathBuf>,

    /// PEM private key for mutual TLS on metrics exports.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY", value_name = "PEM", help_heading = OTLP)]
    pub otlp_metrics_client_key: Option<PathBuf>,

    /// PEM certificate chain for mutual TLS on metrics exports.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE", value_name = "PEM", help_heading = OTLP)]
    pub otlp_metrics_client_certificate: Option<PathBuf>,

    /// Like --otlp-insecure, for metrics.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_METRICS_INSECURE", value_name = "BOOL", help_heading = OTLP)]
    pub otlp_metrics_insecure: Option<String>,

    /// Metric temporality of OTLP exports: `cumulative` (default), `delta` or `lowmemory`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
          value_name = "TEMPORALITY", help_heading = OTLP)]
    pub otlp_metrics_temporality_preference: Option<String>,

    /// `true`: no spans and no OTLP or sink export at all (the proxy still forwards and
    /// `/metrics` still works).
    #[arg(long, env = "OTEL_SDK_DISABLED", value_name = "BOOL", help_heading = OTLP)]
    pub sdk_disabled: Option<String>,

    /// Interval between metric exports, in milliseconds [default: 60000].
    #[arg(long, env = "OTEL_METRIC_EXPORT_INTERVAL", value_name = "MS", help_heading = OTLP)]
    pub metric_export_interval: Option<String>,

    /// Timeout of one metric export, in milliseconds [default: 30000].
    #[arg(long, env = "OTEL_METRIC_EXPORT_TIMEOUT", value_name = "MS", help_heading = OTLP)]
    pub metric_export_timeout: Option<String>,

    /// Delay between span batch exports, in milliseconds [default: 5000].
    #[arg(long, env = "OTEL_BSP_SCHEDULE_DELAY", value_name = "MS", help_heading = OTLP)]
    pub bsp_schedule_delay: Option<String>,

    /// Bound of one span export, retries included, in milliseconds [default: 30000].
    #[arg(long, env = "OTEL_BSP_EXPORT_TIMEOUT", value_name = "MS", help_heading = OTLP)]
    pub bsp_export_timeout: Option<String>,

    /// Spans queued for export at most; more are dropped and counted [default: 2048].
    #[arg(long, env = "OTEL_BSP_MAX_QUEUE_SIZE", value_name = "N", help_heading = OTLP)]
    pub bsp_max_queue_size: Option<String>,

    /// Spans per export request at most [default: 512].
    #[arg(long, env = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", value_name = "N", help_heading = OTLP)]
    pub bsp_max_export_batch_size: Option<String>,

    /// `service.name` resource attribute [default: the `app.kubernetes.io/name` label, else the
    /// owner's name, else the pod name].
    #[arg(long, env = "OTEL_SERVICE_NAME", value_name = "NAME", help_heading = RESOURCE)]
    pub service_name: Option<String>,

    /// More resource attributes: `key=value` pairs, comma-separated, values percent-encoded.
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES", value_name = "ATTRS", help_heading = RESOURCE)]
    pub resource_attributes: Option<String>,

    /// Pod name (Downward API `metadata.name`): `k8s.pod.name`.
    #[arg(long, env = "K8S_POD_NAME", value_name = "NAME", help_heading = RESOURCE)]
    pub k8s_pod_name: Option<String>,

    /// Namespace (Downward API `metadata.namespace`): `k8s.namespace.name`.
    #[arg(long, env = "K8S_NAMESPACE_NAME", value_name = "NAME", help_heading = RESOURCE)]
    pub k8s_namespace_name: Option<String>,

    /// Pod UID (Downward API `metadata.uid`): `k8s.pod.uid`.
    #[arg(long, env = "K8S_POD_UID", value_name = "UID", help_heading = RESOURCE)]
    pub k8s_pod_uid: Option<String>,

    /// Node name (Downward API `spec.nodeName`): `k8s.node.name`.
    #[arg(long, env = "K8S_NODE_NAME", value_name = "NAME", help_heading = RESOURCE)]
    pub k8s_node_name: Option<String>,

    /// Name of the application container the sidecar serves: `k8s.container.name`.
    #[arg(long, env = "K8S_CONTAINER_NAME", value_name = "NAME", help_heading = RESOURCE)]
    pub k8s_container_name: Option<String>,

    /// The pod's labels as the Downward API writes them (`key="value"` lines); a missing file
    /// means no labels.
    #[arg(long, env = "SIDECAR_LABELS_FILE", value_name = "PATH",
          default_value = "/etc/podinfo/labels", help_heading = RESOURCE)]
    pub labels_file: PathBuf,

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

    /// Worker threads of the async runtime that runs the proxy, 1 to 256 (named
    /// `sidecar-worker`) [default: one per CPU available to the process].
    #[arg(long, env = "SIDECAR_WORKER_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=MAX_WORKER_THREADS))]
    pub worker_threads: Option<u16>,

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

    /// The sidecar's own ports (outbound and inbound listeners, admin server), never steered
    /// inbound.
    pub fn own_ports(&self) -> std::collections::BTreeSet<u16> {
        [
            self.outbound_port,
            self.inbound_port,
            self.admin_addr.port(),
        ]
        .into_iter()
        .filter(|&p| p != 0)
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

    /// The raw export values, validated by [`ExportOptions::resolve`].
    pub fn export_options(&self) -> ExportOptions {
        ExportOptions {
            generic: OtlpRawOptions {
                endpoint: self.otlp_endpoint.clone(),
                protocol: self.otlp_protocol.clone(),
                headers: self.otlp_headers.clone(),
                timeout: self.otlp_timeout.clone(),
                compression: self.otlp_compression.clone(),
                certificate: self.otlp_certificate.clone(),
                client_key: self.otlp_client_key.clone(),
                client_certificate: self.otlp_client_certificate.clone(),
                insecure: self.otlp_insecure.clone(),
            },
            traces: OtlpRawOptions {
                endpoint: self.otlp_traces_endpoint.clone(),
                protocol: self.otlp_traces_protocol.clone(),
                headers: self.otlp_traces_headers.clone(),
                timeout: self.otlp_traces_timeout.clone(),
                compression: self.otlp_traces_compression.clone(),
                certificate: self.otlp_traces_certificate.clone(),
                client_key: self.otlp_traces_client_key.clone(),
                client_certificate: self.otlp_traces_client_certificate.clone(),
                insecure: self.otlp_traces_insecure.clone(),
            },
            metrics: OtlpRawOptions {
                endpoint: self.otlp_metrics_endpoint.clone(),
                protocol: self.otlp_metrics_protocol.clone(),
                headers: self.otlp_metrics_headers.clone(),
                timeout: self.otlp_metrics_timeout.clone(),
                compression: self.otlp_metrics_compression.clone(),
                certificate: self.otlp_metrics_certificate.clone(),
                client_key: self.otlp_metrics_client_key.clone(),
                client_certificate: self.otlp_metrics_client_certificate.clone(),
                insecure: self.otlp_metrics_insecure.clone(),
            },
            metrics_temporality: self.otlp_metrics_temporality_preference.clone(),
            sdk_disabled: self.sdk_disabled.clone(),
            metric_export_interval: self.metric_export_interval.clone(),
            metric_export_timeout: self.metric_export_timeout.clone(),
            bsp_schedule_delay: self.bsp_schedule_delay.clone(),
            bsp_export_timeout: self.bsp_export_timeout.clone(),
            bsp_max_queue_size: self.bsp_max_queue_size.clone(),
            bsp_max_export_batch_size: self.bsp_max_export_batch_size.clone(),
        }
    }

    /// The raw resource inputs, resolved by [`ResourceOptions::resolve`].
    pub fn resource_options(&self) -> ResourceOptions {
        ResourceOptions {
            service_name: self.service_name.clone(),
            resource_attributes: self.resource_attributes.clone(),
            pod_name: self.k8s_pod_name.clone(),
            namespace_name: self.k8s_namespace_name.clone(),
            pod_uid: self.k8s_pod_uid.clone(),
            node_name: self.k8s_node_name.clone(),
            container_name: self.k8s_container_name.clone(),
            labels_file: self.labels_file.clone(),
            annotations_file: self.annotations_file.clone(),
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

/// Accepts a `RUST_LOG`-style filter only when every directive parses.
fn parse_log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map(|_| s.trim().to_owned())
        .map_err(|e| format!("not a valid log filter: {e}"))
}

/// The process environment as the configuration loader reads it (non-UTF-8 bytes replaced).
fn process_env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let loaded = match crate::config::load(std::env::args_os(), &process_env) {
        Ok(loaded) => loaded,
        Err(LoadError::Usage(e)) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            // Printing can only fail when stdout/stderr are gone; nothing better to do then.
            let _ = e.print();
            return ExitCode::from(code);
        }
        Err(LoadError::Invalid(msg)) => return usage_error(&msg),
    };
    match loaded {
        Loaded::Check => {
            let filter = process_env("RUST_LOG").unwrap_or_default();
            init_logging(LogFormat::Text, &filter);
            let report = crate::kernel::check();
            println!("{report}");
            if report.all_ok() {
                ExitCode::SUCCESS
            } else {
                eprintln!("sidecar check: at least one required kernel feature is missing");
                ExitCode::FAILURE
            }
        }
        // No log subscriber: log lines on stderr would tear the terminal view.
        Loaded::Top(args) => crate::top::main(args),
        Loaded::Inject(args) => crate::inject::main(&args),
        Loaded::Config { settings, format } => match settings.resolve() {
            Ok(config) => {
                use std::io::Write;
                let text = crate::config::show::render(&settings, &config, format);
                let mut out = std::io::stdout().lock();
                // A closed stdout (`| head`) is not a configuration error.
                let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
                ExitCode::SUCCESS
            }
            Err(msg) => usage_error(&msg),
        },
        Loaded::Run(settings) => match settings.resolve() {
            Ok(config) => {
                init_logging(config.args.log_format, &config.args.log_level);
                crate::run::main(config)
            }
            Err(msg) => usage_error(&msg),
        },
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("sidecar: error: {msg}");
    ExitCode::from(EXIT_USAGE)
}

/// Installs the global log subscriber: `filter` as `RUST_LOG` directives (`info` when empty or
/// invalid; `run` and `config` reject invalid filters before this), text or JSON lines on
/// stderr; text is coloured only when stderr is a terminal.
pub fn init_logging(format: LogFormat, filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = if filter.trim().is_empty() {
        EnvFilter::new("info")
    } else {
        EnvFilter::builder()
            .parse(filter)
            .unwrap_or_else(|_| EnvFilter::new("info"))
    };
    // Colours only on a terminal: a log collector reading a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{load, Settings, Source};
    use crate::export::config::{OtlpProtocol, TemporalityPreference};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sidecar").chain(args.iter().copied()))
    }

    /// Loads `sidecar <args>` with exactly `env` as the environment.
    fn load_with(args: &[&str], env: &[(&str, &str)]) -> Result<Loaded, LoadError> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| env.get(name).cloned();
        load(
            std::iter::once("sidecar").chain(args.iter().copied()),
            &lookup,
        )
    }

    /// The settings of `sidecar run --cgroup /x <args>` with `env`.
    fn settings(args: &[&str], env: &[(&str, &str)]) -> Settings {
        let all: Vec<&str> = ["run", "--cgroup", "/x"]
            .iter()
            .chain(args)
            .copied()
            .collect();
        match load_with(&all, env) {
            Ok(Loaded::Run(s)) => s,
            Ok(other) => panic!("expected run, got {other:?}"),
            Err(e) => panic!("{args:?} {env:?}: {e}"),
        }
    }

    fn run_args(args: &[&str]) -> RunArgs {
        settings(args, &[]).args
    }

    /// The `sidecar: error: ...` message for `sidecar run --cgroup /x <args>` with `env`:
    /// from loading or from the resolvers.
    fn invalid(args: &[&str], env: &[(&str, &str)]) -> String {
        let all: Vec<&str> = ["run", "--cgroup", "/x"]
            .iter()
            .chain(args)
            .copied()
            .collect();
        match load_with(&all, env) {
            Ok(Loaded::Run(s)) => match s.resolve() {
                Ok(_) => panic!("{args:?} {env:?} accepted"),
                Err(msg) => msg,
            },
            Ok(other) => panic!("expected run, got {other:?}"),
            Err(LoadError::Invalid(msg)) => msg,
            Err(LoadError::Usage(e)) => {
                assert!(e.use_stderr(), "{args:?}: {e}");
                e.to_string()
            }
        }
    }

    /// A config file with `text`, removed on drop.
    struct TempToml(std::path::PathBuf);

    impl TempToml {
        fn new(name: &str, text: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "sidecar-cli-test-{}-{name}.toml",
                std::process::id()
            ));
            std::fs::write(&path, text).unwrap();
            Self(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempToml {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults() {
        let s = settings(&[], &[]);
        let args = &s.args;
        assert_eq!(args.outbound_port, 15001);
        assert_eq!(args.summary_interval, 10);
        assert_eq!(args.drain(), Duration::from_secs(5));
        assert_eq!(args.cgroup, Some(PathBuf::from("/x")));
        assert_eq!(args.admin_addr, "0.0.0.0:15020".parse().unwrap());
        assert_eq!(args.log_format, LogFormat::Text);
        assert_eq!(args.log_level, "info");
        assert_eq!(args.labels_file, PathBuf::from("/etc/podinfo/labels"));
        assert_eq!(args.export_options(), ExportOptions::default());
        let port = s.get("outbound-port").unwrap();
        assert_eq!(port.value.as_deref(), Some("15001"));
        assert_eq!(port.source, Source::Default);
        assert_eq!(port.env.as_deref(), Some("SIDECAR_OUTBOUND_PORT"));
        assert_eq!(
            s.get("cgroup").unwrap().source,
            Source::Flag("--cgroup".into())
        );
        assert_eq!(s.get("otlp-endpoint").unwrap().value, None);

        let resolved = s.resolve().unwrap();
        assert_eq!(resolved.export.traces, None, "no endpoint: local sink");
        assert_eq!(
            resolved.export.metric_export_interval,
            Duration::from_secs(60)
        );
        assert_eq!(resolved.export.batch.schedule_delay, Duration::from_secs(5));
        let Loaded::Run(s) = load_with(&["run"], &[]).unwrap() else {
            panic!("expected run")
        };
        assert_eq!(
            s.args.cgroup, None,
            "--cgroup is optional: discovered when absent"
        );
    }

    #[test]
    fn rejects_bad_values_with_usage_errors() {
        // Bad flag values: `sidecar: error: --flag: invalid value ...`, exit 64.
        for (bad, problem) in [
            (
                &["--outbound-port", "0"][..],
                "invalid value `0`: 0 is not in 1..=65535",
            ),
            (&["--outbound-port", "70000"], "invalid value `70000`"),
            (&["--admin-addr", "localhost"], "invalid value `localhost`"),
            (
                &["--log-format", "xml"],
                "invalid value `xml`; expected one of: text, json",
            ),
            (&["--log-level", "foo=bar"], "not a valid log filter"),
        ] {
            let msg = invalid(bad, &[]);
            assert!(msg.starts_with(&format!("{}: ", bad[0])), "{bad:?}: {msg}");
            assert!(msg.contains(problem), "{bad:?}: {msg}");
        }
        // Other command-line mistakes stay clap's usage errors (also exit 64).
        match load_with(&["run", "--bogus"], &[]) {
            Err(LoadError::Usage(e)) => {
                assert!(e.use_stderr());
                assert!(e.to_string().contains("--bogus"));
            }
            other => panic!("{other:?}"),
        }
        // Export values are validated by the resolver; the error names the flag.
        let msg = invalid(&["--otlp-endpoint", "grpc://collector:4317"], &[]);
        assert!(msg.starts_with("--otlp-endpoint: "), "{msg}");
        assert!(msg.contains("grpc://collector:4317"), "{msg}");
        let msg = invalid(&["--metric-export-interval", "0"], &[]);
        assert!(msg.starts_with("--metric-export-interval: "), "{msg}");
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
        assert_eq!(args.own_ports(), ports(&[15001, 15020, 16006]));
        assert_eq!(
            args.annotations_file,
            PathBuf::from("/run/podinfo/annotations")
        );
        assert_eq!(args.host_cgroup_root, PathBuf::from("/host/sys/fs/cgroup"));
    }

    fn ports(p: &[u16]) -> std::collections::BTreeSet<u16> {
        p.iter().copied().collect()
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
            // The same value from the environment is named by its variable.
            if value.is_empty() {
                continue; // an empty variable counts as unset
            }
            let var = format!(
                "SIDECAR_{}",
                flag.trim_start_matches('-')
                    .replace('-', "_")
                    .to_uppercase()
            );
            let msg = invalid(&[], &[(&var, value)]);
            assert!(msg.starts_with(&format!("{var}: invalid value")), "{msg}");
            for item in *items {
                assert!(msg.contains(item), "{var}: {item} not in {msg}");
            }
        }
        assert!(parse(&["run", "--cgroup", "/x", "--inbound-port", "0"]).is_err());
    }

    #[test]
    fn policy_flags_default_to_unset_and_read_the_environment() {
        let env = [
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
        let from_env = settings(&[], &env);
        let args = &from_env.args;
        let flag_wins = run_args_env(&["--exclude-outbound-ports", "25"], &env);
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
            from_env.get("inbound-port").unwrap().source,
            Source::Env("SIDECAR_INBOUND_PORT".into())
        );
        assert_eq!(
            flag_wins.policy_config().exclude_outbound_ports,
            ports(&[25])
        );
        // An empty variable counts as unset.
        let empty = settings(&[], &[("SIDECAR_INBOUND_PORT", "")]);
        assert_eq!(empty.args.inbound_port, 15006);
        assert_eq!(empty.get("inbound-port").unwrap().source, Source::Default);
    }

    fn run_args_env(args: &[&str], env: &[(&str, &str)]) -> RunArgs {
        settings(args, env).args
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
            // `-1` looks like a flag to clap: an unexpected-argument usage error.
            let msg = invalid(bad, &[]);
            assert!(
                msg.starts_with(&format!("{}: invalid value", bad[0])) || msg.contains("'-1'"),
                "{msg}"
            );
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

        let env = [
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ];
        let from_env = run_args_env(&[], &env);
        let flag_wins = run_args_env(&["--traces-sampler", "always_off"], &env);
        assert_eq!(
            from_env.traces_sampler,
            SamplerKind::ParentBasedTraceIdRatio
        );
        assert_eq!(from_env.traces_sampler_arg, 0.25);
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
        let msg = invalid(&[], &[("OTEL_TRACES_SAMPLER", "sometimes")]);
        assert!(
            msg.starts_with("OTEL_TRACES_SAMPLER: invalid value `sometimes`"),
            "{msg}"
        );
    }

    #[test]
    fn endpoints_are_validated_through_the_resolver() {
        let resolved = |endpoint: &str| {
            settings(&["--otlp-endpoint", endpoint], &[])
                .resolve()
                .map(|c| c.export.traces.map(|t| t.endpoint))
        };
        assert_eq!(
            resolved(" http://127.0.0.1:4317 ").unwrap().as_deref(),
            Some("http://127.0.0.1:4317")
        );
        assert!(resolved("https://collector.example:4317").is_ok());
        for bad in ["http://", "grpc://x:4317"] {
            let msg = resolved(bad).unwrap_err();
            assert!(msg.starts_with("--otlp-endpoint: "), "{msg}");
        }
    }

    #[test]
    fn precedence_flag_over_env_over_file_over_default() {
        let file = TempToml::new(
            "precedence",
            r#"
outbound-port = 15101
inbound-port = 15106
connect-timeout = 3
exclude-outbound-ports = [5432, "8000-8001"]
exclude-inbound-ports = "9090"
otlp-endpoint = "http://file:4317"
otlp-protocol = "http/protobuf"
otlp-compression = "gzip"
service-name = "from-file"
traces-sampler-arg = 0.5
log-format = "json"
"#,
        );
        let env = [
            ("SIDECAR_CONFIG", file.path()),
            ("SIDECAR_OUTBOUND_PORT", "15201"),
            ("SIDECAR_INBOUND_PORT", "15206"),
            ("SIDECAR_EXCLUDE_OUTBOUND_PORTS", "3306"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ];
        let s = settings(
            &[
                "--outbound-port",
                "15301",
                "--otlp-endpoint",
                "http://flag:4318",
            ],
            &env,
        );
        let a = &s.args;
        // Port: flag > env > file.
        assert_eq!(a.outbound_port, 15301);
        assert_eq!(a.inbound_port, 15206);
        assert_eq!(a.connect_timeout, 3);
        // List: env beats the file's array; the file's plain string applies.
        assert_eq!(a.policy_config().exclude_outbound_ports, ports(&[3306]));
        assert_eq!(a.policy_config().exclude_inbound_ports, ports(&[9090]));
        // OTLP strings.
        assert_eq!(a.otlp_endpoint.as_deref(), Some("http://flag:4318"));
        assert_eq!(a.otlp_protocol.as_deref(), Some("grpc"));
        assert_eq!(a.otlp_compression.as_deref(), Some("gzip"));
        assert_eq!(a.service_name.as_deref(), Some("from-file"));
        assert_eq!(a.traces_sampler_arg, 0.5);
        assert_eq!(a.log_format, LogFormat::Json);
        assert_eq!(a.summary_interval, 10, "default");
        assert_eq!(a.config.as_deref(), Some(std::path::Path::new(file.path())));

        let file_source = |key: &str| Source::File {
            path: PathBuf::from(file.path()),
            key: key.to_owned(),
        };
        let expect = [
            ("config", Source::Env("SIDECAR_CONFIG".into())),
            ("outbound-port", Source::Flag("--outbound-port".into())),
            ("inbound-port", Source::Env("SIDECAR_INBOUND_PORT".into())),
            ("connect-timeout", file_source("connect-timeout")),
            (
                "exclude-outbound-ports",
                Source::Env("SIDECAR_EXCLUDE_OUTBOUND_PORTS".into()),
            ),
            (
                "exclude-inbound-ports",
                file_source("exclude-inbound-ports"),
            ),
            ("otlp-endpoint", Source::Flag("--otlp-endpoint".into())),
            (
                "otlp-protocol",
                Source::Env("OTEL_EXPORTER_OTLP_PROTOCOL".into()),
            ),
            ("otlp-compression", file_source("otlp-compression")),
            ("summary-interval", Source::Default),
        ];
        for (key, source) in expect {
            assert_eq!(s.get(key).unwrap().source, source, "{key}");
        }
        assert_eq!(
            s.get("inbound-port").unwrap().value.as_deref(),
            Some("15206")
        );

        let resolved = s.resolve().unwrap();
        let traces = resolved.export.traces.unwrap();
        assert_eq!(traces.endpoint, "http://flag:4318");
        assert_eq!(traces.protocol, OtlpProtocol::Grpc);
        assert_eq!(traces.compression, crate::export::config::Compression::Gzip);
        assert_eq!(
            resolved.export.temporality,
            TemporalityPreference::Cumulative
        );

        // Without the flags and env, the file's values apply; its array list too.
        let only_file = settings(&["--config", file.path()], &[]);
        assert_eq!(only_file.args.outbound_port, 15101);
        assert_eq!(
            only_file.args.policy_config().exclude_outbound_ports,
            ports(&[5432, 8000, 8001])
        );
        assert_eq!(
            only_file
                .get("exclude-outbound-ports")
                .unwrap()
                .value
                .as_deref(),
            Some("5432,8000-8001")
        );
        assert_eq!(
            only_file.get("config").unwrap().source,
            Source::Flag("--config".into())
        );
        let t = only_file.resolve().unwrap().export.traces.unwrap();
        assert_eq!(t.endpoint, "http://file:4317/v1/traces");
        assert_eq!(t.protocol, OtlpProtocol::HttpProtobuf);
    }

    #[test]
    fn config_file_errors_name_the_file_and_key() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "unknown",
                "outbound-prot = 1\n",
                &[
                    "unknown key `outbound-prot`",
                    "did you mean `outbound-port`",
                ],
            ),
            (
                "nested",
                "[otlp]\nendpoint = \"x\"\n",
                &["unknown key `otlp`"],
            ),
            (
                "config",
                "config = \"/other.toml\"\n",
                &["key `config`", "cannot name another"],
            ),
            (
                "type",
                "outbound-port = [1, 2]\n",
                &["key `outbound-port`", "found an array"],
            ),
            (
                "table",
                "routes = { a = 1 }\n",
                &["key `routes`", "found a table"],
            ),
            (
                "value",
                "outbound-port = 0\n",
                &["key `outbound-port`", "invalid value `0`"],
            ),
            (
                "string",
                "outbound-port = \"many\"\n",
                &["key `outbound-port`", "invalid value `many`"],
            ),
            (
                "list",
                "exclude-outbound-ports = [80, \"http\"]\n",
                &["key `exclude-outbound-ports`", "`http`"],
            ),
            (
                "enum",
                "log-format = \"xml\"\n",
                &["key `log-format`", "`xml`", "text, json"],
            ),
            (
                "filter",
                "log-level = \"foo=bar\"\n",
                &["key `log-level`", "`foo=bar`", "not a valid log filter"],
            ),
            (
                "resolver",
                "otlp-protocol = \"grpcx\"\n",
                &["key `otlp-protocol`", "grpcx"],
            ),
            ("toml", "outbound-port = \n", &["not valid TOML", "line 1"]),
            (
                "duplicate",
                "routes = \"/a\"\nroutes = \"/b\"\n",
                &["not valid TOML"],
            ),
        ];
        for (name, text, items) in cases {
            let file = TempToml::new(&format!("err-{name}"), text);
            let msg = invalid(&["--config", file.path()], &[]);
            let prefix = format!("config file {}: ", file.path());
            assert!(msg.starts_with(&prefix), "{name}: {msg}");
            for item in *items {
                assert!(msg.contains(item), "{name}: {item} not in {msg}");
            }
            // The same file named by the environment gives the same error.
            assert_eq!(
                invalid(&[], &[("SIDECAR_CONFIG", file.path())]),
                msg,
                "{name}"
            );
        }

        let missing = "/nonexistent/sidecar.toml";
        let msg = invalid(&["--config", missing], &[]);
        assert!(
            msg.starts_with("--config: cannot read the config file /nonexistent/sidecar.toml"),
            "{msg}"
        );
        let msg = invalid(&[], &[("SIDECAR_CONFIG", missing)]);
        assert!(msg.starts_with("SIDECAR_CONFIG: cannot read"), "{msg}");
        let dir = std::env::temp_dir();
        let msg = invalid(&["--config", dir.to_str().unwrap()], &[]);
        assert!(msg.starts_with("--config: cannot read"), "{msg}");
    }

    #[test]
    fn bad_values_are_named_by_their_source() {
        let file = TempToml::new("bad-sources", "otlp-timeout = \"soon\"\n");
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case<'_>] = &[
            (&["--otlp-timeout", "soon"], &[], "--otlp-timeout: "),
            (
                &[],
                &[("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")],
                "OTEL_EXPORTER_OTLP_TIMEOUT: ",
            ),
            (&["--config", file.path()], &[], "key `otlp-timeout`: "),
            (
                &[],
                &[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpcx")],
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: ",
            ),
            (
                &["--otlp-metrics-compression", "zstd"],
                &[],
                "--otlp-metrics-compression: ",
            ),
            (
                &[],
                &[("OTEL_SDK_DISABLED", "perhaps")],
                "OTEL_SDK_DISABLED: ",
            ),
            (
                &[],
                &[("OTEL_RESOURCE_ATTRIBUTES", "novalue")],
                "OTEL_RESOURCE_ATTRIBUTES: ",
            ),
            (
                &[],
                &[("RUST_LOG", "foo=bar")],
                "RUST_LOG: invalid value `foo=bar`",
            ),
            (
                &[],
                &[("SIDECAR_LOG_FORMAT", "xml")],
                "SIDECAR_LOG_FORMAT: invalid value `xml`",
            ),
            (
                &[],
                &[("SIDECAR_ADMIN_ADDR", "nowhere")],
                "SIDECAR_ADMIN_ADDR: invalid value `nowhere`",
            ),
        ];
        for (args, env, expect) in cases {
            let msg = invalid(args, env);
            assert!(msg.contains(expect), "{args:?} {env:?}: {msg}");
        }
        // A flag wins over a bad environment value: nothing to complain about.
        let s = settings(&["--log-format", "json"], &[("SIDECAR_LOG_FORMAT", "xml")]);
        assert_eq!(s.args.log_format, LogFormat::Json);
    }

    #[test]
    fn header_values_never_appear() {
        let secret = "s3cr3t-token";
        let env = [(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "authorization=Bearer%20s3cr3t-token",
        )];
        let s = settings(&["--otlp-endpoint", "http://c:4317"], &env);
        let setting = s.get("otlp-headers").unwrap();
        assert!(setting.secret);
        assert_eq!(setting.display_value(), "<redacted>");
        let config = s.resolve().unwrap();
        let traces = config.export.traces.as_ref().unwrap();
        assert_eq!(traces.headers[0].0, "authorization");
        for format in [ShowFormat::Text, ShowFormat::Json] {
            let out = crate::config::show::render(&s, &config, format);
            assert!(!out.contains(secret), "{out}");
            assert!(out.contains("authorization"), "{out}");
            assert!(out.contains("<redacted>"), "{out}");
        }
        // Nor in errors about them.
        let msg = invalid(
            &[],
            &[("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "a=b,s3cr3t-token")],
        );
        assert!(
            msg.starts_with("OTEL_EXPORTER_OTLP_TRACES_HEADERS: "),
            "{msg}"
        );
        assert!(!msg.contains(secret), "{msg}");
    }

    #[test]
    fn config_subcommand_shows_values_and_sources() {
        let file = TempToml::new("show", "inbound-port = 15106\nservice-name = \"shop\"\n");
        let loaded = load_with(
            &[
                "config",
                "--config",
                file.path(),
                "--outbound-port",
                "15301",
                "--format",
                "json",
            ],
            &[
                ("SIDECAR_DRAIN_TIMEOUT", "7"),
                ("K8S_POD_NAME", "shop-7d4b9c-x2x9z"),
            ],
        )
        .unwrap();
        let Loaded::Config { settings, format } = loaded else {
            panic!("expected config")
        };
        assert_eq!(format, ShowFormat::Json);
        let config = settings.resolve().unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&crate::config::show::render(&settings, &config, format)).unwrap();
        let find = |key: &str| {
            json["settings"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["key"] == key)
                .unwrap()
                .clone()
        };
        assert_eq!(find("outbound-port")["value"], "15301");
        assert_eq!(find("outbound-port")["source"], "flag --outbound-port");
        assert_eq!(find("drain-timeout")["source"], "env SIDECAR_DRAIN_TIMEOUT");
        assert_eq!(
            find("inbound-port")["source"],
            format!("file {}", file.path())
        );
        assert_eq!(find("max-routes")["source"], "default");
        assert_eq!(find("otlp-endpoint")["value"], serde_json::Value::Null);
        let resource = json["resource"].as_array().unwrap();
        assert!(resource
            .iter()
            .any(|a| a["key"] == "service.name" && a["value"] == "shop"));
        assert!(resource
            .iter()
            .any(|a| a["key"] == "k8s.pod.name" && a["value"] == "shop-7d4b9c-x2x9z"));
        assert_eq!(json["export"]["traces"], serde_json::Value::Null);

        let text = crate::config::show::render(&settings, &config, ShowFormat::Text);
        assert!(
            text.contains("outbound-port = 15301  (flag --outbound-port)"),
            "{text}"
        );
        assert!(
            text.contains("drain-timeout = 7  (env SIDECAR_DRAIN_TIMEOUT)"),
            "{text}"
        );
        assert!(
            text.contains(&format!("inbound-port = 15106  (file {})", file.path())),
            "{text}"
        );
        assert!(text.contains("max-routes = 100  (default)"), "{text}");
        assert!(
            text.contains("traces.endpoint = <none: local sink file>"),
            "{text}"
        );
    }

    #[test]
    fn redirect_and_worker_threads_default_read_env_and_file() {
        let s = settings(&[], &[]);
        assert_eq!(s.args.redirect, RedirectMode::Ebpf);
        assert_eq!(s.args.worker_threads, None);
        let redirect = s.get("redirect").unwrap();
        assert_eq!(redirect.value.as_deref(), Some("ebpf"));
        assert_eq!(redirect.source, Source::Default);
        assert_eq!(redirect.env.as_deref(), Some("SIDECAR_REDIRECT"));
        let workers = s.get("worker-threads").unwrap();
        assert_eq!(workers.value, None);
        assert_eq!(workers.env.as_deref(), Some("SIDECAR_WORKER_THREADS"));

        let flags = settings(&["--redirect", "iptables", "--worker-threads", "4"], &[]);
        assert_eq!(flags.args.redirect, RedirectMode::Iptables);
        assert_eq!(flags.args.worker_threads, Some(4));
        assert_eq!(
            flags.get("redirect").unwrap().source,
            Source::Flag("--redirect".into())
        );
        assert_eq!(
            run_args(&["--worker-threads", "256"]).worker_threads,
            Some(256)
        );
        assert_eq!(run_args(&["--worker-threads", "1"]).worker_threads, Some(1));

        let env = [("SIDECAR_REDIRECT", "off"), ("SIDECAR_WORKER_THREADS", "2")];
        let from_env = settings(&[], &env);
        assert_eq!(from_env.args.redirect, RedirectMode::Off);
        assert_eq!(from_env.args.worker_threads, Some(2));
        assert_eq!(
            from_env.get("worker-threads").unwrap().source,
            Source::Env("SIDECAR_WORKER_THREADS".into())
        );
        // The flag wins over the environment.
        let flag_wins = settings(&["--redirect", "ebpf"], &env);
        assert_eq!(flag_wins.args.redirect, RedirectMode::Ebpf);

        let file = TempToml::new("redirect", "redirect = \"iptables\"\nworker-threads = 3\n");
        let from_file = settings(&["--config", file.path()], &[]);
        assert_eq!(from_file.args.redirect, RedirectMode::Iptables);
        assert_eq!(from_file.args.worker_threads, Some(3));
        assert_eq!(
            from_file.get("redirect").unwrap().source,
            Source::File {
                path: PathBuf::from(file.path()),
                key: "redirect".into()
            }
        );
        // The environment wins over the file.
        let env_wins = settings(
            &[],
            &[("SIDECAR_CONFIG", file.path()), ("SIDECAR_REDIRECT", "off")],
        );
        assert_eq!(env_wins.args.redirect, RedirectMode::Off);
        assert_eq!(env_wins.args.worker_threads, Some(3));
    }

    #[test]
    fn bad_redirect_and_worker_threads_values_are_usage_errors_naming_the_setting() {
        let file_zero = TempToml::new("workers-zero", "worker-threads = 0\n");
        let file_mode = TempToml::new("redirect-bad", "redirect = \"nft\"\n");
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case<'_>] = &[
            (
                &["--worker-threads", "0"],
                &[],
                &["--worker-threads: invalid value `0`", "1..=256"],
            ),
            (
                &["--worker-threads", "257"],
                &[],
                &["--worker-threads: invalid value `257`", "1..=256"],
            ),
            (
                &["--worker-threads", "many"],
                &[],
                &["--worker-threads: invalid value `many`"],
            ),
            (
                &[],
                &[("SIDECAR_WORKER_THREADS", "0")],
                &["SIDECAR_WORKER_THREADS: invalid value `0`", "1..=256"],
            ),
            (
                &["--config", file_zero.path()],
                &[],
                &["key `worker-threads`: invalid value `0`"],
            ),
            (
                &["--redirect", "nft"],
                &[],
                &["--redirect: invalid value `nft`", "ebpf, iptables, off"],
            ),
            (
                &[],
                &[("SIDECAR_REDIRECT", "tproxy")],
                &["SIDECAR_REDIRECT: invalid value `tproxy`"],
            ),
            (
                &["--config", file_mode.path()],
                &[],
                &["key `redirect`: invalid value `nft`"],
            ),
        ];
        for (args, env, items) in cases {
            let msg = invalid(args, env);
            for item in *items {
                assert!(msg.contains(item), "{args:?} {env:?}: {item} not in {msg}");
            }
        }
    }

    #[test]
    fn interception_policy_is_refused_without_ebpf_redirection() {
        // A flag: named as given, with the mode and where the rules belong.
        let msg = invalid(
            &["--redirect", "iptables", "--exclude-outbound-ports", "5432"],
            &[],
        );
        assert!(msg.starts_with("--exclude-outbound-ports: "), "{msg}");
        for item in [
            "`iptables`",
            "(set by --redirect)",
            "iptables/nftables rules",
        ] {
            assert!(msg.contains(item), "{item} not in {msg}");
        }
        // Every policy setting, from the environment, with the mode from a file.
        let file = TempToml::new("redirect-off", "redirect = \"off\"\n");
        for (key, value) in [
            ("exclude-outbound-ports", "5432"),
            ("exclude-outbound-cidrs", "10.0.0.0/8"),
            ("include-outbound-cidrs", "*"),
            ("exclude-inbound-ports", "9090"),
            ("include-inbound-ports", "8080"),
        ] {
            assert!(POLICY_KEYS.contains(&key), "{key}");
            let var = format!("SIDECAR_{}", key.replace('-', "_").to_uppercase());
            let msg = invalid(&[], &[("SIDECAR_CONFIG", file.path()), (&var, value)]);
            assert!(msg.starts_with(&format!("{var}: ")), "{msg}");
            assert!(msg.contains("`off`"), "{msg}");
            assert!(msg.contains("nothing is redirected"), "{msg}");
            assert!(
                msg.contains(&format!("set by config file {}", file.path())),
                "{msg}"
            );
            // With eBPF redirection (the default) the same setting is fine.
            settings(&[], &[(&var, value)]).resolve().unwrap();
        }
        // Without policy settings, both modes resolve.
        for mode in ["iptables", "off"] {
            let s = settings(&["--redirect", mode], &[]);
            s.resolve().unwrap();
        }
        // `sidecar config` validates the same way.
        match load_with(
            &[
                "config",
                "--redirect",
                "iptables",
                "--include-inbound-ports",
                "80",
            ],
            &[],
        ) {
            Ok(Loaded::Config { settings, .. }) => {
                let msg = settings.resolve().unwrap_err();
                assert!(msg.starts_with("--include-inbound-ports: "), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn config_shows_redirect_and_worker_threads_with_their_sources() {
        let Loaded::Config { settings, .. } = load_with(
            &["config", "--redirect", "iptables"],
            &[("SIDECAR_WORKER_THREADS", "2")],
        )
        .unwrap() else {
            panic!("expected config")
        };
        let config = settings.resolve().unwrap();
        let text = crate::config::show::render(&settings, &config, ShowFormat::Text);
        assert!(
            text.contains("redirect = iptables  (flag --redirect)"),
            "{text}"
        );
        assert!(
            text.contains("worker-threads = 2  (env SIDECAR_WORKER_THREADS)"),
            "{text}"
        );
        let Loaded::Config { settings, .. } = load_with(&["config"], &[]).unwrap() else {
            panic!("expected config")
        };
        let config = settings.resolve().unwrap();
        let text = crate::config::show::render(&settings, &config, ShowFormat::Text);
        assert!(text.contains("redirect = ebpf  (default)"), "{text}");
        assert!(
            text.contains("worker-threads = <unset>  (default)"),
            "{text}"
        );
    }

    #[test]
    fn other_subcommands_load() {
        assert!(matches!(load_with(&["check"], &[]), Ok(Loaded::Check)));
        assert!(matches!(load_with(&["top"], &[]), Ok(Loaded::Top(_))));
        match load_with(&["run", "--help"], &[]) {
            Err(LoadError::Usage(e)) => {
                assert!(!e.use_stderr());
                let help = e.to_string();
                assert!(
                    help.contains("SIDECAR_OUTBOUND_PORT"),
                    "help lists env: {help}"
                );
                assert!(help.contains("--otlp-traces-endpoint"), "{help}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(load_with(&[], &[]), Err(LoadError::Usage(e)) if e.use_stderr()));
    }
}

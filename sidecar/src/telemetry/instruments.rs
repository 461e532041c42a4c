//! Every metric instrument the sidecar creates, as data: name, kind, unit, description and the
//! attribute keys its points carry, and the Prometheus names each one is exposed under.
//!
//! The list is what dashboards and alerts may rely on (`deploy/grafana/*.json` is checked
//! against it). Its unit tests create the real instruments (HTTP client and server, gRPC, TCP,
//! the sidecar's own and the export statistics), record through them, collect, and require the
//! list to match exactly what the SDK collected and what `/metrics` rendered; so adding,
//! renaming or changing an instrument without updating this list fails the tests.
//!
//! Prometheus names come from the real conversion of [`crate::admin::prometheus::render_otlp`]
//! (the same rules the OpenTelemetry Collector's `prometheus` exporter follows): dots become
//! underscores, the unit becomes a suffix, counters end in `_total`, histograms expose
//! `_bucket`, `_sum` and `_count`.

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};

use crate::admin::prometheus::{label_name, render_otlp};

/// What kind of instrument (and so which OTLP data type and Prometheus type) a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstrumentKind {
    /// Monotonic sum (synchronous or observable counter): a Prometheus `counter`.
    Counter,
    /// Non-monotonic sum (up-down counter): a Prometheus `gauge`.
    UpDownCounter,
    /// Gauge (observable gauge): a Prometheus `gauge`.
    Gauge,
    /// Explicit-bucket histogram: a Prometheus `histogram`.
    Histogram,
}

impl InstrumentKind {
    /// The Prometheus metric type the kind is exposed as.
    pub fn prometheus_type(self) -> &'static str {
        match self {
            InstrumentKind::Counter => "counter",
            InstrumentKind::UpDownCounter | InstrumentKind::Gauge => "gauge",
            InstrumentKind::Histogram => "histogram",
        }
    }
}

/// One metric instrument of the sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Instrument {
    /// OpenTelemetry instrument name.
    pub name: &'static str,
    /// Instrument kind.
    pub kind: InstrumentKind,
    /// UCUM unit, as given to the SDK.
    pub unit: &'static str,
    /// Description, as given to the SDK.
    pub description: &'static str,
    /// Every attribute key a point of this instrument may carry.
    pub attributes: &'static [&'static str],
}

/// How one instrument appears in a Prometheus exposition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrometheusNames {
    /// The metric family (the name of its `# TYPE` line).
    pub family: String,
    /// The family's type (`counter`, `gauge`, `histogram`).
    pub prom_type: String,
    /// The sample names (`<family>_bucket`, `_sum`, `_count` for a histogram, else the family).
    pub series: Vec<String>,
    /// The label names of the instrument's attributes, sorted (without `le` and the
    /// `otel_scope_*` labels every series carries).
    pub labels: Vec<String>,
}

const HTTP_CLIENT_ATTRS: &[&str] = &[
    "http.request.method",
    "server.address",
    "server.port",
    "url.scheme",
    "network.protocol.version",
    "http.response.status_code",
    "error.type",
];
const HTTP_SERVER_ATTRS: &[&str] = &[
    "http.request.method",
    "url.scheme",
    "server.port",
    "network.protocol.version",
    "http.route",
    "http.response.status_code",
    "error.type",
];
const PROXY_CONNECTION_ATTRS: &[&str] = &[
    "server.address",
    "network.peer.address",
    "tls.protocol.name",
    "sidecar.tls.client.alpn",
    "server.port",
    "network.transport",
    "sidecar.protocol",
    "sidecar.direction",
    "error.type",
];
const PROXY_IO_ATTRS: &[&str] = &[
    "server.address",
    "network.peer.address",
    "tls.protocol.name",
    "sidecar.tls.client.alpn",
    "server.port",
    "network.transport",
    "sidecar.protocol",
    "sidecar.direction",
    "error.type",
    "network.io.direction",
];
const RPC_ATTRS: &[&str] = &[
    "rpc.system.name",
    "rpc.method",
    "server.address",
    "server.port",
    "rpc.response.status_code",
    "error.type",
];
const TCP_ATTRS: &[&str] = &[
    "network.transport",
    "sidecar.tcp.direction",
    "network.peer.address",
    "network.peer.port",
    "server.port",
];
const TCP_BYTES_ATTRS: &[&str] = &[
    "network.transport",
    "sidecar.tcp.direction",
    "network.peer.address",
    "network.peer.port",
    "server.port",
    "network.io.direction",
];
const TCP_CONNECTIONS_ATTRS: &[&str] = &[
    "network.transport",
    "sidecar.tcp.direction",
    "network.peer.address",
    "network.peer.port",
    "server.port",
    "sidecar.tcp.outcome",
];
const SDK_COMPONENT_ATTRS: &[&str] = &["otel.component.type", "otel.component.name"];
const SDK_COMPONENT_ERROR_ATTRS: &[&str] =
    &["otel.component.type", "otel.component.name", "error.type"];

/// Every metric instrument the sidecar creates (`sidecar run`), in no particular order.
pub const INSTRUMENTS: &[Instrument] = &[
    // HTTP client (outbound requests): telemetry/mod.rs.
    Instrument {
        name: "http.client.request.duration",
        kind: InstrumentKind::Histogram,
        unit: "s",
        description: "Duration of HTTP client requests.",
        attributes: HTTP_CLIENT_ATTRS,
    },
    Instrument {
        name: "http.client.request.body.size",
        kind: InstrumentKind::Histogram,
        unit: "By",
        description: "Size of HTTP client request bodies.",
        attributes: HTTP_CLIENT_ATTRS,
    },
    Instrument {
        name: "http.client.response.body.size",
        kind: InstrumentKind::Histogram,
        unit: "By",
        description: "Size of HTTP client response bodies.",
        attributes: HTTP_CLIENT_ATTRS,
    },
    Instrument {
        name: "http.client.active_requests",
        kind: InstrumentKind::UpDownCounter,
        unit: "{request}",
        description: "Number of outbound HTTP requests that are currently active.",
        attributes: &[
            "http.request.method",
            "server.address",
            "server.port",
            "url.scheme",
        ],
    },
    // Proxied TCP connections: telemetry/mod.rs.
    Instrument {
        name: "sidecar.proxy.connection.duration",
        kind: InstrumentKind::Histogram,
        unit: "s",
        description: "Duration of proxied TCP connections, from accept to close.",
        attributes: PROXY_CONNECTION_ATTRS,
    },
    Instrument {
        name: "sidecar.proxy.connection.io",
        kind: InstrumentKind::Counter,
        unit: "By",
        description: "Bytes forwarded on proxied TCP connections.",
        attributes: PROXY_IO_ATTRS,
    },
    // HTTP server (inbound requests): telemetry/server.rs.
    Instrument {
        name: "http.server.request.duration",
        kind: InstrumentKind::Histogram,
        unit: "s",
        description: "Duration of HTTP server requests.",
        attributes: HTTP_SERVER_ATTRS,
    },
    Instrument {
        name: "http.server.request.body.size",
        kind: InstrumentKind::Histogram,
        unit: "By",
        description: "Size of HTTP server request bodies.",
        attributes: HTTP_SERVER_ATTRS,
    },
    Instrument {
        name: "http.server.response.body.size",
        kind: InstrumentKind::Histogram,
        unit: "By",
        description: "Size of HTTP server response bodies.",
        attributes: HTTP_SERVER_ATTRS,
    },
    Instrument {
        name: "http.server.active_requests",
        kind: InstrumentKind::UpDownCounter,
        unit: "{request}",
        description: "Number of inbound HTTP requests that are currently active.",
        attributes: &["http.request.method", "url.scheme", "server.port"],
    },
    // gRPC: telemetry/rpc.rs.
    Instrument {
        name: "rpc.client.call.duration",
        kind: InstrumentKind::Histogram,
        unit: "s",
        description: "Duration of outbound gRPC calls, to the end of the stream.",
        attributes: RPC_ATTRS,
    },
    Instrument {
        name: "rpc.server.call.duration",
        kind: InstrumentKind::Histogram,
        unit: "s",
        description: "Duration of inbound gRPC calls, to the end of the stream.",
        attributes: RPC_ATTRS,
    },
    // Kernel TCP observations: telemetry/tcp.rs.
    Instrument {
        name: "sidecar.tcp.rtt",
        kind: InstrumentKind::Histogram,
        unit: "s",
        description: "Smoothed round-trip time of TCP connections, at close.",
        attributes: TCP_ATTRS,
    },
    Instrument {
        name: "sidecar.tcp.retransmits",
        kind: InstrumentKind::Counter,
        unit: "{segment}",
        description: "TCP segments retransmitted, counted when connections close.",
        attributes: TCP_ATTRS,
    },
    Instrument {
        name: "sidecar.tcp.connections",
        kind: InstrumentKind::Counter,
        unit: "{connection}",
        description: "TCP connections closed or failed, by outcome.",
        attributes: TCP_CONNECTIONS_ATTRS,
    },
    Instrument {
        name: "sidecar.tcp.bytes",
        kind: InstrumentKind::Counter,
        unit: "By",
        description: "TCP payload bytes sent (acknowledged) and received.",
        attributes: TCP_BYTES_ATTRS,
    },
    Instrument {
        name: "sidecar.tcp.connection.duration",
        kind: InstrumentKind::Histogram,
        unit: "s",
        description: "Lifetime of established TCP connections.",
        attributes: TCP_ATTRS,
    },
    Instrument {
        name: "sidecar.tcp.connect.duration",
        kind: InstrumentKind::Histogram,
        unit: "s",
        description: "Time from connect() to established, outbound connections.",
        // Outbound only: never `server.port` (the pod's port of an inbound connection).
        attributes: &[
            "network.transport",
            "sidecar.tcp.direction",
            "network.peer.address",
            "network.peer.port",
        ],
    },
    Instrument {
        name: "sidecar.tcp.ringbuf.overflows",
        kind: InstrumentKind::Counter,
        unit: "{record}",
        description: "TCP observation records lost because the ring buffer was full.",
        attributes: &[],
    },
    // The sidecar's own: telemetry/selfobs.rs.
    Instrument {
        name: "process.cpu.time",
        kind: InstrumentKind::Counter,
        unit: "s",
        description: "Total CPU seconds of the sidecar process broken down by mode.",
        attributes: &["cpu.mode"],
    },
    Instrument {
        name: "process.memory.usage",
        kind: InstrumentKind::UpDownCounter,
        unit: "By",
        description: "Resident memory of the sidecar process.",
        attributes: &[],
    },
    Instrument {
        name: "sidecar.proxy.connections.active",
        kind: InstrumentKind::UpDownCounter,
        unit: "{connection}",
        description: "Proxied connections open now.",
        attributes: &["sidecar.direction"],
    },
    Instrument {
        name: "sidecar.proxy.errors",
        kind: InstrumentKind::Counter,
        unit: "{error}",
        description: "Connections the proxy closed without serving them, by cause.",
        attributes: &["error.type"],
    },
    Instrument {
        name: "sidecar.ebpf.map.fill_ratio",
        kind: InstrumentKind::Gauge,
        unit: "1",
        description: "Entries of an eBPF map divided by its capacity (LRU maps evict when full).",
        attributes: &["sidecar.ebpf.map.name"],
    },
    // Export statistics (OTel SDK self-observability): export/stats.rs.
    Instrument {
        name: "otel.sdk.processor.span.processed",
        kind: InstrumentKind::Counter,
        unit: "{span}",
        description: "The number of spans for which the processing has finished, either successful or failed",
        attributes: SDK_COMPONENT_ERROR_ATTRS,
    },
    Instrument {
        name: "otel.sdk.processor.span.queue.size",
        kind: InstrumentKind::UpDownCounter,
        unit: "{span}",
        description: "The number of spans in the queue of a given instance of an SDK span processor",
        attributes: SDK_COMPONENT_ATTRS,
    },
    Instrument {
        name: "otel.sdk.processor.span.queue.capacity",
        kind: InstrumentKind::UpDownCounter,
        unit: "{span}",
        description: "The maximum number of spans the queue of a given instance of an SDK span processor can hold",
        attributes: SDK_COMPONENT_ATTRS,
    },
    Instrument {
        name: "otel.sdk.exporter.span.exported",
        kind: InstrumentKind::Counter,
        unit: "{span}",
        description: "The number of spans for which the export has finished, either successful or failed",
        attributes: SDK_COMPONENT_ERROR_ATTRS,
    },
    Instrument {
        name: "otel.sdk.exporter.metric_data_point.exported",
        kind: InstrumentKind::Counter,
        unit: "{data_point}",
        description: "The number of metric data points for which the export has finished, either successful or failed",
        attributes: SDK_COMPONENT_ERROR_ATTRS,
    },
    Instrument {
        name: "otel.sdk.exporter.operation.duration",
        kind: InstrumentKind::Histogram,
        unit: "s",
        description: "The duration of exporting a batch of telemetry records",
        attributes: SDK_COMPONENT_ERROR_ATTRS,
    },
];

/// Resource attributes the sidecar may set (`telemetry::resource`, plus the SDK's own). The
/// collector's `prometheus` exporter with `resource_to_telemetry_conversion` turns them into
/// labels of every series (`service.name` → `service_name`); without it they are the labels of
/// `target_info`.
pub const RESOURCE_ATTRIBUTES: &[&str] = &[
    "service.name",
    "service.namespace",
    "service.version",
    "service.instance.id",
    "k8s.pod.name",
    "k8s.namespace.name",
    "k8s.pod.uid",
    "k8s.node.name",
    "k8s.container.name",
    "k8s.deployment.name",
    "k8s.replicaset.name",
    "k8s.statefulset.name",
    "k8s.daemonset.name",
    "k8s.job.name",
    "k8s.cronjob.name",
    "telemetry.sdk.name",
    "telemetry.sdk.language",
    "telemetry.sdk.version",
];

/// Labels a Prometheus server or exporter adds to every series besides the attributes: the
/// scrape target (`job`, `instance`) and the instrumentation scope.
pub const PROMETHEUS_TARGET_LABELS: &[&str] =
    &["job", "instance", "otel_scope_name", "otel_scope_version"];

/// The instrument called `name`, if the sidecar has one.
pub fn find(name: &str) -> Option<&'static Instrument> {
    INSTRUMENTS.iter().find(|i| i.name == name)
}

impl Instrument {
    /// The Prometheus family, type, sample names and attribute labels of this instrument, as
    /// the sidecar's `/metrics` conversion renders them.
    pub fn prometheus(&self) -> PrometheusNames {
        let attributes = self
            .attributes
            .iter()
            .map(|k| KeyValue {
                key: (*k).to_owned(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("v".to_owned())),
                }),
                ..Default::default()
            })
            .collect::<Vec<_>>();
        let number = NumberDataPoint {
            attributes: attributes.clone(),
            value: Some(number_data_point::Value::AsInt(1)),
            ..Default::default()
        };
        let cumulative = AggregationTemporality::Cumulative as i32;
        let data = match self.kind {
            InstrumentKind::Counter | InstrumentKind::UpDownCounter => Data::Sum(Sum {
                data_points: vec![number],
                aggregation_temporality: cumulative,
                is_monotonic: self.kind == InstrumentKind::Counter,
            }),
            InstrumentKind::Gauge => Data::Gauge(Gauge {
                data_points: vec![number],
            }),
            InstrumentKind::Histogram => Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    attributes,
                    count: 1,
                    sum: Some(1.0),
                    bucket_counts: vec![0, 1],
                    explicit_bounds: vec![0.5],
                    ..Default::default()
                }],
                aggregation_temporality: cumulative,
            }),
        };
        let metric = Metric {
            name: self.name.to_owned(),
            description: self.description.to_owned(),
            unit: self.unit.to_owned(),
            data: Some(data),
            ..Default::default()
        };
        let rm = ResourceMetrics {
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![metric],
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render_otlp(&[rm]).text;
        let mut names = PrometheusNames {
            family: String::new(),
            prom_type: String::new(),
            series: Vec::new(),
            labels: Vec::new(),
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                names.family = parts.next().unwrap_or_default().to_owned();
                names.prom_type = parts.next().unwrap_or_default().to_owned();
            } else if !line.starts_with('#') {
                let (sample, labels) = split_sample(line);
                if !names.series.iter().any(|s| s == sample) {
                    names.series.push(sample.to_owned());
                }
                for label in labels {
                    if label != "le" && !names.labels.contains(&label) {
                        names.labels.push(label);
                    }
                }
            }
        }
        names.labels.sort();
        names
    }
}

/// The sample name and label names of one exposition line (`name{k="v",...} value`).
/// Label values are skipped as quoted strings with `\` escapes.
pub fn split_sample(line: &str) -> (&str, Vec<String>) {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..end];
    let mut labels = Vec::new();
    if line[end..].starts_with('{') {
        let mut chars = line[end + 1..].chars();
        let mut key = String::new();
        while let Some(c) = chars.next() {
            match c {
                '=' => {
                    labels.push(std::mem::take(&mut key));
                    // The quoted value.
                    let _open = chars.next();
                    let mut escaped = false;
                    for v in chars.by_ref() {
                        match (escaped, v) {
                            (false, '\\') => escaped = true,
                            (false, '"') => break,
                            _ => escaped = false,
                        }
                    }
                }
                ',' => {}
                '}' => break,
                c => key.push(c),
            }
        }
    }
    (name, labels)
}

/// Every Prometheus sample name the sidecar's instruments give, plus `target_info`.
pub fn prometheus_series() -> Vec<String> {
    let mut out: Vec<String> = INSTRUMENTS
        .iter()
        .flat_map(|i| i.prometheus().series)
        .collect();
    out.push("target_info".to_owned());
    out
}

/// The label names the resource attributes become (`service_name`, `k8s_pod_name`, ...).
pub fn resource_labels() -> Vec<String> {
    RESOURCE_ATTRIBUTES.iter().map(|a| label_name(a)).collect()
}

/// What a PromQL expression (or a Grafana `label_values(selector, label)` query) refers to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromqlNames {
    /// Metric names of its vector selectors.
    pub metrics: Vec<String>,
    /// Label names of its matchers, grouping clauses (`by`, `without`, `on`, `ignoring`,
    /// `group_left`, `group_right`) and of `label_values`.
    pub labels: Vec<String>,
}

/// PromQL keywords and aggregation operators: never metric names.
const PROMQL_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric and label names a PromQL expression refers to. Grafana variables (`$var`,
/// `${var}`, `[[var]]`) are skipped; `label_values(selector, label)` (Grafana's variable query)
/// is understood. This is a lexer, not a full parser: it is enough to check names, not syntax
/// (the deploy tests check the syntax with `promtool`).
pub fn promql_names(expr: &str) -> PromqlNames {
    let mut out = PromqlNames::default();
    let trimmed = expr.trim();
    let body = trimmed
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'));
    if let Some(body) = body {
        match body.rsplit_once(',') {
            Some((selector, label)) => {
                out.labels.push(label.trim().to_owned());
                let inner = promql_names(selector);
                out.metrics.extend(inner.metrics);
                out.labels.extend(inner.labels);
            }
            None => out.labels.push(body.trim().to_owned()),
        }
        return out;
    }

    let b: Vec<char> = expr.chars().collect();
    let mut i = 0;
    // Depth inside `{...}` (label matchers) and `[...]` (ranges).
    let mut in_braces = false;
    let mut in_brackets = false;
    // Inside the parentheses of a `by (...)`-like clause.
    let mut in_label_list = false;
    let mut pending_label_list = false;
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_cont = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < b.len() {
        let c = b[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < b.len() && b[i] != c {
                    if b[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '$' => {
                i += 1;
                if b.get(i) == Some(&'{') {
                    while i < b.len() && b[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < b.len() && is_cont(b[i]) {
                        i += 1;
                    }
                }
            }
            '{' => {
                in_braces = true;
                i += 1;
            }
            '}' => {
                in_braces = false;
                i += 1;
            }
            '[' if b.get(i + 1) == Some(&'[') => {
                // Grafana's deprecated `[[var]]`.
                while i < b.len() && !(b[i] == ']' && b.get(i + 1) == Some(&']')) {
                    i += 1;
                }
                i += 2;
            }
            '[' => {
                in_brackets = true;
                i += 1;
            }
            ']' => {
                in_brackets = false;
                i += 1;
            }
            '(' => {
                if pending_label_list {
                    in_label_list = true;
                    pending_label_list = false;
                }
                i += 1;
            }
            ')' => {
                in_label_list = false;
                i += 1;
            }
            c if c.is_ascii_digit()
                || (c == '.' && b.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // A number or a duration (`5m`, `1e3`, `0x1f`).
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '.') {
                    i += 1;
                }
            }
            c if is_start(c) => {
                let start = i;
                while i < b.len() && is_cont(b[i]) {
                    i += 1;
                }
                let word: String = b[start..i].iter().collect();
                if in_brackets {
                    continue;
                }
                if in_braces || in_label_list {
                    out.labels.push(word);
                    continue;
                }
                let mut j = i;
                while j < b.len() && b[j].is_whitespace() {
                    j += 1;
                }
                let lower = word.to_ascii_lowercase();
                if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                    // `group_left` may stand without a list.
                    pending_label_list = b.get(j) == Some(&'(');
                } else if PROMQL_KEYWORDS.contains(&lower.as_str()) || b.get(j) == Some(&'(') {
                    // An operator or a function call.
                } else {
                    out.metrics.push(word);
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// The label names a Grafana `legendFormat` uses (`{{server_address}}`).
pub fn legend_labels(legend: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = legend;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        out.push(after[..end].trim().to_owned());
        rest = &after[end + 2..];
    }
    out
}

#[cfg(test)]
mod tests;

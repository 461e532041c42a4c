//! The instrument list against reality (the real instruments, recorded through and collected),
//! and the Grafana dashboards against the list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{
    InMemoryMetricExporter, InMemoryMetricExporterBuilder, PeriodicReader, SdkMeterProvider,
    Temporality,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

use super::*;
use crate::admin::prometheus::PrometheusReader;
use crate::export::stats::{ExportSignal, ExportStats};
use crate::export::summary::Summary;
use crate::protocol::tls::TlsInfo;
use crate::proxy::ProxyCounters;
use crate::telemetry::selfobs::{self, SelfSources};
use crate::telemetry::url::Redactor;
use crate::telemetry::{
    ConnectionDirection, ConnectionProtocol, ErrorType, HttpRequestEnd, HttpRequestStart,
    HttpVersion, RpcCallEnd, ServerRequestInfo, TcpConnectionRecord, TcpDirection, TcpObservation,
    TcpOutcome, Telemetry,
};

/// What the SDK collected for one metric.
#[derive(Debug)]
struct Collected {
    kind: InstrumentKind,
    unit: String,
    description: String,
    attributes: BTreeSet<String>,
}

fn kind_and_keys<T>(data: &MetricData<T>) -> (InstrumentKind, BTreeSet<String>) {
    let mut keys = BTreeSet::new();
    let kind = match data {
        MetricData::Histogram(h) => {
            for p in h.data_points() {
                keys.extend(p.attributes().map(|kv| kv.key.to_string()));
            }
            InstrumentKind::Histogram
        }
        MetricData::Sum(s) => {
            for p in s.data_points() {
                keys.extend(p.attributes().map(|kv| kv.key.to_string()));
            }
            if s.is_monotonic() {
                InstrumentKind::Counter
            } else {
                InstrumentKind::UpDownCounter
            }
        }
        MetricData::Gauge(g) => {
            for p in g.data_points() {
                keys.extend(p.attributes().map(|kv| kv.key.to_string()));
            }
            InstrumentKind::Gauge
        }
        MetricData::ExponentialHistogram(_) => panic!("the sidecar makes no exponential histogram"),
    };
    (kind, keys)
}

fn collected(rm: &ResourceMetrics) -> BTreeMap<String, Collected> {
    let mut out = BTreeMap::new();
    for scope in rm.scope_metrics() {
        for m in scope.metrics() {
            let (kind, attributes) = match m.data() {
                AggregatedMetrics::F64(d) => kind_and_keys(d),
                AggregatedMetrics::U64(d) => kind_and_keys(d),
                AggregatedMetrics::I64(d) => kind_and_keys(d),
            };
            let previous = out.insert(
                m.name().to_owned(),
                Collected {
                    kind,
                    unit: m.unit().to_owned(),
                    description: m.description().to_owned(),
                    attributes,
                },
            );
            assert!(previous.is_none(), "{} collected twice", m.name());
        }
    }
    out
}

/// The real instruments on one meter provider (an in-memory exporter and the `/metrics`
/// reader), each recorded through so that every attribute it can carry shows up.
struct World {
    metrics: InMemoryMetricExporter,
    provider: SdkMeterProvider,
    prometheus: PrometheusReader,
    _tracer: SdkTracerProvider,
}

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn request<'a>(method: &'a str, target: &'a str, version: HttpVersion) -> HttpRequestStart<'a> {
    HttpRequestStart {
        method,
        target,
        host: Some("orders.svc:8080"),
        version,
        destination: "10.0.0.5:8080".parse().expect("address"),
        traceparent: None,
        tracestate: None,
        start: t0(),
        reused_connection: false,
    }
}

fn end(status: Option<u16>, error: Option<ErrorType>) -> HttpRequestEnd {
    HttpRequestEnd {
        status,
        request_body_bytes: 10,
        response_body_bytes: 20,
        error,
        end: t0() + Duration::from_millis(25),
    }
}

fn rpc_end(grpc_status: Option<u32>) -> RpcCallEnd {
    RpcCallEnd {
        grpc_status,
        http_status: Some(200),
        reset_code: None,
        refused: false,
        error: None,
        request_body_bytes: 5,
        response_body_bytes: 7,
        end: t0() + Duration::from_millis(3),
    }
}

fn tcp(direction: TcpDirection, outcome: TcpOutcome) -> TcpObservation {
    TcpObservation {
        local: "198.18.0.1:8080".parse().expect("address"),
        remote: "198.18.0.2:40000".parse().expect("address"),
        direction,
        outcome,
        established: outcome == TcpOutcome::Ok,
        srtt: Some(Duration::from_micros(900)),
        retransmits: 1,
        bytes_sent: 100,
        bytes_received: 200,
        duration: Duration::from_millis(50),
        connect_latency: (direction == TcpDirection::Outbound).then(|| Duration::from_micros(700)),
    }
}

fn world() -> World {
    let resource = Resource::builder().with_service_name("instruments").build();
    let metrics = InMemoryMetricExporterBuilder::new()
        .with_temporality(Temporality::Cumulative)
        .build();
    let reader = PeriodicReader::builder(metrics.clone())
        .with_interval(Duration::from_secs(3600))
        .build();
    let prometheus = PrometheusReader::new();
    let provider = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_reader(prometheus.reader())
        .with_resource(resource.clone())
        .build();
    let tracer = SdkTracerProvider::builder().with_resource(resource).build();
    let telemetry = Telemetry::new(
        &tracer,
        &provider,
        Arc::new(Summary::new()),
        Redactor::default(),
    );

    // HTTP client: a success and a failure (status 503 gives error.type).
    for (status, error) in [
        (Some(200), None),
        (Some(503), None),
        (None, Some(ErrorType::Timeout)),
    ] {
        let r = telemetry.client_request_start(&request("GET", "/orders/42", HttpVersion::Http11));
        telemetry.client_request_end(r, end(status, error));
    }
    // One left active: http.client.active_requests has a point either way (cumulative).
    let active = telemetry.client_request_start(&request("POST", "/x", HttpVersion::Http11));

    // HTTP server: a route, and a 500.
    let info = ServerRequestInfo {
        client: "10.0.0.9:41000".parse().expect("address"),
        user_agent: Some("curl/8"),
    };
    for status in [200, 500] {
        let r = telemetry
            .server_request_start(&request("GET", "/users/123", HttpVersion::Http2), &info);
        telemetry.server_request_end(r, end(Some(status), None));
    }

    // gRPC both ways, OK and failed.
    for direction in [ConnectionDirection::Outbound, ConnectionDirection::Inbound] {
        for status in [0, 14] {
            let call = telemetry.rpc_call_start(
                &request("POST", "/pkg.Greeter/Hello", HttpVersion::Http2),
                direction,
                Some("10.0.0.9:41000".parse().expect("address")),
            );
            telemetry.rpc_call_end(call, rpc_end(Some(status)));
        }
    }

    // Proxied connections: a TLS one with SNI and ALPN, a failed opaque one.
    let record = TcpConnectionRecord {
        destination: "10.0.0.5:443".parse().expect("address"),
        bytes_sent: 1,
        bytes_received: 2,
        duration: Duration::from_millis(4),
        protocol: ConnectionProtocol::Tls,
        error: None,
    };
    let tls = TlsInfo {
        sni: Some("api.example".into()),
        alpn: vec!["h2".into(), "http/1.1".into()],
    };
    telemetry.tcp_connection_with_tls(&record, ConnectionDirection::Outbound, Some(&tls));
    telemetry.tcp_connection_with_direction(
        &TcpConnectionRecord {
            protocol: ConnectionProtocol::Opaque,
            error: Some(ErrorType::ConnectionReset),
            ..record
        },
        ConnectionDirection::Inbound,
    );

    // Kernel TCP: established both ways, a refused connect, lost records.
    telemetry.tcp_observed(&tcp(TcpDirection::Outbound, TcpOutcome::Ok));
    telemetry.tcp_observed(&tcp(TcpDirection::Inbound, TcpOutcome::Ok));
    telemetry.tcp_observed(&tcp(TcpDirection::Outbound, TcpOutcome::Refused));
    telemetry.tcp_ringbuf_overflows(3);

    // The sidecar's own, as `sidecar run` registers them.
    let meter = provider.meter("sidecar");
    selfobs::register(
        &meter,
        SelfSources {
            proxy: Arc::new(ProxyCounters::default()),
            maps: Some(Arc::new(|| vec![("CONN_STATE".to_owned(), 10, 100)])),
        },
    );
    let stats = ExportStats::new();
    stats.set_exporter_type(ExportSignal::Spans, "otlp_grpc_span_exporter");
    stats.set_exporter_type(ExportSignal::Metrics, "otlp_grpc_metric_exporter");
    stats.register(&meter);
    stats.set_queue_capacity(2048);
    stats.span_dropped();
    stats.record_export(ExportSignal::Spans, 4, None, Duration::from_millis(2));
    stats.record_export(
        ExportSignal::Metrics,
        4,
        Some("export_failed"),
        Duration::from_millis(2),
    );
    drop(active);

    World {
        metrics,
        provider,
        prometheus,
        _tracer: tracer,
    }
}

#[test]
fn the_list_is_exactly_what_the_real_instruments_produce() {
    let w = world();
    w.provider.force_flush().expect("flush");
    let exported = w
        .metrics
        .get_finished_metrics()
        .expect("finished metrics")
        .pop()
        .expect("one export");
    let got = collected(&exported);

    let listed: BTreeSet<&str> = INSTRUMENTS.iter().map(|i| i.name).collect();
    assert_eq!(listed.len(), INSTRUMENTS.len(), "a name is listed twice");
    let seen: BTreeSet<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(
        listed, seen,
        "listed (left) and created (right) instruments differ"
    );
    for i in INSTRUMENTS {
        let c = &got[i.name];
        assert_eq!(i.kind, c.kind, "kind of {}", i.name);
        assert_eq!(i.unit, c.unit, "unit of {}", i.name);
        assert_eq!(i.description, c.description, "description of {}", i.name);
        let declared: BTreeSet<String> = i.attributes.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(
            declared.len(),
            i.attributes.len(),
            "{}: repeated key",
            i.name
        );
        assert_eq!(
            declared, c.attributes,
            "attribute keys of {} (left: listed, right: recorded)",
            i.name
        );
    }
}

#[test]
fn prometheus_names_match_what_metrics_renders() {
    let w = world();
    let text = w.prometheus.render().expect("render /metrics");
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut samples: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, ty) = rest.split_once(' ').expect("TYPE line");
            families.insert(family.to_owned(), ty.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let (name, labels) = split_sample(line);
            samples.entry(name.to_owned()).or_default().extend(labels);
        }
    }
    assert_eq!(families.remove("target_info").as_deref(), Some("gauge"));

    let mut expected_families = BTreeMap::new();
    for i in INSTRUMENTS {
        let p = i.prometheus();
        assert_eq!(p.prom_type, i.kind.prometheus_type(), "{}", i.name);
        expected_families.insert(p.family.clone(), p.prom_type.clone());
        let mut allowed: BTreeSet<String> = p.labels.iter().cloned().collect();
        allowed.extend(PROMETHEUS_TARGET_LABELS.iter().map(|s| (*s).to_owned()));
        allowed.insert("le".to_owned());
        for s in &p.series {
            let labels = samples
                .get(s)
                .unwrap_or_else(|| panic!("{s} ({}) not in /metrics:\n{text}", i.name));
            let extra: Vec<_> = labels.difference(&allowed).collect();
            assert!(extra.is_empty(), "{s}: unexpected labels {extra:?}");
        }
    }
    assert_eq!(
        expected_families, families,
        "families: listed (left), rendered (right)"
    );
}

#[test]
fn known_prometheus_names() {
    let names = |n: &str| find(n).expect(n).prometheus();
    let d = names("http.server.request.duration");
    assert_eq!(d.family, "http_server_request_duration_seconds");
    assert_eq!(
        d.series,
        [
            "http_server_request_duration_seconds_bucket",
            "http_server_request_duration_seconds_sum",
            "http_server_request_duration_seconds_count"
        ]
    );
    assert!(
        d.labels.contains(&"http_route".to_owned()),
        "{:?}",
        d.labels
    );
    assert_eq!(
        names("sidecar.tcp.connections").series,
        ["sidecar_tcp_connections_total"]
    );
    assert_eq!(
        names("sidecar.ebpf.map.fill_ratio").series,
        ["sidecar_ebpf_map_fill_ratio"]
    );
    assert_eq!(
        names("process.memory.usage").series,
        ["process_memory_usage_bytes"]
    );
    assert_eq!(
        names("rpc.client.call.duration").labels,
        [
            "error_type",
            "rpc_method",
            "rpc_response_status_code",
            "rpc_system_name",
            "server_address",
            "server_port"
        ]
    );
    assert!(find("no.such.metric").is_none());
    assert!(resource_labels().contains(&"k8s_namespace_name".to_owned()));
}

#[test]
fn promql_lexer_finds_metrics_and_labels() {
    let n = promql_names(
        r#"histogram_quantile(0.99, sum by (le, http_route) (rate(http_server_request_duration_seconds_bucket{service_name=~"$service", job!="x"}[$__rate_interval])))"#,
    );
    assert_eq!(n.metrics, ["http_server_request_duration_seconds_bucket"]);
    assert_eq!(n.labels, ["le", "http_route", "service_name", "job"]);

    let n = promql_names(
        "sum(rate(a_total[5m])) / ignoring(x) group_left sum(rate(b_count[1h] offset 5m)) > bool 0.5e3",
    );
    assert_eq!(n.metrics, ["a_total", "b_count"]);
    assert_eq!(n.labels, ["x"]);

    let n = promql_names("label_values(process_cpu_time_seconds_total{service_namespace=~\"$namespace\"}, service_name)");
    assert_eq!(n.metrics, ["process_cpu_time_seconds_total"]);
    assert_eq!(n.labels, ["service_name", "service_namespace"]);

    let n = promql_names("label_values(service_name)");
    assert!(n.metrics.is_empty());
    assert_eq!(n.labels, ["service_name"]);

    let n = promql_names(r#"topk(5, sum without (instance) (x{a="}{b"}))"#);
    assert_eq!(n.metrics, ["x"]);
    assert_eq!(n.labels, ["instance", "a"]);

    assert_eq!(
        legend_labels("{{server_address}}:{{ server_port }} {{"),
        ["server_address", "server_port"]
    );
}

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana")
}

/// Every `expr` (panel targets), variable `query` (string or `{query: ...}`) and `legendFormat`
/// of a dashboard, with a JSON path for messages: (where, text, is_legend).
fn queries(v: &serde_json::Value, path: &str, out: &mut Vec<(String, String, bool)>) {
    match v {
        serde_json::Value::Object(map) => {
            let is_variable = map.get("type").and_then(|t| t.as_str()) == Some("query")
                && map.contains_key("definition");
            for (k, child) in map {
                let here = format!("{path}.{k}");
                match (k.as_str(), child) {
                    ("expr", serde_json::Value::String(s)) => out.push((here, s.clone(), false)),
                    ("legendFormat", serde_json::Value::String(s)) => {
                        out.push((here, s.clone(), true))
                    }
                    ("query", serde_json::Value::String(s)) if is_variable => {
                        out.push((here, s.clone(), false))
                    }
                    ("query", serde_json::Value::Object(q)) if is_variable => {
                        if let Some(s) = q.get("query").and_then(|s| s.as_str()) {
                            out.push((format!("{here}.query"), s.to_owned(), false));
                        }
                    }
                    _ => queries(child, &here, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                queries(item, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The problems of one dashboard: metric names the sidecar does not emit, label names none of
/// the expression's metrics (nor the resource, nor the scrape) carries.
fn dashboard_problems(json: &serde_json::Value) -> (usize, Vec<String>) {
    let series = prometheus_series();
    // Labels of each series.
    let mut labels_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for i in INSTRUMENTS {
        let p = i.prometheus();
        for s in p.series {
            let set = labels_of.entry(s.clone()).or_default();
            set.extend(p.labels.iter().cloned());
            if s.ends_with("_bucket") {
                set.insert("le".to_owned());
            }
        }
    }
    let mut common: BTreeSet<String> = resource_labels().into_iter().collect();
    common.extend(PROMETHEUS_TARGET_LABELS.iter().map(|s| (*s).to_owned()));
    labels_of.insert("target_info".to_owned(), common.clone());

    let mut found = Vec::new();
    queries(json, "$", &mut found);
    let mut problems = Vec::new();
    let mut checked = 0;
    // Legends are checked against the labels of the panel's expressions: collect per panel
    // path prefix (`...targets[i]`).
    let mut allowed_by_target: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text, legend) in &found {
        if *legend {
            continue;
        }
        checked += 1;
        let names = promql_names(text);
        let mut allowed = common.clone();
        for m in &names.metrics {
            if !series.contains(m) {
                problems.push(format!(
                    "{path}: `{m}` is not a series the sidecar emits ({text})"
                ));
            }
            if let Some(l) = labels_of.get(m) {
                allowed.extend(l.iter().cloned());
            }
        }
        if names.metrics.is_empty() && !text.trim().starts_with("label_values(") {
            problems.push(format!("{path}: no metric in `{text}`"));
        }
        // `label_values(label)` without a selector may name any label of any series.
        if names.metrics.is_empty() {
            allowed.extend(labels_of.values().flatten().cloned());
        }
        for l in &names.labels {
            if !allowed.contains(l) {
                problems.push(format!(
                    "{path}: label `{l}` is on none of {:?} ({text})",
                    names.metrics
                ));
            }
        }
        let target = path.rsplit_once('.').map_or(path.as_str(), |(p, _)| p);
        allowed_by_target.insert(target.to_owned(), allowed);
    }
    for (path, text, legend) in &found {
        if !*legend {
            continue;
        }
        let target = path.rsplit_once('.').map_or(path.as_str(), |(p, _)| p);
        let Some(allowed) = allowed_by_target.get(target) else {
            problems.push(format!("{path}: a legend without an expression"));
            continue;
        };
        for l in legend_labels(text) {
            if !allowed.contains(&l) {
                problems.push(format!("{path}: legend label `{l}` is not on the series"));
            }
        }
    }
    (checked, problems)
}

#[test]
fn dashboards_use_only_series_and_labels_the_sidecar_emits() {
    let dir = dashboards_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboard in {}", dir.display());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read dashboard");
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", file.display()));
        let (checked, problems) = dashboard_problems(&json);
        assert!(
            checked >= 10,
            "{}: only {checked} queries found",
            file.display()
        );
        assert!(
            problems.is_empty(),
            "{}:\n{}",
            file.display(),
            problems.join("\n")
        );
    }
}

#[test]
fn a_misspelt_metric_or_label_is_caught() {
    let dashboard = |expr: &str, legend: &str| {
        serde_json::json!({
            "panels": [{"targets": [{"expr": expr, "legendFormat": legend}]}],
        })
    };
    let ok = dashboard(
        "sum by (http_route) (rate(http_server_request_duration_seconds_count[5m]))",
        "{{http_route}}",
    );
    assert_eq!(dashboard_problems(&ok).1, Vec::<String>::new());
    for (expr, legend, what) in [
        (
            "sum(rate(http_server_request_duration_count[5m]))",
            "",
            "http_server_request_duration_count",
        ),
        (
            "sum(rate(sidecar_tcp_retransmits[5m]))",
            "",
            "sidecar_tcp_retransmits",
        ),
        (
            "sum by (http_route) (rate(http_client_request_duration_seconds_count[5m]))",
            "",
            "label `http_route`",
        ),
        (
            "sum by (server_address) (rate(sidecar_tcp_bytes_total[5m]))",
            "",
            "label `server_address`",
        ),
        (
            "sum by (http_route) (rate(http_server_request_duration_seconds_count[5m]))",
            "{{http_rout}}",
            "legend label `http_rout`",
        ),
    ] {
        let problems = dashboard_problems(&dashboard(expr, legend)).1;
        assert!(
            problems.iter().any(|p| p.contains(what)),
            "{expr} / {legend}: {problems:?}"
        );
    }
}

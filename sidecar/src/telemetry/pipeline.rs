//! Telemetry lifecycle: builds the SDK providers (OTLP gRPC or http/protobuf per signal, or the
//! local sink), the sidecar's bounded span queue, the metric readers, the sampler and the
//! periodic summary task, and flushes everything on shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use opentelemetry_sdk::Resource;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::route::{RouteError, RouteTable};
use super::sampling::SamplingConfig;
use super::url::Redactor;
use super::Telemetry;
use crate::admin::prometheus::PrometheusReader;
use crate::export::batch::BoundedBatchProcessor;
use crate::export::config::ExportSettings;
use crate::export::otlp::{self, Counted, ExportBuildError};
use crate::export::sink::{SinkFile, SinkMetricExporter, SinkSpanExporter};
use crate::export::stats::{ExportSignal, ExportStats};
use crate::export::summary::{print_report, Summary};

/// `otel.component.type` of the local sink's span exporter.
pub const SINK_SPAN_EXPORTER_TYPE: &str = "sidecar_file_span_exporter";
/// `otel.component.type` of the local sink's metric exporter.
pub const SINK_METRIC_EXPORTER_TYPE: &str = "sidecar_file_metric_exporter";

/// Instrumentation scope of the export self-observability instruments.
const SELF_METER: &str = "sidecar";

/// How the telemetry pipeline is set up (the CLI fills it from flags and `OTEL_*` variables).
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// Resolved export settings: per-signal OTLP endpoints (or the sink), temporality,
    /// intervals, span batching, `OTEL_SDK_DISABLED`.
    pub export: ExportSettings,
    /// The resource of every span and metric.
    pub resource: Resource,
    /// The `/metrics` reader, registered on the meter provider (works even when the SDK is
    /// disabled).
    pub prometheus: Option<PrometheusReader>,
    /// Default sink file (OTLP/JSON lines, appended) used by a signal without an endpoint.
    pub sink_path: PathBuf,
    /// Period of the terminal summary; `None` prints none until shutdown.
    pub summary_interval: Option<Duration>,
    /// Trace sampler (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`); metrics are never
    /// sampled.
    pub sampling: SamplingConfig,
    /// `http.route` templates of inbound requests (`/users/{id}`), first match wins.
    pub routes: Vec<String>,
    /// Cap on distinct `http.route` values; beyond it the route is `_OTHER`.
    pub max_routes: usize,
    /// Query parameters whose values are redacted in `url.full` and `url.query`
    /// (case-insensitive); `None` keeps
    /// [`DEFAULT_REDACTED_QUERY_PARAMS`](super::url::DEFAULT_REDACTED_QUERY_PARAMS).
    pub redact_query_params: Option<Vec<String>>,
}

/// Why the telemetry pipeline could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `init` was called outside a tokio runtime.
    #[error("the telemetry pipeline must start inside a tokio runtime")]
    NoRuntime,
    /// The OTLP exporter could not be built (usually an invalid endpoint or TLS file).
    #[error("cannot build the OTLP {signal} exporter for {endpoint:?}: {source}")]
    OtlpExporter {
        /// `traces` or `metrics`.
        signal: &'static str,
        /// The configured endpoint.
        endpoint: String,
        /// What went wrong.
        #[source]
        source: ExportBuildError,
    },
    /// The span export thread could not be started.
    #[error("cannot start the span export thread: {0}")]
    SpanWorker(#[source] std::io::Error),
    /// Flushing or shutting down a provider failed.
    #[error("shutting down the {signal} pipeline failed: {source}")]
    Shutdown {
        /// `traces` or `metrics`.
        signal: &'static str,
        /// What the SDK said.
        #[source]
        source: OTelSdkError,
    },
    /// A configured route template is invalid.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The blocking shutdown task panicked or was cancelled.
    #[error("the telemetry shutdown task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Owns the SDK providers and the summary task; [`TelemetryGuard::shutdown`] flushes them.
///
/// Dropping it without `shutdown` stops the summary task; the providers then shut down (with a
/// blocking flush) when the last [`Telemetry`] clone is dropped.
#[derive(Debug)]
pub struct TelemetryGuard {
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
    export_stats: Arc<ExportStats>,
    /// Bound of the span flush at shutdown (`OTEL_BSP_EXPORT_TIMEOUT`).
    span_shutdown_timeout: Duration,
    summary: Arc<Summary>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// Builds the pipeline. Must run inside a tokio runtime (the gRPC channels, the HTTP client,
/// the span export worker's exports and the summary task live on it).
///
/// Per signal: OTLP when `export.traces` / `export.metrics` is set, else the local sink.
/// `export.disabled`: no span processor and no periodic reader at all (spans are still created
/// for context propagation but go nowhere; only the Prometheus reader, if any, collects).
pub fn init(cfg: &TelemetryConfig) -> Result<(Telemetry, TelemetryGuard), TelemetryError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    let routes = RouteTable::new(&cfg.routes, cfg.max_routes)?;
    let redactor = match &cfg.redact_query_params {
        Some(names) => Redactor::new(names.iter().map(String::as_str)),
        None => Redactor::default(),
    };
    let export = &cfg.export;
    let stats = ExportStats::new();
    let sink = SinkFile::new(&cfg.sink_path);

    let mut tracer_builder = SdkTracerProvider::builder()
        .with_sampler(cfg.sampling.sampler())
        .with_resource(cfg.resource.clone());
    let mut meter_builder = SdkMeterProvider::builder().with_resource(cfg.resource.clone());
    if !export.disabled {
        tracer_builder = match &export.traces {
            Some(s) => {
                let exporter = otlp::span_exporter(s, Arc::clone(&stats)).map_err(|source| {
                    TelemetryError::OtlpExporter {
                        signal: "traces",
                        endpoint: s.endpoint.clone(),
                        source,
                    }
                })?;
                tracer_builder.with_span_processor(processor(exporter, cfg, &stats, &runtime)?)
            }
            None => {
                let exporter = Counted::new(
                    SinkSpanExporter::new(Arc::clone(&sink)),
                    ExportSignal::Spans,
                    SINK_SPAN_EXPORTER_TYPE,
                    Arc::clone(&stats),
                );
                tracer_builder.with_span_processor(processor(exporter, cfg, &stats, &runtime)?)
            }
        };
        meter_builder = match &export.metrics {
            Some(s) => {
                let exporter = otlp::metric_exporter(
                    s,
                    export.temporality,
                    export.metric_export_timeout,
                    Arc::clone(&stats),
                )
                .map_err(|source| TelemetryError::OtlpExporter {
                    signal: "metrics",
                    endpoint: s.endpoint.clone(),
                    source,
                })?;
                meter_builder.with_reader(periodic(exporter, export))
            }
            None => {
                let exporter = Counted::new(
                    SinkMetricExporter::new(Arc::clone(&sink)),
                    ExportSignal::Metrics,
                    SINK_METRIC_EXPORTER_TYPE,
                    Arc::clone(&stats),
                )
                .with_temporality(otlp::temporality(export.temporality));
                meter_builder.with_reader(periodic(exporter, export))
            }
        };
    }
    if let Some(prometheus) = &cfg.prometheus {
        meter_builder = meter_builder.with_reader(prometheus.reader());
    }
    let tracer_provider = tracer_builder.build();
    let meter_provider = meter_builder.build();
    stats.register(&meter_provider.meter(SELF_METER));

    let summary = Arc::new(Summary::new());
    let telemetry = Telemetry::with_routes(
        &tracer_provider,
        &meter_provider,
        Arc::clone(&summary),
        redactor,
        routes,
    );
    let stop = CancellationToken::new();
    let task = cfg.summary_interval.map(|period| {
        runtime.spawn(summary_loop(
            Arc::clone(&summary),
            period.max(Duration::from_millis(100)),
            stop.clone(),
        ))
    });
    Ok((
        telemetry,
        TelemetryGuard {
            tracer_provider,
            meter_provider,
            export_stats: stats,
            span_shutdown_timeout: export.batch.export_timeout,
            summary,
            stop,
            task,
        },
    ))
}

fn processor<E: SpanExporter + 'static>(
    exporter: E,
    cfg: &TelemetryConfig,
    stats: &Arc<ExportStats>,
    runtime: &tokio::runtime::Handle,
) -> Result<BoundedBatchProcessor<E>, TelemetryError> {
    BoundedBatchProcessor::new(
        exporter,
        cfg.export.batch,
        Arc::clone(stats),
        runtime.clone(),
    )
    .map_err(TelemetryError::SpanWorker)
}

fn periodic<M: PushMetricExporter>(exporter: M, export: &ExportSettings) -> PeriodicReader<M> {
    PeriodicReader::builder(exporter)
        .with_interval(export.metric_export_interval)
        .build()
}

async fn summary_loop(summary: Arc<Summary>, period: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {
                if let Some(report) = summary.take_interval_report() {
                    print_report(&report);
                }
            }
        }
    }
}

impl TelemetryGuard {
    /// The per-destination summary (for a `/stats` endpoint).
    pub fn summary(&self) -> &Arc<Summary> {
        &self.summary
    }

    /// Export counters (queue depth, drops, exported and failed spans and points).
    pub fn export_stats(&self) -> Arc<ExportStats> {
        Arc::clone(&self.export_stats)
    }

    /// The meter provider, to register more instruments (e.g. the sidecar's own).
    pub fn meter_provider(&self) -> &SdkMeterProvider {
        &self.meter_provider
    }

    /// The tracer provider.
    pub fn tracer_provider(&self) -> &SdkTracerProvider {
        &self.tracer_provider
    }

    /// Stops the summary task, flushes and shuts down spans and metrics (the SDK's blocking
    /// calls run on a blocking thread, so the runtime keeps driving the exporters), then
    /// prints the final summary. The span flush is bounded by `OTEL_BSP_EXPORT_TIMEOUT`, the
    /// final metric export by `OTEL_METRIC_EXPORT_TIMEOUT` (and the SDK reader's own 5 s);
    /// what is not exported by then is lost and reported as an error.
    pub async fn shutdown(mut self) -> Result<(), TelemetryError> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            // The loop only returns; a join error means it panicked, which changes nothing here.
            let _ = task.await;
        }
        let tp = self.tracer_provider.clone();
        let mp = self.meter_provider.clone();
        let timeout = self.span_shutdown_timeout;
        let (traces, metrics) =
            tokio::task::spawn_blocking(move || (tp.shutdown_with_timeout(timeout), mp.shutdown()))
                .await?;
        print_report(&self.summary.final_report());
        traces.map_err(|source| TelemetryError::Shutdown {
            signal: "traces",
            source,
        })?;
        metrics.map_err(|source| TelemetryError::Shutdown {
            signal: "metrics",
            source,
        })?;
        Ok(())
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::{Instant, SystemTime};

    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use sidecar_tests::otlp::{MetricKind, OtlpReceiver};
    use sidecar_tests::tempdir::TempDir;

    use super::*;
    use crate::export::config::{
        BatchSettings, Compression, OtlpProtocol, SignalSettings, TemporalityPreference,
    };
    use crate::telemetry::{
        ConnectionProtocol, HttpRequestEnd, HttpRequestStart, HttpVersion, TcpConnectionRecord,
    };

    const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
    const PARENT_ID: &str = "b7ad6b7169203331";
    const WAIT: Duration = Duration::from_secs(15);

    fn config(endpoint: Option<String>, sink_path: PathBuf) -> TelemetryConfig {
        let signal = endpoint.map(|endpoint| SignalSettings {
            endpoint,
            protocol: OtlpProtocol::Grpc,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            compression: Compression::None,
            tls: None,
        });
        TelemetryConfig {
            export: ExportSettings {
                disabled: false,
                traces: signal.clone(),
                metrics: signal,
                temporality: TemporalityPreference::Cumulative,
                metric_export_interval: Duration::from_millis(200),
                metric_export_timeout: Duration::from_secs(10),
                batch: BatchSettings {
                    schedule_delay: Duration::from_millis(100),
                    ..BatchSettings::default()
                },
            },
            resource: Resource::builder()
                .with_service_name("pipeline-test")
                .build(),
            prometheus: None,
            sink_path,
            summary_interval: Some(Duration::from_millis(100)),
            sampling: SamplingConfig::default(),
            routes: vec!["/orders/{id}".into()],
            max_routes: 100,
            redact_query_params: None,
        }
    }

    /// One GET to `orders.svc:8080` (destination 10.1.0.5:8080) with an incoming sampled
    /// traceparent and a secret query parameter, plus one opaque connection.
    fn traffic(t: &Telemetry) -> String {
        let incoming = format!("00-{TRACE_ID}-{PARENT_ID}-01");
        let start = SystemTime::now();
        let req = t.client_request_start(&HttpRequestStart {
            method: "GET",
            target: "/orders?api_key=k3y&limit=5",
            host: Some("orders.svc:8080"),
            version: HttpVersion::Http11,
            destination: "10.1.0.5:8080".parse().unwrap(),
            traceparent: Some(&incoming),
            tracestate: None,
            start,
            reused_connection: false,
        });
        let outgoing = req.traceparent().unwrap().to_owned();
        t.client_request_end(
            req,
            HttpRequestEnd {
                status: Some(200),
                request_body_bytes: 0,
                response_body_bytes: 512,
                error: None,
                end: start + Duration::from_millis(30),
            },
        );
        t.tcp_connection(&TcpConnectionRecord {
            destination: "10.1.0.6:6379".parse().unwrap(),
            bytes_sent: 64,
            bytes_received: 128,
            duration: Duration::from_millis(80),
            protocol: ConnectionProtocol::Opaque,
            error: None,
        });
        outgoing
    }

    #[test]
    fn init_outside_a_runtime_is_an_error() {
        let dir = TempDir::create("pipeline-no-runtime").unwrap();
        let err = init(&config(None, dir.join("t.jsonl"))).unwrap_err();
        assert!(matches!(err, TelemetryError::NoRuntime), "{err}");
    }

    #[tokio::test]
    async fn invalid_endpoint_is_an_error() {
        let dir = TempDir::create("pipeline-bad-endpoint").unwrap();
        let err = init(&config(Some("not a uri".into()), dir.join("t.jsonl"))).unwrap_err();
        assert!(
            matches!(
                err,
                TelemetryError::OtlpExporter {
                    signal: "traces",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn otlp_export_reaches_a_real_receiver() {
        let rx = OtlpReceiver::start().await.unwrap();
        let dir = TempDir::create("pipeline-otlp").unwrap();
        let sink = dir.join("unused.jsonl");
        let (t, guard) = init(&config(Some(rx.endpoint()), sink.clone())).unwrap();
        let outgoing = traffic(&t);

        // The batch span processor (100 ms delay) and the periodic reader (200 ms) export
        // without any flush.
        let spans = rx
            .wait_for_spans(WAIT, 1, |s| s.is_client())
            .await
            .expect("no CLIENT span arrived");
        let s = &spans[0];
        assert_eq!(s.name, "GET");
        assert_eq!(s.service_name(), Some("pipeline-test"));
        assert_eq!(s.scope, "sidecar");
        assert_eq!(s.trace_id, TRACE_ID);
        assert_eq!(s.parent_span_id, PARENT_ID);
        assert_eq!(outgoing, s.traceparent());
        assert_eq!(s.attributes.str("http.request.method"), Some("GET"));
        assert_eq!(s.attributes.str("server.address"), Some("orders.svc"));
        assert_eq!(s.attributes.int("server.port"), Some(8080));
        assert_eq!(
            s.attributes.str("url.full"),
            Some("http://orders.svc:8080/orders?api_key=REDACTED&limit=5")
        );
        assert_eq!(s.attributes.str("network.peer.address"), Some("10.1.0.5"));
        assert_eq!(s.attributes.int("http.response.status_code"), Some(200));
        assert_eq!(s.attributes.int("http.response.body.size"), Some(512));
        assert_eq!(s.status_code, 0, "unset");
        assert!(
            s.resource.contains("telemetry.sdk.name"),
            "SDK default resource"
        );

        let m = rx
            .wait_for_metric(WAIT, "http.client.request.duration", |p| {
                p.value.count() == Some(1)
            })
            .await
            .expect("no duration histogram arrived");
        assert_eq!(m.unit, "s");
        assert_eq!(m.kind, MetricKind::Histogram);
        assert_eq!(m.service_name(), Some("pipeline-test"));
        let p = &m.points[0];
        assert_eq!(p.attributes.str("http.request.method"), Some("GET"));
        assert_eq!(p.attributes.int("http.response.status_code"), Some(200));
        assert_eq!(p.attributes.str("server.address"), Some("orders.svc"));
        assert_eq!(p.attributes.int("server.port"), Some(8080));
        assert_eq!(p.attributes.str("url.scheme"), Some("http"));
        assert_eq!(p.attributes.str("network.protocol.version"), Some("1.1"));
        assert!(!p.attributes.contains("error.type"));
        let sum = p.value.as_f64().unwrap();
        assert!((sum - 0.030).abs() < 1e-6, "{sum}");

        let io = rx
            .wait_for_metric(WAIT, "sidecar.proxy.connection.io", |p| {
                p.attributes.str("network.io.direction") == Some("receive")
            })
            .await
            .expect("no connection io counter arrived");
        assert_eq!(io.unit, "By");
        assert_eq!(io.kind, MetricKind::Sum { monotonic: true });
        let recv = io
            .points
            .iter()
            .find(|p| p.attributes.str("network.io.direction") == Some("receive"))
            .unwrap();
        assert_eq!(recv.value.as_f64(), Some(128.0));
        assert_eq!(recv.attributes.str("sidecar.protocol"), Some("opaque"));

        // Cumulative temporality: every later export carries the same single request.
        assert_eq!(guard.summary().snapshot().destinations.len(), 2);
        tokio::time::timeout(WAIT, guard.shutdown())
            .await
            .expect("shutdown hung")
            .unwrap();
        let last = rx.latest_metric("http.client.request.duration").unwrap();
        assert_eq!(last.points[0].value.count(), Some(1));
        assert!(
            !sink.exists(),
            "the sink is not used when an endpoint is set"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sink_pipeline_writes_lines_and_shutdown_flushes() {
        let dir = TempDir::create("pipeline-sink").unwrap();
        let sink = dir.join("out/telemetry.jsonl");
        let mut cfg = config(None, sink.clone());
        // Long intervals: only shutdown's flush writes.
        cfg.export.metric_export_interval = Duration::from_secs(3600);
        cfg.export.batch.schedule_delay = Duration::from_secs(3600);
        let (t, guard) = init(&cfg).unwrap();
        let stats = guard.export_stats();
        traffic(&t);
        tokio::time::timeout(WAIT, guard.shutdown())
            .await
            .expect("shutdown hung")
            .unwrap();

        let text = std::fs::read_to_string(&sink).unwrap();
        assert!(!text.contains("k3y"), "secret leaked: {text}");
        let mut spans = 0;
        let mut metric_names = Vec::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v.get("resourceSpans").is_some() {
                let req: ExportTraceServiceRequest = serde_json::from_str(line).unwrap();
                spans += req.resource_spans[0].scope_spans[0].spans.len();
            } else {
                let req: ExportMetricsServiceRequest = serde_json::from_str(line).unwrap();
                for sm in &req.resource_metrics[0].scope_metrics {
                    metric_names.extend(sm.metrics.iter().map(|m| m.name.clone()));
                }
            }
        }
        assert_eq!(spans, 1, "{text}");
        metric_names.sort();
        metric_names.dedup();
        let (sdk, app): (Vec<_>, Vec<_>) = metric_names
            .into_iter()
            .partition(|n| n.starts_with("otel.sdk."));
        assert_eq!(
            sdk,
            [
                "otel.sdk.exporter.metric_data_point.exported",
                "otel.sdk.exporter.operation.duration",
                "otel.sdk.exporter.span.exported",
                "otel.sdk.processor.span.processed",
                "otel.sdk.processor.span.queue.capacity",
                "otel.sdk.processor.span.queue.size",
            ]
        );
        let s = stats.snapshot();
        assert_eq!(
            (s.spans_exported, s.spans_dropped, s.spans_failed),
            (1, 0, 0)
        );
        assert_eq!(s.queue_capacity, 2048);
        assert!(s.metric_points_exported > 0, "{s:?}");
        assert!(
            text.contains("sidecar_file_span_exporter"),
            "component type: {text}"
        );
        assert_eq!(
            app,
            [
                "http.client.active_requests",
                "http.client.request.body.size",
                "http.client.request.duration",
                "http.client.response.body.size",
                "sidecar.proxy.connection.duration",
                "sidecar.proxy.connection.io",
            ]
        );
        assert!(text.contains("\"pipeline-test\""), "service.name: {text}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn collector_outage_never_blocks_requests_or_shutdown() {
        // A port with nothing listening: every export is refused.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let endpoint = format!("http://{}", SocketAddr::from(([127, 0, 0, 1], port)));
        let dir = TempDir::create("pipeline-outage").unwrap();
        let mut cfg = config(Some(endpoint), dir.join("t.jsonl"));
        for s in [&mut cfg.export.traces, &mut cfg.export.metrics] {
            s.as_mut().unwrap().timeout = Duration::from_millis(500);
        }
        cfg.export.batch.export_timeout = Duration::from_secs(2);
        cfg.export.metric_export_timeout = Duration::from_secs(1);
        let (t, guard) = init(&cfg).unwrap();
        let stats = guard.export_stats();
        let started = Instant::now();
        for _ in 0..2000 {
            traffic(&t);
        }
        let took = started.elapsed();
        // Recording never waits for the network; this bound only catches a blocking path.
        assert!(
            took < Duration::from_secs(10),
            "2000 requests took {took:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let result = tokio::time::timeout(Duration::from_secs(30), guard.shutdown())
            .await
            .expect("shutdown hung while the collector was down");
        // Giving up on what could not be exported is reported, not hidden.
        assert!(
            matches!(result, Ok(()) | Err(TelemetryError::Shutdown { .. })),
            "{result:?}"
        );
        // 2000 CLIENT spans: exported never, failed or dropped, queue bounded.
        let s = stats.snapshot();
        assert_eq!(s.spans_exported, 0, "{s:?}");
        assert!(s.spans_failed > 0, "{s:?}");
        assert!(
            s.spans_failed + s.spans_dropped + s.queue_size <= 2000,
            "{s:?}"
        );
        assert!(s.queue_size <= s.queue_capacity, "{s:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sdk_disabled_exports_nothing() {
        let dir = TempDir::create("pipeline-disabled").unwrap();
        let sink = dir.join("t.jsonl");
        let mut cfg = config(None, sink.clone());
        cfg.export.disabled = true;
        let (t, guard) = init(&cfg).unwrap();
        let stats = guard.export_stats();
        traffic(&t);
        tokio::time::timeout(WAIT, guard.shutdown())
            .await
            .expect("shutdown hung")
            .unwrap();
        assert!(
            !sink.exists(),
            "nothing is written when the SDK is disabled"
        );
        assert_eq!(stats.snapshot().spans_exported, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn traces_over_http_protobuf_and_metrics_to_the_sink() {
        let rx = OtlpReceiver::builder().http(true).start().await.unwrap();
        let dir = TempDir::create("pipeline-mixed").unwrap();
        let sink = dir.join("t.jsonl");
        let mut cfg = config(None, sink.clone());
        cfg.export.traces = Some(SignalSettings {
            endpoint: format!("{}/v1/traces", rx.http_endpoint()),
            protocol: OtlpProtocol::HttpProtobuf,
            headers: vec![("authorization".into(), "Bearer t0k".into())],
            timeout: Duration::from_secs(5),
            compression: Compression::Gzip,
            tls: None,
        });
        cfg.export.temporality = TemporalityPreference::Delta;
        let (t, guard) = init(&cfg).unwrap();
        traffic(&t);
        let spans = rx
            .wait_for_spans(WAIT, 1, |s| s.is_client())
            .await
            .expect("no span over OTLP/HTTP");
        assert_eq!(spans[0].service_name(), Some("pipeline-test"));
        let req = &rx.requests()[0];
        assert!(req.gzip);
        assert_eq!(req.header("authorization"), Some("Bearer t0k"));
        tokio::time::timeout(WAIT, guard.shutdown())
            .await
            .expect("shutdown hung")
            .unwrap();
        assert!(rx.metrics().is_empty(), "metrics go to the sink");
        let text = std::fs::read_to_string(&sink).unwrap();
        assert!(text.contains("resourceMetrics"), "{text}");
        assert!(
            !text.contains("resourceSpans"),
            "spans go to the collector: {text}"
        );
        // Delta temporality reaches the sink exporter (OTLP enum value 1).
        assert!(text.contains("\"aggregationTemporality\":1"), "{text}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prometheus_reader_collects_even_when_disabled() {
        let dir = TempDir::create("pipeline-prometheus").unwrap();
        let mut cfg = config(None, dir.join("t.jsonl"));
        cfg.export.disabled = true;
        let prometheus = PrometheusReader::new();
        cfg.prometheus = Some(prometheus.clone());
        let (t, guard) = init(&cfg).unwrap();
        traffic(&t);
        let text = prometheus.render().unwrap();
        assert!(text.contains("http_client_request_duration"), "{text}");
        assert!(
            text.contains("otel_sdk_processor_span_queue_capacity"),
            "{text}"
        );
        tokio::time::timeout(WAIT, guard.shutdown())
            .await
            .expect("shutdown hung")
            .unwrap();
    }
}

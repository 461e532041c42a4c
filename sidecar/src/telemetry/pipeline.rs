//! Telemetry lifecycle: builds the SDK providers (OTLP gRPC or the local sink), the resource,
//! the sampler and the periodic summary task, and flushes everything on shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanExporter,
};
use opentelemetry_sdk::Resource;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::route::{RouteError, RouteTable};
use super::sampling::SamplingConfig;
use super::url::Redactor;
use super::Telemetry;
use crate::export::otlp;
use crate::export::sink::{SinkFile, SinkMetricExporter, SinkSpanExporter};
use crate::export::summary::{print_report, Summary};

/// How the telemetry pipeline is set up (the CLI fills it from flags and `OTEL_*` variables).
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// `service.name` of the resource; `None` keeps the SDK default
    /// (`OTEL_SERVICE_NAME`, else `unknown_service:<executable>`).
    pub service_name: Option<String>,
    /// OTLP gRPC endpoint, e.g. `http://collector:4317`; `None` selects the local sink.
    pub otlp_endpoint: Option<String>,
    /// Period of the metric reader (`OTEL_METRIC_EXPORT_INTERVAL`).
    pub metric_export_interval: Duration,
    /// Delay of the batch span processor (`OTEL_BSP_SCHEDULE_DELAY`).
    pub span_schedule_delay: Duration,
    /// Default sink file (OTLP/JSON lines, appended) used when there is no endpoint.
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
    /// The OTLP exporter could not be built (usually an invalid endpoint).
    #[error("cannot build the OTLP {signal} exporter for {endpoint:?}: {source}")]
    OtlpExporter {
        /// `traces` or `metrics`.
        signal: &'static str,
        /// The configured endpoint.
        endpoint: String,
        /// What the exporter builder said.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
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
    summary: Arc<Summary>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// Builds the pipeline. Must run inside a tokio runtime (the gRPC channels and the summary task
/// live on it).
pub fn init(cfg: &TelemetryConfig) -> Result<(Telemetry, TelemetryGuard), TelemetryError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    let routes = RouteTable::new(&cfg.routes, cfg.max_routes)?;
    let redactor = match &cfg.redact_query_params {
        Some(names) => Redactor::new(names.iter().map(String::as_str)),
        None => Redactor::default(),
    };
    let resource = resource(cfg.service_name.as_deref());
    let (tracer_provider, meter_provider) = match cfg.otlp_endpoint.as_deref() {
        Some(endpoint) => {
            let build_err = |signal| {
                move |source| TelemetryError::OtlpExporter {
                    signal,
                    endpoint: endpoint.to_owned(),
                    source,
                }
            };
            let spans = otlp::span_exporter(endpoint).map_err(build_err("traces"))?;
            let metrics = otlp::metric_exporter(endpoint).map_err(build_err("metrics"))?;
            providers(spans, metrics, cfg, resource)
        }
        None => {
            let file = SinkFile::new(&cfg.sink_path);
            providers(
                SinkSpanExporter::new(Arc::clone(&file)),
                SinkMetricExporter::new(file),
                cfg,
                resource,
            )
        }
    };
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
            summary,
            stop,
            task,
        },
    ))
}

/// The SDK default resource (service name from `OTEL_SERVICE_NAME` or the executable,
/// `telemetry.sdk.*`, `OTEL_RESOURCE_ATTRIBUTES`) with the configured service name on top.
fn resource(service_name: Option<&str>) -> Resource {
    let builder = Resource::builder();
    match service_name.filter(|s| !s.is_empty()) {
        Some(name) => builder.with_service_name(name.to_owned()).build(),
        None => builder.build(),
    }
}

fn providers<S, M>(
    spans: S,
    metrics: M,
    cfg: &TelemetryConfig,
    resource: Resource,
) -> (SdkTracerProvider, SdkMeterProvider)
where
    S: SpanExporter + 'static,
    M: PushMetricExporter,
{
    let batch = BatchConfigBuilder::default()
        .with_scheduled_delay(cfg.span_schedule_delay)
        .build();
    let tracer_provider = SdkTracerProvider::builder()
        .with_span_processor(
            BatchSpanProcessor::builder(spans)
                .with_batch_config(batch)
                .build(),
        )
        .with_sampler(cfg.sampling.sampler())
        .with_resource(resource.clone())
        .build();
    let reader = PeriodicReader::builder(metrics)
        .with_interval(cfg.metric_export_interval)
        .build();
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource)
        .build();
    (tracer_provider, meter_provider)
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

    /// Stops the summary task, flushes and shuts down spans and metrics (the SDK's blocking
    /// calls run on a blocking thread, so the runtime keeps driving the gRPC channels), then
    /// prints the final summary.
    pub async fn shutdown(mut self) -> Result<(), TelemetryError> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            // The loop only returns; a join error means it panicked, which changes nothing here.
            let _ = task.await;
        }
        let tp = self.tracer_provider.clone();
        let mp = self.meter_provider.clone();
        let (traces, metrics) =
            tokio::task::spawn_blocking(move || (tp.shutdown(), mp.shutdown())).await?;
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
    use crate::telemetry::{
        ConnectionProtocol, HttpRequestEnd, HttpRequestStart, HttpVersion, TcpConnectionRecord,
    };

    const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
    const PARENT_ID: &str = "b7ad6b7169203331";
    const WAIT: Duration = Duration::from_secs(15);

    fn config(endpoint: Option<String>, sink_path: PathBuf) -> TelemetryConfig {
        TelemetryConfig {
            service_name: Some("pipeline-test".into()),
            otlp_endpoint: endpoint,
            metric_export_interval: Duration::from_millis(200),
            span_schedule_delay: Duration::from_millis(100),
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
        cfg.metric_export_interval = Duration::from_secs(3600);
        cfg.span_schedule_delay = Duration::from_secs(3600);
        let (t, guard) = init(&cfg).unwrap();
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
        assert_eq!(
            metric_names,
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
        let (t, guard) = init(&config(Some(endpoint), dir.join("t.jsonl"))).unwrap();
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
        tokio::time::timeout(Duration::from_secs(60), guard.shutdown())
            .await
            .expect("shutdown hung while the collector was down")
            .unwrap();
    }
}

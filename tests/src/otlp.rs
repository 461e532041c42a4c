//! In-test OTLP gRPC receiver: a tonic server for the trace and metrics services that records
//! every export and offers flattened, easy-to-assert views of spans and metrics.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

/// Largest export request the receiver accepts (the tonic default of 4 MiB is too small for
/// big batches).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How often [`OtlpReceiver::wait_for`] re-checks its predicate when no export arrives.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// One attribute value, flattened from OTLP's `AnyValue`.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    /// A string value.
    Str(String),
    /// A 64-bit integer value.
    Int(i64),
    /// A floating-point value.
    Double(f64),
    /// A boolean value.
    Bool(bool),
    /// Arrays, key-value lists and bytes, rendered with `Debug` (tests rarely need them).
    Other(String),
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Str(s) => f.write_str(s),
            Self::Int(i) => write!(f, "{i}"),
            Self::Double(d) => write!(f, "{d}"),
            Self::Bool(b) => write!(f, "{b}"),
            Self::Other(o) => f.write_str(o),
        }
    }
}

/// A set of attributes keyed by name (a later duplicate key wins).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attributes(pub BTreeMap<String, AttrValue>);

impl Attributes {
    /// Flattens OTLP key-values.
    pub fn from_proto(kvs: &[KeyValue]) -> Self {
        let mut map = BTreeMap::new();
        for kv in kvs {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => AttrValue::Str(s.clone()),
                Some(any_value::Value::IntValue(i)) => AttrValue::Int(*i),
                Some(any_value::Value::DoubleValue(d)) => AttrValue::Double(*d),
                Some(any_value::Value::BoolValue(b)) => AttrValue::Bool(*b),
                Some(other) => AttrValue::Other(format!("{other:?}")),
                None => AttrValue::Other(String::new()),
            };
            map.insert(kv.key.clone(), value);
        }
        Self(map)
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&AttrValue> {
        self.0.get(key)
    }

    /// The value of `key` if it is a string.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.0.get(key) {
            Some(AttrValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The value of `key` if it is an integer (or a string holding one).
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.0.get(key) {
            Some(AttrValue::Int(i)) => Some(*i),
            Some(AttrValue::Str(s)) => s.parse().ok(),
            _ => None,
        }
    }

    /// The value of `key` rendered as text, whatever its type.
    pub fn text(&self, key: &str) -> Option<String> {
        self.0.get(key).map(ToString::to_string)
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// Number of attributes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no attributes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Reads a string attribute from raw OTLP key-values.
pub fn attr_str<'a>(kvs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    kvs.iter().rev().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    })
}

/// Reads an integer attribute from raw OTLP key-values.
pub fn attr_int(kvs: &[KeyValue], key: &str) -> Option<i64> {
    kvs.iter().rev().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::IntValue(i) => Some(*i),
            _ => None,
        }
    })
}

/// A received span with its resource and scope, ids rendered as lowercase hex.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedSpan {
    /// Resource attributes of the export the span came in (e.g. `service.name`).
    pub resource: Attributes,
    /// Instrumentation scope name.
    pub scope: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits, or empty for a root span.
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// Span kind.
    pub kind: SpanKind,
    /// Span attributes.
    pub attributes: Attributes,
    /// Status code (0 unset, 1 ok, 2 error).
    pub status_code: i32,
    /// Start time, nanoseconds since the Unix epoch.
    pub start_unix_nano: u64,
    /// End time, nanoseconds since the Unix epoch.
    pub end_unix_nano: u64,
}

impl ReceivedSpan {
    /// Whether this is a CLIENT span.
    pub fn is_client(&self) -> bool {
        self.kind == SpanKind::Client
    }

    /// Whether this is a SERVER span.
    pub fn is_server(&self) -> bool {
        self.kind == SpanKind::Server
    }

    /// `service.name` of the span's resource.
    pub fn service_name(&self) -> Option<&str> {
        self.resource.str("service.name")
    }

    /// The W3C `traceparent` header value this span would propagate (sampled flag set).
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }
}

/// Kind of a received metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Gauge.
    Gauge,
    /// Sum (counter or up-down counter).
    Sum {
        /// Whether the sum only grows.
        monotonic: bool,
    },
    /// Explicit-bucket histogram.
    Histogram,
    /// Exponential histogram.
    ExponentialHistogram,
    /// Summary.
    Summary,
    /// No data field set.
    Empty,
}

/// The value of one data point.
#[derive(Clone, Debug, PartialEq)]
pub enum PointValue {
    /// Integer gauge or sum value.
    Int(i64),
    /// Floating-point gauge or sum value.
    Double(f64),
    /// Histogram-like point (explicit or exponential histogram, summary).
    Histogram {
        /// Number of recorded measurements.
        count: u64,
        /// Sum of recorded measurements, if reported.
        sum: Option<f64>,
        /// Smallest measurement, if reported.
        min: Option<f64>,
        /// Largest measurement, if reported.
        max: Option<f64>,
    },
    /// A number data point without a value.
    Missing,
}

impl PointValue {
    /// Integer or floating-point value as `f64` (histograms: their sum).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Int(i) => Some(*i as f64),
            Self::Double(d) => Some(*d),
            Self::Histogram { sum, .. } => *sum,
            Self::Missing => None,
        }
    }

    /// Measurement count for histogram-like points.
    pub fn count(&self) -> Option<u64> {
        match self {
            Self::Histogram { count, .. } => Some(*count),
            _ => None,
        }
    }
}

/// One data point with its attributes.
#[derive(Clone, Debug, PartialEq)]
pub struct DataPoint {
    /// Point attributes.
    pub attributes: Attributes,
    /// Point value.
    pub value: PointValue,
    /// Timestamp, nanoseconds since the Unix epoch.
    pub time_unix_nano: u64,
}

/// A received metric with its resource and scope.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedMetric {
    /// Resource attributes of the export the metric came in.
    pub resource: Attributes,
    /// Instrumentation scope name.
    pub scope: String,
    /// Metric name.
    pub name: String,
    /// Unit (UCUM), e.g. `s` or `By`.
    pub unit: String,
    /// Description.
    pub description: String,
    /// Kind of the metric.
    pub kind: MetricKind,
    /// Data points.
    pub points: Vec<DataPoint>,
}

impl ReceivedMetric {
    /// `service.name` of the metric's resource.
    pub fn service_name(&self) -> Option<&str> {
        self.resource.str("service.name")
    }
}

/// Everything received so far.
#[derive(Default)]
struct Store {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    notify: Arc<Notify>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the Vecs inconsistent; keep going.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl TraceService for Shared {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let req = request.into_inner();
        tracing::debug!(
            resources = req.resource_spans.len(),
            "otlp receiver: traces"
        );
        self.lock().traces.push(req);
        self.notify.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Shared {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let req = request.into_inner();
        tracing::debug!(
            resources = req.resource_metrics.len(),
            "otlp receiver: metrics"
        );
        self.lock().metrics.push(req);
        self.notify.notify_waiters();
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running OTLP gRPC receiver. Stops when dropped.
///
/// The server runs as a task on the current tokio runtime: tests that block their thread
/// (e.g. `std::process::Command::output`) should use `#[tokio::test(flavor = "multi_thread")]`.
pub struct OtlpReceiver {
    addr: SocketAddr,
    shared: Shared,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl fmt::Debug for OtlpReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpReceiver")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl OtlpReceiver {
    /// Starts a receiver on `127.0.0.1` with a free port.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a receiver on `addr` (port 0 picks a free port).
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the OTLP receiver on {addr}"))?;
        Self::serve(listener)
    }

    /// Starts a receiver on an already bound listener, e.g. one created inside a network
    /// namespace with [`crate::Netns::enter`]. Must be called within a tokio runtime.
    pub fn from_std_listener(listener: std::net::TcpListener) -> anyhow::Result<Self> {
        listener
            .set_nonblocking(true)
            .context("making the OTLP receiver's listener non-blocking")?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .context("registering the OTLP receiver's listener with tokio")?;
        Self::serve(listener)
    }

    fn serve(listener: tokio::net::TcpListener) -> anyhow::Result<Self> {
        let addr = listener
            .local_addr()
            .context("reading the OTLP receiver's address")?;
        let shared = Shared {
            store: Arc::default(),
            notify: Arc::new(Notify::new()),
        };
        let traces =
            TraceServiceServer::new(shared.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let metrics =
            MetricsServiceServer::new(shared.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = oneshot::channel::<()>();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(traces)
                .add_service(metrics)
                .serve_with_incoming_shutdown(incoming, async {
                    // Either an explicit shutdown or the sender being dropped ends the server.
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "otlp receiver stopped with an error");
            }
        });
        tracing::debug!(%addr, "otlp receiver listening");
        Ok(Self {
            addr,
            shared,
            shutdown: Some(tx),
            task,
        })
    }

    /// The socket address the receiver listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The gRPC endpoint URL, `http://127.0.0.1:PORT` (brackets for IPv6).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// All raw trace export requests received so far.
    pub fn trace_requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.shared.lock().traces.clone()
    }

    /// All raw metrics export requests received so far.
    pub fn metric_requests(&self) -> Vec<ExportMetricsServiceRequest> {
        self.shared.lock().metrics.clone()
    }

    /// Number of trace and metrics export requests received so far.
    pub fn request_counts(&self) -> (usize, usize) {
        let store = self.shared.lock();
        (store.traces.len(), store.metrics.len())
    }

    /// All spans received so far, flattened, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let store = self.shared.lock();
        let mut out = Vec::new();
        for req in &store.traces {
            for rs in &req.resource_spans {
                let resource = rs
                    .resource
                    .as_ref()
                    .map(|r| Attributes::from_proto(&r.attributes))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    let scope = ss
                        .scope
                        .as_ref()
                        .map(|s| s.name.clone())
                        .unwrap_or_default();
                    for span in &ss.spans {
                        out.push(ReceivedSpan {
                            resource: resource.clone(),
                            scope: scope.clone(),
                            trace_id: hex::encode(&span.trace_id),
                            span_id: hex::encode(&span.span_id),
                            parent_span_id: hex::encode(&span.parent_span_id),
                            name: span.name.clone(),
                            kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                            attributes: Attributes::from_proto(&span.attributes),
                            status_code: span.status.as_ref().map_or(0, |s| s.code),
                            start_unix_nano: span.start_time_unix_nano,
                            end_unix_nano: span.end_time_unix_nano,
                        });
                    }
                }
            }
        }
        out
    }

    /// All CLIENT spans received so far.
    pub fn client_spans(&self) -> Vec<ReceivedSpan> {
        self.spans().into_iter().filter(|s| s.is_client()).collect()
    }

    /// All metrics received so far, one entry per metric per export, in arrival order.
    ///
    /// With cumulative temporality a later entry of the same name supersedes earlier ones; see
    /// [`OtlpReceiver::latest_metric`].
    pub fn metrics(&self) -> Vec<ReceivedMetric> {
        let store = self.shared.lock();
        let mut out = Vec::new();
        for req in &store.metrics {
            for rm in &req.resource_metrics {
                let resource = rm
                    .resource
                    .as_ref()
                    .map(|r| Attributes::from_proto(&r.attributes))
                    .unwrap_or_default();
                for sm in &rm.scope_metrics {
                    let scope = sm
                        .scope
                        .as_ref()
                        .map(|s| s.name.clone())
                        .unwrap_or_default();
                    for m in &sm.metrics {
                        let (kind, points) = flatten_metric_data(m.data.as_ref());
                        out.push(ReceivedMetric {
                            resource: resource.clone(),
                            scope: scope.clone(),
                            name: m.name.clone(),
                            unit: m.unit.clone(),
                            description: m.description.clone(),
                            kind,
                            points,
                        });
                    }
                }
            }
        }
        out
    }

    /// All received entries of the metric called `name`.
    pub fn metrics_named(&self, name: &str) -> Vec<ReceivedMetric> {
        self.metrics()
            .into_iter()
            .filter(|m| m.name == name)
            .collect()
    }

    /// The most recently received entry of the metric called `name`.
    pub fn latest_metric(&self, name: &str) -> Option<ReceivedMetric> {
        self.metrics().into_iter().rev().find(|m| m.name == name)
    }

    /// Polls `predicate` until it returns `Some` or `timeout` passes. The predicate runs at once,
    /// after every export received and at least every 50 ms.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut predicate: impl FnMut(&Self) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            if let Some(v) = predicate(self) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let wait = POLL_INTERVAL.min(deadline - now);
            let _ = tokio::time::timeout(wait, notified).await;
        }
    }

    /// Waits for at least `n` spans matching `filter`; returns them all.
    pub async fn wait_for_spans(
        &self,
        timeout: Duration,
        n: usize,
        mut filter: impl FnMut(&ReceivedSpan) -> bool,
    ) -> Option<Vec<ReceivedSpan>> {
        self.wait_for(timeout, |r| {
            let spans: Vec<_> = r.spans().into_iter().filter(|s| filter(s)).collect();
            (spans.len() >= n).then_some(spans)
        })
        .await
    }

    /// Waits for the metric `name` to arrive with a data point matching `filter`; returns the
    /// latest such metric.
    pub async fn wait_for_metric(
        &self,
        timeout: Duration,
        name: &str,
        mut filter: impl FnMut(&DataPoint) -> bool,
    ) -> Option<ReceivedMetric> {
        self.wait_for(timeout, |r| {
            r.metrics_named(name)
                .into_iter()
                .rev()
                .find(|m| m.points.iter().any(&mut filter))
        })
        .await
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Graceful shutdown waits for open connections; abort so the port is freed promptly.
        self.task.abort();
    }
}

fn flatten_metric_data(data: Option<&metric::Data>) -> (MetricKind, Vec<DataPoint>) {
    fn number(p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint) -> DataPoint {
        DataPoint {
            attributes: Attributes::from_proto(&p.attributes),
            value: match p.value {
                Some(number_data_point::Value::AsInt(i)) => PointValue::Int(i),
                Some(number_data_point::Value::AsDouble(d)) => PointValue::Double(d),
                None => PointValue::Missing,
            },
            time_unix_nano: p.time_unix_nano,
        }
    }
    match data {
        Some(metric::Data::Gauge(g)) => (
            MetricKind::Gauge,
            g.data_points.iter().map(number).collect(),
        ),
        Some(metric::Data::Sum(s)) => (
            MetricKind::Sum {
                monotonic: s.is_monotonic,
            },
            s.data_points.iter().map(number).collect(),
        ),
        Some(metric::Data::Histogram(h)) => (
            MetricKind::Histogram,
            h.data_points
                .iter()
                .map(|p| DataPoint {
                    attributes: Attributes::from_proto(&p.attributes),
                    value: PointValue::Histogram {
                        count: p.count,
                        sum: p.sum,
                        min: p.min,
                        max: p.max,
                    },
                    time_unix_nano: p.time_unix_nano,
                })
                .collect(),
        ),
        Some(metric::Data::ExponentialHistogram(h)) => (
            MetricKind::ExponentialHistogram,
            h.data_points
                .iter()
                .map(|p| DataPoint {
                    attributes: Attributes::from_proto(&p.attributes),
                    value: PointValue::Histogram {
                        count: p.count,
                        sum: p.sum,
                        min: p.min,
                        max: p.max,
                    },
                    time_unix_nano: p.time_unix_nano,
                })
                .collect(),
        ),
        Some(metric::Data::Summary(s)) => (
            MetricKind::Summary,
            s.data_points
                .iter()
                .map(|p| DataPoint {
                    attributes: Attributes::from_proto(&p.attributes),
                    value: PointValue::Histogram {
                        count: p.count,
                        sum: Some(p.sum),
                        min: None,
                        max: None,
                    },
                    time_unix_nano: p.time_unix_nano,
                })
                .collect(),
        ),
        None => (MetricKind::Empty, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry::trace::{
        Span as _, SpanKind as OtelSpanKind, Tracer as _, TracerProvider as _,
    };
    use opentelemetry::KeyValue as OtelKeyValue;
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::common::v1::AnyValue;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn kv_str(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..Default::default()
        }
    }

    fn kv_int(key: &str, value: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(value)),
            }),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raw_tonic_client_spans_are_flattened() {
        let rx = OtlpReceiver::start().await.unwrap();
        assert!(rx.endpoint().starts_with("http://127.0.0.1:"));
        let mut client = TraceServiceClient::connect(rx.endpoint()).await.unwrap();
        let span = Span {
            trace_id: vec![0xab; 16],
            span_id: vec![0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08],
            parent_span_id: vec![0xcd; 8],
            name: "GET".into(),
            kind: SpanKind::Client as i32,
            attributes: vec![
                kv_str("url.full", "http://x/y"),
                kv_int("server.port", 8080),
            ],
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv_str("service.name", "raw-test")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        client.export(req).await.unwrap();

        let spans = rx
            .wait_for_spans(Duration::from_secs(5), 1, |_| true)
            .await
            .unwrap();
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(s.trace_id, "ab".repeat(16));
        assert_eq!(s.span_id, "0102030405060708");
        assert_eq!(s.parent_span_id, "cd".repeat(8));
        assert!(s.is_client());
        assert_eq!(s.name, "GET");
        assert_eq!(s.service_name(), Some("raw-test"));
        assert_eq!(s.attributes.str("url.full"), Some("http://x/y"));
        assert_eq!(s.attributes.int("server.port"), Some(8080));
        assert_eq!(s.attributes.text("server.port").as_deref(), Some("8080"));
        assert_eq!(
            s.traceparent(),
            format!("00-{}-0102030405060708-01", "ab".repeat(16))
        );
        assert_eq!(rx.request_counts(), (1, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wait_for_times_out_when_nothing_arrives() {
        let rx = OtlpReceiver::start().await.unwrap();
        let started = Instant::now();
        let got = rx
            .wait_for(Duration::from_millis(200), |r| {
                (!r.spans().is_empty()).then_some(())
            })
            .await;
        assert!(got.is_none());
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn opentelemetry_otlp_exports_arrive() {
        let rx = OtlpReceiver::start().await.unwrap();
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("otlp-receiver-test")
            .build();

        let span_exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(rx.endpoint())
            .build()
            .unwrap();
        let tracer_provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(span_exporter)
            .with_resource(resource.clone())
            .build();
        let tracer = tracer_provider.tracer("receiver-test");
        let mut span = tracer
            .span_builder("POST")
            .with_kind(OtelSpanKind::Client)
            .with_attributes([
                OtelKeyValue::new("http.request.method", "POST"),
                OtelKeyValue::new("http.response.status_code", 201_i64),
            ])
            .start(&tracer);
        let ctx = span.span_context().clone();
        span.end();

        let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(rx.endpoint())
            .build()
            .unwrap();
        let meter_provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_periodic_exporter(metric_exporter)
            .with_resource(resource)
            .build();
        let meter = meter_provider.meter("receiver-test");
        let histogram = meter
            .f64_histogram("http.client.request.duration")
            .with_unit("s")
            .build();
        histogram.record(0.25, &[OtelKeyValue::new("http.request.method", "POST")]);
        histogram.record(0.75, &[OtelKeyValue::new("http.request.method", "POST")]);
        let counter = meter.u64_counter("test.counter").build();
        counter.add(3, &[]);

        // Flushing blocks on the exporter; run it off the async workers.
        tokio::task::spawn_blocking(move || {
            tracer_provider.force_flush().unwrap();
            meter_provider.force_flush().unwrap();
            tracer_provider.shutdown().unwrap();
            meter_provider.shutdown().unwrap();
        })
        .await
        .unwrap();

        let spans = rx
            .wait_for_spans(Duration::from_secs(10), 1, |s| s.name == "POST")
            .await
            .unwrap();
        let s = &spans[0];
        assert!(s.is_client());
        assert_eq!(s.trace_id, ctx.trace_id().to_string());
        assert_eq!(s.span_id, ctx.span_id().to_string());
        assert_eq!(s.parent_span_id, "");
        assert_eq!(s.service_name(), Some("otlp-receiver-test"));
        assert_eq!(s.scope, "receiver-test");
        assert_eq!(s.attributes.str("http.request.method"), Some("POST"));
        assert_eq!(s.attributes.int("http.response.status_code"), Some(201));

        let m = rx
            .wait_for_metric(
                Duration::from_secs(10),
                "http.client.request.duration",
                |p| p.value.count() == Some(2),
            )
            .await
            .unwrap();
        assert_eq!(m.unit, "s");
        assert_eq!(m.kind, MetricKind::Histogram);
        assert_eq!(m.service_name(), Some("otlp-receiver-test"));
        let p = &m.points[0];
        assert_eq!(p.attributes.str("http.request.method"), Some("POST"));
        assert_eq!(p.value.as_f64(), Some(1.0));
        let c = rx.latest_metric("test.counter").unwrap();
        assert_eq!(c.kind, MetricKind::Sum { monotonic: true });
        assert_eq!(c.points[0].value, PointValue::Int(3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_frees_the_port() {
        let rx = OtlpReceiver::start().await.unwrap();
        let addr = rx.addr();
        drop(rx);
        // The listener closes once the aborted task is dropped by the runtime; bounded retries.
        let mut rebound = false;
        for _ in 0..40 {
            if tokio::net::TcpListener::bind(addr).await.is_ok() {
                rebound = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(rebound, "port {addr} still bound after drop");
        let rx2 = OtlpReceiver::start_on(addr).await.unwrap();
        assert_eq!(rx2.addr(), addr);
    }
}

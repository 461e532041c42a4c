//! In-test OTLP receiver: a tonic server for the trace and metrics services (and, optionally,
//! an OTLP/HTTP protobuf server on a second port) that records every export and offers
//! flattened, easy-to-assert views of spans and metrics.
//!
//! [`OtlpReceiver::start`] starts a plain gRPC receiver. [`OtlpReceiver::builder`] adds the
//! OTLP/HTTP server ([`OtlpReceiverBuilder::http`]), TLS for both
//! ([`OtlpReceiverBuilder::tls`], certificates from [`TestCa`]) and client-certificate
//! verification ([`OtlpReceiverBuilder::client_ca`]). Every request's headers (gRPC metadata),
//! whether its body was gzip-compressed and the client certificate it presented are recorded
//! ([`OtlpReceiver::requests`]); [`OtlpReceiver::set_fault`] makes it reject exports
//! (gRPC `UNAVAILABLE` / HTTP 503) until switched back.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http_body_util::BodyExt as _;
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
use prost::Message as _;
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

/// How the receiver answers exports; switch at run time with [`OtlpReceiver::set_fault`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Accept every export.
    #[default]
    None,
    /// Reject every export as temporarily unavailable: gRPC `UNAVAILABLE` (with a
    /// `google.rpc.RetryInfo` detail when `retry_after` is set), HTTP 503 (with `Retry-After`
    /// in whole seconds, rounded up, when set).
    Unavailable {
        /// Delay the server asks the client to wait before retrying.
        retry_after: Option<Duration>,
    },
}

/// Transport an export request came over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP protobuf.
    Http,
}

/// Signal of an export request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// `/v1/traces` or the gRPC trace service.
    Traces,
    /// `/v1/metrics` or the gRPC metrics service.
    Metrics,
}

/// One export request as it arrived (accepted or rejected).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestInfo {
    /// gRPC or HTTP.
    pub transport: Transport,
    /// Traces or metrics.
    pub signal: Signal,
    /// Request headers (gRPC: the metadata), names lowercase, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body was gzip-compressed (`grpc-encoding: gzip` / `Content-Encoding: gzip`).
    pub gzip: bool,
    /// DER of the certificate the client presented over TLS, if any.
    pub client_cert: Option<Vec<u8>>,
    /// The receiver rejected it because of a [`Fault`].
    pub rejected: bool,
}

impl RequestInfo {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Everything received so far.
#[derive(Default)]
struct Store {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    requests: Vec<RequestInfo>,
    fault: Fault,
    rejected: u64,
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    notify: Arc<Notify>,
    /// Count only (benchmarks): keep no request, no payload, no header; just [`Counts`].
    count_only: bool,
    counts: Arc<AtomicCounts>,
}

/// What a receiver has been sent, counted whether or not it stores the payloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Trace export calls.
    pub trace_requests: u64,
    /// Spans in them.
    pub spans: u64,
    /// Metric export calls.
    pub metric_requests: u64,
}

#[derive(Debug, Default)]
struct AtomicCounts {
    trace_requests: AtomicU64,
    spans: AtomicU64,
    metric_requests: AtomicU64,
}

/// Spans in an export request.
fn span_count(req: &ExportTraceServiceRequest) -> u64 {
    req.resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len() as u64)
        .sum()
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the Vecs inconsistent; keep going.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a request; returns the fault to answer with (`Fault::None`: accept).
    fn arrive(&self, mut info: RequestInfo) -> Fault {
        if self.count_only {
            return Fault::None;
        }
        let mut store = self.lock();
        let fault = store.fault;
        info.rejected = fault != Fault::None;
        if info.rejected {
            store.rejected += 1;
        }
        store.requests.push(info);
        drop(store);
        self.notify.notify_waiters();
        fault
    }
}

/// The gRPC side of a request: metadata, compression and client certificate.
fn grpc_info<T>(request: &tonic::Request<T>, signal: Signal) -> RequestInfo {
    let headers = request
        .metadata()
        .clone()
        .into_headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect::<Vec<_>>();
    let gzip = headers
        .iter()
        .any(|(k, v)| k == "grpc-encoding" && v.eq_ignore_ascii_case("gzip"));
    let client_cert = request
        .peer_certs()
        .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
    RequestInfo {
        transport: Transport::Grpc,
        signal,
        headers,
        gzip,
        client_cert,
        rejected: false,
    }
}

/// `google.rpc.Status` / `RetryInfo` (only the fields needed to send a retry delay).
mod rpc {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(message, repeated, tag = "3")]
        pub details: Vec<Any>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        pub retry_delay: Option<ProtoDuration>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ProtoDuration {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

/// The gRPC status of a fault.
fn fault_status(retry_after: Option<Duration>) -> tonic::Status {
    const MESSAGE: &str = "otlp receiver: injected fault";
    let Some(delay) = retry_after else {
        return tonic::Status::unavailable(MESSAGE);
    };
    let retry = rpc::RetryInfo {
        retry_delay: Some(rpc::ProtoDuration {
            seconds: i64::try_from(delay.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(delay.subsec_nanos()).unwrap_or(0),
        }),
    };
    let status = rpc::Status {
        code: tonic::Code::Unavailable as i32,
        message: MESSAGE.into(),
        details: vec![rpc::Any {
            type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
            value: retry.encode_to_vec(),
        }],
    };
    tonic::Status::with_details(
        tonic::Code::Unavailable,
        MESSAGE,
        status.encode_to_vec().into(),
    )
}

#[tonic::async_trait]
impl TraceService for Shared {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if let Fault::Unavailable { retry_after } = self.arrive(grpc_info(&request, Signal::Traces))
        {
            return Err(fault_status(retry_after));
        }
        let req = request.into_inner();
        self.counts.trace_requests.fetch_add(1, Ordering::Relaxed);
        self.counts
            .spans
            .fetch_add(span_count(&req), Ordering::Relaxed);
        if self.count_only {
            return Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }));
        }
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
        if let Fault::Unavailable { retry_after } =
            self.arrive(grpc_info(&request, Signal::Metrics))
        {
            return Err(fault_status(retry_after));
        }
        let req = request.into_inner();
        self.counts.metric_requests.fetch_add(1, Ordering::Relaxed);
        if self.count_only {
            return Ok(tonic::Response::new(ExportMetricsServiceResponse {
                partial_success: None,
            }));
        }
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

/// A running OTLP receiver (gRPC, plus OTLP/HTTP when built with
/// [`OtlpReceiverBuilder::http`]). Stops when dropped.
///
/// The server runs as a task on the current tokio runtime: tests that block their thread
/// (e.g. `std::process::Command::output`) should use `#[tokio::test(flavor = "multi_thread")]`.
pub struct OtlpReceiver {
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    tls: bool,
    shared: Shared,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    http_task: Option<JoinHandle<()>>,
}

impl fmt::Debug for OtlpReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpReceiver")
            .field("addr", &self.addr)
            .field("http_addr", &self.http_addr)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// TLS material of the receiver's servers (PEM).
#[derive(Clone, Debug)]
struct ServerTls {
    cert_pem: String,
    key_pem: String,
    client_ca_pem: Option<String>,
}

/// Builds an [`OtlpReceiver`] with more than plain gRPC.
///
/// ```no_run
/// # async fn f() -> anyhow::Result<()> {
/// use sidecar_tests::otlp::{OtlpReceiver, TestCa};
/// let ca = TestCa::new()?;
/// let rx = OtlpReceiver::builder()
///     .http(true)
///     .tls(&ca.server_cert_pem, &ca.server_key_pem)
///     .client_ca(&ca.ca_pem)
///     .start()
///     .await?;
/// let _grpc = rx.endpoint(); // https://127.0.0.1:PORT
/// let _http = rx.http_endpoint(); // https://127.0.0.1:PORT2 (POST /v1/traces, /v1/metrics)
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct OtlpReceiverBuilder {
    addr: SocketAddr,
    http_addr: SocketAddr,
    http: bool,
    tls: Option<ServerTls>,
    count_only: bool,
}

impl OtlpReceiverBuilder {
    /// Address of the gRPC server (default `127.0.0.1:0`).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Also serve OTLP/HTTP protobuf (`POST /v1/traces`, `POST /v1/metrics`) on a second port
    /// of the same IP (see [`OtlpReceiver::http_endpoint`]).
    pub fn http(mut self, on: bool) -> Self {
        self.http = on;
        self
    }

    /// Keep nothing received over gRPC, only count calls and spans ([`OtlpReceiver::counts`]): for benchmarks,
    /// whose millions of spans would otherwise all be kept in memory. The accessors of stored
    /// data (spans, metrics, requests) then see nothing.
    pub fn count_only(mut self, on: bool) -> Self {
        self.count_only = on;
        self
    }

    /// Address of the OTLP/HTTP server (default: the gRPC server's IP, port 0).
    pub fn bind_http(mut self, addr: SocketAddr) -> Self {
        self.http_addr = addr;
        self
    }

    /// Serve TLS (both servers) with this certificate chain and private key (PEM).
    pub fn tls(mut self, cert_pem: &str, key_pem: &str) -> Self {
        let client_ca_pem = self.tls.take().and_then(|t| t.client_ca_pem);
        self.tls = Some(ServerTls {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            client_ca_pem,
        });
        self
    }

    /// Ask TLS clients for a certificate signed by this CA (PEM) and record it
    /// ([`RequestInfo::client_cert`]). Presenting one stays optional so tests can observe
    /// its absence; a certificate from another CA fails the handshake. Needs [`Self::tls`].
    pub fn client_ca(mut self, ca_pem: &str) -> Self {
        if let Some(t) = &mut self.tls {
            t.client_ca_pem = Some(ca_pem.to_owned());
        } else {
            self.tls = Some(ServerTls {
                cert_pem: String::new(),
                key_pem: String::new(),
                client_ca_pem: Some(ca_pem.to_owned()),
            });
        }
        self
    }

    /// Binds and starts the servers. Must be called within a tokio runtime.
    pub async fn start(self) -> anyhow::Result<OtlpReceiver> {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("binding the OTLP receiver on {}", self.addr))?;
        let http = if self.http {
            let http_addr = self.http_addr(listener.local_addr()?);
            Some(
                tokio::net::TcpListener::bind(http_addr)
                    .await
                    .with_context(|| format!("binding the OTLP/HTTP receiver on {http_addr}"))?,
            )
        } else {
            None
        };
        self.serve(listener, http)
    }

    /// Like [`Self::start`], with the listeners bound inside the network namespace `netns`
    /// (e.g. a test pod's, where the sidecar can reach `127.0.0.1`). Must be called within a
    /// tokio runtime.
    pub async fn start_in(self, netns: &crate::Netns) -> anyhow::Result<OtlpReceiver> {
        let (addr, builder) = (self.addr, self.clone());
        let (grpc, http) = netns
            .enter(move || -> std::io::Result<_> {
                let grpc = std::net::TcpListener::bind(addr)?;
                let http = if builder.http {
                    Some(std::net::TcpListener::bind(
                        builder.http_addr(grpc.local_addr()?),
                    )?)
                } else {
                    None
                };
                Ok((grpc, http))
            })
            .map_err(|e| anyhow::anyhow!("entering the namespace: {e}"))?
            .context("binding the OTLP receiver in the namespace")?;
        let to_tokio = |l: std::net::TcpListener| -> anyhow::Result<tokio::net::TcpListener> {
            l.set_nonblocking(true)?;
            Ok(tokio::net::TcpListener::from_std(l)?)
        };
        let http = http.map(to_tokio).transpose()?;
        self.serve(to_tokio(grpc)?, http)
    }

    /// The OTLP/HTTP address: as configured, or the gRPC server's IP with a free port.
    fn http_addr(&self, grpc: SocketAddr) -> SocketAddr {
        let mut http_addr = self.http_addr;
        if http_addr.ip().is_unspecified() && http_addr.port() == 0 {
            http_addr.set_ip(grpc.ip());
        }
        http_addr
    }

    fn serve(
        self,
        listener: tokio::net::TcpListener,
        http: Option<tokio::net::TcpListener>,
    ) -> anyhow::Result<OtlpReceiver> {
        if let Some(t) = &self.tls {
            anyhow::ensure!(
                !t.cert_pem.is_empty(),
                "client_ca needs tls(cert, key) as well"
            );
        }
        let mut rx = OtlpReceiver::serve(listener, self.tls.as_ref(), self.count_only)?;
        if let Some(listener) = http {
            rx.http_addr = Some(
                listener
                    .local_addr()
                    .context("reading the OTLP/HTTP receiver's address")?,
            );
            let acceptor = match &self.tls {
                Some(t) => Some(tls_acceptor(t)?),
                None => None,
            };
            rx.http_task = Some(tokio::spawn(serve_http(
                listener,
                acceptor,
                rx.shared.clone(),
            )));
        }
        Ok(rx)
    }
}

impl OtlpReceiver {
    /// A builder for a receiver with OTLP/HTTP, TLS or client-certificate checks.
    pub fn builder() -> OtlpReceiverBuilder {
        OtlpReceiverBuilder {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            http: false,
            tls: None,
            count_only: false,
        }
    }

    /// Starts a receiver on `127.0.0.1` with a free port.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a receiver on `addr` (port 0 picks a free port).
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the OTLP receiver on {addr}"))?;
        Self::serve(listener, None, false)
    }

    /// Starts a receiver on an already bound listener, e.g. one created inside a network
    /// namespace with [`crate::Netns::enter`]. Must be called within a tokio runtime.
    pub fn from_std_listener(listener: std::net::TcpListener) -> anyhow::Result<Self> {
        listener
            .set_nonblocking(true)
            .context("making the OTLP receiver's listener non-blocking")?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .context("registering the OTLP receiver's listener with tokio")?;
        Self::serve(listener, None, false)
    }

    fn serve(
        listener: tokio::net::TcpListener,
        tls: Option<&ServerTls>,
        count_only: bool,
    ) -> anyhow::Result<Self> {
        let addr = listener
            .local_addr()
            .context("reading the OTLP receiver's address")?;
        let shared = Shared {
            store: Arc::default(),
            notify: Arc::new(Notify::new()),
            count_only,
            counts: Arc::default(),
        };
        let gzip = tonic::codec::CompressionEncoding::Gzip;
        let traces = TraceServiceServer::new(shared.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .accept_compressed(gzip);
        let metrics = MetricsServiceServer::new(shared.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .accept_compressed(gzip);
        let mut server = tonic::transport::Server::builder();
        if let Some(t) = tls {
            let mut config = tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(&t.cert_pem, &t.key_pem),
            );
            if let Some(ca) = &t.client_ca_pem {
                config = config
                    .client_ca_root(tonic::transport::Certificate::from_pem(ca))
                    .client_auth_optional(true);
            }
            server = server
                .tls_config(config)
                .context("configuring TLS of the OTLP gRPC receiver")?;
        }
        let (tx, rx) = oneshot::channel::<()>();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            let result = server
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
            http_addr: None,
            tls: tls.is_some(),
            shared,
            shutdown: Some(tx),
            task,
            http_task: None,
        })
    }

    /// The socket address the receiver listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Export calls and spans received so far (also in count-only mode).
    pub fn counts(&self) -> Counts {
        let c = &self.shared.counts;
        Counts {
            trace_requests: c.trace_requests.load(Ordering::Relaxed),
            spans: c.spans.load(Ordering::Relaxed),
            metric_requests: c.metric_requests.load(Ordering::Relaxed),
        }
    }

    /// The gRPC endpoint URL, `http://127.0.0.1:PORT` (`https://` with TLS; brackets for
    /// IPv6).
    pub fn endpoint(&self) -> String {
        format!("{}://{}", self.scheme(), self.addr)
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// The OTLP/HTTP base URL, `http(s)://127.0.0.1:PORT` (append `/v1/traces` or
    /// `/v1/metrics`, or use it as `OTEL_EXPORTER_OTLP_ENDPOINT`).
    ///
    /// # Panics
    /// When the receiver was built without [`OtlpReceiverBuilder::http`].
    pub fn http_endpoint(&self) -> String {
        let addr = self
            .http_addr
            .expect("the OTLP receiver was built without .http(true)");
        format!("{}://{addr}", self.scheme())
    }

    /// The OTLP/HTTP server's address, if it runs.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Makes the receiver reject (or accept again, with [`Fault::None`]) every later export.
    pub fn set_fault(&self, fault: Fault) {
        self.shared.lock().fault = fault;
    }

    /// Export requests rejected because of a [`Fault`] so far.
    pub fn rejected_count(&self) -> u64 {
        self.shared.lock().rejected
    }

    /// Every export request so far (accepted and rejected), in arrival order.
    pub fn requests(&self) -> Vec<RequestInfo> {
        self.shared.lock().requests.clone()
    }

    /// The headers (gRPC metadata) of every request so far, flattened in arrival order.
    pub fn received_headers(&self) -> Vec<(String, String)> {
        self.shared
            .lock()
            .requests
            .iter()
            .flat_map(|r| r.headers.iter().cloned())
            .collect()
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
        if let Some(t) = &self.http_task {
            t.abort();
        }
    }
}

/// rustls acceptor (ring) for the OTLP/HTTP server; ALPN h2 and http/1.1.
fn tls_acceptor(t: &ServerTls) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_slice_iter(t.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the receiver's certificate")?;
    let key = PrivateKeyDer::from_pem_slice(t.key_pem.as_bytes())
        .context("parsing the receiver's private key")?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?;
    let builder = match &t.client_ca_pem {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots
                    .add(cert.context("parsing the client CA")?)
                    .context("adding the client CA")?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("using the receiver's certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accept loop of the OTLP/HTTP server.
async fn serve_http(
    listener: tokio::net::TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    shared: Shared,
) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let result = match acceptor {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(tls) => {
                        let client_cert = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| c.as_ref().to_vec());
                        let service = hyper::service::service_fn(move |req| {
                            handle_http(shared.clone(), req, client_cert.clone())
                        });
                        builder
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                            .await
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "otlp/http receiver: TLS handshake failed");
                        return;
                    }
                },
                None => {
                    let service = hyper::service::service_fn(move |req| {
                        handle_http(shared.clone(), req, None)
                    });
                    builder
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "otlp/http receiver: connection ended");
            }
        });
    }
}

type HttpResponse = http::Response<http_body_util::Full<hyper::body::Bytes>>;

fn http_response(status: http::StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut resp = http::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-protobuf"),
    );
    resp
}

/// One OTLP/HTTP request: record, apply the fault, decode (gunzip), store.
async fn handle_http(
    shared: Shared,
    req: http::Request<hyper::body::Incoming>,
    client_cert: Option<Vec<u8>>,
) -> Result<HttpResponse, std::convert::Infallible> {
    let signal = match (req.method(), req.uri().path()) {
        (&http::Method::POST, "/v1/traces") => Signal::Traces,
        (&http::Method::POST, "/v1/metrics") => Signal::Metrics,
        _ => return Ok(http_response(http::StatusCode::NOT_FOUND, Vec::new())),
    };
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let gzip = req
        .headers()
        .get(http::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let info = RequestInfo {
        transport: Transport::Http,
        signal,
        headers,
        gzip,
        client_cert,
        rejected: false,
    };
    if let Fault::Unavailable { retry_after } = shared.arrive(info) {
        let mut resp = http_response(http::StatusCode::SERVICE_UNAVAILABLE, Vec::new());
        if let Some(d) = retry_after {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            if let Ok(v) = http::HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
        }
        return Ok(resp);
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(http_response(http::StatusCode::BAD_REQUEST, Vec::new())),
    };
    let body = if gzip {
        let mut out = Vec::new();
        let mut decoder = flate2::read::GzDecoder::new(body.as_ref());
        if std::io::Read::read_to_end(&mut decoder, &mut out).is_err() {
            return Ok(http_response(http::StatusCode::BAD_REQUEST, Vec::new()));
        }
        hyper::body::Bytes::from(out)
    } else {
        body
    };
    match signal {
        Signal::Traces => match ExportTraceServiceRequest::decode(body) {
            Ok(r) => shared.lock().traces.push(r),
            Err(_) => return Ok(http_response(http::StatusCode::BAD_REQUEST, Vec::new())),
        },
        Signal::Metrics => match ExportMetricsServiceRequest::decode(body) {
            Ok(r) => shared.lock().metrics.push(r),
            Err(_) => return Ok(http_response(http::StatusCode::BAD_REQUEST, Vec::new())),
        },
    }
    shared.notify.notify_waiters();
    let body = match signal {
        Signal::Traces => ExportTraceServiceResponse {
            partial_success: None,
        }
        .encode_to_vec(),
        Signal::Metrics => ExportMetricsServiceResponse {
            partial_success: None,
        }
        .encode_to_vec(),
    };
    Ok(http_response(http::StatusCode::OK, body))
}

/// A throw-away certificate authority for TLS tests: a CA, a server certificate for
/// `localhost` and `127.0.0.1` (and `::1`), and a client certificate, all PEM.
#[derive(Clone, Debug)]
pub struct TestCa {
    /// The CA certificate.
    pub ca_pem: String,
    /// Server certificate (SANs `localhost`, `127.0.0.1`, `::1`), signed by the CA.
    pub server_cert_pem: String,
    /// Its private key (PKCS#8).
    pub server_key_pem: String,
    /// Client certificate (CN `otlp-test-client`, client auth), signed by the CA.
    pub client_cert_pem: String,
    /// Its private key (PKCS#8).
    pub client_key_pem: String,
    /// DER of the client certificate, to compare with [`RequestInfo::client_cert`].
    pub client_cert_der: Vec<u8>,
}

/// [`TestCa`] written to files.
#[derive(Clone, Debug)]
pub struct TestCaFiles {
    /// `ca.pem`.
    pub ca: PathBuf,
    /// `server.pem`.
    pub server_cert: PathBuf,
    /// `server.key`.
    pub server_key: PathBuf,
    /// `client.pem`.
    pub client_cert: PathBuf,
    /// `client.key`.
    pub client_key: PathBuf,
}

impl TestCa {
    /// Generates a fresh CA and its two certificates.
    pub fn new() -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "otlp-test-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut server = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server_cert = server.signed_by(&server_key, &ca)?;

        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client
            .distinguished_name
            .push(DnType::CommonName, "otlp-test-client");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate()?;
        let client_cert = client.signed_by(&client_key, &ca)?;

        Ok(Self {
            ca_pem: ca.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
            client_cert_der: client_cert.der().to_vec(),
        })
    }

    /// Writes the PEM files into `dir` (which must exist).
    pub fn write_to(&self, dir: &Path) -> anyhow::Result<TestCaFiles> {
        let files = TestCaFiles {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        for (path, pem) in [
            (&files.ca, &self.ca_pem),
            (&files.server_cert, &self.server_cert_pem),
            (&files.server_key, &self.server_key_pem),
            (&files.client_cert, &self.client_cert_pem),
            (&files.client_key, &self.client_key_pem),
        ] {
            std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(files)
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

    fn one_span_request() -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv_str("service.name", "raw-http")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        name: "POST".into(),
                        kind: SpanKind::Client as i32,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    async fn post(url: &str, body: Vec<u8>, gzip: bool) -> http::Response<hyper::body::Incoming> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<hyper::body::Bytes>>();
        let mut req = http::Request::post(url)
            .header("content-type", "application/x-protobuf")
            .header("x-api-key", "k1");
        if gzip {
            req = req.header("content-encoding", "gzip");
        }
        client
            .request(
                req.body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                    .unwrap(),
            )
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_protobuf_plain_and_gzip_and_faults() {
        let rx = OtlpReceiver::builder().http(true).start().await.unwrap();
        let base = rx.http_endpoint();
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        let body = one_span_request().encode_to_vec();
        let resp = post(&format!("{base}/v1/traces"), body.clone(), false).await;
        assert_eq!(resp.status(), 200);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &body).unwrap();
        let resp = post(&format!("{base}/v1/traces"), gz.finish().unwrap(), true).await;
        assert_eq!(resp.status(), 200);
        let resp = post(&format!("{base}/v1/logs"), body.clone(), false).await;
        assert_eq!(resp.status(), 404);

        rx.set_fault(Fault::Unavailable {
            retry_after: Some(Duration::from_millis(1500)),
        });
        let resp = post(&format!("{base}/v1/traces"), body.clone(), false).await;
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "2");
        rx.set_fault(Fault::None);
        assert_eq!(rx.rejected_count(), 1);

        let spans = rx.spans();
        assert_eq!(spans.len(), 2);
        assert!(spans.iter().all(|s| s.service_name() == Some("raw-http")));
        let reqs = rx.requests();
        assert_eq!(reqs.len(), 3, "the 404 is not an export");
        assert_eq!(
            reqs.iter()
                .map(|r| (r.gzip, r.rejected))
                .collect::<Vec<_>>(),
            [(false, false), (true, false), (false, true)]
        );
        assert!(reqs.iter().all(|r| r.transport == Transport::Http
            && r.signal == Signal::Traces
            && r.header("X-Api-Key") == Some("k1")));
        assert!(rx
            .received_headers()
            .contains(&("x-api-key".to_owned(), "k1".to_owned())));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_fault_carries_retry_info_and_tls_records_the_client_cert() {
        let ca = TestCa::new().unwrap();
        let rx = OtlpReceiver::builder()
            .tls(&ca.server_cert_pem, &ca.server_key_pem)
            .client_ca(&ca.ca_pem)
            .start()
            .await
            .unwrap();
        assert!(rx.endpoint().starts_with("https://127.0.0.1:"));
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&ca.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &ca.client_cert_pem,
                &ca.client_key_pem,
            ));
        let channel = tonic::transport::Endpoint::from_shared(rx.endpoint())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = TraceServiceClient::new(channel);

        rx.set_fault(Fault::Unavailable {
            retry_after: Some(Duration::from_millis(250)),
        });
        let status = client.export(one_span_request()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let details = rpc::Status::decode(status.details()).unwrap();
        let retry = rpc::RetryInfo::decode(details.details[0].value.as_slice()).unwrap();
        assert_eq!(
            retry.retry_delay,
            Some(rpc::ProtoDuration {
                seconds: 0,
                nanos: 250_000_000
            })
        );
        rx.set_fault(Fault::None);
        client.export(one_span_request()).await.unwrap();

        let reqs = rx.requests();
        assert_eq!(reqs.len(), 2);
        assert!(reqs[0].rejected && !reqs[1].rejected);
        for r in &reqs {
            assert_eq!(r.transport, Transport::Grpc);
            assert_eq!(
                r.client_cert.as_deref(),
                Some(ca.client_cert_der.as_slice())
            );
        }
        assert_eq!(rx.spans().len(), 1);
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

//! Telemetry: turns what the proxy measured into OpenTelemetry metrics and spans named by the
//! semantic conventions, and keeps the per-destination figures behind the live summary.
//!
//! CONTRACT: the public types and method signatures below are what `proxy` calls; keep them.
//! Instrument, attribute and span conventions are listed in `docs/telemetry.md`. The pipeline
//! (exporters, resource, sampler, summary task) is built by [`init`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _, UpDownCounter};
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::export::summary::Summary;
use crate::protocol::tls::TlsInfo;

pub mod instruments;
mod pipeline;
pub mod resource;
pub mod route;
pub mod rpc;
pub mod sampling;
pub mod selfobs;
pub mod semconv;
mod server;
mod tcp;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
pub mod url;

pub use pipeline::{init, TelemetryConfig, TelemetryError, TelemetryGuard};
pub use rpc::{GrpcStatus, RpcCall, RpcCallEnd};
pub use sampling::{SamplerKind, SamplingConfig};
pub use server::{ServerRequest, ServerRequestInfo};
pub use tcp::{TcpDirection, TcpObservation, TcpOutcome};

use semconv as sc;

/// HTTP version of a request, as `network.protocol.version` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.0 (`"1.0"`).
    Http10,
    /// HTTP/1.1 (`"1.1"`).
    Http11,
    /// HTTP/2 (`"2"`), one exchange per stream.
    Http2,
}

/// What the proxy knows about one outbound HTTP request once its head has been read.
#[derive(Clone, Debug)]
pub struct HttpRequestStart<'a> {
    /// Method token exactly as sent (`GET`, `PURGE`, ...).
    pub method: &'a str,
    /// Request-target exactly as sent (origin-form `/p?q` or absolute-form `http://h/p`).
    pub target: &'a str,
    /// `Host` header value, if any.
    pub host: Option<&'a str>,
    /// Protocol version of the request line.
    pub version: HttpVersion,
    /// Original destination of the connection (what the application dialled).
    pub destination: SocketAddr,
    /// Incoming W3C `traceparent` header value, if the application sent one.
    pub traceparent: Option<&'a str>,
    /// Incoming W3C `tracestate` header value, if any.
    pub tracestate: Option<&'a str>,
    /// When the first byte of the request head was read.
    pub start: SystemTime,
    /// True when this is not the first request on its connection (keep-alive reuse).
    pub reused_connection: bool,
}

/// Why an exchange or a connection failed, as `error.type` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorType {
    /// Upstream refused the connection.
    ConnectionRefused,
    /// A peer reset the connection.
    ConnectionReset,
    /// Connecting or waiting for the peer timed out.
    Timeout,
    /// The connection closed before the response was complete.
    IncompleteResponse,
    /// Any other I/O error.
    Io,
    /// An HTTP/2 stream was reset (`RST_STREAM`) or refused (`GOAWAY`) before its response
    /// was complete.
    StreamReset,
}

/// How an outbound HTTP request ended.
#[derive(Clone, Debug)]
pub struct HttpRequestEnd {
    /// Final (non-1xx) response status code, if a response head arrived.
    pub status: Option<u16>,
    /// Request payload bytes (after removing chunked framing).
    pub request_body_bytes: u64,
    /// Response payload bytes (after removing chunked framing).
    pub response_body_bytes: u64,
    /// Transport-level failure, if any (a 5xx alone is not one: status says that).
    pub error: Option<ErrorType>,
    /// When the last byte of the response was forwarded (or the failure was seen).
    pub end: SystemTime,
}

/// Protocol the proxy recognised on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionProtocol {
    /// Parsed as HTTP/1.x.
    Http1,
    /// Not recognised: forwarded opaquely.
    Opaque,
    /// Starts with a TLS ClientHello: forwarded opaquely (never terminated), SNI and ALPN
    /// recorded.
    Tls,
    /// HTTP/2 cleartext (prior knowledge, or upgraded from HTTP/1.1): measured per stream.
    Http2,
}

/// Which way a proxied connection goes, as `sidecar.direction` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionDirection {
    /// Opened by the pod's application (redirected by the connect hooks).
    Outbound,
    /// Opened by a remote peer to the pod (steered by `sk_lookup`).
    Inbound,
}

impl ConnectionDirection {
    /// The `sidecar.direction` value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionDirection::Outbound => "outbound",
            ConnectionDirection::Inbound => "inbound",
        }
    }
}

/// One proxied TCP connection, recorded when it closes.
#[derive(Clone, Debug)]
pub struct TcpConnectionRecord {
    /// Original destination.
    pub destination: SocketAddr,
    /// Bytes forwarded application → destination.
    pub bytes_sent: u64,
    /// Bytes forwarded destination → application.
    pub bytes_received: u64,
    /// Time from accept to both directions closed.
    pub duration: Duration,
    /// What the proxy recognised.
    pub protocol: ConnectionProtocol,
    /// Failure, if the connection did not end cleanly.
    pub error: Option<ErrorType>,
}

/// A CLIENT span in flight for one outbound request.
///
/// Dropping it without [`Telemetry::client_request_end`] (a cancelled task) still ends the span
/// and takes the request off `http.client.active_requests`.
pub struct ClientRequest {
    inner: Arc<Inner>,
    span: Option<opentelemetry_sdk::trace::Span>,
    traceparent: Option<String>,
    /// `http.request.method`, `server.address`, `server.port`, `url.scheme`: the attributes of
    /// `http.client.active_requests`, and the first four of every other HTTP instrument.
    base_attrs: Vec<KeyValue>,
    server_address: Arc<str>,
    server_port: u16,
    version: &'static str,
    start: SystemTime,
    ended: bool,
}

impl ClientRequest {
    /// `traceparent` value to put on the forwarded request (the CLIENT span's context), or
    /// `None` when tracing is off and the incoming header (if any) must pass unchanged.
    ///
    /// An unsampled span still yields a value (its trace id, flags `00`); `None` only happens
    /// when the tracer provider has already been shut down.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }
}

impl ClientRequest {
    /// True while the span records attributes (sampled and not yet ended): only then is it
    /// worth measuring what [`Self::set_tcp_info`] takes.
    pub fn is_recording(&self) -> bool {
        self.span.as_ref().is_some_and(|s| s.is_recording())
    }

    /// Adds `sidecar.connection.rtt` (s) and `sidecar.connection.retransmits` of the upstream socket.
    pub fn set_tcp_info(&mut self, rtt: Duration, retransmits: u32) {
        if let Some(span) = self.span.as_mut() {
            set_tcp_info_attributes(span, rtt, retransmits);
        }
    }

    /// The exchange continues over another protocol version (an `Upgrade: h2c` request whose
    /// response comes over HTTP/2): `network.protocol.version` is recorded as `version`.
    pub fn set_version(&mut self, version: HttpVersion) {
        self.version = sc::protocol_version(version);
    }
}

/// Sets the `TCP_INFO` span attributes (smoothed RTT in seconds, total retransmits).
fn set_tcp_info_attributes(
    span: &mut opentelemetry_sdk::trace::Span,
    rtt: Duration,
    retransmits: u32,
) {
    if span.is_recording() {
        span.set_attribute(KeyValue::new(sc::SIDECAR_CONNECTION_RTT, rtt.as_secs_f64()));
        span.set_attribute(KeyValue::new(
            sc::SIDECAR_CONNECTION_RETRANSMITS,
            i64::from(retransmits),
        ));
    }
}

/// `traceparent` value carrying `span`'s context (`None` if the context is invalid, i.e. the
/// tracer provider is shut down). A span the sampler dropped still carries the trace id, with
/// flags 00.
fn span_traceparent(span: &opentelemetry_sdk::trace::Span) -> Option<String> {
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags()
        )
    })
}

impl Drop for ClientRequest {
    fn drop(&mut self) {
        if !self.ended {
            self.inner.active.add(-1, &self.base_attrs);
            // The SDK span ends itself when dropped.
        }
    }
}

impl std::fmt::Debug for ClientRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRequest")
            .field("traceparent", &self.traceparent)
            .field("server_address", &self.server_address)
            .field("server_port", &self.server_port)
            .finish_non_exhaustive()
    }
}

/// Handle to the telemetry pipeline; cheap to clone, shared by every connection task.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

/// Instrument scope name used for the tracer and the meter.
pub const SCOPE_NAME: &str = "sidecar";

/// Explicit bucket boundaries (seconds) of `http.client.request.duration`, as the HTTP
/// semantic conventions advise.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Bucket boundaries (seconds) of `sidecar.proxy.connection.duration`: connections live longer
/// than requests, so the range reaches one hour.
pub const CONNECTION_DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Bucket boundaries (bytes) of the body-size histograms: powers of four from 64 B to 64 MiB.
pub const BODY_SIZE_BUCKETS: [f64; 11] = [
    0.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 67108864.0,
];

struct Inner {
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    redactor: url::Redactor,
    routes: route::RouteTable,
    duration: Histogram<f64>,
    request_body: Histogram<u64>,
    response_body: Histogram<u64>,
    active: UpDownCounter<i64>,
    connection_duration: Histogram<f64>,
    connection_io: Counter<u64>,
    server: server::ServerInstruments,
    rpc: rpc::RpcInstruments,
    tcp: tcp::TcpInstruments,
    summary: Arc<Summary>,
}

impl Inner {
    /// The parent of a request span: the incoming W3C context, or a new root.
    fn parent_context(&self, req: &HttpRequestStart<'_>) -> Context {
        if req.traceparent.is_none() {
            return Context::new();
        }
        self.propagator.extract(&TraceHeaders {
            traceparent: req.traceparent,
            tracestate: req.tracestate,
        })
    }
}

/// The incoming `traceparent`/`tracestate` pair seen as a carrier for the W3C propagator.
struct TraceHeaders<'a> {
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl Extractor for TraceHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key.eq_ignore_ascii_case("traceparent") {
            self.traceparent
        } else if key.eq_ignore_ascii_case("tracestate") {
            self.tracestate
        } else {
            None
        }
    }

    fn keys(&self) -> Vec<&str> {
        let mut keys = Vec::with_capacity(2);
        if self.traceparent.is_some() {
            keys.push("traceparent");
        }
        if self.tracestate.is_some() {
            keys.push("tracestate");
        }
        keys
    }
}

impl Telemetry {
    /// Builds the handle over SDK providers made by tests, with the default route table.
    #[cfg(test)]
    pub(crate) fn new(
        tracer_provider: &SdkTracerProvider,
        meter_provider: &SdkMeterProvider,
        summary: Arc<Summary>,
        redactor: url::Redactor,
    ) -> Self {
        Self::with_routes(
            tracer_provider,
            meter_provider,
            summary,
            redactor,
            route::RouteTable::default(),
        )
    }

    /// Builds the handle over SDK providers made by [`init`] (or by tests), creating every
    /// instrument once; `routes` gives the `http.route` of inbound requests.
    pub(crate) fn with_routes(
        tracer_provider: &SdkTracerProvider,
        meter_provider: &SdkMeterProvider,
        summary: Arc<Summary>,
        redactor: url::Redactor,
        routes: route::RouteTable,
    ) -> Self {
        let scope = InstrumentationScope::builder(SCOPE_NAME)
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let tracer = tracer_provider.tracer_with_scope(scope.clone());
        let meter = meter_provider.meter_with_scope(scope);
        let duration = meter
            .f64_histogram(sc::METRIC_CLIENT_DURATION)
            .with_unit("s")
            .with_description("Duration of HTTP client requests.")
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        let request_body = meter
            .u64_histogram(sc::METRIC_CLIENT_REQUEST_BODY_SIZE)
            .with_unit("By")
            .with_description("Size of HTTP client request bodies.")
            .with_boundaries(BODY_SIZE_BUCKETS.to_vec())
            .build();
        let response_body = meter
            .u64_histogram(sc::METRIC_CLIENT_RESPONSE_BODY_SIZE)
            .with_unit("By")
            .with_description("Size of HTTP client response bodies.")
            .with_boundaries(BODY_SIZE_BUCKETS.to_vec())
            .build();
        let active = meter
            .i64_up_down_counter(sc::METRIC_CLIENT_ACTIVE_REQUESTS)
            .with_unit("{request}")
            .with_description("Number of outbound HTTP requests that are currently active.")
            .build();
        let connection_duration = meter
            .f64_histogram(sc::METRIC_CONNECTION_DURATION)
            .with_unit("s")
            .with_description("Duration of proxied TCP connections, from accept to close.")
            .with_boundaries(CONNECTION_DURATION_BUCKETS.to_vec())
            .build();
        let connection_io = meter
            .u64_counter(sc::METRIC_CONNECTION_IO)
            .with_unit("By")
            .with_description("Bytes forwarded on proxied TCP connections.")
            .build();
        let server = server::ServerInstruments::new(&meter);
        Self {
            inner: Arc::new(Inner {
                tracer,
                propagator: TraceContextPropagator::new(),
                redactor,
                routes,
                duration,
                request_body,
                response_body,
                active,
                connection_duration,
                connection_io,
                server,
                rpc: rpc::RpcInstruments::new(&meter),
                tcp: tcp::TcpInstruments::new(&meter),
                summary,
            }),
        }
    }

    /// The per-destination figures behind the live summary (and a later `/stats` endpoint).
    pub fn summary(&self) -> &Arc<Summary> {
        &self.inner.summary
    }

    /// Starts the CLIENT span for an outbound request (its parent is the incoming
    /// `traceparent`, if any) and counts it as active.
    pub fn client_request_start(&self, req: &HttpRequestStart<'_>) -> ClientRequest {
        let inner = &self.inner;
        let known = sc::known_method(req.method);
        let method = known.unwrap_or(sc::OTHER_METHOD);
        let server_address: Arc<str> =
            sc::server_address(req.host, req.target, req.destination).into();
        let server_port = req.destination.port();
        let version = sc::protocol_version(req.version);

        let mut base_attrs = Vec::with_capacity(7);
        base_attrs.push(KeyValue::new(sc::HTTP_REQUEST_METHOD, method));
        base_attrs.push(KeyValue::new(sc::SERVER_ADDRESS, server_address.clone()));
        base_attrs.push(KeyValue::new(sc::SERVER_PORT, i64::from(server_port)));
        base_attrs.push(KeyValue::new(sc::URL_SCHEME, "http"));
        inner.active.add(1, &base_attrs);

        let parent = inner.parent_context(req);
        let mut span_attrs = Vec::with_capacity(14);
        span_attrs.push(KeyValue::new(sc::HTTP_REQUEST_METHOD, method));
        if known.is_none() {
            span_attrs.push(KeyValue::new(
                sc::HTTP_REQUEST_METHOD_ORIGINAL,
                req.method.to_owned(),
            ));
        }
        span_attrs.push(KeyValue::new(sc::SERVER_ADDRESS, server_address.clone()));
        span_attrs.push(KeyValue::new(sc::SERVER_PORT, i64::from(server_port)));
        span_attrs.push(KeyValue::new(
            sc::URL_FULL,
            inner
                .redactor
                .url_full(req.target, req.host, req.destination),
        ));
        span_attrs.push(KeyValue::new(
            sc::NETWORK_PEER_ADDRESS,
            req.destination.ip().to_string(),
        ));
        span_attrs.push(KeyValue::new(
            sc::NETWORK_PEER_PORT,
            i64::from(req.destination.port()),
        ));
        let span = inner
            .tracer
            .span_builder(known.unwrap_or("HTTP"))
            .with_kind(SpanKind::Client)
            .with_start_time(req.start)
            .with_attributes(span_attrs)
            .start_with_context(&inner.tracer, &parent);

        let traceparent = span_traceparent(&span);

        ClientRequest {
            inner: Arc::clone(inner),
            span: Some(span),
            traceparent,
            base_attrs,
            server_address,
            server_port,
            version,
            start: req.start,
            ended: false,
        }
    }

    /// Ends the span and records `http.client.request.duration` and the body-size histograms.
    pub fn client_request_end(&self, req: ClientRequest, end: HttpRequestEnd) {
        let mut req = req;
        req.ended = true;
        let inner = &self.inner;
        inner.active.add(-1, &req.base_attrs);

        let error = sc::http_error_type(end.status, end.error);
        let mut attrs = std::mem::take(&mut req.base_attrs);
        attrs.push(KeyValue::new(sc::NETWORK_PROTOCOL_VERSION, req.version));
        if let Some(status) = end.status {
            attrs.push(KeyValue::new(
                sc::HTTP_RESPONSE_STATUS_CODE,
                i64::from(status),
            ));
        }
        if let Some(e) = error {
            attrs.push(KeyValue::new(sc::ERROR_TYPE, e.as_attribute()));
        }
        let elapsed = end.end.duration_since(req.start).unwrap_or_default();
        inner.duration.record(elapsed.as_secs_f64(), &attrs);
        inner.request_body.record(end.request_body_bytes, &attrs);
        inner.response_body.record(end.response_body_bytes, &attrs);

        finish_span(req.span.take(), &end, error, req.version);

        inner.summary.record_request(
            &req.server_address,
            req.server_port,
            elapsed,
            end.status,
            end.error.is_some(),
        );
    }

    /// Records a closed outbound proxied TCP connection (bytes each way, duration).
    pub fn tcp_connection(&self, rec: &TcpConnectionRecord) {
        self.tcp_connection_with_direction(rec, ConnectionDirection::Outbound);
    }

    /// Records a closed proxied TCP connection going `direction`. Only outbound connections
    /// feed the per-destination summary.
    pub fn tcp_connection_with_direction(
        &self,
        rec: &TcpConnectionRecord,
        direction: ConnectionDirection,
    ) {
        self.tcp_connection_with_tls(rec, direction, None);
    }

    /// Records a closed proxied TCP connection going `direction`, with what its TLS
    /// ClientHello said when it was one: `tls.protocol.name`, the SNI as `server.address` (the
    /// destination IP then moves to `network.peer.address`) and the offered ALPN ids as
    /// `sidecar.tls.client.alpn`.
    pub fn tcp_connection_with_tls(
        &self,
        rec: &TcpConnectionRecord,
        direction: ConnectionDirection,
        tls: Option<&TlsInfo>,
    ) {
        let inner = &self.inner;
        let mut attrs = Vec::with_capacity(10);
        let ip = rec.destination.ip().to_string();
        match tls.and_then(|t| t.sni.as_deref()) {
            Some(sni) => {
                attrs.push(KeyValue::new(sc::SERVER_ADDRESS, sni.to_string()));
                attrs.push(KeyValue::new(sc::NETWORK_PEER_ADDRESS, ip));
            }
            None => attrs.push(KeyValue::new(sc::SERVER_ADDRESS, ip)),
        }
        if rec.protocol == ConnectionProtocol::Tls {
            attrs.push(KeyValue::new(sc::TLS_PROTOCOL_NAME, "tls"));
        }
        if let Some(t) = tls.filter(|t| !t.alpn.is_empty()) {
            attrs.push(KeyValue::new(sc::SIDECAR_TLS_CLIENT_ALPN, t.alpn_joined()));
        }
        attrs.push(KeyValue::new(
            sc::SERVER_PORT,
            i64::from(rec.destination.port()),
        ));
        attrs.push(KeyValue::new(sc::NETWORK_TRANSPORT, "tcp"));
        attrs.push(KeyValue::new(
            sc::SIDECAR_PROTOCOL,
            sc::connection_protocol_str(rec.protocol),
        ));
        attrs.push(KeyValue::new(sc::SIDECAR_DIRECTION, direction.as_str()));
        if let Some(e) = rec.error {
            attrs.push(KeyValue::new(sc::ERROR_TYPE, sc::error_type_str(e)));
        }
        inner
            .connection_duration
            .record(rec.duration.as_secs_f64(), &attrs);
        attrs.push(KeyValue::new(sc::NETWORK_IO_DIRECTION, "transmit"));
        inner.connection_io.add(rec.bytes_sent, &attrs);
        attrs.pop();
        attrs.push(KeyValue::new(sc::NETWORK_IO_DIRECTION, "receive"));
        inner.connection_io.add(rec.bytes_received, &attrs);

        if direction == ConnectionDirection::Outbound {
            inner.summary.record_connection(rec);
        }
    }
}

/// Sets the end-of-exchange attributes (`network.protocol.version` among them, since an HTTP/1.1
/// request upgraded to h2c gets its response over HTTP/2) and status on a request span (CLIENT or SERVER) and ends
/// it at `end.end`.
fn finish_span(
    span: Option<opentelemetry_sdk::trace::Span>,
    end: &HttpRequestEnd,
    error: Option<sc::ErrorKind>,
    version: &'static str,
) {
    let Some(mut span) = span else { return };
    if span.is_recording() {
        span.set_attribute(KeyValue::new(sc::NETWORK_PROTOCOL_VERSION, version));
        if let Some(status) = end.status {
            span.set_attribute(KeyValue::new(
                sc::HTTP_RESPONSE_STATUS_CODE,
                i64::from(status),
            ));
        }
        span.set_attribute(KeyValue::new(
            sc::HTTP_REQUEST_BODY_SIZE,
            clamp_i64(end.request_body_bytes),
        ));
        span.set_attribute(KeyValue::new(
            sc::HTTP_RESPONSE_BODY_SIZE,
            clamp_i64(end.response_body_bytes),
        ));
        match error {
            Some(e @ sc::ErrorKind::Transport(t)) => {
                span.set_attribute(KeyValue::new(sc::ERROR_TYPE, e.as_attribute()));
                span.set_status(Status::error(sc::error_type_str(t)));
            }
            Some(e @ sc::ErrorKind::Status(_)) => {
                span.set_attribute(KeyValue::new(sc::ERROR_TYPE, e.as_attribute()));
                span.set_status(Status::error(""));
            }
            None => {}
        }
    }
    span.end_with_timestamp(end.end);
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

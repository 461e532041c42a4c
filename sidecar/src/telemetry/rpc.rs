//! gRPC calls: one CLIENT (outbound) or SERVER (inbound) span per HTTP/2 stream whose request
//! `content-type` is `application/grpc*`, named by the RPC semantic conventions, and the
//! `rpc.client.call.duration` / `rpc.server.call.duration` histograms.
//!
//! The status is what the caller's gRPC library reports: `grpc-status` from the trailers (or a
//! trailers-only response); failing that, the mapping gRPC defines from a stream reset or from a
//! non-200 HTTP status.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use opentelemetry::metrics::{Histogram, Meter};
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _};
use opentelemetry::KeyValue;

use super::semconv as sc;
use super::{
    set_tcp_info_attributes, span_traceparent, ConnectionDirection, ErrorType, HttpRequestStart,
    Telemetry, DURATION_BUCKETS,
};

/// `rpc.system.name` of gRPC calls.
pub const GRPC: &str = "grpc";

/// Most distinct `rpc.method` values per sidecar; later ones are `_OTHER` (the method then goes
/// to `rpc.method_original` on the span only), so an inbound caller inventing paths cannot
/// grow the metric series without bound.
pub const MAX_RPC_METHODS: usize = 1000;

/// True when a request `content-type` marks a gRPC call (`application/grpc`,
/// `application/grpc+proto`, `application/grpc-web` is not gRPC over HTTP/2 and is excluded).
pub fn is_grpc_content_type(content_type: &str) -> bool {
    let ct = content_type.trim();
    let Some(rest) = ct
        .get(..16)
        .filter(|p| p.eq_ignore_ascii_case("application/grpc"))
        .map(|_| ct.get(16..).unwrap_or_default())
    else {
        return false;
    };
    rest.is_empty() || rest.starts_with('+') || rest.starts_with(';')
}

/// A gRPC status code (0..=16), named as `rpc.response.status_code` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrpcStatus(pub u32);

impl GrpcStatus {
    /// `OK`.
    pub const OK: GrpcStatus = GrpcStatus(0);
    /// `CANCELLED`.
    pub const CANCELLED: GrpcStatus = GrpcStatus(1);
    /// `UNKNOWN`.
    pub const UNKNOWN: GrpcStatus = GrpcStatus(2);
    /// `INTERNAL`.
    pub const INTERNAL: GrpcStatus = GrpcStatus(13);
    /// `UNAVAILABLE`.
    pub const UNAVAILABLE: GrpcStatus = GrpcStatus(14);

    /// The status name (`OK`, `NOT_FOUND`, ...); codes outside the defined set are `UNKNOWN`,
    /// as gRPC libraries treat them.
    pub fn name(self) -> &'static str {
        const NAMES: [&str; 17] = [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ];
        usize::try_from(self.0)
            .ok()
            .and_then(|i| NAMES.get(i))
            .copied()
            .unwrap_or("UNKNOWN")
    }

    /// True when a client sees this status as a failed call: anything but OK.
    pub fn is_client_error(self) -> bool {
        self != Self::OK
    }

    /// True when the server side counts this status as its own failure (the conventions'
    /// list: UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS).
    pub fn is_server_error(self) -> bool {
        matches!(self.0, 2 | 4 | 12 | 13 | 14 | 15) || self.0 > 16
    }

    /// Status a gRPC client reports for a stream reset with this HTTP/2 error code.
    pub fn from_reset(code: u32) -> Self {
        match code {
            0x7 => Self::UNAVAILABLE, // REFUSED_STREAM
            0x8 => Self::CANCELLED,   // CANCEL
            0xb => GrpcStatus(8),     // ENHANCE_YOUR_CALM: RESOURCE_EXHAUSTED
            0xc => GrpcStatus(7),     // INADEQUATE_SECURITY: PERMISSION_DENIED
            _ => Self::INTERNAL,
        }
    }

    /// Status a gRPC client reports for a response without `grpc-status` and this HTTP status.
    pub fn from_http(status: u16) -> Self {
        match status {
            400 => Self::INTERNAL,
            401 => GrpcStatus(16),
            403 => GrpcStatus(7),
            404 => GrpcStatus(12),
            429 | 502 | 503 | 504 => Self::UNAVAILABLE,
            _ => Self::UNKNOWN,
        }
    }
}

/// How a gRPC call ended, as the HTTP/2 stream showed it.
#[derive(Clone, Debug)]
pub struct RpcCallEnd {
    /// `grpc-status` from the trailers or a trailers-only response.
    pub grpc_status: Option<u32>,
    /// Final `:status` of the response, if one arrived.
    pub http_status: Option<u16>,
    /// HTTP/2 error code of a `RST_STREAM` that ended the stream.
    pub reset_code: Option<u32>,
    /// The upstream refused the stream (`GOAWAY` below its id).
    pub refused: bool,
    /// Transport failure when nothing above says how the call ended.
    pub error: Option<ErrorType>,
    /// Request message bytes (DATA payload, gRPC framing included).
    pub request_body_bytes: u64,
    /// Response message bytes (DATA payload, gRPC framing included).
    pub response_body_bytes: u64,
    /// When the stream ended.
    pub end: SystemTime,
}

impl RpcCallEnd {
    /// The status the caller saw, if the stream says it.
    pub fn status(&self) -> Option<GrpcStatus> {
        if let Some(code) = self.grpc_status {
            return Some(GrpcStatus(code));
        }
        if let Some(code) = self.reset_code {
            return Some(GrpcStatus::from_reset(code));
        }
        if self.refused {
            return Some(GrpcStatus::UNAVAILABLE);
        }
        match self.http_status {
            Some(s) if s != 200 => Some(GrpcStatus::from_http(s)),
            _ => None,
        }
    }
}

/// The `rpc.*.call.duration` instruments and the bounded set of `rpc.method` values.
pub(super) struct RpcInstruments {
    client: Histogram<f64>,
    server: Histogram<f64>,
    methods: Mutex<HashSet<Arc<str>>>,
}

impl RpcInstruments {
    pub(super) fn new(meter: &Meter) -> Self {
        Self {
            client: meter
                .f64_histogram(sc::METRIC_RPC_CLIENT_DURATION)
                .with_unit("s")
                .with_description("Duration of outbound gRPC calls, to the end of the stream.")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            server: meter
                .f64_histogram(sc::METRIC_RPC_SERVER_DURATION)
                .with_unit("s")
                .with_description("Duration of inbound gRPC calls, to the end of the stream.")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            methods: Mutex::new(HashSet::new()),
        }
    }

    /// `rpc.method` for a method name: itself while fewer than [`MAX_RPC_METHODS`] distinct
    /// ones were seen (or it is one of them), else `None` (`_OTHER`).
    fn method(&self, name: &str) -> Option<Arc<str>> {
        let mut seen = self.methods.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = seen.get(name) {
            return Some(Arc::clone(m));
        }
        if seen.len() >= MAX_RPC_METHODS {
            return None;
        }
        let m: Arc<str> = name.into();
        seen.insert(Arc::clone(&m));
        Some(m)
    }
}

/// A gRPC call in flight. Dropping it without [`Telemetry::rpc_call_end`] ends the span
/// without a status (the SDK ends a dropped span).
pub struct RpcCall {
    span: Option<opentelemetry_sdk::trace::Span>,
    traceparent: Option<String>,
    direction: ConnectionDirection,
    /// `rpc.system.name`, `rpc.method`, `server.address`, `server.port`.
    attrs: Vec<KeyValue>,
    server_address: Arc<str>,
    server_port: u16,
    start: SystemTime,
}

impl std::fmt::Debug for RpcCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcCall")
            .field("traceparent", &self.traceparent)
            .field("direction", &self.direction)
            .finish_non_exhaustive()
    }
}

impl RpcCall {
    /// `traceparent` value to put on the forwarded request (the span's context).
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// True while the span records attributes.
    pub fn is_recording(&self) -> bool {
        self.span.as_ref().is_some_and(|s| s.is_recording())
    }

    /// Adds `sidecar.connection.rtt` (s) and `sidecar.connection.retransmits`.
    pub fn set_tcp_info(&mut self, rtt: Duration, retransmits: u32) {
        if let Some(span) = self.span.as_mut() {
            set_tcp_info_attributes(span, rtt, retransmits);
        }
    }
}

/// The method part of a gRPC `:path` (`/pkg.Service/Method` -> `pkg.Service/Method`), or
/// `None` when the path does not have that shape.
pub fn method_of_path(path: &str) -> Option<&str> {
    let m = path.strip_prefix('/')?;
    let (service, method) = m.split_once('/')?;
    (!service.is_empty()
        && !method.is_empty()
        && !method.contains('/')
        && m.bytes().all(|b| b.is_ascii_graphic()))
    .then_some(m)
}

impl Telemetry {
    /// Starts the span of a gRPC call (`req.target` is the `:path`, `req.host` the
    /// `:authority`): CLIENT for outbound calls, SERVER for inbound ones (`client` is then the
    /// remote caller).
    pub fn rpc_call_start(
        &self,
        req: &HttpRequestStart<'_>,
        direction: ConnectionDirection,
        client: Option<SocketAddr>,
    ) -> RpcCall {
        let inner = &self.inner;
        let path_method = method_of_path(req.target);
        let method = path_method.and_then(|m| inner.rpc.method(m));
        let method_value: opentelemetry::Value = match &method {
            Some(m) => opentelemetry::Value::from(Arc::clone(m)),
            None => opentelemetry::Value::from(sc::OTHER_METHOD),
        };
        let server_address: Arc<str> =
            sc::server_address(req.host, req.target, req.destination).into();
        let server_port = req.destination.port();
        let attrs = vec![
            KeyValue::new(sc::RPC_SYSTEM_NAME, GRPC),
            KeyValue::new(sc::RPC_METHOD, method_value),
            KeyValue::new(sc::SERVER_ADDRESS, server_address.clone()),
            KeyValue::new(sc::SERVER_PORT, i64::from(server_port)),
        ];
        let mut span_attrs = attrs.clone();
        if method.is_none() {
            span_attrs.push(KeyValue::new(
                sc::RPC_METHOD_ORIGINAL,
                req.target.trim_start_matches('/').to_owned(),
            ));
        }
        span_attrs.push(KeyValue::new(sc::NETWORK_PROTOCOL_VERSION, "2"));
        let (kind, peer) = match direction {
            ConnectionDirection::Outbound => (SpanKind::Client, Some(req.destination)),
            ConnectionDirection::Inbound => (SpanKind::Server, client),
        };
        if let Some(peer) = peer {
            span_attrs.push(KeyValue::new(
                sc::NETWORK_PEER_ADDRESS,
                peer.ip().to_string(),
            ));
            span_attrs.push(KeyValue::new(sc::NETWORK_PEER_PORT, i64::from(peer.port())));
        }
        if let (ConnectionDirection::Inbound, Some(c)) = (direction, client) {
            span_attrs.push(KeyValue::new(sc::CLIENT_ADDRESS, c.ip().to_string()));
            span_attrs.push(KeyValue::new(sc::CLIENT_PORT, i64::from(c.port())));
        }
        let name = match &method {
            Some(m) => m.to_string(),
            None => sc::OTHER_METHOD.to_owned(),
        };
        let parent = inner.parent_context(req);
        let span = inner
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(req.start)
            .with_attributes(span_attrs)
            .start_with_context(&inner.tracer, &parent);
        let traceparent = span_traceparent(&span);
        RpcCall {
            span: Some(span),
            traceparent,
            direction,
            attrs,
            server_address,
            server_port,
            start: req.start,
        }
    }

    /// Ends a gRPC call: `rpc.response.status_code`, `error.type` and span status (a CLIENT span
    /// fails on any non-OK status, a SERVER span only on the server-fault ones), and the
    /// duration histogram of its side.
    pub fn rpc_call_end(&self, call: RpcCall, end: RpcCallEnd) {
        let mut call = call;
        let inner = &self.inner;
        let status = end.status();
        let outbound = call.direction == ConnectionDirection::Outbound;
        let error: Option<&'static str> = match status {
            Some(s) if outbound && s.is_client_error() => Some(s.name()),
            Some(s) if !outbound && s.is_server_error() => Some(s.name()),
            Some(_) => None,
            None => Some(sc::error_type_str(
                end.error.unwrap_or(ErrorType::IncompleteResponse),
            )),
        };
        let mut attrs = std::mem::take(&mut call.attrs);
        if let Some(s) = status {
            attrs.push(KeyValue::new(sc::RPC_RESPONSE_STATUS_CODE, s.name()));
        }
        if let Some(e) = error {
            attrs.push(KeyValue::new(sc::ERROR_TYPE, e));
        }
        let elapsed = end.end.duration_since(call.start).unwrap_or_default();
        let histogram = if outbound {
            &inner.rpc.client
        } else {
            &inner.rpc.server
        };
        histogram.record(elapsed.as_secs_f64(), &attrs);
        if !outbound {
            inner
                .summary
                .record_server_request(&attrs, elapsed, end.http_status, error.is_some());
        }

        if let Some(mut span) = call.span.take() {
            if span.is_recording() {
                if let Some(s) = status {
                    span.set_attribute(KeyValue::new(sc::RPC_RESPONSE_STATUS_CODE, s.name()));
                }
                if let Some(code) = end.http_status {
                    span.set_attribute(KeyValue::new(
                        sc::HTTP_RESPONSE_STATUS_CODE,
                        i64::from(code),
                    ));
                }
                if let Some(e) = error {
                    span.set_attribute(KeyValue::new(sc::ERROR_TYPE, e));
                    span.set_status(Status::error(e));
                }
            }
            span.end_with_timestamp(end.end);
        }
        if outbound {
            inner.summary.record_request(
                &call.server_address,
                call.server_port,
                elapsed,
                end.http_status,
                error.is_some(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::testing::TestTelemetry;
    use crate::telemetry::HttpVersion;
    use opentelemetry::trace::SpanKind;
    use opentelemetry::Value;
    use opentelemetry_sdk::trace::SpanData;

    fn start(path: &str) -> HttpRequestStart<'_> {
        HttpRequestStart {
            method: "POST",
            target: path,
            host: Some("greeter.svc:50051"),
            version: HttpVersion::Http2,
            destination: "10.0.0.7:50051".parse().unwrap(),
            traceparent: None,
            tracestate: None,
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            reused_connection: false,
        }
    }

    fn end(grpc: Option<u32>, http: Option<u16>) -> RpcCallEnd {
        RpcCallEnd {
            grpc_status: grpc,
            http_status: http,
            reset_code: None,
            refused: false,
            error: None,
            request_body_bytes: 12,
            response_body_bytes: 40,
            end: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250),
        }
    }

    fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    #[test]
    fn content_types() {
        assert!(is_grpc_content_type("application/grpc"));
        assert!(is_grpc_content_type("application/grpc+proto"));
        assert!(is_grpc_content_type("Application/GRPC; charset=x"));
        assert!(!is_grpc_content_type("application/grpc-web"));
        assert!(!is_grpc_content_type("application/json"));
        assert!(!is_grpc_content_type("application/grp"));
    }

    #[test]
    fn methods_of_paths() {
        assert_eq!(method_of_path("/demo.Echo/Say"), Some("demo.Echo/Say"));
        assert_eq!(method_of_path("/demo.Echo/"), None);
        assert_eq!(method_of_path("/a/b/c"), None);
        assert_eq!(method_of_path("demo.Echo/Say"), None);
        assert_eq!(method_of_path("/x y/z"), None);
    }

    #[test]
    fn status_names_and_error_sets() {
        assert_eq!(GrpcStatus(0).name(), "OK");
        assert_eq!(GrpcStatus(5).name(), "NOT_FOUND");
        assert_eq!(GrpcStatus(16).name(), "UNAUTHENTICATED");
        assert_eq!(GrpcStatus(99).name(), "UNKNOWN");
        assert!(GrpcStatus(5).is_client_error());
        assert!(!GrpcStatus(5).is_server_error());
        for code in [2, 4, 12, 13, 14, 15] {
            assert!(GrpcStatus(code).is_server_error(), "{code}");
        }
        assert_eq!(GrpcStatus::from_reset(0x8), GrpcStatus::CANCELLED);
        assert_eq!(GrpcStatus::from_reset(0x7), GrpcStatus::UNAVAILABLE);
        assert_eq!(GrpcStatus::from_reset(0x2), GrpcStatus::INTERNAL);
        assert_eq!(GrpcStatus::from_http(404).name(), "UNIMPLEMENTED");
        assert_eq!(GrpcStatus::from_http(503), GrpcStatus::UNAVAILABLE);
        assert_eq!(GrpcStatus::from_http(500), GrpcStatus::UNKNOWN);
    }

    #[test]
    fn end_status_precedence() {
        let mut e = end(Some(5), Some(200));
        e.reset_code = Some(0x8);
        assert_eq!(e.status(), Some(GrpcStatus(5)));
        let mut e = end(None, Some(200));
        e.reset_code = Some(0x8);
        assert_eq!(e.status(), Some(GrpcStatus::CANCELLED));
        assert_eq!(end(None, Some(503)).status(), Some(GrpcStatus::UNAVAILABLE));
        assert_eq!(end(None, Some(200)).status(), None);
        let mut e = end(None, None);
        e.refused = true;
        assert_eq!(e.status(), Some(GrpcStatus::UNAVAILABLE));
    }

    fn run_call(
        t: &Telemetry,
        tt: &TestTelemetry,
        direction: ConnectionDirection,
        e: RpcCallEnd,
    ) -> SpanData {
        let call = t.rpc_call_start(
            &start("/demo.Echo/Say"),
            direction,
            Some("10.0.0.9:40000".parse().unwrap()),
        );
        assert!(call.traceparent().is_some());
        t.rpc_call_end(call, e);
        tt.spans().pop().expect("one span")
    }

    #[test]
    fn client_call_ok_and_error() {
        let (t, tt) = Telemetry::for_tests();
        let span = run_call(
            &t,
            &tt,
            ConnectionDirection::Outbound,
            end(Some(0), Some(200)),
        );
        assert_eq!(span.name, "demo.Echo/Say");
        assert_eq!(span.span_kind, SpanKind::Client);
        assert_eq!(attr(&span, "rpc.system.name"), Some(&Value::from("grpc")));
        assert_eq!(
            attr(&span, "rpc.method"),
            Some(&Value::from("demo.Echo/Say"))
        );
        assert_eq!(
            attr(&span, "rpc.response.status_code"),
            Some(&Value::from("OK"))
        );
        assert_eq!(attr(&span, "error.type"), None);
        assert_eq!(
            attr(&span, "network.protocol.version"),
            Some(&Value::from("2"))
        );

        let span = run_call(
            &t,
            &tt,
            ConnectionDirection::Outbound,
            end(Some(5), Some(200)),
        );
        assert_eq!(attr(&span, "error.type"), Some(&Value::from("NOT_FOUND")));
        assert!(matches!(span.status, Status::Error { .. }));

        let points = tt.metric_points(sc::METRIC_RPC_CLIENT_DURATION);
        assert_eq!(points.iter().filter_map(|p| p.count()).sum::<u64>(), 2);
        assert!(points.iter().any(|p| {
            p.attr("rpc.response.status_code") == Some(&Value::from("NOT_FOUND"))
                && p.attr("error.type") == Some(&Value::from("NOT_FOUND"))
        }));
        assert!(tt.metric_points(sc::METRIC_CLIENT_DURATION).is_empty());
    }

    #[test]
    fn server_call_errors_only_on_server_faults() {
        let (t, tt) = Telemetry::for_tests();
        let span = run_call(
            &t,
            &tt,
            ConnectionDirection::Inbound,
            end(Some(5), Some(200)),
        );
        assert_eq!(span.span_kind, SpanKind::Server);
        assert_eq!(attr(&span, "error.type"), None);
        assert_eq!(
            attr(&span, "client.address"),
            Some(&Value::from("10.0.0.9"))
        );
        let span = run_call(
            &t,
            &tt,
            ConnectionDirection::Inbound,
            end(Some(13), Some(200)),
        );
        assert_eq!(attr(&span, "error.type"), Some(&Value::from("INTERNAL")));
        let points = tt.metric_points(sc::METRIC_RPC_SERVER_DURATION);
        assert_eq!(points.iter().filter_map(|p| p.count()).sum::<u64>(), 2);
    }

    #[test]
    fn no_status_is_a_transport_error() {
        let (t, tt) = Telemetry::for_tests();
        let mut e = end(None, None);
        e.error = Some(ErrorType::ConnectionReset);
        let span = run_call(&t, &tt, ConnectionDirection::Outbound, e);
        assert_eq!(attr(&span, "rpc.response.status_code"), None);
        assert_eq!(
            attr(&span, "error.type"),
            Some(&Value::from("connection_reset"))
        );
    }

    #[test]
    fn method_set_is_capped() {
        let (t, tt) = Telemetry::for_tests();
        for i in 0..MAX_RPC_METHODS {
            let path = format!("/s.S/M{i}");
            let call = t.rpc_call_start(&start(&path), ConnectionDirection::Inbound, None);
            t.rpc_call_end(call, end(Some(0), Some(200)));
        }
        let call = t.rpc_call_start(&start("/s.S/Extra"), ConnectionDirection::Inbound, None);
        t.rpc_call_end(call, end(Some(0), Some(200)));
        let span = tt.spans().pop().expect("span");
        assert_eq!(attr(&span, "rpc.method"), Some(&Value::from("_OTHER")));
        assert_eq!(
            attr(&span, "rpc.method_original"),
            Some(&Value::from("s.S/Extra"))
        );
        // A method seen before the cap keeps its name.
        let call = t.rpc_call_start(&start("/s.S/M3"), ConnectionDirection::Inbound, None);
        t.rpc_call_end(call, end(Some(0), Some(200)));
        let span = tt.spans().pop().expect("span");
        assert_eq!(attr(&span, "rpc.method"), Some(&Value::from("s.S/M3")));
    }
}

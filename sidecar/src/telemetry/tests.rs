//! Unit tests of the telemetry handle against in-memory exporters: instrument names, units and
//! attributes, CLIENT spans, W3C propagation, redaction and `error.type`.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanId, SpanKind, Status, TraceId};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{Sampler, SpanData};

use super::testing::{PointValue, TestTelemetry};
use super::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn dst() -> SocketAddr {
    "10.0.0.7:8080".parse().unwrap()
}

fn start_req<'a>(method: &'a str, target: &'a str, host: Option<&'a str>) -> HttpRequestStart<'a> {
    HttpRequestStart {
        method,
        target,
        host,
        version: HttpVersion::Http11,
        destination: dst(),
        traceparent: None,
        tracestate: None,
        start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        reused_connection: false,
    }
}

fn end_req(start: SystemTime, status: Option<u16>, error: Option<ErrorType>) -> HttpRequestEnd {
    HttpRequestEnd {
        status,
        request_body_bytes: 11,
        response_body_bytes: 1234,
        error,
        end: start + Duration::from_millis(42),
    }
}

/// Runs one request through `telemetry` and returns its finished span.
fn one_request(
    t: &Telemetry,
    tt: &TestTelemetry,
    start: &HttpRequestStart<'_>,
    status: Option<u16>,
    error: Option<ErrorType>,
) -> SpanData {
    let before = tt.spans().len();
    let req = t.client_request_start(start);
    t.client_request_end(req, end_req(start.start, status, error));
    let mut spans = tt.spans();
    assert_eq!(spans.len(), before + 1, "exactly one span per request");
    spans.pop().unwrap()
}

fn span_attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn keys(attrs: &[KeyValue]) -> Vec<&str> {
    let mut k: Vec<&str> = attrs.iter().map(|kv| kv.key.as_str()).collect();
    k.sort_unstable();
    k
}

#[test]
fn client_duration_histogram_has_semconv_name_unit_buckets_and_attributes() {
    let (t, tt) = Telemetry::for_tests();
    let start = start_req("GET", "/items?id=1", Some("items.svc:8080"));
    one_request(&t, &tt, &start, Some(200), None);

    let points = tt.metric_points("http.client.request.duration");
    assert_eq!(points.len(), 1, "{points:?}");
    let p = &points[0];
    assert_eq!(p.unit, "s");
    assert_eq!(
        keys(&p.attributes),
        [
            "http.request.method",
            "http.response.status_code",
            "network.protocol.version",
            "server.address",
            "server.port",
            "url.scheme"
        ]
    );
    assert_eq!(p.attr("http.request.method"), Some(&Value::from("GET")));
    assert_eq!(p.attr("http.response.status_code"), Some(&Value::I64(200)));
    assert_eq!(p.attr("server.address"), Some(&Value::from("items.svc")));
    assert_eq!(p.attr("server.port"), Some(&Value::I64(8080)));
    assert_eq!(p.attr("url.scheme"), Some(&Value::from("http")));
    assert_eq!(
        p.attr("network.protocol.version"),
        Some(&Value::from("1.1"))
    );
    let PointValue::Histogram {
        count, sum, bounds, ..
    } = &p.value
    else {
        panic!("not a histogram: {p:?}");
    };
    assert_eq!(*count, 1);
    assert!((sum - 0.042).abs() < 1e-9, "duration {sum}");
    assert_eq!(
        bounds,
        &[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
    );
}

#[test]
fn body_size_histograms_and_active_requests() {
    let (t, tt) = Telemetry::for_tests();
    let start = start_req("POST", "/upload", Some("up.svc"));
    let req = t.client_request_start(&start);

    let active = tt.metric_points("http.client.active_requests");
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].unit, "{request}");
    assert_eq!(active[0].sum_value(), Some(1.0));
    assert!(matches!(
        active[0].value,
        PointValue::Sum {
            monotonic: false,
            ..
        }
    ));
    assert_eq!(
        keys(&active[0].attributes),
        [
            "http.request.method",
            "server.address",
            "server.port",
            "url.scheme"
        ]
    );

    t.client_request_end(req, end_req(start.start, Some(201), None));
    let active = tt.metric_points("http.client.active_requests");
    assert_eq!(active[0].sum_value(), Some(0.0));

    for (name, expected) in [
        ("http.client.request.body.size", 11.0),
        ("http.client.response.body.size", 1234.0),
    ] {
        let points = tt.metric_points(name);
        assert_eq!(points.len(), 1, "{name}");
        assert_eq!(points[0].unit, "By", "{name}");
        assert_eq!(points[0].count(), Some(1), "{name}");
        let PointValue::Histogram { sum, .. } = points[0].value else {
            panic!("{name} is not a histogram");
        };
        assert_eq!(sum, expected, "{name}");
        assert_eq!(
            points[0].attr("http.response.status_code"),
            Some(&Value::I64(201))
        );
    }
}

#[test]
fn dropped_request_leaves_active_requests_and_still_ends_its_span() {
    let (t, tt) = Telemetry::for_tests();
    let req = t.client_request_start(&start_req("GET", "/", Some("h")));
    assert_eq!(
        tt.metric_points("http.client.active_requests")[0].sum_value(),
        Some(1.0)
    );
    drop(req);
    assert_eq!(
        tt.metric_points("http.client.active_requests")[0].sum_value(),
        Some(0.0)
    );
    assert_eq!(tt.spans().len(), 1);
    assert!(tt.metric_points("http.client.request.duration").is_empty());
}

#[test]
fn client_span_kind_name_times_and_attributes() {
    let (t, tt) = Telemetry::for_tests();
    let mut start = start_req("GET", "/a/b?token=abc&page=2", Some("Api.Example:8080"));
    start.version = HttpVersion::Http10;
    let span = one_request(&t, &tt, &start, Some(200), None);

    assert_eq!(span.span_kind, SpanKind::Client);
    assert_eq!(span.name, "GET");
    assert_eq!(span.start_time, start.start);
    assert_eq!(span.end_time, start.start + Duration::from_millis(42));
    assert_eq!(span.status, Status::Unset);
    assert_eq!(
        span.parent_span_id,
        SpanId::INVALID,
        "no incoming traceparent: a root"
    );
    let expect: [(&str, Value); 11] = [
        ("http.request.method", "GET".into()),
        ("server.address", "api.example".into()),
        ("server.port", 8080_i64.into()),
        (
            "url.full",
            "http://Api.Example:8080/a/b?token=REDACTED&page=2".into(),
        ),
        ("network.peer.address", "10.0.0.7".into()),
        ("network.peer.port", 8080_i64.into()),
        ("network.protocol.version", "1.0".into()),
        ("http.response.status_code", 200_i64.into()),
        ("http.request.body.size", 11_i64.into()),
        ("http.response.body.size", 1234_i64.into()),
        ("http.request.method", "GET".into()),
    ];
    for (k, v) in &expect {
        assert_eq!(span_attr(&span, k), Some(v), "{k}");
    }
    assert_eq!(span_attr(&span, "error.type"), None);
    assert_eq!(span_attr(&span, "http.request.method_original"), None);
    assert_eq!(span.attributes.len(), 10, "{:?}", span.attributes);
    assert_eq!(span.instrumentation_scope.name(), "sidecar");
}

#[test]
fn incoming_traceparent_is_the_parent_and_outgoing_is_the_client_span() {
    let (t, tt) = Telemetry::for_tests();
    let incoming = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let mut start = start_req("GET", "/", Some("h"));
    start.traceparent = Some(&incoming);
    start.tracestate = Some("vendor=abc");
    let req = t.client_request_start(&start);
    let outgoing = req.traceparent().unwrap().to_owned();
    t.client_request_end(req, end_req(start.start, Some(200), None));
    let span = tt.spans().pop().unwrap();

    assert_eq!(
        span.span_context.trace_id(),
        TraceId::from_hex(TRACE_ID).unwrap()
    );
    assert_eq!(span.parent_span_id, SpanId::from_hex(PARENT_ID).unwrap());
    assert!(span.parent_span_is_remote);
    assert_eq!(span.span_context.trace_state().get("vendor"), Some("abc"));
    assert_eq!(
        outgoing,
        format!(
            "00-{}-{}-01",
            span.span_context.trace_id(),
            span.span_context.span_id()
        )
    );
    assert_ne!(
        span.span_context.span_id(),
        SpanId::from_hex(PARENT_ID).unwrap()
    );
}

#[test]
fn unsampled_parent_keeps_the_trace_id_with_flags_00() {
    let (t, tt) = Telemetry::for_tests();
    let incoming = format!("00-{TRACE_ID}-{PARENT_ID}-00");
    let mut start = start_req("GET", "/", Some("h"));
    start.traceparent = Some(&incoming);
    let req = t.client_request_start(&start);
    let outgoing = req.traceparent().unwrap().to_owned();
    t.client_request_end(req, end_req(start.start, Some(200), None));
    assert!(
        tt.spans().is_empty(),
        "parent-based: not sampled, not exported"
    );
    let parts: Vec<&str> = outgoing.split('-').collect();
    assert_eq!(parts.len(), 4, "{outgoing}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], TRACE_ID);
    assert_eq!(parts[2].len(), 16);
    assert_ne!(parts[2], "0000000000000000");
    assert_eq!(parts[3], "00");
    // Metrics do not depend on sampling.
    assert_eq!(
        tt.metric_points("http.client.request.duration")[0].count(),
        Some(1)
    );
}

#[test]
fn sampler_dropping_a_root_still_yields_a_valid_traceparent() {
    let (t, tt) = Telemetry::for_tests_with(Sampler::AlwaysOff);
    let start = start_req("GET", "/", Some("h"));
    let req = t.client_request_start(&start);
    let tp = req.traceparent().unwrap().to_owned();
    t.client_request_end(req, end_req(start.start, Some(200), None));
    assert!(tt.spans().is_empty());
    assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");
    assert_ne!(&tp[3..35], "00000000000000000000000000000000");
}

#[test]
fn missing_or_invalid_traceparent_starts_a_new_trace() {
    let (t, tt) = Telemetry::for_tests();
    for incoming in [None, Some("garbage"), Some("00-0000-0000-01")] {
        let mut start = start_req("GET", "/", Some("h"));
        start.traceparent = incoming;
        let req = t.client_request_start(&start);
        let tp = req.traceparent().unwrap().to_owned();
        t.client_request_end(req, end_req(start.start, Some(200), None));
        let span = tt.spans().pop().unwrap();
        assert_eq!(span.parent_span_id, SpanId::INVALID, "{incoming:?}");
        assert_eq!(
            tp,
            format!(
                "00-{}-{}-01",
                span.span_context.trace_id(),
                span.span_context.span_id()
            )
        );
    }
}

#[test]
fn unknown_method_is_other_with_original_and_span_name_http() {
    let (t, tt) = Telemetry::for_tests();
    let start = start_req("PURGE", "/cache", Some("h"));
    let span = one_request(&t, &tt, &start, Some(200), None);
    assert_eq!(span.name, "HTTP");
    assert_eq!(
        span_attr(&span, "http.request.method"),
        Some(&Value::from("_OTHER"))
    );
    assert_eq!(
        span_attr(&span, "http.request.method_original"),
        Some(&Value::from("PURGE"))
    );
    let p = &tt.metric_points("http.client.request.duration")[0];
    assert_eq!(p.attr("http.request.method"), Some(&Value::from("_OTHER")));
    assert_eq!(p.attr("http.request.method_original"), None);

    // Methods are case-sensitive: "get" is not GET.
    let span = one_request(&t, &tt, &start_req("get", "/", Some("h")), Some(200), None);
    assert_eq!(span.name, "HTTP");
}

#[test]
fn error_type_and_span_status_rules() {
    let (t, tt) = Telemetry::for_tests();
    let cases: [(Option<u16>, Option<ErrorType>, Option<&str>); 6] = [
        (Some(200), None, None),
        (Some(404), None, Some("404")),
        (Some(503), None, Some("503")),
        (
            None,
            Some(ErrorType::ConnectionReset),
            Some("connection_reset"),
        ),
        (None, Some(ErrorType::Timeout), Some("timeout")),
        (
            Some(200),
            Some(ErrorType::IncompleteResponse),
            Some("incomplete_response"),
        ),
    ];
    for (i, (status, error, expected)) in cases.into_iter().enumerate() {
        // A distinct host per case keeps the metric series apart.
        let host = format!("case{i}");
        let start = start_req("GET", "/", Some(&host));
        let span = one_request(&t, &tt, &start, status, error);
        assert_eq!(
            span_attr(&span, "error.type"),
            expected.map(Value::from).as_ref(),
            "case {i}"
        );
        match expected {
            None => assert_eq!(span.status, Status::Unset, "case {i}"),
            Some(_) => assert!(matches!(span.status, Status::Error { .. }), "case {i}"),
        }
        assert_eq!(
            span_attr(&span, "http.response.status_code"),
            status.map(|s| Value::I64(i64::from(s))).as_ref(),
            "case {i}"
        );
        let points = tt.metric_points("http.client.request.duration");
        let p = points
            .iter()
            .find(|p| p.attr("server.address") == Some(&Value::from(host.clone())))
            .unwrap();
        assert_eq!(
            p.attr("error.type"),
            expected.map(Value::from).as_ref(),
            "case {i}"
        );
    }
}

#[test]
fn no_host_header_uses_destination_ip() {
    let (t, tt) = Telemetry::for_tests();
    let span = one_request(&t, &tt, &start_req("GET", "/x", None), Some(200), None);
    assert_eq!(
        span_attr(&span, "server.address"),
        Some(&Value::from("10.0.0.7"))
    );
    assert_eq!(
        span_attr(&span, "url.full"),
        Some(&Value::from("http://10.0.0.7:8080/x"))
    );
}

#[test]
fn tcp_connection_metrics() {
    let (t, tt) = Telemetry::for_tests();
    t.tcp_connection(&TcpConnectionRecord {
        destination: "[fd00::9]:6379".parse().unwrap(),
        bytes_sent: 300,
        bytes_received: 4000,
        duration: Duration::from_millis(1500),
        protocol: ConnectionProtocol::Opaque,
        error: None,
    });
    t.tcp_connection(&TcpConnectionRecord {
        destination: "10.0.0.8:80".parse().unwrap(),
        bytes_sent: 10,
        bytes_received: 0,
        duration: Duration::from_millis(5),
        protocol: ConnectionProtocol::Http1,
        error: Some(ErrorType::ConnectionRefused),
    });

    let durations = tt.metric_points("sidecar.proxy.connection.duration");
    assert_eq!(durations.len(), 2);
    let opaque = durations
        .iter()
        .find(|p| p.attr("sidecar.protocol") == Some(&Value::from("opaque")))
        .unwrap();
    assert_eq!(opaque.unit, "s");
    assert_eq!(
        keys(&opaque.attributes),
        [
            "network.transport",
            "server.address",
            "server.port",
            "sidecar.direction",
            "sidecar.protocol"
        ]
    );
    assert_eq!(
        opaque.attr("sidecar.direction"),
        Some(&Value::from("outbound"))
    );
    assert_eq!(opaque.attr("server.address"), Some(&Value::from("fd00::9")));
    assert_eq!(opaque.attr("server.port"), Some(&Value::I64(6379)));
    assert_eq!(opaque.attr("network.transport"), Some(&Value::from("tcp")));
    let PointValue::Histogram { sum, .. } = opaque.value else {
        panic!("not a histogram");
    };
    assert!((sum - 1.5).abs() < 1e-9);
    let failed = durations
        .iter()
        .find(|p| p.attr("sidecar.protocol") == Some(&Value::from("http1")))
        .unwrap();
    assert_eq!(
        failed.attr("error.type"),
        Some(&Value::from("connection_refused"))
    );

    let io = tt.metric_points("sidecar.proxy.connection.io");
    assert_eq!(io.len(), 4, "two connections x two directions");
    assert!(io.iter().all(|p| p.unit == "By"));
    let value = |addr: &str, dir: &str| {
        io.iter()
            .find(|p| {
                p.attr("server.address") == Some(&Value::from(addr.to_owned()))
                    && p.attr("network.io.direction") == Some(&Value::from(dir.to_owned()))
            })
            .and_then(|p| p.sum_value())
    };
    assert_eq!(value("fd00::9", "transmit"), Some(300.0));
    assert_eq!(value("fd00::9", "receive"), Some(4000.0));
    assert_eq!(value("10.0.0.8", "transmit"), Some(10.0));
    assert_eq!(value("10.0.0.8", "receive"), Some(0.0));
    assert!(io.iter().all(|p| matches!(
        p.value,
        PointValue::Sum {
            monotonic: true,
            ..
        }
    )));

    // Only the opaque connection shows in the summary.
    let summary = tt.summary();
    assert_eq!(summary.destinations.len(), 1);
    assert_eq!(summary.destinations[0].destination, "[fd00::9]:6379");
    assert_eq!(summary.destinations[0].total.bytes_received, 4000);
}

#[test]
fn requests_feed_the_summary() {
    let (t, tt) = Telemetry::for_tests();
    let start = start_req("GET", "/", Some("sum.svc:8080"));
    one_request(&t, &tt, &start, Some(200), None);
    one_request(&t, &tt, &start, Some(502), None);
    let s = tt.summary();
    assert_eq!(s.destinations.len(), 1);
    let d = &s.destinations[0];
    assert_eq!(d.destination, "sum.svc:8080");
    assert_eq!(d.total.requests, 2);
    assert_eq!(d.total.errors, 1);
    let p50 = d.p50_ms.unwrap();
    assert!((p50 - 42.0).abs() < 0.5, "p50 {p50}");
    assert!(std::sync::Arc::ptr_eq(t.summary(), t.summary()));
}

#[test]
fn resource_carries_service_name() {
    let (t, tt) = Telemetry::for_tests();
    one_request(&t, &tt, &start_req("GET", "/", Some("h")), Some(200), None);
    let rm = tt.resource_metrics().unwrap();
    assert_eq!(
        rm.resource()
            .get(&opentelemetry::Key::from_static_str("service.name")),
        Some(Value::from("sidecar-test"))
    );
}

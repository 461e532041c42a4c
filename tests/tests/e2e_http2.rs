//! Privileged end-to-end tests of HTTP/2 and gRPC through the real `sidecar` binary with real
//! peers: a grpcio server and clients (`peers/grpc_peer.py`, generic handlers, raw bytes),
//! `nghttpd` with `h2load`, `nghttpx` (for the HTTP/1.1 `Upgrade: h2c`) with curl.
//!
//! Outbound: the server runs in svc and the client as the pod's app; inbound: the grpcio
//! server is the pod's application and the client runs in svc. What is asserted is the
//! contract of the HTTP/2 support: gRPC calls are one span each (`rpc.*` attributes, the status
//! name from `grpc-status`, `error.type` by side), `rpc.client.call.duration` /
//! `rpc.server.call.duration` instead of the HTTP duration histograms, other HTTP/2 streams are
//! measured like HTTP/1 requests with `network.protocol.version` = `2`, every forwarded stream
//! carries the span's `traceparent`, and HTTP/2 connections are `sidecar.protocol` = `http2`.
//!
//! The `*_direct_path` tests run the same peers and clients without a sidecar, so that a failure
//! of the other tests is the sidecar's and not the peers'.
//!
//! Needs root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool`, `nghttpd`, `nghttpx`,
//! `h2load`, `nghttp`, the peers' virtualenv (`cargo xtask setup`) and the sidecar binary
//! (`SIDECAR_BIN` or `target/release/sidecar`). Run with `--test-threads=1`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;

use sidecar_tests::cmd::Finished;
use sidecar_tests::h2peers::{
    self, max_in_flight, parse_h2load, GrpcCall, GrpcServer, H2loadSummary, LoadSummary,
    Nghttp2Server, StreamSummary, UnarySummary, GRPC_PEER,
};
use sidecar_tests::otlp::{DataPoint, MetricKind, ReceivedSpan};
use sidecar_tests::peers::{self, parse_summary, sha256_hex};
use sidecar_tests::world::{HTTP_PORT, POD_V4, SVC_V4, SVC_V6};
use sidecar_tests::{prereq, OtlpReceiver, PodWorld, Sidecar, SidecarConfig, TraceParent};

/// Bound for one client command.
const CLIENT: Duration = Duration::from_secs(60);
/// Bound for telemetry to reach the receiver.
const TELEMETRY: Duration = Duration::from_secs(20);
/// Bound for a peer to log what it saw.
const PEER_LOG: Duration = Duration::from_secs(10);
/// Port of the gRPC server (in svc, or the pod's application for inbound tests).
const GRPC_PORT: u16 = 50051;
/// Port of nghttpd in svc.
const NGHTTPD_PORT: u16 = 8090;
/// Port of nghttpx in svc (its backend is the world's HTTP peer on [`HTTP_PORT`]).
const NGHTTPX_PORT: u16 = 8091;
/// Size of the body fetched through nghttpx.
const NGHTTPX_BYTES: usize = 100_000;
/// Clock tolerance when comparing the sidecar's span times with the client's (same host clock).
const CLOCK_SLACK_NS: u64 = 100_000_000;

const SAY: &str = "/demo.Echo/Say";
const FAIL: &str = "/demo.Echo/Fail";
const STREAM: &str = "/demo.Echo/Stream";

/// A request id unique within this test binary.
fn id(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

fn start_sidecar(world: &PodWorld, rx: &OtlpReceiver, tag: &str) -> Sidecar {
    let cfg = SidecarConfig {
        otlp_endpoint: Some(rx.endpoint()),
        service_name: Some(format!("e2e-{tag}")),
        ..SidecarConfig::default()
    };
    world.start_sidecar(&cfg).expect("starting the sidecar")
}

fn world(tag: &str) -> (PodWorld, OtlpReceiver) {
    prereq::require_http2();
    let world = PodWorld::new(tag).expect("building the pod world");
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    (world, rx)
}

/// An outbound gRPC world: the grpcio server in svc, the sidecar (dropped first).
struct Outbound {
    _sidecar: Sidecar,
    server: GrpcServer,
    rx: OtlpReceiver,
    world: PodWorld,
}

fn grpc_outbound(tag: &str) -> Outbound {
    let (world, rx) = world(tag);
    let server = world
        .start_grpc_server("grpc-server", GRPC_PORT)
        .expect("starting the gRPC server in svc");
    let sidecar = start_sidecar(&world, &rx, tag);
    Outbound {
        _sidecar: sidecar,
        server,
        rx,
        world,
    }
}

fn svc_target() -> String {
    format!("{SVC_V4}:{GRPC_PORT}")
}

fn pod_target() -> String {
    format!("{POD_V4}:{GRPC_PORT}")
}

/// Runs `grpc_peer.py ARGS` as the app.
fn grpc_app(world: &PodWorld, args: &[String]) -> Finished {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    world
        .run_app_venv(GRPC_PEER, &args, CLIENT)
        .expect("running the gRPC client as the app")
}

/// Runs `grpc_peer.py ARGS` in svc.
fn grpc_svc(world: &PodWorld, args: &[String]) -> Finished {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    world
        .run_svc_venv(GRPC_PEER, &args, CLIENT)
        .expect("running the gRPC client in svc")
}

/// `grpc_peer.py unary` arguments: `count` calls of `Say`, with the `traceparent` metadata if
/// given.
fn say_args(target: &str, count: u64, traceparent: Option<&TraceParent>) -> Vec<String> {
    let mut args = strings(&["unary", "--target", target, "--count", &count.to_string()]);
    if let Some(tp) = traceparent {
        args.extend(strings(&["--traceparent", &tp.to_string()]));
    }
    args
}

/// `grpc_peer.py unary` arguments: one call of `Fail` that asks for `status`.
fn fail_args(target: &str, status: &str) -> Vec<String> {
    strings(&[
        "unary",
        "--target",
        target,
        "--method",
        "Fail",
        "--payload",
        status,
    ])
}

/// `grpc_peer.py stream` arguments: `count` messages of `size` bytes of the stream of `seed`,
/// `interval_ms` apart.
fn stream_args(target: &str, count: u64, size: u64, interval_ms: u64, seed: &str) -> Vec<String> {
    strings(&[
        "stream",
        "--target",
        target,
        "--count",
        &count.to_string(),
        "--size",
        &size.to_string(),
        "--interval-ms",
        &interval_ms.to_string(),
        "--seed",
        seed,
    ])
}

/// `grpc_peer.py stream` arguments: 20 messages of 100 bytes of the stream of `seed`, failing
/// with UNAVAILABLE after 5.
fn failing_stream_args(target: &str, seed: &str) -> Vec<String> {
    let mut args = stream_args(target, 20, 100, 0, seed);
    args.extend(strings(&[
        "--fail-after",
        "5",
        "--fail-status",
        "UNAVAILABLE",
    ]));
    args
}

/// `grpc_peer.py load` arguments: `unary` calls held 300 ms each by the server while a stream
/// of `messages` messages of `size` bytes of the stream of `seed` is read 10 ms per message.
fn load_args(target: &str, unary: usize, messages: usize, size: usize, seed: &str) -> Vec<String> {
    strings(&[
        "load",
        "--target",
        target,
        "--unary",
        &unary.to_string(),
        "--delay-ms",
        "300",
        "--stream-count",
        &messages.to_string(),
        "--stream-size",
        &size.to_string(),
        "--read-delay-ms",
        "10",
        "--seed",
        seed,
    ])
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// The JSON summary the gRPC client printed.
fn summary<T: DeserializeOwned>(out: &Finished) -> T {
    assert!(!out.timed_out, "the gRPC client timed out: {out:?}");
    parse_summary(&out.stdout_str()).unwrap_or_else(|e| panic!("{e}; stderr: {}", out.stderr_str()))
}

/// Asserts `n` OK calls with correct replies.
fn assert_unary_ok(out: &Finished, n: u64) -> UnarySummary {
    let s: UnarySummary = summary(out);
    assert!(
        out.success() && s.count("OK") == n && s.replies_ok,
        "{n} OK calls expected: {s:#?}; stderr: {}",
        out.stderr_str()
    );
    s
}

/// The traceparent a call's server saw; it must be there and well-formed.
fn call_tp(call: &GrpcCall) -> TraceParent {
    call.trace_parent()
        .unwrap_or_else(|| panic!("the server received no valid traceparent metadata: {call:#?}"))
}

/// Waits for at least `n` spans named `name`, SERVER spans if `server` else CLIENT spans;
/// returns them all.
async fn rpc_spans(rx: &OtlpReceiver, name: &str, server: bool, n: usize) -> Vec<ReceivedSpan> {
    rx.wait_for_spans(TELEMETRY, n, |s| s.name == name && s.is_server() == server)
        .await
        .unwrap_or_else(|| {
            let kind = if server { "SERVER" } else { "CLIENT" };
            panic!(
                "fewer than {n} {kind} spans named {name:?} within {TELEMETRY:?}; spans: {:#?}; \
                 connections the proxy handled (none: the call never reached the proxy; \
                 `sidecar.protocol` says how it was classified): {:#?}",
                rx.spans(),
                connection_points(rx)
            )
        })
}

/// The latest `sidecar.proxy.connection.duration` points, for failure messages.
fn connection_points(rx: &OtlpReceiver) -> Vec<DataPoint> {
    latest_points(rx, "sidecar.proxy.connection.duration", |_| true)
}

/// The span whose trace id and span id are those of the traceparent the call's server saw
/// (outbound: the CLIENT span; inbound: the SERVER span).
fn span_of<'a>(spans: &'a [ReceivedSpan], call: &GrpcCall) -> &'a ReceivedSpan {
    let tp = call_tp(call);
    spans
        .iter()
        .find(|s| s.trace_id == tp.trace_id && s.span_id == tp.parent_id)
        .unwrap_or_else(|| {
            panic!("no span is the forwarded traceparent {tp} of {call:#?}; spans: {spans:#?}")
        })
}

/// Asserts the gRPC attributes of a span: `status` is the status name; `error` the expected
/// `error.type` (and then span status error).
fn assert_rpc_span(
    s: &ReceivedSpan,
    method: &str,
    status: &str,
    error: Option<&str>,
    address: &str,
) {
    let a = &s.attributes;
    let rpc_method = method.trim_start_matches('/');
    assert_eq!(s.name, rpc_method, "{s:#?}");
    assert_eq!(a.str("rpc.system.name"), Some("grpc"), "{s:#?}");
    assert_eq!(a.str("rpc.method"), Some(rpc_method), "{s:#?}");
    assert_eq!(a.str("rpc.response.status_code"), Some(status), "{s:#?}");
    assert_eq!(a.str("server.address"), Some(address), "{s:#?}");
    assert_eq!(a.int("server.port"), Some(i64::from(GRPC_PORT)), "{s:#?}");
    assert_eq!(a.str("network.protocol.version"), Some("2"), "{s:#?}");
    assert_eq!(a.str("error.type"), error, "{s:#?}");
    if error.is_some() {
        assert_eq!(s.status_code, 2, "span status error expected: {s:#?}");
    } else {
        assert_ne!(s.status_code, 2, "span status must not be error: {s:#?}");
    }
}

/// The points of the latest export of `metric` that match `filter`.
fn latest_points(
    rx: &OtlpReceiver,
    metric: &str,
    filter: impl Fn(&DataPoint) -> bool,
) -> Vec<DataPoint> {
    rx.latest_metric(metric)
        .map(|m| m.points.into_iter().filter(|p| filter(p)).collect())
        .unwrap_or_default()
}

fn count_sum(points: &[DataPoint]) -> u64 {
    points.iter().filter_map(|p| p.value.count()).sum()
}

/// Waits until the latest export of the histogram `metric` has `n` or more measurements in
/// points matching `filter`; asserts exactly `n` and returns those points.
async fn wait_count(
    rx: &OtlpReceiver,
    metric: &str,
    n: u64,
    filter: impl Fn(&DataPoint) -> bool,
) -> Vec<DataPoint> {
    let got = rx
        .wait_for(TELEMETRY, |r| {
            let points = latest_points(r, metric, &filter);
            (count_sum(&points) >= n).then_some(points)
        })
        .await;
    let points = got.unwrap_or_else(|| {
        let points = latest_points(rx, metric, &filter);
        panic!(
            "{metric}: {} measurements in matching points within {TELEMETRY:?}, want {n}; \
             matching points: {points:#?}; latest {metric}: {:#?}; connections the proxy \
             handled: {:#?}",
            count_sum(&points),
            rx.latest_metric(metric),
            connection_points(rx)
        )
    });
    assert_eq!(count_sum(&points), n, "{metric}: {points:#?}");
    points
}

fn port_is(p: &DataPoint, port: u16) -> bool {
    p.attributes.int("server.port") == Some(i64::from(port))
}

fn rpc_point(p: &DataPoint, method: &str, status: &str) -> bool {
    port_is(p, GRPC_PORT)
        && p.attributes.str("rpc.method") == Some(method.trim_start_matches('/'))
        && p.attributes.str("rpc.response.status_code") == Some(status)
}

/// Asserts the attributes of an `rpc.*.call.duration` point.
fn assert_rpc_point(p: &DataPoint, address: &str, error: Option<&str>) {
    let a = &p.attributes;
    assert_eq!(a.str("rpc.system.name"), Some("grpc"), "{p:#?}");
    assert_eq!(a.str("server.address"), Some(address), "{p:#?}");
    assert_eq!(a.str("error.type"), error, "{p:#?}");
}

/// Asserts the unit and kind of `metric`.
fn assert_duration_histogram(rx: &OtlpReceiver, metric: &str) {
    let m = rx
        .latest_metric(metric)
        .unwrap_or_else(|| panic!("no {metric}"));
    assert_eq!(m.unit, "s", "{m:#?}");
    assert_eq!(m.kind, MetricKind::Histogram, "{m:#?}");
}

/// No point of `metric` (in any export so far) is for `port`.
fn assert_no_points_for_port(rx: &OtlpReceiver, metric: &str, port: u16) {
    let leaked: Vec<DataPoint> = rx
        .metrics_named(metric)
        .into_iter()
        .flat_map(|m| m.points)
        .filter(|p| port_is(p, port))
        .collect();
    assert!(
        leaked.is_empty(),
        "gRPC calls must not produce {metric} points: {leaked:#?}"
    );
}

/// Waits for `sidecar.proxy.connection.duration` to count `n` connections to `port`; asserts
/// exactly `n`, all `sidecar.protocol` = `http2`, none failed.
async fn assert_http2_connections(rx: &OtlpReceiver, port: u16, n: u64) {
    let points = wait_count(rx, "sidecar.proxy.connection.duration", n, |p| {
        port_is(p, port)
    })
    .await;
    for p in &points {
        assert_eq!(
            p.attributes.str("sidecar.protocol"),
            Some("http2"),
            "HTTP/2 connection not recorded as http2: {p:#?}"
        );
        assert_eq!(p.attributes.str("error.type"), None, "{p:#?}");
    }
}

/// Five unary calls to `target`: replies right; each call is one CLIENT span `demo.Echo/Say`
/// with the gRPC attributes (`server.address` = `address`), whose trace and span ids are the
/// `traceparent` the server received; `rpc.client.call.duration` counts 5 OK calls; no HTTP
/// duration points; the one connection is `http2`.
async fn unary_calls_are_client_spans(tag: &str, target: &str, address: &str) {
    let t = grpc_outbound(tag);
    let out = grpc_app(&t.world, &say_args(target, 5, None));
    assert_unary_ok(&out, 5);

    let calls = t
        .server
        .wait_calls(SAY, 5, PEER_LOG)
        .expect("the server's call log");
    assert_eq!(calls.len(), 5, "{calls:#?}");
    let spans = rpc_spans(&t.rx, "demo.Echo/Say", false, 5).await;
    let mut seen = BTreeSet::new();
    for call in &calls {
        assert_eq!(call.status, "OK", "{call:#?}");
        let s = span_of(&spans, call);
        assert!(s.is_client(), "{s:#?}");
        assert!(
            seen.insert(s.span_id.clone()),
            "one span per call: {calls:#?}"
        );
        assert_rpc_span(s, SAY, "OK", None, address);
    }
    assert_eq!(spans.len(), 5, "exactly one span per call: {spans:#?}");

    let points = wait_count(&t.rx, "rpc.client.call.duration", 5, |p| {
        rpc_point(p, SAY, "OK")
    })
    .await;
    assert_duration_histogram(&t.rx, "rpc.client.call.duration");
    for p in &points {
        assert_rpc_point(p, address, None);
    }
    assert_no_points_for_port(&t.rx, "http.client.request.duration", GRPC_PORT);
    assert_http2_connections(&t.rx, GRPC_PORT, 1).await;
}

/// gRPC to an IPv4 address. grpcio (gRPC C-core) connects with a dual-stack `AF_INET6` socket
/// to the IPv4-mapped address `::ffff:198.18.0.2`, so this is the path such clients take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_calls_are_client_spans_with_the_forwarded_traceparent() {
    unary_calls_are_client_spans("h2-unary", &svc_target(), &SVC_V4.to_string()).await;
}

/// The same over IPv6 (`[fd5e:1dec::2]:50051`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_calls_over_ipv6_are_client_spans_with_the_forwarded_traceparent() {
    let target = format!("[{SVC_V6}]:{GRPC_PORT}");
    unary_calls_are_client_spans("h2-unary-v6", &target, &SVC_V6.to_string()).await;
}

/// A server stream of 20 messages 20 ms apart arrives whole and in order (the digest of the
/// concatenation), and its CLIENT span lasts at least as long as the stream: it ends with the
/// trailers, not with the response headers; it also lies within the client's call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_server_stream_span_lasts_until_the_end_of_the_stream() {
    const COUNT: u64 = 20;
    const SIZE: u64 = 100;
    const INTERVAL_MS: u64 = 20;
    let t = grpc_outbound("h2-stream");
    let out = grpc_app(
        &t.world,
        &stream_args(&svc_target(), COUNT, SIZE, INTERVAL_MS, "h2-stream"),
    );
    let s: StreamSummary = summary(&out);
    assert!(out.success() && s.status == "OK", "{s:#?}");
    assert_eq!(s.messages, COUNT, "{s:#?}");
    let want = peers::pattern((COUNT * SIZE) as usize, b"h2-stream");
    assert_eq!(
        s.sha256,
        sha256_hex(&want),
        "messages missing or out of order"
    );
    let (first, last) = (s.first_ns.expect("first"), s.last_ns.expect("last"));
    let streaming = last - first;
    assert!(
        streaming >= (COUNT - 1) * INTERVAL_MS * 1_000_000 * 9 / 10,
        "the server did not space its messages: {s:#?}"
    );

    let calls = t
        .server
        .wait_calls(STREAM, 1, PEER_LOG)
        .expect("the server's call log");
    let spans = rpc_spans(&t.rx, "demo.Echo/Stream", false, 1).await;
    let span = span_of(&spans, &calls[0]);
    assert_rpc_span(span, STREAM, "OK", None, &SVC_V4.to_string());
    let duration = span.end_unix_nano.saturating_sub(span.start_unix_nano);
    assert!(
        duration >= streaming,
        "span lasted {duration} ns, the stream {streaming} ns (first to last message): {span:#?}"
    );
    assert!(
        span.start_unix_nano + CLOCK_SLACK_NS >= s.start_ns
            && span.end_unix_nano <= s.end_ns + CLOCK_SLACK_NS,
        "span [{}, {}] outside the client's call [{}, {}]",
        span.start_unix_nano,
        span.end_unix_nano,
        s.start_ns,
        s.end_ns
    );
    let points = wait_count(&t.rx, "rpc.client.call.duration", 1, |p| {
        rpc_point(p, STREAM, "OK")
    })
    .await;
    let sum = points[0].value.as_f64().unwrap_or(0.0);
    assert!(
        sum >= streaming as f64 / 1e9,
        "recorded duration {sum} s < streaming time {streaming} ns: {points:#?}"
    );
}

/// A unary call aborted with NOT_FOUND before any message (grpcio sends a trailers-only
/// response) and a server stream that fails with UNAVAILABLE after 5 messages (status in the
/// trailers after DATA): both CLIENT spans carry the status name, `error.type` = that name and
/// status error; so do their `rpc.client.call.duration` points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_error_statuses_come_from_trailers_only_and_from_trailers_after_data() {
    let t = grpc_outbound("h2-status");
    let target = svc_target();
    let out = grpc_app(&t.world, &fail_args(&target, "NOT_FOUND"));
    let u: UnarySummary = summary(&out);
    assert_eq!(u.count("NOT_FOUND"), 1, "{u:#?}");

    let out = grpc_app(&t.world, &failing_stream_args(&target, "h2-fail"));
    let s: StreamSummary = summary(&out);
    assert_eq!(s.status, "UNAVAILABLE", "{s:#?}");
    assert_eq!(s.messages, 5, "{s:#?}");
    assert_eq!(s.sha256, sha256_hex(&peers::pattern(500, b"h2-fail")));

    let address = SVC_V4.to_string();
    for (method, status) in [(FAIL, "NOT_FOUND"), (STREAM, "UNAVAILABLE")] {
        let calls = t.server.wait_calls(method, 1, PEER_LOG).expect("call log");
        let spans = rpc_spans(&t.rx, method.trim_start_matches('/'), false, 1).await;
        let span = span_of(&spans, &calls[0]);
        assert_rpc_span(span, method, status, Some(status), &address);
        let points = wait_count(&t.rx, "rpc.client.call.duration", 1, |p| {
            rpc_point(p, method, status)
        })
        .await;
        assert_rpc_point(&points[0], &address, Some(status));
    }
    assert_no_points_for_port(&t.rx, "http.client.request.duration", GRPC_PORT);
}

/// The grpcio server is the pod's application, the client calls it from svc with its own
/// traceparent: each call is a SERVER span continuing the caller's trace and parent of what the
/// application receives (through the proxy: peer 127.0.0.6); INTERNAL is an error
/// (`error.type`), NOT_FOUND is not (the caller's fault); `rpc.server.call.duration` likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_inbound_calls_are_server_spans() {
    let (world, rx) = world("h2-inbound");
    let app = world
        .start_app_grpc_server("grpc-app", GRPC_PORT)
        .expect("starting the gRPC app in the pod");
    let _sidecar = start_sidecar(&world, &rx, "h2-inbound");
    let target = pod_target();
    let caller = TraceParent::generate(&id("inbound"));
    let out = grpc_svc(&world, &say_args(&target, 3, Some(&caller)));
    assert_unary_ok(&out, 3);
    for status in ["INTERNAL", "NOT_FOUND"] {
        let out = grpc_svc(&world, &fail_args(&target, status));
        assert_eq!(summary::<UnarySummary>(&out).count(status), 1, "{out:?}");
    }

    let says = app.wait_calls(SAY, 3, PEER_LOG).expect("the app's log");
    let fails = app.wait_calls(FAIL, 2, PEER_LOG).expect("the app's log");
    let address = POD_V4.to_string();
    for call in says.iter().chain(&fails) {
        assert_eq!(
            call.peer, "127.0.0.6",
            "the call did not come through the proxy: {call:#?}"
        );
    }
    let spans = rpc_spans(&rx, "demo.Echo/Say", true, 3).await;
    for call in &says {
        let s = span_of(&spans, call);
        assert!(s.is_server(), "{s:#?}");
        assert_eq!(s.trace_id, caller.trace_id, "the caller's trace continues");
        assert_eq!(
            s.parent_span_id, caller.parent_id,
            "parent = the caller's span"
        );
        assert_rpc_span(s, SAY, "OK", None, &address);
    }
    let spans = rpc_spans(&rx, "demo.Echo/Fail", true, 2).await;
    for call in &fails {
        let s = span_of(&spans, call);
        match call.status.as_str() {
            "INTERNAL" => assert_rpc_span(s, FAIL, "INTERNAL", Some("INTERNAL"), &address),
            "NOT_FOUND" => assert_rpc_span(s, FAIL, "NOT_FOUND", None, &address),
            other => panic!("unexpected call {other}: {call:#?}"),
        }
    }

    let points = wait_count(&rx, "rpc.server.call.duration", 3, |p| {
        rpc_point(p, SAY, "OK")
    })
    .await;
    assert_duration_histogram(&rx, "rpc.server.call.duration");
    assert_rpc_point(&points[0], &address, None);
    for (status, error) in [("INTERNAL", Some("INTERNAL")), ("NOT_FOUND", None)] {
        let points = wait_count(&rx, "rpc.server.call.duration", 1, |p| {
            rpc_point(p, FAIL, status)
        })
        .await;
        assert_rpc_point(&points[0], &address, error);
    }
    assert_no_points_for_port(&rx, "http.server.request.duration", GRPC_PORT);
}

/// Over ONE channel: 100 unary calls in flight at once (each held 300 ms by the server) while
/// a server stream of 8 MiB is read slowly (10 ms per 64 KiB message), so flow control has to
/// hold the stream back without stalling the other streams. Every reply and every byte arrives
/// intact, the server ran at least 50 calls at the same time, all calls came over one upstream
/// connection (one peer port, one `sidecar.proxy.connection.duration` measurement), and every
/// call is one OK CLIENT span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_grpc_streams_and_flow_control_over_one_connection() {
    const UNARY: usize = 100;
    const MESSAGES: usize = 128;
    const SIZE: usize = 64 * 1024;
    let t = grpc_outbound("h2-load");
    let out = grpc_app(
        &t.world,
        &load_args(&svc_target(), UNARY, MESSAGES, SIZE, "h2-load"),
    );
    let s: LoadSummary = summary(&out);
    assert!(out.success(), "{s:#?}; stderr: {}", out.stderr_str());
    assert_eq!(s.unary.count("OK"), UNARY as u64, "{:#?}", s.unary);
    assert!(s.unary.replies_ok, "{:#?}", s.unary);
    assert_eq!(s.stream.status, "OK", "{:#?}", s.stream);
    assert_eq!(s.stream.bytes, (MESSAGES * SIZE) as u64, "{:#?}", s.stream);
    assert_eq!(
        s.stream.sha256,
        sha256_hex(&peers::pattern(MESSAGES * SIZE, b"h2-load")),
        "8 MiB stream corrupted or reordered"
    );

    let says = t.server.wait_calls(SAY, UNARY, PEER_LOG).expect("call log");
    let streams = t.server.wait_calls(STREAM, 1, PEER_LOG).expect("call log");
    let in_flight = max_in_flight(&says);
    assert!(
        in_flight >= 50,
        "the calls were not concurrent: at most {in_flight} in flight"
    );
    let ports: BTreeSet<u16> = says.iter().chain(&streams).map(|c| c.peer_port).collect();
    assert_eq!(
        ports.len(),
        1,
        "calls came over several connections: {ports:?}"
    );

    let spans = rpc_spans(&t.rx, "demo.Echo/Say", false, UNARY).await;
    let mut seen = BTreeSet::new();
    for call in &says {
        let span = span_of(&spans, call);
        assert!(seen.insert(span.span_id.clone()), "{call:#?}");
        assert_rpc_span(span, SAY, "OK", None, &SVC_V4.to_string());
    }
    let stream_spans = rpc_spans(&t.rx, "demo.Echo/Stream", false, 1).await;
    assert_rpc_span(
        span_of(&stream_spans, &streams[0]),
        STREAM,
        "OK",
        None,
        &SVC_V4.to_string(),
    );
    wait_count(&t.rx, "rpc.client.call.duration", UNARY as u64, |p| {
        rpc_point(p, SAY, "OK")
    })
    .await;
    assert_http2_connections(&t.rx, GRPC_PORT, 1).await;
}

/// `h2load -n 2000 -c 4 -m 16` (HTTP/2 with prior knowledge) against nghttpd: every request
/// succeeds with a 2xx, the sidecar measures each of them as an HTTP request with
/// `network.protocol.version` = `2` (the `http.client.request.duration` counts add up to 2000)
/// and the 4 connections as `http2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_against_nghttpd_every_request_is_measured() {
    const N: u64 = 2000;
    let (world, rx) = world("h2-h2load");
    let _nghttpd = start_nghttpd(&world);
    let _sidecar = start_sidecar(&world, &rx, "h2-h2load");
    let (text, s) = h2load(&world, N);
    assert_eq!(
        (s.total, s.succeeded, s.failed, s.errored, s.timeout),
        (N, N, 0, 0, 0),
        "{text}"
    );
    assert_eq!(s.status_2xx, N, "{text}");

    let points = wait_count(&rx, "http.client.request.duration", N, |p| {
        port_is(p, NGHTTPD_PORT) && p.attributes.str("network.protocol.version") == Some("2")
    })
    .await;
    for p in &points {
        assert_eq!(
            p.attributes.int("http.response.status_code"),
            Some(200),
            "{p:#?}"
        );
        assert_eq!(
            p.attributes.str("http.request.method"),
            Some("GET"),
            "{p:#?}"
        );
    }
    assert_http2_connections(&rx, NGHTTPD_PORT, 4).await;
}

/// curl `--http2` (an HTTP/1.1 request with `Upgrade: h2c`, answered 101 and then over
/// HTTP/2) and curl `--http2-prior-knowledge` through the sidecar to nghttpx, which proxies to
/// the world's HTTP peer: bodies intact; each request is ONE CLIENT span with status 200 and
/// `network.protocol.version` = `2`, whose ids are the `traceparent` the backend received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_and_prior_knowledge_requests_are_measured_as_http2() {
    let (world, rx) = world("h2-h2c");
    let _nghttpx = start_nghttpx(&world);
    let _sidecar = start_sidecar(&world, &rx, "h2-h2c");
    let upgrade = id("upgrade");
    curl_h2c_upgrade(&world, &upgrade);
    let prior = id("prior");
    curl_h2_prior_knowledge(&world, &prior);

    for rid in [&upgrade, &prior] {
        let req = world
            .http
            .wait_for_request(rid, PEER_LOG)
            .expect("the backend's log");
        let tp = req
            .traceparent()
            .unwrap_or_else(|| panic!("no traceparent reached the backend: {req:#?}"));
        let spans = rx
            .wait_for_spans(TELEMETRY, 1, |s| url_span(s, rid))
            .await
            .unwrap_or_else(|| panic!("no CLIENT span for {rid}; spans: {:#?}", rx.spans()));
        let s = &spans[0];
        assert_eq!(
            (s.trace_id.as_str(), s.span_id.as_str()),
            (tp.trace_id.as_str(), tp.parent_id.as_str()),
            "the forwarded traceparent is not the span's: {s:#?}"
        );
        let a = &s.attributes;
        assert_eq!(a.str("http.request.method"), Some("GET"), "{s:#?}");
        assert_eq!(a.int("http.response.status_code"), Some(200), "{s:#?}");
        assert_eq!(a.str("network.protocol.version"), Some("2"), "{s:#?}");
        assert_eq!(
            a.str("server.address"),
            Some(SVC_V4.to_string().as_str()),
            "{s:#?}"
        );
        assert_eq!(
            a.int("server.port"),
            Some(i64::from(NGHTTPX_PORT)),
            "{s:#?}"
        );
        assert_ne!(s.status_code, 2, "{s:#?}");
    }
    // The prior-knowledge span ends after the upgrade's: once it is in, all of the upgrade's are.
    let upgrade_spans: Vec<ReceivedSpan> = rx
        .spans()
        .into_iter()
        .filter(|s| url_span(s, &upgrade))
        .collect();
    assert_eq!(
        upgrade_spans.len(),
        1,
        "one span for the upgraded request, not one per protocol: {upgrade_spans:#?}"
    );
    wait_count(&rx, "http.client.request.duration", 2, |p| {
        port_is(p, NGHTTPX_PORT) && p.attributes.str("network.protocol.version") == Some("2")
    })
    .await;
}

/// nghttpd in svc on [`NGHTTPD_PORT`], serving `/file` (1 KiB).
fn start_nghttpd(world: &PodWorld) -> Nghttp2Server {
    let htdocs = world.dir.join("htdocs");
    h2peers::write_file(&htdocs.join("file"), &peers::pattern(1024, b"h2load"))
        .expect("writing the served file");
    Nghttp2Server::nghttpd(
        "nghttpd",
        &world.svc,
        NGHTTPD_PORT,
        &htdocs,
        false,
        SocketAddr::new(IpAddr::V4(SVC_V4), NGHTTPD_PORT),
        world.dir.path(),
    )
    .expect("starting nghttpd")
}

/// `h2load -n N -c 4 -m 16` as the app against nghttpd's `/file`; asserts it succeeded and
/// returns its output and summary.
fn h2load(world: &PodWorld, n: u64) -> (String, H2loadSummary) {
    let url = format!("http://{SVC_V4}:{NGHTTPD_PORT}/file");
    let out = world
        .run_app(
            "h2load",
            &["-n", &n.to_string(), "-c", "4", "-m", "16", &url],
            CLIENT,
        )
        .expect("running h2load");
    let text = out.stdout_str();
    assert!(out.success(), "h2load failed: {text}\n{}", out.stderr_str());
    let s = parse_h2load(&text).expect("h2load's summary");
    (text, s)
}

/// nghttpx in svc on [`NGHTTPX_PORT`], proxying to the world's HTTP peer.
fn start_nghttpx(world: &PodWorld) -> Nghttp2Server {
    Nghttp2Server::nghttpx(
        "nghttpx",
        &world.svc,
        NGHTTPX_PORT,
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), HTTP_PORT),
        SocketAddr::new(IpAddr::V4(SVC_V4), NGHTTPX_PORT),
        world.dir.path(),
    )
    .expect("starting nghttpx")
}

/// `http://<svc>:<nghttpx>/bytes/<NGHTTPX_BYTES>?id=<rid>`.
fn nghttpx_url(rid: &str) -> String {
    format!("http://{SVC_V4}:{NGHTTPX_PORT}/bytes/{NGHTTPX_BYTES}?id={rid}")
}

/// The body of [`nghttpx_url`].
fn nghttpx_body() -> Vec<u8> {
    peers::pattern(NGHTTPX_BYTES, peers::DEFAULT_SEED)
}

/// `curl --http2` as the app to nghttpx: an HTTP/1.1 request with `Upgrade: h2c`, answered 101
/// and then over HTTP/2, with the whole body.
fn curl_h2c_upgrade(world: &PodWorld, rid: &str) {
    let out = world
        .curl(&["-v", "--http2", &nghttpx_url(rid)], CLIENT)
        .expect("curl");
    assert!(out.success(), "curl --http2 failed: {}", out.stderr_str());
    let err = out.stderr_str();
    assert!(
        err.contains("< HTTP/1.1 101") && err.contains("< HTTP/2 200"),
        "no h2c upgrade: {err}"
    );
    assert!(
        out.stdout == nghttpx_body(),
        "upgraded response body differs"
    );
}

/// `curl --http2-prior-knowledge` as the app to nghttpx: HTTP/2, with the whole body.
fn curl_h2_prior_knowledge(world: &PodWorld, rid: &str) {
    let out = world
        .curl(
            &[
                "--http2-prior-knowledge",
                "-w",
                "%{stderr}%{http_version}",
                &nghttpx_url(rid),
            ],
            CLIENT,
        )
        .expect("curl");
    assert!(
        out.success(),
        "curl --http2-prior-knowledge failed: {}",
        out.stderr_str()
    );
    assert_eq!(out.stderr_str().trim(), "2", "not HTTP/2");
    assert!(
        out.stdout == nghttpx_body(),
        "prior-knowledge response body differs"
    );
}

fn url_span(s: &ReceivedSpan, needle: &str) -> bool {
    s.is_client()
        && s.attributes
            .str("url.full")
            .is_some_and(|u| u.contains(needle))
}

/// A gRPC request (5-byte message prefix + payload) in a file, for `nghttp -d`.
fn grpc_request_file(world: &PodWorld, name: &str, payload: &[u8]) -> String {
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
    body.extend_from_slice(payload);
    let path = world.dir.join(name);
    h2peers::write_file(&path, &body).expect("writing the request");
    path.to_string_lossy().into_owned()
}

/// `nghttp -v` as the app: a gRPC POST of `file` to `path`; returns the frame trace.
fn nghttp_grpc(world: &PodWorld, path: &str, file: &str) -> String {
    let url = format!("http://{SVC_V4}:{GRPC_PORT}{path}");
    let out = world
        .run_app(
            "nghttp",
            &[
                "-v",
                "-n",
                "-d",
                file,
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                &url,
            ],
            CLIENT,
        )
        .expect("running nghttp");
    assert!(out.success(), "nghttp failed: {out:?}");
    out.stdout_str()
}

fn received_frames<'a>(trace: &'a str, kind: &str) -> Vec<&'a str> {
    let needle = format!("recv {kind} frame <");
    trace
        .lines()
        .filter(|l| l.contains(&needle) && !l.contains("stream_id=0>"))
        .collect()
}

/// Control: the gRPC peers without a sidecar (the pod cgroup is not redirected): unary, error
/// and streaming calls, the concurrent load, the inbound direction; and, seen by `nghttp`, the
/// NOT_FOUND answer is trailers-only while the failing stream's status comes in trailers after
/// DATA, as the error-status test assumes.
#[test]
fn grpc_peers_work_on_the_direct_path() {
    prereq::require_http2_test_bed();
    let world = PodWorld::new("h2-direct-grpc").expect("building the pod world");
    let server = world
        .start_grpc_server("grpc-server", GRPC_PORT)
        .expect("starting the gRPC server");
    let target = svc_target();
    let tp = TraceParent::generate("direct");
    let out = grpc_app(&world, &say_args(&target, 3, Some(&tp)));
    assert_unary_ok(&out, 3);
    let calls = server.wait_calls(SAY, 3, PEER_LOG).expect("call log");
    for c in &calls {
        assert_eq!(c.peer, POD_V4.to_string(), "{c:#?}");
        assert_eq!(
            c.trace_parent(),
            Some(tp.clone()),
            "metadata passed as sent"
        );
    }
    let out = grpc_app(&world, &fail_args(&target, "NOT_FOUND"));
    assert_eq!(
        summary::<UnarySummary>(&out).count("NOT_FOUND"),
        1,
        "{out:?}"
    );
    let out = grpc_app(&world, &stream_args(&target, 20, 100, 20, "direct"));
    let s: StreamSummary = summary(&out);
    assert_eq!((s.status.as_str(), s.messages), ("OK", 20), "{s:#?}");
    assert_eq!(s.sha256, sha256_hex(&peers::pattern(2000, b"direct")));
    assert!(
        s.last_ns.unwrap_or(0) - s.first_ns.unwrap_or(0) >= 19 * 18_000_000,
        "{s:#?}"
    );
    let out = grpc_app(&world, &failing_stream_args(&target, "df"));
    let s: StreamSummary = summary(&out);
    assert_eq!(
        (s.status.as_str(), s.messages),
        ("UNAVAILABLE", 5),
        "{s:#?}"
    );

    // What the wire carries, as nghttp sees it.
    let file = grpc_request_file(&world, "fail.req", b"NOT_FOUND");
    let trace = nghttp_grpc(&world, FAIL, &file);
    let headers = received_frames(&trace, "HEADERS");
    assert_eq!(headers.len(), 1, "trailers-only expected: {trace}");
    assert!(
        headers[0].contains("flags=0x05"),
        "END_STREAM|END_HEADERS: {trace}"
    );
    assert!(received_frames(&trace, "DATA").is_empty(), "{trace}");
    assert!(trace.contains("grpc-status: 5"), "{trace}");
    let spec = br#"{"count": 20, "size": 100, "fail_after": 5, "fail_status": "UNAVAILABLE"}"#;
    let file = grpc_request_file(&world, "stream.req", spec);
    let trace = nghttp_grpc(&world, STREAM, &file);
    let headers = received_frames(&trace, "HEADERS");
    assert_eq!(headers.len(), 2, "headers, then trailers: {trace}");
    assert!(headers[1].contains("flags=0x05"), "{trace}");
    assert!(!received_frames(&trace, "DATA").is_empty(), "{trace}");
    let status_at = trace
        .find("grpc-status: 14")
        .expect("grpc-status 14 in the trailers");
    let last_data = trace.rfind("recv DATA frame").expect("DATA frames");
    assert!(
        status_at > last_data,
        "the status follows the DATA: {trace}"
    );

    let out = grpc_app(&world, &load_args(&target, 100, 128, 65536, "direct-load"));
    let s: LoadSummary = parse_summary(&out.stdout_str()).expect("load summary");
    assert!(out.success(), "{s:#?}");
    assert_eq!(
        s.stream.sha256,
        sha256_hex(&peers::pattern(128 * 65536, b"direct-load"))
    );
    let says = server.wait_calls(SAY, 103, PEER_LOG).expect("call log");
    let load: Vec<GrpcCall> = says
        .into_iter()
        .filter(|c| c.traceparent.is_none())
        .collect();
    assert!(max_in_flight(&load) >= 50, "{}", max_in_flight(&load));
    let ports: BTreeSet<u16> = load.iter().map(|c| c.peer_port).collect();
    assert_eq!(ports.len(), 1, "{ports:?}");

    // Inbound: the application in the pod, the client in svc.
    let app = world
        .start_app_grpc_server("grpc-app", GRPC_PORT)
        .expect("starting the gRPC app");
    let out = grpc_svc(&world, &say_args(&pod_target(), 2, None));
    assert_unary_ok(&out, 2);
    let calls = app.wait_calls(SAY, 2, PEER_LOG).expect("app log");
    assert!(
        calls.iter().all(|c| c.peer == SVC_V4.to_string()),
        "{calls:#?}"
    );
}

/// Control: nghttpd with h2load, nghttpx with curl's h2c upgrade and prior knowledge, without
/// a sidecar.
#[test]
fn nghttp2_peers_work_on_the_direct_path() {
    prereq::require_http2_test_bed();
    let world = PodWorld::new("h2-direct-ng").expect("building the pod world");
    let _nghttpd = start_nghttpd(&world);
    let (_, s) = h2load(&world, 2000);
    assert_eq!((s.succeeded, s.status_2xx), (2000, 2000), "{s:?}");

    let _nghttpx = start_nghttpx(&world);
    curl_h2c_upgrade(&world, "direct-up");
    curl_h2_prior_knowledge(&world, "direct-pk");
    for rid in ["direct-up", "direct-pk"] {
        let req = world
            .http
            .wait_for_request(rid, PEER_LOG)
            .expect("backend log");
        assert!(req.header("traceparent").is_none(), "{req:#?}");
    }
}

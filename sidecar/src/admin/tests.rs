//! Tests of the admin server (routing and status codes against a real bound server), and of
//! `/metrics` against `promtool check metrics` and a real Prometheus server scraping it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use sidecar_tests::tempdir::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::prometheus::PrometheusReader;
use super::stats::Stats;
use super::{AdminServer, AdminState, Readiness};
use crate::export::stats::{ExportSignal, ExportStats};
use crate::export::summary::Summary;
use crate::proxy::ProxyCounters;
use crate::telemetry::rpc::RpcCallEnd;
use crate::telemetry::selfobs::{self, SelfSources};
use crate::telemetry::url::Redactor;
use crate::telemetry::{
    ConnectionDirection, ConnectionProtocol, ErrorType, HttpRequestEnd, HttpRequestStart,
    HttpVersion, ServerRequestInfo, TcpConnectionRecord, TcpDirection, TcpObservation, TcpOutcome,
    Telemetry,
};

const PROMTOOL: &str = "/usr/bin/promtool";
const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Bound of one request of the test clients.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A meter provider reading into a fresh [`PrometheusReader`], and the project's
/// [`Telemetry`] over it.
struct Pipeline {
    prometheus: PrometheusReader,
    meter_provider: SdkMeterProvider,
    _tracer_provider: SdkTracerProvider,
    telemetry: Telemetry,
}

impl Pipeline {
    fn new() -> Self {
        let prometheus = PrometheusReader::new();
        let resource = Resource::builder()
            .with_service_name("admin-test")
            .with_attribute(opentelemetry::KeyValue::new(
                "k8s.pod.name",
                "web-5d8f7-abcde",
            ))
            .build();
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(prometheus.reader())
            .with_resource(resource.clone())
            .build();
        let tracer_provider = SdkTracerProvider::builder().with_resource(resource).build();
        let telemetry = Telemetry::new(
            &tracer_provider,
            &meter_provider,
            Arc::new(Summary::new()),
            Redactor::default(),
        );
        register_self_observation(&meter_provider);
        Self {
            prometheus,
            meter_provider,
            _tracer_provider: tracer_provider,
            telemetry,
        }
    }

    /// Records varied traffic through every kind of instrument the sidecar exports.
    fn record_traffic(&self) {
        let t = &self.telemetry;
        let start = SystemTime::now();
        let req = |method, target, host, destination: &str| HttpRequestStart {
            method,
            target,
            host,
            version: HttpVersion::Http11,
            destination: destination.parse().unwrap(),
            traceparent: None,
            tracestate: None,
            start,
            reused_connection: false,
        };
        let end = |status, error, ms| HttpRequestEnd {
            status,
            request_body_bytes: 120,
            response_body_bytes: 4096,
            error,
            end: start + Duration::from_millis(ms),
        };
        // Outbound HTTP: successes, a 5xx, a transport error, an unknown method.
        for (i, ms) in [3u64, 8, 15, 40, 120, 900].into_iter().enumerate() {
            let r = t.client_request_start(&req(
                "GET",
                "/items?id=7",
                Some("items.svc:8080"),
                "10.0.0.3:8080",
            ));
            t.client_request_end(r, end(Some(if i == 4 { 503 } else { 200 }), None, ms));
        }
        let r = t.client_request_start(&req("POST", "/orders", Some("orders"), "10.0.0.4:80"));
        t.client_request_end(r, end(None, Some(ErrorType::ConnectionReset), 30));
        let r = t.client_request_start(&req("PURGE", "/c", None, "[fd00::5]:8080"));
        t.client_request_end(r, end(Some(404), None, 2));
        // One request still in flight: active_requests stays at 1.
        let in_flight = t.client_request_start(&req("GET", "/slow", Some("slow"), "10.0.0.9:80"));

        // Inbound HTTP.
        let info = ServerRequestInfo {
            client: "10.1.0.2:41234".parse().unwrap(),
            user_agent: Some("curl/8.5.0"),
        };
        for (status, ms) in [(200u16, 5u64), (200, 12), (500, 250)] {
            let r = t.server_request_start(
                &req("GET", "/api/v1/users", Some("web:8080"), "10.0.0.2:8080"),
                &info,
            );
            t.server_request_end(r, end(Some(status), None, ms));
        }

        // gRPC both ways.
        let rpc_end = |grpc_status, ms| RpcCallEnd {
            grpc_status,
            http_status: Some(200),
            reset_code: None,
            refused: false,
            error: None,
            request_body_bytes: 64,
            response_body_bytes: 256,
            end: start + Duration::from_millis(ms),
        };
        let mut grpc = req(
            "POST",
            "/shop.Cart/AddItem",
            Some("cart:50051"),
            "10.0.0.6:50051",
        );
        grpc.version = HttpVersion::Http2;
        let call = t.rpc_call_start(&grpc, ConnectionDirection::Outbound, None);
        t.rpc_call_end(call, rpc_end(Some(0), 7));
        let call = t.rpc_call_start(&grpc, ConnectionDirection::Outbound, None);
        t.rpc_call_end(call, rpc_end(Some(14), 70));
        let call = t.rpc_call_start(
            &grpc,
            ConnectionDirection::Inbound,
            Some("10.1.0.3:50000".parse().unwrap()),
        );
        t.rpc_call_end(call, rpc_end(Some(5), 3));

        // Proxied TCP connections.
        for (protocol, error) in [
            (ConnectionProtocol::Http1, None),
            (ConnectionProtocol::Opaque, None),
            (ConnectionProtocol::Http2, Some(ErrorType::Timeout)),
        ] {
            t.tcp_connection(&TcpConnectionRecord {
                destination: "10.0.0.3:8080".parse().unwrap(),
                bytes_sent: 1000,
                bytes_received: 20_000,
                duration: Duration::from_millis(1500),
                protocol,
                error,
            });
        }

        // Kernel observations.
        for (outcome, established) in [
            (TcpOutcome::Ok, true),
            (TcpOutcome::Refused, false),
            (TcpOutcome::Reset, true),
        ] {
            t.tcp_observed(&TcpObservation {
                local: "10.0.0.2:40000".parse().unwrap(),
                remote: "10.0.0.3:8080".parse().unwrap(),
                direction: TcpDirection::Outbound,
                outcome,
                established,
                srtt: established.then_some(Duration::from_micros(350)),
                retransmits: 2,
                bytes_sent: 500,
                bytes_received: 9000,
                duration: Duration::from_millis(800),
                connect_latency: established.then_some(Duration::from_micros(400)),
            });
        }
        t.tcp_observed(&TcpObservation {
            local: "10.0.0.2:8080".parse().unwrap(),
            remote: "10.1.0.2:41234".parse().unwrap(),
            direction: TcpDirection::Inbound,
            outcome: TcpOutcome::Ok,
            established: true,
            srtt: Some(Duration::from_micros(200)),
            retransmits: 0,
            bytes_sent: 9000,
            bytes_received: 500,
            duration: Duration::from_millis(700),
            connect_latency: None,
        });
        t.tcp_ringbuf_overflows(3);
        // Keep one request in flight until the end of the recording.
        std::mem::forget(in_flight);
    }

    fn state(&self, readiness: Arc<Readiness>) -> AdminState {
        AdminState {
            readiness,
            prometheus: self.prometheus.clone(),
            stats: Arc::new(test_stats),
        }
    }
}

/// The sidecar's own instruments (process, proxy, eBPF maps, export health) on
/// `meter_provider`, with some values behind them.
fn register_self_observation(meter_provider: &SdkMeterProvider) {
    use opentelemetry::metrics::MeterProvider as _;
    use std::sync::atomic::Ordering;

    let meter = meter_provider.meter("sidecar");
    let proxy = Arc::new(ProxyCounters::default());
    proxy.accepted.store(12, Ordering::Relaxed);
    proxy.orig_dst_failures.store(1, Ordering::Relaxed);
    proxy.connect_failures.store(2, Ordering::Relaxed);
    proxy.active_outbound.store(3, Ordering::Relaxed);
    selfobs::register(
        &meter,
        SelfSources {
            proxy,
            maps: Some(Arc::new(|| {
                vec![
                    ("ORIG_DST_BY_PEER".to_owned(), 100, 65_536),
                    ("TCP_CONNS".to_owned(), 0, 65_536),
                ]
            })),
        },
    );
    let export = ExportStats::new();
    export.set_exporter_type(ExportSignal::Spans, "otlp_grpc_span_exporter");
    export.set_exporter_type(ExportSignal::Metrics, "otlp_grpc_metric_exporter");
    export.register(&meter);
    export.set_queue_capacity(2048);
    export.set_queue_size(17);
    export.span_dropped();
    export.record_export(ExportSignal::Spans, 512, None, Duration::from_millis(12));
    export.record_export(
        ExportSignal::Spans,
        64,
        Some("unavailable"),
        Duration::from_millis(900),
    );
    export.record_export(ExportSignal::Metrics, 40, None, Duration::from_millis(5));
}

fn test_stats() -> Stats {
    let mut s = Stats {
        version: "9.9.9-test".into(),
        uptime_secs: 12.5,
        ready: true,
        ..Stats::default()
    };
    s.connections.accepted = 42;
    s.kernel.map_fill.push(("ORIG_DST_BY_PEER".into(), 0.125));
    s
}

/// One HTTP response as the raw client saw it.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `raw` (a whole request) to `addr`, reads until the server closes, parses the reply.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
    let io = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(raw).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(REQUEST_TIMEOUT, io)
        .await
        .expect("request timed out")
        .expect("request failed");
    let text = String::from_utf8(buf).expect("reply is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("reply has a head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `method path` over HTTP/1.0 (the server closes after the reply).
async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    exchange(
        addr,
        format!("{method} {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes(),
    )
    .await
}

async fn start_server(
    state: AdminState,
) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let server = AdminServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    let shutdown = CancellationToken::new();
    let handle = server.spawn(state, shutdown.clone());
    (addr, shutdown, handle)
}

#[tokio::test]
async fn endpoints_status_codes_and_bodies() {
    let pipeline = Pipeline::new();
    pipeline.record_traffic();
    let readiness = Arc::new(Readiness::default());
    let (addr, shutdown, handle) = start_server(pipeline.state(Arc::clone(&readiness))).await;

    let r = request(addr, "GET", "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

    // Not ready: 503 with every reason, one per line.
    let r = request(addr, "GET", "/readyz").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.body.lines().collect::<Vec<_>>(),
        [
            "proxy listeners not up",
            "interception programs not attached"
        ]
    );
    readiness.set_listeners_up();
    let r = request(addr, "GET", "/readyz").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "interception programs not attached\n")
    );
    readiness.set_programs_attached();
    let r = request(addr, "GET", "/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    readiness.set_draining();
    let r = request(addr, "GET", "/readyz").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "draining after a stop signal\n")
    );
    // Liveness is unaffected by draining.
    assert_eq!(request(addr, "GET", "/healthz").await.status, 200);

    let r = request(addr, "GET", "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(
        r.body
            .contains("# TYPE http_client_request_duration_seconds histogram\n"),
        "{}",
        r.body
    );
    assert!(r.body.contains("target_info{"), "{}", r.body);
    // The query string does not change the route.
    assert_eq!(request(addr, "GET", "/metrics?x=1").await.status, 200);

    // HEAD: same status and headers, no body.
    let r = request(addr, "HEAD", "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(r.body, "");
    let r = request(addr, "HEAD", "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, ""));

    let r = request(addr, "GET", "/stats").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let stats: Stats = serde_json::from_str(&r.body).unwrap();
    assert_eq!(stats, test_stats());

    for path in ["/", "/metric", "/metrics/", "/stats.json", "/healthz/x"] {
        let r = request(addr, "GET", path).await;
        assert_eq!(r.status, 404, "{path}");
    }
    assert_eq!(request(addr, "POST", "/nope").await.status, 404);
    for (method, path) in [
        ("POST", "/metrics"),
        ("PUT", "/stats"),
        ("DELETE", "/readyz"),
        ("OPTIONS", "/healthz"),
        ("PATCH", "/metrics"),
    ] {
        let r = request(addr, method, path).await;
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method} {path}");
    }
    // Nothing above changed state.
    assert!(readiness.is_draining());
    assert_eq!(request(addr, "GET", "/readyz").await.status, 503);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("server stops after shutdown")
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}

#[tokio::test]
async fn http11_keep_alive_serves_several_requests_on_one_connection() {
    let pipeline = Pipeline::new();
    let (addr, shutdown, handle) =
        start_server(pipeline.state(Arc::new(Readiness::default()))).await;
    // Two pipelined requests, the second closing the connection.
    let r = exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.starts_with("ok\n") && r.body.contains("HTTP/1.1 404"),
        "{}",
        r.body
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn oversized_request_head_is_refused() {
    let pipeline = Pipeline::new();
    let (addr, shutdown, handle) =
        start_server(pipeline.state(Arc::new(Readiness::default()))).await;
    let big = "a".repeat(1 << 20);
    let raw = format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n");
    let io = async {
        let mut stream = TcpStream::connect(addr).await?;
        // The server may close before everything is written.
        let _ = stream.write_all(raw.as_bytes()).await;
        let mut buf = Vec::new();
        let _ = stream.read_to_end(&mut buf).await;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(REQUEST_TIMEOUT, io)
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text:.200}"
    );
    // The server still serves others.
    assert_eq!(request(addr, "GET", "/healthz").await.status, 200);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn metrics_collection_failure_is_500_with_the_message() {
    let pipeline = Pipeline::new();
    pipeline.meter_provider.shutdown().unwrap();
    let (addr, shutdown, handle) =
        start_server(pipeline.state(Arc::new(Readiness::default()))).await;
    let r = request(addr, "GET", "/metrics").await;
    assert_eq!(r.status, 500);
    assert!(r.body.starts_with("collecting metrics: "), "{}", r.body);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_ends_idle_keep_alive_connections() {
    let pipeline = Pipeline::new();
    let (addr, shutdown, handle) =
        start_server(pipeline.state(Arc::new(Readiness::default()))).await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let started = Instant::now();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("server stops with an idle connection open")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    // The idle connection was closed by the server.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "idle connection still open");
}

/// The exposition of a real pipeline after varied traffic.
fn real_exposition() -> String {
    let pipeline = Pipeline::new();
    pipeline.record_traffic();
    pipeline.prometheus.render().unwrap()
}

fn require(tool: &str) {
    assert!(
        Path::new(tool).exists(),
        "{tool}: promtool (Debian package prometheus) is not installed; run cargo xtask setup"
    );
}

#[test]
fn promtool_accepts_the_exposition_without_lint_problems() {
    require(PROMTOOL);
    let text = real_exposition();
    // Every instrument family the sidecar exports is there, under its Prometheus name.
    for family in [
        "http_client_request_duration_seconds histogram",
        "http_client_request_body_size_bytes histogram",
        "http_client_response_body_size_bytes histogram",
        "http_client_active_requests gauge",
        "http_server_request_duration_seconds histogram",
        "http_server_request_body_size_bytes histogram",
        "http_server_response_body_size_bytes histogram",
        "http_server_active_requests gauge",
        "rpc_client_call_duration_seconds histogram",
        "rpc_server_call_duration_seconds histogram",
        "sidecar_proxy_connection_duration_seconds histogram",
        "sidecar_proxy_connection_io_bytes_total counter",
        "sidecar_tcp_rtt_seconds histogram",
        "sidecar_tcp_retransmits_total counter",
        "sidecar_tcp_connections_total counter",
        "sidecar_tcp_bytes_total counter",
        "sidecar_tcp_connection_duration_seconds histogram",
        "sidecar_tcp_connect_duration_seconds histogram",
        "sidecar_tcp_ringbuf_overflows_total counter",
        "target_info gauge",
        // Self-observation.
        "process_cpu_time_seconds_total counter",
        "process_memory_usage_bytes gauge",
        "sidecar_proxy_connections_active gauge",
        "sidecar_proxy_errors_total counter",
        "sidecar_ebpf_map_fill_ratio gauge",
        "otel_sdk_processor_span_processed_total counter",
        "otel_sdk_processor_span_queue_size gauge",
        "otel_sdk_processor_span_queue_capacity gauge",
        "otel_sdk_exporter_span_exported_total counter",
        "otel_sdk_exporter_metric_data_point_exported_total counter",
        "otel_sdk_exporter_operation_duration_seconds histogram",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family}\n")),
            "no {family} in\n{text}"
        );
    }
    let mut child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = wait_bounded(child, Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
        "promtool check metrics: {}\nstdout: {stdout}\nstderr: {stderr}\nexposition:\n{text}",
        out.status
    );
}

/// Waits for `child` at most `limit`, killing it past that (then panics).
fn wait_bounded(mut child: Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().unwrap(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("promtool did not finish within {limit:?}");
            }
        }
    }
}

/// A child process killed (and reaped) when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port (bound, read, released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `GET path` on Prometheus's HTTP API; the parsed JSON when the reply is 200.
async fn prometheus_api(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let io = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(REQUEST_TIMEOUT, io).await.ok()?.ok()?;
    let text = String::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// The `data.result` vector of an instant query.
async fn query(addr: SocketAddr, expr: &str) -> Vec<serde_json::Value> {
    let Some(v) = prometheus_api(addr, &format!("/api/v1/query?query={expr}")).await else {
        return Vec::new();
    };
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_admin_server() {
    assert!(
        Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS}: prometheus (Debian package prometheus) is not installed; run cargo xtask setup"
    );
    let pipeline = Pipeline::new();
    pipeline.record_traffic();
    let readiness = Arc::new(Readiness::default());
    readiness.set_listeners_up();
    readiness.set_programs_attached();
    let (admin, shutdown, handle) = start_server(pipeline.state(readiness)).await;

    let dir = TempDir::create("admin-prometheus").unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: sidecar\n    static_configs:\n      - targets: ['{admin}']\n"
        ),
    )
    .unwrap();
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log_path = dir.join("prometheus.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut prometheus = KillOnDrop(
        Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting prometheus"),
    );
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(40);
    let mut up = false;
    let mut series = Vec::new();
    while Instant::now() < deadline {
        if let Ok(Some(status)) = prometheus.0.try_wait() {
            panic!("prometheus exited early ({status}):\n{}", log_text());
        }
        if !up {
            up = query(web, "up")
                .await
                .iter()
                .any(|r| r["metric"]["job"] == "sidecar" && r["value"][1] == "1");
        }
        if up {
            series = query(web, "http_client_request_duration_seconds_count").await;
            if !series.is_empty() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        up,
        "up{{job=\"sidecar\"}} never became 1; prometheus log:\n{}",
        log_text()
    );
    assert!(
        !series.is_empty(),
        "http_client_request_duration_seconds_count never appeared; prometheus log:\n{}",
        log_text()
    );
    let get_200 = series
        .iter()
        .find(|s| {
            let m = &s["metric"];
            m["http_request_method"] == "GET" && m["http_response_status_code"] == "200"
        })
        .unwrap_or_else(|| panic!("no GET 200 series in {series:?}"));
    let m = &get_200["metric"];
    assert_eq!(m["job"], "sidecar");
    assert_eq!(m["instance"], admin.to_string());
    assert_eq!(m["server_address"], "items.svc");
    assert_eq!(
        m["otel_scope_name"].as_str().map(str::is_empty),
        Some(false)
    );
    assert_eq!(get_200["value"][1], "5");

    // A counter and the resource.
    let io = query(web, "sidecar_proxy_connection_io_bytes_total").await;
    assert!(!io.is_empty(), "no sidecar_proxy_connection_io_bytes_total");
    let target = query(web, "target_info").await;
    assert!(
        target
            .iter()
            .any(|t| t["metric"]["service_name"] == "admin-test"
                && t["metric"]["k8s_pod_name"] == "web-5d8f7-abcde"),
        "{target:?}"
    );

    drop(prometheus);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .unwrap()
        .unwrap();
    drop(dir);
}

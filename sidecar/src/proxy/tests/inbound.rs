//! Inbound path tests over real loopback sockets. `sk_lookup` cannot steer loopback traffic, so
//! two set-ups stand in for it: (a) the connection handler is called directly with a socket
//! accepted on a test listener, whose local address (127.0.0.2:PORT) plays the original
//! destination and whose second connection (from 127.0.0.6) plays the application; (b) the
//! running proxy with an inbound listener and a mock inbound destination.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::Value;
use opentelemetry_sdk::trace::SpanData;

use super::*;
use crate::proxy::inbound::PASSTHROUGH_SOURCE_V4;

const INCOMING_TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn span_attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn inbound_config() -> ProxyConfig {
    ProxyConfig {
        inbound_addrs: vec!["127.0.0.1:0".parse().unwrap()],
        ..test_config()
    }
}

/// Set-up (a): a listener standing for the pod's served port, and the proxy's shared state.
struct DirectBed {
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    tt: TestTelemetry,
}

async fn direct_bed(listen: &str) -> DirectBed {
    let (telemetry, tt) = Telemetry::for_tests();
    let proxy = Proxy::bind(
        inbound_config(),
        Arc::new(MockOrigDst::failing()),
        telemetry,
    )
    .await
    .unwrap();
    let listener = TcpListener::bind(listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    observe::take_exchanges(addr);
    observe::take_connections(addr);
    DirectBed {
        listener,
        addr,
        shared: Arc::new(proxy.shared),
        tt,
    }
}

impl DirectBed {
    /// Connects a caller to the served address, hands the accepted socket to the inbound
    /// handler, and accepts the proxy's connection to the "application". Returns the caller's
    /// socket, the application's socket, the address the application saw the proxy come from,
    /// and the handler task.
    async fn connect(&self) -> (TcpStream, TcpStream, SocketAddr, JoinHandle<()>) {
        let (caller, accepted) = bounded("caller connect", async {
            tokio::join!(TcpStream::connect(self.addr), self.listener.accept())
        })
        .await;
        let caller = caller.unwrap();
        let (accepted, peer) = accepted.unwrap();
        assert_eq!(accepted.local_addr().unwrap(), self.addr);
        let task = tokio::spawn(handle_connection(
            Arc::clone(&self.shared),
            accepted,
            peer,
            ConnectionDirection::Inbound,
        ));
        let (app, from) = bounded("proxy connects to the app", self.listener.accept())
            .await
            .unwrap();
        (caller, app, from, task)
    }
}

/// Set-up (b): the running proxy with one inbound listener whose connections go to `app`.
async fn start_inbound(app: SocketAddr) -> (Harness, SocketAddr) {
    let (telemetry, tt) = Telemetry::for_tests();
    let proxy = Proxy::bind(
        inbound_config(),
        Arc::new(MockOrigDst::failing()),
        telemetry,
    )
    .await
    .unwrap()
    .with_inbound_dst(Arc::new(MockOrigDst::fixed(app)));
    let addr = proxy.local_addrs()[0];
    let inbound = proxy.inbound_local_addrs()[0];
    let counters = proxy.counters();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(proxy.run(shutdown.clone(), Duration::from_secs(5)));
    (
        Harness {
            addr,
            shutdown,
            run: Some(run),
            counters,
            tt,
        },
        inbound,
    )
}

#[tokio::test]
async fn inbound_opaque_is_byte_exact_from_the_passthrough_source() {
    let bed = direct_bed("127.0.0.2:0").await;
    let (mut caller, mut app, from, task) = bed.connect().await;
    assert_eq!(from.ip(), IpAddr::V4(PASSTHROUGH_SOURCE_V4));

    // The caller speaks first with binary data (opaque), both sides half-close.
    let request = random_bytes(300 * 1024, 7);
    let response = random_bytes(200 * 1024, 8);
    let req = request.clone();
    let writer = tokio::spawn(async move {
        caller.write_all(&req).await.unwrap();
        caller.shutdown().await.unwrap();
        caller
    });
    let mut got = Vec::new();
    read_to_end(&mut app, &mut got).await.unwrap();
    assert!(got == request, "application got different bytes");
    app.write_all(&response).await.unwrap();
    app.shutdown().await.unwrap();
    let mut caller = bounded("writer", writer).await.unwrap();
    let mut back = Vec::new();
    read_to_end(&mut caller, &mut back).await.unwrap();
    assert!(back == response, "caller got different bytes");
    bounded("handler ends", task).await.unwrap();

    let rec = connection(bed.addr).await;
    assert_eq!(
        rec,
        Connection {
            inbound: true,
            bytes_sent: request.len() as u64,
            bytes_received: response.len() as u64,
            protocol: ConnectionProtocol::Opaque,
            error: None,
        }
    );
    let io = bed.tt.metric_points("sidecar.proxy.connection.io");
    assert_eq!(io.len(), 2, "{io:?}");
    for p in &io {
        assert_eq!(p.attr("sidecar.direction"), Some(&Value::from("inbound")));
        assert_eq!(
            p.attr("server.port"),
            Some(&Value::I64(bed.addr.port().into()))
        );
    }
    assert!(
        bed.tt.summary().destinations.is_empty(),
        "inbound connections stay out of the outbound summary"
    );
}

#[tokio::test]
async fn inbound_ipv6_comes_from_the_ipv6_loopback() {
    let bed = direct_bed("[::1]:0").await;
    let (mut caller, mut app, from, task) = bed.connect().await;
    assert_eq!(from.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
    caller
        .write_all(b"GET /v6 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    read_until(&mut app, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
    app.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    let mut back = Vec::new();
    read_until(&mut caller, &mut back, |g| g.ends_with(b"ok")).await;
    drop(caller);
    drop(app);
    bounded("handler ends", task).await.unwrap();
    let ex = exchanges(bed.addr, 1).await;
    assert_eq!(ex.len(), 1);
    assert!(ex[0].inbound);
    assert_eq!(ex[0].status, Some(200));
    let spans = bed.tt.spans();
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].span_kind, SpanKind::Server);
    assert_eq!(
        span_attr(&spans[0], "client.address"),
        Some(&Value::from("::1"))
    );
}

#[tokio::test]
async fn inbound_request_gets_a_server_span_whose_context_reaches_the_app() {
    let bed = direct_bed("127.0.0.2:0").await;
    let (mut caller, mut app, from, task) = bed.connect().await;
    assert_eq!(from.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)));
    let caller_addr = caller.local_addr().unwrap();
    let request = format!(
        "POST /orders?id=3&token=s3cr3t HTTP/1.1\r\nHost: Orders.svc:8080\r\nUser-Agent: test-agent/1\r\ntraceparent: {INCOMING_TP}\r\ntracestate: congo=t61rcWkgMzE\r\nContent-Length: 5\r\n\r\nhello"
    );
    caller.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut app, &mut got, |g| g.ends_with(b"hello")).await;
    let response = b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nyes";
    app.write_all(response).await.unwrap();
    let mut back = Vec::new();
    read_until(&mut caller, &mut back, |g| g.len() >= response.len()).await;
    assert_eq!(back, response);
    drop(caller);
    drop(app);
    bounded("handler ends", task).await.unwrap();

    // Byte-exact but for the traceparent value; tracestate unchanged.
    let tp = assert_same_but_traceparent(&got, request.as_bytes(), 1);
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        text.contains(&format!(
            "\r\ntraceparent: {}\r\ntracestate: congo=t61rcWkgMzE\r\n",
            tp[0]
        )),
        "{text}"
    );

    let spans = bed.tt.spans();
    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert_eq!(span.span_kind, SpanKind::Server);
    assert_eq!(span.name, "POST /orders");
    assert_eq!(span.parent_span_id.to_string(), "00f067aa0ba902b7");
    assert_eq!(
        span.span_context.trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(
        tp[0],
        format!(
            "00-{}-{}-01",
            span.span_context.trace_id(),
            span.span_context.span_id()
        ),
        "the app receives the SERVER span's context"
    );
    let ex = exchanges(bed.addr, 1).await;
    assert_eq!(ex[0].incoming_traceparent.as_deref(), Some(INCOMING_TP));
    assert_eq!(ex[0].outgoing_traceparent.as_deref(), Some(tp[0].as_str()));

    let attr = |k| span_attr(span, k);
    assert_eq!(attr("http.request.method"), Some(&Value::from("POST")));
    assert_eq!(attr("url.scheme"), Some(&Value::from("http")));
    assert_eq!(attr("url.path"), Some(&Value::from("/orders")));
    assert_eq!(attr("url.query"), Some(&Value::from("id=3&token=REDACTED")));
    assert_eq!(attr("server.address"), Some(&Value::from("orders.svc")));
    assert_eq!(
        attr("server.port"),
        Some(&Value::I64(bed.addr.port().into())),
        "the served port"
    );
    assert_eq!(
        attr("client.address"),
        Some(&Value::from(caller_addr.ip().to_string()))
    );
    assert_eq!(
        attr("client.port"),
        Some(&Value::I64(caller_addr.port().into()))
    );
    assert_eq!(
        attr("user_agent.original"),
        Some(&Value::from("test-agent/1"))
    );
    assert_eq!(attr("network.protocol.version"), Some(&Value::from("1.1")));
    assert_eq!(attr("http.response.status_code"), Some(&Value::I64(201)));
    assert_eq!(attr("http.request.body.size"), Some(&Value::I64(5)));
    assert_eq!(attr("http.response.body.size"), Some(&Value::I64(3)));
    assert_eq!(
        attr("http.route"),
        Some(&Value::from("/orders")),
        "heuristic route: no identifier segment"
    );
    match attr("sidecar.connection.rtt") {
        Some(Value::F64(rtt)) => assert!(*rtt > 0.0 && *rtt < 1.0, "rtt {rtt}"),
        other => panic!("sidecar.connection.rtt: {other:?}"),
    }
    assert_eq!(attr("sidecar.connection.retransmits"), Some(&Value::I64(0)));
    let text_attrs = format!("{:?}", span.attributes);
    assert!(
        !text_attrs.contains("s3cr3t"),
        "secret leaked: {text_attrs}"
    );
    assert_eq!(span.status, Status::Unset);

    let points = bed.tt.metric_points("http.server.request.duration");
    assert_eq!(points.len(), 1, "{points:?}");
    let p = &points[0];
    assert_eq!(p.unit, "s");
    let mut keys: Vec<&str> = p.attributes.iter().map(|kv| kv.key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "http.request.method",
            "http.response.status_code",
            "http.route",
            "network.protocol.version",
            "server.port",
            "url.scheme"
        ]
    );
    assert_eq!(
        p.attr("server.port"),
        Some(&Value::I64(bed.addr.port().into()))
    );
    assert_eq!(p.attr("http.response.status_code"), Some(&Value::I64(201)));
    let crate::telemetry::testing::PointValue::Histogram { bounds, .. } = &p.value else {
        panic!("not a histogram: {p:?}");
    };
    assert_eq!(bounds, &crate::telemetry::DURATION_BUCKETS.to_vec());
    let sizes = bed.tt.metric_points("http.server.request.body.size");
    assert_eq!(sizes.len(), 1);
    let active = bed.tt.metric_points("http.server.active_requests");
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].sum_value(), Some(0.0));
    assert!(bed
        .tt
        .metric_points("http.client.request.duration")
        .is_empty());
    let rec = connection(bed.addr).await;
    assert!(rec.inbound);
    assert_eq!(rec.protocol, ConnectionProtocol::Http1);
}

#[tokio::test]
async fn inbound_4xx_is_not_an_error_but_5xx_is() {
    let mut app = upstream(|mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| count(g, b"\r\n\r\n") >= 2).await;
        s.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\nHTTP/1.1 503 Unavailable\r\nContent-Length: 4\r\n\r\nbusy",
        )
        .await
        .unwrap();
        read_to_end(&mut s, &mut got).await.unwrap();
        s.peer_addr().unwrap()
    })
    .await;
    let (h, inbound) = start_inbound(app.addr).await;
    let mut c = bounded("connect", TcpStream::connect(inbound))
        .await
        .unwrap();
    c.write_all(b"GET /missing HTTP/1.1\r\nHost: a\r\n\r\nGET /busy HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, |g| g.ends_with(b"busy")).await;
    c.shutdown().await.unwrap();
    read_to_end(&mut c, &mut got).await.unwrap();
    let from = app.result().await;
    assert_eq!(from.ip(), IpAddr::V4(PASSTHROUGH_SOURCE_V4));
    let ex = exchanges(app.addr, 2).await;
    assert_eq!(ex.len(), 2);
    assert!(ex.iter().all(|e| e.inbound));

    let spans = h.tt.spans();
    assert_eq!(spans.len(), 2);
    assert!(spans.iter().all(|s| s.span_kind == SpanKind::Server));
    let by_status = |code: i64| {
        spans
            .iter()
            .find(|s| span_attr(s, "http.response.status_code") == Some(&Value::I64(code)))
            .unwrap_or_else(|| panic!("no span with status {code}"))
    };
    let not_found = by_status(404);
    assert_eq!(not_found.status, Status::Unset);
    assert_eq!(span_attr(not_found, "error.type"), None);
    let busy = by_status(503);
    assert_eq!(busy.status, Status::error(""));
    assert_eq!(span_attr(busy, "error.type"), Some(&Value::from("503")));

    let points = h.tt.metric_points("http.server.request.duration");
    assert_eq!(points.len(), 2, "{points:?}");
    for p in &points {
        match p.attr("http.response.status_code") {
            Some(Value::I64(404)) => assert_eq!(p.attr("error.type"), None),
            Some(Value::I64(503)) => {
                assert_eq!(p.attr("error.type"), Some(&Value::from("503")))
            }
            other => panic!("unexpected status {other:?}"),
        }
        assert_eq!(
            p.attr("server.port"),
            Some(&Value::I64(app.addr.port().into()))
        );
    }
    assert_eq!(h.counters.inbound_accepted.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn inbound_app_closing_early_is_a_server_error() {
    let mut app = upstream(|mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
            .await
            .unwrap();
    })
    .await;
    let (h, inbound) = start_inbound(app.addr).await;
    let mut c = bounded("connect", TcpStream::connect(inbound))
        .await
        .unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = read_to_end(&mut c, &mut got).await;
    app.result().await;
    let ex = exchanges(app.addr, 1).await;
    assert_eq!(ex[0].error, Some(ErrorType::IncompleteResponse));
    let spans = h.tt.spans();
    assert_eq!(spans.len(), 1);
    assert_eq!(
        span_attr(&spans[0], "error.type"),
        Some(&Value::from("incomplete_response"))
    );
    assert_eq!(spans[0].status, Status::error("incomplete_response"));
}

#[tokio::test]
async fn inbound_connection_to_the_listener_itself_is_refused() {
    // Production lookup: the local address of a direct connection is the listener itself.
    let (telemetry, _tt) = Telemetry::for_tests();
    let proxy = Proxy::bind(
        inbound_config(),
        Arc::new(MockOrigDst::failing()),
        telemetry,
    )
    .await
    .unwrap();
    let inbound = proxy.inbound_local_addrs()[0];
    let counters = proxy.counters();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(proxy.run(shutdown.clone(), Duration::from_secs(1)));
    let mut c = bounded("connect", TcpStream::connect(inbound))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    assert_reset(bounded("client read", c.read(&mut buf)).await);
    assert_eq!(counters.loops_refused.load(Ordering::Relaxed), 1);
    assert_eq!(counters.inbound_accepted.load(Ordering::Relaxed), 1);
    shutdown.cancel();
    bounded("run returns", run).await.unwrap();
}

#[tokio::test]
async fn inbound_refused_app_is_recorded_as_an_inbound_connection_failure() {
    let app = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    observe::take_connections(app);
    let (h, inbound) = start_inbound(app).await;
    let mut c = bounded("connect", TcpStream::connect(inbound))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    assert_reset(bounded("client read", c.read(&mut buf)).await);
    let rec = connection(app).await;
    assert!(rec.inbound);
    assert_eq!(rec.error, Some(ErrorType::ConnectionRefused));
    let points = h.tt.metric_points("sidecar.proxy.connection.duration");
    let p = points
        .iter()
        .find(|p| p.attr("server.port") == Some(&Value::I64(app.port().into())))
        .expect("connection duration point");
    assert_eq!(p.attr("sidecar.direction"), Some(&Value::from("inbound")));
    assert_eq!(
        p.attr("error.type"),
        Some(&Value::from("connection_refused"))
    );
}

#[tokio::test]
async fn outbound_client_spans_carry_tcp_info_and_outbound_direction() {
    let req = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let (_received, _, dst, h) = http_roundtrip(req, resp, false).await;
    exchanges(dst, 1).await;
    let spans = h.tt.spans();
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].span_kind, SpanKind::Client);
    match span_attr(&spans[0], "sidecar.connection.rtt") {
        Some(Value::F64(rtt)) => assert!(*rtt > 0.0 && *rtt < 1.0, "rtt {rtt}"),
        other => panic!("sidecar.connection.rtt: {other:?}"),
    }
    assert_eq!(
        span_attr(&spans[0], "sidecar.connection.retransmits"),
        Some(&Value::I64(0))
    );
    let rec = connection(dst).await;
    assert!(!rec.inbound);
    let points = h.tt.metric_points("sidecar.proxy.connection.duration");
    assert!(points
        .iter()
        .all(|p| p.attr("sidecar.direction") == Some(&Value::from("outbound"))));
}

#[tokio::test]
async fn shutdown_closes_inbound_listeners_too() {
    let mut app = upstream(|mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        read_to_end(&mut s, &mut got).await.unwrap();
    })
    .await;
    let (telemetry, _tt) = Telemetry::for_tests();
    let mut cfg = inbound_config();
    cfg.inbound_addrs.push("[::1]:0".parse().unwrap());
    let proxy = Proxy::bind(cfg, Arc::new(MockOrigDst::failing()), telemetry)
        .await
        .unwrap()
        .with_inbound_dst(Arc::new(MockOrigDst::fixed(app.addr)));
    let inbound = proxy.inbound_local_addrs();
    assert_eq!(inbound.len(), 2);
    // The fds handed to sk_lookup are the inbound listening sockets.
    let fd_addrs: Vec<SocketAddr> = proxy
        .inbound_listener_fds()
        .into_iter()
        .map(|fd| {
            let sock = SockRef::from(&fd);
            assert!(sock.is_listener().unwrap());
            sock.local_addr().unwrap().as_socket().unwrap()
        })
        .collect();
    assert_eq!(fd_addrs, inbound);
    let outbound = proxy.local_addrs()[0];
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(proxy.run(shutdown.clone(), Duration::from_secs(5)));

    // One inbound request in flight across the shutdown.
    let mut c = bounded("connect", TcpStream::connect(inbound[0]))
        .await
        .unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
    shutdown.cancel();
    for addr in inbound.iter().chain([&outbound]) {
        bounded("listener closed", async {
            loop {
                match TcpStream::connect(*addr).await {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                    Err(e) => panic!("unexpected connect error {e}"),
                    Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        })
        .await;
    }
    // The in-flight inbound connection drains.
    drop(c);
    let report = bounded("run returns", run).await.unwrap();
    assert_eq!(report.aborted, 0);
    assert!(report.drained >= 1, "{report:?}");
    app.result().await;
}

#[test]
fn default_config_listens_inbound_on_15006_both_families() {
    let cfg = ProxyConfig::default();
    assert_eq!(
        cfg.inbound_addrs,
        vec![
            "127.0.0.1:15006".parse::<SocketAddr>().unwrap(),
            "[::1]:15006".parse().unwrap()
        ]
    );
    assert_eq!(
        crate::proxy::inbound::passthrough_source("10.0.0.5:8080".parse().unwrap()),
        "127.0.0.6:0".parse().unwrap()
    );
    assert_eq!(
        crate::proxy::inbound::passthrough_source("[fd00::5]:8080".parse().unwrap()),
        "[::1]:0".parse().unwrap()
    );
}

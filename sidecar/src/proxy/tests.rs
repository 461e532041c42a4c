//! Proxy tests over real loopback sockets: upstream servers written here with tokio, the mock
//! original destination, and the test telemetry.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod http2;
mod inbound;
mod tls;

use super::observe::{self, Connection, Exchange};
use super::*;
use crate::telemetry::testing::TestTelemetry;
use crate::telemetry::{ConnectionProtocol, ErrorType, Telemetry};

/// Upper bound of any single wait in these tests.
const T: Duration = Duration::from_secs(20);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(T, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

struct Harness {
    addr: SocketAddr,
    shutdown: CancellationToken,
    run: Option<JoinHandle<DrainReport>>,
    counters: Arc<ProxyCounters>,
    tt: TestTelemetry,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(run) = self.run.take() {
            run.abort();
        }
    }
}

fn test_config() -> ProxyConfig {
    ProxyConfig {
        outbound_addrs: vec!["127.0.0.1:0".parse().unwrap()],
        inbound_addrs: Vec::new(),
        connect_timeout: Duration::from_secs(2),
        detect_timeout: Duration::from_secs(2),
        max_head_bytes: 16 * 1024,
    }
}

async fn start_with(orig: Arc<dyn OriginalDst>, cfg: ProxyConfig, drain: Duration) -> Harness {
    let (telemetry, tt) = Telemetry::for_tests();
    let proxy = Proxy::bind(cfg, orig, telemetry).await.unwrap();
    let addr = proxy.local_addrs()[0];
    let counters = proxy.counters();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(proxy.run(shutdown.clone(), drain));
    Harness {
        addr,
        shutdown,
        run: Some(run),
        counters,
        tt,
    }
}

async fn start_proxy(dst: SocketAddr) -> Harness {
    start_with(
        Arc::new(MockOrigDst::fixed(dst)),
        test_config(),
        Duration::from_secs(5),
    )
    .await
}

/// A one-connection upstream server. The listener stays bound as long as this value lives, so
/// its port (the key of the observation log) is not reused by another test meanwhile.
struct Upstream<T> {
    addr: SocketAddr,
    task: JoinHandle<T>,
    _hold: Arc<TcpListener>,
}

async fn upstream<F, Fut, R>(handler: F) -> Upstream<R>
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    let listener = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let addr = listener.local_addr().unwrap();
    observe::take_exchanges(addr);
    observe::take_connections(addr);
    let l = Arc::clone(&listener);
    let task = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        handler(s).await
    });
    Upstream {
        addr,
        task,
        _hold: listener,
    }
}

impl<R> Upstream<R> {
    /// What the handler returned. The listener stays bound until `self` is dropped.
    async fn result(&mut self) -> R {
        bounded("upstream handler", &mut self.task).await.unwrap()
    }
}

/// Reads from `s` into `got` until `done(got)`; panics on end of stream before that.
async fn read_until(s: &mut TcpStream, got: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) {
    let mut buf = vec![0u8; 64 * 1024];
    while !done(got) {
        let n = bounded("read_until", s.read(&mut buf)).await.unwrap();
        assert!(
            n > 0,
            "end of stream before expected data; got {:?}",
            String::from_utf8_lossy(got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

async fn read_to_end(s: &mut TcpStream, got: &mut Vec<u8>) -> io::Result<()> {
    bounded("read_to_end", s.read_to_end(got)).await.map(|_| ())
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Removes every `traceparent` header line (any case); returns what is left and the values.
fn strip_traceparent(b: &[u8]) -> (Vec<u8>, Vec<String>) {
    const NAME: &[u8] = b"traceparent:";
    let mut out = Vec::with_capacity(b.len());
    let mut values = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let line_start = i == 0 || b[i - 1] == b'\n';
        if line_start
            && b.len() - i >= NAME.len()
            && b[i..i + NAME.len()].eq_ignore_ascii_case(NAME)
        {
            let end = b[i..]
                .iter()
                .position(|c| *c == b'\n')
                .map_or(b.len(), |p| i + p + 1);
            let value = String::from_utf8_lossy(&b[i + NAME.len()..end]);
            values.push(value.trim().to_owned());
            i = end;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    (out, values)
}

/// Waits until `n` exchanges to `dst` have been reported, then a little longer to catch extra
/// ones.
async fn exchanges(dst: SocketAddr, n: usize) -> Vec<Exchange> {
    let mut got = Vec::new();
    bounded("exchanges reported", async {
        while got.len() < n {
            got.extend(observe::take_exchanges(dst));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    got.extend(observe::take_exchanges(dst));
    got
}

async fn connection(dst: SocketAddr) -> Connection {
    bounded("connection reported", async {
        loop {
            if let Some(c) = observe::take_connections(dst).pop() {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

fn is_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    parts.len() == 4
        && parts[0] == "00"
        && parts[1].len() == 32
        && parts[2].len() == 16
        && parts[3].len() == 2
        && parts
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()))
}

async fn connect(h: &Harness) -> TcpStream {
    bounded("connect to proxy", TcpStream::connect(h.addr))
        .await
        .unwrap()
}

fn assert_reset(r: io::Result<usize>) {
    match r {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
}

// ---------------------------------------------------------------------------------------------
// Opaque forwarding

#[tokio::test]
async fn opaque_echo_is_byte_exact_both_ways_with_half_close() {
    let mut up = upstream(|mut s| async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).await.unwrap();
            total += n;
        }
        // The application half-closed; this direction still works.
        s.write_all(b"<after-eof>").await.unwrap();
        s.shutdown().await.unwrap();
        total
    })
    .await;
    let h = start_proxy(up.addr).await;
    let mut data = random_bytes(4 << 20, 7);
    data[0] = 0x16; // not a request line

    let client = connect(&h).await;
    let (mut r, mut w) = client.into_split();
    let writer = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        w
    };
    let reader = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let (_w, got) = bounded("echo", async { tokio::join!(writer, reader) }).await;
    let mut expected = data.clone();
    expected.extend_from_slice(b"<after-eof>");
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "echoed bytes differ");
    let dst = up.addr;
    assert_eq!(up.result().await, data.len());

    let c = connection(dst).await;
    assert_eq!(
        c,
        Connection {
            inbound: false,
            bytes_sent: data.len() as u64,
            bytes_received: expected.len() as u64,
            protocol: ConnectionProtocol::Opaque,
            error: None,
        }
    );
    assert!(exchanges(dst, 0).await.is_empty());
}

#[tokio::test]
async fn server_speaking_first_makes_the_connection_opaque() {
    let tail = random_bytes(1 << 20, 11);
    let tail2 = tail.clone();
    let mut up = upstream(|mut s| async move {
        s.write_all(b"220 ready\r\n").await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        // Keeps sending after the application's half-close.
        s.write_all(&tail2).await.unwrap();
        got
    })
    .await;
    let h = start_proxy(up.addr).await;
    let mut c = connect(&h).await;
    let mut got = Vec::new();
    read_until(&mut c, &mut got, |g| g.ends_with(b"\r\n")).await;
    assert_eq!(got, b"220 ready\r\n");
    // Looks like HTTP, but the server spoke first: forwarded untouched, not measured.
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    c.write_all(req).await.unwrap();
    c.shutdown().await.unwrap();
    got.clear();
    read_to_end(&mut c, &mut got).await.unwrap();
    assert!(got == tail);
    let dst = up.addr;
    assert_eq!(up.result().await, req);
    assert!(exchanges(dst, 0).await.is_empty());
    assert_eq!(connection(dst).await.protocol, ConnectionProtocol::Opaque);
}

#[tokio::test]
async fn silent_client_past_detect_timeout_is_opaque() {
    let mut up = upstream(|mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        got
    })
    .await;
    let mut cfg = test_config();
    cfg.detect_timeout = Duration::from_millis(100);
    let h = start_with(
        Arc::new(MockOrigDst::fixed(up.addr)),
        cfg,
        Duration::from_secs(5),
    )
    .await;
    let mut c = connect(&h).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    c.write_all(req).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
    drop(c);
    let dst = up.addr;
    assert_eq!(up.result().await, req, "no traceparent added when opaque");
    assert!(exchanges(dst, 0).await.is_empty());
    assert_eq!(connection(dst).await.protocol, ConnectionProtocol::Opaque);
}

#[tokio::test]
async fn upstream_reset_reaches_the_client_as_a_reset() {
    let mut up = upstream(|mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| g.len() >= 6).await;
        SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
    })
    .await;
    let h = start_proxy(up.addr).await;
    let mut c = connect(&h).await;
    c.write_all(b"\x00hello").await.unwrap();
    let mut buf = [0u8; 16];
    assert_reset(bounded("client read", c.read(&mut buf)).await);
    let dst = up.addr;
    up.result().await;
    let rec = connection(dst).await;
    assert_eq!(rec.error, Some(ErrorType::ConnectionReset));
    assert_eq!(rec.bytes_sent, 6);
}

#[tokio::test]
async fn client_reset_reaches_the_upstream_as_a_reset() {
    let mut up = upstream(|mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| g.len() >= 5).await;
        s.write_all(b"ack").await.unwrap();
        let mut buf = [0u8; 16];
        bounded("upstream read", s.read(&mut buf)).await
    })
    .await;
    let h = start_proxy(up.addr).await;
    let mut c = connect(&h).await;
    c.write_all(b"\x01ping").await.unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, |g| g.len() >= 3).await;
    SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
    drop(c);
    let dst = up.addr;
    assert_reset(up.result().await);
    assert_eq!(
        connection(dst).await.error,
        Some(ErrorType::ConnectionReset)
    );
}

#[tokio::test]
async fn refused_upstream_resets_the_client_and_is_recorded() {
    let dst = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    observe::take_connections(dst);
    let h = start_proxy(dst).await;
    let mut c = connect(&h).await;
    let mut buf = [0u8; 16];
    assert_reset(bounded("client read", c.read(&mut buf)).await);
    let rec = connection(dst).await;
    assert_eq!(rec.error, Some(ErrorType::ConnectionRefused));
    assert_eq!(h.counters.connect_failures.load(Ordering::Relaxed), 1);
    // The real telemetry got it too.
    let points = h.tt.metric_points("sidecar.proxy.connection.duration");
    let refused = points
        .iter()
        .find(|p| p.attr("server.port") == Some(&opentelemetry::Value::I64(dst.port().into())))
        .expect("connection duration point");
    assert_eq!(
        refused.attr("error.type"),
        Some(&opentelemetry::Value::from("connection_refused"))
    );
    assert_eq!(refused.count(), Some(1));
}

#[tokio::test]
async fn upstream_connect_timeout_resets_the_client() {
    // A listener with a full accept queue drops SYNs, so connecting to it hangs.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let dst = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let attempt = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(dst));
        match attempt.await {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }
    observe::take_connections(dst);
    let mut cfg = test_config();
    cfg.connect_timeout = Duration::from_millis(300);
    let h = start_with(
        Arc::new(MockOrigDst::fixed(dst)),
        cfg,
        Duration::from_secs(5),
    )
    .await;
    let mut c = connect(&h).await;
    let mut buf = [0u8; 16];
    assert_reset(bounded("client read", c.read(&mut buf)).await);
    assert_eq!(connection(dst).await.error, Some(ErrorType::Timeout));
    drop(socket);
}

#[tokio::test]
async fn missing_original_destination_closes_with_reset() {
    let h = start_with(
        Arc::new(MockOrigDst::failing()),
        test_config(),
        Duration::from_secs(5),
    )
    .await;
    let mut c = connect(&h).await;
    let mut buf = [0u8; 16];
    assert_reset(bounded("client read", c.read(&mut buf)).await);
    assert_eq!(h.counters.orig_dst_failures.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn connection_to_the_proxy_itself_is_refused() {
    let mock = Arc::new(MockOrigDst::by_peer());
    let h = start_with(mock.clone(), test_config(), Duration::from_secs(5)).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    mock.insert(sock.local_addr().unwrap(), h.addr);
    let mut c = bounded("connect", sock.connect(h.addr)).await.unwrap();
    let mut buf = [0u8; 16];
    assert_reset(bounded("client read", c.read(&mut buf)).await);
    assert_eq!(h.counters.loops_refused.load(Ordering::Relaxed), 1);
    assert_eq!(h.counters.accepted.load(Ordering::Relaxed), 1);
}

// ---------------------------------------------------------------------------------------------
// Listeners

#[tokio::test]
async fn ipv6_listener_is_v6_only_and_proxies() {
    let mut up = upstream(|mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| g.len() >= 4).await;
        s.write_all(b"pong").await.unwrap();
    })
    .await;
    let mut cfg = test_config();
    cfg.outbound_addrs = vec!["[::]:0".parse().unwrap()];
    let h = start_with(
        Arc::new(MockOrigDst::fixed(up.addr)),
        cfg,
        Duration::from_secs(5),
    )
    .await;
    // IPV6_V6ONLY: the IPv4 loopback on the same port is free (binding it works) and not
    // served (bound without listening here, so a connect is refused).
    let v4 = SocketAddr::new("127.0.0.1".parse().unwrap(), h.addr.port());
    let hold = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hold.bind(&v4.into()).unwrap();
    let err = TcpStream::connect(v4).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    let v6 = SocketAddr::new("::1".parse().unwrap(), h.addr.port());
    let mut c = TcpStream::connect(v6).await.unwrap();
    c.write_all(b"\x00png").await.unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, |g| g.len() >= 4).await;
    assert_eq!(got, b"pong");
    up.result().await;
}

#[tokio::test]
async fn unavailable_ipv6_address_only_warns_but_no_listener_is_an_error() {
    let (telemetry, _tt) = Telemetry::for_tests();
    // 2001:db8::/32 is documentation space: never a local address, so binding it fails with
    // EADDRNOTAVAIL as on a host without IPv6.
    let v6: SocketAddr = "[2001:db8::1]:0".parse().unwrap();
    let mut cfg = test_config();
    cfg.outbound_addrs = vec!["127.0.0.1:0".parse().unwrap(), v6];
    let proxy = Proxy::bind(cfg.clone(), Arc::new(SoOriginalDst), telemetry.clone())
        .await
        .unwrap();
    assert_eq!(proxy.local_addrs().len(), 1);
    assert!(proxy.local_addrs()[0].is_ipv4());

    cfg.outbound_addrs = vec![v6];
    let err = Proxy::bind(cfg.clone(), Arc::new(SoOriginalDst), telemetry.clone())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ProxyError::NoListener), "{err}");

    // An IPv4 address in use is fatal.
    let taken = proxy.local_addrs()[0];
    cfg.outbound_addrs = vec![taken];
    let err = Proxy::bind(cfg, Arc::new(SoOriginalDst), telemetry)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ProxyError::Bind { addr, .. } if addr == taken),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP/1

/// Runs one HTTP exchange script: the client sends `request` (in one write), the upstream
/// answers `response` once it has the whole request (`request_done` on the bytes it received
/// with traceparent lines removed), and the client reads until `response_done`. Returns what
/// the upstream received.
async fn http_roundtrip(
    request: &[u8],
    response: &[u8],
    close_after_response: bool,
) -> (Vec<u8>, Vec<u8>, SocketAddr, Harness) {
    let req_len = strip_traceparent(request).0.len();
    let response_owned = response.to_vec();
    let mut up = upstream(move |mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| {
            strip_traceparent(g).0.len() >= req_len
        })
        .await;
        s.write_all(&response_owned).await.unwrap();
        if close_after_response {
            s.shutdown().await.unwrap();
        } else {
            read_to_end(&mut s, &mut got).await.unwrap();
        }
        got
    })
    .await;
    let h = start_proxy(up.addr).await;
    let mut c = connect(&h).await;
    c.write_all(request).await.unwrap();
    let mut got = Vec::new();
    if close_after_response {
        read_to_end(&mut c, &mut got).await.unwrap();
    } else {
        read_until(&mut c, &mut got, |g| g.len() >= response.len()).await;
        c.shutdown().await.unwrap();
        read_to_end(&mut c, &mut got).await.unwrap();
    }
    assert!(
        got == response,
        "client got {:?}",
        String::from_utf8_lossy(&got)
    );
    let dst = up.addr;
    let received = up.result().await;
    (received, got, dst, h)
}

/// Asserts the upstream received `sent` except for one traceparent per request, and returns
/// the injected values.
fn assert_same_but_traceparent(received: &[u8], sent: &[u8], requests: usize) -> Vec<String> {
    let (r, values) = strip_traceparent(received);
    let (s, _) = strip_traceparent(sent);
    assert!(
        r == s,
        "upstream got {:?}\nexpected {:?}",
        String::from_utf8_lossy(&r),
        String::from_utf8_lossy(&s)
    );
    assert_eq!(values.len(), requests, "one traceparent per request");
    for v in &values {
        assert!(is_traceparent(v), "{v}");
    }
    values
}

fn ok(status: Option<u16>, request_body: u64, response_body: u64) -> impl Fn(&Exchange) {
    move |e: &Exchange| {
        assert_eq!(e.status, status, "{e:?}");
        assert_eq!(e.request_body, request_body, "{e:?}");
        assert_eq!(e.response_body, response_body, "{e:?}");
        assert_eq!(e.error, None, "{e:?}");
    }
}

#[tokio::test]
async fn get_with_content_length_is_measured_and_traced() {
    let req = b"GET /items?id=7 HTTP/1.1\r\nHost: shop.example\r\nAccept: */*\r\n\r\n";
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Y: z\r\n\r\nhello";
    let (received, _, dst, h) = http_roundtrip(req, resp, false).await;
    // The new line goes after the last header, everything else is unchanged.
    let tp = assert_same_but_traceparent(&received, req, 1);
    let expected = format!(
        "GET /items?id=7 HTTP/1.1\r\nHost: shop.example\r\nAccept: */*\r\ntraceparent: {}\r\n\r\n",
        tp[0]
    );
    assert_eq!(String::from_utf8_lossy(&received), expected);

    let ex = exchanges(dst, 1).await;
    assert_eq!(ex.len(), 1);
    ok(Some(200), 0, 5)(&ex[0]);
    assert_eq!(ex[0].method, "GET");
    assert_eq!(ex[0].target, "/items?id=7");
    assert!(!ex[0].reused);
    assert_eq!(ex[0].incoming_traceparent, None);
    assert_eq!(ex[0].outgoing_traceparent.as_deref(), Some(tp[0].as_str()));

    // The injected context is the CLIENT span's.
    let spans = h.tt.spans();
    assert_eq!(spans.len(), 1);
    let sc = &spans[0].span_context;
    assert_eq!(
        tp[0],
        format!("00-{}-{}-01", sc.trace_id(), sc.span_id()),
        "traceparent carries the client span"
    );
    assert_eq!(
        spans[0].parent_span_id,
        opentelemetry::trace::SpanId::INVALID
    );

    let rec = connection(dst).await;
    assert_eq!(rec.protocol, ConnectionProtocol::Http1);
    assert_eq!(rec.bytes_sent, received.len() as u64);
    assert_eq!(rec.bytes_received, resp.len() as u64);
    assert_eq!(rec.error, None);
}

#[tokio::test]
async fn incoming_traceparent_is_the_parent_and_is_replaced() {
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let req = format!(
        "POST /api HTTP/1.1\r\nHost: a\r\nTraceParent: {incoming}\r\ntracestate: congo=t61rcWkgMzE\r\nContent-Length: 3\r\n\r\nabc"
    );
    let resp = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
    let (received, _, dst, h) = http_roundtrip(req.as_bytes(), resp, false).await;
    let tp = assert_same_but_traceparent(&received, req.as_bytes(), 1);
    let text = String::from_utf8_lossy(&received).into_owned();
    // Same header name spelling and place, tracestate untouched.
    assert!(text.contains(&format!(
        "\r\nTraceParent: {}\r\ntracestate: congo=t61rcWkgMzE\r\n",
        tp[0]
    )));
    let parts: Vec<&str> = tp[0].split('-').collect();
    assert_eq!(
        parts[1], "4bf92f3577b34da6a3ce929d0e0e4736",
        "same trace id"
    );
    assert_ne!(parts[2], "00f067aa0ba902b7", "new parent id");

    let ex = exchanges(dst, 1).await;
    ok(Some(201), 3, 0)(&ex[0]);
    assert_eq!(ex[0].incoming_traceparent.as_deref(), Some(incoming));
    let spans = h.tt.spans();
    assert_eq!(spans.len(), 1);
    assert_eq!(
        spans[0].parent_span_id.to_string(),
        "00f067aa0ba902b7",
        "span is a child of the incoming context"
    );
    assert_eq!(spans[0].span_context.span_id().to_string(), parts[2]);
}

#[tokio::test]
async fn duplicate_traceparent_headers_leave_one() {
    let req = b"GET / HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nHost: a\r\ntraceparent: junk\r\n\r\n";
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    let (received, _, _dst, _h) = http_roundtrip(req, resp, false).await;
    let tp = assert_same_but_traceparent(&received, req, 1);
    assert!(String::from_utf8_lossy(&received).starts_with(&format!(
        "GET / HTTP/1.1\r\ntraceparent: {}\r\nHost: a\r\n\r\n",
        tp[0]
    )));
}

#[tokio::test]
async fn post_with_length_and_chunked_response_with_trailers() {
    let body = random_bytes(100_000, 3);
    let mut req = format!(
        "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Sum: 42\r\n\r\n";
    let (received, _, dst, _h) = http_roundtrip(&req, resp, false).await;
    assert_same_but_traceparent(&received, &req, 1);
    let ex = exchanges(dst, 1).await;
    assert_eq!(ex.len(), 1);
    ok(Some(200), body.len() as u64, 11)(&ex[0]);
}

#[tokio::test]
async fn chunked_request_with_trailers_is_measured() {
    let req = b"PUT /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: never\r\n\r\n";
    let resp = b"HTTP/1.1 204 No Content\r\n\r\n";
    let (received, _, dst, _h) = http_roundtrip(req, resp, false).await;
    assert_same_but_traceparent(&received, req, 1);
    let ex = exchanges(dst, 1).await;
    ok(Some(204), 23, 0)(&ex[0]);
}

#[tokio::test]
async fn pipelined_requests_in_one_write_are_each_measured() {
    let req = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: a\r\n\r\n";
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nnah\r\n0\r\n\r\nHTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n";
    let (received, _, dst, _h) = http_roundtrip(req, resp, false).await;
    assert_same_but_traceparent(&received, req, 3);
    let ex = exchanges(dst, 3).await;
    assert_eq!(ex.len(), 3);
    ok(Some(200), 0, 2)(&ex[0]);
    ok(Some(404), 3, 3)(&ex[1]);
    ok(Some(500), 0, 0)(&ex[2]);
    let targets: Vec<&str> = ex.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(targets, ["/1", "/2", "/3"]);
    let reused: Vec<bool> = ex.iter().map(|e| e.reused).collect();
    assert_eq!(reused, [false, true, true]);
}

#[tokio::test]
async fn keep_alive_reuse_is_flagged() {
    let mut up = upstream(|mut s| async move {
        let mut got = Vec::new();
        for i in 1..=2 {
            read_until(&mut s, &mut got, |g| count(g, b"\r\n\r\n") >= i).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
                .await
                .unwrap();
        }
        read_to_end(&mut s, &mut got).await.unwrap();
    })
    .await;
    let h = start_proxy(up.addr).await;
    let mut c = connect(&h).await;
    let mut got = Vec::new();
    for i in 1..=2 {
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut c, &mut got, |g| count(g, b"\r\n\r\nx") >= i).await;
    }
    drop(c);
    let dst = up.addr;
    up.result().await;
    let ex = exchanges(dst, 2).await;
    assert_eq!(
        ex.iter().map(|e| e.reused).collect::<Vec<_>>(),
        [false, true]
    );
    assert_eq!(connection(dst).await.protocol, ConnectionProtocol::Http1);
}

#[tokio::test]
async fn head_response_has_no_body() {
    let req = b"HEAD /big HTTP/1.1\r\nHost: a\r\n\r\nGET /small HTTP/1.1\r\nHost: a\r\n\r\n";
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let (received, _, dst, _h) = http_roundtrip(req, resp, false).await;
    assert_same_but_traceparent(&received, req, 2);
    let ex = exchanges(dst, 2).await;
    ok(Some(200), 0, 0)(&ex[0]);
    assert_eq!(ex[0].method, "HEAD");
    ok(Some(200), 0, 2)(&ex[1]);
}

#[tokio::test]
async fn no_content_and_not_modified_have_no_body() {
    let req = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n";
    let resp = b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"x\"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
    let (received, _, dst, _h) = http_roundtrip(req, resp, false).await;
    assert_same_but_traceparent(&received, req, 3);
    let ex = exchanges(dst, 3).await;
    ok(Some(204), 0, 0)(&ex[0]);
    ok(Some(304), 0, 0)(&ex[1]);
    ok(Some(200), 0, 3)(&ex[2]);
}

#[tokio::test]
async fn expect_continue_and_interim_responses() {
    let head = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n";
    let final_resp: &[u8] =
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let mut up = upstream(move |mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
        s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
        read_until(&mut s, &mut got, |g| g.ends_with(b"data")).await;
        s.write_all(final_resp).await.unwrap();
        read_to_end(&mut s, &mut got).await.unwrap();
        got
    })
    .await;
    let h = start_proxy(up.addr).await;
    let mut c = connect(&h).await;
    c.write_all(head).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
    assert_eq!(got, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.write_all(b"data").await.unwrap();
    got.clear();
    read_until(&mut c, &mut got, |g| g.ends_with(b"ok")).await;
    assert_eq!(got, final_resp);
    drop(c);
    let dst = up.addr;
    let received = up.result().await;
    let mut sent = head.to_vec();
    sent.extend_from_slice(b"data");
    assert_same_but_traceparent(&received, &sent, 1);
    let ex = exchanges(dst, 1).await;
    assert_eq!(ex.len(), 1);
    ok(Some(200), 4, 2)(&ex[0]);
}

#[tokio::test]
async fn http10_response_until_close() {
    let req = b"GET /old HTTP/1.0\r\n\r\n";
    let mut resp = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n".to_vec();
    let body = random_bytes(50_000, 5);
    resp.extend_from_slice(&body);
    let (received, _, dst, _h) = http_roundtrip(req, &resp, true).await;
    assert_same_but_traceparent(&received, req, 1);
    let ex = exchanges(dst, 1).await;
    ok(Some(200), 0, body.len() as u64)(&ex[0]);
    assert_eq!(connection(dst).await.error, None);
}

#[tokio::test]
async fn connection_close_then_upstream_closes() {
    let req = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let resp = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbye!";
    let (received, _, dst, _h) = http_roundtrip(req, resp, true).await;
    assert_same_but_traceparent(&received, req, 1);
    let ex = exchanges(dst, 1).await;
    ok(Some(200), 0, 4)(&ex[0]);
}

#[tokio::test]
async fn truncated_response_is_incomplete() {
    let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n";
    let resp = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 10\r\n\r\nabcd";
    let (_received, _, dst, _h) = http_roundtrip(req, resp, true).await;
    let ex = exchanges(dst, 2).await;
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].status, Some(502));
    assert_eq!(ex[0].response_body, 4);
    assert_eq!(ex[0].error, Some(ErrorType::IncompleteResponse));
    assert_eq!(ex[1].status, None);
    assert_eq!(ex[1].error, Some(ErrorType::IncompleteResponse));
}

#[tokio::test]
async fn upstream_reset_mid_response_is_a_connection_reset() {
    let mut up = upstream(|mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    })
    .await;
    let h = start_proxy(up.addr).await;
    let mut c = connect(&h).await;
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let res = bounded("read", c.read_to_end(&mut got)).await;
    assert_eq!(res.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    let dst = up.addr;
    up.result().await;
    let ex = exchanges(dst, 1).await;
    assert_eq!(ex[0].status, Some(200));
    assert_eq!(ex[0].error, Some(ErrorType::ConnectionReset));
    let rec = connection(dst).await;
    assert_eq!(rec.error, Some(ErrorType::ConnectionReset));
    assert_eq!(rec.protocol, ConnectionProtocol::Http1);
}

#[tokio::test]
async fn upgrade_switches_to_opaque() {
    let req = b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let switching =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    // After the switch, bytes that look like HTTP must not be parsed (nor get a traceparent).
    let mut frames = b"GET /not-http HTTP/1.1\r\n\r\n".to_vec();
    frames.extend_from_slice(&random_bytes(200_000, 9));
    let frames_len = frames.len();
    let mut up = upstream(move |mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
        s.write_all(switching).await.unwrap();
        let head_len = got.len();
        read_until(&mut s, &mut got, |g| g.len() >= head_len + frames_len).await;
        s.write_all(&got[head_len..]).await.unwrap();
        s.shutdown().await.unwrap();
        got
    })
    .await;
    let h = start_proxy(up.addr).await;
    let mut c = connect(&h).await;
    c.write_all(req).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
    assert_eq!(got, switching);
    c.write_all(&frames).await.unwrap();
    got.clear();
    read_to_end(&mut c, &mut got).await.unwrap();
    assert!(got == frames, "echoed frames differ");
    let dst = up.addr;
    let received = up.result().await;
    let mut sent = req.to_vec();
    sent.extend_from_slice(&frames);
    assert_same_but_traceparent(&received, &sent, 1);
    let ex = exchanges(dst, 1).await;
    assert_eq!(ex.len(), 1);
    ok(Some(101), 0, 0)(&ex[0]);
}

#[tokio::test]
async fn refused_upgrade_stays_http() {
    // The server ignores the upgrade and answers in HTTP/1.1; the request after it (already
    // sent, pipelined) is then read as HTTP again.
    let req = b"GET /a HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut up = upstream(|mut s| async move {
        let mut got = Vec::new();
        for (i, body) in [(1, "a"), (2, "b")] {
            read_until(&mut s, &mut got, |g| count(g, b"\r\n\r\n") >= i).await;
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{body}");
            s.write_all(resp.as_bytes()).await.unwrap();
        }
        read_to_end(&mut s, &mut got).await.unwrap();
        got
    })
    .await;
    let h = start_proxy(up.addr).await;
    let mut c = connect(&h).await;
    c.write_all(req).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, |g| g.ends_with(b"\r\n\r\nb")).await;
    assert_eq!(
        got,
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"
    );
    drop(c);
    let dst = up.addr;
    let received = up.result().await;
    assert_same_but_traceparent(&received, req, 2);
    let ex = exchanges(dst, 2).await;
    assert_eq!(ex.len(), 2);
    ok(Some(200), 0, 1)(&ex[0]);
    ok(Some(200), 0, 1)(&ex[1]);
}

#[tokio::test]
async fn connect_method_tunnels_after_2xx() {
    let req = b"CONNECT db.example:5432 HTTP/1.1\r\nHost: db.example:5432\r\n\r\n";
    let established = b"HTTP/1.1 200 Connection Established\r\n\r\n";
    let tunnel = random_bytes(10_000, 21);
    let tunnel_len = tunnel.len();
    let mut up = upstream(move |mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
        s.write_all(established).await.unwrap();
        let head_len = got.len();
        read_until(&mut s, &mut got, |g| g.len() >= head_len + tunnel_len).await;
        s.write_all(&got[head_len..]).await.unwrap();
        s.shutdown().await.unwrap();
        got
    })
    .await;
    let h = start_proxy(up.addr).await;
    let mut c = connect(&h).await;
    c.write_all(req).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
    c.write_all(&tunnel).await.unwrap();
    got.clear();
    read_to_end(&mut c, &mut got).await.unwrap();
    assert!(got == tunnel);
    let dst = up.addr;
    let received = up.result().await;
    let mut sent = req.to_vec();
    sent.extend_from_slice(&tunnel);
    assert_same_but_traceparent(&received, &sent, 1);
    let ex = exchanges(dst, 1).await;
    assert_eq!(ex.len(), 1);
    ok(Some(200), 0, 0)(&ex[0]);
    assert_eq!(ex[0].method, "CONNECT");
}

#[tokio::test]
async fn malformed_head_is_forwarded_opaquely_byte_exact() {
    let mut req = b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n".to_vec();
    req.extend_from_slice(&random_bytes(30_000, 13));
    let resp = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
    let (received, _, dst, _h) = http_roundtrip(&req, resp, true).await;
    assert!(received == req, "upstream must get the exact bytes");
    assert!(exchanges(dst, 0).await.is_empty());
    let rec = connection(dst).await;
    assert_eq!(rec.protocol, ConnectionProtocol::Opaque);
    assert_eq!(rec.bytes_sent, req.len() as u64);
}

#[tokio::test]
async fn broken_chunked_body_is_forwarded_opaquely_from_there() {
    let mut req =
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX".to_vec();
    // Looks like a request, but after broken framing nothing is parsed any more.
    req.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n");
    let resp = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbad";
    let (received, _, dst, _h) = http_roundtrip(&req, resp, true).await;
    assert_same_but_traceparent(&received, &req, 1);
    let ex = exchanges(dst, 1).await;
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].status, Some(400));
    assert_eq!(ex[0].request_body, 0);
    assert_eq!(ex[0].response_body, 3);
}

#[tokio::test]
async fn oversized_head_is_forwarded_opaquely_byte_exact() {
    let mut req = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..2000 {
        req.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "v".repeat(20)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    assert!(req.len() > test_config().max_head_bytes);
    let resp = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n";
    let (received, _, dst, _h) = http_roundtrip(&req, resp, true).await;
    assert!(received == req, "upstream must get the exact bytes");
    assert!(exchanges(dst, 0).await.is_empty());
}

#[tokio::test]
async fn malformed_response_is_forwarded_opaquely() {
    let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n".to_vec();
    resp.extend_from_slice(&random_bytes(1000, 17));
    let (received, _, dst, _h) = http_roundtrip(req, &resp, true).await;
    assert_same_but_traceparent(&received, req, 1);
    let ex = exchanges(dst, 1).await;
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].error, Some(ErrorType::IncompleteResponse));
}

// ---------------------------------------------------------------------------------------------
// Drain

#[tokio::test]
async fn in_flight_request_completes_after_shutdown_while_new_connects_are_refused() {
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel::<()>();
    let mut up = upstream(move |mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| g.ends_with(b"\r\n\r\n")).await;
        got_tx.send(()).unwrap();
        bounded("go", go_rx).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
            .await
            .unwrap();
        read_to_end(&mut s, &mut got).await.unwrap();
    })
    .await;
    let mut h = start_proxy(up.addr).await;
    let mut c = connect(&h).await;
    c.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    // The request is in flight once the upstream has it.
    bounded("request in flight", got_rx).await.unwrap();
    h.shutdown.cancel();

    // New connections are refused as soon as the listeners are closed.
    bounded("listener closed", async {
        loop {
            match TcpStream::connect(h.addr).await {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                // Completed into the backlog just before the close, then reset by it.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("unexpected connect error {e}"),
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    })
    .await;

    go_tx.send(()).unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, |g| g.ends_with(b"done")).await;
    assert_eq!(got, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone");
    drop(c);
    let report = bounded("run returns", h.run.take().unwrap()).await.unwrap();
    assert_eq!(report.drained, 1);
    assert_eq!(report.aborted, 0);
    let dst = up.addr;
    up.result().await;
    ok(Some(200), 0, 4)(&exchanges(dst, 1).await[0]);
}

#[tokio::test]
async fn connections_still_open_after_the_drain_period_are_aborted_with_reset() {
    let mut up = upstream(|mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| !g.is_empty()).await;
        let mut buf = [0u8; 16];
        // The proxy cuts the connection: a reset, not a clean end.
        bounded("upstream read", s.read(&mut buf)).await
    })
    .await;
    let mut h = start_with(
        Arc::new(MockOrigDst::fixed(up.addr)),
        test_config(),
        Duration::from_millis(200),
    )
    .await;
    let mut c = connect(&h).await;
    c.write_all(b"\x00idle").await.unwrap();
    bounded("accepted", async {
        while h.counters.accepted.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.shutdown.cancel();
    let report = bounded("run returns", h.run.take().unwrap()).await.unwrap();
    assert_eq!(
        report,
        DrainReport {
            drained: 0,
            aborted: 1
        }
    );
    let mut buf = [0u8; 16];
    assert_reset(bounded("client read", c.read(&mut buf)).await);
    let dst = up.addr;
    assert_reset(up.result().await);
    assert_eq!(connection(dst).await.error, Some(ErrorType::Io));
}

// ---------------------------------------------------------------------------------------------
// Property: random HTTP/1 streams come out byte-identical except traceparent.

mod streams {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Body {
        Empty,
        Length(Vec<u8>),
        Chunked(Vec<Vec<u8>>, Vec<(String, String)>),
    }

    impl Body {
        fn payload_len(&self) -> u64 {
            match self {
                Body::Empty => 0,
                Body::Length(b) => b.len() as u64,
                Body::Chunked(c, _) => c.iter().map(|c| c.len() as u64).sum(),
            }
        }

        fn framing_header(&self) -> String {
            match self {
                Body::Empty => String::new(),
                Body::Length(b) => format!("Content-Length: {}\r\n", b.len()),
                Body::Chunked(..) => "Transfer-Encoding: chunked\r\n".to_owned(),
            }
        }

        fn encode(&self, out: &mut Vec<u8>) {
            match self {
                Body::Empty => {}
                Body::Length(b) => out.extend_from_slice(b),
                Body::Chunked(chunks, trailers) => {
                    for c in chunks.iter().filter(|c| !c.is_empty()) {
                        out.extend_from_slice(format!("{:X}\r\n", c.len()).as_bytes());
                        out.extend_from_slice(c);
                        out.extend_from_slice(b"\r\n");
                    }
                    out.extend_from_slice(b"0\r\n");
                    for (k, v) in trailers {
                        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
                    }
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
    }

    #[derive(Clone, Debug)]
    struct Exchange {
        method: &'static str,
        path: String,
        headers: Vec<(String, String)>,
        traceparent: Option<(u128, u64)>,
        body: Body,
        interim: bool,
        status: u16,
        resp_headers: Vec<(String, String)>,
        resp_body: Body,
    }

    fn header() -> impl Strategy<Value = (String, String)> {
        ("[A-Za-z][A-Za-z0-9-]{0,12}", "[!-~]([ -~]{0,30}[!-~])?").prop_filter(
            "framing and trace headers are generated on purpose",
            |(k, _)| {
                let k = k.to_ascii_lowercase();
                ![
                    "content-length",
                    "transfer-encoding",
                    "traceparent",
                    "tracestate",
                    "upgrade",
                    "connection",
                    "expect",
                    "host",
                    "trailer",
                ]
                .contains(&k.as_str())
            },
        )
    }

    fn body() -> impl Strategy<Value = Body> {
        prop_oneof![
            Just(Body::Empty),
            proptest::collection::vec(any::<u8>(), 0..3000).prop_map(Body::Length),
            (
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1500), 0..5),
                proptest::collection::vec(header(), 0..3)
            )
                .prop_map(|(c, t)| Body::Chunked(c, t)),
        ]
    }

    fn exchange() -> impl Strategy<Value = Exchange> {
        (
            prop::sample::select(vec![
                "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS",
            ]),
            "/[a-z0-9/._-]{0,20}",
            proptest::collection::vec(header(), 0..6),
            proptest::option::of((1u128.., 1u64..)),
            body(),
            any::<bool>(),
            prop::sample::select(vec![200u16, 201, 204, 301, 304, 404, 500, 503]),
            proptest::collection::vec(header(), 0..6),
            body(),
        )
            .prop_map(
                |(
                    method,
                    path,
                    headers,
                    traceparent,
                    body,
                    interim,
                    status,
                    resp_headers,
                    resp_body,
                )| {
                    Exchange {
                        method,
                        path,
                        headers,
                        traceparent,
                        body,
                        interim,
                        status,
                        resp_headers,
                        resp_body,
                    }
                },
            )
    }

    impl Exchange {
        fn response_has_body(&self) -> bool {
            self.method != "HEAD" && self.status != 204 && self.status != 304
        }

        fn request(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(
                format!("{} {} HTTP/1.1\r\nHost: svc\r\n", self.method, self.path).as_bytes(),
            );
            for (k, v) in &self.headers {
                out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
            }
            if let Some((trace, parent)) = self.traceparent {
                out.extend_from_slice(
                    format!("traceparent: 00-{trace:032x}-{parent:016x}-01\r\n").as_bytes(),
                );
            }
            out.extend_from_slice(self.body.framing_header().as_bytes());
            out.extend_from_slice(b"\r\n");
            self.body.encode(out);
        }

        fn response(&self, out: &mut Vec<u8>, until_close: bool) {
            if self.interim {
                out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            out.extend_from_slice(format!("HTTP/1.1 {} Whatever\r\n", self.status).as_bytes());
            for (k, v) in &self.resp_headers {
                out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
            }
            if !self.response_has_body() {
                if self.method == "HEAD" {
                    // What the body would have been: must not be waited for.
                    out.extend_from_slice(b"Content-Length: 1234\r\n");
                }
                out.extend_from_slice(b"\r\n");
                return;
            }
            match (&self.resp_body, until_close) {
                (_, true) => {}
                // Without a length a response body runs until close.
                (Body::Empty, false) => out.extend_from_slice(b"Content-Length: 0\r\n"),
                (b, false) => out.extend_from_slice(b.framing_header().as_bytes()),
            }
            out.extend_from_slice(b"\r\n");
            self.resp_body.encode(out);
        }

        fn response_payload(&self, until_close: bool) -> u64 {
            if !self.response_has_body() {
                return 0;
            }
            match (&self.resp_body, until_close) {
                (Body::Chunked(..), true) => {
                    let mut raw = Vec::new();
                    self.resp_body.encode(&mut raw);
                    raw.len() as u64
                }
                (b, _) => b.payload_len(),
            }
        }
    }

    /// Writes `data` in pieces of the given sizes (cycled).
    async fn write_split(s: &mut (impl AsyncWriteExt + Unpin), data: &[u8], sizes: &[usize]) {
        let mut pos = 0;
        let mut i = 0;
        while pos < data.len() {
            let n = sizes[i % sizes.len()].min(data.len() - pos);
            i += 1;
            s.write_all(&data[pos..pos + n]).await.unwrap();
            s.flush().await.unwrap();
            pos += n;
            if i % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
    }

    async fn run_case(exchanges_in: Vec<Exchange>, until_close: bool, splits: Vec<usize>) {
        let n = exchanges_in.len();
        let mut requests = Vec::new();
        let mut responses = Vec::new();
        for (i, e) in exchanges_in.iter().enumerate() {
            e.request(&mut requests);
            e.response(&mut responses, until_close && i == n - 1);
        }
        let req_len = strip_traceparent(&requests).0.len();
        let resp_for_upstream = responses.clone();
        let splits_up = splits.clone();
        let mut up = upstream(move |mut s| async move {
            let mut got = Vec::new();
            read_until(&mut s, &mut got, |g| {
                strip_traceparent(g).0.len() >= req_len
            })
            .await;
            write_split(&mut s, &resp_for_upstream, &splits_up).await;
            if until_close {
                s.shutdown().await.unwrap();
            } else {
                read_to_end(&mut s, &mut got).await.unwrap();
            }
            got
        })
        .await;
        let h = start_proxy(up.addr).await;
        let c = connect(&h).await;
        let (mut r, mut w) = c.into_split();
        let resp_len = responses.len();
        let writer = async {
            write_split(&mut w, &requests, &splits).await;
            w
        };
        let reader = async {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            while got.len() < resp_len {
                let k = r.read(&mut buf).await.unwrap();
                if k == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..k]);
            }
            got
        };
        let (mut w, mut got) = bounded("exchange", async { tokio::join!(writer, reader) }).await;
        w.shutdown().await.unwrap();
        bounded("end", r.read_to_end(&mut got)).await.unwrap();
        assert!(got == responses, "responses differ");
        let dst = up.addr;
        let received = up.result().await;
        let values = assert_same_but_traceparent(&received, &requests, n);

        let ex = exchanges(dst, n).await;
        assert_eq!(ex.len(), n);
        for (i, (e, gen)) in ex.iter().zip(&exchanges_in).enumerate() {
            let last_until_close = until_close && i == n - 1;
            assert_eq!(e.method, gen.method);
            assert_eq!(e.status, Some(gen.status), "{e:?}");
            assert_eq!(e.error, None, "{e:?}");
            assert_eq!(e.reused, i > 0);
            assert_eq!(e.request_body, gen.body.payload_len());
            assert_eq!(
                e.response_body,
                gen.response_payload(last_until_close),
                "{e:?}"
            );
            assert_eq!(e.outgoing_traceparent.as_deref(), Some(values[i].as_str()));
            if let Some((trace, _)) = gen.traceparent {
                assert!(values[i].starts_with(&format!("00-{trace:032x}-")));
            }
        }
        drop(h);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn random_http1_streams_are_byte_identical_but_traceparent(
            exchanges_in in proptest::collection::vec(exchange(), 1..5),
            until_close in any::<bool>(),
            splits in proptest::collection::vec(1usize..2000, 1..12),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(run_case(exchanges_in, until_close, splits));
        }
    }
}

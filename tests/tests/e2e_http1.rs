//! Privileged end-to-end tests of HTTP/1.x fidelity and error reporting through the real
//! `sidecar` binary (issue 4, items 1 and 7): an app in the pod talks raw bytes to
//! `peers/http_raw.py` in svc through the proxy, and every byte and every measurement is checked:
//! pipelining, `Expect: 100-continue`, chunked bodies with trailers, bodiless responses, HTTP/1.0,
//! an `Upgrade` to an opaque byte stream, malformed heads, header order and case; a refused
//! upstream and a 503.
//!
//! Needs root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool` and the sidecar binary
//! (`SIDECAR_BIN` or `target/release/sidecar`). Run with `--test-threads=1`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::Deserialize;
use sidecar_tests::otlp::{DataPoint, ReceivedSpan};
use sidecar_tests::peers::{self, parse_summary, peers_dir, sha256_hex};
use sidecar_tests::process::Child;
use sidecar_tests::world::{ECHO_PORT, SVC_V4};
use sidecar_tests::{prereq, OtlpReceiver, PodWorld, Sidecar, SidecarConfig};

/// Bound for one client command.
const CLIENT: Duration = Duration::from_secs(30);
/// Bound for telemetry to reach the receiver.
const TELEMETRY: Duration = Duration::from_secs(20);
/// Port of the raw HTTP peer in svc.
const RAW_PORT: u16 = 8081;
/// A port nothing listens on in svc.
const CLOSED_PORT: u16 = 9;

/// One request as `http_raw.py serve` logged it.
#[derive(Clone, Debug, Deserialize)]
struct RawRequest {
    conn: u64,
    method: String,
    target: String,
    version: String,
    /// The raw head without the `traceparent` line.
    head: String,
    traceparent: Option<String>,
    body_len: u64,
    body_sha256: String,
}

/// What `http_raw.py client` printed.
#[derive(Clone, Debug, Deserialize)]
struct RawSummary {
    received_hex: String,
    error: Option<String>,
}

/// One test's world: the sidecar (dropped first), the raw peer, the receiver, the namespaces.
struct Raw {
    _sidecar: Sidecar,
    peer: Child,
    log: PathBuf,
    rx: OtlpReceiver,
    world: PodWorld,
}

fn setup(tag: &str) -> Raw {
    prereq::require();
    let world = PodWorld::new(tag).expect("building the pod world");
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    let log = world.dir.join("raw-peer.requests.jsonl");
    let script = peers_dir()
        .join("http_raw.py")
        .to_string_lossy()
        .into_owned();
    let (port, log_s) = (RAW_PORT.to_string(), log.to_string_lossy().into_owned());
    let mut peer = world
        .spawn_in_svc(
            "raw-peer",
            "python3",
            &["-u", &script, "serve", "--port", &port, "--log", &log_s],
        )
        .expect("starting the raw HTTP peer");
    peer.wait_for_log("READY", peers::PEER_READY_TIMEOUT)
        .expect("raw peer ready");
    peers::wait_port(
        &world.svc,
        SocketAddr::new(IpAddr::V4(SVC_V4), RAW_PORT),
        peers::PEER_READY_TIMEOUT,
    )
    .expect("raw peer accepting");
    let cfg = SidecarConfig {
        otlp_endpoint: Some(rx.endpoint()),
        service_name: Some(format!("e2e-{tag}")),
        ..SidecarConfig::default()
    };
    let sidecar = world.start_sidecar(&cfg).expect("starting the sidecar");
    Raw {
        _sidecar: sidecar,
        peer,
        log,
        rx,
        world,
    }
}

impl Raw {
    /// Requests the raw peer logged whose target contains `needle`.
    fn requests_for(&self, needle: &str) -> Vec<RawRequest> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<RawRequest>(l).expect("bad peer log line"))
            .filter(|r| r.target.contains(needle))
            .collect()
    }

    /// The one request logged for `needle`.
    fn one(&self, needle: &str) -> RawRequest {
        let reqs = self.requests_for(needle);
        assert_eq!(
            reqs.len(),
            1,
            "requests for {needle}: {reqs:#?}; peer: {}",
            self.peer.log()
        );
        reqs.into_iter().next().expect("one request")
    }

    /// Runs `http_raw.py client` as the app against `port` in svc with `steps`; returns what
    /// came back.
    fn client(&self, port: u16, steps: &[Step]) -> Vec<u8> {
        let steps: Vec<serde_json::Value> = steps.iter().map(Step::json).collect();
        static N: AtomicU32 = AtomicU32::new(0);
        let file = self
            .world
            .dir
            .join(&format!("steps-{}.json", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&file, serde_json::Value::Array(steps).to_string()).expect("steps file");
        let steps = file.to_string_lossy().into_owned();
        let script = peers_dir()
            .join("http_raw.py")
            .to_string_lossy()
            .into_owned();
        let (host, port) = (SVC_V4.to_string(), port.to_string());
        let out = self
            .world
            .run_app(
                "python3",
                &[
                    &script, "client", "--host", &host, "--port", &port, "--steps", &steps,
                ],
                CLIENT,
            )
            .expect("running the raw client");
        assert!(out.success(), "raw client failed: {}", out.stderr_str());
        let s: RawSummary = parse_summary(&out.stdout_str()).expect("client summary");
        assert_eq!(s.error, None, "client error; peer: {}", self.peer.log());
        hex::decode(&s.received_hex).expect("hex")
    }

    /// Waits for `n` CLIENT spans whose `url.full` contains `needle`, sorted by start time.
    async fn spans(&self, needle: &str, n: usize) -> Vec<ReceivedSpan> {
        let mut spans = self
            .rx
            .wait_for_spans(TELEMETRY, n, |s| span_for(s, needle))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "fewer than {n} CLIENT spans for {needle} within {TELEMETRY:?}: {:#?}",
                    self.rx.spans()
                )
            });
        spans.sort_by_key(|s| s.start_unix_nano);
        spans
    }
}

fn span_for(s: &ReceivedSpan, needle: &str) -> bool {
    s.is_client()
        && s.attributes
            .str("url.full")
            .is_some_and(|u| u.contains(needle))
}

/// A client step (see `http_raw.py`).
enum Step {
    Send(Vec<u8>),
    Recv(usize),
    Shut,
    Eof,
}

impl Step {
    fn json(&self) -> serde_json::Value {
        match self {
            Step::Send(b) => serde_json::json!(["send", hex::encode(b)]),
            Step::Recv(n) => serde_json::json!(["recv", n]),
            Step::Shut => serde_json::json!(["shut"]),
            Step::Eof => serde_json::json!(["eof"]),
        }
    }
}

/// A request id unique within this test binary.
fn id(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A GET head as the client sends it.
fn get(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: {SVC_V4}:{RAW_PORT}\r\nUser-Agent: raw\r\n\r\n")
}

/// The peer's answer to a plain request (see `respond` in `http_raw.py`).
fn ok_response(method: &str, target: &str, with_body: bool, close: bool) -> String {
    let body = format!("ok {method} {target}");
    let conn = if close { "Connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{conn}\r\n{}",
        body.len(),
        if with_body { body.as_str() } else { "" }
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn status_of(s: &ReceivedSpan) -> Option<i64> {
    s.attributes.int("http.response.status_code")
}

/// Three requests in one write: the responses come back in order, byte-exact, the server sees
/// the three heads unchanged (but for the traceparent line) on one connection, and each request
/// is its own CLIENT span with its own status and trace context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_and_measured_each() {
    let t = setup("h1-pipe");
    let ids: Vec<String> = (0..3).map(|_| id("pipe")).collect();
    let targets = [
        format!("/a?id={}", ids[0]),
        format!("/status/404?id={}", ids[1]),
        format!("/c?id={}", ids[2]),
    ];
    let sent: String = targets.iter().map(|t| get(t)).collect();
    let got = t.client(
        RAW_PORT,
        &[Step::Send(sent.into_bytes()), Step::Shut, Step::Eof],
    );
    let expected = format!(
        "{}HTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\nx{}",
        ok_response("GET", &targets[0], true, false),
        ok_response("GET", &targets[2], true, false)
    );
    assert_eq!(text(&got), expected);

    let reqs: Vec<RawRequest> = ids.iter().map(|i| t.one(i)).collect();
    for (r, target) in reqs.iter().zip(&targets) {
        assert_eq!(r.head, get(target), "{r:#?}");
        assert_eq!(r.conn, reqs[0].conn, "one upstream connection: {reqs:#?}");
    }
    let mut statuses = Vec::new();
    for (i, r) in ids.iter().zip(&reqs) {
        let spans = t.spans(i, 1).await;
        assert_eq!(spans.len(), 1, "{spans:#?}");
        let tp = r
            .traceparent
            .as_deref()
            .expect("a traceparent was injected");
        assert_eq!(
            tp,
            spans[0].traceparent(),
            "the span is the injected context"
        );
        statuses.push(status_of(&spans[0]));
    }
    assert_eq!(statuses, [Some(200), Some(404), Some(200)]);
}

/// curl sends a 2 KiB POST with `Expect: 100-continue`; the server answers 100 then 200: the
/// body arrives intact and one span with status 200 is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_post_goes_through() {
    let t = setup("h1-expect");
    let rid = id("expect");
    let body = peers::pattern(2048, b"expect");
    let file = t.world.dir.join("expect.bin");
    std::fs::write(&file, &body).expect("writing the body");
    let url = format!("http://{SVC_V4}:{RAW_PORT}/expect?id={rid}");
    let data = format!("@{}", file.display());
    let started = std::time::Instant::now();
    let out = t
        .world
        .curl(
            &[
                "-v",
                "-H",
                "Expect: 100-continue",
                "--expect100-timeout",
                "10",
                "--data-binary",
                &data,
                &url,
            ],
            CLIENT,
        )
        .expect("running curl");
    assert!(out.success(), "curl failed: {}", out.stderr_str());
    // curl got the interim 100 and sent the body on it, well before its 10 s fallback.
    assert!(
        out.stderr_str().contains("< HTTP/1.1 100 Continue"),
        "{}",
        out.stderr_str()
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        out.stdout_str(),
        format!("ok POST /expect?id={rid}"),
        "{}",
        out.stderr_str()
    );
    let r = t.one(&rid);
    assert_eq!(r.method, "POST");
    assert_eq!(r.body_len, 2048);
    assert_eq!(r.body_sha256, sha256_hex(&body));
    assert!(r.head.contains("Expect: 100-continue\r\n"), "{}", r.head);
    let spans = t.spans(&rid, 1).await;
    assert_eq!(
        spans.len(),
        1,
        "one span, not one per interim response: {spans:#?}"
    );
    assert_eq!(status_of(&spans[0]), Some(200), "{spans:#?}");
    assert_ne!(spans[0].status_code, 2, "{spans:#?}");
}

/// A chunked request with chunk extensions and trailers reaches the server byte-identical (its
/// digest of the raw body matches), and the chunked response with a trailer comes back
/// byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_and_trailers_are_byte_identical() {
    let t = setup("h1-chunk");
    let rid = id("chunk");
    let target = format!("/chunked?id={rid}");
    let head = format!(
        "POST {target} HTTP/1.1\r\nHost: {SVC_V4}:{RAW_PORT}\r\nTransfer-Encoding: chunked\r\n\
         Trailer: X-Checksum\r\n\r\n"
    );
    let mut body = b"4\r\nabcd\r\n1a;name=value\r\n".to_vec();
    body.extend_from_slice(&peers::pattern(26, b"chunk"));
    body.extend_from_slice(b"\r\n0\r\nX-Checksum: 1234\r\nX-More: yes\r\n\r\n");
    let mut sent = head.clone().into_bytes();
    sent.extend_from_slice(&body);
    let got = t.client(RAW_PORT, &[Step::Send(sent), Step::Shut, Step::Eof]);

    let expected = format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Digest\r\n\r\n\
         5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Digest: {}\r\n\r\n",
        sha256_hex(&body)
    );
    assert_eq!(text(&got), expected);
    let r = t.one(&rid);
    assert_eq!(r.head, head);
    assert_eq!(r.body_sha256, sha256_hex(&body), "{r:#?}");
    let spans = t.spans(&rid, 1).await;
    assert_eq!(status_of(&spans[0]), Some(200), "{spans:#?}");
}

/// HEAD, 204 and 304 responses carry no body: pipelined with a request after them, every
/// response is delimited correctly and each request is measured with its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_204_and_304_have_no_body() {
    let t = setup("h1-nobody");
    let rid = id("nobody");
    let head_target = format!("/h?id={rid}-head");
    let targets = [
        format!("/status/204?id={rid}-204"),
        format!("/status/304?id={rid}-304"),
        format!("/last?id={rid}-last"),
    ];
    let mut sent = get(&head_target).replacen("GET", "HEAD", 1);
    for target in &targets {
        sent.push_str(&get(target));
    }
    let got = t.client(
        RAW_PORT,
        &[Step::Send(sent.into_bytes()), Step::Shut, Step::Eof],
    );
    let expected = format!(
        "{}HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\n\r\n{}",
        ok_response("HEAD", &head_target, false, false),
        ok_response("GET", &targets[2], true, false)
    );
    assert_eq!(text(&got), expected);
    for (suffix, status) in [("head", 200), ("204", 204), ("304", 304), ("last", 200)] {
        let spans = t.spans(&format!("{rid}-{suffix}"), 1).await;
        assert_eq!(spans.len(), 1, "{spans:#?}");
        assert_eq!(status_of(&spans[0]), Some(status), "{spans:#?}");
    }
}

/// An HTTP/1.0 request without keep-alive: the server answers and closes, the client reads the
/// exact response to EOF without half-closing first, and the span says version 1.0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_without_keep_alive_closes_after_the_response() {
    let t = setup("h1-10");
    let rid = id("ten");
    let target = format!("/ten?id={rid}");
    let sent = format!("GET {target} HTTP/1.0\r\nUser-Agent: raw\r\n\r\n");
    let got = t.client(
        RAW_PORT,
        &[Step::Send(sent.clone().into_bytes()), Step::Eof],
    );
    assert_eq!(text(&got), ok_response("GET", &target, true, true));
    let r = t.one(&rid);
    assert_eq!(r.version, "HTTP/1.0");
    assert_eq!(r.head, sent);
    let spans = t.spans(&rid, 1).await;
    assert_eq!(status_of(&spans[0]), Some(200), "{spans:#?}");
    assert_eq!(
        spans[0].attributes.str("network.protocol.version"),
        Some("1.0"),
        "{spans:#?}"
    );
}

/// An `Upgrade` answered with 101: afterwards binary frames go both ways byte-identical, and the
/// upgrade request is one span with status 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_switches_to_an_opaque_byte_stream() {
    let t = setup("h1-upgrade");
    let rid = id("upgrade");
    let target = format!("/upgrade?id={rid}");
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: {SVC_V4}:{RAW_PORT}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let switching = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\n\r\n";
    // Binary frames, some of them looking like HTTP, which must not be parsed.
    let mut frames = vec![0x82, 0x7e, 0x01, 0x00];
    frames.extend((0..=255u8).collect::<Vec<_>>());
    frames.extend_from_slice(b"GET /not-a-request HTTP/1.1\r\nHost: x\r\n\r\n");
    frames.extend(peers::pattern(60_000, b"frames"));
    let got = t.client(
        RAW_PORT,
        &[
            Step::Send(req.into_bytes()),
            Step::Recv(switching.len()),
            Step::Send(frames.clone()),
            Step::Shut,
            Step::Eof,
        ],
    );
    assert_eq!(text(&got[..switching.len().min(got.len())]), switching);
    assert_eq!(got.len(), switching.len() + frames.len(), "echoed length");
    assert!(got[switching.len()..] == frames[..], "frames differ");
    assert_eq!(t.requests_for("not-a-request").len(), 0);
    t.one(&rid);
    let spans = t.spans(&rid, 1).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(status_of(&spans[0]), Some(101), "{spans:#?}");
    assert!(
        t.rx.client_spans().iter().all(|s| !s
            .attributes
            .text("url.full")
            .unwrap_or_default()
            .contains("not-a-request")),
        "the opaque stream was parsed as HTTP"
    );
}

/// `CONNECT` answered with 200: the tunnel's bytes (TLS-looking and HTTP-looking alike) go both
/// ways byte-identical and unparsed, and the `CONNECT` itself is one span with status 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_after_2xx_and_is_measured() {
    let t = setup("h1-connect");
    let rid = id("connect").to_ascii_lowercase();
    let authority = format!("{rid}.tunnel.test:443");
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let established = "HTTP/1.1 200 OK\r\n\r\n";
    let mut tunnel = vec![0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
    tunnel.extend_from_slice(b"GET /not-a-request HTTP/1.1\r\nHost: x\r\n\r\n");
    tunnel.extend(peers::pattern(40_000, b"tunnel"));
    let got = t.client(
        RAW_PORT,
        &[
            Step::Send(req.into_bytes()),
            Step::Recv(established.len()),
            Step::Send(tunnel.clone()),
            Step::Shut,
            Step::Eof,
        ],
    );
    assert_eq!(text(&got[..established.len().min(got.len())]), established);
    assert_eq!(got.len(), established.len() + tunnel.len(), "echoed length");
    assert!(
        got[established.len()..] == tunnel[..],
        "tunnel bytes differ"
    );
    assert_eq!(t.requests_for("not-a-request").len(), 0);
    let logged = t.one(&rid);
    assert_eq!(logged.method, "CONNECT");
    let host = format!("{rid}.tunnel.test");
    let spans =
        t.rx.wait_for_spans(TELEMETRY, 1, |s| {
            s.is_client() && s.attributes.str("server.address") == Some(host.as_str())
        })
        .await
        .unwrap_or_else(|| panic!("no CONNECT span: {:#?}", t.rx.spans()));
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0].name, "CONNECT", "{spans:#?}");
    assert_eq!(status_of(&spans[0]), Some(200), "{spans:#?}");
}

/// Garbage that starts like a request head is forwarded byte-exact (the echo peer returns it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_head_is_forwarded_byte_exact() {
    let t = setup("h1-garbage");
    let echo = t.world.start_echo_peer().expect("starting the echo peer");
    let mut sent =
        b"GET /\x00\xff\xfe bad HTTP/1.1\r\nno colon here\r\n\x01\x02: \x7f\r\n\r\n".to_vec();
    sent.extend(peers::pattern(50_000, b"garbage"));
    let got = t.client(
        ECHO_PORT,
        &[Step::Send(sent.clone()), Step::Shut, Step::Eof],
    );
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "echo differs from what was sent");
    let conns = echo.connections().expect("echo log");
    assert!(
        conns
            .iter()
            .any(|c| c.bytes == sent.len() as u64 && c.peer == "198.18.0.1"),
        "{conns:#?}"
    );
    // The proxy carried it (not a direct connection): it counted every byte both ways.
    let n = sent.len() as f64;
    let io =
        t.rx.wait_for(TELEMETRY, |r| {
            let m = r.latest_metric("sidecar.proxy.connection.io")?;
            let mut by = std::collections::BTreeMap::<String, f64>::new();
            for p in m
                .points
                .iter()
                .filter(|p| p.attributes.int("server.port") == Some(i64::from(ECHO_PORT)))
            {
                let dir = p
                    .attributes
                    .text("network.io.direction")
                    .unwrap_or_default();
                *by.entry(dir).or_insert(0.0) += p.value.as_f64().unwrap_or(0.0);
            }
            (by.len() == 2 && by.values().all(|v| *v >= n)).then_some(by)
        })
        .await;
    let by = io.unwrap_or_else(|| {
        panic!(
            "no sidecar.proxy.connection.io to the echo port with {n} bytes each way: {:#?}",
            t.rx.metrics_named("sidecar.proxy.connection.io")
        )
    });
    assert!(by.values().all(|v| *v == n), "{by:?}");
}

/// Header names keep their case and order, odd spacing and repeated headers included: the
/// server's raw head equals the client's except for the traceparent line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_order_and_case_are_preserved() {
    let t = setup("h1-headers");
    let rid = id("headers");
    let sent = format!(
        "GET /hdr?id={rid} HTTP/1.1\r\nX-Zeta: 1\r\nhost: {SVC_V4}:{RAW_PORT}\r\n\
         x-MiXeD-CaSe:   spaced  value \r\nACCEPT: */*\r\nX-Dup: a\r\nx-dup: b\r\nX-Alpha:2\r\n\r\n"
    );
    let got = t.client(
        RAW_PORT,
        &[Step::Send(sent.clone().into_bytes()), Step::Shut, Step::Eof],
    );
    assert_eq!(
        text(&got),
        ok_response("GET", &format!("/hdr?id={rid}"), true, false)
    );
    let r = t.one(&rid);
    assert_eq!(r.head, sent);
    assert!(r.traceparent.is_some(), "went through the proxy: {r:#?}");
}

/// Waits for a point of `metric` matching `filter`.
async fn wait_point(
    rx: &OtlpReceiver,
    metric: &str,
    mut filter: impl FnMut(&DataPoint) -> bool,
) -> DataPoint {
    rx.wait_for(TELEMETRY, |r| {
        r.metrics_named(metric)
            .into_iter()
            .rev()
            .find_map(|m| m.points.into_iter().find(|p| filter(p)))
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no matching {metric} point: {:#?}",
            rx.metrics_named(metric)
        )
    })
}

/// A refused upstream reaches the client as a refused/reset connection (curl exit 7 or 56), not
/// as an HTTP 502 made up by the sidecar, and is measured as a failed proxy connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_is_refused_for_the_client_and_measured() {
    let t = setup("h1-refused");
    let url = format!("http://{SVC_V4}:{CLOSED_PORT}/refused");
    let out = t
        .world
        .curl(&["-w", "%{http_code}", &url], CLIENT)
        .expect("running curl");
    assert!(
        matches!(out.code(), Some(7) | Some(56)),
        "curl exit {:?}: stdout {:?} stderr {}",
        out.code(),
        out.stdout_str(),
        out.stderr_str()
    );
    assert!(!out.stdout_str().contains("502"), "{}", out.stdout_str());
    let p = wait_point(&t.rx, "sidecar.proxy.connection.duration", |p| {
        p.attributes.int("server.port") == Some(i64::from(CLOSED_PORT))
    })
    .await;
    let err = p.attributes.text("error.type");
    assert!(
        err.as_deref()
            .is_some_and(|e| e == "connection_refused" || e == "connection_reset"),
        "{p:#?}"
    );
}

/// A 503 is a CLIENT span with status error and `error.type=503`, and a duration point with the
/// same `error.type`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_503_is_an_error_span_and_metric() {
    let t = setup("h1-503");
    let rid = id("unavailable");
    let target = format!("/status/503?id={rid}");
    let got = t.client(
        RAW_PORT,
        &[Step::Send(get(&target).into_bytes()), Step::Shut, Step::Eof],
    );
    assert_eq!(
        text(&got),
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 1\r\n\r\nx"
    );
    let spans = t.spans(&rid, 1).await;
    assert_eq!(spans[0].status_code, 2, "{spans:#?}");
    assert_eq!(status_of(&spans[0]), Some(503));
    assert_eq!(
        spans[0].attributes.text("error.type").as_deref(),
        Some("503")
    );
    let p = wait_point(&t.rx, "http.client.request.duration", |p| {
        p.attributes.int("http.response.status_code") == Some(503)
    })
    .await;
    assert_eq!(
        p.attributes.text("error.type").as_deref(),
        Some("503"),
        "{p:#?}"
    );
}

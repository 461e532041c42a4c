//! Privileged end-to-end test of websockets through the real `sidecar` binary: a `websockets`
//! echo server in svc (`peers/ws_peer.py`) and a `websockets` client as the pod's app exchange
//! text and binary messages of many sizes. The upgrade request is an HTTP/1.1 request measured
//! with status 101; what follows is forwarded opaquely and counted as connection bytes.
//!
//! Needs root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool`, the nghttp2 tools, the
//! peers' virtualenv (`cargo xtask setup`) and the sidecar binary (`SIDECAR_BIN` or
//! `target/release/sidecar`). Run with `--test-threads=1`.

use std::collections::BTreeMap;
use std::time::Duration;

use sidecar_tests::cmd::Finished;
use sidecar_tests::h2peers::{WsSummary, WS_PEER};
use sidecar_tests::otlp::{DataPoint, ReceivedSpan};
use sidecar_tests::peers::parse_summary;
use sidecar_tests::world::SVC_V4;
use sidecar_tests::{prereq, PodWorld, SidecarConfig};

/// Bound for one client command.
const CLIENT: Duration = Duration::from_secs(60);
/// Bound for telemetry to reach the receiver.
const TELEMETRY: Duration = Duration::from_secs(20);
/// Bound for the server to log the closed connection.
const PEER_LOG: Duration = Duration::from_secs(10);
/// Port of the websocket echo server in svc.
const WS_PORT: u16 = 8092;
/// Messages per exchange.
const MESSAGES: u64 = 50;
/// What a connection may carry beyond the message payloads: the handshake (with an injected
/// traceparent), frame headers (at most 14 bytes per client frame, 10 per server frame), the
/// close frames.
const OVERHEAD: f64 = 8192.0;

fn run_client(world: &PodWorld, uri: &str, in_app: bool) -> (Finished, WsSummary) {
    let args = [
        "client",
        "--uri",
        uri,
        "--count",
        &MESSAGES.to_string(),
        "--seed",
        "ws-e2e",
    ];
    let out = if in_app {
        world.run_app_venv(WS_PEER, &args, CLIENT)
    } else {
        world.run_svc_venv(WS_PEER, &args, CLIENT)
    }
    .expect("running the websocket client");
    assert!(!out.timed_out, "the websocket client timed out: {out:?}");
    let s: WsSummary = parse_summary(&out.stdout_str())
        .unwrap_or_else(|e| panic!("{e}; stderr: {}", out.stderr_str()));
    (out, s)
}

fn assert_all_echoed(out: &Finished, s: &WsSummary) {
    assert!(
        out.success() && s.equal,
        "messages not echoed intact: {s:#?}; stderr: {}",
        out.stderr_str()
    );
    assert_eq!(s.echoed, MESSAGES, "{s:#?}");
    assert_eq!((s.text, s.binary), (MESSAGES / 2, MESSAGES / 2), "{s:#?}");
    assert_eq!(s.status, Some(101), "{s:#?}");
}

fn is_ws_span(s: &ReceivedSpan, id: &str) -> bool {
    s.is_client() && s.attributes.str("url.full").is_some_and(|u| u.contains(id))
}

/// `sidecar.proxy.connection.io` to the websocket port, summed per `network.io.direction`.
fn io_by_direction(points: &[DataPoint]) -> BTreeMap<String, f64> {
    let mut by = BTreeMap::new();
    for p in points
        .iter()
        .filter(|p| p.attributes.int("server.port") == Some(i64::from(WS_PORT)))
    {
        let dir = p
            .attributes
            .text("network.io.direction")
            .unwrap_or_default();
        *by.entry(dir).or_insert(0.0) += p.value.as_f64().unwrap_or(0.0);
    }
    by
}

/// 50 text and binary messages from 0 B to 1 MiB (all three frame length encodings) are echoed
/// intact through the sidecar; the server saw the upgrade with a traceparent that is the CLIENT
/// span's; that span has status 101; the connection's bytes are counted both ways (at least the
/// payloads, at most the payloads plus framing and handshake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_are_echoed_and_the_upgrade_is_measured() {
    prereq::require_http2();
    let world = PodWorld::new("ws").expect("building the pod world");
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    let server = world
        .start_ws_server("ws-server", WS_PORT)
        .expect("starting the websocket server");
    let cfg = SidecarConfig {
        otlp_endpoint: Some(rx.endpoint()),
        service_name: Some("e2e-ws".to_string()),
        ..SidecarConfig::default()
    };
    let _sidecar = world.start_sidecar(&cfg).expect("starting the sidecar");

    let id = "ws-through-sidecar";
    let uri = format!("ws://{SVC_V4}:{WS_PORT}/echo?id={id}");
    let (out, s) = run_client(&world, &uri, true);
    assert_all_echoed(&out, &s);
    let conn = server
        .wait_connection(id, PEER_LOG)
        .expect("the server's log");
    assert_eq!(
        (conn.messages, conn.bytes),
        (MESSAGES, s.bytes_sent),
        "{conn:#?}"
    );
    let tp = conn
        .trace_parent()
        .unwrap_or_else(|| panic!("the upgrade request carried no traceparent: {conn:#?}"));

    let spans = rx
        .wait_for_spans(TELEMETRY, 1, |s| is_ws_span(s, id))
        .await
        .unwrap_or_else(|| panic!("no CLIENT span for the upgrade; spans: {:#?}", rx.spans()));
    assert_eq!(spans.len(), 1, "one span for the upgrade: {spans:#?}");
    let span = &spans[0];
    assert_eq!(
        (span.trace_id.as_str(), span.span_id.as_str()),
        (tp.trace_id.as_str(), tp.parent_id.as_str()),
        "the forwarded traceparent is not the span's: {span:#?}"
    );
    let a = &span.attributes;
    assert_eq!(a.str("http.request.method"), Some("GET"), "{span:#?}");
    assert_eq!(a.int("http.response.status_code"), Some(101), "{span:#?}");
    assert_eq!(a.str("network.protocol.version"), Some("1.1"), "{span:#?}");
    assert_eq!(a.int("server.port"), Some(i64::from(WS_PORT)), "{span:#?}");
    assert_ne!(span.status_code, 2, "{span:#?}");

    let m = rx
        .wait_for_metric(TELEMETRY, "http.client.request.duration", |p| {
            p.attributes.int("server.port") == Some(i64::from(WS_PORT))
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "no http.client.request.duration point for the upgrade: {:#?}",
                rx.metrics_named("http.client.request.duration")
            )
        });
    let p = m
        .points
        .iter()
        .find(|p| p.attributes.int("server.port") == Some(i64::from(WS_PORT)))
        .expect("the point");
    assert_eq!(
        p.attributes.int("http.response.status_code"),
        Some(101),
        "{p:#?}"
    );

    let payload = s.bytes_sent as f64;
    let by = rx
        .wait_for(TELEMETRY, |r| {
            let m = r.latest_metric("sidecar.proxy.connection.io")?;
            let by = io_by_direction(&m.points);
            (by.len() == 2 && by.values().all(|v| *v >= payload)).then_some(by)
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "sidecar.proxy.connection.io does not count {payload} bytes each way: {:#?}",
                rx.metrics_named("sidecar.proxy.connection.io")
            )
        });
    for (dir, bytes) in &by {
        assert!(
            *bytes <= payload + OVERHEAD,
            "{dir}: {bytes} bytes counted for {payload} bytes of payload: {by:?}"
        );
    }
}

/// Control: the same exchange without a sidecar, from the app and from svc.
#[test]
fn websocket_peers_work_on_the_direct_path() {
    prereq::require_http2_test_bed();
    let world = PodWorld::new("ws-direct").expect("building the pod world");
    let server = world
        .start_ws_server("ws-server", WS_PORT)
        .expect("starting the websocket server");
    let uri = format!("ws://{SVC_V4}:{WS_PORT}/echo?id=direct");
    let (out, s) = run_client(&world, &uri, true);
    assert_all_echoed(&out, &s);
    let conn = server.wait_connection("direct", PEER_LOG).expect("log");
    assert_eq!((conn.messages, conn.bytes), (MESSAGES, s.bytes_sent));
    assert_eq!(conn.peer, "198.18.0.1");
    assert!(conn.traceparent.is_none(), "{conn:#?}");
    let uri = format!("ws://[fd5e:1dec::2]:{WS_PORT}/echo?id=svc-local");
    let (out, s) = run_client(&world, &uri, false);
    assert_all_echoed(&out, &s);
}

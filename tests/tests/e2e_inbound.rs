//! Privileged end-to-end tests of inbound steering (issue 3): a client in svc calls the pod's
//! application (an HTTP server in the pod namespace and `app` cgroup); the sidecar steers the
//! connection to its inbound listener and forwards it to the application from 127.0.0.6 (IPv4)
//! or ::1 (IPv6), byte-exact, with a SERVER span and `http.server.*` metrics.
//!
//! Whether a request was steered shows in the peer address the application logged: 127.0.0.6 /
//! ::1 through the proxy, the client's own 198.18.0.2 / fd5e:1dec::2 when direct.
//!
//! Needs root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool` and the sidecar binary
//! (`SIDECAR_BIN` or `target/release/sidecar`). Run with `--test-threads=1`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sidecar_tests::otlp::{MetricKind, ReceivedSpan};
use sidecar_tests::peers::{self, HttpPeer, PeerRequest};
use sidecar_tests::world::APP_PORT;
use sidecar_tests::{prereq, OtlpReceiver, PodWorld, Sidecar, SidecarConfig, TraceParent};

/// Bound for one client command.
const CLIENT: Duration = Duration::from_secs(30);
/// Bound for telemetry to reach the receiver.
const TELEMETRY: Duration = Duration::from_secs(20);
/// Bound for a server started after the sidecar to be discovered (re-discovery every ~2 s).
const DISCOVERY: Duration = Duration::from_secs(10);
/// A second application port.
const OTHER_PORT: u16 = 8081;
/// Source of the proxy's IPv4 connections to the application.
const PROXY_SOURCE_V4: &str = "127.0.0.6";
/// Source of the proxy's IPv6 connections to the application.
const PROXY_SOURCE_V6: &str = "::1";

/// Starts a sidecar exporting to `rx` with `extra` flags.
fn start_sidecar(world: &PodWorld, rx: &OtlpReceiver, tag: &str, extra: &[&str]) -> Sidecar {
    let cfg = SidecarConfig {
        otlp_endpoint: Some(rx.endpoint()),
        service_name: Some(format!("e2e-{tag}")),
        annotations_file: Some(world.annotations_path()),
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..SidecarConfig::default()
    };
    world.start_sidecar(&cfg).expect("starting the sidecar")
}

fn world(tag: &str) -> (PodWorld, OtlpReceiver) {
    prereq::require();
    let world = PodWorld::new(tag).expect("building the pod world");
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    (world, rx)
}

/// A request id unique within this test binary, carried in the query string.
fn id(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Runs curl in svc and asserts it succeeded; returns stdout.
fn curl_ok(world: &PodWorld, args: &[&str]) -> String {
    let out = world.curl_from_svc(args, CLIENT).expect("running curl");
    assert!(
        out.success(),
        "curl {args:?} from svc failed: status {:?} timed_out {} stderr {}",
        out.status,
        out.timed_out,
        out.stderr_str()
    );
    out.stdout_str()
}

/// `GET /bytes/16?id=<id>` on the pod's `port` from svc, body checked.
fn get16(world: &PodWorld, port: u16, id: &str) {
    let out = world
        .curl_from_svc(
            &[&world.pod_url(port, &format!("/bytes/16?id={id}"))],
            CLIENT,
        )
        .expect("running curl");
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, peers::pattern(16, peers::DEFAULT_SEED));
}

/// The one request `app` logged for `id`.
fn one_request(app: &HttpPeer, id: &str) -> PeerRequest {
    let reqs = app.requests_for(id).expect("reading the app's log");
    assert_eq!(reqs.len(), 1, "requests for {id}: {reqs:#?}");
    reqs.into_iter().next().expect("one request")
}

fn assert_steered(app: &HttpPeer, id: &str) -> PeerRequest {
    let req = one_request(app, id);
    assert_eq!(
        req.peer, PROXY_SOURCE_V4,
        "request {id} did not come from the proxy: {req:#?}"
    );
    req
}

fn assert_direct(app: &HttpPeer, id: &str) {
    let req = one_request(app, id);
    assert_eq!(
        req.peer, "198.18.0.2",
        "request {id} did not come straight from the client: {req:#?}"
    );
    assert!(req.header("traceparent").is_none(), "{req:#?}");
}

fn server_span_for(s: &ReceivedSpan, id: &str) -> bool {
    s.is_server()
        && ["url.query", "url.path", "url.full"]
            .iter()
            .any(|k| s.attributes.str(k).is_some_and(|v| v.contains(id)))
}

async fn server_span(rx: &OtlpReceiver, id: &str) -> ReceivedSpan {
    rx.wait_for_spans(TELEMETRY, 1, |s| server_span_for(s, id))
        .await
        .unwrap_or_else(|| panic!("no SERVER span for {id}; spans: {:#?}", rx.spans()))
        .into_iter()
        .next()
        .expect("one span")
}

/// Asserts no SERVER span exists for `id`, once the span of `control` (a later request) has
/// arrived (spans are exported in order).
async fn assert_no_server_span(rx: &OtlpReceiver, id: &str, control: &str) {
    server_span(rx, control).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leaked: Vec<_> = rx
        .spans()
        .into_iter()
        .filter(|s| server_span_for(s, id))
        .collect();
    assert!(leaked.is_empty(), "{id} was traced: {leaked:#?}");
}

/// The application started before the sidecar is steered at once: body byte-exact, peer
/// 127.0.0.6, SERVER span continuing the caller's trace and parent of what the app receives,
/// `http.server.request.duration` with its attributes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_request_is_steered_traced_and_measured() {
    let (world, rx) = world("in-basic");
    let app = world
        .start_app_server("app", APP_PORT)
        .expect("starting the app");
    let _sidecar = start_sidecar(&world, &rx, "in-basic", &[]);

    let id = id("in");
    let caller = TraceParent::generate(&id);
    let header = format!("traceparent: {caller}");
    let url = world.pod_url(APP_PORT, &format!("/bytes/64?id={id}"));
    let out = world
        .curl_from_svc(&["-H", &header, &url], CLIENT)
        .expect("curl");
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, peers::pattern(64, peers::DEFAULT_SEED));

    let req = assert_steered(&app, &id);
    let seen = req.traceparent().unwrap_or_else(|| {
        panic!("the app received no valid traceparent: {req:#?}");
    });
    let span = server_span(&rx, &id).await;
    assert_eq!(
        span.trace_id, caller.trace_id,
        "the caller's trace continues"
    );
    assert_eq!(
        span.parent_span_id, caller.parent_id,
        "parent = caller's span"
    );
    assert_eq!(seen.trace_id, caller.trace_id);
    assert_eq!(
        seen.parent_id, span.span_id,
        "the app's parent = SERVER span"
    );
    assert_eq!(
        req.header("traceparent").map(|v| v.matches("00-").count()),
        Some(1),
        "exactly one traceparent value: {req:#?}"
    );
    let a = &span.attributes;
    assert_eq!(span.name, "GET /bytes/{id}", "heuristic http.route");
    assert_eq!(a.str("http.request.method"), Some("GET"), "{a:?}");
    assert_eq!(a.int("http.response.status_code"), Some(200), "{a:?}");
    assert_eq!(a.int("server.port"), Some(i64::from(APP_PORT)), "{a:?}");
    assert_eq!(a.str("url.scheme"), Some("http"), "{a:?}");
    assert_eq!(a.str("client.address"), Some("198.18.0.2"), "{a:?}");

    let m = rx
        .wait_for_metric(TELEMETRY, "http.server.request.duration", |p| {
            p.attributes.int("server.port") == Some(i64::from(APP_PORT))
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "no http.server.request.duration point; metrics: {:#?}",
                rx.metrics_named("http.server.request.duration")
            )
        });
    assert_eq!(m.unit, "s");
    assert_eq!(m.kind, MetricKind::Histogram);
    let p = m
        .points
        .iter()
        .find(|p| p.attributes.int("server.port") == Some(i64::from(APP_PORT)))
        .expect("the point");
    let a = &p.attributes;
    assert_eq!(a.str("http.request.method"), Some("GET"), "{a:?}");
    assert_eq!(a.int("http.response.status_code"), Some(200), "{a:?}");
    assert_eq!(a.str("url.scheme"), Some("http"), "{a:?}");
    assert!(
        !a.contains("client.address"),
        "client.address is for spans only: {a:?}"
    );
    assert!(p.value.count() >= Some(1), "{p:?}");
}

/// 16 MiB both ways through the inbound path, byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_sixteen_mib_bodies_are_byte_identical_both_ways() {
    const N: usize = 16 * 1024 * 1024;
    let (world, rx) = world("in-bodies");
    let app = world
        .start_app_server("app", APP_PORT)
        .expect("starting the app");
    let _sidecar = start_sidecar(&world, &rx, "in-bodies", &[]);

    let get_id = id("get");
    let file = world.dir.join("download.bin");
    let file_s = file.to_string_lossy().into_owned();
    curl_ok(
        &world,
        &[
            "-o",
            &file_s,
            &world.pod_url(APP_PORT, &format!("/bytes/{N}?id={get_id}")),
        ],
    );
    let got = std::fs::read(&file).expect("reading the download");
    assert_eq!(got.len(), N);
    assert_eq!(
        peers::sha256_hex(&got),
        peers::sha256_hex(&peers::pattern(N, peers::DEFAULT_SEED)),
        "16 MiB response body differs"
    );
    assert_steered(&app, &get_id);

    let upload = peers::pattern(N, b"upload-inbound");
    let want = peers::sha256_hex(&upload);
    let up = world.dir.join("upload.bin");
    std::fs::write(&up, &upload).expect("writing the upload");
    let data = format!("@{}", up.display());
    for chunked in [false, true] {
        let post_id = id(if chunked { "post-chunked" } else { "post" });
        let url = world.pod_url(APP_PORT, &format!("/sha256?id={post_id}"));
        let mut args = vec![
            "--data-binary",
            &data,
            "-H",
            "Content-Type: application/octet-stream",
        ];
        if chunked {
            args.extend(["-H", "Transfer-Encoding: chunked"]);
        }
        args.push(&url);
        let echoed = curl_ok(&world, &args);
        assert_eq!(
            echoed, want,
            "16 MiB request body differs (chunked: {chunked})"
        );
        assert_steered(&app, &post_id);
    }
}

/// IPv6 clients are steered too; the application sees the proxy's ::1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_ipv6_is_steered() {
    let (world, rx) = world("in-v6");
    let app = world
        .start_app_server("app", APP_PORT)
        .expect("starting the app");
    let _sidecar = start_sidecar(&world, &rx, "in-v6", &[]);
    let id = id("v6");
    let url = world.pod_url_v6(APP_PORT, &format!("/bytes/1000?id={id}"));
    let out = world.curl_from_svc(&["-g", &url], CLIENT).expect("curl");
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, peers::pattern(1000, peers::DEFAULT_SEED));
    let req = one_request(&app, &id);
    assert_eq!(req.peer, PROXY_SOURCE_V6, "{req:#?}");
    let span = server_span(&rx, &id).await;
    assert_eq!(
        span.attributes.str("client.address"),
        Some("fd5e:1dec::2"),
        "{:?}",
        span.attributes
    );
    let seen = req.traceparent().expect("a traceparent from the proxy");
    assert_eq!(seen.parent_id, span.span_id);
}

/// A server that starts listening after the sidecar is ready is discovered and steered within
/// a bounded wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_started_after_the_sidecar_is_discovered() {
    let (world, rx) = world("in-late");
    let _sidecar = start_sidecar(&world, &rx, "in-late", &[]);
    let app = world
        .start_app_server("late-app", OTHER_PORT)
        .expect("starting the app");
    let started = Instant::now();
    let mut steered = None;
    let mut direct = 0;
    while started.elapsed() < DISCOVERY {
        let probe = id("late");
        get16(&world, OTHER_PORT, &probe);
        let req = one_request(&app, &probe);
        if req.peer == PROXY_SOURCE_V4 {
            steered = Some(probe);
            break;
        }
        assert_eq!(req.peer, "198.18.0.2", "{req:#?}");
        direct += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let probe = steered.unwrap_or_else(|| {
        panic!("port {OTHER_PORT} not steered {DISCOVERY:?} after its server started ({direct} direct requests)")
    });
    server_span(&rx, &probe).await;
}

/// A port in `--exclude-inbound-ports` is not steered (real client address, no SERVER span)
/// while another served port is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_inbound_port_is_not_steered() {
    let (world, rx) = world("in-excl");
    let app = world
        .start_app_server("app", APP_PORT)
        .expect("starting the app");
    let other = world
        .start_app_server("other-app", OTHER_PORT)
        .expect("starting the second app");
    let _sidecar = start_sidecar(
        &world,
        &rx,
        "in-excl",
        &["--exclude-inbound-ports", &APP_PORT.to_string()],
    );
    let excluded = id("excluded");
    let control = id("control");
    get16(&world, APP_PORT, &excluded);
    get16(&world, OTHER_PORT, &control);
    assert_direct(&app, &excluded);
    assert_steered(&other, &control);
    assert_no_server_span(&rx, &excluded, &control).await;
}

/// `--include-inbound-ports` limits steering to the listed ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_inbound_ports_limit_steering() {
    let (world, rx) = world("in-incl");
    let app = world
        .start_app_server("app", APP_PORT)
        .expect("starting the app");
    let other = world
        .start_app_server("other-app", OTHER_PORT)
        .expect("starting the second app");
    let _sidecar = start_sidecar(
        &world,
        &rx,
        "in-incl",
        &["--include-inbound-ports", &OTHER_PORT.to_string()],
    );
    let not_listed = id("not-listed");
    let listed = id("listed");
    get16(&world, APP_PORT, &not_listed);
    get16(&world, OTHER_PORT, &listed);
    assert_direct(&app, &not_listed);
    assert_steered(&other, &listed);
    assert_no_server_span(&rx, &not_listed, &listed).await;
}

/// After `kill -9` of the sidecar the application is still reachable, directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_the_app_is_still_reachable() {
    let (world, rx) = world("in-kill9");
    let app = world
        .start_app_server("app", APP_PORT)
        .expect("starting the app");
    let mut sidecar = start_sidecar(&world, &rx, "in-kill9", &[]);
    let before = id("before");
    get16(&world, APP_PORT, &before);
    assert_steered(&app, &before);

    sidecar.kill9().expect("kill -9");
    let after = id("after");
    get16(&world, APP_PORT, &after);
    assert_direct(&app, &after);
    let after6 = id("after6");
    let url = world.pod_url_v6(APP_PORT, &format!("/bytes/16?id={after6}"));
    let out = world.curl_from_svc(&["-g", &url], CLIENT).expect("curl");
    assert!(out.success(), "IPv6 after kill -9: {out:?}");
    assert_eq!(one_request(&app, &after6).peer, "fd5e:1dec::2");
}

//! Privileged end-to-end tests: the real `sidecar` binary intercepting a pod's traffic between
//! network namespaces, checked against real peers and an in-test OTLP receiver.
//!
//! Needs root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool` and the sidecar binary
//! (`SIDECAR_BIN` or `target/release/sidecar`); a test fails, saying what is missing, otherwise.
//! Each test builds its own world and cleans it up. Run with `--test-threads=1` to keep timings
//! calm on small machines.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sidecar_tests::admin::{self, ADMIN_PORT};
use sidecar_tests::cgroup::assert_nothing_attached;
use sidecar_tests::otlp::{MetricKind, ReceivedMetric, ReceivedSpan};
use sidecar_tests::peers::{self, parse_summary, EchoSummary, PeerRequest, UdpSummary};
use sidecar_tests::world::{ECHO_PORT, HTTP_PORT, SVC_V4, SVC_V6, UDP_PORT};
use sidecar_tests::{prereq, OtlpReceiver, PodWorld, Sidecar, SidecarConfig, TraceParent};

/// Bound of one curl: 16 MiB through the Python peer take about 35 s in the VM tests (qemu TCG).
const CLIENT: Duration = Duration::from_secs(90);
/// Bound for telemetry to reach the receiver (export intervals are 500 ms / 100 ms).
const TELEMETRY: Duration = Duration::from_secs(20);
/// Drain timeout given to the sidecar.
const DRAIN_SECS: u64 = 10;

/// One test's world: the sidecar (dropped first), the receiver, then the namespaces.
struct E2e {
    sidecar: Sidecar,
    rx: OtlpReceiver,
    world: PodWorld,
    service: String,
}

/// Builds a world, starts a receiver in the pod namespace and a sidecar exporting to it.
fn setup(tag: &str) -> E2e {
    prereq::require();
    let world = PodWorld::new(tag).expect("building the pod world");
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    let service = format!("e2e-{tag}");
    let cfg = SidecarConfig {
        otlp_endpoint: Some(rx.endpoint()),
        service_name: Some(service.clone()),
        drain_timeout_secs: Some(DRAIN_SECS),
        ..SidecarConfig::default()
    };
    let sidecar = world.start_sidecar(&cfg).expect("starting the sidecar");
    E2e {
        sidecar,
        rx,
        world,
        service,
    }
}

/// A request id unique within this test binary, carried in the query string.
fn id(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Runs curl as the app and asserts it succeeded.
fn curl_ok(world: &PodWorld, args: &[&str]) -> String {
    let out = world.curl(args, CLIENT).expect("running curl");
    assert!(
        out.success(),
        "curl {args:?} failed: status {:?} timed_out {} stderr {}",
        out.status,
        out.timed_out,
        out.stderr_str()
    );
    out.stdout_str()
}

/// The one request the HTTP peer logged for `id`.
fn one_request(world: &PodWorld, id: &str) -> PeerRequest {
    let reqs = world.http.requests_for(id).expect("reading the peer log");
    assert_eq!(reqs.len(), 1, "requests for {id}: {reqs:#?}");
    reqs.into_iter().next().expect("one request")
}

/// The traceparent the proxy injected into the request for `id` (curl sent none).
fn injected(world: &PodWorld, id: &str) -> TraceParent {
    let req = one_request(world, id);
    let raw = req.header("traceparent").unwrap_or_else(|| {
        panic!(
            "the server saw no traceparent for {id}, so the request bypassed the proxy: {req:#?}"
        )
    });
    TraceParent::parse(raw).unwrap_or_else(|| panic!("malformed traceparent {raw:?}"))
}

/// Asserts the peer saw the request for `id` without a traceparent (it went direct).
fn assert_direct(world: &PodWorld, id: &str) {
    let req = one_request(world, id);
    assert!(
        req.header("traceparent").is_none(),
        "request {id} carries a traceparent, so it went through a proxy: {req:#?}"
    );
}

fn span_for(s: &ReceivedSpan, id: &str) -> bool {
    s.is_client() && s.attributes.str("url.full").is_some_and(|u| u.contains(id))
}

/// Waits for the CLIENT span of the request `id`.
async fn client_span(rx: &OtlpReceiver, id: &str) -> ReceivedSpan {
    let spans = rx
        .wait_for_spans(TELEMETRY, 1, |s| span_for(s, id))
        .await
        .unwrap_or_else(|| {
            panic!(
                "no CLIENT span with url.full containing {id} within {TELEMETRY:?}; spans: {:#?}",
                rx.spans()
            )
        });
    spans.into_iter().next().expect("one span")
}

/// Per `network.io.direction`, the sum of the latest export's data points.
fn io_by_direction(m: &ReceivedMetric) -> BTreeMap<String, f64> {
    let mut by = BTreeMap::new();
    for p in &m.points {
        let dir = p
            .attributes
            .str("network.io.direction")
            .unwrap_or("<none>")
            .to_owned();
        *by.entry(dir).or_insert(0.0) += p.value.as_f64().unwrap_or(0.0);
    }
    by
}

// 1
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_curl_goes_through_the_proxy() {
    let t = setup("redirect");
    let id = id("redirect");
    let out = t
        .world
        .curl(&[&t.world.url(&format!("/bytes/64?id={id}"))], CLIENT)
        .expect("curl");
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, peers::pattern(64, peers::DEFAULT_SEED));
    let tp = injected(&t.world, &id);
    assert!(tp.sampled(), "{tp}");
    let span = client_span(&t.rx, &id).await;
    assert_eq!(span.trace_id, tp.trace_id);
}

// 2
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_bodies_are_byte_identical_both_ways() {
    const N: usize = 16 * 1024 * 1024;
    let t = setup("bodies");

    let get_id = id("get");
    let file = t.world.dir.join("download.bin");
    let file_s = file.to_string_lossy().into_owned();
    curl_ok(
        &t.world,
        &[
            "-o",
            &file_s,
            &t.world.url(&format!("/bytes/{N}?id={get_id}")),
        ],
    );
    let got = std::fs::read(&file).expect("reading the download");
    assert_eq!(got.len(), N);
    assert_eq!(
        peers::sha256_hex(&got),
        peers::sha256_hex(&peers::pattern(N, peers::DEFAULT_SEED)),
        "16 MiB response body differs"
    );
    injected(&t.world, &get_id);

    let upload = peers::pattern(N, b"upload");
    let want = peers::sha256_hex(&upload);
    let up = t.world.dir.join("upload.bin");
    std::fs::write(&up, &upload).expect("writing the upload");
    let data = format!("@{}", up.display());
    for chunked in [false, true] {
        let post_id = id(if chunked { "post-chunked" } else { "post" });
        let url = t.world.url(&format!("/sha256?id={post_id}"));
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
        let echoed = curl_ok(&t.world, &args);
        assert_eq!(
            echoed, want,
            "16 MiB request body differs (chunked: {chunked})"
        );
        let req = one_request(&t.world, &post_id);
        if chunked {
            assert_eq!(req.header("transfer-encoding"), Some("chunked"));
        } else {
            assert_eq!(req.header("content-length"), Some(&*N.to_string()));
        }
        injected(&t.world, &post_id);
    }
}

// 3
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_client_duration_metric_and_spans_with_semconv_attributes() {
    let t = setup("semconv");
    let teapot = id("teapot");
    let teapot_url = t.world.url(&format!("/status/418?id={teapot}"));
    let code = curl_ok(
        &t.world,
        &["-o", "/dev/null", "-w", "%{http_code}", &teapot_url],
    );
    assert_eq!(code, "418");

    let m =
        t.rx.wait_for_metric(TELEMETRY, "http.client.request.duration", |p| {
            p.attributes.int("http.response.status_code") == Some(418)
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "no http.client.request.duration point with status 418; metrics: {:#?}",
                t.rx.metrics()
            )
        });
    assert_eq!(m.unit, "s");
    assert_eq!(m.kind, MetricKind::Histogram);
    assert_eq!(m.service_name(), Some(t.service.as_str()));
    let p = m
        .points
        .iter()
        .find(|p| p.attributes.int("http.response.status_code") == Some(418))
        .expect("the 418 point");
    let a = &p.attributes;
    assert_eq!(a.str("http.request.method"), Some("GET"), "{a:?}");
    assert_eq!(a.str("server.address"), Some("198.18.0.2"), "{a:?}");
    assert_eq!(a.int("server.port"), Some(i64::from(HTTP_PORT)), "{a:?}");
    assert_eq!(a.str("network.protocol.version"), Some("1.1"), "{a:?}");
    assert_eq!(a.str("url.scheme"), Some("http"), "{a:?}");
    assert!(p.value.count() >= Some(1), "{p:?}");

    let span = client_span(&t.rx, &teapot).await;
    assert_eq!(span.name, "GET");
    assert!(span.is_client());
    assert_eq!(span.service_name(), Some(t.service.as_str()));
    let a = &span.attributes;
    assert_eq!(a.str("url.full"), Some(teapot_url.as_str()), "{a:?}");
    assert_eq!(a.str("server.address"), Some("198.18.0.2"), "{a:?}");
    assert_eq!(a.int("server.port"), Some(i64::from(HTTP_PORT)), "{a:?}");
    assert_eq!(a.int("http.response.status_code"), Some(418), "{a:?}");
    assert!(span.end_unix_nano >= span.start_unix_nano);

    // A POST with a 200 gets its own series.
    let post = id("post");
    curl_ok(
        &t.world,
        &[
            "--data-binary",
            "abc",
            &t.world.url(&format!("/sha256?id={post}")),
        ],
    );
    t.rx.wait_for_metric(TELEMETRY, "http.client.request.duration", |p| {
        p.attributes.str("http.request.method") == Some("POST")
            && p.attributes.int("http.response.status_code") == Some(200)
    })
    .await
    .expect("a POST/200 duration point");
    let span = client_span(&t.rx, &post).await;
    assert_eq!(span.name, "POST");
}

// 4
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_traceparent_is_the_exported_client_span() {
    let t = setup("inject");
    let id = id("inject");
    curl_ok(&t.world, &[&t.world.url(&format!("/bytes/16?id={id}"))]);
    let tp = injected(&t.world, &id);
    let span = client_span(&t.rx, &id).await;
    assert_eq!(tp.trace_id, span.trace_id, "trace id");
    assert_eq!(
        tp.parent_id, span.span_id,
        "the server's parent must be the CLIENT span"
    );
    assert_eq!(
        span.parent_span_id, "",
        "no incoming context, so a root span"
    );
}

// 5
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_traceparent_is_continued() {
    let t = setup("continue");
    let id = id("continue");
    let incoming = TraceParent::generate(&id);
    let header = format!("traceparent: {incoming}");
    curl_ok(
        &t.world,
        &["-H", &header, &t.world.url(&format!("/bytes/16?id={id}"))],
    );
    let span = client_span(&t.rx, &id).await;
    assert_eq!(span.trace_id, incoming.trace_id, "trace continued");
    assert_eq!(
        span.parent_span_id, incoming.parent_id,
        "parent = incoming span"
    );
    assert_ne!(span.span_id, incoming.parent_id);
    let seen = injected(&t.world, &id);
    assert_eq!(seen.trace_id, incoming.trace_id);
    assert_eq!(
        seen.parent_id, span.span_id,
        "server's parent = CLIENT span"
    );
    let req = one_request(&t.world, &id);
    assert_eq!(
        req.header("traceparent").map(|v| v.matches("00-").count()),
        Some(1),
        "exactly one traceparent value: {req:#?}"
    );
}

// 6
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_destinations_are_proxied_and_traced() {
    let t = setup("ipv6");
    let id = id("ipv6");
    let url = t.world.url_v6(&format!("/bytes/1000?id={id}"));
    let body = t.world.curl(&["-g", &url], CLIENT).expect("curl");
    assert!(body.success(), "{body:?}");
    assert_eq!(body.stdout, peers::pattern(1000, peers::DEFAULT_SEED));
    let req = one_request(&t.world, &id);
    assert_eq!(req.peer, "fd5e:1dec::1", "{req:#?}");
    let tp = injected(&t.world, &id);
    let span = client_span(&t.rx, &id).await;
    assert_eq!(tp.trace_id, span.trace_id);
    assert_eq!(tp.parent_id, span.span_id);
    assert_eq!(span.attributes.str("url.full"), Some(url.as_str()));
    assert_eq!(
        span.attributes.str("server.address"),
        Some(&*SVC_V6.to_string()),
        "{:?}",
        span.attributes
    );
    assert_eq!(
        span.attributes.int("server.port"),
        Some(i64::from(HTTP_PORT))
    );
    t.rx.wait_for_metric(TELEMETRY, "http.client.request.duration", |p| {
        p.attributes.str("server.address") == Some("fd5e:1dec::2")
    })
    .await
    .expect("a duration point for the IPv6 server");
}

// 7
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_traffic_goes_direct_and_nothing_stays_attached() {
    let mut t = setup("kill9");
    let before = id("before");
    curl_ok(&t.world, &[&t.world.url(&format!("/bytes/8?id={before}"))]);
    injected(&t.world, &before);
    assert!(
        !t.world.pod_cgroup.attached_programs().unwrap().is_empty(),
        "bpftool shows no program on the pod cgroup while the sidecar runs"
    );

    t.sidecar.kill9().expect("kill -9");
    let after = id("after");
    let out = t
        .world
        .curl(&[&t.world.url(&format!("/bytes/8?id={after}"))], CLIENT)
        .expect("curl");
    assert!(out.success(), "request after kill -9 failed: {out:?}");
    assert_eq!(out.stdout, peers::pattern(8, peers::DEFAULT_SEED));
    assert_direct(&t.world, &after);
    assert_nothing_attached(&t.world.cgroups());
}

// 8
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_upstream_connections_are_not_redirected_to_itself() {
    let t = setup("noloop");
    // The sidecar really runs inside the pod cgroup (its `sidecar` child).
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", t.sidecar.pid()))
        .expect("reading the sidecar's cgroup");
    let rel = t
        .world
        .sidecar_cgroup
        .path()
        .strip_prefix(sidecar_tests::cgroup::cgroup2_mount().unwrap())
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        own.lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&rel)),
        "sidecar is not in {rel}: {own}"
    );

    let id = id("noloop");
    let started = Instant::now();
    let out = t
        .world
        .curl(
            &[&t.world.url(&format!("/bytes/32?id={id}"))],
            Duration::from_secs(10),
        )
        .expect("curl");
    assert!(out.success(), "{out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let req = one_request(&t.world, &id);
    assert!(req.header("traceparent").is_some(), "{req:#?}");
    assert_eq!(
        req.peer, "198.18.0.1",
        "upstream connection came from the pod address"
    );

    client_span(&t.rx, &id).await;
    // Give a loop time to show up as more spans, then count.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spans: Vec<_> =
        t.rx.spans()
            .into_iter()
            .filter(|s| span_for(s, &id))
            .collect();
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let conns: std::collections::BTreeSet<u64> = t
        .world
        .http
        .requests_for(&id)
        .unwrap()
        .iter()
        .map(|r| r.conn)
        .collect();
    assert_eq!(conns.len(), 1);
    assert!(t.sidecar_running(), "sidecar died");
}

impl E2e {
    fn sidecar_running(&self) -> bool {
        Path::new(&format!("/proc/{}", self.sidecar.pid())).exists()
    }
}

// 9
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_clean() {
    let mut t = setup("sigterm");
    let slow = id("slow");
    let slow_url = t.world.url(&format!("/slow?ms=3000&id={slow}"));
    let mut slow_curl = t
        .world
        .spawn_app(
            "slow-curl",
            "curl",
            &[
                "-sS",
                "--max-time",
                "30",
                "-w",
                " code=%{http_code}",
                &slow_url,
            ],
        )
        .expect("starting the slow request");
    let seen = t
        .world
        .http
        .wait_for_request(&slow, Duration::from_secs(10))
        .expect("the slow request reaches the server");
    assert!(
        seen.header("traceparent").is_some(),
        "the in-flight request must go through the proxy: {seen:#?}"
    );

    let signalled = Instant::now();
    t.sidecar.terminate().expect("SIGTERM");
    // Let the sidecar take the signal in (it logs it), bounded; then start a new request.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !t.sidecar.log().contains("SIGTERM") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Draining: alive but no longer ready (kubelet stops sending traffic).
    let ready = admin::get(&t.world.pod, ADMIN_PORT, "/readyz").expect("GET /readyz");
    assert_eq!(ready.status, 503, "/readyz while draining: {ready:?}");
    assert!(ready.body.contains("draining"), "{ready:?}");
    let health = admin::get(&t.world.pod, ADMIN_PORT, "/healthz").expect("GET /healthz");
    assert_eq!(health.status, 200, "/healthz while draining: {health:?}");
    std::thread::sleep(Duration::from_millis(300));
    let after = id("after");
    curl_ok(&t.world, &[&t.world.url(&format!("/bytes/8?id={after}"))]);
    assert_direct(&t.world, &after);

    let status = slow_curl
        .wait_timeout(Duration::from_secs(30))
        .expect("waiting for the slow curl")
        .expect("the slow curl finished");
    let out = slow_curl.log();
    assert!(status.success(), "in-flight request failed: {status} {out}");
    assert!(
        out.contains("slept 3000") && out.contains("code=200"),
        "{out}"
    );

    let exit = t
        .sidecar
        .wait_exit(Duration::from_secs(DRAIN_SECS + 10))
        .expect("waiting for the sidecar")
        .unwrap_or_else(|| {
            panic!(
                "sidecar still running {:?} after SIGTERM",
                signalled.elapsed()
            )
        });
    assert_eq!(
        exit.code(),
        Some(0),
        "sidecar exit: {exit}\n{}",
        t.sidecar.log()
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(DRAIN_SECS + 5),
        "exit took {:?}",
        signalled.elapsed()
    );
    assert_nothing_attached(&t.world.cgroups());
    // Telemetry was flushed before exit: the drained request's span arrived.
    let span = client_span(&t.rx, &slow).await;
    assert_eq!(span.attributes.int("http.response.status_code"), Some(200));
}

// 9b
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_exits_at_once_and_the_kernel_detaches() {
    let mut t = setup("sigterm2");
    let ready = admin::get(&t.world.pod, ADMIN_PORT, "/readyz").expect("GET /readyz");
    assert_eq!(ready.status, 200, "/readyz once started: {ready:?}");
    let slow = id("slow2");
    let slow_url = t.world.url(&format!("/slow?ms=20000&id={slow}"));
    let _slow_curl = t
        .world
        .spawn_app(
            "slow-curl2",
            "curl",
            &["-sS", "--max-time", "30", &slow_url],
        )
        .expect("starting the slow request");
    t.world
        .http
        .wait_for_request(&slow, Duration::from_secs(10))
        .expect("the slow request reaches the server");

    t.sidecar.terminate().expect("first SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !t.sidecar.log().contains("SIGTERM") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(t.sidecar_running(), "the first signal must drain, not exit");
    let second = Instant::now();
    t.sidecar.interrupt().expect("second signal (SIGINT)");
    let exit = t
        .sidecar
        .wait_exit(Duration::from_secs(5))
        .expect("waiting for the sidecar")
        .unwrap_or_else(|| panic!("sidecar still draining 5 s after a second signal"));
    assert!(
        second.elapsed() < Duration::from_secs(3),
        "a second signal must exit at once, took {:?}",
        second.elapsed()
    );
    assert_eq!(
        exit.code(),
        Some(130),
        "128 + SIGINT: {exit}\n{}",
        t.sidecar.log()
    );
    assert!(
        t.sidecar.log().contains("second stop signal"),
        "{}",
        t.sidecar.log()
    );
    assert_nothing_attached(&t.world.cgroups());
}

// 10
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_and_udp_are_not_redirected() {
    const LOCAL_PORT: u16 = 8081;
    let t = setup("bypass");
    let local = t
        .world
        .start_http_peer_in_pod(LOCAL_PORT)
        .expect("starting the pod-local peer");

    let lo4 = id("lo4");
    let lo6 = id("lo6");
    curl_ok(
        &t.world,
        &[&format!("http://127.0.0.1:{LOCAL_PORT}/bytes/4?id={lo4}")],
    );
    curl_ok(
        &t.world,
        &["-g", &format!("http://[::1]:{LOCAL_PORT}/bytes/4?id={lo6}")],
    );
    for id in [&lo4, &lo6] {
        let reqs = local.requests_for(id).unwrap();
        assert_eq!(reqs.len(), 1, "{reqs:#?}");
        assert!(
            reqs[0].header("traceparent").is_none(),
            "loopback request {id} went through the proxy: {:#?}",
            reqs[0]
        );
    }

    // UDP (connected sockets, so connect hooks run) reaches svc over IPv4 and IPv6.
    let udp = t.world.start_udp_peer().expect("starting the UDP peer");
    for (host, payload) in [
        (SVC_V4.to_string(), &b"\x00udp-v4\xff"[..]),
        (SVC_V6.to_string(), &b"\x01udp-v6\xfe"[..]),
    ] {
        let out = t
            .world
            .udp_send(&host, UDP_PORT, payload)
            .expect("udp send");
        let s: UdpSummary =
            parse_summary(&out.stdout_str()).unwrap_or_else(|e| panic!("{e}; {out:?}"));
        assert!(
            out.success() && s.equal,
            "UDP to {host}: {s:?} {}",
            out.stderr_str()
        );
    }
    let grams = udp.datagrams().unwrap();
    assert_eq!(grams.len(), 2, "{grams:#?}");
    assert_eq!(grams[0].peer, "198.18.0.1");
    assert_eq!(grams[1].peer, "fd5e:1dec::1");

    // Control: the sidecar is active, so a request to svc is proxied and traced; spans are
    // exported in order, so once it arrived the loopback ones would have too.
    let control = id("control");
    curl_ok(&t.world, &[&t.world.url(&format!("/bytes/4?id={control}"))]);
    injected(&t.world, &control);
    client_span(&t.rx, &control).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leaked: Vec<_> =
        t.rx.spans()
            .into_iter()
            .filter(|s| span_for(s, &lo4) || span_for(s, &lo6))
            .collect();
    assert!(
        leaked.is_empty(),
        "loopback requests were traced: {leaked:#?}"
    );
}

// 11
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_is_byte_exact_and_measured_as_connections() {
    const N: usize = 1024 * 1024 + 7;
    let t = setup("opaque");
    let echo = t.world.start_echo_peer().expect("starting the echo peer");
    let out = t
        .world
        .echo_client(&SVC_V4.to_string(), ECHO_PORT, N, CLIENT)
        .expect("echo client");
    let s: EchoSummary =
        parse_summary(&out.stdout_str()).unwrap_or_else(|e| panic!("{e}; {out:?}"));
    assert!(
        out.success() && s.equal,
        "echo not byte-exact: {s:?} {}",
        out.stderr_str()
    );
    assert_eq!(s.received, N as u64);

    let deadline = Instant::now() + Duration::from_secs(10);
    let conn = loop {
        let conns = echo.connections().unwrap();
        if let Some(c) = conns.into_iter().find(|c| c.bytes == N as u64) {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "echo peer never logged the connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(conn.peer, "198.18.0.1");

    let io =
        t.rx.wait_for(TELEMETRY, |r| {
            let m = r.latest_metric("sidecar.proxy.connection.io")?;
            let by = io_by_direction(&m);
            (by.len() == 2 && by.values().all(|v| *v >= N as f64)).then_some((m, by))
        })
        .await;
    let (m, by) = io.unwrap_or_else(|| {
        panic!(
            "no sidecar.proxy.connection.io with {N} bytes each way; got {:#?}",
            t.rx.metrics_named("sidecar.proxy.connection.io")
        )
    });
    assert_eq!(m.unit, "By");
    for (dir, bytes) in &by {
        assert!(
            dir == "transmit" || dir == "receive",
            "unexpected network.io.direction {dir:?}"
        );
        assert_eq!(*bytes, N as f64, "{dir}: {by:?}");
    }
    let d =
        t.rx.wait_for(TELEMETRY, |r| {
            r.latest_metric("sidecar.proxy.connection.duration")
                .filter(|m| m.points.iter().filter_map(|p| p.value.count()).sum::<u64>() >= 1)
        })
        .await
        .expect("a sidecar.proxy.connection.duration point");
    assert_eq!(d.unit, "s");
    assert_eq!(d.service_name(), Some(t.service.as_str()));
    let http_spans: Vec<_> = t.rx.client_spans();
    assert!(
        http_spans.is_empty(),
        "opaque traffic made HTTP spans: {http_spans:#?}"
    );
}

// 12
#[test]
fn check_passes_and_bad_invocations_fail_cleanly() {
    prereq::require();
    let world = PodWorld::new("cli").expect("building the pod world");
    let t = Duration::from_secs(30);

    let check = world.run_sidecar(&["check"], t).expect("sidecar check");
    let table = format!("{}{}", check.stdout_str(), check.stderr_str());
    assert!(check.success(), "sidecar check failed: {check:?}\n{table}");
    assert!(
        check
            .stdout_str()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
            >= 2,
        "sidecar check printed no table: {table}"
    );
    println!("sidecar check:\n{table}");

    let pod = world.pod_cgroup.path().to_string_lossy().into_owned();
    // (`run` without `--cgroup` is valid since issue 3: it discovers the pod's cgroup; see
    // e2e_policy.rs.)
    let cases: [(&[&str], &str); 2] = [
        (&["run", "--cgroup", "/nonexistent"], "/nonexistent"),
        (&["run", "--cgroup", &pod, "--bogus-flag"], "--bogus-flag"),
    ];
    for (args, mention) in cases {
        let out = world.run_sidecar(args, t).expect("running the sidecar");
        let err = out.stderr_str();
        assert!(!out.timed_out, "sidecar {args:?} hung");
        assert!(
            !out.success() && out.code().is_some_and(|c| c != 0),
            "sidecar {args:?} should fail: {out:?}"
        );
        assert!(
            err.contains(mention),
            "sidecar {args:?}: message lacks {mention:?}: {err}"
        );
        assert!(
            !err.contains("panicked"),
            "sidecar {args:?} panicked: {err}"
        );
    }
    assert_eq!(world.pod_cgroup.attached_programs().unwrap(), "");
}

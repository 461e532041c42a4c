//! Privileged end-to-end tests of the outbound exclusion and inclusion rules (issue 3): flags,
//! the Downward API annotations file with Istio and Linkerd names, and a change of the
//! annotations at runtime that leaves an in-flight request intact.
//!
//! A request that went through the proxy reaches the svc peer with an injected `traceparent`
//! (curl sends none) and produces a CLIENT span; a direct one has neither.
//!
//! Needs root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool` and the sidecar binary
//! (`SIDECAR_BIN` or `target/release/sidecar`). Run with `--test-threads=1`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sidecar_tests::otlp::ReceivedSpan;
use sidecar_tests::peers::{self, HttpPeer, PeerRequest};
use sidecar_tests::world::{HTTP_PORT, SVC_V4, SVC_V6};
use sidecar_tests::{prereq, OtlpReceiver, PodWorld, Sidecar, SidecarConfig};

/// Bound for one client command.
const CLIENT: Duration = Duration::from_secs(30);
/// Bound for telemetry to reach the receiver.
const TELEMETRY: Duration = Duration::from_secs(20);
/// A second HTTP peer in svc, for "another port is still intercepted".
const OTHER_PORT: u16 = 8081;
/// Bound for a runtime policy change to take effect (annotations are re-read every 2 s).
const RELOAD: Duration = Duration::from_secs(8);

/// One test's world: the sidecar (dropped first), the receiver, then the namespaces.
struct Policy {
    _sidecar: Sidecar,
    rx: OtlpReceiver,
    world: PodWorld,
}

/// Builds a world, writes `annotations` (when given) and starts a sidecar with `extra` flags.
fn setup(tag: &str, extra: &[&str], annotations: Option<&[(&str, &str)]>) -> Policy {
    prereq::require();
    let world = PodWorld::new(tag).expect("building the pod world");
    if let Some(pairs) = annotations {
        world
            .write_annotations(pairs)
            .expect("writing the annotations");
    }
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    let cfg = SidecarConfig {
        otlp_endpoint: Some(rx.endpoint()),
        service_name: Some(format!("e2e-{tag}")),
        annotations_file: Some(world.annotations_path()),
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..SidecarConfig::default()
    };
    let sidecar = world.start_sidecar(&cfg).expect("starting the sidecar");
    Policy {
        _sidecar: sidecar,
        rx,
        world,
    }
}

/// A request id unique within this test binary, carried in the query string.
fn id(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Runs curl as the app (`GET url`, 16 bytes) and checks the body.
fn get16(world: &PodWorld, url: &str) {
    let out = world.curl(&["-g", url], CLIENT).expect("running curl");
    assert!(out.success(), "curl {url} failed: {out:?}");
    assert_eq!(out.stdout, peers::pattern(16, peers::DEFAULT_SEED), "{url}");
}

/// The one request `peer` logged for `id`.
fn one_request(peer: &HttpPeer, id: &str) -> PeerRequest {
    let reqs = peer.requests_for(id).expect("reading the peer log");
    assert_eq!(reqs.len(), 1, "requests for {id}: {reqs:#?}");
    reqs.into_iter().next().expect("one request")
}

/// Asserts the request `id` went through the proxy (injected traceparent).
fn assert_proxied(peer: &HttpPeer, id: &str) {
    let req = one_request(peer, id);
    assert!(
        req.traceparent().is_some(),
        "request {id} carries no traceparent, so it bypassed the proxy: {req:#?}"
    );
}

/// Asserts the request `id` went direct (no traceparent).
fn assert_direct(peer: &HttpPeer, id: &str) {
    let req = one_request(peer, id);
    assert!(
        req.header("traceparent").is_none(),
        "request {id} carries a traceparent, so it went through the proxy: {req:#?}"
    );
}

fn span_for(s: &ReceivedSpan, id: &str) -> bool {
    s.is_client() && s.attributes.str("url.full").is_some_and(|u| u.contains(id))
}

/// Waits for the CLIENT span of `id`, then checks no span exists for any of `direct` (spans
/// are exported in order, so those would have arrived already).
async fn assert_spans(rx: &OtlpReceiver, proxied: &str, direct: &[&str]) {
    rx.wait_for_spans(TELEMETRY, 1, |s| span_for(s, proxied))
        .await
        .unwrap_or_else(|| panic!("no CLIENT span for {proxied}: {:#?}", rx.spans()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leaked: Vec<_> = rx
        .spans()
        .into_iter()
        .filter(|s| direct.iter().any(|d| span_for(s, d)))
        .collect();
    assert!(
        leaked.is_empty(),
        "direct requests were traced: {leaked:#?}"
    );
}

/// Requests to svc:8080 go direct, to svc:8081 through the proxy.
async fn check_port_8080_excluded(p: &Policy) {
    let other = p
        .world
        .start_svc_http_peer("other-peer", OTHER_PORT)
        .expect("starting the second peer");
    let direct = id("direct");
    let proxied = id("proxied");
    get16(&p.world, &p.world.url(&format!("/bytes/16?id={direct}")));
    get16(
        &p.world,
        &format!("http://{SVC_V4}:{OTHER_PORT}/bytes/16?id={proxied}"),
    );
    assert_direct(&p.world.http, &direct);
    assert_proxied(&other, &proxied);
    // IPv6 follows the same port rule.
    let direct6 = id("direct6");
    get16(
        &p.world,
        &p.world.url_v6(&format!("/bytes/16?id={direct6}")),
    );
    assert_direct(&p.world.http, &direct6);
    assert_spans(&p.rx, &proxied, &[&direct, &direct6]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_outbound_port_goes_direct_while_others_are_proxied() {
    let p = setup(
        "x-port",
        &["--exclude-outbound-ports", &HTTP_PORT.to_string()],
        None,
    );
    check_port_8080_excluded(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_annotation_excludes_outbound_port() {
    let p = setup(
        "x-istio",
        &[],
        Some(&[("traffic.sidecar.istio.io/excludeOutboundPorts", "8080")]),
    );
    check_port_8080_excluded(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linkerd_annotation_excludes_outbound_port() {
    let p = setup(
        "x-linkerd",
        &[],
        Some(&[("config.linkerd.io/skip-outbound-ports", "8080")]),
    );
    check_port_8080_excluded(&p).await;
}

/// IPv4 to svc goes direct, IPv6 to svc through the proxy.
async fn check_v4_direct_v6_proxied(p: &Policy) {
    let v4 = id("v4");
    let v6 = id("v6");
    get16(&p.world, &p.world.url(&format!("/bytes/16?id={v4}")));
    get16(&p.world, &p.world.url_v6(&format!("/bytes/16?id={v6}")));
    assert_direct(&p.world.http, &v4);
    assert_proxied(&p.world.http, &v6);
    let req = one_request(&p.world.http, &v6);
    assert_eq!(req.peer, "fd5e:1dec::1", "{req:#?}");
    assert_spans(&p.rx, &v6, &[&v4]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_outbound_cidr_goes_direct_while_ipv6_is_proxied() {
    let p = setup(
        "x-cidr",
        &["--exclude-outbound-cidrs", &format!("{SVC_V4}/32")],
        None,
    );
    check_v4_direct_v6_proxied(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_outbound_cidrs_limit_interception_to_them() {
    let p = setup(
        "i-cidr",
        &["--include-outbound-cidrs", "fd5e:1dec::/64"],
        None,
    );
    check_v4_direct_v6_proxied(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_ip_range_annotations_select_destinations() {
    let p = setup(
        "x-istio-cidr",
        &[],
        Some(&[(
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "198.18.0.0/24",
        )]),
    );
    check_v4_direct_v6_proxied(&p).await;
    drop(p);
    let p = setup(
        "i-istio-cidr",
        &[],
        Some(&[(
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            &format!("{SVC_V6}/128"),
        )]),
    );
    check_v4_direct_v6_proxied(&p).await;
}

/// Writing an exclusion into the annotations file while a slow request is in flight through
/// the proxy: new requests go direct within a bounded wait, the in-flight one completes intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_annotation_change_keeps_in_flight_requests() {
    const SLOW_MS: u64 = 6000;
    let p = setup("runtime", &[], Some(&[]));
    let before = id("before");
    get16(&p.world, &p.world.url(&format!("/bytes/16?id={before}")));
    assert_proxied(&p.world.http, &before);

    let slow = id("slow");
    let slow_url = p.world.url(&format!("/slow?ms={SLOW_MS}&id={slow}"));
    let mut slow_curl = p
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
    let seen = p
        .world
        .http
        .wait_for_request(&slow, Duration::from_secs(10))
        .expect("the slow request reaches the server");
    assert!(
        seen.traceparent().is_some(),
        "the in-flight request must go through the proxy: {seen:#?}"
    );

    let changed = Instant::now();
    p.world
        .write_annotations(&[("traffic.sidecar.istio.io/excludeOutboundPorts", "8080")])
        .expect("writing the annotation");
    let mut direct_after = None;
    let mut tries = Vec::new();
    while changed.elapsed() < RELOAD {
        let probe = id("probe");
        get16(&p.world, &p.world.url(&format!("/bytes/16?id={probe}")));
        if one_request(&p.world.http, &probe)
            .header("traceparent")
            .is_none()
        {
            direct_after = Some(changed.elapsed());
            break;
        }
        tries.push(probe);
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = direct_after.unwrap_or_else(|| {
        panic!(
            "requests still proxied {RELOAD:?} after the annotation changed ({} tries)",
            tries.len()
        )
    });
    assert!(
        slow_curl
            .try_wait()
            .expect("polling the slow curl")
            .is_none(),
        "the slow request finished before the change took effect ({took:?}), so the test \
         proved nothing about in-flight requests"
    );

    let status = slow_curl
        .wait_timeout(Duration::from_secs(30))
        .expect("waiting for the slow curl")
        .expect("the slow curl finished");
    let out = slow_curl.log();
    assert!(status.success(), "in-flight request failed: {status} {out}");
    assert!(
        out.contains(&format!("slept {SLOW_MS}")) && out.contains("code=200"),
        "{out}"
    );
    let span =
        p.rx.wait_for_spans(TELEMETRY, 1, |s| span_for(s, &slow))
            .await
            .unwrap_or_else(|| panic!("no span for the in-flight request: {:#?}", p.rx.spans()));
    assert_eq!(
        span[0].attributes.int("http.response.status_code"),
        Some(200)
    );
}

/// Without `--cgroup`, the sidecar (running in `<pod>/sidecar`, as a Kubernetes sidecar
/// container does) finds the pod's cgroup as its own cgroup's parent and intercepts the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_cgroup_discovers_the_pod_cgroup() {
    prereq::require();
    let world = PodWorld::new("discover").expect("building the pod world");
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    let cfg = SidecarConfig {
        otlp_endpoint: Some(rx.endpoint()),
        annotations_file: Some(world.annotations_path()),
        ..SidecarConfig::default()
    };
    let mut args = cfg.run_args(world.pod_cgroup.path());
    assert_eq!(args[1], "--cgroup");
    args.drain(1..3);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = world.sidecar_command(&args);
    cmd.env("NO_COLOR", "1");
    let _sidecar = Sidecar::spawn(cmd, &world.dir.join("sidecar.log"), cfg.ready_timeout)
        .expect("starting the sidecar without --cgroup");

    assert!(
        !world
            .pod_cgroup
            .attached_programs()
            .expect("bpftool")
            .is_empty(),
        "nothing attached to the pod cgroup {}",
        world.pod_cgroup.path().display()
    );
    let id = id("discovered");
    get16(&world, &world.url(&format!("/bytes/16?id={id}")));
    assert_proxied(&world.http, &id);
    rx.wait_for_spans(TELEMETRY, 1, |s| span_for(s, &id))
        .await
        .unwrap_or_else(|| panic!("no CLIENT span for {id}: {:#?}", rx.spans()));
}

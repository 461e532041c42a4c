//! Privileged end-to-end tests of trace sampling: the real `sidecar` binary with
//! `OTEL_TRACES_SAMPLER` / `--traces-sampler`, checked at the HTTP peer (the injected
//! `traceparent` flags) and at an in-test OTLP receiver (which spans and metrics arrive).
//!
//! Needs what `e2e.rs` needs (root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool`, the
//! sidecar binary). Run with `--test-threads=1`.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sidecar_tests::cmd::run_timeout;
use sidecar_tests::otlp::ReceivedSpan;
use sidecar_tests::sidecar::sidecar_bin;
use sidecar_tests::{prereq, OtlpReceiver, PodWorld, Sidecar, SidecarConfig, TraceParent};

/// Bound for one client command.
const CLIENT: Duration = Duration::from_secs(30);
/// Bound for telemetry to reach the receiver (export intervals are 500 ms / 100 ms).
const TELEMETRY: Duration = Duration::from_secs(20);
/// Drain timeout given to the sidecar.
const DRAIN_SECS: u64 = 5;

/// One test's world: the sidecar (dropped first), the receiver, then the namespaces.
struct E2e {
    sidecar: Sidecar,
    rx: OtlpReceiver,
    world: PodWorld,
}

/// Builds a world and a sidecar exporting to an in-pod receiver, with extra flags and env.
fn setup(tag: &str, extra_args: &[&str], env: &[(&str, &str)]) -> E2e {
    prereq::require();
    let world = PodWorld::new(tag).expect("building the pod world");
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    let cfg = SidecarConfig {
        otlp_endpoint: Some(rx.endpoint()),
        service_name: Some(format!("e2e-{tag}")),
        drain_timeout_secs: Some(DRAIN_SECS),
        extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..SidecarConfig::default()
    };
    let sidecar = world.start_sidecar(&cfg).expect("starting the sidecar");
    E2e { sidecar, rx, world }
}

/// A request id unique within this test binary, carried in the query string.
fn id(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Runs curl as the app with `args` before the URL of request `id`; asserts it succeeded.
fn curl_ok(world: &PodWorld, args: &[&str], id: &str) {
    let url = world.url(&format!("/bytes/16?id={id}"));
    let all: Vec<&str> = args.iter().copied().chain([url.as_str()]).collect();
    let out = world.curl(&all, CLIENT).expect("running curl");
    assert!(
        out.success(),
        "curl {all:?} failed: status {:?} timed_out {} stderr {}",
        out.status,
        out.timed_out,
        out.stderr_str()
    );
}

/// The traceparent the HTTP peer saw on the one request for `id` (so it went via the proxy).
fn seen_traceparent(world: &PodWorld, id: &str) -> TraceParent {
    let reqs = world.http.requests_for(id).expect("reading the peer log");
    assert_eq!(reqs.len(), 1, "requests for {id}: {reqs:#?}");
    let raw = reqs[0]
        .header("traceparent")
        .unwrap_or_else(|| panic!("no traceparent for {id}, the proxy was bypassed"));
    TraceParent::parse(raw).unwrap_or_else(|| panic!("malformed traceparent {raw:?}"))
}

fn span_for(s: &ReceivedSpan, id: &str) -> bool {
    s.is_client() && s.attributes.str("url.full").is_some_and(|u| u.contains(id))
}

/// Waits for the duration histogram to count `n` requests, so the requests were measured.
async fn wait_for_durations(rx: &OtlpReceiver, n: u64) {
    rx.wait_for_metric(TELEMETRY, "http.client.request.duration", |p| {
        p.value.count() == Some(n)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no http.client.request.duration counting {n} within {TELEMETRY:?}: {:#?}",
            rx.latest_metric("http.client.request.duration")
        )
    });
}

/// SIGTERMs the sidecar and waits for a clean exit: every span it kept has been flushed then.
fn stop(t: &mut E2e) {
    t.sidecar.terminate().expect("SIGTERM");
    let exit = t
        .sidecar
        .wait_exit(Duration::from_secs(DRAIN_SECS + 15))
        .expect("waiting for the sidecar")
        .unwrap_or_else(|| panic!("sidecar still running after SIGTERM"));
    assert_eq!(exit.code(), Some(0), "{}", t.sidecar.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_off_exports_no_span_but_the_duration_and_injects_flags_00() {
    let mut t = setup("smp-off", &[], &[("OTEL_TRACES_SAMPLER", "always_off")]);
    let plain = id("smp-off");
    let sampled_in = id("smp-off-in");
    curl_ok(&t.world, &[], &plain);
    // Even a sampled incoming parent is not followed by always_off.
    let incoming = TraceParent::generate(&sampled_in);
    let header = format!("traceparent: {incoming}");
    curl_ok(&t.world, &["-H", &header], &sampled_in);

    let seen = seen_traceparent(&t.world, &plain);
    assert_eq!(seen.flags, 0, "unsampled: flags 00, got {seen:?}");
    let seen_in = seen_traceparent(&t.world, &sampled_in);
    assert_eq!(
        seen_in.trace_id, incoming.trace_id,
        "the trace id continues"
    );
    assert_eq!(seen_in.flags, 0, "always_off drops it: {seen_in:?}");

    wait_for_durations(&t.rx, 2).await;
    stop(&mut t);
    let spans = t.rx.spans();
    assert!(spans.is_empty(), "always_off exported spans: {spans:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parentbased_always_off_follows_a_sampled_parent_and_drops_roots() {
    let mut t = setup(
        "smp-pboff",
        &["--traces-sampler", "parentbased_always_off"],
        &[],
    );
    let root = id("smp-pboff-root");
    let child = id("smp-pboff-child");
    curl_ok(&t.world, &[], &root);
    let incoming = TraceParent::generate(&child);
    assert!(incoming.sampled());
    let header = format!("traceparent: {incoming}");
    curl_ok(&t.world, &["-H", &header], &child);

    let seen_root = seen_traceparent(&t.world, &root);
    assert_eq!(seen_root.flags, 0, "root not sampled: {seen_root:?}");
    let seen_child = seen_traceparent(&t.world, &child);
    assert_eq!(seen_child.trace_id, incoming.trace_id);
    assert_eq!(
        seen_child.flags, 1,
        "sampled parent continued: {seen_child:?}"
    );

    let spans =
        t.rx.wait_for_spans(TELEMETRY, 1, |s| span_for(s, &child))
            .await
            .unwrap_or_else(|| panic!("no CLIENT span for {child}: {:#?}", t.rx.spans()));
    assert_eq!(spans[0].trace_id, incoming.trace_id);
    assert_eq!(spans[0].parent_span_id, incoming.parent_id);
    assert_eq!(seen_child.parent_id, spans[0].span_id);

    wait_for_durations(&t.rx, 2).await;
    stop(&mut t);
    let all = t.rx.spans();
    assert!(
        !all.iter().any(|s| span_for(s, &root)),
        "the root request was exported: {all:#?}"
    );
    assert_eq!(all.len(), 1, "only the sampled child: {all:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceidratio_zero_exports_nothing() {
    let mut t = setup(
        "smp-ratio0",
        &["--traces-sampler", "traceidratio"],
        &[("OTEL_TRACES_SAMPLER_ARG", "0")],
    );
    let ids: Vec<String> = (0..5).map(|_| id("smp-ratio0")).collect();
    for i in &ids {
        curl_ok(&t.world, &[], i);
    }
    for i in &ids {
        let seen = seen_traceparent(&t.world, i);
        assert_eq!(seen.flags, 0, "{i}: {seen:?}");
    }
    wait_for_durations(&t.rx, 5).await;
    stop(&mut t);
    let spans = t.rx.spans();
    assert!(spans.is_empty(), "ratio 0 exported spans: {spans:#?}");
}

#[test]
fn invalid_sampler_settings_exit_64_with_a_message() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "OTEL_TRACES_SAMPLER",
            "sometimes",
            &[
                "sometimes",
                "OTEL_TRACES_SAMPLER",
                "always_on",
                "always_off",
                "traceidratio",
                "parentbased_always_on",
                "parentbased_always_off",
                "parentbased_traceidratio",
            ],
        ),
        (
            "OTEL_TRACES_SAMPLER_ARG",
            "1.5",
            &["1.5", "OTEL_TRACES_SAMPLER_ARG", "from 0 to 1"],
        ),
    ];
    for (var, value, words) in cases {
        let mut cmd = Command::new(sidecar_bin());
        cmd.args(["run", "--cgroup", "/nonexistent-sampling-test"])
            .env(var, value);
        let out = run_timeout(&mut cmd, Duration::from_secs(20)).expect("running the sidecar");
        let stderr = out.stderr_str();
        assert_eq!(out.code(), Some(64), "{var}={value}: {stderr}");
        for w in *words {
            assert!(stderr.contains(w), "{var}={value}: {w} not in {stderr}");
        }
    }
}

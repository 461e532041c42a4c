//! Privileged end-to-end test of a collector outage: the real `sidecar` binary exports to an
//! in-test OTLP receiver that answers UNAVAILABLE for 30 s while the app sends a steady, paced
//! request stream through the proxy. The application's latency during the outage is compared
//! with the baseline measured in the same run (ratios, no absolute timings); the sidecar's RSS
//! stays bounded; the drop/failure counters rise; exports resume by themselves afterwards.
//!
//! Needs what `e2e.rs` needs (root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool`, the
//! sidecar binary) and the peers' venv Python. Run with `--test-threads=1`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use sidecar_tests::admin::{self, ADMIN_PORT};
use sidecar_tests::otlp::Fault;
use sidecar_tests::{prereq, OtlpReceiver, PodWorld, Sidecar, SidecarConfig};

/// Steady load: requests per second, below what the 2-core test machine saturates at.
const RATE: u32 = 40;
/// Baseline and outage phases.
const BASELINE: Duration = Duration::from_secs(10);
const OUTAGE: Duration = Duration::from_secs(30);
/// Span queue capacity given to the sidecar: the outage produces more spans than this.
const QUEUE: usize = 500;
/// RSS growth allowed over the whole outage.
const RSS_BOUND: u64 = 48 << 20;

/// One test's world: the sidecar (dropped first), the receiver, then the namespaces.
struct E2e {
    sidecar: Sidecar,
    rx: OtlpReceiver,
    world: PodWorld,
}

fn id(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Result of one `peers/load.py` run.
struct Load {
    ok: u64,
    errors: u64,
    latencies_ms: Vec<f64>,
}

impl Load {
    fn quantile(&self, q: f64) -> f64 {
        let mut v = self.latencies_ms.clone();
        v.sort_by(f64::total_cmp);
        assert!(!v.is_empty(), "no successful request to take a quantile of");
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v[i]
    }
}

/// Runs the paced load as the app for `secs` seconds (bounded by a kill after `secs + 30`).
fn load(world: &PodWorld, secs: u64, tag: &str) -> Load {
    let url = world.url(&format!("/bytes/64?id={}", id(tag)));
    let rate = RATE.to_string();
    let seconds = secs.to_string();
    let out = world
        .run_app_venv(
            "load.py",
            &["--url", &url, "--rate", &rate, "--seconds", &seconds],
            Duration::from_secs(secs + 30),
        )
        .expect("running peers/load.py");
    assert!(
        out.success(),
        "load.py failed: {:?} {}",
        out.status,
        out.stderr_str()
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("load.py prints JSON");
    Load {
        ok: v["ok"].as_u64().unwrap_or(0),
        errors: v["errors"].as_u64().unwrap_or(u64::MAX),
        latencies_ms: v["latencies_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default(),
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS in /proc/<pid>/status")
}

fn stats(world: &PodWorld) -> Value {
    let resp = admin::get(&world.pod, ADMIN_PORT, "/stats").expect("GET /stats");
    assert_eq!(resp.status, 200, "{resp:?}");
    serde_json::from_str(&resp.body).expect("/stats is JSON")
}

fn export_counter(stats: &Value, key: &str) -> u64 {
    stats["export"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("export.{key} missing in /stats: {stats}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_outage_costs_bounded_memory_and_no_request_latency() {
    prereq::require();
    let world = PodWorld::new("outage").expect("building the pod world");
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    let cfg = SidecarConfig {
        otlp_endpoint: Some(rx.endpoint()),
        service_name: Some("e2e-outage".into()),
        extra_args: vec![
            "--bsp-max-queue-size".into(),
            QUEUE.to_string(),
            "--otlp-timeout".into(),
            "2000".into(),
        ],
        ..SidecarConfig::default()
    };
    let sidecar = world.start_sidecar(&cfg).expect("starting the sidecar");
    let t = E2e { sidecar, rx, world };
    let pid = t.sidecar.pid();

    // Warm-up, then the baseline with a healthy collector.
    let warm = tokio::task::block_in_place(|| load(&t.world, 2, "warm"));
    assert_eq!(warm.errors, 0, "warm-up requests failed");
    let base = tokio::task::block_in_place(|| load(&t.world, BASELINE.as_secs(), "base"));
    assert_eq!(base.errors, 0, "baseline requests failed");
    let before = stats(&t.world);
    let rss_before = rss_bytes(pid);
    let log_before = t.sidecar.log();
    // No log line per request at the default level: hundreds of requests, a handful of lines.
    let after_ready = log_before
        .split_once("sidecar ready")
        .map_or("", |(_, rest)| rest);
    let lines = after_ready.lines().skip(1).count();
    assert!(
        lines <= 10,
        "{lines} log lines for {} requests at the default level:\n{after_ready}",
        warm.ok + base.ok
    );

    // The outage: every export answered UNAVAILABLE while the same load runs.
    t.rx.set_fault(Fault::Unavailable { retry_after: None });
    let started = Instant::now();
    let world_ref = &t.world;
    let (outage, rss_max) = std::thread::scope(|s| {
        let loader = s.spawn(|| load(world_ref, OUTAGE.as_secs(), "outage"));
        let mut rss_max = rss_before;
        while !loader.is_finished() && started.elapsed() < OUTAGE + Duration::from_secs(40) {
            rss_max = rss_max.max(rss_bytes(pid));
            std::thread::sleep(Duration::from_millis(500));
        }
        (loader.join().expect("load thread"), rss_max)
    });
    let during = stats(&t.world);
    let metrics = admin::get(&t.world.pod, ADMIN_PORT, "/metrics").expect("GET /metrics");
    let rejected = t.rx.rejected_count();
    t.rx.set_fault(Fault::None);
    let log_during = t.sidecar.log()[log_before.len()..].to_owned();

    // The application did not notice.
    assert_eq!(outage.errors, 0, "requests failed during the outage");
    assert!(
        outage.ok as f64 >= 0.9 * f64::from(RATE) * OUTAGE.as_secs_f64(),
        "the paced load fell behind during the outage: {} requests",
        outage.ok
    );
    // A second baseline after the outage (collector healthy again) shows how much the
    // machine alone moves the tail: at ~1 ms the p90 of a shared 2-core machine is noisy.
    let after_base = tokio::task::block_in_place(|| load(&t.world, BASELINE.as_secs(), "base2"));
    assert_eq!(after_base.errors, 0, "requests failed after the outage");
    let p50 = outage.quantile(0.5) / base.quantile(0.5);
    let p90 = outage.quantile(0.9) / base.quantile(0.9);
    let p90_noisier_baseline = base.quantile(0.9).max(after_base.quantile(0.9));
    let p90_vs_noise = outage.quantile(0.9) / p90_noisier_baseline;
    eprintln!(
        "outage/baseline latency ratios: p50 {p50:.2} p90 {p90:.2} (p90 against the noisier of \
         two baselines {p90_vs_noise:.2}; baseline p50 {:.3} ms, after {:.3} ms; {} + {} + {} \
         requests)",
        base.quantile(0.5),
        after_base.quantile(0.5),
        base.ok,
        outage.ok,
        after_base.ok
    );
    // The proxy never waits on export: were it to, every request would slow down and the
    // median would show it.
    assert!(
        p50 < 1.5,
        "median latency ratio during the outage: {p50:.2}"
    );
    assert!(
        p90_vs_noise < 2.5,
        "p90 latency during the outage is {p90_vs_noise:.2}x the noisier baseline's"
    );

    // Bounded memory.
    assert!(
        rss_max <= rss_before + RSS_BOUND,
        "RSS grew from {rss_before} to {rss_max} bytes during the outage"
    );
    assert!(
        export_counter(&during, "queue_size") <= QUEUE as u64,
        "queue beyond its capacity: {during}"
    );

    // Counted: the receiver rejected exports, the sidecar counted drops or failures.
    assert!(rejected > 0, "the receiver rejected nothing");
    let lost = |s: &Value| export_counter(s, "spans_dropped") + export_counter(s, "spans_failed");
    assert!(
        lost(&during) > lost(&before),
        "no span counted as dropped or failed: before {before} during {during}"
    );
    assert!(
        export_counter(&during, "metric_points_failed")
            > export_counter(&before, "metric_points_failed"),
        "no failed metric export counted: {during}"
    );
    assert_eq!(metrics.status, 200);
    let failed_exports = admin::prometheus_sum(
        &metrics.body,
        "otel_sdk_exporter_span_exported_total",
        &["error_type="],
    ) + admin::prometheus_sum(
        &metrics.body,
        "otel_sdk_processor_span_processed_total",
        &["error_type=\"queue_full\""],
    );
    assert!(
        failed_exports > 0.0,
        "/metrics shows no failed or dropped span:\n{}",
        metrics.body
    );
    // Logged at a limited rate (at most one line per exporter per 30 s, plus slack).
    let failure_lines = log_during
        .lines()
        .filter(|l| l.contains("export") && l.contains("failed"))
        .count();
    assert!(
        failure_lines <= 6,
        "{failure_lines} export failure lines in 30 s:\n{log_during}"
    );

    // Recovery without intervention: a new request's span arrives.
    let after = id("after");
    let out = t
        .world
        .curl(
            &[&t.world.url(&format!("/bytes/8?id={after}"))],
            Duration::from_secs(30),
        )
        .expect("curl");
    assert!(out.success(), "curl after the outage failed");
    let found =
        t.rx.wait_for_spans(Duration::from_secs(40), 1, |s| {
            s.attributes
                .str("url.full")
                .is_some_and(|u| u.contains(&after))
        })
        .await;
    assert!(
        found.is_some(),
        "no span exported after the collector recovered"
    );
    let recovered = stats(&t.world);
    assert!(
        export_counter(&recovered, "spans_exported") > export_counter(&during, "spans_exported"),
        "exports did not resume: {recovered}"
    );
}

//! A synthetic but plausible run for the unit tests of the statistics, targets and report:
//! every scenario and variant, three repetitions, with numbers chosen so the expected
//! statistics can be worked out by hand.
//!
//! Per scenario with base throughput `B` (http1-1k 40,000 req/s; http1-64k 8,000; http2
//! 30,000; grpc 20,000; conn-rate 10,000), repetitions 1, 2, 3:
//! - direct: B, 1.1 B, 0.9 B req/s; direct-observed 0.99 x direct;
//! - sidecar-ebpf: 0.9 x direct (paired ratio to direct 0.9);
//! - sidecar-iptables: 0.85 x direct;
//! - envoy: 0.6 B every rep, so sidecar-ebpf/envoy = 1.5, 1.65, 1.35 (median 1.5);
//! - latency (not for conn-rate), µs: direct p50 300, 320, 280; p99 1000, 1100, 900; p99.9
//!   2000, 2200, 1800; each proxy adds to every percentile: sidecar-ebpf 100, 120, 80 (median
//!   100), sidecar-iptables 150, 160, 140, envoy 400, 300, 500 (median 400); added-p99 ratio
//!   100 / 400 = 0.25;
//! - CPU s per 1000 requests: sidecar-ebpf 0.020, 0.022, 0.018; sidecar-iptables 0.021 every
//!   rep; envoy 0.050 every rep: ratios 0.4, 0.44, 0.36 (median 0.4);
//! - peak RSS KiB: sidecar-ebpf 10240, 12288, 11264 (median 11 MiB); sidecar-iptables 10240
//!   every rep; envoy 40960, 40960, 43008 (median 40 MiB): ratio 0.275;
//! - no errors.
//!
//! Observation (http1-1k): direct 50,000, 51,000, 49,000; direct-observed 49,500, 50,745,
//! 48,020: ratios 0.99, 0.995, 0.98, overhead 1 %, 0.5 %, 2 % (median 1 %).
//! Spans: steps of 10,000, 20,000, 25,000 (lossless) and 30,000 (100 dropped) spans/s; the
//! highest lossless 25,000.

use crate::bench::model::{
    Latency, Measurement, Results, RunInfo, Sample, Scenario, SpanRate, SpanStep, Variant,
};

/// Base throughput (req/s) of the direct path in a scenario.
pub(crate) fn base(s: Scenario) -> f64 {
    match s {
        Scenario::Http1Small => 40_000.0,
        Scenario::Http1Large => 8_000.0,
        Scenario::Http2 => 30_000.0,
        Scenario::Grpc => 20_000.0,
        Scenario::ConnRate => 10_000.0,
    }
}

/// Per-repetition factor of the direct path's throughput.
const REP: [f64; 3] = [1.0, 1.1, 0.9];

/// Latency of the direct path per repetition: (p50, p99, p99.9) in µs.
const DIRECT_LATENCY: [(f64, f64, f64); 3] = [
    (300.0, 1000.0, 2000.0),
    (320.0, 1100.0, 2200.0),
    (280.0, 900.0, 1800.0),
];

/// Microseconds a variant adds to every percentile, per repetition.
pub(crate) fn added_us(v: Variant) -> [f64; 3] {
    match v {
        Variant::Direct | Variant::DirectObserved => [0.0; 3],
        Variant::SidecarEbpf => [100.0, 120.0, 80.0],
        Variant::SidecarIptables => [150.0, 160.0, 140.0],
        Variant::Envoy => [400.0, 300.0, 500.0],
    }
}

/// One repetition of `(scenario, variant)`.
fn sample(s: Scenario, v: Variant, rep: usize) -> Sample {
    let direct = base(s) * REP[rep];
    let throughput_rps = match v {
        Variant::Direct => direct,
        Variant::DirectObserved => direct * 0.99,
        Variant::SidecarEbpf => direct * 0.9,
        Variant::SidecarIptables => direct * 0.85,
        Variant::Envoy => base(s) * 0.6,
    };
    let latency = (s != Scenario::ConnRate).then(|| {
        let (p50, p99, p999) = DIRECT_LATENCY[rep];
        let add = added_us(v)[rep];
        Latency {
            target_rps: base(s) / 4.0,
            achieved_rps: base(s) / 4.0,
            p50_us: p50 + add,
            p99_us: p99 + add,
            p999_us: p999 + add,
        }
    });
    let (cpu_s_per_1k, peak_rss_kib) = match v {
        Variant::Direct | Variant::DirectObserved => (None, None),
        Variant::SidecarEbpf => (
            Some([0.020, 0.022, 0.018][rep]),
            Some([10240, 12288, 11264][rep]),
        ),
        Variant::SidecarIptables => (Some(0.021), Some(10240)),
        Variant::Envoy => (Some(0.050), Some([40960, 40960, 43008][rep])),
    };
    Sample {
        throughput_rps,
        requests: (throughput_rps * 10.0) as u64,
        errors: 0,
        latency,
        cpu_s_per_1k,
        peak_rss_kib,
    }
}

/// The synthetic run (see the module documentation).
pub(crate) fn results() -> Results {
    let measurements = Scenario::ALL
        .iter()
        .flat_map(|s| {
            Variant::ALL.iter().map(move |v| Measurement {
                scenario: *s,
                variant: *v,
                samples: (0..3).map(|rep| sample(*s, *v, rep)).collect(),
            })
        })
        .collect();
    let obs = |variant: Variant, rps: [f64; 3]| Measurement {
        scenario: Scenario::Http1Small,
        variant,
        samples: rps
            .iter()
            .map(|r| Sample {
                throughput_rps: *r,
                requests: (*r * 10.0) as u64,
                ..Sample::default()
            })
            .collect(),
    };
    let step = |offered: f64, dropped: u64| {
        let produced = (offered * 5.0) as u64;
        SpanStep {
            offered_per_s: offered,
            produced_per_s: offered,
            produced,
            received: produced - dropped,
            dropped,
        }
    };
    Results {
        info: RunInfo {
            started: "2026-05-01T10:00:00Z".into(),
            kernel: "6.18.0-test".into(),
            cpu: "Test CPU @ 2.0GHz".into(),
            cpus: 2,
            revision: "abc1234-dirty".into(),
            envoy_version: "envoy version: 1.40.0/Clean/RELEASE/BoringSSL".into(),
            load_generators: vec!["wrk 4.2.0".into(), "h2load nghttp2/1.64.0".into()],
            repetitions: 3,
            throughput_secs: 10.0,
            latency_secs: 10.0,
            connections: 32,
            proxy_workers: 1,
            smoke: false,
        },
        measurements,
        observation: vec![
            obs(Variant::Direct, [50_000.0, 51_000.0, 49_000.0]),
            obs(Variant::DirectObserved, [49_500.0, 50_745.0, 48_020.0]),
        ],
        spans: Some(SpanRate {
            steps: vec![
                step(10_000.0, 0),
                step(20_000.0, 0),
                step(25_000.0, 0),
                step(30_000.0, 100),
            ],
            max_lossless_per_s: 25_000.0,
        }),
    }
}

/// The measurement of `(scenario, variant)` in `r`, mutable.
pub(crate) fn get_mut(r: &mut Results, s: Scenario, v: Variant) -> &mut Measurement {
    r.measurements
        .iter_mut()
        .find(|m| m.scenario == s && m.variant == v)
        .expect("the synthetic run has every (scenario, variant)")
}

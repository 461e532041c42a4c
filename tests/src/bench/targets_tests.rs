//! Unit tests of the targets on the synthetic run of `report_synthetic.rs`.

use super::*;
use crate::bench::model::{Results, Scenario, Variant};
use crate::bench::report::synthetic::{self, get_mut};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// The single result of `target` on `scenario` (None: the run-wide one).
fn result(rs: &[TargetResult], target: Target, scenario: Option<Scenario>) -> TargetResult {
    let found: Vec<&TargetResult> = rs
        .iter()
        .filter(|r| r.target == target && r.scenario == scenario)
        .collect();
    assert_eq!(found.len(), 1, "{target:?} on {scenario:?}: {rs:#?}");
    found[0].clone()
}

fn spread_of(r: &TargetResult) -> Spread {
    match r.measured {
        Some(Measured::Spread(s)) => s,
        ref other => panic!("{}: expected a spread, got {other:?}", r.sentence),
    }
}

fn value_of(r: &TargetResult) -> f64 {
    match r.measured {
        Some(Measured::Value(v)) => v,
        ref other => panic!("{}: expected a value, got {other:?}", r.sentence),
    }
}

/// Evaluates `r` and returns the result of `target` on `scenario`, asserting it failed.
fn failed(r: &Results, target: Target, scenario: Option<Scenario>) -> TargetResult {
    let rs = evaluate(r);
    let t = result(&rs, target, scenario);
    assert!(!t.pass, "expected {} to fail: {}", target.id(), t.sentence);
    assert!(
        failures(&rs).iter().any(|f| **f == t),
        "failures() lacks {}",
        t.sentence
    );
    t
}

#[test]
fn ids_are_stable_kebab_case_and_thresholds_documented() {
    let ids: Vec<&str> = Target::ALL.iter().map(|t| t.id()).collect();
    assert_eq!(
        ids,
        [
            "throughput",
            "added-p99",
            "rss",
            "cpu",
            "conn-rate",
            "observation-overhead",
            "span-rate",
            "no-errors"
        ]
    );
    let texts: Vec<String> = Target::ALL.iter().map(|t| t.threshold_text()).collect();
    assert_eq!(
        texts,
        [
            ">= 1.30x",
            "<= 0.50x",
            "<= 0.50x",
            "<= 0.70x",
            ">= 1.00x",
            "<= 3.0%",
            ">= 20,000 spans/s",
            "<= 0 errors"
        ]
    );
    assert!(Target::ConnRate.met_by(1.0), "the threshold itself passes");
    assert!(!Target::Throughput.met_by(f64::NAN));
}

#[test]
fn every_target_passes_on_a_good_run_with_hand_computed_values() {
    let r = synthetic::results();
    let rs = evaluate(&r);
    assert!(failures(&rs).is_empty(), "{:#?}", failures(&rs));
    // 4 request scenarios x (throughput, added-p99, cpu) + 5 x rss + conn-rate, observation,
    // span-rate, no-errors.
    assert_eq!(rs.len(), 4 * 3 + 5 + 4, "{rs:#?}");
    let order: Vec<Target> = rs.iter().map(|r| r.target).collect();
    let mut sorted = order.clone();
    sorted.sort_by_key(|t| Target::ALL.iter().position(|x| x == t));
    assert_eq!(order, sorted, "results follow Target::ALL");

    for s in REQUEST_SCENARIOS {
        let t = spread_of(&result(&rs, Target::Throughput, Some(s)));
        assert!(close(t.median, 1.5) && close(t.min, 1.35) && close(t.max, 1.65));
        assert_eq!(t.n, 3);
        let c = spread_of(&result(&rs, Target::Cpu, Some(s)));
        assert!(close(c.median, 0.4) && close(c.min, 0.36) && close(c.max, 0.44));
        assert!(close(
            value_of(&result(&rs, Target::AddedP99, Some(s))),
            0.25
        ));
    }
    for s in Scenario::ALL {
        assert!(close(value_of(&result(&rs, Target::Rss, Some(s))), 0.275));
    }
    let conn = spread_of(&result(&rs, Target::ConnRate, Some(Scenario::ConnRate)));
    assert!(close(conn.median, 0.9 / 0.85) && conn.n == 3);
    let obs = spread_of(&result(
        &rs,
        Target::ObservationOverhead,
        Some(Scenario::Http1Small),
    ));
    assert!(close(obs.median, 0.01) && close(obs.min, 0.005) && close(obs.max, 0.02));
    assert_eq!(value_of(&result(&rs, Target::SpanRate, None)), 25_000.0);
    assert_eq!(value_of(&result(&rs, Target::NoErrors, None)), 0.0);

    let t = result(&rs, Target::Throughput, Some(Scenario::Http1Small));
    assert_eq!(
        t.sentence,
        "sidecar-ebpf/envoy throughput on http1-1k: median 1.50x (1.35x-1.65x, 3 reps) >= 1.30x"
    );
    let a = result(&rs, Target::AddedP99, Some(Scenario::Grpc));
    assert_eq!(
        a.sentence,
        "sidecar-ebpf/envoy added p99 latency on grpc: sidecar-ebpf +0.100 ms (median of 3) / \
         envoy +0.400 ms (median of 3) = 0.25x <= 0.50x"
    );
    let m = result(&rs, Target::Rss, Some(Scenario::ConnRate));
    assert_eq!(
        m.sentence,
        "sidecar-ebpf/envoy peak RSS on conn-rate: 11.0 MiB / 40.0 MiB (medians) = 0.28x <= 0.50x"
    );
}

#[test]
fn throughput_fails_below_1_3() {
    let mut r = synthetic::results();
    // Envoy at 0.9 B / 1.29 in rep 1 and above it in reps 2 and 3: ebpf/envoy median 1.29.
    let b = synthetic::base(Scenario::Http2);
    for (s, envoy) in get_mut(&mut r, Scenario::Http2, Variant::Envoy)
        .samples
        .iter_mut()
        .zip([0.9 * b / 1.29, 0.99 * b / 1.2, 0.81 * b / 1.4])
    {
        s.throughput_rps = envoy;
    }
    let t = failed(&r, Target::Throughput, Some(Scenario::Http2));
    assert!(close(spread_of(&t).median, 1.29), "{}", t.sentence);
    assert!(t.sentence.ends_with("not >= 1.30x"), "{}", t.sentence);
    // The other scenarios still pass.
    let rs = evaluate(&r);
    assert_eq!(failures(&rs).len(), 1);
}

#[test]
fn added_p99_fails_above_half_and_when_envoy_adds_nothing() {
    let mut r = synthetic::results();
    // Envoy adds 190 µs at p99 in every rep: 100 / 190 > 0.5.
    for (i, s) in get_mut(&mut r, Scenario::Http1Large, Variant::Envoy)
        .samples
        .iter_mut()
        .enumerate()
    {
        let l = s.latency.as_mut().expect("latency");
        l.p99_us = [1000.0, 1100.0, 900.0][i] + 190.0;
    }
    let t = failed(&r, Target::AddedP99, Some(Scenario::Http1Large));
    assert!(close(value_of(&t), 100.0 / 190.0));

    // Envoy no slower than direct: the ratio cannot be resolved, and that fails.
    let mut r = synthetic::results();
    for (i, s) in get_mut(&mut r, Scenario::Grpc, Variant::Envoy)
        .samples
        .iter_mut()
        .enumerate()
    {
        s.latency.as_mut().expect("latency").p99_us = [1000.0, 1100.0, 900.0][i] - 10.0;
    }
    let t = failed(&r, Target::AddedP99, Some(Scenario::Grpc));
    assert_eq!(t.measured, None);
    assert!(
        t.sentence.contains("-0.010 ms (<= 0)") && t.sentence.contains("cannot be resolved"),
        "{}",
        t.sentence
    );
}

#[test]
fn rss_fails_above_half() {
    let mut r = synthetic::results();
    for s in &mut get_mut(&mut r, Scenario::ConnRate, Variant::SidecarEbpf).samples {
        s.peak_rss_kib = Some(20_890); // / 40960 = 0.51
    }
    let t = failed(&r, Target::Rss, Some(Scenario::ConnRate));
    assert!(close(value_of(&t), 20_890.0 / 40_960.0));
    assert!(
        t.sentence.ends_with("= 0.51x not <= 0.50x"),
        "{}",
        t.sentence
    );
}

#[test]
fn cpu_fails_above_0_7() {
    let mut r = synthetic::results();
    for s in &mut get_mut(&mut r, Scenario::Http1Small, Variant::SidecarEbpf).samples {
        s.cpu_s_per_1k = Some(0.036); // / 0.050 = 0.72
    }
    let t = failed(&r, Target::Cpu, Some(Scenario::Http1Small));
    assert!(close(spread_of(&t).median, 0.72));
}

#[test]
fn conn_rate_fails_below_iptables() {
    let mut r = synthetic::results();
    for s in &mut get_mut(&mut r, Scenario::ConnRate, Variant::SidecarEbpf).samples {
        s.throughput_rps *= 0.85 / 0.9 * 0.99;
    }
    let t = failed(&r, Target::ConnRate, Some(Scenario::ConnRate));
    assert!(close(spread_of(&t).median, 0.99));
    assert!(t
        .sentence
        .starts_with("sidecar-ebpf/sidecar-iptables new-connection rate on conn-rate"));
}

#[test]
fn observation_overhead_fails_above_3_percent() {
    let mut r = synthetic::results();
    let direct = r.observation[0].samples.clone();
    for (o, d) in r.observation[1].samples.iter_mut().zip(&direct) {
        o.throughput_rps = d.throughput_rps * 0.96;
    }
    let t = failed(&r, Target::ObservationOverhead, Some(Scenario::Http1Small));
    assert!(close(spread_of(&t).median, 0.04));
    assert!(t.sentence.contains("median 4.0%"), "{}", t.sentence);

    let mut r = synthetic::results();
    r.observation.truncate(1);
    let t = failed(&r, Target::ObservationOverhead, Some(Scenario::Http1Small));
    assert!(
        t.sentence
            .contains("direct-observed not in the observation measurements"),
        "{}",
        t.sentence
    );
}

#[test]
fn span_rate_fails_below_20000_or_when_not_run() {
    let mut r = synthetic::results();
    if let Some(s) = r.spans.as_mut() {
        s.max_lossless_per_s = 19_999.0;
    }
    let t = failed(&r, Target::SpanRate, None);
    assert!(
        t.sentence
            .contains("19,999 spans/s over 4 steps not >= 20,000 spans/s"),
        "{}",
        t.sentence
    );
    r.spans = None;
    let t = failed(&r, Target::SpanRate, None);
    assert_eq!(t.sentence, "span-rate: the span-rate benchmark was not run");
}

#[test]
fn errors_fail_naming_scenario_variant_and_rep() {
    let mut r = synthetic::results();
    get_mut(&mut r, Scenario::Http2, Variant::Envoy).samples[1].errors = 3;
    r.observation[1].samples[0].errors = 1;
    let t = failed(&r, Target::NoErrors, None);
    assert_eq!(value_of(&t), 4.0);
    assert_eq!(
        t.sentence,
        "4 failed requests in 81 samples: http2/envoy rep 2 (3 errors), observation \
         http1-1k/direct-observed rep 1 (1 error)"
    );
}

#[test]
fn a_missing_variant_fails_with_a_sentence_naming_it() {
    let mut r = synthetic::results();
    r.measurements
        .retain(|m| !(m.scenario == Scenario::Http2 && m.variant == Variant::Envoy));
    let rs = evaluate(&r);
    for target in [
        Target::Throughput,
        Target::AddedP99,
        Target::Cpu,
        Target::Rss,
    ] {
        let t = result(&rs, target, Some(Scenario::Http2));
        assert!(!t.pass && t.measured.is_none());
        assert!(
            t.sentence.ends_with("envoy not measured on http2"),
            "{}",
            t.sentence
        );
    }
    assert_eq!(failures(&rs).len(), 4);

    // A whole scenario absent is not checked, but no request scenario at all fails.
    let mut r = synthetic::results();
    r.measurements.retain(|m| m.scenario == Scenario::ConnRate);
    let rs = evaluate(&r);
    let t = result(&rs, Target::Throughput, None);
    assert!(!t.pass);
    assert!(t
        .sentence
        .starts_with("throughput: no request scenario measured"));

    // No connection-rate measurement: the conn-rate target fails.
    let mut r = synthetic::results();
    r.measurements.retain(|m| m.scenario != Scenario::ConnRate);
    let t = failed(&r, Target::ConnRate, Some(Scenario::ConnRate));
    assert_eq!(
        t.sentence,
        "sidecar-ebpf/sidecar-iptables new-connection rate on conn-rate: sidecar-ebpf and \
         sidecar-iptables not measured on conn-rate"
    );

    // Measured, but without a value: no usable repetition.
    let mut r = synthetic::results();
    for s in &mut get_mut(&mut r, Scenario::Grpc, Variant::Envoy).samples {
        s.cpu_s_per_1k = None;
    }
    let t = failed(&r, Target::Cpu, Some(Scenario::Grpc));
    assert!(t.sentence.contains("no repetition"), "{}", t.sentence);
}

#[test]
fn an_empty_run_fails_every_target() {
    let rs = evaluate(&Results::default());
    assert_eq!(rs.len(), Target::ALL.len());
    assert!(rs.iter().all(|r| !r.pass), "{rs:#?}");
    // A smoke run is evaluated the same way (its caller ignores the outcome).
    let mut smoke = synthetic::results();
    smoke.info.smoke = true;
    assert_eq!(evaluate(&smoke), evaluate(&synthetic::results()));
}

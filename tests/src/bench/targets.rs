//! The documented targets of the benchmarks (issue 7) and their check
//! (`cargo xtask bench --check` exits non-zero when one fails).
//!
//! Every target compares the sidecar with a baseline measured in the same run. A target whose
//! inputs are missing (a variant not measured, no usable repetition, the span benchmark not
//! run) *fails*, with a sentence saying what is missing, so an incomplete run never passes.
//! [`evaluate`] computes the targets for a smoke run too ([`RunInfo::smoke`]); the caller does
//! not use them for its exit status there, since a smoke run measures nothing worth checking.
//!
//! [`RunInfo::smoke`]: super::model::RunInfo::smoke

use super::model::{Measurement, Results, Scenario, Variant};
use super::report::format;
use super::stats::{self, field, Percentile, Spread};

/// The scenarios that send requests over long-lived connections (all but the connection
/// rate): the throughput, latency and CPU targets apply to each of them that was measured.
pub const REQUEST_SCENARIOS: [Scenario; 4] = [
    Scenario::Http1Small,
    Scenario::Http1Large,
    Scenario::Http2,
    Scenario::Grpc,
];

/// Which side of the threshold passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The measured value must be `>=` the threshold.
    AtLeast,
    /// The measured value must be `<=` the threshold.
    AtMost,
}

impl Direction {
    /// The comparison operator (`>=` or `<=`).
    pub fn operator(self) -> &'static str {
        match self {
            Direction::AtLeast => ">=",
            Direction::AtMost => "<=",
        }
    }
}

/// One documented target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Sidecar (eBPF) throughput at least 1.3 times Envoy's, per request scenario.
    Throughput,
    /// Sidecar (eBPF) added p99 latency at most half of Envoy's, per request scenario.
    AddedP99,
    /// Sidecar (eBPF) peak RSS at most half of Envoy's, per scenario.
    Rss,
    /// Sidecar (eBPF) CPU per 1000 requests at most 0.7 times Envoy's, per request scenario.
    Cpu,
    /// eBPF redirection's new-connection rate at least that of iptables `REDIRECT`.
    ConnRate,
    /// The kernel observation programs cost at most 3 % of direct-path throughput.
    ObservationOverhead,
    /// At least 20,000 spans per second exported with no drop.
    SpanRate,
    /// No failed request in any repetition.
    NoErrors,
}

impl Target {
    /// Every target, in report order.
    pub const ALL: [Target; 8] = [
        Target::Throughput,
        Target::AddedP99,
        Target::Rss,
        Target::Cpu,
        Target::ConnRate,
        Target::ObservationOverhead,
        Target::SpanRate,
        Target::NoErrors,
    ];

    /// Stable kebab-case identifier.
    pub fn id(self) -> &'static str {
        match self {
            Target::Throughput => "throughput",
            Target::AddedP99 => "added-p99",
            Target::Rss => "rss",
            Target::Cpu => "cpu",
            Target::ConnRate => "conn-rate",
            Target::ObservationOverhead => "observation-overhead",
            Target::SpanRate => "span-rate",
            Target::NoErrors => "no-errors",
        }
    }

    /// What is compared, in one line.
    pub fn description(self) -> &'static str {
        match self {
            Target::Throughput => "sidecar-ebpf throughput / envoy throughput (median paired)",
            Target::AddedP99 => {
                "sidecar-ebpf added p99 latency / envoy added p99 latency, vs direct (medians)"
            }
            Target::Rss => "sidecar-ebpf peak RSS / envoy peak RSS (medians)",
            Target::Cpu => "sidecar-ebpf CPU per 1000 requests / envoy's (median paired)",
            Target::ConnRate => {
                "sidecar-ebpf new connections/s / sidecar-iptables new connections/s \
                 (median paired)"
            }
            Target::ObservationOverhead => {
                "direct-path throughput lost to the observation programs (1 - median paired \
                 ratio direct-observed / direct)"
            }
            Target::SpanRate => "highest span rate exported with no drop",
            Target::NoErrors => "failed requests over every repetition",
        }
    }

    /// The threshold, in the unit of the measured value (a ratio, a fraction, spans per
    /// second, a count of errors).
    pub fn threshold(self) -> f64 {
        match self {
            Target::Throughput => 1.3,
            Target::AddedP99 => 0.5,
            Target::Rss => 0.5,
            Target::Cpu => 0.7,
            Target::ConnRate => 1.0,
            Target::ObservationOverhead => 0.03,
            Target::SpanRate => 20_000.0,
            Target::NoErrors => 0.0,
        }
    }

    /// Which side of [`Target::threshold`] passes.
    pub fn direction(self) -> Direction {
        match self {
            Target::Throughput | Target::ConnRate | Target::SpanRate => Direction::AtLeast,
            Target::AddedP99
            | Target::Rss
            | Target::Cpu
            | Target::ObservationOverhead
            | Target::NoErrors => Direction::AtMost,
        }
    }

    /// Whether `value` is on the passing side of the threshold (a non-finite value never is).
    pub fn met_by(self, value: f64) -> bool {
        value.is_finite()
            && match self.direction() {
                Direction::AtLeast => value >= self.threshold(),
                Direction::AtMost => value <= self.threshold(),
            }
    }

    /// A measured value in this target's unit, for sentences and tables ("1.42x", "2.1%",
    /// "23,456 spans/s", "0 errors").
    pub fn format_value(self, value: f64) -> String {
        match self {
            Target::Throughput
            | Target::AddedP99
            | Target::Rss
            | Target::Cpu
            | Target::ConnRate => format::ratio(value),
            Target::ObservationOverhead => format::percent(value),
            Target::SpanRate => format!("{} spans/s", format::int(value)),
            Target::NoErrors => format!("{} errors", format::int(value)),
        }
    }

    /// The threshold with its operator (">= 1.30x").
    pub fn threshold_text(self) -> String {
        format!(
            "{} {}",
            self.direction().operator(),
            self.format_value(self.threshold())
        )
    }
}

/// What a target measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Measured {
    /// A median over repetitions with its range.
    Spread(Spread),
    /// A single value (a ratio of medians, a maximum, a count).
    Value(f64),
}

impl Measured {
    /// The value checked against the threshold (the median of a spread).
    pub fn value(&self) -> f64 {
        match self {
            Measured::Spread(s) => s.median,
            Measured::Value(v) => *v,
        }
    }
}

/// The outcome of one target on one scenario (or on the whole run).
#[derive(Clone, Debug, PartialEq)]
pub struct TargetResult {
    /// The target.
    pub target: Target,
    /// The scenario it was checked on, for per-scenario targets.
    pub scenario: Option<Scenario>,
    /// What was measured; `None` when the inputs are missing or the value cannot be resolved.
    pub measured: Option<Measured>,
    /// Whether the target is met.
    pub pass: bool,
    /// A sentence for people: what was compared, the numbers, and the threshold (or what is
    /// missing).
    pub sentence: String,
}

/// The targets that failed.
pub fn failures(results: &[TargetResult]) -> Vec<&TargetResult> {
    results.iter().filter(|r| !r.pass).collect()
}

/// Checks every target of [`Target::ALL`] against `results`, in that order (per-scenario
/// targets in [`Scenario::ALL`] order).
pub fn evaluate(results: &Results) -> Vec<TargetResult> {
    let mut out = Vec::new();
    let request: Vec<Scenario> = REQUEST_SCENARIOS
        .into_iter()
        .filter(|s| measured(results, *s))
        .collect();
    let all: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| measured(results, *s))
        .collect();

    for target in Target::ALL {
        match target {
            Target::Throughput | Target::AddedP99 | Target::Cpu => {
                if request.is_empty() {
                    out.push(missing(
                        target,
                        None,
                        "no request scenario measured (http1-1k, http1-64k, http2, grpc)".into(),
                    ));
                }
                for &scenario in &request {
                    out.push(match target {
                        Target::Throughput => paired_target(
                            results,
                            target,
                            scenario,
                            (Variant::SidecarEbpf, Variant::Envoy),
                            "throughput",
                            field::throughput,
                        ),
                        Target::Cpu => paired_target(
                            results,
                            target,
                            scenario,
                            (Variant::SidecarEbpf, Variant::Envoy),
                            "CPU per 1000 requests",
                            field::cpu_s_per_1k,
                        ),
                        _ => added_p99(results, scenario),
                    });
                }
            }
            Target::Rss => {
                if all.is_empty() {
                    out.push(missing(target, None, "no scenario measured".into()));
                }
                for &scenario in &all {
                    out.push(rss(results, scenario));
                }
            }
            Target::ConnRate => out.push(paired_target(
                results,
                target,
                Scenario::ConnRate,
                (Variant::SidecarEbpf, Variant::SidecarIptables),
                "new-connection rate",
                field::throughput,
            )),
            Target::ObservationOverhead => out.push(observation_overhead(results)),
            Target::SpanRate => out.push(span_rate(results)),
            Target::NoErrors => out.push(no_errors(results)),
        }
    }
    out
}

/// Whether any variant was measured on `scenario`.
fn measured(results: &Results, scenario: Scenario) -> bool {
    results.measurements.iter().any(|m| m.scenario == scenario)
}

/// A failed result for missing inputs. `what` names what is missing; a target that is not
/// per scenario gets its id in front, so the sentence stands on its own.
fn missing(target: Target, scenario: Option<Scenario>, what: String) -> TargetResult {
    let sentence = match scenario {
        Some(_) => what,
        None => format!("{}: {what}", target.id()),
    };
    TargetResult {
        target,
        scenario,
        measured: None,
        pass: false,
        sentence,
    }
}

/// The comparison with the threshold, for a sentence: ">= 1.30x" when met, "not >= 1.30x"
/// when missed.
fn verdict(target: Target, pass: bool) -> String {
    if pass {
        target.threshold_text()
    } else {
        format!("not {}", target.threshold_text())
    }
}

/// `median m (min-max, n reps)` in the target's unit.
fn spread_words(target: Target, s: &Spread) -> String {
    let (lo, hi) = (target.format_value(s.min), target.format_value(s.max));
    format!(
        "median {} ({}, {} rep{})",
        target.format_value(s.median),
        format::range(&lo, &hi),
        s.n,
        if s.n == 1 { "" } else { "s" }
    )
}

/// Both measurements of `(a, b)` on `scenario`, or the sentence naming what was not measured.
fn pair(
    results: &Results,
    scenario: Scenario,
    (a, b): (Variant, Variant),
) -> Result<(&Measurement, &Measurement), String> {
    match (results.get(scenario, a), results.get(scenario, b)) {
        (Some(ma), Some(mb)) => Ok((ma, mb)),
        (None, None) => Err(format!(
            "{} and {} not measured on {}",
            a.as_str(),
            b.as_str(),
            scenario.as_str()
        )),
        (None, Some(_)) => Err(format!(
            "{} not measured on {}",
            a.as_str(),
            scenario.as_str()
        )),
        (Some(_), None) => Err(format!(
            "{} not measured on {}",
            b.as_str(),
            scenario.as_str()
        )),
    }
}

/// Median paired ratio `a / b` of `field` on `scenario` against the target's threshold.
fn paired_target(
    results: &Results,
    target: Target,
    scenario: Scenario,
    (a, b): (Variant, Variant),
    what: &str,
    field: fn(&super::model::Sample) -> Option<f64>,
) -> TargetResult {
    let subject = format!(
        "{}/{} {what} on {}",
        a.as_str(),
        b.as_str(),
        scenario.as_str()
    );
    let (ma, mb) = match pair(results, scenario, (a, b)) {
        Ok(p) => p,
        Err(why) => return missing(target, Some(scenario), format!("{subject}: {why}")),
    };
    let Some(s) = stats::paired_ratio(ma, mb, field) else {
        return missing(
            target,
            Some(scenario),
            format!(
                "{subject}: no repetition with a {what} value for both {} ({} samples) and {} \
                 ({} samples, value > 0)",
                a.as_str(),
                ma.samples.len(),
                b.as_str(),
                mb.samples.len()
            ),
        );
    };
    spread_result(target, scenario, &subject, s)
}

/// The result of a target measured as a spread whose median is checked.
fn spread_result(target: Target, scenario: Scenario, subject: &str, s: Spread) -> TargetResult {
    let pass = target.met_by(s.median);
    TargetResult {
        target,
        scenario: Some(scenario),
        measured: Some(Measured::Spread(s)),
        pass,
        sentence: format!(
            "{subject}: {} {}",
            spread_words(target, &s),
            verdict(target, pass)
        ),
    }
}

/// `added-p99` on one scenario: median added p99 of sidecar-ebpf over Envoy's.
fn added_p99(results: &Results, scenario: Scenario) -> TargetResult {
    let target = Target::AddedP99;
    let subject = format!(
        "sidecar-ebpf/envoy added p99 latency on {}",
        scenario.as_str()
    );
    let lookup = |v: Variant| {
        results
            .get(scenario, v)
            .ok_or_else(|| format!("{} not measured on {}", v.as_str(), scenario.as_str()))
    };
    let measurements = [Variant::Direct, Variant::SidecarEbpf, Variant::Envoy].map(lookup);
    let absent: Vec<String> = measurements
        .iter()
        .filter_map(|m| m.as_ref().err().cloned())
        .collect();
    let [Ok(direct), Ok(ebpf), Ok(envoy)] = measurements else {
        return missing(
            target,
            Some(scenario),
            format!("{subject}: {}", absent.join(", ")),
        );
    };
    let added = |m: &Measurement| {
        stats::added_latency(m, direct, Percentile::P99).ok_or_else(|| {
            format!(
                "no repetition with p99 latency for both {} and direct",
                m.variant.as_str()
            )
        })
    };
    let (ours, theirs) = match (added(ebpf), added(envoy)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => {
            return missing(target, Some(scenario), format!("{subject}: {e}"))
        }
        (Err(e1), Err(e2)) => {
            return missing(target, Some(scenario), format!("{subject}: {e1}; {e2}"))
        }
    };
    let ours_text = format!(
        "sidecar-ebpf {} ms (median of {})",
        format::signed_ms(ours.median),
        ours.n
    );
    let theirs_text = format!(
        "envoy {} ms (median of {})",
        format::signed_ms(theirs.median),
        theirs.n
    );
    if theirs.median <= 0.0 {
        return TargetResult {
            target,
            scenario: Some(scenario),
            measured: None,
            pass: false,
            sentence: format!(
                "{subject}: envoy's median added p99 is {} ms (<= 0), so the ratio cannot be \
                 resolved ({ours_text}); not {}",
                format::signed_ms(theirs.median),
                target.threshold_text()
            ),
        };
    }
    let ratio = ours.median / theirs.median;
    let pass = target.met_by(ratio);
    TargetResult {
        target,
        scenario: Some(scenario),
        measured: Some(Measured::Value(ratio)),
        pass,
        sentence: format!(
            "{subject}: {ours_text} / {theirs_text} = {} {}",
            format::ratio(ratio),
            verdict(target, pass)
        ),
    }
}

/// `rss` on one scenario: median peak RSS of sidecar-ebpf over Envoy's.
fn rss(results: &Results, scenario: Scenario) -> TargetResult {
    let target = Target::Rss;
    let subject = format!("sidecar-ebpf/envoy peak RSS on {}", scenario.as_str());
    let (ebpf, envoy) = match pair(results, scenario, (Variant::SidecarEbpf, Variant::Envoy)) {
        Ok(p) => p,
        Err(why) => return missing(target, Some(scenario), format!("{subject}: {why}")),
    };
    let median = |m: &Measurement| {
        stats::median(&stats::values(m, field::peak_rss_kib))
            .ok_or_else(|| format!("no peak RSS measured for {}", m.variant.as_str()))
    };
    let (ours, theirs) = match (median(ebpf), median(envoy)) {
        (Ok(a), Ok(b)) if b > 0.0 => (a, b),
        (Ok(_), Ok(_)) => {
            return missing(
                target,
                Some(scenario),
                format!("{subject}: envoy's peak RSS is 0"),
            )
        }
        (Err(e), _) | (_, Err(e)) => {
            return missing(target, Some(scenario), format!("{subject}: {e}"))
        }
    };
    let ratio = ours / theirs;
    let pass = target.met_by(ratio);
    TargetResult {
        target,
        scenario: Some(scenario),
        measured: Some(Measured::Value(ratio)),
        pass,
        sentence: format!(
            "{subject}: {} MiB / {} MiB (medians) = {} {}",
            format::mib(ours),
            format::mib(theirs),
            format::ratio(ratio),
            verdict(target, pass)
        ),
    }
}

/// `observation-overhead`: throughput the direct path loses with the observation programs.
fn observation_overhead(results: &Results) -> TargetResult {
    let target = Target::ObservationOverhead;
    let scenario = Scenario::Http1Small;
    let subject = format!(
        "direct-observed/direct throughput overhead on {}",
        scenario.as_str()
    );
    let find = |v: Variant| {
        results
            .observation
            .iter()
            .find(|m| m.scenario == scenario && m.variant == v)
    };
    let (direct, observed) = match (find(Variant::Direct), find(Variant::DirectObserved)) {
        (Some(d), Some(o)) => (d, o),
        (d, o) => {
            let absent: Vec<&str> = [(d, Variant::Direct), (o, Variant::DirectObserved)]
                .iter()
                .filter(|(m, _)| m.is_none())
                .map(|(_, v)| v.as_str())
                .collect();
            return missing(
                target,
                Some(scenario),
                format!(
                    "{subject}: {} not in the observation measurements",
                    absent.join(" and ")
                ),
            );
        }
    };
    let Some(ratio) = stats::paired_ratio(observed, direct, field::throughput) else {
        return missing(
            target,
            Some(scenario),
            format!(
                "{subject}: no repetition with throughput for both direct ({} samples) and \
                 direct-observed ({} samples)",
                direct.samples.len(),
                observed.samples.len()
            ),
        );
    };
    let overhead = ratio.map_decreasing(|r| 1.0 - r);
    spread_result(target, scenario, &subject, overhead)
}

/// `span-rate`: the highest lossless span export rate.
fn span_rate(results: &Results) -> TargetResult {
    let target = Target::SpanRate;
    let Some(spans) = &results.spans else {
        return missing(target, None, "the span-rate benchmark was not run".into());
    };
    if spans.steps.is_empty() {
        return missing(target, None, "the span-rate benchmark has no step".into());
    }
    let v = spans.max_lossless_per_s;
    let pass = target.met_by(v);
    TargetResult {
        target,
        scenario: None,
        measured: Some(Measured::Value(v)),
        pass,
        sentence: format!(
            "highest lossless span export rate: {} over {} steps {}",
            target.format_value(v),
            spans.steps.len(),
            verdict(target, pass)
        ),
    }
}

/// At most this many failing samples are named in the `no-errors` sentence.
const ERRORS_NAMED: usize = 12;

/// `no-errors`: no failed request in any sample of any measurement.
fn no_errors(results: &Results) -> TargetResult {
    let target = Target::NoErrors;
    let sets = [
        ("", &results.measurements),
        ("observation ", &results.observation),
    ];
    let mut samples = 0usize;
    let mut total: u64 = 0;
    let mut failing = Vec::new();
    for (prefix, set) in sets {
        for m in set.iter() {
            for (i, s) in m.samples.iter().enumerate() {
                samples += 1;
                if s.errors > 0 {
                    total = total.saturating_add(s.errors);
                    failing.push(format!(
                        "{prefix}{}/{} rep {} ({} error{})",
                        m.scenario.as_str(),
                        m.variant.as_str(),
                        i + 1,
                        s.errors,
                        if s.errors == 1 { "" } else { "s" }
                    ));
                }
            }
        }
    }
    if samples == 0 {
        return missing(target, None, "no sample measured".into());
    }
    if failing.is_empty() {
        return TargetResult {
            target,
            scenario: None,
            measured: Some(Measured::Value(0.0)),
            pass: true,
            sentence: format!("no failed request in {samples} samples"),
        };
    }
    let more = failing.len().saturating_sub(ERRORS_NAMED);
    failing.truncate(ERRORS_NAMED);
    let mut named = failing.join(", ");
    if more > 0 {
        named.push_str(&format!(" and {more} more"));
    }
    TargetResult {
        target,
        scenario: None,
        measured: Some(Measured::Value(total as f64)),
        pass: false,
        sentence: format!("{total} failed requests in {samples} samples: {named}"),
    }
}

#[cfg(test)]
#[path = "targets_tests.rs"]
mod tests;

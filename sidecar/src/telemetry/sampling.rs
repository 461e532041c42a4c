//! Trace sampling: the `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` choices of the
//! OpenTelemetry SDK environment specification, mapped onto the SDK's own [`Sampler`]s.

use std::fmt;
use std::str::FromStr;

use opentelemetry_sdk::trace::Sampler;

/// Accepted values of `OTEL_TRACES_SAMPLER` / `--traces-sampler`, in the order they are listed.
pub const SAMPLER_NAMES: [&str; 6] = [
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

/// Which sampler decides whether a trace is recorded and exported (`OTEL_TRACES_SAMPLER`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SamplerKind {
    /// Sample every span.
    AlwaysOn,
    /// Sample no span.
    AlwaysOff,
    /// Sample a ratio of traces, by trace id, ignoring the parent's decision.
    TraceIdRatio,
    /// Follow the parent's sampled flag; sample every root.
    #[default]
    ParentBasedAlwaysOn,
    /// Follow the parent's sampled flag; sample no root.
    ParentBasedAlwaysOff,
    /// Follow the parent's sampled flag; sample a ratio of roots, by trace id.
    ParentBasedTraceIdRatio,
}

/// An `OTEL_TRACES_SAMPLER` or `OTEL_TRACES_SAMPLER_ARG` value that is not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// Not one of [`SAMPLER_NAMES`].
    #[error("`{0}` is not a sampler accepted by OTEL_TRACES_SAMPLER; accepted values: always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio")]
    UnknownSampler(String),
    /// Not a number in [0, 1].
    #[error("`{0}` is not a ratio accepted by OTEL_TRACES_SAMPLER_ARG; accepted values: a number from 0 to 1")]
    InvalidRatio(String),
}

impl FromStr for SamplerKind {
    type Err = SamplingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The specification's names are lowercase; surrounding blanks are tolerated.
        match s.trim() {
            "always_on" => Ok(Self::AlwaysOn),
            "always_off" => Ok(Self::AlwaysOff),
            "traceidratio" => Ok(Self::TraceIdRatio),
            "parentbased_always_on" => Ok(Self::ParentBasedAlwaysOn),
            "parentbased_always_off" => Ok(Self::ParentBasedAlwaysOff),
            "parentbased_traceidratio" => Ok(Self::ParentBasedTraceIdRatio),
            _ => Err(SamplingError::UnknownSampler(s.to_owned())),
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = match self {
            Self::AlwaysOn => 0,
            Self::AlwaysOff => 1,
            Self::TraceIdRatio => 2,
            Self::ParentBasedAlwaysOn => 3,
            Self::ParentBasedAlwaysOff => 4,
            Self::ParentBasedTraceIdRatio => 5,
        };
        f.write_str(SAMPLER_NAMES[i])
    }
}

/// Parses an `OTEL_TRACES_SAMPLER_ARG` ratio: a finite number in [0, 1].
pub fn parse_ratio(s: &str) -> Result<f64, SamplingError> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(SamplingError::InvalidRatio(s.to_owned())),
    }
}

/// The configured sampler: its kind and the ratio the `traceidratio` kinds use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingConfig {
    /// `OTEL_TRACES_SAMPLER`.
    pub kind: SamplerKind,
    /// `OTEL_TRACES_SAMPLER_ARG`, in [0, 1]; only the ratio kinds read it.
    pub ratio: f64,
}

impl Default for SamplingConfig {
    /// `parentbased_always_on` with ratio 1.0, the specification's defaults.
    fn default() -> Self {
        Self {
            kind: SamplerKind::default(),
            ratio: 1.0,
        }
    }
}

impl SamplingConfig {
    /// The SDK sampler this configuration stands for.
    pub fn sampler(&self) -> Sampler {
        let ratio = self.ratio.clamp(0.0, 1.0);
        let parent_based = |root| Sampler::ParentBased(Box::new(root));
        match self.kind {
            SamplerKind::AlwaysOn => Sampler::AlwaysOn,
            SamplerKind::AlwaysOff => Sampler::AlwaysOff,
            SamplerKind::TraceIdRatio => Sampler::TraceIdRatioBased(ratio),
            SamplerKind::ParentBasedAlwaysOn => parent_based(Sampler::AlwaysOn),
            SamplerKind::ParentBasedAlwaysOff => parent_based(Sampler::AlwaysOff),
            SamplerKind::ParentBasedTraceIdRatio => parent_based(Sampler::TraceIdRatioBased(ratio)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::telemetry::{HttpRequestEnd, HttpRequestStart, HttpVersion, Telemetry};

    const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
    const PARENT_ID: &str = "b7ad6b7169203331";

    #[test]
    fn every_name_parses_and_displays_back() {
        for name in SAMPLER_NAMES {
            let kind: SamplerKind = name.parse().unwrap();
            assert_eq!(kind.to_string(), name);
        }
        assert_eq!(
            " traceidratio ".parse::<SamplerKind>(),
            Ok(SamplerKind::TraceIdRatio)
        );
        assert_eq!(
            SamplingConfig::default().kind,
            SamplerKind::ParentBasedAlwaysOn
        );
        assert_eq!(SamplingConfig::default().ratio, 1.0);
    }

    #[test]
    fn unknown_names_are_rejected_with_the_accepted_list() {
        for bad in [
            "",
            "on",
            "ALWAYS_ON",
            "always-on",
            "parentbased_jaeger_remote",
            "xray",
        ] {
            let err = bad.parse::<SamplerKind>().unwrap_err();
            assert_eq!(err, SamplingError::UnknownSampler(bad.to_owned()));
            let text = err.to_string();
            assert!(text.contains("OTEL_TRACES_SAMPLER"), "{text}");
            for name in SAMPLER_NAMES {
                assert!(text.contains(name), "{name} not in {text}");
            }
        }
    }

    #[test]
    fn ratios_must_be_numbers_from_zero_to_one() {
        assert_eq!(parse_ratio("0"), Ok(0.0));
        assert_eq!(parse_ratio("0.25"), Ok(0.25));
        assert_eq!(parse_ratio(" 1 "), Ok(1.0));
        for bad in ["", "-0.1", "1.5", "NaN", "inf", "half"] {
            let err = parse_ratio(bad).unwrap_err();
            assert_eq!(err, SamplingError::InvalidRatio(bad.to_owned()));
            assert!(err.to_string().contains("OTEL_TRACES_SAMPLER_ARG"), "{err}");
        }
    }

    /// Runs one request with `kind`/`ratio` and an optional incoming parent with the given
    /// flags; returns whether a span was exported, the outgoing flags, and the duration count.
    fn decide(kind: SamplerKind, ratio: f64, parent_flags: Option<&str>) -> (bool, String, u64) {
        let (t, tt) = Telemetry::for_tests_with(SamplingConfig { kind, ratio }.sampler());
        let incoming = parent_flags.map(|f| format!("00-{TRACE_ID}-{PARENT_ID}-{f}"));
        let start = SystemTime::now();
        let req = t.client_request_start(&HttpRequestStart {
            method: "GET",
            target: "/",
            host: Some("svc:80"),
            version: HttpVersion::Http11,
            destination: "10.1.0.5:80".parse().unwrap(),
            traceparent: incoming.as_deref(),
            tracestate: None,
            start,
            reused_connection: false,
        });
        let outgoing = req.traceparent().unwrap().to_owned();
        t.client_request_end(
            req,
            HttpRequestEnd {
                status: Some(200),
                request_body_bytes: 0,
                response_body_bytes: 0,
                error: None,
                end: start + Duration::from_millis(5),
            },
        );
        let spans = tt.spans();
        if parent_flags.is_some() {
            assert_eq!(
                &outgoing[3..35],
                TRACE_ID,
                "the trace continues: {outgoing}"
            );
        }
        for s in &spans {
            assert_eq!(
                format!("{:02x}", s.span_context.trace_flags()),
                "01",
                "exported spans are sampled"
            );
        }
        let count = tt.metric_points("http.client.request.duration")[0]
            .count()
            .unwrap();
        (!spans.is_empty(), outgoing[53..].to_owned(), count)
    }

    #[test]
    fn each_sampler_decides_with_and_without_a_parent() {
        use SamplerKind::*;
        // (kind, ratio, parent flags, expected sampled)
        let cases: &[(SamplerKind, f64, Option<&str>, bool)] = &[
            (AlwaysOn, 1.0, None, true),
            (AlwaysOn, 1.0, Some("00"), true),
            (AlwaysOn, 1.0, Some("01"), true),
            (AlwaysOff, 1.0, None, false),
            (AlwaysOff, 1.0, Some("00"), false),
            (AlwaysOff, 1.0, Some("01"), false),
            (TraceIdRatio, 0.0, None, false),
            (TraceIdRatio, 0.0, Some("01"), false),
            (TraceIdRatio, 1.0, None, true),
            (TraceIdRatio, 1.0, Some("00"), true),
            (ParentBasedAlwaysOn, 1.0, None, true),
            (ParentBasedAlwaysOn, 1.0, Some("00"), false),
            (ParentBasedAlwaysOn, 1.0, Some("01"), true),
            (ParentBasedAlwaysOff, 1.0, None, false),
            (ParentBasedAlwaysOff, 1.0, Some("00"), false),
            (ParentBasedAlwaysOff, 1.0, Some("01"), true),
            (ParentBasedTraceIdRatio, 0.0, None, false),
            (ParentBasedTraceIdRatio, 0.0, Some("01"), true),
            (ParentBasedTraceIdRatio, 1.0, None, true),
            (ParentBasedTraceIdRatio, 1.0, Some("00"), false),
        ];
        for &(kind, ratio, parent, sampled) in cases {
            let (exported, flags, count) = decide(kind, ratio, parent);
            let what = format!("{kind} ratio {ratio} parent {parent:?}");
            assert_eq!(exported, sampled, "{what}");
            assert_eq!(flags, if sampled { "01" } else { "00" }, "{what}");
            assert_eq!(count, 1, "metrics are never sampled: {what}");
        }
    }

    #[test]
    fn a_middle_ratio_samples_some_roots_but_not_all() {
        let (t, tt) = Telemetry::for_tests_with(
            SamplingConfig {
                kind: SamplerKind::TraceIdRatio,
                ratio: 0.5,
            }
            .sampler(),
        );
        let start = SystemTime::now();
        let mut sampled = 0;
        for _ in 0..200 {
            let req = t.client_request_start(&HttpRequestStart {
                method: "GET",
                target: "/",
                host: Some("svc:80"),
                version: HttpVersion::Http11,
                destination: "10.1.0.5:80".parse().unwrap(),
                traceparent: None,
                tracestate: None,
                start,
                reused_connection: false,
            });
            if req.traceparent().unwrap().ends_with("-01") {
                sampled += 1;
            }
            t.client_request_end(
                req,
                HttpRequestEnd {
                    status: Some(200),
                    request_body_bytes: 0,
                    response_body_bytes: 0,
                    error: None,
                    end: start + Duration::from_millis(1),
                },
            );
        }
        assert_eq!(tt.spans().len(), sampled);
        // Random trace ids: 200 draws at 0.5 land in 40..160 with overwhelming probability.
        assert!((40..=160).contains(&sampled), "{sampled} of 200 sampled");
    }
}

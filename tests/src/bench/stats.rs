//! Medians, spreads and paired ratios of a benchmark's repetitions.
//!
//! Every figure of the report is a median over repetitions with its range (min to max), so a
//! reader sees how far the repetitions agree. Comparisons between two variants are *paired*:
//! repetition `i` of one variant is divided by repetition `i` of the other, measured close in
//! time (the runner interleaves variants), which cancels slow drifts of the machine.
//!
//! Non-finite values (NaN, infinities) are ignored everywhere: a broken sample shrinks `n`, it
//! never poisons a median.

use super::model::{Latency, Measurement, Sample};

/// The median of the finite values of `values` (the mean of the two middle values for an even
/// count); `None` when there is no finite value.
pub fn median(values: &[f64]) -> Option<f64> {
    let finite = finite_sorted(values);
    let n = finite.len();
    if n == 0 {
        return None;
    }
    let mid = n / 2;
    if n % 2 == 1 {
        Some(finite[mid])
    } else {
        // The two middle values; `mid >= 1` since n is even and non-zero.
        let (lo, hi) = (finite[mid - 1], finite[mid]);
        Some(lo + (hi - lo) / 2.0)
    }
}

/// The finite values of `values`, sorted ascending.
fn finite_sorted(values: &[f64]) -> Vec<f64> {
    let mut finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    finite.sort_by(f64::total_cmp);
    finite
}

/// Median and range of a set of repetitions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// The median (see [`median`]).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many (finite) values.
    pub n: usize,
}

impl Spread {
    /// The spread of the finite values of `values`; `None` when there is none.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let sorted = finite_sorted(values);
        let (&min, &max) = (sorted.first()?, sorted.last()?);
        Some(Spread {
            median: median(&sorted)?,
            min,
            max,
            n: sorted.len(),
        })
    }

    /// The spread of `f(v)` for a non-increasing `f` (such as `1 - v`): the median maps to
    /// the median, and min and max swap.
    pub fn map_decreasing(self, f: impl Fn(f64) -> f64) -> Spread {
        Spread {
            median: f(self.median),
            min: f(self.max),
            max: f(self.min),
            n: self.n,
        }
    }
}

/// Accessors of a [`Sample`]'s fields, in the shape the functions of this module take
/// (`Fn(&Sample) -> Option<f64>`).
pub mod field {
    use super::super::model::Sample;

    /// Requests per second of the throughput run.
    pub fn throughput(s: &Sample) -> Option<f64> {
        Some(s.throughput_rps)
    }

    /// CPU seconds of the proxy per 1000 requests.
    pub fn cpu_s_per_1k(s: &Sample) -> Option<f64> {
        s.cpu_s_per_1k
    }

    /// Peak RSS of the proxy in KiB.
    pub fn peak_rss_kib(s: &Sample) -> Option<f64> {
        s.peak_rss_kib.map(|k| k as f64)
    }
}

/// A latency percentile of the fixed-rate run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Percentile {
    /// The median latency.
    P50,
    /// The 99th percentile.
    P99,
    /// The 99.9th percentile.
    P999,
}

impl Percentile {
    /// Every percentile, in report order.
    pub const ALL: [Percentile; 3] = [Percentile::P50, Percentile::P99, Percentile::P999];

    /// Short name ("p50", "p99", "p99.9").
    pub fn as_str(self) -> &'static str {
        match self {
            Percentile::P50 => "p50",
            Percentile::P99 => "p99",
            Percentile::P999 => "p99.9",
        }
    }

    /// The percentile's value in `latency`, in microseconds.
    pub fn of(self, latency: &Latency) -> f64 {
        match self {
            Percentile::P50 => latency.p50_us,
            Percentile::P99 => latency.p99_us,
            Percentile::P999 => latency.p999_us,
        }
    }

    /// The percentile of a sample in microseconds, if the sample has a latency run.
    pub fn of_sample(self, s: &Sample) -> Option<f64> {
        s.latency.as_ref().map(|l| self.of(l))
    }
}

/// The finite values of `field` over the samples of `m`, in repetition order.
pub fn values(m: &Measurement, field: impl Fn(&Sample) -> Option<f64>) -> Vec<f64> {
    m.samples
        .iter()
        .filter_map(&field)
        .filter(|v| v.is_finite())
        .collect()
}

/// The spread of `field` over the samples of `m`.
pub fn spread(m: &Measurement, field: impl Fn(&Sample) -> Option<f64>) -> Option<Spread> {
    Spread::of(&values(m, field))
}

/// Per repetition `i < min(len)`, `field(a[i]) / field(b[i])`, for the repetitions where both
/// values are present and finite and the denominator is > 0.
pub fn paired_ratios(
    a: &Measurement,
    b: &Measurement,
    field: impl Fn(&Sample) -> Option<f64>,
) -> Vec<f64> {
    paired(a, b, field, |x, y| (y > 0.0).then(|| x / y))
}

/// The spread of [`paired_ratios`]; `None` when no repetition pairs up.
pub fn paired_ratio(
    a: &Measurement,
    b: &Measurement,
    field: impl Fn(&Sample) -> Option<f64>,
) -> Option<Spread> {
    Spread::of(&paired_ratios(a, b, field))
}

/// Per repetition `i < min(len)`, `field(a[i]) - field(b[i])`, for the repetitions where both
/// values are present and finite.
pub fn paired_differences(
    a: &Measurement,
    b: &Measurement,
    field: impl Fn(&Sample) -> Option<f64>,
) -> Vec<f64> {
    paired(a, b, field, |x, y| Some(x - y))
}

/// Per repetition `i < min(len)`, `combine(field(a[i]), field(b[i]))` where both values are
/// present and finite.
fn paired(
    a: &Measurement,
    b: &Measurement,
    field: impl Fn(&Sample) -> Option<f64>,
    combine: impl Fn(f64, f64) -> Option<f64>,
) -> Vec<f64> {
    a.samples
        .iter()
        .zip(&b.samples)
        .filter_map(|(sa, sb)| {
            let (x, y) = (field(sa)?, field(sb)?);
            if x.is_finite() && y.is_finite() {
                combine(x, y)
            } else {
                None
            }
        })
        .collect()
}

/// Latency `variant` adds to `direct` at `percentile`, per repetition
/// (`variant[i] - direct[i]`, microseconds), summarised; `None` when no repetition of both has
/// a latency run.
pub fn added_latency(
    variant: &Measurement,
    direct: &Measurement,
    percentile: Percentile,
) -> Option<Spread> {
    Spread::of(&paired_differences(variant, direct, |s| {
        percentile.of_sample(s)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::model::{Scenario, Variant};

    fn measurement(samples: Vec<Sample>) -> Measurement {
        Measurement {
            scenario: Scenario::Http1Small,
            variant: Variant::Direct,
            samples,
        }
    }

    fn rps(v: f64) -> Sample {
        Sample {
            throughput_rps: v,
            ..Sample::default()
        }
    }

    fn p(p50: f64, p99: f64, p999: f64) -> Sample {
        Sample {
            latency: Some(Latency {
                target_rps: 1000.0,
                achieved_rps: 1000.0,
                p50_us: p50,
                p99_us: p99,
                p999_us: p999,
            }),
            ..Sample::default()
        }
    }

    #[test]
    fn median_odd_even_empty_and_non_finite() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, f64::INFINITY]), None);
        assert_eq!(
            median(&[f64::NAN, 5.0, f64::NEG_INFINITY, 1.0, 3.0]),
            Some(3.0)
        );
        assert_eq!(median(&[-1.0, 1.0]), Some(0.0));
    }

    #[test]
    fn spread_of_values() {
        let s = Spread::of(&[10.0, 30.0, f64::NAN, 20.0, 40.0]).unwrap();
        assert_eq!(
            s,
            Spread {
                median: 25.0,
                min: 10.0,
                max: 40.0,
                n: 4
            }
        );
        assert_eq!(Spread::of(&[]), None);
        let o = Spread::of(&[0.9, 0.95, 1.0])
            .unwrap()
            .map_decreasing(|r| 1.0 - r);
        assert!((o.median - 0.05).abs() < 1e-12);
        assert!(o.min.abs() < 1e-12 && (o.max - 0.1).abs() < 1e-12);
    }

    #[test]
    fn paired_ratio_skips_missing_and_non_positive_denominators() {
        let a = measurement(vec![
            Sample {
                cpu_s_per_1k: Some(1.0),
                ..rps(100.0)
            },
            Sample {
                cpu_s_per_1k: None,
                ..rps(120.0)
            },
            Sample {
                cpu_s_per_1k: Some(3.0),
                ..rps(90.0)
            },
            rps(1000.0), // no partner in b
        ]);
        let b = measurement(vec![
            Sample {
                cpu_s_per_1k: Some(2.0),
                ..rps(50.0)
            },
            Sample {
                cpu_s_per_1k: Some(2.0),
                ..rps(0.0)
            },
            Sample {
                cpu_s_per_1k: Some(4.0),
                ..rps(100.0)
            },
        ]);
        assert_eq!(paired_ratios(&a, &b, field::throughput), vec![2.0, 0.9]);
        assert_eq!(
            paired_ratio(&a, &b, field::cpu_s_per_1k),
            Some(Spread {
                median: 0.625,
                min: 0.5,
                max: 0.75,
                n: 2
            })
        );
        assert_eq!(
            paired_ratio(&a, &measurement(vec![]), field::throughput),
            None
        );
    }

    #[test]
    fn added_latency_per_percentile() {
        let direct = measurement(vec![
            p(100.0, 200.0, 400.0),
            p(110.0, 220.0, 500.0),
            rps(1.0),
        ]);
        let proxy = measurement(vec![
            p(150.0, 300.0, 900.0),
            p(150.0, 260.0, 600.0),
            p(1.0, 1.0, 1.0),
        ]);
        let p99 = added_latency(&proxy, &direct, Percentile::P99).unwrap();
        assert_eq!(
            p99,
            Spread {
                median: 70.0,
                min: 40.0,
                max: 100.0,
                n: 2
            }
        );
        assert_eq!(
            added_latency(&proxy, &direct, Percentile::P50)
                .unwrap()
                .median,
            45.0
        );
        assert_eq!(
            added_latency(&proxy, &direct, Percentile::P999)
                .unwrap()
                .median,
            300.0
        );
        assert_eq!(
            added_latency(&proxy, &measurement(vec![rps(1.0)]), Percentile::P99),
            None
        );
    }

    #[test]
    fn rss_field_converts_to_f64() {
        let m = measurement(vec![
            Sample {
                peak_rss_kib: Some(2048),
                ..Sample::default()
            },
            Sample::default(),
            Sample {
                peak_rss_kib: Some(1024),
                ..Sample::default()
            },
        ]);
        assert_eq!(values(&m, field::peak_rss_kib), vec![2048.0, 1024.0]);
        assert_eq!(spread(&m, field::peak_rss_kib).unwrap().median, 1536.0);
    }
}

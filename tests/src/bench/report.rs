//! The generated part of `docs/benchmarks.md` (tables from `## Results` down) and its SVG
//! plots, from a [`Results`] and its [`TargetResult`]s. Pure functions: the same input gives
//! the same bytes.
//!
//! Number formats: requests per second as integers grouped with commas (12,345), ratios with
//! two decimals and an `x` (1.42x), milliseconds with three decimals (0.123, microsecond
//! resolution, as measured), MiB and percentages with one decimal. A spread reads
//! `median [min-max]` (`[min to max]` when a bound is signed); `-` marks an absent value.

use std::fmt::Write as _;

use super::model::{Measurement, Results, Scenario, Variant};
use super::stats::{self, field, Percentile, Spread};
use super::targets::{self, Measured, TargetResult};

/// Formatting of numbers for tables, sentences and plots.
pub mod format {
    use super::Spread;

    /// `v` with `decimals` decimals, without the sign of a negative zero ("-0.000").
    pub fn fixed(v: f64, decimals: usize) -> String {
        let s = format!("{v:.decimals$}");
        match s.strip_prefix('-') {
            Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
            _ => s,
        }
    }

    /// Rounded to an integer, thousands grouped with commas ("12,345"); `-` if not finite.
    pub fn int(v: f64) -> String {
        if !v.is_finite() {
            return "-".into();
        }
        let digits = fixed(v.abs(), 0);
        let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if v < 0.0 && grouped.chars().any(|c| c != '0' && c != ',') {
            format!("-{grouped}")
        } else {
            grouped
        }
    }

    /// A ratio: two decimals and an `x` ("1.42x").
    pub fn ratio(v: f64) -> String {
        format!("{}x", fixed(v, 2))
    }

    /// Microseconds as milliseconds with three decimals ("0.123").
    pub fn ms(us: f64) -> String {
        fixed(us / 1000.0, 3)
    }

    /// Microseconds as signed milliseconds ("+0.120", "-0.010", "0.000").
    pub fn signed_ms(us: f64) -> String {
        let s = ms(us);
        if us > 0.0 && s.chars().any(|c| c != '0' && c != '.') {
            format!("+{s}")
        } else {
            s
        }
    }

    /// KiB as MiB with one decimal ("12.3").
    pub fn mib(kib: f64) -> String {
        fixed(kib / 1024.0, 1)
    }

    /// A fraction as a percentage with one decimal ("2.1%").
    pub fn percent(fraction: f64) -> String {
        format!("{}%", fixed(fraction * 100.0, 1))
    }

    /// Three significant digits ("0.0213", "1.23", "123", "1234").
    pub fn sig3(v: f64) -> String {
        if v == 0.0 || !v.is_finite() {
            return fixed(v, 0);
        }
        let magnitude = v.abs().log10().floor() as i64;
        fixed(v, (2 - magnitude).clamp(0, 9) as usize)
    }

    /// Three significant digits without trailing zeros ("10", "2.5", "0.25").
    pub fn short(v: f64) -> String {
        let s = sig3(v);
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }

    /// `lo-hi`, or `lo to hi` when a bound carries a sign.
    pub fn range(lo: &str, hi: &str) -> String {
        let signed = |s: &str| s.starts_with('-') || s.starts_with('+');
        if signed(lo) || signed(hi) {
            format!("{lo} to {hi}")
        } else {
            format!("{lo}-{hi}")
        }
    }

    /// `median [min-max]` formatted by `f`; the median alone for a single value.
    pub fn spread(s: &Spread, f: impl Fn(f64) -> String) -> String {
        if s.n <= 1 {
            f(s.median)
        } else {
            format!("{} [{}]", f(s.median), range(&f(s.min), &f(s.max)))
        }
    }
}

/// Text for a markdown table cell: no pipe, no line break.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// Text for inline code in markdown: no backtick, no line break.
fn code(s: &str) -> String {
    format!("`{}`", s.replace('`', "'").replace(['\n', '\r'], " "))
}

/// The value of an optional spread formatted by `f`, or `-`.
fn opt(s: Option<Spread>, f: impl Fn(&Spread) -> String) -> String {
    s.as_ref().map_or_else(|| "-".to_string(), f)
}

/// The generated part of `docs/benchmarks.md`, from the level-2 heading `## Results` down:
/// the run, the targets, one table per measured scenario, the observation overhead, the span
/// export rate and the `plots` (file name under `benchmarks/`, alternative text).
pub fn render_markdown(
    results: &Results,
    targets: &[TargetResult],
    plots: &[(&str, &str)],
) -> String {
    let mut md = String::new();
    md.push_str("## Results\n\n");
    run_line(&mut md, results);
    targets_table(&mut md, results, targets);
    for scenario in Scenario::ALL {
        scenario_table(&mut md, results, scenario);
    }
    observation_table(&mut md, results);
    span_table(&mut md, results);
    if !plots.is_empty() {
        md.push_str("### Plots\n\n");
        for (file, alt) in plots {
            let alt = alt.replace([']', '['], "");
            let _ = writeln!(md, "![{alt}](benchmarks/{file})\n");
        }
    }
    while md.ends_with("\n\n") {
        md.pop();
    }
    md
}

/// The run: where, what, how long.
fn run_line(md: &mut String, results: &Results) {
    let i = &results.info;
    let generators = if i.load_generators.is_empty() {
        "-".to_string()
    } else {
        i.load_generators
            .iter()
            .map(|g| code(g))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        md,
        "Run started {}, kernel {}, {} x {} CPUs, revision {}, Envoy {}, load generators {}. \
         {} repetitions of each variant, interleaved; throughput runs of {} s and fixed-rate \
         latency runs of {} s with {} connections; {} worker thread{} per proxy.\n",
        code(&i.started),
        code(&i.kernel),
        cell(&i.cpu),
        i.cpus,
        code(&i.revision),
        code(&i.envoy_version),
        generators,
        i.repetitions,
        format::short(i.throughput_secs),
        format::short(i.latency_secs),
        i.connections,
        i.proxy_workers,
        if i.proxy_workers == 1 { "" } else { "s" },
    );
    if i.smoke {
        md.push_str(
            "> **Smoke run:** tiny durations and one repetition, to prove the harness works. \
             The numbers below mean nothing and the targets are not checked.\n\n",
        );
    }
}

/// The targets table and the sentences of the failed ones.
fn targets_table(md: &mut String, results: &Results, targets: &[TargetResult]) {
    md.push_str("### Targets\n\n");
    md.push_str("| Target | What | Scenario | Measured | Threshold | Result |\n");
    md.push_str("|---|---|---|---|---|---|\n");
    let mut previous = None;
    for r in targets {
        let t = r.target;
        // The description once per target, on its first row.
        let what = if previous == Some(t) {
            ""
        } else {
            t.description()
        };
        previous = Some(t);
        let measured = match &r.measured {
            None => "-".to_string(),
            Some(Measured::Value(v)) => t.format_value(*v),
            Some(Measured::Spread(s)) => {
                format!("{}, n={}", format::spread(s, |v| t.format_value(v)), s.n)
            }
        };
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {} | {} |",
            t.id(),
            cell(what),
            r.scenario.map_or("-", Scenario::as_str),
            cell(&measured),
            cell(&t.threshold_text()),
            if r.pass { "PASS" } else { "**FAIL**" }
        );
    }
    md.push('\n');
    let failed = targets::failures(targets);
    if targets.is_empty() {
        md.push_str("No target evaluated.\n\n");
    } else if failed.is_empty() {
        let _ = writeln!(md, "All {} checks pass.\n", targets.len());
    } else {
        let _ = writeln!(
            md,
            "{} of {} checks fail{}:\n",
            failed.len(),
            targets.len(),
            if results.info.smoke {
                " (a smoke run: not checked)"
            } else {
                ""
            }
        );
        for r in failed {
            let _ = writeln!(md, "- {}", r.sentence.replace(['\n', '\r'], " "));
        }
        md.push('\n');
    }
}

/// The fixed request rates of the latency runs of `scenario`, for the table's caption.
fn latency_rates(results: &Results, scenario: Scenario) -> Vec<String> {
    let mut rates: Vec<String> = Vec::new();
    for m in results
        .measurements
        .iter()
        .filter(|m| m.scenario == scenario)
    {
        for l in m.samples.iter().filter_map(|s| s.latency.as_ref()) {
            let r = format::int(l.target_rps);
            if !rates.contains(&r) {
                rates.push(r);
            }
        }
    }
    rates
}

/// One row per variant measured on `scenario`.
fn scenario_table(md: &mut String, results: &Results, scenario: Scenario) {
    let measured: Vec<&Measurement> = Variant::ALL
        .iter()
        .filter_map(|v| results.get(scenario, *v))
        .collect();
    if measured.is_empty() {
        return;
    }
    let direct = results.get(scenario, Variant::Direct);
    let envoy = results.get(scenario, Variant::Envoy);
    let _ = writeln!(md, "### {}\n", scenario.as_str());
    let rates = latency_rates(results, scenario);
    let latency = if rates.is_empty() {
        "No fixed-rate latency run.".to_string()
    } else {
        format!("Latency at a fixed {} req/s.", rates.join(" / "))
    };
    let describe = scenario.describe();
    let mut chars = describe.chars();
    let describe: String = chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default();
    let _ = writeln!(md, "{describe}. {latency}\n");
    md.push_str(
        "| Variant | Throughput vs direct | Throughput (req/s) | p50 (ms) | p99 (ms) | \
         p99.9 (ms) | Added p99 vs direct (ms) | CPU vs envoy | CPU (s/1000 req) | \
         Peak RSS vs envoy | Peak RSS (MiB) |\n",
    );
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for m in measured {
        let v = m.variant;
        let vs_direct = match direct {
            _ if v == Variant::Direct => "baseline".to_string(),
            Some(d) => opt(stats::paired_ratio(m, d, field::throughput), |s| {
                format::spread(s, format::ratio)
            }),
            None => "-".into(),
        };
        let throughput = opt(stats::spread(m, field::throughput), |s| {
            format::spread(s, format::int)
        });
        let pct = |p: Percentile| {
            opt(stats::spread(m, |s| p.of_sample(s)), |s| {
                format::ms(s.median)
            })
        };
        let added = match direct {
            _ if v == Variant::Direct => "baseline".to_string(),
            Some(d) => opt(stats::added_latency(m, d, Percentile::P99), |s| {
                format::spread(s, format::signed_ms)
            }),
            None => "-".into(),
        };
        let (cpu_vs, rss_vs) = match envoy {
            _ if !v.has_proxy() => ("-".to_string(), "-".to_string()),
            _ if v == Variant::Envoy => ("baseline".to_string(), "baseline".to_string()),
            Some(e) => (
                opt(stats::paired_ratio(m, e, field::cpu_s_per_1k), |s| {
                    format::ratio(s.median)
                }),
                rss_ratio(m, e).map_or_else(|| "-".to_string(), format::ratio),
            ),
            None => ("-".into(), "-".into()),
        };
        let cpu = opt(stats::spread(m, field::cpu_s_per_1k), |s| {
            format::sig3(s.median)
        });
        let rss = opt(stats::spread(m, field::peak_rss_kib), |s| {
            format::mib(s.median)
        });
        let _ = writeln!(
            md,
            "| {} | {vs_direct} | {throughput} | {} | {} | {} | {added} | {cpu_vs} | {cpu} | \
             {rss_vs} | {rss} |",
            v.as_str(),
            pct(Percentile::P50),
            pct(Percentile::P99),
            pct(Percentile::P999),
        );
    }
    md.push('\n');
}

/// Median peak RSS of `m` over the median of `base`.
fn rss_ratio(m: &Measurement, base: &Measurement) -> Option<f64> {
    let a = stats::median(&stats::values(m, field::peak_rss_kib))?;
    let b = stats::median(&stats::values(base, field::peak_rss_kib))?;
    (b > 0.0).then(|| a / b)
}

/// Direct against direct-observed throughput, per scenario of [`Results::observation`].
fn observation_table(md: &mut String, results: &Results) {
    let find = |s: Scenario, v: Variant| {
        results
            .observation
            .iter()
            .find(|m| m.scenario == s && m.variant == v)
    };
    let rows: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| results.observation.iter().any(|m| m.scenario == *s))
        .collect();
    if rows.is_empty() {
        return;
    }
    md.push_str("### Kernel observation overhead\n\n");
    md.push_str(
        "The direct path with and without the sidecar's observation programs attached to the \
         client's cgroup (no proxy); overhead = 1 - paired throughput ratio.\n\n",
    );
    md.push_str(
        "| Scenario | direct (req/s) | direct-observed (req/s) | Overhead | Repetitions |\n",
    );
    md.push_str("|---|---|---|---|---|\n");
    for s in rows {
        let (d, o) = (find(s, Variant::Direct), find(s, Variant::DirectObserved));
        let tput = |m: Option<&Measurement>| {
            opt(m.and_then(|m| stats::spread(m, field::throughput)), |s| {
                format::spread(s, format::int)
            })
        };
        let overhead = match (d, o) {
            (Some(d), Some(o)) => {
                stats::paired_ratio(o, d, field::throughput).map(|r| r.map_decreasing(|x| 1.0 - x))
            }
            _ => None,
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            s.as_str(),
            tput(d),
            tput(o),
            opt(overhead, |s| format::spread(s, format::percent)),
            overhead.map_or_else(|| "-".to_string(), |s| s.n.to_string()),
        );
    }
    md.push('\n');
}

/// The steps of the span export benchmark and its highest lossless rate.
fn span_table(md: &mut String, results: &Results) {
    let Some(spans) = &results.spans else {
        return;
    };
    md.push_str("### Span export rate\n\n");
    md.push_str(
        "Spans offered to the sidecar's exporter, sent over OTLP gRPC to an in-process \
         receiver; a step is lossless when nothing was dropped and every span produced was \
         received.\n\n",
    );
    md.push_str(
        "| Step | Offered (spans/s) | Produced (spans/s) | Produced | Received | Dropped | \
         Lossless |\n",
    );
    md.push_str("|---|---|---|---|---|---|---|\n");
    for (i, s) in spans.steps.iter().enumerate() {
        let lossless = s.dropped == 0 && s.received == s.produced;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            format::int(s.offered_per_s),
            format::int(s.produced_per_s),
            format::int(s.produced as f64),
            format::int(s.received as f64),
            format::int(s.dropped as f64),
            if lossless { "yes" } else { "no" }
        );
    }
    let _ = writeln!(
        md,
        "\nHighest lossless rate: **{} spans/s**.\n",
        format::int(spans.max_lossless_per_s)
    );
}

// ---------------------------------------------------------------------------------------------
// SVG plots

/// Width of every plot, in pixels.
const WIDTH: f64 = 800.0;
/// Height of one chart panel, in pixels.
const PANEL_HEIGHT: f64 = 360.0;

/// The plots of a run: `throughput.svg` (throughput ratio to direct), `latency-p99.svg`
/// (added p99 latency vs direct) and `cpu-rss.svg` (CPU per 1000 requests and peak RSS of each
/// proxy), as (file name, SVG 1.1 text).
pub fn render_svgs(results: &Results) -> Vec<(String, String)> {
    vec![
        (
            "throughput.svg".to_string(),
            document(PANEL_HEIGHT, &[throughput_chart(results)]),
        ),
        (
            "latency-p99.svg".to_string(),
            document(PANEL_HEIGHT, &[latency_chart(results)]),
        ),
        (
            "cpu-rss.svg".to_string(),
            document(
                PANEL_HEIGHT * 2.0,
                &[cpu_chart(results), rss_chart(results)],
            ),
        ),
    ]
}

/// One bar: its value and the whisker's bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Bar {
    value: f64,
    low: f64,
    high: f64,
}

impl Bar {
    /// The median of `s` with its range as whisker, each multiplied by `scale` (> 0).
    fn scaled(s: Spread, scale: f64) -> Bar {
        Bar {
            value: s.median * scale,
            low: s.min * scale,
            high: s.max * scale,
        }
    }
}

/// A grouped bar chart: one group per scenario, one bar per variant.
struct Chart {
    title: String,
    y_label: String,
    groups: Vec<Scenario>,
    series: Vec<Variant>,
    /// `bars[group][series]`.
    bars: Vec<Vec<Option<Bar>>>,
    /// A horizontal reference line and its legend text.
    reference: Option<(f64, &'static str)>,
    /// The value label of a bar.
    label: fn(f64) -> String,
}

impl Chart {
    /// A chart of `groups` x `series` with `bar` computing each bar.
    fn build(
        title: &str,
        y_label: &str,
        groups: Vec<Scenario>,
        series: Vec<Variant>,
        label: fn(f64) -> String,
        bar: impl Fn(Scenario, Variant) -> Option<Bar>,
    ) -> Chart {
        let bars = groups
            .iter()
            .map(|g| series.iter().map(|v| bar(*g, *v)).collect())
            .collect();
        Chart {
            title: title.to_string(),
            y_label: y_label.to_string(),
            groups,
            series,
            bars,
            reference: None,
            label,
        }
    }
}

/// The colour of a variant (Okabe-Ito palette, distinguishable with colour blindness).
fn colour(v: Variant) -> &'static str {
    match v {
        Variant::Direct => "#999999",
        Variant::DirectObserved => "#E69F00",
        Variant::SidecarEbpf => "#0072B2",
        Variant::SidecarIptables => "#56B4E9",
        Variant::Envoy => "#D55E00",
    }
}

/// Scenarios with at least one measurement, in report order.
fn scenarios(results: &Results) -> Vec<Scenario> {
    Scenario::ALL
        .into_iter()
        .filter(|s| results.measurements.iter().any(|m| m.scenario == *s))
        .collect()
}

/// Variants of `wanted` with at least one measurement, in report order.
fn variants(results: &Results, wanted: impl Fn(Variant) -> bool) -> Vec<Variant> {
    Variant::ALL
        .into_iter()
        .filter(|v| wanted(*v) && results.measurements.iter().any(|m| m.variant == *v))
        .collect()
}

/// Throughput of each variant as a paired ratio to direct.
fn throughput_chart(results: &Results) -> Chart {
    let mut chart = Chart::build(
        "Throughput relative to the direct path (median, whiskers min-max)",
        "throughput / direct",
        scenarios(results),
        variants(results, |v| v != Variant::Direct),
        |v| format::fixed(v, 2),
        |s, v| {
            let m = results.get(s, v)?;
            let d = results.get(s, Variant::Direct)?;
            stats::paired_ratio(m, d, field::throughput).map(|s| Bar::scaled(s, 1.0))
        },
    );
    chart.reference = Some((1.0, "direct = 1.0"));
    chart
}

/// Added p99 latency vs direct of each proxy.
fn latency_chart(results: &Results) -> Chart {
    let groups = scenarios(results)
        .into_iter()
        .filter(|s| {
            results
                .measurements
                .iter()
                .any(|m| m.scenario == *s && m.samples.iter().any(|x| x.latency.is_some()))
        })
        .collect();
    Chart::build(
        "Added p99 latency vs the direct path (median, whiskers min-max)",
        "added p99 latency (ms)",
        groups,
        variants(results, Variant::has_proxy),
        format::sig3,
        |s, v| {
            let m = results.get(s, v)?;
            let d = results.get(s, Variant::Direct)?;
            stats::added_latency(m, d, Percentile::P99).map(|s| Bar::scaled(s, 1e-3))
        },
    )
}

/// CPU seconds per 1000 requests of each proxy.
fn cpu_chart(results: &Results) -> Chart {
    Chart::build(
        "Proxy CPU per 1000 requests (median, whiskers min-max)",
        "CPU seconds / 1000 requests",
        scenarios(results),
        variants(results, Variant::has_proxy),
        format::sig3,
        |s, v| {
            let m = results.get(s, v)?;
            stats::spread(m, field::cpu_s_per_1k).map(|s| Bar::scaled(s, 1.0))
        },
    )
}

/// Peak RSS of each proxy, in MiB.
fn rss_chart(results: &Results) -> Chart {
    Chart::build(
        "Proxy peak RSS (median, whiskers min-max)",
        "peak RSS (MiB)",
        scenarios(results),
        variants(results, Variant::has_proxy),
        |mib| format::fixed(mib, 1),
        |s, v| {
            let m = results.get(s, v)?;
            stats::spread(m, field::peak_rss_kib).map(|s| Bar::scaled(s, 1.0 / 1024.0))
        },
    )
}

/// A coordinate with one decimal.
fn px(v: f64) -> String {
    format::fixed(v, 1)
}

/// Text escaped for XML character data and attribute values.
fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A standalone SVG 1.1 document of `charts` stacked vertically.
fn document(height: f64, charts: &[Chart]) -> String {
    let mut svg = String::new();
    let title = charts
        .iter()
        .map(|c| c.title.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    let _ = writeln!(svg, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"{w}\" \
         height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">",
        w = px(WIDTH),
        h = px(height)
    );
    let _ = writeln!(svg, "<title>{}</title>", xml(&title));
    let _ = writeln!(
        svg,
        "<path d=\"M0 0H{w}V{h}H0Z\" fill=\"#ffffff\"/>",
        w = px(WIDTH),
        h = px(height)
    );
    let panel = height / charts.len().max(1) as f64;
    for (i, chart) in charts.iter().enumerate() {
        panel_svg(&mut svg, chart, panel * i as f64, panel);
    }
    svg.push_str("</svg>\n");
    svg
}

/// The y axis: (lowest, highest, step) of round tick values covering `lo..=hi` and zero.
fn axis(lo: f64, hi: f64) -> (f64, f64, f64) {
    let (mut lo, mut hi) = (lo.min(0.0), hi.max(0.0));
    if hi - lo <= f64::EPSILON || !(hi - lo).is_finite() {
        hi = lo + 1.0;
    }
    // Room for the value labels.
    let pad = (hi - lo) * 0.08;
    if hi > 0.0 {
        hi += pad;
    }
    if lo < 0.0 {
        lo -= pad;
    }
    let raw = (hi - lo) / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    ((lo / step).floor() * step, (hi / step).ceil() * step, step)
}

/// Decimals needed to print multiples of `step` exactly (at most 6).
fn step_decimals(step: f64) -> usize {
    (0..=6usize)
        .find(|d| {
            let scaled = step * 10f64.powi(*d as i32);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.abs().max(1.0)
        })
        .unwrap_or(6)
}

/// One chart in the band `top..top + height` of the document.
fn panel_svg(svg: &mut String, chart: &Chart, top: f64, height: f64) {
    let (left, right) = (80.0, WIDTH - 20.0);
    let (plot_top, plot_bottom) = (top + 66.0, top + height - 52.0);
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"16\" \
         font-weight=\"bold\">{}</text>",
        px(WIDTH / 2.0),
        px(top + 24.0),
        xml(&chart.title)
    );

    // Legend: a dot per series, then the reference line.
    let mut x = left;
    let legend_y = top + 46.0;
    for v in &chart.series {
        let _ = writeln!(
            svg,
            "<circle cx=\"{}\" cy=\"{}\" r=\"5\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            px(x + 5.0),
            px(legend_y - 4.0),
            colour(*v),
            px(x + 14.0),
            px(legend_y),
            v.as_str()
        );
        x += 14.0 + 7.0 * v.as_str().len() as f64 + 18.0;
    }
    if let Some((_, text)) = chart.reference {
        let _ = writeln!(
            svg,
            "<path d=\"M{} {}h20\" stroke=\"#333333\" stroke-dasharray=\"6 4\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            px(x),
            px(legend_y - 4.0),
            px(x + 26.0),
            px(legend_y),
            xml(text)
        );
    }

    // Y axis, grid and its label.
    let bars = chart.bars.iter().flatten().flatten();
    let mut lo = bars.clone().map(|b| b.low.min(b.value)).fold(0.0, f64::min);
    let mut hi = bars.map(|b| b.high.max(b.value)).fold(0.0, f64::max);
    if let Some((r, _)) = chart.reference {
        lo = lo.min(r);
        hi = hi.max(r);
    }
    let (lo, hi, step) = axis(lo, hi);
    let y = |v: f64| plot_bottom - (v - lo) / (hi - lo) * (plot_bottom - plot_top);
    let decimals = step_decimals(step);
    let ticks = (((hi - lo) / step).round() as usize).min(20);
    for i in 0..=ticks {
        let v = lo + step * i as f64;
        let _ = writeln!(
            svg,
            "<path d=\"M{l} {y}H{r}\" stroke=\"#e0e0e0\"/>\
             <text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\" font-size=\"11\">{t}</text>",
            l = px(left),
            r = px(right),
            y = px(y(v)),
            tx = px(left - 6.0),
            ty = px(y(v) + 4.0),
            t = format::fixed(v, decimals)
        );
    }
    let mid = (plot_top + plot_bottom) / 2.0;
    let _ = writeln!(
        svg,
        "<text x=\"18\" y=\"{m}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {m})\">{}\
         </text>",
        xml(&chart.y_label),
        m = px(mid)
    );
    let _ = writeln!(
        svg,
        "<path d=\"M{l} {t}V{b}M{l} {z}H{r}\" stroke=\"#333333\"/>",
        l = px(left),
        t = px(plot_top),
        b = px(plot_bottom),
        z = px(y(0.0)),
        r = px(right)
    );
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">scenario</text>",
        px((left + right) / 2.0),
        px(plot_bottom + 40.0)
    );

    if chart.groups.is_empty() || chart.series.is_empty() {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#777777\">no data</text>",
            px((left + right) / 2.0),
            px(mid)
        );
        return;
    }

    // Groups and bars.
    let group_width = (right - left) / chart.groups.len() as f64;
    let bar_slot = group_width * 0.8 / chart.series.len() as f64;
    for (g, scenario) in chart.groups.iter().enumerate() {
        let gx = left + group_width * g as f64;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            px(gx + group_width / 2.0),
            px(plot_bottom + 18.0),
            scenario.as_str()
        );
        for (s, variant) in chart.series.iter().enumerate() {
            let bx = gx + group_width * 0.1 + bar_slot * s as f64;
            let cx = bx + bar_slot / 2.0;
            let Some(bar) = chart
                .bars
                .get(g)
                .and_then(|row| row.get(s))
                .copied()
                .flatten()
            else {
                let _ = writeln!(
                    svg,
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"9\" \
                     fill=\"#777777\">n/a</text>",
                    px(cx),
                    px(y(0.0) - 4.0)
                );
                continue;
            };
            let (y_top, y_bottom) = (y(bar.value.max(0.0)), y(bar.value.min(0.0)));
            let _ = writeln!(
                svg,
                "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\">\
                 <title>{} {}: {}</title></rect>",
                px(bx + bar_slot * 0.1),
                px(y_top),
                px(bar_slot * 0.8),
                px(y_bottom - y_top),
                colour(*variant),
                scenario.as_str(),
                variant.as_str(),
                xml(&(chart.label)(bar.value))
            );
            if bar.high > bar.low {
                let _ = writeln!(
                    svg,
                    "<path d=\"M{cx} {lo}V{hi}M{a} {lo}h6M{a} {hi}h6\" stroke=\"#222222\"/>",
                    cx = px(cx),
                    a = px(cx - 3.0),
                    lo = px(y(bar.low)),
                    hi = px(y(bar.high))
                );
            }
            let label_y = if bar.value >= 0.0 {
                y(bar.value).min(y(bar.high)) - 4.0
            } else {
                y(bar.value).max(y(bar.low)) + 12.0
            };
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"9\">{}</text>",
                px(cx),
                px(label_y),
                xml(&(chart.label)(bar.value))
            );
        }
    }

    if let Some((r, _)) = chart.reference {
        let _ = writeln!(
            svg,
            "<path d=\"M{} {y}H{}\" stroke=\"#333333\" stroke-dasharray=\"6 4\"/>",
            px(left),
            px(right),
            y = px(y(r))
        );
    }
}

#[cfg(test)]
#[path = "report_synthetic.rs"]
pub(crate) mod synthetic;

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;

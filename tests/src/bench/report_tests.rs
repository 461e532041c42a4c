//! Unit tests of the markdown report and the SVG plots on the synthetic run of
//! `report_synthetic.rs`.

use super::*;
use crate::bench::model::{Results, Scenario, Variant};
use crate::bench::report::synthetic::{self, get_mut};
use crate::bench::targets::evaluate;

const PLOTS: [(&str, &str); 3] = [
    ("throughput.svg", "Throughput relative to direct"),
    ("latency-p99.svg", "Added p99 latency"),
    ("cpu-rss.svg", "CPU and RSS"),
];

fn markdown(r: &Results) -> String {
    render_markdown(r, &evaluate(r), &PLOTS)
}

/// The table rows (lines starting with `|`) of the section under `### heading`.
fn section_rows<'a>(md: &'a str, heading: &str) -> Vec<&'a str> {
    let start = md
        .find(&format!("\n### {heading}\n"))
        .unwrap_or_else(|| panic!("no section {heading}:\n{md}"));
    md[start + 1..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("### "))
        .filter(|l| l.starts_with('|'))
        .collect()
}

/// The cells of a table row.
fn cells(row: &str) -> Vec<&str> {
    row.trim_matches('|').split(" | ").map(str::trim).collect()
}

#[test]
fn number_formats() {
    assert_eq!(format::int(12_345.4), "12,345");
    assert_eq!(format::int(999.5), "1,000");
    assert_eq!(format::int(1_234_567.0), "1,234,567");
    assert_eq!(format::int(-1_234.0), "-1,234");
    assert_eq!(format::int(-0.2), "0");
    assert_eq!(format::int(f64::NAN), "-");
    assert_eq!(format::ratio(1.4249), "1.42x");
    assert_eq!(format::ms(123.4), "0.123");
    assert_eq!(format::signed_ms(120.0), "+0.120");
    assert_eq!(format::signed_ms(-10.0), "-0.010");
    assert_eq!(format::signed_ms(0.2), "0.000");
    assert_eq!(format::signed_ms(-0.2), "0.000");
    assert_eq!(format::mib(11_264.0), "11.0");
    assert_eq!(format::percent(0.0212), "2.1%");
    assert_eq!(format::sig3(0.02134), "0.0213");
    assert_eq!(format::sig3(12.345), "12.3");
    assert_eq!(format::sig3(1234.0), "1234");
    assert_eq!(format::range("1.37x", "1.48x"), "1.37x-1.48x");
    assert_eq!(format::range("-0.010", "+0.020"), "-0.010 to +0.020");
}

#[test]
fn markdown_has_the_run_the_targets_and_every_scenario_table() {
    let r = synthetic::results();
    let md = markdown(&r);
    assert!(md.starts_with("## Results\n\n"), "{md}");
    assert!(!md.contains("\n## "), "only one level-2 heading");
    for needle in [
        "`6.18.0-test`",
        "Test CPU @ 2.0GHz x 2 CPUs",
        "`abc1234-dirty`",
        "`envoy version: 1.40.0/Clean/RELEASE/BoringSSL`",
        "`wrk 4.2.0`, `h2load nghttp2/1.64.0`",
        "3 repetitions",
        "throughput runs of 10 s",
        "32 connections",
        "1 worker thread per proxy",
    ] {
        assert!(md.contains(needle), "missing {needle:?} in:\n{md}");
    }
    assert!(!md.contains("Smoke run"));

    // Targets: a header, a separator and one row per result, all passing.
    let rows = section_rows(&md, "Targets");
    let results = evaluate(&r);
    assert_eq!(rows.len(), 2 + results.len());
    assert!(
        rows[2..].iter().all(|r| r.ends_with("| PASS |")),
        "{rows:#?}"
    );
    assert!(rows.contains(
        &"| `throughput` | sidecar-ebpf throughput / envoy throughput (median paired) | \
          http1-1k | 1.50x [1.35x-1.65x], n=3 | >= 1.30x | PASS |"
    ));
    // The description on the first row of a target only.
    assert!(rows
        .contains(&"| `throughput` |  | http1-64k | 1.50x [1.35x-1.65x], n=3 | >= 1.30x | PASS |"));
    assert!(rows
        .iter()
        .any(|r| r.starts_with("| `observation-overhead` |")
            && r.contains("| http1-1k | 1.0% [0.5%-2.0%], n=3 | <= 3.0% | PASS |")));
    assert!(rows
        .iter()
        .any(|r| r.contains("| - | 25,000 spans/s | >= 20,000 spans/s | PASS |")));
    assert!(md.contains(&format!("All {} checks pass.", results.len())));

    // One table per scenario, in order, with one row per variant in order.
    let mut last = 0;
    for s in Scenario::ALL {
        let at = md
            .find(&format!("\n### {}\n", s.as_str()))
            .unwrap_or_else(|| panic!("no table for {}", s.as_str()));
        assert!(at > last, "scenario order");
        last = at;
        let rows = section_rows(&md, s.as_str());
        assert_eq!(rows.len(), 2 + Variant::ALL.len(), "{rows:#?}");
        let names: Vec<&str> = rows[2..].iter().map(|r| cells(r)[0]).collect();
        let expected: Vec<&str> = Variant::ALL.iter().map(|v| v.as_str()).collect();
        assert_eq!(names, expected);
        assert!(rows[2..].iter().all(|r| cells(r).len() == 11), "{rows:#?}");
    }

    // http1-1k, hand-computed: direct 40,000 [36,000-44,000]; sidecar-ebpf 0.9x direct, added
    // p99 +0.100 ms [+0.080 to +0.120], CPU 0.020 s, 0.40x envoy, RSS 11.0 MiB, 0.28x envoy.
    let rows = section_rows(&md, "http1-1k");
    assert_eq!(
        cells(rows[2]),
        [
            "direct",
            "baseline",
            "40,000 [36,000-44,000]",
            "0.300",
            "1.000",
            "2.000",
            "baseline",
            "-",
            "-",
            "-",
            "-"
        ]
    );
    assert_eq!(
        cells(rows[4]),
        [
            "sidecar-ebpf",
            "0.90x [0.90x-0.90x]",
            "36,000 [32,400-39,600]",
            "0.400",
            "1.100",
            "2.100",
            "+0.100 [+0.080 to +0.120]",
            "0.40x",
            "0.0200",
            "0.28x",
            "11.0"
        ]
    );
    assert_eq!(
        cells(rows[6]),
        [
            "envoy",
            "0.60x [0.55x-0.67x]",
            "24,000 [24,000-24,000]",
            "0.700",
            "1.400",
            "2.400",
            "+0.400 [+0.300 to +0.500]",
            "baseline",
            "0.0500",
            "baseline",
            "40.0"
        ]
    );
    assert!(md.contains("Latency at a fixed 10,000 req/s."));
    let conn = section_rows(&md, "conn-rate");
    assert_eq!(cells(conn[4])[3], "-", "no latency on conn-rate");
    assert!(md.contains(
        "\nOne HTTP/1.1 request per new connection (wrk, Connection: close). No fixed-rate \
         latency run.\n"
    ));

    // Observation and spans.
    let obs = section_rows(&md, "Kernel observation overhead");
    assert_eq!(
        cells(obs[2]),
        [
            "http1-1k",
            "50,000 [49,000-51,000]",
            "49,500 [48,020-50,745]",
            "1.0% [0.5%-2.0%]",
            "3"
        ]
    );
    let spans = section_rows(&md, "Span export rate");
    assert_eq!(spans.len(), 2 + 4);
    assert_eq!(
        spans[5],
        "| 4 | 30,000 | 30,000 | 150,000 | 149,900 | 100 | no |"
    );
    assert!(spans[4].ends_with("| yes |"));
    assert!(md.contains("Highest lossless rate: **25,000 spans/s**."));

    // Plots, as images under benchmarks/.
    for (file, alt) in PLOTS {
        assert!(md.contains(&format!("![{alt}](benchmarks/{file})")));
    }
    assert!(md.ends_with(")\n"), "ends with one newline");
}

#[test]
fn markdown_lists_failures_and_marks_absent_values() {
    let mut r = synthetic::results();
    r.measurements
        .retain(|m| !(m.scenario == Scenario::Grpc && m.variant == Variant::Envoy));
    get_mut(&mut r, Scenario::Http2, Variant::SidecarEbpf).samples[0].errors = 2;
    r.spans = None;
    r.info.smoke = true;
    let md = markdown(&r);
    assert!(md.contains("> **Smoke run:**"));
    let rows = section_rows(&md, "Targets");
    assert!(rows.contains(&"| `throughput` |  | grpc | - | >= 1.30x | **FAIL** |"));
    assert!(
        md.contains("6 of 21 checks fail (a smoke run: not checked):"),
        "{md}"
    );
    assert!(md.contains("\n- sidecar-ebpf/envoy throughput on grpc: envoy not measured on grpc\n"));
    assert!(md.contains("\n- span-rate: the span-rate benchmark was not run\n"));
    assert!(md.contains("http2/sidecar-ebpf rep 1 (2 errors)"));
    assert!(!md.contains("### Span export rate"));

    // grpc without envoy: no envoy row, and the ratios to envoy are absent.
    let grpc = section_rows(&md, "grpc");
    assert_eq!(grpc.len(), 2 + 4);
    let ebpf = cells(grpc[4]);
    assert_eq!((ebpf[0], ebpf[7], ebpf[9]), ("sidecar-ebpf", "-", "-"));
    assert!(ebpf[8] != "-" && ebpf[10] != "-");
}

#[test]
fn an_empty_run_renders() {
    let r = Results::default();
    let md = render_markdown(&r, &evaluate(&r), &[]);
    assert!(md.starts_with("## Results\n"));
    assert!(!md.contains("### http1-1k") && !md.contains("### Plots"));
    for (name, svg) in render_svgs(&r) {
        well_formed(&svg).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(svg.matches("<rect").count(), 0);
        assert!(svg.contains(">no data</text>"));
    }
}

/// Checks that `xml` is one well-formed element tree: every tag closed in order, quoted
/// attributes, no stray `<` or `&` in text. (No XML parser in the dependencies; this is the
/// subset the renderer writes.)
fn well_formed(xml: &str) -> Result<(), String> {
    let mut rest = xml
        .strip_prefix("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n")
        .ok_or("no XML declaration")?;
    let mut stack: Vec<&str> = Vec::new();
    let mut roots = 0;
    while !rest.is_empty() {
        let lt = rest.find('<').unwrap_or(rest.len());
        check_text(&rest[..lt])?;
        if stack.is_empty() && !rest[..lt].trim().is_empty() {
            return Err(format!("text outside the root: {:?}", &rest[..lt]));
        }
        rest = &rest[lt..];
        if rest.is_empty() {
            break;
        }
        let gt = tag_end(rest).ok_or_else(|| format!("unclosed tag at {:.40}", rest))?;
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            match stack.pop() {
                Some(open) if open == name => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let body = tag.trim_end_matches('/');
        let name_len = body.find(|c: char| c.is_whitespace()).unwrap_or(body.len());
        let (name, attrs) = body.split_at(name_len);
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!("bad tag name in <{tag}>"));
        }
        check_attributes(attrs).map_err(|e| format!("<{tag}>: {e}"))?;
        if stack.is_empty() {
            roots += 1;
        }
        if !self_closing {
            stack.push(name);
        }
    }
    match (stack.is_empty(), roots) {
        (true, 1) => Ok(()),
        (false, _) => Err(format!("unclosed elements {stack:?}")),
        (true, n) => Err(format!("{n} root elements")),
    }
}

/// The index of the `>` ending the tag at the start of `s`, outside quoted values.
fn tag_end(s: &str) -> Option<usize> {
    let mut quoted = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => return None,
            '>' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// Attributes: `name="value"` pairs with escaped values.
fn check_attributes(mut s: &str) -> Result<(), String> {
    loop {
        s = s.trim_start();
        if s.is_empty() {
            return Ok(());
        }
        let eq = s
            .find("=\"")
            .ok_or_else(|| format!("attribute without =\": {s}"))?;
        let name = &s[..eq];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!("bad attribute name {name:?}"));
        }
        let value_end = s[eq + 2..].find('"').ok_or("unterminated value")?;
        check_text(&s[eq + 2..eq + 2 + value_end])?;
        s = &s[eq + 2 + value_end + 1..];
        if !s.is_empty() && !s.starts_with(char::is_whitespace) {
            return Err(format!("no space after attribute {name}"));
        }
    }
}

/// Character data: no `<`, and every `&` starts a known entity.
fn check_text(s: &str) -> Result<(), String> {
    if s.contains('<') {
        return Err(format!("'<' in text {s:?}"));
    }
    for (i, _) in s.match_indices('&') {
        let known = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"];
        if !known.iter().any(|e| s[i..].starts_with(e)) {
            return Err(format!("bare '&' in {s:?}"));
        }
    }
    Ok(())
}

#[test]
fn the_well_formedness_check_rejects_broken_xml() {
    let decl = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
    assert!(well_formed(&format!(
        "{decl}<svg a=\"1\"><g/><text>x &amp; y</text></svg>\n"
    ))
    .is_ok());
    for bad in [
        "<svg><g></svg>",
        "<svg><g/>",
        "<svg a=1></svg>",
        "<svg><text>a < b</text></svg>",
        "<svg><text>a & b</text></svg>",
        "<svg></svg><svg></svg>",
        "<svg></g></svg>",
    ] {
        assert!(well_formed(&format!("{decl}{bad}")).is_err(), "{bad}");
    }
}

#[test]
fn svgs_are_well_formed_with_one_rect_per_bar_and_deterministic() {
    let r = synthetic::results();
    let svgs = render_svgs(&r);
    let names: Vec<&str> = svgs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["throughput.svg", "latency-p99.svg", "cpu-rss.svg"]);
    // Bars: throughput 5 scenarios x 4 variants (not direct itself, the 1.0 line); added p99
    // 4 scenarios with a latency run x 3 proxies; CPU and RSS 5 scenarios x 3 proxies each.
    let bars = [5 * 4, 4 * 3, 2 * 5 * 3];
    for ((name, svg), bars) in svgs.iter().zip(bars) {
        well_formed(svg).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(svg.contains("<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\""));
        assert!(svg.contains("font-family=\"sans-serif\""));
        assert!(svg.contains("width=\"800.0\""));
        assert!(!svg.contains("<script") && !svg.contains("href"));
        assert_eq!(svg.matches("<rect").count(), bars, "{name}");
        assert!(svg.contains("<title>"), "{name}: a title");
        assert!(svg.contains(">scenario</text>"), "{name}: x axis label");
        assert!(svg.contains("rotate(-90"), "{name}: y axis label");
        assert!(svg.contains(">sidecar-ebpf</text>"), "{name}: legend");
    }
    let throughput = &svgs[0].1;
    assert!(throughput.contains(">direct = 1.0</text>"));
    assert!(throughput.contains("<title>http1-1k sidecar-ebpf: 0.90</title>"));
    assert!(throughput.contains(">0.60</text>"), "envoy's value label");
    let latency = &svgs[1].1;
    assert!(latency.contains("<title>grpc envoy: 0.400</title>"));
    assert!(!latency.contains(">conn-rate</text>"));
    let cpu_rss = &svgs[2].1;
    assert!(cpu_rss.contains("<title>http2 sidecar-ebpf: 0.0200</title>"));
    assert!(cpu_rss.contains("<title>http2 envoy: 40.0</title>"));

    // Same input, same bytes.
    assert_eq!(render_svgs(&r), svgs);
    assert_eq!(markdown(&r), markdown(&r.clone()));

    // A missing bar is marked n/a, not drawn.
    let mut r = synthetic::results();
    r.measurements
        .retain(|m| !(m.scenario == Scenario::Grpc && m.variant == Variant::SidecarIptables));
    let svgs = render_svgs(&r);
    assert_eq!(svgs[0].1.matches("<rect").count(), 5 * 4 - 1);
    assert!(svgs[0].1.contains(">n/a</text>"));
}

#[test]
fn negative_added_latency_draws_below_zero() {
    let mut r = synthetic::results();
    for s in &mut get_mut(&mut r, Scenario::Http2, Variant::SidecarEbpf).samples {
        if let Some(l) = s.latency.as_mut() {
            l.p99_us -= 150.0; // -50, -30, -70 µs vs direct
        }
    }
    let svgs = render_svgs(&r);
    let latency = &svgs[1].1;
    well_formed(latency).unwrap();
    assert!(latency.contains("<title>http2 sidecar-ebpf: -0.0500</title>"));
    assert!(latency.contains(">-0.0500</text>"));
    // The axis covers negative values: a tick label below zero.
    assert!(
        latency.contains("text-anchor=\"end\" font-size=\"11\">-0."),
        "{latency}"
    );
}

//! `/metrics`: a cumulative manual metric reader on the meter provider, and the conversion of
//! what it collects into the Prometheus text exposition format following the OpenTelemetry →
//! Prometheus compatibility rules (names, unit suffixes, `_total`, histograms).
//!
//! CONTRACT: `PrometheusReader` is `Clone` (a handle); `reader()` gives the `MetricReader` the
//! pipeline registers with `SdkMeterProvider::builder().with_reader(..)`; `render()` collects
//! and returns the exposition text.
//!
//! The conversion works on the OTLP protobuf form of the collected metrics (the same
//! transform the OTLP exporters use), so `/metrics` shows exactly what the OTLP path exports:
//!
//! - metric names: characters outside `[a-zA-Z0-9_:]` become `_`, runs of `_` collapse to one,
//!   a leading digit gets a `_` prefix;
//! - the unit becomes a suffix unless the name already ends with it: abbreviations spelled out
//!   (`s` → `seconds`, `ms` → `milliseconds`, `By` → `bytes`, ...), `{...}` annotations dropped,
//!   `a/b` → `a_per_b`, `1` → `ratio` on gauges (dropped elsewhere);
//! - cumulative monotonic sums are counters named `..._total`; cumulative non-monotonic sums
//!   and gauges are gauges; cumulative histograms give `_bucket{le=..}` (cumulative counts,
//!   `+Inf` last), `_sum` and `_count`; summaries give `{quantile=..}`, `_sum`, `_count`;
//!   delta temporality and exponential histograms (no text form) are dropped;
//! - attribute keys are sanitised like names (`.` → `_`, a leading digit gets `key_`); keys that
//!   collide after sanitising have their values joined with `;` in the order of the original
//!   keys; a key that collides with a label the exporter adds (`le`, `quantile`,
//!   `otel_scope_*`) is renamed `exported_<key>`;
//! - every point carries `otel_scope_name` and `otel_scope_version` (and
//!   `otel_scope_schema_url` and `otel_scope_<attribute>` when the scope has them);
//! - the resource attributes are the labels of one `target_info` gauge of value 1;
//! - one `# HELP`/`# TYPE` per family; a metric whose name maps onto a family of another type is
//!   dropped (and logged), as is a series that repeats a label set already in its family.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, DataPointFlags, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, SummaryDataPoint,
};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::data::ResourceMetrics as SdkResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, Temporality};

/// The `Content-Type` of the exposition [`PrometheusReader::render`] returns.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Handle to the reader behind `/metrics`.
#[derive(Clone, Debug)]
pub struct PrometheusReader {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    reader: ManualReader,
    /// A dropped metric has been logged at warn level once; later ones go to debug.
    warned: AtomicBool,
}

impl Default for PrometheusReader {
    fn default() -> Self {
        Self::new()
    }
}

/// Collecting the metrics for `/metrics` failed (the meter provider is shut down, or the reader
/// was never registered with one).
#[derive(Debug, thiserror::Error)]
#[error("collecting metrics: {0}")]
pub struct RenderError(#[from] OTelSdkError);

impl PrometheusReader {
    /// A reader with cumulative temporality; register [`PrometheusReader::reader`] with the
    /// meter provider before calling [`PrometheusReader::render`].
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                reader: ManualReader::builder()
                    .with_temporality(Temporality::Cumulative)
                    .build(),
                warned: AtomicBool::new(false),
            }),
        }
    }

    /// The [`MetricReader`] to register with `SdkMeterProvider::builder().with_reader(..)`.
    /// Register it with one provider only (a second registration is ignored).
    pub fn reader(&self) -> impl MetricReader {
        SharedReader(Arc::clone(&self.inner))
    }

    /// Collects every instrument now and renders the text exposition format 0.0.4 (see
    /// [`CONTENT_TYPE`]).
    pub fn render(&self) -> Result<String, RenderError> {
        let mut rm = SdkResourceMetrics::default();
        self.inner.reader.collect(&mut rm)?;
        let request = ExportMetricsServiceRequest::from(&rm);
        let exposition = render_otlp(&request.resource_metrics);
        for dropped in &exposition.dropped {
            if !self.inner.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!("/metrics: {dropped} (further drops are logged at debug level)");
            } else {
                tracing::debug!("/metrics: {dropped}");
            }
        }
        Ok(exposition.text)
    }
}

/// The [`MetricReader`] registered with the provider: delegates to the shared manual reader.
#[derive(Debug)]
struct SharedReader(Arc<Inner>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.reader.register_pipeline(pipeline);
    }

    fn collect(&self, rm: &mut SdkResourceMetrics) -> OTelSdkResult {
        self.0.reader.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.reader.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.reader.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.reader.temporality(kind)
    }
}

/// The result of [`render_otlp`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exposition {
    /// The text exposition.
    pub text: String,
    /// Why metrics or series were left out (one line each), for logging.
    pub dropped: Vec<String>,
}

/// Prometheus metric types of the text format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PromType {
    Counter,
    Gauge,
    Histogram,
    Summary,
}

impl PromType {
    fn as_str(self) -> &'static str {
        match self {
            PromType::Counter => "counter",
            PromType::Gauge => "gauge",
            PromType::Histogram => "histogram",
            PromType::Summary => "summary",
        }
    }

    /// Labels the exporter itself adds to this type's samples.
    fn reserved_label(self) -> Option<&'static str> {
        match self {
            PromType::Histogram => Some("le"),
            PromType::Summary => Some("quantile"),
            PromType::Counter | PromType::Gauge => None,
        }
    }
}

/// One metric family of the output.
struct Family {
    name: String,
    kind: PromType,
    help: String,
    /// Sample lines, each ending with a newline.
    samples: String,
    /// Label sets already written (without `le`/`quantile`).
    series: HashSet<String>,
}

/// Families in order of first appearance.
#[derive(Default)]
struct Families {
    list: Vec<Family>,
    index: HashMap<String, usize>,
    dropped: Vec<String>,
}

impl Families {
    /// The index of family `name` of type `kind`, created if new; `None` (and the metric
    /// recorded as dropped) when the name is taken by a family of another type.
    fn get(&mut self, name: &str, kind: PromType, help: &str, origin: &str) -> Option<usize> {
        let i = match self.index.get(name) {
            Some(&i) => i,
            None => {
                self.list.push(Family {
                    name: name.to_owned(),
                    kind,
                    help: String::new(),
                    samples: String::new(),
                    series: HashSet::new(),
                });
                self.index.insert(name.to_owned(), self.list.len() - 1);
                self.list.len() - 1
            }
        };
        let family = &mut self.list[i];
        if family.kind != kind {
            self.dropped.push(format!(
                "dropped metric {origin:?}: its name {name} is already a {} here, not a {}",
                family.kind.as_str(),
                kind.as_str()
            ));
            return None;
        }
        if family.help.is_empty() {
            help.clone_into(&mut family.help);
        }
        Some(i)
    }
}

impl Family {
    /// Remembers the label set `labels` (rendered); false when the family already has it.
    fn new_series(&mut self, labels: &str, dropped: &mut Vec<String>) -> bool {
        if self.series.insert(labels.to_owned()) {
            true
        } else {
            dropped.push(format!(
                "dropped a duplicate series of {}{{{labels}}}",
                self.name
            ));
            false
        }
    }

    fn sample(&mut self, suffix: &str, labels: &str, extra: Option<(&str, &str)>, value: &str) {
        let s = &mut self.samples;
        s.push_str(&self.name);
        s.push_str(suffix);
        match extra {
            Some((k, v)) => {
                s.push('{');
                s.push_str(labels);
                if !labels.is_empty() {
                    s.push(',');
                }
                let _ = write!(s, "{k}=\"{}\"", escape_label_value(v));
                s.push('}');
            }
            None if !labels.is_empty() => {
                s.push('{');
                s.push_str(labels);
                s.push('}');
            }
            None => {}
        }
        s.push(' ');
        s.push_str(value);
        s.push('\n');
    }
}

/// Converts OTLP resource metrics into the Prometheus text exposition format 0.0.4.
pub fn render_otlp(resource_metrics: &[ResourceMetrics]) -> Exposition {
    let mut families = Families::default();

    // target_info: the resource attributes (one series per distinct resource).
    for rm in resource_metrics {
        let attrs = rm
            .resource
            .as_ref()
            .map(|r| r.attributes.as_slice())
            .unwrap_or_default();
        if attrs.is_empty() {
            continue;
        }
        let labels = render_labels(&attribute_labels(attrs, &[]));
        if let Some(i) = families.get("target_info", PromType::Gauge, "Target metadata", "") {
            let f = &mut families.list[i];
            if f.new_series(&labels, &mut families.dropped) {
                f.sample("", &labels, None, "1");
            }
        }
    }

    for rm in resource_metrics {
        for sm in &rm.scope_metrics {
            let scope = scope_labels(sm.scope.as_ref(), &sm.schema_url);
            for metric in &sm.metrics {
                add_metric(&mut families, metric, &scope);
            }
        }
    }

    let mut text = String::new();
    for f in &families.list {
        if f.samples.is_empty() {
            continue;
        }
        if !f.help.is_empty() {
            let _ = writeln!(text, "# HELP {} {}", f.name, escape_help(&f.help));
        }
        let _ = writeln!(text, "# TYPE {} {}", f.name, f.kind.as_str());
        text.push_str(&f.samples);
    }
    Exposition {
        text,
        dropped: families.dropped,
    }
}

fn is_cumulative(temporality: i32) -> bool {
    temporality == AggregationTemporality::Cumulative as i32
}

fn no_recorded_value(flags: u32) -> bool {
    flags & DataPointFlags::NoRecordedValueMask as u32 != 0
}

fn add_metric(families: &mut Families, metric: &Metric, scope: &[(String, String)]) {
    let Some(data) = &metric.data else {
        return;
    };
    let kind = match data {
        Data::Gauge(_) => PromType::Gauge,
        Data::Sum(s) if !is_cumulative(s.aggregation_temporality) => {
            families.dropped.push(format!(
                "dropped metric {:?}: delta sums are not exposed",
                metric.name
            ));
            return;
        }
        Data::Sum(s) if s.is_monotonic => PromType::Counter,
        Data::Sum(_) => PromType::Gauge,
        Data::Histogram(h) if !is_cumulative(h.aggregation_temporality) => {
            families.dropped.push(format!(
                "dropped metric {:?}: delta histograms are not exposed",
                metric.name
            ));
            return;
        }
        Data::Histogram(_) => PromType::Histogram,
        Data::ExponentialHistogram(_) => {
            families.dropped.push(format!(
                "dropped metric {:?}: exponential histograms have no text exposition",
                metric.name
            ));
            return;
        }
        Data::Summary(_) => PromType::Summary,
    };
    let name = metric_name(&metric.name, &metric.unit, kind);
    let Some(i) = families.get(&name, kind, &metric.description, &metric.name) else {
        return;
    };
    let family = &mut families.list[i];
    let dropped = &mut families.dropped;
    let reserved: Vec<&str> = scope
        .iter()
        .map(|(k, _)| k.as_str())
        .chain(kind.reserved_label())
        .collect();
    match data {
        Data::Gauge(g) => number_points(family, &g.data_points, scope, &reserved, dropped),
        Data::Sum(s) => number_points(family, &s.data_points, scope, &reserved, dropped),
        Data::Histogram(h) => {
            for p in &h.data_points {
                histogram_point(family, p, scope, &reserved, dropped);
            }
        }
        Data::Summary(s) => {
            for p in &s.data_points {
                summary_point(family, p, scope, &reserved, dropped);
            }
        }
        Data::ExponentialHistogram(_) => {}
    }
}

/// The rendered label set of a point: its attributes, then the scope labels.
fn point_labels(attrs: &[KeyValue], scope: &[(String, String)], reserved: &[&str]) -> String {
    let mut labels = attribute_labels(attrs, reserved);
    labels.extend(scope.iter().cloned());
    render_labels(&labels)
}

fn number_points(
    family: &mut Family,
    points: &[NumberDataPoint],
    scope: &[(String, String)],
    reserved: &[&str],
    dropped: &mut Vec<String>,
) {
    for p in points {
        if no_recorded_value(p.flags) {
            continue;
        }
        let value = match p.value {
            Some(number_data_point::Value::AsDouble(v)) => format_f64(v),
            Some(number_data_point::Value::AsInt(v)) => v.to_string(),
            None => continue,
        };
        let labels = point_labels(&p.attributes, scope, reserved);
        if family.new_series(&labels, dropped) {
            family.sample("", &labels, None, &value);
        }
    }
}

fn histogram_point(
    family: &mut Family,
    p: &HistogramDataPoint,
    scope: &[(String, String)],
    reserved: &[&str],
    dropped: &mut Vec<String>,
) {
    if no_recorded_value(p.flags) {
        return;
    }
    if !p.bucket_counts.is_empty() && p.bucket_counts.len() != p.explicit_bounds.len() + 1 {
        dropped.push(format!(
            "dropped a point of {}: {} bucket counts for {} bounds",
            family.name,
            p.bucket_counts.len(),
            p.explicit_bounds.len()
        ));
        return;
    }
    let labels = point_labels(&p.attributes, scope, reserved);
    if !family.new_series(&labels, dropped) {
        return;
    }
    let mut cumulative: u64 = 0;
    for (bound, count) in p.explicit_bounds.iter().zip(&p.bucket_counts) {
        cumulative = cumulative.saturating_add(*count);
        family.sample(
            "_bucket",
            &labels,
            Some(("le", &format_f64(*bound))),
            &cumulative.to_string(),
        );
    }
    let count = p.count.to_string();
    family.sample("_bucket", &labels, Some(("le", "+Inf")), &count);
    if let Some(sum) = p.sum {
        family.sample("_sum", &labels, None, &format_f64(sum));
    }
    family.sample("_count", &labels, None, &count);
}

fn summary_point(
    family: &mut Family,
    p: &SummaryDataPoint,
    scope: &[(String, String)],
    reserved: &[&str],
    dropped: &mut Vec<String>,
) {
    if no_recorded_value(p.flags) {
        return;
    }
    let labels = point_labels(&p.attributes, scope, reserved);
    if !family.new_series(&labels, dropped) {
        return;
    }
    let mut quantiles: Vec<_> = p.quantile_values.iter().collect();
    quantiles.sort_by(|a, b| a.quantile.total_cmp(&b.quantile));
    for q in quantiles {
        family.sample(
            "",
            &labels,
            Some(("quantile", &format_f64(q.quantile))),
            &format_f64(q.value),
        );
    }
    family.sample("_sum", &labels, None, &format_f64(p.sum));
    family.sample("_count", &labels, None, &p.count.to_string());
}

/// `otel_scope_name`, `otel_scope_version`, `otel_scope_schema_url` and
/// `otel_scope_<attribute>` labels (empty values left out).
fn scope_labels(scope: Option<&InstrumentationScope>, schema_url: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(scope) = scope else {
        return out;
    };
    let fixed = [
        ("otel_scope_name", scope.name.as_str()),
        ("otel_scope_version", scope.version.as_str()),
        ("otel_scope_schema_url", schema_url),
    ];
    for (k, v) in fixed {
        if !v.is_empty() {
            out.push((k.to_owned(), v.to_owned()));
        }
    }
    let reserved: Vec<&str> = fixed.iter().map(|(k, _)| *k).collect();
    for (k, v) in attribute_labels(&scope.attributes, &[]) {
        let key = format!("otel_scope_{k}");
        if reserved.contains(&key.as_str()) {
            continue;
        }
        out.push((key, v));
    }
    out
}

/// Attributes as labels: keys sanitised; values of keys that collide after sanitising joined
/// with `;` in the order of the original keys; keys in `reserved` renamed `exported_<key>`.
/// Sorted by label name.
fn attribute_labels(attrs: &[KeyValue], reserved: &[&str]) -> Vec<(String, String)> {
    let mut sorted: Vec<&KeyValue> = attrs.iter().filter(|kv| !kv.key.is_empty()).collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    let mut out: Vec<(String, String)> = Vec::with_capacity(sorted.len());
    for kv in sorted {
        let mut key = label_name(&kv.key);
        if reserved.contains(&key.as_str()) {
            key = format!("exported_{key}");
        }
        let value = kv.value.as_ref().map(any_value_string).unwrap_or_default();
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => {
                v.push(';');
                v.push_str(&value);
            }
            None => out.push((key, value)),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `k1="v1",k2="v2"` (no braces).
fn render_labels(labels: &[(String, String)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"{}\"", escape_label_value(v));
    }
    s
}

/// Replaces characters outside `valid` with `_` and collapses runs of `_`.
fn sanitize(name: &str, valid: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        let c = if valid(c) { c } else { '_' };
        if c == '_' && out.ends_with('_') {
            continue;
        }
        out.push(c);
    }
    out
}

/// A Prometheus label name for the attribute key `key`.
pub fn label_name(key: &str) -> String {
    let s = sanitize(key, |c| c.is_ascii_alphanumeric() || c == '_');
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        format!("key_{s}")
    } else {
        s
    }
}

/// The sanitised metric name, before unit and type suffixes.
fn base_name(name: &str) -> String {
    let s = sanitize(name, |c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        format!("_{s}")
    } else {
        s
    }
}

/// The Prometheus name of the OpenTelemetry metric `name` with `unit`, exposed as `kind`
/// (without the `_bucket`/`_sum`/`_count` sample suffixes).
fn metric_name(name: &str, unit: &str, kind: PromType) -> String {
    let mut base = base_name(name);
    if kind == PromType::Counter {
        if let Some(stripped) = base.strip_suffix("_total") {
            base = stripped.to_owned();
        }
    }
    let unit = unit_suffix(unit, kind == PromType::Gauge);
    if !unit.is_empty() && base != unit && !base.ends_with(&format!("_{unit}")) {
        base.push('_');
        base.push_str(&unit);
    }
    if kind == PromType::Counter {
        base.push_str("_total");
    }
    base
}

/// The Prometheus spelling of a UCUM unit abbreviation (`s` → `seconds`).
fn unit_word(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "TiBy" => "tebibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "GBy" => "gigabytes",
        "TBy" => "terabytes",
        "bit" => "bits",
        "m" => "meters",
        "V" => "volts",
        "A" => "amperes",
        "J" => "joules",
        "W" => "watts",
        "g" => "grams",
        "Cel" => "celsius",
        "Hz" => "hertz",
        "%" => "percent",
        _ => return None,
    })
}

/// The singular spelling of a time unit after `/` (`By/s` → `bytes_per_second`).
fn per_unit_word(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        "w" => "week",
        "mo" => "month",
        "y" => "year",
        _ => return None,
    })
}

/// Removes every `{...}` annotation (an unclosed `{` drops the rest).
fn strip_annotations(unit: &str) -> String {
    let mut out = String::with_capacity(unit.len());
    let mut depth = 0usize;
    for c in unit.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// One side of a unit as a name fragment: a known abbreviation spelled out, anything else
/// reduced to `[a-zA-Z0-9_]`.
fn unit_part(part: &str, word: impl Fn(&str) -> Option<&'static str>) -> String {
    let part = strip_annotations(part);
    let part = part.trim();
    if part.is_empty() || part == "1" {
        return String::new();
    }
    if let Some(w) = word(part) {
        return w.to_owned();
    }
    sanitize(part, |c| c.is_ascii_alphanumeric())
        .trim_matches('_')
        .to_owned()
}

/// The name suffix for `unit` (empty when there is none).
fn unit_suffix(unit: &str, gauge: bool) -> String {
    let unit = unit.trim();
    if unit == "1" {
        return if gauge {
            "ratio".to_owned()
        } else {
            String::new()
        };
    }
    let (main, per) = match unit.split_once('/') {
        Some((m, p)) => (m, Some(p)),
        None => (unit, None),
    };
    let main = unit_part(main, unit_word);
    let per = per
        .map(|p| unit_part(p, |u| per_unit_word(u).or_else(|| unit_word(u))))
        .unwrap_or_default();
    match (main.is_empty(), per.is_empty()) {
        (_, true) => main,
        (true, false) => format!("per_{per}"),
        (false, false) => format!("{main}_per_{per}"),
    }
}

/// A sample value or `le`/`quantile` label value.
fn format_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if v == 0.0 || (1e-4..1e15).contains(&v.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

/// `# HELP` text: `\` and newline escaped.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label value: `\`, `"` and newline escaped.
fn escape_label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A non-string attribute value as a string, as the attribute specification represents it
/// outside OTLP: booleans and numbers as text, arrays and maps as JSON, bytes as base64.
fn any_value_string(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => format_f64(*d),
        Some(any_value::Value::BytesValue(b)) => base64(b),
        Some(any_value::Value::ArrayValue(_)) | Some(any_value::Value::KvlistValue(_)) => {
            any_value_json(v).to_string()
        }
        Some(any_value::Value::StringValueStrindex(_)) | None => String::new(),
    }
}

fn any_value_json(v: &AnyValue) -> serde_json::Value {
    use serde_json::Value as J;
    match &v.value {
        Some(any_value::Value::StringValue(s)) => J::from(s.as_str()),
        Some(any_value::Value::BoolValue(b)) => J::from(*b),
        Some(any_value::Value::IntValue(i)) => J::from(*i),
        Some(any_value::Value::DoubleValue(d)) => J::from(*d),
        Some(any_value::Value::BytesValue(b)) => J::from(base64(b)),
        Some(any_value::Value::ArrayValue(a)) => {
            J::Array(a.values.iter().map(any_value_json).collect())
        }
        Some(any_value::Value::KvlistValue(l)) => J::Object(
            l.values
                .iter()
                .map(|kv| {
                    let v = kv.value.as_ref().map(any_value_json).unwrap_or(J::Null);
                    (kv.key.clone(), v)
                })
                .collect(),
        ),
        Some(any_value::Value::StringValueStrindex(_)) | None => J::Null,
    }
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, KeyValueList};
    use opentelemetry_proto::tonic::metrics::v1::summary_data_point::ValueAtQuantile;
    use opentelemetry_proto::tonic::metrics::v1::{
        ExponentialHistogram, Gauge, Histogram, ScopeMetrics, Sum, Summary,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;

    const CUMULATIVE: i32 = AggregationTemporality::Cumulative as i32;
    const DELTA: i32 = AggregationTemporality::Delta as i32;

    fn any(v: any_value::Value) -> AnyValue {
        AnyValue { value: Some(v) }
    }

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(any(value)),
            ..Default::default()
        }
    }

    fn s(key: &str, value: &str) -> KeyValue {
        kv(key, any_value::Value::StringValue(value.to_owned()))
    }

    fn num(attrs: Vec<KeyValue>, v: number_data_point::Value) -> NumberDataPoint {
        NumberDataPoint {
            attributes: attrs,
            value: Some(v),
            ..Default::default()
        }
    }

    fn metric(name: &str, unit: &str, description: &str, data: Data) -> Metric {
        Metric {
            name: name.to_owned(),
            unit: unit.to_owned(),
            description: description.to_owned(),
            data: Some(data),
            ..Default::default()
        }
    }

    fn counter(name: &str, unit: &str, points: Vec<NumberDataPoint>) -> Metric {
        metric(
            name,
            unit,
            "a counter",
            Data::Sum(Sum {
                data_points: points,
                aggregation_temporality: CUMULATIVE,
                is_monotonic: true,
            }),
        )
    }

    fn scope(name: &str, version: &str, metrics: Vec<Metric>) -> ScopeMetrics {
        ScopeMetrics {
            scope: Some(InstrumentationScope {
                name: name.to_owned(),
                version: version.to_owned(),
                ..Default::default()
            }),
            metrics,
            ..Default::default()
        }
    }

    fn resource(attrs: Vec<KeyValue>, scopes: Vec<ScopeMetrics>) -> ResourceMetrics {
        ResourceMetrics {
            resource: Some(Resource {
                attributes: attrs,
                ..Default::default()
            }),
            scope_metrics: scopes,
            ..Default::default()
        }
    }

    /// Renders `metrics` in one scope `s` (no version) of an empty resource.
    fn render_metrics(metrics: Vec<Metric>) -> Exposition {
        render_otlp(&[resource(vec![], vec![scope("s", "", metrics)])])
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn metric_names_are_sanitised() {
        let g = PromType::Gauge;
        assert_eq!(
            metric_name("http.client.active_requests", "", g),
            "http_client_active_requests"
        );
        assert_eq!(metric_name("a-b/c d", "", g), "a_b_c_d");
        assert_eq!(metric_name("a..b__c", "", g), "a_b_c", "runs of _ collapse");
        assert_eq!(
            metric_name("ns:metric", "", g),
            "ns:metric",
            "colons are valid"
        );
        assert_eq!(metric_name("2xx.count", "", g), "_2xx_count");
        assert_eq!(metric_name("", "", g), "_");
        assert_eq!(metric_name("größe", "", g), "gr_e");
    }

    #[test]
    fn unit_suffixes() {
        let h = PromType::Histogram;
        assert_eq!(
            metric_name("http.client.request.duration", "s", h),
            "http_client_request_duration_seconds"
        );
        assert_eq!(metric_name("latency", "ms", h), "latency_milliseconds");
        assert_eq!(
            metric_name("http.server.request.body.size", "By", h),
            "http_server_request_body_size_bytes"
        );
        assert_eq!(metric_name("requests", "{request}", h), "requests");
        assert_eq!(
            metric_name("utilization", "1", PromType::Gauge),
            "utilization_ratio"
        );
        assert_eq!(metric_name("hits", "1", PromType::Counter), "hits_total");
        assert_eq!(metric_name("hits", "1", h), "hits");
        assert_eq!(
            metric_name("throughput", "By/s", PromType::Gauge),
            "throughput_bytes_per_second"
        );
        assert_eq!(
            metric_name("rate", "{packet}/s", PromType::Gauge),
            "rate_per_second"
        );
        assert_eq!(
            metric_name("rate", "1/min", PromType::Gauge),
            "rate_per_minutes"
        );
        assert_eq!(
            metric_name("odd", "foo bar", PromType::Gauge),
            "odd_foo_bar"
        );
        assert_eq!(metric_name("disk", "{disk}.By", PromType::Gauge), "disk_By");
        // Already suffixed: not repeated.
        assert_eq!(
            metric_name("process.cpu.seconds", "s", h),
            "process_cpu_seconds"
        );
        assert_eq!(metric_name("seconds", "s", h), "seconds");
        // `_total` comes after the unit, and is not doubled.
        assert_eq!(
            metric_name("sidecar.tcp.bytes", "By", PromType::Counter),
            "sidecar_tcp_bytes_total"
        );
        assert_eq!(
            metric_name("io.total", "By", PromType::Counter),
            "io_bytes_total"
        );
        assert_eq!(metric_name("x_total", "", PromType::Counter), "x_total");
        assert_eq!(
            metric_name("sidecar.tcp.connections", "{connection}", PromType::Counter),
            "sidecar_tcp_connections_total"
        );
    }

    #[test]
    fn label_names_are_sanitised() {
        assert_eq!(
            label_name("http.response.status_code"),
            "http_response_status_code"
        );
        assert_eq!(label_name("__name__"), "_name_", "no reserved __ prefix");
        assert_eq!(label_name("a..b"), "a_b");
        assert_eq!(label_name("1st"), "key_1st");
        assert_eq!(
            label_name("k:8s"),
            "k_8s",
            "colons are not valid in label names"
        );
    }

    #[test]
    fn counter_with_attributes_help_and_scope() {
        let text = render_otlp(&[resource(
            vec![],
            vec![scope(
                "sidecar",
                "1.2.3",
                vec![metric(
                    "sidecar.tcp.bytes",
                    "By",
                    "Bytes\\sent\nand received.",
                    Data::Sum(Sum {
                        data_points: vec![
                            num(
                                vec![
                                    s("network.io.direction", "transmit"),
                                    s("server.address", "a\"b\\c\nd"),
                                ],
                                number_data_point::Value::AsInt(300),
                            ),
                            num(
                                vec![s("network.io.direction", "receive")],
                                number_data_point::Value::AsDouble(2.5),
                            ),
                        ],
                        aggregation_temporality: CUMULATIVE,
                        is_monotonic: true,
                    }),
                )],
            )],
        )])
        .text;
        assert_eq!(
            lines(&text),
            [
                "# HELP sidecar_tcp_bytes_total Bytes\\\\sent\\nand received.",
                "# TYPE sidecar_tcp_bytes_total counter",
                "sidecar_tcp_bytes_total{network_io_direction=\"transmit\",server_address=\"a\\\"b\\\\c\\nd\",otel_scope_name=\"sidecar\",otel_scope_version=\"1.2.3\"} 300",
                "sidecar_tcp_bytes_total{network_io_direction=\"receive\",otel_scope_name=\"sidecar\",otel_scope_version=\"1.2.3\"} 2.5",
            ]
        );
    }

    #[test]
    fn gauges_and_non_monotonic_sums_are_gauges() {
        let text = render_metrics(vec![
            metric(
                "http.client.active_requests",
                "{request}",
                "active",
                Data::Sum(Sum {
                    data_points: vec![num(vec![], number_data_point::Value::AsInt(-2))],
                    aggregation_temporality: CUMULATIVE,
                    is_monotonic: false,
                }),
            ),
            metric(
                "sidecar.map.fill",
                "1",
                "fill",
                Data::Gauge(Gauge {
                    data_points: vec![num(
                        vec![s("map", "conns")],
                        number_data_point::Value::AsDouble(0.25),
                    )],
                }),
            ),
        ])
        .text;
        assert_eq!(
            lines(&text),
            [
                "# HELP http_client_active_requests active",
                "# TYPE http_client_active_requests gauge",
                "http_client_active_requests{otel_scope_name=\"s\"} -2",
                "# HELP sidecar_map_fill_ratio fill",
                "# TYPE sidecar_map_fill_ratio gauge",
                "sidecar_map_fill_ratio{map=\"conns\",otel_scope_name=\"s\"} 0.25",
            ]
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_inf_last() {
        let text = render_metrics(vec![metric(
            "http.client.request.duration",
            "s",
            "Duration of HTTP client requests.",
            Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    attributes: vec![
                        s("http.request.method", "GET"),
                        kv("http.response.status_code", any_value::Value::IntValue(200)),
                    ],
                    count: 6,
                    sum: Some(1.75),
                    bucket_counts: vec![1, 0, 3, 2],
                    explicit_bounds: vec![0.005, 0.1, 1.0],
                    ..Default::default()
                }],
                aggregation_temporality: CUMULATIVE,
            }),
        )])
        .text;
        let l =
            "http_request_method=\"GET\",http_response_status_code=\"200\",otel_scope_name=\"s\"";
        assert_eq!(
            lines(&text),
            [
                "# HELP http_client_request_duration_seconds Duration of HTTP client requests."
                    .to_owned(),
                "# TYPE http_client_request_duration_seconds histogram".to_owned(),
                format!("http_client_request_duration_seconds_bucket{{{l},le=\"0.005\"}} 1"),
                format!("http_client_request_duration_seconds_bucket{{{l},le=\"0.1\"}} 1"),
                format!("http_client_request_duration_seconds_bucket{{{l},le=\"1\"}} 4"),
                format!("http_client_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} 6"),
                format!("http_client_request_duration_seconds_sum{{{l}}} 1.75"),
                format!("http_client_request_duration_seconds_count{{{l}}} 6"),
            ]
        );
    }

    #[test]
    fn histogram_edge_cases() {
        let point = |bucket_counts: Vec<u64>, explicit_bounds: Vec<f64>, sum| HistogramDataPoint {
            count: 2,
            sum,
            bucket_counts,
            explicit_bounds,
            ..Default::default()
        };
        let hist = |name: &str, p: HistogramDataPoint| {
            metric(
                name,
                "",
                "h",
                Data::Histogram(Histogram {
                    data_points: vec![p],
                    aggregation_temporality: CUMULATIVE,
                }),
            )
        };
        let e = render_metrics(vec![
            // No buckets at all: only +Inf; no sum: no _sum line.
            hist("plain", point(vec![], vec![], None)),
            // Malformed: dropped.
            hist("broken", point(vec![1, 1], vec![1.0, 2.0], Some(1.0))),
        ]);
        assert_eq!(
            lines(&e.text),
            [
                "# HELP plain h",
                "# TYPE plain histogram",
                "plain_bucket{otel_scope_name=\"s\",le=\"+Inf\"} 2",
                "plain_count{otel_scope_name=\"s\"} 2",
            ]
        );
        assert_eq!(e.dropped.len(), 1, "{:?}", e.dropped);
    }

    #[test]
    fn summary_quantiles_sorted() {
        let text = render_metrics(vec![metric(
            "rpc.latency",
            "ms",
            "s",
            Data::Summary(Summary {
                data_points: vec![SummaryDataPoint {
                    count: 10,
                    sum: 55.0,
                    quantile_values: vec![
                        ValueAtQuantile {
                            quantile: 0.99,
                            value: 9.0,
                        },
                        ValueAtQuantile {
                            quantile: 0.5,
                            value: 5.0,
                        },
                    ],
                    ..Default::default()
                }],
            }),
        )])
        .text;
        assert_eq!(
            lines(&text),
            [
                "# HELP rpc_latency_milliseconds s",
                "# TYPE rpc_latency_milliseconds summary",
                "rpc_latency_milliseconds{otel_scope_name=\"s\",quantile=\"0.5\"} 5",
                "rpc_latency_milliseconds{otel_scope_name=\"s\",quantile=\"0.99\"} 9",
                "rpc_latency_milliseconds_sum{otel_scope_name=\"s\"} 55",
                "rpc_latency_milliseconds_count{otel_scope_name=\"s\"} 10",
            ]
        );
    }

    #[test]
    fn target_info_from_resource_attributes() {
        let text = render_otlp(&[resource(
            vec![
                s("service.name", "checkout"),
                s("k8s.pod.name", "checkout-7d9f"),
                kv("telemetry.sdk.x", any_value::Value::BoolValue(true)),
            ],
            vec![scope(
                "s",
                "",
                vec![counter(
                    "c",
                    "",
                    vec![num(vec![], number_data_point::Value::AsInt(1))],
                )],
            )],
        )])
        .text;
        assert_eq!(
            lines(&text)[..3],
            [
                "# HELP target_info Target metadata",
                "# TYPE target_info gauge",
                "target_info{k8s_pod_name=\"checkout-7d9f\",service_name=\"checkout\",telemetry_sdk_x=\"true\"} 1",
            ]
        );
        // An empty resource has no target_info.
        let text = render_metrics(vec![counter(
            "c",
            "",
            vec![num(vec![], number_data_point::Value::AsInt(1))],
        )])
        .text;
        assert!(!text.contains("target_info"), "{text}");
    }

    #[test]
    fn one_type_and_help_per_family_across_scopes() {
        let c = |scope_name: &str, v| {
            scope(
                scope_name,
                "",
                vec![counter(
                    "requests",
                    "",
                    vec![num(vec![], number_data_point::Value::AsInt(v))],
                )],
            )
        };
        let text = render_otlp(&[resource(vec![], vec![c("a", 1), c("b", 2)])]).text;
        assert_eq!(
            lines(&text),
            [
                "# HELP requests_total a counter",
                "# TYPE requests_total counter",
                "requests_total{otel_scope_name=\"a\"} 1",
                "requests_total{otel_scope_name=\"b\"} 2",
            ]
        );
    }

    #[test]
    fn conflicting_types_and_duplicate_series_are_dropped() {
        let e = render_metrics(vec![
            metric(
                "x",
                "",
                "gauge first",
                Data::Gauge(Gauge {
                    data_points: vec![num(vec![], number_data_point::Value::AsInt(1))],
                }),
            ),
            // Same Prometheus name, other type: the whole metric goes.
            metric(
                "x",
                "",
                "histogram",
                Data::Histogram(Histogram {
                    data_points: vec![HistogramDataPoint {
                        count: 1,
                        ..Default::default()
                    }],
                    aggregation_temporality: CUMULATIVE,
                }),
            ),
            // Same name and type ("x" with unit "{item}"), same labels: a duplicate series.
            metric(
                "x",
                "{item}",
                "",
                Data::Gauge(Gauge {
                    data_points: vec![num(vec![], number_data_point::Value::AsInt(2))],
                }),
            ),
        ]);
        assert_eq!(
            lines(&e.text),
            [
                "# HELP x gauge first",
                "# TYPE x gauge",
                "x{otel_scope_name=\"s\"} 1"
            ]
        );
        assert_eq!(e.dropped.len(), 2, "{:?}", e.dropped);
    }

    #[test]
    fn delta_and_exponential_histograms_are_dropped() {
        let e = render_metrics(vec![
            metric(
                "d",
                "",
                "",
                Data::Sum(Sum {
                    data_points: vec![num(vec![], number_data_point::Value::AsInt(1))],
                    aggregation_temporality: DELTA,
                    is_monotonic: true,
                }),
            ),
            metric(
                "dh",
                "",
                "",
                Data::Histogram(Histogram {
                    data_points: vec![HistogramDataPoint::default()],
                    aggregation_temporality: DELTA,
                }),
            ),
            metric(
                "e",
                "",
                "",
                Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: vec![],
                    aggregation_temporality: CUMULATIVE,
                }),
            ),
        ]);
        assert_eq!(e.text, "");
        assert_eq!(e.dropped.len(), 3);
    }

    #[test]
    fn points_without_recorded_value_are_skipped() {
        let mut p = num(vec![], number_data_point::Value::AsInt(1));
        p.flags = DataPointFlags::NoRecordedValueMask as u32;
        let e = render_metrics(vec![counter("c", "", vec![p])]);
        assert_eq!(e.text, "");
    }

    #[test]
    fn colliding_and_reserved_label_names() {
        let text = render_metrics(vec![metric(
            "h",
            "",
            "h",
            Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    attributes: vec![
                        s("a_b", "2"),
                        s("a.b", "1"),
                        s("le", "x"),
                        s("otel.scope.name", "y"),
                    ],
                    count: 0,
                    ..Default::default()
                }],
                aggregation_temporality: CUMULATIVE,
            }),
        )])
        .text;
        assert_eq!(
            lines(&text)[2],
            "h_bucket{a_b=\"1;2\",exported_le=\"x\",exported_otel_scope_name=\"y\",otel_scope_name=\"s\",le=\"+Inf\"} 0"
        );
    }

    #[test]
    fn non_string_attribute_values() {
        let array = ArrayValue {
            values: vec![
                any(any_value::Value::StringValue("a".into())),
                any(any_value::Value::IntValue(2)),
            ],
        };
        let map = KeyValueList {
            values: vec![kv("k", any_value::Value::BoolValue(false))],
        };
        let text = render_metrics(vec![counter(
            "c",
            "",
            vec![num(
                vec![
                    kv("arr", any_value::Value::ArrayValue(array)),
                    kv("b", any_value::Value::BoolValue(true)),
                    kv("bytes", any_value::Value::BytesValue(b"hi!?".to_vec())),
                    kv("d", any_value::Value::DoubleValue(0.5)),
                    kv("i", any_value::Value::IntValue(-7)),
                    kv("map", any_value::Value::KvlistValue(map)),
                ],
                number_data_point::Value::AsInt(1),
            )],
        )])
        .text;
        assert_eq!(
            lines(&text)[2],
            "c_total{arr=\"[\\\"a\\\",2]\",b=\"true\",bytes=\"aGkhPw==\",d=\"0.5\",i=\"-7\",map=\"{\\\"k\\\":false}\",otel_scope_name=\"s\"} 1"
        );
    }

    #[test]
    fn scope_schema_url_and_attributes_become_labels() {
        let mut sm = scope(
            "lib",
            "2",
            vec![counter(
                "c",
                "",
                vec![num(vec![], number_data_point::Value::AsInt(1))],
            )],
        );
        sm.schema_url = "https://opentelemetry.io/schemas/1.26.0".into();
        if let Some(sc) = sm.scope.as_mut() {
            sc.attributes = vec![s("team.name", "core")];
        }
        let text = render_otlp(&[resource(vec![], vec![sm])]).text;
        assert_eq!(
            lines(&text)[2],
            "c_total{otel_scope_name=\"lib\",otel_scope_version=\"2\",otel_scope_schema_url=\"https://opentelemetry.io/schemas/1.26.0\",otel_scope_team_name=\"core\"} 1"
        );
    }

    #[test]
    fn number_formatting() {
        assert_eq!(format_f64(0.0), "0");
        assert_eq!(format_f64(1.0), "1");
        assert_eq!(format_f64(0.005), "0.005");
        assert_eq!(format_f64(-2.5), "-2.5");
        assert_eq!(format_f64(1e-5), "1e-5");
        assert_eq!(format_f64(2.5e20), "2.5e20");
        assert_eq!(format_f64(f64::INFINITY), "+Inf");
        assert_eq!(format_f64(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_f64(f64::NAN), "NaN");
        for s in ["1e-5", "2.5e20", "0.005"] {
            assert!(s.parse::<f64>().is_ok());
        }
    }

    #[test]
    fn base64_encoding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn reader_renders_what_the_sdk_recorded() {
        use opentelemetry::metrics::MeterProvider as _;
        use opentelemetry_sdk::metrics::SdkMeterProvider;

        let prom = PrometheusReader::new();
        assert!(prom.render().is_err(), "not registered yet");
        let provider = SdkMeterProvider::builder()
            .with_reader(prom.reader())
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("svc")
                    .build(),
            )
            .build();
        let meter = provider.meter("sidecar");
        let c = meter
            .u64_counter("sidecar.tcp.bytes")
            .with_unit("By")
            .with_description("Bytes.")
            .build();
        let h = meter
            .f64_histogram("http.client.request.duration")
            .with_unit("s")
            .with_description("Duration.")
            .build();
        c.add(
            5,
            &[opentelemetry::KeyValue::new(
                "network.io.direction",
                "transmit",
            )],
        );
        c.add(
            7,
            &[opentelemetry::KeyValue::new(
                "network.io.direction",
                "transmit",
            )],
        );
        h.record(0.02, &[]);
        let text = prom.render().unwrap();
        assert!(text.contains("service_name=\"svc\""), "{text}");
        assert!(
            text.contains("sidecar_tcp_bytes_total{network_io_direction=\"transmit\",otel_scope_name=\"sidecar\"} 12"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE http_client_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(
                "http_client_request_duration_seconds_count{otel_scope_name=\"sidecar\"} 1"
            ),
            "{text}"
        );
        // Cumulative: a second scrape still counts everything.
        c.add(
            1,
            &[opentelemetry::KeyValue::new(
                "network.io.direction",
                "transmit",
            )],
        );
        let text = prom.render().unwrap();
        assert!(text.contains("} 13\n"), "{text}");
        // A clone is the same reader.
        assert_eq!(prom.clone().render().unwrap(), text);
        provider.shutdown().unwrap();
        assert!(prom.render().is_err(), "shut down");
    }
}

//! Test-only telemetry: a [`Telemetry`] wired to in-memory span and metric exporters, with
//! accessors other modules' tests (the proxy's) use to assert what was recorded.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{
    InMemoryMetricExporter, InMemoryMetricExporterBuilder, PeriodicReader, SdkMeterProvider,
    Temporality,
};
use opentelemetry_sdk::trace::{InMemorySpanExporter, Sampler, SdkTracerProvider, SpanData};
use opentelemetry_sdk::Resource;

use super::{url::Redactor, Telemetry};
use crate::export::summary::{Summary, SummarySnapshot};

/// The value of one metric data point, by instrument kind.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum PointValue {
    /// Histogram point: how many values, their sum, and the bucket boundaries.
    Histogram {
        count: u64,
        sum: f64,
        bounds: Vec<f64>,
        bucket_counts: Vec<u64>,
    },
    /// Counter or up-down counter (cumulative value).
    Sum { value: f64, monotonic: bool },
    /// Gauge.
    Gauge(f64),
}

/// One data point of one metric, flattened for assertions.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct MetricPoint {
    /// Instrument name.
    pub name: String,
    /// Instrument unit.
    pub unit: String,
    /// Attributes of the point (the SDK sorts them by key).
    pub attributes: Vec<KeyValue>,
    /// The value.
    pub value: PointValue,
}

impl MetricPoint {
    /// The value of attribute `key`, if the point has it.
    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    /// Histogram count, or `None` for other kinds.
    pub fn count(&self) -> Option<u64> {
        match self.value {
            PointValue::Histogram { count, .. } => Some(count),
            _ => None,
        }
    }

    /// Counter value, or `None` for other kinds.
    pub fn sum_value(&self) -> Option<f64> {
        match self.value {
            PointValue::Sum { value, .. } => Some(value),
            _ => None,
        }
    }
}

/// What a test inspects: finished spans, exported metrics and the summary.
pub(crate) struct TestTelemetry {
    spans: InMemorySpanExporter,
    metrics: InMemoryMetricExporter,
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
    summary: Arc<Summary>,
}

impl Telemetry {
    /// A [`Telemetry`] whose spans are exported synchronously when they end and whose metrics
    /// are exported (cumulatively) on [`TestTelemetry::flush`]. Needs no async runtime.
    pub(crate) fn for_tests() -> (Telemetry, TestTelemetry) {
        Self::for_tests_with(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
    }

    /// Like [`Telemetry::for_tests`] with another sampler (to test unsampled traces).
    pub(crate) fn for_tests_with(sampler: Sampler) -> (Telemetry, TestTelemetry) {
        let resource = Resource::builder()
            .with_service_name("sidecar-test")
            .build();
        let spans = InMemorySpanExporter::default();
        let tracer_provider = SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .with_sampler(sampler)
            .with_resource(resource.clone())
            .build();
        let metrics = InMemoryMetricExporterBuilder::new()
            .with_temporality(Temporality::Cumulative)
            .build();
        // A long interval: exports happen on flush only.
        let reader = PeriodicReader::builder(metrics.clone())
            .with_interval(Duration::from_secs(3600))
            .build();
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        let summary = Arc::new(Summary::new());
        let telemetry = Telemetry::new(
            &tracer_provider,
            &meter_provider,
            Arc::clone(&summary),
            Redactor::default(),
        );
        (
            telemetry,
            TestTelemetry {
                spans,
                metrics,
                tracer_provider,
                meter_provider,
                summary,
            },
        )
    }
}

impl TestTelemetry {
    /// Exports pending spans and the current metric values.
    pub fn flush(&self) {
        if let Err(e) = self.tracer_provider.force_flush() {
            panic!("span flush failed: {e}");
        }
        if let Err(e) = self.meter_provider.force_flush() {
            panic!("metric flush failed: {e}");
        }
    }

    /// Every span that has ended so far (the simple processor exports each at its end).
    pub fn spans(&self) -> Vec<SpanData> {
        match self.spans.get_finished_spans() {
            Ok(s) => s,
            Err(e) => panic!("cannot read finished spans: {e}"),
        }
    }

    /// Flushes, then returns the latest cumulative export (every metric recorded so far).
    pub fn resource_metrics(&self) -> Option<ResourceMetrics> {
        self.flush();
        match self.metrics.get_finished_metrics() {
            Ok(mut all) => all.pop(),
            Err(e) => panic!("cannot read exported metrics: {e}"),
        }
    }

    /// Flushes, then returns every data point of the metric called `name`.
    pub fn metric_points(&self, name: &str) -> Vec<MetricPoint> {
        let Some(rm) = self.resource_metrics() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for scope in rm.scope_metrics() {
            for metric in scope.metrics().filter(|m| m.name() == name) {
                let point = |attributes: Vec<KeyValue>, value: PointValue| MetricPoint {
                    name: metric.name().to_owned(),
                    unit: metric.unit().to_owned(),
                    attributes,
                    value,
                };
                match metric.data() {
                    AggregatedMetrics::F64(d) => flatten(d, |v| v, &point, &mut out),
                    AggregatedMetrics::U64(d) => flatten(d, |v| v as f64, &point, &mut out),
                    AggregatedMetrics::I64(d) => flatten(d, |v| v as f64, &point, &mut out),
                }
            }
        }
        out
    }

    /// The per-destination summary as the `/stats` endpoint would see it.
    pub fn summary(&self) -> SummarySnapshot {
        self.summary.snapshot()
    }
}

fn flatten<T: Copy>(
    data: &MetricData<T>,
    to_f64: impl Fn(T) -> f64,
    point: &impl Fn(Vec<KeyValue>, PointValue) -> MetricPoint,
    out: &mut Vec<MetricPoint>,
) {
    match data {
        MetricData::Histogram(h) => {
            for p in h.data_points() {
                out.push(point(
                    p.attributes().cloned().collect(),
                    PointValue::Histogram {
                        count: p.count(),
                        sum: to_f64(p.sum()),
                        bounds: p.bounds().collect(),
                        bucket_counts: p.bucket_counts().collect(),
                    },
                ));
            }
        }
        MetricData::Sum(s) => {
            for p in s.data_points() {
                out.push(point(
                    p.attributes().cloned().collect(),
                    PointValue::Sum {
                        value: to_f64(p.value()),
                        monotonic: s.is_monotonic(),
                    },
                ));
            }
        }
        MetricData::Gauge(g) => {
            for p in g.data_points() {
                out.push(point(
                    p.attributes().cloned().collect(),
                    PointValue::Gauge(to_f64(p.value())),
                ));
            }
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

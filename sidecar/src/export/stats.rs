//! Export self-statistics: what the span queue and the exporters did, as lock-free counters read
//! by `/stats` and reported as the OpenTelemetry SDK self-observability metrics
//! (semantic conventions "OTel SDK metrics": `otel.sdk.processor.span.*`,
//! `otel.sdk.exporter.*`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::metrics::{Histogram, Meter};
use opentelemetry::KeyValue;

use crate::admin::stats::ExportStatsSnapshot;

/// `otel.component.type` of the span processor.
pub const SPAN_PROCESSOR_TYPE: &str = "batching_span_processor";

/// `error.type` of spans dropped because the queue was full.
pub const ERROR_QUEUE_FULL: &str = "queue_full";

/// `error.type` of an export that did not finish within its timeout.
pub const ERROR_TIMEOUT: &str = "timeout";

/// `error.type` of an export the exporter reported as failed (after its retries).
pub const ERROR_EXPORT_FAILED: &str = "export_failed";

/// Counters of the span queue and of both exporters, shared (`Arc`) between the span processor,
/// the exporter wrappers, `/stats` and the self-observability instruments.
#[derive(Debug, Default)]
pub struct ExportStats {
    spans_dropped: AtomicU64,
    spans_exported: AtomicU64,
    spans_failed: AtomicU64,
    queue_size: AtomicU64,
    queue_capacity: AtomicU64,
    metric_points_exported: AtomicU64,
    metric_points_failed: AtomicU64,
    span_exports: AtomicU64,
    metric_exports: AtomicU64,
    /// `otel.component.type` of the span exporter, set when it is built.
    span_exporter_type: OnceLock<&'static str>,
    /// `otel.component.type` of the metric exporter, set when it is built.
    metric_exporter_type: OnceLock<&'static str>,
    /// `otel.sdk.exporter.operation.duration`, available once [`ExportStats::register`] ran
    /// (the exporters are built before the meter provider exists).
    duration: OnceLock<Histogram<f64>>,
}

/// Which exporter an export belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportSignal {
    /// The span exporter.
    Spans,
    /// The metric exporter.
    Metrics,
}

impl ExportStats {
    /// Fresh counters.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records the `otel.component.type` of an exporter (e.g. `otlp_grpc_span_exporter`); the
    /// first call per signal wins.
    pub fn set_exporter_type(&self, signal: ExportSignal, component_type: &'static str) {
        let cell = match signal {
            ExportSignal::Spans => &self.span_exporter_type,
            ExportSignal::Metrics => &self.metric_exporter_type,
        };
        // Already set: keep the first (one exporter per signal and pipeline).
        let _ = cell.set(component_type);
    }

    fn exporter_type(&self, signal: ExportSignal) -> &'static str {
        match signal {
            ExportSignal::Spans => self
                .span_exporter_type
                .get()
                .copied()
                .unwrap_or("span_exporter"),
            ExportSignal::Metrics => self
                .metric_exporter_type
                .get()
                .copied()
                .unwrap_or("metric_exporter"),
        }
    }

    /// Sets the queue capacity (the span processor does, once).
    pub fn set_queue_capacity(&self, capacity: usize) {
        self.queue_capacity
            .store(capacity as u64, Ordering::Relaxed);
    }

    /// The current queue length (the span processor updates it on every push and pop).
    pub fn set_queue_size(&self, size: usize) {
        self.queue_size.store(size as u64, Ordering::Relaxed);
    }

    /// One span dropped because the queue was full.
    pub fn span_dropped(&self) {
        self.spans_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// One finished export of `items` spans or metric data points: `error` is the `error.type`
    /// when it failed. Counts the items and records the duration.
    pub fn record_export(
        &self,
        signal: ExportSignal,
        items: u64,
        error: Option<&'static str>,
        duration: Duration,
    ) {
        let (exported, failed, exports) = match signal {
            ExportSignal::Spans => (&self.spans_exported, &self.spans_failed, &self.span_exports),
            ExportSignal::Metrics => (
                &self.metric_points_exported,
                &self.metric_points_failed,
                &self.metric_exports,
            ),
        };
        exports.fetch_add(1, Ordering::Relaxed);
        match error {
            None => exported.fetch_add(items, Ordering::Relaxed),
            Some(_) => failed.fetch_add(items, Ordering::Relaxed),
        };
        if let Some(h) = self.duration.get() {
            let mut attrs = self.component_attrs(signal).to_vec();
            if let Some(e) = error {
                attrs.push(KeyValue::new("error.type", e));
            }
            h.record(duration.as_secs_f64(), &attrs);
        }
    }

    fn component_attrs(&self, signal: ExportSignal) -> [KeyValue; 2] {
        let ty = self.exporter_type(signal);
        [
            KeyValue::new("otel.component.type", ty),
            KeyValue::new("otel.component.name", format!("{ty}/0")),
        ]
    }

    /// Spans the exporter accepted.
    pub fn spans_exported(&self) -> u64 {
        self.spans_exported.load(Ordering::Relaxed)
    }

    /// Spans dropped because the queue was full.
    pub fn spans_dropped(&self) -> u64 {
        self.spans_dropped.load(Ordering::Relaxed)
    }

    /// Spans in failed exports.
    pub fn spans_failed(&self) -> u64 {
        self.spans_failed.load(Ordering::Relaxed)
    }

    /// Span export calls that finished (successful or not).
    pub fn span_exports(&self) -> u64 {
        self.span_exports.load(Ordering::Relaxed)
    }

    /// Metric export calls that finished (successful or not).
    pub fn metric_exports(&self) -> u64 {
        self.metric_exports.load(Ordering::Relaxed)
    }

    /// The counters now, for `/stats`.
    pub fn snapshot(&self) -> ExportStatsSnapshot {
        ExportStatsSnapshot {
            spans_exported: self.spans_exported.load(Ordering::Relaxed),
            spans_dropped: self.spans_dropped.load(Ordering::Relaxed),
            spans_failed: self.spans_failed.load(Ordering::Relaxed),
            queue_size: self.queue_size.load(Ordering::Relaxed),
            queue_capacity: self.queue_capacity.load(Ordering::Relaxed),
            metric_points_exported: self.metric_points_exported.load(Ordering::Relaxed),
            metric_points_failed: self.metric_points_failed.load(Ordering::Relaxed),
        }
    }

    /// Creates the SDK self-observability instruments on `meter` (observable ones read these
    /// counters at every collection; the duration histogram is recorded from then on):
    ///
    /// - `otel.sdk.processor.span.processed` `{span}`: spans handed to the exporter, and
    ///   `error.type=queue_full` for spans dropped at a full queue;
    /// - `otel.sdk.processor.span.queue.size` / `.queue.capacity` `{span}`;
    /// - `otel.sdk.exporter.span.exported` `{span}` and
    ///   `otel.sdk.exporter.metric_data_point.exported` `{data_point}`, with `error.type` on
    ///   the failed ones;
    /// - `otel.sdk.exporter.operation.duration` `s`, with `error.type` when failed.
    ///
    /// Every instrument carries `otel.component.type` and `otel.component.name`.
    pub fn register(self: &Arc<Self>, meter: &Meter) {
        let processor = [
            KeyValue::new("otel.component.type", SPAN_PROCESSOR_TYPE),
            KeyValue::new("otel.component.name", format!("{SPAN_PROCESSOR_TYPE}/0")),
        ];
        let with_error = |base: &[KeyValue], e: &'static str| {
            let mut v = base.to_vec();
            v.push(KeyValue::new("error.type", e));
            v
        };

        let (s, ok, dropped) = (
            Arc::clone(self),
            processor.to_vec(),
            with_error(&processor, ERROR_QUEUE_FULL),
        );
        meter
            .u64_observable_counter("otel.sdk.processor.span.processed")
            .with_unit("{span}")
            .with_description("The number of spans for which the processing has finished, either successful or failed")
            .with_callback(move |o| {
                let handed = s.spans_exported.load(Ordering::Relaxed)
                    + s.spans_failed.load(Ordering::Relaxed);
                o.observe(handed, &ok);
                o.observe(s.spans_dropped.load(Ordering::Relaxed), &dropped);
            })
            .build();

        let (s, attrs) = (Arc::clone(self), processor.to_vec());
        meter
            .i64_observable_up_down_counter("otel.sdk.processor.span.queue.size")
            .with_unit("{span}")
            .with_description(
                "The number of spans in the queue of a given instance of an SDK span processor",
            )
            .with_callback(move |o| {
                let v = s.queue_size.load(Ordering::Relaxed);
                o.observe(i64::try_from(v).unwrap_or(i64::MAX), &attrs);
            })
            .build();

        let (s, attrs) = (Arc::clone(self), processor.to_vec());
        meter
            .i64_observable_up_down_counter("otel.sdk.processor.span.queue.capacity")
            .with_unit("{span}")
            .with_description("The maximum number of spans the queue of a given instance of an SDK span processor can hold")
            .with_callback(move |o| {
                let v = s.queue_capacity.load(Ordering::Relaxed);
                o.observe(i64::try_from(v).unwrap_or(i64::MAX), &attrs);
            })
            .build();

        let s = Arc::clone(self);
        meter
            .u64_observable_counter("otel.sdk.exporter.span.exported")
            .with_unit("{span}")
            .with_description("The number of spans for which the export has finished, either successful or failed")
            .with_callback(move |o| {
                let base = s.component_attrs(ExportSignal::Spans);
                o.observe(s.spans_exported.load(Ordering::Relaxed), &base);
                o.observe(
                    s.spans_failed.load(Ordering::Relaxed),
                    &with_error(&base, ERROR_EXPORT_FAILED),
                );
            })
            .build();

        let s = Arc::clone(self);
        meter
            .u64_observable_counter("otel.sdk.exporter.metric_data_point.exported")
            .with_unit("{data_point}")
            .with_description("The number of metric data points for which the export has finished, either successful or failed")
            .with_callback(move |o| {
                let base = s.component_attrs(ExportSignal::Metrics);
                o.observe(s.metric_points_exported.load(Ordering::Relaxed), &base);
                o.observe(
                    s.metric_points_failed.load(Ordering::Relaxed),
                    &with_error(&base, ERROR_EXPORT_FAILED),
                );
            })
            .build();

        let histogram = meter
            .f64_histogram("otel.sdk.exporter.operation.duration")
            .with_unit("s")
            .with_description("The duration of exporting a batch of telemetry records")
            .with_boundaries(vec![
                0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                30.0,
            ])
            .build();
        // A second registration keeps the first histogram.
        let _ = self.duration.set(histogram);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
    use opentelemetry_sdk::metrics::reader::MetricReader as _;
    use opentelemetry_sdk::metrics::{ManualReader, SdkMeterProvider};

    fn sum_of(rm: &ResourceMetrics, name: &str, error: Option<&str>) -> Option<i128> {
        let m = rm
            .scope_metrics()
            .flat_map(|s| s.metrics())
            .find(|m| m.name() == name)?;
        let matches = |attrs: Vec<&KeyValue>| {
            let e = attrs
                .iter()
                .find(|kv| kv.key.as_str() == "error.type")
                .map(|kv| kv.value.to_string());
            e.as_deref() == error
        };
        match m.data() {
            AggregatedMetrics::U64(MetricData::Sum(s)) => s
                .data_points()
                .find(|p| matches(p.attributes().collect()))
                .map(|p| i128::from(p.value())),
            AggregatedMetrics::I64(MetricData::Sum(s)) => s
                .data_points()
                .find(|p| matches(p.attributes().collect()))
                .map(|p| i128::from(p.value())),
            AggregatedMetrics::F64(MetricData::Histogram(h)) => h
                .data_points()
                .find(|p| matches(p.attributes().collect()))
                .map(|p| i128::from(p.count())),
            _ => None,
        }
    }

    #[test]
    fn counters_snapshot_and_instruments_agree() {
        let stats = ExportStats::new();
        stats.set_exporter_type(ExportSignal::Spans, "otlp_grpc_span_exporter");
        stats.set_exporter_type(ExportSignal::Metrics, "otlp_grpc_metric_exporter");
        stats.set_queue_capacity(10);
        stats.set_queue_size(3);
        stats.span_dropped();
        stats.span_dropped();
        stats.record_export(ExportSignal::Spans, 5, None, Duration::from_millis(3));

        let reader = ManualReader::builder().build();
        let reader = std::sync::Arc::new(reader);
        let provider = SdkMeterProvider::builder()
            .with_reader(SharedReader(Arc::clone(&reader)))
            .build();
        stats.register(&provider.meter("sidecar"));
        stats.record_export(
            ExportSignal::Spans,
            4,
            Some(ERROR_TIMEOUT),
            Duration::from_secs(1),
        );
        stats.record_export(ExportSignal::Metrics, 7, None, Duration::from_millis(2));
        stats.record_export(
            ExportSignal::Metrics,
            2,
            Some(ERROR_EXPORT_FAILED),
            Duration::ZERO,
        );

        assert_eq!(
            stats.snapshot(),
            ExportStatsSnapshot {
                spans_exported: 5,
                spans_dropped: 2,
                spans_failed: 4,
                queue_size: 3,
                queue_capacity: 10,
                metric_points_exported: 7,
                metric_points_failed: 2,
            }
        );
        assert_eq!(stats.span_exports(), 2);
        assert_eq!(stats.metric_exports(), 2);

        let mut rm = ResourceMetrics::default();
        reader.collect(&mut rm).unwrap();
        let get = |n, e| sum_of(&rm, n, e);
        assert_eq!(get("otel.sdk.processor.span.processed", None), Some(9));
        assert_eq!(
            get("otel.sdk.processor.span.processed", Some("queue_full")),
            Some(2)
        );
        assert_eq!(get("otel.sdk.processor.span.queue.size", None), Some(3));
        assert_eq!(
            get("otel.sdk.processor.span.queue.capacity", None),
            Some(10)
        );
        assert_eq!(get("otel.sdk.exporter.span.exported", None), Some(5));
        assert_eq!(
            get("otel.sdk.exporter.span.exported", Some("export_failed")),
            Some(4)
        );
        assert_eq!(
            get("otel.sdk.exporter.metric_data_point.exported", None),
            Some(7)
        );
        // Durations are recorded only after register: one span failure, two metric exports.
        assert_eq!(
            get("otel.sdk.exporter.operation.duration", Some("timeout")),
            Some(1)
        );
        let m = rm
            .scope_metrics()
            .flat_map(|s| s.metrics())
            .find(|m| m.name() == "otel.sdk.exporter.span.exported")
            .unwrap();
        assert_eq!(m.unit(), "{span}");
        let AggregatedMetrics::U64(MetricData::Sum(s)) = m.data() else {
            panic!("not a u64 sum");
        };
        let p = s.data_points().next().unwrap();
        let ty = p
            .attributes()
            .find(|kv| kv.key.as_str() == "otel.component.type")
            .unwrap();
        assert_eq!(ty.value.to_string(), "otlp_grpc_span_exporter");
    }

    /// Lets the test keep a handle on the reader the provider owns.
    #[derive(Debug, Clone)]
    struct SharedReader(Arc<ManualReader>);

    impl opentelemetry_sdk::metrics::reader::MetricReader for SharedReader {
        fn register_pipeline(
            &self,
            pipeline: std::sync::Weak<opentelemetry_sdk::metrics::Pipeline>,
        ) {
            self.0.register_pipeline(pipeline);
        }
        fn collect(&self, rm: &mut ResourceMetrics) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.collect(rm)
        }
        fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.force_flush()
        }
        fn shutdown_with_timeout(
            &self,
            timeout: Duration,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.shutdown_with_timeout(timeout)
        }
        fn temporality(
            &self,
            kind: opentelemetry_sdk::metrics::InstrumentKind,
        ) -> opentelemetry_sdk::metrics::Temporality {
            self.0.temporality(kind)
        }
    }
}

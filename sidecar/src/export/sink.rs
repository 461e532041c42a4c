//! Default local sink (used when no OTLP endpoint is configured): a span exporter and a metric
//! exporter that append one OTLP/JSON object per line (`ExportTraceServiceRequest` /
//! `ExportMetricsServiceRequest`) to a file. File errors are logged, never fatal.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

use super::{LogLimiter, FAILURE_LOG_INTERVAL};

/// The file both sink exporters append to. Opened (with its parent directories) on first use
/// and again after a write error.
#[derive(Debug)]
pub struct SinkFile {
    path: PathBuf,
    file: Mutex<Option<File>>,
    log: LogLimiter,
}

impl SinkFile {
    /// A sink appending to `path`; nothing is created until the first line is written.
    pub fn new(path: impl Into<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            path: path.into(),
            file: Mutex::new(None),
            log: LogLimiter::new("writing the telemetry sink file", FAILURE_LOG_INTERVAL),
        })
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> std::io::Result<File> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
    }

    /// Appends `line` and a newline in one write. Errors are logged (rate-limited) and the
    /// file is reopened on the next call.
    fn append_line(&self, mut line: Vec<u8>) {
        line.push(b'\n');
        let mut guard = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let file = match guard.as_mut() {
            Some(f) => f,
            None => match self.open() {
                Ok(f) => guard.insert(f),
                Err(e) => {
                    self.log
                        .failed(&format_args!("{}: {e}", self.path.display()));
                    return;
                }
            },
        };
        if let Err(e) = file.write_all(&line) {
            self.log
                .failed(&format_args!("{}: {e}", self.path.display()));
            *guard = None;
        }
    }

    fn append_json<T: serde::Serialize>(&self, value: &T) {
        match serde_json::to_vec(value) {
            Ok(line) => self.append_line(line),
            Err(e) => {
                self.log.failed(&format_args!("encoding OTLP/JSON: {e}"));
            }
        }
    }

    fn sync(&self) -> OTelSdkResult {
        let guard = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = guard.as_ref() {
            if let Err(e) = f.sync_data() {
                self.log
                    .failed(&format_args!("{}: {e}", self.path.display()));
            }
        }
        Ok(())
    }

    /// Write failures seen so far.
    pub fn failures(&self) -> u64 {
        self.log.total()
    }
}

/// Span exporter writing `ExportTraceServiceRequest` lines.
#[derive(Debug)]
pub struct SinkSpanExporter {
    file: Arc<SinkFile>,
    resource: ResourceAttributesWithSchema,
}

impl SinkSpanExporter {
    /// An exporter appending to `file`.
    pub fn new(file: Arc<SinkFile>) -> Self {
        Self {
            file,
            resource: ResourceAttributesWithSchema::default(),
        }
    }
}

impl SpanExporter for SinkSpanExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if batch.is_empty() {
            return Ok(());
        }
        let request = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &self.resource),
        };
        self.file.append_json(&request);
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.file.sync()
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.file.sync()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.into();
    }
}

/// Metric exporter writing `ExportMetricsServiceRequest` lines (cumulative temporality).
#[derive(Debug)]
pub struct SinkMetricExporter {
    file: Arc<SinkFile>,
}

impl SinkMetricExporter {
    /// An exporter appending to `file`.
    pub fn new(file: Arc<SinkFile>) -> Self {
        Self { file }
    }
}

impl PushMetricExporter for SinkMetricExporter {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let request = ExportMetricsServiceRequest::from(metrics);
        // An export with no data point at all carries nothing worth a line.
        let empty = request
            .resource_metrics
            .iter()
            .all(|rm| rm.scope_metrics.iter().all(|sm| sm.metrics.is_empty()));
        if !empty {
            self.file.append_json(&request);
        }
        Ok(())
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.file.sync()
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.file.sync()
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{HttpRequestEnd, HttpRequestStart, HttpVersion, Telemetry};
    use opentelemetry_proto::tonic::common::v1::any_value::Value as PValue;
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
    use opentelemetry_sdk::trace::{SdkTracerProvider, SimpleSpanProcessor};
    use sidecar_tests::tempdir::TempDir;
    use std::time::SystemTime;

    fn str_attr<'a>(
        attrs: &'a [opentelemetry_proto::tonic::common::v1::KeyValue],
        key: &str,
    ) -> Option<&'a PValue> {
        attrs
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    #[test]
    fn sink_writes_otlp_json_lines_that_parse_back() {
        let dir = TempDir::create("sink-roundtrip").unwrap();
        // Parent directories do not exist yet: the sink creates them.
        let path = dir.path().join("nested/telemetry.jsonl");
        let file = SinkFile::new(&path);
        let resource = Resource::builder().with_service_name("sink-test").build();
        let tp = SdkTracerProvider::builder()
            .with_span_processor(SimpleSpanProcessor::new(SinkSpanExporter::new(
                file.clone(),
            )))
            .with_resource(resource.clone())
            .build();
        let reader = PeriodicReader::builder(SinkMetricExporter::new(file.clone()))
            .with_interval(Duration::from_secs(3600))
            .build();
        let mp = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        let telemetry = Telemetry::new(
            &tp,
            &mp,
            Arc::new(crate::export::summary::Summary::new()),
            crate::telemetry::url::Redactor::default(),
        );
        let start = SystemTime::now();
        let req = telemetry.client_request_start(&HttpRequestStart {
            method: "GET",
            target: "/items?token=s3cret",
            host: Some("items.svc:8080"),
            version: HttpVersion::Http11,
            destination: "10.0.0.3:8080".parse().unwrap(),
            traceparent: None,
            tracestate: None,
            start,
            reused_connection: false,
        });
        telemetry.client_request_end(
            req,
            HttpRequestEnd {
                status: Some(200),
                request_body_bytes: 0,
                response_body_bytes: 42,
                error: None,
                end: start + Duration::from_millis(12),
            },
        );
        tp.force_flush().unwrap();
        mp.force_flush().unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "one span line, one metric line: {text}");
        assert!(!text.contains("s3cret"));

        let traces: ExportTraceServiceRequest = serde_json::from_str(lines[0]).unwrap();
        let rs = &traces.resource_spans[0];
        let res_attrs = &rs.resource.as_ref().unwrap().attributes;
        assert_eq!(
            str_attr(res_attrs, "service.name"),
            Some(&PValue::StringValue("sink-test".into()))
        );
        let span = &rs.scope_spans[0].spans[0];
        assert_eq!(span.name, "GET");
        assert_eq!(span.trace_id.len(), 16);
        assert_eq!(
            str_attr(&span.attributes, "url.full"),
            Some(&PValue::StringValue(
                "http://items.svc:8080/items?token=REDACTED".into()
            ))
        );
        // OTLP/JSON spells ids as hex and field names in camelCase.
        let raw: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        let raw_span = &raw["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(raw_span["traceId"].as_str().unwrap().len(), 32);

        let metrics: ExportMetricsServiceRequest = serde_json::from_str(lines[1]).unwrap();
        let all: Vec<_> = metrics.resource_metrics[0]
            .scope_metrics
            .iter()
            .flat_map(|s| s.metrics.iter())
            .collect();
        let duration = all
            .iter()
            .find(|m| m.name == "http.client.request.duration")
            .unwrap();
        assert_eq!(duration.unit, "s");
        let Some(Data::Histogram(h)) = &duration.data else {
            panic!("not a histogram: {duration:?}");
        };
        assert_eq!(h.data_points.len(), 1);
        assert_eq!(h.data_points[0].count, 1);
        assert!((h.data_points[0].sum.unwrap() - 0.012).abs() < 1e-9);
        drop(telemetry);
        tp.shutdown().unwrap();
        mp.shutdown().unwrap();
    }

    #[test]
    fn unwritable_path_is_logged_not_fatal() {
        let dir = TempDir::create("sink-unwritable").unwrap();
        // A regular file where a directory is needed: create_dir_all fails.
        let blocker = dir.join("blocker");
        std::fs::write(&blocker, b"x").unwrap();
        let file = SinkFile::new(blocker.join("telemetry.jsonl"));
        file.append_json(&serde_json::json!({"a": 1}));
        file.append_json(&serde_json::json!({"a": 2}));
        assert_eq!(file.failures(), 2);
        assert!(file.sync().is_ok());
    }

    #[test]
    fn lines_are_appended_to_an_existing_file() {
        let dir = TempDir::create("sink-append").unwrap();
        let path = dir.join("t.jsonl");
        std::fs::write(&path, b"{\"earlier\":true}\n").unwrap();
        let file = SinkFile::new(&path);
        file.append_json(&serde_json::json!({"later": true}));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"earlier\":true}\n{\"later\":true}\n");
        assert_eq!(file.path(), path);
    }
}

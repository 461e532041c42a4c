//! OTLP over gRPC (opentelemetry-otlp with tonic): span and metric exporters with cumulative
//! temporality, wrapped so failures are logged at a limited rate and never reach the proxy.

use std::fmt;
use std::time::Duration;

use opentelemetry_otlp::{ExporterBuildError, WithExportConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

use super::{LogLimiter, FAILURE_LOG_INTERVAL};

/// An exporter whose export failures are logged through a [`LogLimiter`] and then reported to
/// the SDK as success, so the SDK does not log every failed batch again. (Retry with backoff
/// happens inside the OTLP exporter; the SDK queues are bounded and drop when full.)
pub struct Logged<E> {
    inner: E,
    log: LogLimiter,
}

impl<E> Logged<E> {
    /// Wraps `inner`; `what` names it in log lines.
    pub fn new(inner: E, what: &'static str) -> Self {
        Self {
            inner,
            log: LogLimiter::new(what, FAILURE_LOG_INTERVAL),
        }
    }

    /// Export failures seen so far.
    pub fn failures(&self) -> u64 {
        self.log.total()
    }
}

impl<E: fmt::Debug> fmt::Debug for Logged<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Logged")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<E: SpanExporter> SpanExporter for Logged<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if let Err(e) = self.inner.export(batch).await {
            self.log.failed(&e);
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: PushMetricExporter> PushMetricExporter for Logged<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        if let Err(e) = self.inner.export(metrics).await {
            self.log.failed(&e);
        }
        Ok(())
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// OTLP/gRPC span exporter for `endpoint` (e.g. `http://collector:4317`). Must be called inside
/// a tokio runtime: the gRPC channel's worker runs on it.
pub fn span_exporter(
    endpoint: &str,
) -> Result<Logged<opentelemetry_otlp::SpanExporter>, ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    Ok(Logged::new(exporter, "OTLP span export"))
}

/// OTLP/gRPC metric exporter for `endpoint`, cumulative temporality. Must be called inside a
/// tokio runtime.
pub fn metric_exporter(
    endpoint: &str,
) -> Result<Logged<opentelemetry_otlp::MetricExporter>, ExporterBuildError> {
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_temporality(Temporality::Cumulative)
        .build()?;
    Ok(Logged::new(exporter, "OTLP metric export"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::error::OTelSdkError;

    #[derive(Debug)]
    struct Failing;

    impl SpanExporter for Failing {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            Err(OTelSdkError::InternalFailure("collector down".into()))
        }
    }

    #[tokio::test]
    async fn failures_are_counted_and_hidden_from_the_sdk() {
        let e = Logged::new(Failing, "test export");
        assert!(e.export(Vec::new()).await.is_ok());
        assert!(e.export(Vec::new()).await.is_ok());
        assert_eq!(e.failures(), 2);
    }

    #[tokio::test]
    async fn exporters_build_for_a_valid_endpoint_and_reject_a_bad_one() {
        assert!(span_exporter("http://127.0.0.1:4317").is_ok());
        assert!(metric_exporter("http://127.0.0.1:4317").is_ok());
        assert!(span_exporter("not a uri").is_err());
    }
}

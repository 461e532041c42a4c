//! OTLP exporters (opentelemetry-otlp): gRPC (tonic) or http/protobuf (hyper with rustls), with
//! headers, gzip, TLS/mTLS, retries and the configured metric temporality, each wrapped in
//! [`Counted`], which counts what was exported or failed into [`ExportStats`], times every
//! export and logs failures at a limited rate.
//!
//! Retries: a failed export is retried on retryable errors only (gRPC `UNAVAILABLE`,
//! `CANCELLED`, `DEADLINE_EXCEEDED`, `ABORTED`, `OUT_OF_RANGE`, `DATA_LOSS`, and
//! `RESOURCE_EXHAUSTED` with `RetryInfo`; HTTP 429/502/503/504 and requests without a
//! response), honouring the server's gRPC `RetryInfo` or HTTP `Retry-After`, with exponential
//! backoff and jitter:
//! [`RETRY_MAX_RETRIES`] retries, starting at [`RETRY_INITIAL_DELAY`], doubling up to
//! [`RETRY_MAX_DELAY`], plus up to [`RETRY_MAX_JITTER`]. The signal timeout
//! (`OTEL_EXPORTER_OTLP_[SIGNAL_]TIMEOUT`) is the budget of one export *including* its retries:
//! no retry starts, and no backoff sleeps, past it. On top of that the span processor cuts every
//! export at `OTEL_BSP_EXPORT_TIMEOUT` and [`Counted`] cuts a metric export at
//! `OTEL_METRIC_EXPORT_TIMEOUT`.
//!
//! opentelemetry-otlp also reads `OTEL_EXPORTER_OTLP_[SIGNAL_]HEADERS` (merged over the
//! configured headers), `..._COMPRESSION`, `..._TIMEOUT` and `..._INSECURE` from the process
//! environment. `sidecar run` removes every `OTEL_EXPORTER_OTLP_*` variable from its own
//! environment once the configuration is resolved (`crate::run`), so only the values resolved
//! by [`ExportOptions::resolve`](super::config::ExportOptions::resolve), with their documented
//! precedence, reach the exporters; `e2e_export` checks that flag headers are not mixed with
//! the environment's.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_rustls::ConfigBuilderExt as _;
use opentelemetry_otlp::{
    ExporterBuildError, Protocol, RetryPolicy, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::config::{
    Compression, OtlpProtocol, SignalSettings, TemporalityPreference, TlsSettings,
};
use super::stats::{ExportSignal, ExportStats, ERROR_EXPORT_FAILED, ERROR_TIMEOUT};
use super::{LogLimiter, FAILURE_LOG_INTERVAL};

/// Retries after the first attempt of one export.
pub const RETRY_MAX_RETRIES: usize = 5;
/// Backoff before the first retry.
pub const RETRY_INITIAL_DELAY: Duration = Duration::from_millis(100);
/// Largest backoff between two attempts (a server's `RetryInfo` / `Retry-After` may raise it,
/// within the export's timeout).
pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(2);
/// Largest random jitter added to each backoff.
pub const RETRY_MAX_JITTER: Duration = Duration::from_millis(100);

/// Files whose PEM roots verify a gRPC collector when no `..._CERTIFICATE` is configured (the
/// first readable one wins; `SSL_CERT_FILE` first). The http/protobuf exporter uses the
/// platform's roots through rustls-native-certs instead.
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Why an exporter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ExportBuildError {
    /// opentelemetry-otlp rejected the configuration (usually the endpoint).
    #[error(transparent)]
    Otlp(#[from] ExporterBuildError),
    /// A certificate or key file cannot be read or is not PEM.
    #[error("cannot use the {what} `{}`: {problem}", path.display())]
    TlsFile {
        /// `CA certificate`, `client certificate` or `client key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// No CA is configured and the system has no usable roots.
    #[error("no CA certificate configured and no system roots found: {0}")]
    NoRoots(String),
    /// The TLS client configuration is invalid (e.g. the key does not match the certificate).
    #[error("invalid TLS client configuration: {0}")]
    Tls(String),
    /// Built outside a tokio runtime.
    #[error("the exporter must be built inside a tokio runtime")]
    NoRuntime,
    /// A header cannot be sent as gRPC metadata or an HTTP header.
    #[error("header `{0}` cannot be sent")]
    Header(String),
}

/// A span or metric exporter that counts exported and failed items into [`ExportStats`],
/// records each export's duration, and logs failures through a [`LogLimiter`].
///
/// Span export failures are returned to the caller (the sidecar's own
/// [`BoundedBatchProcessor`](super::batch::BoundedBatchProcessor) does not log them again and
/// reports them from `force_flush`). Metric export failures are reported to the SDK's periodic
/// reader as success, so it does not log every failed collection a second time.
pub struct Counted<E> {
    inner: E,
    signal: ExportSignal,
    stats: Arc<ExportStats>,
    log: LogLimiter,
    /// Runtime the export futures run on when polled outside one (the SDK's periodic reader
    /// polls on its own thread; hyper and tonic need tokio), and the bound of one export.
    runtime: Option<(tokio::runtime::Handle, Duration)>,
    /// Overrides the inner metric exporter's temporality.
    temporality: Option<Temporality>,
}

impl<E> Counted<E> {
    /// Wraps `inner`; `component_type` is its `otel.component.type`
    /// (e.g. `otlp_grpc_span_exporter`).
    pub fn new(
        inner: E,
        signal: ExportSignal,
        component_type: &'static str,
        stats: Arc<ExportStats>,
    ) -> Self {
        stats.set_exporter_type(signal, component_type);
        let what = match signal {
            ExportSignal::Spans => "span export",
            ExportSignal::Metrics => "metric export",
        };
        Self {
            inner,
            signal,
            stats,
            log: LogLimiter::new(what, FAILURE_LOG_INTERVAL),
            runtime: None,
            temporality: None,
        }
    }

    /// Reports `temporality` to the SDK instead of the inner metric exporter's own (for
    /// exporters with a fixed one, like the local sink).
    pub fn with_temporality(mut self, temporality: Temporality) -> Self {
        self.temporality = Some(temporality);
        self
    }

    /// Runs every export on `runtime` when it is polled outside a tokio runtime, cut at
    /// `timeout` (counted as failed, `error.type=timeout`).
    pub fn on_runtime(mut self, runtime: tokio::runtime::Handle, timeout: Duration) -> Self {
        self.runtime = Some((runtime, timeout));
        self
    }

    /// Export failures seen so far.
    pub fn failures(&self) -> u64 {
        self.log.total()
    }

    fn finished(&self, items: u64, result: &OTelSdkResult, started: Instant) {
        let error = match result {
            Ok(()) => None,
            Err(OTelSdkError::Timeout(_)) => Some(ERROR_TIMEOUT),
            Err(_) => Some(ERROR_EXPORT_FAILED),
        };
        self.stats
            .record_export(self.signal, items, error, started.elapsed());
        if let Err(e) = result {
            self.log.failed(e);
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for Counted<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counted")
            .field("inner", &self.inner)
            .field("signal", &self.signal)
            .finish_non_exhaustive()
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let started = Instant::now();
        let result = self.inner.export(batch).await;
        self.finished(n, &result, started);
        result
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

impl<E: PushMetricExporter> PushMetricExporter for Counted<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let n = count_points(metrics);
        let started = Instant::now();
        let result = match &self.runtime {
            // Outside a runtime (the periodic reader's thread): drive the export on it.
            Some((rt, timeout)) if tokio::runtime::Handle::try_current().is_err() => rt
                .block_on(async {
                    tokio::time::timeout(*timeout, self.inner.export(metrics)).await
                })
                .unwrap_or(Err(OTelSdkError::Timeout(*timeout))),
            _ => self.inner.export(metrics).await,
        };
        self.finished(n, &result, started);
        Ok(())
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.temporality.unwrap_or_else(|| self.inner.temporality())
    }
}

/// Data points in one collection.
pub fn count_points(metrics: &ResourceMetrics) -> u64 {
    fn points<T>(d: &MetricData<T>) -> usize {
        match d {
            MetricData::Gauge(g) => g.data_points().count(),
            MetricData::Sum(s) => s.data_points().count(),
            MetricData::Histogram(h) => h.data_points().count(),
            MetricData::ExponentialHistogram(h) => h.data_points().count(),
        }
    }
    metrics
        .scope_metrics()
        .flat_map(|s| s.metrics())
        .map(|m| match m.data() {
            AggregatedMetrics::F64(d) => points(d),
            AggregatedMetrics::U64(d) => points(d),
            AggregatedMetrics::I64(d) => points(d),
        } as u64)
        .sum()
}

/// The SDK temporality of a preference.
pub fn temporality(preference: TemporalityPreference) -> Temporality {
    match preference {
        TemporalityPreference::Cumulative => Temporality::Cumulative,
        TemporalityPreference::Delta => Temporality::Delta,
        TemporalityPreference::LowMemory => Temporality::LowMemory,
    }
}

/// The retry policy of every exporter (see the module documentation).
pub fn retry_policy() -> RetryPolicy {
    RetryPolicy::recommended()
        .with_max_retries(RETRY_MAX_RETRIES)
        .with_initial_delay(RETRY_INITIAL_DELAY)
        .with_max_delay(RETRY_MAX_DELAY)
        .with_max_jitter(RETRY_MAX_JITTER)
}

/// `otel.component.type` of the exporter for `s`.
fn component_type(s: &SignalSettings, signal: ExportSignal) -> &'static str {
    match (s.protocol, signal) {
        (OtlpProtocol::Grpc, ExportSignal::Spans) => "otlp_grpc_span_exporter",
        (OtlpProtocol::Grpc, ExportSignal::Metrics) => "otlp_grpc_metric_exporter",
        (OtlpProtocol::HttpProtobuf, ExportSignal::Spans) => "otlp_http_span_exporter",
        (OtlpProtocol::HttpProtobuf, ExportSignal::Metrics) => "otlp_http_metric_exporter",
    }
}

/// OTLP span exporter for `s`. Must be called inside a tokio runtime (the gRPC channel's
/// worker runs on it); exports must be polled within that runtime's context (the
/// [`BoundedBatchProcessor`](super::batch::BoundedBatchProcessor) does).
pub fn span_exporter(
    s: &SignalSettings,
    stats: Arc<ExportStats>,
) -> Result<Counted<opentelemetry_otlp::SpanExporter>, ExportBuildError> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let exporter = match s.protocol {
        OtlpProtocol::Grpc => tonic_settings(builder.with_tonic(), s)?.build()?,
        OtlpProtocol::HttpProtobuf => http_settings(builder.with_http(), s)?.build()?,
    };
    Ok(Counted::new(
        exporter,
        ExportSignal::Spans,
        component_type(s, ExportSignal::Spans),
        stats,
    ))
}

/// OTLP metric exporter for `s` with `temporality`. Must be called inside a tokio runtime;
/// its exports run on that runtime (captured here) and are cut at `export_timeout`.
pub fn metric_exporter(
    s: &SignalSettings,
    temporality: TemporalityPreference,
    export_timeout: Duration,
    stats: Arc<ExportStats>,
) -> Result<Counted<opentelemetry_otlp::MetricExporter>, ExportBuildError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| ExportBuildError::NoRuntime)?;
    let builder = opentelemetry_otlp::MetricExporter::builder();
    let temporality = self::temporality(temporality);
    let exporter = match s.protocol {
        OtlpProtocol::Grpc => tonic_settings(builder.with_tonic(), s)?
            .with_temporality(temporality)
            .build()?,
        OtlpProtocol::HttpProtobuf => http_settings(builder.with_http(), s)?
            .with_temporality(temporality)
            .build()?,
    };
    Ok(Counted::new(
        exporter,
        ExportSignal::Metrics,
        component_type(s, ExportSignal::Metrics),
        stats,
    )
    .on_runtime(runtime, export_timeout))
}

/// Applies the signal's gRPC settings (endpoint, timeout, metadata, retries, gzip, TLS) to a
/// span or metric exporter builder.
fn tonic_settings<B: WithExportConfig + WithTonicConfig>(
    b: B,
    s: &SignalSettings,
) -> Result<B, ExportBuildError> {
    let mut b = b
        .with_endpoint(s.endpoint.clone())
        .with_timeout(s.timeout)
        .with_metadata(metadata(&s.headers)?)
        .with_retry_policy(retry_policy());
    if s.compression == Compression::Gzip {
        b = b.with_compression(opentelemetry_otlp::Compression::Gzip);
    }
    if let Some(tls) = &s.tls {
        b = b.with_tls_config(tonic_tls(tls)?);
    }
    Ok(b)
}

/// Applies the signal's http/protobuf settings (endpoint, timeout, headers, client with its
/// TLS, retries, gzip) to a span or metric exporter builder.
fn http_settings<B: WithExportConfig + WithHttpConfig>(
    b: B,
    s: &SignalSettings,
) -> Result<B, ExportBuildError> {
    let mut b = b
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(s.endpoint.clone())
        .with_timeout(s.timeout)
        .with_headers(http_headers(&s.headers))
        .with_http_client(http_client(s)?)
        .with_retry_policy(retry_policy());
    if s.compression == Compression::Gzip {
        b = b.with_compression(opentelemetry_otlp::Compression::Gzip);
    }
    Ok(b)
}

fn metadata(
    headers: &[(String, String)],
) -> Result<tonic::metadata::MetadataMap, ExportBuildError> {
    let mut m = tonic::metadata::MetadataMap::new();
    for (k, v) in headers {
        let key = tonic::metadata::AsciiMetadataKey::from_bytes(k.as_bytes())
            .map_err(|_| ExportBuildError::Header(k.clone()))?;
        let value = tonic::metadata::AsciiMetadataValue::try_from(v.as_str())
            .map_err(|_| ExportBuildError::Header(k.clone()))?;
        m.append(key, value);
    }
    Ok(m)
}

/// opentelemetry-otlp percent-decodes header values given to `with_headers`; ours are decoded
/// already, so escape `%` to keep them as they are.
fn http_headers(headers: &[(String, String)]) -> HashMap<String, String> {
    headers
        .iter()
        .map(|(k, v)| (k.clone(), v.replace('%', "%25")))
        .collect()
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ExportBuildError> {
    std::fs::read(path).map_err(|e| ExportBuildError::TlsFile {
        what,
        path: path.to_owned(),
        problem: e.to_string(),
    })
}

/// tonic TLS: the configured CA (else the system bundle) and the client identity.
fn tonic_tls(tls: &TlsSettings) -> Result<tonic::transport::ClientTlsConfig, ExportBuildError> {
    let ca = match &tls.certificate {
        Some(path) => read("CA certificate", path)?,
        None => system_ca_bundle()?,
    };
    let mut config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    if let (Some(cert), Some(key)) = (&tls.client_certificate, &tls.client_key) {
        config = config.identity(tonic::transport::Identity::from_pem(
            read("client certificate", cert)?,
            read("client key", key)?,
        ));
    }
    Ok(config)
}

fn system_ca_bundle() -> Result<Vec<u8>, ExportBuildError> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let candidates = from_env
        .into_iter()
        .chain(SYSTEM_CA_FILES.iter().map(PathBuf::from));
    for path in candidates {
        if let Ok(pem) = std::fs::read(&path) {
            if CertificateDer::pem_slice_iter(&pem).any(|c| c.is_ok()) {
                return Ok(pem);
            }
        }
    }
    Err(ExportBuildError::NoRoots(format!(
        "none of SSL_CERT_FILE, {} holds a PEM certificate; set OTEL_EXPORTER_OTLP_CERTIFICATE",
        SYSTEM_CA_FILES.join(", ")
    )))
}

/// rustls client configuration (ring): the configured CA or the platform's roots, and the
/// client identity for mTLS.
fn rustls_config(tls: &TlsSettings) -> Result<rustls::ClientConfig, ExportBuildError> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ExportBuildError::Tls(e.to_string()))?;
    let builder = match &tls.certificate {
        Some(path) => {
            let pem = read("CA certificate", path)?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| ExportBuildError::TlsFile {
                    what: "CA certificate",
                    path: path.clone(),
                    problem: e.to_string(),
                })?;
                roots.add(cert).map_err(|e| ExportBuildError::TlsFile {
                    what: "CA certificate",
                    path: path.clone(),
                    problem: e.to_string(),
                })?;
            }
            if roots.is_empty() {
                return Err(ExportBuildError::TlsFile {
                    what: "CA certificate",
                    path: path.clone(),
                    problem: "no PEM certificate in it".into(),
                });
            }
            builder.with_root_certificates(roots)
        }
        None => builder
            .with_native_roots()
            .map_err(|e| ExportBuildError::NoRoots(e.to_string()))?,
    };
    match (&tls.client_certificate, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let pem = read("client certificate", cert)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ExportBuildError::TlsFile {
                    what: "client certificate",
                    path: cert.clone(),
                    problem: e.to_string(),
                })?;
            let key_pem = read("client key", key)?;
            let key_der =
                PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| ExportBuildError::TlsFile {
                    what: "client key",
                    path: key.clone(),
                    problem: e.to_string(),
                })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| ExportBuildError::Tls(e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

type HttpsClient = opentelemetry_http::hyper::HyperClient<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
>;

/// The hyper client of the http/protobuf exporter: rustls for `https://` endpoints, plain TCP
/// otherwise; `s.timeout` bounds each request.
fn http_client(s: &SignalSettings) -> Result<HttpsClient, ExportBuildError> {
    let config = match &s.tls {
        Some(tls) => rustls_config(tls)?,
        // Plain http: the TLS side is never used; no roots needed.
        None => rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ExportBuildError::Tls(e.to_string()))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth(),
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Ok(opentelemetry_http::hyper::HyperClient::new(
        connector, s.timeout, None,
    ))
}

#[cfg(test)]
mod tests;

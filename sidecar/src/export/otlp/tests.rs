//! The real exporters against the in-test receiver (gRPC and OTLP/HTTP): delivery, headers,
//! gzip, TLS and mTLS, a wrong CA, retries after `UNAVAILABLE` / 503, and the counting wrapper.

use std::time::{Duration, Instant, SystemTime};

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::{Span as _, SpanKind, Tracer as _, TracerProvider as _};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use sidecar_tests::otlp::{Fault, OtlpReceiver, Signal, TestCa, Transport};
use sidecar_tests::tempdir::TempDir;

use super::*;
use crate::export::batch::BoundedBatchProcessor;
use crate::export::config::BatchSettings;

const WAIT: Duration = Duration::from_secs(10);

/// Both protocols, each with the endpoint its exporter needs from `rx`.
fn endpoints(rx: &OtlpReceiver) -> [(OtlpProtocol, String, String); 2] {
    [
        (OtlpProtocol::Grpc, rx.endpoint(), rx.endpoint()),
        (
            OtlpProtocol::HttpProtobuf,
            format!("{}/v1/traces", rx.http_endpoint()),
            format!("{}/v1/metrics", rx.http_endpoint()),
        ),
    ]
}

fn settings(protocol: OtlpProtocol, endpoint: &str) -> SignalSettings {
    SignalSettings {
        endpoint: endpoint.to_owned(),
        protocol,
        headers: Vec::new(),
        timeout: Duration::from_secs(5),
        compression: Compression::None,
        tls: None,
    }
}

/// Providers with the real exporters: the bounded span processor and a periodic reader that
/// only exports when flushed.
struct Rig {
    tp: SdkTracerProvider,
    mp: SdkMeterProvider,
    stats: Arc<ExportStats>,
}

fn rig(traces: &SignalSettings, metrics: &SignalSettings) -> Result<Rig, ExportBuildError> {
    let stats = ExportStats::new();
    let spans = span_exporter(traces, Arc::clone(&stats))?;
    let points = metric_exporter(
        metrics,
        TemporalityPreference::Cumulative,
        Duration::from_secs(10),
        Arc::clone(&stats),
    )?;
    let processor = BoundedBatchProcessor::new(
        spans,
        BatchSettings {
            schedule_delay: Duration::from_secs(3600),
            export_timeout: Duration::from_secs(10),
            ..BatchSettings::default()
        },
        Arc::clone(&stats),
        tokio::runtime::Handle::current(),
    )
    .unwrap();
    let resource = Resource::builder().with_service_name("otlp-test").build();
    let tp = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.clone())
        .build();
    let mp = SdkMeterProvider::builder()
        .with_reader(
            PeriodicReader::builder(points)
                .with_interval(Duration::from_secs(3600))
                .build(),
        )
        .with_resource(resource)
        .build();
    Ok(Rig { tp, mp, stats })
}

impl Rig {
    /// One CLIENT span `GET` and `test.counter` += 3.
    fn emit(&self) {
        let tracer = self.tp.tracer("otlp-test");
        let mut span = tracer
            .span_builder("GET")
            .with_kind(SpanKind::Client)
            .with_start_time(SystemTime::now())
            .start(&tracer);
        span.end();
        self.mp
            .meter("otlp-test")
            .u64_counter("test.counter")
            .build()
            .add(3, &[]);
    }

    /// Flushes spans and metrics (blocking SDK calls, off the async workers).
    async fn flush(&self) -> (OTelSdkResult, OTelSdkResult) {
        let (tp, mp) = (self.tp.clone(), self.mp.clone());
        tokio::task::spawn_blocking(move || (tp.force_flush(), mp.force_flush()))
            .await
            .unwrap()
    }

    async fn shutdown(self) {
        let (tp, mp) = (self.tp, self.mp);
        tokio::task::spawn_blocking(move || {
            let _ = tp.shutdown_with_timeout(Duration::from_secs(5));
            let _ = mp.shutdown();
        })
        .await
        .unwrap();
    }
}

async fn http_receiver() -> OtlpReceiver {
    OtlpReceiver::builder().http(true).start().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_arrive_with_headers_and_gzip_over_both_protocols() {
    let rx = http_receiver().await;
    for (protocol, traces_url, metrics_url) in endpoints(&rx) {
        for gzip in [true, false] {
            let before = rx.requests().len();
            let mut t = settings(protocol, &traces_url);
            t.headers = vec![
                ("x-api-key".into(), "s e=c%ret".into()),
                ("x-tenant".into(), "t1".into()),
            ];
            t.compression = if gzip {
                Compression::Gzip
            } else {
                Compression::None
            };
            let mut m = t.clone();
            m.endpoint = metrics_url.clone();
            let r = rig(&t, &m).unwrap();
            r.emit();
            let (spans, metrics) = r.flush().await;
            spans.unwrap();
            metrics.unwrap();

            let requests = &rx.requests()[before..];
            let transport = match protocol {
                OtlpProtocol::Grpc => Transport::Grpc,
                OtlpProtocol::HttpProtobuf => Transport::Http,
            };
            for signal in [Signal::Traces, Signal::Metrics] {
                let req = requests
                    .iter()
                    .find(|q| q.signal == signal)
                    .unwrap_or_else(|| panic!("{protocol:?}: no {signal:?} request"));
                assert_eq!(req.transport, transport);
                assert_eq!(req.header("x-api-key"), Some("s e=c%ret"), "{protocol:?}");
                assert_eq!(req.header("x-tenant"), Some("t1"));
                assert_eq!(req.gzip, gzip, "{protocol:?} {signal:?}");
                assert!(!req.rejected);
            }
            let s = r.stats.snapshot();
            assert_eq!((s.spans_exported, s.spans_failed), (1, 0), "{s:?}");
            assert!(s.metric_points_exported >= 1, "{s:?}");
            assert_eq!(s.metric_points_failed, 0);
            r.shutdown().await;
        }
    }
    let spans = rx.spans();
    assert_eq!(spans.len(), 4, "2 protocols x gzip on/off");
    assert!(spans
        .iter()
        .all(|s| s.name == "GET" && s.is_client() && s.service_name() == Some("otlp-test")));
    // Flushed once per run, exported again at shutdown (cumulative): always 3.
    let counters = rx.metrics_named("test.counter");
    assert!(counters.len() >= 4, "{}", counters.len());
    assert!(counters
        .iter()
        .all(|m| m.points[0].value == sidecar_tests::otlp::PointValue::Int(3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_over_both_protocols() {
    let ca = TestCa::new().unwrap();
    let dir = TempDir::create("otlp-tls").unwrap();
    let files = ca.write_to(dir.path()).unwrap();
    let rx = OtlpReceiver::builder()
        .http(true)
        .tls(&ca.server_cert_pem, &ca.server_key_pem)
        .client_ca(&ca.ca_pem)
        .start()
        .await
        .unwrap();
    assert!(rx.endpoint().starts_with("https://"));
    for (protocol, traces_url, metrics_url) in endpoints(&rx) {
        for mtls in [false, true] {
            let before = rx.requests().len();
            let mut t = settings(protocol, &traces_url);
            t.tls = Some(TlsSettings {
                certificate: Some(files.ca.clone()),
                client_certificate: mtls.then(|| files.client_cert.clone()),
                client_key: mtls.then(|| files.client_key.clone()),
            });
            let mut m = t.clone();
            m.endpoint = metrics_url.clone();
            let r = rig(&t, &m).unwrap();
            r.emit();
            let (spans, metrics) = r.flush().await;
            spans.unwrap();
            metrics.unwrap();
            let requests = &rx.requests()[before..];
            assert!(requests.len() >= 2, "{protocol:?}: {requests:?}");
            for req in requests {
                let want = mtls.then(|| ca.client_cert_der.clone());
                assert_eq!(req.client_cert, want, "{protocol:?} mtls={mtls}");
            }
            assert_eq!(r.stats.snapshot().spans_exported, 1);
            r.shutdown().await;
        }
    }
    assert_eq!(rx.spans().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_and_is_counted() {
    let ca = TestCa::new().unwrap();
    let other = TestCa::new().unwrap();
    let dir = TempDir::create("otlp-wrong-ca").unwrap();
    let files = other.write_to(dir.path()).unwrap();
    let rx = OtlpReceiver::builder()
        .http(true)
        .tls(&ca.server_cert_pem, &ca.server_key_pem)
        .start()
        .await
        .unwrap();
    for (protocol, traces_url, metrics_url) in endpoints(&rx) {
        let mut t = settings(protocol, &traces_url);
        t.timeout = Duration::from_millis(500);
        t.tls = Some(TlsSettings {
            certificate: Some(files.ca.clone()),
            ..TlsSettings::default()
        });
        let mut m = t.clone();
        m.endpoint = metrics_url.clone();
        let r = rig(&t, &m).unwrap();
        r.emit();
        let (spans, metrics) = r.flush().await;
        assert!(spans.is_err(), "{protocol:?}: span export must fail");
        // Metric failures are counted but hidden from the SDK's reader.
        metrics.unwrap();
        let s = r.stats.snapshot();
        assert_eq!(
            (s.spans_exported, s.spans_failed),
            (0, 1),
            "{protocol:?} {s:?}"
        );
        assert_eq!(s.metric_points_exported, 0, "{s:?}");
        assert!(s.metric_points_failed >= 1, "{s:?}");
        r.shutdown().await;
    }
    assert!(rx.spans().is_empty());
    assert!(rx.metrics().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_then_healthy_is_retried_until_it_succeeds() {
    let rx = http_receiver().await;
    for (protocol, traces_url, metrics_url) in endpoints(&rx) {
        let before = rx.rejected_count();
        let requests_before = rx.requests().len();
        rx.set_fault(Fault::Unavailable { retry_after: None });
        let t = settings(protocol, &traces_url);
        let m = settings(protocol, &metrics_url);
        let r = rig(&t, &m).unwrap();
        r.emit();
        // Healthy again after two rejected attempts.
        let healed = async {
            let deadline = Instant::now() + WAIT;
            while rx.rejected_count() < before + 2 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            rx.set_fault(Fault::None);
        };
        let (spans, ()) = tokio::join!(
            async {
                let (tp, stats) = (r.tp.clone(), Arc::clone(&r.stats));
                let res = tokio::task::spawn_blocking(move || tp.force_flush())
                    .await
                    .unwrap();
                (res, stats)
            },
            healed
        );
        let (spans, stats) = spans;
        spans.unwrap();
        let trace_attempts: Vec<_> = rx.requests()[requests_before..]
            .iter()
            .filter(|q| q.signal == Signal::Traces)
            .map(|q| q.rejected)
            .collect();
        assert!(
            trace_attempts.len() >= 3 && trace_attempts.ends_with(&[false]),
            "{protocol:?}: {trace_attempts:?}"
        );
        assert!(trace_attempts.iter().filter(|&&x| x).count() >= 2);
        let s = stats.snapshot();
        assert_eq!((s.spans_exported, s.spans_failed), (1, 0), "{s:?}");
        assert_eq!(stats.span_exports(), 1, "retries happen inside one export");
        r.shutdown().await;
    }
    assert_eq!(rx.spans().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_retry_delay_is_honoured() {
    let rx = http_receiver().await;
    for (protocol, traces_url, _) in endpoints(&rx) {
        // gRPC RetryInfo carries 600 ms; HTTP Retry-After has whole seconds (rounded up: 1 s).
        let (delay, floor) = match protocol {
            OtlpProtocol::Grpc => (Duration::from_millis(600), Duration::from_millis(600)),
            OtlpProtocol::HttpProtobuf => (Duration::from_millis(600), Duration::from_secs(1)),
        };
        let rejected_before = rx.rejected_count();
        rx.set_fault(Fault::Unavailable {
            retry_after: Some(delay),
        });
        let t = settings(protocol, &traces_url);
        let r = rig(&t, &settings(protocol, &rx.endpoint())).unwrap();
        r.emit();
        let started = Instant::now();
        let heal = async {
            let deadline = Instant::now() + WAIT;
            while rx.rejected_count() < rejected_before + 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            rx.set_fault(Fault::None);
        };
        let tp = r.tp.clone();
        let (flushed, ()) = tokio::join!(
            async {
                tokio::task::spawn_blocking(move || tp.force_flush())
                    .await
                    .unwrap()
            },
            heal
        );
        flushed.unwrap();
        let took = started.elapsed();
        assert!(
            took >= floor,
            "{protocol:?}: retried after {took:?}, before the server's {floor:?}"
        );
        assert_eq!(rx.rejected_count(), rejected_before + 1, "{protocol:?}");
        r.shutdown().await;
    }
    assert_eq!(rx.spans().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_errors() {
    let mut bad = settings(OtlpProtocol::Grpc, "not a uri");
    assert!(span_exporter(&bad, ExportStats::new()).is_err());
    bad.protocol = OtlpProtocol::HttpProtobuf;
    assert!(span_exporter(&bad, ExportStats::new()).is_err());

    let mut t = settings(OtlpProtocol::HttpProtobuf, "https://127.0.0.1:1/v1/traces");
    t.tls = Some(TlsSettings {
        certificate: Some("/nonexistent/ca.pem".into()),
        ..TlsSettings::default()
    });
    let e = span_exporter(&t, ExportStats::new()).unwrap_err();
    assert!(
        matches!(
            &e,
            ExportBuildError::TlsFile {
                what: "CA certificate",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");

    let dir = TempDir::create("otlp-bad-pem").unwrap();
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not pem").unwrap();
    t.tls = Some(TlsSettings {
        certificate: Some(junk),
        ..TlsSettings::default()
    });
    let e = span_exporter(&t, ExportStats::new()).unwrap_err();
    assert!(e.to_string().contains("no PEM certificate"), "{e}");

    let grpc = settings(OtlpProtocol::Grpc, "http://127.0.0.1:4317");
    assert!(span_exporter(&grpc, ExportStats::new()).is_ok());
    let http = settings(
        OtlpProtocol::HttpProtobuf,
        "http://127.0.0.1:4318/v1/metrics",
    );
    assert!(metric_exporter(
        &http,
        TemporalityPreference::Delta,
        Duration::from_secs(1),
        ExportStats::new()
    )
    .is_ok());
}

#[test]
fn metric_exporter_needs_a_runtime() {
    let s = settings(OtlpProtocol::Grpc, "http://127.0.0.1:4317");
    let e = metric_exporter(
        &s,
        TemporalityPreference::Cumulative,
        Duration::from_secs(1),
        ExportStats::new(),
    )
    .unwrap_err();
    assert!(matches!(e, ExportBuildError::NoRuntime), "{e}");
}

#[test]
fn temporality_preferences_map_to_the_sdk() {
    assert_eq!(
        temporality(TemporalityPreference::Cumulative),
        Temporality::Cumulative
    );
    assert_eq!(
        temporality(TemporalityPreference::Delta),
        Temporality::Delta
    );
    assert_eq!(
        temporality(TemporalityPreference::LowMemory),
        Temporality::LowMemory
    );
}

#[derive(Debug)]
struct Failing;

impl SpanExporter for Failing {
    async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
        Err(OTelSdkError::InternalFailure("collector down".into()))
    }
}

#[tokio::test]
async fn counted_spans_report_and_count_failures() {
    let stats = ExportStats::new();
    let e = Counted::new(
        Failing,
        ExportSignal::Spans,
        "test_span_exporter",
        Arc::clone(&stats),
    );
    assert!(e.export(Vec::new()).await.is_err());
    assert!(e.export(Vec::new()).await.is_err());
    assert_eq!(e.failures(), 2);
    assert_eq!(stats.span_exports(), 2);
}

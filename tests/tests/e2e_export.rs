//! Privileged end-to-end tests of the export configuration through the real `sidecar` binary:
//! the `OTEL_EXPORTER_OTLP_*` variables (http/protobuf and gRPC, TLS with a test CA and a client
//! certificate, gzip, custom headers), a config file under flags and environment, and the
//! Kubernetes resource attributes from the Downward API environment and labels file, all checked
//! at an in-test OTLP receiver inside the pod namespace.
//!
//! Needs what `e2e.rs` needs (root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool`, the
//! sidecar binary). Run with `--test-threads=1`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use std::io::Write as _;

use sidecar_tests::admin::{self, ADMIN_PORT};
use sidecar_tests::otlp::{RequestInfo, Signal, TestCa, Transport};
use sidecar_tests::{prereq, OtlpReceiver, PodWorld, Sidecar, SidecarConfig};

/// Bound for one client command.
const CLIENT: Duration = Duration::from_secs(30);
/// Bound for telemetry to reach the receiver.
const TELEMETRY: Duration = Duration::from_secs(20);

/// One test's world: the sidecar (dropped first), the receiver, then the namespaces.
struct E2e {
    sidecar: Sidecar,
    rx: OtlpReceiver,
    world: PodWorld,
}

fn id(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Starts the sidecar with no `--otlp-endpoint` of the test bed's defaults: everything about
/// export comes from `env` and `args`.
fn start(world: &PodWorld, args: &[&str], env: &[(&str, String)]) -> Sidecar {
    let cfg = SidecarConfig {
        otlp_endpoint: None,
        service_name: None,
        extra_args: args.iter().map(|s| (*s).to_owned()).collect(),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        ..SidecarConfig::default()
    };
    world.start_sidecar(&cfg).expect("starting the sidecar")
}

/// One request through the proxy; returns its id once its CLIENT span has arrived.
async fn request_and_wait_for_span(t: &E2e) -> sidecar_tests::otlp::ReceivedSpan {
    let rid = id("req");
    let out = t
        .world
        .curl(&[&t.world.url(&format!("/bytes/8?id={rid}"))], CLIENT)
        .expect("running curl");
    assert!(out.success(), "curl failed: {}", out.stderr_str());
    let spans =
        t.rx.wait_for_spans(TELEMETRY, 1, |s| {
            s.attributes
                .str("url.full")
                .is_some_and(|u| u.contains(&rid))
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "no span for {rid}; receiver saw {:?}\n{}",
                t.rx.requests(),
                t.sidecar.log()
            )
        });
    spans[0].clone()
}

fn accepted(rx: &OtlpReceiver, signal: Signal) -> Vec<RequestInfo> {
    rx.requests()
        .into_iter()
        .filter(|r| r.signal == signal && !r.rejected)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_with_mtls_gzip_headers_and_the_kubernetes_resource() {
    prereq::require();
    let world = PodWorld::new("exphttp").expect("building the pod world");
    let ca = TestCa::new().expect("making a test CA");
    let files = ca.write_to(world.dir.path()).expect("writing the CA files");
    let rx = OtlpReceiver::builder()
        .http(true)
        .tls(&ca.server_cert_pem, &ca.server_key_pem)
        .client_ca(&ca.ca_pem)
        .start_in(&world.pod)
        .await
        .expect("starting the receiver");
    let labels = world.dir.path().join("labels");
    std::fs::write(
        &labels,
        "app.kubernetes.io/version=\"1.4.2\"\npod-template-hash=\"7d4b9c8f6d\"\n",
    )
    .expect("writing the labels file");
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.http_endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip".to_owned()),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-tenant=acme, authorization=Bearer%20s3cret".to_owned(),
        ),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", path(&files.ca)),
        (
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            path(&files.client_cert),
        ),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", path(&files.client_key)),
        ("K8S_POD_NAME", "checkout-7d4b9c8f6d-x2x9z".to_owned()),
        ("K8S_NAMESPACE_NAME", "shop".to_owned()),
        (
            "K8S_POD_UID",
            "0b5c9e43-5f0a-4a51-9d3e-2f6f1c3a7b10".to_owned(),
        ),
        ("K8S_NODE_NAME", "node-1".to_owned()),
        ("K8S_CONTAINER_NAME", "app".to_owned()),
        ("SIDECAR_LABELS_FILE", path(&labels)),
    ];
    let sidecar = start(&world, &[], &env);
    let t = E2e { sidecar, rx, world };

    let span = request_and_wait_for_span(&t).await;
    let r = &span.resource;
    for (key, want) in [
        ("service.name", "checkout"),
        ("service.version", "1.4.2"),
        ("service.namespace", "shop"),
        ("service.instance.id", "shop.checkout-7d4b9c8f6d-x2x9z.app"),
        ("k8s.pod.name", "checkout-7d4b9c8f6d-x2x9z"),
        ("k8s.namespace.name", "shop"),
        ("k8s.pod.uid", "0b5c9e43-5f0a-4a51-9d3e-2f6f1c3a7b10"),
        ("k8s.node.name", "node-1"),
        ("k8s.container.name", "app"),
        ("k8s.replicaset.name", "checkout-7d4b9c8f6d"),
        ("k8s.deployment.name", "checkout"),
    ] {
        assert_eq!(r.str(key), Some(want), "{key} in {r:?}");
    }
    assert!(r.contains("telemetry.sdk.name"), "{r:?}");

    // Metrics take the same road.
    t.rx.wait_for(TELEMETRY, |rx| {
        (!accepted(rx, Signal::Metrics).is_empty()).then_some(())
    })
    .await
    .expect("a metric export over http/protobuf");
    for signal in [Signal::Traces, Signal::Metrics] {
        let reqs = accepted(&t.rx, signal);
        assert!(!reqs.is_empty(), "no accepted {signal:?} export");
        for req in reqs {
            assert_eq!(req.transport, Transport::Http, "{req:?}");
            assert!(req.gzip, "{signal:?} export not gzip-compressed: {req:?}");
            assert_eq!(req.header("x-tenant"), Some("acme"), "{req:?}");
            assert_eq!(
                req.header("authorization"),
                Some("Bearer s3cret"),
                "{req:?}"
            );
            assert_eq!(
                req.client_cert.as_deref(),
                Some(ca.client_cert_der.as_slice()),
                "the client certificate was not presented"
            );
        }
    }
    // The binary's own /metrics: accepted by promtool without lint findings, with the resource
    // as target_info and the request's histogram under its Prometheus name.
    let metrics = admin::get(&t.world.pod, ADMIN_PORT, "/metrics").expect("GET /metrics");
    assert_eq!(metrics.status, 200, "{metrics:?}");
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running promtool (Debian package prometheus; cargo xtask setup installs it)");
    promtool
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(metrics.body.as_bytes())
        .expect("writing to promtool");
    let checked = promtool.wait_with_output().expect("promtool output");
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        checked.status.success() && findings.trim().is_empty(),
        "promtool check metrics: {:?}\n{findings}",
        checked.status
    );
    assert!(
        admin::prometheus_sum(
            &metrics.body,
            "http_client_request_duration_seconds_count",
            &["http_request_method=\"GET\""]
        ) >= 1.0,
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.lines().any(
            |l| l.starts_with("target_info{") && l.contains("k8s_deployment_name=\"checkout\"")
        ),
        "{}",
        metrics.body
    );

    // Header values are secrets: never in the log.
    assert!(!t.sidecar.log().contains("s3cret"), "{}", t.sidecar.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_from_a_config_file_under_environment_and_flags() {
    prereq::require();
    let world = PodWorld::new("expgrpc").expect("building the pod world");
    let ca = TestCa::new().expect("making a test CA");
    let files = ca.write_to(world.dir.path()).expect("writing the CA files");
    let rx = OtlpReceiver::builder()
        .tls(&ca.server_cert_pem, &ca.server_key_pem)
        .start_in(&world.pod)
        .await
        .expect("starting the receiver");
    // The file sets a wrong endpoint: the flag wins over it; its compression, service name and
    // resource attributes apply. Headers come from the flag, above the environment's: none of
    // the environment's may leak in (the OTLP crate would read the variable itself).
    let config = world.dir.path().join("sidecar.toml");
    std::fs::write(
        &config,
        "otlp-endpoint = \"http://127.0.0.1:9\"\n\
         otlp-headers = \"x-from=file,x-file-only=1\"\n\
         otlp-compression = \"gzip\"\n\
         service-name = \"from-file\"\n\
         resource-attributes = [\"deployment.environment.name=e2e\", \"team=edge\"]\n",
    )
    .expect("writing the config file");
    let endpoint = rx.endpoint();
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let sidecar = start(
        &world,
        &[
            "--config",
            &config.to_string_lossy(),
            "--otlp-endpoint",
            &endpoint,
            "--otlp-headers",
            "x-from=flag",
        ],
        &[
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-from=env,x-env-only=1".to_owned(),
            ),
            (
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
                files.ca.to_string_lossy().into_owned(),
            ),
        ],
    );
    let t = E2e { sidecar, rx, world };

    let span = request_and_wait_for_span(&t).await;
    assert_eq!(span.service_name(), Some("from-file"));
    assert_eq!(
        span.resource.str("deployment.environment.name"),
        Some("e2e")
    );
    assert_eq!(span.resource.str("team"), Some("edge"));
    let reqs = accepted(&t.rx, Signal::Traces);
    assert!(!reqs.is_empty());
    for req in reqs {
        assert_eq!(req.transport, Transport::Grpc, "{req:?}");
        assert!(req.gzip, "not gzip-compressed: {req:?}");
        assert_eq!(req.header("x-from"), Some("flag"), "{req:?}");
        assert_eq!(req.header("x-env-only"), None, "{req:?}");
        assert_eq!(req.header("x-file-only"), None, "{req:?}");
        assert_eq!(
            req.client_cert, None,
            "no client certificate was configured"
        );
    }
}

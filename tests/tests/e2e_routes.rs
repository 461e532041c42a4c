//! Privileged end-to-end tests of `http.route` and redaction (issue 4, items 4 and 5): a client
//! in svc calls the pod's application through the sidecar's inbound listener; the SERVER spans
//! and `http.server.request.duration` carry `http.route` from `--routes` templates or the
//! heuristic, and no exported attribute holds a secret query value or a credential header.
//!
//! Needs root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool` and the sidecar binary
//! (`SIDECAR_BIN` or `target/release/sidecar`). Run with `--test-threads=1`.

use std::collections::BTreeMap;
use std::time::Duration;

use sidecar_tests::otlp::{AttrValue, Attributes, ReceivedSpan};
use sidecar_tests::world::APP_PORT;
use sidecar_tests::{prereq, OtlpReceiver, PodWorld, Sidecar, SidecarConfig};

/// Bound for one client command.
const CLIENT: Duration = Duration::from_secs(30);
/// Bound for telemetry to reach the receiver.
const TELEMETRY: Duration = Duration::from_secs(20);
const DURATION_METRIC: &str = "http.server.request.duration";

fn world(tag: &str) -> (PodWorld, OtlpReceiver) {
    prereq::require();
    let world = PodWorld::new(tag).expect("building the pod world");
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    (world, rx)
}

fn start_sidecar(world: &PodWorld, rx: &OtlpReceiver, tag: &str, extra: &[&str]) -> Sidecar {
    let cfg = SidecarConfig {
        otlp_endpoint: Some(rx.endpoint()),
        service_name: Some(format!("e2e-{tag}")),
        annotations_file: Some(world.annotations_path()),
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..SidecarConfig::default()
    };
    world.start_sidecar(&cfg).expect("starting the sidecar")
}

/// Runs curl in svc with `extra` arguments on the pod's `path`; any HTTP status will do.
fn call(world: &PodWorld, path: &str, extra: &[&str]) {
    let url = world.pod_url(APP_PORT, path);
    let mut args: Vec<&str> = extra.to_vec();
    args.push(&url);
    let out = world.curl_from_svc(&args, CLIENT).expect("running curl");
    assert!(out.success(), "curl {args:?}: {out:?}");
}

/// Request counts of the latest `http.server.request.duration` export, by `http.route`.
fn route_counts(rx: &OtlpReceiver) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    if let Some(m) = rx.latest_metric(DURATION_METRIC) {
        for p in &m.points {
            if p.attributes.int("server.port") != Some(i64::from(APP_PORT)) {
                continue;
            }
            let route = p
                .attributes
                .str("http.route")
                .unwrap_or("(none)")
                .to_owned();
            *counts.entry(route).or_insert(0) += p.value.count().unwrap_or(0);
        }
    }
    counts
}

/// Waits until the exported route counts equal `want` (cumulative temporality).
async fn expect_routes(rx: &OtlpReceiver, want: &[(&str, u64)]) {
    let want: BTreeMap<String, u64> = want.iter().map(|(r, n)| (r.to_string(), *n)).collect();
    let got = rx
        .wait_for(TELEMETRY, |r| {
            let c = route_counts(r);
            (c == want).then_some(c)
        })
        .await;
    assert!(
        got.is_some(),
        "want routes {want:?}, last export {:?}",
        route_counts(rx)
    );
}

async fn server_span_with_path(rx: &OtlpReceiver, path: &str) -> ReceivedSpan {
    rx.wait_for_spans(TELEMETRY, 1, |s| {
        s.is_server() && s.attributes.str("url.path") == Some(path)
    })
    .await
    .unwrap_or_else(|| panic!("no SERVER span for {path}; spans: {:#?}", rx.spans()))
    .into_iter()
    .next()
    .expect("one span")
}

/// Every (key, value) of every exported span, metric point and resource whose value contains
/// one of `needles`.
fn leaks(rx: &OtlpReceiver, needles: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let mut scan = |what: &str, attrs: &Attributes| {
        for (k, v) in &attrs.0 {
            let text = match v {
                AttrValue::Str(s) | AttrValue::Other(s) => s.clone(),
                other => other.to_string(),
            };
            if needles.iter().any(|n| text.contains(n)) {
                found.push(format!("{what}: {k}={text}"));
            }
        }
    };
    for s in rx.spans() {
        scan(&format!("span {}", s.name), &s.attributes);
        scan("span resource", &s.resource);
    }
    for m in rx.metrics() {
        scan("metric resource", &m.resource);
        for p in &m.points {
            scan(&m.name, &p.attributes);
        }
    }
    found
}

/// With `--routes /users/{id}`, `/users/42`, `/users/43` and `/users/alice` share one
/// `http.route` series and the SERVER span name is `GET /users/{id}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_template_gives_one_route_series() {
    let (world, rx) = world("rt-tpl");
    let _app = world
        .start_app_server("app", APP_PORT)
        .expect("starting the app");
    let _sidecar = start_sidecar(&world, &rx, "rt-tpl", &["--routes", "/users/{id}"]);

    for path in ["/users/42", "/users/43", "/users/alice?q=1"] {
        call(&world, path, &[]);
    }
    expect_routes(&rx, &[("/users/{id}", 3)]).await;
    let span = server_span_with_path(&rx, "/users/alice").await;
    assert_eq!(span.name, "GET /users/{id}");
    assert_eq!(span.attributes.str("http.route"), Some("/users/{id}"));
}

/// Without templates the heuristic makes numeric segments `{id}` and keeps words; the query is
/// never part of the route. With `--max-routes 2` a third route is `_OTHER`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heuristic_route_and_cap_without_templates() {
    let (world, rx) = world("rt-heu");
    let _app = world
        .start_app_server("app", APP_PORT)
        .expect("starting the app");
    let _sidecar = start_sidecar(&world, &rx, "rt-heu", &["--max-routes", "2"]);

    for path in ["/users/42?x=1", "/users/43", "/users/alice", "/orders/9"] {
        call(&world, path, &[]);
    }
    expect_routes(
        &rx,
        &[("/users/{id}", 2), ("/users/alice", 1), ("_OTHER", 1)],
    )
    .await;
    let span = server_span_with_path(&rx, "/users/42").await;
    assert_eq!(span.name, "GET /users/{id}");
    assert_eq!(span.attributes.str("url.query"), Some("x=1"));
}

/// Secret query values and credential headers never reach an exported attribute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_never_exported() {
    let (world, rx) = world("rt-sec");
    let _app = world
        .start_app_server("app", APP_PORT)
        .expect("starting the app");
    let _sidecar = start_sidecar(&world, &rx, "rt-sec", &[]);

    call(
        &world,
        "/users/7?token=abc&x=1",
        &[
            "-H",
            "Authorization: Bearer s3cr3t",
            "-H",
            "Proxy-Authorization: Basic s3cr3t",
            "-H",
            "Cookie: c=s3cr3t",
        ],
    );
    let span = server_span_with_path(&rx, "/users/7").await;
    assert_eq!(span.attributes.str("url.query"), Some("token=REDACTED&x=1"));
    expect_routes(&rx, &[("/users/{id}", 1)]).await;
    let found = leaks(&rx, &["abc", "s3cr3t"]);
    assert!(found.is_empty(), "secrets exported: {found:#?}");
}

/// `--redact-query-params x` replaces the default list: `x` is redacted, `token` no longer is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_list_is_configurable() {
    let (world, rx) = world("rt-red");
    let _app = world
        .start_app_server("app", APP_PORT)
        .expect("starting the app");
    let _sidecar = start_sidecar(&world, &rx, "rt-red", &["--redact-query-params", "X"]);

    call(&world, "/users/8?token=abc&x=1", &[]);
    let span = server_span_with_path(&rx, "/users/8").await;
    assert_eq!(
        span.attributes.str("url.query"),
        Some("token=abc&x=REDACTED"),
        "case-insensitive match of the configured name"
    );
    assert!(
        leaks(&rx, &["abc"]).iter().any(|l| l.contains("url.query")),
        "the scan of exported attributes sees an unredacted value"
    );
}

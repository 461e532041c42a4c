//! Privileged end-to-end tests of `sidecar run --redirect iptables|off` and `--worker-threads`:
//! the same proxy behind iptables `REDIRECT` rules (original destinations from conntrack), the
//! observation programs alone without any redirection, and a fixed, named worker count.
//!
//! The iptables rules live in the pod network namespace the test creates, so they vanish with
//! it. Needs root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool`, `iptables` (with
//! the `cgroup` match) and the sidecar binary (`SIDECAR_BIN` or `target/release/sidecar`); a
//! test fails, saying what is missing, otherwise. Run with `--test-threads=1`.

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;
use sidecar_tests::admin::{self, ADMIN_PORT};
use sidecar_tests::cgroup::assert_nothing_attached;
use sidecar_tests::cmd::{find_in_path, run_timeout, Finished};
use sidecar_tests::iptables::redirect_outbound;
use sidecar_tests::otlp::{DataPoint, ReceivedSpan};
use sidecar_tests::peers;
use sidecar_tests::sidecar::sidecar_bin;
use sidecar_tests::world::{APP_PORT, HTTP_PORT, VETH};
use sidecar_tests::{prereq, OtlpReceiver, PodWorld, Sidecar, SidecarConfig};

/// Bound for one client command.
const CLIENT: Duration = Duration::from_secs(30);
/// Bound for telemetry to reach the receiver (export intervals are 500 ms / 100 ms).
const TELEMETRY: Duration = Duration::from_secs(20);
/// Bound for the sidecar to exit after SIGTERM (drain timeout 10 s plus the flush).
const EXIT: Duration = Duration::from_secs(30);
/// The sidecar's default outbound and inbound ports.
const OUTBOUND_PORT: u16 = 15001;
const INBOUND_PORT: u16 = 15006;
/// The CLI's exit code for usage errors.
const EXIT_USAGE: i32 = 64;
/// Name of the sidecar's runtime worker threads.
const WORKER_THREAD: &str = "sidecar-worker";

/// A request id unique within this test binary, carried in the query string.
fn id(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

fn require_iptables() {
    assert!(
        find_in_path("iptables").is_some(),
        "iptables is missing from PATH (Debian package `iptables`; `cargo xtask setup` installs it)"
    );
}

/// Runs `iptables ARGS...` in the pod namespace and asserts it succeeded.
fn iptables(world: &PodWorld, args: &[&str]) {
    let mut cmd = world.pod.command("iptables");
    cmd.args(args);
    let out = run_timeout(&mut cmd, Duration::from_secs(10)).expect("running iptables");
    assert!(
        out.success(),
        "iptables {args:?} in the pod namespace failed ({:?}): {}",
        out.status,
        out.stderr_str()
    );
}

/// Istio-style rules for the pod: the app cgroup's outbound TCP to the outbound listener, TCP
/// arriving on the veth for the application's port to the inbound listener.
fn install_redirect_rules(world: &PodWorld) {
    let (inbound, app_port) = (INBOUND_PORT.to_string(), APP_PORT.to_string());
    redirect_outbound(&world.pod, &world.app_cgroup, OUTBOUND_PORT, &[])
        .expect("adding the outbound REDIRECT rule");
    iptables(
        world,
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-i",
            VETH,
            "-p",
            "tcp",
            "--dport",
            &app_port,
            "-j",
            "REDIRECT",
            "--to-ports",
            &inbound,
        ],
    );
}

fn start_sidecar(world: &PodWorld, rx: &OtlpReceiver, tag: &str, extra: &[&str]) -> Sidecar {
    let cfg = SidecarConfig {
        otlp_endpoint: Some(rx.endpoint()),
        service_name: Some(format!("e2e-{tag}")),
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..SidecarConfig::default()
    };
    world.start_sidecar(&cfg).expect("starting the sidecar")
}

/// `GET /bytes/<n>?id=<id>` with `curl` as the app; asserts success and the exact body.
fn app_get(world: &PodWorld, n: usize, id: &str) {
    let out = world
        .curl(&[&world.url(&format!("/bytes/{n}?id={id}"))], CLIENT)
        .expect("running curl");
    assert_ok_body(&out, n);
}

fn assert_ok_body(out: &Finished, n: usize) {
    assert!(
        out.success(),
        "curl failed: status {:?} timed_out {} stderr {}",
        out.status,
        out.timed_out,
        out.stderr_str()
    );
    assert_eq!(
        out.stdout,
        peers::pattern(n, peers::DEFAULT_SEED),
        "body differs"
    );
}

fn stats(world: &PodWorld) -> Value {
    let resp = admin::get(&world.pod, ADMIN_PORT, "/stats").expect("GET /stats");
    assert_eq!(resp.status, 200, "{resp:?}");
    serde_json::from_str(&resp.body).expect("/stats is JSON")
}

fn connections(stats: &Value, key: &str) -> u64 {
    stats["connections"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("connections.{key} missing in /stats: {stats}"))
}

/// Waits for the span of `kind` (CLIENT / SERVER) whose URL attributes contain `id`.
async fn span(rx: &OtlpReceiver, server: bool, id: &str) -> ReceivedSpan {
    let matches = |s: &ReceivedSpan| {
        (if server { s.is_server() } else { s.is_client() })
            && ["url.full", "url.query", "url.path"]
                .iter()
                .any(|k| s.attributes.str(k).is_some_and(|v| v.contains(id)))
    };
    rx.wait_for_spans(TELEMETRY, 1, matches)
        .await
        .unwrap_or_else(|| {
            panic!(
                "no {} span for {id} within {TELEMETRY:?}; spans: {:#?}",
                if server { "SERVER" } else { "CLIENT" },
                rx.spans()
            )
        })
        .into_iter()
        .next()
        .expect("one span")
}

/// Whether `p` is about the svc HTTP peer `198.18.0.2:8080`.
fn to_http_peer(p: &DataPoint) -> bool {
    p.attributes.str("network.peer.address") == Some("198.18.0.2")
        && p.attributes.int("network.peer.port") == Some(i64::from(HTTP_PORT))
}

/// Waits for a `sidecar.tcp.connections` point (kernel observation) to the svc HTTP peer with
/// outcome `ok`; returns its value.
async fn observed_connections_to_peer(rx: &OtlpReceiver) -> f64 {
    let found = rx
        .wait_for(TELEMETRY, |r| {
            let m = r.latest_metric("sidecar.tcp.connections")?;
            m.points
                .iter()
                .find(|p| to_http_peer(p) && p.attributes.str("sidecar.tcp.outcome") == Some("ok"))
                .and_then(|p| p.value.as_f64())
        })
        .await;
    found.unwrap_or_else(|| {
        panic!(
            "no sidecar.tcp.connections point for 198.18.0.2:8080 within {TELEMETRY:?}: {:#?}",
            rx.metrics_named("sidecar.tcp.connections")
        )
    })
}

/// Programs attached directly to each cgroup of the world: (pod, app, sidecar).
fn attached(world: &PodWorld) -> (String, String, String) {
    (
        world.pod_cgroup.attached_programs().expect("pod cgroup"),
        world.app_cgroup.attached_programs().expect("app cgroup"),
        world
            .sidecar_cgroup
            .attached_programs()
            .expect("sidecar cgroup"),
    )
}

/// bpf links of type `netns` attached to the pod network namespace (the `sk_lookup` program's
/// attachment), from `bpftool -j link show`.
fn netns_links(world: &PodWorld) -> Vec<Value> {
    let ino = std::fs::metadata(world.pod.path())
        .expect("stat of the pod netns")
        .ino();
    let out = run_timeout(
        Command::new("bpftool").args(["-j", "link", "show"]),
        Duration::from_secs(10),
    )
    .expect("running bpftool");
    assert!(out.success(), "bpftool link show: {}", out.stderr_str());
    let links: Value = serde_json::from_slice(&out.stdout).expect("bpftool prints JSON");
    links
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|l| l["type"] == "netns" && l["netns_ino"].as_u64() == Some(ino))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// SIGTERM: exit status 0 and nothing left attached to the world's cgroups or namespace.
fn terminate_clean(mut sidecar: Sidecar, world: &PodWorld) {
    sidecar.terminate().expect("SIGTERM");
    let status = sidecar
        .wait_exit(EXIT)
        .expect("waiting for the sidecar")
        .unwrap_or_else(|| panic!("the sidecar did not exit within {EXIT:?}"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}: {}",
        sidecar.log()
    );
    assert_nothing_attached(&world.cgroups());
    assert!(netns_links(world).is_empty(), "a netns link stayed");
}

/// The sidecar's threads named `name` (`/proc/<pid>/task/*/comm`).
fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("reading the sidecar's tasks")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// Runs the sidecar binary with `args` (no privileges or world needed: they fail on the
/// configuration before anything starts).
fn run_cli(args: &[&str], env: &[(&str, &str)]) -> Finished {
    let mut cmd = Command::new(sidecar_bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_timeout(&mut cmd, Duration::from_secs(10)).expect("running the sidecar binary")
}

/// `--redirect iptables`: iptables REDIRECT sends the app's outbound connection and svc's
/// inbound one to the proxy; the original destinations come from conntrack; only the
/// observation program is attached; a connection that no rule translated is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_mode_proxies_redirected_connections_with_conntrack_destinations() {
    prereq::require();
    require_iptables();
    let world = PodWorld::new("redir-ipt").expect("building the pod world");
    let app = world
        .start_app_server("app", APP_PORT)
        .expect("starting the app server");
    install_redirect_rules(&world);
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    let sidecar = start_sidecar(&world, &rx, "redir-ipt", &["--redirect", "iptables"]);
    let log = sidecar.log();
    assert!(log.contains("redirect mode iptables"), "{log}");
    assert!(!log.contains("inbound steering attached"), "{log}");

    // Observation only: sockops on the target (pod) cgroup, no connect programs there or on
    // the app, no getsockopt on the sidecar, no sk_lookup on the namespace.
    let (pod, app_cg, sidecar_cg) = attached(&world);
    assert_eq!(pod, "sc_sockops", "pod cgroup");
    assert_eq!(app_cg, "", "app cgroup");
    assert_eq!(sidecar_cg, "", "sidecar cgroup (no getsockopt program)");
    assert!(netns_links(&world).is_empty(), "sk_lookup attached");

    // Outbound: the app's unmodified curl, redirected by iptables, forwarded to the peer.
    let out_id = id("ipt-out");
    app_get(&world, 1024, &out_id);
    let reqs = world.http.requests_for(&out_id).expect("peer log");
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert!(
        reqs[0].header("traceparent").is_some(),
        "the request bypassed the proxy: {:#?}",
        reqs[0]
    );
    assert_eq!(reqs[0].peer, "198.18.0.1", "{:#?}", reqs[0]);
    // The span names the destination the app dialled: conntrack's SO_ORIGINAL_DST.
    let client = span(&rx, false, &out_id).await;
    assert_eq!(
        client.attributes.str("server.address"),
        Some("198.18.0.2"),
        "{client:#?}"
    );
    assert_eq!(
        client.attributes.int("server.port"),
        Some(i64::from(HTTP_PORT)),
        "{client:#?}"
    );

    // Inbound: svc calls the pod's application; PREROUTING REDIRECT hands it to the inbound
    // listener, which forwards to the app's port from 127.0.0.6.
    let in_id = id("ipt-in");
    let out = world
        .curl_from_svc(
            &[&world.pod_url(APP_PORT, &format!("/bytes/16?id={in_id}"))],
            CLIENT,
        )
        .expect("curl from svc");
    assert_ok_body(&out, 16);
    let reqs = app.requests_for(&in_id).expect("app log");
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert_eq!(reqs[0].peer, "127.0.0.6", "not proxied: {:#?}", reqs[0]);
    let server = span(&rx, true, &in_id).await;
    assert_eq!(
        server.attributes.int("server.port"),
        Some(i64::from(APP_PORT)),
        "{server:#?}"
    );

    // The kernel observation still reports the pod's connections.
    // (Known: NAT leaves the application socket's addresses as dialled, so its leg to the proxy
    // is observed as a connection to the peer too; hence at least one, not exactly one.)
    let n = observed_connections_to_peer(&rx).await;
    assert!(n >= 1.0, "{n}");

    // A connection straight to the inbound port (no NAT record) is refused, not looped.
    let before = connections(&stats(&world), "orig_dst_failures");
    let direct = world
        .curl_from_svc(
            &[&world.pod_url(INBOUND_PORT, "/bytes/16?id=direct")],
            Duration::from_secs(10),
        )
        .expect("curl from svc");
    assert!(
        !direct.success(),
        "a direct connection was served: {direct:?}"
    );
    let after = connections(&stats(&world), "orig_dst_failures");
    assert_eq!(after, before + 1, "orig_dst_failures {before} -> {after}");

    terminate_clean(sidecar, &world);
}

/// `--redirect off`: traffic goes straight to its destination (the proxy accepts nothing,
/// no span), the kernel observation still reports it, and only sockops is attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_mode_observes_without_redirecting() {
    prereq::require();
    let world = PodWorld::new("redir-off").expect("building the pod world");
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    let sidecar = start_sidecar(&world, &rx, "redir-off", &["--redirect", "off"]);
    assert!(
        sidecar.log().contains("redirect mode off"),
        "{}",
        sidecar.log()
    );
    let (pod, app_cg, sidecar_cg) = attached(&world);
    assert_eq!(
        (pod.as_str(), app_cg.as_str(), sidecar_cg.as_str()),
        ("sc_sockops", "", "")
    );
    assert!(netns_links(&world).is_empty(), "sk_lookup attached");

    let id = id("off");
    app_get(&world, 1024, &id);
    let reqs = world.http.requests_for(&id).expect("peer log");
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert!(
        reqs[0].header("traceparent").is_none(),
        "the request went through the proxy: {:#?}",
        reqs[0]
    );

    // Exactly the app's own connection is observed (no proxy leg exists).
    let n = observed_connections_to_peer(&rx).await;
    assert_eq!(n, 1.0, "observed connections to the peer");
    // By now spans of the request would have been exported (100 ms batches) as well.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let spans: Vec<_> = rx.spans().into_iter().filter(|s| s.is_client()).collect();
    assert!(spans.is_empty(), "CLIENT spans without a proxy: {spans:#?}");
    let s = stats(&world);
    assert_eq!(connections(&s, "accepted"), 0, "{s}");

    terminate_clean(sidecar, &world);
}

/// `--worker-threads 1`: exactly one runtime worker, named `sidecar-worker`; 0 is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_are_fixed_and_named() {
    prereq::require();
    let world = PodWorld::new("redir-workers").expect("building the pod world");
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    let sidecar = start_sidecar(&world, &rx, "redir-workers", &["--worker-threads", "1"]);
    // The default mode, for contrast with the others: sk_lookup is attached to the namespace.
    assert_eq!(netns_links(&world).len(), 1, "sk_lookup link in ebpf mode");
    // Traffic through the proxy, so the runtime has been busy.
    app_get(&world, 64, &id("workers"));
    assert_eq!(threads_named(sidecar.pid(), WORKER_THREAD), 1);
    terminate_clean(sidecar, &world);

    for (args, env, place) in [
        (&["--worker-threads", "0"][..], &[][..], "--worker-threads"),
        (
            &[],
            &[("SIDECAR_WORKER_THREADS", "0")][..],
            "SIDECAR_WORKER_THREADS",
        ),
    ] {
        let mut all = vec!["run", "--cgroup", "/nonexistent"];
        all.extend_from_slice(args);
        let out = run_cli(&all, env);
        assert_eq!(out.code(), Some(EXIT_USAGE), "{out:?}");
        let err = out.stderr_str();
        assert!(
            err.contains(&format!("sidecar: error: {place}: invalid value `0`")),
            "{err}"
        );
        assert!(err.contains("1..=256"), "{err}");
    }
}

/// The eBPF interception policy flags are a usage error with iptables (or no) redirection.
#[test]
fn policy_flags_without_ebpf_redirection_are_usage_errors() {
    let out = run_cli(
        &[
            "run",
            "--cgroup",
            "/nonexistent",
            "--redirect",
            "iptables",
            "--exclude-outbound-ports",
            "5432",
        ],
        &[],
    );
    assert_eq!(out.code(), Some(EXIT_USAGE), "{out:?}");
    let err = out.stderr_str();
    assert!(
        err.starts_with("sidecar: error: --exclude-outbound-ports: "),
        "{err}"
    );
    assert!(err.contains("iptables/nftables rules"), "{err}");

    let out = run_cli(
        &["config"],
        &[
            ("SIDECAR_REDIRECT", "off"),
            ("SIDECAR_INCLUDE_OUTBOUND_CIDRS", "10.0.0.0/8"),
        ],
    );
    assert_eq!(out.code(), Some(EXIT_USAGE), "{out:?}");
    let err = out.stderr_str();
    assert!(
        err.starts_with("sidecar: error: SIDECAR_INCLUDE_OUTBOUND_CIDRS: "),
        "{err}"
    );
    assert!(err.contains("(set by SIDECAR_REDIRECT)"), "{err}");

    // Without the policy flags, `sidecar config` shows the mode and its source.
    let out = run_cli(&["config", "--redirect", "iptables"], &[]);
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout_str()
            .contains("redirect = iptables  (flag --redirect)"),
        "{}",
        out.stdout_str()
    );
}

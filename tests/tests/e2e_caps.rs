//! Least-privilege end-to-end tests: the real `sidecar` binary under exactly the capabilities
//! the Kubernetes manifests give it (`sidecar/src/inject/template.yaml`: uid 0, `drop: [ALL]`,
//! `add: [BPF, PERFMON, NET_ADMIN, SYS_RESOURCE]`, no `CAP_SYS_ADMIN`), and what fails when one
//! of them is taken away.
//!
//! The capability set is imposed the way a container runtime does it for a uid-0 container:
//! `setpriv --bounding-set -all,+bpf,... --inh-caps -all` execs the sidecar, so its permitted
//! and effective sets become the bounding set (uid 0 gains every bounded capability at exec),
//! inheritable and ambient are empty. `setpriv` and the sidecar share one pid (exec), so the
//! tests read `/proc/<pid>/status` of the running sidecar to prove which set it really had.
//!
//! A capability can only be kept, never added: when the test runner's own bounding set lacks
//! one of the manifest's capabilities (some container sandboxes drop `CAP_SYS_RESOURCE`), the
//! sidecar runs with the manifest's set minus that one, the test says so on its output, and
//! everything asserted then holds for a strict subset of the manifest's privileges. `CAP_BPF`,
//! `CAP_PERFMON` and `CAP_NET_ADMIN` are required of the runner (the test fails otherwise).
//!
//! Needs root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool`, `setpriv` (util-linux)
//! and the sidecar binary (`SIDECAR_BIN` or `target/release/sidecar`). Run with
//! `--test-threads=1`.

use std::process::Command;
use std::time::{Duration, Instant};

use sidecar_tests::admin::{self, ADMIN_PORT};
use sidecar_tests::cgroup::assert_nothing_attached;
use sidecar_tests::cmd::{find_in_path, run_timeout, Finished};
use sidecar_tests::otlp::{DataPoint, ReceivedMetric, ReceivedSpan};
use sidecar_tests::peers;
use sidecar_tests::process::command_in;
use sidecar_tests::sidecar::sidecar_bin;
use sidecar_tests::world::{HTTP_PORT, SVC_V4, SVC_V6};
use sidecar_tests::{prereq, OtlpReceiver, PodWorld, Sidecar, SidecarConfig, TraceParent};

/// Bound for one client command.
const CLIENT: Duration = Duration::from_secs(30);
/// Bound for telemetry to reach the receiver (export intervals are 500 ms / 100 ms).
const TELEMETRY: Duration = Duration::from_secs(20);
/// Drain timeout given to the sidecar.
const DRAIN_SECS: u64 = 10;
/// Bound for a `sidecar` run that is expected to fail at start, or for `sidecar check`.
const ONE_SHOT: Duration = Duration::from_secs(60);

/// A Linux capability: its `setpriv` name and its bit number (`linux/capability.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cap {
    name: &'static str,
    bit: u32,
}

impl Cap {
    /// `CAP_NET_ADMIN` style.
    fn upper(&self) -> String {
        format!("CAP_{}", self.name.to_uppercase())
    }
}

const NET_ADMIN: Cap = Cap {
    name: "net_admin",
    bit: 12,
};
const SYS_ADMIN: Cap = Cap {
    name: "sys_admin",
    bit: 21,
};
const SYS_RESOURCE: Cap = Cap {
    name: "sys_resource",
    bit: 24,
};
const PERFMON: Cap = Cap {
    name: "perfmon",
    bit: 38,
};
const BPF: Cap = Cap {
    name: "bpf",
    bit: 39,
};

/// The manifests' `capabilities.add`, in the template's order.
const MANIFEST: [Cap; 4] = [BPF, PERFMON, NET_ADMIN, SYS_RESOURCE];

fn mask(caps: &[Cap]) -> u64 {
    caps.iter().fold(0, |m, c| m | 1u64 << c.bit)
}

/// The five capability sets of a process, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CapSets {
    inh: u64,
    prm: u64,
    eff: u64,
    bnd: u64,
    amb: u64,
    /// The `NoNewPrivs` flag.
    nnp: bool,
}

impl CapSets {
    fn of(pid: &str) -> CapSets {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let field = |name: &str| {
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .unwrap_or_else(|| panic!("no {name} in {path}:\n{status}"));
            u64::from_str_radix(line.trim(), 16)
                .unwrap_or_else(|e| panic!("{name} {line:?} in {path}: {e}"))
        };
        CapSets {
            inh: field("CapInh"),
            prm: field("CapPrm"),
            eff: field("CapEff"),
            bnd: field("CapBnd"),
            amb: field("CapAmb"),
            nnp: field("NoNewPrivs") == 1,
        }
    }
}

/// Names of the capabilities in `m` (bits without a name here shown as numbers).
fn names(m: u64) -> Vec<String> {
    let known = [NET_ADMIN, SYS_ADMIN, SYS_RESOURCE, PERFMON, BPF];
    (0..64)
        .filter(|b| m & (1u64 << b) != 0)
        .map(|b| {
            known
                .iter()
                .find(|c| c.bit == b)
                .map_or_else(|| format!("cap#{b}"), Cap::upper)
        })
        .collect()
}

/// What the sidecar gets when it is asked for `wanted`: the capabilities of `wanted` that this
/// test process's own bounding set holds (a bounding set can only shrink). Fails unless the
/// runner holds `CAP_BPF`, `CAP_PERFMON` and `CAP_NET_ADMIN`, and says which of `wanted` could
/// not be granted.
fn grantable(wanted: &[Cap]) -> u64 {
    let own = CapSets::of("self").bnd;
    let required = mask(&[BPF, PERFMON, NET_ADMIN]);
    assert_eq!(
        own & required,
        required,
        "the test runner's bounding set {own:#x} lacks {:?}: these tests need a runner holding \
         CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (run as root on the host or in a privileged \
         container)",
        names(required & !own)
    );
    let want = mask(wanted);
    let lacking = want & !own;
    if lacking != 0 {
        println!(
            "NOTE: the test runner's own bounding set {own:#x} lacks {:?}, so the sidecar runs \
             with {:?}, a strict subset of the requested set {:?}",
            names(lacking),
            names(want & own),
            names(want)
        );
    }
    want & own
}

/// `setpriv` in PATH, or a failing test naming the package.
fn require_setpriv() {
    assert!(
        find_in_path("setpriv").is_some(),
        "`setpriv` not in PATH (Debian package `util-linux`)"
    );
}

/// Whether the sidecar runs with the `no_new_privs` bit, as a container with
/// `allowPrivilegeEscalation: false` does (the manifests leave it at Kubernetes' default,
/// `true`, so the bit is clear).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NoNewPrivs {
    Clear,
    Set,
}

/// The `setpriv` arguments that exec `sidecar args...` with only `caps` in the bounding set
/// (hence permitted and effective for uid 0) and nothing inheritable or ambient.
fn setpriv_args(caps: &[Cap], nnp: NoNewPrivs, args: &[&str]) -> Vec<String> {
    let mut set = "-all".to_owned();
    for c in caps {
        set.push_str(",+");
        set.push_str(c.name);
    }
    let mut a = Vec::new();
    if nnp == NoNewPrivs::Set {
        a.push("--no-new-privs".to_owned());
    }
    a.extend([
        "--bounding-set".to_owned(),
        set,
        "--inh-caps".to_owned(),
        "-all".to_owned(),
        "--".to_owned(),
        sidecar_bin().to_string_lossy().into_owned(),
    ]);
    a.extend(args.iter().map(|s| s.to_string()));
    a
}

/// A command running `sidecar args...` under `caps`, in the pod namespace and the `sidecar`
/// cgroup; its pid is the sidecar's (`sh` → `nsenter` → `setpriv` → `sidecar`, all exec).
fn sidecar_command(world: &PodWorld, caps: &[Cap], nnp: NoNewPrivs, args: &[&str]) -> Command {
    let full = setpriv_args(caps, nnp, args);
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    let mut cmd = command_in(
        Some(&world.pod),
        Some(&world.sidecar_cgroup),
        "setpriv",
        &full,
    );
    cmd.env("NO_COLOR", "1");
    cmd
}

/// Runs `sidecar args...` under `caps` to completion.
fn run_with(world: &PodWorld, caps: &[Cap], args: &[&str]) -> Finished {
    let out = run_timeout(
        &mut sidecar_command(world, caps, NoNewPrivs::Clear, args),
        ONE_SHOT,
    )
    .expect("running the sidecar under setpriv");
    assert!(!out.timed_out, "`{}` hung: {out:?}", out.command);
    out
}

/// `caps` without `drop`.
fn without(caps: &[Cap], drop: Cap) -> Vec<Cap> {
    caps.iter().copied().filter(|c| *c != drop).collect()
}

/// Sidecar config exporting to `rx`.
fn config(rx: &OtlpReceiver, service: &str) -> SidecarConfig {
    SidecarConfig {
        otlp_endpoint: Some(rx.endpoint()),
        service_name: Some(service.to_owned()),
        drain_timeout_secs: Some(DRAIN_SECS),
        ..SidecarConfig::default()
    }
}

/// Runs curl as the app and asserts it succeeded.
fn curl_ok(world: &PodWorld, args: &[&str]) -> Vec<u8> {
    let out = world.curl(args, CLIENT).expect("running curl");
    assert!(
        out.success(),
        "curl {args:?} failed: status {:?} timed_out {} stderr {}",
        out.status,
        out.timed_out,
        out.stderr_str()
    );
    out.stdout
}

/// The traceparent the proxy injected into the one request the HTTP peer logged for `id`.
fn injected(world: &PodWorld, id: &str) -> TraceParent {
    let reqs = world.http.requests_for(id).expect("reading the peer log");
    assert_eq!(reqs.len(), 1, "requests for {id}: {reqs:#?}");
    let raw = reqs[0].header("traceparent").unwrap_or_else(|| {
        panic!(
            "the server saw no traceparent for {id}, so the request bypassed the proxy: {:#?}",
            reqs[0]
        )
    });
    TraceParent::parse(raw).unwrap_or_else(|| panic!("malformed traceparent {raw:?}"))
}

/// Waits for the CLIENT span of the request `id`.
async fn client_span(rx: &OtlpReceiver, id: &str) -> ReceivedSpan {
    let spans = rx
        .wait_for_spans(TELEMETRY, 1, |s| {
            s.is_client() && s.attributes.str("url.full").is_some_and(|u| u.contains(id))
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "no CLIENT span with url.full containing {id} within {TELEMETRY:?}; spans: {:#?}",
                rx.spans()
            )
        });
    spans.into_iter().next().expect("one span")
}

/// Waits for a point of `metric` matching `filter`.
async fn wait_point(
    rx: &OtlpReceiver,
    metric: &str,
    mut filter: impl FnMut(&DataPoint) -> bool,
) -> (ReceivedMetric, DataPoint) {
    rx.wait_for(TELEMETRY, |r| {
        let m = r.latest_metric(metric)?;
        let p = m.points.iter().find(|p| filter(p))?.clone();
        Some((m, p))
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no matching {metric} point within {TELEMETRY:?}; received: {:#?}",
            rx.metrics_named(metric)
        )
    })
}

/// Whether `p` is about the HTTP peer at `addr:8080`.
fn to_http_peer(p: &DataPoint, addr: &str) -> bool {
    p.attributes.str("network.peer.address") == Some(addr)
        && p.attributes.int("network.peer.port") == Some(i64::from(HTTP_PORT))
}

/// Log lines at WARN or ERROR level.
fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

/// `sidecar run` under exactly the manifests' capabilities (no CAP_SYS_ADMIN): it attaches and
/// becomes ready, an unmodified curl in the app cgroup reaches the server in svc through the
/// proxy over IPv4 and IPv6, each request is traced, the kernel's TCP observations of the
/// proxy's upstream connections are exported, and on SIGTERM it drains and exits 0 with
/// nothing left attached. `nnp` chooses the `no_new_privs` bit (see [`NoNewPrivs`]).
async fn run_under_the_manifest_capabilities(tag: &str, nnp: NoNewPrivs) {
    prereq::require();
    require_setpriv();
    let granted = grantable(&MANIFEST);
    let world = PodWorld::new(tag).expect("building the pod world");
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    let service = "e2e-caps";
    let cfg = config(&rx, service);
    let args = cfg.run_args(world.pod_cgroup.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut sidecar = Sidecar::spawn(
        sidecar_command(&world, &MANIFEST, nnp, &args),
        &world.dir.join("sidecar.log"),
        cfg.ready_timeout,
    )
    .expect("starting the sidecar under the manifest's capabilities");

    // The process that became ready really holds exactly that set: nothing more, nothing
    // inheritable or ambient, and no CAP_SYS_ADMIN.
    let sets = CapSets::of(&sidecar.pid().to_string());
    println!(
        "sidecar pid {} capabilities: CapEff {:#x} = {:?}",
        sidecar.pid(),
        sets.eff,
        names(sets.eff)
    );
    assert_eq!(
        sets,
        CapSets {
            inh: 0,
            prm: granted,
            eff: granted,
            bnd: granted,
            amb: 0,
            nnp: nnp == NoNewPrivs::Set,
        },
        "the running sidecar's capability sets (effective {:?})",
        names(sets.eff)
    );
    assert_eq!(sets.eff & mask(&[SYS_ADMIN]), 0);
    let exe = std::fs::read_link(format!("/proc/{}/exe", sidecar.pid())).expect("reading exe");
    assert_eq!(
        exe.file_name(),
        sidecar_bin().file_name(),
        "the pid is not the sidecar itself: {}",
        exe.display()
    );

    let ready = admin::get(&world.pod, ADMIN_PORT, "/readyz").expect("GET /readyz");
    assert_eq!(ready.status, 200, "/readyz: {ready:?}");
    assert!(
        !world
            .pod_cgroup
            .attached_programs()
            .expect("bpftool cgroup show")
            .is_empty(),
        "bpftool shows no program on the pod cgroup while the sidecar runs"
    );

    // IPv4 and IPv6: byte-exact bodies through the proxy, traced.
    for (family, url) in [
        ("v4", world.url("/bytes/4096?id=caps-v4")),
        ("v6", world.url_v6("/bytes/4096?id=caps-v6")),
    ] {
        let id = format!("caps-{family}");
        let body = curl_ok(&world, &["-g", &url]);
        assert_eq!(
            body,
            peers::pattern(4096, peers::DEFAULT_SEED),
            "{family} body"
        );
        let tp = injected(&world, &id);
        let span = client_span(&rx, &id).await;
        println!(
            "{family}: body byte-exact, injected {tp}, CLIENT span {} {}",
            span.name,
            span.traceparent()
        );
        assert_eq!(span.trace_id, tp.trace_id, "{family}");
        assert_eq!(span.span_id, tp.parent_id, "{family}");
        assert_eq!(span.service_name(), Some(service), "{family}");
        assert_eq!(
            span.attributes.int("http.response.status_code"),
            Some(200),
            "{family}: {:?}",
            span.attributes
        );
    }
    rx.wait_for_metric(TELEMETRY, "http.client.request.duration", |p| {
        p.attributes.int("http.response.status_code") == Some(200)
    })
    .await
    .expect("an http.client.request.duration point");

    // Kernel TCP observations (sock_ops, which needs CAP_PERFMON to load) of the proxy's
    // upstream connections to svc, both families.
    for addr in [SVC_V4.to_string(), SVC_V6.to_string()] {
        let (_, ok) = wait_point(&rx, "sidecar.tcp.connections", |p| {
            to_http_peer(p, &addr) && p.attributes.str("sidecar.tcp.outcome") == Some("ok")
        })
        .await;
        assert!(ok.value.as_f64() >= Some(1.0), "{addr}: {ok:?}");
        let (_, rtt) = wait_point(&rx, "sidecar.tcp.rtt", |p| to_http_peer(p, &addr)).await;
        assert!(rtt.value.count() >= Some(1), "{addr}: {rtt:?}");
        let (_, bytes) = wait_point(&rx, "sidecar.tcp.bytes", |p| {
            to_http_peer(p, &addr) && p.attributes.str("network.io.direction") == Some("receive")
        })
        .await;
        assert!(bytes.value.as_f64() >= Some(4096.0), "{addr}: {bytes:?}");
        println!(
            "kernel TCP observation of the proxy's connection to {addr}: connections ok {:?}, \
             rtt count {:?} sum {:?} s, received {:?} bytes",
            ok.value.as_f64(),
            rtt.value.count(),
            rtt.value.as_f64(),
            bytes.value.as_f64()
        );
    }

    // Nothing degraded for lack of a privilege.
    let log = sidecar.log();
    let warned = warnings(&log);
    assert!(
        warned.is_empty(),
        "the sidecar warned under the manifest's capabilities: {warned:#?}"
    );

    let signalled = Instant::now();
    sidecar.terminate().expect("SIGTERM");
    let exit = sidecar
        .wait_exit(Duration::from_secs(DRAIN_SECS + 10))
        .expect("waiting for the sidecar")
        .unwrap_or_else(|| {
            panic!(
                "sidecar still running {:?} after SIGTERM",
                signalled.elapsed()
            )
        });
    assert_eq!(
        exit.code(),
        Some(0),
        "sidecar exit: {exit}\n{}",
        sidecar.log()
    );
    assert_nothing_attached(&world.cgroups());
    // With the sidecar gone, the app's traffic goes direct.
    curl_ok(&world, &[&world.url("/bytes/8?id=caps-after")]);
    let after = world.http.requests_for("caps-after").expect("peer log");
    assert_eq!(after.len(), 1, "{after:#?}");
    assert!(
        after[0].header("traceparent").is_none(),
        "a request after exit went through a proxy: {after:#?}"
    );
}

/// [`run_under_the_manifest_capabilities`] as the manifests deploy it (`no_new_privs` clear).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_under_the_manifest_capabilities_proxies_measures_and_exits_clean() {
    run_under_the_manifest_capabilities("caps-run", NoNewPrivs::Clear).await;
}

/// The same with `no_new_privs` set, as `allowPrivilegeEscalation: false` would run it: the
/// capabilities a uid-0 container starts with are kept, so nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_no_new_privs_works_the_same() {
    run_under_the_manifest_capabilities("caps-nnp", NoNewPrivs::Set).await;
}

/// `sidecar check` passes under the manifests' capabilities. Without CAP_PERFMON it fails and
/// names what did not load: the sock_ops program (the verifier forbids its pointer arithmetic
/// without CAP_PERFMON), the tracepoint program type and program (perf-based, CAP_PERFMON).
/// Without CAP_NET_ADMIN or CAP_BPF it fails at the privilege check and map creation.
#[test]
fn check_names_what_each_manifest_capability_is_needed_for() {
    prereq::require();
    require_setpriv();
    grantable(&MANIFEST);
    let world = PodWorld::new("caps-check").expect("building the pod world");

    let full = run_with(&world, &MANIFEST, &["check"]);
    let table = full.stdout_str();
    assert!(
        full.success(),
        "`sidecar check` under the manifest's capabilities failed: {full:?}\n{table}{}",
        full.stderr_str()
    );
    assert!(table.contains("checks passed"), "{table}");
    assert!(
        table.contains("CAP_SYS_ADMIN no"),
        "check must run without CAP_SYS_ADMIN: {table}"
    );
    println!("sidecar check under {:?}:\n{table}", names(mask(&MANIFEST)));

    let failed = |out: &Finished| -> Vec<String> {
        out.stdout_str()
            .lines()
            .filter(|l| l.starts_with("[FAIL]"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    let failed_names = |out: &Finished, names: &[&str]| {
        let f = failed(out);
        for n in names {
            assert!(
                f.iter().any(|l| l.contains(n)),
                "no failing check names {n:?}: {f:#?}\n{}",
                out.stdout_str()
            );
        }
        f
    };

    let no_perfmon = run_with(&world, &without(&MANIFEST, PERFMON), &["check"]);
    assert!(
        !no_perfmon.success() && no_perfmon.code().is_some_and(|c| c != 0),
        "check without CAP_PERFMON passed: {}",
        no_perfmon.stdout_str()
    );
    let f = failed_names(
        &no_perfmon,
        &[
            "program type tracepoint",
            "program sc_sockops loads",
            "program sc_tcp_receive_reset loads",
        ],
    );
    assert!(
        f.iter().all(|l| l.contains("program")),
        "without CAP_PERFMON only program loads should fail (maps, attach types and the \
         privilege row pass): {f:#?}"
    );
    println!("without CAP_PERFMON: {f:#?}");

    let no_net_admin = run_with(&world, &without(&MANIFEST, NET_ADMIN), &["check"]);
    assert!(
        !no_net_admin.success(),
        "check without CAP_NET_ADMIN passed"
    );
    let f = failed_names(
        &no_net_admin,
        &[
            "privileges for bpf()",
            "CAP_NET_ADMIN no",
            "program type cgroup_sock_addr",
            "program type sock_ops",
            "map type sockmap",
            "embedded eBPF object",
        ],
    );
    println!("without CAP_NET_ADMIN: {f:#?}");

    let no_bpf = run_with(&world, &without(&MANIFEST, BPF), &["check"]);
    assert!(!no_bpf.success(), "check without CAP_BPF passed");
    let f = failed_names(
        &no_bpf,
        &["privileges for bpf()", "CAP_BPF no", "embedded eBPF object"],
    );
    println!("without CAP_BPF: {f:#?}");
    assert_eq!(world.pod_cgroup.attached_programs().unwrap(), "");
}

/// `sidecar run` with one of CAP_BPF, CAP_PERFMON or CAP_NET_ADMIN missing refuses to start:
/// it exits 1 before becoming ready (the proxy listeners come up first, then loading the eBPF
/// object fails), its error says what the kernel refused, it does not panic, and it leaves
/// nothing attached (no half-working interception).
///
/// What the error says, as observed: without CAP_PERFMON the verifier rejects `sc_sockops`
/// ("pointer arithmetic ... prohibited for !root": its memset-style loop needs the speculative-
/// execution exemptions CAP_PERFMON grants), and the error names the program and carries the
/// verifier log, but not the capability. Without CAP_NET_ADMIN (the sockmap of the `sk_lookup`
/// program cannot be created) or CAP_BPF (no map can be created) the error is the same
/// generic one: "permission denied ... the sidecar needs root, or CAP_BPF + CAP_NET_ADMIN",
/// naming the map that failed; it does not say which of the two is missing (`sidecar check`'s
/// privilege row does: "CAP_BPF yes, CAP_NET_ADMIN no").
#[test]
fn run_without_a_needed_capability_fails_at_start_and_says_why() {
    prereq::require();
    require_setpriv();
    grantable(&MANIFEST);
    let world = PodWorld::new("caps-fail").expect("building the pod world");
    let cfg = SidecarConfig {
        sink_file: Some(world.dir.join("telemetry.jsonl")),
        ..SidecarConfig::default()
    };
    let args = cfg.run_args(world.pod_cgroup.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    const GENERIC: &[&str] = &[
        "cannot attach the eBPF interception programs",
        "permission denied",
        "the sidecar needs root, or CAP_BPF + CAP_NET_ADMIN",
        "failed to create map",
    ];
    // (capability taken away, what the error must mention)
    let cases: [(Cap, &[&str]); 3] = [
        (
            PERFMON,
            &[
                "cannot attach the eBPF interception programs",
                "the kernel rejected eBPF program sc_sockops",
                "prohibited for !root",
            ],
        ),
        (NET_ADMIN, GENERIC),
        (BPF, GENERIC),
    ];
    for (drop, mentions) in cases {
        let out = run_with(&world, &without(&MANIFEST, drop), &args);
        let text = format!("{}{}", out.stdout_str(), out.stderr_str());
        let error: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("sidecar: error:"))
            .collect();
        println!(
            "run without {}: {}; {}",
            drop.upper(),
            out.status,
            error.join(" | ")
        );
        assert_eq!(
            out.code(),
            Some(1),
            "run without {} did not fail as expected: {out:?}
{text}",
            drop.upper()
        );
        assert!(
            !text.contains("sidecar ready"),
            "run without {} became ready:\n{text}",
            drop.upper()
        );
        assert!(!text.contains("panicked"), "panicked:\n{text}");
        assert_eq!(error.len(), 1, "one `sidecar: error:` line:\n{text}");
        for m in mentions {
            assert!(
                text.contains(m),
                "run without {}: the error does not mention {m:?}:\n{text}",
                drop.upper()
            );
        }
        assert_nothing_attached(&world.cgroups());
    }
}

//! Privileged tests of the test bed itself (no sidecar): the pod world's namespaces, veth,
//! cgroups, peers and clients work, and everything is cleaned up afterwards.

use std::path::Path;
use std::time::Duration;

use sidecar_tests::peers::{self, parse_summary, EchoSummary, UdpSummary};
use sidecar_tests::world::{ECHO_PORT, HTTP_PORT, SVC_V4, SVC_V6, UDP_PORT};
use sidecar_tests::{prereq, PodWorld};

const T: Duration = Duration::from_secs(20);

#[test]
fn pod_reaches_svc_over_ipv4_and_ipv6_without_a_sidecar() {
    prereq::require_test_bed();
    let world = PodWorld::new("tb-http").unwrap();

    let out = world.curl(&[&world.url("/bytes/1000?v4")], T).unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, peers::pattern(1000, peers::DEFAULT_SEED));

    let out = world
        .curl(
            &["-g", &world.url_v6("/status/418?v6"), "-w", "%{http_code}"],
            T,
        )
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert!(out.stdout_str().ends_with("418"), "{}", out.stdout_str());

    let v4 = world.http.requests_for("?v4").unwrap();
    assert_eq!(v4.len(), 1);
    assert_eq!(v4[0].peer, "198.18.0.1");
    assert_eq!(
        v4[0].header("host"),
        Some(&*format!("{SVC_V4}:{HTTP_PORT}"))
    );
    assert!(v4[0].header("traceparent").is_none());
    let v6 = world.http.requests_for("?v6").unwrap();
    assert_eq!(v6.len(), 1);
    assert_eq!(v6[0].peer, "fd5e:1dec::1");
    assert_eq!(
        v6[0].header("host"),
        Some(&*format!("[{SVC_V6}]:{HTTP_PORT}"))
    );
}

#[test]
fn app_processes_run_in_the_app_cgroup_and_pod_netns() {
    prereq::require_test_bed();
    let world = PodWorld::new("tb-cgroup").unwrap();
    let out = world
        .run_app(
            "sh",
            &["-c", "cat /proc/self/cgroup; ip -o addr show dev veth0"],
            T,
        )
        .unwrap();
    assert!(out.success(), "{out:?}");
    let text = out.stdout_str();
    let rel = world
        .app_cgroup
        .path()
        .strip_prefix(sidecar_tests::cgroup::cgroup2_mount().unwrap())
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&rel)),
        "{text} (wanted {rel})"
    );
    assert!(text.contains("198.18.0.1/24"), "{text}");
    // A background app process is listed in cgroup.procs and killed with the world.
    let mut child = world.spawn_app("sleeper", "sleep", &["60"]).unwrap();
    let pid = i32::try_from(child.pid()).unwrap();
    let deadline = std::time::Instant::now() + T;
    while !world.app_cgroup.procs().unwrap().contains(&pid) {
        assert!(std::time::Instant::now() < deadline, "pid never joined");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    assert!(!world.app_cgroup.procs().unwrap().contains(&pid));
    assert_eq!(world.pod_cgroup.attached_programs().unwrap(), "");
}

#[test]
fn echo_and_udp_peers_round_trip() {
    prereq::require_test_bed();
    let world = PodWorld::new("tb-peers").unwrap();
    let echo = world.start_echo_peer().unwrap();
    let out = world
        .echo_client(&SVC_V4.to_string(), ECHO_PORT, 300_000, T)
        .unwrap();
    assert!(out.success(), "{out:?}");
    let s: EchoSummary = parse_summary(&out.stdout_str()).unwrap();
    assert!(s.equal && s.sent == 300_000, "{s:?}");
    let deadline = std::time::Instant::now() + T;
    loop {
        let conns = echo.connections().unwrap();
        if conns
            .iter()
            .any(|c| c.bytes == 300_000 && c.peer == "198.18.0.1")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{conns:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    let udp = world.start_udp_peer().unwrap();
    let out = world
        .udp_send(&SVC_V6.to_string(), UDP_PORT, b"\x00\x01binary\xff")
        .unwrap();
    assert!(out.success(), "{out:?}");
    let s: UdpSummary = parse_summary(&out.stdout_str()).unwrap();
    assert!(s.equal, "{s:?}");
    let d = udp.datagrams().unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].peer, "fd5e:1dec::1");
    assert_eq!(d[0].payload_hex, hex::encode(b"\x00\x01binary\xff"));
}

#[test]
fn post_bodies_hash_identically_content_length_and_chunked() {
    prereq::require_test_bed();
    let world = PodWorld::new("tb-post").unwrap();
    let body = peers::pattern(2_000_000, b"post-body");
    let file = world.dir.join("body.bin");
    std::fs::write(&file, &body).unwrap();
    let data = format!("@{}", file.display());
    let want = peers::sha256_hex(&body);
    for extra in [None, Some("Transfer-Encoding: chunked")] {
        let mut args = vec!["--data-binary", &data];
        if let Some(h) = extra {
            args.extend(["-H", h]);
        }
        let url = world.url("/sha256");
        args.push(&url);
        let out = world.curl(&args, T).unwrap();
        assert!(out.success(), "{out:?}");
        assert_eq!(out.stdout_str(), want, "{extra:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_in_the_pod_namespace_is_reachable_from_there_only() {
    prereq::require_test_bed();
    let world = PodWorld::new("tb-otlp").unwrap();
    let rx = world.start_receiver().unwrap();
    let port = rx.addr().port();
    let inside = world
        .pod
        .enter(move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        .unwrap();
    assert!(inside);
    let inside_svc = world
        .svc
        .enter(move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        .unwrap();
    assert!(!inside_svc);
}

#[test]
fn world_cleans_up_namespaces_cgroups_and_processes() {
    prereq::require_test_bed();
    let world = PodWorld::new("tb-cleanup").unwrap();
    let pod_ns = world.pod.path();
    let svc_ns = world.svc.path();
    let cg = world.pod_cgroup.path().to_path_buf();
    let dir = world.dir.path().to_path_buf();
    let peer_pid = world.http.process().pid();
    let _stray = world.spawn_app("stray", "sleep", &["60"]).unwrap();
    assert!(pod_ns.exists() && svc_ns.exists() && cg.exists() && dir.exists());
    drop(world);
    assert!(!pod_ns.exists(), "{}", pod_ns.display());
    assert!(!svc_ns.exists(), "{}", svc_ns.display());
    assert!(!cg.exists(), "{}", cg.display());
    assert!(!dir.exists(), "{}", dir.display());
    let stat = format!("/proc/{peer_pid}/stat");
    let alive = std::fs::read_to_string(&stat)
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false);
    assert!(
        !alive || !Path::new(&stat).exists(),
        "peer {peer_pid} alive"
    );
}

//! Tests of discovery: `/proc/net/tcp{,6}` fixtures and real sockets, `/proc/self/cgroup` and
//! mountinfo parsing, the cgroup search in a temp tree, and (privileged) the pod cgroup found
//! by a real process in the host and in a private cgroup namespace.

use super::*;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::symlink;
use std::process::Command;
use std::time::Duration;

use sidecar_tests::cgroup::{cgroup2_mount, Cgroup};
use sidecar_tests::cmd::run_timeout;
use sidecar_tests::netns::unique_name;
use sidecar_tests::tempdir::TempDir;

fn no_probe(_rel: &str) -> Result<u64, String> {
    Err("probe disabled in this test".to_string())
}

fn set(ports: &[u16]) -> BTreeSet<u16> {
    ports.iter().copied().collect()
}

// Real x86-64 (little-endian) lines: each 32-bit word of an address printed in host order.
const TCP4: &str = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1611 1 0000000052c9f7b9 100 0 0 10 0
   1: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1612 1 0000000052c9f7b9 100 0 0 10 0
   2: 3500007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1613 1 0000000052c9f7b9 100 0 0 10 0
   3: 0500000A:2382 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1614 1 0000000052c9f7b9 100 0 0 10 0
   4: 0500000A:2382 0600000A:D431 01 00000000:00000000 00:00000000 00000000     0        0 1615 1 0000000052c9f7b9 20 4 30 10 -1
   5: 0500000A:C350 0600000A:0050 06 00000000:00000000 03:00000F2A 00000000     0        0 0 3 0000000000000000
   6: garbage
";

const TCP6: &str = "\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:20FB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:3A99 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2002 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1B58 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2003 1 0000000000000000 100 0 0 10 0
   3: EC1D5EFD000000000000000001000000:24E3 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2004 1 0000000000000000 100 0 0 10 0
   4: EC1D5EFD000000000000000001000000:24E3 EC1D5EFD000000000000000002000000:D432 01 00000000:00000000 00:00000000 00000000     0        0 2005 1 0000000000000000 20 4 30 10 -1
";

#[cfg(target_endian = "little")]
#[test]
fn parses_v4_and_v6_listeners_from_proc_net_fixtures() {
    let v4 = listeners(TCP4);
    let addrs: Vec<String> = v4
        .iter()
        .map(|l| SocketAddr::new(l.addr, l.port).to_string())
        .collect();
    assert_eq!(
        addrs,
        [
            "0.0.0.0:8080",
            "127.0.0.1:15001",
            "127.0.0.53:53",
            "10.0.0.5:9090"
        ]
    );
    let v6 = listeners(TCP6);
    let addrs: Vec<String> = v6
        .iter()
        .map(|l| SocketAddr::new(l.addr, l.port).to_string())
        .collect();
    assert_eq!(
        addrs,
        [
            "[::]:8443",
            "[::1]:15001",
            "[::ffff:127.0.0.1]:7000",
            "[fd5e:1dec::1]:9443"
        ]
    );
    // Loopback-only listeners (127/8, ::1, v4-mapped loopback) are not served to the outside.
    assert_eq!(
        served_ports_from(&[TCP4, TCP6]),
        set(&[8080, 8443, 9090, 9443])
    );
}

#[test]
fn served_ports_of_this_namespace_include_wildcard_but_not_loopback_listeners() {
    let wildcard = TcpListener::bind("0.0.0.0:0").unwrap();
    let loopback = TcpListener::bind("127.0.0.1:0").unwrap();
    let v6 = TcpListener::bind("[::]:0").ok();
    let served = served_ports(Path::new(PROC_NET)).unwrap();
    let port = |l: &TcpListener| l.local_addr().unwrap().port();
    assert!(served.contains(&port(&wildcard)), "{served:?}");
    assert!(!served.contains(&port(&loopback)), "{served:?}");
    if let Some(v6) = &v6 {
        assert!(served.contains(&port(v6)), "{served:?}");
    }
    // A closed listener disappears.
    let gone = port(&wildcard);
    drop(wildcard);
    assert!(!served_ports(Path::new(PROC_NET)).unwrap().contains(&gone));
}

#[test]
fn served_ports_tolerate_a_missing_tcp6_but_not_a_missing_tcp() {
    let dir = TempDir::create(&unique_name("served-ports")).unwrap();
    fs::write(dir.join("tcp"), TCP4).unwrap();
    assert_eq!(served_ports(dir.path()).unwrap().len(), 2);
    fs::remove_file(dir.join("tcp")).unwrap();
    let err = served_ports(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tcp"), "{err}");
}

#[test]
fn reads_the_v2_line_of_proc_self_cgroup() {
    let hybrid = "12:memory:/kubepods/x\n1:name=systemd:/kubepods/x\n0::/kubepods.slice/pod1.slice/cri-containerd-abc.scope\n";
    assert_eq!(
        parse_self_cgroup(hybrid),
        Some("/kubepods.slice/pod1.slice/cri-containerd-abc.scope")
    );
    assert_eq!(parse_self_cgroup("0::/\n"), Some("/"));
    assert_eq!(parse_self_cgroup("0::/gone (deleted)\n"), Some("/gone"));
    assert_eq!(parse_self_cgroup("4:memory:/x\n"), None);
    assert!(matches!(
        locate("4:memory:/x\n", "", Path::new("/"), false, &no_probe),
        Err(DiscoverError::NoCgroupV2)
    ));
}

#[test]
fn lists_visible_cgroup2_mounts_with_escapes() {
    let mountinfo = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid master:9 - cgroup2 cgroup rw
40 25 0:26 /../../.. /host/sys/fs/cgroup ro - cgroup2 cgroup rw
41 25 0:26 / /my\\040cgroups rw shared:4 master:1 - cgroup2 none rw
42 31 0:26 /../../.. /sys/fs/cgroup ro - cgroup2 cgroup rw
43 25 0:30 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
    let mounts = cgroup2_mounts(mountinfo);
    assert_eq!(
        mounts,
        [
            CgroupMount {
                root: "/../../..".into(),
                mount_point: "/host/sys/fs/cgroup".into()
            },
            CgroupMount {
                root: "/".into(),
                mount_point: "/my cgroups".into()
            },
            // The later mount over /sys/fs/cgroup hides the first.
            CgroupMount {
                root: "/../../..".into(),
                mount_point: "/sys/fs/cgroup".into()
            },
        ]
    );
}

/// A fake cgroup tree: `host/` is the hierarchy root (no `cgroup.type`), every directory below
/// has one, as on cgroupfs.
struct Tree {
    dir: TempDir,
}

impl Tree {
    fn new(tag: &str) -> Self {
        let dir = TempDir::create(&unique_name(tag)).unwrap();
        fs::create_dir(dir.join("host")).unwrap();
        Self { dir }
    }
    fn host(&self) -> PathBuf {
        self.dir.join("host")
    }
    fn cgroup(&self, rel: &str) -> PathBuf {
        let mut path = self.host();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            path.push(part);
            if !path.exists() {
                fs::create_dir(&path).unwrap();
                fs::write(path.join("cgroup.type"), "domain\n").unwrap();
            }
        }
        path
    }
    fn mountinfo(&self, mounts: &[(&str, &Path)]) -> String {
        mounts
            .iter()
            .enumerate()
            .map(|(i, (root, at))| {
                format!(
                    "{} 1 0:26 {root} {} rw - cgroup2 cgroup2 rw\n",
                    30 + i,
                    at.display()
                )
            })
            .collect()
    }
}

#[test]
fn host_cgroup_namespace_takes_the_parent_through_the_mount() {
    let t = Tree::new("cg-host-ns");
    let ctr = t.cgroup("kubepods/burstable/pod-a/ctr-1");
    t.cgroup("kubepods/burstable/pod-a/ctr-2");
    let mountinfo = t.mountinfo(&[("/", &t.host())]);
    let found = locate(
        "0::/kubepods/burstable/pod-a/ctr-1\n",
        &mountinfo,
        Path::new("/nonexistent-host-root"),
        false,
        &no_probe,
    )
    .unwrap();
    assert_eq!(
        found,
        PodCgroup {
            pod: t.host().join("kubepods/burstable/pod-a"),
            sidecar: ctr.clone(),
            sidecar_id: fs::metadata(&ctr).unwrap().ino(),
            via_host_root: false,
        }
    );
}

#[test]
fn private_cgroup_namespace_searches_the_host_root_by_id() {
    let t = Tree::new("cg-private-ns");
    for i in 0..5 {
        t.cgroup(&format!("kubepods/besteffort/pod-{i}/ctr"));
    }
    let ctr = t.cgroup("kubepods/burstable/pod-b/sidecar");
    t.cgroup("kubepods/burstable/pod-b/app");
    // The container's own cgroup2 mount shows its cgroup at the top: same inode, other path.
    let own_mount = t.dir.join("own");
    symlink(&ctr, &own_mount).unwrap();
    let mountinfo = t.mountinfo(&[("/", &own_mount), ("/../../../..", &t.host())]);
    let found = locate("0::/\n", &mountinfo, &t.host(), false, &no_probe).unwrap();
    assert_eq!(found.pod, t.host().join("kubepods/burstable/pod-b"));
    assert_eq!(found.sidecar, ctr);
    assert!(found.via_host_root);

    // The host root is not the whole hierarchy (here: another pod's subtree).
    let other = t.host().join("kubepods/besteffort");
    let err = locate("0::/\n", &mountinfo, &other, false, &no_probe).unwrap_err();
    assert!(
        matches!(
            err,
            DiscoverError::NotFound {
                truncated: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--host-cgroup-root"), "{err}");
    // The host root is the container's own cgroup.
    let err = locate("0::/\n", &mountinfo, &own_mount, false, &no_probe).unwrap_err();
    assert!(matches!(err, DiscoverError::HostRoot { .. }), "{err}");
}

#[test]
fn without_a_visible_own_cgroup_the_probed_id_is_searched() {
    let t = Tree::new("cg-probe");
    let ctr = t.cgroup("kubepods/pod-c/sidecar");
    let id = fs::metadata(&ctr).unwrap().ino();
    // The host's tree mounted over the container's own mount: only `/..` roots are visible.
    let mountinfo = t.mountinfo(&[("/../../..", &t.host())]);
    let probe = |rel: &str| -> Result<u64, String> {
        assert_eq!(rel, "/");
        Ok(id)
    };
    let found = locate("0::/\n", &mountinfo, &t.host(), false, &probe).unwrap();
    assert_eq!(found.pod, t.host().join("kubepods/pod-c"));
    assert_eq!(found.sidecar, ctr);
    assert!(found.via_host_root);
}

#[test]
fn refuses_the_root_cgroup_and_explains_missing_mounts() {
    let t = Tree::new("cg-refuse");
    t.cgroup("sidecar");
    let mountinfo = t.mountinfo(&[("/", &t.host())]);
    let err = locate("0::/sidecar\n", &mountinfo, &t.host(), false, &no_probe).unwrap_err();
    assert!(matches!(err, DiscoverError::ParentIsRoot { .. }), "{err}");
    assert!(err.to_string().contains("root cgroup"), "{err}");

    let err = locate("0::/\n", &mountinfo, &t.host(), false, &no_probe).unwrap_err();
    assert!(matches!(err, DiscoverError::InRootCgroup { .. }), "{err}");

    // Only a mount of the host's root, seen from a private namespace: our cgroup is invisible.
    let mountinfo = t.mountinfo(&[("/../..", &t.host())]);
    let err = locate("0::/\n", &mountinfo, &t.host(), false, &no_probe).unwrap_err();
    assert!(
        matches!(err, DiscoverError::OwnCgroupNotVisible { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("/sys/fs/cgroup"), "{err}");
    assert!(
        err.to_string().contains("probe disabled in this test"),
        "{err}"
    );
    let err = locate("0::/\n", "", &t.host(), false, &no_probe).unwrap_err();
    assert!(
        err.to_string().contains("cgroup2 mounts seen: none"),
        "{err}"
    );
}

#[test]
fn search_is_bounded_in_depth() {
    let t = Tree::new("cg-deep");
    let deep: String = (0..MAX_SEARCH_DEPTH + 2)
        .map(|i| format!("/d{i}"))
        .collect();
    let bottom = t.cgroup(&deep);
    let id = fs::metadata(&bottom).unwrap().ino();
    let search = find_cgroup_by_id(&t.host(), id).unwrap();
    assert_eq!(search.path, None);
    assert!(search.truncated);
    assert_eq!(search.searched, MAX_SEARCH_DEPTH);
    // Within the bound it is found.
    let shallow = t.cgroup("/d0/d1/d2");
    let id = fs::metadata(&shallow).unwrap().ino();
    assert_eq!(
        find_cgroup_by_id(&t.host(), id).unwrap().path,
        Some(shallow)
    );
}

// --- privileged: a real process in a real cgroup -------------------------------------------

/// Set in the child run of a privileged test: the host cgroup root to pass to `pod_cgroup`.
const CHILD_ENV: &str = "SIDECAR_DISCOVER_TEST_CHILD";

/// In the child run, prints what `pod_cgroup` finds and returns true.
fn run_as_child() -> bool {
    let Some(host_root) = std::env::var_os(CHILD_ENV) else {
        return false;
    };
    // libtest has printed `test <name> ... ` without a newline: start a line of our own.
    match pod_cgroup(Path::new(&host_root)) {
        Ok(found) => println!(
            "\nPOD={}\nSIDECAR={}\nVIA={}",
            found.pod.display(),
            found.sidecar.display(),
            found.via_host_root
        ),
        Err(e) => println!("\nERR={e}"),
    }
    // Whether a probe mount leaked into this (the main) thread's mount namespace.
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let tmp = std::env::temp_dir();
    println!(
        "TMPMOUNT={}",
        cgroup2_mounts(&mounts).iter().any(|m| m.mount_point == tmp)
    );
    true
}

/// Runs this test binary's test `test` as a child placed in `cgroup` (through `wrap`, a shell
/// fragment run before exec, e.g. entering namespaces) and returns its `KEY=value` lines.
fn child_report(test: &str, cgroup: &Cgroup, wrap: &str, host_root: &Path) -> Vec<String> {
    let exe = std::env::current_exe().unwrap();
    let script = format!(
        "echo $$ > '{}/cgroup.procs' && exec {wrap} '{}' '{test}' --exact --nocapture --test-threads=1",
        cgroup.path().display(),
        exe.display()
    );
    let out = run_timeout(
        Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env(CHILD_ENV, host_root),
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(
        out.success() && !out.timed_out,
        "child failed: {}\n{}\n{}",
        out.command,
        out.stdout_str(),
        out.stderr_str()
    );
    out.stdout_str()
        .lines()
        .filter(|l| {
            ["POD=", "SIDECAR=", "VIA=", "ERR=", "TMPMOUNT="]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn privileged_finds_the_pod_cgroup_from_the_host_cgroup_namespace() {
    if run_as_child() {
        return;
    }
    let pod = Cgroup::create(&unique_name("discover-host-ns")).unwrap();
    let sidecar = pod.child("sidecar").unwrap();
    let report = child_report(
        "discover::tests::privileged_finds_the_pod_cgroup_from_the_host_cgroup_namespace",
        &sidecar,
        "",
        Path::new("/nonexistent-not-needed-here"),
    );
    assert_eq!(
        report,
        [
            format!("POD={}", pod.path().display()),
            format!("SIDECAR={}", sidecar.path().display()),
            "VIA=false".to_string(),
            "TMPMOUNT=false".to_string(),
        ]
    );
}

#[test]
fn privileged_finds_the_pod_cgroup_from_a_private_cgroup_namespace() {
    if run_as_child() {
        return;
    }
    let host_root = cgroup2_mount().unwrap();
    let pod = Cgroup::create(&unique_name("discover-private-ns")).unwrap();
    let sidecar = pod.child("sidecar").unwrap();
    let _app = pod.child("app").unwrap();
    let scratch = TempDir::create(&unique_name("discover-private-ns")).unwrap();
    let own_mount = scratch.join("cgroup");
    fs::create_dir(&own_mount).unwrap();
    // As a container runtime does: a new cgroup namespace rooted at the container's cgroup and
    // a private mount namespace with cgroup2 mounted inside it (gone when the child exits).
    let wrap = format!(
        "unshare --cgroup --mount --propagation private sh -c 'mount -t cgroup2 cgroup2 {} && exec \"$0\" \"$@\"'",
        own_mount.display()
    );
    let report = child_report(
        "discover::tests::privileged_finds_the_pod_cgroup_from_a_private_cgroup_namespace",
        &sidecar,
        &wrap,
        &host_root,
    );
    assert_eq!(
        report,
        [
            format!("POD={}", pod.path().display()),
            format!("SIDECAR={}", sidecar.path().display()),
            "VIA=true".to_string(),
            "TMPMOUNT=false".to_string(),
        ]
    );

    // Without the host hierarchy the error says what to mount.
    let report = child_report(
        "discover::tests::privileged_finds_the_pod_cgroup_from_a_private_cgroup_namespace",
        &sidecar,
        &wrap,
        scratch.path(),
    );
    assert_eq!(report.len(), 2, "{report:?}");
    assert_eq!(report[1], "TMPMOUNT=false");
    assert!(
        report[0].starts_with("ERR=--host-cgroup-root") && report[0].contains("hostPath"),
        "{report:?}"
    );
}

#[test]
fn privileged_probes_its_cgroup_id_when_no_mount_shows_it() {
    if run_as_child() {
        return;
    }
    let host_root = cgroup2_mount().unwrap();
    let pod = Cgroup::create(&unique_name("discover-probe")).unwrap();
    let sidecar = pod.child("sidecar").unwrap();
    // A private cgroup namespace but no cgroup2 mount of its own: the host's mount shows only
    // `/../..`-rooted paths, so the id comes from the private-mount probe, which leaves no mount
    // behind in the child's main thread (TMPMOUNT=false).
    let report = child_report(
        "discover::tests::privileged_probes_its_cgroup_id_when_no_mount_shows_it",
        &sidecar,
        "unshare --cgroup",
        &host_root,
    );
    assert_eq!(
        report,
        [
            format!("POD={}", pod.path().display()),
            format!("SIDECAR={}", sidecar.path().display()),
            "VIA=true".to_string(),
            "TMPMOUNT=false".to_string(),
        ]
    );
}

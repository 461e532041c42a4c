//! Privileged end-to-end tests of the eBPF interception programs on the running kernel.
//!
//! Each test builds its own small world: a network namespace with `lo` up and an interface
//! carrying 198.18.0.1/24 and fd5e:1dec::1/64, and a parent cgroup with `app` (the target),
//! `proxy` (the sidecar cgroup) and `peer` (real servers) children. Helper processes are Python
//! scripts started in a cgroup (pid written to `cgroup.procs`) and then in the namespace with
//! `nsenter --net=` (not `ip netns exec`, which remounts /sys and hides the cgroup fs).
//! Guards remove namespaces, kill helpers and remove cgroups even when a test fails; they and
//! the helpers live in `common/`.
//!
//! These tests need root and the embedded eBPF object; without either they fail, saying what
//! is missing (they never skip).

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{attach, attached_programs, intercept_config, Cgroups, Helper, Netns};
use sidecar::ebpf::{self, EbpfError, InterceptConfig, Interception};

const PROXY_PORT: u16 = 15001;
const WAIT: Duration = Duration::from_secs(10);

fn require_privileges_and_object() {
    common::require_privileges_and_object("interception", &["ip", "nsenter", "python3", "sh"]);
}

/// The test namespace: `lo` up and `sc0` carrying 198.18.0.1/24 and fd5e:1dec::1/64.
fn test_netns(name: &str) -> Netns {
    let ns = common::netns(name);
    // A dummy interface when the kernel has the module, else one end of a veth pair.
    if ns.ip(&["link", "add", "sc0", "type", "dummy"]).is_ok() {
        common::ip(&ns, &["link", "set", "sc0", "up"]);
    } else {
        common::ip(
            &ns,
            &["link", "add", "sc0", "type", "veth", "peer", "name", "sc1"],
        );
        common::ip(&ns, &["link", "set", "sc1", "up"]);
        common::ip(&ns, &["link", "set", "sc0", "up"]);
    }
    common::add_addrs(&ns, "sc0", &["198.18.0.1/24", "fd5e:1dec::1/64"]);
    ns
}

/// Namespace + cgroups of one test. Fields drop in declaration order: namespace last.
struct World {
    cgroups: Cgroups,
    netns: Netns,
}

impl World {
    fn new(test: &str) -> Self {
        require_privileges_and_object();
        let name = format!("sc-{test}-{}", std::process::id());
        let cgroups = Cgroups::new(&name);
        let netns = test_netns(&name);
        Self { cgroups, netns }
    }

    fn config(&self) -> InterceptConfig {
        intercept_config(&self.cgroups, PROXY_PORT)
    }

    fn attach(&self) -> Interception {
        attach(&self.config())
    }

    /// Starts `script` in `cgroup` and the test namespace and waits for its `ready` line.
    fn helper(&self, what: &str, cgroup: &Path, script: &str, args: &[&str]) -> Helper {
        Helper::start(what, cgroup, Some(&self.netns), script, args, WAIT).ready()
    }

    /// Real servers: TCP on 0.0.0.0:8080 and [::]:8080, UDP on the test addresses.
    fn real_servers(&self) -> Helper {
        self.helper("real servers", &self.cgroups.peer(), REAL_SERVERS_PY, &[])
    }

    /// The stand-in proxy: TCP and UDP on 127.0.0.1:15001 and [::1]:15001, in `cgroup`.
    fn proxy_in(&self, cgroup: &Path) -> Helper {
        let port = PROXY_PORT.to_string();
        self.helper("proxy", cgroup, PROXY_PY, &[&port])
    }

    fn proxy(&self) -> Helper {
        self.proxy_in(&self.cgroups.proxy())
    }

    /// The stand-in proxy asking for the original destination with a `size`-byte buffer.
    fn proxy_with_buffer(&self, size: usize) -> Helper {
        let (port, size) = (PROXY_PORT.to_string(), size.to_string());
        self.helper("proxy", &self.cgroups.proxy(), PROXY_PY, &[&port, &size])
    }

    /// An application client driven over stdin, in `cgroup`.
    fn client_in(&self, cgroup: &Path) -> Helper {
        self.helper("client", cgroup, CLIENT_PY, &[])
    }

    fn app(&self) -> Helper {
        self.client_in(&self.cgroups.app())
    }
}

/// Polls `f` until it returns `Some`, at most `WAIT`.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Helper scripts

/// Real servers: each TCP connection gets `real local=<addr>` then is closed; each UDP
/// datagram gets `real-udp`.
const REAL_SERVERS_PY: &str = r#"
import socket, threading

def fmt(a):
    return ("[%s]:%d" if ":" in a[0] else "%s:%d") % (a[0], a[1])

def tcp(family, host):
    l = socket.socket(family, socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    l.bind((host, 8080))
    l.listen(128)
    def serve():
        while True:
            c, _ = l.accept()
            c.sendall(("real local=%s\n" % fmt(c.getsockname())).encode())
            c.close()
    threading.Thread(target=serve, daemon=True).start()

def udp(family, host):
    u = socket.socket(family, socket.SOCK_DGRAM)
    u.bind((host, 8080))
    def serve():
        while True:
            _, peer = u.recvfrom(100)
            u.sendto(b"real-udp", peer)
    threading.Thread(target=serve, daemon=True).start()

tcp(socket.AF_INET, "0.0.0.0")
tcp(socket.AF_INET6, "::")
udp(socket.AF_INET, "198.18.0.1")
udp(socket.AF_INET6, "fd5e:1dec::1")
print("ready", flush=True)
threading.Event().wait()
"#;

/// Stand-in proxy: for each accepted connection asks SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST,
/// replies `proxy orig=<addr> len=<n> fam=<f>` (or `proxy orig=ERR:<errno>`), then waits for
/// the client to close. UDP datagrams get `proxy-udp` (a wrongly redirected datagram shows).
const PROXY_PY: &str = r#"
import socket, sys, threading, errno
import ctypes
_libc = ctypes.CDLL(None, use_errno=True)

def getsockopt_raw(sock, level, name, size):
    """getsockopt(2) with any buffer size (Python's own caps it at 1024 bytes)."""
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if _libc.getsockopt(sock.fileno(), level, name, buf, ctypes.byref(length)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, errno.errorcode.get(e, str(e)))
    return buf.raw[:length.value]

port = int(sys.argv[1])
bufsize = int(sys.argv[2]) if len(sys.argv) > 2 else 0

def orig_dst(c, family):
    try:
        if family == socket.AF_INET:
            d = getsockopt_raw(c, socket.SOL_IP, 80, bufsize or 16)
            ip = socket.inet_ntop(socket.AF_INET, d[4:8])
            addr = "%s:%d" % (ip, int.from_bytes(d[2:4], "big"))
        else:
            d = getsockopt_raw(c, socket.IPPROTO_IPV6, 80, bufsize or 28)
            ip = socket.inet_ntop(socket.AF_INET6, d[8:24])
            addr = "[%s]:%d" % (ip, int.from_bytes(d[2:4], "big"))
        return "%s len=%d fam=%d" % (addr, len(d), int.from_bytes(d[0:2], "little"))
    except OSError as e:
        return "ERR:%s" % errno.errorcode.get(e.errno, e.errno)
    except Exception as e:
        return "ERR:%r" % e

def handle(c, family):
    c.sendall(("proxy orig=%s\n" % orig_dst(c, family)).encode())
    try:
        while c.recv(100):
            pass
    except OSError:
        pass
    c.close()

def tcp(family, host):
    l = socket.socket(family, socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((host, port))
    l.listen(128)
    def serve():
        while True:
            c, _ = l.accept()
            threading.Thread(target=handle, args=(c, family), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()

def udp(family, host):
    u = socket.socket(family, socket.SOCK_DGRAM)
    u.bind((host, port))
    def serve():
        while True:
            _, peer = u.recvfrom(100)
            u.sendto(b"proxy-udp", peer)
    threading.Thread(target=serve, daemon=True).start()

tcp(socket.AF_INET, "127.0.0.1")
tcp(socket.AF_INET6, "::1")
udp(socket.AF_INET, "127.0.0.1")
udp(socket.AF_INET6, "::1")
print("ready", flush=True)
threading.Event().wait()
"#;

/// Application client. Commands on stdin, one reply line each:
/// `tcp4|tcp6|udp4|udp6 HOST PORT` → `ok <first line received>` or `err <errno name>`
/// (TCP sockets are kept open); `close` → closes them all, replies `closed`.
const CLIENT_PY: &str = r#"
import socket, sys, errno
kept = []
fams = {"4": socket.AF_INET, "6": socket.AF_INET6}
print("ready", flush=True)
for line in sys.stdin:
    parts = line.split()
    if not parts:
        continue
    if parts[0] == "close":
        for s in kept:
            s.close()
        kept.clear()
        print("closed", flush=True)
        continue
    kind, host, port = parts[0], parts[1], int(parts[2])
    try:
        if kind.startswith("tcp"):
            s = socket.socket(fams[kind[3]], socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect((host, port))
            kept.append(s)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(200)
                if not chunk:
                    break
                buf += chunk
            print("ok " + buf.decode().strip(), flush=True)
        else:
            s = socket.socket(fams[kind[3]], socket.SOCK_DGRAM)
            s.settimeout(3)
            s.connect((host, port))
            s.send(b"x")
            print("ok " + s.recv(100).decode(), flush=True)
            s.close()
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
        print("err " + name, flush=True)
"#;

/// Reads socket options the getsockopt program must pass through untouched, on TCP sockets
/// of both families, and prints them as one JSON object.
const SOCKOPT_PROBE_PY: &str = r#"
import socket, json, errno
import ctypes
_libc = ctypes.CDLL(None, use_errno=True)

def getsockopt_raw(sock, level, name, size):
    """getsockopt(2) with any buffer size (Python's own caps it at 1024 bytes)."""
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if _libc.getsockopt(sock.fileno(), level, name, buf, ctypes.byref(length)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, errno.errorcode.get(e, str(e)))
    return buf.raw[:length.value]
res = {}
def trial(name, f):
    try:
        res[name] = f()
    except OSError as e:
        res[name] = "errno:" + errno.errorcode.get(e.errno, str(e.errno))

keep = []
for tag, family, host in (("4", socket.AF_INET, "127.0.0.1"), ("6", socket.AF_INET6, "::1")):
    l = socket.socket(family, socket.SOCK_STREAM)
    l.bind((host, 0))
    l.listen(4)
    c = socket.create_connection(l.getsockname()[:2])
    s, _ = l.accept()
    keep += [l, c, s]
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    trial("rcvbuf" + tag, lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    trial("rcvbuf_8k" + tag, lambda: getsockopt_raw(s, socket.SOL_SOCKET, socket.SO_RCVBUF, 8192).hex())
    trial("type" + tag, lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    trial("nodelay" + tag, lambda: s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    trial("tcp_info" + tag, lambda: (lambda d: [len(d), d[0]])(
        s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)))
    trial("tcp_info_8k" + tag, lambda: (lambda d: [len(d), d[0]])(
        getsockopt_raw(s, socket.IPPROTO_TCP, socket.TCP_INFO, 8192)))
    if tag == "4":
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10)
        trial("tos", lambda: s.getsockopt(socket.IPPROTO_IP, socket.IP_TOS))
        trial("orig_dst_accepted", lambda: s.getsockopt(socket.SOL_IP, 80, 16).hex())
        trial("orig_dst_client", lambda: c.getsockopt(socket.SOL_IP, 80, 16).hex())
        trial("orig_dst_8k", lambda: getsockopt_raw(s, socket.SOL_IP, 80, 8192).hex())
        trial("orig_dst_short", lambda: s.getsockopt(socket.SOL_IP, 80, 4).hex())
    else:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 0x20)
        trial("tclass", lambda: s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS))
        trial("orig_dst6_accepted", lambda: s.getsockopt(socket.IPPROTO_IPV6, 80, 28).hex())
        trial("orig_dst6_8k", lambda: getsockopt_raw(s, socket.IPPROTO_IPV6, 80, 8192).hex())
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
trial("orig_dst_udp", lambda: u.getsockopt(socket.SOL_IP, 80, 16).hex())
print(json.dumps(res, sort_keys=True), flush=True)
"#;

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn redirects_v4_and_v6_to_the_proxy_with_the_exact_original_destination() {
    let world = World::new("redir");
    let _servers = world.real_servers();
    let _proxy = world.proxy();
    let interception = world.attach();
    let mut app = world.app();

    assert_eq!(
        app.ask("tcp4 198.18.0.1 8080"),
        "ok proxy orig=198.18.0.1:8080 len=16 fam=2"
    );
    assert_eq!(
        app.ask("tcp6 fd5e:1dec::1 8080"),
        "ok proxy orig=[fd5e:1dec::1]:8080 len=28 fam=10"
    );
    // Another destination port is reported as such (the key is per connection).
    assert_eq!(
        app.ask("tcp4 198.18.0.77 9"),
        "ok proxy orig=198.18.0.77:9 len=16 fam=2"
    );
    // A dual-stack IPv6 socket dialling an IPv4-mapped address (gRPC C-core, Java) is an IPv4
    // connection: it reaches the proxy's IPv4 listener with the IPv4 destination recorded.
    assert_eq!(
        app.ask("tcp6 ::ffff:198.18.0.1 8080"),
        "ok proxy orig=198.18.0.1:8080 len=16 fam=2"
    );
    // While the connections are open, the peer map holds exactly them and the cookie map
    // holds none (entries move on ESTABLISHED).
    assert_eq!(interception.orig_dst_entries().expect("map counts"), (0, 4));
    // The fill figures behind `sidecar.ebpf.map.fill_ratio` count the same entries.
    let fill = interception.map_fill();
    assert!(
        fill.contains(&("ORIG_DST_BY_PEER".to_string(), 4, 65_536)),
        "{fill:?}"
    );
    assert_eq!(app.ask("close"), "closed");
    drop(interception);
}

#[test]
fn answers_with_buffers_larger_than_a_page_and_not_with_too_small_ones() {
    let world = World::new("bufsize");
    let _servers = world.real_servers();
    let interception = world.attach();
    let mut app = world.app();
    {
        // Only the first page of an 8 KiB optval reaches the program; the answer fits in it.
        let _proxy = world.proxy_with_buffer(8192);
        assert_eq!(
            app.ask("tcp4 198.18.0.1 8080"),
            "ok proxy orig=198.18.0.1:8080 len=16 fam=2"
        );
        assert_eq!(
            app.ask("tcp6 fd5e:1dec::1 8080"),
            "ok proxy orig=[fd5e:1dec::1]:8080 len=28 fam=10"
        );
    }
    {
        // A buffer smaller than the address is left to the kernel, which fails the call.
        let _proxy = world.proxy_with_buffer(8);
        let reply = app.ask("tcp4 198.18.0.1 8080");
        assert!(reply.starts_with("ok proxy orig=ERR:"), "{reply}");
        let reply = app.ask("tcp6 fd5e:1dec::1 8080");
        assert!(reply.starts_with("ok proxy orig=ERR:"), "{reply}");
    }
    assert_eq!(app.ask("close"), "closed");
    wait_for("ORIG_DST_BY_PEER to drain", || {
        let counts = interception.orig_dst_entries().expect("map counts");
        (counts == (0, 0)).then_some(())
    });
}

#[test]
fn fails_open_when_nothing_listens_on_the_proxy_port() {
    let world = World::new("failopen");
    let _servers = world.real_servers();
    let interception = world.attach();
    let mut app = world.app();

    assert_eq!(
        app.ask("tcp4 198.18.0.1 8080"),
        "ok real local=198.18.0.1:8080"
    );
    assert_eq!(
        app.ask("tcp6 fd5e:1dec::1 8080"),
        "ok real local=[fd5e:1dec::1]:8080"
    );
    assert_eq!(interception.orig_dst_entries().expect("map counts"), (0, 0));

    // Once the proxy listens, the same connects are redirected: the check is per connect.
    let _proxy = world.proxy();
    assert_eq!(
        app.ask("tcp4 198.18.0.1 8080"),
        "ok proxy orig=198.18.0.1:8080 len=16 fam=2"
    );
    assert_eq!(
        app.ask("tcp6 fd5e:1dec::1 8080"),
        "ok proxy orig=[fd5e:1dec::1]:8080 len=28 fam=10"
    );
}

#[test]
fn does_not_redirect_loopback_mapped_udp_proxy_port_or_the_proxy_cgroup() {
    let world = World::new("noredir");
    let _servers = world.real_servers();
    let _proxy = world.proxy();
    let interception = world.attach();
    let mut app = world.app();

    // Loopback destinations, IPv4 and IPv6, including the rest of 127.0.0.0/8.
    assert_eq!(
        app.ask("tcp4 127.0.0.1 8080"),
        "ok real local=127.0.0.1:8080"
    );
    assert_eq!(
        app.ask("tcp4 127.0.0.2 8080"),
        "ok real local=127.0.0.2:8080"
    );
    assert_eq!(app.ask("tcp6 ::1 8080"), "ok real local=[::1]:8080");
    // The IPv4-mapped form of a loopback destination is loopback too.
    assert_eq!(
        app.ask("tcp6 ::ffff:127.0.0.1 8080"),
        "ok real local=127.0.0.1:8080"
    );
    // UDP: a redirected datagram would be answered by the proxy's UDP socket.
    assert_eq!(app.ask("udp4 198.18.0.1 8080"), "ok real-udp");
    assert_eq!(app.ask("udp6 fd5e:1dec::1 8080"), "ok real-udp");
    // The proxy port itself on a non-loopback address: not redirected, so refused.
    assert_eq!(
        app.ask("tcp4 198.18.0.1 15001"),
        "err ECONNREFUSED",
        "a connect to the proxy port must not be redirected"
    );
    assert_eq!(interception.orig_dst_entries().expect("map counts"), (0, 0));

    // Connections made from the proxy cgroup go straight to their destination.
    let mut from_proxy = world.client_in(&world.cgroups.proxy());
    assert_eq!(
        from_proxy.ask("tcp4 198.18.0.1 8080"),
        "ok real local=198.18.0.1:8080"
    );
    assert_eq!(
        from_proxy.ask("tcp6 fd5e:1dec::1 8080"),
        "ok real local=[fd5e:1dec::1]:8080"
    );

    // And the app itself is still redirected in the same world.
    assert_eq!(
        app.ask("tcp4 198.18.0.1 8080"),
        "ok proxy orig=198.18.0.1:8080 len=16 fam=2"
    );
}

#[test]
fn getsockopt_passes_every_other_answer_through_unchanged() {
    let world = World::new("sockopt");
    let probe = |label: &str| -> BTreeMap<String, serde_json::Value> {
        let h = Helper::start(
            label,
            &world.cgroups.proxy(),
            Some(&world.netns),
            SOCKOPT_PROBE_PY,
            &[],
            WAIT,
        );
        serde_json::from_str(&h.line()).expect("probe JSON")
    };
    let without = probe("sockopt probe without programs");
    let interception = world.attach();
    let with = probe("sockopt probe with programs");

    assert_eq!(with, without, "getsockopt answers changed by the program");
    // The run is meaningful: real values were read and SO_ORIGINAL_DST failed as the kernel
    // makes it fail (no netfilter original destination for these sockets).
    assert_eq!(with["rcvbuf4"], serde_json::json!(131072), "{with:?}");
    assert_eq!(with["nodelay6"], serde_json::json!(1), "{with:?}");
    assert_eq!(
        with["tcp_info4"][1],
        serde_json::json!(1),
        "TCP_ESTABLISHED: {with:?}"
    );
    for key in [
        "orig_dst_accepted",
        "orig_dst_client",
        "orig_dst_8k",
        "orig_dst6_accepted",
        "orig_dst6_8k",
        "orig_dst_udp",
    ] {
        let v = with[key].as_str().unwrap_or_default();
        assert!(v.starts_with("errno:"), "{key} should fail: {with:?}");
    }
    drop(interception);
}

#[test]
fn maps_are_empty_again_after_the_connections_close() {
    let world = World::new("bounded");
    let _servers = world.real_servers();
    let _proxy = world.proxy();
    let interception = world.attach();
    let mut app = world.app();

    const N: usize = 16;
    for i in 0..N {
        let port = 8000 + i;
        assert_eq!(
            app.ask(&format!("tcp4 198.18.0.{} {port}", 10 + i)),
            format!("ok proxy orig=198.18.0.{}:{port} len=16 fam=2", 10 + i)
        );
        assert_eq!(
            app.ask(&format!("tcp6 fd5e:1dec::{:x} {port}", 10 + i)),
            format!(
                "ok proxy orig=[fd5e:1dec::{:x}]:{port} len=28 fam=10",
                10 + i
            )
        );
    }
    assert_eq!(
        interception.orig_dst_entries().expect("map counts"),
        (0, 2 * N)
    );
    assert_eq!(app.ask("close"), "closed");
    wait_for("ORIG_DST_BY_PEER to drain", || {
        let counts = interception.orig_dst_entries().expect("map counts");
        (counts == (0, 0)).then_some(())
    });
}

#[test]
fn nothing_stays_attached_after_drop_and_programs_coexist() {
    let world = World::new("detach");
    let _servers = world.real_servers();
    let _proxy = world.proxy();
    let (app_cg, proxy_cg) = (world.cgroups.app(), world.cgroups.proxy());
    assert!(attached_programs(&app_cg).is_empty());

    let first = world.attach();
    let ours = vec!["sc_connect4", "sc_connect6", "sc_sockops"];
    assert_eq!(attached_programs(&app_cg), ours);
    assert_eq!(attached_programs(&proxy_cg), vec!["sc_getsockopt"]);

    // A second set attaches next to the first (multi mode), and leaving it removes only it.
    let second = world.attach();
    let doubled: Vec<&str> = ours.iter().flat_map(|n| [*n, *n]).collect();
    assert_eq!(attached_programs(&app_cg), doubled);
    second.detach();
    // A link goes when its last file descriptor closes: a child another test thread is
    // spawning right now holds a copy until its exec, so allow a bounded wait.
    wait_for("the second set to detach", || {
        (attached_programs(&app_cg) == ours).then_some(())
    });

    let mut app = world.app();
    assert_eq!(
        app.ask("tcp4 198.18.0.1 8080"),
        "ok proxy orig=198.18.0.1:8080 len=16 fam=2"
    );

    drop(first);
    wait_for("nothing left on the app and proxy cgroups", || {
        (attached_programs(&app_cg).is_empty() && attached_programs(&proxy_cg).is_empty())
            .then_some(())
    });
    // With the programs gone, the proxy listening no longer matters.
    assert_eq!(
        app.ask("tcp4 198.18.0.1 8080"),
        "ok real local=198.18.0.1:8080"
    );
}

#[test]
fn attach_rejects_bad_cgroups_with_clear_errors() {
    let world = World::new("validate");
    let base = world.config();

    let missing = InterceptConfig {
        target_cgroup: world.cgroups.parent().join("does-not-exist"),
        ..base.clone()
    };
    match Interception::attach(&missing) {
        Err(EbpfError::CgroupPath { path, .. }) => assert_eq!(path, missing.target_cgroup),
        other => panic!("expected CgroupPath, got {other:?}"),
    }

    let not_cgroup = InterceptConfig {
        target_cgroup: std::env::temp_dir(),
        ..base.clone()
    };
    match Interception::attach(&not_cgroup) {
        Err(e @ EbpfError::NotCgroup2 { .. }) => {
            assert!(e.to_string().contains("cgroup v2"), "{e}")
        }
        other => panic!("expected NotCgroup2, got {other:?}"),
    }

    let same = InterceptConfig {
        sidecar_cgroup: Some(base.target_cgroup.clone()),
        ..base.clone()
    };
    match Interception::attach(&same) {
        Err(e @ EbpfError::SameCgroup { .. }) => {
            assert!(e.to_string().contains("its own cgroup"), "{e}")
        }
        other => panic!("expected SameCgroup, got {other:?}"),
    }
    // None of the failed attempts left anything behind.
    assert!(attached_programs(&world.cgroups.app()).is_empty());
    assert!(attached_programs(&world.cgroups.proxy()).is_empty());
}

#[test]
fn kernel_check_passes_here() {
    require_privileges_and_object();
    let report = sidecar::kernel::check();
    assert!(report.all_ok(), "sidecar check failed:\n{report}");
    let names: Vec<&str> = report.items.iter().map(|i| i.name.as_str()).collect();
    for program in ebpf::PROGRAMS {
        assert!(
            names.contains(&format!("program {program} loads").as_str()),
            "{report}"
        );
    }
}

#[test]
fn check_refuses_clearly_without_privileges() {
    require_privileges_and_object();
    // `sidecar check` as nobody with no capabilities: the privilege line and the object load
    // fail, and the exit status says so.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_sidecar"))
        .arg("check")
        .output()
        .expect("setpriv (util-linux) is needed to drop privileges");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "check passed without privileges:\n{stdout}"
    );
    assert!(
        stdout.contains("[FAIL] privileges for bpf()"),
        "no privilege failure reported:\n{stdout}"
    );
    assert!(
        stdout.contains("permission denied"),
        "object load did not report permission denied:\n{stdout}"
    );
}

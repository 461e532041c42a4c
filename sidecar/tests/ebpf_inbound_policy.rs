//! Privileged tests of the interception policy maps (excluded ports and networks, include
//! list, runtime updates), of inbound steering with `sk_lookup`, and of coexistence with a
//! foreign program on the same cgroup hook, on the running kernel.
//!
//! Outbound tests build a network namespace whose `sc0` interface carries two IPv4 and two IPv6
//! networks (198.18.0.1/24, 198.18.1.1/24, fd5e:1dec::1/64, fd5e:1dec:1::1/64), so the same real
//! servers answer on addresses inside and outside a policy network. Inbound tests build a pod
//! namespace and a peer namespace joined by a veth pair (198.18.0.1 ↔ 198.18.0.2,
//! fd5e:1dec::1 ↔ fd5e:1dec::2). Helper processes are Python scripts started in a test cgroup
//! and then in the namespace with `nsenter --net=`; the inbound proxy stand-in is a thread of
//! the test that enters the pod namespace to create its listeners. Guards remove namespaces,
//! cgroups, helper processes and the foreign program even when a test fails.
//!
//! These tests need root and the embedded eBPF object; without either they fail, saying what
//! is missing (they never skip).
//!
//! The guards, helper processes and bpftool queries shared with the other kernel tests live in
//! `common/`.

mod common;

use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use common::{attach, attached_programs, bpftool_json, intercept_config, Cgroups, Helper, Netns};
use sidecar::{
    ebpf::{EbpfError, Interception},
    policy::KernelPolicy,
};

const PROXY_PORT: u16 = 15001;
const INBOUND_PORT: u16 = 15006;
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Preconditions and namespaces

fn require_privileges_and_object() {
    common::require_privileges_and_object(
        "policy and inbound",
        &["ip", "nsenter", "python3", "sh", "bpftool"],
    );
}

/// The namespace's inode number, as `bpftool link` reports it.
fn netns_inode(netns: &Netns) -> u64 {
    fs::metadata(netns.path()).expect("netns file").ino()
}

/// Runs the calling thread in a network namespace until dropped.
struct InNetns {
    original: OwnedFd,
}

impl InNetns {
    fn enter(netns: &Netns) -> Self {
        let original: OwnedFd = fs::File::open("/proc/thread-self/ns/net")
            .expect("own netns")
            .into();
        let target = fs::File::open(netns.path()).expect("open netns");
        // SAFETY: setns on a valid namespace descriptor; it changes only this thread.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        Self { original }
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        // SAFETY: setns back to the descriptor of the namespace the thread came from.
        let rc = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 && !thread::panicking() {
            panic!("setns back: {}", std::io::Error::last_os_error());
        }
    }
}

/// Program ids of the `sk_lookup` links attached to the namespace with this inode.
fn sk_lookup_links(netns_ino: u64) -> Vec<u64> {
    let value = bpftool_json(&["link", "show"]);
    value
        .as_array()
        .expect("bpftool JSON array")
        .iter()
        .filter(|l| l.get("type").and_then(|t| t.as_str()) == Some("netns"))
        .filter(|l| l.get("netns_ino").and_then(|i| i.as_u64()) == Some(netns_ino))
        .filter(|l| l.get("attach_type").and_then(|t| t.as_str()) == Some("sk_lookup"))
        .filter_map(|l| l.get("prog_id").and_then(|i| i.as_u64()))
        .collect()
}

/// Starts `script` in `cgroup` and `netns` and waits for its `ready` line.
fn helper(what: &str, cgroup: &Path, netns: &Netns, script: &str, args: &[&str]) -> Helper {
    Helper::start(what, cgroup, Some(netns), script, args, WAIT).ready()
}

/// Real servers (`REAL_SERVERS_PY`) on every address of `netns`, TCP ports `ports`.
fn real_servers(what: &str, cgroup: &Path, netns: &Netns, ports: &[u16]) -> Helper {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let args: Vec<&str> = ports.iter().map(String::as_str).collect();
    helper(what, cgroup, netns, REAL_SERVERS_PY, &args)
}

// ---------------------------------------------------------------------------------------------
// Worlds

/// The outbound world: one namespace whose `sc0` carries two networks per family, and the
/// test cgroups.
struct World {
    cgroups: Cgroups,
    netns: Netns,
}

impl World {
    fn new(test: &str) -> Self {
        require_privileges_and_object();
        let name = format!("sck1-{test}-{}", std::process::id());
        let cgroups = Cgroups::new(&name);
        let netns = common::netns(&name);
        common::ip(
            &netns,
            &["link", "add", "sc0", "type", "veth", "peer", "name", "sc1"],
        );
        common::ip(&netns, &["link", "set", "sc1", "up"]);
        common::ip(&netns, &["link", "set", "sc0", "up"]);
        common::add_addrs(
            &netns,
            "sc0",
            &[
                "198.18.0.1/24",
                "198.18.1.1/24",
                "fd5e:1dec::1/64",
                "fd5e:1dec:1::1/64",
            ],
        );
        Self { cgroups, netns }
    }

    fn attach(&self) -> Interception {
        attach(&intercept_config(&self.cgroups, PROXY_PORT))
    }

    /// Real servers on every address, TCP ports `ports`, in the peer cgroup.
    fn real_servers(&self, ports: &[u16]) -> Helper {
        let cg = self.cgroups.peer();
        real_servers("real servers", &cg, &self.netns, ports)
    }

    /// The stand-in outbound proxy on 127.0.0.1:15001 and [::1]:15001.
    fn proxy(&self) -> Helper {
        let port = PROXY_PORT.to_string();
        let cg = self.cgroups.proxy();
        helper("proxy", &cg, &self.netns, PROXY_PY, &[&port])
    }

    /// An application client in the app (target) cgroup.
    fn app(&self) -> Helper {
        let cg = self.cgroups.app();
        helper("app client", &cg, &self.netns, CLIENT_PY, &[])
    }
}

fn policy(
    exclude_ports: &[u16],
    exclude: &[&str],
    include: &[&str],
    inbound: &[u16],
) -> KernelPolicy {
    KernelPolicy {
        exclude_outbound_ports: exclude_ports.iter().copied().collect(),
        exclude_outbound_cidrs: exclude.iter().map(|n| n.parse().unwrap()).collect(),
        include_outbound_cidrs: include.iter().map(|n| n.parse().unwrap()).collect(),
        inbound_ports: inbound.iter().copied().collect(),
    }
}

/// `ok proxy orig=<addr>`: the connect was redirected and the proxy learnt `addr`.
fn via_proxy(addr: &str) -> String {
    format!("ok proxy orig={addr}")
}

/// `ok real local=<addr>`: the connect reached the real server at `addr` directly.
fn direct(addr: &str) -> String {
    format!("ok real local={addr}")
}

/// The inbound world: a pod namespace and a peer namespace joined by a veth pair.
struct PodWorld {
    cgroups: Cgroups,
    pod: Netns,
    peer: Netns,
}

impl PodWorld {
    fn new(test: &str) -> Self {
        require_privileges_and_object();
        let name = format!("sck1-{test}-{}", std::process::id());
        let cgroups = Cgroups::new(&name);
        let pod = common::netns(&format!("{name}-pod"));
        let peer = common::netns(&format!("{name}-peer"));
        common::veth_pair(&pod, "eth0", &peer, "eth1");
        common::add_addrs(&pod, "eth0", &["198.18.0.1/24", "fd5e:1dec::1/64"]);
        common::add_addrs(&peer, "eth1", &["198.18.0.2/24", "fd5e:1dec::2/64"]);
        Self { cgroups, pod, peer }
    }

    /// Programs attached to the app cgroup, the sidecar cgroup being `proxy`.
    fn attach(&self) -> Interception {
        attach(&intercept_config(&self.cgroups, PROXY_PORT))
    }

    /// The application's servers in the pod, on every address, TCP ports `ports`.
    fn app_servers(&self, ports: &[u16]) -> Helper {
        let cg = self.cgroups.app();
        real_servers("app servers", &cg, &self.pod, ports)
    }

    /// A client in the peer namespace.
    fn remote_client(&self) -> Helper {
        let cg = self.cgroups.peer();
        helper("remote client", &cg, &self.peer, CLIENT_PY, &[])
    }

    /// A client inside the pod namespace, in the sidecar cgroup (never redirected outbound).
    fn local_client(&self) -> Helper {
        let cg = self.cgroups.proxy();
        helper("pod-local client", &cg, &self.pod, CLIENT_PY, &[])
    }
}

/// Stand-in inbound proxy: listeners on 127.0.0.1:15006 and [::1]:15006 created in the pod
/// namespace, served by a thread that answers each connection with
/// `inbound local=<accepted socket's local address> from=<peer ip>`. Stopping it closes the
/// listeners.
struct InboundProxy {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl InboundProxy {
    /// Creates the listeners in `pod` and hands them to `attach` before serving them.
    fn start(pod: &Netns, attach: impl FnOnce(&[&TcpListener])) -> Self {
        let (v4, v6) = {
            let _in_pod = InNetns::enter(pod);
            let v4 = TcpListener::bind(("127.0.0.1", INBOUND_PORT)).expect("bind inbound v4");
            let v6 = socket2::Socket::new(
                socket2::Domain::IPV6,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .expect("v6 socket");
            v6.set_only_v6(true).expect("v6only");
            let addr: SocketAddr = format!("[::1]:{INBOUND_PORT}").parse().unwrap();
            v6.bind(&addr.into()).expect("bind inbound v6");
            v6.listen(64).expect("listen v6");
            (v4, TcpListener::from(v6))
        };
        attach(&[&v4, &v6]);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            for l in [&v4, &v6] {
                l.set_nonblocking(true).expect("nonblocking");
            }
            // Bounded: the test stops it well before this.
            let deadline = Instant::now() + Duration::from_secs(120);
            while !flag.load(Ordering::SeqCst) && Instant::now() < deadline {
                let mut idle = true;
                for l in [&v4, &v6] {
                    if let Ok((mut s, peer)) = l.accept() {
                        idle = false;
                        let local = s.local_addr().expect("local addr");
                        let _ = s.set_nonblocking(false);
                        let _ = writeln!(s, "inbound local={local} from={}", peer.ip());
                    }
                }
                if idle {
                    thread::sleep(Duration::from_millis(5));
                }
            }
            // The listeners close here.
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("inbound proxy thread");
        }
    }
}

impl Drop for InboundProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Calls `attach_inbound` from inside the pod namespace with the given listeners.
fn attach_inbound_in(pod: &Netns, interception: &mut Interception, listeners: &[&TcpListener]) {
    let _in_pod = InNetns::enter(pod);
    let fds: Vec<_> = listeners.iter().map(|l| l.as_fd()).collect();
    interception
        .attach_inbound(&fds)
        .unwrap_or_else(|e| panic!("attach_inbound: {e}"));
}

// ---------------------------------------------------------------------------------------------
// A foreign cgroup/connect4 program, loaded and attached with raw bpf() calls

/// `bpf()` commands, program/map/attach types and flags (include/uapi/linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_F_ALLOW_MULTI: u32 = 2;
const FOREIGN_NAME: &str = "foreign_cnt4";

/// A `bpf()` attribute buffer: the leading words of the command's struct, zero padded.
#[repr(C, align(8))]
struct Attr([u8; 160]);

impl Attr {
    fn new() -> Self {
        Self([0; 160])
    }
    fn u32(mut self, offset: usize, v: u32) -> Self {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, offset: usize, v: u64) -> Self {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn bytes(mut self, offset: usize, v: &[u8]) -> Self {
        self.0[offset..offset + v.len()].copy_from_slice(v);
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<i64> {
    // SAFETY: `attr` is a live, initialised buffer of the size passed, laid out as the command
    // expects (leading fields, the rest zero); the kernel reads and writes only within it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// One eBPF instruction: opcode, dst/src registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0x0f);
    b[2..4].copy_from_slice(&off.to_ne_bytes());
    b[4..8].copy_from_slice(&imm.to_ne_bytes());
    b
}

/// Someone else's `cgroup/connect4` program: counts every connect in an array map and allows
/// it. Attached with `BPF_PROG_ATTACH` + `BPF_F_ALLOW_MULTI` (not through a link), as older
/// tools do; detached on drop.
struct ForeignCounter {
    map: OwnedFd,
    prog: OwnedFd,
    cgroup: fs::File,
    attached: bool,
}

impl ForeignCounter {
    fn attach(cgroup: &Path) -> Self {
        let mut attr = Attr::new()
            .u32(0, BPF_MAP_TYPE_ARRAY)
            .u32(4, 4) // key size
            .u32(8, 8) // value size
            .u32(12, 1); // max entries
        let map_fd = bpf(BPF_MAP_CREATE, &mut attr).expect("create foreign map");
        // SAFETY: the kernel just returned this descriptor to us.
        let map = unsafe { OwnedFd::from_raw_fd(map_fd as i32) };

        let program: Vec<[u8; 8]> = vec![
            insn(0x62, 10, 0, -4, 0),             // *(u32 *)(r10 - 4) = 0
            insn(0xbf, 2, 10, 0, 0),              // r2 = r10
            insn(0x07, 2, 0, 0, -4),              // r2 += -4
            insn(0x18, 1, 1, 0, map.as_raw_fd()), // r1 = map (ld_imm64, pseudo map fd)
            insn(0, 0, 0, 0, 0),                  //   (upper half)
            insn(0x85, 0, 0, 0, 1),               // call bpf_map_lookup_elem
            insn(0x15, 0, 0, 2, 0),               // if r0 == 0 goto +2
            insn(0xb7, 1, 0, 0, 1),               // r1 = 1
            insn(0xdb, 0, 1, 0, 0),               // lock *(u64 *)(r0 + 0) += r1
            insn(0xb7, 0, 0, 0, 1),               // r0 = 1 (allow)
            insn(0x95, 0, 0, 0, 0),               // exit
        ];
        let code: Vec<u8> = program.concat();
        let license = b"GPL\0";
        let mut log = vec![0u8; 64 * 1024];
        let mut name = [0u8; 16];
        name[..FOREIGN_NAME.len()].copy_from_slice(FOREIGN_NAME.as_bytes());
        let mut attr = Attr::new()
            .u32(0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR)
            .u32(4, program.len() as u32)
            .u64(8, code.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, 1) // log level
            .u32(28, log.len() as u32)
            .u64(32, log.as_mut_ptr() as u64)
            .bytes(48, &name)
            .u32(68, BPF_CGROUP_INET4_CONNECT); // expected attach type
        let prog_fd = bpf(BPF_PROG_LOAD, &mut attr).unwrap_or_else(|e| {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            panic!(
                "load foreign program: {e}\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        });
        // SAFETY: the kernel just returned this descriptor to us.
        let prog = unsafe { OwnedFd::from_raw_fd(prog_fd as i32) };

        let cgroup = fs::File::open(cgroup).expect("open cgroup");
        let mut attr = Attr::new()
            .u32(0, cgroup.as_raw_fd() as u32)
            .u32(4, prog.as_raw_fd() as u32)
            .u32(8, BPF_CGROUP_INET4_CONNECT)
            .u32(12, BPF_F_ALLOW_MULTI);
        bpf(BPF_PROG_ATTACH, &mut attr).expect("attach foreign program");
        Self {
            map,
            prog,
            cgroup,
            attached: true,
        }
    }

    fn count(&self) -> u64 {
        let key = 0u32;
        let mut value = 0u64;
        let mut attr = Attr::new()
            .u32(0, self.map.as_raw_fd() as u32)
            .u64(8, &key as *const u32 as u64)
            .u64(16, &mut value as *mut u64 as u64);
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).expect("read foreign counter");
        value
    }
}

impl Drop for ForeignCounter {
    fn drop(&mut self) {
        if self.attached {
            let mut attr = Attr::new()
                .u32(0, self.cgroup.as_raw_fd() as u32)
                .u32(4, self.prog.as_raw_fd() as u32)
                .u32(8, BPF_CGROUP_INET4_CONNECT);
            let _ = bpf(BPF_PROG_DETACH, &mut attr);
            self.attached = false;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helper scripts

/// Real servers: TCP on 0.0.0.0:<port> and [::]:<port> for each port argument; each
/// connection gets `real local=<addr>` and is then closed.
const REAL_SERVERS_PY: &str = r#"
import socket, sys, threading

def fmt(a):
    return ("[%s]:%d" if ":" in a[0] else "%s:%d") % (a[0], a[1])

def tcp(family, host, port):
    l = socket.socket(family, socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    l.bind((host, port))
    l.listen(128)
    def serve():
        while True:
            c, _ = l.accept()
            c.sendall(("real local=%s\n" % fmt(c.getsockname())).encode())
            c.close()
    threading.Thread(target=serve, daemon=True).start()

for p in sys.argv[1:]:
    tcp(socket.AF_INET, "0.0.0.0", int(p))
    tcp(socket.AF_INET6, "::", int(p))
print("ready", flush=True)
threading.Event().wait()
"#;

/// Stand-in outbound proxy: for each accepted connection asks SO_ORIGINAL_DST /
/// IP6T_SO_ORIGINAL_DST, replies `proxy orig=<addr>` (or `proxy orig=ERR:<errno>`), then
/// echoes whatever the client sends until it closes.
const PROXY_PY: &str = r#"
import socket, sys, threading, errno

port = int(sys.argv[1])

def orig_dst(c, family):
    try:
        if family == socket.AF_INET:
            d = c.getsockopt(socket.SOL_IP, 80, 16)
            return "%s:%d" % (socket.inet_ntop(socket.AF_INET, d[4:8]), int.from_bytes(d[2:4], "big"))
        d = c.getsockopt(socket.IPPROTO_IPV6, 80, 28)
        return "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, d[8:24]), int.from_bytes(d[2:4], "big"))
    except OSError as e:
        return "ERR:%s" % errno.errorcode.get(e.errno, e.errno)

def handle(c, family):
    c.sendall(("proxy orig=%s\n" % orig_dst(c, family)).encode())
    try:
        while True:
            data = c.recv(200)
            if not data:
                break
            c.sendall(data)
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

tcp(socket.AF_INET, "127.0.0.1")
tcp(socket.AF_INET6, "::1")
print("ready", flush=True)
threading.Event().wait()
"#;

/// Client. Commands on stdin, one reply line each:
/// `tcp4|tcp6 HOST PORT [SOURCE]` → `ok <first line received>` or `err <errno name>` (the
/// socket is kept open, numbered from 0); `send N TEXT` → sends TEXT on kept socket N and
/// replies `ok <line received>`; `close` → closes them all, replies `closed`.
const CLIENT_PY: &str = r#"
import socket, sys, errno
kept = []
fams = {"4": socket.AF_INET, "6": socket.AF_INET6}

def read_line(s):
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(200)
        if not chunk:
            break
        buf += chunk
    return buf.decode().strip()

print("ready", flush=True)
for line in sys.stdin:
    parts = line.split()
    if not parts:
        continue
    try:
        if parts[0] == "close":
            for s in kept:
                s.close()
            kept.clear()
            print("closed", flush=True)
        elif parts[0] == "send":
            s = kept[int(parts[1])]
            s.sendall((parts[2] + "\n").encode())
            print("ok " + read_line(s), flush=True)
        else:
            kind, host, port = parts[0], parts[1], int(parts[2])
            s = socket.socket(fams[kind[3]], socket.SOCK_STREAM)
            s.settimeout(5)
            if len(parts) > 3:
                s.bind((parts[3], 0))
            s.connect((host, port))
            kept.append(s)
            print("ok " + read_line(s), flush=True)
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
        print("err " + name, flush=True)
"#;

// ---------------------------------------------------------------------------------------------
// Tests: outbound policy

#[test]
fn excluded_ports_go_direct_while_other_ports_are_redirected() {
    let world = World::new("xport");
    let _servers = world.real_servers(&[8080, 8081]);
    let _proxy = world.proxy();
    let interception = world.attach();
    interception
        .apply_policy(&policy(&[8080], &[], &[], &[]))
        .expect("apply policy");
    let mut app = world.app();

    assert_eq!(app.ask("tcp4 198.18.0.1 8080"), direct("198.18.0.1:8080"));
    assert_eq!(
        app.ask("tcp6 fd5e:1dec::1 8080"),
        direct("[fd5e:1dec::1]:8080")
    );
    assert_eq!(
        app.ask("tcp4 198.18.0.1 8081"),
        via_proxy("198.18.0.1:8081")
    );
    assert_eq!(
        app.ask("tcp6 fd5e:1dec::1 8081"),
        via_proxy("[fd5e:1dec::1]:8081")
    );
}

#[test]
fn excluded_networks_go_direct_in_both_families() {
    let world = World::new("xcidr");
    let _servers = world.real_servers(&[8080]);
    let _proxy = world.proxy();
    let interception = world.attach();
    interception
        .apply_policy(&policy(
            &[],
            &["198.18.1.0/24", "fd5e:1dec:1::/64"],
            &[],
            &[],
        ))
        .expect("apply policy");
    let mut app = world.app();

    assert_eq!(app.ask("tcp4 198.18.1.1 8080"), direct("198.18.1.1:8080"));
    assert_eq!(
        app.ask("tcp6 fd5e:1dec:1::1 8080"),
        direct("[fd5e:1dec:1::1]:8080")
    );
    assert_eq!(
        app.ask("tcp4 198.18.0.1 8080"),
        via_proxy("198.18.0.1:8080")
    );
    assert_eq!(
        app.ask("tcp6 fd5e:1dec::1 8080"),
        via_proxy("[fd5e:1dec::1]:8080")
    );
    // A longer prefix only covers itself: 198.18.0.1/32 excluded, 198.18.0.0/24 still not.
    interception
        .apply_policy(&policy(&[], &["198.18.0.1/32"], &[], &[]))
        .expect("apply policy");
    assert_eq!(app.ask("tcp4 198.18.0.1 8080"), direct("198.18.0.1:8080"));
    assert_eq!(
        app.ask("tcp4 198.18.1.1 8080"),
        via_proxy("198.18.1.1:8080")
    );
}

#[test]
fn include_list_redirects_only_inside_it_and_exclusions_still_win() {
    let world = World::new("incl");
    let _servers = world.real_servers(&[8080]);
    let _proxy = world.proxy();
    let interception = world.attach();
    let mut app = world.app();

    // Only the second IPv4 network is included: everything else, IPv6 too, goes direct.
    interception
        .apply_policy(&policy(&[], &[], &["198.18.1.0/24"], &[]))
        .expect("apply policy");
    assert_eq!(
        app.ask("tcp4 198.18.1.1 8080"),
        via_proxy("198.18.1.1:8080")
    );
    assert_eq!(app.ask("tcp4 198.18.0.1 8080"), direct("198.18.0.1:8080"));
    assert_eq!(
        app.ask("tcp6 fd5e:1dec::1 8080"),
        direct("[fd5e:1dec::1]:8080")
    );

    // A wide include with a narrower exclusion inside it, in both families.
    let p = policy(
        &[],
        &["198.18.1.0/24", "fd5e:1dec:1::/64"],
        &["198.18.0.0/16", "fd5e:1dec::/32"],
        &[],
    );
    interception.apply_policy(&p).expect("apply policy");
    assert_eq!(
        app.ask("tcp4 198.18.0.1 8080"),
        via_proxy("198.18.0.1:8080")
    );
    assert_eq!(
        app.ask("tcp6 fd5e:1dec::1 8080"),
        via_proxy("[fd5e:1dec::1]:8080")
    );
    assert_eq!(app.ask("tcp4 198.18.1.1 8080"), direct("198.18.1.1:8080"));
    assert_eq!(
        app.ask("tcp6 fd5e:1dec:1::1 8080"),
        direct("[fd5e:1dec:1::1]:8080")
    );
    // The maps hold exactly this policy.
    let now = interception.current_policy().expect("read policy");
    let set = |v: &[ipnet::IpNet]| v.iter().copied().collect::<BTreeSet<_>>();
    assert_eq!(
        set(&now.include_outbound_cidrs),
        set(&p.include_outbound_cidrs)
    );
    assert_eq!(
        set(&now.exclude_outbound_cidrs),
        set(&p.exclude_outbound_cidrs)
    );

    // An empty policy redirects everything again, and leaves the maps empty.
    interception
        .apply_policy(&KernelPolicy::default())
        .expect("apply policy");
    assert_eq!(
        app.ask("tcp4 198.18.1.1 8080"),
        via_proxy("198.18.1.1:8080")
    );
    assert_eq!(
        app.ask("tcp4 198.18.0.1 8080"),
        via_proxy("198.18.0.1:8080")
    );
    assert_eq!(
        interception.current_policy().expect("read policy"),
        KernelPolicy::default()
    );
}

#[test]
fn applying_a_policy_at_runtime_keeps_open_redirected_connections() {
    let world = World::new("live");
    let _servers = world.real_servers(&[8080]);
    let _proxy = world.proxy();
    let interception = world.attach();
    let mut app = world.app();

    assert_eq!(
        app.ask("tcp4 198.18.0.1 8080"),
        via_proxy("198.18.0.1:8080")
    );
    assert_eq!(
        app.ask("tcp6 fd5e:1dec::1 8080"),
        via_proxy("[fd5e:1dec::1]:8080")
    );
    assert_eq!(app.ask("send 0 before"), "ok before");

    // Exclude the very destination of the open connections, several times over.
    for round in 0..3 {
        let p = policy(
            &[8080, 9000 + round],
            &["198.18.0.0/24", "fd5e:1dec::/64"],
            &[],
            &[8080],
        );
        interception.apply_policy(&p).expect("apply policy");
        assert_eq!(interception.current_policy().expect("read policy"), p);
        // The open connections still go through the proxy, both ways.
        assert_eq!(
            app.ask(&format!("send 0 v4-{round}")),
            format!("ok v4-{round}")
        );
        assert_eq!(
            app.ask(&format!("send 1 v6-{round}")),
            format!("ok v6-{round}")
        );
    }
    // New connections to the same destination follow the new policy.
    assert_eq!(app.ask("tcp4 198.18.0.1 8080"), direct("198.18.0.1:8080"));
    // The proxy still knows the original destination of the two open redirected ones.
    assert_eq!(interception.orig_dst_entries().expect("map counts"), (0, 2));

    let too_many = KernelPolicy {
        exclude_outbound_ports: (1..=2000).collect(),
        ..KernelPolicy::default()
    };
    match interception.apply_policy(&too_many) {
        Err(EbpfError::PolicyTooLarge { .. }) => {}
        other => panic!("expected PolicyTooLarge, got {other:?}"),
    }
    // Refused whole: the previous policy is still in force.
    assert_eq!(
        interception
            .current_policy()
            .expect("read policy")
            .exclude_outbound_ports,
        [8080, 9002].into_iter().collect()
    );
    assert_eq!(app.ask("send 0 after"), "ok after");
}

// ---------------------------------------------------------------------------------------------
// Tests: inbound steering

#[test]
fn inbound_connections_to_served_ports_land_on_the_proxy_with_their_destination() {
    let world = PodWorld::new("inb");
    let _app = world.app_servers(&[8080, 8081]);
    let mut interception = world.attach();
    interception
        .apply_policy(&policy(&[], &[], &[], &[8080]))
        .expect("apply policy");
    let mut inbound = InboundProxy::start(&world.pod, |listeners| {
        attach_inbound_in(&world.pod, &mut interception, listeners)
    });
    let netns_ino = netns_inode(&world.pod);
    assert_eq!(sk_lookup_links(netns_ino).len(), 1, "one sk_lookup link");

    let mut remote = world.remote_client();
    // Steered: the accepted socket's local address is the original destination.
    assert_eq!(
        remote.ask("tcp4 198.18.0.1 8080"),
        "ok inbound local=198.18.0.1:8080 from=198.18.0.2"
    );
    assert_eq!(
        remote.ask("tcp6 fd5e:1dec::1 8080"),
        "ok inbound local=[fd5e:1dec::1]:8080 from=fd5e:1dec::2"
    );
    // A port not in the inbound set goes straight to the application.
    assert_eq!(
        remote.ask("tcp4 198.18.0.1 8081"),
        direct("198.18.0.1:8081")
    );
    assert_eq!(
        remote.ask("tcp6 fd5e:1dec::1 8081"),
        direct("[fd5e:1dec::1]:8081")
    );

    // Loopback sources are never steered: that is how the proxy reaches the application.
    let mut local = world.local_client();
    assert_eq!(local.ask("tcp4 127.0.0.1 8080"), direct("127.0.0.1:8080"));
    assert_eq!(
        local.ask("tcp4 127.0.0.1 8080 127.0.0.6"),
        direct("127.0.0.1:8080")
    );
    assert_eq!(
        local.ask("tcp4 198.18.0.1 8080 127.0.0.6"),
        direct("198.18.0.1:8080")
    );
    assert_eq!(local.ask("tcp6 ::1 8080"), direct("[::1]:8080"));
    assert_eq!(
        local.ask("tcp6 fd5e:1dec::1 8080 ::1"),
        direct("[fd5e:1dec::1]:8080")
    );

    // Changing the inbound ports at run time takes effect for new connections.
    interception
        .apply_policy(&policy(&[], &[], &[], &[8081]))
        .expect("apply policy");
    assert_eq!(
        remote.ask("tcp4 198.18.0.1 8080"),
        direct("198.18.0.1:8080")
    );
    assert_eq!(
        remote.ask("tcp4 198.18.0.1 8081"),
        "ok inbound local=198.18.0.1:8081 from=198.18.0.2"
    );

    // Closing the listeners (proxy down): new connections go direct (fail-open).
    inbound.stop();
    assert_eq!(
        remote.ask("tcp4 198.18.0.1 8081"),
        direct("198.18.0.1:8081")
    );
    assert_eq!(
        remote.ask("tcp6 fd5e:1dec::1 8081"),
        direct("[fd5e:1dec::1]:8081")
    );

    // Dropping the interception removes the link from the namespace.
    drop(interception);
    assert!(
        sk_lookup_links(netns_ino).is_empty(),
        "sk_lookup still attached to the pod namespace after drop"
    );
    assert!(attached_programs(&world.cgroups.app()).is_empty());
    assert!(attached_programs(&world.cgroups.proxy()).is_empty());
}

#[test]
fn a_dual_stack_listener_serves_both_families_and_bad_listeners_are_refused() {
    let world = PodWorld::new("dual");
    let _app = world.app_servers(&[8080]);
    let mut interception = world.attach();
    interception
        .apply_policy(&policy(&[], &[], &[], &[8080]))
        .expect("apply policy");

    let (dual, not_listening) = {
        let _in_pod = InNetns::enter(&world.pod);
        let dual = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
            .expect("v6 socket");
        dual.set_only_v6(false).expect("dual stack");
        let addr: SocketAddr = format!("[::]:{INBOUND_PORT}").parse().unwrap();
        dual.bind(&addr.into()).expect("bind");
        dual.listen(16).expect("listen");
        let idle = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("v4 socket");
        (TcpListener::from(dual), idle)
    };

    {
        let _in_pod = InNetns::enter(&world.pod);
        match interception.attach_inbound(&[not_listening.as_fd()]) {
            Err(EbpfError::InboundListener { reason }) => {
                assert!(reason.contains("listen"), "{reason}")
            }
            other => panic!("expected InboundListener, got {other:?}"),
        }
        match interception.attach_inbound(&[dual.as_fd(), dual.as_fd()]) {
            Err(EbpfError::InboundListener { reason }) => {
                assert!(reason.contains("two"), "{reason}")
            }
            other => panic!("expected InboundListener, got {other:?}"),
        }
        interception
            .attach_inbound(&[dual.as_fd()])
            .unwrap_or_else(|e| panic!("attach_inbound: {e}"));
    }
    // Nothing was attached by the refused calls; the accepted one attached once.
    assert_eq!(sk_lookup_links(netns_inode(&world.pod)).len(), 1);

    let mut remote = world.remote_client();
    let accept = thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = dual.accept().expect("accept");
            let local = s.local_addr().expect("local");
            writeln!(s, "dual local={local}").expect("write");
            seen.push(local.to_string());
        }
        seen
    });
    // IPv4 arrives on the IPv6 socket as an IPv4-mapped address.
    assert_eq!(
        remote.ask("tcp4 198.18.0.1 8080"),
        "ok dual local=[::ffff:198.18.0.1]:8080"
    );
    assert_eq!(
        remote.ask("tcp6 fd5e:1dec::1 8080"),
        "ok dual local=[fd5e:1dec::1]:8080"
    );
    assert_eq!(accept.join().expect("acceptor").len(), 2);

    // detach_inbound removes the link now, not only at drop.
    interception.detach_inbound().expect("detach inbound");
    assert!(sk_lookup_links(netns_inode(&world.pod)).is_empty());
    assert_eq!(
        remote.ask("tcp4 198.18.0.1 8080"),
        direct("198.18.0.1:8080")
    );
}

// ---------------------------------------------------------------------------------------------
// Tests: coexistence and the kernel check

#[test]
fn a_foreign_program_on_the_same_hook_keeps_running_before_during_and_after() {
    let world = World::new("foreign");
    let _servers = world.real_servers(&[8080]);
    let _proxy = world.proxy();
    let app_cg = world.cgroups.app();

    let foreign = ForeignCounter::attach(&app_cg);
    assert_eq!(attached_programs(&app_cg), vec![FOREIGN_NAME.to_string()]);
    let mut app = world.app();
    assert_eq!(app.ask("tcp4 198.18.0.1 8080"), direct("198.18.0.1:8080"));
    assert_eq!(foreign.count(), 1, "the foreign program counts connects");

    let interception = world.attach();
    let mut both = vec![FOREIGN_NAME, "sc_connect4", "sc_connect6", "sc_sockops"];
    both.sort();
    assert_eq!(attached_programs(&app_cg), both);
    // Both run on the same connect: ours redirects, the foreign one counts.
    assert_eq!(
        app.ask("tcp4 198.18.0.1 8080"),
        via_proxy("198.18.0.1:8080")
    );
    assert_eq!(foreign.count(), 2);
    // The foreign program sees IPv4 only; IPv6 is ours alone.
    assert_eq!(
        app.ask("tcp6 fd5e:1dec::1 8080"),
        via_proxy("[fd5e:1dec::1]:8080")
    );
    assert_eq!(foreign.count(), 2);

    drop(interception);
    assert_eq!(attached_programs(&app_cg), vec![FOREIGN_NAME.to_string()]);
    assert_eq!(app.ask("tcp4 198.18.0.1 8080"), direct("198.18.0.1:8080"));
    assert_eq!(foreign.count(), 3, "the foreign program still runs");
    drop(foreign);
    assert!(attached_programs(&app_cg).is_empty());
}

#[test]
fn kernel_check_covers_inbound_steering() {
    require_privileges_and_object();
    let report = sidecar::kernel::check();
    assert!(report.all_ok(), "sidecar check failed:\n{report}");
    let names: Vec<&str> = report.items.iter().map(|i| i.name.as_str()).collect();
    for name in [
        "program type sk_lookup",
        "map type lpm_trie",
        "map type sockmap",
        "program sc_sk_lookup loads",
    ] {
        assert!(names.contains(&name), "{name} missing from:\n{report}");
    }
}

//! Privileged tests of the kernel TCP observation (sockops + `tcp:tcp_receive_reset` + ring
//! buffer) on the running kernel, read through the real [`TcpObserver`].
//!
//! Each test builds its own world: a "pod" and a "svc" network namespace, a parent cgroup with
//! `app` (the observed cgroup), `proxy` (the sidecar cgroup) and `peer` children. The two
//! namespaces are joined either by a veth pair, or, when a test needs delay or loss, by a small
//! Python relay between two TUN devices (this kernel has no `netem` qdisc): it delays every
//! packet by 10 ms each way (RTT about 20 ms) and can drop chosen data packets. Helpers are
//! Python scripts started in a cgroup, then in a namespace with `nsenter --net=`. Guards kill
//! the helpers and remove namespaces and cgroups even when a test fails; they and the helpers
//! live in `common/`.
//!
//! These tests need root and the embedded eBPF object; without either they fail, saying what
//! is missing (they never skip).

mod common;

use std::{
    io::Write,
    path::Path,
    sync::{
        mpsc::{self, Receiver},
        Arc, Mutex, OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

use common::{attach, intercept_config, Cgroups, Helper, Netns};
use sidecar::ebpf::{
    log::KERNEL_LOG_TARGET,
    observe::{ObserverOutput, TcpObserver},
    Interception,
};
use sidecar::telemetry::{TcpDirection, TcpObservation, TcpOutcome};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

const WAIT: Duration = Duration::from_secs(20);
const POD_V4: &str = "198.18.0.1";
const SVC_V4: &str = "198.18.0.2";
const POD_V6: &str = "fd5e:1dec::1";
const SVC_V6: &str = "fd5e:1dec::2";
/// Size of the exchange header the client sends before its payload.
const HEADER: u64 = 24;

// ---------------------------------------------------------------------------------------------
// Preconditions and helpers

fn require_privileges_and_object() {
    common::require_privileges_and_object("observation", &["ip", "nsenter", "python3", "sh", "ss"]);
    assert!(
        Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: the delay relay needs TUN devices"
    );
}

/// Starts `script` in `cgroup`, then (if given) in namespace `netns`, and waits for its
/// `ready` line.
fn helper(what: &str, cgroup: &Path, netns: Option<&Netns>, script: &str, args: &[&str]) -> Helper {
    Helper::start(what, cgroup, netns, script, args, WAIT).ready()
}

/// Adds the test addresses of one side to `dev` in `netns` and brings it up.
fn address(netns: &Netns, dev: &str, v4: &str, v6: &str) {
    common::add_addrs(netns, dev, &[&format!("{v4}/24"), &format!("{v6}/64")]);
    common::ip(netns, &["link", "set", dev, "up"]);
}

// ---------------------------------------------------------------------------------------------
// The world

/// How the two namespaces are joined.
enum Link {
    /// A veth pair: fast, no delay.
    Veth,
    /// The TUN relay: 10 ms each way; drops the pod → svc data packets with these ordinals.
    Relay { drop: &'static str },
}

/// Namespaces, cgroups, link and attached programs of one test. Fields drop in declaration
/// order: helpers, programs, cgroups, namespaces.
struct World {
    _relay: Option<Helper>,
    interception: Interception,
    cgroups: Cgroups,
    svc: Netns,
    pod: Netns,
}

impl World {
    fn new(test: &str, link: Link) -> Self {
        require_privileges_and_object();
        let name = format!("sco-{test}-{}", std::process::id());
        let cgroups = Cgroups::new(&name);
        let pod = common::netns(&format!("{name}-pod"));
        let svc = common::netns(&format!("{name}-svc"));
        let relay = match link {
            Link::Veth => {
                common::veth_pair(&pod, "scp0", &svc, "scs0");
                None
            }
            Link::Relay { drop } => {
                common::ip(&pod, &["tuntap", "add", "dev", "scp0", "mode", "tun"]);
                common::ip(&svc, &["tuntap", "add", "dev", "scs0", "mode", "tun"]);
                let (pod_path, svc_path) = (pod.path(), svc.path());
                Some(helper(
                    "relay",
                    &cgroups.peer(),
                    None,
                    RELAY_PY,
                    &[
                        &pod_path.to_string_lossy(),
                        &svc_path.to_string_lossy(),
                        "10",
                        drop,
                    ],
                ))
            }
        };
        address(&pod, "scp0", POD_V4, POD_V6);
        address(&svc, "scs0", SVC_V4, SVC_V6);
        let interception = attach(&intercept_config(&cgroups, 15001));
        Self {
            _relay: relay,
            interception,
            cgroups,
            svc,
            pod,
        }
    }

    /// The exchange server in the svc namespace (not observed).
    fn svc_server(&self, port: u16) -> Helper {
        let port = port.to_string();
        helper(
            "svc server",
            &self.cgroups.peer(),
            Some(&self.svc),
            SERVER_PY,
            &[&port],
        )
    }

    /// The application client in the pod (observed).
    fn app_client(&self) -> Helper {
        helper(
            "app client",
            &self.cgroups.app(),
            Some(&self.pod),
            CLIENT_PY,
            &[],
        )
    }

    /// Starts the real reader in a runtime of its own.
    fn observe(&mut self) -> Observed {
        let observer = self.interception.take_observer().expect("observer");
        assert!(
            observer.resets_detected(),
            "the tcp:tcp_receive_reset tracepoint is not attached: {:?}",
            observer.reset_detection_error()
        );
        Observed::start(observer)
    }
}

// ---------------------------------------------------------------------------------------------
// The reader under test

/// A running [`TcpObserver`] whose output is collected for assertions.
struct Observed {
    rx: Receiver<ObserverOutput>,
    seen: Vec<TcpObservation>,
    lost: u64,
    shutdown: CancellationToken,
    thread: Option<thread::JoinHandle<()>>,
}

impl Observed {
    fn start(observer: TcpObserver) -> Self {
        kernel_log();
        let (tx, rx) = mpsc::channel();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            // Spawned as the agent spawns it (the reader's future must be Send + 'static).
            let task = rt.spawn(observer.run_with(
                move |out| {
                    let _ = tx.send(out);
                },
                token,
            ));
            match rt.block_on(task) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("observer failed: {e}"),
                Err(e) => panic!("observer task failed: {e}"),
            }
        });
        Self {
            rx,
            seen: Vec::new(),
            lost: 0,
            shutdown,
            thread: Some(thread),
        }
    }

    /// The first observation matching `pred`, waiting at most `WAIT`.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&TcpObservation) -> bool) -> TcpObservation {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.seen.iter().position(&pred) {
                let obs = self.seen.remove(i);
                eprintln!("observed {what}: {obs:?}");
                return obs;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no observation of {what}; seen: {:#?}",
                self.seen
            );
            match self.rx.recv_timeout(left) {
                Ok(ObserverOutput::Connection(obs)) => self.seen.push(obs),
                Ok(ObserverOutput::Lost(n)) => self.lost += n,
                Err(_) => {}
            }
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Everything the bridged eBPF log lines (`sidecar::ebpf::kernel`) wrote, for all tests of
/// this binary (the subscriber is process-wide: the readers run on their own threads).
fn kernel_log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buf);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter(EnvFilter::new(format!("{KERNEL_LOG_TARGET}=debug")))
            .with_writer(move || LogWriter(Arc::clone(&writer)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Parses `key=value` fields of a helper reply.
fn field<'a>(reply: &'a str, key: &str) -> &'a str {
    reply
        .split_whitespace()
        .find_map(|f| f.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {reply:?}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// Helper scripts

/// Joins the pod and svc namespaces through two TUN devices, delaying each packet by
/// `argv[3]` ms each way and dropping the pod → svc packets larger than 300 bytes whose
/// ordinals (1-based) are listed in `argv[4]` (comma-separated, or `-`).
const RELAY_PY: &str = r#"
import os, sys, fcntl, struct, threading, time, collections, ctypes
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454ca
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000

def open_tun(ns_path, name):
    fd = os.open(ns_path, os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns " + ns_path)
    os.close(fd)
    t = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(t, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return t

pod = open_tun(sys.argv[1], "scp0")
svc = open_tun(sys.argv[2], "scs0")
delay = float(sys.argv[3]) / 1000.0
drops = set() if sys.argv[4] == "-" else {int(x) for x in sys.argv[4].split(",")}

def direction(src, dst, dropping):
    q = collections.deque()
    cv = threading.Condition()
    def writer():
        while True:
            with cv:
                while not q:
                    cv.wait()
                due, pkt = q.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                os.write(dst, pkt)
            except OSError:
                pass
    threading.Thread(target=writer, daemon=True).start()
    big = 0
    while True:
        pkt = os.read(src, 65536)
        if dropping and len(pkt) > 300:
            big += 1
            if big in drops:
                continue
        with cv:
            q.append((time.monotonic() + delay, pkt))
            cv.notify()

threading.Thread(target=direction, args=(svc, pod, False), daemon=True).start()
print("ready", flush=True)
direction(pod, svc, True)
"#;

/// Exchange server on `[::]:argv[1]` (dual stack). Each connection sends a 24-byte header
/// `%08d%08d%-8s` (request bytes that follow, response bytes, close mode), then the request.
/// The server answers with the response bytes, then: `client`: waits for the client's close;
/// `server`: closes first; `rst`: aborts with a reset (SO_LINGER 0).
const SERVER_PY: &str = r#"
import socket, struct, sys, threading
port = int(sys.argv[1])
l = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
l.bind(("::", port))
l.listen(4096)

def read_exact(c, n):
    buf = b""
    while len(buf) < n:
        d = c.recv(min(65536, n - len(buf)))
        if not d:
            raise EOFError
        buf += d
    return buf

def serve(c):
    try:
        h = read_exact(c, 24).decode()
        n, m, mode = int(h[:8]), int(h[8:16]), h[16:].strip()
        read_exact(c, n)
        if mode == "rst":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            return
        c.sendall(b"r" * m)
        if mode == "client":
            while c.recv(65536):
                pass
        c.close()
    except Exception:
        c.close()

def accept():
    while True:
        c, _ = l.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// Application client driven over stdin:
/// - `x HOST PORT N M MODE`: one exchange with the server (see `SERVER_PY`); before closing,
///   reads the connection's `rtt` and total `retrans` from `ss -ti`; replies
///   `ok lport=P ss_rtt=MS ss_retrans=N` (or `err NAME`);
/// - `c HOST PORT TIMEOUT`: connect and close; replies `ok lport=P` or `err NAME`;
/// - `many HOST PORT COUNT`: COUNT connect + close in a row; replies `ok n=COUNT`.
const CLIENT_PY: &str = r#"
import socket, sys, subprocess, re, errno

def ss(lport):
    out = subprocess.run(["ss", "-tinH", "sport = :%d" % lport], capture_output=True, text=True).stdout
    rtt = re.search(r"\brtt:([\d.]+)/", out)
    retr = re.search(r"\bretrans:\d+/(\d+)", out)
    return (rtt.group(1) if rtt else "none", retr.group(1) if retr else "0")

def connect(host, port, timeout=10):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, port))
    return s

def recv_exact(s, n):
    got = 0
    while got < n:
        d = s.recv(65536)
        if not d:
            raise EOFError
        got += len(d)

def errname(e):
    if isinstance(e, socket.timeout):
        return "timeout"
    return errno.errorcode.get(e.errno, str(e.errno)) if getattr(e, "errno", None) else type(e).__name__

print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    try:
        if cmd[0] == "x":
            host, port, n, m, mode = cmd[1], int(cmd[2]), int(cmd[3]), int(cmd[4]), cmd[5]
            s = connect(host, port)
            lport = s.getsockname()[1]
            s.sendall(("%08d%08d%-8s" % (n, m, mode)).encode() + b"q" * n)
            if mode == "rst":
                try:
                    while s.recv(65536):
                        pass
                except OSError:
                    pass
                rtt, retr = ss(lport)
            else:
                recv_exact(s, m)
                if mode == "server":
                    while s.recv(65536):
                        pass
                rtt, retr = ss(lport)
            s.close()
            print("ok lport=%d ss_rtt=%s ss_retrans=%s" % (lport, rtt, retr), flush=True)
        elif cmd[0] == "c":
            s = connect(cmd[1], int(cmd[2]), float(cmd[3]))
            lport = s.getsockname()[1]
            s.close()
            print("ok lport=%d" % lport, flush=True)
        elif cmd[0] == "many":
            for _ in range(int(cmd[3])):
                connect(cmd[1], int(cmd[2])).close()
            print("ok n=%s" % cmd[3], flush=True)
    except Exception as e:
        print("err " + errname(e), flush=True)
"#;

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn rtt_bytes_and_durations_of_outbound_exchanges_match_the_kernel() {
    let mut world = World::new("rtt", Link::Relay { drop: "-" });
    let _server = world.svc_server(9000);
    let mut observed = world.observe();
    let mut app = world.app_client();

    // IPv4, the client closes first: 1000 B out (+ header), 3000 B back.
    let reply = app.ask(&format!("x {SVC_V4} 9000 1000 3000 client"));
    assert!(reply.starts_with("ok "), "{reply}");
    let lport: u16 = field(&reply, "lport").parse().unwrap();
    let ss_rtt: f64 = field(&reply, "ss_rtt").parse().expect("ss reported an rtt");
    let obs = observed.wait_for("the IPv4 exchange", |o| o.local.port() == lport);
    assert_eq!(obs.direction, TcpDirection::Outbound);
    assert_eq!(obs.outcome, TcpOutcome::Ok);
    assert!(obs.established);
    assert_eq!(obs.local, format!("{POD_V4}:{lport}").parse().unwrap());
    assert_eq!(obs.remote, format!("{SVC_V4}:9000").parse().unwrap());
    assert_eq!(obs.bytes_sent, HEADER + 1000, "{obs:?}");
    assert_eq!(obs.bytes_received, 3000, "{obs:?}");
    let rtt = ms(obs.srtt.expect("an RTT sample"));
    assert!(
        (20.0..50.0).contains(&rtt),
        "srtt {rtt} ms with 2 x 10 ms of delay"
    );
    assert!(
        (rtt - ss_rtt).abs() < 10.0,
        "kernel record {rtt} ms vs ss -ti {ss_rtt} ms"
    );
    let connect = ms(obs.connect_latency.expect("connect latency"));
    assert!((20.0..60.0).contains(&connect), "connect took {connect} ms");
    assert!(obs.duration >= obs.connect_latency.unwrap(), "{obs:?}");
    assert_eq!(obs.retransmits, 0, "{obs:?}");

    // IPv6, the server closes first (the FIN is received before the client closes).
    let reply = app.ask(&format!("x {SVC_V6} 9000 5000 70000 server"));
    assert!(reply.starts_with("ok "), "{reply}");
    let lport: u16 = field(&reply, "lport").parse().unwrap();
    let obs = observed.wait_for("the IPv6 exchange", |o| o.local.port() == lport);
    assert_eq!(obs.outcome, TcpOutcome::Ok);
    assert_eq!(obs.local, format!("[{POD_V6}]:{lport}").parse().unwrap());
    assert_eq!(obs.remote, format!("[{SVC_V6}]:9000").parse().unwrap());
    assert_eq!(
        (obs.bytes_sent, obs.bytes_received),
        (HEADER + 5000, 70000),
        "{obs:?}"
    );
    let rtt = ms(obs.srtt.expect("an RTT sample"));
    assert!((20.0..50.0).contains(&rtt), "srtt {rtt} ms");

    // Every observed connection has left the state map.
    assert_eq!(world.interception.observed_connections().unwrap(), 0);
}

#[test]
fn retransmits_under_loss_are_counted_like_ss_counts_them() {
    // Three of the client's data packets are dropped once each.
    let mut world = World::new("loss", Link::Relay { drop: "3,8,15" });
    let _server = world.svc_server(9000);
    let mut observed = world.observe();
    let mut app = world.app_client();

    let reply = app.ask(&format!("x {SVC_V4} 9000 60000 100 client"));
    assert!(reply.starts_with("ok "), "{reply}");
    let lport: u16 = field(&reply, "lport").parse().unwrap();
    let ss_retrans: u32 = field(&reply, "ss_retrans").parse().unwrap();
    let obs = observed.wait_for("the lossy exchange", |o| o.local.port() == lport);
    assert_eq!(obs.outcome, TcpOutcome::Ok);
    assert!(
        ss_retrans >= 3,
        "ss saw {ss_retrans} retransmits for 3 drops"
    );
    assert!(
        obs.retransmits >= ss_retrans,
        "record {} < ss {ss_retrans} (the record is taken later, at close)",
        obs.retransmits
    );
    assert!(
        obs.retransmits <= ss_retrans + 2,
        "{obs:?} vs ss {ss_retrans}"
    );
    // Retransmitted bytes are not counted twice.
    assert_eq!(
        (obs.bytes_sent, obs.bytes_received),
        (HEADER + 60000, 100),
        "{obs:?}"
    );
}

#[test]
fn refused_timed_out_and_reset_connections_are_classified() {
    let mut world = World::new("fail", Link::Relay { drop: "-" });
    let _server = world.svc_server(9000);
    let mut observed = world.observe();
    let mut app = world.app_client();

    // Nothing listens on port 9: the peer answers the SYN with a reset.
    assert_eq!(app.ask(&format!("c {SVC_V4} 9 5")), "err ECONNREFUSED");
    let obs = observed.wait_for("the refused connect", |o| o.remote.port() == 9);
    assert_eq!(obs.outcome, TcpOutcome::Refused);
    assert!(!obs.established);
    assert_eq!(obs.connect_latency, None);
    assert_eq!((obs.bytes_sent, obs.bytes_received), (0, 0));
    assert!(
        ms(obs.duration) >= 20.0,
        "a reset needs one round trip: {obs:?}"
    );
    // The program's aya-log line about it reached `tracing` through the bridge (outcome 1 =
    // refused, no SYN retransmitted).
    let deadline = Instant::now() + WAIT;
    loop {
        let text = String::from_utf8_lossy(&kernel_log().lock().unwrap()).into_owned();
        if text.contains("connect failed (outcome 1, 0 SYN retransmits)") {
            assert!(text.contains(KERNEL_LOG_TARGET), "{text}");
            assert!(text.contains("DEBUG"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no kernel log line; log so far:\n{text}"
        );
        thread::sleep(Duration::from_millis(50));
    }

    // Nobody has 198.18.0.77: the SYN is retransmitted once (after 1 s) before the
    // application gives up at 1.5 s.
    assert_eq!(app.ask("c 198.18.0.77 9000 1.5"), "err timeout");
    let obs = observed.wait_for("the unanswered connect", |o| {
        o.remote.ip().to_string() == "198.18.0.77"
    });
    assert_eq!(obs.outcome, TcpOutcome::Timeout);
    assert!(!obs.established);
    assert!(obs.retransmits >= 1, "{obs:?}");

    // Established, then the server aborts with a reset.
    let reply = app.ask(&format!("x {SVC_V6} 9000 10 0 rst"));
    assert!(reply.starts_with("ok "), "{reply}");
    let lport: u16 = field(&reply, "lport").parse().unwrap();
    let obs = observed.wait_for("the reset connection", |o| o.local.port() == lport);
    assert_eq!(obs.outcome, TcpOutcome::Reset);
    assert!(obs.established);
    assert_eq!(obs.bytes_sent, HEADER + 10, "{obs:?}");
    assert_eq!(obs.bytes_received, 0, "{obs:?}");
    assert!(obs.connect_latency.is_some());
}

#[test]
fn inbound_connections_accepted_in_the_pod_are_observed() {
    let mut world = World::new("inbound", Link::Relay { drop: "-" });
    // The server runs in the pod (observed); the client in the svc namespace (not observed).
    let _server = helper(
        "pod server",
        &world.cgroups.app(),
        Some(&world.pod),
        SERVER_PY,
        &["8080"],
    );
    let mut observed = world.observe();
    let mut client = helper(
        "svc client",
        &world.cgroups.peer(),
        Some(&world.svc),
        CLIENT_PY,
        &[],
    );
    let reply = client.ask(&format!("x {POD_V4} 8080 700 500 client"));
    assert!(reply.starts_with("ok "), "{reply}");
    let client_port: u16 = field(&reply, "lport").parse().unwrap();
    let obs = observed.wait_for("the inbound connection", |o| o.remote.port() == client_port);
    assert_eq!(obs.direction, TcpDirection::Inbound);
    assert_eq!(obs.outcome, TcpOutcome::Ok);
    assert_eq!(obs.local, format!("{POD_V4}:8080").parse().unwrap());
    assert_eq!(obs.remote.ip().to_string(), SVC_V4);
    // Seen from the pod: it received the request and sent the response.
    assert_eq!(
        (obs.bytes_sent, obs.bytes_received),
        (500, HEADER + 700),
        "{obs:?}"
    );
    assert_eq!(obs.connect_latency, None);
    let rtt = ms(obs.srtt.expect("an RTT sample"));
    assert!((20.0..50.0).contains(&rtt), "srtt {rtt} ms");
}

#[test]
fn a_full_ring_buffer_loses_records_and_counts_every_one() {
    let mut world = World::new("overflow", Link::Veth);
    let _server = world.svc_server(9000);
    // The reader is not running: records pile up in the ring buffer (about 2 300 fit).
    let mut observer = world.interception.take_observer().expect("observer");
    assert_eq!(observer.lost_records().unwrap(), 0);
    let mut app = world.app_client();
    const N: u64 = 3000;
    assert_eq!(
        app.ask(&format!("many {SVC_V4} 9000 {N}")),
        format!("ok n={N}")
    );
    // Every connection has reached TCP_CLOSE once the state map is empty.
    let deadline = Instant::now() + WAIT;
    while world.interception.observed_connections().unwrap() > 0 {
        assert!(Instant::now() < deadline, "connections still open");
        thread::sleep(Duration::from_millis(50));
    }
    let lost = observer.lost_records().unwrap();
    assert!(lost > 0, "a 256 KiB ring buffer cannot hold {N} records");
    let mut read = 0u64;
    let mut ok = 0u64;
    observer.drain_now(&mut |out| {
        if let ObserverOutput::Connection(obs) = out {
            read += 1;
            if obs.outcome == TcpOutcome::Ok && obs.remote.port() == 9000 {
                ok += 1;
            }
        }
    });
    assert_eq!(read + lost, N, "read {read} + lost {lost}");
    assert_eq!(ok, read, "every record read is one of the exchanges");
    // Once drained, new records fit again and the lost count stays.
    assert_eq!(app.ask(&format!("many {SVC_V4} 9000 1")), "ok n=1");
    let mut observed = Observed::start(observer);
    let obs = observed.wait_for("a record after the drain", |o| o.remote.port() == 9000);
    assert_eq!(obs.outcome, TcpOutcome::Ok);
    // The running reader reports the earlier losses once.
    let deadline = Instant::now() + WAIT;
    while observed.lost < lost {
        assert!(Instant::now() < deadline, "lost records not reported");
        if let Ok(ObserverOutput::Lost(n)) = observed.rx.recv_timeout(Duration::from_millis(100)) {
            observed.lost += n;
        }
    }
    assert_eq!(observed.lost, lost);
}

#[test]
fn loopback_connections_are_not_observed() {
    let mut world = World::new("loopback", Link::Veth);
    let _server = helper(
        "pod server",
        &world.cgroups.app(),
        Some(&world.pod),
        SERVER_PY,
        &["8081"],
    );
    let mut observed = world.observe();
    let mut app = world.app_client();
    for host in ["127.0.0.1", "::1"] {
        let reply = app.ask(&format!("x {host} 8081 10 10 client"));
        assert!(reply.starts_with("ok "), "{reply}");
    }
    // A non-loopback connection afterwards is observed, and is the only one.
    let _svc = world.svc_server(9000);
    let reply = app.ask(&format!("x {SVC_V4} 9000 10 10 client"));
    let lport: u16 = field(&reply, "lport").parse().unwrap();
    let obs = observed.wait_for("the veth exchange", |o| o.local.port() == lport);
    assert_eq!(obs.outcome, TcpOutcome::Ok);
    assert!(
        observed.seen.is_empty(),
        "loopback connections observed: {:#?}",
        observed.seen
    );
}

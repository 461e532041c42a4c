//! `PodWorld`: the design's test topology on one machine. A "pod" network namespace and a
//! "svc" one joined by a veth pair, a pod cgroup with `app` and `sidecar` children, an HTTP
//! peer in svc, and helpers to start the sidecar and run clients as the app would.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use crate::cgroup::Cgroup;
use crate::cmd::{run_timeout, Finished};
use crate::error::{Error, IoContext, Result};
use crate::h2peers::{self, GrpcServer, WsServer};
use crate::impair::{Impairment, LinkImpairment};
use crate::netns::{unique_name, veth_pair, Netns};
use crate::otlp::OtlpReceiver;
use crate::peers::{peers_dir, EchoPeer, HttpPeer, UdpPeer};
use crate::process::{command_in, Child};
use crate::sidecar::{sidecar_bin, Sidecar, SidecarConfig};
use crate::ss::{self, SsSocket};
use crate::tempdir::TempDir;

/// The pod's IPv4 address.
pub const POD_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The service namespace's IPv4 address.
pub const SVC_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The pod's IPv6 address.
pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd5e, 0x1dec, 0, 0, 0, 0, 0, 1);
/// The service namespace's IPv6 address.
pub const SVC_V6: Ipv6Addr = Ipv6Addr::new(0xfd5e, 0x1dec, 0, 0, 0, 0, 0, 2);
/// Port of the HTTP peer in svc.
pub const HTTP_PORT: u16 = 8080;
/// Port of the TCP echo peer in svc (started on demand).
pub const ECHO_PORT: u16 = 9000;
/// Port of the UDP echo peer in svc (started on demand).
pub const UDP_PORT: u16 = 9001;
/// Port the pod's own HTTP server (the application) listens on, when started.
pub const APP_PORT: u16 = 8080;
/// File name of the pod's annotations (Downward API format) in the world's directory.
pub const ANNOTATIONS_FILE: &str = "annotations";
/// Name of the veth end in each namespace.
pub const VETH: &str = "veth0";

/// The pod world. Dropping it stops the peer, kills whatever is left in the cgroups, removes
/// the cgroups and namespaces, and removes the scratch directory (kept when the test fails).
#[derive(Debug)]
pub struct PodWorld {
    /// The HTTP peer in svc on [`HTTP_PORT`].
    pub http: HttpPeer,
    /// `<pod>/app`: where client processes run.
    pub app_cgroup: Cgroup,
    /// `<pod>/sidecar`: where the sidecar runs.
    pub sidecar_cgroup: Cgroup,
    /// The pod cgroup the sidecar attaches to.
    pub pod_cgroup: Cgroup,
    /// The pod network namespace.
    pub pod: Netns,
    /// The service network namespace.
    pub svc: Netns,
    /// Scratch directory for logs and files.
    pub dir: TempDir,
    name: String,
}

/// The `<name>-svc` and `<name>-pod` namespaces joined by a veth pair ([`VETH`] in each) with
/// the test addresses ([`POD_V4`], [`POD_V6`], [`SVC_V4`], [`SVC_V6`]); returns (svc, pod).
pub fn pod_network(name: &str) -> Result<(Netns, Netns)> {
    let svc = Netns::create(&format!("{name}-svc"))?;
    let pod = Netns::create(&format!("{name}-pod"))?;
    veth_pair(&pod, VETH, &svc, VETH)?;
    pod.add_addr(VETH, &format!("{POD_V4}/24"))?;
    pod.add_addr(VETH, &format!("{POD_V6}/64"))?;
    svc.add_addr(VETH, &format!("{SVC_V4}/24"))?;
    svc.add_addr(VETH, &format!("{SVC_V6}/64"))?;
    Ok((svc, pod))
}

/// The pod cgroup `name` and its `sidecar` and `app` children; returns (pod, sidecar, app).
pub fn pod_cgroups(name: &str) -> Result<(Cgroup, Cgroup, Cgroup)> {
    let pod = Cgroup::create(name)?;
    let sidecar = pod.child("sidecar")?;
    let app = pod.child("app")?;
    Ok((pod, sidecar, app))
}

impl PodWorld {
    /// The pod cgroup and its `app` and `sidecar` children (e.g. to check that nothing stays
    /// attached to any of them).
    pub fn cgroups(&self) -> [&std::path::Path; 3] {
        [
            self.pod_cgroup.path(),
            self.app_cgroup.path(),
            self.sidecar_cgroup.path(),
        ]
    }

    /// Builds the world; `tag` names its namespaces, cgroups and directory (made unique).
    pub fn new(tag: &str) -> Result<Self> {
        let name = unique_name(tag);
        let dir = TempDir::create(&name)?;
        let (svc, pod) = pod_network(&name)?;
        let (pod_cgroup, sidecar_cgroup, app_cgroup) = pod_cgroups(&name)?;
        let http = HttpPeer::start(
            "http-peer",
            &svc,
            HTTP_PORT,
            SocketAddr::new(IpAddr::V4(SVC_V4), HTTP_PORT),
            dir.path(),
        )?;
        tracing::info!(world = %name, "pod world ready");
        Ok(Self {
            http,
            app_cgroup,
            sidecar_cgroup,
            pod_cgroup,
            pod,
            svc,
            dir,
            name,
        })
    }

    /// The world's unique name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `http://198.18.0.2:8080<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{SVC_V4}:{HTTP_PORT}{path}")
    }

    /// `http://[fd5e:1dec::2]:8080<path>`.
    pub fn url_v6(&self, path: &str) -> String {
        format!("http://[{SVC_V6}]:{HTTP_PORT}{path}")
    }

    /// Starts an OTLP receiver listening on `127.0.0.1:<free port>` inside the pod namespace,
    /// where the sidecar can reach it. Must be called within a tokio runtime.
    pub fn start_receiver(&self) -> Result<OtlpReceiver> {
        let listener = self
            .pod
            .enter(|| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?
            .map_err(|e| Error::Io {
                what: "binding the OTLP receiver in the pod namespace".into(),
                source: e,
            })?;
        OtlpReceiver::from_std_listener(listener)
            .map_err(|e| Error::Unexpected(format!("starting the OTLP receiver: {e:#}")))
    }

    /// A command running the sidecar binary with `args` in the pod namespace and the
    /// `sidecar` cgroup.
    pub fn sidecar_command(&self, args: &[&str]) -> Command {
        command_in(
            Some(&self.pod),
            Some(&self.sidecar_cgroup),
            sidecar_bin(),
            args,
        )
    }

    /// Runs the sidecar binary with `args` to completion (e.g. `check`, bad flags).
    pub fn run_sidecar(&self, args: &[&str], timeout: Duration) -> Result<Finished> {
        run_timeout(&mut self.sidecar_command(args), timeout)
    }

    /// Starts `sidecar run --cgroup <pod cgroup> ...` and waits until it is ready.
    pub fn start_sidecar(&self, cfg: &SidecarConfig) -> Result<Sidecar> {
        let args = cfg.run_args(self.pod_cgroup.path());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = self.sidecar_command(&args);
        // Plain log lines in the log file (honoured by tracing-subscriber's ANSI default).
        cmd.env("NO_COLOR", "1");
        for (k, v) in &cfg.env {
            cmd.env(k, v);
        }
        Sidecar::spawn(cmd, &self.dir.join("sidecar.log"), cfg.ready_timeout)
    }

    /// A command running `program args...` as the app: pod namespace, `app` cgroup.
    pub fn app_command(&self, program: &str, args: &[&str]) -> Command {
        command_in(Some(&self.pod), Some(&self.app_cgroup), program, args)
    }

    /// Runs `program args...` as the app to completion, killed after `timeout`.
    pub fn run_app(&self, program: &str, args: &[&str], timeout: Duration) -> Result<Finished> {
        run_timeout(&mut self.app_command(program, args), timeout)
    }

    /// Starts `program args...` as the app in the background (output to `<name>.log`).
    pub fn spawn_app(&self, name: &str, program: &str, args: &[&str]) -> Result<Child> {
        Child::spawn(
            name,
            self.app_command(program, args),
            &self.dir.join(&format!("{name}.log")),
        )
    }

    /// Runs `curl -sS --max-time <timeout> ARGS...` as the app. The process is also killed
    /// at `timeout` plus a margin.
    pub fn curl(&self, args: &[&str], timeout: Duration) -> Result<Finished> {
        let max = format!("{:.1}", timeout.as_secs_f64());
        let mut full = vec!["-sS", "--max-time", &max];
        full.extend_from_slice(args);
        self.run_app("curl", &full, timeout + Duration::from_secs(5))
    }

    /// Starts the TCP echo peer in svc on [`ECHO_PORT`].
    pub fn start_echo_peer(&self) -> Result<EchoPeer> {
        EchoPeer::start(
            "echo-peer",
            &self.svc,
            ECHO_PORT,
            SocketAddr::new(IpAddr::V4(SVC_V4), ECHO_PORT),
            self.dir.path(),
        )
    }

    /// Starts the UDP echo peer in svc on [`UDP_PORT`].
    pub fn start_udp_peer(&self) -> Result<UdpPeer> {
        UdpPeer::start("udp-peer", &self.svc, UDP_PORT, self.dir.path())
    }

    /// Starts an HTTP peer inside the pod namespace (outside the pod cgroup) on `port`, for
    /// loopback destinations.
    pub fn start_http_peer_in_pod(&self, port: u16) -> Result<HttpPeer> {
        HttpPeer::start(
            "pod-local-peer",
            &self.pod,
            port,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            self.dir.path(),
        )
    }

    /// Runs the echo client as the app: sends `bytes` deterministic bytes to `host:port` and
    /// checks the echo.
    pub fn echo_client(
        &self,
        host: &str,
        port: u16,
        bytes: usize,
        timeout: Duration,
    ) -> Result<Finished> {
        let script = peers_dir()
            .join("tcp_echo.py")
            .to_string_lossy()
            .into_owned();
        let port = port.to_string();
        let bytes = bytes.to_string();
        let t = format!("{}", timeout.as_secs().max(1));
        self.run_app(
            "python3",
            &[
                &script,
                "client",
                "--host",
                host,
                "--port",
                &port,
                "--bytes",
                &bytes,
                "--timeout",
                &t,
            ],
            timeout + Duration::from_secs(5),
        )
    }

    /// `http://198.18.0.1:<port><path>`: the pod's address, as a peer in svc dials it.
    pub fn pod_url(&self, port: u16, path: &str) -> String {
        format!("http://{POD_V4}:{port}{path}")
    }

    /// `http://[fd5e:1dec::1]:<port><path>`.
    pub fn pod_url_v6(&self, port: u16, path: &str) -> String {
        format!("http://[{POD_V6}]:{port}{path}")
    }

    /// Starts an HTTP server as the pod's application: pod namespace, `app` cgroup, listening
    /// on `[::]:port` (IPv4 too). Ready once `127.0.0.1:port` accepts inside the pod.
    pub fn start_app_server(&self, name: &str, port: u16) -> Result<HttpPeer> {
        HttpPeer::start_in(
            name,
            &self.pod,
            Some(&self.app_cgroup),
            port,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            self.dir.path(),
        )
    }

    /// Starts another HTTP peer in svc on `port` (next to the one on [`HTTP_PORT`]).
    pub fn start_svc_http_peer(&self, name: &str, port: u16) -> Result<HttpPeer> {
        HttpPeer::start(
            name,
            &self.svc,
            port,
            SocketAddr::new(IpAddr::V4(SVC_V4), port),
            self.dir.path(),
        )
    }

    /// A command running `program args...` in the svc namespace (a remote client of the pod).
    pub fn svc_command(&self, program: &str, args: &[&str]) -> Command {
        command_in(Some(&self.svc), None, program, args)
    }

    /// Runs `curl -sS --max-time <timeout> ARGS...` in svc, killed at `timeout` plus a margin.
    pub fn curl_from_svc(&self, args: &[&str], timeout: Duration) -> Result<Finished> {
        let max = format!("{:.1}", timeout.as_secs_f64());
        let mut full = vec!["-sS", "--max-time", &max];
        full.extend_from_slice(args);
        run_timeout(
            &mut self.svc_command("curl", &full),
            timeout + Duration::from_secs(5),
        )
    }

    /// Starts `program args...` in svc in the background (output to `<name>.log`).
    pub fn spawn_in_svc(&self, name: &str, program: &str, args: &[&str]) -> Result<Child> {
        Child::spawn(
            name,
            self.svc_command(program, args),
            &self.dir.join(&format!("{name}.log")),
        )
    }

    /// Where the pod's annotations file lives (pass it with `--annotations-file`; see
    /// [`SidecarConfig::annotations_file`]). It does not exist until written.
    pub fn annotations_path(&self) -> std::path::PathBuf {
        self.dir.join(ANNOTATIONS_FILE)
    }

    /// Replaces the annotations file with `pairs`, atomically (written aside, then renamed,
    /// as the kubelet swaps Downward API files).
    pub fn write_annotations(&self, pairs: &[(&str, &str)]) -> Result<()> {
        let path = self.annotations_path();
        let tmp = self.dir.join(".annotations.tmp");
        std::fs::write(&tmp, downward_api_annotations(pairs))
            .ctx(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).ctx(|| format!("renaming onto {}", path.display()))
    }

    /// Delays (and drops) the TCP packets svc receives from the pod, as `tc netem` on svc's
    /// ingress would: see [`crate::impair`]. Undone when the guard drops.
    pub fn impair_svc_ingress(&self, what: Impairment) -> Result<LinkImpairment> {
        LinkImpairment::apply(&self.svc, VETH, what, self.dir.path())
    }

    /// `ss -tin state established FILTER...` in the pod namespace.
    pub fn ss_pod(&self, filter: &[&str]) -> Result<Vec<SsSocket>> {
        ss::established(&self.pod, filter)
    }

    /// Starts `peers/tcp_hold.py` as the app: connects to `host:port` (an echo server), does
    /// `rounds` echo exchanges of `size` bytes and keeps the connection open until
    /// [`HeldConnection::release`].
    pub fn hold_tcp_connection(
        &self,
        name: &str,
        host: &str,
        port: u16,
        rounds: u32,
        size: usize,
    ) -> Result<HeldConnection> {
        let script = peers_dir()
            .join("tcp_hold.py")
            .to_string_lossy()
            .into_owned();
        let release = self.dir.join(&format!("{name}.release"));
        let release_s = release.to_string_lossy().into_owned();
        let (port, rounds, size) = (port.to_string(), rounds.to_string(), size.to_string());
        let child = self.spawn_app(
            name,
            "python3",
            &[
                "-u",
                &script,
                "--host",
                host,
                "--port",
                &port,
                "--rounds",
                &rounds,
                "--size",
                &size,
                "--release",
                &release_s,
                "--timeout",
                "120",
            ],
        )?;
        Ok(HeldConnection { child, release })
    }

    /// Sends one UDP datagram (connected socket) as the app and waits for the echo.
    pub fn udp_send(&self, host: &str, port: u16, payload: &[u8]) -> Result<Finished> {
        let script = peers_dir()
            .join("udp_echo.py")
            .to_string_lossy()
            .into_owned();
        let port = port.to_string();
        let payload = hex::encode(payload);
        self.run_app(
            "python3",
            &[
                &script,
                "send",
                "--host",
                host,
                "--port",
                &port,
                "--payload-hex",
                &payload,
            ],
            Duration::from_secs(15),
        )
    }
}

impl PodWorld {
    /// Runs a peer script of `tests/peers` with the virtualenv's Python ([`h2peers::venv_command`]) as
    /// the app (pod namespace, `app` cgroup), killed after `timeout`.
    pub fn run_app_venv(&self, script: &str, args: &[&str], timeout: Duration) -> Result<Finished> {
        let mut cmd = h2peers::venv_command(&self.pod, Some(&self.app_cgroup), script, args);
        run_timeout(&mut cmd, timeout)
    }

    /// Runs a peer script with the virtualenv's Python in svc (a remote client of the pod).
    pub fn run_svc_venv(&self, script: &str, args: &[&str], timeout: Duration) -> Result<Finished> {
        run_timeout(
            &mut h2peers::venv_command(&self.svc, None, script, args),
            timeout,
        )
    }

    /// Starts the grpcio server (`peers/grpc_peer.py serve`) in svc on `port`.
    pub fn start_grpc_server(&self, name: &str, port: u16) -> Result<GrpcServer> {
        GrpcServer::start(
            name,
            &self.svc,
            None,
            port,
            SocketAddr::new(IpAddr::V4(SVC_V4), port),
            self.dir.path(),
        )
    }

    /// Starts the grpcio server as the pod's application: pod namespace, `app` cgroup,
    /// `[::]:port`; ready once `127.0.0.1:port` accepts inside the pod.
    pub fn start_app_grpc_server(&self, name: &str, port: u16) -> Result<GrpcServer> {
        GrpcServer::start(
            name,
            &self.pod,
            Some(&self.app_cgroup),
            port,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            self.dir.path(),
        )
    }

    /// Starts the websocket echo server (`peers/ws_peer.py serve`) in svc on `port`.
    pub fn start_ws_server(&self, name: &str, port: u16) -> Result<WsServer> {
        WsServer::start(
            name,
            &self.svc,
            port,
            SocketAddr::new(IpAddr::V4(SVC_V4), port),
            self.dir.path(),
        )
    }
}

/// A connection held open by `peers/tcp_hold.py` (killed on drop).
#[derive(Debug)]
pub struct HeldConnection {
    child: Child,
    release: std::path::PathBuf,
}

impl HeldConnection {
    /// Waits until the echo rounds are done (the connection is established and idle).
    pub fn wait_rounds_done(&mut self, timeout: Duration) -> Result<()> {
        self.child.wait_for_log("ROUNDS_DONE", timeout)
    }

    /// Lets the client close the connection and waits for it to exit successfully.
    pub fn release(&mut self, timeout: Duration) -> Result<()> {
        std::fs::write(&self.release, b"")
            .ctx(|| format!("creating {}", self.release.display()))?;
        match self.child.wait_timeout(timeout)? {
            Some(st) if st.success() => Ok(()),
            Some(st) => Err(Error::Unexpected(format!(
                "tcp_hold exited with {st}: {}",
                self.child.log()
            ))),
            None => Err(Error::Timeout {
                what: format!("tcp_hold to close: {}", self.child.log()),
                after: timeout,
            }),
        }
    }

    /// The client's output so far.
    pub fn log(&self) -> String {
        self.child.log()
    }
}

/// Renders annotations as the Downward API writes them: `key="value"` lines, values quoted
/// with `"` and backslashes escaped by a backslash, sorted by key.
pub fn downward_api_annotations(pairs: &[(&str, &str)]) -> String {
    let mut sorted: Vec<&(&str, &str)> = pairs.iter().collect();
    sorted.sort_by_key(|(k, _)| *k);
    let mut out = String::new();
    for (k, v) in sorted {
        let v = v.replace('\\', "\\\\").replace('"', "\\\"");
        out.push_str(&format!("{k}=\"{v}\"\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_are_rendered_like_the_downward_api() {
        let text = downward_api_annotations(&[
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "8080,9000"),
            ("config.linkerd.io/skip-outbound-ports", "25"),
            ("quote", "a\"b\\c"),
        ]);
        assert_eq!(
            text,
            "config.linkerd.io/skip-outbound-ports=\"25\"\n\
             quote=\"a\\\"b\\\\c\"\n\
             traffic.sidecar.istio.io/excludeOutboundPorts=\"8080,9000\"\n"
        );
        assert_eq!(downward_api_annotations(&[]), "");
    }
}

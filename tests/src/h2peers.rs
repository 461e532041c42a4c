//! Peers of the HTTP/2, gRPC and websocket tests: the grpcio server and clients
//! (`peers/grpc_peer.py`) and the websocket echo server and client (`peers/ws_peer.py`), both
//! run with the virtualenv's Python ([`crate::venv`]); the nghttp2 servers (`nghttpd`, and
//! `nghttpx` for the HTTP/1.1 `Upgrade: h2c` that nghttpd lacks); parsers of what the clients
//! print (`h2load`'s summary, the peers' JSON lines).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::cgroup::Cgroup;
use crate::error::{Error, IoContext, Result};
use crate::netns::Netns;
use crate::peers::{peers_dir, wait_port, PEER_READY_TIMEOUT};
use crate::process::{command_in, Child};
use crate::traceparent::TraceParent;
use crate::venv::python_venv;

/// The gRPC peer script.
pub const GRPC_PEER: &str = "grpc_peer.py";
/// The websocket peer script.
pub const WS_PEER: &str = "ws_peer.py";

/// `-u <peers>/<script> ARGS...`: the arguments of the virtualenv's Python for a peer script.
pub fn script_args(script: &str, args: &[&str]) -> Vec<String> {
    let mut out = vec![
        "-u".to_owned(),
        peers_dir().join(script).to_string_lossy().into_owned(),
    ];
    out.extend(args.iter().map(|a| (*a).to_owned()));
    out
}

/// The virtualenv's Python running a peer script ([`script_args`]) in `netns` (and `cgroup`).
pub fn venv_command(
    netns: &Netns,
    cgroup: Option<&Cgroup>,
    script: &str,
    args: &[&str],
) -> Command {
    let argv = script_args(script, args);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    command_in(Some(netns), cgroup, python_venv(), &argv)
}

/// Polls `probe` every 20 ms until it breaks with a value; after `timeout`, fails with
/// `missing` of what the last probe continued with.
fn poll<T, C>(
    timeout: Duration,
    mut probe: impl FnMut() -> Result<ControlFlow<T, C>>,
    missing: impl FnOnce(C) -> String,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe()? {
            ControlFlow::Break(found) => return Ok(found),
            ControlFlow::Continue(last) => last,
        };
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: missing(last),
                after: timeout,
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A server peer script run with the virtualenv's Python (`SCRIPT serve --port P --log FILE`)
/// that logs one JSON line `R` per call or connection: [`GrpcServer`], [`WsServer`]. Killed on
/// drop.
#[derive(Debug)]
pub struct JsonLogServer<R> {
    child: Child,
    port: u16,
    log: PathBuf,
    records: PhantomData<fn() -> R>,
}

impl<R: serde::de::DeserializeOwned> JsonLogServer<R> {
    /// Spawns `script` in `netns` (and `cgroup`), logging into `<dir>/<name>.<log_suffix>`;
    /// waits for its `READY` line and for `ready_addr` to accept.
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        name: &str,
        script: &str,
        log_suffix: &str,
        netns: &Netns,
        cgroup: Option<&Cgroup>,
        port: u16,
        ready_addr: SocketAddr,
        dir: &Path,
    ) -> Result<Self> {
        let log = dir.join(format!("{name}.{log_suffix}"));
        let (port_s, log_s) = (port.to_string(), log.to_string_lossy().into_owned());
        let cmd = venv_command(
            netns,
            cgroup,
            script,
            &["serve", "--port", &port_s, "--log", &log_s],
        );
        let mut child = Child::spawn(name, cmd, &dir.join(format!("{name}.log")))?;
        child.wait_for_log("READY", PEER_READY_TIMEOUT)?;
        wait_port(netns, ready_addr, PEER_READY_TIMEOUT)?;
        Ok(Self {
            child,
            port,
            log,
            records: PhantomData,
        })
    }

    fn records(&self) -> Result<Vec<R>> {
        crate::peers::read_json_lines(&self.log)
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server process (its stdout/stderr log).
    pub fn process(&self) -> &Child {
        &self.child
    }
}

/// One finished call as the gRPC server logged it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct GrpcCall {
    /// The method path, e.g. `/demo.Echo/Say`.
    pub method: String,
    /// The `traceparent` invocation metadata, if any.
    pub traceparent: Option<String>,
    /// The `tracestate` invocation metadata, if any.
    pub tracestate: Option<String>,
    /// Peer IP address (IPv4-mapped prefix removed).
    pub peer: String,
    /// Peer port: calls with the same peer and port came over one TCP connection.
    pub peer_port: u16,
    /// The status the handler ended with (`OK`, `NOT_FOUND`, ...; `CANCELLED` if the client
    /// went away during a stream).
    pub status: String,
    /// Response messages sent.
    pub messages: u64,
    /// Response bytes sent (message payloads).
    pub bytes: u64,
    /// When the handler started, Unix seconds.
    pub start: f64,
    /// When the handler ended, Unix seconds.
    pub end: f64,
}

impl GrpcCall {
    /// The parsed `traceparent`, if present and well-formed.
    pub fn trace_parent(&self) -> Option<TraceParent> {
        self.traceparent.as_deref().and_then(TraceParent::parse)
    }
}

/// The largest number of calls whose handlers ran at the same time.
pub fn max_in_flight(calls: &[GrpcCall]) -> usize {
    let mut events: Vec<(f64, i32)> = calls
        .iter()
        .flat_map(|c| [(c.start, 1), (c.end, -1)])
        .collect();
    // Ends sort before starts at the same instant.
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in events {
        now += d;
        max = max.max(now);
    }
    usize::try_from(max).unwrap_or(0)
}

/// The grpcio server (`grpc_peer.py serve`, service `demo.Echo`). Killed on drop.
pub type GrpcServer = JsonLogServer<GrpcCall>;

impl GrpcServer {
    /// Starts the server on `[::]:port` in `netns` (and `cgroup`, e.g. the pod's `app` cgroup
    /// to serve as the pod's application), logging calls into `dir`; ready once `ready_addr`
    /// accepts.
    pub fn start(
        name: &str,
        netns: &Netns,
        cgroup: Option<&Cgroup>,
        port: u16,
        ready_addr: SocketAddr,
        dir: &Path,
    ) -> Result<Self> {
        Self::spawn(
            name,
            GRPC_PEER,
            "calls.jsonl",
            netns,
            cgroup,
            port,
            ready_addr,
            dir,
        )
    }

    /// Every call logged so far.
    pub fn calls(&self) -> Result<Vec<GrpcCall>> {
        self.records()
    }

    /// Calls of `method` (e.g. `/demo.Echo/Say`) logged so far.
    pub fn calls_of(&self, method: &str) -> Result<Vec<GrpcCall>> {
        Ok(self
            .calls()?
            .into_iter()
            .filter(|c| c.method == method)
            .collect())
    }

    /// Waits until at least `n` calls of `method` are logged; returns them all.
    pub fn wait_calls(&self, method: &str, n: usize, timeout: Duration) -> Result<Vec<GrpcCall>> {
        poll(
            timeout,
            || {
                let calls = self.calls_of(method)?;
                Ok(match calls.len() {
                    have if have >= n => ControlFlow::Break(calls),
                    have => ControlFlow::Continue(have),
                })
            },
            |have| {
                format!(
                    "{n} calls of {method} in the gRPC server's log (have {have}); log:\n{}",
                    self.child.log()
                )
            },
        )
    }
}

/// What `grpc_peer.py unary` printed.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct UnarySummary {
    /// Calls made.
    pub calls: u64,
    /// Calls per final status name (`OK`, `NOT_FOUND`, ...).
    pub statuses: BTreeMap<String, u64>,
    /// Whether every OK reply was `echo:` + the request.
    pub replies_ok: bool,
    /// Error details (at most 10).
    pub errors: Vec<String>,
    /// When the first call started, Unix nanoseconds.
    pub start_ns: u64,
    /// When the last call ended, Unix nanoseconds.
    pub end_ns: u64,
}

impl UnarySummary {
    /// Calls that ended with `status`.
    pub fn count(&self, status: &str) -> u64 {
        self.statuses.get(status).copied().unwrap_or(0)
    }
}

/// What `grpc_peer.py stream` printed (also part of [`LoadSummary`]).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct StreamSummary {
    /// Messages received.
    pub messages: u64,
    /// Payload bytes received.
    pub bytes: u64,
    /// Hex sha256 of the messages concatenated in arrival order.
    pub sha256: String,
    /// Final status name.
    pub status: String,
    /// Status details.
    pub details: String,
    /// When the call started, Unix nanoseconds.
    pub start_ns: u64,
    /// When the first message arrived.
    pub first_ns: Option<u64>,
    /// When the last message arrived.
    pub last_ns: Option<u64>,
    /// When the call ended (status received).
    pub end_ns: u64,
}

/// What `grpc_peer.py load` printed.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct LoadSummary {
    /// The concurrent unary calls.
    pub unary: UnarySummary,
    /// The slowly read server stream.
    pub stream: StreamSummary,
}

/// One websocket connection as the echo server logged it (when it closed).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct WsConnection {
    /// Path and query of the upgrade request.
    pub path: String,
    /// The upgrade request's `traceparent` header, if any.
    pub traceparent: Option<String>,
    /// Peer IP address.
    pub peer: String,
    /// Peer port.
    pub peer_port: u16,
    /// Messages echoed.
    pub messages: u64,
    /// Text messages among them.
    pub text: u64,
    /// Binary messages among them.
    pub binary: u64,
    /// Payload bytes echoed (text as UTF-8).
    pub bytes: u64,
}

impl WsConnection {
    /// The parsed `traceparent`, if present and well-formed.
    pub fn trace_parent(&self) -> Option<TraceParent> {
        self.traceparent.as_deref().and_then(TraceParent::parse)
    }
}

/// What `ws_peer.py client` printed.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct WsSummary {
    /// Messages sent.
    pub messages: u64,
    /// Messages echoed intact.
    pub echoed: u64,
    /// Payload bytes sent (text as UTF-8); the echo is as many.
    pub bytes_sent: u64,
    /// Text messages sent.
    pub text: u64,
    /// Binary messages sent.
    pub binary: u64,
    /// What went wrong.
    pub errors: Vec<String>,
    /// Status of the handshake response (101), if one arrived.
    pub status: Option<u16>,
    /// Wall time of the whole exchange.
    pub elapsed_s: f64,
    /// Whether every message came back intact.
    pub equal: bool,
}

/// The websocket echo server (`ws_peer.py serve`). Killed on drop.
pub type WsServer = JsonLogServer<WsConnection>;

impl WsServer {
    /// Starts the echo server on `[::]:port` in `netns`; ready once `ready_addr` accepts.
    pub fn start(
        name: &str,
        netns: &Netns,
        port: u16,
        ready_addr: SocketAddr,
        dir: &Path,
    ) -> Result<Self> {
        Self::spawn(
            name,
            WS_PEER,
            "connections.jsonl",
            netns,
            None,
            port,
            ready_addr,
            dir,
        )
    }

    /// Closed websocket connections logged so far (the readiness probe, which never upgrades,
    /// is not one).
    pub fn connections(&self) -> Result<Vec<WsConnection>> {
        self.records()
    }

    /// Waits until a connection whose path contains `needle` is logged.
    pub fn wait_connection(&self, needle: &str, timeout: Duration) -> Result<WsConnection> {
        poll(
            timeout,
            || {
                let found = self
                    .connections()?
                    .into_iter()
                    .find(|c| c.path.contains(needle));
                Ok(found.map_or(ControlFlow::Continue(()), ControlFlow::Break))
            },
            |()| {
                format!(
                    "the websocket server to log a connection for {needle:?}; log:\n{}",
                    self.child.log()
                )
            },
        )
    }
}

/// An nghttp2 server (`nghttpd` or `nghttpx`) in a namespace. Killed on drop.
#[derive(Debug)]
pub struct Nghttp2Server {
    child: Child,
    port: u16,
}

impl Nghttp2Server {
    /// `nghttpd --no-tls -d <htdocs> <port>` in `netns`: HTTP/2 with prior knowledge only (no
    /// `Upgrade: h2c`). With `verbose` (`-v`) it logs every frame and header it receives.
    pub fn nghttpd(
        name: &str,
        netns: &Netns,
        port: u16,
        htdocs: &Path,
        verbose: bool,
        ready_addr: SocketAddr,
        dir: &Path,
    ) -> Result<Self> {
        let (port_s, docs) = (port.to_string(), htdocs.to_string_lossy().into_owned());
        let mut args = vec!["--no-tls", "-d", &docs];
        if verbose {
            args.push("-v");
        }
        args.push(&port_s);
        Self::spawn(name, netns, "nghttpd", &args, port, ready_addr, dir)
    }

    /// `nghttpx` in `netns` with a cleartext frontend on `*:port` that speaks HTTP/1.1, HTTP/2
    /// with prior knowledge and the HTTP/1.1 `Upgrade: h2c`, proxying to the HTTP/1.1 server
    /// at `backend` (e.g. the world's HTTP peer, which logs the requests and their headers).
    pub fn nghttpx(
        name: &str,
        netns: &Netns,
        port: u16,
        backend: SocketAddr,
        ready_addr: SocketAddr,
        dir: &Path,
    ) -> Result<Self> {
        let frontend = format!("--frontend=*,{port};no-tls");
        let backend = format!("--backend={},{}", backend.ip(), backend.port());
        let access = format!(
            "--accesslog-file={}",
            dir.join(format!("{name}.access.log")).display()
        );
        let args = [
            "--conf=/dev/null",
            frontend.as_str(),
            backend.as_str(),
            "--workers=1",
            access.as_str(),
        ];
        Self::spawn(name, netns, "nghttpx", &args, port, ready_addr, dir)
    }

    fn spawn(
        name: &str,
        netns: &Netns,
        program: &str,
        args: &[&str],
        port: u16,
        ready_addr: SocketAddr,
        dir: &Path,
    ) -> Result<Self> {
        let cmd = command_in(Some(netns), None, program, args);
        let mut child = Child::spawn(name, cmd, &dir.join(format!("{name}.log")))?;
        if let Err(e) = wait_port(netns, ready_addr, PEER_READY_TIMEOUT) {
            let status = child.try_wait()?;
            return Err(Error::Unexpected(format!(
                "{name} ({program}) not accepting on {ready_addr}: {e}; exited: {status:?}; \
                 log:\n{}",
                child.log()
            )));
        }
        Ok(Self { child, port })
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log (with `verbose`, nghttpd's frame and header trace).
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// The server process.
    pub fn process(&self) -> &Child {
        &self.child
    }
}

/// The request counts of `h2load`'s summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct H2loadSummary {
    /// `requests: N total`.
    pub total: u64,
    /// `N started`.
    pub started: u64,
    /// `N done`.
    pub done: u64,
    /// `N succeeded`.
    pub succeeded: u64,
    /// `N failed`.
    pub failed: u64,
    /// `N errored`.
    pub errored: u64,
    /// `N timeout`.
    pub timeout: u64,
    /// `status codes: N 2xx`.
    pub status_2xx: u64,
    /// `N 3xx`.
    pub status_3xx: u64,
    /// `N 4xx`.
    pub status_4xx: u64,
    /// `N 5xx`.
    pub status_5xx: u64,
}

/// `"<n> <word>, <n> <word>, ..."` after `prefix` on the line that starts with it.
fn counts_after(text: &str, prefix: &str) -> Result<BTreeMap<String, u64>> {
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .ok_or_else(|| {
            Error::Unexpected(format!("no `{prefix}` line in h2load's output:\n{text}"))
        })?;
    let mut out = BTreeMap::new();
    for part in line.split(',') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(word)) = (words.next(), words.next()) else {
            continue;
        };
        let n = n
            .parse()
            .map_err(|_| Error::Unexpected(format!("bad count {n:?} in h2load's {line:?}")))?;
        out.insert(word.to_owned(), n);
    }
    Ok(out)
}

/// Parses the `requests:` and `status codes:` lines of `h2load`'s summary.
pub fn parse_h2load(text: &str) -> Result<H2loadSummary> {
    let r = counts_after(text, "requests:")?;
    let s = counts_after(text, "status codes:")?;
    let get = |m: &BTreeMap<String, u64>, k: &str| {
        m.get(k)
            .copied()
            .ok_or_else(|| Error::Unexpected(format!("no `{k}` count in h2load's output:\n{text}")))
    };
    Ok(H2loadSummary {
        total: get(&r, "total")?,
        started: get(&r, "started")?,
        done: get(&r, "done")?,
        succeeded: get(&r, "succeeded")?,
        failed: get(&r, "failed")?,
        errored: get(&r, "errored")?,
        timeout: get(&r, "timeout")?,
        status_2xx: get(&s, "2xx")?,
        status_3xx: get(&s, "3xx")?,
        status_4xx: get(&s, "4xx")?,
        status_5xx: get(&s, "5xx")?,
    })
}

/// Writes `data` to `path`, creating the parent directory.
pub fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, data).ctx(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H2LOAD: &str = "progress: 100% done\n\n\
        finished in 41.61ms, 48064.21 req/s, 459.76MB/s\n\
        requests: 2000 total, 2000 started, 1998 done, 1997 succeeded, 3 failed, 2 errored, 1 timeout\n\
        status codes: 1997 2xx, 0 3xx, 1 4xx, 0 5xx\n\
        traffic: 19.13MB (20060388) total, 23.72KB (24292) headers (space savings 92.26%)\n";

    #[test]
    fn h2load_summary_is_parsed() {
        let s = parse_h2load(H2LOAD).unwrap();
        assert_eq!(
            s,
            H2loadSummary {
                total: 2000,
                started: 2000,
                done: 1998,
                succeeded: 1997,
                failed: 3,
                errored: 2,
                timeout: 1,
                status_2xx: 1997,
                status_3xx: 0,
                status_4xx: 1,
                status_5xx: 0,
            }
        );
        assert!(parse_h2load("finished in 1s\n").is_err());
        assert!(parse_h2load("requests: 1 total\nstatus codes: 1 2xx\n").is_err());
    }

    fn call(start: f64, end: f64) -> GrpcCall {
        GrpcCall {
            method: "/demo.Echo/Say".into(),
            traceparent: None,
            tracestate: None,
            peer: "198.18.0.1".into(),
            peer_port: 1,
            status: "OK".into(),
            messages: 1,
            bytes: 1,
            start,
            end,
        }
    }

    #[test]
    fn in_flight_calls_are_counted() {
        assert_eq!(max_in_flight(&[]), 0);
        let serial = [call(0.0, 1.0), call(1.0, 2.0), call(2.0, 3.0)];
        assert_eq!(max_in_flight(&serial), 1);
        let overlapping = [
            call(0.0, 3.0),
            call(1.0, 2.0),
            call(1.5, 4.0),
            call(3.5, 5.0),
        ];
        assert_eq!(max_in_flight(&overlapping), 3);
    }

    #[test]
    fn script_args_run_unbuffered_from_the_peers_dir() {
        let a = script_args(GRPC_PEER, &["unary", "--count", "2"]);
        assert_eq!(a[0], "-u");
        assert!(a[1].ends_with("tests/peers/grpc_peer.py"), "{a:?}");
        assert_eq!(&a[2..], ["unary", "--count", "2"]);
    }
}

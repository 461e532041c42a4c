//! Real peers for the tests, run from `tests/peers/*.py` (Python 3 standard library): an
//! HTTP/1.1 server, a binary TCP echo server and a UDP echo server, each logging what it saw as
//! JSON lines; plus the deterministic byte stream they share with the Rust side.

use std::collections::BTreeMap;
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::cgroup::Cgroup;
use crate::error::{Error, IoContext, Result};
use crate::netns::Netns;
use crate::process::{command_in, Child};
use crate::traceparent::TraceParent;

/// Default seed of the deterministic stream (the HTTP peer's `/bytes/N`).
pub const DEFAULT_SEED: &[u8] = b"sidecar-tests";

/// How long a peer may take to come up.
pub const PEER_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// `tests/peers`, where the peer scripts live.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// The first `n` bytes of the deterministic stream for `seed`: the concatenation of
/// `sha256(seed || index as 8 big-endian bytes)` for index 0, 1, ... (same as `common.py`).
pub fn pattern(n: usize, seed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 32);
    let mut index: u64 = 0;
    while out.len() < n {
        let mut h = Sha256::new();
        h.update(seed);
        h.update(index.to_be_bytes());
        out.extend_from_slice(&h.finalize());
        index += 1;
    }
    out.truncate(n);
    out
}

/// Hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let data = fs::read(path).ctx(|| format!("reading {}", path.display()))?;
    Ok(sha256_hex(&data))
}

/// The JSON-lines log a peer writes, one value per line (empty when the file does not exist
/// yet).
pub(crate) fn read_json_lines<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Io {
                what: format!("reading {}", path.display()),
                source: e,
            })
        }
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| {
                Error::Unexpected(format!("bad log line in {}: {e}: {l}", path.display()))
            })
        })
        .collect()
}

/// Waits until a TCP connect to `addr` from inside `netns` succeeds.
pub fn wait_port(netns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = netns
            .enter(move || TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok())?;
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("{addr} to accept in netns {}", netns.name()),
                after: timeout,
            });
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_script(
    name: &str,
    netns: &Netns,
    cgroup: Option<&Cgroup>,
    script: &str,
    args: &[&str],
    dir: &Path,
) -> Result<Child> {
    let script = peers_dir().join(script);
    let script = script.to_string_lossy().into_owned();
    let mut full = vec!["-u", script.as_str()];
    full.extend_from_slice(args);
    let cmd = command_in(Some(netns), cgroup, "python3", &full);
    let mut child = Child::spawn(name, cmd, &dir.join(format!("{name}.log")))?;
    child.wait_for_log("READY", PEER_READY_TIMEOUT)?;
    Ok(child)
}

/// One request as the HTTP peer logged it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct PeerRequest {
    /// Connection number (1-based, per server): distinct values = distinct connections.
    pub conn: u64,
    /// Request method.
    pub method: String,
    /// Request target (path and query).
    pub path: String,
    /// Peer IP address (IPv4-mapped prefix removed).
    pub peer: String,
    /// Peer port.
    pub peer_port: u16,
    /// HTTP version, e.g. `HTTP/1.1`.
    pub version: String,
    /// Headers, names lowercased, repeated ones joined with `, `.
    pub headers: BTreeMap<String, String>,
}

impl PeerRequest {
    /// A header by (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The parsed `traceparent` header, if present and well-formed.
    pub fn traceparent(&self) -> Option<TraceParent> {
        self.header("traceparent").and_then(TraceParent::parse)
    }
}

/// The HTTP/1.1 peer server (`peers/http_server.py`). Killed on drop.
#[derive(Debug)]
pub struct HttpPeer {
    child: Child,
    port: u16,
    requests: PathBuf,
}

impl HttpPeer {
    /// Starts the server on `[::]:port` (IPv4 too) in `netns`, logging into `dir`, and waits
    /// until `ready_addr` accepts connections.
    pub fn start(
        name: &str,
        netns: &Netns,
        port: u16,
        ready_addr: SocketAddr,
        dir: &Path,
    ) -> Result<Self> {
        Self::start_in(name, netns, None, port, ready_addr, dir)
    }

    /// Like [`HttpPeer::start`], with the server process in `cgroup` (e.g. the pod's `app`
    /// cgroup, to serve as the pod's application).
    pub fn start_in(
        name: &str,
        netns: &Netns,
        cgroup: Option<&Cgroup>,
        port: u16,
        ready_addr: SocketAddr,
        dir: &Path,
    ) -> Result<Self> {
        let requests = dir.join(format!("{name}.requests.jsonl"));
        let port_s = port.to_string();
        let log_s = requests.to_string_lossy().into_owned();
        let child = spawn_script(
            name,
            netns,
            cgroup,
            "http_server.py",
            &["--port", &port_s, "--log", &log_s],
            dir,
        )?;
        wait_port(netns, ready_addr, PEER_READY_TIMEOUT)?;
        Ok(Self {
            child,
            port,
            requests,
        })
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every request logged so far.
    pub fn requests(&self) -> Result<Vec<PeerRequest>> {
        read_json_lines(&self.requests)
    }

    /// Requests whose target contains `needle`.
    pub fn requests_for(&self, needle: &str) -> Result<Vec<PeerRequest>> {
        Ok(self
            .requests()?
            .into_iter()
            .filter(|r| r.path.contains(needle))
            .collect())
    }

    /// Waits until a request whose target contains `needle` has been logged.
    pub fn wait_for_request(&self, needle: &str, timeout: Duration) -> Result<PeerRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.requests_for(needle)?.into_iter().next() {
                return Ok(r);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("the HTTP peer to see a request for {needle:?}"),
                    after: timeout,
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server process (its stdout/stderr log).
    pub fn process(&self) -> &Child {
        &self.child
    }
}

/// One connection as the TCP echo peer logged it (written when the connection ends).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct EchoConnection {
    /// Connection number (1-based).
    pub conn: u64,
    /// Peer IP address.
    pub peer: String,
    /// Peer port.
    pub peer_port: u16,
    /// Bytes echoed.
    pub bytes: u64,
}

/// The binary TCP echo peer (`peers/tcp_echo.py serve`). Killed on drop.
#[derive(Debug)]
pub struct EchoPeer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl EchoPeer {
    /// Starts the echo server on `[::]:port` in `netns` and waits until `ready_addr` accepts.
    pub fn start(
        name: &str,
        netns: &Netns,
        port: u16,
        ready_addr: SocketAddr,
        dir: &Path,
    ) -> Result<Self> {
        let log = dir.join(format!("{name}.connections.jsonl"));
        let port_s = port.to_string();
        let log_s = log.to_string_lossy().into_owned();
        let child = spawn_script(
            name,
            netns,
            None,
            "tcp_echo.py",
            &["serve", "--port", &port_s, "--log", &log_s],
            dir,
        )?;
        wait_port(netns, ready_addr, PEER_READY_TIMEOUT)?;
        Ok(Self { child, port, log })
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Finished connections (the readiness probe shows up as one with 0 bytes).
    pub fn connections(&self) -> Result<Vec<EchoConnection>> {
        read_json_lines(&self.log)
    }

    /// The server process.
    pub fn process(&self) -> &Child {
        &self.child
    }
}

/// One datagram as the UDP echo peer logged it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Datagram {
    /// Sender IP address.
    pub peer: String,
    /// Sender port.
    pub peer_port: u16,
    /// Payload, hex.
    pub payload_hex: String,
}

/// The UDP echo peer (`peers/udp_echo.py serve`). Killed on drop.
#[derive(Debug)]
pub struct UdpPeer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl UdpPeer {
    /// Starts the UDP echo server on `[::]:port` in `netns` (ready once it printed READY).
    pub fn start(name: &str, netns: &Netns, port: u16, dir: &Path) -> Result<Self> {
        let log = dir.join(format!("{name}.datagrams.jsonl"));
        let port_s = port.to_string();
        let log_s = log.to_string_lossy().into_owned();
        let child = spawn_script(
            name,
            netns,
            None,
            "udp_echo.py",
            &["serve", "--port", &port_s, "--log", &log_s],
            dir,
        )?;
        Ok(Self { child, port, log })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Datagrams received so far.
    pub fn datagrams(&self) -> Result<Vec<Datagram>> {
        read_json_lines(&self.log)
    }

    /// The server process.
    pub fn process(&self) -> &Child {
        &self.child
    }
}

/// What `tcp_echo.py client` printed.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct EchoSummary {
    /// Bytes sent.
    pub sent: u64,
    /// Bytes received back.
    pub received: u64,
    /// Hex sha256 of what was sent.
    pub sent_sha256: String,
    /// Hex sha256 of what came back.
    pub received_sha256: String,
    /// Socket errors seen.
    pub errors: Vec<String>,
    /// Whether the echo was byte-identical.
    pub equal: bool,
}

/// What `udp_echo.py send` printed.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct UdpSummary {
    /// The reply, hex.
    pub reply_hex: String,
    /// Receive error, if any.
    pub error: Option<String>,
    /// Whether the reply equals the payload.
    pub equal: bool,
}

/// Parses the JSON summary a peer client printed on its last stdout line.
pub fn parse_summary<T: DeserializeOwned>(stdout: &str) -> Result<T> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| Error::Unexpected("peer client printed nothing".into()))?;
    serde_json::from_str(line)
        .map_err(|e| Error::Unexpected(format!("bad peer client output {line:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn pattern_matches_the_python_peers() {
        let n = 100_003;
        let ours = sha256_hex(&pattern(n, DEFAULT_SEED));
        let script = format!(
            "import sys, hashlib; sys.path.insert(0, {dir:?}); import common; \
             h = hashlib.sha256(); [h.update(c) for c in common.pattern_chunks({n})]; \
             print(h.hexdigest())",
            dir = peers_dir().to_string_lossy()
        );
        let out = crate::cmd::run_ok(
            Command::new("python3").args(["-c", &script]),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(out.stdout_str().trim(), ours);
        assert_eq!(pattern(40, DEFAULT_SEED).len(), 40);
        assert_ne!(pattern(64, b"a"), pattern(64, b"b"));
    }

    #[test]
    fn summary_uses_the_last_line() {
        let s: UdpSummary =
            parse_summary("noise\n{\"reply_hex\":\"ab\",\"error\":null,\"equal\":true}\n").unwrap();
        assert!(s.equal);
        assert_eq!(s.reply_hex, "ab");
        assert!(parse_summary::<UdpSummary>("").is_err());
    }
}

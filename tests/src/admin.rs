//! A minimal client for the sidecar's admin server inside a pod namespace (`/stats`,
//! `/metrics`, `/healthz`, `/readyz`): one blocking HTTP/1.0 GET per call, bounded in time.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::netns::Netns;

/// The admin server's default port.
pub const ADMIN_PORT: u16 = 15020;

/// Bound of one request (connect, write, read).
const TIMEOUT: Duration = Duration::from_secs(5);

/// Status code and body of one admin response.
#[derive(Clone, Debug)]
pub struct AdminResponse {
    /// HTTP status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body as text (lossy UTF-8).
    pub body: String,
}

/// `GET path` on `127.0.0.1:port` inside `netns`.
pub fn get(netns: &Netns, port: u16, path: &str) -> Result<AdminResponse> {
    let stream = netns
        .enter(|| {
            TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), TIMEOUT)
        })?
        .map_err(|e| Error::Io {
            what: format!("connecting to the admin server on port {port}"),
            source: e,
        })?;
    request(stream, path).map_err(|e| Error::Io {
        what: format!("GET {path} from the admin server on port {port}"),
        source: e,
    })
}

fn request(mut stream: TcpStream, path: &str) -> std::io::Result<AdminResponse> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.take(64 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad response: {text:.200}"),
        )
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(AdminResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// Parses a Prometheus text exposition into `(series, value)` pairs, where `series` is the
/// metric name with its label set exactly as exposed (`name{a="b"}`); comments are skipped.
pub fn prometheus_samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Sum of every sample of metric `name` whose series contains all of `labels`
/// (`key="value"` strings).
pub fn prometheus_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    prometheus_samples(text)
        .into_iter()
        .filter(|(s, _)| {
            let base = s.split('{').next().unwrap_or(s);
            base == name && labels.iter().all(|l| s.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

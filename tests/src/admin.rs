//! A minimal client for the sidecar's admin server inside a pod namespace (`/stats`,
//! `/metrics`, `/healthz`, `/readyz`; Envoy's too): one blocking HTTP/1.1 GET per call, bounded
//! in time.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
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
    get_at(
        &netns.path(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        path,
    )
}

/// `GET path` on `addr` inside the network namespace at `netns` (any admin interface: the
/// sidecar's, Envoy's): HTTP/1.1 with `Connection: close`, a chunked body decoded, bounded in
/// time.
pub fn get_at(netns: &Path, addr: SocketAddr, path: &str) -> Result<AdminResponse> {
    let stream =
        crate::netns::enter_path(netns, move || TcpStream::connect_timeout(&addr, TIMEOUT))?
            .map_err(|e| Error::Io {
                what: format!("connecting to the admin interface at {addr}"),
                source: e,
            })?;
    request(stream, path).map_err(|e| Error::Io {
        what: format!("GET {path} from the admin interface at {addr}"),
        source: e,
    })
}

fn request(mut stream: TcpStream, path: &str) -> std::io::Result<AdminResponse> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    // HTTP/1.1: Envoy's admin answers HTTP/1.0 with 426.
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.take(64 << 20).read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// Status, headers and body of a complete HTTP/1.x response (identity or chunked body); the
/// body as lossy UTF-8.
fn parse_response(raw: &[u8]) -> std::io::Result<AdminResponse> {
    let bad = || {
        invalid(format!(
            "bad response: {:.200}",
            String::from_utf8_lossy(raw)
        ))
    };
    let split = find(raw, b"\r\n\r\n").ok_or_else(bad)?;
    let head = String::from_utf8_lossy(raw.get(..split).unwrap_or_default());
    let body = raw.get(split + 4..).unwrap_or_default();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(AdminResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The payload of a chunked body (extensions and trailers ignored).
fn dechunk(mut rest: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(rest, b"\r\n")
            .ok_or_else(|| invalid("chunked body ends inside a size line".into()))?;
        let line = String::from_utf8_lossy(rest.get(..eol).unwrap_or_default());
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| invalid(format!("bad chunk size {size:?}")))?;
        if size == 0 {
            return Ok(out);
        }
        let after = rest.get(eol + 2..).unwrap_or_default();
        let data = after
            .get(..size)
            .ok_or_else(|| invalid("chunked body ends inside a chunk".into()))?;
        out.extend_from_slice(data);
        rest = after
            .get(size..)
            .and_then(|r| r.strip_prefix(b"\r\n"))
            .ok_or_else(|| invalid("chunk not followed by CRLF".into()))?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_and_plain_responses_are_parsed() {
        let chunked =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
            25\r\nhttp.outbound.downstream_rq_total: 7\n\r\n3;x=y\r\nab\n\r\n0\r\n\r\n";
        let r = parse_response(chunked).unwrap();
        let (status, body) = (r.status, r.body);
        assert_eq!(status, 200);
        assert_eq!(body, "http.outbound.downstream_rq_total: 7\nab\n");
        let plain = b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 16\r\n\r\nUpgrade Required";
        let r = parse_response(plain).unwrap();
        assert_eq!((r.status, r.body), (426, "Upgrade Required".to_owned()));
        let utf8 = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n\u{e9}\r\n0\r\n\r\n";
        assert_eq!(parse_response(utf8.as_bytes()).unwrap().body, "\u{e9}");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        let cut = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10\r\nabc";
        assert!(parse_response(cut).is_err());
    }
}

//! Protocol detection: decides from the application's first bytes whether a connection speaks
//! HTTP/1.x (measured per request), HTTP/2 cleartext with prior knowledge (measured per stream),
//! TLS (forwarded opaquely, ClientHello facts recorded) or something else (forwarded opaquely),
//! without ever losing a byte it read.

pub mod chunked;
pub mod h2;
pub mod http1;
pub mod http2;
pub mod tls;

use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::proxy::forward::read_into;
use crate::telemetry::ConnectionProtocol;

/// Longest method token accepted while detecting (the longest registered one is far shorter).
const MAX_METHOD_LEN: usize = 32;
/// Most bytes buffered while waiting for a whole TLS ClientHello (records add 5 bytes each).
const MAX_TLS_BUFFER: usize = 2 * tls::MAX_HELLO_BYTES;

/// Verdict on a prefix of the application's first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The bytes start with an HTTP/1 request line (`METHOD SP target SP HTTP/1.`).
    Http1,
    /// The bytes cannot be an HTTP/1 request line.
    Opaque,
    /// The bytes are a prefix of an HTTP/1 request line: more are needed to decide.
    NeedMore,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_target_byte(b: u8) -> bool {
    b > b' ' && b != 0x7f
}

/// Classifies the first bytes of a connection.
pub fn classify(buf: &[u8]) -> Class {
    const VERSION: &[u8] = b"HTTP/1.";
    let method_len = buf.iter().take_while(|b| is_tchar(**b)).count();
    if method_len == buf.len() {
        return if method_len <= MAX_METHOD_LEN {
            Class::NeedMore
        } else {
            Class::Opaque
        };
    }
    if method_len == 0 || method_len > MAX_METHOD_LEN || buf.get(method_len) != Some(&b' ') {
        return Class::Opaque;
    }
    let rest = buf.get(method_len + 1..).unwrap_or_default();
    let target_len = rest.iter().take_while(|b| is_target_byte(**b)).count();
    if target_len == rest.len() {
        return Class::NeedMore;
    }
    if target_len == 0 || rest.get(target_len) != Some(&b' ') {
        return Class::Opaque;
    }
    let version = rest.get(target_len + 1..).unwrap_or_default();
    let n = version.len().min(VERSION.len());
    if version.get(..n) != VERSION.get(..n) {
        Class::Opaque
    } else if n < VERSION.len() {
        Class::NeedMore
    } else {
        Class::Http1
    }
}

/// Outcome of detection: the protocol and the bytes already read from the application, which
/// the forwarder must send before anything else.
#[derive(Debug)]
pub struct Detection {
    /// Protocol recognised.
    pub protocol: ConnectionProtocol,
    /// Bytes read from the application during detection (possibly empty).
    pub initial: BytesMut,
    /// When the first of those bytes arrived (now, if none did).
    pub first_byte_at: SystemTime,
    /// For [`ConnectionProtocol::Tls`]: what the ClientHello said, if it was read whole.
    pub tls: Option<tls::TlsInfo>,
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = h2::PREFACE;

/// Verdict on whether the bytes start with the HTTP/2 connection preface: `Some(true)` when
/// they do, `Some(false)` when they cannot, `None` while they are a proper prefix of it.
fn h2_preface(buf: &[u8]) -> Option<bool> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf.get(..n) != H2_PREFACE.get(..n) {
        Some(false)
    } else if n < H2_PREFACE.len() {
        None
    } else {
        Some(true)
    }
}

/// Joint verdict of the HTTP/2, HTTP/1 and TLS classifiers.
fn decide(buf: &[u8]) -> Option<ConnectionProtocol> {
    match h2_preface(buf) {
        Some(true) => return Some(ConnectionProtocol::Http2),
        None => return None,
        Some(false) => {}
    }
    match (classify(buf), tls::classify(buf)) {
        (Class::Http1, _) => Some(ConnectionProtocol::Http1),
        (_, tls::Class::Tls) => Some(ConnectionProtocol::Tls),
        (Class::Opaque, tls::Class::NotTls) => Some(ConnectionProtocol::Opaque),
        _ => None,
    }
}

/// True if `head` (9 bytes peeked from the upstream) is the header of a non-ACK HTTP/2
/// `SETTINGS` frame on stream 0, as an HTTP/2 server sends at once on accept (RFC 9113 §3.4):
/// length a multiple of 6 up to 16 KiB, type 4, flags 0, stream id 0.
fn is_h2_server_settings(head: &[u8]) -> bool {
    let [l0, l1, l2, 4, 0, 0, 0, 0, 0] = head else {
        return false;
    };
    let len = u32::from_be_bytes([0, *l0, *l1, *l2]);
    len.is_multiple_of(6) && len <= 16 * 1024
}

/// Waits up to `timeout` for the application's first bytes while watching the upstream. If the
/// upstream speaks (or closes) first, the application closes, or nothing decisive arrives in
/// time or within `max_head_bytes`, the connection is opaque. One exception: an upstream that
/// opens with an HTTP/2 `SETTINGS` frame (an HTTP/2 server does so without waiting for the
/// client's preface) is not taken as speaking first; detection keeps waiting for the
/// application (HTTP/2 clients send their preface at once). Once a TLS ClientHello header is
/// seen, it keeps reading (same deadline, at most [`MAX_TLS_BUFFER`] bytes) until the whole
/// ClientHello is there to read SNI and ALPN from; if it never is, the connection is still TLS,
/// without those facts. A read error on the application socket is returned as is (the caller
/// resets the upstream).
pub async fn detect(
    client: &TcpStream,
    upstream: &TcpStream,
    timeout: Duration,
    max_head_bytes: usize,
) -> std::io::Result<Detection> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut initial = BytesMut::new();
    let mut first_byte_at = None;
    let mut peek = [0u8; 9];
    let mut upstream_is_h2 = false;
    let mut protocol = None;
    let mut tls_info = None;
    loop {
        if protocol == Some(ConnectionProtocol::Tls) {
            match tls::parse_client_hello(&initial) {
                tls::Parse::Complete(info) => {
                    tls_info = Some(info);
                    break;
                }
                tls::Parse::Invalid => break,
                tls::Parse::NeedMore if initial.len() >= MAX_TLS_BUFFER => break,
                tls::Parse::NeedMore => {}
            }
        } else if protocol.is_some() {
            break;
        }
        tokio::select! {
            biased;
            read = read_into(client, &mut initial) => {
                if read? == 0 {
                    break;
                }
                first_byte_at.get_or_insert_with(SystemTime::now);
                if protocol.is_none() {
                    protocol = decide(&initial);
                    if protocol.is_none() && initial.len() >= max_head_bytes {
                        break;
                    }
                }
            }
            peeked = upstream.peek(&mut peek), if !upstream_is_h2 => {
                match peeked {
                    Ok(9) if is_h2_server_settings(&peek) && h2_preface(&initial) != Some(false) => {
                        upstream_is_h2 = true;
                    }
                    _ => break,
                }
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    Ok(Detection {
        protocol: protocol.unwrap_or(ConnectionProtocol::Opaque),
        initial,
        first_byte_at: first_byte_at.unwrap_or_else(SystemTime::now),
        tls: tls_info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_lines_are_http1() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Class::Http1);
        assert_eq!(classify(b"POST /a?b=c HTTP/1.0\r\n"), Class::Http1);
        assert_eq!(classify(b"PURGE http://h/x HTTP/1."), Class::Http1);
        assert_eq!(classify(b"CONNECT h:443 HTTP/1.1\r\n"), Class::Http1);
    }

    #[test]
    fn prefixes_need_more() {
        let line = b"OPTIONS * HTTP/1.1";
        for n in 0..b"OPTIONS * HTTP/1.".len() {
            assert_eq!(classify(&line[..n]), Class::NeedMore, "prefix {n}");
        }
    }

    #[test]
    fn h2_preface_is_http2() {
        assert_eq!(decide(H2_PREFACE), Some(ConnectionProtocol::Http2));
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(decide(&more), Some(ConnectionProtocol::Http2));
        for n in 0..H2_PREFACE.len() {
            assert_eq!(decide(&H2_PREFACE[..n]), None, "prefix {n}");
        }
        // Same start, then not the preface: an HTTP/1-looking line that is not HTTP/1.
        assert_eq!(
            decide(b"PRI * HTTP/1.1\r\n"),
            Some(ConnectionProtocol::Http1)
        );
        assert_eq!(
            decide(b"PRI * HTTP/2.0\r\n\r\nXX"),
            Some(ConnectionProtocol::Opaque)
        );
    }

    #[test]
    fn h2_server_settings_headers() {
        assert!(is_h2_server_settings(&[0, 0, 0, 4, 0, 0, 0, 0, 0]));
        assert!(is_h2_server_settings(&[0, 0, 18, 4, 0, 0, 0, 0, 0]));
        assert!(!is_h2_server_settings(&[0, 0, 18, 4, 1, 0, 0, 0, 0])); // ACK
        assert!(!is_h2_server_settings(&[0, 0, 17, 4, 0, 0, 0, 0, 0])); // not 6n
        assert!(!is_h2_server_settings(&[0, 0, 6, 4, 0, 0, 0, 0, 1])); // stream 1
        assert!(!is_h2_server_settings(b"220 smtp."));
        assert!(!is_h2_server_settings(&[0, 0, 0, 4]));
    }

    #[test]
    fn other_protocols_are_opaque() {
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Class::Opaque); // TLS ClientHello
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Class::Opaque); // h2 preface
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Class::Opaque); // Redis
        assert_eq!(classify(b"GET  / HTTP/1.1"), Class::Opaque);
        assert_eq!(classify(b" GET / HTTP/1.1"), Class::Opaque);
        assert_eq!(classify(b"GET / FTP/1.1"), Class::Opaque);
        assert_eq!(classify(&[b'A'; MAX_METHOD_LEN + 1]), Class::Opaque);
    }

    proptest! {
        #[test]
        fn classify_never_panics_and_http1_means_request_line(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            if classify(&data) == Class::Http1 {
                let text = String::from_utf8_lossy(&data);
                prop_assert!(text.contains(" HTTP/1."));
            }
        }
    }
}

//! HTTP/1.x measurement, in both directions: parses request and response heads on the fly,
//! follows body framing (length, chunked, until close) without buffering bodies, injects
//! `traceparent`, and reports each exchange to telemetry (a CLIENT span for outbound requests,
//! a SERVER span for inbound ones). Requests and responses run independently, so pipelining
//! works; anything it cannot follow is forwarded opaquely from that point on.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use super::chunked::ChunkedDecoder;
use crate::proxy::forward::{self, read_into, shutdown_write, write_counted, ConnShared, DirEnd};
use crate::proxy::sockopt;
use crate::telemetry::{
    ClientRequest, ConnectionDirection, ConnectionProtocol, ErrorType, HttpRequestEnd,
    HttpRequestStart, HttpVersion, ServerRequest, ServerRequestInfo, Telemetry,
};

/// Most header fields accepted in one head; more makes the connection opaque.
pub(crate) const MAX_HEADERS: usize = 128;
/// Requests whose response has not yet started (bounds pipelining depth in flight).
const QUEUE_DEPTH: usize = 64;

/// Result of trying to parse a head from the bytes received so far.
#[derive(Debug)]
pub(crate) enum Parse<T> {
    Complete(T),
    Partial,
    Invalid,
}

/// How a message body is delimited (RFC 9112 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A header line's position in the head.
#[derive(Clone, Debug)]
pub(crate) struct HeaderLoc {
    /// The whole line, name through line end.
    pub(crate) line: Range<usize>,
    /// The value, without surrounding whitespace.
    pub(crate) value: Range<usize>,
}

/// What the proxy needs from a request head, as positions in the receive buffer.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub(crate) len: usize,
    pub(crate) method: Range<usize>,
    pub(crate) target: Range<usize>,
    pub(crate) version: HttpVersion,
    host: Option<Range<usize>>,
    pub(crate) traceparent: Vec<HeaderLoc>,
    tracestate: Option<Range<usize>>,
    user_agent: Option<Range<usize>>,
    pub(crate) framing: Framing,
    upgrade: bool,
    /// The `Upgrade` header offers `h2c` (HTTP/2 cleartext, RFC 7540 §3.2).
    upgrade_h2c: bool,
    /// Where a new header line goes: after the last header line.
    pub(crate) insert_at: usize,
}

/// What the proxy needs from a response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) len: usize,
    pub(crate) code: u16,
    /// Body framing if the response has a body; `None` when the length is invalid.
    pub(crate) framing: Option<Framing>,
}

/// Position of `part` (a sub-slice of `base`) inside `base`.
fn offset_of(base: &[u8], part: &[u8]) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= base.len()).then_some(start..end)
}

/// Index just past the first LF at or after `from`.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    let rel = buf.get(from..)?.iter().position(|b| *b == b'\n')?;
    Some(from + rel + 1)
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Folds one `Content-Length` value into `acc`; false if it is invalid or disagrees.
fn merge_content_length(value: &[u8], acc: &mut Option<u64>) -> bool {
    for part in value.split(|b| *b == b',') {
        let digits = trim(part);
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return false;
        }
        let Some(n) = std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return false;
        };
        match acc {
            Some(prev) if *prev != n => return false,
            _ => *acc = Some(n),
        }
    }
    true
}

/// True if the last transfer coding listed in `value` is `chunked`.
fn last_coding_is_chunked(value: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .map(trim)
        .rfind(|c| !c.is_empty())
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
}

/// Length and transfer-coding headers seen in one head.
#[derive(Default)]
struct LengthHeaders {
    content_length: Option<u64>,
    invalid_length: bool,
    transfer_encoding: bool,
    chunked_last: bool,
}

impl LengthHeaders {
    /// Notes `name: value` if it is a framing header; returns true if it was.
    fn note(&mut self, name: &str, value: &[u8]) -> bool {
        if name.eq_ignore_ascii_case("content-length") {
            if !merge_content_length(value, &mut self.content_length) {
                self.invalid_length = true;
            }
            true
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            self.transfer_encoding = true;
            if !trim(value).is_empty() {
                self.chunked_last = last_coding_is_chunked(value);
            }
            true
        } else {
            false
        }
    }
}

pub(crate) fn parse_request_head(buf: &[u8]) -> Parse<RequestHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Invalid,
    };
    match request_head_positions(buf, len, &req) {
        Some(head) => Parse::Complete(head),
        None => Parse::Invalid,
    }
}

fn request_head_positions(
    buf: &[u8],
    len: usize,
    req: &httparse::Request<'_, '_>,
) -> Option<RequestHead> {
    let head = buf.get(..len)?;
    let method = offset_of(head, req.method?.as_bytes())?;
    let target = offset_of(head, req.path?.as_bytes())?;
    let version = match req.version? {
        0 => HttpVersion::Http10,
        1 => HttpVersion::Http11,
        _ => return None,
    };
    let mut insert_at = line_end(head, target.end)?;
    let mut host = None;
    let mut traceparent = Vec::new();
    let mut tracestate = None;
    let mut user_agent = None;
    let mut upgrade = false;
    let mut upgrade_h2c = false;
    let mut lengths = LengthHeaders::default();
    for h in req.headers.iter() {
        let name = offset_of(head, h.name.as_bytes())?;
        let value = offset_of(head, h.value)?;
        let end = line_end(head, value.end)?;
        insert_at = end;
        if lengths.note(h.name, h.value) {
            continue;
        }
        if h.name.eq_ignore_ascii_case("host") {
            host.get_or_insert(value);
        } else if h.name.eq_ignore_ascii_case("traceparent") {
            traceparent.push(HeaderLoc {
                line: name.start..end,
                value,
            });
        } else if h.name.eq_ignore_ascii_case("tracestate") {
            tracestate.get_or_insert(value);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
            upgrade_h2c |= h
                .value
                .split(|b| *b == b',')
                .any(|token| trim(token).eq_ignore_ascii_case(b"h2c"));
        } else if h.name.eq_ignore_ascii_case("user-agent") {
            user_agent.get_or_insert(value);
        }
    }
    if insert_at >= len {
        return None;
    }
    let framing = if lengths.transfer_encoding {
        // Both headers, or a final coding other than chunked: the length is ambiguous
        // (RFC 9112 §6.3), so the proxy does not try to follow (or change) this stream.
        if lengths.content_length.is_some() || lengths.invalid_length || !lengths.chunked_last {
            return None;
        }
        Framing::Chunked
    } else if lengths.invalid_length {
        return None;
    } else {
        lengths
            .content_length
            .map_or(Framing::None, Framing::Length)
    };
    Some(RequestHead {
        len,
        method,
        target,
        version,
        host,
        traceparent,
        tracestate,
        user_agent,
        framing,
        upgrade,
        upgrade_h2c,
        insert_at,
    })
}

pub(crate) fn parse_response_head(buf: &[u8]) -> Parse<ResponseHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let mut config = httparse::ParserConfig::default();
    config
        .allow_obsolete_multiline_headers_in_responses(true)
        .allow_spaces_after_header_name_in_responses(true)
        .allow_multiple_spaces_in_response_status_delimiters(true);
    let len = match config.parse_response(&mut resp, buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Invalid,
    };
    let Some(code) = resp.code else {
        return Parse::Invalid;
    };
    let mut lengths = LengthHeaders::default();
    for h in resp.headers.iter() {
        lengths.note(h.name, h.value);
    }
    let framing = if lengths.transfer_encoding {
        Some(if lengths.chunked_last {
            Framing::Chunked
        } else {
            Framing::UntilClose
        })
    } else if lengths.invalid_length {
        None
    } else {
        Some(
            lengths
                .content_length
                .map_or(Framing::UntilClose, Framing::Length),
        )
    };
    Parse::Complete(ResponseHead { len, code, framing })
}

/// True if `v` can be sent as a header value as is.
fn is_header_value(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// The request head with its `traceparent` value set to `traceparent`: the first incoming
/// header keeps its name and place, further ones are removed; if there was none, a line is
/// added after the last header. Everything else is byte-for-byte the same.
pub(crate) fn rewrite_head(
    head: &[u8],
    parsed: &RequestHead,
    traceparent: &str,
) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(head.len() + traceparent.len() + 16);
    match parsed.traceparent.split_first() {
        Some((first, rest)) => {
            out.extend_from_slice(head.get(..first.value.start)?);
            out.extend_from_slice(traceparent.as_bytes());
            let mut pos = first.value.end;
            for extra in rest {
                out.extend_from_slice(head.get(pos..extra.line.start)?);
                pos = extra.line.end;
            }
            out.extend_from_slice(head.get(pos..)?);
        }
        None => {
            out.extend_from_slice(head.get(..parsed.insert_at)?);
            out.extend_from_slice(b"traceparent: ");
            out.extend_from_slice(traceparent.as_bytes());
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(head.get(parsed.insert_at..)?);
        }
    }
    Some(out)
}

fn str_at(buf: &[u8], range: Range<usize>) -> Option<&str> {
    std::str::from_utf8(buf.get(range)?).ok()
}

/// The telemetry of one request in flight: a CLIENT span (outbound) or a SERVER span (inbound).
enum Measured {
    Client(ClientRequest),
    Server(ServerRequest),
}

impl Measured {
    fn traceparent(&self) -> Option<&str> {
        match self {
            Measured::Client(r) => r.traceparent(),
            Measured::Server(r) => r.traceparent(),
        }
    }

    /// Adds the `TCP_INFO` attributes of `socket` to a recording span (one `getsockopt`).
    fn add_tcp_info(&mut self, socket: &TcpStream) {
        let recording = match self {
            Measured::Client(r) => r.is_recording(),
            Measured::Server(r) => r.is_recording(),
        };
        if !recording {
            return;
        }
        match sockopt::tcp_info(socket) {
            Ok(info) => match self {
                Measured::Client(r) => r.set_tcp_info(info.rtt, info.total_retrans),
                Measured::Server(r) => r.set_tcp_info(info.rtt, info.total_retrans),
            },
            Err(e) => tracing::trace!(error = %e, "TCP_INFO unavailable"),
        }
    }

    fn end(self, telemetry: &Telemetry, end: HttpRequestEnd) {
        match self {
            Measured::Client(r) => telemetry.client_request_end(r, end),
            Measured::Server(r) => telemetry.server_request_end(r, end),
        }
    }

    /// The same call continued as stream 1 of an h2c upgrade (its response comes over HTTP/2).
    fn into_http2(self) -> super::http2::Call {
        match self {
            Measured::Client(mut r) => {
                r.set_version(HttpVersion::Http2);
                super::http2::Call::Client(r)
            }
            Measured::Server(mut r) => {
                r.set_version(HttpVersion::Http2);
                super::http2::Call::Server(r)
            }
        }
    }
}

/// Ends a request's span exactly once: explicitly when its response is complete, or when
/// dropped (connection failed or task aborted) with the connection's error.
struct RequestGuard<'a> {
    telemetry: &'a Telemetry,
    shared: &'a ConnShared,
    /// The socket whose `TCP_INFO` goes on the span: the upstream one for a CLIENT span, the
    /// accepted (client-facing) one for a SERVER span.
    tcp_socket: &'a TcpStream,
    req: Option<Measured>,
    request_body: Arc<AtomicU64>,
    status: Option<u16>,
    response_body: u64,
    #[cfg(test)]
    observed: crate::proxy::observe::Exchange,
}

impl RequestGuard<'_> {
    fn finish(&mut self, error: Option<ErrorType>) {
        if let Some(mut req) = self.req.take() {
            req.add_tcp_info(self.tcp_socket);
            let end = HttpRequestEnd {
                status: self.status,
                request_body_bytes: self.request_body.load(Ordering::Relaxed),
                response_body_bytes: self.response_body,
                error,
                end: SystemTime::now(),
            };
            #[cfg(test)]
            let observed = crate::proxy::observe::Exchange {
                status: end.status,
                request_body: end.request_body_bytes,
                response_body: end.response_body_bytes,
                error: end.error,
                ..std::mem::take(&mut self.observed)
            };
            req.end(self.telemetry, end);
            #[cfg(test)]
            crate::proxy::observe::push_exchange(self.shared.destination, observed);
        }
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        let error = self.shared.error().unwrap_or(ErrorType::IncompleteResponse);
        self.finish(Some(error));
    }
}

/// What follows an `Upgrade` or `CONNECT` request, as its response decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Switch {
    /// The connection stays HTTP/1.
    Stay,
    /// The connection switched to something the proxy forwards opaquely.
    Opaque,
    /// The connection switched to HTTP/2 (`101` to `Upgrade: h2c`): both sides hand their
    /// leftover bytes to the HTTP/2 driver.
    H2c,
}

/// A request whose response the response side is waiting for.
struct Pending<'a> {
    guard: RequestGuard<'a>,
    is_head: bool,
    is_connect: bool,
    /// The request offered `Upgrade: h2c`.
    h2c: bool,
    /// For `Upgrade` and `CONNECT` requests: tells the request side what follows.
    switch: Option<oneshot::Sender<Switch>>,
}

/// What the two directions hand over when a connection upgrades to h2c.
#[derive(Default)]
struct H2cHandoff {
    /// The upgrade request's call: stream 1, whose response comes over HTTP/2.
    stream1: Option<Measured>,
    /// Application bytes read after the upgrade request (the HTTP/2 preface onwards).
    from_client: Option<BytesMut>,
    /// Upstream bytes read after the `101` head (its SETTINGS onwards).
    from_upstream: Option<BytesMut>,
}

/// How forwarding a body ended early.
#[derive(Debug)]
enum BodyError {
    /// The source closed before the body was complete.
    Eof,
    Read(std::io::Error),
    Write(std::io::Error),
    /// The chunked framing is broken; the unforwarded bytes are still in the buffer.
    Framing,
}

/// Forwards one body from `src` to `dst`, starting with what is already in `buf` and leaving
/// in `buf` whatever follows the body.
async fn forward_body(
    src: &TcpStream,
    dst: &TcpStream,
    buf: &mut BytesMut,
    framing: Framing,
    wire: &AtomicU64,
    payload: &AtomicU64,
) -> Result<(), BodyError> {
    let mut decoder = ChunkedDecoder::new();
    let mut left = match framing {
        Framing::None => return Ok(()),
        Framing::Length(0) => return Ok(()),
        Framing::Length(n) => n,
        Framing::Chunked | Framing::UntilClose => 0,
    };
    loop {
        if !buf.is_empty() {
            let (take, body_bytes, done) = match framing {
                Framing::Length(_) => {
                    let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    left -= take as u64;
                    (take, take as u64, left == 0)
                }
                Framing::Chunked => {
                    let p = decoder.feed(buf).map_err(|_| BodyError::Framing)?;
                    (p.consumed, p.payload, p.done)
                }
                Framing::UntilClose | Framing::None => (buf.len(), buf.len() as u64, false),
            };
            if take > 0 {
                write_counted(dst, buf.get(..take).unwrap_or_default(), wire)
                    .await
                    .map_err(BodyError::Write)?;
                buf.advance(take);
                payload.fetch_add(body_bytes, Ordering::Relaxed);
            }
            if done {
                return Ok(());
            }
        }
        match read_into(src, buf).await {
            Ok(0) if framing == Framing::UntilClose => return Ok(()),
            Ok(0) => return Err(BodyError::Eof),
            Ok(_) => {}
            Err(e) => return Err(BodyError::Read(e)),
        }
    }
}

/// One HTTP/1 connection being proxied.
pub(crate) struct Http1<'a> {
    /// The application's socket.
    pub client: &'a TcpStream,
    /// The socket to the original destination.
    pub upstream: &'a TcpStream,
    /// Connection counters and error.
    pub shared: &'a ConnShared,
    /// Where requests are reported.
    pub telemetry: &'a Telemetry,
    /// Largest request or response head followed; larger ones make the rest opaque.
    pub max_head_bytes: usize,
    /// Outbound: `client` is the pod's application and requests get CLIENT spans. Inbound:
    /// `client` is the remote caller, `upstream` the application, and requests get SERVER
    /// spans.
    pub direction: ConnectionDirection,
    /// Remote end of `client` (`client.address` of SERVER spans).
    pub peer: SocketAddr,
}

impl<'a> Http1<'a> {
    /// Proxies the connection until both directions end; `initial` holds the bytes detection
    /// read. A `101` answer to `Upgrade: h2c` hands the connection to the HTTP/2 driver, the
    /// upgrade request becoming its stream 1. Returns true when both directions ended cleanly.
    pub(crate) async fn run(&self, initial: BytesMut, first_byte_at: SystemTime) -> bool {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let handoff = std::sync::Mutex::new(H2cHandoff::default());
        let clean = forward::drive(
            self.requests(initial, first_byte_at, tx, &handoff),
            self.responses(rx, &handoff),
        )
        .await;
        let handoff = handoff.into_inner().unwrap_or_else(|p| p.into_inner());
        let (Some(from_client), Some(from_upstream)) = (handoff.from_client, handoff.from_upstream)
        else {
            return clean;
        };
        self.shared.set_protocol(ConnectionProtocol::Http2);
        let mut calls = std::collections::HashMap::new();
        if let Some(m) = handoff.stream1 {
            calls.insert(1, m.into_http2());
        }
        let h2 = super::http2::Http2 {
            client: self.client,
            upstream: self.upstream,
            shared: self.shared,
            telemetry: self.telemetry,
            direction: self.direction,
            peer: self.peer,
        };
        h2.run(
            super::h2::H2Translator::after_upgrade(super::h2::Limits::default()),
            from_client,
            from_upstream,
            calls,
        )
        .await
    }

    /// Stops following requests: the rest of the application's bytes, starting with `buf`,
    /// are forwarded as they are.
    async fn requests_opaque(&self, buf: &[u8]) -> DirEnd {
        forward::pump(
            self.client,
            self.upstream,
            buf,
            &self.shared.bytes_sent,
            self.shared,
        )
        .await
    }

    /// Stops following responses: the rest of the upstream's bytes, starting with `buf`, are
    /// forwarded as they are.
    async fn responses_opaque(&self, buf: &[u8]) -> DirEnd {
        forward::pump(
            self.upstream,
            self.client,
            buf,
            &self.shared.bytes_received,
            self.shared,
        )
        .await
    }

    /// Application → upstream: request heads (with `traceparent` set) and bodies.
    async fn requests(
        &self,
        mut buf: BytesMut,
        mut first_byte_at: SystemTime,
        tx: mpsc::Sender<Pending<'a>>,
        handoff: &std::sync::Mutex<H2cHandoff>,
    ) -> DirEnd {
        let shared = self.shared;
        let sent = &shared.bytes_sent;
        let mut reused = false;
        loop {
            let head = loop {
                if !buf.is_empty() {
                    match parse_request_head(&buf) {
                        Parse::Complete(head) => break head,
                        Parse::Partial if buf.len() < self.max_head_bytes => {}
                        Parse::Partial | Parse::Invalid => {
                            tracing::debug!(
                                destination = %shared.destination,
                                buffered = buf.len(),
                                "request head not parsable; forwarding the rest opaquely"
                            );
                            if !reused {
                                // Nothing measured: the connection counts as opaque.
                                shared.set_protocol(ConnectionProtocol::Opaque);
                            }
                            drop(tx);
                            return self.requests_opaque(&buf).await;
                        }
                    }
                }
                let was_empty = buf.is_empty();
                match read_into(self.client, &mut buf).await {
                    Ok(0) => {
                        if !reused && !buf.is_empty() {
                            // Closed inside the first head: nothing measured.
                            shared.set_protocol(ConnectionProtocol::Opaque);
                        }
                        if let Err(e) = write_counted(self.upstream, &buf, sent).await {
                            return DirEnd::write_failed(shared, e);
                        }
                        shutdown_write(self.upstream);
                        return DirEnd::Eof;
                    }
                    Ok(_) if was_empty => first_byte_at = SystemTime::now(),
                    Ok(_) => {}
                    Err(e) => return DirEnd::read_failed(shared, e),
                }
            };
            if tx.is_closed() {
                // The response side stopped following: nothing more is measured.
                drop(tx);
                return self.requests_opaque(&buf).await;
            }

            let method = str_at(&buf, head.method.clone()).unwrap_or_default();
            let is_head = method == "HEAD";
            let is_connect = method == "CONNECT";
            let start = HttpRequestStart {
                method,
                target: str_at(&buf, head.target.clone()).unwrap_or_default(),
                host: head.host.clone().and_then(|r| str_at(&buf, r)),
                version: head.version,
                destination: shared.destination,
                traceparent: head
                    .traceparent
                    .first()
                    .and_then(|h| str_at(&buf, h.value.clone())),
                tracestate: head.tracestate.clone().and_then(|r| str_at(&buf, r)),
                start: first_byte_at,
                reused_connection: reused,
            };
            let req = match self.direction {
                ConnectionDirection::Outbound => {
                    Measured::Client(self.telemetry.client_request_start(&start))
                }
                ConnectionDirection::Inbound => {
                    let info = ServerRequestInfo {
                        client: self.peer,
                        user_agent: head.user_agent.clone().and_then(|r| str_at(&buf, r)),
                    };
                    Measured::Server(self.telemetry.server_request_start(&start, &info))
                }
            };
            #[cfg(test)]
            let observed = crate::proxy::observe::Exchange {
                inbound: self.direction == ConnectionDirection::Inbound,
                method: start.method.to_owned(),
                target: start.target.to_owned(),
                reused,
                incoming_traceparent: start.traceparent.map(str::to_owned),
                outgoing_traceparent: req.traceparent().map(str::to_owned),
                ..Default::default()
            };
            reused = true;
            let head_bytes = buf.get(..head.len).unwrap_or_default();
            let rewritten = req
                .traceparent()
                .filter(|tp| is_header_value(tp))
                .and_then(|tp| rewrite_head(head_bytes, &head, tp));

            let request_body = Arc::new(AtomicU64::new(0));
            let (switch_tx, switch_rx) = if head.upgrade || is_connect {
                let (t, r) = oneshot::channel();
                (Some(t), Some(r))
            } else {
                (None, None)
            };
            let pending = Pending {
                guard: RequestGuard {
                    telemetry: self.telemetry,
                    shared,
                    tcp_socket: match self.direction {
                        ConnectionDirection::Outbound => self.upstream,
                        ConnectionDirection::Inbound => self.client,
                    },
                    req: Some(req),
                    request_body: Arc::clone(&request_body),
                    status: None,
                    response_body: 0,
                    #[cfg(test)]
                    observed,
                },
                is_head,
                is_connect,
                h2c: head.upgrade_h2c,
                switch: switch_tx,
            };
            // Queued before the head is sent, so the response side always finds it.
            if tx.send(pending).await.is_err() {
                drop(tx);
                return self.requests_opaque(&buf).await;
            }
            let out = rewritten
                .as_deref()
                .unwrap_or_else(|| buf.get(..head.len).unwrap_or_default());
            if let Err(e) = write_counted(self.upstream, out, sent).await {
                return DirEnd::write_failed(shared, e);
            }
            buf.advance(head.len);

            let body = forward_body(
                self.client,
                self.upstream,
                &mut buf,
                head.framing,
                sent,
                &request_body,
            )
            .await;
            match body {
                Ok(()) => {}
                Err(BodyError::Eof) => {
                    shutdown_write(self.upstream);
                    return DirEnd::Eof;
                }
                Err(BodyError::Read(e)) => return DirEnd::read_failed(shared, e),
                Err(BodyError::Write(e)) => return DirEnd::write_failed(shared, e),
                Err(BodyError::Framing) => {
                    tracing::debug!(
                        destination = %shared.destination,
                        "invalid chunked request body; forwarding the rest opaquely"
                    );
                    drop(tx);
                    return self.requests_opaque(&buf).await;
                }
            }
            first_byte_at = SystemTime::now();
            if let Some(switch) = switch_rx {
                // Nothing after an Upgrade/CONNECT request can be read as HTTP until the
                // response says whether the protocol changed.
                match switch.await {
                    Ok(Switch::Stay) => {}
                    Ok(Switch::H2c) => {
                        drop(tx);
                        let mut h = handoff.lock().unwrap_or_else(|p| p.into_inner());
                        h.from_client = Some(std::mem::take(&mut buf));
                        return DirEnd::Eof;
                    }
                    Ok(Switch::Opaque) | Err(_) => {
                        drop(tx);
                        return self.requests_opaque(&buf).await;
                    }
                }
            }
        }
    }

    /// Gives up following responses: the current and queued requests end as incomplete and
    /// the rest is forwarded opaquely.
    async fn responses_give_up(
        &self,
        pending: Option<Pending<'a>>,
        rx: mpsc::Receiver<Pending<'a>>,
        buf: &[u8],
    ) -> DirEnd {
        tracing::debug!(
            destination = %self.shared.destination,
            "response not parsable; forwarding the rest opaquely"
        );
        drop(pending);
        drop(rx);
        self.responses_opaque(buf).await
    }

    /// Upstream → application: response heads and bodies, matched in order with the queued
    /// requests.
    async fn responses(
        &self,
        mut rx: mpsc::Receiver<Pending<'a>>,
        handoff: &std::sync::Mutex<H2cHandoff>,
    ) -> DirEnd {
        let shared = self.shared;
        let received = &shared.bytes_received;
        let mut buf = BytesMut::new();
        loop {
            // The next request to answer. Bytes arriving while no request waits (a 408 before
            // closing, say) are passed on as they are.
            let mut p = loop {
                match rx.try_recv() {
                    Ok(p) => break p,
                    Err(TryRecvError::Disconnected) => return self.responses_opaque(&buf).await,
                    Err(TryRecvError::Empty) => {}
                }
                if !buf.is_empty() {
                    if let Err(e) = write_counted(self.client, &buf, received).await {
                        return DirEnd::write_failed(shared, e);
                    }
                    buf.clear();
                }
                tokio::select! {
                    biased;
                    p = rx.recv() => match p {
                        Some(p) => break p,
                        None => return self.responses_opaque(&buf).await,
                    },
                    read = read_into(self.upstream, &mut buf) => match read {
                        Ok(0) => {
                            shutdown_write(self.client);
                            return DirEnd::Eof;
                        }
                        Ok(_) => {}
                        Err(e) => return DirEnd::read_failed(shared, e),
                    },
                }
            };

            // Interim (1xx) heads, then the final one.
            let framing = loop {
                let head = loop {
                    if !buf.is_empty() {
                        match parse_response_head(&buf) {
                            Parse::Complete(head) => break head,
                            Parse::Partial if buf.len() < self.max_head_bytes => {}
                            Parse::Partial | Parse::Invalid => {
                                return self.responses_give_up(Some(p), rx, &buf).await;
                            }
                        }
                    }
                    match read_into(self.upstream, &mut buf).await {
                        Ok(0) => {
                            if let Err(e) = write_counted(self.client, &buf, received).await {
                                return DirEnd::write_failed(shared, e);
                            }
                            p.guard.finish(Some(ErrorType::IncompleteResponse));
                            shutdown_write(self.client);
                            return DirEnd::Eof;
                        }
                        Ok(_) => {}
                        Err(e) => return DirEnd::read_failed(shared, e),
                    }
                };
                let out = buf.get(..head.len).unwrap_or_default();
                if let Err(e) = write_counted(self.client, out, received).await {
                    return DirEnd::write_failed(shared, e);
                }
                buf.advance(head.len);
                let code = head.code;
                if code == 101 && p.h2c {
                    if let Some(switch) = p.switch.take() {
                        let mut h = handoff.lock().unwrap_or_else(|e| e.into_inner());
                        h.stream1 = p.guard.req.take();
                        h.from_upstream = Some(std::mem::take(&mut buf));
                        drop(h);
                        let _ = switch.send(Switch::H2c);
                        return DirEnd::Eof;
                    }
                }
                if code == 101 {
                    p.guard.status = Some(code);
                    p.guard.finish(None);
                    return match p.switch.take() {
                        Some(switch) => {
                            let _ = switch.send(Switch::Opaque);
                            self.responses_opaque(&buf).await
                        }
                        // 101 to a request that did not ask to upgrade: cannot be followed.
                        None => self.responses_give_up(None, rx, &buf).await,
                    };
                }
                if (100..200).contains(&code) {
                    continue;
                }
                p.guard.status = Some(code);
                if p.is_connect && (200..300).contains(&code) {
                    p.guard.finish(None);
                    if let Some(switch) = p.switch.take() {
                        let _ = switch.send(Switch::Opaque);
                    }
                    return self.responses_opaque(&buf).await;
                }
                if let Some(switch) = p.switch.take() {
                    let _ = switch.send(Switch::Stay);
                }
                if p.is_head || code == 204 || code == 304 {
                    break Framing::None;
                }
                match head.framing {
                    Some(framing) => break framing,
                    None => return self.responses_give_up(Some(p), rx, &buf).await,
                }
            };

            let body_bytes = AtomicU64::new(0);
            let body = forward_body(
                self.upstream,
                self.client,
                &mut buf,
                framing,
                received,
                &body_bytes,
            )
            .await;
            p.guard.response_body = body_bytes.load(Ordering::Relaxed);
            match body {
                Ok(()) if framing == Framing::UntilClose => {
                    p.guard.finish(None);
                    shutdown_write(self.client);
                    return DirEnd::Eof;
                }
                Ok(()) => p.guard.finish(None),
                Err(BodyError::Eof) => {
                    p.guard.finish(Some(ErrorType::IncompleteResponse));
                    shutdown_write(self.client);
                    return DirEnd::Eof;
                }
                Err(BodyError::Read(e)) => return DirEnd::read_failed(shared, e),
                Err(BodyError::Write(e)) => return DirEnd::write_failed(shared, e),
                Err(BodyError::Framing) => {
                    return self.responses_give_up(Some(p), rx, &buf).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(buf: &[u8]) -> RequestHead {
        match parse_request_head(buf) {
            Parse::Complete(h) => h,
            other => panic!("expected a complete head, got {other:?}"),
        }
    }

    fn response_framing(buf: &[u8]) -> Option<Framing> {
        match parse_response_head(buf) {
            Parse::Complete(h) => h.framing,
            other => panic!("expected a complete head, got {other:?}"),
        }
    }

    #[test]
    fn request_framing_follows_rfc_9112() {
        assert_eq!(request(b"GET / HTTP/1.1\r\n\r\n").framing, Framing::None);
        assert_eq!(
            request(b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n").framing,
            Framing::Length(5)
        );
        assert_eq!(
            request(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n\r\n"
            )
            .framing,
            Framing::Chunked
        );
        for ambiguous in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        ] {
            assert!(
                matches!(parse_request_head(ambiguous), Parse::Invalid),
                "{}",
                String::from_utf8_lossy(ambiguous)
            );
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        assert_eq!(
            response_framing(b"HTTP/1.1 200 OK\r\n\r\n"),
            Some(Framing::UntilClose)
        );
        assert_eq!(
            response_framing(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            Some(Framing::Length(0))
        );
        assert_eq!(
            response_framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Some(Framing::Chunked)
        );
        assert_eq!(
            response_framing(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n"
            ),
            Some(Framing::UntilClose)
        );
        assert_eq!(
            response_framing(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
            None
        );
        // Folded header lines (obsolete, still seen) are accepted in responses.
        assert_eq!(
            response_framing(b"HTTP/1.0 200 OK\r\nX-A: 1\r\n  2\r\nContent-Length: 1\r\n\r\n"),
            Some(Framing::Length(1))
        );
    }

    #[test]
    fn traceparent_inserted_after_the_last_header() {
        let buf = b"GET / HTTP/1.1\r\n\r\n";
        let h = request(buf);
        assert_eq!(h.insert_at, 16);
        assert_eq!(
            rewrite_head(buf, &h, "TP").unwrap(),
            b"GET / HTTP/1.1\r\ntraceparent: TP\r\n\r\n"
        );
        let buf = b"GET / HTTP/1.1\nHost: a\n\n";
        let h = request(buf);
        assert_eq!(
            rewrite_head(buf, &h, "TP").unwrap(),
            b"GET / HTTP/1.1\nHost: a\ntraceparent: TP\r\n\n"
        );
    }

    #[test]
    fn traceparent_value_replaced_in_place() {
        let buf = b"GET / HTTP/1.1\r\nTRACEPARENT:   old  \r\nA: b\r\ntraceparent:\r\nC: d\r\n\r\n";
        let h = request(buf);
        assert_eq!(h.traceparent.len(), 2);
        assert_eq!(
            rewrite_head(buf, &h, "new").unwrap(),
            b"GET / HTTP/1.1\r\nTRACEPARENT:   new  \r\nA: b\r\nC: d\r\n\r\n"
        );
    }

    #[test]
    fn request_fields_are_located() {
        let buf = b"\r\nPURGE http://h/p?q HTTP/1.0\r\nhost: h\r\ntracestate: a=1\r\nUpgrade: x\r\nuser-agent: ua/1\r\n\r\nNEXT";
        let h = request(buf);
        assert_eq!(h.len, buf.len() - 4);
        assert_eq!(str_at(buf, h.method.clone()), Some("PURGE"));
        assert_eq!(str_at(buf, h.target.clone()), Some("http://h/p?q"));
        assert_eq!(h.host.clone().and_then(|r| str_at(buf, r)), Some("h"));
        assert_eq!(
            h.tracestate.clone().and_then(|r| str_at(buf, r)),
            Some("a=1")
        );
        assert_eq!(
            h.user_agent.clone().and_then(|r| str_at(buf, r)),
            Some("ua/1")
        );
        assert_eq!(h.version, HttpVersion::Http10);
        assert!(h.upgrade);
    }

    #[test]
    fn injected_values_must_be_header_safe() {
        assert!(is_header_value(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_header_value("a\r\nX-Evil: 1"));
        assert!(!is_header_value(""));
    }

    proptest! {
        #[test]
        fn arbitrary_heads_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Parse::Complete(h) = parse_request_head(&data) {
                prop_assert!(h.len <= data.len());
                prop_assert!(h.insert_at < h.len);
                let out = rewrite_head(&data[..h.len], &h, "tp");
                prop_assert!(out.is_some());
            }
            if let Parse::Complete(h) = parse_response_head(&data) {
                prop_assert!(h.len <= data.len());
            }
        }

        #[test]
        fn rewrite_changes_only_the_traceparent(
            headers in proptest::collection::vec(("[A-Za-z-]{1,12}", "[!-~]{0,20}"), 0..8),
            tp_at in proptest::option::of(0usize..8),
        ) {
            let mut head = b"GET /x HTTP/1.1\r\n".to_vec();
            let mut expected = head.clone();
            let mut placed = false;
            for (i, (k, v)) in headers.iter().enumerate() {
                if k.eq_ignore_ascii_case("traceparent") {
                    continue;
                }
                if tp_at == Some(i) {
                    head.extend_from_slice(b"traceparent: incoming\r\n");
                    expected.extend_from_slice(b"traceparent: NEW\r\n");
                    placed = true;
                }
                head.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
                expected.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
            }
            if !placed {
                expected.extend_from_slice(b"traceparent: NEW\r\n");
            }
            head.extend_from_slice(b"\r\n");
            expected.extend_from_slice(b"\r\n");
            let h = request(&head);
            prop_assert_eq!(rewrite_head(&head, &h, "NEW").unwrap(), expected);
        }
    }
}

//! End to end with real peers: an `h2` client and an `h2` server talk through the translator
//! over in-memory pipes, with concurrent requests, bodies, trailers both ways, informational
//! responses, a trailers-only gRPC response, a 4 MiB response that needs flow control, and
//! Huffman-coded, dynamic-table-indexed headers from h2's encoder.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::tp;
use crate::protocol::h2::{H2Translator, Limits, RequestHead, Side, StreamEnd, StreamOutcome};

/// Size of the large response body.
const BIG: usize = 4 * 1024 * 1024;
/// Requests with an echoed body.
const ECHOES: usize = 5;

/// What the translator reported, shared by the two pump tasks, and the client direction's
/// bytes before and after translation.
#[derive(Default)]
struct Shared {
    ends: Vec<StreamEnd>,
    heads: Vec<RequestHead>,
    client_raw: Vec<u8>,
    client_translated: Vec<u8>,
}

/// Counts of HPACK representations in the header blocks of a client byte stream.
#[derive(Debug, Default)]
struct HpackUse {
    /// Indexed fields referring to the dynamic table.
    dynamic_refs: usize,
    /// Literals with incremental indexing.
    indexed_literals: usize,
    /// Huffman-coded strings.
    huffman: usize,
    /// Dynamic table size updates, by value.
    size_updates: Vec<usize>,
    /// Header blocks.
    blocks: usize,
}

/// Walks the header blocks of a client byte stream (after the preface), classifying every
/// representation.
fn hpack_use(bytes: &[u8]) -> HpackUse {
    use super::super::frame::{self, FrameHeader};
    use super::super::hpack::decode_integer;
    let mut stats = HpackUse::default();
    let mut pos = super::PREFACE.len();
    let mut block = Vec::new();
    while let Some(h) = FrameHeader::parse(&bytes[pos..]) {
        let payload = &bytes[pos + 9..pos + 9 + h.length];
        pos += 9 + h.length;
        if h.kind != frame::HEADERS && h.kind != frame::CONTINUATION {
            continue;
        }
        let f = frame::fragment(&h, payload).expect("layout");
        block.extend_from_slice(&payload[f.range]);
        if !h.has(frame::FLAG_END_HEADERS) {
            continue;
        }
        stats.blocks += 1;
        let mut i = 0;
        let string = |i: &mut usize, stats: &mut HpackUse| {
            stats.huffman += usize::from(block[*i] & 0x80 != 0);
            let (len, used) = decode_integer(&block[*i..], 7).expect("length");
            *i += used + len;
        };
        while i < block.len() {
            let b = block[i];
            if b & 0x80 != 0 {
                let (index, used) = decode_integer(&block[i..], 7).expect("index");
                stats.dynamic_refs += usize::from(index > 61);
                i += used;
            } else if b & 0xe0 == 0x20 {
                let (size, used) = decode_integer(&block[i..], 5).expect("size");
                stats.size_updates.push(size);
                i += used;
            } else {
                let prefix = if b & 0x40 != 0 { 6 } else { 4 };
                stats.indexed_literals += usize::from(b & 0x40 != 0);
                let (index, used) = decode_integer(&block[i..], prefix).expect("name index");
                stats.dynamic_refs += usize::from(index > 61);
                i += used;
                if index == 0 {
                    string(&mut i, &mut stats);
                }
                string(&mut i, &mut stats);
            }
        }
        block.clear();
    }
    stats
}

/// Moves bytes from `from` to `to` through one direction of the translator until EOF.
async fn pump(
    t: Arc<Mutex<H2Translator>>,
    shared: Arc<Mutex<Shared>>,
    side: Side,
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
) {
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    loop {
        input.reserve(32 * 1024);
        let n = from.read_buf(&mut input).await.expect("pump read");
        if n == 0 {
            break;
        }
        {
            let mut t = t.lock().expect("lock");
            let mut guard = shared.lock().expect("lock");
            let Shared {
                ends,
                heads,
                client_raw,
                client_translated,
            } = &mut *guard;
            if side == Side::Client {
                client_raw.extend_from_slice(&input);
            }
            let result = match side {
                Side::Client => t.from_client(
                    &mut input,
                    &mut out,
                    &mut |h| {
                        heads.push(h.clone());
                        Some(tp(h.stream_id))
                    },
                    ends,
                ),
                Side::Upstream => t.from_upstream(&mut input, &mut out, ends),
            };
            result.expect("translate");
            if side == Side::Client {
                // Only what was consumed counts as raw input; the rest comes again next time.
                let kept = input.len();
                let raw_len = client_raw.len();
                client_raw.truncate(raw_len - kept);
                client_translated.extend_from_slice(&out);
            }
        }
        to.write_all(&out).await.expect("pump write");
        out.clear();
    }
    let _ = to.shutdown().await;
}

/// What the server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    stream: u32,
    headers: HeaderMap,
    body: usize,
    trailers: Option<HeaderMap>,
}

/// Headers every echo request carries (plus per-request ones).
fn echo_headers(i: usize) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("user-agent", "e2e-client/1.0".to_string()),
        ("content-type", "application/octet-stream".to_string()),
        (
            "x-shared",
            "same value on every request, indexed".to_string(),
        ),
        ("x-index", i.to_string()),
        ("cookie", format!("session=s{i}")),
        ("authorization", "Bearer very-secret-token".to_string()),
    ];
    if i.is_multiple_of(2) {
        h.push((
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string(),
        ));
        h.push(("tracestate", "vendor=value".to_string()));
    }
    h
}

/// Serves: `/echo/*` answers 103, then 200 with the body echoed and trailers; `/big` sends
/// 4 MiB and `grpc-status: 0` trailers; `/grpc` answers trailers-only.
async fn server(io: tokio::io::DuplexStream, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut conn = h2::server::Builder::new()
        .header_table_size(1024)
        .handshake::<_, Bytes>(io)
        .await
        .expect("server handshake");
    while let Some(accepted) = conn.accept().await {
        let (req, mut respond) = accepted.expect("accept");
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            let stream = respond.stream_id().as_u32();
            let path = req.uri().path().to_string();
            let headers = req.headers().clone();
            let mut body = req.into_body();
            let mut received = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("request body");
                body.flow_control()
                    .release_capacity(chunk.len())
                    .expect("release");
                received.extend_from_slice(&chunk);
            }
            let trailers = body.trailers().await.expect("request trailers");
            seen.lock().expect("lock").push(Seen {
                stream,
                headers,
                body: received.len(),
                trailers,
            });
            if path == "/grpc" {
                let resp = Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "7")
                    .header("grpc-message", "permission%20denied")
                    .body(())
                    .expect("response");
                respond.send_response(resp, true).expect("send");
            } else if path == "/big" {
                let resp = Response::builder()
                    .status(StatusCode::OK)
                    .header("x-big", "yes")
                    .body(())
                    .expect("response");
                let mut send = respond.send_response(resp, false).expect("send");
                let chunk = Bytes::from(vec![0x5a; 64 * 1024]);
                for _ in 0..BIG / chunk.len() {
                    send.send_data(chunk.clone(), false).expect("data");
                }
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                send.send_trailers(trailers).expect("trailers");
            } else {
                respond
                    .send_informational(
                        Response::builder()
                            .status(103)
                            .header("link", "</style.css>; rel=preload")
                            .body(())
                            .expect("103"),
                    )
                    .expect("informational");
                let resp = Response::builder()
                    .status(StatusCode::CREATED)
                    .header("server", "e2e-server")
                    .header("x-echo-path", path.as_str())
                    .header("set-cookie", "id=1; HttpOnly")
                    .body(())
                    .expect("response");
                let mut send = respond.send_response(resp, false).expect("send");
                send.send_data(Bytes::from(received), false).expect("echo");
                let mut trailers = HeaderMap::new();
                trailers.insert(
                    "x-resp-trailer",
                    HeaderValue::from_str(&path).expect("value"),
                );
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                send.send_trailers(trailers).expect("trailers");
            }
        });
    }
}

/// What the client got back.
#[derive(Debug)]
struct Got {
    stream: u32,
    status: StatusCode,
    headers: HeaderMap,
    body: usize,
    trailers: Option<HeaderMap>,
}

/// Sends one request (body and trailers optional) and reads the whole response.
async fn call(
    client: &mut h2::client::SendRequest<Bytes>,
    req: Request<()>,
    body: Option<(Bytes, HeaderMap)>,
) -> Got {
    let mut client = client.clone().ready().await.expect("ready");
    let (resp, mut send) = client
        .send_request(req, body.is_none())
        .expect("send request");
    let stream = resp.stream_id().as_u32();
    if let Some((data, trailers)) = body {
        send.send_data(data, false).expect("request data");
        send.send_trailers(trailers).expect("request trailers");
    }
    let resp = resp.await.expect("response");
    let (parts, mut body) = resp.into_parts();
    let mut len = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("response body");
        len += chunk.len();
        body.flow_control()
            .release_capacity(chunk.len())
            .expect("release");
    }
    let trailers = body.trailers().await.expect("response trailers");
    Got {
        stream,
        status: parts.status,
        headers: parts.headers,
        body: len,
        trailers,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_h2_peers_through_the_translator() {
    tokio::time::timeout(Duration::from_secs(60), run())
        .await
        .expect("end to end exchange timed out");
}

async fn run() {
    let (client_io, proxy_client) = tokio::io::duplex(16 * 1024);
    let (proxy_upstream, server_io) = tokio::io::duplex(16 * 1024);
    let t = Arc::new(Mutex::new(H2Translator::new(Limits::default())));
    let shared = Arc::new(Mutex::new(Shared::default()));
    let (pc_read, pc_write) = tokio::io::split(proxy_client);
    let (pu_read, pu_write) = tokio::io::split(proxy_upstream);
    let up = tokio::spawn(pump(
        Arc::clone(&t),
        Arc::clone(&shared),
        Side::Client,
        pc_read,
        pu_write,
    ));
    let down = tokio::spawn(pump(
        Arc::clone(&t),
        Arc::clone(&shared),
        Side::Upstream,
        pu_read,
        pc_write,
    ));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server_task = tokio::spawn(server(server_io, Arc::clone(&seen)));

    let (client, conn) = h2::client::handshake(client_io)
        .await
        .expect("client handshake");
    let client_conn = tokio::spawn(async move {
        let _ = conn.await;
    });

    let mut calls = Vec::new();
    for i in 0..ECHOES {
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            let mut req = Request::builder()
                .method("POST")
                .uri(format!("http://svc.test:8080/echo/{i}"));
            for (name, value) in echo_headers(i) {
                req = req.header(name, value);
            }
            let mut trailers = HeaderMap::new();
            trailers.insert(
                "x-req-trailer",
                HeaderValue::from_str(&i.to_string()).expect("value"),
            );
            let body = Bytes::from(vec![b'a' + i as u8; 1000 * (i + 1)]);
            call(
                &mut client,
                req.body(()).expect("request"),
                Some((body, trailers)),
            )
            .await
        }));
    }
    let mut c = client.clone();
    calls.push(tokio::spawn(async move {
        let req = Request::builder()
            .uri("http://svc.test:8080/big")
            .header("user-agent", "e2e-client/1.0")
            .body(())
            .expect("request");
        call(&mut c, req, None).await
    }));
    let mut c = client.clone();
    calls.push(tokio::spawn(async move {
        let req = Request::builder()
            .method("POST")
            .uri("http://svc.test:8080/grpc")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-grpc-trailer", HeaderValue::from_static("t"));
        call(
            &mut c,
            req,
            Some((Bytes::from_static(&[0, 0, 0, 0, 0]), trailers)),
        )
        .await
    }));
    let mut got = Vec::new();
    for call in calls {
        got.push(call.await.expect("call task"));
    }
    drop(client);

    // What the client got: the server's responses, unchanged.
    let by_stream: BTreeMap<u32, &Got> = got.iter().map(|g| (g.stream, g)).collect();
    assert_eq!(by_stream.len(), ECHOES + 2);
    for (i, g) in got.iter().take(ECHOES).enumerate() {
        assert_eq!(g.status, StatusCode::CREATED);
        assert_eq!(g.headers["server"], "e2e-server");
        assert_eq!(g.headers["x-echo-path"], format!("/echo/{i}").as_str());
        assert_eq!(g.headers["set-cookie"], "id=1; HttpOnly");
        assert_eq!(g.body, 1000 * (i + 1));
        let trailers = g.trailers.as_ref().expect("trailers");
        assert_eq!(trailers["x-resp-trailer"], format!("/echo/{i}").as_str());
        assert_eq!(trailers["grpc-status"], "0");
    }
    let big = &got[ECHOES];
    assert_eq!(big.status, StatusCode::OK);
    assert_eq!(big.headers["x-big"], "yes");
    assert_eq!(big.body, BIG);
    assert_eq!(big.trailers.as_ref().expect("trailers")["grpc-status"], "0");
    let grpc = &got[ECHOES + 1];
    assert_eq!(grpc.headers["grpc-status"], "7");
    assert_eq!(grpc.headers["grpc-message"], "permission%20denied");
    assert_eq!(grpc.body, 0);

    // What the server saw: every header the client sent, plus the injected traceparent.
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), ECHOES + 2);
    for s in &seen {
        let tps: Vec<_> = s.headers.get_all("traceparent").iter().collect();
        assert_eq!(tps, [tp(s.stream).as_str()], "stream {}", s.stream);
        let g = by_stream[&s.stream];
        if let Some(i) = got.iter().take(ECHOES).position(|x| x.stream == s.stream) {
            for (name, value) in echo_headers(i) {
                if name != "traceparent" {
                    assert_eq!(
                        s.headers[name],
                        value.as_str(),
                        "{name} on stream {}",
                        s.stream
                    );
                }
            }
            assert_eq!(
                s.headers.len(),
                echo_headers(i).len() + usize::from(i % 2 == 1)
            );
            assert_eq!(s.body, 1000 * (i + 1));
            assert_eq!(
                s.trailers.as_ref().expect("trailers")["x-req-trailer"],
                i.to_string().as_str()
            );
        } else if g.body == BIG {
            assert_eq!(s.headers["user-agent"], "e2e-client/1.0");
            assert_eq!(s.headers.len(), 2);
        } else {
            assert_eq!(s.headers["te"], "trailers");
            assert_eq!(
                s.trailers.as_ref().expect("trailers")["x-grpc-trailer"],
                "t"
            );
        }
    }

    // The client's encoder used Huffman coding, the dynamic table and a size update (after the
    // server's SETTINGS_HEADER_TABLE_SIZE of 1024); the upstream got literals only, the size
    // update included.
    {
        let shared = shared.lock().expect("lock");
        let raw = hpack_use(&shared.client_raw);
        let translated = hpack_use(&shared.client_translated);
        assert!(
            raw.huffman > 0 && raw.dynamic_refs > 0 && raw.indexed_literals > 0,
            "{raw:?}"
        );
        assert!(raw.size_updates.contains(&1024), "{raw:?}");
        assert_eq!(
            translated.huffman + translated.dynamic_refs + translated.indexed_literals,
            0
        );
        assert_eq!(translated.size_updates, raw.size_updates);
        assert_eq!(translated.blocks, raw.blocks);
    }

    // What the translator reported.
    let _ = client_conn.await;
    let _ = up.await;
    server_task.abort();
    let _ = down.await;
    let mut t = Arc::try_unwrap(t)
        .ok()
        .expect("pumps done")
        .into_inner()
        .expect("lock");
    let mut shared = std::mem::take(&mut *shared.lock().expect("lock"));
    t.close(&mut shared.ends);
    let ends: BTreeMap<u32, StreamEnd> = shared
        .ends
        .iter()
        .map(|e| (e.stream_id, e.clone()))
        .collect();
    assert_eq!(ends.len(), ECHOES + 2, "{:?}", shared.ends);
    for (stream, g) in &by_stream {
        let e = &ends[stream];
        assert_eq!(e.outcome, StreamOutcome::Complete, "{e:?}");
        assert_eq!(e.status, Some(g.status.as_u16()));
        assert_eq!(e.response_body_bytes, g.body as u64);
    }
    for (i, g) in got.iter().take(ECHOES).enumerate() {
        let e = &ends[&g.stream];
        assert_eq!(e.request_body_bytes, 1000 * (i as u64 + 1));
        assert_eq!(e.grpc_status, Some(0));
    }
    let e = &ends[&got[ECHOES + 1].stream];
    assert_eq!(e.grpc_status, Some(7));
    assert_eq!(e.grpc_message.as_deref(), Some("permission%20denied"));
    assert_eq!(e.request_body_bytes, 5);
    let heads: BTreeMap<u32, RequestHead> = shared
        .heads
        .iter()
        .map(|h| (h.stream_id, h.clone()))
        .collect();
    assert_eq!(heads.len(), ECHOES + 2);
    for (i, g) in got.iter().take(ECHOES).enumerate() {
        let h = &heads[&g.stream];
        assert_eq!(h.method, "POST");
        assert_eq!(h.path, format!("/echo/{i}"));
        assert_eq!(h.authority.as_deref(), Some("svc.test:8080"));
        assert_eq!(h.scheme.as_deref(), Some("http"));
        assert_eq!(h.user_agent.as_deref(), Some("e2e-client/1.0"));
        assert_eq!(h.tracestate.is_some(), i % 2 == 0);
        assert!(!h.end_stream);
    }
    assert!(heads[&got[ECHOES].stream].end_stream);
}

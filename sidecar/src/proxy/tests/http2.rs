//! HTTP/2 through the proxy with real peers (the `h2` crate's client and server): per-stream
//! spans, gRPC status from trailers and trailers-only responses, resets, and the traceparent
//! each stream carries.

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::Value;
use opentelemetry_sdk::trace::SpanData;

use super::*;

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

/// What the server saw of one request.
#[derive(Debug)]
struct Seen {
    path: String,
    traceparent: Option<String>,
    body: usize,
}

/// An HTTP/2 server answering by path: `/plain` 200 + body, `/demo.Echo/Say` gRPC OK with a
/// message and trailers, `/demo.Echo/Missing` trailers-only NOT_FOUND, `/demo.Echo/Stream` ten
/// messages then UNAVAILABLE, `/reset` RST_STREAM(INTERNAL_ERROR).
async fn serve(sock: TcpStream, seen: tokio::sync::mpsc::UnboundedSender<Seen>) {
    let Ok(mut conn) = ::h2::server::handshake(sock).await else {
        return;
    };
    while let Some(Ok((req, mut respond))) = conn.accept().await {
        let seen = seen.clone();
        tokio::spawn(async move {
            let (parts, mut body) = req.into_parts();
            let mut n = 0;
            while let Some(Ok(chunk)) = body.data().await {
                n += chunk.len();
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            let path = parts.uri.path().to_owned();
            let _ = seen.send(Seen {
                path: path.clone(),
                traceparent: parts
                    .headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                body: n,
            });
            let grpc = |status: &str| {
                Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc")
                    .header("grpc-status", status)
                    .body(())
                    .unwrap()
            };
            let trailers = |status: &'static str| {
                let mut t = HeaderMap::new();
                t.insert("grpc-status", status.parse().unwrap());
                t
            };
            match path.as_str() {
                "/plain" => {
                    let resp = Response::builder().status(200).body(()).unwrap();
                    let mut send = respond.send_response(resp, false).unwrap();
                    send.send_data(Bytes::from_static(b"hello h2"), true)
                        .unwrap();
                }
                "/demo.Echo/Say" => {
                    let resp = Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    let mut send = respond.send_response(resp, false).unwrap();
                    send.send_data(Bytes::from_static(b"\0\0\0\0\x03abc"), false)
                        .unwrap();
                    send.send_trailers(trailers("0")).unwrap();
                }
                "/demo.Echo/Missing" => {
                    respond.send_response(grpc("5"), true).unwrap();
                }
                "/demo.Echo/Stream" => {
                    let resp = Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    let mut send = respond.send_response(resp, false).unwrap();
                    for _ in 0..10 {
                        send.send_data(Bytes::from_static(b"\0\0\0\0\x01x"), false)
                            .unwrap();
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    send.send_trailers(trailers("14")).unwrap();
                }
                _ => respond.send_reset(::h2::Reason::INTERNAL_ERROR),
            }
        });
    }
}

/// Sends one request on `client` and returns the status (or the error), the body bytes and
/// the trailers' `grpc-status`.
async fn call(
    client: &::h2::client::SendRequest<Bytes>,
    path: &str,
    grpc: bool,
    body: &'static [u8],
) -> Result<(u16, usize, Option<String>), ::h2::Error> {
    let mut client = client.clone().ready().await?;
    let mut req = Request::builder()
        .method("POST")
        .uri(format!("http://svc.test{path}"));
    if grpc {
        req = req.header("content-type", "application/grpc");
    }
    let (resp, mut send) = client.send_request(req.body(()).unwrap(), body.is_empty())?;
    if !body.is_empty() {
        send.send_data(Bytes::from_static(body), true)?;
    }
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let header_status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = resp.into_body();
    let mut n = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        n += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await?;
    let grpc_status = trailers
        .and_then(|t| {
            t.get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .or(header_status);
    Ok((status, n, grpc_status))
}

#[tokio::test]
async fn http2_streams_are_measured_and_carry_their_span() {
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let up = upstream(move |s| serve(s, seen_tx)).await;
    let h = start_proxy(up.addr).await;
    let sock = TcpStream::connect(h.addr).await.unwrap();
    let (client, conn) = bounded("h2 handshake", ::h2::client::handshake(sock))
        .await
        .unwrap();
    let driver = tokio::spawn(conn);

    let (plain, say, missing, stream, reset) = bounded("five concurrent streams", async {
        tokio::join!(
            call(&client, "/plain", false, b"request body"),
            call(&client, "/demo.Echo/Say", true, b"\0\0\0\0\x02hi"),
            call(&client, "/demo.Echo/Missing", true, b""),
            call(&client, "/demo.Echo/Stream", true, b""),
            call(&client, "/reset", false, b""),
        )
    })
    .await;
    assert_eq!(plain.unwrap(), (200, 8, None));
    assert_eq!(say.unwrap(), (200, 8, Some("0".into())));
    assert_eq!(missing.unwrap(), (200, 0, Some("5".into())));
    assert_eq!(stream.unwrap(), (200, 60, Some("14".into())));
    let err = reset.expect_err("the server reset the stream");
    assert_eq!(err.reason(), Some(::h2::Reason::INTERNAL_ERROR));
    drop(client);
    let _ = bounded("client connection end", driver).await;

    let mut seen = Vec::new();
    while seen.len() < 5 {
        seen.push(
            bounded("server saw the requests", seen_rx.recv())
                .await
                .unwrap(),
        );
    }
    // Spans end when the proxy forwards END_STREAM / RST_STREAM: wait for all five.
    let spans = bounded("five spans", async {
        loop {
            let spans = h.tt.spans();
            if spans.len() >= 5 {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for s in &seen {
        let tp = s
            .traceparent
            .as_deref()
            .expect("every stream carries traceparent");
        let span = spans
            .iter()
            .find(|sp| tp.contains(&sp.span_context.span_id().to_string()))
            .unwrap_or_else(|| panic!("no span for {} ({tp})", s.path));
        assert!(tp.contains(&span.span_context.trace_id().to_string()));
        assert_eq!(span.span_kind, SpanKind::Client);
        assert_eq!(
            attr(span, "network.protocol.version"),
            Some(&Value::from("2"))
        );
        match s.path.as_str() {
            "/plain" => {
                assert_eq!(s.body, 12);
                assert_eq!(span.name, "POST");
                assert_eq!(
                    attr(span, "http.response.status_code"),
                    Some(&Value::I64(200))
                );
                assert_eq!(attr(span, "http.request.body.size"), Some(&Value::I64(12)));
                assert_eq!(attr(span, "http.response.body.size"), Some(&Value::I64(8)));
                assert_eq!(
                    attr(span, "url.full"),
                    Some(&Value::from("http://svc.test/plain"))
                );
            }
            "/demo.Echo/Say" => {
                assert_eq!(span.name, "demo.Echo/Say");
                assert_eq!(attr(span, "rpc.system.name"), Some(&Value::from("grpc")));
                assert_eq!(
                    attr(span, "rpc.response.status_code"),
                    Some(&Value::from("OK"))
                );
                assert_eq!(span.status, Status::Unset);
            }
            "/demo.Echo/Missing" => {
                assert_eq!(
                    attr(span, "rpc.response.status_code"),
                    Some(&Value::from("NOT_FOUND"))
                );
                assert_eq!(attr(span, "error.type"), Some(&Value::from("NOT_FOUND")));
            }
            "/demo.Echo/Stream" => {
                assert_eq!(
                    attr(span, "rpc.response.status_code"),
                    Some(&Value::from("UNAVAILABLE"))
                );
                let took = span
                    .end_time
                    .duration_since(span.start_time)
                    .unwrap_or_default();
                assert!(
                    took >= Duration::from_millis(90),
                    "measured to the end: {took:?}"
                );
            }
            "/reset" => {
                assert_eq!(attr(span, "error.type"), Some(&Value::from("stream_reset")));
                assert!(matches!(span.status, Status::Error { .. }));
            }
            other => panic!("unexpected path {other}"),
        }
    }
    let grpc_points = h.tt.metric_points("rpc.client.call.duration");
    assert_eq!(grpc_points.iter().filter_map(|p| p.count()).sum::<u64>(), 3);
    let http_points = h.tt.metric_points("http.client.request.duration");
    assert_eq!(http_points.iter().filter_map(|p| p.count()).sum::<u64>(), 2);
    let conns = bounded("connection record", async {
        loop {
            let c = observe::take_connections(up.addr);
            if !c.is_empty() {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(conns[0].protocol, ConnectionProtocol::Http2);
}

/// An HTTP/2 server sends its SETTINGS as soon as it accepts; a client that is slower to send
/// its preface must still be followed as HTTP/2 (not taken for a server-first protocol).
#[tokio::test]
async fn http2_is_followed_when_the_server_settings_arrive_before_the_preface() {
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let up = upstream(move |s| serve(s, seen_tx)).await;
    let h = start_proxy(up.addr).await;
    let sock = TcpStream::connect(h.addr).await.unwrap();
    // The server's SETTINGS reach the proxy well before the preface is sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (client, conn) = bounded("h2 handshake", ::h2::client::handshake(sock))
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let got = bounded("one call", call(&client, "/demo.Echo/Say", true, b"")).await;
    assert_eq!(got.unwrap(), (200, 8, Some("0".into())));
    drop(client);
    let _ = bounded("client connection end", driver).await;
    let seen = bounded("server saw it", seen_rx.recv()).await.unwrap();
    assert!(seen.traceparent.is_some(), "{seen:?}");
    let span = bounded("the span", async {
        loop {
            if let Some(s) = h.tt.spans().pop() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(span.name, "demo.Echo/Say");
}

//! TLS passthrough over loopback: a captured ClientHello, written in pieces, is forwarded
//! byte-identical and the connection is recorded as TLS with its SNI and ALPN.

use opentelemetry::Value;

use super::*;
use crate::protocol::tls::fixtures::hello;

/// Sends `hello` in `pieces` writes (a pause between them), then `payload`; the upstream
/// answers `reply` once it has everything and reads to the end. Returns the harness and what
/// the upstream received.
async fn pass_through(
    hello: &[u8],
    pieces: usize,
    payload: &[u8],
    reply: &'static [u8],
) -> (Harness, SocketAddr, Vec<u8>) {
    let want = hello.len() + payload.len();
    let mut up = upstream(move |mut s| async move {
        let mut got = Vec::new();
        read_until(&mut s, &mut got, |g| g.len() >= want).await;
        s.write_all(reply).await.unwrap();
        read_to_end(&mut s, &mut got).await.unwrap();
        got
    })
    .await;
    let h = start_proxy(up.addr).await;
    let mut c = connect(&h).await;
    for piece in hello.chunks(hello.len().div_ceil(pieces)) {
        c.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    c.write_all(payload).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, |g| g.len() >= reply.len()).await;
    assert_eq!(got, reply, "reply arrives unchanged");
    c.shutdown().await.unwrap();
    let sent = up.result().await;
    (h, up.addr, sent)
}

#[tokio::test]
async fn split_client_hello_is_forwarded_unchanged_and_recorded_as_tls() {
    let hello = hello();
    let payload = random_bytes(10_000, 7);
    let (h, dst, sent) = pass_through(&hello, 3, &payload, b"server says hi").await;
    let mut want = hello.clone();
    want.extend_from_slice(&payload);
    assert!(sent == want, "upstream got the exact bytes");
    let rec = connection(dst).await;
    assert_eq!(rec.protocol, ConnectionProtocol::Tls);
    assert_eq!(rec.bytes_sent, want.len() as u64);

    let points = h.tt.metric_points("sidecar.proxy.connection.duration");
    let p = points
        .iter()
        .find(|p| p.attr("server.port") == Some(&Value::I64(dst.port().into())))
        .expect("connection duration point");
    assert_eq!(p.attr("sidecar.protocol"), Some(&Value::from("tls")));
    assert_eq!(p.attr("tls.protocol.name"), Some(&Value::from("tls")));
    assert_eq!(
        p.attr("server.address"),
        Some(&Value::from("api.example.test"))
    );
    assert_eq!(
        p.attr("network.peer.address"),
        Some(&Value::from("127.0.0.1"))
    );
    assert_eq!(
        p.attr("sidecar.tls.client.alpn"),
        Some(&Value::from("h2,http/1.1"))
    );
    let io = h.tt.metric_points("sidecar.proxy.connection.io");
    assert!(io.iter().any(|p| {
        p.attr("server.address") == Some(&Value::from("api.example.test"))
            && p.attr("network.io.direction") == Some(&Value::from("transmit"))
            && p.sum_value() == Some(want.len() as f64)
    }));
}

#[tokio::test]
async fn truncated_client_hello_is_tls_without_facts_and_still_forwarded() {
    let hello = hello();
    // The record header announces more than is sent before the client half-closes.
    let cut = &hello[..100];
    let (h, dst, sent) = pass_through(cut, 2, b"", b"alert").await;
    assert_eq!(sent, cut);
    let rec = connection(dst).await;
    assert_eq!(rec.protocol, ConnectionProtocol::Tls);
    let points = h.tt.metric_points("sidecar.proxy.connection.duration");
    let p = points
        .iter()
        .find(|p| p.attr("server.port") == Some(&Value::I64(dst.port().into())))
        .expect("connection duration point");
    assert_eq!(p.attr("tls.protocol.name"), Some(&Value::from("tls")));
    assert_eq!(p.attr("server.address"), Some(&Value::from("127.0.0.1")));
    assert_eq!(p.attr("sidecar.tls.client.alpn"), None);
}

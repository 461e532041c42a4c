//! Unit tests of the HTTP/2 translator: hand-built frames, chunking properties, fuzz script
//! runs, and an end-to-end exchange between real `h2` peers.

mod e2e;

use super::frame::{
    CONTINUATION, DATA, FLAG_END_HEADERS, FLAG_END_STREAM, FLAG_PADDED, FLAG_PRIORITY, GOAWAY,
    HEADERS, PUSH_PROMISE, RST_STREAM, SETTINGS,
};
use super::*;
use loona_hpack::Encoder;
use proptest::prelude::*;

/// PING frame type (passes through).
const PING: u8 = 0x6;
/// WINDOW_UPDATE frame type (passes through).
const WINDOW_UPDATE: u8 = 0x8;

/// One frame's bytes.
pub(super) fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small").to_be_bytes();
    let mut v = vec![len[1], len[2], len[3], kind, flags];
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// An empty SETTINGS frame.
fn settings() -> Vec<u8> {
    frame_bytes(SETTINGS, 0, 0, &[])
}

/// The traceparent the tests inject on `stream`.
fn tp(stream: u32) -> String {
    format!("00-{:032x}-{:016x}-01", u128::from(stream) + 0xabc, stream)
}

/// HPACK-encodes fields with a dynamic-table-using encoder.
fn block(enc: &mut Encoder<'static>, fields: &[(&str, &str)]) -> Vec<u8> {
    enc.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
}

/// A request's usual pseudo-headers plus `extra`.
fn request<'a>(path: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut f = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "svc.local:8080"),
        (":path", path),
    ];
    f.extend_from_slice(extra);
    f
}

/// A frame of translated output; header blocks reassembled and decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Out {
    /// HEADERS (+ CONTINUATION): flags of the HEADERS frame, priority bytes, decoded fields.
    Block {
        stream: u32,
        flags: u8,
        priority: Option<Vec<u8>>,
        fields: Vec<(String, String)>,
        frames: usize,
    },
    /// Any other frame, whole.
    Frame {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    },
}

/// A header block being reassembled: stream, HEADERS flags, priority, fragments, frames.
type OpenBlock = (u32, u8, Option<Vec<u8>>, Vec<u8>, usize);

/// Parses translated client output (after the preface) with a persistent verifying decoder.
fn parse_out(bytes: &[u8], decoder: &mut loona_hpack::Decoder<'static>) -> Vec<Out> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut open: Option<OpenBlock> = None;
    while let Some(h) = FrameHeader::parse(&bytes[pos..]) {
        let payload = &bytes[pos + 9..pos + 9 + h.length];
        pos += 9 + h.length;
        match h.kind {
            HEADERS => {
                assert!(open.is_none());
                assert_eq!(h.flags & FLAG_PADDED, 0);
                assert!(h.length <= 16_384);
                let (prio, frag) = if h.flags & FLAG_PRIORITY != 0 {
                    (Some(payload[..5].to_vec()), &payload[5..])
                } else {
                    (None, payload)
                };
                open = Some((h.stream, h.flags, prio, frag.to_vec(), 1));
            }
            CONTINUATION => {
                let o = open.as_mut().expect("open block");
                assert_eq!(o.0, h.stream);
                assert!(h.length <= 16_384);
                o.3.extend_from_slice(payload);
                o.4 += 1;
            }
            _ => {
                assert!(open.is_none());
                out.push(Out::Frame {
                    kind: h.kind,
                    flags: h.flags,
                    stream: h.stream,
                    payload: payload.to_vec(),
                });
            }
        }
        if matches!(h.kind, HEADERS | CONTINUATION) && h.flags & FLAG_END_HEADERS != 0 {
            let (stream, flags, priority, frag, frames) = open.take().expect("open block");
            // Literal-only: no representation may touch the dynamic table.
            super::fuzz::assert_literal_only(&frag, &Limits::default());
            let fields = decoder
                .decode(&frag)
                .expect("output decodes")
                .into_iter()
                .map(|(n, v)| {
                    (
                        String::from_utf8(n).expect("utf8"),
                        String::from_utf8(v).expect("utf8"),
                    )
                })
                .collect();
            out.push(Out::Block {
                stream,
                flags,
                priority,
                fields,
                frames,
            });
        }
    }
    assert_eq!(pos, bytes.len(), "output ends mid-frame");
    assert!(open.is_none(), "output ends inside a header block");
    out
}

/// Owned field pairs, for comparisons.
fn owned(fields: &[(&str, &str)]) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// A translator with both preludes passed, an injecting callback and collected results.
struct Conn {
    t: H2Translator,
    ends: Vec<StreamEnd>,
    heads: Vec<RequestHead>,
    inject: bool,
    verifier: loona_hpack::Decoder<'static>,
    client_in: BytesMut,
    upstream_in: BytesMut,
}

impl Conn {
    /// With default limits.
    fn new() -> Self {
        Self::with(H2Translator::new(Limits::default()))
    }

    /// Around `t`, passing the client preface + SETTINGS and the upstream SETTINGS.
    fn with(t: H2Translator) -> Self {
        let mut c = Self {
            t,
            ends: Vec::new(),
            heads: Vec::new(),
            inject: true,
            verifier: loona_hpack::Decoder::new(),
            client_in: BytesMut::new(),
            upstream_in: BytesMut::new(),
        };
        let mut prelude = PREFACE.to_vec();
        prelude.extend_from_slice(&settings());
        let out = c.client_raw(&prelude).expect("prelude");
        assert_eq!(out, prelude);
        let out = c.upstream(&settings()).expect("settings");
        assert_eq!(out, settings());
        c
    }

    /// Feeds client bytes; returns the raw output.
    fn client_raw(&mut self, bytes: &[u8]) -> Result<Vec<u8>, H2Error> {
        self.client_in.extend_from_slice(bytes);
        let mut out = BytesMut::new();
        let heads = &mut self.heads;
        let inject = self.inject;
        let mut cb = |h: &RequestHead| {
            heads.push(h.clone());
            inject.then(|| tp(h.stream_id))
        };
        self.t
            .from_client(&mut self.client_in, &mut out, &mut cb, &mut self.ends)?;
        Ok(out.to_vec())
    }

    /// Feeds client bytes; returns the output parsed.
    fn client(&mut self, bytes: &[u8]) -> Result<Vec<Out>, H2Error> {
        let raw = self.client_raw(bytes)?;
        Ok(parse_out(&raw, &mut self.verifier))
    }

    /// Feeds upstream bytes; checks that the output is exactly what was consumed.
    fn upstream(&mut self, bytes: &[u8]) -> Result<Vec<u8>, H2Error> {
        self.upstream_in.extend_from_slice(bytes);
        let before = self.upstream_in.clone();
        let mut out = BytesMut::new();
        let r = self
            .t
            .from_upstream(&mut self.upstream_in, &mut out, &mut self.ends);
        let consumed = before.len() - self.upstream_in.len();
        assert_eq!(&out[..], &before[..consumed]);
        r.map(|()| out.to_vec())
    }
}

#[test]
fn preface_is_required() {
    let mut t = H2Translator::new(Limits::default());
    let mut input = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]);
    let mut out = BytesMut::new();
    let mut ends = Vec::new();
    let r = t.from_client(&mut input, &mut out, &mut |_| None, &mut ends);
    assert!(matches!(r, Err(H2Error::BadPreface)), "{r:?}");
    assert!(out.is_empty());
    assert_eq!(&input[..3], b"GET");
    let r = t.from_client(&mut input, &mut out, &mut |_| None, &mut ends);
    assert!(matches!(r, Err(H2Error::Stopped { side: Side::Client })));
    // After an upgrade the preface is required too.
    let mut t = H2Translator::after_upgrade(Limits::default());
    let mut input = BytesMut::from(&settings()[..]);
    let r = t.from_client(&mut input, &mut out, &mut |_| None, &mut ends);
    assert!(matches!(r, Err(H2Error::BadPreface)));
}

#[test]
fn preface_byte_by_byte_then_settings_first() {
    let mut t = H2Translator::new(Limits::default());
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    let mut ends = Vec::new();
    for b in PREFACE {
        input.extend_from_slice(&[*b]);
        t.from_client(&mut input, &mut out, &mut |_| None, &mut ends)
            .expect("preface");
    }
    assert_eq!(&out[..], PREFACE);
    input.extend_from_slice(&frame_bytes(PING, 0, 0, &[0; 8]));
    let r = t.from_client(&mut input, &mut out, &mut |_| None, &mut ends);
    assert!(matches!(
        r,
        Err(H2Error::ExpectedSettings {
            side: Side::Client,
            kind: PING,
            ..
        })
    ));

    let mut t = H2Translator::new(Limits::default());
    let mut input = BytesMut::from(&frame_bytes(HEADERS, 4, 1, &[0x88])[..]);
    let r = t.from_upstream(&mut input, &mut out, &mut ends);
    assert!(matches!(
        r,
        Err(H2Error::ExpectedSettings {
            side: Side::Upstream,
            ..
        })
    ));
}

#[test]
fn headers_split_over_continuation() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    let long = "v".repeat(300);
    let fields = request("/split", &[("x-a", "1"), ("x-long", &long)]);
    let b = block(&mut enc, &fields);
    let (p1, rest) = b.split_at(10);
    let (p2, p3) = rest.split_at(100);
    let headers = frame_bytes(HEADERS, FLAG_END_STREAM, 1, p1);
    let cont1 = frame_bytes(CONTINUATION, 0, 1, p2);
    let cont2 = frame_bytes(CONTINUATION, FLAG_END_HEADERS, 1, p3);
    // Nothing is emitted (or consumed) before END_HEADERS.
    assert!(c.client(&headers).expect("ok").is_empty());
    assert!(c.client(&cont1).expect("ok").is_empty());
    assert_eq!(c.client_in.len(), headers.len() + cont1.len());
    assert!(c.heads.is_empty());
    let out = c.client(&cont2).expect("ok");
    let mut want = owned(&fields);
    want.push(("traceparent".into(), tp(1)));
    assert_eq!(
        out,
        [Out::Block {
            stream: 1,
            flags: FLAG_END_STREAM | FLAG_END_HEADERS,
            priority: None,
            fields: want,
            frames: 1
        }]
    );
    assert!(c.client_in.is_empty());
    let head = &c.heads[0];
    assert_eq!(head.stream_id, 1);
    assert_eq!(head.method, "POST");
    assert_eq!(head.path, "/split");
    assert_eq!(head.authority.as_deref(), Some("svc.local:8080"));
    assert_eq!(head.scheme.as_deref(), Some("http"));
    assert!(head.end_stream);
    assert_eq!(c.t.open_streams(), 1);
}

#[test]
fn padded_priority_headers_keep_priority_and_drop_padding() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    let fields = request("/p", &[("content-type", "application/json")]);
    let b = block(&mut enc, &fields);
    let prio = [0x80, 0, 0, 0, 0x10];
    let mut payload = vec![7];
    payload.extend_from_slice(&prio);
    payload.extend_from_slice(&b);
    payload.extend_from_slice(&[0; 7]);
    let out = c
        .client(&frame_bytes(
            HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_HEADERS,
            3,
            &payload,
        ))
        .expect("ok");
    let mut want = owned(&fields);
    want.push(("traceparent".into(), tp(3)));
    assert_eq!(
        out,
        [Out::Block {
            stream: 3,
            flags: FLAG_PRIORITY | FLAG_END_HEADERS,
            priority: Some(prio.to_vec()),
            fields: want,
            frames: 1
        }]
    );
    assert_eq!(c.heads[0].content_type.as_deref(), Some("application/json"));
    assert!(!c.heads[0].end_stream);

    // Padding longer than the payload.
    let mut c = Conn::new();
    let r = c.client(&frame_bytes(
        HEADERS,
        FLAG_PADDED | FLAG_END_HEADERS,
        1,
        &[9, 0x82],
    ));
    assert!(matches!(r, Err(H2Error::Padding { pad: 9, .. })), "{r:?}");
}

#[test]
fn traceparent_replaced_appended_and_duplicates_dropped() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let fields = request(
        "/tp",
        &[
            ("x-before", "1"),
            ("traceparent", incoming),
            ("tracestate", "k=v"),
            (
                "traceparent",
                "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-00",
            ),
            ("x-after", "2"),
        ],
    );
    let out = c
        .client(&frame_bytes(
            HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &block(&mut enc, &fields),
        ))
        .expect("ok");
    let Out::Block { fields: got, .. } = &out[0] else {
        panic!("{out:?}")
    };
    let mut want = owned(&fields[..4]);
    want.push(("x-before".into(), "1".into()));
    want.push(("traceparent".into(), tp(1)));
    want.push(("tracestate".into(), "k=v".into()));
    want.push(("x-after".into(), "2".into()));
    assert_eq!(got, &want);
    assert_eq!(c.heads[0].traceparent.as_deref(), Some(incoming));
    assert_eq!(c.heads[0].tracestate.as_deref(), Some("k=v"));

    // Appended when absent (checked in other tests); unchanged when inject returns None,
    // though still re-encoded.
    c.inject = false;
    let out = c
        .client(&frame_bytes(
            HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            3,
            &block(&mut enc, &fields),
        ))
        .expect("ok");
    let Out::Block { fields: got, .. } = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(got, &owned(&fields));
    assert_eq!(c.heads.len(), 2);

    // A value that is not a valid field value is not injected.
    let mut t = H2Translator::new(Limits::default());
    let mut input = BytesMut::from(PREFACE);
    input.extend_from_slice(&settings());
    input.extend_from_slice(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS,
        1,
        &block(&mut Encoder::new(), &request("/", &[])),
    ));
    let mut out = BytesMut::new();
    t.from_client(
        &mut input,
        &mut out,
        &mut |_| Some("bad\r\nx: y".into()),
        &mut Vec::new(),
    )
    .expect("ok");
    let parsed = parse_out(&out[PREFACE.len()..], &mut loona_hpack::Decoder::new());
    let Out::Block { fields: got, .. } = &parsed[1] else {
        panic!("{parsed:?}")
    };
    assert_eq!(got, &owned(&request("/", &[])));
}

#[test]
fn size_updates_are_carried_over() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    // Lower to 0 (evicting everything), then raise to 1000: both reach the upstream.
    let mut b = vec![0x20, 0x3f, 0xc9, 0x07];
    b.extend_from_slice(&block(&mut enc, &request("/s", &[("x-k", "v")])));
    let raw = c
        .client_raw(&frame_bytes(
            HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &b,
        ))
        .expect("ok");
    assert_eq!(&raw[9..13], &[0x20, 0x3f, 0xc9, 0x07]);
    let out = parse_out(&raw, &mut c.verifier);
    let Out::Block { fields, .. } = &out[0] else {
        panic!()
    };
    assert_eq!(fields.len(), 6);

    // The dynamic table filled by the first block is used by the second, and is not there in
    // the upstream's view: every field arrives as a literal.
    let b2 = block(&mut enc, &request("/s", &[("x-k", "v")]));
    assert!(
        b2.iter().any(|b| *b >= 0x80 | 62),
        "encoder indexes: {b2:?}"
    );
    let out = c
        .client(&frame_bytes(
            HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            3,
            &b2,
        ))
        .expect("ok");
    let Out::Block { fields, .. } = &out[0] else {
        panic!()
    };
    assert_eq!(fields[4], ("x-k".into(), "v".into()));

    // A size update above the limit is an HPACK error.
    let mut c = Conn::new();
    let mut b = vec![0x3f, 0xe1, 0xff, 0x07]; // 131072 > 64 KiB
    b.push(0x82);
    let r = c.client(&frame_bytes(HEADERS, FLAG_END_HEADERS, 1, &b));
    assert!(
        matches!(
            r,
            Err(H2Error::Hpack {
                source: DecoderError::InvalidMaxDynamicSize,
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn trailers_are_reencoded_without_inject() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    c.client(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS,
        1,
        &block(&mut enc, &request("/t", &[("x-t", "a")])),
    ))
    .expect("headers");
    let data = frame_bytes(DATA, 0, 1, b"hello");
    let out = c.client_raw(&data).expect("data");
    assert_eq!(out, data);
    // Trailers reuse the dynamic table entry "x-t: a".
    let trailers = [("x-t", "a"), ("x-checksum", "123")];
    let out = c
        .client(&frame_bytes(
            HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &block(&mut enc, &trailers),
        ))
        .expect("trailers");
    assert_eq!(
        out,
        [Out::Block {
            stream: 1,
            flags: FLAG_END_STREAM | FLAG_END_HEADERS,
            priority: None,
            fields: owned(&trailers),
            frames: 1
        }]
    );
    assert_eq!(c.heads.len(), 1);
    let mut up = Encoder::new();
    c.upstream(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        1,
        &block(&mut up, &[(":status", "204")]),
    ))
    .expect("response");
    assert_eq!(c.ends.len(), 1);
    assert_eq!(c.ends[0].request_body_bytes, 5);
    assert_eq!(c.ends[0].status, Some(204));
    assert_eq!(c.ends[0].outcome, StreamOutcome::Complete);
}

#[test]
fn data_passes_byte_identical_one_byte_at_a_time() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    c.client(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS,
        1,
        &block(&mut enc, &request("/d", &[])),
    ))
    .expect("headers");
    let mut padded = vec![4];
    padded.extend_from_slice(b"0123456789");
    padded.extend_from_slice(&[0; 4]);
    let mut bytes = frame_bytes(DATA, FLAG_PADDED, 1, &padded);
    bytes.extend_from_slice(&frame_bytes(DATA, 0, 1, &[]));
    bytes.extend_from_slice(&frame_bytes(WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0]));
    bytes.extend_from_slice(&frame_bytes(DATA, FLAG_END_STREAM, 1, b"abc"));
    let mut out = Vec::new();
    for b in &bytes {
        out.extend(c.client_raw(&[*b]).expect("data"));
    }
    assert_eq!(out, bytes);
    // Same on the upstream side, with the response.
    let mut up = Encoder::new();
    let mut resp = frame_bytes(
        HEADERS,
        FLAG_END_HEADERS,
        1,
        &block(&mut up, &[(":status", "200")]),
    );
    resp.extend_from_slice(&frame_bytes(DATA, FLAG_PADDED, 1, &padded));
    resp.extend_from_slice(&frame_bytes(DATA, FLAG_END_STREAM, 1, b"xy"));
    let mut out = Vec::new();
    for b in &resp {
        out.extend(c.upstream(&[*b]).expect("response"));
    }
    assert_eq!(out, resp);
    assert_eq!(
        c.ends,
        [StreamEnd {
            stream_id: 1,
            status: Some(200),
            grpc_status: None,
            grpc_message: None,
            request_body_bytes: 13,
            response_body_bytes: 12,
            outcome: StreamOutcome::Complete,
        }]
    );
}

#[test]
fn upstream_bytes_out_equal_in() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    for id in [1, 3] {
        c.client(&frame_bytes(
            HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            id,
            &block(&mut enc, &request("/", &[])),
        ))
        .expect("request");
    }
    let mut up = Encoder::new();
    let mut resp = Vec::new();
    resp.extend_from_slice(&frame_bytes(PING, 0, 0, &[1; 8]));
    resp.extend_from_slice(&frame_bytes(0x42, 0xff, 7, b"unknown frame type"));
    let b = block(
        &mut up,
        &[
            (":status", "200"),
            ("server", "x"),
            ("x-big", &"z".repeat(200)),
        ],
    );
    resp.extend_from_slice(&frame_bytes(
        HEADERS,
        FLAG_PADDED,
        1,
        &[[3].as_slice(), &b[..50], &[0; 3]].concat(),
    ));
    resp.extend_from_slice(&frame_bytes(CONTINUATION, FLAG_END_HEADERS, 1, &b[50..]));
    resp.extend_from_slice(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS,
        3,
        &block(&mut up, &[(":status", "200"), ("server", "x")]),
    ));
    resp.extend_from_slice(&frame_bytes(DATA, 0, 3, b"body"));
    resp.extend_from_slice(&frame_bytes(DATA, FLAG_END_STREAM, 1, b"end"));
    resp.extend_from_slice(&frame_bytes(
        GOAWAY,
        0,
        0,
        &[0, 0, 0, 3, 0, 0, 0, 0, b'd', b'b', b'g'],
    ));
    for chunk in resp.chunks(7) {
        c.upstream(chunk).expect("response");
    }
    assert!(c.upstream_in.is_empty());
    assert_eq!(c.ends.len(), 1);
    assert_eq!(c.ends[0].stream_id, 1);
    assert_eq!(c.ends[0].response_body_bytes, 3);
    assert_eq!(c.t.open_streams(), 1);
}

#[test]
fn grpc_trailers_only_response() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    c.client(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS,
        1,
        &block(
            &mut enc,
            &request("/pkg.Svc/Method", &[("content-type", "application/grpc")]),
        ),
    ))
    .expect("request");
    c.client_raw(&frame_bytes(
        DATA,
        FLAG_END_STREAM,
        1,
        &[0, 0, 0, 0, 2, 8, 1],
    ))
    .expect("data");
    let mut up = Encoder::new();
    c.upstream(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        1,
        &block(
            &mut up,
            &[
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", "5"),
                ("grpc-message", "not%20found"),
            ],
        ),
    ))
    .expect("response");
    assert_eq!(
        c.ends,
        [StreamEnd {
            stream_id: 1,
            status: Some(200),
            grpc_status: Some(5),
            grpc_message: Some("not%20found".into()),
            request_body_bytes: 7,
            response_body_bytes: 0,
            outcome: StreamOutcome::Complete,
        }]
    );
}

#[test]
fn grpc_status_in_trailers_after_data() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    c.client(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        1,
        &block(&mut enc, &request("/a.B/C", &[])),
    ))
    .expect("request");
    let mut up = Encoder::new();
    c.upstream(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS,
        1,
        &block(
            &mut up,
            &[(":status", "200"), ("content-type", "application/grpc")],
        ),
    ))
    .expect("headers");
    c.upstream(&frame_bytes(DATA, 0, 1, &[0, 0, 0, 0, 1, 7]))
        .expect("data");
    assert!(c.ends.is_empty());
    c.upstream(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        1,
        &block(&mut up, &[("grpc-status", "0")]),
    ))
    .expect("trailers");
    assert_eq!(c.ends.len(), 1);
    assert_eq!(c.ends[0].status, Some(200));
    assert_eq!(c.ends[0].grpc_status, Some(0));
    assert_eq!(c.ends[0].grpc_message, None);
    assert_eq!(c.ends[0].response_body_bytes, 6);
}

#[test]
fn rst_stream_both_ways() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    for id in [1, 3] {
        c.client(&frame_bytes(
            HEADERS,
            FLAG_END_HEADERS,
            id,
            &block(&mut enc, &request("/", &[])),
        ))
        .expect("request");
    }
    c.client_raw(&frame_bytes(DATA, 0, 1, b"abc"))
        .expect("data");
    let rst = frame_bytes(RST_STREAM, 0, 1, &8u32.to_be_bytes());
    assert_eq!(c.client_raw(&rst).expect("rst"), rst);
    c.upstream(&frame_bytes(RST_STREAM, 0, 3, &2u32.to_be_bytes()))
        .expect("rst");
    assert_eq!(c.ends.len(), 2);
    assert_eq!(c.ends[0].stream_id, 1);
    assert_eq!(c.ends[0].request_body_bytes, 3);
    assert_eq!(
        c.ends[0].outcome,
        StreamOutcome::Reset {
            by: Side::Client,
            code: 8
        }
    );
    assert_eq!(
        c.ends[1].outcome,
        StreamOutcome::Reset {
            by: Side::Upstream,
            code: 2
        }
    );
    assert_eq!(c.t.open_streams(), 0);
    // RST_STREAM must be 4 bytes long.
    let r = c.client(&frame_bytes(RST_STREAM, 0, 5, &[0; 5]));
    assert!(
        matches!(r, Err(H2Error::FrameSize { length: 5, .. })),
        "{r:?}"
    );
}

#[test]
fn goaway_refuses_later_streams() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    for id in [1, 3, 5, 7] {
        c.client(&frame_bytes(
            HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            id,
            &block(&mut enc, &request("/", &[])),
        ))
        .expect("request");
    }
    // A client GOAWAY changes nothing.
    c.client_raw(&frame_bytes(GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0]))
        .expect("goaway");
    assert_eq!(c.t.open_streams(), 4);
    c.upstream(&frame_bytes(GOAWAY, 0, 0, &[0, 0, 0, 3, 0, 0, 0, 0]))
        .expect("goaway");
    let refused: Vec<(u32, StreamOutcome)> =
        c.ends.iter().map(|e| (e.stream_id, e.outcome)).collect();
    assert_eq!(
        refused,
        [(5, StreamOutcome::Refused), (7, StreamOutcome::Refused)]
    );
    // A stream opened after the GOAWAY is refused at once.
    c.client(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        9,
        &block(&mut enc, &request("/", &[])),
    ))
    .expect("request");
    assert_eq!(
        c.ends.last().map(|e| (e.stream_id, e.outcome)),
        Some((9, StreamOutcome::Refused))
    );
    let mut ends = Vec::new();
    c.t.close(&mut ends);
    let closed: Vec<(u32, StreamOutcome)> = ends.iter().map(|e| (e.stream_id, e.outcome)).collect();
    assert_eq!(
        closed,
        [
            (1, StreamOutcome::ConnectionClosed),
            (3, StreamOutcome::ConnectionClosed)
        ]
    );
}

#[test]
fn informational_then_final_status() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    c.client(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        1,
        &block(&mut enc, &request("/", &[("expect", "100-continue")])),
    ))
    .expect("request");
    let mut up = Encoder::new();
    c.upstream(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS,
        1,
        &block(&mut up, &[(":status", "100")]),
    ))
    .expect("100");
    c.upstream(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS,
        1,
        &block(&mut up, &[(":status", "103"), ("link", "</a>")]),
    ))
    .expect("103");
    c.upstream(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        1,
        &block(&mut up, &[(":status", "404")]),
    ))
    .expect("404");
    assert_eq!(c.ends.len(), 1);
    assert_eq!(c.ends[0].status, Some(404));
}

#[test]
fn interleaving_inside_a_header_block_is_an_error() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    let b = block(&mut enc, &request("/", &[]));
    let headers = frame_bytes(HEADERS, 0, 1, &b[..3]);
    let mut bytes = headers.clone();
    bytes.extend_from_slice(&frame_bytes(DATA, 0, 1, b"x"));
    let r = c.client(&bytes);
    assert!(
        matches!(
            r,
            Err(H2Error::Interleaved {
                kind: DATA,
                open: 1,
                ..
            })
        ),
        "{r:?}"
    );
    // The whole block is still there for the driver to forward raw.
    assert_eq!(&c.client_in[..], &bytes[..]);

    let mut c = Conn::new();
    let mut bytes = headers.clone();
    bytes.extend_from_slice(&frame_bytes(CONTINUATION, FLAG_END_HEADERS, 3, &b[3..]));
    let r = c.client(&bytes);
    assert!(
        matches!(r, Err(H2Error::Interleaved { stream: 3, .. })),
        "{r:?}"
    );

    let mut c = Conn::new();
    let r = c.upstream(&frame_bytes(CONTINUATION, FLAG_END_HEADERS, 1, &[0x88]));
    assert!(
        matches!(
            r,
            Err(H2Error::UnexpectedContinuation {
                side: Side::Upstream,
                ..
            })
        ),
        "{r:?}"
    );
    let mut c = Conn::new();
    let r = c.client(&frame_bytes(
        PUSH_PROMISE,
        FLAG_END_HEADERS,
        1,
        &[0, 0, 0, 2, 0x82],
    ));
    assert!(matches!(r, Err(H2Error::Protocol { .. })), "{r:?}");
}

#[test]
fn oversized_header_block_is_an_error() {
    let limits = Limits {
        max_header_block: 1000,
        ..Limits::default()
    };
    let mut c = Conn::with(H2Translator::new(limits));
    let mut enc = Encoder::new();
    let b = block(&mut enc, &request("/", &[("x-big", &"b".repeat(700))]));
    let mut bytes = frame_bytes(HEADERS, 0, 1, &b);
    bytes.extend_from_slice(&frame_bytes(CONTINUATION, 0, 1, &b));
    // Rejected as soon as the second frame's header shows the block cannot fit.
    let r = c.client(&bytes[..b.len() + 18]);
    assert!(
        matches!(r, Err(H2Error::HeaderBlockTooLarge { limit: 1000, .. })),
        "{r:?}"
    );

    // Endless empty CONTINUATION frames are bounded too.
    let mut c = Conn::with(H2Translator::new(limits));
    let mut bytes = frame_bytes(HEADERS, 0, 1, &[0x82]);
    for _ in 0..400 {
        bytes.extend_from_slice(&frame_bytes(CONTINUATION, 0, 1, &[]));
    }
    let r = c.client(&bytes);
    assert!(
        matches!(r, Err(H2Error::HeaderBlockTooLarge { .. })),
        "{r:?}"
    );

    // An HPACK bomb: a tiny block referencing a large table entry many times.
    let mut c = Conn::with(H2Translator::new(limits));
    let mut enc = Encoder::new();
    let mut b = block(&mut enc, &request("/", &[("x-big", &"b".repeat(900))]));
    c.client(&frame_bytes(HEADERS, FLAG_END_HEADERS, 1, &b))
        .expect("first block fits");
    b = block(&mut enc, &request("/", &[]));
    b.extend(std::iter::repeat_n(0x80 | 62, 10));
    let r = c.client(&frame_bytes(HEADERS, FLAG_END_HEADERS, 3, &b));
    assert!(
        matches!(r, Err(H2Error::HeaderListTooLarge { limit: 4000, .. })),
        "{r:?}"
    );
}

#[test]
fn max_streams_is_respected() {
    let limits = Limits {
        max_streams: 2,
        ..Limits::default()
    };
    let mut c = Conn::with(H2Translator::new(limits));
    let mut enc = Encoder::new();
    for id in [1, 3, 5] {
        let out = c
            .client(&frame_bytes(
                HEADERS,
                FLAG_END_HEADERS | FLAG_END_STREAM,
                id,
                &block(&mut enc, &request("/", &[])),
            ))
            .expect("request");
        let Out::Block { fields, .. } = &out[0] else {
            panic!()
        };
        // The untracked stream is still re-encoded, but gets no traceparent.
        assert_eq!(fields.iter().any(|(n, _)| n == "traceparent"), id != 5);
    }
    assert_eq!(c.t.open_streams(), 2);
    assert_eq!(
        c.heads.iter().map(|h| h.stream_id).collect::<Vec<_>>(),
        [1, 3]
    );
    let mut up = Encoder::new();
    for id in [1, 5] {
        c.upstream(&frame_bytes(
            HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            id,
            &block(&mut up, &[(":status", "200")]),
        ))
        .expect("response");
    }
    assert_eq!(c.ends.iter().map(|e| e.stream_id).collect::<Vec<_>>(), [1]);
    // A slot is free again.
    c.client(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS,
        7,
        &block(&mut enc, &request("/", &[])),
    ))
    .expect("request");
    assert_eq!(c.heads.last().map(|h| h.stream_id), Some(7));
}

#[test]
fn after_upgrade_reports_stream_one() {
    let mut c = Conn::with(H2Translator::after_upgrade(Limits::default()));
    assert_eq!(c.t.open_streams(), 1);
    let mut enc = Encoder::new();
    // Stream 1 is not new; the next client stream is 3.
    c.client(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        3,
        &block(&mut enc, &request("/", &[])),
    ))
    .expect("request");
    assert_eq!(c.heads.iter().map(|h| h.stream_id).collect::<Vec<_>>(), [3]);
    let mut up = Encoder::new();
    c.upstream(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS,
        1,
        &block(&mut up, &[(":status", "200")]),
    ))
    .expect("response");
    c.upstream(&frame_bytes(DATA, FLAG_END_STREAM, 1, b"upgraded"))
        .expect("data");
    assert_eq!(c.ends.len(), 1);
    assert_eq!(c.ends[0].stream_id, 1);
    assert_eq!(c.ends[0].status, Some(200));
    assert_eq!(c.ends[0].request_body_bytes, 0);
    assert_eq!(c.ends[0].response_body_bytes, 8);
}

#[test]
fn push_promise_blocks_keep_the_upstream_decoder_in_sync() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    c.client(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        1,
        &block(&mut enc, &request("/", &[])),
    ))
    .expect("request");
    let mut up = Encoder::new();
    let mut pp = 2u32.to_be_bytes().to_vec();
    pp.extend_from_slice(&block(
        &mut up,
        &[(":method", "GET"), (":path", "/pushed"), ("x-p", "1")],
    ));
    c.upstream(&frame_bytes(PUSH_PROMISE, FLAG_END_HEADERS, 1, &pp))
        .expect("push");
    // The response reuses entries the PUSH_PROMISE added.
    c.upstream(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        1,
        &block(
            &mut up,
            &[(":status", "200"), ("x-p", "1"), ("grpc-status", "3")],
        ),
    ))
    .expect("response");
    c.upstream(&frame_bytes(
        HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        2,
        &block(&mut up, &[(":status", "200")]),
    ))
    .expect("pushed response");
    assert_eq!(c.ends.len(), 1);
    assert_eq!(c.ends[0].grpc_status, Some(3));
}

#[test]
fn large_blocks_are_emitted_as_continuations() {
    let mut c = Conn::new();
    let mut enc = Encoder::new();
    let big = "q".repeat(40_000);
    let fields = request("/big", &[("x-big", &big)]);
    let b = block(&mut enc, &fields);
    let mut bytes = Vec::new();
    let mut chunks = b.chunks(10_000).peekable();
    let mut first = true;
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            FLAG_END_HEADERS
        } else {
            0
        };
        let kind = if first { HEADERS } else { CONTINUATION };
        bytes.extend_from_slice(&frame_bytes(
            kind,
            flags | if first { FLAG_PRIORITY } else { 0 },
            1,
            &[if first { &[0u8, 0, 0, 0, 200][..] } else { &[] }, chunk].concat(),
        ));
        first = false;
    }
    let out = c.client(&bytes).expect("ok");
    let Out::Block {
        fields: got,
        frames,
        priority,
        ..
    } = &out[0]
    else {
        panic!()
    };
    assert_eq!(*frames, 3);
    assert_eq!(priority.as_deref(), Some(&[0u8, 0, 0, 0, 200][..]));
    assert_eq!(got[4].1, big);
}

/// One step of a valid exchange: client bytes, then upstream bytes that may only start once
/// the first `gate` client bytes of the step have been consumed.
struct Phase {
    client: Vec<u8>,
    gate: usize,
    upstream: Vec<u8>,
}

/// A valid exchange of four requests with bodies and trailers both ways.
fn exchange() -> Vec<Phase> {
    let mut enc = Encoder::new();
    let mut up = Encoder::new();
    let mut client = PREFACE.to_vec();
    client.extend_from_slice(&settings());
    let mut upstream = settings();
    upstream.extend_from_slice(&frame_bytes(SETTINGS, 1, 0, &[]));
    let mut phases = vec![Phase {
        client,
        gate: 0,
        upstream,
    }];
    for id in [1u32, 3, 5, 7] {
        let mut client = Vec::new();
        let mut upstream = Vec::new();
        let b = block(
            &mut enc,
            &request(
                "/x",
                &[("x-id", &id.to_string()), ("traceparent", "00-1-2-01")],
            ),
        );
        let (a, rest) = b.split_at(b.len() / 2);
        client.extend_from_slice(&frame_bytes(
            HEADERS,
            FLAG_PADDED,
            id,
            &[[2].as_slice(), a, &[0, 0]].concat(),
        ));
        client.extend_from_slice(&frame_bytes(CONTINUATION, FLAG_END_HEADERS, id, rest));
        client.extend_from_slice(&frame_bytes(DATA, FLAG_PADDED, id, &[1, 9, 9, 9, 0]));
        client.extend_from_slice(&frame_bytes(
            HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            id,
            &block(&mut enc, &[("x-trailer", "t")]),
        ));
        // The upstream answers once the whole request (counted in request_body_bytes) is in.
        let gate = client.len();
        upstream.extend_from_slice(&frame_bytes(
            HEADERS,
            FLAG_END_HEADERS,
            id,
            &block(
                &mut up,
                &[(":status", "200"), ("content-type", "application/grpc")],
            ),
        ));
        upstream.extend_from_slice(&frame_bytes(DATA, 0, id, &vec![7; id as usize * 10]));
        if id == 5 {
            upstream.extend_from_slice(&frame_bytes(RST_STREAM, 0, id, &[0, 0, 0, 8]));
        } else {
            upstream.extend_from_slice(&frame_bytes(
                HEADERS,
                FLAG_END_HEADERS | FLAG_END_STREAM,
                id,
                &block(
                    &mut up,
                    &[("grpc-status", &id.to_string()), ("grpc-message", "m")],
                ),
            ));
        }
        phases.push(Phase {
            client,
            gate,
            upstream,
        });
    }
    phases.push(Phase {
        client: frame_bytes(PING, 0, 0, &[5; 8]),
        gate: 0,
        upstream: frame_bytes(PING, 1, 0, &[5; 8]),
    });
    phases
}

/// Results of a run: client output, upstream output, stream ends, injected stream ids.
type RunResult = (Vec<u8>, Vec<u8>, Vec<StreamEnd>, Vec<u32>);

/// Runs the exchange fed in the given chunk sizes (cycled), alternating directions, the
/// upstream never ahead of the requests it answers.
fn run_chunked(sizes: &[usize]) -> RunResult {
    let phases = exchange();
    let client: Vec<u8> = phases.iter().flat_map(|p| p.client.clone()).collect();
    let upstream: Vec<u8> = phases.iter().flat_map(|p| p.upstream.clone()).collect();
    // (client bytes needed, upstream bytes then allowed)
    let mut gates = Vec::new();
    let (mut c, mut u) = (0, 0);
    for p in &phases {
        u += p.upstream.len();
        gates.push((c + p.gate, u));
        c += p.client.len();
    }
    let mut t = H2Translator::new(Limits::default());
    let (mut cin, mut uin) = (BytesMut::new(), BytesMut::new());
    let (mut cout, mut uout) = (BytesMut::new(), BytesMut::new());
    let mut ends = Vec::new();
    let mut heads = Vec::new();
    let (mut cpos, mut upos) = (0, 0);
    let mut i = 0;
    while cpos < client.len() || upos < upstream.len() {
        let n = sizes[i % sizes.len()].max(1);
        i += 1;
        let end = (cpos + n).min(client.len());
        cin.extend_from_slice(&client[cpos..end]);
        cpos = end;
        t.from_client(
            &mut cin,
            &mut cout,
            &mut |h| {
                heads.push(h.stream_id);
                Some(tp(h.stream_id))
            },
            &mut ends,
        )
        .expect("client");
        // Requests are only complete once consumed, so gate on what the translator consumed.
        let consumed = cpos - cin.len();
        let allowed = gates
            .iter()
            .filter(|(need, _)| consumed >= *need)
            .map(|(_, allowed)| *allowed)
            .max()
            .unwrap_or(0);
        let end = (upos + n).min(allowed);
        if end > upos {
            uin.extend_from_slice(&upstream[upos..end]);
            upos = end;
            t.from_upstream(&mut uin, &mut uout, &mut ends)
                .expect("upstream");
        }
    }
    assert!(cin.is_empty() && uin.is_empty());
    assert_eq!(&uout[..], &upstream[..]);
    (cout.to_vec(), uout.to_vec(), ends, heads)
}

#[test]
fn whole_exchange_results() {
    let (cout, _, ends, heads) = run_chunked(&[usize::MAX / 4]);
    assert_eq!(heads, [1, 3, 5, 7]);
    let summary: Vec<_> = ends
        .iter()
        .map(|e| {
            (
                e.stream_id,
                e.status,
                e.grpc_status,
                e.request_body_bytes,
                e.response_body_bytes,
                e.outcome,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, Some(200), Some(1), 3, 10, StreamOutcome::Complete),
            (3, Some(200), Some(3), 3, 30, StreamOutcome::Complete),
            (
                5,
                Some(200),
                None,
                3,
                50,
                StreamOutcome::Reset {
                    by: Side::Upstream,
                    code: 8
                }
            ),
            (7, Some(200), Some(7), 3, 70, StreamOutcome::Complete),
        ]
    );
    let parsed = parse_out(&cout[PREFACE.len()..], &mut loona_hpack::Decoder::new());
    let blocks: Vec<_> = parsed
        .iter()
        .filter_map(|o| match o {
            Out::Block { stream, fields, .. } => Some((*stream, fields.clone())),
            Out::Frame { .. } => None,
        })
        .collect();
    assert_eq!(blocks.len(), 8);
    for (stream, fields) in blocks.iter().step_by(2) {
        assert!(fields.contains(&("traceparent".into(), tp(*stream))));
        assert!(!fields.contains(&("traceparent".into(), "00-1-2-01".into())));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn chunking_does_not_change_results(sizes in proptest::collection::vec(1usize..40, 1..20)) {
        let whole = run_chunked(&[usize::MAX / 4]);
        let chunked = run_chunked(&sizes);
        prop_assert_eq!(whole, chunked);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2500))]

    #[test]
    fn fuzz_one_survives_random_scripts(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        fuzz_one(&data);
    }

    #[test]
    fn fuzz_one_survives_frame_shaped_scripts(
        mode in 0u8..16,
        frames in proptest::collection::vec(
            (0usize..2, 0u8..11, any::<u8>(), 0u32..8, proptest::collection::vec(any::<u8>(), 0..24), 0usize..3),
            0..40,
        ),
        splits in proptest::collection::vec(1u8..127, 1..8),
    ) {
        // Frames with valid headers, payloads either random or a real HPACK block.
        let mut enc = [Encoder::new(), Encoder::new()];
        let mut streams = [PREFACE.to_vec(), Vec::new()];
        streams[0].extend_from_slice(&settings());
        streams[1].extend_from_slice(&settings());
        for (dir, kind, flags, stream, payload, shape) in frames {
            let payload = match (kind, shape) {
                (HEADERS | CONTINUATION, 0 | 1) => block(
                    &mut enc[dir],
                    &[(":status", "200"), (":path", "/"), ("grpc-status", "4"), ("x", &payload.len().to_string())],
                ),
                (RST_STREAM, _) => payload.iter().copied().chain([0; 4]).take(4).collect(),
                (GOAWAY, _) => payload.iter().copied().chain([0; 8]).collect(),
                _ => payload,
            };
            let flags = if shape == 0 { flags | FLAG_END_HEADERS } else { flags };
            streams[dir].extend_from_slice(&frame_bytes(kind, flags, stream, &payload));
        }
        let mut script = vec![mode & !0b1100];
        let mut pos = [0usize, 0];
        let mut i = 0;
        while pos[0] < streams[0].len() || pos[1] < streams[1].len() {
            let dir = i % 2;
            let n = usize::from(splits[i % splits.len()]).min(streams[dir].len() - pos[dir]);
            script.push(((n as u8) << 1) | dir as u8);
            script.extend_from_slice(&streams[dir][pos[dir]..pos[dir] + n]);
            pos[dir] += n;
            i += 1;
        }
        fuzz_one(&script);
    }
}

//! Fuzz entry for the HTTP/2 translator: runs a byte script against one translator and asserts
//! the invariants a caller relies on. Shared by `cargo fuzz` targets and the unit tests.

use std::collections::HashSet;

use bytes::BytesMut;

use super::frame::{self, FrameHeader, HEADER_LEN};
use super::{hpack, H2Error, H2Translator, Limits, RequestHead, StreamEnd, PREFACE};

/// An empty SETTINGS frame.
const SETTINGS: [u8; HEADER_LEN] = [0, 0, 0, frame::SETTINGS, 0, 0, 0, 0, 0];

/// Interprets `data` as a script and checks invariants, panicking only on a translator bug.
///
/// Byte 0 picks the set-up: bit 0 `after_upgrade` instead of `new`; bit 1 tiny limits (64-byte
/// header blocks, 256-byte tables, 3 streams); bit 2 start the client bytes with PREFACE and
/// an empty SETTINGS; bit 3 start the upstream bytes with an empty SETTINGS. Then each control
/// byte `c` is followed by up to `c >> 1` bytes appended to the client's input (`c & 1 == 0`)
/// or the upstream's (`c & 1 == 1`), and that direction is run. A direction that failed is not
/// fed again.
///
/// Checked: no panic; upstream output is exactly the bytes consumed; a failed direction keeps
/// failing with `Stopped` and leaves its input alone; `inject` runs once per new odd stream id,
/// in increasing order; no stream ends twice; tracked streams stay within `max_streams` and are
/// all ended by `close`; the client output is a well-formed frame sequence whose header blocks
/// are literal-only HPACK (never touching the receiver's dynamic table) that a fresh decoder
/// accepts.
pub fn fuzz_one(data: &[u8]) {
    let Some((&mode, mut script)) = data.split_first() else {
        return;
    };
    let limits = if mode & 2 != 0 {
        Limits {
            max_header_block: 64,
            max_table_size: 256,
            max_streams: 3,
        }
    } else {
        Limits::default()
    };
    let mut t = if mode & 1 == 0 {
        H2Translator::new(limits)
    } else {
        H2Translator::after_upgrade(limits)
    };
    let mut client_in = BytesMut::new();
    let mut upstream_in = BytesMut::new();
    if mode & 4 != 0 {
        client_in.extend_from_slice(PREFACE);
        client_in.extend_from_slice(&SETTINGS);
    }
    if mode & 8 != 0 {
        upstream_in.extend_from_slice(&SETTINGS);
    }
    let mut client_out = BytesMut::new();
    let mut upstream_out = BytesMut::new();
    let mut client_ok = true;
    let mut upstream_ok = true;
    let mut injected: Vec<u32> = Vec::new();
    let mut ends: Vec<StreamEnd> = Vec::new();

    while let Some((&ctl, rest)) = script.split_first() {
        let (chunk, rest) = rest.split_at(usize::from(ctl >> 1).min(rest.len()));
        script = rest;
        if ctl & 1 == 0 {
            if !client_ok {
                continue;
            }
            client_in.extend_from_slice(chunk);
            let mut inject = |head: &RequestHead| {
                assert!(head.stream_id % 2 == 1, "inject on even stream");
                assert!(
                    injected.last().is_none_or(|last| head.stream_id > *last),
                    "inject out of order"
                );
                injected.push(head.stream_id);
                Some(format!("00-{:032x}-{:016x}-01", head.stream_id, 1))
            };
            if t.from_client(&mut client_in, &mut client_out, &mut inject, &mut ends)
                .is_err()
            {
                client_ok = false;
                let before = client_in.clone();
                let again = t.from_client(&mut client_in, &mut client_out, &mut inject, &mut ends);
                assert!(matches!(again, Err(H2Error::Stopped { .. })));
                assert_eq!(client_in, before, "a stopped direction consumed input");
            }
        } else {
            if !upstream_ok {
                continue;
            }
            upstream_in.extend_from_slice(chunk);
            let before = upstream_in.clone();
            let out_start = upstream_out.len();
            let result = t.from_upstream(&mut upstream_in, &mut upstream_out, &mut ends);
            let consumed = before.len() - upstream_in.len();
            assert_eq!(
                upstream_out.get(out_start..),
                before.get(..consumed),
                "upstream output differs from the bytes consumed"
            );
            if result.is_err() {
                upstream_ok = false;
                let again = t.from_upstream(&mut upstream_in, &mut upstream_out, &mut ends);
                assert!(matches!(again, Err(H2Error::Stopped { .. })));
                assert_eq!(upstream_out.len(), out_start + consumed);
            }
        }
        assert!(t.open_streams() <= limits.max_streams);
    }

    t.close(&mut ends);
    assert_eq!(t.open_streams(), 0, "close left streams open");
    let mut seen = HashSet::new();
    for end in &ends {
        assert!(
            seen.insert(end.stream_id),
            "stream {} ended twice",
            end.stream_id
        );
    }
    check_client_output(&client_out, &limits);
}

/// Asserts that the translated client bytes are PREFACE (or a prefix of it) followed by
/// well-formed frames whose header blocks are literal-only and decodable.
fn check_client_output(out: &[u8], limits: &Limits) {
    let n = PREFACE.len().min(out.len());
    assert_eq!(
        out.get(..n),
        PREFACE.get(..n),
        "output does not start with PREFACE"
    );
    let mut pos = PREFACE.len();
    let mut decoder = loona_hpack::Decoder::new();
    decoder.set_max_allowed_table_size(limits.max_table_size);
    let mut block: Option<(u32, Vec<u8>)> = None;
    while let Some(h) = out.get(pos..).and_then(FrameHeader::parse) {
        let Some(payload) = out.get(pos + HEADER_LEN..pos + HEADER_LEN + h.length) else {
            // A frame still passing through when the script ended.
            assert!(
                h.kind != frame::HEADERS && h.kind != frame::CONTINUATION,
                "header block frames are emitted whole"
            );
            return;
        };
        pos += HEADER_LEN + h.length;
        match (h.kind, &mut block) {
            (frame::HEADERS, None) => {
                assert!(h.length <= frame::MAX_EMIT_PAYLOAD);
                assert!(!h.has(frame::FLAG_PADDED), "padding is dropped");
                let skip = if h.has(frame::FLAG_PRIORITY) {
                    frame::PRIORITY_LEN
                } else {
                    0
                };
                block = Some((h.stream, payload.get(skip..).unwrap_or_default().to_vec()));
            }
            (frame::CONTINUATION, Some((stream, fragments))) => {
                assert_eq!(h.stream, *stream, "CONTINUATION of another stream");
                assert!(h.length <= frame::MAX_EMIT_PAYLOAD);
                fragments.extend_from_slice(payload);
            }
            (kind, open) => {
                assert!(open.is_none(), "frame type {kind} inside a header block");
                assert!(kind != frame::CONTINUATION, "CONTINUATION without HEADERS");
            }
        }
        if matches!(h.kind, frame::HEADERS | frame::CONTINUATION) && h.has(frame::FLAG_END_HEADERS)
        {
            if let Some((_, fragments)) = block.take() {
                // A block of size updates alone is left to the receiver (loona refuses it).
                if assert_literal_only(&fragments, limits) {
                    assert!(
                        decoder.decode(&fragments).is_ok(),
                        "emitted block does not decode"
                    );
                }
            }
        }
    }
}

/// Asserts that `block` holds only size updates (at its start) and literal representations
/// without indexing or never indexed, naming only static table entries, with raw strings.
/// Returns whether it holds any field.
pub(super) fn assert_literal_only(block: &[u8], limits: &Limits) -> bool {
    let mut pos = 0;
    let mut fields_started = false;
    let string = |pos: &mut usize| {
        let rest = block.get(*pos..).unwrap_or_default();
        assert!(
            rest.first().is_some_and(|b| b & 0x80 == 0),
            "Huffman string emitted"
        );
        let (len, used) = hpack::decode_integer(rest, 7).expect("string length");
        assert!(rest.len() >= used + len, "string runs past the block");
        *pos += used + len;
    };
    while let Some(&first) = block.get(pos) {
        let rest = block.get(pos..).unwrap_or_default();
        match first >> 4 {
            0b0000 | 0b0001 => {
                fields_started = true;
                let (index, used) = hpack::decode_integer(rest, 4).expect("name index");
                assert!(index <= 61, "dynamic table name reference emitted");
                pos += used;
                if index == 0 {
                    string(&mut pos);
                }
                string(&mut pos);
            }
            0b0010 | 0b0011 => {
                assert!(!fields_started, "size update after a field");
                let (size, used) = hpack::decode_integer(rest, 5).expect("size update");
                assert!(size <= limits.max_table_size);
                pos += used;
            }
            _ => panic!("indexed or incrementally indexed representation emitted: {first:#x}"),
        }
    }
    fields_started
}

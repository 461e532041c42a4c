//! HTTP/2 frame layout (RFC 9113 §4.1, §6): the 9-byte frame header, the frame types and flags
//! the translator looks at, and where a header block fragment sits inside a frame's payload.

use std::ops::Range;

use bytes::{BufMut, BytesMut};

/// Length of a frame header.
pub(super) const HEADER_LEN: usize = 9;
/// Largest payload the translator itself emits per frame (the minimum every peer accepts).
pub(super) const MAX_EMIT_PAYLOAD: usize = 16_384;

/// DATA frame type.
pub(super) const DATA: u8 = 0x0;
/// HEADERS frame type.
pub(super) const HEADERS: u8 = 0x1;
/// RST_STREAM frame type.
pub(super) const RST_STREAM: u8 = 0x3;
/// SETTINGS frame type.
pub(super) const SETTINGS: u8 = 0x4;
/// PUSH_PROMISE frame type.
pub(super) const PUSH_PROMISE: u8 = 0x5;
/// GOAWAY frame type.
pub(super) const GOAWAY: u8 = 0x7;
/// CONTINUATION frame type.
pub(super) const CONTINUATION: u8 = 0x9;

/// END_STREAM flag (DATA, HEADERS).
pub(super) const FLAG_END_STREAM: u8 = 0x1;
/// END_HEADERS flag (HEADERS, PUSH_PROMISE, CONTINUATION).
pub(super) const FLAG_END_HEADERS: u8 = 0x4;
/// PADDED flag (DATA, HEADERS, PUSH_PROMISE).
pub(super) const FLAG_PADDED: u8 = 0x8;
/// PRIORITY flag (HEADERS).
pub(super) const FLAG_PRIORITY: u8 = 0x20;

/// Length of the priority fields of a HEADERS frame (E + stream dependency, weight).
pub(super) const PRIORITY_LEN: usize = 5;
/// Length of the promised stream id of a PUSH_PROMISE frame.
const PROMISED_ID_LEN: usize = 4;

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FrameHeader {
    /// Payload length (24 bits).
    pub length: usize,
    /// Frame type.
    pub kind: u8,
    /// Flags.
    pub flags: u8,
    /// Stream id, reserved bit cleared.
    pub stream: u32,
}

impl FrameHeader {
    /// Parses the header at the start of `buf`; `None` until 9 bytes are there.
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let b: [u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Self {
            length: u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize,
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        })
    }

    /// Whether `flag` is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Appends the header's 9 bytes to `out` (`length` must fit in 24 bits).
    pub fn write(&self, out: &mut BytesMut) {
        let len = (self.length as u32).to_be_bytes();
        out.put_slice(&len[1..]);
        out.put_u8(self.kind);
        out.put_u8(self.flags);
        out.put_u32(self.stream & 0x7fff_ffff);
    }
}

/// Where the header block fragment sits in a HEADERS, PUSH_PROMISE or CONTINUATION payload,
/// with the fields that precede it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Fragment {
    /// The fragment's range within the payload.
    pub range: Range<usize>,
    /// HEADERS with the PRIORITY flag: the 5 priority bytes.
    pub priority: Option<[u8; PRIORITY_LEN]>,
}

/// Why a payload's layout is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LayoutError {
    /// Pad length, priority or promised id do not fit in the payload.
    Padding {
        /// Pad length announced (0 when the payload is too short to hold it).
        pad: usize,
    },
}

/// Locates the header block fragment in `payload` (exactly `header.length` bytes) of a HEADERS,
/// PUSH_PROMISE or CONTINUATION frame.
pub(super) fn fragment(header: &FrameHeader, payload: &[u8]) -> Result<Fragment, LayoutError> {
    let mut start = 0;
    let mut pad = 0;
    let mut priority = None;
    if header.kind != CONTINUATION && header.has(FLAG_PADDED) {
        pad = usize::from(*payload.first().ok_or(LayoutError::Padding { pad: 0 })?);
        start = 1;
    }
    if header.kind == HEADERS && header.has(FLAG_PRIORITY) {
        let bytes = payload
            .get(start..start + PRIORITY_LEN)
            .and_then(|b| <[u8; PRIORITY_LEN]>::try_from(b).ok())
            .ok_or(LayoutError::Padding { pad })?;
        priority = Some(bytes);
        start += PRIORITY_LEN;
    }
    if header.kind == PUSH_PROMISE {
        start += PROMISED_ID_LEN;
    }
    let end = payload
        .len()
        .checked_sub(pad)
        .filter(|end| *end >= start)
        .ok_or(LayoutError::Padding { pad })?;
    Ok(Fragment {
        range: start..end,
        priority,
    })
}

/// Appends a header block as HEADERS (+ CONTINUATION) frames of at most [`MAX_EMIT_PAYLOAD`]
/// payload bytes, with END_STREAM and the priority fields on the HEADERS frame, END_HEADERS on
/// the last frame and no padding.
pub(super) fn write_block(
    out: &mut BytesMut,
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    block: &[u8],
) {
    let prio_len = if priority.is_some() { PRIORITY_LEN } else { 0 };
    let first_len = block.len().min(MAX_EMIT_PAYLOAD - prio_len);
    let (first, rest) = block.split_at(first_len);
    let mut flags = 0;
    if end_stream {
        flags |= FLAG_END_STREAM;
    }
    if priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    out.reserve(block.len() + prio_len + HEADER_LEN * (1 + rest.len() / MAX_EMIT_PAYLOAD + 1));
    FrameHeader {
        length: prio_len + first.len(),
        kind: HEADERS,
        flags,
        stream,
    }
    .write(out);
    if let Some(p) = priority {
        out.put_slice(&p);
    }
    out.put_slice(first);
    let mut chunks = rest.chunks(MAX_EMIT_PAYLOAD).peekable();
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            FLAG_END_HEADERS
        } else {
            0
        };
        FrameHeader {
            length: chunk.len(),
            kind: CONTINUATION,
            flags,
            stream,
        }
        .write(out);
        out.put_slice(chunk);
    }
}

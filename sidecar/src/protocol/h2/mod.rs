//! Sans-IO HTTP/2 cleartext (h2c) translator: owns the byte-level view of one proxied HTTP/2
//! connection. Client->upstream header blocks are decoded and re-encoded with literal
//! representations only (so the upstream's HPACK table stays empty) with a `traceparent` set per
//! stream; everything else, and the whole upstream->client direction, passes unchanged while
//! requests, responses, gRPC status, body sizes and stream ends are observed.
//!
//! It performs no I/O: a driver feeds it the bytes read from each side and writes what it
//! returns. Flow control, SETTINGS, PING, PRIORITY, WINDOW_UPDATE and GOAWAY stay end to end.

#![forbid(unsafe_code)]

mod frame;
mod fuzz;
mod hpack;
mod huffman;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use bytes::{Buf, BytesMut};
use loona_hpack::decoder::DecoderError;
use loona_hpack::Decoder;

use frame::{FrameHeader, HEADER_LEN};
use hpack::{FieldList, SizeUpdates};

pub use fuzz::fuzz_one;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The decoded size (RFC 7541 §4.1) a client header block may reach, as a multiple of
/// [`Limits::max_header_block`]: bounds what a small block referencing large dynamic table
/// entries many times can expand to.
pub const DECODED_BLOCK_FACTOR: usize = 4;

/// Which end did something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The application that opened the connection.
    Client,
    /// The connection's original destination.
    Upstream,
}

/// Facts of a request, from the first header block of a client-initiated stream.
#[derive(Clone, Debug, Default)]
pub struct RequestHead {
    /// The stream id.
    pub stream_id: u32,
    /// `:method` ("" if absent).
    pub method: String,
    /// `:path` ("" if absent).
    pub path: String,
    /// `:authority`, else the `host` header.
    pub authority: Option<String>,
    /// `:scheme`.
    pub scheme: Option<String>,
    /// `content-type`.
    pub content_type: Option<String>,
    /// First incoming `traceparent` value.
    pub traceparent: Option<String>,
    /// First incoming `tracestate` value.
    pub tracestate: Option<String>,
    /// `user-agent`.
    pub user_agent: Option<String>,
    /// The request has no body (END_STREAM on its HEADERS).
    pub end_stream: bool,
}

/// How a stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamOutcome {
    /// The response ended with END_STREAM.
    Complete,
    /// RST_STREAM from `by` with this error code.
    Reset {
        /// Who sent the RST_STREAM.
        by: Side,
        /// Its error code.
        code: u32,
    },
    /// The upstream's GOAWAY said it never processed this stream (id > last_stream_id).
    Refused,
    /// The connection ended (see [`H2Translator::close`]) before the response was complete.
    ConnectionClosed,
}

/// One finished stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamEnd {
    /// The stream id.
    pub stream_id: u32,
    /// Final (non-1xx) `:status` of the response, if one arrived.
    pub status: Option<u16>,
    /// `grpc-status` from the trailers, or from a trailers-only response (a HEADERS frame
    /// carrying END_STREAM); the last one seen wins.
    pub grpc_status: Option<u32>,
    /// `grpc-message`, as sent (percent-encoded), if any; the last one seen wins.
    pub grpc_message: Option<String>,
    /// DATA payload bytes client->upstream (padding excluded).
    pub request_body_bytes: u64,
    /// DATA payload bytes upstream->client (padding excluded).
    pub response_body_bytes: u64,
    /// How it ended.
    pub outcome: StreamOutcome,
}

/// Why a direction could not be translated further. After any of these the direction is
/// stopped: later calls for it return [`H2Error::Stopped`].
#[derive(Debug, thiserror::Error)]
pub enum H2Error {
    /// The client's first bytes are not the HTTP/2 connection preface.
    #[error("the client did not start with the HTTP/2 connection preface")]
    BadPreface,
    /// The first frame after the preface (client) or the first frame (upstream) is not
    /// SETTINGS on stream 0.
    #[error("{side:?} did not start with a SETTINGS frame (got frame type {kind:#x} on stream {stream})")]
    ExpectedSettings {
        /// Sender.
        side: Side,
        /// Type of the frame received instead.
        kind: u8,
        /// Its stream.
        stream: u32,
    },
    /// A frame other than a CONTINUATION of the same stream arrived inside a header block.
    #[error(
        "{side:?} sent a frame of type {kind:#x} on stream {stream} inside the header block of stream {open}"
    )]
    Interleaved {
        /// Sender.
        side: Side,
        /// Type of the offending frame.
        kind: u8,
        /// Its stream.
        stream: u32,
        /// Stream whose header block was open.
        open: u32,
    },
    /// A CONTINUATION frame arrived with no header block open.
    #[error("{side:?} sent CONTINUATION on stream {stream} without an open header block")]
    UnexpectedContinuation {
        /// Sender.
        side: Side,
        /// Its stream.
        stream: u32,
    },
    /// A frame whose length is invalid for its type.
    #[error("{side:?} sent a frame of type {kind:#x} with invalid length {length}")]
    FrameSize {
        /// Sender.
        side: Side,
        /// Frame type.
        kind: u8,
        /// Its payload length.
        length: usize,
    },
    /// Padding (or priority fields, or a promised id) longer than the frame's payload.
    #[error("{side:?} sent a frame of type {kind:#x} whose padding ({pad} bytes) does not fit its length {length}")]
    Padding {
        /// Sender.
        side: Side,
        /// Frame type.
        kind: u8,
        /// Pad length announced.
        pad: usize,
        /// Payload length.
        length: usize,
    },
    /// Another violation of RFC 9113 the translator cannot work around.
    #[error("{side:?} violated the HTTP/2 protocol: {what}")]
    Protocol {
        /// Sender.
        side: Side,
        /// What was wrong.
        what: &'static str,
    },
    /// A header block's fragments (or its frames) exceed [`Limits::max_header_block`].
    #[error("{side:?} header block on stream {stream} exceeds the limit of {limit} bytes")]
    HeaderBlockTooLarge {
        /// Sender.
        side: Side,
        /// The block's stream.
        stream: u32,
        /// The limit.
        limit: usize,
    },
    /// A client header block decodes to more than [`DECODED_BLOCK_FACTOR`] ×
    /// [`Limits::max_header_block`] bytes of header list.
    #[error("the client header list on stream {stream} decodes to more than {limit} bytes")]
    HeaderListTooLarge {
        /// The block's stream.
        stream: u32,
        /// The limit.
        limit: usize,
    },
    /// HPACK decoding failed (the connection's compression state is lost).
    #[error("HPACK decoding of a {side:?} header block on stream {stream} failed: {source}")]
    Hpack {
        /// Sender.
        side: Side,
        /// The block's stream.
        stream: u32,
        /// The decoder's error (a size update above [`Limits::max_table_size`] is
        /// `InvalidMaxDynamicSize`).
        #[source]
        source: DecoderError,
    },
    /// An earlier error stopped translation in this direction.
    #[error("translation of the {side:?} direction stopped after an earlier error")]
    Stopped {
        /// The direction's sender.
        side: Side,
    },
}

/// Bounds on what one connection's translator keeps.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest header block (sum of fragments) buffered; larger is an error. The frames that
    /// carry it may take up to twice this plus 1 KiB (headers, padding) and must fit in the
    /// input buffer at once; a client block may decode to at most [`DECODED_BLOCK_FACTOR`]
    /// times this. Default 256 KiB.
    pub max_header_block: usize,
    /// Largest dynamic table size the decoders accept in a size update. Default 64 KiB.
    pub max_table_size: usize,
    /// Most streams tracked at once; streams beyond are forwarded but not measured (no inject
    /// call, no StreamEnd). Default 10_000.
    pub max_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_block: 256 * 1024,
            max_table_size: 64 * 1024,
            max_streams: 10_000,
        }
    }
}

impl Limits {
    /// Most bytes the frames of one header block may take, headers and padding included.
    fn max_block_frames(&self) -> usize {
        self.max_header_block.saturating_mul(2).saturating_add(1024)
    }
}

/// Where a direction is in its byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Client only: part of [`PREFACE`] has passed.
    Preface {
        /// Bytes of the preface passed so far.
        matched: usize,
    },
    /// At a frame boundary (possibly with a header block partly received, see [`Scan`]).
    Frame,
    /// Inside a DATA frame's payload.
    Data {
        /// Its stream.
        stream: u32,
        /// Payload bytes still to pass before the padding.
        content: usize,
        /// Padding bytes still to pass.
        padding: usize,
        /// The frame carries END_STREAM.
        end_stream: bool,
    },
    /// Inside another frame's payload, passed unchanged.
    Skip {
        /// Payload bytes still to pass.
        remaining: usize,
    },
}

/// Progress over a header block whose frames are still arriving. They stay in the input buffer
/// (unconsumed) until END_HEADERS, so that an error leaves the whole block there for the driver.
#[derive(Clone, Copy, Debug, Default)]
struct Scan {
    /// Offset in the input of the next frame header to examine (0: no block in progress).
    offset: usize,
    /// Fragment bytes in the frames examined.
    fragment: usize,
}

/// One direction's parsing state.
struct Direction {
    /// Position in the byte stream.
    state: State,
    /// Mirror of the sender's HPACK encoder.
    decoder: Decoder<'static>,
    /// The first frame (SETTINGS) has been seen.
    settings_seen: bool,
    /// An error ended translation of this direction.
    stopped: bool,
    /// Header block in progress.
    scan: Scan,
}

impl Direction {
    /// A direction starting at `state`.
    fn new(state: State, limits: &Limits) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(limits.max_table_size);
        Self {
            state,
            decoder,
            settings_seen: false,
            stopped: false,
            scan: Scan::default(),
        }
    }
}

/// What is known of a tracked stream.
#[derive(Clone, Debug, Default)]
struct Stream {
    /// The client sent END_STREAM (the request is complete).
    request_done: bool,
    /// Final response status.
    status: Option<u16>,
    /// Last `grpc-status` seen.
    grpc_status: Option<u32>,
    /// Last `grpc-message` seen.
    grpc_message: Option<String>,
    /// Request DATA payload bytes.
    request_body_bytes: u64,
    /// Response DATA payload bytes.
    response_body_bytes: u64,
}

/// A complete header block, gathered from its frames.
#[derive(Clone, Copy, Debug)]
struct BlockInfo {
    /// HEADERS or PUSH_PROMISE.
    kind: u8,
    /// Its stream.
    stream: u32,
    /// END_STREAM on the HEADERS frame.
    end_stream: bool,
    /// Priority fields of the HEADERS frame.
    priority: Option<[u8; frame::PRIORITY_LEN]>,
}

/// The callback that chooses the `traceparent` of a new stream.
type InjectFn<'a> = dyn FnMut(&RequestHead) -> Option<String> + 'a;

/// What a step of the frame loop achieved.
enum Step {
    /// Progress was made; go on.
    Continue,
    /// More input is needed.
    NeedInput,
}

/// The translator of one HTTP/2 connection. See the module documentation.
pub struct H2Translator {
    /// Bounds.
    limits: Limits,
    /// Client->upstream parsing.
    client: Direction,
    /// Upstream->client parsing.
    upstream: Direction,
    /// Tracked streams.
    streams: HashMap<u32, Stream>,
    /// Highest client-initiated stream id seen.
    last_client_stream: u32,
    /// Lowest last_stream_id of the upstream's GOAWAY frames.
    goaway_last: Option<u32>,
    /// Fragments of the header block being decoded.
    block: Vec<u8>,
    /// Decoded fields of the client block being re-encoded.
    fields: FieldList,
    /// The re-encoded client block.
    encoded: Vec<u8>,
    /// The block being decoded with its Huffman-coded strings made raw.
    raw: Vec<u8>,
    /// Working space for one decoded Huffman string.
    scratch: Vec<u8>,
}

impl H2Translator {
    /// Prior-knowledge h2c: the client starts with PREFACE (then its SETTINGS); the upstream
    /// starts with its SETTINGS frame.
    pub fn new(limits: Limits) -> Self {
        Self {
            client: Direction::new(State::Preface { matched: 0 }, &limits),
            upstream: Direction::new(State::Frame, &limits),
            limits,
            streams: HashMap::new(),
            last_client_stream: 0,
            goaway_last: None,
            block: Vec::new(),
            fields: FieldList::default(),
            encoded: Vec::new(),
            raw: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// After an HTTP/1.1 `Upgrade: h2c` request answered with 101: stream 1 is already open
    /// (its request was the HTTP/1.1 request, so it is half-closed from the client side) and
    /// its response comes from the upstream as HTTP/2 on stream 1. The client then sends
    /// PREFACE + SETTINGS; the upstream sends SETTINGS then the response. Stream 1's StreamEnd
    /// is reported like any other (request_body_bytes 0).
    pub fn after_upgrade(limits: Limits) -> Self {
        let mut t = Self::new(limits);
        t.last_client_stream = 1;
        if limits.max_streams > 0 {
            t.streams.insert(
                1,
                Stream {
                    request_done: true,
                    ..Stream::default()
                },
            );
        }
        t
    }

    /// Client -> upstream. Consumes from the front of `input` everything it can, appending to
    /// `out` the bytes to write to the upstream. Frames other than HEADERS/CONTINUATION pass
    /// unchanged; a DATA frame's payload may be passed on in pieces as it arrives (a frame's 9
    /// byte header must be complete first), never buffered whole. A header block (HEADERS +
    /// CONTINUATION*) stays in `input` until END_HEADERS, then is decoded; for the first block
    /// of a new client-initiated stream `inject(&head)` is called once and returns the
    /// `traceparent` value to set (None, or a value that is not a valid field value: do not
    /// change traceparent). The block is re-encoded (every block in this direction, also
    /// trailers and blocks where inject returned None) and emitted as HEADERS (+ CONTINUATION)
    /// frames of at most 16384 payload bytes, keeping the stream id, END_STREAM, and PRIORITY
    /// flag/fields; padding is dropped. Finished streams are pushed to `ends`. On error,
    /// nothing more can be translated in this direction: everything consumed was translated
    /// into `out`, and `input` starts with the frame (or header block) that failed, for the
    /// driver to forward raw. The driver must only append to `input` between calls.
    pub fn from_client(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        inject: &mut dyn FnMut(&RequestHead) -> Option<String>,
        ends: &mut Vec<StreamEnd>,
    ) -> Result<(), H2Error> {
        self.pump(Side::Client, input, out, Some(inject), ends)
    }

    /// Upstream -> client. Appends to `out` exactly the bytes it consumed from `input`
    /// (unchanged), decoding as it goes (HEADERS/CONTINUATION/PUSH_PROMISE blocks through its
    /// own HPACK decoder; DATA lengths; RST_STREAM; GOAWAY). Finished streams go to `ends`.
    /// A header block is consumed only once it is complete. After an error, `input` starts at
    /// the frame (or block) that failed. The driver must only append to `input` between calls.
    pub fn from_upstream(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        ends: &mut Vec<StreamEnd>,
    ) -> Result<(), H2Error> {
        self.pump(Side::Upstream, input, out, None, ends)
    }

    /// The connection is over: every stream still open ends with `ConnectionClosed` (in stream
    /// id order).
    pub fn close(&mut self, ends: &mut Vec<StreamEnd>) {
        let mut ids: Vec<u32> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.finish(id, StreamOutcome::ConnectionClosed, ends);
        }
    }

    /// Number of streams being tracked.
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// The parsing state of `side`'s direction.
    fn dir(&mut self, side: Side) -> &mut Direction {
        match side {
            Side::Client => &mut self.client,
            Side::Upstream => &mut self.upstream,
        }
    }

    /// Runs one direction, stopping it on error.
    fn pump(
        &mut self,
        side: Side,
        input: &mut BytesMut,
        out: &mut BytesMut,
        mut inject: Option<&mut InjectFn<'_>>,
        ends: &mut Vec<StreamEnd>,
    ) -> Result<(), H2Error> {
        if self.dir(side).stopped {
            return Err(H2Error::Stopped { side });
        }
        loop {
            let step = match self.dir(side).state {
                State::Preface { matched } => self.preface(input, out, matched),
                State::Frame => self.frame(side, input, out, &mut inject, ends),
                State::Data {
                    stream,
                    content,
                    padding,
                    end_stream,
                } => Ok(self.data(
                    side,
                    input,
                    out,
                    (stream, content, padding, end_stream),
                    ends,
                )),
                State::Skip { remaining } => Ok(self.skip(side, input, out, remaining)),
            };
            match step {
                Ok(Step::Continue) => {}
                Ok(Step::NeedInput) => return Ok(()),
                Err(e) => {
                    self.dir(side).stopped = true;
                    return Err(e);
                }
            }
        }
    }

    /// Passes the client's preface, checking it byte by byte.
    fn preface(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        matched: usize,
    ) -> Result<Step, H2Error> {
        let want = PREFACE.get(matched..).unwrap_or_default();
        let n = want.len().min(input.len());
        if input.get(..n) != want.get(..n) {
            return Err(H2Error::BadPreface);
        }
        forward(input, out, n);
        if n == want.len() {
            self.client.state = State::Frame;
            Ok(Step::Continue)
        } else {
            self.client.state = State::Preface {
                matched: matched + n,
            };
            Ok(Step::NeedInput)
        }
    }

    /// Handles a frame boundary: reads the next frame header and dispatches on its type.
    fn frame(
        &mut self,
        side: Side,
        input: &mut BytesMut,
        out: &mut BytesMut,
        inject: &mut Option<&mut InjectFn<'_>>,
        ends: &mut Vec<StreamEnd>,
    ) -> Result<Step, H2Error> {
        let Some(h) = FrameHeader::parse(input) else {
            return Ok(Step::NeedInput);
        };
        let dir = self.dir(side);
        if !dir.settings_seen {
            if h.kind != frame::SETTINGS || h.stream != 0 {
                return Err(H2Error::ExpectedSettings {
                    side,
                    kind: h.kind,
                    stream: h.stream,
                });
            }
            dir.settings_seen = true;
        }
        match h.kind {
            frame::HEADERS | frame::PUSH_PROMISE => {
                if h.stream == 0 {
                    return Err(H2Error::Protocol {
                        side,
                        what: "header block on stream 0",
                    });
                }
                if h.kind == frame::PUSH_PROMISE && side == Side::Client {
                    return Err(H2Error::Protocol {
                        side,
                        what: "PUSH_PROMISE sent by the client",
                    });
                }
                let Some(span) = self.scan_block(side, &h, input)? else {
                    return Ok(Step::NeedInput);
                };
                let info = self.gather_block(side, input.get(..span).unwrap_or_default())?;
                match inject {
                    Some(inject) if side == Side::Client => {
                        self.client_block(info, inject, ends, out)?;
                        input.advance(span.min(input.len()));
                    }
                    _ => {
                        self.upstream_block(info, ends)?;
                        forward(input, out, span);
                    }
                }
                Ok(Step::Continue)
            }
            frame::CONTINUATION => Err(H2Error::UnexpectedContinuation {
                side,
                stream: h.stream,
            }),
            frame::DATA => {
                if h.stream == 0 {
                    return Err(H2Error::Protocol {
                        side,
                        what: "DATA on stream 0",
                    });
                }
                let (pad_field, padding) = if h.has(frame::FLAG_PADDED) {
                    if h.length == 0 {
                        return Err(padding_error(side, &h, 0));
                    }
                    let Some(&pad) = input.get(HEADER_LEN) else {
                        return Ok(Step::NeedInput);
                    };
                    let pad = usize::from(pad);
                    if pad >= h.length {
                        return Err(padding_error(side, &h, pad));
                    }
                    (1, pad)
                } else {
                    (0, 0)
                };
                forward(input, out, HEADER_LEN + pad_field);
                self.dir(side).state = State::Data {
                    stream: h.stream,
                    content: h.length - pad_field - padding,
                    padding,
                    end_stream: h.has(frame::FLAG_END_STREAM),
                };
                Ok(Step::Continue)
            }
            frame::RST_STREAM => {
                if h.length != 4 {
                    return Err(frame_size_error(side, &h));
                }
                if h.stream == 0 {
                    return Err(H2Error::Protocol {
                        side,
                        what: "RST_STREAM on stream 0",
                    });
                }
                let Some(code) = read_u32(input, HEADER_LEN) else {
                    return Ok(Step::NeedInput);
                };
                forward(input, out, HEADER_LEN + 4);
                self.finish(h.stream, StreamOutcome::Reset { by: side, code }, ends);
                Ok(Step::Continue)
            }
            frame::GOAWAY => {
                if h.length < 8 {
                    return Err(frame_size_error(side, &h));
                }
                let Some(last) = read_u32(input, HEADER_LEN) else {
                    return Ok(Step::NeedInput);
                };
                if read_u32(input, HEADER_LEN + 4).is_none() {
                    return Ok(Step::NeedInput);
                }
                forward(input, out, HEADER_LEN + 8);
                if side == Side::Upstream {
                    self.refuse_after(last & 0x7fff_ffff, ends);
                }
                self.dir(side).state = State::Skip {
                    remaining: h.length - 8,
                };
                Ok(Step::Continue)
            }
            _ => {
                forward(input, out, HEADER_LEN);
                self.dir(side).state = State::Skip {
                    remaining: h.length,
                };
                Ok(Step::Continue)
            }
        }
    }

    /// Passes DATA payload as it arrives, counting it; acts on END_STREAM at the frame's end.
    fn data(
        &mut self,
        side: Side,
        input: &mut BytesMut,
        out: &mut BytesMut,
        (stream, content, padding, end_stream): (u32, usize, usize, bool),
        ends: &mut Vec<StreamEnd>,
    ) -> Step {
        if content > 0 || padding > 0 {
            if input.is_empty() {
                return Step::NeedInput;
            }
            let n = if content > 0 {
                let n = content.min(input.len());
                if let Some(s) = self.streams.get_mut(&stream) {
                    let count = match side {
                        Side::Client => &mut s.request_body_bytes,
                        Side::Upstream => &mut s.response_body_bytes,
                    };
                    *count += n as u64;
                }
                n
            } else {
                padding.min(input.len())
            };
            forward(input, out, n);
            let (content, padding) = if content > 0 {
                (content - n, padding)
            } else {
                (0, padding - n)
            };
            self.dir(side).state = State::Data {
                stream,
                content,
                padding,
                end_stream,
            };
            return Step::Continue;
        }
        self.dir(side).state = State::Frame;
        if end_stream {
            self.end_stream(side, stream, ends);
        }
        Step::Continue
    }

    /// Passes the rest of a frame that needs no inspection.
    fn skip(
        &mut self,
        side: Side,
        input: &mut BytesMut,
        out: &mut BytesMut,
        remaining: usize,
    ) -> Step {
        if remaining == 0 {
            self.dir(side).state = State::Frame;
            return Step::Continue;
        }
        if input.is_empty() {
            return Step::NeedInput;
        }
        let n = remaining.min(input.len());
        forward(input, out, n);
        self.dir(side).state = State::Skip {
            remaining: remaining - n,
        };
        Step::Continue
    }

    /// Examines the frames of the header block starting at the front of `input` (whose first
    /// header is `first`) as far as they have arrived. Returns the block's length in `input`
    /// once its END_HEADERS frame is complete.
    fn scan_block(
        &mut self,
        side: Side,
        first: &FrameHeader,
        input: &[u8],
    ) -> Result<Option<usize>, H2Error> {
        let limit = self.limits.max_header_block;
        let max_frames = self.limits.max_block_frames();
        let dir = self.dir(side);
        let too_large = H2Error::HeaderBlockTooLarge {
            side,
            stream: first.stream,
            limit,
        };
        loop {
            let offset = dir.scan.offset;
            let Some(h) = input.get(offset..).and_then(FrameHeader::parse) else {
                return Ok(None);
            };
            if offset > 0 && (h.kind != frame::CONTINUATION || h.stream != first.stream) {
                return Err(H2Error::Interleaved {
                    side,
                    kind: h.kind,
                    stream: h.stream,
                    open: first.stream,
                });
            }
            let end = offset + HEADER_LEN + h.length;
            // At most 1 pad length byte, 255 padding bytes, 5 priority bytes are not fragment.
            let least_fragment = h.length.saturating_sub(1 + 255 + frame::PRIORITY_LEN);
            if end > max_frames || dir.scan.fragment + least_fragment > limit {
                return Err(too_large);
            }
            let Some(payload) = input.get(offset + HEADER_LEN..end) else {
                return Ok(None);
            };
            let fragment = frame::fragment(&h, payload)
                .map_err(|frame::LayoutError::Padding { pad }| padding_error(side, &h, pad))?;
            dir.scan.fragment += fragment.range.len();
            if dir.scan.fragment > limit {
                return Err(too_large);
            }
            dir.scan.offset = end;
            if h.has(frame::FLAG_END_HEADERS) {
                dir.scan = Scan::default();
                return Ok(Some(end));
            }
        }
    }

    /// Copies the fragments of a complete header block (its frames, as checked by
    /// [`Self::scan_block`]) into `self.block`.
    fn gather_block(&mut self, side: Side, frames: &[u8]) -> Result<BlockInfo, H2Error> {
        hpack::reset_buffer(&mut self.block);
        let mut info = None;
        let mut pos = 0;
        while let Some(h) = frames.get(pos..).and_then(FrameHeader::parse) {
            let payload = frames
                .get(pos + HEADER_LEN..pos + HEADER_LEN + h.length)
                .unwrap_or_default();
            let fragment = frame::fragment(&h, payload)
                .map_err(|frame::LayoutError::Padding { pad }| padding_error(side, &h, pad))?;
            self.block
                .extend_from_slice(payload.get(fragment.range).unwrap_or_default());
            info.get_or_insert(BlockInfo {
                kind: h.kind,
                stream: h.stream,
                end_stream: h.kind == frame::HEADERS && h.has(frame::FLAG_END_STREAM),
                priority: fragment.priority,
            });
            pos += HEADER_LEN + h.length;
        }
        info.ok_or(H2Error::Protocol {
            side,
            what: "empty header block",
        })
    }

    /// Decodes the leading size updates and the fields of `self.block` with `side`'s decoder
    /// (Huffman-coded strings made raw first, see [`huffman`]), calling `field` for each field.
    fn decode_block(
        &mut self,
        side: Side,
        stream: u32,
        field: impl FnMut(&[u8], &[u8]),
    ) -> Result<SizeUpdates, H2Error> {
        let max_table = self.limits.max_table_size;
        let dir = match side {
            Side::Client => &mut self.client,
            Side::Upstream => &mut self.upstream,
        };
        let decoder = &mut dir.decoder;
        let hpack_error = |source| H2Error::Hpack {
            side,
            stream,
            source,
        };
        let (updates, used) = hpack::leading_size_updates(&self.block, |size| {
            if size > max_table {
                return Err(DecoderError::InvalidMaxDynamicSize);
            }
            decoder.set_max_table_size(size);
            Ok(())
        })
        .map_err(hpack_error)?;
        hpack::reset_buffer(&mut self.raw);
        hpack::reset_buffer(&mut self.scratch);
        hpack::unhuffman(
            self.block.get(used..).unwrap_or_default(),
            &mut self.raw,
            &mut self.scratch,
        )
        .map_err(hpack_error)?;
        let mut field = field;
        decoder
            .decode_with_cb(&self.raw, |n, v| field(&n, &v))
            .map_err(hpack_error)?;
        Ok(updates)
    }

    /// Decodes, injects into and re-encodes a complete client header block, appending its
    /// frames to `out`.
    fn client_block(
        &mut self,
        info: BlockInfo,
        inject: &mut InjectFn<'_>,
        ends: &mut Vec<StreamEnd>,
        out: &mut BytesMut,
    ) -> Result<(), H2Error> {
        let stream = info.stream;
        let list_limit = self
            .limits
            .max_header_block
            .saturating_mul(DECODED_BLOCK_FACTOR);
        let mut fields = std::mem::take(&mut self.fields);
        fields.clear();
        let decoded = self.decode_block(Side::Client, stream, |n, v| fields.push(n, v, list_limit));
        let result = decoded.and_then(|updates| {
            if fields.overflowed() {
                return Err(H2Error::HeaderListTooLarge {
                    stream,
                    limit: list_limit,
                });
            }
            let traceparent = self.open_or_continue(&info, &fields, inject, ends);
            hpack::reset_buffer(&mut self.encoded);
            updates.encode(&mut self.encoded);
            encode_fields(&mut self.encoded, &fields, traceparent.as_deref());
            frame::write_block(out, stream, info.end_stream, info.priority, &self.encoded);
            Ok(())
        });
        fields.clear();
        self.fields = fields;
        result
    }

    /// Stream bookkeeping for a decoded client block: opens a new stream (calling `inject`) or
    /// notes END_STREAM on a known one. Returns the traceparent to set.
    fn open_or_continue(
        &mut self,
        info: &BlockInfo,
        fields: &FieldList,
        inject: &mut InjectFn<'_>,
        ends: &mut Vec<StreamEnd>,
    ) -> Option<String> {
        let stream = info.stream;
        let is_new = stream % 2 == 1 && stream > self.last_client_stream;
        if !is_new {
            if info.end_stream {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.request_done = true;
                }
            }
            return None;
        }
        self.last_client_stream = stream;
        if self.streams.len() >= self.limits.max_streams {
            return None;
        }
        let head = request_head(stream, fields, info.end_stream);
        let traceparent = inject(&head).filter(|v| is_field_value(v.as_bytes()));
        if self.goaway_last.is_some_and(|last| stream > last) {
            ends.push(StreamEnd {
                stream_id: stream,
                status: None,
                grpc_status: None,
                grpc_message: None,
                request_body_bytes: 0,
                response_body_bytes: 0,
                outcome: StreamOutcome::Refused,
            });
        } else {
            self.streams.insert(
                stream,
                Stream {
                    request_done: info.end_stream,
                    ..Stream::default()
                },
            );
        }
        traceparent
    }

    /// Decodes a complete upstream header block and records what it says about its stream.
    fn upstream_block(
        &mut self,
        info: BlockInfo,
        ends: &mut Vec<StreamEnd>,
    ) -> Result<(), H2Error> {
        let mut status: Option<Option<u16>> = None;
        let mut grpc_status = None;
        let mut grpc_message = None;
        self.decode_block(Side::Upstream, info.stream, |n, v| match n {
            b":status" => status = Some(parse_decimal(v).and_then(|s| u16::try_from(s).ok())),
            b"grpc-status" => grpc_status = parse_decimal(v),
            b"grpc-message" => grpc_message = Some(String::from_utf8_lossy(v).into_owned()),
            _ => {}
        })?;
        if info.kind != frame::HEADERS {
            return Ok(());
        }
        if let Some(s) = self.streams.get_mut(&info.stream) {
            let informational = matches!(status, Some(Some(100..=199)));
            if !informational {
                if let (Some(Some(code)), None) = (status, s.status) {
                    s.status = Some(code);
                }
                if grpc_status.is_some() {
                    s.grpc_status = grpc_status;
                }
                if grpc_message.is_some() {
                    s.grpc_message = grpc_message;
                }
            }
        }
        if info.end_stream {
            self.end_stream(Side::Upstream, info.stream, ends);
        }
        Ok(())
    }

    /// END_STREAM from `side` on `stream`.
    fn end_stream(&mut self, side: Side, stream: u32, ends: &mut Vec<StreamEnd>) {
        match side {
            Side::Client => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.request_done = true;
                }
            }
            Side::Upstream => self.finish(stream, StreamOutcome::Complete, ends),
        }
    }

    /// The upstream's GOAWAY: streams above `last` were never processed.
    fn refuse_after(&mut self, last: u32, ends: &mut Vec<StreamEnd>) {
        self.goaway_last = Some(self.goaway_last.map_or(last, |l| l.min(last)));
        let mut ids: Vec<u32> = self
            .streams
            .keys()
            .copied()
            .filter(|id| *id > last)
            .collect();
        ids.sort_unstable();
        for id in ids {
            self.finish(id, StreamOutcome::Refused, ends);
        }
    }

    /// Stops tracking `stream`, reporting it if it was tracked.
    fn finish(&mut self, stream: u32, outcome: StreamOutcome, ends: &mut Vec<StreamEnd>) {
        if let Some(s) = self.streams.remove(&stream) {
            ends.push(StreamEnd {
                stream_id: stream,
                status: s.status,
                grpc_status: s.grpc_status,
                grpc_message: s.grpc_message,
                request_body_bytes: s.request_body_bytes,
                response_body_bytes: s.response_body_bytes,
                outcome,
            });
        }
    }
}

/// Moves `n` bytes (at most all there are) from the front of `input` to `out`.
fn forward(input: &mut BytesMut, out: &mut BytesMut, n: usize) {
    let n = n.min(input.len());
    out.extend_from_slice(input.get(..n).unwrap_or_default());
    input.advance(n);
}

/// The big-endian u32 at `at`, if it has arrived.
fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

/// The error for a frame whose padding does not fit.
fn padding_error(side: Side, h: &FrameHeader, pad: usize) -> H2Error {
    H2Error::Padding {
        side,
        kind: h.kind,
        pad,
        length: h.length,
    }
}

/// The error for a frame with a length its type does not allow.
fn frame_size_error(side: Side, h: &FrameHeader) -> H2Error {
    H2Error::FrameSize {
        side,
        kind: h.kind,
        length: h.length,
    }
}

/// A decimal number of at most 10 digits, nothing else.
fn parse_decimal(v: &[u8]) -> Option<u32> {
    if v.is_empty() || v.len() > 10 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Whether `v` can be sent as a field value: visible ASCII, spaces and tabs inside, not empty.
fn is_field_value(v: &[u8]) -> bool {
    !v.is_empty()
        && v.iter()
            .all(|b| (0x21..=0x7e).contains(b) || *b == b' ' || *b == b'\t')
        && v.first().is_some_and(|b| !b.is_ascii_whitespace())
        && v.last().is_some_and(|b| !b.is_ascii_whitespace())
}

/// The facts of a request from its first header block.
fn request_head(stream: u32, fields: &FieldList, end_stream: bool) -> RequestHead {
    let text = |name: &[u8]| {
        fields
            .first(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    RequestHead {
        stream_id: stream,
        method: text(b":method").unwrap_or_default(),
        path: text(b":path").unwrap_or_default(),
        authority: text(b":authority").or_else(|| text(b"host")),
        scheme: text(b":scheme"),
        content_type: text(b"content-type"),
        traceparent: text(b"traceparent"),
        tracestate: text(b"tracestate"),
        user_agent: text(b"user-agent"),
        end_stream,
    }
}

/// Encodes `fields` as literals; with a `traceparent`, the first traceparent field gets it in
/// place, further ones are dropped, and it is appended if there was none.
fn encode_fields(out: &mut Vec<u8>, fields: &FieldList, traceparent: Option<&str>) {
    let mut placed = false;
    for (name, value) in fields.iter() {
        match traceparent {
            Some(tp) if name == b"traceparent" => {
                if !placed {
                    hpack::encode_field(out, name, tp.as_bytes());
                    placed = true;
                }
            }
            _ => hpack::encode_field(out, name, value),
        }
    }
    if let (Some(tp), false) = (traceparent, placed) {
        hpack::encode_field(out, b"traceparent", tp.as_bytes());
    }
}

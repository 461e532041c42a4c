//! Streaming decoder of HTTP/1.1 chunked framing (RFC 9112 §7.1): finds where a chunked
//! message body ends and how many payload bytes it carried, without buffering any of it.

/// The bytes do not follow the chunked grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunked framing")]
pub struct ChunkError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading chunk-size hex digits (`seen`: at least one digit read).
    Size { size: u64, seen: bool },
    /// Whitespace after the size, before an extension or the line end.
    SizeWs { size: u64 },
    /// Inside a chunk extension, up to the line end.
    Ext { size: u64 },
    /// CR seen after the size line, LF expected.
    SizeLf { size: u64 },
    /// Chunk data with this many bytes left.
    Data { left: u64 },
    /// CRLF expected after chunk data.
    DataCr,
    /// LF expected after chunk data's CR.
    DataLf,
    /// Start of a trailer line, or of the final empty line.
    TrailerStart,
    /// Inside a trailer field line.
    TrailerLine,
    /// CR of the final empty line seen, LF expected.
    FinalLf,
    /// The body is complete.
    Done,
}

/// Progress made by one [`ChunkedDecoder::feed`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the input that belong to this body (all of it unless `done`).
    pub consumed: usize,
    /// Payload (chunk-data) bytes among them.
    pub payload: u64,
    /// True when the body, trailers included, is complete.
    pub done: bool,
}

/// Incremental chunked-body parser. Lenient where the bytes still have one meaning (bare LF
/// line ends, whitespace before extensions); strict where they do not.
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: State,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self {
            state: State::Size {
                size: 0,
                seen: false,
            },
        }
    }

    /// True once the whole body has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn end_of_size_line(size: u64) -> State {
        if size == 0 {
            State::TrailerStart
        } else {
            State::Data { left: size }
        }
    }

    /// Consumes as much of `input` as belongs to the body and reports what it held.
    pub fn feed(&mut self, input: &[u8]) -> Result<Progress, ChunkError> {
        let mut pos = 0;
        let mut payload = 0u64;
        while pos < input.len() && self.state != State::Done {
            if let State::Data { left } = self.state {
                let avail = (input.len() - pos) as u64;
                let take = left.min(avail);
                payload += take;
                // take <= avail, which came from a usize
                pos += usize::try_from(take).map_err(|_| ChunkError)?;
                self.state = if take == left {
                    State::DataCr
                } else {
                    State::Data { left: left - take }
                };
                continue;
            }
            let b = input[pos];
            pos += 1;
            self.state = match self.state {
                State::Size { size, seen } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = u64::from(match b {
                            b'0'..=b'9' => b - b'0',
                            b'a'..=b'f' => b - b'a' + 10,
                            _ => b - b'A' + 10,
                        });
                        let size = size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(digit))
                            .ok_or(ChunkError)?;
                        State::Size { size, seen: true }
                    }
                    _ if !seen => return Err(ChunkError),
                    b' ' | b'\t' => State::SizeWs { size },
                    b';' => State::Ext { size },
                    b'\r' => State::SizeLf { size },
                    b'\n' => Self::end_of_size_line(size),
                    _ => return Err(ChunkError),
                },
                State::SizeWs { size } => match b {
                    b' ' | b'\t' => State::SizeWs { size },
                    b';' => State::Ext { size },
                    b'\r' => State::SizeLf { size },
                    b'\n' => Self::end_of_size_line(size),
                    _ => return Err(ChunkError),
                },
                State::Ext { size } => match b {
                    b'\r' => State::SizeLf { size },
                    b'\n' => Self::end_of_size_line(size),
                    _ => State::Ext { size },
                },
                State::SizeLf { size } => match b {
                    b'\n' => Self::end_of_size_line(size),
                    _ => return Err(ChunkError),
                },
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    b'\n' => Self::new().state,
                    _ => return Err(ChunkError),
                },
                State::DataLf => match b {
                    b'\n' => Self::new().state,
                    _ => return Err(ChunkError),
                },
                State::TrailerStart => match b {
                    b'\r' => State::FinalLf,
                    b'\n' => State::Done,
                    _ => State::TrailerLine,
                },
                State::TrailerLine => match b {
                    b'\n' => State::TrailerStart,
                    _ => State::TrailerLine,
                },
                State::FinalLf => match b {
                    b'\n' => State::Done,
                    _ => return Err(ChunkError),
                },
                // handled before the byte is taken
                State::Data { .. } | State::Done => return Err(ChunkError),
            };
        }
        Ok(Progress {
            consumed: pos,
            payload,
            done: self.state == State::Done,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(input: &[u8]) -> Result<Progress, ChunkError> {
        ChunkedDecoder::new().feed(input)
    }

    #[test]
    fn simple_body() {
        let body = b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\nNEXT";
        let p = decode_all(body).unwrap();
        assert_eq!(
            p,
            Progress {
                consumed: body.len() - 4,
                payload: 9,
                done: true
            }
        );
    }

    #[test]
    fn extensions_trailers_and_bare_lf() {
        let body =
            b"A;name=\"v\"\r\n0123456789\r\n3 ; x\nabc\n0\r\nExpires: never\r\nX-T: 1\r\n\r\n";
        let p = decode_all(body).unwrap();
        assert!(p.done);
        assert_eq!(p.consumed, body.len());
        assert_eq!(p.payload, 13);
    }

    #[test]
    fn invalid_framing_is_an_error() {
        assert_eq!(decode_all(b"x\r\n"), Err(ChunkError));
        assert_eq!(decode_all(b"\r\n"), Err(ChunkError));
        assert_eq!(decode_all(b"3\r\nabcX"), Err(ChunkError));
        assert_eq!(decode_all(b"ffffffffffffffffff\r\n"), Err(ChunkError));
    }

    #[test]
    fn incomplete_body_is_not_done() {
        let p = decode_all(b"5\r\nab").unwrap();
        assert_eq!(
            p,
            Progress {
                consumed: 5,
                payload: 2,
                done: false
            }
        );
    }

    fn encode(chunks: &[Vec<u8>], trailers: &[(String, String)]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks.iter().filter(|c| !c.is_empty()) {
            out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for (k, v) in trailers {
            out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_result(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..6),
            trailers in proptest::collection::vec(("[A-Za-z-]{1,10}", "[ -~]{0,20}"), 0..3),
            splits in proptest::collection::vec(1usize..50, 1..20),
        ) {
            let mut body = encode(&chunks, &trailers);
            let len = body.len();
            body.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let mut dec = ChunkedDecoder::new();
            let (mut pos, mut payload, mut i) = (0, 0, 0);
            while !dec.is_done() {
                let n = splits[i % splits.len()].min(body.len() - pos);
                i += 1;
                let p = dec.feed(&body[pos..pos + n]).unwrap();
                pos += p.consumed;
                payload += p.payload;
            }
            prop_assert_eq!(pos, len);
            prop_assert_eq!(payload, chunks.iter().map(|c| c.len() as u64).sum::<u64>());
        }

        #[test]
        fn arbitrary_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut dec = ChunkedDecoder::new();
            if let Ok(p) = dec.feed(&data) {
                prop_assert!(p.consumed <= data.len());
            }
        }
    }
}

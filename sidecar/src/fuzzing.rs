//! Fuzzing entry points for the HTTP/1 parsers: each function takes arbitrary bytes, runs one
//! parser on them and asserts its invariants, panicking on a violation. The cargo-fuzz targets in
//! `fuzz/` call these (so they need no private items); the tests below run them on the seed
//! corpus and on random bytes. Not an API: hidden from the docs and free to change.

use std::ops::Range;

use crate::protocol::chunked::{ChunkError, ChunkedDecoder, Progress};
use crate::protocol::http1::{self, Framing, HeaderLoc, Parse, RequestHead};

/// The `traceparent` value the request-head check injects (a valid W3C one).
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Most piece sizes [`http1_chunked`] reads from the front of its input.
const MAX_SPLITS: usize = 8;

/// Request-head parser, then `traceparent` injection. When `data` starts with a complete head:
/// the head parses the same alone; the rewritten head parses again (unless the added line takes
/// it past the header limit), with the same method, target, version and framing, exactly one
/// `traceparent` whose value is [`TRACEPARENT`], in the place of the first incoming one (name and
/// spacing kept) or as a new line after the last header; every other byte is unchanged.
pub fn http1_request_head(data: &[u8]) {
    let Parse::Complete(head) = http1::parse_request_head(data) else {
        return;
    };
    assert!(head.len <= data.len(), "head longer than the input");
    assert!(
        head.insert_at < head.len,
        "insertion point outside the head"
    );
    let bytes = at(data, 0..head.len);
    let alone = complete_request(bytes, "the head alone");
    assert_same_request(bytes, &head, bytes, &alone);
    assert_eq!(alone.len, head.len, "the head alone has another length");
    assert_eq!(
        alone.traceparent.len(),
        head.traceparent.len(),
        "the head alone has other traceparent lines"
    );

    let rewritten = http1::rewrite_head(bytes, &head, TRACEPARENT)
        .unwrap_or_else(|| panic!("rewrite_head failed on a parsed head: {head:?}"));
    if head.traceparent.is_empty() && header_count(&rewritten) > Some(http1::MAX_HEADERS) {
        // The proxy forwards such a head as is; its own parser would refuse to read it back.
        return;
    }
    let new = complete_request(&rewritten, "the rewritten head");
    assert_eq!(
        new.len,
        rewritten.len(),
        "the rewritten head has another length"
    );
    assert_same_request(bytes, &head, &rewritten, &new);
    let [tp] = new.traceparent.as_slice() else {
        panic!(
            "{} traceparent lines after the rewrite",
            new.traceparent.len()
        );
    };
    assert_eq!(at(&rewritten, tp.value.clone()), TRACEPARENT.as_bytes());
    match head.traceparent.first() {
        Some(first) => {
            assert_eq!(tp.line.start, first.line.start, "traceparent moved");
            assert_eq!(
                at(&rewritten, tp.line.start..tp.value.start),
                at(bytes, first.line.start..first.value.start),
                "traceparent name or spacing changed"
            );
            assert_eq!(
                at(&rewritten, tp.value.end..tp.line.end),
                at(bytes, first.value.end..first.line.end),
                "traceparent line end changed"
            );
        }
        None => {
            assert_eq!(
                tp.line.start, head.insert_at,
                "traceparent not after the last header"
            );
            assert_eq!(
                at(&rewritten, tp.line.clone()),
                format!("traceparent: {TRACEPARENT}\r\n").as_bytes()
            );
        }
    }
    assert_eq!(
        without_lines(bytes, &head.traceparent),
        without_lines(&rewritten, &new.traceparent),
        "bytes other than the traceparent lines changed"
    );
}

/// Response-head parser and its body-framing decision: never panics; a complete head is no
/// longer than the input and parses the same alone; a chunked body after it passes
/// [`http1_chunked`]'s checks.
pub fn http1_response_head(data: &[u8]) {
    let Parse::Complete(head) = http1::parse_response_head(data) else {
        return;
    };
    assert!(
        0 < head.len && head.len <= data.len(),
        "head length {} of {}",
        head.len,
        data.len()
    );
    let bytes = at(data, 0..head.len);
    let Parse::Complete(alone) = http1::parse_response_head(bytes) else {
        panic!("the head alone does not parse");
    };
    assert_eq!(
        (alone.len, alone.code, alone.framing),
        (head.len, head.code, head.framing),
        "the head alone parses differently"
    );
    if head.framing == Some(Framing::Chunked) {
        check_chunked(at(data, head.len..data.len()), &[]);
    }
}

/// [`ChunkedDecoder`] fed in pieces. The first byte says how many of the next bytes (at most
/// [`MAX_SPLITS`]) are piece sizes (0: also feed an empty piece); the rest is the body. Each
/// step consumes at most what it was given (all of it unless the body is complete), and no
/// more payload than it consumed; fed in pieces, the body gives the same result as fed whole.
pub fn http1_chunked(data: &[u8]) {
    let (sizes, body) = split_plan(data);
    check_chunked(body, sizes);
}

fn split_plan(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return (&[], &[]);
    };
    let n = (usize::from(first) % (MAX_SPLITS + 1)).min(rest.len());
    rest.split_at(n)
}

fn check_chunked(body: &[u8], sizes: &[u8]) {
    let mut whole_decoder = ChunkedDecoder::new();
    let whole = whole_decoder.feed(body);
    if let Ok(p) = whole {
        check_step(p, body.len(), &whole_decoder);
    }
    let pieces = feed_in_pieces(body, sizes);
    match (whole, pieces) {
        (Ok(w), Ok(p)) => assert_eq!(w, p, "fed in pieces {sizes:?}, the body reads otherwise"),
        (Err(ChunkError), Err(ChunkError)) => {}
        (w, p) => panic!("fed whole: {w:?}; fed in pieces {sizes:?}: {p:?}"),
    }
}

/// Feeds `body` in pieces of the sizes in `sizes` (cycled; the rest at once if there are none)
/// and sums the progress, stopping at the end of the body.
fn feed_in_pieces(body: &[u8], sizes: &[u8]) -> Result<Progress, ChunkError> {
    let mut decoder = ChunkedDecoder::new();
    let mut total = Progress {
        consumed: 0,
        payload: 0,
        done: false,
    };
    let mut sizes = sizes.iter().cycle();
    while total.consumed < body.len() && !total.done {
        let left = at(body, total.consumed..body.len());
        let size = match sizes.next() {
            Some(0) => {
                let p = decoder.feed(&[])?;
                assert_eq!(
                    (p.consumed, p.payload),
                    (0, 0),
                    "an empty piece consumed bytes"
                );
                check_step(p, 0, &decoder);
                1
            }
            Some(&n) => usize::from(n),
            None => left.len(),
        };
        let piece = at(left, 0..size.min(left.len()));
        let p = decoder.feed(piece)?;
        check_step(p, piece.len(), &decoder);
        total.consumed += p.consumed;
        total.payload += p.payload;
        total.done = p.done;
    }
    if total.done {
        let after = decoder.feed(b"0\r\n\r\n")?;
        assert_eq!(
            after.consumed, 0,
            "bytes consumed after the end of the body"
        );
    }
    Ok(total)
}

fn check_step(p: Progress, available: usize, decoder: &ChunkedDecoder) {
    assert!(p.consumed <= available, "consumed {p:?} of {available}");
    assert!(
        p.payload <= p.consumed as u64,
        "more payload than bytes: {p:?}"
    );
    assert!(
        p.done || p.consumed == available,
        "stopped early without the end of the body: {p:?} of {available}"
    );
    assert_eq!(p.done, decoder.is_done(), "done disagrees with is_done");
}

fn complete_request(buf: &[u8], what: &str) -> RequestHead {
    match http1::parse_request_head(buf) {
        Parse::Complete(h) => h,
        other => panic!(
            "{what} does not parse ({other:?}): {:?}",
            String::from_utf8_lossy(buf)
        ),
    }
}

fn assert_same_request(a: &[u8], ha: &RequestHead, b: &[u8], hb: &RequestHead) {
    assert_eq!(at(a, ha.method.clone()), at(b, hb.method.clone()), "method");
    assert_eq!(at(a, ha.target.clone()), at(b, hb.target.clone()), "target");
    assert_eq!(ha.version, hb.version, "version");
    assert_eq!(ha.framing, hb.framing, "framing");
}

/// Header fields in a request head, counted without the proxy's limit.
fn header_count(head: &[u8]) -> Option<usize> {
    let mut headers = vec![httparse::EMPTY_HEADER; 2 * http1::MAX_HEADERS + 2];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    Some(req.headers.len())
}

/// `buf[range]`, with a message naming the range when it is out of bounds.
fn at(buf: &[u8], range: Range<usize>) -> &[u8] {
    buf.get(range.clone())
        .unwrap_or_else(|| panic!("range {range:?} outside {} bytes", buf.len()))
}

/// `buf` without the given header lines (in order, not overlapping).
fn without_lines(buf: &[u8], lines: &[HeaderLoc]) -> Vec<u8> {
    let mut out = Vec::with_capacity(buf.len());
    let mut pos = 0;
    for l in lines {
        out.extend_from_slice(at(buf, pos..l.line.start));
        pos = l.line.end;
    }
    out.extend_from_slice(at(buf, pos..buf.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::{Path, PathBuf};

    /// The committed seed inputs of one fuzz target.
    fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut out: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| {
                let path = e.expect("corpus entry").path();
                let data = std::fs::read(&path).expect("corpus file");
                (path, data)
            })
            .collect();
        out.sort();
        assert!(!out.is_empty(), "no seeds in {}", dir.display());
        out
    }

    #[test]
    fn seed_corpus_passes_the_checks() {
        for (path, data) in seeds("http1_request_head") {
            eprintln!("{}", path.display());
            http1_request_head(&data);
        }
        for (path, data) in seeds("http1_response_head") {
            eprintln!("{}", path.display());
            http1_response_head(&data);
        }
        for (path, data) in seeds("http1_chunked") {
            eprintln!("{}", path.display());
            http1_chunked(&data);
        }
        for (path, data) in seeds("http2") {
            eprintln!("{}", path.display());
            crate::protocol::h2::fuzz_one(&data);
        }
    }

    #[test]
    fn request_seeds_are_complete_heads() {
        for (path, data) in seeds("http1_request_head") {
            assert!(
                matches!(http1::parse_request_head(&data), Parse::Complete(_)),
                "{}",
                path.display()
            );
        }
    }

    #[test]
    fn chunked_seeds_are_whole_bodies() {
        for (path, data) in seeds("http1_chunked") {
            let (_, body) = split_plan(&data);
            let p = ChunkedDecoder::new().feed(body);
            assert!(p.is_ok_and(|p| p.done), "{}", path.display());
        }
    }

    #[test]
    fn split_plan_reads_sizes_then_body() {
        assert_eq!(split_plan(b""), (&b""[..], &b""[..]));
        assert_eq!(
            split_plan(b"\x02\x01\x05body"),
            (&b"\x01\x05"[..], &b"body"[..])
        );
        assert_eq!(split_plan(b"\x00body"), (&b""[..], &b"body"[..]));
        // 9 + 2 ≡ 2 (mod MAX_SPLITS + 1); more sizes than bytes: all of it is sizes.
        assert_eq!(split_plan(b"\x0b\x03"), (&b"\x03"[..], &b""[..]));
    }

    #[test]
    fn rewrite_check_accepts_a_head_at_the_header_limit() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..http1::MAX_HEADERS {
            head.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        http1_request_head(&head);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_pass_the_checks(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            http1_request_head(&data);
            http1_response_head(&data);
            http1_chunked(&data);
        }

        #[test]
        fn request_like_bytes_pass_the_checks(
            headers in proptest::collection::vec(("(?i:traceparent|[a-z-]{1,8})", "[ -~]{0,12}"), 0..6),
            tail in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut data = b"POST /p HTTP/1.1\r\n".to_vec();
            for (k, v) in &headers {
                data.extend_from_slice(format!("{k}:{v}\r\n").as_bytes());
            }
            data.extend_from_slice(b"\r\n");
            data.extend_from_slice(&tail);
            http1_request_head(&data);
        }
    }
}

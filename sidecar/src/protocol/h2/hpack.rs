//! The HPACK pieces the translator adds around `loona_hpack`'s decoder (RFC 7541): integers,
//! dynamic table size updates at the start of a block, a reusable decoded field list, and an
//! encoder that only writes literal representations, so the receiving decoder's dynamic table
//! stays empty.

use loona_hpack::decoder::{DecoderError, IntegerDecodingError, StringDecodingError};

/// Most octets after the prefix octet in an integer, as `loona_hpack` allows.
const MAX_INTEGER_CONTINUATIONS: usize = 4;

/// Decodes an integer with a `prefix_bits`-bit prefix (RFC 7541 §5.1) from the start of `buf`.
/// Returns the value and the number of octets used.
pub(super) fn decode_integer(buf: &[u8], prefix_bits: u8) -> Result<(usize, usize), DecoderError> {
    let mask = u8::MAX >> (8 - prefix_bits.clamp(1, 8));
    let first = *buf.first().ok_or(DecoderError::IntegerDecodingError(
        IntegerDecodingError::NotEnoughOctets,
    ))?;
    let mut value = u64::from(first & mask);
    if value < u64::from(mask) {
        return Ok((usize::from(first & mask), 1));
    }
    for (i, b) in buf
        .iter()
        .skip(1)
        .take(MAX_INTEGER_CONTINUATIONS)
        .enumerate()
    {
        value += u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let value = usize::try_from(value).map_err(|_| {
                DecoderError::IntegerDecodingError(IntegerDecodingError::ValueTooLarge)
            })?;
            return Ok((value, i + 2));
        }
    }
    if buf.len() > MAX_INTEGER_CONTINUATIONS + 1 {
        Err(DecoderError::IntegerDecodingError(
            IntegerDecodingError::TooManyOctets,
        ))
    } else {
        Err(DecoderError::IntegerDecodingError(
            IntegerDecodingError::NotEnoughOctets,
        ))
    }
}

/// Appends `value` as an integer with a `prefix_bits`-bit prefix; `first` holds the bits above
/// the prefix in the first octet.
pub(super) fn encode_integer(out: &mut Vec<u8>, value: usize, prefix_bits: u8, first: u8) {
    let mask = u8::MAX >> (8 - prefix_bits.clamp(1, 8));
    let first = first & !mask;
    if value < usize::from(mask) {
        out.push(first | value as u8);
        return;
    }
    out.push(first | mask);
    let mut rest = value - usize::from(mask);
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// Dynamic table size updates found at the start of a header block, compacted to at most two
/// with the same effect: the smallest size reached before the last update, then the last one
/// (RFC 7541 §4.2 needs no more).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct SizeUpdates {
    /// The updates to re-emit, in order.
    sizes: [usize; 2],
    /// How many of `sizes` are in use.
    len: usize,
}

impl SizeUpdates {
    /// Records one more update.
    fn push(&mut self, size: usize) {
        match self.len {
            0 | 1 => {
                self.sizes[self.len] = size;
                self.len += 1;
            }
            _ => self.sizes = [self.sizes[0].min(self.sizes[1]), size],
        }
    }

    /// The updates, in order.
    pub fn as_slice(&self) -> &[usize] {
        self.sizes.get(..self.len).unwrap_or_default()
    }

    /// Appends the updates as HPACK representations.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for size in self.as_slice() {
            encode_integer(out, *size, 5, 0x20);
        }
    }
}

/// Reads the dynamic table size updates (`001xxxxx`) at the start of `block`, calling `apply`
/// with each size in order. Returns them and the number of octets they take.
pub(super) fn leading_size_updates(
    block: &[u8],
    mut apply: impl FnMut(usize) -> Result<(), DecoderError>,
) -> Result<(SizeUpdates, usize), DecoderError> {
    let mut updates = SizeUpdates::default();
    let mut pos = 0;
    while let Some(rest) = block
        .get(pos..)
        .filter(|r| r.first().is_some_and(|b| b & 0xe0 == 0x20))
    {
        let (size, used) = decode_integer(rest, 5)?;
        apply(size)?;
        updates.push(size);
        pos += used;
    }
    Ok((updates, pos))
}

/// Copies `block` to `out` with every Huffman-coded string literal replaced by its raw form
/// (see [`super::huffman`]); `scratch` is working space. Representations are otherwise copied
/// byte for byte, so decoding `out` gives what decoding `block` would, errors included.
pub(super) fn unhuffman(
    block: &[u8],
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Result<(), DecoderError> {
    let mut pos = 0;
    while let Some(&first) = block.get(pos) {
        // Integer prefix length, and whether string literals follow (RFC 7541 §6).
        let (prefix, literal) = if first & 0x80 != 0 {
            (7, false)
        } else if first & 0x40 != 0 {
            (6, true)
        } else if first & 0x20 != 0 {
            (5, false)
        } else {
            (4, true)
        };
        let rest = block.get(pos..).unwrap_or_default();
        let (index, used) = decode_integer(rest, prefix)?;
        out.extend_from_slice(rest.get(..used).unwrap_or_default());
        pos += used;
        if literal {
            if index == 0 {
                pos += unhuffman_string(block.get(pos..).unwrap_or_default(), out, scratch)?;
            }
            pos += unhuffman_string(block.get(pos..).unwrap_or_default(), out, scratch)?;
        }
    }
    Ok(())
}

/// Copies the string literal at the start of `src` to `out`, raw; returns the octets it took.
fn unhuffman_string(
    src: &[u8],
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Result<usize, DecoderError> {
    let (len, used) = decode_integer(src, 7)?;
    let taken = used.saturating_add(len);
    let body = src
        .get(used..taken)
        .ok_or(DecoderError::StringDecodingError(
            StringDecodingError::NotEnoughOctets,
        ))?;
    if src.first().is_some_and(|b| b & 0x80 != 0) {
        scratch.clear();
        super::huffman::decode(body, scratch).map_err(|e| {
            DecoderError::StringDecodingError(StringDecodingError::HuffmanDecoderError(e))
        })?;
        encode_string(out, scratch);
    } else {
        out.extend_from_slice(src.get(..taken).unwrap_or_default());
    }
    Ok(taken)
}

/// HPACK's accounting overhead per header field (RFC 7541 §4.1).
pub(super) const FIELD_OVERHEAD: usize = 32;
/// Capacity kept in reusable buffers between header blocks; anything larger is freed.
const KEEP_CAPACITY: usize = 64 * 1024;

/// A decoded header list, names and values stored back to back in one reusable buffer.
#[derive(Debug, Default)]
pub(super) struct FieldList {
    /// Names and values, back to back.
    bytes: Vec<u8>,
    /// Per field: start in `bytes`, name length, value length.
    fields: Vec<(usize, usize, usize)>,
    /// Sum of field sizes (name + value + 32) pushed, including refused ones.
    size: usize,
    /// A field was refused because the list would exceed its limit.
    overflow: bool,
}

impl FieldList {
    /// Empties the list, freeing oversized buffers.
    pub fn clear(&mut self) {
        if self.bytes.capacity() > KEEP_CAPACITY {
            self.bytes = Vec::new();
        }
        if self.fields.capacity() * std::mem::size_of::<(usize, usize, usize)>() > KEEP_CAPACITY {
            self.fields = Vec::new();
        }
        self.bytes.clear();
        self.fields.clear();
        self.size = 0;
        self.overflow = false;
    }

    /// Appends a field unless the list's size (RFC 7541 §4.1) would exceed `limit`.
    pub fn push(&mut self, name: &[u8], value: &[u8], limit: usize) {
        self.size = self
            .size
            .saturating_add(name.len() + value.len() + FIELD_OVERHEAD);
        if self.overflow || self.size > limit {
            self.overflow = true;
            return;
        }
        self.fields
            .push((self.bytes.len(), name.len(), value.len()));
        self.bytes.extend_from_slice(name);
        self.bytes.extend_from_slice(value);
    }

    /// Whether a field was refused for size.
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// The fields, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.fields.iter().map(|&(start, n, v)| {
            let name = self.bytes.get(start..start + n).unwrap_or_default();
            let value = self.bytes.get(start + n..start + n + v).unwrap_or_default();
            (name, value)
        })
    }

    /// The value of the first field called `name`.
    pub fn first(&self, name: &[u8]) -> Option<&[u8]> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// Frees `buf`'s storage if it grew beyond what is worth keeping, else empties it.
pub(super) fn reset_buffer(buf: &mut Vec<u8>) {
    if buf.capacity() > KEEP_CAPACITY {
        *buf = Vec::new();
    } else {
        buf.clear();
    }
}

/// Field names always sent as "never indexed" (RFC 7541 §7.1.3): credentials and cookies.
fn never_indexed(name: &[u8]) -> bool {
    matches!(
        name,
        b"authorization" | b"proxy-authorization" | b"cookie" | b"set-cookie"
    )
}

/// Index of the first static table entry (RFC 7541 Appendix A) with this name.
pub(super) fn static_name_index(name: &[u8]) -> Option<usize> {
    Some(match name {
        b":authority" => 1,
        b":method" => 2,
        b":path" => 4,
        b":scheme" => 6,
        b":status" => 8,
        b"accept-charset" => 15,
        b"accept-encoding" => 16,
        b"accept-language" => 17,
        b"accept-ranges" => 18,
        b"accept" => 19,
        b"access-control-allow-origin" => 20,
        b"age" => 21,
        b"allow" => 22,
        b"authorization" => 23,
        b"cache-control" => 24,
        b"content-disposition" => 25,
        b"content-encoding" => 26,
        b"content-language" => 27,
        b"content-length" => 28,
        b"content-location" => 29,
        b"content-range" => 30,
        b"content-type" => 31,
        b"cookie" => 32,
        b"date" => 33,
        b"etag" => 34,
        b"expect" => 35,
        b"expires" => 36,
        b"from" => 37,
        b"host" => 38,
        b"if-match" => 39,
        b"if-modified-since" => 40,
        b"if-none-match" => 41,
        b"if-range" => 42,
        b"if-unmodified-since" => 43,
        b"last-modified" => 44,
        b"link" => 45,
        b"location" => 46,
        b"max-forwards" => 47,
        b"proxy-authenticate" => 48,
        b"proxy-authorization" => 49,
        b"range" => 50,
        b"referer" => 51,
        b"refresh" => 52,
        b"retry-after" => 53,
        b"server" => 54,
        b"set-cookie" => 55,
        b"strict-transport-security" => 56,
        b"transfer-encoding" => 57,
        b"user-agent" => 58,
        b"vary" => 59,
        b"via" => 60,
        b"www-authenticate" => 61,
        _ => return None,
    })
}

/// Appends a raw (not Huffman-coded) string literal.
fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_integer(out, s.len(), 7, 0);
    out.extend_from_slice(s);
}

/// Appends a field as a literal without indexing (`0000xxxx`), or never indexed (`0001xxxx`)
/// for credentials and cookies; the name comes from the static table when it is there.
pub(super) fn encode_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    let first = if never_indexed(name) { 0x10 } else { 0x00 };
    match static_name_index(name) {
        Some(index) => encode_integer(out, index, 4, first),
        None => {
            out.push(first);
            encode_string(out, name);
        }
    }
    encode_string(out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn static_names_match_the_decoders_table() {
        let mut decoder = loona_hpack::Decoder::new();
        let mut first_index = std::collections::HashMap::new();
        for index in 1..=61usize {
            let mut block = Vec::new();
            encode_integer(&mut block, index, 4, 0);
            encode_string(&mut block, b"v");
            let fields = decoder.decode(&block).expect("decodes");
            let name = fields.first().map(|f| f.0.clone()).expect("one field");
            first_index.entry(name).or_insert(index);
        }
        for (name, index) in &first_index {
            assert_eq!(static_name_index(name), Some(*index));
        }
        assert_eq!(static_name_index(b"traceparent"), None);
    }

    #[test]
    fn integers_match_rfc_examples() {
        let mut out = Vec::new();
        encode_integer(&mut out, 10, 5, 0);
        encode_integer(&mut out, 1337, 5, 0);
        encode_integer(&mut out, 42, 8, 0);
        assert_eq!(out, [10, 31, 154, 10, 42]);
        assert_eq!(decode_integer(&[31, 154, 10], 5), Ok((1337, 3)));
        assert!(decode_integer(&[31, 154], 5).is_err());
        assert!(decode_integer(&[31, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1], 5).is_err());
    }

    #[test]
    fn size_updates_are_read_and_compacted() {
        let mut block = Vec::new();
        for size in [4096, 0, 100, 2048] {
            encode_integer(&mut block, size, 5, 0x20);
        }
        block.push(0x82);
        let mut applied = Vec::new();
        let (updates, used) = leading_size_updates(&block, |s| {
            applied.push(s);
            Ok(())
        })
        .expect("valid");
        assert_eq!(applied, [4096, 0, 100, 2048]);
        assert_eq!(updates.as_slice(), [0, 2048]);
        assert_eq!(used, block.len() - 1);
    }

    #[test]
    fn unhuffman_gives_the_same_fields() {
        // RFC 7541 C.4.1 (Huffman) then C.4.2, sharing one decoder state each way.
        let blocks: [&[u8]; 2] = [
            &[
                0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
                0x90, 0xf4, 0xff,
            ],
            &[
                0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf,
            ],
        ];
        let mut direct = loona_hpack::Decoder::new();
        let mut via_raw = loona_hpack::Decoder::new();
        for b in blocks {
            let mut raw = Vec::new();
            unhuffman(b, &mut raw, &mut Vec::new()).expect("valid");
            assert!(raw.len() > b.len());
            assert_eq!(via_raw.decode(&raw), direct.decode(b));
        }
        let mut raw = Vec::new();
        assert!(unhuffman(&[0x40, 0x85, 0xff], &mut raw, &mut Vec::new()).is_err());
    }

    proptest! {
        #[test]
        fn unhuffman_agrees_with_loona(block in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut raw = Vec::new();
            let ours = unhuffman(&block, &mut raw, &mut Vec::new())
                .and_then(|()| loona_hpack::Decoder::new().decode(&raw));
            let theirs = loona_hpack::Decoder::new().decode(&block);
            // Errors may be found at different places; successes must be identical.
            match (ours, theirs) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "ours {:?} theirs {:?}", a, b),
            }
        }

        #[test]
        fn integers_round_trip(value in 0usize..(1 << 28), prefix in 1u8..=8) {
            let mut out = Vec::new();
            encode_integer(&mut out, value, prefix, 0xff);
            prop_assert_eq!(decode_integer(&out, prefix), Ok((value, out.len())));
        }

        #[test]
        fn literal_fields_decode_back(name in "[a-z-]{1,20}", value in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut out = Vec::new();
            encode_field(&mut out, name.as_bytes(), &value);
            let mut decoder = loona_hpack::Decoder::new();
            let fields = decoder.decode(&out).expect("decodes");
            prop_assert_eq!(fields, vec![(name.into_bytes(), value)]);
        }
    }
}

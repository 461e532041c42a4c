//! HPACK Huffman decoding (RFC 7541 §5.2, Appendix B) from a table computed at compile time.
//! Header blocks have their Huffman-coded strings made raw by this before `loona_hpack`
//! decodes them, because its own decoder rebuilds a hash map of all 257 codes for every string
//! (tens of microseconds each). Errors are loona's, so the outcome is the same either way.

use loona_hpack::huffman::HuffmanDecoderError;

/// Code length in bits of each symbol (0..=255, then EOS = 256), RFC 7541 Appendix B. The code
/// is canonical: codes of one length are consecutive, in symbol order, so the lengths suffice.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, //
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, //
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, //
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, //
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, //
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, //
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
    30,
];

/// The end-of-string symbol.
const EOS: u16 = 256;
/// Longest code.
const MAX_LEN: usize = 30;

/// Canonical decoding table: per code length, the first code, how many codes, and where their
/// symbols start in `symbols` (ordered by length, then symbol).
struct Table {
    /// First (lowest) code of each length.
    first_code: [u32; MAX_LEN + 1],
    /// Number of codes of each length.
    count: [u32; MAX_LEN + 1],
    /// Index in `symbols` of the first symbol of each length.
    first_index: [u16; MAX_LEN + 1],
    /// Symbols by code length, then symbol value (so by code).
    symbols: [u16; 257],
}

/// Builds the canonical table from [`CODE_LENGTHS`].
const fn build() -> Table {
    let mut t = Table {
        first_code: [0; MAX_LEN + 1],
        count: [0; MAX_LEN + 1],
        first_index: [0; MAX_LEN + 1],
        symbols: [0; 257],
    };
    let mut next = 0;
    let mut code = 0u32;
    let mut len = 1;
    while len <= MAX_LEN {
        t.first_code[len] = code;
        t.first_index[len] = next as u16;
        let mut sym = 0;
        while sym < 257 {
            if CODE_LENGTHS[sym] as usize == len {
                t.symbols[next] = sym as u16;
                next += 1;
                t.count[len] += 1;
            }
            sym += 1;
        }
        code = (code + t.count[len]) << 1;
        len += 1;
    }
    t
}

/// The decoding table.
static TABLE: Table = build();

/// The code of `symbol` (for tests): its value and length.
#[cfg(test)]
pub(super) fn code_of(symbol: u16) -> (u32, usize) {
    let len = usize::from(CODE_LENGTHS[usize::from(symbol)]);
    let start = usize::from(TABLE.first_index[len]);
    let pos = TABLE.symbols[start..start + TABLE.count[len] as usize]
        .iter()
        .position(|s| *s == symbol)
        .expect("symbol has a code");
    (TABLE.first_code[len] + pos as u32, len)
}

/// Appends the decoding of the Huffman-coded `src` to `out`. Fails like loona's decoder: EOS
/// inside the string, more than 7 bits of padding, or padding that is not all ones.
pub(super) fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), HuffmanDecoderError> {
    let mut code = 0u32;
    let mut len = 0usize;
    for byte in src {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            // Every 30-bit sequence starts with a code, so `len` never passes MAX_LEN.
            let (Some(first), Some(count), Some(index)) = (
                TABLE.first_code.get(len),
                TABLE.count.get(len),
                TABLE.first_index.get(len),
            ) else {
                return Err(HuffmanDecoderError::InvalidPadding);
            };
            let offset = code.wrapping_sub(*first);
            if code >= *first && offset < *count {
                let symbol = TABLE
                    .symbols
                    .get(usize::from(*index) + offset as usize)
                    .copied()
                    .unwrap_or(EOS);
                if symbol == EOS {
                    return Err(HuffmanDecoderError::EOSInString);
                }
                out.push(symbol as u8);
                code = 0;
                len = 0;
            }
        }
    }
    if len > 7 {
        return Err(HuffmanDecoderError::PaddingTooLarge);
    }
    if code != (1u32 << len) - 1 {
        return Err(HuffmanDecoderError::InvalidPadding);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::huffman::HuffmanDecoder;
    use proptest::prelude::*;

    /// Huffman-encodes `s`, padding with ones.
    fn encode(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut acc = 0u64;
        let mut bits = 0;
        for b in s {
            let (code, len) = code_of(u16::from(*b));
            acc = (acc << len) | u64::from(code);
            bits += len;
            while bits >= 8 {
                out.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) | ((1 << (8 - bits)) - 1)) as u8);
        }
        out
    }

    #[test]
    fn rfc_examples() {
        // RFC 7541 C.4.1 and C.6.1.
        let mut out = Vec::new();
        decode(
            &[
                0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
            ],
            &mut out,
        )
        .expect("valid");
        assert_eq!(out, b"www.example.com");
        out.clear();
        decode(&[0x64, 0x02], &mut out).expect("valid");
        assert_eq!(out, b"302");
        assert_eq!(code_of(EOS), (0x3fff_ffff, 30));
        assert_eq!(code_of(u16::from(b'0')), (0, 5));
    }

    #[test]
    fn every_code_matches_loonas_table() {
        for symbol in 0..=255u16 {
            let encoded = encode(&[symbol as u8]);
            let theirs = HuffmanDecoder::new().decode(&encoded);
            assert_eq!(theirs, Ok(vec![symbol as u8]), "symbol {symbol}");
        }
    }

    proptest! {
        #[test]
        fn round_trips(s in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            decode(&encode(&s), &mut out).expect("valid");
            prop_assert_eq!(out, s);
        }

        #[test]
        fn agrees_with_loona_on_any_bytes(src in proptest::collection::vec(any::<u8>(), 0..24)) {
            let mut out = Vec::new();
            let ours = decode(&src, &mut out).map(|()| out);
            prop_assert_eq!(ours, HuffmanDecoder::new().decode(&src));
        }

        #[test]
        fn agrees_with_loona_on_mostly_valid_bytes(
            s in proptest::collection::vec(any::<u8>(), 0..16),
            flip in any::<usize>(),
            cut in 0usize..3,
        ) {
            // A valid encoding with one bit flipped and up to two bytes cut off.
            let mut src = encode(&s);
            if !src.is_empty() {
                let i = flip % (src.len() * 8);
                src[i / 8] ^= 1 << (i % 8);
                src.truncate(src.len().saturating_sub(cut));
            }
            let mut out = Vec::new();
            let ours = decode(&src, &mut out).map(|()| out);
            prop_assert_eq!(ours, HuffmanDecoder::new().decode(&src));
        }
    }
}

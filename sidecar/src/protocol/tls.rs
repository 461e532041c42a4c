//! TLS ClientHello recognition: decides whether a connection's first bytes are a TLS handshake
//! record carrying a ClientHello and extracts the server name (SNI) and offered ALPN protocols,
//! bounds-checked and never panicking, from whatever prefix has arrived. Bytes are only read.

/// Most handshake bytes reassembled while looking for the end of a ClientHello.
pub const MAX_HELLO_BYTES: usize = 16 * 1024;
/// Most ALPN protocols kept (the rest are dropped to bound attribute cardinality).
pub const MAX_ALPN: usize = 4;
/// Longest ALPN protocol id kept.
const MAX_ALPN_LEN: usize = 32;
/// Longest DNS name (RFC 1035).
const MAX_SNI_LEN: usize = 253;
/// Largest TLS record fragment allowed (2^14 plus the permitted expansion).
const MAX_RECORD_LEN: usize = (1 << 14) + 2048;

const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// Facts read from a ClientHello.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// `host_name` from the `server_name` extension, lower-cased; `None` when absent or not a
    /// plausible DNS name.
    pub sni: Option<String>,
    /// ALPN protocol ids offered, in the client's order, at most [`MAX_ALPN`].
    pub alpn: Vec<String>,
}

impl TlsInfo {
    /// The offered ALPN ids joined with `,` (empty when none were offered).
    pub fn alpn_joined(&self) -> String {
        self.alpn.join(",")
    }
}

/// Verdict on a prefix of a connection's first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A TLS handshake record header announcing a ClientHello.
    Tls,
    /// Cannot be a TLS ClientHello.
    NotTls,
    /// A prefix of such a header: more bytes are needed.
    NeedMore,
}

/// Classifies the first bytes: record type handshake, version 3.x, a plausible length and
/// handshake type ClientHello.
pub fn classify(buf: &[u8]) -> Class {
    /// Whether the byte at each header position can start a ClientHello record.
    fn plausible(i: usize, b: u8) -> bool {
        match i {
            0 => b == CONTENT_HANDSHAKE,
            1 => b == 3,
            2 => b <= 4,
            5 => b == HANDSHAKE_CLIENT_HELLO,
            _ => true,
        }
    }
    let header = buf.get(..6).unwrap_or(buf);
    if !header.iter().enumerate().all(|(i, b)| plausible(i, *b)) {
        return Class::NotTls;
    }
    let [_, _, _, hi, lo, _] = *header else {
        return Class::NeedMore;
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len == 0 || len > MAX_RECORD_LEN {
        return Class::NotTls;
    }
    Class::Tls
}

/// Outcome of parsing the ClientHello from a prefix of the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse {
    /// The whole ClientHello arrived and was read.
    Complete(TlsInfo),
    /// It is not finished yet (and the bound is not reached).
    NeedMore,
    /// Malformed, not a ClientHello, or longer than [`MAX_HELLO_BYTES`]: give up.
    Invalid,
}

/// Reassembles the handshake stream from consecutive handshake records at the start of `buf`
/// and parses the ClientHello if it is complete.
pub fn parse_client_hello(buf: &[u8]) -> Parse {
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        if let Some(parse) = hello_from_handshake(&handshake) {
            return parse;
        }
        if handshake.len() >= MAX_HELLO_BYTES {
            return Parse::Invalid;
        }
        let Some(header) = rest.get(..5) else {
            return Parse::NeedMore;
        };
        if header[0] != CONTENT_HANDSHAKE || header[1] != 3 {
            return Parse::Invalid;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD_LEN {
            return Parse::Invalid;
        }
        let Some(fragment) = rest.get(5..5 + len) else {
            // A hello is only complete once its last record is: wait for the rest.
            return Parse::NeedMore;
        };
        handshake.extend_from_slice(fragment);
        rest = rest.get(5 + len..).unwrap_or_default();
    }
}

/// `Some` once the handshake bytes hold a whole first message (or prove it is not a hello).
fn hello_from_handshake(hs: &[u8]) -> Option<Parse> {
    let header = hs.get(..4)?;
    if header[0] != HANDSHAKE_CLIENT_HELLO {
        return Some(Parse::Invalid);
    }
    let len = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
    if len > MAX_HELLO_BYTES {
        return Some(Parse::Invalid);
    }
    let body = hs.get(4..4 + len)?;
    Some(match read_hello(body) {
        Some(info) => Parse::Complete(info),
        None => Parse::Invalid,
    })
}

/// A cursor over a byte slice whose every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let head = self.0.get(..n)?;
        self.0 = self.0.get(n..)?;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).and_then(|b| b.first().copied())
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Reads a ClientHello body (after the handshake header).
fn read_hello(body: &[u8]) -> Option<TlsInfo> {
    let mut r = Reader(body);
    let version = r.u16()?;
    if version >> 8 != 3 {
        return None;
    }
    r.take(32)?; // random
    let session_id = r.vec8()?;
    if session_id.len() > 32 {
        return None;
    }
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut info = TlsInfo::default();
    if r.is_empty() {
        return Some(info); // no extensions
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        match kind {
            EXT_SERVER_NAME => info.sni = read_sni(data),
            EXT_ALPN => info.alpn = read_alpn(data)?,
            _ => {}
        }
    }
    Some(info)
}

/// The first `host_name` entry of a `server_name` extension, if it is a plausible DNS name.
fn read_sni(data: &[u8]) -> Option<String> {
    let mut list = Reader(Reader(data).vec16()?);
    while !list.is_empty() {
        let name_type = list.u8()?;
        let name = list.vec16()?;
        if name_type == 0 {
            return valid_hostname(name).then(|| {
                String::from_utf8_lossy(name)
                    .trim_end_matches('.')
                    .to_ascii_lowercase()
            });
        }
    }
    None
}

fn valid_hostname(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SNI_LEN
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// The offered ALPN ids; ids that are not short printable ASCII are skipped, at most
/// [`MAX_ALPN`] kept. `None` when the extension is malformed.
fn read_alpn(data: &[u8]) -> Option<Vec<String>> {
    let mut list = Reader(Reader(data).vec16()?);
    let mut out = Vec::new();
    while !list.is_empty() {
        let id = list.vec8()?;
        let printable = id.iter().all(|b| b.is_ascii_graphic());
        if out.len() < MAX_ALPN && !id.is_empty() && id.len() <= MAX_ALPN_LEN && printable {
            out.push(String::from_utf8_lossy(id).into_owned());
        }
    }
    Some(out)
}

/// Test fixture shared with the proxy tests.
#[cfg(test)]
pub(crate) mod fixtures {
    /// A ClientHello captured from `openssl s_client -servername api.example.test -alpn
    /// h2,http/1.1` (OpenSSL 3, TLS 1.3 with 1.2 fallback), one record.
    const OPENSSL_HELLO: &[&str] = &[
        "160301014f0100014b03038dc30c5efe6e0e375cfc8aaeb2ae6b705d5d58b9a882aadc615a9b7cf6",
        "11abac20bb67d43d3b343c489d8e189571b497631ff17c563720f8bb388e26e3bde90d0b003e1302",
        "13031301c02cc030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039",
        "c009c0130033009d009c003d003c0035002f00ff010000c40000001500130000106170692e657861",
        "6d706c652e74657374000b000403000102000a00160014001d0017001e0019001801000101010201",
        "030104002300000010000e000c02683208687474702f312e310016000000170000000d002a002804",
        "0305030603080708080809080a080b08040805080604010501060103030301030204020502060200",
        "2b0009080304030303020301002d00020101003300260024001d0020c4d4dbe6e34df04c3e76cbaf",
        "670d73e17b08da701e809f6022cfd73ce12f3d2f",
    ];

    pub(crate) fn hello() -> Vec<u8> {
        let hex: String = OPENSSL_HELLO.concat();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::hello;
    use super::*;
    use proptest::prelude::*;

    fn expected() -> TlsInfo {
        TlsInfo {
            sni: Some("api.example.test".to_string()),
            alpn: vec!["h2".to_string(), "http/1.1".to_string()],
        }
    }

    #[test]
    fn openssl_hello_is_tls_with_sni_and_alpn() {
        let bytes = hello();
        assert_eq!(classify(&bytes), Class::Tls);
        assert_eq!(parse_client_hello(&bytes), Parse::Complete(expected()));
        assert_eq!(expected().alpn_joined(), "h2,http/1.1");
    }

    #[test]
    fn every_prefix_needs_more_and_classifies_consistently() {
        let bytes = hello();
        for n in 0..bytes.len() {
            assert_eq!(
                parse_client_hello(&bytes[..n]),
                Parse::NeedMore,
                "prefix {n}"
            );
            let class = classify(&bytes[..n]);
            let want = if n < 6 { Class::NeedMore } else { Class::Tls };
            assert_eq!(class, want, "prefix {n}");
        }
    }

    /// Re-frames the same handshake message into records of at most `size` bytes each.
    fn split_records(bytes: &[u8], size: usize) -> Vec<u8> {
        let handshake = &bytes[5..];
        let mut out = Vec::new();
        for chunk in handshake.chunks(size) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn hello_split_over_several_records_is_reassembled() {
        let bytes = hello();
        for size in [1, 7, 64, 200] {
            let framed = split_records(&bytes, size);
            assert_eq!(
                parse_client_hello(&framed),
                Parse::Complete(expected()),
                "size {size}"
            );
            let last_len = (bytes.len() - 5) % size;
            let cut = framed.len() - if last_len == 0 { size } else { last_len };
            assert_eq!(
                parse_client_hello(&framed[..cut]),
                Parse::NeedMore,
                "size {size}"
            );
        }
    }

    #[test]
    fn garbage_and_other_protocols_are_not_tls() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Class::NotTls);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Class::NotTls);
        assert_eq!(classify(b"\x16\x03\x01\x00\x05\x02"), Class::NotTls); // ServerHello
        assert_eq!(classify(b"\x16\x02\x01\x00\x05\x01"), Class::NotTls);
        assert_eq!(classify(b"\x16\x03\x01\x00\x00\x01"), Class::NotTls); // empty record
        assert_eq!(classify(b"\x16\x03\x01\xff\xff\x01"), Class::NotTls); // oversized
        assert_eq!(classify(b"\x17\x03\x03\x00\x10\x01"), Class::NotTls); // application data
        assert_eq!(
            parse_client_hello(b"\x17\x03\x03\x00\x01\x00"),
            Parse::Invalid
        );
        assert_eq!(
            parse_client_hello(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"),
            Parse::Invalid
        );
    }

    #[test]
    fn corrupt_lengths_are_invalid_not_panics() {
        let mut bytes = hello();
        // Session id length beyond 32.
        bytes[5 + 4 + 2 + 32] = 0xff;
        assert_eq!(parse_client_hello(&bytes), Parse::Invalid);
        // A handshake length beyond the bound.
        let mut big = hello();
        big[6] = 0x7f;
        assert_eq!(parse_client_hello(&big), Parse::Invalid);
    }

    #[test]
    fn hello_without_extensions_has_no_facts() {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0u8; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        let mut hs = vec![0x01, 0, 0, u8::try_from(body.len()).unwrap()];
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01, 0, u8::try_from(hs.len()).unwrap()];
        rec.extend_from_slice(&hs);
        assert_eq!(
            parse_client_hello(&rec),
            Parse::Complete(TlsInfo::default())
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let class = classify(&data);
            if let Parse::Complete(info) = parse_client_hello(&data) {
                prop_assert_eq!(class, Class::Tls);
                prop_assert!(info.alpn.len() <= MAX_ALPN);
            }
        }

        #[test]
        fn mutated_hello_never_panics(pos in 0usize..340, byte in any::<u8>()) {
            let mut bytes = hello();
            if let Some(b) = bytes.get_mut(pos) {
                *b = byte;
            }
            if let Parse::Complete(info) = parse_client_hello(&bytes) {
                prop_assert!(info.alpn.len() <= MAX_ALPN);
                prop_assert!(info.sni.is_none_or(|s| s.len() <= MAX_SNI_LEN));
            }
        }
    }
}

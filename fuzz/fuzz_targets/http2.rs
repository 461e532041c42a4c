//! Arbitrary bytes into the HTTP/2 translator's frame and HPACK handling; see
//! `sidecar::protocol::h2::fuzz_one`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sidecar::protocol::h2::fuzz_one(data));

//! Arbitrary bytes into the chunked-body decoder, fed in pieces whose sizes the input chooses;
//! see `sidecar::fuzzing::http1_chunked`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sidecar::fuzzing::http1_chunked(data));

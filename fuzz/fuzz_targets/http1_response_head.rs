//! Arbitrary bytes into the HTTP/1 response-head parser and its body-framing decision; see
//! `sidecar::fuzzing::http1_response_head`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sidecar::fuzzing::http1_response_head(data));

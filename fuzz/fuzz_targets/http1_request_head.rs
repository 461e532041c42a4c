//! Arbitrary bytes into the HTTP/1 request-head parser, then `traceparent` injection; see
//! `sidecar::fuzzing::http1_request_head` for the invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sidecar::fuzzing::http1_request_head(data));

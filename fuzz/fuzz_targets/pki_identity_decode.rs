//! Arbitrary bytes as an identity certificate: decoding must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    postern_pki::fuzzing::decode_identity(data);
});

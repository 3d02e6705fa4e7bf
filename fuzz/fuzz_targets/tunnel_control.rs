//! Arbitrary bytes on a tunnel's control channel: decoding must never panic, and every
//! frame accepted must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    postern_tunnel::fuzzing::control_decode(data);
});

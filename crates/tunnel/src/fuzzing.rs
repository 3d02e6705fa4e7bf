//! Entry points for `fuzz/` targets; ordinary tests run them too.

use crate::control::Control;

/// Decodes arbitrary bytes as a stream of control frames, as both ends of a tunnel do,
/// until the bytes run out or a frame is refused. Every frame accepted must encode back
/// to exactly the bytes it was decoded from. Panics only if that fails (a bug); never on
/// the input itself.
pub fn control_decode(data: &[u8]) {
    let mut rest = data;
    let mut encoded = Vec::new();
    while let Ok(Some((message, used))) = Control::decode(rest) {
        assert!(
            used > 0 && used <= rest.len(),
            "frame length {used} out of range"
        );
        encoded.clear();
        // Invariant: the decoder accepts nothing the encoder's limits refuse.
        message
            .encode(&mut encoded)
            .expect("a decoded message must encode");
        assert_eq!(encoded, rest[..used], "decode/encode is not canonical");
        rest = &rest[used..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Hand-made frames and near-misses go through the fuzz entry point without panicking.
    #[test]
    fn seed_inputs_run_clean() {
        let seeds: [&[u8]; 6] = [
            b"",
            b"H\0\0\0\0A\0\0\0\0",
            b"D\0\0\0\x08\0\x02\x02pg\x02my",
            b"D\0\0\0\x08\0\x02\x02pg\x02myH\0\0\0\0X",
            b"D\xff\xff\xff\xff",
            b"D\0\0\0\x03\0\x01\x05",
        ];
        for seed in seeds {
            control_decode(seed);
        }
    }

    proptest! {
        // Arbitrary bytes and valid frames with garbage after them never trip the entry point.
        #[test]
        fn arbitrary_streams_run_clean(
            prefix in proptest::collection::vec("[a-z]{1,8}", 0..4),
            tail in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut data = Vec::new();
            Control::Databases(prefix).encode(&mut data).unwrap();
            Control::Heartbeat.encode(&mut data).unwrap();
            data.extend_from_slice(&tail);
            control_decode(&data);
            control_decode(&tail);
        }
    }
}

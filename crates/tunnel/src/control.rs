//! The control channel: the first channel an agent opens on a tunnel. It carries the
//! agent's list of databases and heartbeats both ways. Sans-IO codec.
//!
//! A frame is a 1-byte tag, a 4-byte big-endian payload length, and the payload:
//!
//! | tag | message | payload |
//! |---|---|---|
//! | `H` | heartbeat (agent → proxy) | empty |
//! | `A` | heartbeat acknowledgement (proxy → agent) | empty |
//! | `D` | the databases the agent serves (agent → proxy) | u16 count, then per name a u8 length and UTF-8 bytes |

use crate::error::Error;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 5;
/// Longest payload accepted or sent.
pub const PAYLOAD_LEN_MAX: usize = 64 * 1024;
/// Longest database name, in bytes.
pub const DATABASE_NAME_LEN_MAX: usize = 255;

const TAG_HEARTBEAT: u8 = b'H';
const TAG_HEARTBEAT_ACK: u8 = b'A';
const TAG_DATABASES: u8 = b'D';

/// One control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    Heartbeat,
    HeartbeatAck,
    /// The complete list of databases the agent serves.
    Databases(Vec<String>),
}

impl Control {
    /// Appends this message's frame to `out`. Fails (appending nothing) for a database
    /// list that does not fit the limits.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        let (tag, payload) = match self {
            Control::Heartbeat => (TAG_HEARTBEAT, Vec::new()),
            Control::HeartbeatAck => (TAG_HEARTBEAT_ACK, Vec::new()),
            Control::Databases(names) => (TAG_DATABASES, encode_databases(names)?),
        };
        if payload.len() > PAYLOAD_LEN_MAX {
            return Err(Error::ControlMalformed {
                reason: format!(
                    "database list is {} bytes, more than the limit of {PAYLOAD_LEN_MAX}",
                    payload.len()
                ),
            });
        }
        out.push(tag);
        // Fits: checked against PAYLOAD_LEN_MAX above.
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        Ok(())
    }

    /// Decodes the frame at the start of `buf`: the message and the bytes it took, or
    /// `None` if `buf` does not hold a whole frame yet.
    pub fn decode(buf: &[u8]) -> Result<Option<(Control, usize)>, Error> {
        let Some((&tag, rest)) = buf.split_first() else {
            return Ok(None);
        };
        if ![TAG_HEARTBEAT, TAG_HEARTBEAT_ACK, TAG_DATABASES].contains(&tag) {
            return Err(malformed(format!("unknown frame tag {tag:#04x}")));
        }
        let Some(len_bytes) = rest.get(..4) else {
            return Ok(None);
        };
        let mut len = [0u8; 4];
        len.copy_from_slice(len_bytes);
        let len = u32::from_be_bytes(len) as usize;
        if len > PAYLOAD_LEN_MAX {
            return Err(malformed(format!(
                "frame of {len} bytes, more than the limit of {PAYLOAD_LEN_MAX}"
            )));
        }
        let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        let message = match tag {
            TAG_HEARTBEAT | TAG_HEARTBEAT_ACK if !payload.is_empty() => {
                return Err(malformed("heartbeat with a payload".to_owned()));
            }
            TAG_HEARTBEAT => Control::Heartbeat,
            TAG_HEARTBEAT_ACK => Control::HeartbeatAck,
            _ => Control::Databases(decode_databases(payload)?),
        };
        Ok(Some((message, HEADER_LEN + len)))
    }
}

fn encode_databases(names: &[String]) -> Result<Vec<u8>, Error> {
    let count = u16::try_from(names.len())
        .map_err(|_| malformed(format!("{} databases, more than {}", names.len(), u16::MAX)))?;
    let mut payload = count.to_be_bytes().to_vec();
    for name in names {
        check_name(name.as_bytes())?;
        // Fits: check_name bounds the length by DATABASE_NAME_LEN_MAX (255).
        payload.push(name.len() as u8);
        payload.extend_from_slice(name.as_bytes());
    }
    Ok(payload)
}

fn decode_databases(payload: &[u8]) -> Result<Vec<String>, Error> {
    let (count, mut rest) = match payload {
        [a, b, rest @ ..] => (u16::from_be_bytes([*a, *b]), rest),
        _ => return Err(malformed("database list without a count".to_owned())),
    };
    let mut names = Vec::with_capacity(usize::from(count).min(rest.len()));
    for _ in 0..count {
        let Some((&len, tail)) = rest.split_first() else {
            return Err(malformed("database list shorter than its count".to_owned()));
        };
        let len = usize::from(len);
        let (name, tail) = tail
            .split_at_checked(len)
            .ok_or_else(|| malformed("database name cut short".to_owned()))?;
        check_name(name)?;
        let name = std::str::from_utf8(name)
            .map_err(|_| malformed("database name is not UTF-8".to_owned()))?;
        names.push(name.to_owned());
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(malformed(format!(
            "{} bytes after the database list",
            rest.len()
        )));
    }
    Ok(names)
}

fn check_name(name: &[u8]) -> Result<(), Error> {
    if name.is_empty() || name.len() > DATABASE_NAME_LEN_MAX {
        return Err(malformed(format!(
            "database name of {} bytes (must be 1..={DATABASE_NAME_LEN_MAX})",
            name.len()
        )));
    }
    Ok(())
}

fn malformed(reason: String) -> Error {
    Error::ControlMalformed { reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn messages() -> impl Strategy<Value = Control> {
        prop_oneof![
            Just(Control::Heartbeat),
            Just(Control::HeartbeatAck),
            proptest::collection::vec("[a-z0-9_-]{1,40}|\\PC{1,20}", 0..20)
                .prop_map(Control::Databases),
        ]
    }

    proptest! {
        // Every message decodes back equal from its frame, and partial frames ask for more.
        #[test]
        fn round_trip(message in messages()) {
            let mut buf = Vec::new();
            message.encode(&mut buf).unwrap();
            prop_assert_eq!(Control::decode(&buf).unwrap(), Some((message, buf.len())));
            for cut in 0..buf.len() {
                prop_assert_eq!(Control::decode(&buf[..cut]).unwrap(), None);
            }
        }

        // Arbitrary bytes never panic the decoder, and a decoded frame never claims more bytes than given.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, used))) = Control::decode(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }
    }

    // Malformed frames are refused with a reason, not mistaken for messages.
    #[test]
    fn malformed_frames_are_refused() {
        let cases: [&[u8]; 6] = [
            b"X\0\0\0\0",                // unknown tag
            b"H\0\0\0\x01x",             // heartbeat with payload
            b"D\x7f\xff\xff\xff",        // length over the limit
            b"D\0\0\0\x01\0",            // count cut short
            b"D\0\0\0\x04\0\x01\x05a",   // name cut short
            b"D\0\0\0\x05\0\x01\x01a\0", // trailing bytes
        ];
        for case in cases {
            assert!(
                matches!(Control::decode(case), Err(Error::ControlMalformed { .. })),
                "{case:?}"
            );
        }
        let empty_name = b"D\0\0\0\x03\0\x01\0";
        assert!(Control::decode(empty_name).is_err());
        let bad_utf8 = b"D\0\0\0\x04\0\x01\x01\xff";
        assert!(Control::decode(bad_utf8).is_err());
    }

    // Names that cannot be framed are refused at encoding, leaving the buffer untouched.
    #[test]
    fn oversized_names_are_refused_when_encoding() {
        let mut buf = Vec::new();
        let long = Control::Databases(vec!["x".repeat(DATABASE_NAME_LEN_MAX + 1)]);
        assert!(long.encode(&mut buf).is_err());
        assert!(
            Control::Databases(vec![String::new()])
                .encode(&mut buf)
                .is_err()
        );
        assert!(buf.is_empty());
    }
}

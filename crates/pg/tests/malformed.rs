//! Malformed input: truncated, oversized, wrong lengths, unknown tags. Each gives a
//! specific error and nothing panics.

mod support;

use postern_pg::{
    BackendMessage, Direction, Error, FrontendMessage, InvalidMessage, Limit, Limits, Relay,
    StartupRequest,
};

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn frontend_error(bytes: &[u8]) -> Error {
    FrontendMessage::decode_from(bytes, &Limits::default()).expect_err("must be rejected")
}

fn backend_error(bytes: &[u8]) -> Error {
    BackendMessage::decode_from(bytes, &Limits::default()).expect_err("must be rejected")
}

fn invalid(direction: Direction, tag: Option<u8>, kind: InvalidMessage) -> Error {
    Error::InvalidMessage {
        direction,
        tag,
        kind,
    }
}

// Goal: a length word below 4 (it counts itself) is refused before anything is read.
#[test]
fn length_below_four() {
    let bytes = [b'Q', 0, 0, 0, 3];
    assert_eq!(
        frontend_error(&bytes),
        invalid(
            Direction::Frontend,
            Some(b'Q'),
            InvalidMessage::LengthTooSmall { length: 3, min: 4 }
        )
    );
    let bytes = [b'Z', 0xff, 0xff, 0xff, 0xff];
    assert_eq!(
        backend_error(&bytes),
        invalid(
            Direction::Backend,
            Some(b'Z'),
            InvalidMessage::LengthTooSmall { length: -1, min: 4 }
        )
    );
}

// Goal: a message above message_size_max is refused from its header alone.
#[test]
fn oversized_message() {
    let limits = Limits {
        message_size_max: 100,
        ..Limits::default()
    };
    let header = [b'D', 0, 0, 0, 100];
    assert_eq!(
        BackendMessage::decode_from(&header, &limits),
        Err(Error::LimitExceeded {
            limit: Limit::MessageSize,
            actual: 101,
            max: 100
        })
    );
    let header = [b'Q', 0x3f, 0xff, 0xff, 0xff];
    assert!(matches!(
        frontend_error(&header),
        Error::LimitExceeded {
            limit: Limit::MessageSize,
            ..
        }
    ));
}

// Goal: bytes after the last field are "trailing", not silently ignored.
#[test]
fn trailing_bytes() {
    assert_eq!(
        frontend_error(&tagged(b'S', b"x")),
        invalid(
            Direction::Frontend,
            Some(b'S'),
            InvalidMessage::TrailingBytes { count: 1 }
        )
    );
    assert_eq!(
        frontend_error(&tagged(b'Q', b"select 1\0junk")),
        invalid(
            Direction::Frontend,
            Some(b'Q'),
            InvalidMessage::TrailingBytes { count: 4 }
        )
    );
    assert_eq!(
        backend_error(&tagged(b'Z', b"II")),
        invalid(
            Direction::Backend,
            Some(b'Z'),
            InvalidMessage::TrailingBytes { count: 1 }
        )
    );
}

// Goal: a body shorter than its fields is "truncated", and a string without NUL is named.
#[test]
fn truncated_fields() {
    // Execute: portal name, then a 4-byte row count that is missing.
    assert_eq!(
        frontend_error(&tagged(b'E', b"\0\0\0")),
        invalid(Direction::Frontend, Some(b'E'), InvalidMessage::Truncated)
    );
    assert_eq!(
        frontend_error(&tagged(b'Q', b"select 1")),
        invalid(Direction::Frontend, Some(b'Q'), InvalidMessage::MissingNul)
    );
    // DataRow announcing 2 values but holding 1.
    let mut row = vec![0, 2];
    row.extend_from_slice(&1i32.to_be_bytes());
    row.push(b'x');
    assert_eq!(
        backend_error(&tagged(b'D', &row)),
        invalid(Direction::Backend, Some(b'D'), InvalidMessage::Truncated)
    );
    // A value length running past the end of the body.
    let mut row = vec![0, 1];
    row.extend_from_slice(&1000i32.to_be_bytes());
    assert_eq!(
        backend_error(&tagged(b'D', &row)),
        invalid(Direction::Backend, Some(b'D'), InvalidMessage::Truncated)
    );
}

// Goal: field lengths, format codes and targets outside their domains are named.
#[test]
fn wrong_field_values() {
    // Bind with a value length of -2.
    let mut bind = b"\0\0".to_vec();
    bind.extend_from_slice(&[0, 0, 0, 1]);
    bind.extend_from_slice(&(-2i32).to_be_bytes());
    bind.extend_from_slice(&[0, 0]);
    assert_eq!(
        frontend_error(&tagged(b'B', &bind)),
        invalid(
            Direction::Frontend,
            Some(b'B'),
            InvalidMessage::NegativeLength { length: -2 }
        )
    );
    // Bind with format code 2.
    let bind = [0, 0, 0, 1, 0, 2, 0, 0, 0, 0];
    assert_eq!(
        frontend_error(&tagged(b'B', &bind)),
        invalid(
            Direction::Frontend,
            Some(b'B'),
            InvalidMessage::UnknownFormatCode { code: 2 }
        )
    );
    // Bind with 2 format codes for 3 values.
    let mut bind = vec![0, 0, 0, 2, 0, 0, 0, 1, 0, 3];
    for _ in 0..3 {
        bind.extend_from_slice(&(-1i32).to_be_bytes());
    }
    bind.extend_from_slice(&[0, 0]);
    assert_eq!(
        frontend_error(&tagged(b'B', &bind)),
        invalid(
            Direction::Frontend,
            Some(b'B'),
            InvalidMessage::FormatCountMismatch {
                formats: 2,
                values: 3
            }
        )
    );
    assert_eq!(
        frontend_error(&tagged(b'C', b"Xname\0")),
        invalid(
            Direction::Frontend,
            Some(b'C'),
            InvalidMessage::UnknownTarget { target: b'X' }
        )
    );
    assert_eq!(
        backend_error(&tagged(b'R', &99i32.to_be_bytes())),
        invalid(
            Direction::Backend,
            Some(b'R'),
            InvalidMessage::UnknownAuthentication { code: 99 }
        )
    );
    assert_eq!(
        backend_error(&tagged(b'Z', b"X")),
        invalid(
            Direction::Backend,
            Some(b'Z'),
            InvalidMessage::UnknownTransactionStatus { status: b'X' }
        )
    );
    // BackendKeyData with a 3-byte key, and with a 257-byte key.
    for key_len in [3, 257] {
        let mut body = 7i32.to_be_bytes().to_vec();
        body.extend(std::iter::repeat_n(1, key_len));
        assert_eq!(
            backend_error(&tagged(b'K', &body)),
            invalid(
                Direction::Backend,
                Some(b'K'),
                InvalidMessage::CancelKeyLength { length: key_len }
            )
        );
    }
}

// Goal: type bytes a direction never sends are refused, by the decoder and by the relay
// (before it reads the body).
#[test]
fn unknown_tags() {
    assert_eq!(
        frontend_error(&tagged(b'z', b"")),
        invalid(Direction::Frontend, Some(b'z'), InvalidMessage::UnknownTag)
    );
    // 'Z' is a backend tag only.
    assert_eq!(
        frontend_error(&tagged(b'Z', b"I")),
        invalid(Direction::Frontend, Some(b'Z'), InvalidMessage::UnknownTag)
    );
    assert_eq!(
        backend_error(&tagged(b'Q', b"x\0")),
        invalid(Direction::Backend, Some(b'Q'), InvalidMessage::UnknownTag)
    );
    let mut relay = Relay::new(Limits::default());
    let header_only = [b'z', 0, 0, 0x10, 0];
    assert_eq!(
        relay.handle_client_bytes(&header_only),
        Err(invalid(
            Direction::Frontend,
            Some(b'z'),
            InvalidMessage::UnknownTag
        ))
    );
    let event = relay.poll_event().expect("malformed packet event");
    assert_eq!(
        (event.code(), event.name()),
        ("TDB06I", "db.session.malformed_packet")
    );
    // A failed relay stays failed, with the same error.
    assert_eq!(
        relay.handle_client_bytes(&tagged(b'S', b"")),
        Err(invalid(
            Direction::Frontend,
            Some(b'z'),
            InvalidMessage::UnknownTag
        ))
    );
}

// Goal: start-up packets with bad lengths, unknown codes or bad cancel keys are refused.
#[test]
fn malformed_startup_packets() {
    let limits = Limits::default();
    let decode = |bytes: &[u8]| StartupRequest::decode_from(bytes, &limits);
    assert!(matches!(
        decode(&[0, 0, 0, 7, 0, 0, 0, 0]),
        Err(Error::InvalidMessage {
            kind: InvalidMessage::LengthTooSmall { length: 7, min: 8 },
            ..
        })
    ));
    assert_eq!(
        decode(&[0, 0, 0x27, 0x11, 0, 3, 0, 0]),
        Err(Error::LimitExceeded {
            limit: Limit::StartupPacketSize,
            actual: 10_001,
            max: 10_000
        })
    );
    let mut unknown = vec![0, 0, 0, 8];
    unknown.extend_from_slice(&(1234u32 << 16 | 1).to_be_bytes());
    assert_eq!(
        decode(&unknown),
        Err(invalid(
            Direction::Frontend,
            None,
            InvalidMessage::UnknownRequestCode {
                code: 1234 << 16 | 1
            }
        ))
    );
    let mut cancel = vec![0, 0, 0, 15];
    cancel.extend_from_slice(&80_877_102u32.to_be_bytes());
    cancel.extend_from_slice(&[0, 0, 0, 1, 9, 9, 9]);
    assert_eq!(
        decode(&cancel),
        Err(invalid(
            Direction::Frontend,
            None,
            InvalidMessage::CancelKeyLength { length: 3 }
        ))
    );
    // A StartupMessage whose parameter list is not terminated.
    let mut startup = vec![0, 0, 0, 17];
    startup.extend_from_slice(&196_608u32.to_be_bytes());
    startup.extend_from_slice(b"user\0bob\0");
    assert_eq!(
        decode(&startup),
        Err(invalid(
            Direction::Frontend,
            None,
            InvalidMessage::MissingNul
        ))
    );
    // SSLRequest with 4 extra bytes inside its length.
    let mut ssl = vec![0, 0, 0, 12];
    ssl.extend_from_slice(&80_877_103u32.to_be_bytes());
    ssl.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(
        decode(&ssl),
        Err(invalid(
            Direction::Frontend,
            None,
            InvalidMessage::TrailingBytes { count: 4 }
        ))
    );
}

/// A fuzz target's logic.
type Target = fn(&[u8]);

// Goal: no single-byte corruption of a real session makes any decoder or state machine
// panic (the fuzz targets' logic, run over every mutation of real traffic).
#[test]
fn corrupted_captures_never_panic() {
    let chunks = support::load("driver_prepared");
    let client = support::stream(&chunks, 0, Direction::Frontend);
    let server = support::stream(&chunks, 0, Direction::Backend);
    let mut runs = 0;
    // The driver's StartupMessage is the first 93 client bytes. Each target reads a
    // prefix first: start-up one control byte, the others four read sizes.
    let runs_over: [(&[u8], &[u8], Target); 3] = [
        (&[0], &client, postern_pg::fuzzing::startup),
        (
            &[255, 7, 64, 1],
            &client[93..],
            postern_pg::fuzzing::frontend,
        ),
        (&[255, 7, 64, 1], &server, postern_pg::fuzzing::backend),
    ];
    let mut bytes_run = 0;
    for (prefix, stream, run) in runs_over {
        let stream = &stream[..stream.len().min(1500)];
        for i in 0..stream.len() {
            for byte in [0x00, 0xff, 0x7f] {
                let mut mutated = prefix.to_vec();
                mutated.extend_from_slice(stream);
                mutated[prefix.len() + i] = byte;
                run(&mutated);
                runs += 1;
                bytes_run += mutated.len();
            }
            let mut truncated = prefix.to_vec();
            truncated.extend_from_slice(&stream[..i]);
            run(&truncated);
        }
    }
    assert!(bytes_run > 5_000_000, "only {bytes_run} bytes");
    assert!(runs > 3000, "only {runs} runs");
}

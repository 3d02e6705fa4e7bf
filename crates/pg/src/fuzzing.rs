//! The logic of the fuzz targets in `fuzz/fuzz_targets/pg_*.rs`, as plain functions so
//! ordinary tests run them over the committed corpus without a fuzzer.
//!
//! Each one must never panic on any input, except through its own assertions, which state
//! properties that hold for every input.

use crate::backend::BackendMessage;
use crate::error::Direction;
use crate::frame::{Boundaries, split_message};
use crate::frontend::{FrontendMessage, StartupRequest};
use crate::limits::Limits;
use crate::relay::Relay;
use crate::startup::{ALPN_POSTGRESQL, Startup, StartupOutput, TlsMode};

/// Small limits so that the fuzzer reaches them.
fn limits() -> Limits {
    Limits {
        startup_packet_size_max: 10_000,
        startup_timeout: std::time::Duration::from_secs(10),
        message_size_max: 1 << 16,
        buffered_message_size_max: 1 << 12,
        pending_requests_max: 16,
        pending_bytes_max: 1 << 12,
        prepared_statements_max: 8,
        prepared_statement_bytes_max: 1 << 12,
    }
}

/// Feeds `data` to `handle` in chunks whose sizes come from `sizes` (cycled), the way
/// reads from a socket cut a stream anywhere.
fn chunks<'a>(data: &'a [u8], sizes: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = data;
    let mut i = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(rest.len(), |&s| usize::from(s).max(1));
        i += 1;
        let (head, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        Some(head)
    })
}

/// Frontend framing: every message decoded re-encodes to the same bytes, and the relay
/// observes the same stream cut at arbitrary points without panicking.
pub fn frontend(data: &[u8]) {
    let limits = limits();
    let (sizes, stream) = data.split_at(data.len().min(4));
    let mut rest = stream;
    let mut out = Vec::new();
    while let Ok(Some((message, len))) = FrontendMessage::decode_from(rest, &limits) {
        out.clear();
        assert!(
            message.encode(&mut out).is_ok(),
            "decoded message must encode"
        );
        assert_eq!(out, rest[..len], "frontend round trip");
        rest = &rest[len..];
    }
    let mut relay = Relay::new(limits);
    for chunk in chunks(stream, sizes) {
        let result = relay.handle_client_bytes(chunk);
        while relay.poll_event().is_some() {}
        if result.is_err() {
            assert!(
                relay.handle_client_bytes(b"Q").is_err(),
                "failed stays failed"
            );
            break;
        }
    }
    relay.handle_close();
    while relay.poll_event().is_some() {}
}

/// Backend framing: every message decoded re-encodes to the same bytes, and the relay
/// observes the same stream cut at arbitrary points without panicking.
pub fn backend(data: &[u8]) {
    let limits = limits();
    let (sizes, stream) = data.split_at(data.len().min(4));
    let mut rest = stream;
    let mut out = Vec::new();
    while let Ok(Some((message, len))) = BackendMessage::decode_from(rest, &limits) {
        out.clear();
        assert!(
            message.encode(&mut out).is_ok(),
            "decoded message must encode"
        );
        assert_eq!(out, rest[..len], "backend round trip");
        rest = &rest[len..];
    }
    // Requests for the server's answers to match, so the relay gets past its checks.
    let mut requests = Vec::new();
    for message in [
        FrontendMessage::Query(b"select 1".to_vec()),
        FrontendMessage::Sync,
    ] {
        assert!(message.encode(&mut requests).is_ok());
    }
    let mut relay = Relay::new(limits);
    assert!(relay.handle_client_bytes(&requests).is_ok());
    for chunk in chunks(stream, sizes) {
        let result = relay.handle_server_bytes(chunk);
        while relay.poll_event().is_some() {}
        if result.is_err() {
            break;
        }
    }
    relay.handle_close();
    while relay.poll_event().is_some() {}
    // The header counter agrees with the framing wherever the reads cut: at a boundary
    // exactly where a whole message ended, never told to read past one.
    let mut boundaries = Boundaries::default();
    let mut at = 0;
    let mut ends = Vec::new();
    let mut rest = stream;
    while let Ok(Some(frame)) = split_message(Direction::Backend, rest, usize::MAX) {
        at += frame.wire_len();
        ends.push(at);
        rest = &rest[frame.wire_len()..];
    }
    let mut seen = 0;
    for chunk in chunks(&stream[..at], sizes) {
        if let Some(left) = boundaries.to_boundary() {
            let next_end = ends.iter().copied().find(|&end| end > seen).unwrap_or(at);
            assert!(
                left == 0 || seen + left <= next_end,
                "counter reads past a boundary"
            );
        }
        boundaries.advance(chunk);
        seen += chunk.len();
        assert_eq!(
            boundaries.at_boundary(),
            ends.contains(&seen),
            "boundary at {seen}"
        );
    }
}

/// Start-up negotiation: the proxy's machine takes any bytes, cut anywhere, in either TLS
/// mode, never uses more bytes than it was given, and ends in at most one Cancel or
/// Startup.
pub fn startup(data: &[u8]) {
    let Some((&control, data)) = data.split_first() else {
        return;
    };
    let mode = if control & 1 == 0 {
        TlsMode::Offer
    } else {
        TlsMode::Terminated
    };
    let alpn: Option<&[u8]> = match control >> 1 & 3 {
        0 => None,
        1 => Some(ALPN_POSTGRESQL),
        _ => Some(b"postern-postgres"),
    };
    let limits = limits();
    if let Ok(Some((request, len))) = StartupRequest::decode_from(data, &limits) {
        let mut out = Vec::new();
        assert!(
            request.encode(&mut out).is_ok(),
            "decoded packet must encode"
        );
        assert_eq!(out, data[..len], "start-up packet round trip");
    }
    let sizes = [control >> 3, control.rotate_left(2)];
    // Time is an input too: each chunk advances the clock by its first byte, in seconds,
    // so some runs cross the 10 s deadline mid-negotiation.
    let start = std::time::Duration::ZERO;
    let mut now = start;
    let mut startup = Startup::new(limits, mode, now);
    let mut buffered = Vec::new();
    let mut finals = 0;
    for chunk in chunks(data, &sizes) {
        now += std::time::Duration::from_secs(u64::from(chunk[0] % 4));
        if startup.handle_timeout(now).is_err() {
            assert!(now >= start + std::time::Duration::from_secs(10));
            assert_eq!(
                startup.poll_timeout(),
                None,
                "a failed start-up has no deadline"
            );
            return;
        }
        buffered.extend_from_slice(chunk);
        let Ok(used) = startup.handle_input(&buffered) else {
            return;
        };
        assert!(used <= buffered.len(), "used more bytes than given");
        buffered.drain(..used);
        while let Some(output) = startup.poll_output() {
            match output {
                StartupOutput::StartTls | StartupOutput::DirectTls => {
                    if startup.handle_tls_established(alpn).is_err() {
                        return;
                    }
                    if matches!(output, StartupOutput::DirectTls) {
                        // The ClientHello went to TLS; what follows is inside it.
                        buffered.clear();
                    }
                }
                StartupOutput::Cancel(_) | StartupOutput::Startup(_) => finals += 1,
                StartupOutput::Reply(byte) => assert!(byte == b'S' || byte == b'N'),
            }
        }
        if startup.is_done() {
            break;
        }
    }
    assert!(finals <= 1, "start-up ended more than once");
    assert_eq!(finals == 1, startup.is_done());
}

/// Ops of a [`conversation`] input: the high two bits of each op byte say what it is,
/// the low six its size.
pub mod op {
    /// Client bytes: (low six bits) + 1 bytes follow.
    pub const CLIENT: u8 = 0x00;
    /// Server bytes: (low six bits) + 1 bytes follow.
    pub const SERVER: u8 = 0x40;
    /// Take up to (low six bits) events; 0 takes every one.
    pub const POLL: u8 = 0x80;
    /// The connection closes (later input must be refused the same way).
    pub const CLOSE: u8 = 0xc0;
    /// Largest size an op byte carries.
    pub const CHUNK_MAX: usize = 64;
}

/// A whole conversation through the relay, with reads cut anywhere and events taken at
/// any time (or left waiting): a relay that sends every request through its queues
/// gives the same result for every input, the same events, the same boundaries and the
/// same memory held. The first byte picks the relay: even, one whose session starts
/// after authentication; odd, one that reads the start-up packet too. Ops follow (see
/// [`op`]).
pub fn conversation(data: &[u8]) {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let limits = limits();
    let (mut relay, mut queued) = if first & 1 == 0 {
        (Relay::new(limits.clone()), Relay::new(limits))
    } else {
        (
            Relay::from_startup(limits.clone()),
            Relay::from_startup(limits),
        )
    };
    queued = queued.without_lone_queries();
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        let size = usize::from(byte & 0x3f);
        match byte & 0xc0 {
            op::CLIENT | op::SERVER => {
                let (chunk, tail) = rest.split_at((size + 1).min(rest.len()));
                rest = tail;
                let (a, b) = if byte & 0xc0 == op::CLIENT {
                    (
                        relay.handle_client_bytes(chunk),
                        queued.handle_client_bytes(chunk),
                    )
                } else {
                    (
                        relay.handle_server_bytes(chunk),
                        queued.handle_server_bytes(chunk),
                    )
                };
                assert_eq!(a, b, "result of a read");
            }
            op::POLL => {
                let take = if size == 0 { usize::MAX } else { size };
                for _ in 0..take {
                    let event = relay.poll_event();
                    assert_eq!(event, queued.poll_event(), "event");
                    if event.is_none() {
                        break;
                    }
                }
            }
            _ => {
                relay.handle_close();
                queued.handle_close();
            }
        }
        assert_eq!(
            relay.server_bytes_to_boundary(),
            queued.server_bytes_to_boundary(),
            "boundary"
        );
        assert_eq!(relay.held_bytes(), queued.held_bytes(), "memory held");
    }
    relay.handle_close();
    queued.handle_close();
    loop {
        let event = relay.poll_event();
        assert_eq!(event, queued.poll_event(), "event after close");
        if event.is_none() {
            break;
        }
    }
}

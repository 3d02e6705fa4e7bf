//! Reading `testdata/pg/*.capture` (written by `scripts/pg-capture`) and replaying them
//! through the crate. Shared by the tests and the bench.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use postern_pg::{
    AuditEvent, BackendMessage, Direction, FrontendMessage, Limits, Relay, StartupRequest, frame,
};

/// Every capture `scripts/pg-capture all` records.
pub const CAPTURES: &[&str] = &[
    "psql_simple",
    "psql_copy",
    "pgbench_simple",
    "pgbench_extended",
    "pgbench_prepared",
    "driver_prepared",
    "cancel",
];

/// Two server messages for tests of where messages end: ReadyForQuery (5 + 1 bytes),
/// then a DataRow with a 3-byte body.
pub const TWO_MESSAGES: [u8; 14] = [b'Z', 0, 0, 0, 5, b'I', b'D', 0, 0, 0, 7, 1, 2, 3];

/// After the first `read` bytes of [`TWO_MESSAGES`], how many more the message under way
/// still has (0 between messages).
pub fn to_boundary_after(read: usize) -> usize {
    match read {
        0 | 6 | 14 => 0,
        1..=4 => 5 - read,
        5 => 1,
        7..=10 => 11 - read,
        _ => 14 - read,
    }
}

/// One recv() worth of bytes on one connection.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub connection: u32,
    pub direction: Direction,
    pub bytes: Vec<u8>,
}

pub fn testdata(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/pg")
        .join(file)
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// Parses `NAME.capture`: `<connection> <C|S> <hex>` per line, `#` comments.
pub fn load(name: &str) -> Vec<Chunk> {
    let path = testdata(&format!("{name}.capture"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let mut parts = line.split(' ');
            let connection = parts
                .next()
                .and_then(|c| c.parse().ok())
                .expect("connection");
            let direction = match parts.next() {
                Some("C") => Direction::Frontend,
                Some("S") => Direction::Backend,
                other => panic!("bad direction {other:?}"),
            };
            let bytes = hex(parts.next().expect("hex"));
            Chunk {
                connection,
                direction,
                bytes,
            }
        })
        .collect()
}

/// Every byte one side of one connection sent, in order.
pub fn stream(chunks: &[Chunk], connection: u32, direction: Direction) -> Vec<u8> {
    chunks
        .iter()
        .filter(|c| c.connection == connection && c.direction == direction)
        .flat_map(|c| c.bytes.iter().copied())
        .collect()
}

/// One connection's reads after start-up and authentication (the client's start-up
/// packet; the server's messages through its first ReadyForQuery) and before its
/// Terminate: the statements of a session, which a longer run of the same client
/// repeats. Replayed again and again through one relay they measure a long session,
/// which the agent's relay is (it starts after authentication too: `Relay::new`).
pub fn session_reads(chunks: &[Chunk], connection: u32) -> Vec<(Direction, Vec<u8>)> {
    let limits = Limits::default();
    let client = stream(chunks, connection, Direction::Frontend);
    let server = stream(chunks, connection, Direction::Backend);
    let start_client = frame::split_startup_packet(&client, limits.startup_packet_size_max)
        .ok()
        .flatten()
        .map_or(0, <[u8]>::len);
    let mut start_server = 0;
    let mut end_client = client.len();
    let mut at = 0;
    while let Ok(Some(message)) =
        frame::split_message(Direction::Backend, &server[at..], limits.message_size_max)
    {
        at += message.wire_len();
        if message.tag == b'Z' {
            start_server = at;
            break;
        }
    }
    at = start_client;
    while let Ok(Some(message)) =
        frame::split_message(Direction::Frontend, &client[at..], limits.message_size_max)
    {
        if message.tag == b'X' {
            end_client = at;
            break;
        }
        at += message.wire_len();
    }
    // The capture's reads, each cut to the part inside its direction's window.
    let mut offsets = [0usize; 2];
    let mut reads = Vec::new();
    for chunk in chunks.iter().filter(|c| c.connection == connection) {
        let (side, window) = match chunk.direction {
            Direction::Frontend => (0, start_client..end_client),
            Direction::Backend => (1, start_server..server.len()),
        };
        let from = offsets[side];
        offsets[side] += chunk.bytes.len();
        let start = window.start.clamp(from, offsets[side]);
        let end = window.end.clamp(from, offsets[side]);
        if start < end {
            reads.push((
                chunk.direction,
                chunk.bytes[start - from..end - from].to_vec(),
            ));
        }
    }
    reads
}

/// The connection with the most reads: in a pgbench capture, the benchmark's client
/// (connection 0 is pgbench's own set-up queries).
pub fn busiest_connection(chunks: &[Chunk]) -> u32 {
    connections(chunks)
        .into_iter()
        .max_by_key(|&id| chunks.iter().filter(|c| c.connection == id).count())
        .unwrap_or(0)
}

/// Replays `reads` (from [`session_reads`]) through `relay` once, as `replay_counting`
/// does; returns how many events.
pub fn replay_session(relay: &mut Relay, reads: &[(Direction, Vec<u8>)]) -> usize {
    reads
        .iter()
        .map(|(direction, bytes)| feed(relay, *direction, bytes))
        .sum()
}

pub fn connections(chunks: &[Chunk]) -> Vec<u32> {
    let mut ids: Vec<u32> = chunks.iter().map(|c| c.connection).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn side(direction: Direction) -> &'static str {
    match direction {
        Direction::Frontend => "C",
        Direction::Backend => "S",
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// The client's next packet is untagged.
    Untagged,
    /// The server's next byte answers SSLRequest/GSSENCRequest.
    Answer,
    Tagged,
}

/// One decoded message: framing facts and its one-line rendering.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub connection: u32,
    pub direction: Direction,
    /// Type byte, or the packet kind for untagged packets (as in the `.transcript`).
    pub kind: String,
    pub wire_len: usize,
    pub line: String,
}

/// Decodes every message of a capture with the crate's decoders, in arrival order.
pub fn decode(chunks: &[Chunk]) -> Vec<Decoded> {
    let limits = Limits::default();
    let mut out = Vec::new();
    let mut buffers: BTreeMap<(u32, bool), Vec<u8>> = BTreeMap::new();
    let mut phases: BTreeMap<u32, Phase> = BTreeMap::new();
    for chunk in chunks {
        let client = chunk.direction == Direction::Frontend;
        buffers
            .entry((chunk.connection, client))
            .or_default()
            .extend_from_slice(&chunk.bytes);
        let conn = chunk.connection;
        loop {
            let phase = *phases.entry(conn).or_insert(Phase::Untagged);
            let mut progressed = false;
            for client in [true, false] {
                let buf = buffers.entry((conn, client)).or_default();
                let direction = if client {
                    Direction::Frontend
                } else {
                    Direction::Backend
                };
                let decoded = match (phase, client) {
                    (Phase::Untagged, true) => StartupRequest::decode_from(buf, &limits)
                        .expect("valid start-up packet")
                        .map(|(request, len)| {
                            let kind = match request {
                                StartupRequest::Ssl => "ssl",
                                StartupRequest::GssEnc => "gssenc",
                                StartupRequest::Cancel(_) => "cancel",
                                _ => "startup",
                            };
                            let next = if matches!(kind, "ssl" | "gssenc") {
                                Phase::Answer
                            } else {
                                Phase::Tagged
                            };
                            (kind.to_owned(), len, request.to_string(), next)
                        }),
                    (Phase::Answer, false) => buf.first().map(|&b| {
                        let line = format!("SSL answer {}", b as char);
                        ("ssl-answer".to_owned(), 1, line, Phase::Untagged)
                    }),
                    (Phase::Tagged, true) => FrontendMessage::decode_from(buf, &limits)
                        .expect("valid frontend message")
                        .map(|(m, len)| ((m.tag() as char).to_string(), len, m.to_string(), phase)),
                    (Phase::Tagged, false) => BackendMessage::decode_from(buf, &limits)
                        .expect("valid backend message")
                        .map(|(m, len)| ((m.tag() as char).to_string(), len, m.to_string(), phase)),
                    _ => None,
                };
                if let Some((kind, wire_len, line, next)) = decoded {
                    buf.drain(..wire_len);
                    phases.insert(conn, next);
                    out.push(Decoded {
                        connection: conn,
                        direction,
                        kind,
                        wire_len,
                        line,
                    });
                    progressed = true;
                    break;
                }
            }
            if !progressed {
                break;
            }
        }
    }
    for ((conn, client), rest) in buffers {
        assert!(
            rest.is_empty(),
            "connection {conn} client={client}: {} undecoded bytes",
            rest.len()
        );
    }
    out
}

/// The decoded transcript, one line per message.
pub fn transcript(chunks: &[Chunk]) -> String {
    decode(chunks)
        .iter()
        .map(|d| format!("{} {} {}\n", d.connection, side(d.direction), d.line))
        .collect()
}

/// Replays a capture through one relay per connection, re-cut into pieces of at most
/// `piece_len` bytes (`None`: the captured chunks as they are). Returns the audit events,
/// one line each, prefixed with the connection.
pub fn replay(chunks: &[Chunk], piece_len: Option<usize>) -> Vec<String> {
    match piece_len {
        Some(len) => replay_cuts(chunks, &[len]),
        None => replay_cuts(chunks, &[]),
    }
}

/// Replays a capture with each chunk re-cut into pieces whose lengths are taken from
/// `cuts` in turn, round and round across the whole capture (empty: the chunks as
/// they are).
pub fn replay_cuts(chunks: &[Chunk], cuts: &[usize]) -> Vec<String> {
    let mut relays: BTreeMap<u32, Relay> = BTreeMap::new();
    let mut lines = Vec::new();
    let drain = |conn: u32, relay: &mut Relay, lines: &mut Vec<String>| {
        while let Some(event) = relay.poll_event() {
            lines.push(format!("{conn} {}", line(&event)));
        }
    };
    let mut next_cut = cuts.iter().copied().cycle();
    for chunk in chunks {
        let relay = relays
            .entry(chunk.connection)
            .or_insert_with(|| Relay::from_startup(Limits::default()));
        let mut rest = &chunk.bytes[..];
        while !rest.is_empty() {
            let len = next_cut.next().unwrap_or(rest.len()).clamp(1, rest.len());
            let (piece, tail) = rest.split_at(len);
            rest = tail;
            let result = match chunk.direction {
                Direction::Frontend => relay.handle_client_bytes(piece),
                Direction::Backend => relay.handle_server_bytes(piece),
            };
            result.unwrap_or_else(|e| panic!("connection {}: {e}", chunk.connection));
            drain(chunk.connection, relay, &mut lines);
        }
    }
    for (conn, relay) in &mut relays {
        relay.handle_close();
        drain(*conn, relay, &mut lines);
    }
    lines
}

fn line(event: &AuditEvent) -> String {
    event.to_string()
}

/// Replays a capture through fresh relays (one per connection), as the agent does, and
/// counts the events: the measured loop of `benches/relay.rs` and
/// `examples/relay_replay.rs`, with nothing else in it.
pub fn replay_counting(chunks: &[Chunk]) -> usize {
    // Captures number their connections from 0 as they were accepted: the number is the
    // relay's index (no search per read).
    let mut relays: Vec<Relay> = Vec::new();
    let mut events = 0;
    for chunk in chunks {
        let index = chunk.connection as usize;
        while relays.len() <= index {
            relays.push(Relay::from_startup(Limits::default()));
        }
        events += feed(&mut relays[index], chunk.direction, &chunk.bytes);
    }
    for relay in &mut relays {
        relay.handle_close();
        while let Some(event) = relay.poll_event_view() {
            read_every_field(&event);
            events += 1;
        }
    }
    events
}

/// One read through `relay` as the agent does it: the bytes observed, then the events
/// drained as borrowed views whose every field the consumer reads. Returns how many.
#[inline(always)]
fn feed(relay: &mut Relay, direction: Direction, bytes: &[u8]) -> usize {
    let result = match direction {
        Direction::Frontend => relay.handle_client_bytes(bytes),
        Direction::Backend => relay.handle_server_bytes(bytes),
    };
    assert!(result.is_ok());
    let mut events = 0;
    while let Some(event) = relay.poll_event_view() {
        read_every_field(&event);
        events += 1;
    }
    events
}

/// What a consumer that renders an event reads of it: every field, each kept from being
/// optimised away.
#[inline(always)]
pub fn read_every_field(event: &postern_pg::audit::EventView<'_>) {
    use std::hint::black_box;
    black_box(event.kind());
    black_box(event.query());
    black_box(event.statement());
    black_box(event.portal());
    black_box(event.function());
    black_box(event.parameters());
    black_box(event.outcome());
}

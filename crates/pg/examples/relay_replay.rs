//! Replays a captured session through `Relay` many times, as `benches/relay.rs` does, for
//! instruction-count profiles (wall time on shared machines varies; instructions do not):
//!
//! ```text
//! cargo build --release -p postern-pg --example relay_replay
//! valgrind --tool=callgrind target/release/examples/relay_replay pgbench_prepared 100
//! valgrind --tool=callgrind target/release/examples/relay_replay pgbench_prepared 100 frames
//! ```
//!
//! Instructions per message = (Ir at N runs - Ir at 0 runs) / (N x messages in the capture).
//! With `frames`, each run only cuts both directions of every connection into messages
//! (`frame::split_message`, after the start-up packet): the floor any relay that looks at
//! every message pays, without the audit's bookkeeping. With `floor`, each run does the
//! least any relay does for simple queries (see `simple_query_floor`): a bound for what
//! a relay specialised for them could reach, not a relay. With `session`, each run
//! replays the benchmark client's statements through one relay that lives across runs
//! (`support::session_reads`), as in a pgbench run longer than the capture.

#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;

use postern_pg::frame;
use postern_pg::{Direction, Limits, StartupRequest};

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "pgbench_prepared".to_owned());
    let runs: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(100);
    let mode = args.next();
    let frames_only = mode.as_deref() == Some("frames");

    let chunks = support::load(&name);
    let messages = std::fs::read_to_string(support::testdata(&format!("{name}.transcript")))
        .map(|t| t.lines().count())
        .unwrap_or(0);
    if mode.as_deref() == Some("floor") {
        let mut events = 0;
        for _ in 0..runs {
            events += simple_query_floor(black_box(&chunks));
        }
        println!("{name}: {runs} runs, {events} simple-query events in all runs (floor)");
        return;
    }
    if mode.as_deref() == Some("session") {
        // The client's session, over and over through one relay (`support::session_reads`).
        let reads = support::session_reads(&chunks, support::busiest_connection(&chunks));
        let bytes: usize = reads.iter().map(|(_, b)| b.len()).sum();
        let mut relay = postern_pg::Relay::new(Limits::default());
        let mut events = 0;
        for _ in 0..runs {
            events += support::replay_session(&mut relay, black_box(&reads));
        }
        println!("{name}: {runs} runs of a {bytes}-byte session, {events} events (session)");
        return;
    }
    if frames_only {
        let streams = tagged_streams(&chunks);
        let mut framed = 0;
        for _ in 0..runs {
            for (direction, bytes) in &streams {
                framed += frame_all(*direction, black_box(bytes));
            }
        }
        println!("{name}: {runs} runs, {messages} messages, {framed} framed in all runs");
        return;
    }
    let mut events = 0;
    for _ in 0..runs {
        events += support::replay_counting(black_box(&chunks));
    }
    println!("{name}: {runs} runs, {messages} messages and {events} events in all runs");
}

/// Each connection's client bytes after its start-up packet, and its server bytes.
fn tagged_streams(chunks: &[support::Chunk]) -> Vec<(Direction, Vec<u8>)> {
    let limits = Limits::default();
    let mut streams = Vec::new();
    for connection in support::connections(chunks) {
        let client = support::stream(chunks, connection, Direction::Frontend);
        let Ok(Some((StartupRequest::Startup(_), used))) =
            StartupRequest::decode_from(&client, &limits)
        else {
            continue;
        };
        streams.push((Direction::Frontend, client[used..].to_vec()));
        let server = support::stream(chunks, connection, Direction::Backend);
        streams.push((Direction::Backend, server));
    }
    streams
}

/// Cuts `bytes` into messages; returns how many.
fn frame_all(direction: Direction, mut bytes: &[u8]) -> usize {
    let max = Limits::default().message_size_max;
    let mut count = 0;
    while let Ok(Some(message)) = frame::split_message(direction, bytes, max) {
        // The length is taken before `black_box`, so that the next message's position
        // does not wait for a store and reload of this one.
        let len = message.wire_len();
        black_box(message.tag);
        bytes = &bytes[len..];
        count += 1;
    }
    count
}

/// The least any relay that frames every message does for simple queries: per
/// connection, a log of SQL and command tags and a queue of (SQL, tag) spans; a Query's
/// SQL checked for NUL and copied, a CommandComplete's tag checked and copied, and at
/// ReadyForQuery the event handed to a consumer that reads its SQL and tag. No limits,
/// no errors, no extended protocol, no messages split across reads (skipped): a bound,
/// not a relay.
fn simple_query_floor(chunks: &[support::Chunk]) -> usize {
    struct Conn {
        started: bool,
        log: Vec<u8>,
        queue: std::collections::VecDeque<(u32, u32, u32, u32)>,
        answered: usize,
    }
    let mut conns: Vec<Conn> = Vec::new();
    let mut events = 0;
    for chunk in chunks {
        // As in `support::replay_counting`: the connection number is the index.
        let index = chunk.connection as usize;
        while conns.len() <= index {
            conns.push(Conn {
                started: false,
                log: Vec::new(),
                queue: Default::default(),
                answered: 0,
            });
        }
        let conn = &mut conns[index];
        let mut bytes = &chunk.bytes[..];
        if chunk.direction == Direction::Frontend && !conn.started {
            conn.started = true;
            let len = u32::from_be_bytes(bytes[..4].try_into().unwrap_or_default()) as usize;
            bytes = bytes.get(len..).unwrap_or_default();
        }
        while let Some((header, rest)) = bytes.split_first_chunk::<5>() {
            let tag = header[0];
            let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
            let Some((body, tail)) = rest.split_at_checked(len.saturating_sub(4)) else {
                break;
            };
            bytes = tail;
            match (chunk.direction, tag, body) {
                (Direction::Frontend, b'Q', [sql @ .., 0])
                    if !sql.iter().fold(false, |nul, &b| nul | (b == 0)) =>
                {
                    let start = conn.log.len() as u32;
                    conn.log.extend_from_slice(sql);
                    conn.queue.push_back((start, conn.log.len() as u32, 0, 0));
                }
                (Direction::Backend, b'C', [tag @ .., 0]) if !tag.contains(&0) => {
                    let start = conn.log.len() as u32;
                    conn.log.extend_from_slice(tag);
                    let end = conn.log.len() as u32;
                    if let Some(entry) = conn.queue.get_mut(conn.answered) {
                        entry.2 = start;
                        entry.3 = end;
                    }
                }
                (Direction::Backend, b'Z', [_]) if conn.answered < conn.queue.len() => {
                    conn.answered += 1;
                }
                _ => {}
            }
        }
        while conn.answered > 0 {
            let Some((a, b, c, d)) = conn.queue.pop_front() else {
                break;
            };
            conn.answered -= 1;
            black_box(conn.log.get(a as usize..b as usize));
            black_box(conn.log.get(c as usize..d as usize));
            events += 1;
        }
        if conn.queue.is_empty() {
            conn.log.clear();
        }
    }
    events
}

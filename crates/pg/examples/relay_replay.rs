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
//! every message pays, without the audit's bookkeeping.

#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;

use postern_pg::frame;
use postern_pg::{Direction, Limits, StartupRequest};

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "pgbench_prepared".to_owned());
    let runs: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(100);
    let frames_only = args.next().as_deref() == Some("frames");
    let chunks = support::load(&name);
    let messages = std::fs::read_to_string(support::testdata(&format!("{name}.transcript")))
        .map(|t| t.lines().count())
        .unwrap_or(0);
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

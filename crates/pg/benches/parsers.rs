//! Wire parser throughput on captured pgbench traffic (testdata/pg/pgbench_prepared): the
//! framing alone (`frame::split_message`), whole decoding of frontend and backend
//! messages (`FrontendMessage::decode`, `BackendMessage::decode`), and start-up packets
//! (`StartupRequest::decode_from`). Reported as bytes per second.
//!
//! Run: `cargo bench -p postern-pg --bench parsers`. Results are in crates/pg/README.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use postern_pg::frame::{self, Frame};
use postern_pg::{BackendMessage, Direction, FrontendMessage, Limits, StartupRequest};

/// Every connection's start-up packet, and the tagged bytes of each direction after it.
struct Traffic {
    startup: Vec<Vec<u8>>,
    client: Vec<u8>,
    server: Vec<u8>,
}

fn traffic(name: &str) -> Traffic {
    let chunks = support::load(name);
    let limits = Limits::default();
    let mut traffic = Traffic {
        startup: Vec::new(),
        client: Vec::new(),
        server: Vec::new(),
    };
    for connection in support::connections(&chunks) {
        let client = support::stream(&chunks, connection, Direction::Frontend);
        let (request, used) = StartupRequest::decode_from(&client, &limits)
            .expect("valid start-up packet")
            .expect("whole start-up packet");
        if !matches!(request, StartupRequest::Startup(_)) {
            continue;
        }
        traffic.startup.push(client[..used].to_vec());
        traffic.client.extend_from_slice(&client[used..]);
        traffic
            .server
            .extend_from_slice(&support::stream(&chunks, connection, Direction::Backend));
    }
    traffic
}

/// Walks `bytes` message by message with `each`, which returns the message's length.
fn walk(mut bytes: &[u8], each: impl Fn(&[u8]) -> usize) -> usize {
    let mut messages = 0;
    while !bytes.is_empty() {
        let used = each(bytes);
        bytes = &bytes[used..];
        messages += 1;
    }
    messages
}

fn split(direction: Direction, limits: &Limits) -> impl Fn(&[u8]) -> usize {
    let max = limits.message_size_max;
    move |bytes| {
        let frame: Frame<'_> = frame::split_message(direction, bytes, max)
            .expect("valid")
            .expect("whole");
        black_box(&frame);
        frame.wire_len()
    }
}

fn parsers(c: &mut Criterion) {
    let limits = Limits::default();
    let traffic = traffic("pgbench_prepared");
    assert!(walk(&traffic.client, split(Direction::Frontend, &limits)) > 100);

    let mut group = c.benchmark_group("parsers");
    group.throughput(Throughput::Bytes(traffic.client.len() as u64));
    group.bench_function("frontend_split", |b| {
        b.iter(|| {
            walk(
                black_box(&traffic.client),
                split(Direction::Frontend, &limits),
            )
        })
    });
    group.bench_function("frontend_decode", |b| {
        b.iter(|| {
            walk(black_box(&traffic.client), |bytes| {
                let (message, used) = FrontendMessage::decode_from(bytes, &limits)
                    .expect("valid")
                    .expect("whole");
                black_box(message);
                used
            })
        })
    });
    group.throughput(Throughput::Bytes(traffic.server.len() as u64));
    group.bench_function("backend_split", |b| {
        b.iter(|| {
            walk(
                black_box(&traffic.server),
                split(Direction::Backend, &limits),
            )
        })
    });
    group.bench_function("backend_decode", |b| {
        b.iter(|| {
            walk(black_box(&traffic.server), |bytes| {
                let (message, used) = BackendMessage::decode_from(bytes, &limits)
                    .expect("valid")
                    .expect("whole");
                black_box(message);
                used
            })
        })
    });
    let startup_bytes: usize = traffic.startup.iter().map(Vec::len).sum();
    group.throughput(Throughput::Bytes(startup_bytes as u64));
    group.bench_function("startup_decode", |b| {
        b.iter(|| {
            for packet in &traffic.startup {
                let decoded = StartupRequest::decode_from(black_box(packet), &limits)
                    .expect("valid")
                    .expect("whole");
                black_box(decoded);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, parsers);
criterion_main!(benches);

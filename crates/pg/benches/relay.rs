//! Relay parsing throughput on captured pgbench traffic (testdata/pg/pgbench_*.capture):
//! the bytes of both directions go through `Relay`, audit events are drained, as the
//! agent does. Reported as bytes of traffic per second. `relay/pgbench_*` replays each
//! capture as recorded (every connection, from its start-up packet); `*_session`
//! replays the benchmark client's statements again and again through one relay, as a
//! long run does (`support::session_reads`).
//!
//! Run: `cargo bench -p postern-pg --bench relay`. Results are in crates/pg/README.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use postern_pg::{Limits, Relay};

fn relay_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("relay");
    for name in ["pgbench_prepared", "pgbench_simple", "pgbench_extended"] {
        let chunks = support::load(name);
        let bytes: usize = chunks.iter().map(|c| c.bytes.len()).sum();
        assert!(
            support::replay_counting(&chunks) > 100,
            "{name}: too few events"
        );
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(name, |b| {
            b.iter(|| support::replay_counting(black_box(&chunks)))
        });
    }
    // The client's session alone, over and over through one relay: a pgbench run longer
    // than the capture, as the agent's relay sees it (from after authentication).
    for name in ["pgbench_prepared", "pgbench_simple", "pgbench_extended"] {
        let chunks = support::load(name);
        let reads = support::session_reads(&chunks, support::busiest_connection(&chunks));
        let bytes: usize = reads.iter().map(|(_, b)| b.len()).sum();
        let mut relay = Relay::new(Limits::default());
        assert!(
            support::replay_session(&mut relay, &reads) > 100,
            "{name}: too few events in a session"
        );
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(format!("{name}_session"), |b| {
            b.iter(|| support::replay_session(&mut relay, black_box(&reads)))
        });
    }
    // Large results: the path pg_dump and big SELECTs take. 64 KiB reads of 8 KiB
    // DataRows, skipped without copying.
    let mut stream = Vec::new();
    for _ in 0..2048 {
        postern_pg::BackendMessage::DataRow(vec![Some(vec![b'x'; 8192])])
            .encode(&mut stream)
            .expect("small message encodes");
    }
    let query = {
        let mut out = Vec::new();
        postern_pg::FrontendMessage::Query(b"select big".to_vec())
            .encode(&mut out)
            .expect("small message encodes");
        out
    };
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("large_datarows", |b| {
        b.iter(|| {
            let mut relay = Relay::new(Limits::default());
            assert!(relay.handle_client_bytes(&query).is_ok());
            for chunk in stream.chunks(64 << 10) {
                assert!(relay.handle_server_bytes(black_box(chunk)).is_ok());
            }
            relay.held_bytes()
        })
    });
    group.finish();
}

criterion_group!(benches, relay_throughput);
criterion_main!(benches);

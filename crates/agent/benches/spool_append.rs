//! The audit spool's durable append, on the disk of the temporary folder (set `TMPDIR` to
//! measure another): each iteration is one [`Spool::append`], that is one write and one
//! `fdatasync`, which every statement's answer waits for.
//!
//! - `append/1`: one event per append, as with one client (a statement, an fsync);
//! - `append/16`: sixteen events per append, as group commit gathers them from sixteen
//!   busy sessions.
//!
//! The spool's segments rotate as in the agent (every [`spool::SEGMENT_SIZE_MAX`] bytes);
//! nothing is shipped, so the spool only grows during a run. Reported as events per second.
//!
//! Run: `cargo bench -p postern-agent --bench spool_append`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use postern_agent::spool::{self, Spool};
use postern_auth::audit::AuditEvent;
use postern_rt::Rng;
use time::OffsetDateTime;

/// An event the size of a select-only statement's (about 400 bytes as JSON).
fn event(rng: &mut Rng, n: usize) -> AuditEvent {
    AuditEvent::new(
        ("db.session.query", "TDB02I"),
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + n as i64).expect("time"),
        rng,
    )
    .with_field("user", "alice@example.com")
    .with_field("db_service", "pgbench")
    .with_field("db_user", "postgres")
    .with_field("session_id", "7c1d2f0e-2b7a-4a7e-9a51-0f3c2f3e9d11")
    .with_field(
        "query",
        format!("SELECT abalance FROM pgbench_accounts WHERE aid = {n};"),
    )
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    group.sample_size(50);
    for per_append in [1usize, 16] {
        let dir = tempfile::tempdir().expect("temporary folder");
        let spool = Spool::open(dir.path(), spool::SPOOL_SIZE_MAX_DEFAULT).expect("spool");
        let mut rng = Rng::from_seed(7);
        let batches: Vec<Vec<AuditEvent>> = (0..64)
            .map(|b| {
                (0..per_append)
                    .map(|i| event(&mut rng, b * per_append + i))
                    .collect()
            })
            .collect();
        let mut next = 0;
        group.throughput(Throughput::Elements(per_append as u64));
        group.bench_function(per_append.to_string(), |b| {
            b.iter(|| {
                spool
                    .append(&batches[next % batches.len()])
                    .expect("append");
                next += 1;
            })
        });
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);

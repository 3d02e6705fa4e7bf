//! The agent's relay loop end to end in memory: the captured pgbench sessions
//! (testdata/pg/pgbench_*.capture) go through `postern_agent::relay` over tokio duplex
//! streams, every connection at once, with the audit channel drained; the database side
//! sends each captured answer only once the requests before it arrived. Reported as bytes
//! of traffic (both directions) per second.
//!
//! - `loop/<capture>`: events owned (`relay::run`), handed to a channel;
//! - `audit/<capture>`: events rendered as audit records, as sessions do;
//! - `durable/<capture>`: the same, written to a spool in a temporary folder, with each
//!   chunk waiting for its events' fsync (group commit across the connections).
//!
//! Run: `cargo bench -p postern-agent --bench relay_loop`.

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use postern_agent::relay::{self, Controls, EventOut, Pending, RelayEnd};
use postern_agent::spool::{self, Spool};
use postern_auth::audit::AuditEvent;
use postern_pg::audit::EventView;
use postern_pg::{Limits, Relay};
use postern_rt::{Blocking, Rng};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

/// One captured connection: the client's chunks, and the server's, each with the number
/// of client bytes sent before it in the capture.
#[derive(Clone)]
struct Session {
    client: Vec<Vec<u8>>,
    server: Vec<(usize, Vec<u8>)>,
}

impl Session {
    fn bytes(&self) -> usize {
        self.client.iter().map(Vec::len).sum::<usize>()
            + self.server.iter().map(|(_, c)| c.len()).sum::<usize>()
    }
}

fn load(name: &str) -> Vec<Session> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/pg")
        .join(format!("{name}.capture"));
    let text = std::fs::read_to_string(&path).expect("capture");
    let mut sessions: Vec<(u32, Session, usize)> = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut parts = line.split(' ');
        let connection: u32 = parts.next().and_then(|c| c.parse().ok()).expect("id");
        let side = parts.next().expect("side");
        let hex = parts.next().expect("hex");
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let index = match sessions.iter().position(|(c, _, _)| *c == connection) {
            Some(i) => i,
            None => {
                let empty = Session {
                    client: Vec::new(),
                    server: Vec::new(),
                };
                sessions.push((connection, empty, 0));
                sessions.len() - 1
            }
        };
        let (_, session, sent) = &mut sessions[index];
        match side {
            "C" => {
                *sent += bytes.len();
                session.client.push(bytes);
            }
            _ => session.server.push((*sent, bytes)),
        }
    }
    sessions.into_iter().map(|(_, s, _)| s).collect()
}

/// The client: sends its chunks, reads everything back.
async fn client(mut stream: DuplexStream, chunks: Vec<Vec<u8>>) {
    let (mut read, mut write) = tokio::io::split(&mut stream);
    let reading = async {
        let mut buf = vec![0; 16 << 10];
        while read.read(&mut buf).await.expect("read") > 0 {}
    };
    let writing = async {
        for chunk in &chunks {
            write.write_all(chunk).await.expect("write");
        }
        write.shutdown().await.expect("shutdown");
    };
    tokio::join!(reading, writing);
}

/// The database: sends each answer once the requests before it arrived.
async fn database(mut stream: DuplexStream, answers: Vec<(usize, Vec<u8>)>) {
    let (mut read, mut write) = tokio::io::split(&mut stream);
    let (arrived_tx, mut arrived) = tokio::sync::watch::channel(0usize);
    let reading = async {
        let mut buf = vec![0; 16 << 10];
        let mut total = 0;
        loop {
            let n = read.read(&mut buf).await.expect("read");
            if n == 0 {
                return;
            }
            total += n;
            let _ = arrived_tx.send(total);
        }
    };
    let writing = async {
        for (after, chunk) in &answers {
            let _ = arrived.wait_for(|n| n >= after).await;
            write.write_all(chunk).await.expect("write");
        }
        write.shutdown().await.expect("shutdown");
    };
    tokio::join!(reading, writing);
}

/// Runs every session at once; `relay_one` relays one of them.
async fn run_all<Fut>(sessions: &[Session], relay_one: impl Fn(DuplexStream, DuplexStream) -> Fut)
where
    Fut: Future<Output = RelayEnd>,
{
    let mut runs = Vec::new();
    for session in sessions {
        let (client_end, agent_client) = tokio::io::duplex(64 << 10);
        let (agent_server, db_end) = tokio::io::duplex(64 << 10);
        let relayed = relay_one(agent_client, agent_server);
        runs.push(async move {
            let (end, (), ()) = tokio::join!(
                relayed,
                client(client_end, session.client.clone()),
                database(db_end, session.server.clone()),
            );
            assert_eq!(end, RelayEnd::Closed);
        });
    }
    futures_util::future::join_all(runs).await;
}

fn render(rng: &Rng) -> impl Fn(EventView<'_>) -> AuditEvent + '_ {
    |view: EventView<'_>| {
        let event = AuditEvent::new(
            (view.name(), view.code()),
            time::OffsetDateTime::UNIX_EPOCH,
            &mut rng.clone(),
        );
        match view.query() {
            Some(query) => event.with_field("query", postern_pg::audit::text(query).as_ref()),
            None => event,
        }
    }
}

fn relay_loop(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("relay_loop");
    group.sample_size(20);
    for name in ["pgbench_prepared", "pgbench_simple"] {
        let sessions = load(name);
        let bytes: usize = sessions.iter().map(Session::bytes).sum();
        group.throughput(Throughput::Bytes(bytes as u64));

        group.bench_function(format!("loop/{name}"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    run_all(&sessions, |agent_client, agent_server| async move {
                        let (events, mut drained) = mpsc::channel(256);
                        let drain = async move { while drained.recv().await.is_some() {} };
                        let relayed = relay::run(
                            agent_client,
                            agent_server,
                            Relay::from_startup(Limits::default()),
                            Pending::default(),
                            events,
                        );
                        tokio::join!(relayed, drain).0
                    })
                    .await
                })
            })
        });

        let rng = Rng::from_seed(1);
        group.bench_function(format!("audit/{name}"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    run_all(&sessions, |agent_client, agent_server| {
                        let (events, mut drained) = mpsc::channel(256);
                        let out = EventOut::new(render(&rng), events);
                        async move {
                            let drain = async move { while drained.recv().await.is_some() {} };
                            let relayed = relay::run_with_controls(
                                agent_client,
                                agent_server,
                                Relay::from_startup(Limits::default()),
                                Pending::default(),
                                out,
                                Controls::default(),
                            );
                            tokio::join!(relayed, drain).0
                        }
                    })
                    .await
                })
            })
        });

        group.bench_function(format!("durable/{name}"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let dir = tempfile::tempdir().expect("temp dir");
                    let spool = Arc::new(Spool::open(dir.path(), 1 << 30).expect("spool"));
                    let (audit, audit_rx) = mpsc::channel(1024);
                    let writer = tokio::spawn(spool::write_events(
                        Arc::clone(&spool),
                        audit_rx,
                        Blocking::Pool,
                    ));
                    run_all(&sessions, |agent_client, agent_server| {
                        let out = EventOut::new(render(&rng), audit.clone())
                            .durable(spool.gate().durable(), |e: &AuditEvent| e.id.as_str());
                        relay::run_with_controls(
                            agent_client,
                            agent_server,
                            Relay::from_startup(Limits::default()),
                            Pending::default(),
                            out,
                            Controls::default(),
                        )
                    })
                    .await;
                    drop(audit);
                    writer.await.expect("writer");
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, relay_loop);
criterion_main!(benches);

// Goal: with the spool's durability wait, the database never receives a statement while
// an event of an earlier statement is not yet fsync'd in the spool file.

use std::path::Path;
use std::sync::Arc;

use postern_agent::relay::{self, EventOut, Pending, RelayEnd};
use postern_agent::spool::{self, Decoded, Spool, decode_record};
use postern_auth::audit::AuditEvent;
use postern_pg::audit::EventView;
use postern_pg::backend::TransactionStatus;
use postern_pg::{BackendMessage, FrontendMessage, Limits, Relay};
use postern_rt::{Blocking, Rng};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

const QUERIES: usize = 30;

/// Events in the spool's segment files as they are on disk now.
fn events_on_disk(root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(root.join("audit-spool")) else {
        return 0;
    };
    let mut count = 0;
    for entry in entries {
        let bytes = std::fs::read(entry.expect("dir entry").path()).expect("segment");
        let mut at = 0;
        while let Decoded::Record { used, .. } = decode_record(&bytes[at..]) {
            at += used;
            count += 1;
        }
    }
    count
}

/// A database that answers each Query with CommandComplete and ReadyForQuery, and
/// notes, for each, how many events were on disk when it arrived.
async fn database(mut db: DuplexStream, root: &Path) -> Vec<usize> {
    let limits = Limits::default();
    let mut buf = Vec::new();
    let mut seen = Vec::new();
    loop {
        while let Some((message, used)) = FrontendMessage::decode_from(&buf, &limits).unwrap() {
            buf.drain(..used);
            match message {
                FrontendMessage::Query(_) => {
                    seen.push(events_on_disk(root));
                    let mut out = Vec::new();
                    BackendMessage::CommandComplete(b"SELECT 1".to_vec())
                        .encode(&mut out)
                        .unwrap();
                    BackendMessage::ready_for_query(TransactionStatus::Idle)
                        .encode(&mut out)
                        .unwrap();
                    db.write_all(&out).await.unwrap();
                }
                FrontendMessage::Terminate => return seen,
                other => panic!("unexpected {other:?}"),
            }
        }
        if db.read_buf(&mut buf).await.unwrap() == 0 {
            return seen;
        }
    }
}

/// A client that sends one query at a time and waits for ReadyForQuery.
async fn client(mut client: DuplexStream) {
    let limits = Limits::default();
    let mut buf = Vec::new();
    for i in 0..QUERIES {
        let mut out = Vec::new();
        FrontendMessage::Query(format!("select {i}").into_bytes())
            .encode(&mut out)
            .unwrap();
        client.write_all(&out).await.unwrap();
        'answer: loop {
            while let Some((message, used)) = BackendMessage::decode_from(&buf, &limits).unwrap() {
                buf.drain(..used);
                if matches!(message, BackendMessage::ReadyForQuery(_)) {
                    break 'answer;
                }
            }
            assert!(client.read_buf(&mut buf).await.unwrap() > 0);
        }
    }
    let mut out = Vec::new();
    FrontendMessage::Terminate.encode(&mut out).unwrap();
    client.write_all(&out).await.unwrap();
    client.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_statement_runs_before_earlier_events_are_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 1 << 20).unwrap());
    let (audit, audit_rx) = mpsc::channel::<AuditEvent>(64);
    // The pool, as in production: fsync takes real time on another thread.
    let writer = tokio::spawn(spool::write_events(
        Arc::clone(&spool),
        audit_rx,
        Blocking::Pool,
    ));

    let (client_end, agent_client) = tokio::io::duplex(64 << 10);
    let (agent_server, db_end) = tokio::io::duplex(64 << 10);
    let rng = Rng::from_seed(7);
    let render = move |view: EventView<'_>| {
        AuditEvent::new(
            (view.name(), view.code()),
            time::OffsetDateTime::UNIX_EPOCH,
            &mut rng.clone(),
        )
    };
    let events = EventOut::new(render, audit.clone())
        .durable(spool.gate().durable(), |event: &AuditEvent| {
            event.id.as_str()
        });
    let root = dir.path().to_owned();
    let (end, seen, ()) = tokio::join!(
        relay::run_with_controls(
            agent_client,
            agent_server,
            Relay::new(Limits::default()),
            Pending::default(),
            events,
            relay::Controls::default(),
        ),
        database(db_end, &root),
        client(client_end),
    );
    assert_eq!(end, RelayEnd::Closed);
    // Query i arrived after the events of queries 0..i were fsync'd, and before its own
    // could exist.
    let expected: Vec<usize> = (0..QUERIES).collect();
    assert_eq!(seen, expected);
    // Every event is on disk when the relay returns.
    assert_eq!(events_on_disk(dir.path()), QUERIES);
    drop(audit);
    writer.await.unwrap();
}

// Goal: when the spool's writer stops, a session waiting for durability ends with
// AuditClosed instead of running statements whose events will never be written.
#[tokio::test]
async fn a_stopped_writer_ends_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 1 << 20).unwrap());
    // The session's queue stays open; only the writer is gone.
    let (audit, _queue) = mpsc::channel::<AuditEvent>(64);
    let durable = spool.gate().durable();
    let (senders_gone, nothing) = mpsc::channel::<AuditEvent>(1);
    drop(senders_gone);
    spool::write_events(Arc::clone(&spool), nothing, Blocking::Inline).await;
    assert!(
        durable.wait_for("any").is_err(),
        "a stopped writer refuses waiters"
    );

    let (mut client_end, agent_client) = tokio::io::duplex(1 << 10);
    let (agent_server, mut db_end) = tokio::io::duplex(1 << 10);
    let rng = Rng::from_seed(8);
    let render = move |view: EventView<'_>| {
        AuditEvent::new(
            (view.name(), view.code()),
            time::OffsetDateTime::UNIX_EPOCH,
            &mut rng.clone(),
        )
    };
    let events =
        EventOut::new(render, audit).durable(durable, |event: &AuditEvent| event.id.as_str());
    let mut query = Vec::new();
    FrontendMessage::Query(b"select 1".to_vec())
        .encode(&mut query)
        .unwrap();
    let mut answer = Vec::new();
    BackendMessage::CommandComplete(b"SELECT 1".to_vec())
        .encode(&mut answer)
        .unwrap();
    BackendMessage::ready_for_query(TransactionStatus::Idle)
        .encode(&mut answer)
        .unwrap();
    client_end.write_all(&query).await.unwrap();
    let database = async {
        // Answer once the query arrived.
        let mut received = vec![0; query.len()];
        db_end.read_exact(&mut received).await.unwrap();
        assert_eq!(received, query);
        db_end.write_all(&answer).await.unwrap();
    };
    let (end, ()) = tokio::join!(
        relay::run_with_controls(
            agent_client,
            agent_server,
            Relay::new(Limits::default()),
            Pending::default(),
            events,
            relay::Controls::default(),
        ),
        database,
    );
    assert_eq!(end, RelayEnd::AuditClosed);
}

// Goal: under every interleaving loom explores, a session woken by the spool's durability
// notification finds its event written, concurrent sessions' events all reach the spool
// in one piece, and the shipper's next_batch/ack running alongside loses and repeats
// nothing. Run: RUSTFLAGS="--cfg postern_loom" cargo test -p postern-agent --test loom_spool --release
#![cfg(postern_loom)]

use std::pin::pin;
use std::task::{Context, Poll, Wake, Waker};

use loom::sync::mpsc;
use loom::sync::{Arc, Mutex};
use postern_agent::spool::{Spool, encode_record};
use postern_auth::audit::AuditEvent;
use postern_rt::Rng;

const SESSIONS: usize = 2;

fn event(rng: &Rng) -> AuditEvent {
    AuditEvent::new(
        ("db.session.query", "TDB02I"),
        time::OffsetDateTime::UNIX_EPOCH,
        &mut rng.clone(),
    )
}

/// Bytes `event` takes in a segment file.
fn record_len(event: &AuditEvent) -> u64 {
    let mut record = Vec::new();
    encode_record(&serde_json::to_vec(event).unwrap(), &mut record).unwrap();
    record.len() as u64
}

/// Wakes a loom thread parked in [`block_on`].
struct Unpark(loom::thread::Thread);

impl Wake for Unpark {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `future` on this loom thread, parking between polls.
fn block_on<F: Future>(future: F) -> F::Output {
    let waker = Waker::from(std::sync::Arc::new(Unpark(loom::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        loom::thread::park();
    }
}

#[test]
fn append_ship_ack_and_durable_wakeups() {
    let mut model = loom::model::Builder::new();
    // File I/O runs in every explored execution: keep the search to what finds ordering
    // bugs in practice (two preemptions).
    model.preemption_bound = Some(2);
    model.check(|| {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), 1 << 20).unwrap());
        let durable = spool.gate().durable();
        let (queue, queued) = mpsc::channel::<AuditEvent>();
        // Bytes the shipper acknowledged, counted with the ack under one lock so that a
        // session reads the two as one.
        let acked = Arc::new(Mutex::new(0u64));
        let rng = Rng::from_seed(3);

        let sessions: Vec<_> = (0..SESSIONS)
            .map(|_| {
                let event = event(&rng);
                let queue = queue.clone();
                let durable = durable.clone();
                let spool = Arc::clone(&spool);
                let acked = Arc::clone(&acked);
                loom::thread::spawn(move || {
                    let len = record_len(&event);
                    let wait = durable.wait_for(&event.id).unwrap();
                    queue.send(event).unwrap();
                    block_on(wait.wait()).expect("the writer runs");
                    // The wake-up travels through tokio's oneshot, whose atomics loom does
                    // not see; passing through the waiters' lock (which the writer held
                    // while waking) gives loom the happens-before the oneshot gives the
                    // real program.
                    drop(durable.wait_for("sync point").unwrap());
                    // Woken: the event is on disk (still spooled, or shipped and acked).
                    let held = {
                        let acked = acked.lock().unwrap();
                        spool.size() + *acked
                    };
                    assert!(held >= len, "woken with {held} of {len} bytes written");
                })
            })
            .collect();
        drop(queue);

        let writer = {
            let spool = Arc::clone(&spool);
            loom::thread::spawn(move || {
                // Everything queued so far in one commit (group commit), until every
                // session's event is written. (loom's channel does not report senders
                // gone, so the writer counts.)
                let mut written = 0;
                while written < SESSIONS {
                    let mut batch = vec![queued.recv().unwrap()];
                    while let Ok(more) = queued.try_recv() {
                        batch.push(more);
                    }
                    written += batch.len();
                    spool.commit(&batch).unwrap();
                }
            })
        };

        let shipper = {
            let spool = Arc::clone(&spool);
            let acked = Arc::clone(&acked);
            loom::thread::spawn(move || {
                let (events, ticket) = spool.next_batch(10).unwrap();
                if !events.is_empty() {
                    let bytes: u64 = events.iter().map(record_len).sum();
                    let mut acked = acked.lock().unwrap();
                    *acked += bytes;
                    spool.ack(ticket).unwrap();
                }
                events.len()
            })
        };

        for session in sessions {
            session.join().unwrap();
        }
        writer.join().unwrap();
        let shipped = shipper.join().unwrap();

        // What the shipper did not take is still there, once, in order of commit.
        let (rest, ticket) = spool.next_batch(10).unwrap();
        assert_eq!(shipped + rest.len(), SESSIONS, "every event exactly once");
        spool.ack(ticket).unwrap();
        assert_eq!(spool.size(), 0, "all acknowledged: nothing held");
        assert!(durable.wait_for("later").is_ok(), "the writer never closed");
    });
}

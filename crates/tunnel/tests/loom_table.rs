//! loom models of the proxy's tunnel table ([`TunnelTable`]) as its tasks share it:
//! agent connections registering, announcing and dropping tunnels while client
//! connections pick routes and take channels. loom runs every interleaving.
//!
//! `RUSTFLAGS="--cfg postern_loom" cargo test -p postern-tunnel --test loom_table --release`
#![cfg(postern_loom)]

use std::time::Duration;

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering::SeqCst};
use loom::thread;
use postern_tunnel::{Closing, Error, RegistryLimits, TunnelTable};

/// A certificate that outlives the model.
const NEVER: Duration = Duration::MAX;
const NOW: Duration = Duration::ZERO;

fn table() -> Arc<TunnelTable<u32>> {
    Arc::new(TunnelTable::new(RegistryLimits::default()).unwrap())
}

fn pg() -> Vec<String> {
    vec!["pg".to_owned()]
}

/// What a client connection does: pick the routes to `pg`, take a channel on each, give
/// it back. `gone[h]` is set once tunnel `h`'s session was handed out for closing; a
/// channel taken after that would run over a closed session.
fn connect(table: &TunnelTable<u32>, gone: &[AtomicBool]) {
    for candidate in table.candidates("pg") {
        let gone_before: Vec<bool> = gone.iter().map(|g| g.load(SeqCst)).collect();
        match table.reserve(candidate.tunnel) {
            Ok((session, agent)) => {
                assert!(
                    !gone_before[session as usize],
                    "a channel on session {session} after it was handed out for closing"
                );
                assert_eq!(agent, "agent");
                table.release(candidate.tunnel);
            }
            Err(error) => assert!(
                matches!(error, Error::UnknownTunnel { tunnel } if tunnel == candidate.tunnel),
                "{error}"
            ),
        }
    }
}

/// A session handed out for closing: it must be the first time.
fn closed(gone: &[AtomicBool], session: u32) {
    assert!(
        !gone[session as usize].swap(true, SeqCst),
        "session {session} handed out for closing twice"
    );
}

// One agent connects, announces and disconnects while a client connects: the client
// never gets a channel on the tunnel once its removal completed, the session is handed
// back exactly once, and nothing is left behind.
#[test]
fn no_route_after_the_tunnel_went_down() {
    loom::model(|| {
        let table = table();
        let gone = Arc::new([AtomicBool::new(false)]);
        let agent = {
            let (table, gone) = (table.clone(), gone.clone());
            thread::spawn(move || {
                let tunnel = table.tunnel_up(NOW, "agent", NEVER, 0).unwrap();
                table.announce(NOW, tunnel, pg()).unwrap();
                let session = table.tunnel_down(NOW, tunnel);
                assert_eq!(session, Some(0), "the session of a live tunnel");
                closed(&gone[..], 0);
                tunnel
            })
        };
        connect(&table, &gone[..]);
        let tunnel = agent.join().unwrap();
        assert_eq!(table.tunnels(), 0);
        assert_eq!(table.sessions(), 0);
        assert_eq!(table.channels_open(tunnel), 0);
        assert!(table.take_closing().is_empty());
    });
}

// An agent reconnects (its new tunnel replaces the old one) while the old connection's
// task notices its end and a client connects. Each session is handed out for closing
// exactly once, by whichever path sees it go first; no channel is taken on a session
// after that; the table ends empty.
#[test]
fn a_replaced_tunnel_is_closed_exactly_once() {
    let mut model = loom::model::Builder::new();
    // Three threads of a few lock operations each: a bound of 3 preemptions finishes in
    // seconds and still reaches every order of the lock acquisitions in this model.
    model.preemption_bound = Some(3);
    model.check(|| {
        let table = table();
        let gone = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let old = table.tunnel_up(NOW, "agent", NEVER, 0).unwrap();
        table.announce(NOW, old, pg()).unwrap();

        let old_task = {
            let (table, gone) = (table.clone(), gone.clone());
            thread::spawn(move || {
                if let Some(session) = table.tunnel_down(NOW, old) {
                    assert_eq!(session, 0);
                    closed(&gone[..], session);
                }
            })
        };
        let new_task = {
            let (table, gone) = (table.clone(), gone.clone());
            thread::spawn(move || {
                let new = table.tunnel_up(NOW, "agent", NEVER, 1).unwrap();
                for Closing {
                    tunnel, session, ..
                } in table.take_closing()
                {
                    assert_eq!(
                        (tunnel, session),
                        (old, 0),
                        "only the old tunnel is replaced"
                    );
                    closed(&gone[..], session);
                }
                table.announce(NOW, new, pg()).unwrap();
                new
            })
        };
        connect(&table, &gone[..]);
        old_task.join().unwrap();
        let new = new_task.join().unwrap();

        assert!(gone[0].load(SeqCst), "the old session was never closed");
        assert_eq!(table.tunnels(), 1);
        assert_eq!(table.candidates("pg").len(), 1);
        assert_eq!(table.channels_open(new), 0);
        assert_eq!(table.tunnel_down(NOW, new), Some(1));
        assert_eq!(table.sessions(), 0);
    });
}

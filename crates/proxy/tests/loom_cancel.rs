//! loom models of the proxy's cancel-key table ([`CancelKeys`]) as its tasks share it:
//! sessions register their key at start and drop it at end while cancel requests look
//! keys up. loom runs every interleaving.
//!
//! `RUSTFLAGS="--cfg postern_loom" cargo test -p postern-proxy --test loom_cancel --release`
#![cfg(postern_loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering::SeqCst};
use loom::thread;
use postern_pg::frontend::CancelRequest;
use postern_proxy::cancel::{CancelKeys, CancelRoute};
use postern_tunnel::TunnelId;

/// Every interleaving with at most two preemptions: three threads of a few lock and
/// flag operations each, checked in seconds instead of minutes.
fn bounded() -> loom::model::Builder {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model
}

fn key(pid: i32) -> CancelRequest {
    CancelRequest {
        process_id: pid,
        secret_key: b"secret".to_vec(),
    }
}

fn route(tunnel: u64) -> CancelRoute {
    CancelRoute {
        tunnel: TunnelId(tunnel),
        agent: format!("agent-{tunnel}"),
        database: "orders".to_owned(),
    }
}

/// Where a session is in its life, as a cancel request could observe it.
#[derive(Default)]
struct Life {
    /// Its key is registered.
    started: AtomicBool,
    /// Its registration is about to be dropped: from here on its key may be gone.
    ending: AtomicBool,
    /// Its registration was dropped: the session is over.
    ended: AtomicBool,
}

/// One session on `tunnel` with `key`: registers, runs, ends.
fn session(keys: &CancelKeys, key: &CancelRequest, tunnel: u64, life: &Life) {
    let registration = keys.register(key, route(tunnel)).unwrap();
    life.started.store(true, SeqCst);
    life.ending.store(true, SeqCst);
    drop(registration);
    life.ended.store(true, SeqCst);
}

fn spawn_session(
    keys: &Arc<CancelKeys>,
    pid: i32,
    tunnel: u64,
    life: &Arc<Life>,
) -> thread::JoinHandle<()> {
    let (keys, life) = (keys.clone(), life.clone());
    thread::spawn(move || session(&keys, &key(pid), tunnel, &life))
}

// Two sessions with their own keys run while a cancel request looks both keys up: a
// lookup finds a session that ran throughout it, never one that had already ended, and
// never the other session; the table ends empty.
#[test]
fn a_lookup_finds_running_sessions_and_never_ended_ones() {
    bounded().check(|| {
        let keys = Arc::new(CancelKeys::new(10));
        let lives = [Arc::new(Life::default()), Arc::new(Life::default())];
        let sessions = [
            spawn_session(&keys, 1, 1, &lives[0]),
            spawn_session(&keys, 2, 2, &lives[1]),
        ];
        for (i, life) in lives.iter().enumerate() {
            let started_before = life.started.load(SeqCst);
            let ended_before = life.ended.load(SeqCst);
            let found = keys.route(&key(i as i32 + 1));
            let ending_after = life.ending.load(SeqCst);
            match found {
                Some(found) => {
                    assert_eq!(found, route(i as u64 + 1), "another session's route");
                    assert!(!ended_before, "found session {i} after it ended");
                }
                None => assert!(
                    !(started_before && !ending_after),
                    "session {i} ran throughout the lookup and was not found"
                ),
            }
        }
        for session in sessions {
            session.join().unwrap();
        }
        assert!(keys.is_empty(), "{} keys left behind", keys.len());
    });
}

// Two sessions on different databases were handed the same key (PostgreSQL servers
// pick keys independently): a lookup never finds a session that already ended, whichever
// order they register and end in, and the table ends empty.
#[test]
fn a_shared_key_never_routes_to_an_ended_session() {
    bounded().check(|| {
        let keys = Arc::new(CancelKeys::new(10));
        let lives = [Arc::new(Life::default()), Arc::new(Life::default())];
        let sessions = [
            spawn_session(&keys, 7, 1, &lives[0]),
            spawn_session(&keys, 7, 2, &lives[1]),
        ];
        let ended_before = lives.each_ref().map(|life| life.ended.load(SeqCst));
        if let Some(found) = keys.route(&key(7)) {
            let i = found.tunnel.0 as usize - 1;
            assert!(!ended_before[i], "found session {i} after it ended");
        }
        for session in sessions {
            session.join().unwrap();
        }
        assert!(keys.is_empty(), "{} keys left behind", keys.len());
    });
}

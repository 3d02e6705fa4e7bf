//! loom model of the per-user session limit ([`UserSlots`]) as connection tasks share
//! it: each takes a slot when its client is validated and gives it back when the session
//! ends. loom runs every interleaving.
//!
//! `RUSTFLAGS="--cfg postern_loom" cargo test -p postern-proxy --test loom_limits --release`
#![cfg(postern_loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use loom::thread;
use postern_proxy::limits::UserSlots;

/// Every interleaving with at most two preemptions: three threads of a few lock and
/// flag operations each, checked in seconds instead of minutes.
fn bounded() -> loom::model::Builder {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model
}

/// One session of `user`: takes a slot, runs (counted in `holding`), ends. Whether it got
/// a slot.
fn session(slots: &UserSlots, user: &str, holding: &AtomicUsize) -> bool {
    let Some(slot) = slots.acquire(user) else {
        return false;
    };
    let running = holding.fetch_add(1, SeqCst) + 1;
    assert!(
        running <= slots.max(),
        "{running} sessions of {user} at once, over the limit of {}",
        slots.max()
    );
    assert!(slots.sessions(user) <= slots.max());
    holding.fetch_sub(1, SeqCst);
    drop(slot);
    true
}

// Two sessions of alice and one of bob start and end at once, at most one each: alice
// never has two sessions, bob is never refused because of alice, a refusal only ever
// means another session held the slot, and every count returns to zero with no entry
// left behind.
#[test]
fn the_per_user_count_stays_within_the_limit_and_returns_to_zero() {
    bounded().check(|| {
        let slots = Arc::new(UserSlots::new(1));
        let alice = Arc::new(AtomicUsize::new(0));
        let spawn = |user: &'static str, holding: Arc<AtomicUsize>| {
            let slots = slots.clone();
            thread::spawn(move || session(&slots, user, &holding))
        };
        let first = spawn("alice", alice.clone());
        let second = spawn("alice", alice.clone());
        let bob = session(&slots, "bob", &AtomicUsize::new(0));
        let alice_served = [first.join().unwrap(), second.join().unwrap()];

        assert!(bob, "bob refused because of alice's sessions");
        // alice's second session can only be refused while her first holds the slot.
        assert!(
            alice_served.contains(&true),
            "both of alice's sessions refused"
        );
        assert_eq!(slots.sessions("alice"), 0);
        assert_eq!(slots.sessions("bob"), 0);
        assert_eq!(slots.users(), 0, "an entry left behind");
        assert!(slots.acquire("alice").is_some());
    });
}

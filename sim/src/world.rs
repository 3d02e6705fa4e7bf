//! What the simulator observes of one run: the trace, the statements the fake databases
//! executed, the audit events the agents emitted and the ones the auth server stored, and
//! the sessions each side saw. The invariants are checked against this record.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::Trace;

/// A statement a fake database executed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executed {
    pub at: Duration,
    /// The database host that ran it.
    pub db: String,
    /// The identity it ran as: the CN of the client certificate the database accepted.
    pub db_user: String,
    pub statement: String,
    /// The agent host whose connection carried it.
    pub via: Option<String>,
}

/// An audit event an agent's session emitted, reduced to what invariants need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Audited {
    /// When the session emitted it (not when auth stored it).
    pub at: Duration,
    pub agent: String,
    /// The event's idempotency key.
    pub id: String,
    pub event: String,
    pub code: String,
    pub user: Option<String>,
    pub db_service: Option<String>,
    pub db_user: Option<String>,
    pub session_id: Option<String>,
    pub query: Option<String>,
}

/// What a simulated client was given by the generator and what it got.
#[derive(Clone, Debug, Default)]
pub struct ClientOutcome {
    pub queries_ok: u64,
    pub queries_failed: u64,
    pub sessions_ok: u64,
    pub sessions_refused: u64,
    /// Sessions that opened although the client's certificate was not acceptable
    /// (expired, foreign CA): must stay empty.
    pub opened_when_not_allowed: Vec<String>,
    /// Replies that came from the wrong database: must stay empty.
    pub wrong_database: Vec<String>,
    /// Whether the client could query in the liveness phase.
    pub live: bool,
}

#[derive(Debug, Default)]
struct Inner {
    trace: Trace,
    executed: Vec<Executed>,
    /// Emitted by sessions, by id: the agents' side.
    emitted: BTreeMap<String, Audited>,
    /// Stored by the auth host, each id once, in the order stored.
    audited: Vec<Audited>,
    stored_ids: BTreeSet<String>,
    /// Host crashes, with their time.
    crashes: Vec<(String, Duration)>,
    /// Invariant violations seen while the run was going.
    violations: Vec<String>,
    /// User CA rotations that completed: when, and the key id of the CA rotated out.
    rotations: Vec<(Duration, Vec<u8>)>,
}

/// The shared record of a run. Cheap to clone; every host writes into the same one.
#[derive(Clone, Debug, Default)]
pub struct World {
    inner: Arc<Mutex<Inner>>,
}

impl World {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave these vectors inconsistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Simulated time since the run began (zero outside a simulation).
    pub fn now() -> Duration {
        turmoil::sim_elapsed().unwrap_or_default()
    }

    pub fn record(&self, host: &str, what: impl Into<String>) {
        self.lock().trace.record(Self::now(), host, what);
    }

    /// Records an event at an explicit time: for the harness, which runs between steps
    /// and is not on any host.
    pub fn record_at(&self, at: Duration, host: &str, what: impl Into<String>) {
        self.lock().trace.record(at, host, what);
    }

    pub fn executed(&self, executed: Executed) {
        let what = format!(
            "executed as {} on {}: {}",
            executed.db_user, executed.db, executed.statement
        );
        let mut inner = self.lock();
        inner.trace.record(executed.at, &executed.db, what);
        inner.executed.push(executed);
    }

    /// A session emitted `audited` (it goes to the agent's spool, then to auth).
    pub fn emitted(&self, audited: Audited) {
        let what = format!(
            "audit {} {} user={} db={} db_user={} {}",
            audited.event,
            audited.code,
            audited.user.as_deref().unwrap_or("-"),
            audited.db_service.as_deref().unwrap_or("-"),
            audited.db_user.as_deref().unwrap_or("-"),
            audited.query.as_deref().unwrap_or("")
        );
        let mut inner = self.lock();
        inner.trace.record(audited.at, &audited.agent, what);
        let id = audited.id.clone();
        if inner.emitted.insert(id.clone(), audited).is_some() {
            inner
                .violations
                .push(format!("audit event id {id} emitted twice"));
        }
    }

    /// The auth host stored the events `ids`: the first time an id arrives it is stored,
    /// later arrivals are resends (the store is idempotent by id). Returns how many were
    /// new.
    pub fn stored(&self, ids: &[String]) -> usize {
        let mut inner = self.lock();
        let mut new = 0;
        for id in ids {
            if !inner.stored_ids.insert(id.clone()) {
                continue;
            }
            new += 1;
            let event = inner.emitted.get(id).cloned();
            match event {
                Some(event) => inner.audited.push(event),
                None => inner
                    .violations
                    .push(format!("auth: stored event {id}, which no session emitted")),
            }
        }
        new
    }

    /// What the auth server's audit log holds after the run, read back from it: the
    /// record of stored events becomes exactly that (the notes taken per shipment are
    /// only progress). An id stored twice is a violation.
    pub fn stored_by_auth(&self, ids: &[String]) {
        {
            let mut inner = self.lock();
            inner.stored_ids.clear();
            inner.audited.clear();
        }
        let new = self.stored(ids);
        if new != ids.len() {
            self.lock().violations.push(format!(
                "auth's audit log holds {} event(s) twice",
                ids.len() - new
            ));
        }
    }

    /// Whether auth has stored every event sessions emitted.
    pub fn all_stored(&self) -> bool {
        let inner = self.lock();
        inner.stored_ids.len() == inner.emitted.len()
    }

    /// Emitted events auth has not stored.
    pub fn unstored(&self) -> Vec<Audited> {
        let inner = self.lock();
        inner
            .emitted
            .values()
            .filter(|a| !inner.stored_ids.contains(&a.id))
            .cloned()
            .collect()
    }

    /// The harness crashed `host` at `at`.
    pub fn crashed(&self, host: &str, at: Duration) {
        self.lock().crashes.push((host.to_owned(), at));
    }

    /// A user CA rotation completed at `at`; `old` (key id) is no longer trusted.
    pub fn rotation_completed(&self, at: Duration, old: Vec<u8>) {
        self.lock().rotations.push((at, old));
    }

    pub fn rotations(&self) -> Vec<(Duration, Vec<u8>)> {
        self.lock().rotations.clone()
    }

    pub fn crashes(&self) -> Vec<(String, Duration)> {
        self.lock().crashes.clone()
    }

    pub fn violation(&self, host: &str, what: impl Into<String>) {
        let what = what.into();
        let mut inner = self.lock();
        inner
            .trace
            .record(Self::now(), host, format!("VIOLATION {what}"));
        inner.violations.push(format!("{host}: {what}"));
    }

    pub fn snapshot_executed(&self) -> Vec<Executed> {
        self.lock().executed.clone()
    }

    /// The events auth stored (each once), with the time their session emitted them.
    pub fn snapshot_audited(&self) -> Vec<Audited> {
        self.lock().audited.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    pub fn trace(&self) -> Trace {
        self.lock().trace.clone()
    }
}

//! What the simulator observes of one run: the trace, the statements the fake databases
//! executed, the audit events the agents emitted, and the sessions each side saw. The
//! invariants are checked against this record.

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
}

/// An audit event an agent handed to its audit sink, reduced to what invariants need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Audited {
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
    audited: Vec<Audited>,
    /// Invariant violations seen while the run was going.
    violations: Vec<String>,
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

    pub fn audited(&self, audited: Audited) {
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
        inner.audited.push(audited);
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

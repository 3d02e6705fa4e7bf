//! Auth state behind one small interface: a key/value store with revisions,
//! compare-and-swap, TTL leases, prefix reads and watches.
//!
//! Three implementations pass the same conformance suite (`tests/backend.rs`):
//! [`MemoryBackend`] for tests and simulation, [`SqliteBackend`] for one machine (the
//! default), and [`PostgresBackend`] for several auth servers sharing one database.
//!
//! Time: a backend reads the wall clock it was given (a rustls `TimeProvider`, in
//! production the runtime seam's clock). Items whose lease has ended are invisible to
//! every read at once; [`Backend::expire`] deletes them and tells watchers. The auth
//! service calls it every second, and a simulator calls it whenever it moves the clock,
//! so expiry is as deterministic as the clock.
//!
//! Keys are printable ASCII without spaces, so that byte order, SQLite's and
//! PostgreSQL's `COLLATE "C"` order agree, and a prefix range needs no escaping.

mod memory;
mod postgres;
mod sqlite;

pub use memory::MemoryBackend;
pub use postgres::PostgresBackend;
pub(crate) use postgres::{check_schema, session_lost};
pub use sqlite::SqliteBackend;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rustls::time_provider::TimeProvider;
use rustls_pki_types::UnixTime;
use tokio::sync::broadcast;

use crate::Error;

/// Longest key, in bytes.
pub const KEY_SIZE_MAX: usize = 1024;
/// Largest value, in bytes.
pub const VALUE_SIZE_MAX: usize = 1024 * 1024;
/// Most items one prefix read returns; more is an error rather than a silent cut.
pub const LIST_ITEMS_MAX: usize = 100_000;
/// Events buffered for each watcher before it is told it lagged.
pub const WATCH_EVENTS_MAX: usize = 4096;

/// A point in the backend's history. Every write gets a new, larger revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub u64);

/// One stored key with its value, the revision of its last write and its lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    pub value: Vec<u8>,
    pub revision: Revision,
    /// When the lease ends; `None` for items that live until deleted.
    pub expires: Option<UnixTime>,
}

/// What a compare-and-swap expects to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// No live item under the key.
    Absent,
    /// A live item written at exactly this revision.
    Revision(Revision),
}

/// A change seen by a watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The item was created or its value replaced.
    Put(Item),
    /// The item was deleted, explicitly or because its lease ended.
    Delete { key: String, revision: Revision },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Self::Put(item) => &item.key,
            Self::Delete { key, .. } => key,
        }
    }
}

/// What travels to watchers: a change, or the news that changes may have been lost
/// (PostgreSQL: the listening session dropped and was re-established).
#[derive(Clone, Debug)]
pub(crate) enum Notice {
    Change(Event),
    Gap,
}

/// The interface every state backend implements.
///
/// Methods return `Send` futures so services can hold a backend across tasks.
pub trait Backend: Send + Sync + 'static {
    /// The live item under `key`, if any.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Item>, Error>> + Send;

    /// Every live item whose key starts with `prefix`, sorted by key.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<Item>, Error>> + Send;

    /// Writes `value` under `key` whatever is there. `ttl` sets a lease.
    fn put(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<Revision, Error>> + Send;

    /// Writes `value` under `key` only if the key is in the `expected` state;
    /// [`Error::Conflict`] otherwise.
    fn compare_and_swap(
        &self,
        key: &str,
        expected: Expect,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<Revision, Error>> + Send;

    /// Deletes the live item under `key`; `false` if there was none.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Deletes the item under `key` only if it is live at `revision`;
    /// [`Error::Conflict`] otherwise.
    fn compare_and_delete(
        &self,
        key: &str,
        revision: Revision,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Deletes every live item under `prefix`; returns how many.
    fn delete_prefix(&self, prefix: &str) -> impl Future<Output = Result<u64, Error>> + Send;

    /// Extends the lease of the item written at `revision` to `ttl` from now, without a
    /// new revision. [`Error::Conflict`] if the item is gone or was rewritten: the
    /// lease holder has lost it and must write it again.
    fn keep_alive(
        &self,
        key: &str,
        revision: Revision,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Deletes every item whose lease has ended, telling watchers; returns how many.
    fn expire(&self) -> impl Future<Output = Result<u64, Error>> + Send;

    /// Changes under `prefix` from now on.
    fn watch(&self, prefix: &str) -> impl Future<Output = Result<Watcher, Error>> + Send;
}

/// A stream of the changes under one prefix.
#[derive(Debug)]
pub struct Watcher {
    prefix: String,
    events: broadcast::Receiver<Notice>,
}

impl Watcher {
    pub(crate) fn new(prefix: &str, events: broadcast::Receiver<Notice>) -> Self {
        Self {
            prefix: prefix.to_owned(),
            events,
        }
    }

    /// The next change under the prefix. [`Error::WatchLagged`] and
    /// [`Error::WatchGap`] mean events were missed: re-read the prefix, then keep
    /// calling `next` (the watcher goes on with the events after the gap).
    pub async fn next(&mut self) -> Result<Event, Error> {
        loop {
            match self.events.recv().await {
                Ok(Notice::Change(event)) if event.key().starts_with(&self.prefix) => {
                    return Ok(event);
                }
                Ok(Notice::Change(_)) => continue,
                Ok(Notice::Gap) => return Err(Error::WatchGap),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    return Err(Error::WatchLagged { missed });
                }
                Err(broadcast::error::RecvError::Closed) => return Err(Error::WatchClosed),
            }
        }
    }

    /// The next change that has already arrived, without waiting.
    pub fn try_next(&mut self) -> Result<Option<Event>, Error> {
        loop {
            match self.events.try_recv() {
                Ok(Notice::Change(event)) if event.key().starts_with(&self.prefix) => {
                    return Ok(Some(event));
                }
                Ok(Notice::Change(_)) => continue,
                Ok(Notice::Gap) => return Err(Error::WatchGap),
                Err(broadcast::error::TryRecvError::Empty) => return Ok(None),
                Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                    return Err(Error::WatchLagged { missed });
                }
                Err(broadcast::error::TryRecvError::Closed) => return Err(Error::WatchClosed),
            }
        }
    }
}

/// Now, in whole seconds since the Unix epoch. A clock that cannot tell the time
/// reads as the epoch, which makes every lease look fresh rather than expired.
pub(crate) fn now_secs(clock: &Arc<dyn TimeProvider>) -> u64 {
    clock.current_time().map_or(0, |now| now.as_secs())
}

/// When a lease of `ttl` taken at `now_secs` ends; rounds up so a lease is never
/// shorter than asked.
pub(crate) fn expiry_secs(now_secs: u64, ttl: Duration) -> u64 {
    let ttl_secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    now_secs.saturating_add(ttl_secs.max(1))
}

pub(crate) fn unix_time(secs: u64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(secs))
}

/// Checks a key: non-empty, at most [`KEY_SIZE_MAX`] bytes, printable ASCII.
pub(crate) fn check_key(key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::invalid("key", "empty"));
    }
    check_prefix(key)
}

/// Checks a prefix: like a key, but may be empty (everything).
pub(crate) fn check_prefix(prefix: &str) -> Result<(), Error> {
    if prefix.len() > KEY_SIZE_MAX {
        return Err(Error::invalid(
            "key",
            format!("{} bytes, more than {KEY_SIZE_MAX}", prefix.len()),
        ));
    }
    if let Some(bad) = prefix.bytes().find(|b| !b.is_ascii_graphic()) {
        return Err(Error::invalid(
            "key",
            format!("{prefix:?} holds byte {bad:#04x}; keys are printable ASCII"),
        ));
    }
    Ok(())
}

pub(crate) fn check_value(value: &[u8]) -> Result<(), Error> {
    if value.len() > VALUE_SIZE_MAX {
        return Err(Error::invalid(
            "value",
            format!("{} bytes, more than {VALUE_SIZE_MAX}", value.len()),
        ));
    }
    Ok(())
}

/// The smallest string greater than every key that starts with `prefix`: keys are
/// printable ASCII, so appending DEL (0x7f) bounds them all.
pub(crate) fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{7f}")
}

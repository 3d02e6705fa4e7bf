//! The SQLite backend: one file, the embedded default for a single auth server.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use postern_rt::Blocking;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use rustls::time_provider::TimeProvider;
use tokio::sync::broadcast;

use super::{
    Backend, Event, Expect, Item, LIST_ITEMS_MAX, Notice, Revision, WATCH_EVENTS_MAX, Watcher,
    check_key, check_prefix, check_value, expiry_secs, now_secs, prefix_end, unix_time,
};
use crate::Error;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS items (
        key TEXT PRIMARY KEY NOT NULL,
        value BLOB NOT NULL,
        revision INTEGER NOT NULL,
        expires INTEGER
    );
    CREATE INDEX IF NOT EXISTS items_expires ON items (expires) WHERE expires IS NOT NULL;
    CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
    INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
";

/// Live rows only: no lease, or a lease that ends after `now` (parameter `?now`).
const LIVE: &str = "(expires IS NULL OR expires > :now)";

/// State in one SQLite file, written in WAL mode with full fsync on every commit.
///
/// Calls run on tokio's blocking pool (or as [`SqliteBackend::with_blocking`] says), one at a time; watchers are fed after commit, in
/// commit order.
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    shared: Arc<Shared>,
    blocking: Blocking,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    connection: Mutex<Connection>,
    clock: Arc<dyn TimeProvider>,
    events: broadcast::Sender<Notice>,
}

impl SqliteBackend {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &Path, clock: Arc<dyn TimeProvider>) -> Result<Self, Error> {
        let connection = Connection::open(path).map_err(sqlite)?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite)?;
        connection
            .pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite)?;
        connection
            .busy_timeout(Duration::from_secs(5))
            .map_err(sqlite)?;
        connection.execute_batch(SCHEMA).map_err(sqlite)?;
        Ok(Self {
            shared: Arc::new(Shared {
                path: path.to_owned(),
                connection: Mutex::new(connection),
                clock,
                events: broadcast::channel(WATCH_EVENTS_MAX).0,
            }),
            blocking: Blocking::Pool,
        })
    }

    /// Runs SQLite calls as `blocking` says: the runtime's policy (inline in simulation,
    /// so a seed replays); tokio's blocking pool by default.
    pub fn with_blocking(mut self, blocking: Blocking) -> Self {
        self.blocking = blocking;
        self
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Runs `op` in one transaction where blocking work runs, then feeds its events to
    /// watchers while still holding the connection, so events keep commit order.
    async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Transaction<'_>, i64, &mut Vec<Event>) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let shared = Arc::clone(&self.shared);
        let task = self.blocking.run(move || {
            let now = i64::try_from(now_secs(&shared.clock)).unwrap_or(i64::MAX);
            let mut connection = shared.lock();
            let transaction = connection.transaction().map_err(sqlite)?;
            let mut events = Vec::new();
            let out = op(&transaction, now, &mut events)?;
            transaction.commit().map_err(sqlite)?;
            for event in events {
                // No receivers is not an error: nobody is watching.
                let _ = shared.events.send(Notice::Change(event));
            }
            Ok(out)
        });
        task.await
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Connection> {
        // SQLite rolls back an unfinished transaction when it is dropped, so a panic
        // while holding the lock leaves the database consistent.
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn sqlite(error: rusqlite::Error) -> Error {
    Error::storage("sqlite", error)
}

fn next_revision(tx: &Transaction<'_>) -> Result<i64, Error> {
    tx.query_row(
        "UPDATE meta SET value = value + 1 WHERE name = 'revision' RETURNING value",
        [],
        |row| row.get(0),
    )
    .map_err(sqlite)
}

fn live_revision(tx: &Transaction<'_>, key: &str, now: i64) -> Result<Option<i64>, Error> {
    tx.query_row(
        &format!("SELECT revision FROM items WHERE key = :key AND {LIVE}"),
        rusqlite::named_params! { ":key": key, ":now": now },
        |row| row.get(0),
    )
    .optional()
    .map_err(sqlite)
}

fn item_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Item> {
    let revision: i64 = row.get(2)?;
    let expires: Option<i64> = row.get(3)?;
    Ok(Item {
        key: row.get(0)?,
        value: row.get(1)?,
        revision: Revision(u64::try_from(revision).unwrap_or(0)),
        expires: expires.map(|secs| unix_time(u64::try_from(secs).unwrap_or(0))),
    })
}

fn write(
    tx: &Transaction<'_>,
    key: &str,
    value: &[u8],
    ttl: Option<Duration>,
    now: i64,
    events: &mut Vec<Event>,
) -> Result<Revision, Error> {
    let revision = next_revision(tx)?;
    let expires = ttl.map(|ttl| expiry_secs(u64::try_from(now).unwrap_or(0), ttl));
    let expires = expires.map(|secs| i64::try_from(secs).unwrap_or(i64::MAX));
    tx.execute(
        "INSERT INTO items (key, value, revision, expires) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (key) DO UPDATE
         SET value = excluded.value, revision = excluded.revision, expires = excluded.expires",
        params![key, value, revision, expires],
    )
    .map_err(sqlite)?;
    let revision = Revision(u64::try_from(revision).unwrap_or(0));
    events.push(Event::Put(Item {
        key: key.to_owned(),
        value: value.to_vec(),
        revision,
        expires: expires.map(|secs| unix_time(u64::try_from(secs).unwrap_or(0))),
    }));
    Ok(revision)
}

fn remove(tx: &Transaction<'_>, key: &str, events: &mut Vec<Event>) -> Result<(), Error> {
    tx.execute("DELETE FROM items WHERE key = ?1", params![key])
        .map_err(sqlite)?;
    let revision = next_revision(tx)?;
    events.push(Event::Delete {
        key: key.to_owned(),
        revision: Revision(u64::try_from(revision).unwrap_or(0)),
    });
    Ok(())
}

fn revision_param(revision: Revision) -> i64 {
    i64::try_from(revision.0).unwrap_or(i64::MAX)
}

impl Backend for SqliteBackend {
    async fn get(&self, key: &str) -> Result<Option<Item>, Error> {
        check_key(key)?;
        let key = key.to_owned();
        self.run(move |tx, now, _| {
            tx.query_row(
                &format!(
                    "SELECT key, value, revision, expires FROM items WHERE key = :key AND {LIVE}"
                ),
                rusqlite::named_params! { ":key": key, ":now": now },
                item_from_row,
            )
            .optional()
            .map_err(sqlite)
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Item>, Error> {
        check_prefix(prefix)?;
        let prefix = prefix.to_owned();
        self.run(move |tx, now, _| {
            let mut statement = tx
                .prepare(&format!(
                    "SELECT key, value, revision, expires FROM items
                     WHERE key >= :start AND key < :end AND {LIVE}
                     ORDER BY key LIMIT :limit"
                ))
                .map_err(sqlite)?;
            let limit = i64::try_from(LIST_ITEMS_MAX + 1).unwrap_or(i64::MAX);
            let rows = statement
                .query_map(
                    rusqlite::named_params! {
                        ":start": prefix, ":end": prefix_end(&prefix), ":now": now, ":limit": limit
                    },
                    item_from_row,
                )
                .map_err(sqlite)?;
            let items = rows.collect::<Result<Vec<_>, _>>().map_err(sqlite)?;
            if items.len() > LIST_ITEMS_MAX {
                return Err(Error::invalid(
                    "prefix",
                    format!("{prefix:?} holds more than {LIST_ITEMS_MAX} items"),
                ));
            }
            Ok(items)
        })
        .await
    }

    async fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<Revision, Error> {
        check_key(key)?;
        check_value(value)?;
        let (key, value) = (key.to_owned(), value.to_vec());
        self.run(move |tx, now, events| write(tx, &key, &value, ttl, now, events))
            .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Expect,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Revision, Error> {
        check_key(key)?;
        check_value(value)?;
        let (key, value) = (key.to_owned(), value.to_vec());
        self.run(move |tx, now, events| {
            let current = live_revision(tx, &key, now)?;
            let matches = match expected {
                Expect::Absent => current.is_none(),
                Expect::Revision(revision) => current == Some(revision_param(revision)),
            };
            if !matches {
                return Err(Error::Conflict { key });
            }
            write(tx, &key, &value, ttl, now, events)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, Error> {
        check_key(key)?;
        let key = key.to_owned();
        self.run(move |tx, now, events| {
            if live_revision(tx, &key, now)?.is_none() {
                return Ok(false);
            }
            remove(tx, &key, events)?;
            Ok(true)
        })
        .await
    }

    async fn compare_and_delete(&self, key: &str, revision: Revision) -> Result<(), Error> {
        check_key(key)?;
        let key = key.to_owned();
        self.run(move |tx, now, events| {
            if live_revision(tx, &key, now)? != Some(revision_param(revision)) {
                return Err(Error::Conflict { key });
            }
            remove(tx, &key, events)
        })
        .await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, Error> {
        check_prefix(prefix)?;
        let prefix = prefix.to_owned();
        self.run(move |tx, now, events| {
            let keys = {
                let mut statement = tx
                    .prepare(&format!(
                        "SELECT key FROM items WHERE key >= :start AND key < :end AND {LIVE}
                         ORDER BY key"
                    ))
                    .map_err(sqlite)?;
                let rows = statement
                    .query_map(
                        rusqlite::named_params! {
                            ":start": prefix, ":end": prefix_end(&prefix), ":now": now
                        },
                        |row| row.get::<_, String>(0),
                    )
                    .map_err(sqlite)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(sqlite)?
            };
            for key in &keys {
                remove(tx, key, events)?;
            }
            Ok(keys.len() as u64)
        })
        .await
    }

    async fn keep_alive(&self, key: &str, revision: Revision, ttl: Duration) -> Result<(), Error> {
        check_key(key)?;
        let key = key.to_owned();
        self.run(move |tx, now, _| {
            let expires = expiry_secs(u64::try_from(now).unwrap_or(0), ttl);
            let updated = tx
                .execute(
                    &format!(
                        "UPDATE items SET expires = :expires
                         WHERE key = :key AND revision = :revision AND {LIVE}"
                    ),
                    rusqlite::named_params! {
                        ":expires": i64::try_from(expires).unwrap_or(i64::MAX),
                        ":key": key,
                        ":revision": revision_param(revision),
                        ":now": now,
                    },
                )
                .map_err(sqlite)?;
            if updated == 0 {
                return Err(Error::Conflict { key });
            }
            Ok(())
        })
        .await
    }

    async fn expire(&self) -> Result<u64, Error> {
        self.run(move |tx, now, events| {
            let keys = {
                let mut statement = tx
                    .prepare("SELECT key FROM items WHERE expires <= ?1 ORDER BY key")
                    .map_err(sqlite)?;
                let rows = statement
                    .query_map(params![now], |row| row.get::<_, String>(0))
                    .map_err(sqlite)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(sqlite)?
            };
            for key in &keys {
                remove(tx, key, events)?;
            }
            Ok(keys.len() as u64)
        })
        .await
    }

    async fn watch(&self, prefix: &str) -> Result<Watcher, Error> {
        check_prefix(prefix)?;
        Ok(Watcher::new(prefix, self.shared.events.subscribe()))
    }
}

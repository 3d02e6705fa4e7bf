//! The PostgreSQL backend: several auth servers share one database.
//!
//! Each backend lives in its own schema. Every write is a single statement, so it needs
//! no client-side transaction. A trigger records each change (with its value) in a
//! `changes` table and announces its revision with `pg_notify`; PostgreSQL delivers
//! notifications in commit order, and the listener fetches exactly the change it was
//! told about. Fetching "everything after the last revision seen" instead would skip
//! changes whose revision was drawn before, but committed after, a later one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use rustls::time_provider::TimeProvider;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_postgres::{AsyncMessage, Client, NoTls, Row};

use super::{
    Backend, Event, Expect, Item, LIST_ITEMS_MAX, Notice, Revision, WATCH_EVENTS_MAX, Watcher,
    check_key, check_prefix, check_value, expiry_secs, now_secs, prefix_end, unix_time,
};
use crate::Error;

/// Longest schema name we accept: leaves room for the `postern_` channel prefix within
/// PostgreSQL's 63-byte identifiers.
const SCHEMA_NAME_MAX: usize = 40;

/// State in one PostgreSQL schema, shared by every auth server that opens it.
///
/// Connections that drop are re-established: the query connection on the next call
/// (the call that found it closed fails), the listening session in the background
/// with backoff, after which watchers get [`Error::WatchGap`] once.
#[derive(Debug, Clone)]
pub struct PostgresBackend {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: tokio_postgres::Config,
    schema: String,
    clock: Arc<dyn TimeProvider>,
    client: tokio::sync::Mutex<Arc<Client>>,
    /// Set when a call found the session gone, so the next call reconnects even if the
    /// connection task has not noticed yet.
    broken: AtomicBool,
    /// Weak, so that watchers see [`Error::WatchClosed`] once the listener task ends.
    events: broadcast::WeakSender<Notice>,
    /// Dropped with the backend, which stops the listener task.
    _stop: oneshot::Sender<()>,
}

fn postgres(error: tokio_postgres::Error) -> Error {
    Error::storage("postgres", error)
}

/// Whether `error` means the session is gone (closed, or ended by the server with a
/// FATAL error such as an administrator's termination).
pub(crate) fn session_lost(error: &tokio_postgres::Error) -> bool {
    error.is_closed()
        || error
            .as_db_error()
            .is_some_and(|db| db.severity() == "FATAL")
}

/// Longest wait between attempts to re-establish the listening session.
const RELISTEN_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Opens a connection and drives it on its own task.
async fn connect_client(config: &tokio_postgres::Config) -> Result<Client, Error> {
    let (client, connection) = config.connect(NoTls).await.map_err(postgres)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "postgres backend connection ended");
        }
    });
    Ok(client)
}

impl PostgresBackend {
    /// Connects with a libpq-style `config` (`host=... user=... dbname=...`) and uses
    /// `schema`, creating it and its tables on first use.
    pub async fn connect(
        config: &str,
        schema: &str,
        clock: Arc<dyn TimeProvider>,
    ) -> Result<Self, Error> {
        check_schema(schema)?;
        let mut config: tokio_postgres::Config = config
            .parse()
            .map_err(|error| Error::invalid("postgres config", format!("{error}")))?;
        // Operators (and tests) can find this backend's sessions in pg_stat_activity.
        config.application_name(format!("postern {schema}"));
        let mut client = connect_client(&config).await?;
        create_schema(&mut client, schema).await?;

        let (events, _) = broadcast::channel(WATCH_EVENTS_MAX);
        let weak_events = events.downgrade();
        let (stop_tx, stop) = oneshot::channel();
        let (ready_tx, ready) = oneshot::channel();
        tokio::spawn(listen(
            config.clone(),
            schema.to_owned(),
            events,
            stop,
            ready_tx,
        ));
        // The first session must be listening before we return, or early writes would
        // not reach watchers.
        ready
            .await
            .map_err(|_| Error::WatchClosed)?
            .map_err(|error| Error::storage("postgres", std::io::Error::other(error)))?;

        Ok(Self {
            shared: Arc::new(Shared {
                config,
                schema: schema.to_owned(),
                clock,
                client: tokio::sync::Mutex::new(Arc::new(client)),
                broken: AtomicBool::new(false),
                events: weak_events,
                _stop: stop_tx,
            }),
        })
    }

    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// The query connection, re-established if it dropped.
    async fn client(&self) -> Result<Arc<Client>, Error> {
        let mut client = self.shared.client.lock().await;
        if client.is_closed() || self.shared.broken.swap(false, Ordering::SeqCst) {
            tracing::info!(schema = %self.shared.schema, "postgres backend reconnecting");
            *client = Arc::new(connect_client(&self.shared.config).await?);
        }
        Ok(Arc::clone(&client))
    }

    /// Maps a failed call, remembering when the session is gone.
    fn failed(&self, error: tokio_postgres::Error) -> Error {
        if session_lost(&error) {
            self.shared.broken.store(true, Ordering::SeqCst);
        }
        postgres(error)
    }

    fn now(&self) -> i64 {
        i64::try_from(now_secs(&self.shared.clock)).unwrap_or(i64::MAX)
    }

    fn expires(&self, ttl: Option<Duration>) -> Option<i64> {
        let now = now_secs(&self.shared.clock);
        ttl.map(|ttl| i64::try_from(expiry_secs(now, ttl)).unwrap_or(i64::MAX))
    }

    fn sql(&self, template: &str) -> String {
        template.replace("{s}", &self.shared.schema)
    }
}

/// Schema names are interpolated into SQL, so they are restricted to lower-case
/// letters, digits and `_`, starting with a letter or `_`.
pub(crate) fn check_schema(schema: &str) -> Result<(), Error> {
    let valid_start = schema
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    let valid_rest = schema
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid_start || !valid_rest || schema.len() > SCHEMA_NAME_MAX {
        return Err(Error::invalid(
            "schema",
            format!(
                "{schema:?}: use 1 to {SCHEMA_NAME_MAX} of a-z, 0-9 and _, not starting with a digit"
            ),
        ));
    }
    Ok(())
}

fn channel(schema: &str) -> String {
    format!("postern_{schema}")
}

async fn create_schema(client: &mut Client, schema: &str) -> Result<(), Error> {
    let sql = "
        CREATE SCHEMA IF NOT EXISTS {s};
        CREATE SEQUENCE IF NOT EXISTS {s}.revision;
        CREATE TABLE IF NOT EXISTS {s}.items (
            key TEXT COLLATE \"C\" PRIMARY KEY,
            value BYTEA NOT NULL,
            revision BIGINT NOT NULL,
            expires BIGINT
        );
        CREATE INDEX IF NOT EXISTS items_expires ON {s}.items (expires)
            WHERE expires IS NOT NULL;
        CREATE TABLE IF NOT EXISTS {s}.changes (
            revision BIGINT PRIMARY KEY,
            key TEXT COLLATE \"C\" NOT NULL,
            value BYTEA,
            expires BIGINT,
            recorded TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE OR REPLACE FUNCTION {s}.record_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            change_revision BIGINT;
        BEGIN
            IF TG_OP = 'DELETE' THEN
                change_revision := nextval('{s}.revision');
                INSERT INTO {s}.changes (revision, key) VALUES (change_revision, OLD.key);
            ELSIF TG_OP = 'UPDATE' AND OLD.revision = NEW.revision THEN
                -- A lease extension: no new revision, nothing to tell watchers.
                RETURN NULL;
            ELSE
                change_revision := NEW.revision;
                INSERT INTO {s}.changes (revision, key, value, expires)
                    VALUES (change_revision, NEW.key, NEW.value, NEW.expires);
            END IF;
            PERFORM pg_notify('{channel}', change_revision::text);
            RETURN NULL;
        END $$;
        CREATE OR REPLACE TRIGGER items_record_change
            AFTER INSERT OR UPDATE OR DELETE ON {s}.items
            FOR EACH ROW EXECUTE FUNCTION {s}.record_change();
    "
    .replace("{channel}", &channel(schema))
    .replace("{s}", schema);
    // Several auth servers may start at once; DDL under IF NOT EXISTS still races on
    // the catalog, so take a lock named after the schema for the transaction.
    let transaction = client.transaction().await.map_err(postgres)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&schema])
        .await
        .map_err(postgres)?;
    transaction.batch_execute(&sql).await.map_err(postgres)?;
    transaction.commit().await.map_err(postgres)
}

/// How long a change stays in the `changes` table for listeners to fetch.
const CHANGES_KEPT: &str = "10 minutes";

/// How a listening session ended.
enum SessionEnd {
    /// The backend was dropped.
    Stopped,
    /// The session failed; try again.
    Failed(String),
}

/// Keeps a listening session open, re-establishing it after failures; after every
/// re-establishment watchers are told changes may have been missed.
async fn listen(
    config: tokio_postgres::Config,
    schema: String,
    events: broadcast::Sender<Notice>,
    mut stop: oneshot::Receiver<()>,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_secs(1);
    loop {
        let end = session(&config, &schema, &events, &mut stop, &mut ready).await;
        let SessionEnd::Failed(error) = end else {
            return;
        };
        if let Some(ready) = ready.take() {
            // The very first session failed: report it to `connect`.
            let _ = ready.send(Err(error));
            return;
        }
        tracing::warn!(%error, %schema, "postgres backend listener ended; listening again");
        tokio::select! {
            biased;
            _ = &mut stop => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RELISTEN_BACKOFF_MAX);
    }
}

async fn session(
    config: &tokio_postgres::Config,
    schema: &str,
    events: &broadcast::Sender<Notice>,
    stop: &mut oneshot::Receiver<()>,
    ready: &mut Option<oneshot::Sender<Result<(), String>>>,
) -> SessionEnd {
    let connected = async {
        let (listener, mut connection) = config.connect(NoTls).await.map_err(|e| e.to_string())?;
        // Changes are fetched on a connection of their own: the listening one is busy
        // being polled for notifications.
        let fetcher = connect_client(config).await.map_err(|e| e.to_string())?;
        let (payloads_tx, payloads) = mpsc::channel::<String>(WATCH_EVENTS_MAX);
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(notification)) => {
                        if payloads_tx
                            .send(notification.payload().to_owned())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "postgres backend listening session failed");
                        break;
                    }
                }
            }
        });
        listener
            .batch_execute(&format!("LISTEN {}", channel(schema)))
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((listener, fetcher, payloads))
    };
    let (_listener, fetcher, mut payloads) = match connected.await {
        Ok(connected) => connected,
        Err(error) => return SessionEnd::Failed(error),
    };
    match ready.take() {
        Some(ready) => {
            let _ = ready.send(Ok(()));
        }
        // Listening again: whatever changed while nobody listened is unknown.
        None => {
            let _ = events.send(Notice::Gap);
        }
    }
    loop {
        tokio::select! {
            biased;
            _ = &mut *stop => return SessionEnd::Stopped,
            payload = payloads.recv() => match payload {
                Some(payload) => forward(&fetcher, schema, &payload, events).await,
                None => return SessionEnd::Failed("listening session closed".to_owned()),
            },
        }
    }
}

async fn forward(client: &Client, schema: &str, payload: &str, events: &broadcast::Sender<Notice>) {
    let Ok(revision) = payload.parse::<i64>() else {
        tracing::warn!(payload, "postgres backend: notification is not a revision");
        return;
    };
    let sql = format!("SELECT key, value, expires FROM {schema}.changes WHERE revision = $1");
    let row = match client.query_opt(&sql, &[&revision]).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            tracing::warn!(
                revision,
                "postgres backend: change pruned before it was read"
            );
            let _ = events.send(Notice::Gap);
            return;
        }
        Err(error) => {
            tracing::warn!(%error, revision, "postgres backend: could not read change");
            let _ = events.send(Notice::Gap);
            return;
        }
    };
    let key: String = row.get(0);
    let value: Option<Vec<u8>> = row.get(1);
    let expires: Option<i64> = row.get(2);
    let revision = Revision(u64::try_from(revision).unwrap_or(0));
    let event = match value {
        Some(value) => Event::Put(Item {
            key,
            value,
            revision,
            expires: expires.map(|secs| unix_time(u64::try_from(secs).unwrap_or(0))),
        }),
        None => Event::Delete { key, revision },
    };
    // No receivers is not an error: nobody is watching.
    let _ = events.send(Notice::Change(event));
}

fn item_from_row(row: &Row) -> Item {
    let revision: i64 = row.get(2);
    let expires: Option<i64> = row.get(3);
    Item {
        key: row.get(0),
        value: row.get(1),
        revision: Revision(u64::try_from(revision).unwrap_or(0)),
        expires: expires.map(|secs| unix_time(u64::try_from(secs).unwrap_or(0))),
    }
}

fn revision_from_row(row: &Row) -> Revision {
    Revision(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

fn revision_param(revision: Revision) -> i64 {
    i64::try_from(revision.0).unwrap_or(i64::MAX)
}

/// Live rows only; `$n` is the current time in seconds.
fn live(now_param: &str) -> String {
    format!("(expires IS NULL OR expires > {now_param})")
}

impl Backend for PostgresBackend {
    async fn get(&self, key: &str) -> Result<Option<Item>, Error> {
        check_key(key)?;
        let sql = self.sql(&format!(
            "SELECT key, value, revision, expires FROM {{s}}.items WHERE key = $1 AND {}",
            live("$2")
        ));
        let row = self
            .client()
            .await?
            .query_opt(&sql, &[&key, &self.now()])
            .await
            .map_err(|error| self.failed(error))?;
        Ok(row.as_ref().map(item_from_row))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Item>, Error> {
        check_prefix(prefix)?;
        let sql = self.sql(&format!(
            "SELECT key, value, revision, expires FROM {{s}}.items
             WHERE key >= $1 AND key < $2 AND {} ORDER BY key LIMIT $4",
            live("$3")
        ));
        let limit = i64::try_from(LIST_ITEMS_MAX + 1).unwrap_or(i64::MAX);
        let rows = self
            .client()
            .await?
            .query(&sql, &[&prefix, &prefix_end(prefix), &self.now(), &limit])
            .await
            .map_err(|error| self.failed(error))?;
        if rows.len() > LIST_ITEMS_MAX {
            return Err(Error::invalid(
                "prefix",
                format!("{prefix:?} holds more than {LIST_ITEMS_MAX} items"),
            ));
        }
        Ok(rows.iter().map(item_from_row).collect())
    }

    async fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<Revision, Error> {
        check_key(key)?;
        check_value(value)?;
        let sql = self.sql(
            "INSERT INTO {s}.items (key, value, revision, expires)
             VALUES ($1, $2, nextval('{s}.revision'), $3)
             ON CONFLICT (key) DO UPDATE
             SET value = excluded.value, revision = excluded.revision, expires = excluded.expires
             RETURNING revision",
        );
        let row = self
            .client()
            .await?
            .query_one(&sql, &[&key, &value, &self.expires(ttl)])
            .await
            .map_err(|error| self.failed(error))?;
        Ok(revision_from_row(&row))
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
        let expires = self.expires(ttl);
        let row = match expected {
            Expect::Absent => {
                // Replaces a row only if its lease has ended (it is not live).
                let sql = self.sql(
                    "INSERT INTO {s}.items (key, value, revision, expires)
                     VALUES ($1, $2, nextval('{s}.revision'), $3)
                     ON CONFLICT (key) DO UPDATE
                     SET value = excluded.value, revision = excluded.revision,
                         expires = excluded.expires
                     WHERE items.expires IS NOT NULL AND items.expires <= $4
                     RETURNING revision",
                );
                self.client()
                    .await?
                    .query_opt(&sql, &[&key, &value, &expires, &self.now()])
                    .await
            }
            Expect::Revision(revision) => {
                let sql = self.sql(&format!(
                    "UPDATE {{s}}.items
                     SET value = $2, revision = nextval('{{s}}.revision'), expires = $3
                     WHERE key = $1 AND revision = $4 AND {}
                     RETURNING revision",
                    live("$5")
                ));
                self.client()
                    .await?
                    .query_opt(
                        &sql,
                        &[
                            &key,
                            &value,
                            &expires,
                            &revision_param(revision),
                            &self.now(),
                        ],
                    )
                    .await
            }
        }
        .map_err(|error| self.failed(error))?;
        match row {
            Some(row) => Ok(revision_from_row(&row)),
            None => Err(Error::Conflict {
                key: key.to_owned(),
            }),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool, Error> {
        check_key(key)?;
        let sql = self.sql(&format!(
            "DELETE FROM {{s}}.items WHERE key = $1 AND {}",
            live("$2")
        ));
        let deleted = self
            .client()
            .await?
            .execute(&sql, &[&key, &self.now()])
            .await
            .map_err(|error| self.failed(error))?;
        Ok(deleted > 0)
    }

    async fn compare_and_delete(&self, key: &str, revision: Revision) -> Result<(), Error> {
        check_key(key)?;
        let sql = self.sql(&format!(
            "DELETE FROM {{s}}.items WHERE key = $1 AND revision = $2 AND {}",
            live("$3")
        ));
        let deleted = self
            .client()
            .await?
            .execute(&sql, &[&key, &revision_param(revision), &self.now()])
            .await
            .map_err(|error| self.failed(error))?;
        if deleted == 0 {
            return Err(Error::Conflict {
                key: key.to_owned(),
            });
        }
        Ok(())
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, Error> {
        check_prefix(prefix)?;
        let sql = self.sql(&format!(
            "DELETE FROM {{s}}.items WHERE key >= $1 AND key < $2 AND {}",
            live("$3")
        ));
        self.client()
            .await?
            .execute(&sql, &[&prefix, &prefix_end(prefix), &self.now()])
            .await
            .map_err(|error| self.failed(error))
    }

    async fn keep_alive(&self, key: &str, revision: Revision, ttl: Duration) -> Result<(), Error> {
        check_key(key)?;
        let sql = self.sql(&format!(
            "UPDATE {{s}}.items SET expires = $3 WHERE key = $1 AND revision = $2 AND {}",
            live("$4")
        ));
        let updated = self
            .client()
            .await?
            .execute(
                &sql,
                &[
                    &key,
                    &revision_param(revision),
                    &self.expires(Some(ttl)),
                    &self.now(),
                ],
            )
            .await
            .map_err(|error| self.failed(error))?;
        if updated == 0 {
            return Err(Error::Conflict {
                key: key.to_owned(),
            });
        }
        Ok(())
    }

    async fn expire(&self) -> Result<u64, Error> {
        let expired = self
            .client()
            .await?
            .execute(
                &self.sql("DELETE FROM {s}.items WHERE expires <= $1"),
                &[&self.now()],
            )
            .await
            .map_err(|error| self.failed(error))?;
        // Retention of the change log is housekeeping, measured on the server's clock.
        let sql = self.sql(&format!(
            "DELETE FROM {{s}}.changes WHERE recorded < now() - interval '{CHANGES_KEPT}'"
        ));
        self.client()
            .await?
            .execute(&sql, &[])
            .await
            .map_err(|error| self.failed(error))?;
        Ok(expired)
    }

    async fn watch(&self, prefix: &str) -> Result<Watcher, Error> {
        check_prefix(prefix)?;
        let events = self.shared.events.upgrade().ok_or(Error::WatchClosed)?;
        Ok(Watcher::new(prefix, events.subscribe()))
    }
}

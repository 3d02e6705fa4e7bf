//! The audit log: every database session event and every auth action, stored once.
//!
//! [`AuditLog`] has two durable implementations: [`FileAuditLog`] (JSON lines, one file
//! per UTC day, the default) and [`PostgresAuditLog`] (one table, for several auth
//! servers); [`MemoryAuditLog`] serves tests and simulation.
//! Event ids are idempotency keys: agents resend until acknowledged, and a resent event
//! is stored no second time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use postern_rt::Blocking;
use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};
use tokio_postgres::{Client, NoTls};

use crate::Error;
use crate::backend::session_lost;

/// Largest event, serialized.
pub const EVENT_SIZE_MAX: usize = 64 * 1024;
/// Most events in one batch.
pub const BATCH_EVENTS_MAX: usize = 1000;
/// Most bytes of serialized events in one batch (the sum of their JSON lines).
pub const BATCH_SIZE_MAX: usize = 2 * 1024 * 1024;
/// Most events one search returns.
pub const SEARCH_EVENTS_MAX: usize = 10_000;
/// Longest error text in an event.
pub const ERROR_SIZE_MAX: usize = 4096;
/// Longest event id.
pub const EVENT_ID_SIZE_MAX: usize = 128;

/// Event names and codes of the auth service's own actions.
pub mod codes {
    pub const LOGIN: (&str, &str) = ("auth.login", "TAU00I");
    pub const LOGIN_FAILURE: (&str, &str) = ("auth.login", "TAU00W");
    pub const CERT_ISSUED: (&str, &str) = ("auth.cert.issued", "TAU01I");
    pub const CERT_REFUSED: (&str, &str) = ("auth.cert.issued", "TAU01W");
    pub const USER_CREATED: (&str, &str) = ("auth.user.created", "TAU02I");
    pub const USER_UPDATED: (&str, &str) = ("auth.user.updated", "TAU03I");
    pub const USER_DELETED: (&str, &str) = ("auth.user.deleted", "TAU04I");
    pub const ROLE_UPSERTED: (&str, &str) = ("auth.role.upserted", "TAU05I");
    pub const ROLE_DELETED: (&str, &str) = ("auth.role.deleted", "TAU06I");
    pub const TOKEN_CREATED: (&str, &str) = ("auth.token.created", "TAU07I");
    pub const TOKEN_USED: (&str, &str) = ("auth.token.used", "TAU08I");
    pub const TOKEN_REFUSED: (&str, &str) = ("auth.token.used", "TAU08W");
    pub const CA_ROTATION: (&str, &str) = ("auth.ca.rotation", "TAU09I");
}

/// One audit event. The common fields are typed; the rest goes in `fields`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Idempotency key: an event with an id already stored is skipped.
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The event name, e.g. `db.session.start` or `auth.login`.
    pub event: String,
    /// The event code, e.g. `TDB00I`; `W` at the end marks failures.
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, serde_json::Value>,
}

impl AuditEvent {
    /// An event with a random id from `rng` and no optional fields.
    pub fn new(
        (event, code): (&str, &str),
        time: OffsetDateTime,
        rng: &mut impl rand_core::RngCore,
    ) -> Self {
        Self {
            id: random_id(rng),
            time,
            event: event.to_owned(),
            code: code.to_owned(),
            cluster: None,
            user: None,
            session_id: None,
            db_service: None,
            protocol: None,
            uri: None,
            db_name: None,
            db_user: None,
            error: None,
            fields: BTreeMap::new(),
        }
    }

    pub fn with_user(mut self, user: &str) -> Self {
        self.user = Some(user.to_owned());
        self
    }

    /// Sets the error, cut to [`ERROR_SIZE_MAX`] bytes so that an event stays storable.
    pub fn with_error(mut self, error: impl ToString) -> Self {
        let mut error = error.to_string();
        if error.len() > ERROR_SIZE_MAX {
            let mut end = ERROR_SIZE_MAX;
            while !error.is_char_boundary(end) {
                end -= 1;
            }
            error.truncate(end);
            error.push('…');
        }
        self.error = Some(error);
        self
    }

    pub fn with_field(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.fields.insert(name.to_owned(), value.into());
        self
    }

    fn check(&self) -> Result<String, Error> {
        if self.id.is_empty() || self.id.len() > EVENT_ID_SIZE_MAX {
            return Err(Error::invalid(
                "event id",
                format!("must be 1 to {EVENT_ID_SIZE_MAX} bytes"),
            ));
        }
        let line = serde_json::to_string(self)
            .map_err(|error| Error::invalid("event", error.to_string()))?;
        if line.len() > EVENT_SIZE_MAX {
            return Err(Error::invalid(
                "event",
                format!(
                    "{} is {} bytes serialized, more than {EVENT_SIZE_MAX}",
                    self.id,
                    line.len()
                ),
            ));
        }
        Ok(line)
    }
}

/// 128 random bits in hex: event ids, session ids, token names.
pub fn random_id(rng: &mut impl rand_core::RngCore) -> String {
    let mut bytes = [0u8; 16];
    rng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What to search for. `from` is inclusive, `to` exclusive.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditQuery {
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
    pub event: Option<String>,
    pub user: Option<String>,
    pub session_id: Option<String>,
    /// At most this many events, the oldest first; capped at [`SEARCH_EVENTS_MAX`].
    pub limit: usize,
}

impl AuditQuery {
    /// Every event in `[from, to)`, up to the search cap.
    pub fn between(from: OffsetDateTime, to: OffsetDateTime) -> Self {
        Self {
            from,
            to,
            event: None,
            user: None,
            session_id: None,
            limit: SEARCH_EVENTS_MAX,
        }
    }

    fn matches(&self, event: &AuditEvent) -> bool {
        let same = |wanted: &Option<String>, got: Option<&str>| {
            wanted.as_deref().is_none_or(|wanted| got == Some(wanted))
        };
        event.time >= self.from
            && event.time < self.to
            && same(&self.event, Some(&event.event))
            && same(&self.user, event.user.as_deref())
            && same(&self.session_id, event.session_id.as_deref())
    }

    fn limit(&self) -> usize {
        self.limit.min(SEARCH_EVENTS_MAX)
    }
}

/// Where audit events are stored.
pub trait AuditLog: Send + Sync + 'static {
    /// Stores `events` durably before returning. Events whose id is already stored
    /// are skipped; returns how many were new.
    fn emit(&self, events: &[AuditEvent]) -> impl Future<Output = Result<usize, Error>> + Send;

    /// Events matching `query`, oldest first (ties by id).
    fn search(
        &self,
        query: &AuditQuery,
    ) -> impl Future<Output = Result<Vec<AuditEvent>, Error>> + Send;
}

fn check_batch(events: &[AuditEvent]) -> Result<Vec<String>, Error> {
    if events.len() > BATCH_EVENTS_MAX {
        return Err(Error::invalid(
            "batch",
            format!("{} events, more than {BATCH_EVENTS_MAX}", events.len()),
        ));
    }
    let lines = events
        .iter()
        .map(AuditEvent::check)
        .collect::<Result<Vec<_>, _>>()?;
    let size: usize = lines.iter().map(String::len).sum();
    if size > BATCH_SIZE_MAX {
        return Err(Error::invalid(
            "batch",
            format!("{size} bytes of events, more than {BATCH_SIZE_MAX}"),
        ));
    }
    Ok(lines)
}

// --- Memory ------------------------------------------------------------------------

/// Audit events in memory, for tests and simulation: every call completes without
/// awaiting, so a simulator sees events in call order. Gone when dropped.
#[derive(Debug, Clone, Default)]
pub struct MemoryAuditLog {
    events: Arc<Mutex<Vec<AuditEvent>>>,
}

impl MemoryAuditLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<AuditEvent>> {
        // Events are only ever pushed whole; a panic elsewhere leaves the list valid.
        self.events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl AuditLog for MemoryAuditLog {
    async fn emit(&self, events: &[AuditEvent]) -> Result<usize, Error> {
        check_batch(events)?;
        let mut stored = self.lock();
        let mut new = 0;
        for event in events {
            if !stored.iter().any(|known| known.id == event.id) {
                stored.push(event.clone());
                new += 1;
            }
        }
        Ok(new)
    }

    async fn search(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, Error> {
        let mut found: Vec<AuditEvent> = self
            .lock()
            .iter()
            .filter(|event| query.matches(event))
            .cloned()
            .collect();
        found.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.id.cmp(&b.id)));
        found.truncate(query.limit());
        Ok(found)
    }
}

// --- JSON-lines files ------------------------------------------------------------------

/// Audit events as JSON lines in `DIR/YYYY-MM-DD.jsonl`, by the event's UTC day.
///
/// Each batch is appended with one write per day file and fsynced before `emit`
/// returns. A crash can leave a torn last line; it belonged to a batch that was never
/// acknowledged (so it will be resent), and it is cut off when the file is next opened
/// for writing. The ids of each day written since start are kept in memory.
#[derive(Debug, Clone)]
pub struct FileAuditLog {
    shared: Arc<FileShared>,
    blocking: Blocking,
}

#[derive(Debug)]
struct FileShared {
    dir: PathBuf,
    /// Ids per day file already checked for torn lines and loaded.
    days: Mutex<HashMap<Date, HashSet<String>>>,
}

impl FileAuditLog {
    /// Uses (and creates) the folder `dir`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            shared: Arc::new(FileShared {
                dir: dir.to_owned(),
                days: Mutex::new(HashMap::new()),
            }),
            blocking: Blocking::Pool,
        })
    }

    /// Runs file I/O as `blocking` says: the runtime's policy (inline in simulation, so
    /// a seed replays); tokio's blocking pool by default.
    pub fn with_blocking(mut self, blocking: Blocking) -> Self {
        self.blocking = blocking;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

fn day_file_name(day: Date) -> String {
    format!(
        "{:04}-{:02}-{:02}.jsonl",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

fn parse_day_file_name(name: &str) -> Option<Date> {
    let stem = name.strip_suffix(".jsonl")?;
    let format = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(stem, &format).ok()
}

impl FileShared {
    fn lock(&self) -> MutexGuard<'_, HashMap<Date, HashSet<String>>> {
        // The map only caches what the files say; after a panic it is still a subset.
        self.days
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    }

    /// Opens a day file for appending: cuts a torn last line and loads its ids.
    fn open_day(&self, path: &Path) -> Result<(File, HashSet<String>), Error> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(self.io(path))?;
        let mut ids = HashSet::new();
        let mut good_len = 0u64;
        let mut reader = BufReader::new(&file);
        let mut line = String::new();
        let mut number = 0usize;
        loop {
            line.clear();
            let read = reader.read_line(&mut line).map_err(self.io(path))?;
            if read == 0 || !line.ends_with('\n') {
                break;
            }
            number += 1;
            let event: AuditEvent =
                serde_json::from_str(&line).map_err(|error| Error::Corrupt {
                    what: format!("audit file {}:{number}", path.display()),
                    detail: error.to_string(),
                })?;
            ids.insert(event.id);
            good_len += read as u64;
        }
        drop(reader);
        if file.seek(SeekFrom::End(0)).map_err(self.io(path))? != good_len {
            tracing::warn!(path = %path.display(), "cutting a torn last line from the audit log");
            file.set_len(good_len).map_err(self.io(path))?;
            file.sync_all().map_err(self.io(path))?;
        }
        Ok((file, ids))
    }

    fn emit(&self, events: &[AuditEvent], lines: Vec<String>) -> Result<usize, Error> {
        let mut days = self.lock();
        let mut by_day: BTreeMap<Date, Vec<(&AuditEvent, String)>> = BTreeMap::new();
        for (event, line) in events.iter().zip(lines) {
            by_day
                .entry(event.time.to_offset(time::UtcOffset::UTC).date())
                .or_default()
                .push((event, line));
        }
        let mut stored = 0;
        for (day, batch) in by_day {
            let path = self.dir.join(day_file_name(day));
            let (mut file, mut ids) = match days.remove(&day) {
                Some(ids) => {
                    let file = OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .map_err(self.io(&path))?;
                    (file, ids)
                }
                None => self.open_day(&path)?,
            };
            let mut buffer = String::new();
            let mut new_ids = Vec::new();
            for (event, line) in batch {
                if ids.contains(&event.id) || new_ids.contains(&event.id) {
                    continue;
                }
                buffer.push_str(&line);
                buffer.push('\n');
                new_ids.push(event.id.clone());
            }
            if !buffer.is_empty() {
                // On failure the file may end in a torn line; its ids stay out of the
                // cache, so the next write reopens it and cuts the tear.
                file.write_all(buffer.as_bytes())
                    .and_then(|()| file.sync_data())
                    .map_err(self.io(&path))?;
            }
            stored += new_ids.len();
            ids.extend(new_ids);
            days.insert(day, ids);
        }
        Ok(stored)
    }

    fn search(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, Error> {
        let first = query.from.to_offset(time::UtcOffset::UTC).date();
        let last = query.to.to_offset(time::UtcOffset::UTC).date();
        let entries = std::fs::read_dir(&self.dir).map_err(self.io(&self.dir))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(self.io(&self.dir))?;
            let name = entry.file_name();
            let day = name.to_str().and_then(parse_day_file_name);
            if day.is_some_and(|day| day >= first && day <= last) {
                files.push(entry.path());
            }
        }
        files.sort();
        let mut found = Vec::new();
        for path in files {
            let file = File::open(&path).map_err(self.io(&path))?;
            let mut reader = BufReader::new(file);
            let mut line = String::new();
            let mut number = 0usize;
            loop {
                line.clear();
                if reader.read_line(&mut line).map_err(self.io(&path))? == 0
                    || !line.ends_with('\n')
                {
                    // End, or a torn line of an unacknowledged batch.
                    break;
                }
                number += 1;
                let event: AuditEvent =
                    serde_json::from_str(&line).map_err(|error| Error::Corrupt {
                        what: format!("audit file {}:{number}", path.display()),
                        detail: error.to_string(),
                    })?;
                if query.matches(&event) {
                    found.push(event);
                }
            }
        }
        found.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.id.cmp(&b.id)));
        found.truncate(query.limit());
        Ok(found)
    }
}

impl AuditLog for FileAuditLog {
    async fn emit(&self, events: &[AuditEvent]) -> Result<usize, Error> {
        let lines = check_batch(events)?;
        let shared = Arc::clone(&self.shared);
        let events = events.to_vec();
        self.blocking.run(move || shared.emit(&events, lines)).await
    }

    async fn search(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, Error> {
        let shared = Arc::clone(&self.shared);
        let query = query.clone();
        self.blocking.run(move || shared.search(&query)).await
    }
}

// --- PostgreSQL ----------------------------------------------------------------------

/// Audit events in the table `SCHEMA.audit_events`, for several auth servers.
#[derive(Debug, Clone)]
pub struct PostgresAuditLog {
    config: tokio_postgres::Config,
    /// Re-established on the next call when it drops.
    client: Arc<tokio::sync::Mutex<Arc<Client>>>,
    schema: String,
}

fn postgres(error: tokio_postgres::Error) -> Error {
    Error::storage("postgres audit", error)
}

fn time_ms(time: OffsetDateTime) -> i64 {
    i64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

impl PostgresAuditLog {
    /// Connects with a libpq-style `config` and uses (creating if needed) `schema`.
    pub async fn connect(config: &str, schema: &str) -> Result<Self, Error> {
        crate::backend::check_schema(schema)?;
        let mut config: tokio_postgres::Config = config
            .parse()
            .map_err(|error| Error::invalid("postgres config", format!("{error}")))?;
        config.application_name(format!("postern audit {schema}"));
        let mut client = connect_audit_client(&config).await?;
        let sql = "
            CREATE SCHEMA IF NOT EXISTS {s};
            CREATE TABLE IF NOT EXISTS {s}.audit_events (
                id TEXT PRIMARY KEY,
                time_ms BIGINT NOT NULL,
                event TEXT NOT NULL,
                user_name TEXT,
                session_id TEXT,
                body JSONB NOT NULL
            );
            CREATE INDEX IF NOT EXISTS audit_events_time ON {s}.audit_events (time_ms);
        "
        .replace("{s}", schema);
        let transaction = client.transaction().await.map_err(postgres)?;
        transaction
            .execute(
                "SELECT pg_advisory_xact_lock(hashtext($1 || '.audit'))",
                &[&schema],
            )
            .await
            .map_err(postgres)?;
        transaction.batch_execute(&sql).await.map_err(postgres)?;
        transaction.commit().await.map_err(postgres)?;
        Ok(Self {
            config,
            client: Arc::new(tokio::sync::Mutex::new(Arc::new(client))),
            schema: schema.to_owned(),
        })
    }

    /// The session, replaced if it closed or `reconnect` says it was found gone.
    async fn client(&self, reconnect: bool) -> Result<Arc<Client>, Error> {
        let mut client = self.client.lock().await;
        if reconnect || client.is_closed() {
            tracing::info!(schema = %self.schema, "postgres audit log reconnecting");
            *client = Arc::new(connect_audit_client(&self.config).await?);
        }
        Ok(Arc::clone(&client))
    }
}

async fn connect_audit_client(config: &tokio_postgres::Config) -> Result<Client, Error> {
    let (client, connection) = config.connect(NoTls).await.map_err(postgres)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "postgres audit connection ended");
        }
    });
    Ok(client)
}

impl AuditLog for PostgresAuditLog {
    async fn emit(&self, events: &[AuditEvent]) -> Result<usize, Error> {
        let lines = check_batch(events)?;
        if events.is_empty() {
            return Ok(0);
        }
        // One statement for the whole batch: atomic, and one round trip.
        let mut ids = Vec::with_capacity(events.len());
        let mut times = Vec::with_capacity(events.len());
        let mut names = Vec::with_capacity(events.len());
        let mut users = Vec::with_capacity(events.len());
        let mut sessions = Vec::with_capacity(events.len());
        for event in events {
            ids.push(event.id.clone());
            times.push(time_ms(event.time));
            names.push(event.event.clone());
            users.push(event.user.clone());
            sessions.push(event.session_id.clone());
        }
        let sql = format!(
            "INSERT INTO {}.audit_events (id, time_ms, event, user_name, session_id, body)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[]::jsonb[])
             ON CONFLICT (id) DO NOTHING",
            self.schema
        );
        // The insert is idempotent: a session found gone is replaced and the batch sent
        // once more.
        let mut reconnect = false;
        let stored = loop {
            let client = self.client(reconnect).await?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
                [&ids, &times, &names, &users, &sessions, &lines];
            match client.execute(&sql, &params).await {
                Ok(stored) => break stored,
                Err(error) if !reconnect && session_lost(&error) => reconnect = true,
                Err(error) => return Err(postgres(error)),
            }
        };
        Ok(usize::try_from(stored).unwrap_or(usize::MAX))
    }

    async fn search(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, Error> {
        let sql = format!(
            "SELECT body::text FROM {}.audit_events
             WHERE time_ms >= $1 AND time_ms < $2
               AND ($3::text IS NULL OR event = $3)
               AND ($4::text IS NULL OR user_name = $4)
               AND ($5::text IS NULL OR session_id = $5)
             ORDER BY time_ms, id LIMIT $6",
            self.schema
        );
        let limit = i64::try_from(query.limit()).unwrap_or(i64::MAX);
        let (from, to) = (time_ms(query.from), time_ms(query.to));
        let mut reconnect = false;
        let rows = loop {
            let client = self.client(reconnect).await?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
                &from,
                &to,
                &query.event,
                &query.user,
                &query.session_id,
                &limit,
            ];
            match client.query(&sql, &params).await {
                Ok(rows) => break rows,
                Err(error) if !reconnect && session_lost(&error) => reconnect = true,
                Err(error) => return Err(postgres(error)),
            }
        };
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let body: String = row.get(0);
            let event: AuditEvent =
                serde_json::from_str(&body).map_err(|error| Error::Corrupt {
                    what: "audit event in postgres".to_owned(),
                    detail: error.to_string(),
                })?;
            // Millisecond rounding in the index may admit a boundary event; filter exactly.
            if query.matches(&event) {
                events.push(event);
            }
        }
        Ok(events)
    }
}

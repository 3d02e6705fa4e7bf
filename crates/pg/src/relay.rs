//! The agent's relay: bytes pass through unchanged while it turns them into audit events.
//!
//! The relay only observes. The driver reads a chunk from one side, hands it to
//! [`Relay::handle_client_bytes`] or [`Relay::handle_server_bytes`], forwards the same chunk
//! to the other side if that returned `Ok`, and drains [`Relay::poll_event_view`] (or
//! [`Relay::poll_event`] for owned events). On `Err` the driver ends the session (sending
//! the client [`Error::to_error_response`] if it can); the relay stays failed.
//!
//! Memory is bounded whatever the result size: only messages needed for the audit are
//! read whole (up to [`Limits::buffered_message_size_max`]); DataRow, CopyData and the
//! rest are skipped as they stream by, without being copied. Requests wait in a queue
//! until the server answers (pipelining), bounded by [`Limits::pending_requests_max`] and
//! [`Limits::pending_bytes_max`]; prepared statements and portals are tracked so that an
//! Execute can name its SQL, bounded by [`Limits::prepared_statements_max`] and
//! [`Limits::prepared_statement_bytes_max`].
//!
//! Events come out when the server's answer is known, in request order, with the
//! [`Outcome`](crate::Outcome). [`Relay::handle_close`] flushes the requests still
//! waiting, as `Unknown`, so that no request goes unaudited.
//!
//! The hot path allocates nothing once warm: an audited request copies the few bytes its
//! event needs (names, SQL of a simple query, parameters as sent, then the command tag)
//! into a buffer taken from a small pool, and [`Relay::poll_event_view`] lends that
//! buffer out as an [`EventView`]; text is neither validated nor converted here (the
//! consumer renders it). Only a Parse the server confirmed allocates: the statement's
//! SQL, shared by every later Bind, Execute and Close event that names it.
//!
//! ```
//! use postern_pg::backend::TransactionStatus;
//! use postern_pg::{BackendMessage, FrontendMessage, Limits, Relay};
//!
//! let mut relay = Relay::new(Limits::default());
//! let mut from_client = Vec::new();
//! FrontendMessage::Query(b"select 1".to_vec()).encode(&mut from_client)?;
//! relay.handle_client_bytes(&from_client)?; // then forward `from_client` unchanged
//!
//! let mut from_server = Vec::new();
//! BackendMessage::CommandComplete(b"SELECT 1".to_vec()).encode(&mut from_server)?;
//! BackendMessage::ready_for_query(TransactionStatus::Idle).encode(&mut from_server)?;
//! relay.handle_server_bytes(&from_server)?;
//!
//! let event = relay.poll_event_view().expect("the query was answered");
//! assert_eq!((event.name(), event.code()), ("db.session.query", "TDB02I"));
//! assert_eq!(event.query, Some(&b"select 1"[..]));
//! # Ok::<(), postern_pg::Error>(())
//! ```

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

use crate::audit::{AuditEvent, EventKind, EventView, OutcomeView, ParametersView};
use crate::backend::{self, BackendMessage};
use crate::error::{Direction, Error, InvalidMessage, Limit, PeerMisbehaved};
use crate::frame::{self, Frame, HEADER_LEN, STARTUP_HEADER_LEN};
use crate::frontend::{
    self, BindView, FormatsView, MessageView, StartupRequest, TargetView, ValuesView,
};
use crate::limits::Limits;

/// A buffer kept between messages is given back to the allocator above this size, so one
/// large query does not pin its memory for the rest of the session.
const BUFFER_RETAIN_MAX: usize = 64 << 10;

/// Event buffers kept for reuse, and the largest capacity kept: enough for a pipelined
/// batch of ordinary statements, small enough not to matter (at most 256 KiB).
const SPARE_BUFFERS_MAX: usize = 64;
const SPARE_BUFFER_CAPACITY_MAX: usize = 4 << 10;

/// A new record's buffer: room for the names, parameters and command tag of most
/// requests.
const RECORD_BUFFER_CAPACITY: usize = 128;

/// The length word that starts an untagged start-up packet.
const STARTUP_LENGTH_LEN: usize = 4;

/// Agent-side relay state machine. See the module documentation.
#[derive(Debug)]
pub struct Relay {
    limits: Limits,
    client: Stream,
    server: Stream,
    /// Requests sent, oldest first, waiting for the server's answer: what each waits for
    /// and, when audited, its record in `records`.
    pending: VecDeque<Pending>,
    /// Every record, in use or free.
    records: Records,
    pending_bytes: usize,
    /// The server reported an error in an extended-protocol batch and discards every
    /// message until the client's next Sync.
    discarding_until_sync: bool,
    /// Prepared statements and portals the server confirmed.
    tracked: Tracked,
    /// Events ready for `poll_event_view`.
    ready: VecDeque<RecordId>,
    /// The event last lent out by `poll_event_view`; it is freed on the next call.
    lent: Option<RecordId>,
    /// Terminate or CancelRequest seen: the client may send nothing more.
    client_ended: bool,
    closed: bool,
    failed: Option<Error>,
}

/// Prepared statements or portals by name. The unnamed one ("") is by far the most used
/// (every pgbench -M extended query, most drivers' one-shot queries) and gets its own
/// slot; the first few named ones (a pooled driver's or pgbench -M prepared's handful of
/// statements) are found by a linear scan of their short keys, which costs a fraction of
/// hashing the name; the rest are hashed.
#[derive(Debug)]
struct Named<T> {
    unnamed: Option<T>,
    /// At most `NAMED_SCANNED_MAX` entries, each with the key `scan_key` of its name.
    scanned: Vec<(u64, Vec<u8>, T)>,
    named: HashMap<Vec<u8>, T>,
}

/// Named entries kept in `Named::scanned`: a scan of this many keys costs less than
/// hashing one name.
const NAMED_SCANNED_MAX: usize = 16;

/// The first 7 bytes of `name` and its length (its low byte): equal names have equal
/// keys, and names of up to 7 bytes have different keys.
fn scan_key(name: &[u8]) -> u64 {
    let key = name
        .iter()
        .take(7)
        .fold(0u64, |key, &byte| key << 8 | u64::from(byte));
    key ^ (name.len() as u64) << 56
}

impl<T> Default for Named<T> {
    fn default() -> Self {
        Named {
            unnamed: None,
            scanned: Vec::new(),
            named: HashMap::new(),
        }
    }
}

impl<T> Named<T> {
    fn position(&self, name: &[u8]) -> Option<usize> {
        let key = scan_key(name);
        // A key holds the whole of a name of up to 7 bytes: then equal keys and lengths
        // are enough (no call to compare the bytes). The key has only the low byte of
        // the length, so a 263-byte name can have the key of a 7-byte one.
        let short = name.len() <= 7;
        self.scanned.iter().position(|(k, n, _)| {
            *k == key && ((short && n.len() == name.len()) || n.as_slice() == name)
        })
    }

    fn get(&self, name: &[u8]) -> Option<&T> {
        if name.is_empty() {
            return self.unnamed.as_ref();
        }
        match self.position(name) {
            Some(i) => self.scanned.get(i).map(|(_, _, value)| value),
            None if self.named.is_empty() => None,
            None => self.named.get(name),
        }
    }

    fn insert(&mut self, name: &[u8], value: T) {
        if name.is_empty() {
            self.unnamed = Some(value);
        } else if let Some(i) = self.position(name) {
            self.scanned[i].2 = value;
        } else if self.scanned.len() < NAMED_SCANNED_MAX && !self.named.contains_key(name) {
            self.scanned.push((scan_key(name), name.to_vec(), value));
        } else {
            self.named.insert(name.to_vec(), value);
        }
    }

    fn remove(&mut self, name: &[u8]) -> Option<T> {
        if name.is_empty() {
            return self.unnamed.take();
        }
        match self.position(name) {
            Some(i) => Some(self.scanned.swap_remove(i).2),
            None if self.named.is_empty() => None,
            None => self.named.remove(name),
        }
    }

    fn len(&self) -> usize {
        self.scanned.len() + self.named.len() + usize::from(self.unnamed.is_some())
    }

    fn values(&self) -> impl Iterator<Item = &T> {
        self.unnamed
            .iter()
            .chain(self.scanned.iter().map(|(_, _, value)| value))
            .chain(self.named.values())
    }

    /// Forgets every entry; memory held for named ones is given back.
    fn clear(&mut self) {
        if !self.scanned.is_empty() {
            self.scanned = Vec::new();
        }
        if !self.named.is_empty() {
            self.named = HashMap::new();
        }
        self.unnamed = None;
    }
}

#[derive(Debug)]
struct Portal {
    /// Shared with the statement table: one copy of the SQL however many portals.
    query: Option<SqlId>,
    /// The record of the Bind that created the portal, one holder of it: its buffer has
    /// the parameter format codes and values as sent, shown by each Execute event.
    bind: RecordId,
    /// Bytes of those format codes and values.
    parameters_len: usize,
}

impl Portal {
    fn held_bytes(&self, sql: &SqlStore) -> usize {
        self.query.map_or(0, |q| sql.get(q).len()) + self.parameters_len
    }
}

/// Index of a prepared statement's SQL in a [`SqlStore`].
type SqlId = u32;

/// The SQL of prepared statements, shared by the statement table, portals and records.
/// Every holder is inside the relay, so a plain count does what `Arc` did without its
/// atomic operations (which were a fifth of the relay's time on prepared statements).
/// Each holder acquires the SQL once and releases it once; the bytes are freed with the
/// last holder.
#[derive(Debug, Default)]
struct SqlStore {
    entries: Vec<SqlEntry>,
    free: Vec<SqlId>,
}

#[derive(Debug, Default)]
struct SqlEntry {
    bytes: Vec<u8>,
    holders: u32,
}

impl SqlStore {
    /// Stores `bytes` with one holder.
    fn insert(&mut self, bytes: &[u8]) -> SqlId {
        let entry = SqlEntry {
            bytes: bytes.to_vec(),
            holders: 1,
        };
        match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = entry;
                id
            }
            None => {
                // At most one entry per tracked statement, portal and waiting record.
                let id = self.entries.len() as SqlId;
                self.entries.push(entry);
                id
            }
        }
    }

    /// One more holder of `id`.
    fn acquire(&mut self, id: SqlId) -> SqlId {
        self.entries[id as usize].holders += 1;
        id
    }

    /// One holder fewer; the last frees the bytes.
    fn release(&mut self, id: SqlId) {
        let entry = &mut self.entries[id as usize];
        entry.holders -= 1;
        if entry.holders == 0 {
            entry.bytes = Vec::new();
            self.free.push(id);
        }
    }

    fn get(&self, id: SqlId) -> &[u8] {
        &self.entries[id as usize].bytes
    }
}

/// Index of a [`Record`] in `Relay::records`.
type RecordId = u32;

/// A request waiting for the server's answer.
#[derive(Debug, Clone, Copy)]
struct Pending {
    step: Step,
    record: Option<RecordId>,
}

/// What a request is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Query: CommandComplete/EmptyQueryResponse/ErrorResponse..., then ReadyForQuery.
    Query,
    /// FunctionCall: FunctionCallResponse or ErrorResponse, then ReadyForQuery.
    Function,
    /// ParseComplete.
    Parse,
    /// BindComplete.
    Bind,
    /// CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    /// CloseComplete.
    Close,
    /// RowDescription or NoData (after ParameterDescription for a statement).
    Describe,
    /// ReadyForQuery.
    Sync,
}

/// Appends `bytes` to `buf`. Most copies into a record are a few bytes (names, command
/// tags, a Bind's parameters), and for those the call to libc's `memcpy` that
/// `extend_from_slice` makes costs more than the copy: up to 16 bytes are copied inline,
/// as two overlapping fixed-size loads and one 16-byte store that is then cut back. The
/// empty names of the unnamed statement and portal copy nothing.
fn extend_short(buf: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len();
    if len == 0 {
        return;
    }
    let start = buf.len();
    if len > 16 || buf.capacity() - start < 16 {
        buf.extend_from_slice(bytes);
        return;
    }
    let mut chunk = [0u8; 16];
    if let (Some(head), Some(tail)) = (bytes.first_chunk::<8>(), bytes.last_chunk::<8>()) {
        chunk[..8].copy_from_slice(head);
        chunk[len - 8..len].copy_from_slice(tail);
    } else if let (Some(head), Some(tail)) = (bytes.first_chunk::<4>(), bytes.last_chunk::<4>()) {
        chunk[..4].copy_from_slice(head);
        chunk[len - 4..len].copy_from_slice(tail);
    } else {
        // 1 to 3 bytes: the first, the middle and the last cover them.
        chunk[0] = bytes[0];
        chunk[len / 2] = bytes[len / 2];
        chunk[len - 1] = bytes[len - 1];
    }
    buf.extend_from_slice(&chunk);
    buf.truncate(start + len);
}

/// Where a field of a [`Record`] is in its buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

/// SQL of an event: copied with the request (Query, Parse) or shared with the statement
/// table (Bind, Execute, Close).
#[derive(Debug)]
enum Sql {
    None,
    Copied(Span),
    Shared(SqlId),
}

/// [`OutcomeView`] with its text in the record's buffer.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Succeeded(Option<Span>),
    Suspended,
    Failed { code: Span, message: Span },
    Skipped,
    Unknown,
}

/// One audited request and, once known, its answer: every byte the event shows in one
/// buffer, reused from event to event (but for an Execute's parameters, which stay in
/// the buffer of the Bind's record).
#[derive(Debug)]
struct Record {
    kind: EventKind,
    buf: Vec<u8>,
    /// The request or event, and for a Bind also its portal and each Execute event of
    /// that portal: the record is freed with the last.
    holders: u32,
    query: Sql,
    statement: Option<Span>,
    portal: Option<Span>,
    function: Option<u32>,
    /// The Bind record whose buffer `formats` and `values` are in (one holder of it);
    /// `None`: this record's own.
    parameters_of: Option<RecordId>,
    /// Parameter format codes and values, as sent (checked when decoded).
    formats: Span,
    values: Span,
    value_count: u16,
    answer: Answer,
    /// Where the answer's text starts in `buf`, once one was written: a later answer
    /// (the next statement of a multi-statement Query) replaces it rather than adding.
    answer_at: Option<usize>,
}

impl Record {
    fn new(kind: EventKind) -> Self {
        Record {
            kind,
            buf: Vec::new(),
            holders: 1,
            query: Sql::None,
            statement: None,
            portal: None,
            function: None,
            parameters_of: None,
            formats: Span::default(),
            values: Span::default(),
            value_count: 0,
            answer: Answer::Unknown,
            answer_at: None,
        }
    }

    /// Makes a free record a new one of `kind`, keeping its buffer.
    fn reset(&mut self, kind: EventKind) {
        self.buf.clear();
        self.kind = kind;
        self.holders = 1;
        self.query = Sql::None;
        self.statement = None;
        self.portal = None;
        self.function = None;
        self.parameters_of = None;
        self.formats = Span::default();
        self.values = Span::default();
        self.value_count = 0;
        self.answer = Answer::Unknown;
        self.answer_at = None;
    }

    fn push(&mut self, bytes: &[u8]) -> Span {
        let start = self.buf.len();
        extend_short(&mut self.buf, bytes);
        Span {
            start,
            end: self.buf.len(),
        }
    }

    fn get(&self, span: Span) -> &[u8] {
        // Spans are only ever made by `push` on the buffer they are read from (an
        // Execute's parameters: the Bind's), which is only cut back to `answer_at`,
        // after every span but the answer's.
        self.buf.get(span.start..span.end).unwrap_or_default()
    }

    fn set_parameters(&mut self, formats: FormatsView<'_>, values: ValuesView<'_>) {
        self.formats = self.push(formats.bytes());
        self.values = self.push(values.bytes());
        self.value_count = values.count();
    }

    /// Fills in a Bind from `body`, the message `bind` was decoded from, in one copy:
    /// its portal, statement, format codes and values are one run at the start of the
    /// body (`portal\0 statement\0 count formats count values`, then the result formats,
    /// which the event does not show).
    fn set_bind(&mut self, body: &[u8], bind: &BindView<'_>) {
        let portal_end = bind.portal.len();
        let statement_start = portal_end + 1;
        let statement_end = statement_start + bind.statement.len();
        let formats_start = statement_end + 1 + 2;
        let formats_end = formats_start + bind.parameter_formats.bytes().len();
        let values_start = formats_end + 2;
        let values_end = values_start + bind.parameters.bytes().len();
        debug_assert_eq!(body.get(..portal_end), Some(bind.portal));
        debug_assert_eq!(
            body.get(statement_start..statement_end),
            Some(bind.statement)
        );
        debug_assert_eq!(
            body.get(formats_start..formats_end),
            Some(bind.parameter_formats.bytes())
        );
        debug_assert_eq!(
            body.get(values_start..values_end),
            Some(bind.parameters.bytes())
        );
        // The decoder read that far, so the body has those bytes.
        let all = self.push(body.get(..values_end).unwrap_or_default());
        let span = |start: usize, end: usize| Span {
            start: all.start + start,
            end: all.start + end,
        };
        self.portal = Some(span(0, portal_end));
        self.statement = Some(span(statement_start, statement_end));
        self.formats = span(formats_start, formats_end);
        self.values = span(values_start, values_end);
        self.value_count = bind.parameters.count();
    }

    /// Records the server's answer, copying its text.
    fn answer(&mut self, outcome: OutcomeView<'_>) {
        match self.answer_at {
            Some(at) => self.buf.truncate(at),
            None => self.answer_at = Some(self.buf.len()),
        }
        self.answer = match outcome {
            OutcomeView::Succeeded { tag } => Answer::Succeeded(tag.map(|t| self.push(t))),
            OutcomeView::Suspended => Answer::Suspended,
            OutcomeView::Failed { code, message } => Answer::Failed {
                code: self.push(code),
                message: self.push(message),
            },
            OutcomeView::Skipped => Answer::Skipped,
            // Nothing else is made by the relay; an unknown answer is no answer.
            _ => Answer::Unknown,
        };
    }

    /// Bytes this record holds, for the relay's memory limits.
    fn held_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The event; `parameters` is the record whose buffer the parameters are in (see
    /// `parameters_of`).
    fn view<'a>(&'a self, parameters: &'a Record, sql: &'a SqlStore) -> EventView<'a> {
        EventView {
            kind: self.kind,
            query: match &self.query {
                Sql::None => None,
                Sql::Copied(span) => Some(self.get(*span)),
                Sql::Shared(id) => Some(sql.get(*id)),
            },
            statement: self.statement.map(|s| self.get(s)),
            portal: self.portal.map(|s| self.get(s)),
            function: self.function,
            parameters: ParametersView::new(
                FormatsView::checked(parameters.get(self.formats)),
                ValuesView::checked(self.value_count, parameters.get(self.values)),
            ),
            outcome: match self.answer {
                Answer::Succeeded(tag) => OutcomeView::Succeeded {
                    tag: tag.map(|t| self.get(t)),
                },
                Answer::Suspended => OutcomeView::Suspended,
                Answer::Failed { code, message } => OutcomeView::Failed {
                    code: self.get(code),
                    message: self.get(message),
                },
                Answer::Skipped => OutcomeView::Skipped,
                Answer::Unknown => OutcomeView::Unknown,
            },
        }
    }
}

/// Every record, in use or free: requests and events move through the queues as indices,
/// so a record is written in place once and never moved. A Bind's record is also held by
/// the portal it created and by each Execute event of that portal, which show the
/// parameters from its buffer instead of copying them.
#[derive(Debug, Default)]
struct Records {
    slots: Vec<Record>,
    /// Indices of free records, whose buffers are reused.
    free: Vec<RecordId>,
}

impl std::ops::Index<RecordId> for Records {
    type Output = Record;

    fn index(&self, id: RecordId) -> &Record {
        &self.slots[id as usize]
    }
}

impl std::ops::IndexMut<RecordId> for Records {
    fn index_mut(&mut self, id: RecordId) -> &mut Record {
        &mut self.slots[id as usize]
    }
}

impl Records {
    /// A record of `kind` with one holder, reusing a free one when there is one.
    fn new_record(&mut self, kind: EventKind) -> RecordId {
        match self.free.pop() {
            Some(id) => {
                self[id].reset(kind);
                id
            }
            None => {
                // At most `pending_requests_max` records wait, plus the events of one
                // read and the Binds of tracked portals: far fewer than `u32::MAX`.
                let id = self.slots.len() as RecordId;
                let mut record = Record::new(kind);
                // Enough for the names, parameters and answer of most requests, so the
                // buffer is not grown step by step.
                record.buf.reserve(RECORD_BUFFER_CAPACITY);
                self.slots.push(record);
                id
            }
        }
    }

    /// One more holder of `id`.
    fn acquire(&mut self, id: RecordId) -> RecordId {
        self[id].holders += 1;
        id
    }

    /// One holder fewer; the last frees the record. Its buffer is kept for reuse if
    /// small, and only so many are kept.
    fn release(&mut self, id: RecordId, sql: &mut SqlStore) {
        let mut next = Some(id);
        while let Some(id) = next {
            let spare = self.free.len() < SPARE_BUFFERS_MAX;
            let record = &mut self[id];
            record.holders -= 1;
            if record.holders > 0 {
                return;
            }
            if record.buf.capacity() > SPARE_BUFFER_CAPACITY_MAX || !spare {
                record.buf = Vec::new();
            }
            // Lets go of a shared statement's SQL now rather than when the record is
            // reused.
            if let Sql::Shared(query) = record.query {
                sql.release(query);
            }
            record.query = Sql::None;
            // An Execute's hold on its Bind (a Bind holds no other record).
            next = record.parameters_of.take();
            self.free.push(id);
        }
    }

    fn view<'a>(&'a self, id: RecordId, sql: &'a SqlStore) -> EventView<'a> {
        let record = &self[id];
        let parameters = record.parameters_of.map_or(record, |bind| &self[bind]);
        record.view(parameters, sql)
    }

    /// Capacity of the buffers kept for reuse.
    fn spare_bytes(&self) -> usize {
        self.free.iter().map(|&id| self[id].buf.capacity()).sum()
    }
}

impl Relay {
    /// A relay for a session whose start-up and authentication are over (the agent did
    /// them itself): both directions carry tagged messages from the first byte.
    pub fn new(limits: Limits) -> Self {
        Relay {
            client: Stream::new(Direction::Frontend, false),
            server: Stream::new(Direction::Backend, false),
            limits,
            pending: VecDeque::new(),
            records: Records::default(),
            pending_bytes: 0,
            discarding_until_sync: false,
            tracked: Tracked::default(),
            ready: VecDeque::new(),
            lent: None,
            client_ended: false,
            closed: false,
            failed: None,
        }
    }

    /// A relay that sees a plaintext connection from its first byte: the client's first
    /// packet is an untagged StartupMessage (or CancelRequest). Authentication messages
    /// pass through unread (passwords never reach memory kept by the relay).
    pub fn from_startup(limits: Limits) -> Self {
        let mut relay = Relay::new(limits);
        relay.client.untagged = true;
        relay
    }

    /// Observes bytes going from client to server. Malformed bytes produce a
    /// `db.session.malformed_packet` event and an error.
    pub fn handle_client_bytes(&mut self, input: &[u8]) -> Result<(), Error> {
        self.check_usable(Direction::Frontend)?;
        let result = self.read_client(input);
        if let Err(error) = &result {
            let id = self.records.new_record(EventKind::MalformedPacket);
            self.records[id].answer(OutcomeView::Failed {
                code: error.sql_state().as_str().as_bytes(),
                message: error.to_string().as_bytes(),
            });
            self.ready.push_back(id);
            self.failed = Some(error.clone());
        }
        result
    }

    /// Observes bytes going from server to client.
    pub fn handle_server_bytes(&mut self, input: &[u8]) -> Result<(), Error> {
        self.check_usable(Direction::Backend)?;
        let result = self.read_server(input);
        if let Err(error) = &result {
            self.failed = Some(error.clone());
        }
        result
    }

    fn read_client(&mut self, mut input: &[u8]) -> Result<(), Error> {
        while !input.is_empty() {
            if self.client_ended {
                return Err(Error::frontend(PeerMisbehaved::InputAfterEnd(
                    "session (Terminate or CancelRequest)",
                )));
            }
            if self.client.at_boundary() {
                // The usual case: whole messages one after another, handled straight
                // from the read with no state kept between them.
                while let Some((header, rest)) = input.split_first_chunk::<HEADER_LEN>() {
                    let (tag, body_len, keep) =
                        check_header(Direction::Frontend, *header, &self.limits)?;
                    let Some((body, tail)) = rest.split_at_checked(body_len) else {
                        break;
                    };
                    input = tail;
                    if keep {
                        self.on_client_message(Some(tag), body)?;
                    }
                    if self.client_ended {
                        break;
                    }
                }
                if input.is_empty() || self.client_ended {
                    continue;
                }
            }
            // A message split across reads, or the untagged start-up packet.
            let Some(item) = self.client.next(&mut input, &self.limits)? else {
                break;
            };
            if let Item::Message { tag, body } = item {
                let result = self.on_client_message(tag, &body);
                self.client.recycle(body);
                result?;
            }
        }
        Ok(())
    }

    fn read_server(&mut self, mut input: &[u8]) -> Result<(), Error> {
        while !input.is_empty() {
            if self.server.at_boundary() {
                // As for the client: whole messages straight from the read.
                while let Some((header, rest)) = input.split_first_chunk::<HEADER_LEN>() {
                    let (tag, body_len, keep) =
                        check_header(Direction::Backend, *header, &self.limits)?;
                    let Some((body, tail)) = rest.split_at_checked(body_len) else {
                        break;
                    };
                    input = tail;
                    if keep {
                        self.on_server_frame(tag, body)?;
                    } else {
                        self.on_server_skipped(tag);
                    }
                }
                if input.is_empty() {
                    break;
                }
            }
            let Some(item) = self.server.next(&mut input, &self.limits)? else {
                break;
            };
            match item {
                Item::Skipped { tag } => self.on_server_skipped(tag),
                Item::Message { tag, body } => {
                    // The server stream never has untagged messages.
                    let result = self.on_server_frame(tag.unwrap_or_default(), &body);
                    self.server.recycle(body);
                    result?;
                }
            }
        }
        Ok(())
    }

    /// The connection ended (either side closed it). Requests still waiting for an answer
    /// come out with an unknown outcome (or what was known so far). Later input is an
    /// error.
    pub fn handle_close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.ready
            .extend(self.pending.drain(..).filter_map(|pending| pending.record));
        self.pending_bytes = 0;
    }

    /// Bytes the relay holds right now: message buffers, pending requests, tracked
    /// statements and event buffers kept for reuse. Bounded by the limits, whatever the
    /// size of results streaming by.
    pub fn held_bytes(&self) -> usize {
        self.client.buf.capacity()
            + self.server.buf.capacity()
            + self.pending_bytes
            + self.tracked.held_bytes()
            + self.records.spare_bytes()
    }

    /// The next audit event, borrowed from the relay until the next call; `None` when
    /// there is none. Drain after every `handle_*` call.
    #[inline]
    pub fn poll_event_view(&mut self) -> Option<EventView<'_>> {
        if let Some(done) = self.lent.take() {
            self.records.release(done, &mut self.tracked.sql);
        }
        let id = self.ready.pop_front()?;
        self.lent = Some(id);
        Some(self.records.view(id, &self.tracked.sql))
    }

    /// The next audit event, owned (text converted, parameters rendered): what
    /// [`Relay::poll_event_view`] lends, copied.
    pub fn poll_event(&mut self) -> Option<AuditEvent> {
        self.poll_event_view().map(|event| event.to_owned())
    }

    /// Lets go of a record the relay itself holds (a request, an event).
    fn free_record(&mut self, id: RecordId) {
        self.records.release(id, &mut self.tracked.sql);
    }

    fn check_usable(&self, direction: Direction) -> Result<(), Error> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        if self.closed {
            return Err(Error::PeerMisbehaved {
                direction,
                kind: PeerMisbehaved::InputAfterEnd("connection (already closed)"),
            });
        }
        Ok(())
    }

    fn on_client_message(&mut self, tag: Option<u8>, body: &[u8]) -> Result<(), Error> {
        let Some(tag) = tag else {
            return match StartupRequest::decode(body)? {
                StartupRequest::Startup(_) => Ok(()),
                StartupRequest::Cancel(_) => {
                    self.client_ended = true;
                    Ok(())
                }
                _ => Err(Error::frontend(PeerMisbehaved::UnexpectedMessage {
                    tag: None,
                    state: "(encryption request) in a relayed plaintext session",
                })),
            };
        };
        // The messages of every statement (Query; Bind, Describe, Execute, Sync) are
        // handled straight from their bytes, in exactly the shapes the decoder accepts
        // (Bind by its own part of the decoder); anything else, and these when
        // malformed, goes through the decoder and gets its error.
        match (tag, body) {
            (frontend::tag::SYNC, []) => {
                self.discarding_until_sync = false;
                return self.on_unaudited(Step::Sync);
            }
            (frontend::tag::DESCRIBE, [b'S' | b'P', name @ .., 0]) if !name.contains(&0) => {
                return self.on_unaudited(Step::Describe);
            }
            (frontend::tag::QUERY, [query @ .., 0]) if !query.contains(&0) => {
                let id = self.records.new_record(EventKind::Query);
                let record = &mut self.records[id];
                record.query = Sql::Copied(record.push(query));
                return self.on_audited(Step::Query, id);
            }
            (frontend::tag::BIND, _) => {
                let bind = BindView::decode(body)
                    .map_err(|kind| Error::invalid(Direction::Frontend, Some(tag), kind))?;
                let id = self.records.new_record(EventKind::PostgresBind);
                self.records[id].set_bind(body, &bind);
                return self.on_audited(Step::Bind, id);
            }
            (frontend::tag::EXECUTE, [portal @ .., 0, _, _, _, _]) if !portal.contains(&0) => {
                let id = self.records.new_record(EventKind::PostgresExecute);
                let record = &mut self.records[id];
                record.portal = Some(record.push(portal));
                return self.on_audited(Step::Execute, id);
            }
            _ => {}
        }
        // Decoded as a borrowed view: only what the audit keeps is copied out.
        let message = MessageView::decode(tag, body)
            .map_err(|kind| Error::invalid(Direction::Frontend, Some(tag), kind))?;
        let (step, kind) = match message {
            MessageView::Query(_) => (Step::Query, EventKind::Query),
            MessageView::Parse(_) => (Step::Parse, EventKind::PostgresParse),
            MessageView::Bind(_) => (Step::Bind, EventKind::PostgresBind),
            MessageView::Execute { .. } => (Step::Execute, EventKind::PostgresExecute),
            MessageView::Close(_) => (Step::Close, EventKind::PostgresClose),
            MessageView::FunctionCall(_) => (Step::Function, EventKind::PostgresFunction),
            MessageView::Describe(_) => return self.on_unaudited(Step::Describe),
            MessageView::Sync => {
                self.discarding_until_sync = false;
                return self.on_unaudited(Step::Sync);
            }
            MessageView::Terminate => {
                self.client_ended = true;
                return Ok(());
            }
            // Flush asks for no answer; COPY sub-protocol messages are answered as part of
            // the Query or Execute that started the COPY.
            _ => return Ok(()),
        };
        let id = self.records.new_record(kind);
        let record = &mut self.records[id];
        match message {
            MessageView::Query(query) => record.query = Sql::Copied(record.push(query)),
            MessageView::Parse(parse) => {
                record.statement = Some(record.push(parse.name));
                record.query = Sql::Copied(record.push(parse.query));
            }
            MessageView::Bind(bind) => record.set_bind(body, &bind),
            MessageView::Execute { portal, .. } => record.portal = Some(record.push(portal)),
            MessageView::Close(TargetView::Statement(name)) => {
                record.statement = Some(record.push(name));
            }
            MessageView::Close(TargetView::Portal(name)) => record.portal = Some(record.push(name)),
            MessageView::FunctionCall(call) => {
                record.function = Some(call.function);
                record.set_parameters(call.argument_formats, call.arguments);
            }
            _ => {}
        }
        self.on_audited(step, id)
    }

    /// An audited request, its record filled in: queued for the server's answer.
    fn on_audited(&mut self, step: Step, id: RecordId) -> Result<(), Error> {
        let record = &mut self.records[id];
        if self.discarding_until_sync {
            // The server reads and drops it: audit it as never run.
            record.answer(OutcomeView::Skipped);
            self.ready.push_back(id);
            return Ok(());
        }
        let held = record.held_bytes();
        match self.push_pending(step, Some(id), held) {
            Ok(()) => Ok(()),
            Err(error) => {
                self.free_record(id);
                Err(error)
            }
        }
    }

    /// A request with no event (Describe, Sync): only its place in the queue.
    fn on_unaudited(&mut self, step: Step) -> Result<(), Error> {
        if self.discarding_until_sync {
            return Ok(());
        }
        self.push_pending(step, None, 0)
    }

    fn push_pending(
        &mut self,
        step: Step,
        record: Option<RecordId>,
        held: usize,
    ) -> Result<(), Error> {
        let max = self.limits.pending_requests_max;
        if self.pending.len() >= max {
            return Err(Error::limit(
                Limit::PendingRequests,
                self.pending.len() + 1,
                max,
            ));
        }
        let bytes = self.pending_bytes + held;
        if bytes > self.limits.pending_bytes_max {
            return Err(Error::limit(
                Limit::PendingBytes,
                bytes,
                self.limits.pending_bytes_max,
            ));
        }
        self.pending_bytes = bytes;
        self.pending.push_back(Pending { step, record });
        Ok(())
    }

    /// Takes the front request off the queue: its step and, when audited, its record.
    fn pop_pending(&mut self) -> Option<(Step, Option<RecordId>)> {
        let Pending { step, record } = self.pending.pop_front()?;
        if let Some(id) = record {
            let held = self.records[id].held_bytes();
            self.pending_bytes = self.pending_bytes.saturating_sub(held);
        }
        Some((step, record))
    }

    fn front_step(&self) -> Option<Step> {
        self.pending.front().map(|pending| pending.step)
    }

    /// Server messages the relay does not read whole still move the Describe step on.
    fn on_server_skipped(&mut self, tag: u8) {
        if matches!(tag, backend::tag::ROW_DESCRIPTION | backend::tag::NO_DATA)
            && self.front_step() == Some(Step::Describe)
        {
            self.pop_pending();
        }
    }

    fn on_server_frame(&mut self, tag: u8, body: &[u8]) -> Result<(), Error> {
        use backend::tag::*;
        // The answers with no body (or a one-byte status) on the common path: no decoder.
        match (tag, body) {
            (COMMAND_COMPLETE, _) => {
                // One per statement: read borrowed, the tag is copied into the event.
                let command_tag = backend::command_tag(body)?;
                return self.on_command_done(Some(command_tag));
            }
            (PARSE_COMPLETE, []) => return self.complete(Step::Parse, succeeded(None)),
            (BIND_COMPLETE, []) => return self.complete(Step::Bind, succeeded(None)),
            (CLOSE_COMPLETE, []) => return self.complete(Step::Close, succeeded(None)),
            (READY_FOR_QUERY, [status]) => {
                let status = match status {
                    b'I' => backend::TransactionStatus::Idle,
                    b'T' => backend::TransactionStatus::InTransaction,
                    b'E' => backend::TransactionStatus::Failed,
                    // Refused by the decoder below, with its error.
                    _ => return BackendMessage::decode(Frame { tag, body }).map(|_| ()),
                };
                self.on_ready(status);
                return Ok(());
            }
            _ => {}
        }
        BackendMessage::decode(Frame { tag, body })
            .and_then(|message| self.on_server_message(message))
    }

    fn on_server_message(&mut self, message: BackendMessage) -> Result<(), Error> {
        match message {
            BackendMessage::ParseComplete => self.complete(Step::Parse, succeeded(None)),
            BackendMessage::BindComplete => self.complete(Step::Bind, succeeded(None)),
            BackendMessage::CloseComplete => self.complete(Step::Close, succeeded(None)),
            BackendMessage::PortalSuspended => self.complete(Step::Execute, OutcomeView::Suspended),
            BackendMessage::CommandComplete(tag) => self.on_command_done(Some(&tag)),
            BackendMessage::EmptyQueryResponse => self.on_command_done(None),
            BackendMessage::FunctionCallResponse(_) => self.record(Step::Function, succeeded(None)),
            BackendMessage::ErrorResponse(fields) => self.on_error(OutcomeView::Failed {
                code: fields.code().unwrap_or_default(),
                message: fields.message().unwrap_or_default(),
            }),
            BackendMessage::ReadyForQuery(status) => {
                self.on_ready(status);
                Ok(())
            }
            // Nothing else is read whole (see `keep_backend`).
            _ => Ok(()),
        }
    }

    fn on_command_done(&mut self, tag: Option<&[u8]>) -> Result<(), Error> {
        match self.front_step() {
            Some(Step::Execute) => self.complete(Step::Execute, succeeded(tag)),
            _ => self.record(Step::Query, succeeded(tag)),
        }
    }

    /// Notes the outcome of a Query or FunctionCall, which ends at ReadyForQuery.
    fn record(&mut self, step: Step, outcome: OutcomeView<'_>) -> Result<(), Error> {
        match self.pending.front() {
            Some(&Pending {
                step: front,
                record: Some(id),
            }) if front == step => {
                let record = &mut self.records[id];
                let before = record.held_bytes();
                record.answer(outcome);
                // The answer's text is held as long as the request waits.
                self.pending_bytes =
                    (self.pending_bytes + record.held_bytes()).saturating_sub(before);
                Ok(())
            }
            _ => Err(unexpected_answer(step)),
        }
    }

    fn on_error(&mut self, outcome: OutcomeView<'_>) -> Result<(), Error> {
        match self.front_step() {
            Some(Step::Query) => self.record(Step::Query, outcome),
            Some(Step::Function) => self.record(Step::Function, outcome),
            Some(
                step @ (Step::Parse | Step::Bind | Step::Execute | Step::Close | Step::Describe),
            ) => {
                self.complete(step, outcome)?;
                // The server now drops everything up to the next Sync.
                while let Some(step) = self.front_step() {
                    if step == Step::Sync {
                        return Ok(());
                    }
                    self.complete(step, OutcomeView::Skipped)?;
                }
                self.discarding_until_sync = true;
                Ok(())
            }
            // Errors with nothing waiting (FATAL at shutdown, a failed commit at Sync):
            // nothing to attribute them to.
            Some(Step::Sync) | None => Ok(()),
        }
    }

    fn on_ready(&mut self, status: backend::TransactionStatus) {
        // ReadyForQuery ends a Query, a FunctionCall or a Sync batch. Anything still in
        // front of it got no answer (cannot happen with a conforming server) and comes
        // out as it is.
        while let Some((step, record)) = self.pop_pending() {
            let ends = matches!(step, Step::Query | Step::Function | Step::Sync);
            if let Some(record) = record {
                self.ready.push_back(record);
            }
            if ends {
                break;
            }
        }
        if status == backend::TransactionStatus::Idle {
            // Portals live until the end of the transaction.
            self.tracked.clear_portals(&mut self.records);
        }
    }

    /// Pops the front request, which must be waiting for `step`, and emits its event.
    fn complete(&mut self, step: Step, outcome: OutcomeView<'_>) -> Result<(), Error> {
        if self.front_step() != Some(step) {
            return Err(unexpected_answer(step));
        }
        let Some((_, record)) = self.pop_pending() else {
            return Err(unexpected_answer(step));
        };
        // Describe has no event: nothing to record or track.
        let Some(id) = record else {
            return Ok(());
        };
        let ok = matches!(
            outcome,
            OutcomeView::Succeeded { .. } | OutcomeView::Suspended
        );
        if let Err(error) = self
            .tracked
            .on_complete(step, ok, id, &mut self.records, &self.limits)
        {
            self.free_record(id);
            return Err(error);
        }
        self.records[id].answer(outcome);
        self.ready.push_back(id);
        Ok(())
    }
}

/// Prepared statements and portals the server confirmed, for the SQL and parameters of
/// later Bind, Execute and Close events.
#[derive(Debug, Default)]
struct Tracked {
    /// Prepared statements: name -> SQL.
    statements: Named<SqlId>,
    /// Portals: name -> SQL and the Bind's record (its parameters).
    portals: Named<Portal>,
    /// Bytes of SQL and parameters held by both.
    bytes: usize,
    /// The SQL of statements, portals and records: each holds one count.
    sql: SqlStore,
}

impl Tracked {
    /// Notes what the request of record `id`, which the server answered, did to the
    /// statements and portals, and fills in its record's SQL (and, for Execute, its
    /// portal's parameters).
    fn on_complete(
        &mut self,
        step: Step,
        ok: bool,
        id: RecordId,
        records: &mut Records,
        limits: &Limits,
    ) -> Result<(), Error> {
        let (statement, portal) = (records[id].statement, records[id].portal);
        match (step, statement, portal) {
            (Step::Parse, Some(name), _) if ok => {
                let record = &mut records[id];
                let query = self.sql.insert(match record.query {
                    Sql::Copied(span) => record.get(span),
                    _ => &[],
                });
                // The event shares the statement's copy; its own bytes stay unused.
                let table_share = self.sql.acquire(query);
                if let Err(error) = self.track_statement(record.get(name), table_share, limits) {
                    self.sql.release(query);
                    return Err(error);
                }
                record.query = Sql::Shared(query);
            }
            (Step::Bind, Some(statement), Some(name)) => {
                let query = self.statements.get(records[id].get(statement)).copied();
                if ok {
                    let shared = query.map(|q| self.sql.acquire(q));
                    self.track_portal(id, name, shared, records, limits)?;
                }
                records[id].query = self.share(query);
            }
            (Step::Execute, _, Some(name)) => {
                let found = self
                    .portals
                    .get(records[id].get(name))
                    .map(|portal| (portal.query, portal.bind));
                if let Some((query, bind)) = found {
                    // The parameters stay in the Bind's buffer: the event holds it.
                    let bind = records.acquire(bind);
                    let (formats, values, value_count) = {
                        let bind = &records[bind];
                        (bind.formats, bind.values, bind.value_count)
                    };
                    let record = &mut records[id];
                    record.parameters_of = Some(bind);
                    record.formats = formats;
                    record.values = values;
                    record.value_count = value_count;
                    record.query = self.share(query);
                }
            }
            (Step::Close, Some(name), _) => {
                let record = &mut records[id];
                let name = record.get(name);
                let query = self.statements.get(name).copied();
                let shared = self.share(query);
                if ok && let Some(query) = self.statements.remove(name) {
                    self.bytes = self.bytes.saturating_sub(self.sql.get(query).len());
                    self.sql.release(query);
                }
                record.query = shared;
            }
            (Step::Close, _, Some(name)) => {
                let name = records[id].get(name);
                let query = self.portals.get(name).and_then(|p| p.query);
                let shared = self.share(query);
                let closed = if ok { self.portals.remove(name) } else { None };
                if let Some(portal) = closed {
                    self.drop_portal(portal, records);
                }
                records[id].query = shared;
            }
            _ => {}
        }
        Ok(())
    }

    /// A record's share of a statement's SQL, if there is one.
    fn share(&mut self, query: Option<SqlId>) -> Sql {
        match query {
            Some(query) => Sql::Shared(self.sql.acquire(query)),
            None => Sql::None,
        }
    }

    /// Forgets a portal: its bytes, its share of the SQL, its hold on its Bind's record.
    fn drop_portal(&mut self, portal: Portal, records: &mut Records) {
        self.bytes = self.bytes.saturating_sub(portal.held_bytes(&self.sql));
        if let Some(query) = portal.query {
            self.sql.release(query);
        }
        records.release(portal.bind, &mut self.sql);
    }

    /// Tracks a statement the server confirmed; `query` is the table's share of its SQL
    /// (released if the statement cannot be tracked).
    fn track_statement(&mut self, name: &[u8], query: SqlId, limits: &Limits) -> Result<(), Error> {
        if let Some(old) = self.statements.remove(name) {
            self.bytes = self.bytes.saturating_sub(self.sql.get(old).len());
            self.sql.release(old);
        }
        let len = self.sql.get(query).len();
        if let Err(e) = self.check(len, limits) {
            self.sql.release(query);
            return Err(e);
        }
        self.bytes += len;
        self.statements.insert(name, query);
        Ok(())
    }

    /// Tracks the portal that the Bind of record `bind` created (named by its span
    /// `name`), replacing any of that name; `query` is the portal's share of its
    /// statement's SQL (released if the portal cannot be tracked). The portal holds the
    /// Bind's record for its parameters.
    fn track_portal(
        &mut self,
        bind: RecordId,
        name: Span,
        query: Option<SqlId>,
        records: &mut Records,
        limits: &Limits,
    ) -> Result<(), Error> {
        let record = &records[bind];
        let name = record.get(name);
        let replaced = self.portals.remove(name);
        if let Some(old) = &replaced {
            self.bytes = self.bytes.saturating_sub(old.held_bytes(&self.sql));
        }
        let portal = Portal {
            query,
            bind,
            parameters_len: record.get(record.formats).len() + record.get(record.values).len(),
        };
        let held = portal.held_bytes(&self.sql);
        let result = self.check(held, limits);
        if result.is_ok() {
            self.bytes += held;
            self.portals.insert(name, portal);
        }
        if let Some(old) = replaced {
            // Its bytes were taken off above.
            if let Some(query) = old.query {
                self.sql.release(query);
            }
            records.release(old.bind, &mut self.sql);
        }
        match result {
            Ok(()) => {
                records.acquire(bind);
                Ok(())
            }
            Err(error) => {
                if let Some(query) = query {
                    self.sql.release(query);
                }
                Err(error)
            }
        }
    }

    /// Forgets every portal (the transaction ended).
    fn clear_portals(&mut self, records: &mut Records) {
        if self.portals.scanned.is_empty() && self.portals.named.is_empty() {
            // Only the unnamed portal, if any: the usual case, after each statement.
            if let Some(portal) = self.portals.unnamed.take() {
                self.drop_portal(portal, records);
            }
            return;
        }
        let mut held = 0;
        for portal in self.portals.values() {
            held += portal.held_bytes(&self.sql);
            if let Some(query) = portal.query {
                self.sql.release(query);
            }
            records.release(portal.bind, &mut self.sql);
        }
        self.bytes = self.bytes.saturating_sub(held);
        self.portals.clear();
    }

    fn check(&self, more_bytes: usize, limits: &Limits) -> Result<(), Error> {
        let count = self.statements.len() + self.portals.len() + 1;
        if count > limits.prepared_statements_max {
            return Err(Error::limit(
                Limit::PreparedStatements,
                count,
                limits.prepared_statements_max,
            ));
        }
        let bytes = self.bytes + more_bytes;
        if bytes > limits.prepared_statement_bytes_max {
            return Err(Error::limit(
                Limit::PreparedStatementBytes,
                bytes,
                limits.prepared_statement_bytes_max,
            ));
        }
        Ok(())
    }

    /// Bytes of SQL and parameters held (the parameters are in the Binds' records).
    fn held_bytes(&self) -> usize {
        self.bytes
    }
}

fn succeeded(tag: Option<&[u8]>) -> OutcomeView<'_> {
    OutcomeView::Succeeded { tag }
}

fn unexpected_answer(step: Step) -> Error {
    Error::PeerMisbehaved {
        direction: Direction::Backend,
        kind: PeerMisbehaved::UnexpectedMessage {
            tag: None,
            state: match step {
                Step::Query => "(query result) with no Query waiting",
                Step::Function => "(FunctionCallResponse) with no FunctionCall waiting",
                Step::Parse => "(ParseComplete) with no Parse waiting",
                Step::Bind => "(BindComplete) with no Bind waiting",
                Step::Execute => "(PortalSuspended) with no Execute waiting",
                Step::Close => "(CloseComplete) with no Close waiting",
                Step::Describe => "(Describe answer) with no Describe waiting",
                Step::Sync => "(ReadyForQuery) with no Sync waiting",
            },
        },
    }
}

/// What a stream does with a message type byte: refuse it, skip its body, or read it
/// whole. One table per direction, so a header costs one lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagClass {
    Unknown,
    Skip,
    Keep,
}

const fn tag_classes(direction: Direction) -> [TagClass; 256] {
    let mut classes = [TagClass::Unknown; 256];
    let mut tag = 0;
    while tag < 256 {
        let t = tag as u8;
        let (known, keep) = match direction {
            Direction::Frontend => (frontend::is_frontend_tag(t), keep_frontend(t)),
            Direction::Backend => (backend::is_backend_tag(t), keep_backend(t)),
        };
        classes[tag] = match (known, keep) {
            (false, _) => TagClass::Unknown,
            (true, false) => TagClass::Skip,
            (true, true) => TagClass::Keep,
        };
        tag += 1;
    }
    classes
}

static FRONTEND_TAGS: [TagClass; 256] = tag_classes(Direction::Frontend);
static BACKEND_TAGS: [TagClass; 256] = tag_classes(Direction::Backend);

/// Client messages read whole: everything but CopyData (bulk) and authentication
/// responses (secrets).
const fn keep_frontend(tag: u8) -> bool {
    !matches!(
        tag,
        frontend::tag::COPY_DATA | frontend::tag::AUTHENTICATION_RESPONSE
    )
}

/// Server messages read whole: only the ones that end a request.
const fn keep_backend(tag: u8) -> bool {
    use backend::tag::*;
    matches!(
        tag,
        PARSE_COMPLETE
            | BIND_COMPLETE
            | CLOSE_COMPLETE
            | COMMAND_COMPLETE
            | EMPTY_QUERY_RESPONSE
            | PORTAL_SUSPENDED
            | ERROR_RESPONSE
            | FUNCTION_CALL_RESPONSE
            | READY_FOR_QUERY
    )
}

/// Reads and checks a tagged header: the tag, the body length, and whether the body is
/// read whole (else skipped). Inlined so that the read loops, which know their
/// direction, pick their tag table without a branch.
#[inline(always)]
fn check_header(
    direction: Direction,
    header: [u8; HEADER_LEN],
    limits: &Limits,
) -> Result<(u8, usize, bool), Error> {
    let (tag, body_len) = frame::parse_header(direction, header, limits.message_size_max)?;
    let class = match direction {
        Direction::Frontend => FRONTEND_TAGS[usize::from(tag)],
        Direction::Backend => BACKEND_TAGS[usize::from(tag)],
    };
    let keep = class == TagClass::Keep;
    if class == TagClass::Unknown {
        return Err(Error::invalid(
            direction,
            Some(tag),
            InvalidMessage::UnknownTag,
        ));
    }
    if keep && HEADER_LEN + body_len > limits.buffered_message_size_max {
        return Err(Error::limit(
            Limit::BufferedMessageSize,
            HEADER_LEN + body_len,
            limits.buffered_message_size_max,
        ));
    }
    Ok((tag, body_len, keep))
}

/// One direction of the byte stream, cut into messages without holding more than one
/// audited message.
#[derive(Debug)]
struct Stream {
    direction: Direction,
    /// The next message is an untagged start-up packet.
    untagged: bool,
    header: [u8; HEADER_LEN],
    header_filled: usize,
    body: Option<Body>,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Body {
    tag: Option<u8>,
    remaining: usize,
    keep: bool,
}

#[derive(Debug)]
enum Item<'a> {
    /// A message read whole: borrowed from the input when it arrived in one read, else
    /// gathered in the stream's buffer. Untagged start-up packets include their length
    /// word.
    Message {
        tag: Option<u8>,
        body: Cow<'a, [u8]>,
    },
    /// The header of a message whose body is being skipped.
    Skipped { tag: u8 },
}

impl Stream {
    fn new(direction: Direction, untagged: bool) -> Self {
        Stream {
            direction,
            untagged,
            header: [0; HEADER_LEN],
            header_filled: 0,
            body: None,
            buf: Vec::new(),
        }
    }

    /// Consumes bytes from the front of `input` until one item is complete, or all of
    /// `input` is used (`Ok(None)`).
    fn next<'a>(
        &mut self,
        input: &mut &'a [u8],
        limits: &Limits,
    ) -> Result<Option<Item<'a>>, Error> {
        loop {
            if let Some(body) = &mut self.body {
                if body.keep && self.buf.is_empty() && body.remaining <= input.len() {
                    // The whole body is in this read: lend it out, no copy.
                    let (head, tail) = input.split_at(body.remaining);
                    *input = tail;
                    let tag = body.tag;
                    self.body = None;
                    return Ok(Some(Item::Message {
                        tag,
                        body: Cow::Borrowed(head),
                    }));
                }
                let n = body.remaining.min(input.len());
                let (head, tail) = input.split_at(n);
                if body.keep {
                    self.buf.extend_from_slice(head);
                }
                *input = tail;
                body.remaining -= n;
                if body.remaining > 0 {
                    return Ok(None);
                }
                let tag = body.tag;
                let keep = body.keep;
                self.body = None;
                if keep {
                    return Ok(Some(Item::Message {
                        tag,
                        body: Cow::Owned(std::mem::take(&mut self.buf)),
                    }));
                }
                continue;
            }
            if self.header_filled == 0
                && !self.untagged
                && let Some((header, rest)) = input.split_first_chunk::<HEADER_LEN>()
            {
                // The whole header is in this read (but not the whole message, else
                // the relay's read loop would have taken it).
                let (tag, body_len, keep) = self.check_header(*header, limits)?;
                *input = rest;
                if let Some(item) = self.begin_body(tag, body_len, keep) {
                    return Ok(Some(item));
                }
                continue;
            }
            let header_len = if self.untagged {
                STARTUP_LENGTH_LEN
            } else {
                HEADER_LEN
            };
            let n = (header_len - self.header_filled).min(input.len());
            let (head, tail) = input.split_at(n);
            self.header[self.header_filled..self.header_filled + n].copy_from_slice(head);
            self.header_filled += n;
            *input = tail;
            if self.header_filled < header_len {
                return Ok(None);
            }
            self.header_filled = 0;
            if let Some(item) = self.start_body(limits)? {
                return Ok(Some(item));
            }
        }
    }

    /// No message is under way and the next is tagged: a whole message at the start of
    /// a read can be handled straight from it (see `Relay::read_client`).
    fn at_boundary(&self) -> bool {
        self.body.is_none() && self.header_filled == 0 && !self.untagged
    }

    fn start_body(&mut self, limits: &Limits) -> Result<Option<Item<'static>>, Error> {
        if self.untagged {
            self.untagged = false;
            let mut length = [0; 4];
            length.copy_from_slice(&self.header[..4]);
            let length = u32::from_be_bytes(length) as usize;
            if length < STARTUP_HEADER_LEN {
                return Err(Error::invalid(
                    self.direction,
                    None,
                    InvalidMessage::LengthTooSmall {
                        length: length as i64,
                        min: STARTUP_HEADER_LEN as u32,
                    },
                ));
            }
            if length > limits.startup_packet_size_max {
                return Err(Error::limit(
                    Limit::StartupPacketSize,
                    length,
                    limits.startup_packet_size_max,
                ));
            }
            self.buf.clear();
            self.buf.extend_from_slice(&self.header[..4]);
            self.body = Some(Body {
                tag: None,
                remaining: length - 4,
                keep: true,
            });
            return Ok(None);
        }
        let (tag, body_len, keep) = self.check_header(self.header, limits)?;
        Ok(self.begin_body(tag, body_len, keep))
    }

    fn check_header(
        &self,
        header: [u8; HEADER_LEN],
        limits: &Limits,
    ) -> Result<(u8, usize, bool), Error> {
        check_header(self.direction, header, limits)
    }

    /// Starts reading (or skipping) a body that continues in later reads.
    fn begin_body(&mut self, tag: u8, body_len: usize, keep: bool) -> Option<Item<'static>> {
        self.buf.clear();
        self.body = Some(Body {
            tag: Some(tag),
            remaining: body_len,
            keep,
        });
        (!keep).then_some(Item::Skipped { tag })
    }

    /// Takes back the buffer lent out in an [`Item::Message`], if it was the stream's.
    fn recycle(&mut self, body: Cow<'_, [u8]>) {
        let Cow::Owned(mut buf) = body else {
            return;
        };
        if buf.capacity() <= BUFFER_RETAIN_MAX {
            buf.clear();
            self.buf = buf;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Fields, TransactionStatus};
    use crate::frontend::{Bind, FrontendMessage, Parse, Target};
    use crate::reply::{Severity, SqlState};

    fn bytes<M>(messages: &[M], encode: impl Fn(&M, &mut Vec<u8>) -> Result<(), Error>) -> Vec<u8> {
        let mut out = Vec::new();
        for message in messages {
            encode(message, &mut out).expect("small message encodes");
        }
        out
    }

    fn client(messages: &[FrontendMessage]) -> Vec<u8> {
        bytes(messages, FrontendMessage::encode)
    }

    fn server(messages: &[BackendMessage]) -> Vec<u8> {
        bytes(messages, BackendMessage::encode)
    }

    fn bind(portal: &str, statement: &str) -> FrontendMessage {
        FrontendMessage::Bind(Bind {
            portal: portal.into(),
            statement: statement.into(),
            parameter_formats: vec![],
            parameters: vec![Some(b"1".to_vec())],
            result_formats: vec![],
        })
    }

    // Goal: the inline copy of short slices appends exactly the bytes given, whatever
    // their length and the room left in the buffer.
    #[test]
    fn extend_short_appends_exactly() {
        let source: Vec<u8> = (1..=40).collect();
        for len in 0..=source.len() {
            for room in [0, 1, 15, 16, 17, 64] {
                let mut buf = Vec::with_capacity(3 + room);
                buf.extend_from_slice(b"abc");
                extend_short(&mut buf, &source[..len]);
                assert_eq!(&buf[..3], b"abc", "len {len} room {room}");
                assert_eq!(&buf[3..], &source[..len], "len {len} room {room}");
            }
        }
    }

    // Goal: a short statement name and a long one with the same scan key (same first 7
    // bytes, lengths equal modulo 256) are told apart.
    #[test]
    fn scan_keys_of_short_and_long_names() {
        let short = b"abcdefg".to_vec();
        let mut long = short.clone();
        long.resize(7 + 256, b'x');
        assert_eq!(scan_key(&short), scan_key(&long));
        let mut named = Named::default();
        named.insert(&long, 1);
        assert_eq!(named.get(&short), None);
        named.insert(&short, 2);
        assert_eq!((named.get(&long), named.get(&short)), (Some(&1), Some(&2)));
        assert_eq!(named.remove(&short), Some(2));
        assert_eq!((named.get(&long), named.get(&short)), (Some(&1), None));
    }

    // Goal: every holder of a statement's SQL (statement table, portal, event) and of a
    // Bind's record (its event, its portal, its portal's Execute events) gives its share
    // back, through success, failure and replacement, so neither the SQL store nor the
    // records grow with the number of statements a session prepares.
    #[test]
    fn statement_sql_is_released() {
        let mut relay = Relay::new(Limits::default());
        for round in 0..50 {
            let name = format!("s{}", round % 3);
            relay
                .handle_client_bytes(&client(&[
                    FrontendMessage::Parse(Parse {
                        name: name.clone().into(),
                        query: format!("select {round}").into(),
                        parameter_types: vec![],
                    }),
                    bind("p", &name),
                    bind("", &name),
                    FrontendMessage::Execute {
                        portal: b"p".to_vec(),
                        max_rows: 0,
                    },
                    FrontendMessage::Execute {
                        portal: vec![],
                        max_rows: 0,
                    },
                    FrontendMessage::Close(Target::Portal(b"p".to_vec())),
                    FrontendMessage::Sync,
                ]))
                .expect("valid requests");
            let failed = round % 5 == 4;
            let mut answers = vec![
                BackendMessage::ParseComplete,
                BackendMessage::BindComplete,
                BackendMessage::BindComplete,
                BackendMessage::CommandComplete(b"SELECT 1".to_vec()),
            ];
            if failed {
                // The second Execute fails: the Close is skipped, the portal stays until
                // the transaction ends.
                answers.push(BackendMessage::ErrorResponse(Fields::error(
                    Severity::Error,
                    SqlState::PROTOCOL_VIOLATION,
                    "no",
                )));
            } else {
                answers.push(BackendMessage::CommandComplete(b"SELECT 1".to_vec()));
                answers.push(BackendMessage::CloseComplete);
            }
            // Every other round stays in a transaction, so portals outlive the Sync.
            let status = if round % 2 == 0 {
                TransactionStatus::InTransaction
            } else {
                TransactionStatus::Idle
            };
            answers.push(BackendMessage::ReadyForQuery(status));
            relay
                .handle_server_bytes(&server(&answers))
                .expect("valid answers");
            let mut events = 0;
            while let Some(event) = relay.poll_event_view() {
                assert!(
                    event.kind == EventKind::PostgresClose || event.query.is_some(),
                    "{event:?}"
                );
                events += 1;
            }
            assert_eq!(events, 6);
        }
        // Three statements are still prepared; nothing else holds SQL.
        let sql = &relay.tracked.sql;
        let held: Vec<u32> = sql.entries.iter().map(|e| e.holders).collect();
        assert_eq!(held.iter().filter(|&&h| h > 0).count(), 3, "{held:?}");
        assert!(held.iter().all(|&h| h <= 1), "{held:?}");
        assert!(sql.entries.len() <= 8, "{} entries", sql.entries.len());
        for name in ["s0", "s1", "s2"] {
            relay
                .handle_client_bytes(&client(&[
                    FrontendMessage::Close(Target::Statement(name.into())),
                    FrontendMessage::Sync,
                ]))
                .expect("valid requests");
            relay
                .handle_server_bytes(&server(&[
                    BackendMessage::CloseComplete,
                    BackendMessage::ReadyForQuery(TransactionStatus::Idle),
                ]))
                .expect("valid answers");
            while relay.poll_event_view().is_some() {}
        }
        let sql = &relay.tracked.sql;
        assert!(
            sql.entries
                .iter()
                .all(|e| e.holders == 0 && e.bytes.is_empty())
        );
        assert_eq!(relay.tracked.bytes, 0);
        // Every record is free again: no portal or Execute event still holds a Bind's.
        let records = &relay.records;
        assert!(records.slots.len() <= 16, "{} records", records.slots.len());
        assert_eq!(records.free.len(), records.slots.len());
        assert!(records.slots.iter().all(|r| r.holders == 0));
    }
}

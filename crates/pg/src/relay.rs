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
//! waiting, as `Unknown` (with the SQL their statements and portals name), so that no
//! request goes unaudited.
//!
//! The hot path allocates nothing once warm. An audited request is a small fixed-size
//! entry in one queue; the few bytes its event shows (names, the SQL of a simple query
//! or Parse, a Bind's parameters as sent, later the command tag or error) are appended
//! to the relay's log, one byte vector for every request waiting and every event not yet
//! taken, which is emptied whenever none is left. [`Relay::poll_event_view`] lends an
//! entry out as an [`EventView`] of the log; text is neither validated nor converted
//! here (the consumer renders it). Only what outlives a statement is kept apart, in
//! reference-counted byte strings: a prepared statement's SQL (shared by every later
//! Bind, Execute and Close event naming it) and a portal's parameters (shared by its
//! Execute events).
//!
//! The most common request, a simple Query sent while nothing else waits (psql, pgbench's
//! default mode, any client that waits for each answer), skips the queues: its one entry
//! is filled in place and lent out from there. Anything else first moves it into the
//! queues, so the events are the same either way (`tests/lone_query.rs` and the
//! `pg_relay` fuzz target compare the two paths).
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
//! assert_eq!(event.query(), Some(&b"select 1"[..]));
//! # Ok::<(), postern_pg::Error>(())
//! ```

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

use crate::audit::{AuditEvent, EventKind, EventView, OutcomeView, ParametersView};
use crate::backend::{self, BackendMessage};
use crate::error::{Direction, Error, InvalidMessage, Limit, PeerMisbehaved};
use crate::frame::{self, Frame, HEADER_LEN, STARTUP_HEADER_LEN};
use crate::frontend::{
    self, BindView, FormatsView, MessageView, PacketHead, TargetView, ValuesView,
};
use crate::limits::Limits;

/// A buffer kept between messages is given back to the allocator above this size, so one
/// large query does not pin its memory for the rest of the session.
const BUFFER_RETAIN_MAX: usize = 64 << 10;

/// Shared byte strings (statements' SQL, portals' parameters) freed by their last holder
/// keep their buffer for the next one when it is at most this big, and at most this many
/// are kept: the unnamed portal's parameters are replaced with every statement.
const SPARE_BLOB_CAPACITY_MAX: usize = 512;
const SPARE_BLOBS_MAX: usize = 8;

/// The event log is compacted (its dead front cut off) once it is this long: only a
/// client whose pipeline never drains gets there, since the log is emptied whenever no
/// request waits and no event is left.
const LOG_COMPACT_MIN: usize = 64 << 10;

/// The most capacity the event log keeps once emptied: one large statement does not pin
/// its memory for the rest of the session.
const LOG_RETAIN_MAX: usize = 4 << 10;

/// The event log's first capacity: room for a few statements' SQL and command tags,
/// where growing it from nothing took four reallocations in a pgbench session.
const LOG_FIRST: usize = 256;

/// The length word that starts an untagged start-up packet.
const STARTUP_LENGTH_LEN: usize = 4;

/// Agent-side relay state machine. See the module documentation.
#[derive(Debug)]
pub struct Relay {
    limits: Limits,
    client: Stream,
    server: Stream,
    /// The answers the server owes, oldest first: one step per request that gets one.
    steps: VecDeque<Step>,
    /// Audited requests in request order. The first `answered` have their answer: they
    /// are the events `poll_event_view` hands out. The others are the audited steps of
    /// `steps`, in the same order.
    entries: VecDeque<Entry>,
    answered: usize,
    /// `entries[0]` was lent out by `poll_event_view`; it is dropped on the next call.
    lent: bool,
    /// The lone query (see [`Lone`]): its entry and where it is.
    lone: Entry,
    lone_state: Lone,
    /// Simple Queries may be taken as the lone query: off when no request may wait at
    /// all (the queues refuse every one), and in tests that the result is the same.
    lone_allowed: bool,
    /// Every byte the entries show (names, the SQL of simple queries and Parses, Binds'
    /// parameters, the answers' text), appended as it arrives. Emptied whenever no entry
    /// is left, compacted when it reaches `compact_at`.
    log: Vec<u8>,
    compact_at: usize,
    /// Bytes of `log` held by requests waiting for an answer.
    pending_bytes: usize,
    /// The server reported an error in an extended-protocol batch and discards every
    /// message until the client's next Sync.
    discarding_until_sync: bool,
    /// Prepared statements and portals the server confirmed.
    tracked: Tracked,
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
}

/// A portal the server confirmed: what each Execute of it shows.
#[derive(Debug, Clone, Copy)]
struct Portal {
    /// Its statement's SQL (one share of it), when the statement was known.
    query: Option<BlobId>,
    /// Its Bind's parameters, when it had any.
    parameters: Option<SharedParameters>,
}

impl Portal {
    fn held_bytes(&self, blobs: &Blobs) -> usize {
        self.query.map_or(0, |q| blobs.get(q).len())
            + self.parameters.map_or(0, |p| blobs.get(p.blob).len())
    }
}

/// A Bind's parameter format codes and values as sent, in one blob (formats first),
/// shared by its portal and that portal's Execute events.
#[derive(Debug, Clone, Copy)]
struct SharedParameters {
    blob: BlobId,
    formats_len: u32,
    count: u16,
}

/// Index of a byte string in [`Blobs`].
type BlobId = u32;

/// Byte strings that outlive the request that brought them: prepared statements' SQL
/// (held by the statement table, portals and events) and portals' parameters (held by
/// the portal and its Execute events). Every holder is inside the relay, so a plain
/// count does what `Arc` did without its atomic operations (which were a fifth of the
/// relay's time on prepared statements). Each holder acquires once and releases once;
/// the last frees the string, keeping small buffers for the next.
#[derive(Debug, Default)]
pub(crate) struct Blobs {
    entries: Vec<Blob>,
    free: Vec<BlobId>,
}

#[derive(Debug, Default)]
struct Blob {
    bytes: Vec<u8>,
    holders: u32,
}

impl Blobs {
    /// Stores the concatenation of `parts` with one holder.
    fn insert(&mut self, parts: [&[u8]; 2]) -> BlobId {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                // At most one entry per tracked statement and portal and per event.
                self.entries.push(Blob::default());
                (self.entries.len() - 1) as BlobId
            }
        };
        let blob = &mut self.entries[id as usize];
        blob.bytes.clear();
        for part in parts {
            extend_short(&mut blob.bytes, part);
        }
        blob.holders = 1;
        id
    }

    /// One more holder of `id`.
    fn acquire(&mut self, id: BlobId) -> BlobId {
        self.entries[id as usize].holders += 1;
        id
    }

    /// One holder fewer; the last frees the string.
    fn release(&mut self, id: BlobId) {
        let spare = self.free.len() < SPARE_BLOBS_MAX;
        let blob = &mut self.entries[id as usize];
        blob.holders -= 1;
        if blob.holders == 0 {
            if spare && blob.bytes.capacity() <= SPARE_BLOB_CAPACITY_MAX {
                blob.bytes.clear();
            } else {
                blob.bytes = Vec::new();
            }
            self.free.push(id);
        }
    }

    fn get(&self, id: BlobId) -> &[u8] {
        &self.entries[id as usize].bytes
    }

    /// Capacity of the buffers kept for reuse.
    fn spare_bytes(&self) -> usize {
        self.free
            .iter()
            .map(|&id| self.entries[id as usize].bytes.capacity())
            .sum()
    }
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

impl Step {
    /// The request has an event (and so an entry).
    fn audited(self) -> bool {
        !matches!(self, Step::Describe | Step::Sync)
    }
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

/// `true` if `bytes` holds a NUL. Names and command tags are a few bytes, SQL text is
/// longer. Up to 16 bytes are tested as two overlapping words, a few instructions where
/// a loop took one branch per byte; longer text by a loop with no early exit, which the
/// compiler turns into vector compares (a call to the `memchr` crate cost more than the
/// search itself on pgbench's statements of about 80 bytes).
#[inline]
fn has_nul(bytes: &[u8]) -> bool {
    /// A byte of `word` is zero: subtracting 1 from each byte borrows into its top bit
    /// only from a zero byte (or one whose top bit was already set, which `!word`
    /// removes). The lowest zero byte always sets its top bit, so the test is exact.
    fn has_zero_byte(word: u64) -> bool {
        word.wrapping_sub(0x0101_0101_0101_0101) & !word & 0x8080_8080_8080_8080 != 0
    }
    let len = bytes.len();
    if len > 16 {
        return bytes.iter().fold(false, |found, &b| found | (b == 0));
    }
    if let (Some(head), Some(tail)) = (bytes.first_chunk::<8>(), bytes.last_chunk::<8>()) {
        has_zero_byte(u64::from_le_bytes(*head)) || has_zero_byte(u64::from_le_bytes(*tail))
    } else if let (Some(head), Some(tail)) = (bytes.first_chunk::<4>(), bytes.last_chunk::<4>()) {
        let word =
            u64::from(u32::from_le_bytes(*head)) | u64::from(u32::from_le_bytes(*tail)) << 32;
        has_zero_byte(word)
    } else {
        // `contains` would call `memchr`, whose set-up costs more than this loop.
        #[allow(clippy::manual_contains)]
        bytes.iter().any(|&b| b == 0)
    }
}

/// Where the lone query is: a simple Query sent while no other request waited and no
/// event was left, by far the most common request (psql, pgbench's default mode, any
/// client that waits for each answer). It skips the queues: its entry is filled in
/// place and lent out from there, with its text alone in the log.
///
/// While it is not `None`, `steps` and `entries` are empty and discarding is off. Every
/// path that queues a request or an event, or reads an answer other than the lone
/// query's CommandComplete and ReadyForQuery, first moves it into the queues
/// ([`Relay::spill`]), where it goes on as any request would: the events are the same
/// either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lone {
    /// No lone query: the queues hold every request and event.
    None,
    /// Sent; answered once ReadyForQuery comes (its CommandComplete may have come).
    Waiting,
    /// Answered: the next event.
    Answered,
    /// Lent out by `poll_event_view`; dropped on the next call.
    Lent,
}

/// Where a field of an [`Entry`] is in the relay's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn shifted(self, by: u32) -> Span {
        Span {
            start: self.start.saturating_sub(by),
            end: self.end.saturating_sub(by),
        }
    }
}

/// Appends `bytes` to the log and says where they are.
#[inline]
fn push(log: &mut Vec<u8>, bytes: &[u8]) -> Span {
    let start = log.len() as u32;
    extend_short(log, bytes);
    Span {
        start,
        end: log.len() as u32,
    }
}

/// The bytes of `span`. Spans are only made by `push` on the log they are read from,
/// which is only cut back past spans no longer in use.
#[inline]
fn get(log: &[u8], span: Span) -> &[u8] {
    log.get(span.start as usize..span.end as usize)
        .unwrap_or_default()
}

/// SQL of an event: in the log (Query, Parse) or shared with the statement table (Bind,
/// Execute, Close).
#[derive(Debug, Clone, Copy)]
enum Sql {
    None,
    Copied(Span),
    Shared(BlobId),
}

/// Parameters of an event: in the log (Bind, FunctionCall) or its portal's (Execute).
#[derive(Debug, Clone, Copy)]
enum Params {
    None,
    Copied {
        formats: Span,
        values: Span,
        count: u16,
    },
    Shared(SharedParameters),
}

/// [`OutcomeView`] with its text in the log.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Succeeded(Option<Span>),
    Suspended,
    Failed { code: Span, message: Span },
    Skipped,
    Unknown,
}

impl Answer {
    /// Where its text ends in the log, if it has text.
    fn text_end(self) -> Option<u32> {
        match self {
            Answer::Succeeded(Some(tag)) => Some(tag.end),
            Answer::Failed { message, .. } => Some(message.end),
            _ => None,
        }
    }
}

/// One audited request and, once known, its answer: a fixed-size entry whose text is in
/// the relay's log (or, for SQL and parameters kept beyond one statement, in `Blobs`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    kind: EventKind,
    query: Sql,
    statement: Option<Span>,
    portal: Option<Span>,
    function: Option<u32>,
    parameters: Params,
    answer: Answer,
    /// Where its answer's text starts in the log, once it has some: a later answer (the
    /// next statement of a multi-statement Query) replaces it.
    answer_at: Option<u32>,
    /// Where its first byte in the log is; all its others come after.
    start: u32,
    /// Bytes of the log it added, counted in `Relay::pending_bytes` while it waits.
    held: u32,
}

impl Entry {
    fn new(kind: EventKind, start: usize) -> Self {
        Entry {
            kind,
            query: Sql::None,
            statement: None,
            portal: None,
            function: None,
            parameters: Params::None,
            answer: Answer::Unknown,
            answer_at: None,
            start: start as u32,
            held: 0,
        }
    }

    /// Fills in a Bind from `body`, the message `bind` was decoded from, in one copy:
    /// its portal, statement, format codes and values are one run at the start of the
    /// body (`portal\0 statement\0 count formats count values`, then the result formats,
    /// which the event does not show).
    fn set_bind(&mut self, log: &mut Vec<u8>, body: &[u8], bind: &BindView<'_>) {
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
        let all = push(log, body.get(..values_end).unwrap_or_default());
        // Offsets within one message (at most 1 GiB); the log's length is checked
        // against 32 bits by `on_audited`, so these do not saturate in practice.
        let span = |start: usize, end: usize| Span {
            start: all.start.saturating_add(start as u32),
            end: all.start.saturating_add(end as u32),
        };
        self.portal = Some(span(0, portal_end));
        self.statement = Some(span(statement_start, statement_end));
        self.parameters = Params::Copied {
            formats: span(formats_start, formats_end),
            values: span(values_start, values_end),
            count: bind.parameters.count(),
        };
    }

    /// Records the server's answer, copying its text into the log; returns the bytes
    /// the log grew (or shrank) by. An earlier answer's text is cut back when nothing
    /// came after it.
    #[inline]
    fn set_answer(&mut self, log: &mut Vec<u8>, outcome: OutcomeView<'_>) -> isize {
        let before = log.len();
        if self.answer_at.is_some() {
            self.cut_answer(log);
        }
        self.answer_at = Some(log.len() as u32);
        self.answer = match outcome {
            OutcomeView::Succeeded { tag } => Answer::Succeeded(tag.map(|t| push(log, t))),
            OutcomeView::Suspended => Answer::Suspended,
            OutcomeView::Failed { code, message } => Answer::Failed {
                code: push(log, code),
                message: push(log, message),
            },
            OutcomeView::Skipped => Answer::Skipped,
            // Nothing else is made by the relay; an unknown answer is no answer.
            _ => Answer::Unknown,
        };
        log.len() as isize - before as isize
    }

    /// Cuts the text of the answer being replaced off the log, if nothing came after it.
    #[cold]
    fn cut_answer(&self, log: &mut Vec<u8>) {
        if let Some(at) = self.answer_at
            && self.answer.text_end() == Some(log.len() as u32)
        {
            log.truncate(at as usize);
        }
    }

    /// Its spans once the first `by` bytes of the log are cut off (all of them are
    /// after `start`, which is at least `by`).
    fn shift(&mut self, by: u32) {
        let shift = |span: &mut Span| *span = span.shifted(by);
        if let Sql::Copied(span) = &mut self.query {
            shift(span);
        }
        if let Some(span) = &mut self.statement {
            shift(span);
        }
        if let Some(span) = &mut self.portal {
            shift(span);
        }
        if let Params::Copied {
            formats, values, ..
        } = &mut self.parameters
        {
            shift(formats);
            shift(values);
        }
        match &mut self.answer {
            Answer::Succeeded(Some(tag)) => shift(tag),
            Answer::Failed { code, message } => {
                shift(code);
                shift(message);
            }
            _ => {}
        }
        if let Some(at) = &mut self.answer_at {
            *at = at.saturating_sub(by);
        }
        self.start = self.start.saturating_sub(by);
    }

    /// Gives back its shares of statements' SQL and portals' parameters.
    fn release(&self, blobs: &mut Blobs) {
        if let Sql::Shared(query) = self.query {
            blobs.release(query);
        }
        if let Params::Shared(parameters) = self.parameters {
            blobs.release(parameters.blob);
        }
    }
}

/// An event's fields, found in the relay's buffers when asked for.
impl<'a> EventView<'a> {
    /// What happened.
    #[inline]
    pub fn kind(&self) -> EventKind {
        self.entry.kind
    }

    /// SQL text, when known (for Bind, Execute and Close: the prepared statement's text).
    #[inline]
    pub fn query(&self) -> Option<&'a [u8]> {
        match self.entry.query {
            Sql::None => None,
            Sql::Copied(span) => Some(get(self.log, span)),
            Sql::Shared(id) => Some(self.blobs.get(id)),
        }
    }

    /// Prepared statement name (Parse, Bind, Close of a statement); empty is unnamed.
    #[inline]
    pub fn statement(&self) -> Option<&'a [u8]> {
        self.entry.statement.map(|s| get(self.log, s))
    }

    /// Portal name (Bind, Execute, Close of a portal); empty is unnamed.
    #[inline]
    pub fn portal(&self) -> Option<&'a [u8]> {
        self.entry.portal.map(|s| get(self.log, s))
    }

    /// Function OID (FunctionCall).
    #[inline]
    pub fn function(&self) -> Option<u32> {
        self.entry.function
    }

    /// Parameter or argument values, as sent.
    #[inline]
    pub fn parameters(&self) -> ParametersView<'a> {
        match self.entry.parameters {
            Params::None => ParametersView::empty(),
            Params::Copied {
                formats,
                values,
                count,
            } => ParametersView::new(
                FormatsView::checked(get(self.log, formats)),
                ValuesView::checked(count, get(self.log, values)),
            ),
            Params::Shared(shared) => {
                let bytes = self.blobs.get(shared.blob);
                let (formats, values) =
                    bytes.split_at((shared.formats_len as usize).min(bytes.len()));
                ParametersView::new(
                    FormatsView::checked(formats),
                    ValuesView::checked(shared.count, values),
                )
            }
        }
    }

    /// The server's answer.
    #[inline]
    pub fn outcome(&self) -> OutcomeView<'a> {
        match self.entry.answer {
            Answer::Succeeded(tag) => OutcomeView::Succeeded {
                tag: tag.map(|t| get(self.log, t)),
            },
            Answer::Suspended => OutcomeView::Suspended,
            Answer::Failed { code, message } => OutcomeView::Failed {
                code: get(self.log, code),
                message: get(self.log, message),
            },
            Answer::Skipped => OutcomeView::Skipped,
            Answer::Unknown => OutcomeView::Unknown,
        }
    }
}

impl Relay {
    /// A relay for a session whose start-up and authentication are over (the agent did
    /// them itself): both directions carry tagged messages from the first byte.
    pub fn new(limits: Limits) -> Self {
        let lone_allowed = limits.pending_requests_max > 0;
        Relay {
            client: Stream::new(Direction::Frontend, false),
            server: Stream::new(Direction::Backend, false),
            limits,
            steps: VecDeque::new(),
            entries: VecDeque::new(),
            answered: 0,
            lent: false,
            lone: Entry::new(EventKind::Query, 0),
            lone_state: Lone::None,
            lone_allowed,
            log: Vec::with_capacity(LOG_FIRST),
            compact_at: LOG_COMPACT_MIN,
            pending_bytes: 0,
            discarding_until_sync: false,
            tracked: Tracked::default(),
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

    /// The same relay without the lone query's path: every request goes through the
    /// queues. For tests that the two give the same events and errors.
    pub(crate) fn without_lone_queries(mut self) -> Self {
        self.lone_allowed = false;
        self
    }

    /// Observes bytes going from client to server. Malformed bytes produce a
    /// `db.session.malformed_packet` event and an error.
    pub fn handle_client_bytes(&mut self, input: &[u8]) -> Result<(), Error> {
        if self.failed.is_some() || self.closed {
            return Err(self.unusable(Direction::Frontend));
        }
        match self.read_client(input) {
            Ok(()) => Ok(()),
            Err(error) => Err(self.client_failed(error)),
        }
    }

    /// Observes bytes going from server to client.
    pub fn handle_server_bytes(&mut self, input: &[u8]) -> Result<(), Error> {
        if self.failed.is_some() || self.closed {
            return Err(self.unusable(Direction::Backend));
        }
        match self.read_server(input) {
            Ok(()) => Ok(()),
            Err(error) => {
                self.failed = Some(error.clone());
                Err(error)
            }
        }
    }

    /// The client's bytes were malformed: the `db.session.malformed_packet` event, and
    /// the relay fails.
    #[cold]
    #[inline(never)]
    fn client_failed(&mut self, error: Error) -> Error {
        self.spill();
        let mut entry = Entry::new(EventKind::MalformedPacket, self.log.len());
        entry.set_answer(
            &mut self.log,
            OutcomeView::Failed {
                code: error.sql_state().as_str().as_bytes(),
                message: error.to_string().as_bytes(),
            },
        );
        // It comes out before the requests still waiting (`handle_close` flushes those).
        self.entries.insert(self.answered, entry);
        self.answered += 1;
        self.failed = Some(error.clone());
        error
    }

    /// Why input is refused once the relay failed or the connection closed.
    #[cold]
    #[inline(never)]
    fn unusable(&self, direction: Direction) -> Error {
        match &self.failed {
            Some(error) => error.clone(),
            None => Error::PeerMisbehaved {
                direction,
                kind: PeerMisbehaved::InputAfterEnd("connection (already closed)"),
            },
        }
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
                        self.on_client_tagged(tag, body)?;
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
                let result = match tag {
                    Some(tag) => self.on_client_tagged(tag, &body),
                    None => self.on_client_message(None, &body),
                };
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
    /// come out with an unknown outcome (or what was known so far) and, for prepared
    /// statements and portals, the SQL they name. Later input is an error.
    pub fn handle_close(&mut self) {
        if self.closed {
            return;
        }
        self.spill();
        self.closed = true;
        // What the requests still waiting would have done to the statements and
        // portals is applied in order, as if they succeeded, so that the events of a
        // batch cut in flight still show their SQL: an Execute whose Parse was never
        // answered names the statement's text, not nothing.
        let audited = self.steps.iter().filter(|step| step.audited());
        for (index, &step) in (self.answered..).zip(audited) {
            if let Some(entry) = self.entries.get_mut(index) {
                // A limit reached here only leaves that event without its SQL.
                let _ = self
                    .tracked
                    .on_complete(step, true, entry, &self.log, &self.limits);
            }
        }
        self.steps.clear();
        self.answered = self.entries.len();
        self.pending_bytes = 0;
    }

    /// Bytes the relay holds right now: message buffers, the log of pending requests and
    /// events, tracked statements and portals, and buffers kept for reuse. Bounded by the
    /// limits, whatever the size of results streaming by.
    pub fn held_bytes(&self) -> usize {
        self.client.buf.capacity()
            + self.server.buf.capacity()
            + self.log.capacity()
            + self.tracked.held_bytes()
            + self.tracked.blobs.spare_bytes()
    }

    /// How many more bytes from the server may be relayed without passing the end of
    /// the message under way: 0 between two messages, `None` once the relay failed
    /// (where messages end is then unknown). For a driver that must stop between two
    /// messages (to send its own ErrorResponse) without counting them a second time.
    pub fn server_bytes_to_boundary(&self) -> Option<usize> {
        if self.failed.is_some() {
            return None;
        }
        Some(self.server.to_boundary())
    }

    /// The next audit event, borrowed from the relay until the next call; `None` when
    /// there is none. Drain after every `handle_*` call.
    #[inline]
    pub fn poll_event_view(&mut self) -> Option<EventView<'_>> {
        if self.lent {
            self.lent = false;
            self.drop_event();
        }
        // A lone query's event (there is no other), or its lent event to drop. One
        // waiting for its answer has none yet, as the queues have none answered.
        if self.lone_state == Lone::Answered {
            self.lone_state = Lone::Lent;
            return Some(EventView {
                entry: &self.lone,
                log: &self.log,
                blobs: &self.tracked.blobs,
            });
        }
        if self.lone_state == Lone::Lent {
            self.lone_state = Lone::None;
            self.clear_log();
            return None;
        }
        if self.answered == 0 {
            return None;
        }
        let entry = self.entries.front()?;
        self.lent = true;
        Some(EventView {
            entry,
            log: &self.log,
            blobs: &self.tracked.blobs,
        })
    }

    /// The next audit event, owned (text converted, parameters rendered): what
    /// [`Relay::poll_event_view`] lends, copied.
    pub fn poll_event(&mut self) -> Option<AuditEvent> {
        self.poll_event_view().map(|event| event.to_owned())
    }

    /// Drops the oldest event. The log is emptied when nothing is left in it, and
    /// compacted when a pipeline that never drains has made it long.
    fn drop_event(&mut self) {
        if let Some(entry) = self.entries.pop_front() {
            self.answered -= 1;
            entry.release(&mut self.tracked.blobs);
        }
        if self.entries.is_empty() {
            self.clear_log();
        } else if self.log.len() >= self.compact_at {
            self.compact_log();
        }
    }

    /// Empties the log, which no entry uses any more; a long one gives its memory back.
    #[inline]
    fn clear_log(&mut self) {
        if self.log.capacity() > LOG_RETAIN_MAX {
            self.log = Vec::new();
        } else {
            self.log.clear();
        }
    }

    /// Cuts off the front of the log that no entry uses any more.
    #[cold]
    fn compact_log(&mut self) {
        let live = self.entries.iter().map(|e| e.start).min().unwrap_or(0);
        if live > 0 {
            self.log.drain(..live as usize);
            for entry in &mut self.entries {
                entry.shift(live);
            }
        }
        self.compact_at = (2 * self.log.len()).max(LOG_COMPACT_MIN);
    }

    /// A whole client message. The messages of every statement (Query; Bind, Describe,
    /// Execute, Sync) are handled straight from their bytes, in exactly the shapes the
    /// decoder accepts (Bind by its own part of the decoder), each by a small function;
    /// anything else, and these when malformed, goes through the decoder and gets its
    /// error.
    #[inline(always)]
    fn on_client_tagged(&mut self, tag: u8, body: &[u8]) -> Result<(), Error> {
        match (tag, body) {
            (frontend::tag::SYNC, []) => {
                self.discarding_until_sync = false;
                self.on_unaudited(Step::Sync)
            }
            (frontend::tag::DESCRIBE, [b'S' | b'P', name @ .., 0]) if !has_nul(name) => {
                self.on_unaudited(Step::Describe)
            }
            (frontend::tag::QUERY, [query @ .., 0]) if !has_nul(query) => {
                if self.send_lone(query) {
                    Ok(())
                } else {
                    self.on_query(query)
                }
            }
            (frontend::tag::BIND, _) => self.on_bind(body),
            (frontend::tag::EXECUTE, [portal @ .., 0, _, _, _, _]) if !has_nul(portal) => {
                self.on_execute(portal)
            }
            _ => self.on_client_message(Some(tag), body),
        }
    }

    /// Takes a simple Query as the lone query if it can be one: nothing else waits, no
    /// event is left, and it is within the pending limits (else the queues refuse it).
    #[inline(always)]
    fn send_lone(&mut self, query: &[u8]) -> bool {
        let idle = self.lone_state == Lone::None
            && self.steps.is_empty()
            && self.entries.is_empty()
            && !self.discarding_until_sync;
        if !idle || !self.lone_allowed || query.len() > self.limits.pending_bytes_max {
            return false;
        }
        // No entry is left, so neither is any text.
        debug_assert!(self.log.is_empty());
        self.lone.query = Sql::Copied(push(&mut self.log, query));
        self.lone.answer = Answer::Unknown;
        self.lone.answer_at = None;
        self.lone_state = Lone::Waiting;
        true
    }

    #[inline(never)]
    fn on_query(&mut self, query: &[u8]) -> Result<(), Error> {
        self.spill();
        let mut entry = Entry::new(EventKind::Query, self.log.len());
        entry.query = Sql::Copied(push(&mut self.log, query));
        self.on_audited(Step::Query, entry)
    }

    #[inline(never)]
    fn on_bind(&mut self, body: &[u8]) -> Result<(), Error> {
        self.spill();
        let bind = BindView::decode(body)
            .map_err(|kind| Error::invalid(Direction::Frontend, Some(frontend::tag::BIND), kind))?;
        let mut entry = Entry::new(EventKind::PostgresBind, self.log.len());
        entry.set_bind(&mut self.log, body, &bind);
        self.on_audited(Step::Bind, entry)
    }

    #[inline(never)]
    fn on_execute(&mut self, portal: &[u8]) -> Result<(), Error> {
        self.spill();
        let mut entry = Entry::new(EventKind::PostgresExecute, self.log.len());
        entry.portal = Some(push(&mut self.log, portal));
        self.on_audited(Step::Execute, entry)
    }

    /// Untagged start-up packets, and tagged messages off the statement path.
    #[inline(never)]
    fn on_client_message(&mut self, tag: Option<u8>, body: &[u8]) -> Result<(), Error> {
        let Some(tag) = tag else {
            // Checked as the decoder does, without copying out the parameters.
            let head = PacketHead::read(body, |_, _| {})
                .map_err(|kind| Error::invalid(Direction::Frontend, None, kind))?;
            return match head {
                PacketHead::Startup(_) => Ok(()),
                PacketHead::Cancel { .. } => {
                    self.client_ended = true;
                    Ok(())
                }
                _ => Err(Error::frontend(PeerMisbehaved::UnexpectedMessage {
                    tag: None,
                    state: "(encryption request) in a relayed plaintext session",
                })),
            };
        };
        self.spill();
        let start = self.log.len();
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
        let mut entry = Entry::new(kind, start);
        let log = &mut self.log;
        match message {
            MessageView::Query(query) => entry.query = Sql::Copied(push(log, query)),
            MessageView::Parse(parse) => {
                entry.statement = Some(push(log, parse.name));
                entry.query = Sql::Copied(push(log, parse.query));
            }
            MessageView::Bind(bind) => entry.set_bind(log, body, &bind),
            MessageView::Execute { portal, .. } => entry.portal = Some(push(log, portal)),
            MessageView::Close(TargetView::Statement(name)) => {
                entry.statement = Some(push(log, name));
            }
            MessageView::Close(TargetView::Portal(name)) => entry.portal = Some(push(log, name)),
            MessageView::FunctionCall(call) => {
                entry.function = Some(call.function);
                entry.parameters = Params::Copied {
                    formats: push(log, call.argument_formats.bytes()),
                    values: push(log, call.arguments.bytes()),
                    count: call.arguments.count(),
                };
            }
            _ => {}
        }
        self.on_audited(step, entry)
    }

    /// An audited request, its bytes in the log: queued for the server's answer.
    fn on_audited(&mut self, step: Step, mut entry: Entry) -> Result<(), Error> {
        debug_assert_eq!(
            self.lone_state,
            Lone::None,
            "spilled before the entry's text"
        );
        if self.discarding_until_sync {
            // The server reads and drops it: audit it as never run. Nothing else waits
            // (the error answered every request up to the Sync not yet sent), so it is
            // next in line.
            entry.answer = Answer::Skipped;
            self.entries.push_back(entry);
            self.answered = self.entries.len();
            return Ok(());
        }
        let held = self.log.len() - entry.start as usize;
        let result = if self.log.len() > u32::MAX as usize {
            // The log's spans are 32-bit: far beyond any sane `pending_bytes_max`.
            Err(Error::limit(
                Limit::PendingBytes,
                self.log.len(),
                u32::MAX as usize,
            ))
        } else {
            self.push_step(step, held)
        };
        match result {
            Ok(()) => {
                entry.held = held as u32;
                self.entries.push_back(entry);
                Ok(())
            }
            Err(error) => {
                self.log.truncate(entry.start as usize);
                Err(error)
            }
        }
    }

    /// A request with no event (Describe, Sync): only its place in the queue.
    fn on_unaudited(&mut self, step: Step) -> Result<(), Error> {
        self.spill();
        if self.discarding_until_sync {
            return Ok(());
        }
        self.push_step(step, 0)
    }

    #[inline]
    fn push_step(&mut self, step: Step, held: usize) -> Result<(), Error> {
        let bytes = self.pending_bytes + held;
        if self.steps.len() >= self.limits.pending_requests_max
            || bytes > self.limits.pending_bytes_max
        {
            return Err(self.pending_limit(bytes));
        }
        self.pending_bytes = bytes;
        self.steps.push_back(step);
        Ok(())
    }

    #[cold]
    fn pending_limit(&self, bytes: usize) -> Error {
        let max = self.limits.pending_requests_max;
        if self.steps.len() >= max {
            Error::limit(Limit::PendingRequests, self.steps.len() + 1, max)
        } else {
            Error::limit(Limit::PendingBytes, bytes, self.limits.pending_bytes_max)
        }
    }

    /// Moves the lone query, if there is one, into the queues.
    #[inline(always)]
    fn spill(&mut self) {
        if self.lone_state != Lone::None {
            self.spill_lone();
        }
    }

    /// Moves the lone query into the queues, as the request, event or lent event it is.
    #[cold]
    #[inline(never)]
    fn spill_lone(&mut self) {
        debug_assert!(self.steps.is_empty() && self.entries.is_empty());
        match std::mem::replace(&mut self.lone_state, Lone::None) {
            Lone::None => {}
            Lone::Waiting => {
                let held = self.log.len();
                self.lone.held = held as u32;
                self.pending_bytes = held;
                self.steps.push_back(Step::Query);
                self.entries.push_back(self.lone);
            }
            Lone::Answered => {
                self.entries.push_back(self.lone);
                self.answered = 1;
            }
            Lone::Lent => {
                // Dropped on the next `poll_event_view`, as any event lent out.
                self.entries.push_back(self.lone);
                self.answered = 1;
                self.lent = true;
            }
        }
    }

    /// Takes the front step off the queue; an audited one's entry becomes an event.
    fn pop_step(&mut self) -> Option<Step> {
        let step = self.steps.pop_front()?;
        if step.audited()
            && let Some(entry) = self.entries.get(self.answered)
        {
            self.pending_bytes = self.pending_bytes.saturating_sub(entry.held as usize);
            self.answered += 1;
        }
        Some(step)
    }

    fn front_step(&self) -> Option<Step> {
        self.steps.front().copied()
    }

    /// Server messages the relay does not read whole still move the Describe step on.
    #[inline(always)]
    fn on_server_skipped(&mut self, tag: u8) {
        if matches!(tag, backend::tag::ROW_DESCRIPTION | backend::tag::NO_DATA)
            && self.front_step() == Some(Step::Describe)
        {
            self.steps.pop_front();
        }
    }

    /// A whole server message read for the audit. The answers on every statement's path
    /// (no body, a one-byte status, a command tag) are handled straight from their bytes,
    /// each by a small function; the rest, and these when malformed, go through the
    /// decoder.
    #[inline(always)]
    fn on_server_frame(&mut self, tag: u8, body: &[u8]) -> Result<(), Error> {
        use backend::tag::*;
        match (tag, body) {
            // One per statement: read borrowed, the tag is copied into the event.
            (COMMAND_COMPLETE, [command_tag @ .., 0]) if !has_nul(command_tag) => {
                if self.lone_state == Lone::Waiting {
                    // A later statement's tag replaces an earlier one's, as in `record`.
                    self.lone
                        .set_answer(&mut self.log, succeeded(Some(command_tag)));
                    Ok(())
                } else {
                    self.on_command_done(Some(command_tag))
                }
            }
            (BIND_COMPLETE, []) => self.on_bind_complete(),
            (READY_FOR_QUERY, [status @ (b'I' | b'T' | b'E')]) => {
                if self.lone_state == Lone::Waiting {
                    self.lone_state = Lone::Answered;
                    if *status == b'I' {
                        self.tracked.clear_portals();
                    }
                } else {
                    self.on_ready(*status == b'I');
                }
                Ok(())
            }
            _ => self.on_server_other(tag, body),
        }
    }

    #[inline(never)]
    fn on_server_other(&mut self, tag: u8, body: &[u8]) -> Result<(), Error> {
        use backend::tag::*;
        self.spill();
        match (tag, body) {
            (COMMAND_COMPLETE, _) => {
                let command_tag = backend::command_tag(body)?;
                self.on_command_done(Some(command_tag))
            }
            (PARSE_COMPLETE, []) => self.complete(Step::Parse, succeeded(None)),
            (CLOSE_COMPLETE, []) => self.complete(Step::Close, succeeded(None)),
            _ => BackendMessage::decode(Frame { tag, body })
                .and_then(|message| self.on_server_message(message)),
        }
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
                self.on_ready(status == backend::TransactionStatus::Idle);
                Ok(())
            }
            // Nothing else is read whole (see `keep_backend`).
            _ => Ok(()),
        }
    }

    #[inline]
    fn on_command_done(&mut self, tag: Option<&[u8]>) -> Result<(), Error> {
        self.spill();
        match self.front_step() {
            Some(Step::Execute) => self.on_execute_complete(tag),
            _ => self.on_query_done(tag),
        }
    }

    /// CommandComplete of a simple Query: `record`, specialised.
    #[inline(never)]
    fn on_query_done(&mut self, tag: Option<&[u8]>) -> Result<(), Error> {
        self.record(Step::Query, succeeded(tag))
    }

    /// Notes the outcome of a Query or FunctionCall, which ends at ReadyForQuery.
    #[inline(always)]
    fn record(&mut self, step: Step, outcome: OutcomeView<'_>) -> Result<(), Error> {
        if self.front_step() != Some(step) {
            return Err(unexpected_answer(step));
        }
        let Some(entry) = self.entries.get_mut(self.answered) else {
            return Err(unexpected_answer(step));
        };
        // The answer's text is held as long as the request waits.
        let grown = entry.set_answer(&mut self.log, outcome);
        entry.held = (entry.held as isize + grown).max(0) as u32;
        self.pending_bytes = (self.pending_bytes as isize + grown).max(0) as usize;
        Ok(())
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

    /// ReadyForQuery; `idle`: outside a transaction.
    #[inline(never)]
    fn on_ready(&mut self, idle: bool) {
        self.spill();
        // ReadyForQuery ends a Query, a FunctionCall or a Sync batch. Anything still in
        // front of it got no answer (cannot happen with a conforming server) and comes
        // out as it is.
        while let Some(step) = self.pop_step() {
            if matches!(step, Step::Query | Step::Function | Step::Sync) {
                break;
            }
        }
        if idle {
            // Portals live until the end of the transaction.
            self.tracked.clear_portals();
        }
    }

    /// BindComplete: `complete`, specialised.
    #[inline(never)]
    fn on_bind_complete(&mut self) -> Result<(), Error> {
        self.spill();
        self.complete(Step::Bind, succeeded(None))
    }

    /// CommandComplete of an Execute: `complete`, specialised.
    #[inline(never)]
    fn on_execute_complete(&mut self, tag: Option<&[u8]>) -> Result<(), Error> {
        self.complete(Step::Execute, succeeded(tag))
    }

    /// Pops the front request, which must be waiting for `step`, and makes its event.
    /// Inlined so that each caller that knows its step gets only that step's code.
    #[inline(always)]
    fn complete(&mut self, step: Step, outcome: OutcomeView<'_>) -> Result<(), Error> {
        if self.front_step() != Some(step) {
            return Err(unexpected_answer(step));
        }
        if !step.audited() {
            // Describe has no event: nothing to record or track.
            self.steps.pop_front();
            return Ok(());
        }
        let index = self.answered;
        let Some(entry) = self.entries.get_mut(index) else {
            return Err(unexpected_answer(step));
        };
        let ok = matches!(
            outcome,
            OutcomeView::Succeeded { .. } | OutcomeView::Suspended
        );
        let tracked = self
            .tracked
            .on_complete(step, ok, entry, &self.log, &self.limits);
        self.pop_step();
        if let Err(error) = tracked {
            // The relay fails: the request goes unaudited, as the session ends.
            self.answered -= 1;
            if let Some(entry) = self.entries.remove(index) {
                entry.release(&mut self.tracked.blobs);
            }
            return Err(error);
        }
        if let Some(entry) = self.entries.get_mut(index) {
            entry.set_answer(&mut self.log, outcome);
        }
        Ok(())
    }
}

/// Prepared statements and portals the server confirmed, for the SQL and parameters of
/// later Bind, Execute and Close events.
#[derive(Debug, Default)]
struct Tracked {
    /// Prepared statements: name -> SQL.
    statements: Named<BlobId>,
    /// Portals: name -> SQL and parameters.
    portals: Named<Portal>,
    /// Bytes of SQL and parameters held by both.
    bytes: usize,
    /// The SQL of statements and the parameters of portals: each holder has one count.
    blobs: Blobs,
}

impl Tracked {
    /// Notes what the request of `entry`, which the server answered, did to the
    /// statements and portals, and fills in the entry's SQL (and, for Execute, its
    /// portal's parameters).
    #[inline(always)]
    fn on_complete(
        &mut self,
        step: Step,
        ok: bool,
        entry: &mut Entry,
        log: &[u8],
        limits: &Limits,
    ) -> Result<(), Error> {
        match (step, entry.statement, entry.portal) {
            (Step::Parse, Some(name), _) if ok => {
                let query = match entry.query {
                    Sql::Copied(span) => get(log, span),
                    _ => &[],
                };
                let query = self.blobs.insert([query, &[]]);
                self.track_statement(get(log, name), query, limits)?;
            }
            (Step::Bind, Some(statement), Some(name)) => {
                let query = self.statements.get(get(log, statement)).copied();
                if ok {
                    let parameters = match entry.parameters {
                        Params::Copied {
                            formats,
                            values,
                            count,
                        } if count > 0 => Some(SharedParameters {
                            blob: self.blobs.insert([get(log, formats), get(log, values)]),
                            formats_len: formats.end - formats.start,
                            count,
                        }),
                        _ => None,
                    };
                    let portal = Portal {
                        query: query.map(|q| self.blobs.acquire(q)),
                        parameters,
                    };
                    self.track_portal(get(log, name), portal, limits)?;
                }
                entry.query = self.share(query);
            }
            (Step::Execute, _, Some(name)) => {
                if let Some(&portal) = self.portals.get(get(log, name)) {
                    if let Some(parameters) = portal.parameters {
                        self.blobs.acquire(parameters.blob);
                        entry.parameters = Params::Shared(parameters);
                    }
                    entry.query = self.share(portal.query);
                }
            }
            (Step::Close, Some(name), _) => {
                let name = get(log, name);
                let query = self.statements.get(name).copied();
                entry.query = self.share(query);
                if ok && let Some(query) = self.statements.remove(name) {
                    self.bytes = self.bytes.saturating_sub(self.blobs.get(query).len());
                    self.blobs.release(query);
                }
            }
            (Step::Close, _, Some(name)) => {
                let name = get(log, name);
                let query = self.portals.get(name).and_then(|p| p.query);
                entry.query = self.share(query);
                if ok && let Some(portal) = self.portals.remove(name) {
                    self.drop_portal(portal);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// An event's share of a statement's SQL, if there is one.
    fn share(&mut self, query: Option<BlobId>) -> Sql {
        match query {
            Some(query) => Sql::Shared(self.blobs.acquire(query)),
            None => Sql::None,
        }
    }

    /// Forgets a portal: its bytes, its shares of SQL and parameters.
    fn drop_portal(&mut self, portal: Portal) {
        self.bytes = self.bytes.saturating_sub(portal.held_bytes(&self.blobs));
        self.release_portal(portal);
    }

    fn release_portal(&mut self, portal: Portal) {
        if let Some(query) = portal.query {
            self.blobs.release(query);
        }
        if let Some(parameters) = portal.parameters {
            self.blobs.release(parameters.blob);
        }
    }

    /// Tracks a statement the server confirmed; `query` is the table's share of its SQL
    /// (released if the statement cannot be tracked).
    fn track_statement(
        &mut self,
        name: &[u8],
        query: BlobId,
        limits: &Limits,
    ) -> Result<(), Error> {
        if let Some(old) = self.statements.remove(name) {
            self.bytes = self.bytes.saturating_sub(self.blobs.get(old).len());
            self.blobs.release(old);
        }
        let len = self.blobs.get(query).len();
        if let Err(e) = self.check(len, limits) {
            self.blobs.release(query);
            return Err(e);
        }
        self.bytes += len;
        self.statements.insert(name, query);
        Ok(())
    }

    /// Tracks a portal the server confirmed, replacing any of that name; its shares
    /// are released if it cannot be tracked.
    fn track_portal(&mut self, name: &[u8], portal: Portal, limits: &Limits) -> Result<(), Error> {
        if let Some(old) = self.portals.remove(name) {
            self.drop_portal(old);
        }
        let held = portal.held_bytes(&self.blobs);
        if let Err(error) = self.check(held, limits) {
            self.release_portal(portal);
            return Err(error);
        }
        self.bytes += held;
        self.portals.insert(name, portal);
        Ok(())
    }

    /// Forgets every portal (the transaction ended).
    fn clear_portals(&mut self) {
        if self.portals.scanned.is_empty() && self.portals.named.is_empty() {
            // Only the unnamed portal, if any: the usual case, after each statement.
            if let Some(portal) = self.portals.unnamed.take() {
                self.drop_portal(portal);
            }
            return;
        }
        // Taken out whole: its memory for named portals goes with it.
        let portals = std::mem::take(&mut self.portals);
        for &portal in portals.values() {
            self.drop_portal(portal);
        }
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

    /// Bytes of SQL and parameters held.
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

    /// Bytes up to the end of the message under way (0 between messages): the rest of
    /// its header, or of its body.
    fn to_boundary(&self) -> usize {
        match &self.body {
            Some(body) => body.remaining,
            None if self.header_filled > 0 => {
                let header_len = if self.untagged {
                    STARTUP_LENGTH_LEN
                } else {
                    HEADER_LEN
                };
                header_len.saturating_sub(self.header_filled)
            }
            None => 0,
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

    // Goal: a simple Query sent while nothing waits takes the lone query's path (no
    // queue holds it, before or after its answer); a second request sent before its
    // answer moves it into the queues, ahead of the second. (That both paths give the
    // same events is tests/lone_query.rs.)
    #[test]
    fn lone_query_path_is_taken_and_left() {
        let mut relay = Relay::new(Limits::default());
        let query = |sql: &str| client(&[FrontendMessage::Query(sql.into())]);
        let answer = |tag: &str| {
            server(&[
                BackendMessage::CommandComplete(tag.into()),
                BackendMessage::ready_for_query(TransactionStatus::Idle),
            ])
        };
        let sql = |event: Option<AuditEvent>| event.and_then(|e| e.query).map(|q| q.to_string());

        relay
            .handle_client_bytes(&query("select 1"))
            .expect("valid");
        assert_eq!(relay.lone_state, Lone::Waiting);
        assert!(relay.steps.is_empty() && relay.entries.is_empty());
        relay
            .handle_server_bytes(&answer("SELECT 1"))
            .expect("valid");
        assert_eq!(relay.lone_state, Lone::Answered);
        assert_eq!(sql(relay.poll_event()), Some("select 1".into()));
        assert_eq!(relay.poll_event(), None);
        assert_eq!(relay.lone_state, Lone::None);
        assert!(relay.log.is_empty());

        relay
            .handle_client_bytes(&[query("select 2"), query("select 3")].concat())
            .expect("valid");
        assert_eq!((relay.lone_state, relay.steps.len()), (Lone::None, 2));
        relay
            .handle_server_bytes(&[answer("SELECT 2"), answer("SELECT 3")].concat())
            .expect("valid");
        assert_eq!(sql(relay.poll_event()), Some("select 2".into()));
        assert_eq!(sql(relay.poll_event()), Some("select 3".into()));
        assert_eq!(relay.poll_event(), None);
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

    // Goal: the word-at-a-time NUL test agrees with a byte loop for every length up to
    // and past its 16-byte limit, a NUL anywhere, and the bytes that trip naive word
    // tests (0x01 and 0x80 next to a NUL, 0xff everywhere).
    #[test]
    fn has_nul_agrees_with_a_byte_loop() {
        for len in 0..=40 {
            for fill in [b'a', 0x01, 0x80, 0x81, 0xff] {
                let mut bytes = vec![fill; len];
                assert!(!has_nul(&bytes), "len {len} fill {fill:#x}");
                for at in 0..len {
                    bytes[at] = 0;
                    assert!(has_nul(&bytes), "len {len} fill {fill:#x} NUL at {at}");
                    if at + 1 < len {
                        bytes[at + 1] = 0x01;
                        assert!(has_nul(&bytes), "len {len} NUL at {at}, 0x01 after");
                        bytes[at + 1] = fill;
                    }
                    bytes[at] = fill;
                }
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

    // Goal: a client that always has a request waiting (the next one is sent before the
    // last is answered, so the queue never drains and the log is never emptied) does not
    // make the log grow: its dead front is cut off, and every event still shows its own
    // SQL.
    #[test]
    fn log_is_compacted_when_the_pipeline_never_drains() {
        let mut relay = Relay::new(Limits::default());
        let query = |i: usize| format!("select {i} /* {} */", "x".repeat(i % 97));
        relay
            .handle_client_bytes(&client(&[FrontendMessage::Query(query(0).into_bytes())]))
            .expect("valid request");
        let mut longest = 0;
        for i in 1..20_000 {
            relay
                .handle_client_bytes(&client(&[FrontendMessage::Query(query(i).into_bytes())]))
                .expect("valid request");
            relay
                .handle_server_bytes(&server(&[
                    BackendMessage::CommandComplete(b"SELECT 1".to_vec()),
                    BackendMessage::ReadyForQuery(TransactionStatus::Idle),
                ]))
                .expect("valid answer");
            longest = longest.max(relay.log.len());
            let event = relay
                .poll_event_view()
                .expect("the last query was answered");
            assert_eq!(event.query(), Some(query(i - 1).as_bytes()));
            assert_eq!(
                event.outcome(),
                OutcomeView::Succeeded {
                    tag: Some(b"SELECT 1")
                }
            );
            assert!(relay.poll_event_view().is_none());
            assert_eq!(relay.entries.len(), 1, "the query just sent waits");
        }
        assert!(
            longest >= LOG_COMPACT_MIN,
            "the log was never long: {longest}"
        );
        assert!(
            longest <= 2 * LOG_COMPACT_MIN + 256,
            "log of {longest} bytes"
        );
    }

    // Goal: a simple query holding many statements keeps only its last answer's text
    // (each CommandComplete replaces the one before), so its memory does not grow with
    // the number of statements.
    #[test]
    fn later_answers_replace_earlier_ones() {
        let mut relay = Relay::new(Limits::default());
        relay
            .handle_client_bytes(&client(&[FrontendMessage::Query(
                b"insert into t values (1); /* ... 10,000 times */".to_vec(),
            )]))
            .expect("valid request");
        for i in 0..10_000 {
            relay
                .handle_server_bytes(&server(&[BackendMessage::CommandComplete(
                    format!("INSERT 0 {i}").into_bytes(),
                )]))
                .expect("valid answer");
            assert!(relay.log.len() < 128, "log of {} bytes", relay.log.len());
            assert!(
                relay.pending_bytes < 128,
                "{} bytes pending",
                relay.pending_bytes
            );
        }
        relay
            .handle_server_bytes(&server(&[BackendMessage::ReadyForQuery(
                TransactionStatus::Idle,
            )]))
            .expect("valid answer");
        let event = relay.poll_event_view().expect("answered");
        assert_eq!(
            event.outcome(),
            OutcomeView::Succeeded {
                tag: Some(b"INSERT 0 9999")
            }
        );
        assert_eq!(relay.pending_bytes, 0);
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
                    event.kind() == EventKind::PostgresClose || event.query().is_some(),
                    "{event:?}"
                );
                events += 1;
            }
            assert_eq!(events, 6);
        }
        // Three statements are still prepared; nothing else holds SQL or parameters.
        let blobs = &relay.tracked.blobs;
        let held: Vec<u32> = blobs.entries.iter().map(|e| e.holders).collect();
        assert_eq!(held.iter().filter(|&&h| h > 0).count(), 3, "{held:?}");
        assert!(held.iter().all(|&h| h <= 1), "{held:?}");
        assert!(blobs.entries.len() <= 16, "{} entries", blobs.entries.len());
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
        let blobs = &relay.tracked.blobs;
        assert!(
            blobs
                .entries
                .iter()
                .all(|e| e.holders == 0 && e.bytes.is_empty())
        );
        assert_eq!(blobs.free.len(), blobs.entries.len());
        assert_eq!(relay.tracked.bytes, 0);
        // Nothing waits and every event was taken: the log is empty.
        assert!(relay.entries.is_empty() && relay.steps.is_empty());
        assert!(relay.log.is_empty());
    }
}

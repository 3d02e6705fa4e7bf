//! The agent's relay: bytes pass through unchanged while it turns them into audit events.
//!
//! The relay only observes. The driver reads a chunk from one side, hands it to
//! [`Relay::handle_client_bytes`] or [`Relay::handle_server_bytes`], forwards the same chunk
//! to the other side if that returned `Ok`, and drains [`Relay::poll_event`]. On `Err` the
//! driver ends the session (sending the client [`Error::to_error_response`] if it can);
//! the relay stays failed.
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
//! [`Outcome`]. [`Relay::handle_close`] flushes the requests still waiting, as
//! [`Outcome::Unknown`], so that no request goes unaudited.
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
//! let event = relay.poll_event().expect("the query was answered");
//! assert_eq!((event.name(), event.code()), ("db.session.query", "TDB02I"));
//! assert_eq!(event.query.as_deref(), Some("select 1"));
//! # Ok::<(), postern_pg::Error>(())
//! ```

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use base64::Engine as _;

use crate::audit::{AuditEvent, EventKind, Outcome, Parameters};
use crate::backend::{self, BackendMessage};
use crate::error::{Direction, Error, InvalidMessage, Limit, PeerMisbehaved};
use crate::frame::{self, Frame, HEADER_LEN, STARTUP_HEADER_LEN};
use crate::frontend::{
    self, Format, FormatsView, MessageView, StartupRequest, TargetView, ValuesView,
};
use crate::limits::Limits;

/// A buffer kept between messages is given back to the allocator above this size, so one
/// large query does not pin its memory for the rest of the session.
const BUFFER_RETAIN_MAX: usize = 64 << 10;

/// The length word that starts an untagged start-up packet.
const STARTUP_LENGTH_LEN: usize = 4;

/// Agent-side relay state machine. See the module documentation.
#[derive(Debug)]
pub struct Relay {
    limits: Limits,
    client: Stream,
    server: Stream,
    /// Requests sent, oldest first, waiting for the server's answer: what each waits for
    /// and whether it has an event in `waiting`.
    pending: VecDeque<(Step, bool)>,
    /// The events of the audited ones, in the same order, with the bytes each was counted
    /// for in `pending_bytes`: kept apart so that the requests without one (Describe,
    /// Sync) move no event around.
    waiting: VecDeque<(Waiting, usize)>,
    pending_bytes: usize,
    /// The server reported an error in an extended-protocol batch and discards every
    /// message until the client's next Sync.
    discarding_until_sync: bool,
    /// Prepared statements the server confirmed: name -> SQL.
    statements: Named<Arc<str>>,
    /// Portals the server confirmed: name -> SQL and parameters.
    portals: Named<Portal>,
    tracked_bytes: usize,
    /// Events ready for `poll_event`. Boxed from the request on: an event is moved
    /// several times on its way out, and a pointer moves cheaper than ~150 bytes.
    events: VecDeque<Box<AuditEvent>>,
    /// Terminate or CancelRequest seen: the client may send nothing more.
    client_ended: bool,
    closed: bool,
    failed: Option<Error>,
}

/// Prepared statements or portals by name. The unnamed one ("") is by far the most used
/// (every pgbench -M extended query, most drivers' one-shot queries) and gets its own
/// slot, which keeps hashing off the common path.
#[derive(Debug)]
struct Named<T> {
    unnamed: Option<T>,
    named: HashMap<Vec<u8>, T>,
}

impl<T> Default for Named<T> {
    fn default() -> Self {
        Named {
            unnamed: None,
            named: HashMap::new(),
        }
    }
}

impl<T> Named<T> {
    fn get(&self, name: &[u8]) -> Option<&T> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: T) {
        if name.is_empty() {
            self.unnamed = Some(value);
        } else {
            self.named.insert(name, value);
        }
    }

    fn remove(&mut self, name: &[u8]) -> Option<T> {
        if name.is_empty() {
            self.unnamed.take()
        } else {
            self.named.remove(name)
        }
    }

    fn len(&self) -> usize {
        self.named.len() + usize::from(self.unnamed.is_some())
    }

    fn values(&self) -> impl Iterator<Item = &T> {
        self.unnamed.iter().chain(self.named.values())
    }

    /// Forgets every entry; memory held for named ones is given back.
    fn clear(&mut self) {
        self.unnamed = None;
        if !self.named.is_empty() {
            self.named = HashMap::new();
        }
    }
}

#[derive(Debug)]
struct Portal {
    /// Shared with the statement table: one copy of the SQL however many portals.
    query: Option<Arc<str>>,
    parameters: Parameters,
}

impl Portal {
    fn held_bytes(&self) -> usize {
        self.query.as_ref().map_or(0, |q| q.len())
            + self
                .parameters
                .iter()
                .map(|p| p.as_ref().map_or(0, String::len))
                .sum::<usize>()
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

/// An audited request waiting for the server's answer.
#[derive(Debug)]
struct Waiting {
    event: Box<AuditEvent>,
    /// The raw bytes of the statement named (Parse, Bind, Close of a statement) and of the
    /// portal named (Bind, Execute, Close of a portal) when they are not valid UTF-8: the
    /// event holds lossy UTF-8, and names that differ only in invalid bytes must not be
    /// confused in the audit. Valid names (the usual case) are the event's text.
    statement_raw: Option<Vec<u8>>,
    portal_raw: Option<Vec<u8>>,
}

/// A request going on or coming off the queue: its step and, when audited, its event.
#[derive(Debug)]
struct Pending {
    step: Step,
    waiting: Option<Waiting>,
}

impl Waiting {
    fn new(event: Box<AuditEvent>) -> Self {
        Waiting {
            event,
            statement_raw: None,
            portal_raw: None,
        }
    }
}

/// The name a request refers to, as raw bytes: `raw` when set, else the event's text.
fn name_bytes<'a>(raw: &'a Option<Vec<u8>>, text: &'a Option<String>) -> Option<&'a [u8]> {
    raw.as_deref().or(text.as_deref().map(str::as_bytes))
}

/// A name for the event (lossy UTF-8), and its raw bytes when the text does not stand for
/// them.
fn name_text(bytes: &[u8]) -> (String, Option<Vec<u8>>) {
    match std::str::from_utf8(bytes) {
        Ok(name) => (name.to_owned(), None),
        Err(_) => (text(bytes), Some(bytes.to_vec())),
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
            waiting: VecDeque::new(),
            pending_bytes: 0,
            discarding_until_sync: false,
            statements: Named::default(),
            portals: Named::default(),
            tracked_bytes: 0,
            events: VecDeque::new(),
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
            let mut event = AuditEvent::new(EventKind::MalformedPacket);
            event.outcome = Outcome::Failed {
                code: error.sql_state().as_str().to_owned(),
                message: error.to_string(),
            };
            self.events.push_back(Box::new(event));
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
            if let Some(Whole { tag, body }) =
                self.client.whole_message(&mut input, &self.limits)?
            {
                if let Some(body) = body {
                    self.on_client_message(Some(tag), body)?;
                }
                continue;
            }
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
            if let Some(Whole { tag, body }) =
                self.server.whole_message(&mut input, &self.limits)?
            {
                match body {
                    Some(body) => self.on_server_frame(tag, body)?,
                    None => self.on_server_skipped(tag),
                }
                continue;
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
    /// come out with [`Outcome::Unknown`] (or what was known so far). Later input is an
    /// error.
    pub fn handle_close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.pending.clear();
        self.events
            .extend(self.waiting.drain(..).map(|(waiting, _)| waiting.event));
        self.pending_bytes = 0;
    }

    /// Bytes the relay holds right now: message buffers, pending requests and tracked
    /// statements. Bounded by the limits, whatever the size of results streaming by.
    pub fn held_bytes(&self) -> usize {
        self.client.buf.capacity()
            + self.server.buf.capacity()
            + self.pending_bytes
            + self.tracked_bytes
    }

    /// The next audit event, if any. Drain after every `handle_*` call.
    pub fn poll_event(&mut self) -> Option<AuditEvent> {
        self.events.pop_front().map(|event| *event)
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
        // Decoded as a borrowed view: only what the audit keeps is copied out.
        let message = MessageView::decode(tag, body)
            .map_err(|kind| Error::invalid(Direction::Frontend, Some(tag), kind))?;
        let pending = match message {
            MessageView::Query(query) => {
                let mut event = Box::new(AuditEvent::new(EventKind::Query));
                event.query = Some(shared_text(query));
                Pending {
                    step: Step::Query,
                    waiting: Some(Waiting::new(event)),
                }
            }
            MessageView::Parse(parse) => {
                let mut event = Box::new(AuditEvent::new(EventKind::PostgresParse));
                let (name, raw) = name_text(parse.name);
                event.statement = Some(name);
                event.query = Some(shared_text(parse.query));
                let mut waiting = Waiting::new(event);
                waiting.statement_raw = raw;
                Pending {
                    step: Step::Parse,
                    waiting: Some(waiting),
                }
            }
            MessageView::Bind(bind) => {
                let mut event = Box::new(AuditEvent::new(EventKind::PostgresBind));
                let (statement, statement_raw) = name_text(bind.statement);
                let (portal, portal_raw) = name_text(bind.portal);
                event.statement = Some(statement);
                event.portal = Some(portal);
                event.parameters = render_values(bind.parameter_formats, bind.parameters);
                let mut waiting = Waiting::new(event);
                waiting.statement_raw = statement_raw;
                waiting.portal_raw = portal_raw;
                Pending {
                    step: Step::Bind,
                    waiting: Some(waiting),
                }
            }
            MessageView::Execute { portal, .. } => {
                let mut event = Box::new(AuditEvent::new(EventKind::PostgresExecute));
                let (portal, raw) = name_text(portal);
                event.portal = Some(portal);
                let mut waiting = Waiting::new(event);
                waiting.portal_raw = raw;
                Pending {
                    step: Step::Execute,
                    waiting: Some(waiting),
                }
            }
            MessageView::Close(target) => {
                let mut event = Box::new(AuditEvent::new(EventKind::PostgresClose));
                match target {
                    TargetView::Statement(name) => {
                        let (name, raw) = name_text(name);
                        event.statement = Some(name);
                        let mut waiting = Waiting::new(event);
                        waiting.statement_raw = raw;
                        Pending {
                            step: Step::Close,
                            waiting: Some(waiting),
                        }
                    }
                    TargetView::Portal(name) => {
                        let (name, raw) = name_text(name);
                        event.portal = Some(name);
                        let mut waiting = Waiting::new(event);
                        waiting.portal_raw = raw;
                        Pending {
                            step: Step::Close,
                            waiting: Some(waiting),
                        }
                    }
                }
            }
            MessageView::Describe(_) => Pending {
                step: Step::Describe,
                waiting: None,
            },
            MessageView::FunctionCall(call) => {
                let mut event = Box::new(AuditEvent::new(EventKind::PostgresFunction));
                event.function = Some(call.function);
                event.parameters = render_values(call.argument_formats, call.arguments);
                Pending {
                    step: Step::Function,
                    waiting: Some(Waiting::new(event)),
                }
            }
            MessageView::Sync => {
                self.discarding_until_sync = false;
                Pending {
                    step: Step::Sync,
                    waiting: None,
                }
            }
            MessageView::Terminate => {
                self.client_ended = true;
                return Ok(());
            }
            // Flush asks for no answer; COPY sub-protocol messages are answered as part of
            // the Query or Execute that started the COPY.
            _ => return Ok(()),
        };
        if self.discarding_until_sync {
            // The server reads and drops it: audit it as never run.
            if let Some(Waiting { mut event, .. }) = pending.waiting {
                event.outcome = Outcome::Skipped;
                self.events.push_back(event);
            }
            return Ok(());
        }
        self.push_pending(pending)
    }

    fn push_pending(&mut self, Pending { step, waiting }: Pending) -> Result<(), Error> {
        let max = self.limits.pending_requests_max;
        if self.pending.len() >= max {
            return Err(Error::limit(
                Limit::PendingRequests,
                self.pending.len() + 1,
                max,
            ));
        }
        let held = waiting.as_ref().map_or(0, |w| w.event.held_bytes());
        let bytes = self.pending_bytes + held;
        if bytes > self.limits.pending_bytes_max {
            return Err(Error::limit(
                Limit::PendingBytes,
                bytes,
                self.limits.pending_bytes_max,
            ));
        }
        self.pending_bytes = bytes;
        self.pending.push_back((step, waiting.is_some()));
        if let Some(waiting) = waiting {
            self.waiting.push_back((waiting, held));
        }
        Ok(())
    }

    fn pop_pending(&mut self) -> Option<Pending> {
        let (step, audited) = self.pending.pop_front()?;
        if !audited {
            return Some(Pending {
                step,
                waiting: None,
            });
        }
        let (waiting, held) = self.waiting.pop_front().unzip();
        self.pending_bytes = self.pending_bytes.saturating_sub(held.unwrap_or_default());
        Some(Pending { step, waiting })
    }

    fn front_step(&self) -> Option<Step> {
        self.pending.front().map(|&(step, _)| step)
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
        if tag == backend::tag::COMMAND_COMPLETE {
            // One per statement: read borrowed, only the text is kept.
            let command_tag = backend::command_tag(body)?;
            return self.on_command_done(Some(text(command_tag)));
        }
        BackendMessage::decode(Frame { tag, body })
            .and_then(|message| self.on_server_message(message))
    }

    fn on_server_message(&mut self, message: BackendMessage) -> Result<(), Error> {
        match message {
            BackendMessage::ParseComplete => self.complete(Step::Parse, succeeded(None)),
            BackendMessage::BindComplete => self.complete(Step::Bind, succeeded(None)),
            BackendMessage::CloseComplete => self.complete(Step::Close, succeeded(None)),
            BackendMessage::PortalSuspended => self.complete(Step::Execute, Outcome::Suspended),
            BackendMessage::CommandComplete(tag) => self.on_command_done(Some(text(&tag))),
            BackendMessage::EmptyQueryResponse => self.on_command_done(None),
            BackendMessage::FunctionCallResponse(_) => self.record(Step::Function, succeeded(None)),
            BackendMessage::ErrorResponse(fields) => {
                let outcome = Outcome::Failed {
                    code: text(fields.code().unwrap_or_default()),
                    message: text(fields.message().unwrap_or_default()),
                };
                self.on_error(outcome)
            }
            BackendMessage::ReadyForQuery(status) => {
                self.on_ready(status);
                Ok(())
            }
            // Nothing else is read whole (see `keep_backend`).
            _ => Ok(()),
        }
    }

    fn on_command_done(&mut self, tag: Option<String>) -> Result<(), Error> {
        match self.front_step() {
            Some(Step::Execute) => self.complete(Step::Execute, succeeded(tag)),
            _ => self.record(Step::Query, succeeded(tag)),
        }
    }

    /// Notes the outcome of a Query or FunctionCall, which ends at ReadyForQuery.
    fn record(&mut self, step: Step, outcome: Outcome) -> Result<(), Error> {
        match (self.pending.front(), self.waiting.front_mut()) {
            (Some(&(front, true)), Some((waiting, _))) if front == step => {
                waiting.event.outcome = outcome;
                Ok(())
            }
            _ => Err(unexpected_answer(step)),
        }
    }

    fn on_error(&mut self, outcome: Outcome) -> Result<(), Error> {
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
                    self.complete(step, Outcome::Skipped)?;
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
        while let Some(Pending { step, waiting }) = self.pop_pending() {
            let ends = matches!(step, Step::Query | Step::Function | Step::Sync);
            if let Some(waiting) = waiting {
                self.events.push_back(waiting.event);
            }
            if ends {
                break;
            }
        }
        if status == backend::TransactionStatus::Idle {
            // Portals live until the end of the transaction.
            let held: usize = self.portals.values().map(Portal::held_bytes).sum();
            self.tracked_bytes = self.tracked_bytes.saturating_sub(held);
            self.portals.clear();
        }
    }

    /// Pops the front request, which must be waiting for `step`, and emits its event.
    fn complete(&mut self, step: Step, outcome: Outcome) -> Result<(), Error> {
        if self.front_step() != Some(step) {
            return Err(unexpected_answer(step));
        }
        let Some(Pending { waiting, .. }) = self.pop_pending() else {
            return Err(unexpected_answer(step));
        };
        let ok = matches!(outcome, Outcome::Succeeded { .. } | Outcome::Suspended);
        // Describe has no event: nothing to record or track.
        let Some(Waiting {
            mut event,
            statement_raw,
            portal_raw,
        }) = waiting
        else {
            return Ok(());
        };
        event.outcome = outcome;
        let statement = name_bytes(&statement_raw, &event.statement);
        let portal = name_bytes(&portal_raw, &event.portal);
        match (step, statement, portal) {
            (Step::Parse, Some(name), _) if ok => {
                let name = name.to_vec();
                let query = event.query.clone().unwrap_or_else(|| Arc::from(""));
                self.track_statement(name, query)?;
            }
            (Step::Bind, Some(statement), Some(name)) => {
                let query = self.statements.get(statement).cloned();
                if ok {
                    let portal = Portal {
                        query: query.clone(),
                        parameters: event.parameters.clone(),
                    };
                    self.track_portal(name.to_vec(), portal)?;
                }
                event.query = query;
            }
            (Step::Execute, _, Some(name)) => {
                if let Some(portal) = self.portals.get(name) {
                    event.query = portal.query.clone();
                    event.parameters = portal.parameters.clone();
                }
            }
            (Step::Close, Some(name), _) => {
                let query = self.statements.get(name).cloned();
                if ok && let Some(query) = self.statements.remove(name) {
                    self.tracked_bytes = self.tracked_bytes.saturating_sub(query.len());
                }
                event.query = query;
            }
            (Step::Close, _, Some(name)) => {
                let query = self.portals.get(name).and_then(|p| p.query.clone());
                if ok && let Some(portal) = self.portals.remove(name) {
                    self.tracked_bytes = self.tracked_bytes.saturating_sub(portal.held_bytes());
                }
                event.query = query;
            }
            _ => {}
        }
        self.events.push_back(event);
        Ok(())
    }

    fn track_statement(&mut self, name: Vec<u8>, query: Arc<str>) -> Result<(), Error> {
        if let Some(old) = self.statements.remove(&name) {
            self.tracked_bytes = self.tracked_bytes.saturating_sub(old.len());
        }
        self.check_tracking(query.len())?;
        self.tracked_bytes += query.len();
        self.statements.insert(name, query);
        Ok(())
    }

    fn track_portal(&mut self, name: Vec<u8>, portal: Portal) -> Result<(), Error> {
        if let Some(old) = self.portals.remove(&name) {
            self.tracked_bytes = self.tracked_bytes.saturating_sub(old.held_bytes());
        }
        self.check_tracking(portal.held_bytes())?;
        self.tracked_bytes += portal.held_bytes();
        self.portals.insert(name, portal);
        Ok(())
    }

    fn check_tracking(&self, more_bytes: usize) -> Result<(), Error> {
        let count = self.statements.len() + self.portals.len() + 1;
        if count > self.limits.prepared_statements_max {
            return Err(Error::limit(
                Limit::PreparedStatements,
                count,
                self.limits.prepared_statements_max,
            ));
        }
        let bytes = self.tracked_bytes + more_bytes;
        if bytes > self.limits.prepared_statement_bytes_max {
            return Err(Error::limit(
                Limit::PreparedStatementBytes,
                bytes,
                self.limits.prepared_statement_bytes_max,
            ));
        }
        Ok(())
    }
}

fn succeeded(tag: Option<String>) -> Outcome {
    Outcome::Succeeded { tag }
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

/// Text for the audit log: the bytes as UTF-8, invalid sequences replaced.
fn text(bytes: &[u8]) -> String {
    // Checking first is much cheaper than the lossy conversion for valid text.
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Like [`text`], in one shared allocation (SQL goes from the statement table to every
/// event that names it without being copied).
fn shared_text(bytes: &[u8]) -> Arc<str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Arc::from(text),
        Err(_) => Arc::from(String::from_utf8_lossy(bytes).as_ref()),
    }
}

/// Parameter values for the audit log: text as is, binary as base64, NULL as `None`.
fn render_values(formats: FormatsView<'_>, values: ValuesView<'_>) -> Parameters {
    if values.len() == 0 {
        return Parameters::default();
    }
    let mut iter = values.iter();
    // Collected from a range, whose length is known: one allocation for the list.
    (0..values.len())
        .map(|i| {
            iter.next().flatten().map(|v| match formats.of(i) {
                Format::Text => text(v),
                Format::Binary => base64::engine::general_purpose::STANDARD.encode(v),
            })
        })
        .collect()
}

/// Client messages read whole: everything but CopyData (bulk) and authentication
/// responses (secrets).
fn keep_frontend(tag: u8) -> bool {
    !matches!(
        tag,
        frontend::tag::COPY_DATA | frontend::tag::AUTHENTICATION_RESPONSE
    )
}

/// Server messages read whole: only the ones that end a request.
fn keep_backend(tag: u8) -> bool {
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

/// A tagged message found whole in one read.
#[derive(Debug)]
struct Whole<'a> {
    tag: u8,
    /// `None` when the message is skipped (see `keep_frontend`, `keep_backend`).
    body: Option<&'a [u8]>,
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
                // `whole_message` would have taken it).
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

    /// The usual case, with no state to keep: `input` starts with a whole tagged message
    /// and no message is under way. Returns its tag and its body when it is read whole
    /// (`None`: skipped), or `Ok(None)` when the case does not apply (then use `next`).
    fn whole_message<'a>(
        &self,
        input: &mut &'a [u8],
        limits: &Limits,
    ) -> Result<Option<Whole<'a>>, Error> {
        if self.body.is_some() || self.header_filled != 0 || self.untagged {
            return Ok(None);
        }
        let Some((header, rest)) = input.split_first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let (tag, body_len, keep) = self.check_header(*header, limits)?;
        let Some((body, tail)) = rest.split_at_checked(body_len) else {
            return Ok(None);
        };
        *input = tail;
        Ok(Some(Whole {
            tag,
            body: keep.then_some(body),
        }))
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

    /// Reads and checks a tagged header: the tag, the body length, and whether the body
    /// is read whole (else skipped).
    fn check_header(
        &self,
        header: [u8; HEADER_LEN],
        limits: &Limits,
    ) -> Result<(u8, usize, bool), Error> {
        let (tag, body_len) = frame::parse_header(self.direction, header, limits.message_size_max)?;
        let (known, keep) = match self.direction {
            Direction::Frontend => (frontend::is_frontend_tag(tag), keep_frontend(tag)),
            Direction::Backend => (backend::is_backend_tag(tag), keep_backend(tag)),
        };
        if !known {
            return Err(Error::invalid(
                self.direction,
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

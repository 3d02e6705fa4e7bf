//! Audit events: what a database session did, in a form that does not depend on the wire
//! protocol (the MySQL relay is meant to produce the same type).
//!
//! Event names and codes follow Teleport's (see `REFERENCE.md`, "Audit events"). Session
//! fields (user, session id, database, time, event id) are added by the agent, which
//! knows them; the relay only knows what crossed the wire.

use std::borrow::Cow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use base64::Engine as _;

use crate::frontend::{Format, FormatsView, ValuesView};

/// Which kind of audited action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// A statement sent with the simple query protocol (PostgreSQL `Query`).
    Query,
    /// Extended protocol: a statement prepared (PostgreSQL `Parse`).
    PostgresParse,
    /// Extended protocol: parameters bound to a prepared statement (PostgreSQL `Bind`).
    PostgresBind,
    /// Extended protocol: a portal executed (PostgreSQL `Execute`).
    PostgresExecute,
    /// Extended protocol: a statement or portal closed (PostgreSQL `Close`).
    PostgresClose,
    /// A fast-path function call (PostgreSQL `FunctionCall`).
    PostgresFunction,
    /// Client bytes that did not parse; the session is ended.
    MalformedPacket,
}

/// How the server answered an audited request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// It succeeded; `tag` is the command tag (e.g. `INSERT 0 1`) when there is one. For a
    /// simple query holding several statements, the tag of the last one.
    Succeeded {
        /// The CommandComplete tag, if any.
        tag: Option<String>,
    },
    /// An Execute stopped at its row limit (PortalSuspended); it may be continued.
    Suspended,
    /// The server reported an error.
    Failed {
        /// SQLSTATE (PostgreSQL) or error number (MySQL).
        code: String,
        /// The server's message.
        message: String,
    },
    /// Never run: the server was discarding messages after an earlier error in the same
    /// extended-protocol batch (until Sync).
    Skipped,
    /// The connection ended before the server answered.
    Unknown,
}

/// One audited action.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuditEvent {
    /// What happened.
    pub kind: EventKind,
    /// SQL text, when known (for Bind, Execute and Close: the prepared statement's text).
    /// Shared, not copied, between a prepared statement's events.
    pub query: Option<Arc<str>>,
    /// Prepared statement name (Parse, Bind, Close of a statement); empty is unnamed.
    pub statement: Option<String>,
    /// Portal name (Bind, Execute, Close of a portal); empty is unnamed.
    pub portal: Option<String>,
    /// Function OID (FunctionCall).
    pub function: Option<u32>,
    /// Parameter or argument values: text as is, binary as base64, `None` for NULL.
    pub parameters: Parameters,
    /// The server's answer.
    pub outcome: Outcome,
}

impl AuditEvent {
    /// The event name, e.g. `db.session.query`.
    pub fn name(&self) -> &'static str {
        event_name(self.kind, matches!(self.outcome, Outcome::Failed { .. }))
    }

    /// The event code, e.g. `TDB02I`.
    pub fn code(&self) -> &'static str {
        event_code(self.kind, matches!(self.outcome, Outcome::Failed { .. }))
    }
}

fn event_name(kind: EventKind, failed: bool) -> &'static str {
    match kind {
        EventKind::Query if failed => "db.session.query.failed",
        EventKind::Query => "db.session.query",
        EventKind::PostgresParse => "db.session.postgres.statements.parse",
        EventKind::PostgresBind => "db.session.postgres.statements.bind",
        EventKind::PostgresExecute => "db.session.postgres.statements.execute",
        EventKind::PostgresClose => "db.session.postgres.statements.close",
        EventKind::PostgresFunction => "db.session.postgres.function",
        EventKind::MalformedPacket => "db.session.malformed_packet",
    }
}

fn event_code(kind: EventKind, failed: bool) -> &'static str {
    match kind {
        EventKind::Query if failed => "TDB02W",
        EventKind::Query => "TDB02I",
        EventKind::PostgresParse => "TPG00I",
        EventKind::PostgresBind => "TPG01I",
        EventKind::PostgresExecute => "TPG02I",
        EventKind::PostgresClose => "TPG03I",
        EventKind::PostgresFunction => "TPG04I",
        EventKind::MalformedPacket => "TDB06I",
    }
}

/// Text for the audit log: the bytes as UTF-8, invalid sequences replaced. Borrowed when
/// they are valid (the usual case).
pub fn text(bytes: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// One audited action as the relay holds it: every field borrowed from the relay's own
/// buffers, nothing allocated or converted. Text fields are raw wire bytes (the client
/// encoding need not be UTF-8); render them with [`text`]. [`EventView::to_owned`]
/// gives the same event as an [`AuditEvent`].
///
/// The view is three references into the relay; each method finds its field there when
/// called. Handing a view out copies nothing (a view holding every field was 150 bytes,
/// copied on each hand-out: a fifth of the relay's time on simple queries).
#[derive(Clone, Copy)]
pub struct EventView<'a> {
    pub(crate) entry: &'a crate::relay::Entry,
    pub(crate) log: &'a [u8],
    pub(crate) blobs: &'a crate::relay::Blobs,
}

impl fmt::Debug for EventView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventView")
            .field("kind", &self.kind())
            .field("query", &self.query().map(text))
            .field("statement", &self.statement().map(text))
            .field("portal", &self.portal().map(text))
            .field("function", &self.function())
            .field("parameters", &self.parameters())
            .field("outcome", &self.outcome())
            .finish()
    }
}

/// [`Outcome`], borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutcomeView<'a> {
    /// See [`Outcome::Succeeded`].
    Succeeded {
        /// The CommandComplete tag, if any.
        tag: Option<&'a [u8]>,
    },
    /// See [`Outcome::Suspended`].
    Suspended,
    /// See [`Outcome::Failed`].
    Failed {
        /// SQLSTATE.
        code: &'a [u8],
        /// The server's message.
        message: &'a [u8],
    },
    /// See [`Outcome::Skipped`].
    Skipped,
    /// See [`Outcome::Unknown`].
    Unknown,
}

/// Parameter or argument values of one request, as sent: each with its format.
#[derive(Debug, Clone, Copy)]
pub struct ParametersView<'a> {
    formats: FormatsView<'a>,
    values: ValuesView<'a>,
}

/// One non-NULL parameter value as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parameter<'a> {
    /// Text or binary.
    pub format: Format,
    /// The value's bytes.
    pub bytes: &'a [u8],
}

impl<'a> Parameter<'a> {
    /// The value for the audit log: text as is (lossy UTF-8), binary as base64.
    pub fn render(self) -> Cow<'a, str> {
        match self.format {
            Format::Text => text(self.bytes),
            Format::Binary => {
                Cow::Owned(base64::engine::general_purpose::STANDARD.encode(self.bytes))
            }
        }
    }
}

impl<'a> ParametersView<'a> {
    pub(crate) fn new(formats: FormatsView<'a>, values: ValuesView<'a>) -> Self {
        ParametersView { formats, values }
    }

    /// No parameters.
    pub fn empty() -> Self {
        ParametersView::new(FormatsView::checked(&[]), ValuesView::checked(0, &[]))
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// `true` when there are none.
    pub fn is_empty(&self) -> bool {
        self.values.len() == 0
    }

    /// The values in order, `None` for NULL.
    pub fn iter(&self) -> impl Iterator<Item = Option<Parameter<'a>>> + 'a {
        let formats = self.formats;
        self.values.iter().enumerate().map(move |(i, value)| {
            value.map(|bytes| Parameter {
                format: formats.of(i),
                bytes,
            })
        })
    }
}

impl<'a> EventView<'a> {
    fn failed(&self) -> bool {
        matches!(self.outcome(), OutcomeView::Failed { .. })
    }

    /// The event name, e.g. `db.session.query`.
    pub fn name(&self) -> &'static str {
        event_name(self.kind(), self.failed())
    }

    /// The event code, e.g. `TDB02I`.
    pub fn code(&self) -> &'static str {
        event_code(self.kind(), self.failed())
    }

    /// The same event, owned (text converted, parameters rendered).
    pub fn to_owned(&self) -> AuditEvent {
        let owned = |bytes: &[u8]| text(bytes).into_owned();
        AuditEvent {
            kind: self.kind(),
            query: self.query().map(|q| Arc::from(text(q).as_ref())),
            statement: self.statement().map(owned),
            portal: self.portal().map(owned),
            function: self.function(),
            parameters: self
                .parameters()
                .iter()
                .map(|p| p.map(|p| p.render().into_owned()))
                .collect(),
            outcome: match self.outcome() {
                OutcomeView::Succeeded { tag } => Outcome::Succeeded {
                    tag: tag.map(owned),
                },
                OutcomeView::Suspended => Outcome::Suspended,
                OutcomeView::Failed { code, message } => Outcome::Failed {
                    code: owned(code),
                    message: owned(message),
                },
                OutcomeView::Skipped => Outcome::Skipped,
                OutcomeView::Unknown => Outcome::Unknown,
            },
        }
    }
}

/// Parameter or argument values of one request, in order: text as is, binary as base64,
/// `None` for NULL. Reads as a slice. Cloning shares the values (a Bind, its portal and
/// each Execute of that portal hold the same ones); an empty list allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct Parameters(Option<Arc<[Option<String>]>>);

impl Deref for Parameters {
    type Target = [Option<String>];

    fn deref(&self) -> &Self::Target {
        self.0.as_deref().unwrap_or_default()
    }
}

impl FromIterator<Option<String>> for Parameters {
    fn from_iter<I: IntoIterator<Item = Option<String>>>(values: I) -> Self {
        let values: Arc<[Option<String>]> = values.into_iter().collect();
        Parameters((!values.is_empty()).then_some(values))
    }
}

impl From<Vec<Option<String>>> for Parameters {
    fn from(values: Vec<Option<String>>) -> Self {
        values.into_iter().collect()
    }
}

impl PartialEq for Parameters {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Parameters {}

impl std::hash::Hash for Parameters {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

/// One line: code, name, then the fields that are set.
impl fmt::Display for AuditEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.name())?;
        if let Some(statement) = &self.statement {
            write!(f, " statement={statement:?}")?;
        }
        if let Some(portal) = &self.portal {
            write!(f, " portal={portal:?}")?;
        }
        if let Some(function) = self.function {
            write!(f, " function={function}")?;
        }
        if let Some(query) = &self.query {
            write!(f, " query={query:?}")?;
        }
        if !self.parameters.is_empty() {
            f.write_str(" parameters=[")?;
            for (i, parameter) in self.parameters.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                match parameter {
                    Some(value) => write!(f, "{value:?}")?,
                    None => f.write_str("NULL")?,
                }
            }
            f.write_str("]")?;
        }
        match &self.outcome {
            Outcome::Succeeded { tag: Some(tag) } => write!(f, " -> ok {tag:?}"),
            Outcome::Succeeded { tag: None } => write!(f, " -> ok"),
            Outcome::Suspended => write!(f, " -> suspended"),
            Outcome::Failed { code, message } => write!(f, " -> failed {code} {message:?}"),
            Outcome::Skipped => write!(f, " -> skipped"),
            Outcome::Unknown => write!(f, " -> unknown"),
        }
    }
}

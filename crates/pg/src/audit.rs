//! Audit events: what a database session did, in a form that does not depend on the wire
//! protocol (the MySQL relay is meant to produce the same type).
//!
//! Event names and codes follow Teleport's (see `REFERENCE.md`, "Audit events"). Session
//! fields (user, session id, database, time, event id) are added by the agent, which
//! knows them; the relay only knows what crossed the wire.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

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
    pub(crate) fn new(kind: EventKind) -> Self {
        AuditEvent {
            kind,
            query: None,
            statement: None,
            portal: None,
            function: None,
            parameters: Parameters::default(),
            outcome: Outcome::Unknown,
        }
    }

    fn failed_query(&self) -> bool {
        self.kind == EventKind::Query && matches!(self.outcome, Outcome::Failed { .. })
    }

    /// The event name, e.g. `db.session.query`.
    pub fn name(&self) -> &'static str {
        if self.failed_query() {
            return "db.session.query.failed";
        }
        match self.kind {
            EventKind::Query => "db.session.query",
            EventKind::PostgresParse => "db.session.postgres.statements.parse",
            EventKind::PostgresBind => "db.session.postgres.statements.bind",
            EventKind::PostgresExecute => "db.session.postgres.statements.execute",
            EventKind::PostgresClose => "db.session.postgres.statements.close",
            EventKind::PostgresFunction => "db.session.postgres.function",
            EventKind::MalformedPacket => "db.session.malformed_packet",
        }
    }

    /// The event code, e.g. `TDB02I`.
    pub fn code(&self) -> &'static str {
        if self.failed_query() {
            return "TDB02W";
        }
        match self.kind {
            EventKind::Query => "TDB02I",
            EventKind::PostgresParse => "TPG00I",
            EventKind::PostgresBind => "TPG01I",
            EventKind::PostgresExecute => "TPG02I",
            EventKind::PostgresClose => "TPG03I",
            EventKind::PostgresFunction => "TPG04I",
            EventKind::MalformedPacket => "TDB06I",
        }
    }

    /// Bytes of text this event holds, for the relay's memory limits.
    pub(crate) fn held_bytes(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        self.query.as_ref().map_or(0, |q| q.len())
            + text(&self.statement)
            + text(&self.portal)
            + self.parameters.iter().map(text).sum::<usize>()
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

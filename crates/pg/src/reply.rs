//! Builders for what the proxy and the agent themselves say to a PostgreSQL client.

use crate::backend::{Authentication, BackendMessage, Fields, TransactionStatus, field};
use crate::error::{Error, PeerMisbehaved};

/// ErrorResponse severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// SQLSTATE codes this proxy sends, named as in PostgreSQL's `errcodes.txt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState(&'static str);

impl SqlState {
    /// 28000: access denied (identity, role or route not allowed).
    pub const INVALID_AUTHORIZATION_SPECIFICATION: Self = SqlState("28000");
    /// 08000: a connection problem without a more precise code.
    pub const CONNECTION_EXCEPTION: Self = SqlState("08000");
    /// 08001: the proxy or agent could not connect to the database.
    pub const SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION: Self = SqlState("08001");
    /// 08004: the database refused the connection.
    pub const SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION: Self = SqlState("08004");
    /// 08006: an established connection failed.
    pub const CONNECTION_FAILURE: Self = SqlState("08006");
    /// 08P01: the peer broke the protocol.
    pub const PROTOCOL_VIOLATION: Self = SqlState("08P01");
    /// 0A000: something the proxy does not support.
    pub const FEATURE_NOT_SUPPORTED: Self = SqlState("0A000");
    /// 54000: a size or count above a limit.
    pub const PROGRAM_LIMIT_EXCEEDED: Self = SqlState("54000");

    /// The five-character code.
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl Fields {
    /// The fields of an ErrorResponse: severity (localized and not), SQLSTATE, message.
    pub fn error(severity: Severity, code: SqlState, message: &str) -> Self {
        Fields {
            fields: vec![
                (field::SEVERITY, severity.as_str().into()),
                (field::SEVERITY_NONLOCALIZED, severity.as_str().into()),
                (field::CODE, code.as_str().into()),
                (field::MESSAGE, message.into()),
            ],
        }
    }

    /// Adds a detail line.
    pub fn with_detail(mut self, detail: &str) -> Self {
        self.fields.push((field::DETAIL, detail.into()));
        self
    }

    /// Adds a hint: what the user can do about it.
    pub fn with_hint(mut self, hint: &str) -> Self {
        self.fields.push((field::HINT, hint.into()));
        self
    }
}

impl BackendMessage {
    /// ErrorResponse with severity, SQLSTATE and message.
    pub fn error(severity: Severity, code: SqlState, message: &str) -> Self {
        BackendMessage::ErrorResponse(Fields::error(severity, code, message))
    }

    /// AuthenticationOk.
    pub fn authentication_ok() -> Self {
        BackendMessage::Authentication(Authentication::Ok)
    }

    /// BackendKeyData: the key a CancelRequest for this session must quote.
    pub fn backend_key_data(process_id: i32, secret_key: &[u8]) -> Self {
        BackendMessage::BackendKeyData {
            process_id,
            secret_key: secret_key.to_vec(),
        }
    }

    /// ParameterStatus.
    pub fn parameter_status(name: &str, value: &str) -> Self {
        BackendMessage::ParameterStatus {
            name: name.into(),
            value: value.into(),
        }
    }

    /// ReadyForQuery.
    pub fn ready_for_query(status: TransactionStatus) -> Self {
        BackendMessage::ReadyForQuery(status)
    }
}

impl Error {
    /// The SQLSTATE a client should see for this error.
    pub fn sql_state(&self) -> SqlState {
        match self {
            Error::InvalidMessage { .. } => SqlState::PROTOCOL_VIOLATION,
            Error::LimitExceeded { .. } => SqlState::PROGRAM_LIMIT_EXCEEDED,
            Error::PeerMisbehaved { kind, .. } => match kind {
                PeerMisbehaved::TlsRequired
                | PeerMisbehaved::EmptyUser
                | PeerMisbehaved::DirectTlsWithoutAlpn
                | PeerMisbehaved::WrongAlpn { .. } => SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                PeerMisbehaved::UnsupportedProtocolVersion { .. } => {
                    SqlState::FEATURE_NOT_SUPPORTED
                }
                _ => SqlState::PROTOCOL_VIOLATION,
            },
        }
    }

    /// The FATAL ErrorResponse to send the client before closing the connection.
    pub fn to_error_response(&self) -> BackendMessage {
        BackendMessage::error(Severity::Fatal, self.sql_state(), &self.to_string())
    }
}

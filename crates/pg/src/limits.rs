//! Limits on everything that grows. Each has a name, a default and an error
//! ([`crate::Error::LimitExceeded`] naming the [`crate::Limit`]).

use std::time::Duration;

/// Size and count limits, shared by framing, start-up and relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest untagged start-up packet (StartupMessage, SSLRequest, CancelRequest, ...),
    /// length word included. PostgreSQL refuses anything above 10,000 bytes.
    pub startup_packet_size_max: usize,
    /// Time from accepting a connection to the end of start-up (CancelRequest or
    /// StartupMessage), TLS handshake included. PostgreSQL's `authentication_timeout`
    /// defaults to 60 s; a proxy that has not even seen a user yet can be stricter.
    pub startup_timeout: Duration,
    /// Largest tagged message, length word and type byte included. PostgreSQL's own
    /// ceiling is 1 GiB; streamed messages (DataRow, CopyData) may be this large without
    /// being held in memory.
    pub message_size_max: usize,
    /// Largest message the relay reads whole to audit it (Query, Parse, Bind,
    /// FunctionCall, CommandComplete, ErrorResponse, ...). Everything else is streamed.
    pub buffered_message_size_max: usize,
    /// Requests the relay remembers while waiting for the server's answer (pipelining).
    pub pending_requests_max: usize,
    /// Bytes of query text and parameters held by those pending requests.
    pub pending_bytes_max: usize,
    /// Prepared statements and portals the relay tracks to name the query of an Execute.
    pub prepared_statements_max: usize,
    /// Bytes of query text and parameters held by tracked statements and portals.
    pub prepared_statement_bytes_max: usize,
}

impl Limits {
    /// PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`.
    pub const STARTUP_PACKET_SIZE_MAX: usize = 10_000;
    /// PostgreSQL's `MaxAllocSize` (1 GiB - 1), the largest message it accepts.
    pub const MESSAGE_SIZE_MAX: usize = 0x3fff_ffff;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            startup_packet_size_max: Self::STARTUP_PACKET_SIZE_MAX,
            startup_timeout: Duration::from_secs(10),
            message_size_max: Self::MESSAGE_SIZE_MAX,
            buffered_message_size_max: 16 << 20,
            pending_requests_max: 4096,
            pending_bytes_max: 64 << 20,
            prepared_statements_max: 10_000,
            prepared_statement_bytes_max: 64 << 20,
        }
    }
}

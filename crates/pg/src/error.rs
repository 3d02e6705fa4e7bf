//! The one error type of this crate, grouped by category.

use std::fmt;

/// Which side of a connection sent the bytes an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to server: start-up packets and frontend messages.
    Frontend,
    /// Server to client: backend messages.
    Backend,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Frontend => "frontend",
            Direction::Backend => "backend",
        })
    }
}

/// Everything that can go wrong in this crate.
///
/// Every variant is about the peer's bytes or a configured limit; none is a bug of ours.
/// A state machine that returned an error stays failed and returns the same error again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bytes that do not form a valid message of protocol 3.0/3.2.
    #[error("invalid {direction} message {}: {kind}", TagName(*tag))]
    InvalidMessage {
        /// Who sent the bytes.
        direction: Direction,
        /// The message type byte; `None` for untagged start-up packets.
        tag: Option<u8>,
        /// What is wrong with them.
        kind: InvalidMessage,
    },
    /// A size or count above its configured limit (see [`crate::Limits`]).
    #[error("{limit} is {actual}, above the limit of {max}")]
    LimitExceeded {
        /// Which limit.
        limit: Limit,
        /// The size or count seen.
        actual: u64,
        /// The configured maximum.
        max: u64,
    },
    /// Well-formed messages in an order or state the protocol (or this proxy) forbids.
    #[error("{direction} misbehaved: {kind}")]
    PeerMisbehaved {
        /// Who sent the message.
        direction: Direction,
        /// What was wrong.
        kind: PeerMisbehaved,
    },
}

impl Error {
    pub(crate) fn invalid(direction: Direction, tag: Option<u8>, kind: InvalidMessage) -> Self {
        Error::InvalidMessage {
            direction,
            tag,
            kind,
        }
    }

    pub(crate) fn limit(limit: Limit, actual: usize, max: usize) -> Self {
        Error::LimitExceeded {
            limit,
            actual: actual as u64,
            max: max as u64,
        }
    }

    pub(crate) fn frontend(kind: PeerMisbehaved) -> Self {
        Error::PeerMisbehaved {
            direction: Direction::Frontend,
            kind,
        }
    }
}

/// How a message's bytes are malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessage {
    /// The length word is smaller than the smallest valid message (it counts itself).
    #[error("length {length} is below the minimum of {min}")]
    LengthTooSmall {
        /// The length word as sent.
        length: i64,
        /// The smallest length allowed here.
        min: u32,
    },
    /// A type byte this direction never sends.
    #[error("unknown message type")]
    UnknownTag,
    /// The body ended before a field it announced.
    #[error("body ends in the middle of a field")]
    Truncated,
    /// Bytes left over after the last field: the length word and the content disagree.
    #[error("{count} trailing bytes after the last field")]
    TrailingBytes {
        /// How many bytes were left.
        count: usize,
    },
    /// A string field without its terminating NUL byte.
    #[error("string without a terminating NUL")]
    MissingNul,
    /// A field length below -1 (only -1, meaning NULL, may be negative).
    #[error("field length {length} is negative")]
    NegativeLength {
        /// The length as sent.
        length: i32,
    },
    /// A format code other than 0 (text) or 1 (binary).
    #[error("format code {code} is neither 0 (text) nor 1 (binary)")]
    UnknownFormatCode {
        /// The code as sent.
        code: i16,
    },
    /// Bind or FunctionCall with a number of format codes that is not 0, 1 or one per value.
    #[error("{formats} format codes for {values} values")]
    FormatCountMismatch {
        /// Number of format codes.
        formats: usize,
        /// Number of values.
        values: usize,
    },
    /// A Close or Describe target other than `S` (statement) or `P` (portal).
    #[error("target {target:#04x} is neither 'S' nor 'P'")]
    UnknownTarget {
        /// The byte as sent.
        target: u8,
    },
    /// An Authentication request code we do not know.
    #[error("unknown authentication request {code}")]
    UnknownAuthentication {
        /// The code as sent.
        code: i32,
    },
    /// A ReadyForQuery status other than `I`, `T` or `E`.
    #[error("transaction status {status:#04x} is not 'I', 'T' or 'E'")]
    UnknownTransactionStatus {
        /// The byte as sent.
        status: u8,
    },
    /// A start-up packet whose request code is no known request and no protocol version.
    #[error("unknown start-up request code {code}")]
    UnknownRequestCode {
        /// The code as sent.
        code: u32,
    },
    /// A cancel key shorter than 4 or longer than 256 bytes (protocol 3.2 limits).
    #[error("cancel key of {length} bytes is outside 4..=256")]
    CancelKeyLength {
        /// The key length seen.
        length: usize,
    },
    /// A start-up parameter that must be UTF-8 (user, database, ...) is not.
    #[error("start-up parameter {name:?} is not UTF-8")]
    NotUtf8 {
        /// The parameter name.
        name: &'static str,
    },
}

/// A configured limit (see [`crate::Limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// [`crate::Limits::startup_packet_size_max`].
    StartupPacketSize,
    /// [`crate::Limits::startup_timeout`] (values in milliseconds).
    StartupTime,
    /// [`crate::Limits::message_size_max`].
    MessageSize,
    /// [`crate::Limits::buffered_message_size_max`].
    BufferedMessageSize,
    /// [`crate::Limits::pending_requests_max`].
    PendingRequests,
    /// [`crate::Limits::pending_bytes_max`].
    PendingBytes,
    /// [`crate::Limits::prepared_statements_max`].
    PreparedStatements,
    /// [`crate::Limits::prepared_statement_bytes_max`].
    PreparedStatementBytes,
    /// A count encoded in 16 bits on the wire (values, parameters, fields): 65,535.
    WireCount,
    /// A message longer than the 32-bit length word allows: 2^31 - 1 bytes.
    WireLength,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::StartupPacketSize => "start-up packet size (bytes)",
            Limit::StartupTime => "time to finish start-up (ms)",
            Limit::MessageSize => "message size (bytes)",
            Limit::BufferedMessageSize => "size of a message read whole for audit (bytes)",
            Limit::PendingRequests => "number of requests awaiting an answer",
            Limit::PendingBytes => "bytes held for requests awaiting an answer",
            Limit::PreparedStatements => "number of prepared statements and portals",
            Limit::PreparedStatementBytes => "bytes held for prepared statements and portals",
            Limit::WireCount => "count in a 16-bit field",
            Limit::WireLength => "length in a 32-bit field",
        })
    }
}

/// A protocol rule (or a rule of this proxy) that well-formed messages broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerMisbehaved {
    /// SSLRequest after TLS was negotiated (or refused) on this connection.
    #[error("second SSLRequest on one connection")]
    SecondSslRequest,
    /// GSSENCRequest after encryption was already negotiated or refused.
    #[error("second GSSENCRequest on one connection")]
    SecondGssEncRequest,
    /// A StartupMessage before TLS on a listener that requires it.
    #[error("StartupMessage before TLS; this server only accepts TLS connections")]
    TlsRequired,
    /// A protocol version other than 3.x.
    #[error("protocol version {major}.{minor} is not supported (only 3.0 to 3.2)")]
    UnsupportedProtocolVersion {
        /// Major version requested.
        major: u16,
        /// Minor version requested.
        minor: u16,
    },
    /// A StartupMessage without a `user` parameter, or with an empty one.
    #[error("no database user given in the StartupMessage")]
    EmptyUser,
    /// A TLS ClientHello first (direct SSL) whose ALPN list did not select `postgresql`.
    #[error("direct TLS without ALPN \"postgresql\"")]
    DirectTlsWithoutAlpn,
    /// TLS negotiated an ALPN protocol other than `postgresql`.
    #[error("TLS negotiated ALPN {alpn:?}, expected \"postgresql\"")]
    WrongAlpn {
        /// The protocol negotiated.
        alpn: String,
    },
    /// A message that is not allowed in the current state.
    #[error("message {} not allowed {state}", TagName(*tag))]
    UnexpectedMessage {
        /// Its type byte (`None` for untagged packets).
        tag: Option<u8>,
        /// The state, in words.
        state: &'static str,
    },
    /// Input after the start-up exchange ended (after a CancelRequest, a StartupMessage or
    /// an error), or after Terminate.
    #[error("bytes after the end of the {0}")]
    InputAfterEnd(&'static str),
}

/// Displays an optional message type byte the way the protocol documentation names it.
pub(crate) struct TagName(pub(crate) Option<u8>);

impl fmt::Display for TagName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("(untagged)"),
            Some(tag) if tag.is_ascii_graphic() => write!(f, "'{}'", tag as char),
            Some(tag) => write!(f, "{tag:#04x}"),
        }
    }
}

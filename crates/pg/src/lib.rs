//! PostgreSQL wire protocol 3.0 (and 3.2's variable-length cancel keys) as a sans-IO core:
//! no sockets, no clock, no async.
//!
//! - [`frame`]: where messages begin and end in a caller-owned buffer (`Ok(None)` means
//!   "read more bytes"), with size limits.
//! - [`frontend`] and [`backend`]: every message in both directions, decoded and encoded
//!   (the proxy and the agent see both sides). Trailing bytes inside a message are an
//!   error.
//! - [`startup`]: the proxy's start-up negotiation (SSLRequest, GSSENCRequest, direct TLS,
//!   CancelRequest, StartupMessage).
//! - [`relay`]: the agent's relay, which watches the bytes it forwards and produces
//!   [`AuditEvent`]s, with memory bounded whatever the result size.
//! - [`reply`]: what the proxy says itself: ErrorResponse with SQLSTATE, AuthenticationOk,
//!   BackendKeyData, ParameterStatus, ReadyForQuery.
//!
//! State machines take input with `handle_*` and give output with `poll_*`; drain the
//! outputs after every input. A machine that returned an error stays failed. Every limit
//! is in [`Limits`].

pub mod audit;
pub mod backend;
mod error;
pub mod frame;
pub mod frontend;
pub mod fuzzing;
mod limits;
pub mod relay;
pub mod reply;
pub mod startup;
mod transcript;

pub use audit::{AuditEvent, EventKind, Outcome, Parameters};
pub use backend::BackendMessage;
pub use error::{Direction, Error, InvalidMessage, Limit, PeerMisbehaved};
pub use frontend::{FrontendMessage, StartupRequest};
pub use limits::Limits;
pub use relay::Relay;
pub use startup::{Startup, StartupOutput, StartupParams, TlsMode};
pub use transcript::VALUE_SHOWN_MAX;

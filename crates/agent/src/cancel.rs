//! Cancel requests that reach the agent through a tunnel channel of kind
//! [`ChannelKind::Cancel`](postern_tunnel::ChannelKind::Cancel).
//!
//! A PostgreSQL client cancels a running query by sending, on a new connection, the
//! 16-byte CancelRequest with its session's key. The proxy keeps a table of the keys of
//! the sessions it relays, and forwards such a request over the tunnel of the agent that
//! serves the session, on a channel naming the database. Here the agent reads it and
//! sends it to that database the way it opens sessions: SSLRequest, TLS checked as the
//! database's `tls` settings say, then the request. No plaintext hop: the tunnel is SSH,
//! the last leg is TLS.
//!
//! Nothing is answered on the channel, as PostgreSQL answers nothing to a cancel: a key
//! that names no session is ignored by the database itself.

use std::time::Duration;

use postern_pg::Limits;
use postern_pg::frontend::StartupRequest;
use postern_rt::Net;
use postern_tunnel::agent::IncomingChannel;
use tokio::io::AsyncReadExt;

use crate::session::ServedDatabase;
use crate::upstream::postgres::UpstreamError;

/// Longest cancel request read from a channel: length, code, process id and the longest
/// secret (256 bytes, protocol 3.2).
pub const CANCEL_REQUEST_LEN_MAX: usize = 4 + 4 + 4 + 256;

/// How long reading the request and delivering it to the database may take.
pub const CANCEL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);

/// Why a cancel request was not delivered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CancelError {
    #[error("reading the cancel request from the proxy failed: {0}")]
    Read(std::io::Error),
    #[error("the proxy sent {len} bytes, more than a cancel request ({CANCEL_REQUEST_LEN_MAX})")]
    TooLong { len: usize },
    #[error("the proxy closed the cancel channel after {len} bytes, before a whole request")]
    Truncated { len: usize },
    #[error("the proxy sent bytes after the cancel request ({len} in all)")]
    TrailingBytes { len: usize },
    #[error("the proxy sent a malformed cancel request: {0}")]
    Malformed(postern_pg::Error),
    #[error("the proxy sent a start-up packet that is not a cancel request on a cancel channel")]
    NotCancel,
    #[error("cancel request for database {0:?}, which this agent does not serve")]
    UnknownDatabase(String),
    #[error("the cancel request did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("cannot deliver the cancel request to {database:?}: {source}")]
    Upstream {
        database: String,
        source: UpstreamError,
    },
}

/// Serves one cancel channel: reads the CancelRequest and sends it to the database the
/// channel names (one of `databases`) over TLS. `timeout` bounds the read and the
/// delivery each ([`CANCEL_TIMEOUT_DEFAULT`] is a good value).
pub async fn serve_cancel(
    channel: IncomingChannel,
    databases: &[ServedDatabase],
    net: &Net,
    timeout: Duration,
) -> Result<(), CancelError> {
    let served = databases
        .iter()
        .find(|d| d.database.name == channel.database)
        .ok_or_else(|| CancelError::UnknownDatabase(channel.database.clone()))?;
    let mut bytes = Vec::new();
    let mut bounded = channel.connection.take(CANCEL_REQUEST_LEN_MAX as u64 + 1);
    tokio::time::timeout(timeout, bounded.read_to_end(&mut bytes))
        .await
        .map_err(|_| CancelError::Timeout(timeout))?
        .map_err(CancelError::Read)?;
    if bytes.len() > CANCEL_REQUEST_LEN_MAX {
        return Err(CancelError::TooLong { len: bytes.len() });
    }
    let request = match StartupRequest::decode_from(&bytes, &Limits::default()) {
        Ok(Some((StartupRequest::Cancel(request), used))) if used == bytes.len() => request,
        Ok(Some((StartupRequest::Cancel(_), _))) => {
            return Err(CancelError::TrailingBytes { len: bytes.len() });
        }
        Ok(Some(_)) => return Err(CancelError::NotCancel),
        Ok(None) => return Err(CancelError::Truncated { len: bytes.len() }),
        Err(error) => return Err(CancelError::Malformed(error)),
    };
    served
        .target
        .cancel(net, &request, timeout)
        .await
        .map_err(|source| CancelError::Upstream {
            database: served.database.name.clone(),
            source,
        })
}

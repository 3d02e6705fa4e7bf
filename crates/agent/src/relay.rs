//! The relay loop: bytes between the client and the database, unchanged, while
//! `postern_pg::Relay` turns them into audit events.
//!
//! Both directions run at once. A single loop that waits to write to the database while
//! the database waits to write results to us would deadlock on large pipelined batches,
//! so each direction has its own half, and the relay machine sits behind a mutex that is
//! held only for its synchronous `handle_*` calls, never across an await.
//!
//! Audit events go to a bounded channel. When the consumer falls behind, the relay waits:
//! the session slows down, and no statement runs unaudited or has its event dropped.
//! Nothing is logged per message.

use std::sync::{Mutex, PoisonError};

use postern_pg::{AuditEvent, Relay};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

/// Bytes read from one side at a time.
pub const CHUNK_SIZE: usize = 16 * 1024;

/// How a relayed session ended.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayEnd {
    /// Both sides closed.
    Closed,
    /// The client broke the protocol (or hit a limit); it was sent this error.
    ClientError(String),
    /// The database's bytes did not parse (or hit a limit).
    ServerError(String),
    /// The audit event consumer went away: the session was ended rather than run unaudited.
    AuditClosed,
    /// A socket failed.
    Io(String),
}

/// Bytes already read from either side during start-up, to be relayed first.
#[derive(Debug, Default)]
pub struct Pending {
    /// What the client sent after its StartupMessage (pipelined queries).
    pub client: Vec<u8>,
    /// What the database sent after its ReadyForQuery.
    pub server: Vec<u8>,
}

/// Relays until both sides close or one fails, starting with the `pending` bytes. Every
/// event, including those flushed at the end for requests never answered, is sent on
/// `events` before this returns.
pub async fn run<C, S>(
    client: C,
    server: S,
    relay: Relay,
    pending: Pending,
    events: mpsc::Sender<AuditEvent>,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let shared = Shared {
        relay: Mutex::new(relay),
        stop: Notify::new(),
    };
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(server);

    let mut end = RelayEnd::Closed;
    if !pending.server.is_empty()
        && let Err(e) = shared
            .forward(Side::Server, &pending.server, &mut client_write, &events)
            .await
    {
        end = e;
    }
    if end == RelayEnd::Closed
        && !pending.client.is_empty()
        && let Err(e) = shared
            .forward(Side::Client, &pending.client, &mut server_write, &events)
            .await
    {
        end = e;
    }
    if end == RelayEnd::Closed {
        let (up, down) = tokio::join!(
            half(
                &shared,
                Side::Client,
                &mut client_read,
                &mut server_write,
                &events
            ),
            half(
                &shared,
                Side::Server,
                &mut server_read,
                &mut client_write,
                &events
            ),
        );
        // The first failure explains the end; a clean close of both is Closed.
        end = [up, down]
            .into_iter()
            .find(|e| *e != RelayEnd::Closed)
            .unwrap_or(RelayEnd::Closed);
    }
    if let RelayEnd::ClientError(message) = &end {
        let mut out = Vec::new();
        let response = postern_pg::BackendMessage::error(
            postern_pg::reply::Severity::Fatal,
            postern_pg::reply::SqlState::PROTOCOL_VIOLATION,
            message,
        );
        if response.encode(&mut out).is_ok() {
            let _ = client_write.write_all(&out).await;
        }
    }
    let _ = client_write.shutdown().await;
    let _ = server_write.shutdown().await;

    let flushed = {
        let mut relay = shared.lock();
        relay.handle_close();
        drain(&mut relay)
    };
    for event in flushed {
        if events.send(event).await.is_err() {
            return RelayEnd::AuditClosed;
        }
    }
    end
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

struct Shared {
    relay: Mutex<Relay>,
    /// Wakes the other half when one half ends the session. `notify_one` keeps a permit
    /// if the other half is not waiting yet (busy writing), so the stop is never missed.
    stop: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Relay> {
        // The relay is only ever used under this lock by synchronous calls that do not
        // panic on input; a poisoned lock still holds a consistent (failed) machine.
        self.relay.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Shows `chunk` to the relay, sends its events, then writes it to the other side.
    async fn forward<W: AsyncWrite + Unpin>(
        &self,
        from: Side,
        chunk: &[u8],
        to: &mut W,
        events: &mpsc::Sender<AuditEvent>,
    ) -> Result<(), RelayEnd> {
        let (result, ready) = {
            let mut relay = self.lock();
            let result = match from {
                Side::Client => relay.handle_client_bytes(chunk),
                Side::Server => relay.handle_server_bytes(chunk),
            };
            (result, drain(&mut relay))
        };
        // Events first: a statement's bytes reach the database only once the events
        // before it are handed to the audit pipeline.
        for event in ready {
            events
                .send(event)
                .await
                .map_err(|_| RelayEnd::AuditClosed)?;
        }
        if let Err(e) = result {
            return Err(match from {
                Side::Client => RelayEnd::ClientError(e.to_string()),
                Side::Server => RelayEnd::ServerError(e.to_string()),
            });
        }
        // Flush too: on a TLS stream `write_all` can return with records still buffered
        // inside rustls, and if this half then waits to read, both peers wait forever.
        let io = |e: std::io::Error| RelayEnd::Io(e.to_string());
        to.write_all(chunk).await.map_err(io)?;
        to.flush().await.map_err(io)
    }
}

fn drain(relay: &mut Relay) -> Vec<AuditEvent> {
    std::iter::from_fn(|| relay.poll_event()).collect()
}

/// One direction: read, show the relay, forward; until EOF, an error, or a stop.
async fn half<R, W>(
    shared: &Shared,
    from: Side,
    read: &mut R,
    write: &mut W,
    events: &mpsc::Sender<AuditEvent>,
) -> RelayEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let n = tokio::select! {
            biased;
            () = shared.stop.notified() => return RelayEnd::Closed,
            read = read.read(&mut buf) => match read {
                Ok(n) => n,
                Err(e) => {
                    shared.stop.notify_one();
                    return RelayEnd::Io(e.to_string());
                }
            },
        };
        if n == 0 {
            // Half-close: the other side learns there is nothing more, and may still
            // answer what it has.
            let _ = write.shutdown().await;
            return RelayEnd::Closed;
        }
        if let Err(end) = shared.forward(from, &buf[..n], write, events).await {
            shared.stop.notify_one();
            return end;
        }
    }
}

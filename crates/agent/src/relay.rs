//! The relay loop: bytes between the client and the database, unchanged, while
//! `postern_pg::Relay` turns them into audit events.
//!
//! Both directions run at once. A single loop that waits to write to the database while
//! the database waits to write results to us would deadlock on large pipelined batches,
//! so each direction has its own half, and the relay machine sits behind a mutex that is
//! held only for its synchronous `handle_*` calls, never across an await.
//!
//! Audit events are rendered from the relay's borrowed views ([`EventOut`]) and go to a
//! bounded channel. When the consumer falls behind, the relay waits: the session slows
//! down, and no statement runs unaudited or has its event dropped. With a [`Durable`]
//! (the spool's), a chunk is forwarded only once the events it produced are fsync'd:
//! the database sees a client's next bytes only after the events of everything before
//! them are on disk, and the client sees an answer only after its event is. Nothing is
//! logged per message.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use postern_pg::audit::EventView;
use postern_pg::{AuditEvent, Relay};
use postern_rt::ReadBuffer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use crate::spool::Durable;

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
    /// Nothing moved either way for the role's `client_idle_timeout`; the client was
    /// told (SQLSTATE 57P05).
    IdleTimeout(Duration),
    /// The user's certificate expired (role option `disconnect_expired_cert`); the
    /// client was told to log in again (SQLSTATE 57P01).
    CertExpired,
    /// The agent is shutting down ([`Controls::shutdown`]). `told`: the database's
    /// message in flight ended within [`CLOSE_GRACE`], so the client was sent FATAL
    /// 57P01 ([`SHUTDOWN_MESSAGE`]); otherwise it was closed without it.
    Shutdown { told: bool },
}

/// Session limits the relay enforces, driven by `tokio::time` (so simulations control
/// them).
#[derive(Clone, Default)]
pub struct Controls {
    /// End the session after this long without bytes in either direction.
    pub idle_timeout: Option<Duration>,
    /// End the session at this moment: the user's certificate expires. `check` is
    /// asked first, so that a wall clock that moved differently from the monotonic one
    /// decides (it returns how much longer to wait, or `None` when expired).
    pub expires_at: Option<Instant>,
    pub check_expired: Option<Arc<dyn Fn() -> Option<Duration> + Send + Sync>>,
    /// End the session when this turns true (the agent's drain timeout is over): the
    /// database's message in flight is finished, then the client gets FATAL 57P01.
    pub shutdown: Option<watch::Receiver<bool>>,
}

/// Bytes already read from either side during start-up, to be relayed first.
#[derive(Debug, Default)]
pub struct Pending {
    /// What the client sent after its StartupMessage (pipelined queries).
    pub client: Vec<u8>,
    /// What the database sent after its ReadyForQuery.
    pub server: Vec<u8>,
}

/// Where the relay's events go: each is rendered from the relay's borrowed view (with
/// the relay locked, so rendering must not wait), then sent on a bounded channel.
pub struct EventOut<T, F> {
    render: F,
    events: mpsc::Sender<T>,
    /// Wait for the spool's fsync of the last event of each chunk.
    durable: Option<DurableBy<T>>,
}

/// The spool's durability waiters, and how to find an event's key (its id) for them.
struct DurableBy<T> {
    durable: Durable,
    key: fn(&T) -> &str,
}

impl<T, F: Fn(EventView<'_>) -> T> EventOut<T, F> {
    /// Events rendered by `render`, sent on `events`.
    pub fn new(render: F, events: mpsc::Sender<T>) -> Self {
        EventOut {
            render,
            events,
            durable: None,
        }
    }

    /// Forwards a chunk only once the events it produced are fsync'd, as `durable` tells
    /// by each event's `key` (the spool's event id).
    pub fn durable(mut self, durable: Durable, key: fn(&T) -> &str) -> Self {
        self.durable = Some(DurableBy { durable, key });
        self
    }

    fn drain(&self, relay: &mut Relay) -> Vec<T> {
        let mut ready = Vec::new();
        while let Some(event) = relay.poll_event_view() {
            ready.push((self.render)(event));
        }
        ready
    }

    /// Sends `ready` and, with a [`Durable`], waits until the last of them is on disk.
    async fn deliver(&self, ready: Vec<T>) -> Result<(), RelayEnd> {
        let wait = match (&self.durable, ready.last()) {
            (Some(DurableBy { durable, key }), Some(last)) => Some(
                durable
                    .wait_for(key(last))
                    .map_err(|_| RelayEnd::AuditClosed)?,
            ),
            _ => None,
        };
        for event in ready {
            self.events
                .send(event)
                .await
                .map_err(|_| RelayEnd::AuditClosed)?;
        }
        if let Some(wait) = wait {
            wait.wait().await.map_err(|_| RelayEnd::AuditClosed)?;
        }
        Ok(())
    }
}

impl<T, F> std::fmt::Debug for EventOut<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventOut")
            .field("durable", &self.durable.is_some())
            .finish_non_exhaustive()
    }
}

/// Relays until both sides close or one fails, starting with the `pending` bytes. Every
/// event, including those flushed at the end for requests never answered, is sent on
/// `events` (owned, as [`EventView::to_owned`] makes them) before this returns.
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
    let out = EventOut::new(|event: EventView<'_>| event.to_owned(), events);
    run_with_controls(client, server, relay, pending, out, Controls::default()).await
}

/// [`run`] with events rendered and sent as `events` says, ending the session early as
/// `controls` say (idle timeout, certificate expiry, shutdown) with an ErrorResponse to
/// the client that says why.
pub async fn run_with_controls<C, S, T, F>(
    client: C,
    server: S,
    relay: Relay,
    pending: Pending,
    events: EventOut<T, F>,
    controls: Controls,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(EventView<'_>) -> T,
{
    let shared = Shared {
        relay: Mutex::new(relay),
        stop: Notify::new(),
        last_activity: Mutex::new(Instant::now()),
    };
    // The database's direction watches for the agent's shutdown.
    let mut shutdown = controls.shutdown.clone();
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(server);

    let mut end = RelayEnd::Closed;
    let Pending {
        client: pending_client,
        server: pending_server,
    } = pending;
    if !pending_server.is_empty()
        && let Err(e) = shared
            .forward(Side::Server, &pending_server, &mut client_write, &events)
            .await
    {
        end = e;
    }
    if end == RelayEnd::Closed
        && !pending_client.is_empty()
        && let Err(e) = shared
            .forward(Side::Client, &pending_client, &mut server_write, &events)
            .await
    {
        end = e;
    }
    // Forwarded: their buffers (start-up's read buffers, whatever their capacity) are not
    // kept for the session's life.
    drop((pending_client, pending_server));
    if end == RelayEnd::Closed {
        let halves = async {
            let up = half(
                &shared,
                Side::Client,
                &mut client_read,
                &mut server_write,
                &events,
                None,
            );
            let down = half(
                &shared,
                Side::Server,
                &mut server_read,
                &mut client_write,
                &events,
                shutdown.as_mut(),
            );
            tokio::pin!(up, down);
            let (mut up_end, mut down_end) = (None, None);
            while up_end.is_none() || down_end.is_none() {
                tokio::select! {
                    biased;
                    ended = &mut down, if down_end.is_none() => {
                        // At shutdown the client's direction is not waited for: it may
                        // be stuck writing to a database nobody reads from any more.
                        if matches!(ended, RelayEnd::Shutdown { .. }) {
                            return ended;
                        }
                        down_end = Some(ended);
                    }
                    ended = &mut up, if up_end.is_none() => up_end = Some(ended),
                }
            }
            // The first failure explains the end; a clean close of both is Closed.
            [up_end, down_end]
                .into_iter()
                .flatten()
                .find(|e| *e != RelayEnd::Closed)
                .unwrap_or(RelayEnd::Closed)
        };
        // Dropping the halves mid-way is safe for the audit: a chunk's events are sent
        // before any of its bytes are written, so a cancelled chunk never ran.
        end = tokio::select! {
            biased;
            ended = watchdog(&shared, &controls) => ended,
            ended = halves => ended,
        };
    }
    let farewell = match &end {
        RelayEnd::ClientError(message) => Some(postern_pg::BackendMessage::error(
            postern_pg::reply::Severity::Fatal,
            postern_pg::reply::SqlState::PROTOCOL_VIOLATION,
            message,
        )),
        RelayEnd::IdleTimeout(timeout) => Some(fatal(
            IDLE_SESSION_TIMEOUT,
            &format!(
                "terminating connection due to idle-session timeout: nothing was sent for \
                 {} s (role option client_idle_timeout); reconnect to continue",
                timeout.as_secs()
            ),
        )),
        RelayEnd::CertExpired => Some(fatal(
            ADMIN_SHUTDOWN,
            "terminating connection: your Postern certificate expired (role option \
             disconnect_expired_cert); run `postern db login` to get a new one, then reconnect",
        )),
        RelayEnd::Shutdown { told: true } => Some(fatal(ADMIN_SHUTDOWN, SHUTDOWN_MESSAGE)),
        _ => None,
    };
    let told = farewell.is_some();
    if let Some(response) = farewell {
        let mut out = Vec::new();
        if response.encode(&mut out).is_ok() {
            let _ = client_write.write_all(&out).await;
            let _ = client_write.flush().await;
        }
    }
    let _ = client_write.shutdown().await;
    let _ = server_write.shutdown().await;

    let flushed = {
        let mut relay = shared.lock();
        relay.handle_close();
        events.drain(&mut relay)
    };
    if let Err(closed) = Box::pin(events.deliver(flushed)).await {
        return closed;
    }
    if told {
        // A lingering close: the farewell is known to have reached the proxy once the
        // proxy closes its side, which it does after relaying everything before our
        // close. Without the wait, the agent's shutdown could take the tunnel down with
        // the farewell still queued in it. Whatever the client still sends is dropped.
        let _ = tokio::time::timeout(CLOSE_GRACE, until_closed(&mut client_read)).await;
    }
    end
}

/// Reads and drops what `read` still brings until it ends (or fails).
async fn until_closed<R: AsyncRead + Unpin>(read: &mut R) {
    let mut buf = [0u8; 512];
    while let Ok(n) = read.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

struct Shared {
    relay: Mutex<Relay>,
    /// When bytes last moved, either way (for the idle timeout).
    last_activity: Mutex<Instant>,
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

    /// Shows `chunk` to the relay, sends its events (and waits for them to be durable,
    /// if `events` says so), then writes it to the other side.
    async fn forward<W: AsyncWrite + Unpin, T, F: Fn(EventView<'_>) -> T>(
        &self,
        from: Side,
        chunk: &[u8],
        to: &mut W,
        events: &EventOut<T, F>,
    ) -> Result<(), RelayEnd> {
        *self
            .last_activity
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        let (result, ready) = {
            let mut relay = self.lock();
            let result = match from {
                Side::Client => relay.handle_client_bytes(chunk),
                Side::Server => relay.handle_server_bytes(chunk),
            };
            (result, events.drain(&mut relay))
        };
        // Events first: a statement's bytes reach the database only once the events
        // before it are handed to the audit pipeline (and on disk, with a `Durable`).
        // Boxed: the delivery's state (an event being sent) exists only while events
        // are, instead of sizing both halves of every idle session.
        if !ready.is_empty() {
            Box::pin(events.deliver(ready)).await?;
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

/// SQLSTATE 57P05, idle_session_timeout.
pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
/// SQLSTATE 57P01, admin_shutdown: the session was ended from outside.
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// What a client reads when the agent ends its session at shutdown.
pub const SHUTDOWN_MESSAGE: &str = "terminating connection because the Postern database agent \
     is shutting down; reconnect to continue (another agent serving the database, or this one \
     once it restarts, will serve you)";
/// At shutdown, how long a session may take to finish the database's message in flight
/// before it is closed without the ErrorResponse.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Most bytes read at once while finishing the database's message in flight.
const FINISH_CHUNK_SIZE: usize = 16 * 1024;

/// A FATAL ErrorResponse with `code` (one PostgreSQL defines that `SqlState` has no
/// constant for).
fn fatal(code: &str, message: &str) -> postern_pg::BackendMessage {
    use postern_pg::backend::{Fields, field};
    let mut fields = Fields::error(
        postern_pg::reply::Severity::Fatal,
        postern_pg::reply::SqlState::CONNECTION_FAILURE,
        message,
    );
    for (kind, value) in &mut fields.fields {
        if *kind == field::CODE {
            *value = code.as_bytes().to_vec();
        }
    }
    postern_pg::BackendMessage::ErrorResponse(fields)
}

impl std::fmt::Debug for Controls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controls")
            .field("idle_timeout", &self.idle_timeout)
            .field("expires_at", &self.expires_at)
            .field("shutdown", &self.shutdown.is_some())
            .finish_non_exhaustive()
    }
}

/// Returns when a control ends the session; never if there are none.
async fn watchdog(shared: &Shared, controls: &Controls) -> RelayEnd {
    loop {
        let idle_at = controls.idle_timeout.map(|timeout| {
            *shared
                .last_activity
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                + timeout
        });
        let wake = match (idle_at, controls.expires_at) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(at) => at,
                None => return std::future::pending().await,
            },
        };
        tokio::time::sleep_until(wake).await;
        let now = Instant::now();
        if let Some(expires_at) = controls.expires_at
            && now >= expires_at
        {
            match controls.check_expired.as_ref().and_then(|check| check()) {
                // The wall clock says not yet: wait what it says is left.
                Some(left) if !left.is_zero() => {
                    tokio::time::sleep(left).await;
                    return RelayEnd::CertExpired;
                }
                _ => return RelayEnd::CertExpired,
            }
        }
        if let (Some(timeout), Some(_)) = (controls.idle_timeout, idle_at) {
            let last = *shared
                .last_activity
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if now >= last + timeout {
                return RelayEnd::IdleTimeout(timeout);
            }
        }
    }
}

/// One direction: read, show the relay, forward; until EOF, an error, or a stop. The
/// database's direction gets the agent's `shutdown` signal: when it is raised, that
/// direction finishes the message in flight and ends with [`RelayEnd::Shutdown`]. Where
/// the message ends is the relay's to say ([`Relay::server_bytes_to_boundary`]): it has
/// seen every byte forwarded.
async fn half<R, W, T, F>(
    shared: &Shared,
    from: Side,
    read: &mut R,
    write: &mut W,
    events: &EventOut<T, F>,
    mut shutdown: Option<&mut watch::Receiver<bool>>,
) -> RelayEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    F: Fn(EventView<'_>) -> T,
{
    let mut buf = ReadBuffer::default();
    loop {
        let chunk = tokio::select! {
            biased;
            () = shared.stop.notified() => return RelayEnd::Closed,
            () = shutdown_asked(shutdown.as_deref_mut()) => {
                shared.stop.notify_one();
                return finish_message(shared, read, write, events).await;
            }
            read = buf.read(read) => match read {
                Ok(chunk) => chunk,
                Err(e) => {
                    shared.stop.notify_one();
                    return RelayEnd::Io(e.to_string());
                }
            },
        };
        if chunk.is_empty() {
            // Half-close: the other side learns there is nothing more, and may still
            // answer what it has.
            let _ = write.shutdown().await;
            return RelayEnd::Closed;
        }
        if let Err(end) = shared.forward(from, chunk, write, events).await {
            shared.stop.notify_one();
            return end;
        }
    }
}

/// Returns once shutdown is asked; never without a signal, or once its sender is gone.
async fn shutdown_asked(shutdown: Option<&mut watch::Receiver<bool>>) {
    if let Some(asked) = shutdown
        && let Ok(_asked) = asked.wait_for(|asked| *asked).await
    {
        return;
    }
    std::future::pending().await
}

/// Relays the rest of the database's message in flight (within [`CLOSE_GRACE`]), so
/// that the farewell starts at a message boundary. Only whole messages' worth is read:
/// nothing after the boundary is taken from the database.
async fn finish_message<R, W, T, F>(
    shared: &Shared,
    read: &mut R,
    write: &mut W,
    events: &EventOut<T, F>,
) -> RelayEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    F: Fn(EventView<'_>) -> T,
{
    let finish = async {
        let mut buf = Vec::new();
        loop {
            let left = shared.lock().server_bytes_to_boundary();
            let left = match left {
                Some(0) => return RelayEnd::Shutdown { told: true },
                Some(left) => left,
                None => return RelayEnd::Shutdown { told: false },
            };
            buf.resize(left.min(FINISH_CHUNK_SIZE), 0);
            let n = match read.read(&mut buf).await {
                Ok(n) if n > 0 => n,
                _ => return RelayEnd::Shutdown { told: false },
            };
            if let Err(end) = shared.forward(Side::Server, &buf[..n], write, events).await {
                return end;
            }
        }
    };
    tokio::time::timeout(CLOSE_GRACE, finish)
        .await
        .unwrap_or(RelayEnd::Shutdown { told: false })
}

//! From a validated client session to an agent that serves its database.
//!
//! ```text
//! ClientSession ─► candidates (agents with a tunnel serving the route's database)
//!   ─► for each, in the router's order: channel over the tunnel ─► mutual TLS with a
//!      proxy→agent certificate carrying the user's identity ─► peer is an agent host?
//!      (tunnel or TLS failure: try the next agent; any other: stop)
//!   ─► the client's StartupMessage ─► the agent's answer up to ReadyForQuery, parsed
//!      for BackendKeyData (the session's cancel key) ─► bytes both ways until either
//!      side closes
//! ```
//!
//! The agent authorizes, connects to the database and audits; after start-up the proxy
//! only moves bytes, without parsing them and without per-message logging. It does
//! count where each agent→client message ends ([`BackendFrames`]: a type byte and a
//! length), so that a session closed at shutdown ends between two messages with a FATAL
//! ErrorResponse (SQLSTATE 57P01) the client can show ([`relay`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use postern_pg::backend::{BackendMessage, Fields, field};
use postern_pg::frontend::{CancelRequest, ProtocolVersion, StartupMessage, StartupRequest};
use postern_pg::reply::SqlState;
use postern_pg::{Limits, StartupParams};
use postern_pki::tls::{mtls_client_config, peer_host, ring_provider};
use postern_pki::{HostRole, TrustedCa, Validator, VerifiedIdentity, decode_identity_unverified};
use postern_rt::{Connection, Rng, WallClock, monotonic_now};
use postern_tunnel::TunnelId;
use postern_tunnel::proxy::{ChannelRequest, ProxyTunnels};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use crate::postgres::{ClientSession, ClientStream};
use crate::route::{ATTEMPTS_MAX_DEFAULT, AttemptError, Attempts, Health, RouteError};

/// How long the TLS handshake with an agent, inside its channel, may take.
pub const AGENT_HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// Certificates the proxy presents to agents on a user's behalf (usage `db`, the user's
/// identity and route). The auth service signs them in production.
pub trait DbAccessSigner: Send + Sync {
    /// A certificate chain and key for `user`'s session, or why not.
    fn sign(
        &self,
        user: &VerifiedIdentity,
    ) -> impl Future<Output = Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String>>
    + Send;
}

/// Why a session was not carried to an agent. The client was told.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    #[error("{0}")]
    Route(#[from] RouteError),
    #[error("cannot get a certificate for the agent: {0}")]
    Signing(String),
    #[error("cannot write to the client: {0}")]
    Client(std::io::Error),
    #[error("the client certificate has no database route")]
    NoRoute,
    #[error("{0}")]
    Startup(String),
    #[error("the database service closed the connection during start-up")]
    AgentClosed,
}

impl DispatchError {
    /// A short, stable name for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            DispatchError::Route(RouteError::NoCandidates { .. }) => "no_agent",
            DispatchError::Route(RouteError::AllUnreachable { .. }) => "agents_unreachable",
            DispatchError::Route(_) => "refused",
            DispatchError::Signing(_) => "signing",
            DispatchError::Client(_) => "client_io",
            DispatchError::NoRoute => "no_route",
            DispatchError::Startup(_) => "protocol",
            DispatchError::AgentClosed => "agent_closed",
        }
    }
}

/// A session carried to an agent, past start-up: copy bytes between `client` and
/// `agent` until either side closes.
#[derive(Debug)]
pub struct Connected {
    /// The TLS stream to the client.
    pub client: ClientStream,
    /// The mutual-TLS stream to the agent, inside its tunnel channel.
    pub agent: tokio_rustls::client::TlsStream<Connection>,
    /// The tunnel the session runs over (where its cancel requests go).
    pub tunnel: TunnelId,
    /// The agent serving the session.
    pub agent_id: String,
    /// The database (the route's service name).
    pub database: String,
    /// The database's key for CancelRequests of this session, from its BackendKeyData.
    pub backend_key: Option<CancelRequest>,
    /// Where the agent→client stream stands after the start-up answer.
    pub frames: BackendFrames,
}

/// Where the agent→client byte stream stands in PostgreSQL's backend framing: each
/// message is a type byte, a 4-byte big-endian length that counts itself, and the body.
/// Counting only: nothing is parsed or buffered beyond the 5 header bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendFrames {
    /// The current message's header bytes seen so far (`have` of 5).
    header: [u8; 5],
    have: u8,
    /// Body bytes of the current message still to come (once its header is complete).
    body_left: u32,
    /// A length below 4 was seen: message boundaries are unknown from here on.
    lost: bool,
}

impl BackendFrames {
    /// Accounts for `bytes`, which followed the bytes seen so far.
    pub fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.lost {
            if self.have < 5 {
                let at = usize::from(self.have);
                let take = (5 - at).min(bytes.len());
                self.header[at..at + take].copy_from_slice(&bytes[..take]);
                // take <= 5.
                self.have += take as u8;
                bytes = &bytes[take..];
                if self.have == 5 {
                    let [_, a, b, c, d] = self.header;
                    let len = u32::from_be_bytes([a, b, c, d]);
                    match len.checked_sub(4) {
                        Some(0) => self.have = 0,
                        Some(body) => self.body_left = body,
                        None => self.lost = true,
                    }
                }
            } else {
                let take = bytes.len().min(self.body_left as usize);
                // take <= body_left, a u32.
                self.body_left -= take as u32;
                bytes = &bytes[take..];
                if self.body_left == 0 {
                    self.have = 0;
                }
            }
        }
    }

    /// True between two messages.
    pub fn at_boundary(&self) -> bool {
        !self.lost && self.have == 0
    }

    /// How many bytes may be read next without passing the end of the current message
    /// (0 at a boundary); `None` once boundaries are lost.
    pub fn to_boundary(&self) -> Option<usize> {
        if self.lost {
            None
        } else if self.have == 0 {
            Some(0)
        } else if self.have < 5 {
            Some(usize::from(5 - self.have))
        } else {
            Some(self.body_left as usize)
        }
    }
}

/// SQLSTATE 57P01 `admin_shutdown`, as PostgreSQL sends when it is shut down.
const ADMIN_SHUTDOWN: &[u8] = b"57P01";
/// What a client reads when the proxy closes its session at shutdown.
pub const SHUTDOWN_MESSAGE: &str =
    "terminating connection because the Postern proxy is shutting down";
const SHUTDOWN_HINT: &str =
    "reconnect: another proxy, or this one once it restarts, will serve you";
/// Once asked to close, how long a session may take to finish the agent's message in
/// flight before it is closed without the ErrorResponse.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Bytes read at once from either side while bytes keep coming.
const RELAY_CHUNK: usize = 16 * 1024;
/// Bytes read at once from a side that went quiet: what an idle session holds per
/// direction (statements and their answers in OLTP traffic fit it).
const QUIET_CHUNK: usize = 1024;

/// A read buffer that is large only while its side is busy: a read that fills the small
/// buffer brings in a [`RELAY_CHUNK`] one for the next reads, and a read that has to wait
/// gives it back, so idle sessions hold [`QUIET_CHUNK`] bytes per direction.
#[derive(Default)]
struct ReadBuffer {
    quiet: Vec<u8>,
    busy: Option<Vec<u8>>,
    /// The last read filled `quiet`.
    grow: bool,
}

impl ReadBuffer {
    /// Reads once from `from`: the bytes read, empty at EOF.
    async fn read<R: AsyncRead + Unpin>(&mut self, from: &mut R) -> std::io::Result<&[u8]> {
        use std::task::Poll;
        if self.quiet.is_empty() {
            self.quiet = vec![0; QUIET_CHUNK];
        }
        if std::mem::take(&mut self.grow) && self.busy.is_none() {
            self.busy = Some(vec![0; RELAY_CHUNK]);
        }
        let (n, in_busy) = std::future::poll_fn(|cx| {
            if let Some(busy) = &mut self.busy {
                let mut read = tokio::io::ReadBuf::new(busy);
                match std::pin::Pin::new(&mut *from).poll_read(cx, &mut read) {
                    Poll::Ready(result) => {
                        return Poll::Ready(result.map(|()| (read.filled().len(), true)));
                    }
                    // Nothing to read now: give the large buffer back; the next poll
                    // (after the wake this one registered) reads into the small one.
                    Poll::Pending => {
                        self.busy = None;
                        return Poll::Pending;
                    }
                }
            }
            let mut read = tokio::io::ReadBuf::new(&mut self.quiet);
            std::pin::Pin::new(&mut *from)
                .poll_read(cx, &mut read)
                .map(|result| result.map(|()| (read.filled().len(), false)))
        })
        .await?;
        match (in_busy, &self.busy) {
            (true, Some(busy)) => Ok(&busy[..n]),
            _ => {
                self.grow = n == QUIET_CHUNK;
                Ok(&self.quiet[..n])
            }
        }
    }
}

/// How a relayed session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client or the agent closed it.
    Closed,
    /// `closing` asked for it; `told` when the client got the FATAL ErrorResponse (the
    /// agent's message in flight ended within [`CLOSE_GRACE`]).
    ShutDown { told: bool },
}

/// Copies bytes both ways until the agent closes (the client closing only ends the
/// client→agent direction, as in `copy_bidirectional`), or until `closing` turns true:
/// then the client→agent direction stops, the agent→client direction finishes the
/// message it is in (`frames` says where that ends), the client gets a FATAL
/// ErrorResponse with SQLSTATE 57P01, and both are closed.
pub async fn relay<C, A>(
    client: &mut C,
    agent: &mut A,
    mut frames: BackendFrames,
    mut closing: watch::Receiver<bool>,
) -> std::io::Result<Ended>
where
    C: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut agent_read, mut agent_write) = tokio::io::split(agent);
    let upstream = async {
        let mut buf = ReadBuffer::default();
        loop {
            let chunk = buf.read(&mut client_read).await?;
            if chunk.is_empty() {
                break;
            }
            // Flushed per read, not per message: what one read brought goes on at once.
            agent_write.write_all(chunk).await?;
            agent_write.flush().await?;
        }
        agent_write.shutdown().await
    };
    let downstream = async {
        let mut buf = ReadBuffer::default();
        // A dropped sender never asks: stop watching it.
        let mut watching = true;
        loop {
            tokio::select! {
                biased;
                asked = async { closing.wait_for(|closing| *closing).await.is_ok() }, if watching => {
                    if asked {
                        break;
                    }
                    watching = false;
                }
                read = buf.read(&mut agent_read) => {
                    let chunk = read?;
                    if chunk.is_empty() {
                        client_write.shutdown().await?;
                        return Ok(Ended::Closed);
                    }
                    frames.advance(chunk);
                    client_write.write_all(chunk).await?;
                }
            }
        }
        // Closing: finish the message in flight, then tell the client why.
        let finish = async {
            let mut buf = vec![0u8; RELAY_CHUNK];
            while let Some(left) = frames.to_boundary() {
                if left == 0 {
                    return Ok::<bool, std::io::Error>(true);
                }
                let n = agent_read.read(&mut buf[..left.min(RELAY_CHUNK)]).await?;
                if n == 0 {
                    return Ok(false);
                }
                frames.advance(&buf[..n]);
                client_write.write_all(&buf[..n]).await?;
            }
            Ok(false)
        };
        let told = match tokio::time::timeout(CLOSE_GRACE, finish).await {
            Ok(Ok(true)) => {
                client_write.write_all(&shutdown_error()).await?;
                true
            }
            Ok(Ok(false)) | Err(_) => false,
            Ok(Err(error)) => return Err(error),
        };
        client_write.flush().await?;
        client_write.shutdown().await?;
        Ok(Ended::ShutDown { told })
    };
    tokio::pin!(upstream, downstream);
    let mut upstream_done = false;
    loop {
        tokio::select! {
            biased;
            ended = &mut downstream => return ended,
            copied = &mut upstream, if !upstream_done => {
                upstream_done = true;
                copied?;
            }
        }
    }
}

/// FATAL 57P01, encoded.
fn shutdown_error() -> Vec<u8> {
    let fields = Fields {
        fields: vec![
            (field::SEVERITY, b"FATAL".to_vec()),
            (field::SEVERITY_NONLOCALIZED, b"FATAL".to_vec()),
            (field::CODE, ADMIN_SHUTDOWN.to_vec()),
            (field::MESSAGE, SHUTDOWN_MESSAGE.as_bytes().to_vec()),
            (field::HINT, SHUTDOWN_HINT.as_bytes().to_vec()),
        ],
    };
    let mut out = Vec::new();
    // Encoding a few short fields cannot exceed any limit; an empty result only loses
    // the message, not the close.
    let _ = BackendMessage::ErrorResponse(fields).encode(&mut out);
    out
}

/// Most bytes of the agent's start-up answer parsed for the cancel key; past that the
/// rest is copied without parsing (a database sends well under 1 KiB in practice).
pub const GREETING_LEN_MAX: usize = 64 * 1024;

/// Relays the agent's answer to the StartupMessage, message by message, up to
/// ReadyForQuery or an ErrorResponse, and returns the BackendKeyData it carried. Bytes
/// are forwarded unchanged; a malformed or oversized greeting is forwarded as is and
/// ends the parsing (the agent's relay owns the protocol from then on).
async fn relay_greeting(
    agent: &mut tokio_rustls::client::TlsStream<Connection>,
    client: &mut ClientStream,
    limits: &Limits,
) -> Result<(Option<CancelRequest>, BackendFrames), DispatchError> {
    let mut buf = Vec::new();
    let mut seen = 0usize;
    let mut key = None;
    loop {
        match BackendMessage::decode_from(&buf, limits) {
            Ok(Some((message, used))) => {
                seen += used;
                let done = match message {
                    BackendMessage::BackendKeyData {
                        process_id,
                        secret_key,
                    } => {
                        key = Some(CancelRequest {
                            process_id,
                            secret_key,
                        });
                        false
                    }
                    BackendMessage::ReadyForQuery(_) | BackendMessage::ErrorResponse(_) => true,
                    _ => false,
                };
                if done {
                    break;
                }
                if seen > GREETING_LEN_MAX {
                    break;
                }
                client
                    .write_all(&buf[..used])
                    .await
                    .map_err(DispatchError::Client)?;
                buf.drain(..used);
                continue;
            }
            Ok(None) => {}
            Err(_) => break,
        }
        if buf.len() > GREETING_LEN_MAX {
            break;
        }
        match agent.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    client
        .write_all(&buf)
        .await
        .map_err(DispatchError::Client)?;
    client.flush().await.map_err(DispatchError::Client)?;
    // `buf` starts where a message starts: whole messages were drained from its front.
    let mut frames = BackendFrames::default();
    frames.advance(&buf);
    Ok((key, frames))
}

/// How long the proxy→agent certificate signed for one user certificate serves that
/// user's later sessions. Signing goes through the auth service (a request, a signature,
/// a record of the issue), which costs more than the rest of a new session; reusing the
/// result for a short while changes nothing the agent checks: the certificate carries
/// the same identity, and the agent looks the roles up for every session.
pub const SIGNED_REUSE_MAX: Duration = Duration::from_secs(60);
/// A signed certificate is not reused within this long of its expiry.
pub const SIGNED_EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// Most user certificates whose signed proxy→agent TLS configuration is kept.
pub const SIGNED_CACHE_MAX: usize = 1024;

/// A proxy→agent TLS configuration signed for one user certificate.
struct Signed {
    connector: TlsConnector,
    /// When it was signed, on the dispatcher's monotonic clock.
    signed_at: Duration,
    /// The signed certificate's expiry, in seconds since the Unix epoch.
    expires_secs: u64,
}

/// Signed configurations by the DER of the user certificate they were signed for.
#[derive(Default)]
struct SignedCache {
    by_cert: HashMap<Vec<u8>, Signed>,
}

impl SignedCache {
    /// The configuration signed for `cert_der`, if it is recent and far from expiry.
    fn get(&self, cert_der: &[u8], now: Duration, now_secs: u64) -> Option<TlsConnector> {
        let signed = self.by_cert.get(cert_der)?;
        usable(signed, now, now_secs).then(|| signed.connector.clone())
    }

    /// Keeps `signed`; drops what is no longer usable first, and keeps nothing more when
    /// [`SIGNED_CACHE_MAX`] configurations are still usable.
    fn insert(&mut self, cert_der: &[u8], signed: Signed, now: Duration, now_secs: u64) {
        if self.by_cert.len() >= SIGNED_CACHE_MAX {
            self.by_cert.retain(|_, kept| usable(kept, now, now_secs));
        }
        if self.by_cert.len() < SIGNED_CACHE_MAX || self.by_cert.contains_key(cert_der) {
            self.by_cert.insert(cert_der.to_vec(), signed);
        }
    }
}

fn usable(signed: &Signed, now: Duration, now_secs: u64) -> bool {
    now.saturating_sub(signed.signed_at) < SIGNED_REUSE_MAX
        && now_secs.saturating_add(SIGNED_EXPIRY_MARGIN.as_secs()) < signed.expires_secs
}

/// Carries client sessions to agents over their tunnels. One per proxy; cheap to share.
pub struct Dispatcher<S> {
    tunnels: ProxyTunnels,
    signer: S,
    /// Trusts the host CA(s): agents present host certificates of role `agent`.
    host_cas: Vec<TrustedCa>,
    host_validator: Validator,
    clock: WallClock,
    rng: Rng,
    health: Mutex<Health>,
    /// Proxy→agent configurations already signed, reused for [`SIGNED_REUSE_MAX`].
    signed: Mutex<SignedCache>,
    /// Origin of the monotonic time `Health` counts in.
    origin: Instant,
    attempts_max: usize,
    handshake_timeout: Duration,
    /// Bounds the messages parsed in the agent's start-up answer.
    limits: Limits,
}

impl<S> std::fmt::Debug for Dispatcher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("attempts_max", &self.attempts_max)
            .finish_non_exhaustive()
    }
}

impl<S: DbAccessSigner> Dispatcher<S> {
    pub fn new(
        tunnels: ProxyTunnels,
        signer: S,
        host_cas: Vec<TrustedCa>,
        clock: WallClock,
        rng: Rng,
    ) -> Self {
        Self {
            tunnels,
            signer,
            host_validator: Validator::new(host_cas.iter().cloned()),
            host_cas,
            clock,
            rng,
            health: Mutex::new(Health::default()),
            signed: Mutex::new(SignedCache::default()),
            origin: monotonic_now(),
            attempts_max: ATTEMPTS_MAX_DEFAULT,
            handshake_timeout: AGENT_HANDSHAKE_TIMEOUT_DEFAULT,
            limits: Limits::default(),
        }
    }

    /// The tunnels sessions are carried over.
    pub fn tunnels(&self) -> &ProxyTunnels {
        &self.tunnels
    }

    /// How long the TLS handshake with an agent may take
    /// ([`AGENT_HANDSHAKE_TIMEOUT_DEFAULT`] unless set).
    pub fn with_agent_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    fn now(&self) -> Duration {
        monotonic_now().saturating_duration_since(self.origin)
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        // Health is a map of timestamps; any state a panic could leave is valid.
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Carries `session` to an agent serving its database and relays until either side
    /// closes. Refusals reach the client as PostgreSQL errors.
    pub async fn serve(&self, session: Box<ClientSession>) -> Result<(), DispatchError> {
        let Connected {
            mut client,
            mut agent,
            frames,
            ..
        } = self.connect(session).await?;
        // Nobody asks this session to close: the sender is dropped at once.
        let (_, never) = watch::channel(false);
        // Either side closing ends the session; errors here are a peer going away.
        let _ = relay(&mut client, &mut agent, frames, never).await;
        Ok(())
    }

    /// Carries `session` to an agent serving its database, forwards its StartupMessage
    /// and relays the agent's answer up to the end of start-up (ReadyForQuery, or the
    /// error that ends the session), learning the session's cancel key on the way. The
    /// caller then copies bytes both ways. Refusals reach the client as PostgreSQL
    /// errors before this returns them.
    pub async fn connect(&self, session: Box<ClientSession>) -> Result<Connected, DispatchError> {
        let ClientSession {
            identity,
            params,
            stream: mut client,
            pending,
        } = *session;
        let service = match &identity.identity().route {
            Some(route) => route.service.clone(),
            // The front door validated with Purpose::UserDatabase, which requires a route.
            None => return Err(DispatchError::NoRoute),
        };
        let connector = match self.connector(&identity).await {
            Ok(connector) => connector,
            Err(reason) => {
                let message = format!("the proxy cannot reach {service:?} now: {reason}");
                crate::postgres::send_error(
                    &mut client,
                    SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                    &message,
                    None,
                )
                .await
                .map_err(DispatchError::Client)?;
                return Err(DispatchError::Signing(reason));
            }
        };

        let candidates = self.tunnels.candidates(&service);
        let agents: Vec<String> = candidates.iter().map(|c| c.agent.clone()).collect();
        let plan = Attempts::plan(
            &service,
            &agents,
            &self.health(),
            self.now(),
            &self.rng,
            self.attempts_max,
        );
        let mut attempts = match plan {
            Ok(attempts) => attempts,
            Err(e) => return Err(self.refuse(&mut client, e).await),
        };
        let request =
            ChannelRequest::session(service.clone(), client.get_ref().0.get_ref().peer_addr());
        let (agent_id, tunnel, mut agent_stream) = loop {
            let Some(agent) = attempts.next_agent().map(str::to_owned) else {
                // Invariant: handle_failure returns an error once the plan is used up.
                return Err(DispatchError::Route(RouteError::NoCandidates {
                    database: service,
                }));
            };
            let Some(candidate) = candidates.iter().find(|c| c.agent == agent) else {
                continue;
            };
            match self
                .attempt(candidate.tunnel, &agent, &request, &connector)
                .await
            {
                Ok(stream) => {
                    self.health().mark_ok(&agent);
                    break (agent, candidate.tunnel, stream);
                }
                Err(error) => {
                    let outcome =
                        attempts.handle_failure(&agent, error, &mut self.health(), self.now());
                    if let Err(e) = outcome {
                        return Err(self.refuse(&mut client, e).await);
                    }
                }
            }
        };

        let mut startup = Vec::new();
        if let Err(e) = StartupRequest::Startup(startup_message(&params)).encode(&mut startup) {
            let message = format!("the start-up parameters cannot be forwarded: {e}");
            crate::postgres::send_error(&mut client, SqlState::PROTOCOL_VIOLATION, &message, None)
                .await
                .map_err(DispatchError::Client)?;
            return Err(DispatchError::Startup(message));
        }
        startup.extend_from_slice(&pending);
        if agent_stream.write_all(&startup).await.is_err() {
            let message = format!("the database service for {service:?} closed the connection");
            crate::postgres::send_error(&mut client, SqlState::CONNECTION_FAILURE, &message, None)
                .await
                .map_err(DispatchError::Client)?;
            return Err(DispatchError::AgentClosed);
        }
        let (backend_key, frames) =
            relay_greeting(&mut agent_stream, &mut client, &self.limits).await?;
        Ok(Connected {
            client,
            agent: agent_stream,
            tunnel,
            agent_id,
            database: service,
            backend_key,
            frames,
        })
    }

    /// The TLS configuration that presents a proxy→agent certificate for `identity`:
    /// signed now, or signed for the same user certificate less than
    /// [`SIGNED_REUSE_MAX`] ago.
    async fn connector(&self, identity: &VerifiedIdentity) -> Result<TlsConnector, String> {
        let cache = || self.signed.lock().unwrap_or_else(PoisonError::into_inner);
        let now_secs = || self.clock.now().as_secs();
        if let Some(connector) = cache().get(identity.cert_der(), self.now(), now_secs()) {
            return Ok(connector);
        }
        let (chain, key) = self.signer.sign(identity).await?;
        // Only for how long to reuse it; the agent verifies the certificate.
        let expires_secs = chain
            .first()
            .and_then(|cert| decode_identity_unverified(cert).ok())
            .map_or(0, |signed| signed.expires.as_secs());
        let tls = mtls_client_config(
            chain,
            key,
            &self.host_cas,
            ring_provider(),
            Arc::new(self.clock.clone()),
        )
        .map_err(|e| e.to_string())?;
        let connector = TlsConnector::from(tls);
        let signed = Signed {
            connector: connector.clone(),
            signed_at: self.now(),
            expires_secs,
        };
        cache().insert(identity.cert_der(), signed, self.now(), now_secs());
        Ok(connector)
    }

    async fn refuse(
        &self,
        client: &mut crate::postgres::ClientStream,
        error: RouteError,
    ) -> DispatchError {
        let code = match &error {
            RouteError::Refused { .. } => {
                SqlState::SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION
            }
            _ => SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        };
        let _ = crate::postgres::send_error(client, code, &error.to_string(), None).await;
        DispatchError::Route(error)
    }

    /// One agent: a channel over its tunnel, then mutual TLS inside it.
    async fn attempt(
        &self,
        tunnel: postern_tunnel::TunnelId,
        agent: &str,
        request: &ChannelRequest,
        connector: &TlsConnector,
    ) -> Result<tokio_rustls::client::TlsStream<postern_rt::Connection>, AttemptError> {
        let unreachable = |reason: String| AttemptError::Unreachable { reason };
        let channel = self
            .tunnels
            .open_channel(tunnel, request)
            .await
            .map_err(|e| {
                if e.is_tunnel_error() {
                    unreachable(e.to_string())
                } else {
                    AttemptError::Refused {
                        reason: e.to_string(),
                    }
                }
            })?;
        let name = ServerName::try_from(agent.to_owned()).map_err(|_| AttemptError::Refused {
            reason: format!("agent id {agent:?} is not a valid TLS server name"),
        })?;
        let stream = tokio::time::timeout(self.handshake_timeout, connector.connect(name, channel))
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no TLS handshake within {:?}",
                    self.handshake_timeout
                ))
            })?
            .map_err(|e| unreachable(format!("TLS with the agent failed: {e}")))?;
        let certs = stream.get_ref().1.peer_certificates();
        peer_host(
            certs,
            &self.host_validator,
            HostRole::Agent,
            self.clock.now(),
        )
        .map_err(|e| unreachable(format!("the agent's certificate is refused: {e}")))?;
        Ok(stream)
    }
}

/// The StartupMessage to forward: what the client asked for, in a canonical order.
fn startup_message(params: &StartupParams) -> StartupMessage {
    let mut parameters = vec![
        (b"user".to_vec(), params.user.as_bytes().to_vec()),
        (b"database".to_vec(), params.database.as_bytes().to_vec()),
    ];
    for (name, value) in [
        ("application_name", &params.application_name),
        ("options", &params.options),
        ("replication", &params.replication),
    ] {
        if let Some(value) = value {
            parameters.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        }
    }
    for (name, value) in &params.other {
        parameters.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
    }
    StartupMessage {
        version: ProtocolVersion::V3_0,
        parameters,
    }
}

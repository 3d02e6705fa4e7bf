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
//! count where each agent→client message ends ([`Boundaries`]: a type byte and a
//! length), so that a session closed at shutdown ends between two messages with a FATAL
//! ErrorResponse (SQLSTATE 57P01) the client can show ([`relay`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use postern_pg::backend::{BackendMessage, Fields, field};
use postern_pg::frame::Boundaries;
use postern_pg::frontend::{CancelRequest, ProtocolVersion, StartupMessage, StartupRequest};
use postern_pg::reply::SqlState;
use postern_pg::{Limits, StartupParams};
use postern_pki::reuse::IssuedCache;
use postern_pki::tls::{mtls_client_config, peer_host, ring_provider};
use postern_pki::{HostRole, TrustedCa, Validator, VerifiedIdentity, decode_identity_unverified};
use postern_rt::read_buffer::BUSY_CHUNK_SIZE;
use postern_rt::{Connection, ReadBuffer, Rng, WallClock, monotonic_now};
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
    pub frames: Boundaries,
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
    mut frames: Boundaries,
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
                    // Flushed per read: a TLS stream keeps what the socket did not take
                    // at once until the next write or flush, and there may be no next
                    // write (the client waits for this answer).
                    client_write.write_all(chunk).await?;
                    client_write.flush().await?;
                }
            }
        }
        // Closing: finish the message in flight, then tell the client why.
        let finish = async {
            let mut buf = vec![0u8; BUSY_CHUNK_SIZE];
            while let Some(left) = frames.to_boundary() {
                if left == 0 {
                    return Ok::<bool, std::io::Error>(true);
                }
                let n = agent_read
                    .read(&mut buf[..left.min(BUSY_CHUNK_SIZE)])
                    .await?;
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
) -> Result<(Option<CancelRequest>, Boundaries), DispatchError> {
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
    let mut frames = Boundaries::default();
    frames.advance(&buf);
    Ok((key, frames))
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
    /// Proxy→agent TLS configurations already signed, by the DER of the user
    /// certificate they were signed for; reused for [`postern_pki::reuse::REUSE_MAX`].
    signed: Mutex<IssuedCache<Vec<u8>, TlsConnector>>,
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
            signed: Mutex::new(IssuedCache::default()),
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
        // Flushed: TLS keeps what the channel did not take at once until the next write,
        // and the agent answers nothing before it has the StartupMessage.
        let sent = async {
            agent_stream.write_all(&startup).await?;
            agent_stream.flush().await
        };
        if sent.await.is_err() {
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
    /// [`postern_pki::reuse::REUSE_MAX`] ago. The agent checks it the same either way: it carries
    /// the same identity, and the agent looks the roles up for every session.
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
        let key = identity.cert_der().to_vec();
        cache().insert(key, connector.clone(), expires_secs, self.now(), now_secs());
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};

    use super::*;

    /// The client's side is a writer that keeps bytes until flushed, as TLS does with
    /// what the socket did not take at once: the agent's answer must still reach the
    /// client without any further traffic.
    #[tokio::test]
    async fn the_agents_answer_reaches_a_buffering_client_without_more_traffic() {
        let (mut client_app, proxy_client_side) = tokio::io::duplex(4096);
        let (from_client, to_client) = tokio::io::split(proxy_client_side);
        let mut client = tokio::io::join(from_client, BufWriter::new(to_client));
        let (mut agent_app, mut agent) = tokio::io::duplex(4096);
        let (_closing_tx, closing) = watch::channel(false);
        let relayed = tokio::spawn(async move {
            relay(&mut client, &mut agent, Boundaries::default(), closing).await
        });

        let ready_for_query = b"Z\0\0\0\x05I";
        agent_app.write_all(ready_for_query).await.unwrap();
        let mut got = [0u8; 6];
        tokio::time::timeout(Duration::from_secs(5), client_app.read_exact(&mut got))
            .await
            .expect("the answer stayed in the proxy's buffer")
            .unwrap();
        assert_eq!(&got, ready_for_query);

        drop(agent_app);
        let ended = relayed.await.unwrap().unwrap();
        assert_eq!(ended, Ended::Closed);
    }
}

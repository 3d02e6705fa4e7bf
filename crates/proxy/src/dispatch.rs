//! From a validated client session to an agent that serves its database.
//!
//! ```text
//! ClientSession ─► candidates (agents with a tunnel serving the route's database)
//!   ─► for each, in the router's order: channel over the tunnel ─► mutual TLS with a
//!      proxy→agent certificate carrying the user's identity ─► peer is an agent host?
//!      (tunnel or TLS failure: try the next agent; any other: stop)
//!   ─► the client's StartupMessage ─► bytes both ways until either side closes
//! ```
//!
//! The agent authorizes, connects to the database and audits; the proxy only moves
//! bytes after start-up, without parsing them and without per-message logging.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use postern_pg::StartupParams;
use postern_pg::frontend::{ProtocolVersion, StartupMessage, StartupRequest};
use postern_pg::reply::SqlState;
use postern_pki::tls::{mtls_client_config, peer_host, ring_provider};
use postern_pki::{HostRole, TrustedCa, Validator, VerifiedIdentity};
use postern_rt::{Rng, WallClock, monotonic_now};
use postern_tunnel::proxy::{ChannelRequest, ProxyTunnels};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio_rustls::TlsConnector;

use crate::postgres::ClientSession;
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
    /// Origin of the monotonic time `Health` counts in.
    origin: Instant,
    attempts_max: usize,
    handshake_timeout: Duration,
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
            origin: monotonic_now(),
            attempts_max: ATTEMPTS_MAX_DEFAULT,
            handshake_timeout: AGENT_HANDSHAKE_TIMEOUT_DEFAULT,
        }
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
        let ClientSession {
            identity,
            params,
            stream: mut client,
            pending,
        } = *session;
        let service = match &identity.identity().route {
            Some(route) => route.service.clone(),
            // The front door validated with Purpose::UserDatabase, which requires a route.
            None => return Ok(()),
        };
        let (chain, key) = match self.signer.sign(&identity).await {
            Ok(pair) => pair,
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
        let tls = mtls_client_config(
            chain,
            key,
            &self.host_cas,
            ring_provider(),
            Arc::new(self.clock.clone()),
        )
        .map_err(|e| DispatchError::Signing(e.to_string()))?;
        let connector = TlsConnector::from(tls);

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
            Err(e) => return self.refuse(&mut client, e).await,
        };
        let request = ChannelRequest {
            database: service.clone(),
            client_addr: client.get_ref().0.get_ref().peer_addr(),
        };
        let mut agent_stream = loop {
            let Some(agent) = attempts.next_agent().map(str::to_owned) else {
                // Invariant: handle_failure returns an error once the plan is used up.
                return Ok(());
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
                    break stream;
                }
                Err(error) => {
                    let outcome =
                        attempts.handle_failure(&agent, error, &mut self.health(), self.now());
                    if let Err(e) = outcome {
                        return self.refuse(&mut client, e).await;
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
            return Ok(());
        }
        startup.extend_from_slice(&pending);
        if agent_stream.write_all(&startup).await.is_err() {
            let message = format!("the database service for {service:?} closed the connection");
            crate::postgres::send_error(&mut client, SqlState::CONNECTION_FAILURE, &message, None)
                .await
                .map_err(DispatchError::Client)?;
            return Ok(());
        }
        // Either side closing ends the session; errors here are a peer going away.
        let _ = tokio::io::copy_bidirectional(&mut client, &mut agent_stream).await;
        Ok(())
    }

    async fn refuse<T>(
        &self,
        client: &mut crate::postgres::ClientStream,
        error: RouteError,
    ) -> Result<(), T> {
        let code = match &error {
            RouteError::Refused { .. } => {
                SqlState::SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION
            }
            _ => SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        };
        let _ = crate::postgres::send_error(client, code, &error.to_string(), None).await;
        Ok(())
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

//! The PostgreSQL front door: from a new TCP connection to a client whose certificate
//! has been validated and whose StartupMessage has been read.
//!
//! ```text
//! TCP ─► start-up negotiation (postern_pg::Startup) ─► TLS (client cert required)
//!     ─► StartupMessage ─► Validator (chain, time, role, route) ─► ClientSession
//! ```
//!
//! Every refusal after TLS reaches the client as a PostgreSQL `ErrorResponse` with a
//! SQLSTATE and a message that says what to do (an expired certificate says to run
//! `postern db login`), not as a TLS alert. A connection that does not finish start-up
//! within the handshake timeout is closed. One client's bad bytes end only its own
//! connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use postern_pg::backend::BackendMessage;
use postern_pg::frontend::CancelRequest;
use postern_pg::reply::{Severity, SqlState};
use postern_pg::startup::ALPN_POSTGRESQL;
use postern_pg::{Limits, Startup, StartupOutput, StartupParams, TlsMode};
use postern_pki::tls::peer_identity;
use postern_pki::{DbProtocol, Purpose, Validator, VerifiedIdentity, decode_identity_unverified};
use postern_rt::{Connection, WallClock};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// ALPN protocols the PostgreSQL listener accepts: PostgreSQL 17's direct TLS.
pub const ALPN_PROTOCOLS: &[&[u8]] = &[ALPN_POSTGRESQL];

/// The client side of a connection once TLS is up.
pub type ClientStream = TlsStream<Prefixed<Connection>>;

/// What a new connection turned out to be.
#[derive(Debug)]
#[non_exhaustive]
pub enum Accepted {
    /// A client with a validated identity, ready to be routed.
    Session(Box<ClientSession>),
    /// A CancelRequest for a running session (its key identifies the session).
    Cancel(CancelRequest),
}

/// A client whose certificate was validated and whose StartupMessage was read.
#[derive(Debug)]
pub struct ClientSession {
    /// Who the client is and which database its certificate routes to.
    pub identity: VerifiedIdentity,
    /// What the StartupMessage asked for (database user and name, application name...).
    pub params: StartupParams,
    /// The TLS stream to the client.
    pub stream: ClientStream,
    /// Bytes the client sent after its StartupMessage, already read from the stream.
    pub pending: Vec<u8>,
}

impl ClientSession {
    /// Ends the session with a FATAL ErrorResponse: `message` says what happened,
    /// `hint` what the user can do.
    pub async fn refuse(
        mut self,
        code: SqlState,
        message: &str,
        hint: Option<&str>,
    ) -> io::Result<()> {
        send_error(&mut self.stream, code, message, hint).await
    }
}

/// Why a connection did not become a session. The client was told, where it could be.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrontDoorError {
    #[error("client connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("client closed the connection during start-up")]
    ClientClosed,
    #[error("client did not finish start-up within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("TLS handshake with the client failed: {0}")]
    Tls(io::Error),
    #[error("client broke the start-up protocol: {0}")]
    Protocol(postern_pg::Error),
    #[error("client sent data after SSLRequest before the TLS handshake")]
    DataBeforeTls,
    /// A state the start-up machine promises never to reach; a bug, reported not panicked.
    #[error("internal error during start-up: {0}")]
    Unexpected(&'static str),
    #[error("client certificate refused: {0}")]
    Identity(postern_pki::Error),
    #[error("client certificate routes to {protocol:?} database {service:?}, not PostgreSQL")]
    WrongProtocol {
        service: String,
        protocol: DbProtocol,
    },
}

impl FrontDoorError {
    /// A short, stable name for metrics and logs ("tls", "identity", ...).
    pub fn reason(&self) -> &'static str {
        match self {
            FrontDoorError::Io(_) => "io",
            FrontDoorError::ClientClosed => "client_closed",
            FrontDoorError::HandshakeTimeout(_) => "handshake_timeout",
            FrontDoorError::Tls(_) => "tls",
            FrontDoorError::Protocol(_) | FrontDoorError::DataBeforeTls => "protocol",
            FrontDoorError::Unexpected(_) => "internal",
            FrontDoorError::Identity(_) => "identity",
            FrontDoorError::WrongProtocol { .. } => "wrong_protocol",
        }
    }
}

/// Accepts PostgreSQL clients: one value per listener, shared by its connections.
#[derive(Clone)]
pub struct FrontDoor {
    tls: TlsAcceptor,
    validator: Arc<Validator>,
    clock: WallClock,
    /// Limits of the start-up machine; `startup_timeout` bounds the whole start-up
    /// (negotiation, TLS and StartupMessage).
    limits: Limits,
}

impl std::fmt::Debug for FrontDoor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontDoor")
            .field("startup_timeout", &self.limits.startup_timeout)
            .finish_non_exhaustive()
    }
}

impl FrontDoor {
    /// `tls` should come from [`crate::client_auth::server_config`] with
    /// [`ALPN_PROTOCOLS`]; `validator` trusts the cluster's user CAs.
    pub fn new(tls: Arc<ServerConfig>, validator: Arc<Validator>, clock: WallClock) -> Self {
        Self {
            tls: TlsAcceptor::from(tls),
            validator,
            clock,
            limits: Limits::default(),
        }
    }

    /// How long a new connection has to finish start-up (`Limits::startup_timeout`).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.limits.startup_timeout = timeout;
        self
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Runs start-up on a new connection: negotiation, TLS, StartupMessage, identity.
    pub async fn accept(&self, conn: Connection) -> Result<Accepted, FrontDoorError> {
        let timeout = self.limits.startup_timeout;
        match tokio::time::timeout(timeout, self.accept_inner(conn)).await {
            Ok(result) => result,
            Err(_) => Err(FrontDoorError::HandshakeTimeout(timeout)),
        }
    }

    async fn accept_inner(&self, mut conn: Connection) -> Result<Accepted, FrontDoorError> {
        // Time 0 is this accept; `accept` enforces the machine's deadline
        // (limits.startup_timeout) with one timer over the whole start-up.
        let mut machine = Startup::new(self.limits.clone(), TlsMode::Offer, Duration::ZERO);
        let mut buf = Vec::new();
        let step = match negotiate(&mut machine, &mut conn, &mut buf).await {
            Ok(step) => step,
            Err(FrontDoorError::Protocol(e)) => {
                // Before TLS, PostgreSQL too answers in plaintext (e.g. "TLS required").
                send_error(&mut conn, e.sql_state(), &e.to_string(), None)
                    .await
                    .ok();
                return Err(FrontDoorError::Protocol(e));
            }
            Err(e) => return Err(e),
        };
        let direct = match step {
            Step::Cancel(request) => return Ok(Accepted::Cancel(request)),
            // Invariant: in TlsMode::Offer the machine refuses StartupMessage before TLS.
            Step::Startup(_) => {
                return Err(FrontDoorError::Unexpected("StartupMessage before TLS"));
            }
            Step::StartTls => {
                // Plaintext sent after SSLRequest and before our 'S' would be read as if
                // it came over TLS (CVE-2021-23214): refuse it.
                if !buf.is_empty() {
                    let message = "client sent data after SSLRequest before the TLS handshake";
                    send_error(&mut conn, SqlState::PROTOCOL_VIOLATION, message, None)
                        .await
                        .ok();
                    return Err(FrontDoorError::DataBeforeTls);
                }
                false
            }
            Step::DirectTls => true,
        };
        // For direct TLS, the bytes read so far are the start of the ClientHello.
        let prefix = if direct {
            std::mem::take(&mut buf)
        } else {
            Vec::new()
        };
        let mut tls = self
            .tls
            .accept(Prefixed::new(prefix, conn))
            .await
            .map_err(FrontDoorError::Tls)?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        if let Err(e) = machine.handle_tls_established(alpn.as_deref()) {
            send_error(&mut tls, e.sql_state(), &e.to_string(), None)
                .await
                .ok();
            return Err(FrontDoorError::Protocol(e));
        }
        self.inside_tls(machine, tls).await
    }

    /// Runs start-up on a connection whose TLS was already terminated in front of the
    /// front door (the web port's ALPN routing, `postern-postgres`): StartupMessage (an
    /// SSLRequest is answered `N`), identity. The TLS handshake must have demanded a
    /// client certificate, as [`crate::client_auth::server_config`] does.
    pub async fn accept_tls(&self, tls: ClientStream) -> Result<Accepted, FrontDoorError> {
        let timeout = self.limits.startup_timeout;
        let machine = Startup::new(self.limits.clone(), TlsMode::Terminated, Duration::ZERO);
        match tokio::time::timeout(timeout, self.inside_tls(machine, tls)).await {
            Ok(result) => result,
            Err(_) => Err(FrontDoorError::HandshakeTimeout(timeout)),
        }
    }

    /// Runs start-up on a connection routed here by ALPN (`postern-postgres` on the web
    /// port): `hello` holds the bytes already read (the start of the ClientHello). TLS
    /// with this front door's configuration, then as [`FrontDoor::accept_tls`].
    pub async fn accept_routed(
        &self,
        hello: Vec<u8>,
        conn: Connection,
    ) -> Result<Accepted, FrontDoorError> {
        let timeout = self.limits.startup_timeout;
        let machine = Startup::new(self.limits.clone(), TlsMode::Terminated, Duration::ZERO);
        let routed = async {
            let tls = self
                .tls
                .accept(Prefixed::new(hello, conn))
                .await
                .map_err(FrontDoorError::Tls)?;
            self.inside_tls(machine, tls).await
        };
        match tokio::time::timeout(timeout, routed).await {
            Ok(result) => result,
            Err(_) => Err(FrontDoorError::HandshakeTimeout(timeout)),
        }
    }

    /// The part of start-up inside TLS: StartupMessage (or CancelRequest), identity.
    async fn inside_tls(
        &self,
        mut machine: Startup,
        mut tls: ClientStream,
    ) -> Result<Accepted, FrontDoorError> {
        let mut buf = Vec::new();
        let step = match negotiate(&mut machine, &mut tls, &mut buf).await {
            Ok(step) => step,
            Err(FrontDoorError::Protocol(e)) => {
                send_error(&mut tls, e.sql_state(), &e.to_string(), None)
                    .await
                    .ok();
                return Err(FrontDoorError::Protocol(e));
            }
            Err(e) => return Err(e),
        };
        let params = match step {
            Step::Startup(params) => params,
            Step::Cancel(request) => return Ok(Accepted::Cancel(request)),
            // Invariant: after TLS the machine refuses a second SSLRequest itself.
            Step::StartTls | Step::DirectTls => {
                return Err(FrontDoorError::Unexpected("TLS requested twice"));
            }
        };

        let certs = tls.get_ref().1.peer_certificates().map(<[_]>::to_vec);
        let identity = match peer_identity(
            certs.as_deref(),
            &self.validator,
            Purpose::UserDatabase,
            self.clock.now(),
        ) {
            Ok(identity) => identity,
            Err(e) => {
                // Name the user's database in the hint when the certificate says which;
                // the unverified decode is used for wording only, never for a decision.
                let service = certs
                    .as_deref()
                    .and_then(|chain| chain.first())
                    .and_then(|cert| decode_identity_unverified(cert).ok())
                    .and_then(|identity| identity.route)
                    .map(|route| route.service);
                let hint = service.map(|service| {
                    format!("run `postern db login {service}` (after `postern login` if your login expired), then connect again")
                });
                send_error(
                    &mut tls,
                    SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                    &e.to_string(),
                    hint.as_deref(),
                )
                .await
                .ok();
                return Err(FrontDoorError::Identity(e));
            }
        };
        if let Some(route) = &identity.identity().route
            && route.protocol != DbProtocol::Postgres
        {
            let message = format!(
                "your certificate is for the {:?} database {:?}, and this is the PostgreSQL port",
                route.protocol, route.service
            );
            send_error(
                &mut tls,
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                &message,
                Some("use `postern db connect <database>`, which picks the right client and port"),
            )
            .await
            .ok();
            return Err(FrontDoorError::WrongProtocol {
                service: route.service.clone(),
                protocol: route.protocol,
            });
        }
        Ok(Accepted::Session(Box::new(ClientSession {
            identity,
            params,
            stream: tls,
            pending: buf,
        })))
    }
}

/// Where negotiation stopped.
enum Step {
    StartTls,
    DirectTls,
    Cancel(CancelRequest),
    Startup(StartupParams),
}

/// Feeds the start-up machine from `stream` until it asks for TLS or start-up ends.
/// Unused bytes stay in `buf`.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    machine: &mut Startup,
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Step, FrontDoorError> {
    loop {
        let used = machine
            .handle_input(buf)
            .map_err(FrontDoorError::Protocol)?;
        buf.drain(..used);
        while let Some(output) = machine.poll_output() {
            match output {
                StartupOutput::Reply(byte) => {
                    stream.write_all(&[byte]).await?;
                    stream.flush().await?;
                }
                StartupOutput::StartTls => return Ok(Step::StartTls),
                StartupOutput::DirectTls => return Ok(Step::DirectTls),
                StartupOutput::Cancel(request) => return Ok(Step::Cancel(request)),
                StartupOutput::Startup(params) => return Ok(Step::Startup(params)),
                _ => return Err(FrontDoorError::Unexpected("unknown start-up output")),
            }
        }
        if used == 0 || buf.is_empty() {
            // The machine bounds what it will wait for (startup packets are at most
            // 10,000 bytes), so `buf` stays bounded too.
            if stream.read_buf(buf).await? == 0 {
                return Err(FrontDoorError::ClientClosed);
            }
        }
    }
}

/// Sends a FATAL ErrorResponse and closes the stream.
pub(crate) async fn send_error<S: AsyncWrite + Unpin>(
    stream: &mut S,
    code: SqlState,
    message: &str,
    hint: Option<&str>,
) -> io::Result<()> {
    let mut fields = postern_pg::backend::Fields::error(Severity::Fatal, code, message);
    if let Some(hint) = hint {
        fields = fields.with_hint(hint);
    }
    let mut out = Vec::new();
    BackendMessage::ErrorResponse(fields)
        .encode(&mut out)
        .map_err(io::Error::other)?;
    stream.write_all(&out).await?;
    stream.flush().await?;
    stream.shutdown().await
}

/// A stream that yields `prefix` before reading from `inner`: bytes read while sniffing
/// the protocol are handed back to the TLS layer.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    consumed: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            consumed: 0,
            inner,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.consumed < this.prefix.len() {
            let rest = &this.prefix[this.consumed..];
            let n = rest.len().min(out.remaining());
            out.put_slice(&rest[..n]);
            this.consumed += n;
            if this.consumed == this.prefix.len() {
                this.prefix = Vec::new();
                this.consumed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

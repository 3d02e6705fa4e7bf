//! The proxy as one runnable service: every listener, the tunnel server, limits,
//! metrics and graceful shutdown, over the runtime seam ([`postern_rt::Runtime`]).
//!
//! ```text
//! let mut proxy = ProxyService::new(&runtime, config, signer)?;   // inside tokio
//! proxy.register_metrics(&mut registry);                           // served at /metrics
//! let addrs = proxy.bind().await?;                                 // optional: learn ports
//! proxy.run(shutdown_signal).await?;                               // until shutdown, then drain
//! ```
//!
//! Listeners:
//! - **PostgreSQL port** (`listen.postgres`): SSLRequest or direct TLS, client
//!   certificate, then the session is carried to an agent over its tunnel
//!   ([`crate::dispatch`]). A plain CancelRequest is routed to the agent of the session
//!   that owns the key ([`crate::cancel`]); unknown keys are dropped silently.
//! - **web port** (`listen.web`, optional): TLS routing on one port. The ClientHello's
//!   ALPN decides: `postern-postgres` → TLS is terminated here and the PostgreSQL path
//!   runs inside it; anything else (the web API for login and listing, plain HTTP) is
//!   passed through unchanged to `auth_api_addr`, TLS end to end.
//! - **tunnel port** (`listen.tunnel`): agents' SSH reverse tunnels
//!   ([`postern_tunnel::ProxyTunnels`]).
//!
//! Shutdown: when the `shutdown` future given to [`ProxyService::run`] completes, the
//! listeners close at once, running sessions get up to `drain_timeout` to end on their
//! own, and the rest are closed between two of the database's messages with a FATAL
//! ErrorResponse, SQLSTATE 57P01 `admin_shutdown` ([`crate::dispatch::relay`]). Tunnels
//! stay up while draining (sessions run over them).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use postern_pg::backend::{BackendMessage, Fields, field};
use postern_pg::frontend::{CancelRequest, StartupRequest};
use postern_pg::reply::SqlState;
use postern_pki::ssh::ssh_key;
use postern_pki::tls::ring_provider;
use postern_pki::{IssuedCert, PrivateKey, TrustedCa, Validator};
use postern_rt::{Connection, Listener, Runtime};
use postern_tunnel::{ChannelRequest, ProxyTunnels};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cancel::{CANCEL_KEYS_MAX_DEFAULT, CancelKeys, CancelRoute};
use crate::client_auth::{TlsSetupError, server_config};
use crate::dispatch::{CLOSE_GRACE, Connected, DbAccessSigner, Dispatcher, relay};
use crate::limits::UserSlots;
use crate::postgres::{ALPN_PROTOCOLS, Accepted, ClientSession, FrontDoor};

/// The ALPN protocol that routes a web-port connection to the PostgreSQL path.
pub const ALPN_POSTERN_POSTGRES: &[u8] = b"postern-postgres";

/// Default time a new connection has to finish start-up (TLS, StartupMessage).
pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Default most sessions one user may hold through this proxy at once.
pub const CONNECTIONS_PER_USER_MAX_DEFAULT: usize = 100;
/// Default time sessions get to end on their own after shutdown begins.
pub const DRAIN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Most bytes of a web-port ClientHello read before routing it.
pub const CLIENT_HELLO_LEN_MAX: usize = 16 * 1024;
/// How long forwarding one cancel request to its agent may take.
pub const CANCEL_FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLSTATE 53300 `too_many_connections`.
const TOO_MANY_CONNECTIONS: &[u8] = b"53300";

/// Where the proxy listens (`host:port`; port 0 picks a free port, see
/// [`ProxyService::bind`]).
#[derive(Clone, Debug)]
pub struct Listen {
    /// The PostgreSQL port (clients with `sslmode=verify-full` and their certificate).
    pub postgres: String,
    /// The web port with TLS routing by ALPN; `None` for no web port.
    pub web: Option<String>,
    /// The port agents dial for their reverse tunnels.
    pub tunnel: String,
}

/// Limits of the proxy. Each has a default (the `*_DEFAULT` constants).
#[derive(Clone, Debug)]
pub struct ProxyLimits {
    /// A connection that has not finished start-up (negotiation, TLS, StartupMessage)
    /// within this is closed.
    pub handshake_timeout: Duration,
    /// Most sessions one user may hold at once; more are refused with SQLSTATE 53300.
    pub connections_per_user_max: usize,
    /// After shutdown begins, how long running sessions may go on before they are closed.
    pub drain_timeout: Duration,
    /// Most running sessions whose cancel key is remembered ([`crate::cancel`]).
    pub cancel_keys_max: usize,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: HANDSHAKE_TIMEOUT_DEFAULT,
            connections_per_user_max: CONNECTIONS_PER_USER_MAX_DEFAULT,
            drain_timeout: DRAIN_TIMEOUT_DEFAULT,
            cancel_keys_max: CANCEL_KEYS_MAX_DEFAULT,
        }
    }
}

/// Everything the proxy needs; the daemon obtains the certificates from the auth service.
pub struct ProxyServiceConfig {
    /// The cluster this proxy serves: user certificates must name it.
    pub cluster: String,
    pub listen: Listen,
    /// Where the auth service's web API listens (`host:port`): web-port connections
    /// without ALPN `postern-postgres` are passed through to it unchanged. `None`: such
    /// connections are closed.
    pub auth_api_addr: Option<String>,
    /// The proxy's TLS host certificate (role `proxy`, names clients connect by).
    pub host_cert: IssuedCert,
    pub host_key: PrivateKey,
    /// The proxy's SSH host key and certificate from the host CA, for the tunnel port.
    pub ssh_key: ssh_key::PrivateKey,
    pub ssh_cert: ssh_key::Certificate,
    /// User CAs: client certificates must chain to one (several during a rotation).
    pub user_cas: Vec<TrustedCa>,
    /// Host CAs: agents' TLS certificates must chain to one.
    pub host_cas: Vec<TrustedCa>,
    /// The host CAs' SSH keys: agents' SSH certificates must be signed by one.
    pub host_ca_ssh_keys: Vec<ssh_key::PublicKey>,
    pub limits: ProxyLimits,
}

impl std::fmt::Debug for ProxyServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private keys.
        f.debug_struct("ProxyServiceConfig")
            .field("cluster", &self.cluster)
            .field("listen", &self.listen)
            .field("auth_api_addr", &self.auth_api_addr)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Why the proxy could not start. Each says what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    #[error("proxy config: `{field}` {reason}")]
    Config { field: &'static str, reason: String },
    #[error("{0}")]
    Tls(#[from] TlsSetupError),
    #[error("cannot set up the tunnel server: {0}")]
    Tunnel(#[from] postern_tunnel::Error),
    /// Starting from the auth server ([`crate::start`]): a call failed, or what it
    /// answered is unusable.
    #[error("cannot get {what} from the auth service: {reason}")]
    Auth { what: &'static str, reason: String },
    #[error("cannot listen on {addr} ({listener} port): {source}; is another process using it?")]
    Bind {
        listener: &'static str,
        addr: String,
        source: io::Error,
    },
}

/// The addresses the proxy listens on, once bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalAddrs {
    pub postgres: SocketAddr,
    pub web: Option<SocketAddr>,
    pub tunnel: SocketAddr,
}

type Labels = Vec<(&'static str, &'static str)>;

/// The proxy's Prometheus metrics, registered by [`ProxyService::register_metrics`]
/// under `postern_proxy_`: `active_sessions`, `handshakes_total`,
/// `handshake_failures_total{reason}`, `bytes_relayed_total{direction}` (counted per
/// chunk copied), `tunnels_connected`, `cancel_requests_total{outcome}`.
#[derive(Clone, Debug, Default)]
struct ProxyMetrics {
    active_sessions: Gauge,
    handshakes: Counter,
    handshake_failures: Family<Labels, Counter>,
    bytes_relayed: Family<Labels, Counter>,
    cancel_requests: Family<Labels, Counter>,
}

impl ProxyMetrics {
    /// Registers every metric under `postern_proxy_` (`tunnels_connected` is read from
    /// the tunnels at each scrape).
    fn register(&self, registry: &mut Registry, tunnels: ProxyTunnels) {
        let registry = registry.sub_registry_with_prefix("postern_proxy");
        registry.register(
            "active_sessions",
            "Client sessions being relayed to an agent",
            self.active_sessions.clone(),
        );
        registry.register(
            "handshakes",
            "Client connections that started a PostgreSQL start-up",
            self.handshakes.clone(),
        );
        registry.register(
            "handshake_failures",
            "Client connections that did not become a session, by reason",
            self.handshake_failures.clone(),
        );
        registry.register(
            "bytes_relayed",
            "Bytes copied between clients and agents, by direction",
            self.bytes_relayed.clone(),
        );
        registry.register(
            "cancel_requests",
            "PostgreSQL cancel requests received, by outcome",
            self.cancel_requests.clone(),
        );
        registry.register_collector(Box::new(TunnelsConnected(tunnels)));
    }

    fn failure(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    fn cancel(&self, outcome: &'static str) {
        self.cancel_requests
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    fn direction(&self, direction: &'static str) -> Counter {
        self.bytes_relayed
            .get_or_create(&vec![("direction", direction)])
            .clone()
    }
}

/// `tunnels_connected`, read from the tunnel registry at each scrape.
#[derive(Debug)]
struct TunnelsConnected(ProxyTunnels);

impl Collector for TunnelsConnected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(i64::try_from(self.0.tunnels()).unwrap_or(i64::MAX));
        let metric = encoder.encode_descriptor(
            "tunnels_connected",
            "Agents holding a reverse tunnel to this proxy",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// The PostgreSQL port's and the web port's front doors.
struct Doors {
    postgres: FrontDoor,
    web: FrontDoor,
}

/// Builds the front doors for a set of user CAs.
struct DoorMaker {
    host_cert: IssuedCert,
    host_key: PrivateKey,
    handshake_timeout: Duration,
    clock: postern_rt::WallClock,
}

impl DoorMaker {
    fn doors(&self, user_cas: &[TrustedCa]) -> Result<Doors, ProxyError> {
        if user_cas.is_empty() {
            return Err(ProxyError::Config {
                field: "user_cas",
                reason: "is empty: the proxy would trust no client certificate".to_owned(),
            });
        }
        let validator = Arc::new(Validator::new(user_cas.iter().cloned()));
        let door = |alpn: &[&[u8]]| -> Result<FrontDoor, ProxyError> {
            let tls = server_config(
                &self.host_cert,
                &self.host_key,
                user_cas,
                alpn,
                ring_provider(),
                Arc::new(self.clock.clone()),
            )?;
            Ok(FrontDoor::new(tls, validator.clone(), self.clock.clone())
                .with_handshake_timeout(self.handshake_timeout))
        };
        Ok(Doors {
            postgres: door(ALPN_PROTOCOLS)?,
            web: door(&[ALPN_POSTERN_POSTGRES])?,
        })
    }
}

/// A handle on a running proxy's shared state: whoever follows the cluster's CAs (the
/// daemon, the simulator) changes the trusted user CAs through it during a rotation.
pub struct ProxyHandle<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for ProxyHandle<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S> std::fmt::Debug for ProxyHandle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHandle").finish_non_exhaustive()
    }
}

impl<S> ProxyHandle<S> {
    /// New client connections are checked against `user_cas` from now on (both CAs
    /// while a rotation is in flight). Open sessions are not affected.
    pub fn set_user_cas(&self, user_cas: &[TrustedCa]) -> Result<(), ProxyError> {
        let doors = Arc::new(self.shared.door_maker.doors(user_cas)?);
        *self
            .shared
            .doors
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = doors;
        Ok(())
    }
}

/// The proxy service. See the module documentation.
pub struct ProxyService<S> {
    shared: Arc<Shared<S>>,
    listen: Listen,
    drain_timeout: Duration,
    bound: Option<Bound>,
}

impl<S> std::fmt::Debug for ProxyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyService")
            .field("cluster", &self.shared.cluster)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

struct Bound {
    postgres: Listener,
    web: Option<Listener>,
    tunnel: Listener,
    addrs: LocalAddrs,
}

/// What every connection task reads.
struct Shared<S> {
    runtime: Runtime,
    cluster: String,
    /// The front doors, rebuilt when the user CAs change (a CA rotation).
    doors: std::sync::RwLock<Arc<Doors>>,
    /// What the doors are built from.
    door_maker: DoorMaker,
    dispatcher: Dispatcher<S>,
    tunnels: ProxyTunnels,
    auth_api_addr: Option<String>,
    handshake_timeout: Duration,
    users: UserSlots,
    cancels: CancelKeys,
    metrics: ProxyMetrics,
    /// Turns true when the drain timeout ends: sessions then close between two
    /// messages with a FATAL ErrorResponse (57P01).
    closing: watch::Sender<bool>,
}

impl<S: DbAccessSigner + 'static> ProxyService<S> {
    /// Builds the proxy from `config`; `signer` issues the short-lived certificates the
    /// proxy shows agents on a user's behalf (the daemon's is backed by the auth
    /// service). Call inside the tokio runtime that will run it. Nothing listens until
    /// [`ProxyService::bind`] or [`ProxyService::run`].
    pub fn new(
        runtime: &Runtime,
        config: ProxyServiceConfig,
        signer: S,
    ) -> Result<Self, ProxyError> {
        let limits = &config.limits;
        for (field, value) in [
            (
                "limits.connections_per_user_max",
                limits.connections_per_user_max,
            ),
            ("limits.cancel_keys_max", limits.cancel_keys_max),
        ] {
            if value == 0 {
                return Err(ProxyError::Config {
                    field,
                    reason: "must be at least 1".to_owned(),
                });
            }
        }
        if limits.handshake_timeout.is_zero() {
            return Err(ProxyError::Config {
                field: "limits.handshake_timeout",
                reason: "must be greater than zero".to_owned(),
            });
        }
        if config.user_cas.is_empty() {
            return Err(ProxyError::Config {
                field: "user_cas",
                reason: "is empty: the proxy would trust no client certificate".to_owned(),
            });
        }
        let clock = runtime.clock().clone();
        let door_maker = DoorMaker {
            host_cert: config.host_cert,
            host_key: config.host_key,
            handshake_timeout: config.limits.handshake_timeout,
            clock: clock.clone(),
        };
        let doors = door_maker.doors(&config.user_cas)?;
        let tunnels = ProxyTunnels::new(
            runtime,
            postern_tunnel::ProxyConfig::new(
                config.ssh_key,
                config.ssh_cert,
                config.host_ca_ssh_keys,
            ),
        )?;
        let dispatcher = Dispatcher::new(
            tunnels.clone(),
            signer,
            config.host_cas,
            clock,
            runtime.rng().fork(),
        );
        let shared = Shared {
            runtime: runtime.clone(),
            cluster: config.cluster,
            doors: std::sync::RwLock::new(Arc::new(doors)),
            door_maker,
            dispatcher,
            tunnels,
            auth_api_addr: config.auth_api_addr,
            handshake_timeout: config.limits.handshake_timeout,
            users: UserSlots::new(config.limits.connections_per_user_max),
            cancels: CancelKeys::new(config.limits.cancel_keys_max),
            metrics: ProxyMetrics::default(),
            closing: watch::channel(false).0,
        };
        Ok(Self {
            shared: Arc::new(shared),
            listen: config.listen,
            drain_timeout: config.limits.drain_timeout,
            bound: None,
        })
    }

    /// Registers the proxy's metrics (under `postern_proxy_`) for `/metrics`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.shared
            .metrics
            .register(registry, self.shared.tunnels.clone());
    }

    /// A handle to change the trusted user CAs while the proxy runs.
    pub fn handle(&self) -> ProxyHandle<S> {
        ProxyHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The agents' tunnels (for status pages and tests).
    pub fn tunnels(&self) -> &ProxyTunnels {
        &self.shared.tunnels
    }

    /// Binds every listener now and returns their addresses (useful with port 0).
    /// [`ProxyService::run`] binds them itself if this was not called.
    pub async fn bind(&mut self) -> Result<LocalAddrs, ProxyError> {
        if let Some(bound) = &self.bound {
            return Ok(bound.addrs);
        }
        let net = *self.shared.runtime.net();
        let listen = |listener: &'static str, addr: String| async move {
            let bound = net.listen(&addr).await.map_err(|source| ProxyError::Bind {
                listener,
                addr: addr.clone(),
                source,
            })?;
            let local = bound.local_addr().map_err(|source| ProxyError::Bind {
                listener,
                addr,
                source,
            })?;
            Ok::<_, ProxyError>((bound, local))
        };
        let (postgres, postgres_addr) = listen("PostgreSQL", self.listen.postgres.clone()).await?;
        let (tunnel, tunnel_addr) = listen("tunnel", self.listen.tunnel.clone()).await?;
        let (web, web_addr) = match &self.listen.web {
            Some(addr) => {
                let (web, local) = listen("web", addr.clone()).await?;
                (Some(web), Some(local))
            }
            None => (None, None),
        };
        let addrs = LocalAddrs {
            postgres: postgres_addr,
            web: web_addr,
            tunnel: tunnel_addr,
        };
        self.bound = Some(Bound {
            postgres,
            web,
            tunnel,
            addrs,
        });
        Ok(addrs)
    }

    /// Serves every listener until `shutdown` completes, then drains: stops accepting,
    /// lets sessions end on their own for up to `drain_timeout`, and closes the rest.
    /// Dropping the returned future instead closes everything at once.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), ProxyError> {
        self.bind().await?;
        let Some(bound) = self.bound.take() else {
            // Invariant: bind() just stored the listeners.
            return Ok(());
        };
        let Bound {
            postgres,
            web,
            tunnel,
            addrs,
        } = bound;
        tracing::info!(
            postgres = %addrs.postgres,
            web = ?addrs.web,
            tunnel = %addrs.tunnel,
            cluster = %self.shared.cluster,
            "proxy listening"
        );
        // Polled here rather than spawned, so dropping `run` closes the tunnel port at
        // once (a restarted proxy can bind it again).
        let tunnels = self.shared.tunnels.clone();
        let tunnel_server = tunnels.serve(tunnel);
        tokio::pin!(tunnel_server);

        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = postgres.accept() => match accepted {
                    Ok(conn) => {
                        connections.spawn(self.shared.clone().serve_postgres(conn));
                    }
                    Err(error) => tracing::warn!(%error, "accepting a PostgreSQL connection failed"),
                },
                accepted = accept_optional(web.as_ref()) => match accepted {
                    Ok(conn) => {
                        connections.spawn(self.shared.clone().serve_web(conn));
                    }
                    Err(error) => tracing::warn!(%error, "accepting a web-port connection failed"),
                },
                Some(_) = connections.join_next() => {}
                () = &mut tunnel_server => {}
            }
        }

        // Drain: no new connections; running ones get `drain_timeout`.
        drop(postgres);
        drop(web);
        let running = connections.len();
        tracing::info!(
            running,
            drain_timeout = ?self.drain_timeout,
            "proxy shutting down: draining sessions"
        );
        let draining = tokio::time::timeout(self.drain_timeout, async {
            while connections.join_next().await.is_some() {}
        });
        // Sessions run over the tunnels: keep serving them while draining.
        let drained = tokio::select! {
            drained = draining => drained.is_ok(),
            () = &mut tunnel_server => false,
        };
        if !drained {
            tracing::warn!(
                closing = connections.len(),
                "drain timeout reached: closing the remaining sessions"
            );
            // Each session ends its agent's message in flight and tells its client;
            // whatever is left after that (a client not reading) is cut.
            self.shared.closing.send_replace(true);
            let closing = tokio::time::timeout(CLOSE_GRACE * 2, async {
                while connections.join_next().await.is_some() {}
            });
            tokio::select! {
                _ = closing => {}
                () = &mut tunnel_server => {}
            }
            connections.shutdown().await;
        }
        tracing::info!("proxy stopped");
        Ok(())
    }
}

async fn accept_optional(listener: Option<&Listener>) -> io::Result<Connection> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// What the web port's ClientHello asked for.
enum WebRoute {
    Postgres,
    Passthrough,
}

impl<S> Shared<S> {
    fn doors(&self) -> Arc<Doors> {
        self.doors
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl<S: DbAccessSigner + 'static> Shared<S> {
    /// One connection on the PostgreSQL port.
    async fn serve_postgres(self: Arc<Self>, conn: Connection) {
        let peer = conn.peer_addr();
        self.metrics.handshakes.inc();
        let door = self.doors().postgres.clone();
        // Boxed: the handshake's state (a TLS server connection mid-handshake, the
        // start-up machine) is freed when it ends instead of sizing this task, which
        // lives as long as the session.
        let accepted = Box::pin(door.accept(conn)).await;
        self.serve_accepted(accepted, peer).await;
    }

    /// One connection on the web port: route by the ClientHello's ALPN.
    async fn serve_web(self: Arc<Self>, mut conn: Connection) {
        let peer = conn.peer_addr();
        // Boxed, as the handshakes below: a rustls acceptor's state is not kept for the
        // session's life.
        let sniffed = Box::pin(tokio::time::timeout(
            self.handshake_timeout,
            sniff_client_hello(&mut conn),
        ))
        .await;
        let (route, hello) = match sniffed {
            Ok(Ok(sniffed)) => sniffed,
            Ok(Err(error)) => {
                tracing::debug!(?peer, %error, "web-port connection ended before routing");
                return;
            }
            Err(_) => {
                tracing::debug!(?peer, "web-port connection sent no ClientHello in time");
                return;
            }
        };
        match route {
            WebRoute::Postgres => {
                self.metrics.handshakes.inc();
                let door = self.doors().web.clone();
                let accepted = Box::pin(door.accept_routed(hello, conn)).await;
                self.serve_accepted(accepted, peer).await;
            }
            WebRoute::Passthrough => self.pass_through(hello, conn, peer).await,
        }
    }

    /// Passes a web-port connection through to the auth API, unchanged.
    async fn pass_through(&self, hello: Vec<u8>, mut conn: Connection, peer: Option<SocketAddr>) {
        let Some(addr) = &self.auth_api_addr else {
            tracing::debug!(
                ?peer,
                "web-port connection closed: no auth_api_addr to pass it to"
            );
            return;
        };
        let mut upstream = match self.runtime.net().connect(addr).await {
            Ok(upstream) => upstream,
            Err(error) => {
                tracing::warn!(?peer, %addr, %error, "cannot reach the auth API for a web-port connection");
                return;
            }
        };
        let sent = async {
            upstream.write_all(&hello).await?;
            upstream.flush().await
        };
        if sent.await.is_err() {
            return;
        }
        // Either side closing ends it; errors are a peer going away.
        let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
    }

    async fn serve_accepted(
        &self,
        accepted: Result<Accepted, crate::postgres::FrontDoorError>,
        peer: Option<SocketAddr>,
    ) {
        match accepted {
            Ok(Accepted::Session(session)) => self.serve_session(session, peer).await,
            // Boxed: a cancel's state (a channel being opened) is not a session's.
            Ok(Accepted::Cancel(request)) => Box::pin(self.forward_cancel(request, peer)).await,
            Err(error) => {
                self.metrics.failure(error.reason());
                tracing::info!(?peer, reason = error.reason(), %error, "client start-up failed");
            }
        }
    }

    /// A validated client: limits, then an agent, then bytes both ways.
    async fn serve_session(&self, session: Box<ClientSession>, peer: Option<SocketAddr>) {
        let identity = session.identity.identity();
        let user = identity.user.clone();
        if identity.cluster != self.cluster {
            let message = format!(
                "your certificate is for cluster {:?}, and this proxy serves {:?}",
                identity.cluster, self.cluster
            );
            let _ = session
                .refuse(
                    SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                    &message,
                    Some("run `postern login` with this cluster's proxy, then `postern db login`"),
                )
                .await;
            self.metrics.failure("wrong_cluster");
            tracing::info!(?peer, %user, "client refused: certificate of another cluster");
            return;
        }
        let Some(_slot) = self.users.acquire(&user) else {
            let mut session = session;
            let limit = self.users.max();
            let message = format!(
                "too many connections for user {user:?}: the proxy allows {limit} at once (connections_per_user_max)"
            );
            let _ = refuse_too_many(&mut session.stream, &message).await;
            self.metrics.failure("connections_per_user_max");
            tracing::info!(?peer, %user, limit, "client refused: connections_per_user_max reached");
            return;
        };
        // Boxed, and so is what it returns: a task is as large as the largest state it
        // can be in, and connecting (a TLS client connection mid-handshake, the channel
        // open, the greeting) would otherwise size this one for the session's life. The
        // two TLS streams (over a kilobyte each) stay in their box: moved into this
        // task's own state they would take room there once for every place they pass.
        let connected = Box::pin(async { self.dispatcher.connect(session).await.map(Box::new) });
        let mut connected = match connected.await {
            Ok(connected) => connected,
            Err(error) => {
                self.metrics.failure(error.reason());
                tracing::info!(?peer, %user, reason = error.reason(), %error, "session not carried to an agent");
                return;
            }
        };
        let _cancel = connected.backend_key.take().and_then(|key| {
            let route = CancelRoute {
                tunnel: connected.tunnel,
                agent: connected.agent_id.clone(),
                database: connected.database.clone(),
            };
            match self.cancels.register(&key, route) {
                Ok(registration) => Some(registration),
                Err(full) => {
                    let database = &connected.database;
                    tracing::warn!(%user, %database, %full, "session not cancellable");
                    None
                }
            }
        });
        let _active = ActiveSession::start(&self.metrics.active_sessions);
        let Connected {
            client,
            agent,
            agent_id,
            database,
            frames,
            ..
        } = &mut *connected;
        tracing::info!(?peer, %user, %database, agent = %agent_id, "session started");
        let mut client = Counted {
            inner: client,
            read: self.metrics.direction("client_to_database"),
            written: self.metrics.direction("database_to_client"),
            read_total: 0,
            written_total: 0,
        };
        let outcome = relay(&mut client, agent, *frames, self.closing.subscribe()).await;
        let (ended, error) = match outcome {
            Ok(ended) => (Some(ended), None),
            Err(error) => (None, Some(error.to_string())),
        };
        tracing::info!(
            ?peer,
            %user,
            %database,
            agent = %agent_id,
            bytes_from_client = client.read_total,
            bytes_to_client = client.written_total,
            ?ended,
            error,
            "session ended"
        );
    }

    /// Sends a CancelRequest to the agent of the session that owns its key. Unknown keys
    /// are dropped silently, as PostgreSQL does.
    async fn forward_cancel(&self, request: CancelRequest, peer: Option<SocketAddr>) {
        let route = self.cancels.route(&request);
        let Some(route) = route else {
            self.metrics.cancel("unknown_key");
            tracing::debug!(?peer, "cancel request for an unknown key dropped");
            return;
        };
        let mut bytes = Vec::new();
        if StartupRequest::Cancel(request).encode(&mut bytes).is_err() {
            self.metrics.cancel("malformed");
            return;
        }
        let channel_request = ChannelRequest::cancel(route.database.clone(), peer);
        let forwarding = async {
            let mut channel = self
                .tunnels
                .open_channel(route.tunnel, &channel_request)
                .await
                .map_err(|e| e.to_string())?;
            channel.write_all(&bytes).await.map_err(|e| e.to_string())?;
            channel.flush().await.map_err(|e| e.to_string())?;
            channel.shutdown().await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(CANCEL_FORWARD_TIMEOUT, forwarding).await {
            Ok(Ok(())) => {
                self.metrics.cancel("forwarded");
                tracing::info!(?peer, database = %route.database, agent = %route.agent, "cancel request forwarded");
            }
            Ok(Err(error)) => {
                self.metrics.cancel("failed");
                tracing::warn!(?peer, database = %route.database, agent = %route.agent, %error, "cancel request not delivered");
            }
            Err(_) => {
                self.metrics.cancel("failed");
                tracing::warn!(?peer, database = %route.database, agent = %route.agent, "cancel request not delivered in time");
            }
        }
    }
}

/// Reads a web-port connection's first bytes up to a whole ClientHello and decides where
/// it goes. Returns the bytes read, to be replayed to whoever handles it.
async fn sniff_client_hello(conn: &mut Connection) -> io::Result<(WebRoute, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut fed = 0;
    let mut acceptor = rustls::server::Acceptor::default();
    loop {
        if conn.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a ClientHello",
            ));
        }
        // Not TLS (plain HTTP, say): the auth API answers whatever it is.
        if buf.first() != Some(&0x16) {
            return Ok((WebRoute::Passthrough, buf));
        }
        let mut rest = &buf[fed..];
        while !rest.is_empty() {
            match acceptor.read_tls(&mut rest) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        fed = buf.len() - rest.len();
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let postgres = accepted
                    .client_hello()
                    .alpn()
                    .is_some_and(|mut alpn| alpn.any(|p| p == ALPN_POSTERN_POSTGRES));
                let route = if postgres {
                    WebRoute::Postgres
                } else {
                    WebRoute::Passthrough
                };
                return Ok((route, buf));
            }
            Ok(None) if buf.len() <= CLIENT_HELLO_LEN_MAX => {}
            // Not a ClientHello we can read, or too long: let the auth API's TLS answer.
            _ => return Ok((WebRoute::Passthrough, buf)),
        }
    }
}

/// Sends FATAL 53300 (too_many_connections) and closes.
async fn refuse_too_many<W: AsyncWrite + Unpin>(stream: &mut W, message: &str) -> io::Result<()> {
    let fields = Fields {
        fields: vec![
            (field::SEVERITY, b"FATAL".to_vec()),
            (field::SEVERITY_NONLOCALIZED, b"FATAL".to_vec()),
            (field::CODE, TOO_MANY_CONNECTIONS.to_vec()),
            (field::MESSAGE, message.as_bytes().to_vec()),
            (
                field::HINT,
                b"close sessions you no longer use, or ask an administrator to raise the limit"
                    .to_vec(),
            ),
        ],
    };
    let mut out = Vec::new();
    BackendMessage::ErrorResponse(fields)
        .encode(&mut out)
        .map_err(io::Error::other)?;
    stream.write_all(&out).await?;
    stream.flush().await?;
    stream.shutdown().await
}

/// Counts a session in `active_sessions` while it lives.
struct ActiveSession<'a>(&'a Gauge);

impl<'a> ActiveSession<'a> {
    fn start(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for ActiveSession<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The client's stream, counting bytes per chunk copied (never per message).
struct Counted<T> {
    inner: T,
    read: Counter,
    written: Counter,
    read_total: u64,
    written_total: u64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read.inc_by(n);
            self.read_total += n;
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written.inc_by(*n as u64);
            self.written_total += *n as u64;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

//! Proxy-side driver: accepts agents' SSH connections, checks their certificates, keeps
//! the [`Registry`] up to date from their control channels, and opens one channel per
//! client connection toward the agent that should serve it.
//!
//! The registry decides; this file only moves events between it, the network and russh.

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use postern_pki::ssh::{SshExpectation, verify_ssh_cert};
use postern_pki::{HostRole, UnixTime};
use postern_rt::{Connection, Listener, Runtime, WallClock};
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::{Certificate, PrivateKey, PublicKey};
use russh::server::{self, Auth};
use russh::{Channel, ChannelMsg, ChannelOpenFailure, ChannelStream, Disconnect};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;

use crate::control::Control;
use crate::error::Error;
use crate::monotonic::{Monotonic, sleep_until};
use crate::registry::{Candidate, RegistryLimits};
use crate::table::{Closing, TunnelTable};
use crate::{ChannelKind, CloseReason, TunnelId};

/// What a proxy needs to accept tunnels.
#[derive(Clone)]
pub struct ProxyConfig {
    /// The key the host certificate was issued for.
    pub key: PrivateKey,
    /// SSH host certificate from the cluster's host CA (role `proxy`), listing the names
    /// agents dial this proxy by.
    pub cert: Certificate,
    /// The host CA's SSH keys (several during a rotation); agents must present user
    /// certificates signed by one of them.
    pub host_ca_keys: Vec<PublicKey>,
    pub limits: RegistryLimits,
    /// Most SSH connections open at once, authenticated or not.
    pub connections_max: usize,
    /// How long a connection may take from accept to a registered tunnel (SSH
    /// handshake, authentication, control channel) before it is dropped.
    pub handshake_timeout: Duration,
    /// How long an agent may take to accept or refuse a channel before
    /// [`ProxyTunnels::open_channel`] gives up (so the caller can try another agent).
    pub channel_open_timeout: Duration,
}

impl ProxyConfig {
    /// A configuration with the default limits and timeouts.
    pub fn new(key: PrivateKey, cert: Certificate, host_ca_keys: Vec<PublicKey>) -> Self {
        Self {
            key,
            cert,
            host_ca_keys,
            limits: RegistryLimits::default(),
            connections_max: 4096,
            handshake_timeout: Duration::from_secs(10),
            channel_open_timeout: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("ProxyConfig")
            .field("limits", &self.limits)
            .field("connections_max", &self.connections_max)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("channel_open_timeout", &self.channel_open_timeout)
            .finish_non_exhaustive()
    }
}

/// What the proxy asks an agent for when it opens a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelRequest {
    /// The database to connect to (a name the agent announced).
    pub database: String,
    /// The client the channel is for, passed to the agent for its audit log.
    pub client_addr: Option<SocketAddr>,
    /// What the channel carries: a client session, or one cancel request.
    pub kind: ChannelKind,
}

impl ChannelRequest {
    /// A channel for one client session on `database`.
    pub fn session(database: impl Into<String>, client_addr: Option<SocketAddr>) -> Self {
        Self {
            database: database.into(),
            client_addr,
            kind: ChannelKind::Session,
        }
    }

    /// A channel carrying one cancel request for a session on `database`.
    pub fn cancel(database: impl Into<String>, client_addr: Option<SocketAddr>) -> Self {
        Self {
            database: database.into(),
            client_addr,
            kind: ChannelKind::Cancel,
        }
    }
}

/// The proxy's side of every tunnel. Cheap to clone; clones share the tunnels.
#[derive(Clone)]
pub struct ProxyTunnels {
    shared: Arc<Shared>,
}

struct Shared {
    ssh_config: Arc<server::Config>,
    connections_max: usize,
    handshake_timeout: Duration,
    channel_open_timeout: Duration,
    host_ca_keys: Vec<PublicKey>,
    clock: WallClock,
    monotonic: Monotonic,
    tunnels: TunnelTable<server::Handle>,
    /// Wakes [`ProxyTunnels::serve`] when the registry's next timeout may have moved.
    changed: Notify,
}

impl std::fmt::Debug for ProxyTunnels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyTunnels")
            .field("tunnels", &self.tunnels())
            .finish_non_exhaustive()
    }
}

impl ProxyTunnels {
    /// Builds the proxy side. Call inside the runtime that will run it (its monotonic
    /// clock starts here).
    pub fn new(runtime: &Runtime, config: ProxyConfig) -> Result<Self, Error> {
        let tunnels = TunnelTable::new(config.limits)?;
        if config.connections_max == 0 {
            return Err(Error::InvalidConfig {
                field: "connections_max",
                reason: "must be at least 1".to_owned(),
            });
        }
        for (field, timeout) in [
            ("handshake_timeout", config.handshake_timeout),
            ("channel_open_timeout", config.channel_open_timeout),
        ] {
            if timeout.is_zero() {
                return Err(Error::InvalidConfig {
                    field,
                    reason: "must be greater than zero".to_owned(),
                });
            }
        }
        let ssh_config = server::Config {
            keys: vec![config.key],
            certificates: vec![config.cert],
            // Liveness is the registry's heartbeat timeout; this only reaps connections
            // that never authenticate or never open their control channel.
            inactivity_timeout: Some(config.limits.heartbeat_timeout),
            keepalive_interval: None,
            nodelay: true,
            preferred: russh::Preferred {
                cipher: Cow::Borrowed(crate::CIPHER_ORDER),
                ..russh::Preferred::default()
            },
            ..server::Config::default()
        };
        let shared = Shared {
            ssh_config: Arc::new(ssh_config),
            connections_max: config.connections_max,
            handshake_timeout: config.handshake_timeout,
            channel_open_timeout: config.channel_open_timeout,
            host_ca_keys: config.host_ca_keys,
            clock: runtime.clock().clone(),
            monotonic: Monotonic::start(),
            tunnels,
            changed: Notify::new(),
        };
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// Accepts agents on `listener` and runs the registry's timers. Runs until dropped;
    /// dropping it ends every tunnel it accepted.
    pub async fn serve(&self, listener: Listener) {
        let mut sessions = JoinSet::new();
        loop {
            let deadline = self
                .shared
                .tunnels
                .poll_timeout()
                .map(|at| self.shared.monotonic.instant(at));
            tokio::select! {
                biased;
                accepted = listener.accept() => match accepted {
                    Ok(stream) if sessions.len() >= self.shared.connections_max => {
                        tracing::warn!(
                            peer = ?stream.peer_addr(),
                            limit = self.shared.connections_max,
                            "refusing a tunnel connection: connections_max reached"
                        );
                    }
                    Ok(stream) => {
                        sessions.spawn(run_session(self.shared.clone(), stream));
                    }
                    // Per-connection failures (reset before accept, out of descriptors):
                    // the listener itself is still good.
                    Err(error) => tracing::warn!(%error, "accepting a tunnel connection failed"),
                },
                () = self.shared.changed.notified() => {}
                () = sleep_until(deadline) => {
                    let now = self.shared.monotonic.now();
                    self.shared.tunnels.timeout(now);
                }
                Some(_) = sessions.join_next() => {}
            }
            self.shared.apply_outputs();
        }
    }

    /// Agents connected to this proxy that serve `database`, ordered by agent id.
    pub fn candidates(&self, database: &str) -> Vec<Candidate> {
        self.shared.tunnels.candidates(database)
    }

    /// How many agents hold a tunnel to this proxy.
    pub fn tunnels(&self) -> usize {
        self.shared.tunnels.tunnels()
    }

    /// Opens a channel over `tunnel` to the database in `request`. The channel counts
    /// against the tunnel's `channels_per_tunnel_max` until the connection is dropped.
    pub async fn open_channel(
        &self,
        tunnel: TunnelId,
        request: &ChannelRequest,
    ) -> Result<Connection, Error> {
        let (session, agent) = self.shared.tunnels.reserve(tunnel)?;
        // From here on the slot goes back when `slot` is dropped, on every path.
        let slot = ChannelSlot {
            shared: self.shared.clone(),
            tunnel,
        };
        let (client_ip, client_port) = request.client_addr.map_or((String::new(), 0), |a| {
            (a.ip().to_string(), u32::from(a.port()))
        });
        let refused = |reason: String| Error::ChannelRefused {
            agent: agent.clone(),
            database: request.database.clone(),
            reason,
        };
        let opening = session.channel_open_forwarded_tcpip(
            request.database.clone(),
            request.kind.port(),
            client_ip,
            client_port,
        );
        let channel = tokio::time::timeout(self.shared.channel_open_timeout, opening)
            .await
            .map_err(|_| {
                refused(format!(
                    "no answer within {:?} (channel_open_timeout)",
                    self.shared.channel_open_timeout
                ))
            })?
            .map_err(|e| refused(e.to_string()))?;
        let stream = SlotStream {
            inner: channel.into_stream(),
            _slot: slot,
        };
        Ok(Connection::with_addrs(stream, None, request.client_addr))
    }
}

impl Shared {
    /// Performs what the registry asked for: closes the sessions of tunnels it dropped.
    fn apply_outputs(&self) {
        for Closing {
            tunnel,
            agent,
            reason,
            session,
        } in self.tunnels.take_closing()
        {
            tracing::info!(%agent, %tunnel, %reason, "closing tunnel");
            tokio::spawn(disconnect(session, reason));
        }
    }

    /// Forgets `tunnel`; its session, for the caller to close.
    fn tunnel_down(&self, tunnel: TunnelId) -> Option<server::Handle> {
        self.tunnels.tunnel_down(self.monotonic.now(), tunnel)
    }
}

async fn disconnect(session: server::Handle, reason: CloseReason) {
    // Best effort: the session may already be gone.
    let _ = session
        .disconnect(Disconnect::ByApplication, reason.to_string(), String::new())
        .await;
}

/// One agent connection, from accept to its end. A connection that has not registered
/// a tunnel within `handshake_timeout` is dropped.
async fn run_session(shared: Arc<Shared>, stream: Connection) {
    let peer = stream.peer_addr();
    let (registered_tx, registered) = oneshot::channel();
    let handler = ProxyHandler {
        shared: shared.clone(),
        peer,
        agent: None,
        tunnel: None,
        registered: Some(registered_tx),
    };
    let handshake_timer = tokio::time::sleep(shared.handshake_timeout);
    tokio::pin!(handshake_timer);
    let started = tokio::select! {
        biased;
        started = server::run_stream(shared.ssh_config.clone(), stream, handler) => started,
        () = &mut handshake_timer => {
            tracing::debug!(?peer, "tunnel connection dropped: no SSH handshake within handshake_timeout");
            return;
        }
    };
    let mut session = match started {
        Ok(session) => session,
        Err(error) => {
            tracing::debug!(?peer, %error, "agent SSH handshake failed");
            return;
        }
    };
    // russh runs the session on a task of its own: end it when this task ends or is
    // dropped with `serve`.
    let _end = EndOnDrop(Some(session.handle()));
    let registered = tokio::select! {
        biased;
        ended = &mut session => {
            if let Err(error) = ended {
                tracing::debug!(?peer, %error, "agent SSH session ended before registering");
            }
            return;
        }
        // An error means the handler is gone, and with it the session.
        registered = registered => registered.is_ok(),
        () = &mut handshake_timer => false,
    };
    if !registered {
        tracing::warn!(
            ?peer,
            "tunnel connection dropped: not registered within handshake_timeout"
        );
        return;
    }
    if let Err(error) = session.await {
        tracing::debug!(?peer, %error, "agent SSH session ended");
    }
}

/// Wall-clock time left until `valid_before`, to turn a certificate's expiry into a
/// deadline on the cores' monotonic scale. Whole seconds, as SSH certificates count.
pub(crate) fn remaining(clock: &WallClock, valid_before: UnixTime) -> Duration {
    Duration::from_secs(valid_before.as_secs().saturating_sub(clock.now().as_secs()))
}

/// Disconnects a session when dropped (a no-op for a session that already ended).
struct EndOnDrop(Option<server::Handle>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        // Without a runtime (it is shutting down) the session task dies with it anyway.
        if let (Some(session), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(disconnect(session, CloseReason::Shutdown));
        }
    }
}

/// russh's callbacks for one agent connection.
struct ProxyHandler {
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    /// Set once the agent's certificate is verified: its id and certificate expiry.
    agent: Option<(String, UnixTime)>,
    /// Set once the agent opened its control channel and was registered.
    tunnel: Option<TunnelId>,
    /// Told when the tunnel is registered (ends the handshake timeout).
    registered: Option<oneshot::Sender<()>>,
}

impl server::Handler for ProxyHandler {
    type Error = russh::Error;

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let expected = SshExpectation {
            cert_type: CertType::User,
            role: HostRole::Agent,
            principal: user,
        };
        let now = self.shared.clock.now();
        match verify_ssh_cert(certificate, expected, &self.shared.host_ca_keys, now) {
            Ok(verified) => {
                self.agent = Some((verified.key_id().to_owned(), verified.valid_before()));
                Ok(Auth::Accept)
            }
            Err(error) => {
                tracing::warn!(peer = ?self.peer, %error, "refused an agent's SSH certificate");
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<server::Msg>,
        reply: server::ChannelOpenHandle,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        // Only an authenticated agent, and only one control channel per connection.
        let Some((agent, valid_before)) = self.agent.clone().filter(|_| self.tunnel.is_none())
        else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let now = self.shared.monotonic.now();
        let cert_expires = now + remaining(&self.shared.clock, valid_before);
        let registered = self
            .shared
            .tunnels
            .tunnel_up(now, &agent, cert_expires, session.handle());
        match registered {
            Ok(tunnel) => {
                tracing::info!(%agent, %tunnel, peer = ?self.peer, "tunnel up");
                self.tunnel = Some(tunnel);
                if let Some(registered) = self.registered.take() {
                    // An error means run_session gave up on this connection already.
                    let _ = registered.send(());
                }
                reply.accept().await;
                tokio::spawn(run_control(self.shared.clone(), tunnel, channel));
                self.shared.apply_outputs();
                self.shared.changed.notify_one();
            }
            Err(error) => {
                tracing::warn!(%agent, %error, "refused a tunnel");
                reply.reject(ChannelOpenFailure::ResourceShortage).await;
            }
        }
        Ok(())
    }
}

impl Drop for ProxyHandler {
    fn drop(&mut self) {
        // The SSH session is over: whatever its control channel did, the tunnel is gone.
        if let Some(tunnel) = self.tunnel {
            self.shared.tunnel_down(tunnel);
        }
    }
}

/// Reads an agent's control channel: database lists and heartbeats (answered at once).
async fn run_control(shared: Arc<Shared>, tunnel: TunnelId, mut channel: Channel<server::Msg>) {
    if let Err(error) = serve_control(&shared, tunnel, &mut channel).await {
        tracing::warn!(%tunnel, %error, "closing tunnel after a control channel error");
    }
    if let Some(session) = shared.tunnel_down(tunnel) {
        disconnect(session, CloseReason::ControlClosed).await;
    }
}

async fn serve_control(
    shared: &Shared,
    tunnel: TunnelId,
    channel: &mut Channel<server::Msg>,
) -> Result<(), Error> {
    let mut inbound = Vec::new();
    let mut out = Vec::new();
    while let Some(message) = channel.wait().await {
        let data = match message {
            ChannelMsg::Data { data } => data,
            ChannelMsg::Eof | ChannelMsg::Close => break,
            _ => continue,
        };
        inbound.extend_from_slice(&data);
        while let Some((message, used)) = Control::decode(&inbound)? {
            inbound.drain(..used);
            let now = shared.monotonic.now();
            match message {
                Control::Heartbeat => {
                    shared.tunnels.heartbeat(now, tunnel)?;
                    out.clear();
                    Control::HeartbeatAck.encode(&mut out)?;
                    channel.data(&out[..]).await.map_err(|source| Error::Ssh {
                        context: format!("answering a heartbeat on tunnel {tunnel}"),
                        source,
                    })?;
                }
                Control::Databases(databases) => {
                    shared.tunnels.announce(now, tunnel, databases)?;
                }
                Control::HeartbeatAck => {
                    return Err(Error::ControlMalformed {
                        reason: "a heartbeat acknowledgement from an agent".to_owned(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// A held channel slot of a tunnel; gives it back when dropped.
struct ChannelSlot {
    shared: Arc<Shared>,
    tunnel: TunnelId,
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.shared.tunnels.release(self.tunnel);
    }
}

/// A channel's byte stream that holds its slot for as long as it lives.
struct SlotStream {
    inner: ChannelStream<server::Msg>,
    _slot: ChannelSlot,
}

impl AsyncRead for SlotStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SlotStream {
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

//! Agent-side driver: dials every proxy the [`Pool`] says over SSH (russh), keeps the
//! tunnels alive with heartbeats, and hands each channel a proxy opens to the caller.
//!
//! The pool decides; this file only moves events between it, the network and russh.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use postern_pki::ssh::{SshExpectation, verify_ssh_cert};
use postern_pki::{HostRole, UnixTime};
use postern_rt::{Connection, Net, Runtime, WallClock};
use russh::client;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::{Algorithm, Certificate, PrivateKey, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelOpenFailure, Disconnect};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};

use crate::control::Control;
use crate::error::Error;
use crate::monotonic::{Monotonic, sleep_until};
use crate::pool::{Pool, PoolConfig, PoolOutput, ProxyState};
use crate::proxy::remaining;
use crate::{ChannelKind, TunnelId};

/// What an agent needs to hold tunnels.
#[derive(Clone)]
pub struct AgentConfig {
    /// This agent's host id: its SSH user name, and a principal of its certificate.
    pub agent_id: String,
    /// The key the certificate was issued for.
    pub key: PrivateKey,
    /// SSH user certificate from the cluster's host CA (role `agent`).
    pub cert: Certificate,
    /// The host CA's SSH keys (several during a rotation); proxies must present host
    /// certificates signed by one of them.
    pub host_ca_keys: Vec<PublicKey>,
    /// Databases this agent serves: announced on every tunnel (again whenever the list
    /// changes), and the only names a channel may ask for.
    pub databases: watch::Receiver<Vec<String>>,
    /// Reconnect and heartbeat timers.
    pub pool: PoolConfig,
    /// Most accepted channels waiting for the caller to take them; more are refused.
    pub channel_queue_max: usize,
}

/// A connection a proxy opened through a tunnel, on behalf of one client.
#[derive(Debug)]
pub struct IncomingChannel {
    /// The proxy it came through (as dialled).
    pub proxy: String,
    /// The database the proxy asked for (one of [`AgentConfig::databases`]).
    pub database: String,
    /// The client's address as the proxy reported it.
    pub client_addr: String,
    pub client_port: u32,
    /// What the channel carries: a client session, or one cancel request.
    pub kind: ChannelKind,
    /// The channel's bytes.
    pub connection: Connection,
}

impl IncomingChannel {
    /// What the channel carries: serve [`ChannelKind::Session`] as a client session and
    /// [`ChannelKind::Cancel`] as one cancel request.
    pub fn kind(&self) -> ChannelKind {
        self.kind
    }
}

/// The agent's tunnels at a glance (for status pages, metrics and tests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// Proxies with a tunnel up.
    pub connected: BTreeSet<String>,
    /// Connection attempts started since the agent started.
    pub attempts: u64,
    /// Why the last tunnel failed or ended.
    pub last_error: Option<String>,
}

/// The agent's tunnel driver. Build with [`Agent::new`], then [`Agent::run`].
pub struct Agent {
    shared: Arc<Shared>,
    net: Net,
    pool: Pool,
    status: watch::Sender<AgentStatus>,
}

/// What every tunnel task reads.
struct Shared {
    agent_id: String,
    key: Arc<PrivateKey>,
    cert: Certificate,
    host_ca_keys: Vec<PublicKey>,
    databases: watch::Receiver<Vec<String>>,
    clock: WallClock,
    ssh_config: Arc<client::Config>,
    channels: mpsc::Sender<IncomingChannel>,
}

impl AgentConfig {
    /// A configuration with the default timers and limits.
    pub fn new(
        agent_id: String,
        key: PrivateKey,
        cert: Certificate,
        host_ca_keys: Vec<PublicKey>,
        databases: watch::Receiver<Vec<String>>,
    ) -> Self {
        Self {
            agent_id,
            key,
            cert,
            host_ca_keys,
            databases,
            pool: PoolConfig::default(),
            channel_queue_max: 64,
        }
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("AgentConfig")
            .field("agent_id", &self.agent_id)
            .field("databases", &*self.databases.borrow())
            .field("pool", &self.pool)
            .field("channel_queue_max", &self.channel_queue_max)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("agent_id", &self.shared.agent_id)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// Reports from tunnel tasks to the driver loop.
#[derive(Debug)]
enum Event {
    Up {
        tunnel: TunnelId,
        /// Time left on the proxy's certificate.
        cert_remaining: Duration,
    },
    HeartbeatAck {
        tunnel: TunnelId,
    },
    Down {
        tunnel: TunnelId,
        error: Error,
    },
}

#[derive(Debug)]
struct TunnelTask {
    proxy: String,
    heartbeats: mpsc::UnboundedSender<()>,
    abort: AbortHandle,
}

impl Agent {
    /// Builds the agent; channels that proxies open arrive on the returned receiver.
    pub fn new(
        runtime: &Runtime,
        config: AgentConfig,
    ) -> Result<(Self, mpsc::Receiver<IncomingChannel>), Error> {
        if config.channel_queue_max == 0 {
            return Err(Error::InvalidConfig {
                field: "channel_queue_max",
                reason: "must be at least 1".to_owned(),
            });
        }
        let pool = Pool::new(config.pool, runtime.rng().fork())?;
        let (channels, incoming) = mpsc::channel(config.channel_queue_max);
        let ssh_config = client::Config {
            // Liveness is decided by the pool's heartbeats, not by russh.
            inactivity_timeout: None,
            keepalive_interval: None,
            nodelay: true,
            preferred: russh::Preferred {
                // Ask proxies for their host certificate, never a bare key.
                host_key_certificates: Cow::Owned(vec![Algorithm::Ed25519]),
                // The client's order decides the cipher.
                cipher: Cow::Borrowed(crate::CIPHER_ORDER),
                ..russh::Preferred::default()
            },
            ..client::Config::default()
        };
        let shared = Shared {
            agent_id: config.agent_id,
            key: Arc::new(config.key),
            cert: config.cert,
            host_ca_keys: config.host_ca_keys,
            databases: config.databases,
            clock: runtime.clock().clone(),
            ssh_config: Arc::new(ssh_config),
            channels,
        };
        let agent = Self {
            shared: Arc::new(shared),
            net: *runtime.net(),
            pool,
            status: watch::Sender::new(AgentStatus::default()),
        };
        Ok((agent, incoming))
    }

    /// Follows the agent's tunnels as they come and go.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// Holds a tunnel to every proxy in `proxies` (which may change at any time) until
    /// the sender of `proxies` is dropped; then closes every tunnel and returns.
    pub async fn run(mut self, mut proxies: watch::Receiver<Vec<String>>) {
        let clock = Monotonic::start();
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let mut tunnels: HashMap<TunnelId, TunnelTask> = HashMap::new();
        // Dropping the set (when this function returns) aborts every tunnel task.
        let mut tasks = JoinSet::new();
        let initial = proxies.borrow_and_update().clone();
        self.set_proxies(clock.now(), initial);
        loop {
            while let Some(output) = self.pool.poll_output() {
                self.perform(output, &mut tunnels, &mut tasks, &events_tx);
            }
            let deadline = self.pool.poll_timeout().map(|at| clock.instant(at));
            tokio::select! {
                biased;
                changed = proxies.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let list = proxies.borrow_and_update().clone();
                    self.set_proxies(clock.now(), list);
                }
                Some(event) = events.recv() => self.handle_event(clock.now(), event, &mut tunnels),
                () = sleep_until(deadline) => self.pool.handle_timeout(clock.now()),
                Some(_) = tasks.join_next() => {}
            }
        }
    }

    fn set_proxies(&mut self, now: Duration, proxies: Vec<String>) {
        if let Err(error) = self.pool.handle_proxies(now, proxies) {
            tracing::error!(%error, "proxy list refused; keeping the previous one");
        }
    }

    fn perform(
        &mut self,
        output: PoolOutput,
        tunnels: &mut HashMap<TunnelId, TunnelTask>,
        tasks: &mut JoinSet<()>,
        events: &mpsc::UnboundedSender<Event>,
    ) {
        match output {
            PoolOutput::Connect { proxy, tunnel } => {
                let (heartbeats, heartbeats_rx) = mpsc::unbounded_channel();
                let task = run_tunnel(
                    self.shared.clone(),
                    self.net,
                    proxy.clone(),
                    tunnel,
                    events.clone(),
                    heartbeats_rx,
                );
                let abort = tasks.spawn(task);
                tunnels.insert(
                    tunnel,
                    TunnelTask {
                        proxy,
                        heartbeats,
                        abort,
                    },
                );
                self.status.send_modify(|s| s.attempts += 1);
            }
            PoolOutput::Close {
                proxy,
                tunnel,
                reason,
            } => {
                tracing::info!(%proxy, %tunnel, %reason, "closing tunnel");
                if let Some(task) = tunnels.remove(&tunnel) {
                    task.abort.abort();
                }
                self.status.send_modify(|s| {
                    s.connected.remove(&proxy);
                    s.last_error = Some(format!("tunnel to {proxy} closed: {reason}"));
                });
            }
            PoolOutput::SendHeartbeat { tunnel, .. } => {
                if let Some(task) = tunnels.get(&tunnel) {
                    // A send error means the task has ended; its Down event is queued.
                    let _ = task.heartbeats.send(());
                }
            }
        }
    }

    fn handle_event(
        &mut self,
        now: Duration,
        event: Event,
        tunnels: &mut HashMap<TunnelId, TunnelTask>,
    ) {
        match event {
            Event::Up {
                tunnel,
                cert_remaining,
            } => {
                self.pool
                    .handle_connected(now, tunnel, now.saturating_add(cert_remaining));
                if let Some(task) = tunnels.get(&tunnel)
                    && self.pool.state(&task.proxy) == Some(ProxyState::Connected { tunnel })
                {
                    tracing::info!(proxy = %task.proxy, %tunnel, "tunnel up");
                    let proxy = task.proxy.clone();
                    self.status.send_modify(|s| {
                        s.connected.insert(proxy);
                    });
                }
            }
            Event::HeartbeatAck { tunnel } => self.pool.handle_heartbeat_ack(now, tunnel),
            Event::Down { tunnel, error } => {
                // Tunnels the pool already closed were removed from `tunnels` then.
                if let Some(task) = tunnels.remove(&tunnel) {
                    tracing::warn!(proxy = %task.proxy, %tunnel, %error, "tunnel down");
                    self.pool.handle_tunnel_down(now, tunnel);
                    self.status.send_modify(|s| {
                        s.connected.remove(&task.proxy);
                        s.last_error = Some(error.to_string());
                    });
                }
            }
        }
    }
}

/// One tunnel, from dialling to its end, reported as events.
async fn run_tunnel(
    shared: Arc<Shared>,
    net: Net,
    proxy: String,
    tunnel: TunnelId,
    events: mpsc::UnboundedSender<Event>,
    mut heartbeats: mpsc::UnboundedReceiver<()>,
) {
    let error = match hold_tunnel(&shared, net, &proxy, tunnel, &events, &mut heartbeats).await {
        Ok(()) => Error::TunnelClosed {
            peer: format!("proxy {proxy}"),
            reason: "closed by the proxy".to_owned(),
        },
        Err(error) => error,
    };
    // A send error means the driver loop is gone; nobody is left to tell.
    let _ = events.send(Event::Down { tunnel, error });
}

async fn hold_tunnel(
    shared: &Arc<Shared>,
    net: Net,
    proxy: &str,
    tunnel: TunnelId,
    events: &mpsc::UnboundedSender<Event>,
    heartbeats: &mut mpsc::UnboundedReceiver<()>,
) -> Result<(), Error> {
    let ssh = |context: &str| {
        let context = format!("{context} proxy {proxy}");
        move |source| Error::Ssh { context, source }
    };
    let stream = net.connect(proxy).await.map_err(|source| Error::Io {
        context: format!("connecting to proxy {proxy}"),
        source,
    })?;
    let verdict = Arc::new(Mutex::new(None));
    let handler = AgentHandler {
        shared: shared.clone(),
        proxy: proxy.to_owned(),
        verdict: verdict.clone(),
    };
    let connected = client::connect_stream(shared.ssh_config.clone(), stream, handler).await;
    let verdict = verdict
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    let (mut session, proxy_cert_expires) = match (connected, verdict) {
        (Ok(session), Some(Ok(expires))) => (session, expires),
        (_, Some(Err(refused))) => return Err(refused),
        (Err(source), _) => return Err(ssh("SSH handshake with")(source)),
        // russh completes a handshake only after check_server_key accepted the proxy.
        (Ok(_), None) => {
            return Err(Error::NoPeerCertificate {
                peer: format!("proxy {proxy}"),
            });
        }
    };
    let auth = session
        .authenticate_openssh_cert(
            shared.agent_id.clone(),
            shared.key.clone(),
            shared.cert.clone(),
        )
        .await
        .map_err(ssh("authenticating to"))?;
    if !auth.success() {
        return Err(Error::AuthenticationRefused {
            proxy: proxy.to_owned(),
        });
    }
    let mut control = session
        .channel_open_session()
        .await
        .map_err(ssh("opening the control channel to"))?;
    let mut out = Vec::new();
    let mut databases = shared.databases.clone();
    let list = databases.borrow_and_update().clone();
    Control::Databases(list).encode(&mut out)?;
    control
        .data(&out[..])
        .await
        .map_err(ssh("announcing databases to"))?;
    // Once the list's sender is gone, the list can no longer change.
    let mut databases_open = true;
    // A send error means the driver loop is gone; the task is about to be dropped.
    let _ = events.send(Event::Up {
        tunnel,
        cert_remaining: remaining(&shared.clock, proxy_cert_expires),
    });

    let mut inbound = Vec::new();
    // Heartbeats sent and not yet answered: each answer must match one, so a proxy
    // cannot flood the driver with events.
    let mut unanswered: u64 = 0;
    loop {
        tokio::select! {
            biased;
            beat = heartbeats.recv() => {
                if beat.is_none() {
                    break;
                }
                out.clear();
                Control::Heartbeat.encode(&mut out)?;
                control.data(&out[..]).await.map_err(ssh("sending a heartbeat to"))?;
                unanswered += 1;
            }
            changed = databases.changed(), if databases_open => {
                if changed.is_err() {
                    databases_open = false;
                    continue;
                }
                let list = databases.borrow_and_update().clone();
                out.clear();
                match Control::Databases(list).encode(&mut out) {
                    Ok(()) => control.data(&out[..]).await.map_err(ssh("announcing databases to"))?,
                    // Keep serving what was announced before rather than drop the tunnel.
                    Err(error) => tracing::error!(%error, "database list not announced"),
                }
            }
            message = control.wait() => match message {
                Some(ChannelMsg::Data { data }) => {
                    inbound.extend_from_slice(&data);
                    while let Some((message, used)) = Control::decode(&inbound)? {
                        inbound.drain(..used);
                        if message != Control::HeartbeatAck {
                            return Err(Error::ControlMalformed {
                                reason: format!("proxy {proxy} sent {message:?}, which only agents send"),
                            });
                        }
                        if unanswered == 0 {
                            return Err(Error::ControlMalformed {
                                reason: format!("proxy {proxy} answered a heartbeat that was never sent"),
                            });
                        }
                        unanswered -= 1;
                        let _ = events.send(Event::HeartbeatAck { tunnel });
                    }
                }
                Some(ChannelMsg::Eof | ChannelMsg::Close) | None => return Ok(()),
                Some(_) => {}
            },
        }
    }
    // Best effort: the proxy learns at once instead of at its heartbeat timeout.
    let _ = session
        .disconnect(Disconnect::ByApplication, "agent closed the tunnel", "")
        .await;
    Ok(())
}

/// russh's callbacks for one tunnel: checks the proxy's host certificate and accepts
/// channels for the databases this agent serves.
struct AgentHandler {
    shared: Arc<Shared>,
    proxy: String,
    /// The verdict on the proxy's host certificate: its expiry, or why it was refused.
    verdict: Arc<Mutex<Option<Result<UnixTime, Error>>>>,
}

impl AgentHandler {
    fn check_proxy(&self, key: &PublicKeyOrCertificate) -> Result<UnixTime, Error> {
        let peer = format!("proxy {}", self.proxy);
        let Some(cert) = key.certificate() else {
            return Err(Error::NoPeerCertificate { peer });
        };
        let expected = SshExpectation {
            cert_type: CertType::Host,
            role: HostRole::Proxy,
            principal: host_of(&self.proxy),
        };
        verify_ssh_cert(
            cert,
            expected,
            &self.shared.host_ca_keys,
            self.shared.clock.now(),
        )
        .map(|verified| verified.valid_before())
        .map_err(|source| Error::PeerCertificate { peer, source })
    }
}

impl client::Handler for AgentHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let verdict = self.check_proxy(key);
        let accepted = verdict.is_ok();
        *self.verdict.lock().unwrap_or_else(PoisonError::into_inner) = Some(verdict);
        Ok(accepted)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let served = self
            .shared
            .databases
            .borrow()
            .iter()
            .any(|db| db == connected_address);
        if !served {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        }
        let Some(kind) = ChannelKind::from_port(connected_port) else {
            reply.reject(ChannelOpenFailure::UnknownChannelType).await;
            return Ok(());
        };
        let Ok(permit) = self.shared.channels.try_reserve() else {
            // The caller is not keeping up (or has gone): refuse rather than queue
            // without bound.
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        reply.accept().await;
        permit.send(IncomingChannel {
            proxy: self.proxy.clone(),
            database: connected_address.to_owned(),
            client_addr: originator_address.to_owned(),
            client_port: originator_port,
            kind,
            connection: Connection::new(channel.into_stream()),
        });
        Ok(())
    }

    // Every other kind of channel a proxy might open is refused: the tunnel carries
    // database connections and nothing else (russh would accept these by default).

    async fn server_channel_open_session(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply.reject(ChannelOpenFailure::UnknownChannelType).await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply.reject(ChannelOpenFailure::UnknownChannelType).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply.reject(ChannelOpenFailure::UnknownChannelType).await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply.reject(ChannelOpenFailure::UnknownChannelType).await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply.reject(ChannelOpenFailure::UnknownChannelType).await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply.reject(ChannelOpenFailure::UnknownChannelType).await;
        Ok(())
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed): the principal a
/// proxy's host certificate must list.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _port)| host);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The principal checked is the dialled host, without port or IPv6 brackets.
    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("proxy.example.com:3024"), "proxy.example.com");
        assert_eq!(host_of("127.0.0.1:1"), "127.0.0.1");
        assert_eq!(host_of("[::1]:3024"), "::1");
        assert_eq!(host_of("proxy"), "proxy");
    }
}

//! The tunnel over real loopback TCP: certificates from pki, russh, tokio.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Cluster, HOUR};
use postern_rt::{Net, Rng, Runtime, WallClock};
use postern_tunnel::control::Control;
use postern_tunnel::{
    Agent, AgentConfig, AgentStatus, ChannelKind, ChannelRequest, Error, IncomingChannel,
    ProxyConfig, ProxyTunnels,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

fn runtime(clock: WallClock, seed: u64) -> Runtime {
    Runtime::from_parts(
        Net::Tokio,
        clock,
        Rng::from_seed(seed),
        PathBuf::from("/nonexistent"),
    )
}

/// A running proxy: its tunnels, address and serving task.
struct Proxy {
    tunnels: ProxyTunnels,
    addr: String,
    task: JoinHandle<()>,
}

async fn start_proxy(clock: WallClock, config: ProxyConfig, bind: &str) -> Proxy {
    let rt = runtime(clock, 1);
    let listener = rt.net().listen(bind).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let tunnels = ProxyTunnels::new(&rt, config).unwrap();
    let serving = tunnels.clone();
    let task = tokio::spawn(async move { serving.serve(listener).await });
    Proxy {
        tunnels,
        addr,
        task,
    }
}

/// A running agent: its channels, status and the sender that keeps it running.
struct RunningAgent {
    incoming: mpsc::Receiver<IncomingChannel>,
    status: watch::Receiver<AgentStatus>,
    proxies: watch::Sender<Vec<String>>,
}

fn start_agent(clock: WallClock, config: AgentConfig, proxies: Vec<String>) -> RunningAgent {
    let (agent, incoming) = Agent::new(&runtime(clock, 2), config).unwrap();
    let status = agent.status();
    let (proxies_tx, proxies_rx) = watch::channel(proxies);
    tokio::spawn(agent.run(proxies_rx));
    RunningAgent {
        incoming,
        status,
        proxies: proxies_tx,
    }
}

/// Polls `check` every 10 ms until it holds or `within` passes; returns whether it held.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let polling = async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(within, polling).await.is_ok()
}

/// Opens a channel to `database` through the first candidate and checks it end to end.
async fn round_trip(proxy: &ProxyTunnels, agent: &mut RunningAgent, database: &str) {
    let candidate = proxy.candidates(database).remove(0);
    let request = ChannelRequest {
        database: database.to_owned(),
        client_addr: Some("10.1.2.3:5555".parse().unwrap()),
        kind: Default::default(),
    };
    let mut client_side = proxy
        .open_channel(candidate.tunnel, &request)
        .await
        .unwrap();
    let mut incoming = agent.incoming.recv().await.unwrap();
    assert_eq!(incoming.database, database);
    assert_eq!(incoming.kind(), ChannelKind::Session);
    assert_eq!(
        (incoming.client_addr.as_str(), incoming.client_port),
        ("10.1.2.3", 5555)
    );

    client_side.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    incoming.connection.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    incoming.connection.write_all(b"pong").await.unwrap();
    client_side.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");

    // More than one SSH window each way, so flow control is exercised.
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let sent = big.clone();
    let writer = tokio::spawn(async move {
        client_side.write_all(&sent).await.unwrap();
        client_side.shutdown().await.unwrap();
        client_side
    });
    let mut received = Vec::new();
    incoming
        .connection
        .read_to_end(&mut received)
        .await
        .unwrap();
    assert!(received == big, "bytes altered in transit");
    incoming.connection.write_all(&big).await.unwrap();
    incoming.connection.shutdown().await.unwrap();
    let mut client_side = writer.await.unwrap();
    let mut back = Vec::new();
    client_side.read_to_end(&mut back).await.unwrap();
    assert!(back == big, "bytes altered on the way back");
}

// An agent with a cert from the cluster's host CA connects, announces its databases, and
// a channel the proxy opens carries bytes both ways; unknown databases are refused.
#[tokio::test]
async fn channel_carries_bytes_both_ways() {
    let clock = WallClock::system();
    let now = clock.now();
    let cluster = Cluster::new("prod", now);
    let proxy_config = cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 10);
    let proxy = start_proxy(clock.clone(), proxy_config, "127.0.0.1:0").await;
    let agent_config = cluster.agent(
        "agent-1",
        &["orders", "billing"],
        cluster.ca_keys(),
        now,
        HOUR,
        11,
    );
    let mut agent = start_agent(clock, agent_config, vec![proxy.addr.clone()]);

    assert!(
        eventually(Duration::from_secs(10), || !proxy
            .tunnels
            .candidates("orders")
            .is_empty())
        .await,
        "agent never registered: {:?}",
        agent.status.borrow()
    );
    let candidates = proxy.tunnels.candidates("billing");
    assert_eq!(candidates.len(), 1);
    assert_eq!(candidates[0].agent, "agent-1");
    assert!(agent.status.borrow().connected.contains(&proxy.addr));

    round_trip(&proxy.tunnels, &mut agent, "orders").await;

    let refused = proxy
        .tunnels
        .open_channel(
            candidates[0].tunnel,
            &ChannelRequest {
                database: "not-served".to_owned(),
                client_addr: None,
                kind: Default::default(),
            },
        )
        .await;
    assert!(
        matches!(refused, Err(Error::ChannelRefused { .. })),
        "{refused:?}"
    );
}

// A cancel channel reaches the agent marked as such, carrying its bytes, beside sessions.
#[tokio::test]
async fn cancel_channels_are_marked_with_their_kind() {
    let clock = WallClock::system();
    let now = clock.now();
    let cluster = Cluster::new("prod", now);
    let proxy_config = cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 30);
    let proxy = start_proxy(clock.clone(), proxy_config, "127.0.0.1:0").await;
    let agent_config = cluster.agent("agent-1", &["orders"], cluster.ca_keys(), now, HOUR, 31);
    let mut agent = start_agent(clock, agent_config, vec![proxy.addr.clone()]);
    assert!(
        eventually(Duration::from_secs(10), || !proxy
            .tunnels
            .candidates("orders")
            .is_empty())
        .await
    );
    let tunnel = proxy.tunnels.candidates("orders")[0].tunnel;
    let mut channel = proxy
        .tunnels
        .open_channel(tunnel, &ChannelRequest::cancel("orders", None))
        .await
        .unwrap();
    channel.write_all(&[7u8; 16]).await.unwrap();
    channel.shutdown().await.unwrap();
    let mut incoming = agent.incoming.recv().await.unwrap();
    assert_eq!(incoming.kind(), ChannelKind::Cancel);
    assert_eq!(incoming.database, "orders");
    let mut request = Vec::new();
    incoming.connection.read_to_end(&mut request).await.unwrap();
    assert_eq!(request, [7u8; 16]);

    round_trip(&proxy.tunnels, &mut agent, "orders").await;
}

// A channel over the tunnel's limit is refused with the limit named, and dropping a
// connection gives its slot back.
#[tokio::test]
async fn channel_limit_is_enforced_on_the_wire() {
    let clock = WallClock::system();
    let now = clock.now();
    let cluster = Cluster::new("prod", now);
    let mut proxy_config = cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 20);
    proxy_config.limits.channels_per_tunnel_max = 1;
    let proxy = start_proxy(clock.clone(), proxy_config, "127.0.0.1:0").await;
    let agent_config = cluster.agent("agent-1", &["orders"], cluster.ca_keys(), now, HOUR, 21);
    let _agent = start_agent(clock, agent_config, vec![proxy.addr.clone()]);
    assert!(
        eventually(Duration::from_secs(10), || !proxy
            .tunnels
            .candidates("orders")
            .is_empty())
        .await
    );

    let tunnel = proxy.tunnels.candidates("orders")[0].tunnel;
    let request = ChannelRequest {
        database: "orders".to_owned(),
        client_addr: None,
        kind: Default::default(),
    };
    let first = proxy.tunnels.open_channel(tunnel, &request).await.unwrap();
    let second = proxy.tunnels.open_channel(tunnel, &request).await;
    assert!(
        matches!(second, Err(Error::ChannelLimit { limit: 1, .. })),
        "{second:?}"
    );
    drop(first);
    proxy.tunnels.open_channel(tunnel, &request).await.unwrap();
}

// An agent whose certificate comes from another cluster's CA is refused by the proxy.
#[tokio::test]
async fn agent_cert_from_a_foreign_ca_is_refused() {
    let clock = WallClock::system();
    let now = clock.now();
    let cluster = Cluster::new("prod", now);
    let foreign = Cluster::new("prod", now);
    let proxy_config = cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 30);
    let proxy = start_proxy(clock.clone(), proxy_config, "127.0.0.1:0").await;
    // Trusts the right CA for the proxy, but its own cert is foreign.
    let agent_config = foreign.agent("agent-1", &["orders"], cluster.ca_keys(), now, HOUR, 31);
    let agent = start_agent(clock, agent_config, vec![proxy.addr.clone()]);

    assert!(
        eventually(Duration::from_secs(10), || agent.status.borrow().attempts
            >= 2)
        .await,
        "{:?}",
        agent.status.borrow()
    );
    let status = agent.status.borrow().clone();
    assert!(status.connected.is_empty());
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.contains("refused this agent's SSH certificate"),
        "{error}"
    );
    assert_eq!(proxy.tunnels.tunnels(), 0);
}

// A proxy whose host certificate comes from another cluster's CA is refused by the agent.
#[tokio::test]
async fn proxy_cert_from_a_foreign_ca_is_refused() {
    let clock = WallClock::system();
    let now = clock.now();
    let cluster = Cluster::new("prod", now);
    let foreign = Cluster::new("prod", now);
    let proxy_config = foreign.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 40);
    let proxy = start_proxy(clock.clone(), proxy_config, "127.0.0.1:0").await;
    let agent_config = cluster.agent("agent-1", &["orders"], cluster.ca_keys(), now, HOUR, 41);
    let agent = start_agent(clock, agent_config, vec![proxy.addr.clone()]);

    assert!(
        eventually(Duration::from_secs(10), || agent.status.borrow().attempts
            >= 2)
        .await
    );
    let error = agent.status.borrow().last_error.clone().unwrap_or_default();
    assert!(error.contains("not a trusted host CA"), "{error}");
    assert_eq!(proxy.tunnels.tunnels(), 0);
}

// A proxy host certificate that has expired by the agent's injected clock is refused,
// although it is still valid by the real clock.
#[tokio::test]
async fn proxy_cert_expired_by_the_injected_clock_is_refused() {
    let real = WallClock::system();
    let now = real.now();
    let cluster = Cluster::new("prod", now);
    let proxy_config = cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 50);
    let proxy = start_proxy(real.clone(), proxy_config, "127.0.0.1:0").await;
    let agent_clock = WallClock::system();
    agent_clock.advance(2 * HOUR);
    let agent_config = cluster.agent("agent-1", &["orders"], cluster.ca_keys(), now, 4 * HOUR, 51);
    let agent = start_agent(agent_clock, agent_config, vec![proxy.addr.clone()]);

    assert!(
        eventually(Duration::from_secs(10), || agent.status.borrow().attempts
            >= 2)
        .await
    );
    let error = agent.status.borrow().last_error.clone().unwrap_or_default();
    assert!(error.contains("expired at"), "{error}");
    assert_eq!(proxy.tunnels.tunnels(), 0);
}

// An agent user certificate that has expired by the proxy's injected clock is refused,
// although it is still valid by the real clock.
#[tokio::test]
async fn agent_cert_expired_by_the_injected_clock_is_refused() {
    let real = WallClock::system();
    let now = real.now();
    let cluster = Cluster::new("prod", now);
    let proxy_clock = WallClock::system();
    proxy_clock.advance(2 * HOUR);
    let proxy_config = cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, 4 * HOUR, 60);
    let proxy = start_proxy(proxy_clock, proxy_config, "127.0.0.1:0").await;
    let agent_config = cluster.agent("agent-1", &["orders"], cluster.ca_keys(), now, HOUR, 61);
    let agent = start_agent(real, agent_config, vec![proxy.addr.clone()]);

    assert!(
        eventually(Duration::from_secs(10), || agent.status.borrow().attempts
            >= 2)
        .await
    );
    let error = agent.status.borrow().last_error.clone().unwrap_or_default();
    assert!(
        error.contains("refused this agent's SSH certificate"),
        "{error}"
    );
    assert_eq!(proxy.tunnels.tunnels(), 0);
}

// When the proxy dies the agent notices, retries with growing delays (not a hot loop),
// and reconnects soon after a proxy listens on the same address again.
#[tokio::test]
async fn agent_reconnects_with_backoff_after_proxy_restart() {
    let clock = WallClock::system();
    let now = clock.now();
    let cluster = Cluster::new("prod", now);
    let proxy_config = cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 70);
    let proxy = start_proxy(clock.clone(), proxy_config, "127.0.0.1:0").await;
    let addr = proxy.addr.clone();
    let agent_config = cluster.agent("agent-1", &["orders"], cluster.ca_keys(), now, HOUR, 71);
    let mut agent = start_agent(clock.clone(), agent_config, vec![addr.clone()]);
    assert!(
        eventually(Duration::from_secs(10), || !proxy
            .tunnels
            .candidates("orders")
            .is_empty())
        .await
    );

    // Kill the proxy: its listener and every session.
    proxy.task.abort();
    let _ = proxy.task.await;
    assert!(
        eventually(Duration::from_secs(5), || agent
            .status
            .borrow()
            .connected
            .is_empty())
        .await,
        "agent never noticed the proxy died"
    );
    let attempts_before = agent.status.borrow().attempts;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let attempts_during = agent.status.borrow().attempts - attempts_before;
    // Delays 50, 100, 200, 400, 400... ms (less up to 25 % jitter): about 5 in 1.5 s.
    // Without backoff a refused connect would be retried thousands of times.
    assert!(
        (2..=12).contains(&attempts_during),
        "{attempts_during} attempts during the outage"
    );

    let proxy_config = cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 72);
    let restarted = start_proxy(clock, proxy_config, &addr).await;
    // At most one max delay (400 ms) plus the handshake.
    assert!(
        eventually(Duration::from_secs(3), || !restarted
            .tunnels
            .candidates("orders")
            .is_empty())
        .await,
        "agent did not reconnect: {:?}",
        agent.status.borrow()
    );
    round_trip(&restarted.tunnels, &mut agent, "orders").await;
}

// A connection that never completes the SSH handshake is dropped at the handshake
// timeout, and connections beyond connections_max are closed at once.
#[tokio::test]
async fn silent_and_excess_connections_are_dropped() {
    let clock = WallClock::system();
    let now = clock.now();
    let cluster = Cluster::new("prod", now);
    let mut proxy_config = cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 80);
    proxy_config.connections_max = 1;
    proxy_config.handshake_timeout = Duration::from_millis(300);
    let proxy = start_proxy(clock.clone(), proxy_config, "127.0.0.1:0").await;
    let net = runtime(clock, 3).net().to_owned();

    let mut silent = net.connect(&proxy.addr).await.unwrap();
    // Give the proxy time to accept the first connection before the second arrives.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut excess = net.connect(&proxy.addr).await.unwrap();
    let mut excess_bytes = Vec::new();
    let excess_read = tokio::time::timeout(
        Duration::from_secs(2),
        excess.read_to_end(&mut excess_bytes),
    )
    .await;
    assert!(
        matches!(excess_read, Ok(Ok(0))),
        "{excess_read:?} {excess_bytes:?}"
    );

    let mut silent_bytes = Vec::new();
    let silent_read = tokio::time::timeout(
        Duration::from_secs(2),
        silent.read_to_end(&mut silent_bytes),
    )
    .await;
    // The proxy greeted it, then hung up when it said nothing.
    assert!(matches!(silent_read, Ok(Ok(_))), "{silent_read:?}");
    assert!(silent_bytes.starts_with(b"SSH-2.0-"), "{silent_bytes:?}");
}

// A tunnel whose agent certificate expires mid-session is closed by the proxy, and the
// agent's next attempts with the expired certificate are refused.
#[tokio::test]
async fn tunnel_closes_when_the_agent_certificate_expires() {
    let clock = WallClock::system();
    let now = clock.now();
    let cluster = Cluster::new("prod", now);
    let proxy_config = cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 90);
    let proxy = start_proxy(clock.clone(), proxy_config, "127.0.0.1:0").await;
    let agent_config = cluster.agent(
        "agent-1",
        &["orders"],
        cluster.ca_keys(),
        now,
        Duration::from_secs(4),
        91,
    );
    let agent = start_agent(clock, agent_config, vec![proxy.addr.clone()]);
    let registered = || !proxy.tunnels.candidates("orders").is_empty();
    assert!(eventually(Duration::from_secs(3), registered).await);

    // Heartbeats keep the tunnel alive; only the expiry (4 s TTL) can close it this soon.
    assert!(
        eventually(Duration::from_secs(5), || !registered()).await,
        "tunnel outlived the agent's certificate"
    );
    assert!(
        eventually(Duration::from_secs(3), || {
            let status = agent.status.borrow();
            status.connected.is_empty()
                && status
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("refused this agent's SSH certificate"))
        })
        .await,
        "{:?}",
        agent.status.borrow()
    );
}

/// A test client that takes any proxy host key: the rogue agent below.
struct AnyHost;

impl russh::client::Handler for AnyHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

// An authenticated agent that sends malformed control bytes loses its own tunnel; the
// other agent's tunnel keeps working.
#[tokio::test]
async fn malformed_control_bytes_close_only_that_tunnel() {
    let clock = WallClock::system();
    let now = clock.now();
    let cluster = Cluster::new("prod", now);
    let proxy_config = cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 100);
    let proxy = start_proxy(clock.clone(), proxy_config, "127.0.0.1:0").await;
    let agent_config = cluster.agent("agent-1", &["orders"], cluster.ca_keys(), now, HOUR, 101);
    let mut agent = start_agent(clock.clone(), agent_config, vec![proxy.addr.clone()]);

    let rogue = cluster.agent("rogue", &["orders"], cluster.ca_keys(), now, HOUR, 102);
    let stream = runtime(clock, 4).net().connect(&proxy.addr).await.unwrap();
    let config = std::sync::Arc::new(russh::client::Config::default());
    let mut session = russh::client::connect_stream(config, stream, AnyHost)
        .await
        .unwrap();
    let auth = session
        .authenticate_openssh_cert("rogue", std::sync::Arc::new(rogue.key), rogue.cert)
        .await
        .unwrap();
    assert!(auth.success());
    let control = session.channel_open_session().await.unwrap();
    let mut frame = Vec::new();
    Control::Databases(vec!["orders".to_owned()])
        .encode(&mut frame)
        .unwrap();
    control.data(&frame[..]).await.unwrap();
    let agents = |proxy: &ProxyTunnels| -> Vec<String> {
        proxy
            .candidates("orders")
            .into_iter()
            .map(|c| c.agent)
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(10), || agents(&proxy.tunnels)
            == ["agent-1", "rogue"])
        .await
    );

    control.data(&b"\xffnot a frame"[..]).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || agents(&proxy.tunnels)
            == ["agent-1"])
        .await,
        "{:?}",
        agents(&proxy.tunnels)
    );
    assert!(
        eventually(Duration::from_secs(5), || session.is_closed()).await,
        "rogue session still open"
    );
    round_trip(&proxy.tunnels, &mut agent, "orders").await;
}

// The agent follows its proxy list as it changes: a new proxy gets a tunnel, a removed
// one loses it.
#[tokio::test]
async fn agent_follows_changes_to_the_proxy_list() {
    let clock = WallClock::system();
    let now = clock.now();
    let cluster = Cluster::new("prod", now);
    let first = start_proxy(
        clock.clone(),
        cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 110),
        "127.0.0.1:0",
    )
    .await;
    let second = start_proxy(
        clock.clone(),
        cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 111),
        "127.0.0.1:0",
    )
    .await;
    let agent_config = cluster.agent("agent-1", &["orders"], cluster.ca_keys(), now, HOUR, 112);
    let agent = start_agent(clock, agent_config, vec![first.addr.clone()]);
    let serves = |proxy: &Proxy| !proxy.tunnels.candidates("orders").is_empty();
    assert!(eventually(Duration::from_secs(10), || serves(&first)).await);
    assert!(!serves(&second));

    agent
        .proxies
        .send(vec![first.addr.clone(), second.addr.clone()])
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || serves(&second)).await);
    assert!(serves(&first));

    agent.proxies.send(vec![second.addr.clone()]).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !serves(&first)).await,
        "the removed proxy still has the agent"
    );
    assert!(serves(&second));
    assert_eq!(
        agent.status.borrow().connected,
        [second.addr.clone()].into_iter().collect()
    );
}

// The agent re-announces its databases when the list changes, and stops accepting
// channels for a database it no longer serves.
#[tokio::test]
async fn agent_announces_changes_to_its_databases() {
    let clock = WallClock::system();
    let now = clock.now();
    let cluster = Cluster::new("prod", now);
    let proxy_config = cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 120);
    let proxy = start_proxy(clock.clone(), proxy_config, "127.0.0.1:0").await;
    let mut agent_config = cluster.agent("agent-1", &[], cluster.ca_keys(), now, HOUR, 121);
    let (databases, databases_rx) = watch::channel(vec!["orders".to_owned()]);
    agent_config.databases = databases_rx;
    let mut agent = start_agent(clock, agent_config, vec![proxy.addr.clone()]);
    assert!(
        eventually(Duration::from_secs(10), || !proxy
            .tunnels
            .candidates("orders")
            .is_empty())
        .await
    );
    let tunnel = proxy.tunnels.candidates("orders")[0].tunnel;

    databases
        .send(vec!["orders".to_owned(), "billing".to_owned()])
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !proxy
            .tunnels
            .candidates("billing")
            .is_empty())
        .await
    );
    round_trip(&proxy.tunnels, &mut agent, "billing").await;

    databases.send(vec!["billing".to_owned()]).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .tunnels
            .candidates("orders")
            .is_empty())
        .await
    );
    let request = ChannelRequest {
        database: "orders".to_owned(),
        client_addr: None,
        kind: Default::default(),
    };
    let refused = proxy.tunnels.open_channel(tunnel, &request).await;
    assert!(
        matches!(refused, Err(Error::ChannelRefused { .. })),
        "{refused:?}"
    );
}

/// A bare SSH server with a valid proxy host certificate that, once the agent has
/// opened its control channel, asks it for channels of every kind and reports which
/// ones it got: the rogue proxy below.
struct ProbingProxy {
    report: Option<tokio::sync::oneshot::Sender<Vec<(&'static str, bool)>>>,
}

impl russh::server::Handler for ProbingProxy {
    type Error = russh::Error;

    async fn auth_openssh_certificate(
        &mut self,
        _user: &str,
        _certificate: &russh::keys::Certificate,
    ) -> Result<russh::server::Auth, Self::Error> {
        Ok(russh::server::Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        _channel: russh::Channel<russh::server::Msg>,
        reply: russh::server::ChannelOpenHandle,
        session: &mut russh::server::Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        let handle = session.handle();
        let report = self.report.take();
        tokio::spawn(async move {
            let results = vec![
                ("session", handle.channel_open_session().await.is_ok()),
                (
                    "direct-tcpip",
                    handle
                        .channel_open_direct_tcpip("10.0.0.1", 22, "1.2.3.4", 1)
                        .await
                        .is_ok(),
                ),
                ("x11", handle.channel_open_x11("1.2.3.4", 1).await.is_ok()),
                (
                    "forwarded-tcpip orders",
                    handle
                        .channel_open_forwarded_tcpip("orders", 0, "1.2.3.4", 1)
                        .await
                        .is_ok(),
                ),
            ];
            if let Some(report) = report {
                let _ = report.send(results);
            }
        });
        Ok(())
    }
}

// An agent accepts only forwarded-tcpip channels for databases it serves, whatever kind
// of channel a proxy asks for.
#[tokio::test]
async fn agent_refuses_every_other_kind_of_channel() {
    let clock = WallClock::system();
    let now = clock.now();
    let cluster = Cluster::new("prod", now);
    let proxy_config = cluster.proxy(&["127.0.0.1"], cluster.ca_keys(), now, HOUR, 130);
    let rt = runtime(clock.clone(), 5);
    let listener = rt.net().listen("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (report_tx, report) = tokio::sync::oneshot::channel();
    let server_config = std::sync::Arc::new(russh::server::Config {
        keys: vec![proxy_config.key],
        certificates: vec![proxy_config.cert],
        ..russh::server::Config::default()
    });
    tokio::spawn(async move {
        let stream = listener.accept().await.unwrap();
        let handler = ProbingProxy {
            report: Some(report_tx),
        };
        let session = russh::server::run_stream(server_config, stream, handler)
            .await
            .unwrap();
        let _ = session.await;
    });
    let agent_config = cluster.agent("agent-1", &["orders"], cluster.ca_keys(), now, HOUR, 131);
    let mut agent = start_agent(clock, agent_config, vec![addr]);

    let results = tokio::time::timeout(Duration::from_secs(10), report)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        results,
        [
            ("session", false),
            ("direct-tcpip", false),
            ("x11", false),
            ("forwarded-tcpip orders", true),
        ]
    );
    let incoming = agent.incoming.recv().await.unwrap();
    assert_eq!(incoming.database, "orders");
}

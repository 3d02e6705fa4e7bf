//! The tunnel under turmoil: simulated network and clocks, seeded, replayable.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use common::{Cluster, HOUR};
use postern_pki::UnixTime;
use postern_rt::{Connection, Runtime};
use postern_tunnel::{Agent, AgentStatus, ChannelRequest, Error, PoolConfig, ProxyTunnels};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// 2026-11-24T00:00:00Z. russh also checks agent certificates against the real clock,
/// so the simulated epoch must be a time at which long-lived test certificates issued
/// "now" are valid in real time too.
const EPOCH_SECS: u64 = 1_795_478_400;
const SEED: u64 = 20_261_124;
const PROXY_ADDR: &str = "proxy:3024";

/// What the test client reads from the other hosts.
#[derive(Default)]
struct Observed {
    proxy: Option<ProxyTunnels>,
    agent: Option<watch::Receiver<AgentStatus>>,
}

fn connected(observed: &Mutex<Observed>) -> (bool, bool) {
    let observed = observed.lock().unwrap();
    let agent_up = observed
        .agent
        .as_ref()
        .is_some_and(|s| s.borrow().connected.contains(PROXY_ADDR));
    let proxy_up = observed
        .proxy
        .as_ref()
        .is_some_and(|p| !p.candidates("orders").is_empty());
    (agent_up, proxy_up)
}

/// Waits (in simulated time) until both ends see the tunnel as `up`, at most `within`.
async fn wait_for(observed: &Mutex<Observed>, up: bool, within: Duration) -> Option<Duration> {
    // Simulated time, from turmoil.
    let start = turmoil::elapsed();
    while turmoil::elapsed() - start <= within {
        if connected(observed) == (up, up) {
            return Some(turmoil::elapsed() - start);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

// After a partition between agent and proxy, both ends declare the tunnel dead by their
// heartbeat timeouts; once it heals the agent reconnects within a bound and a channel
// carries bytes again. (Reproduce a failure with the SEED above.)
#[test]
fn agent_reconnects_after_a_partition_heals() {
    let trace = partition_and_heal(SEED).unwrap();
    assert!(trace.attempts >= 3, "{trace:?}");
}

// The same seed replays the same run: same timings, same number of attempts.
#[test]
fn a_seed_replays_the_same_run() {
    let first = partition_and_heal(SEED + 100).unwrap();
    let second = partition_and_heal(SEED + 100).unwrap();
    assert_eq!(first, second);
}

/// What one run of [`partition_and_heal`] measured, in simulated time.
#[derive(Debug, PartialEq, Eq)]
struct Trace {
    up: Duration,
    down: Duration,
    healed: Duration,
    attempts: u64,
}

fn partition_and_heal(seed: u64) -> Result<Trace, Box<dyn std::error::Error>> {
    let observed = Arc::new(Mutex::new(Observed::default()));
    let (mut sim, pool) = cluster(seed, observed.clone());

    let trace = Arc::new(Mutex::new(None));
    let result = trace.clone();
    sim.client("test", async move {
        let up = wait_for(&observed, true, Duration::from_secs(10)).await;
        let up = up.expect("tunnel never came up");
        echo(&observed, b"before").await;

        turmoil::partition("agent", "proxy");
        // A channel asked for across the partition, before either side noticed it, fails
        // at the channel open timeout (so a router can move on to another agent).
        let refused = open(&observed).await;
        match refused {
            Err(Error::ChannelRefused { reason, .. }) => {
                assert!(reason.contains("channel_open_timeout"), "{reason}")
            }
            other => panic!("expected a channel open timeout, got {other:?}"),
        }
        // Agent: heartbeat timeout 1 s; proxy: 2 s. Both must notice within 3 s.
        let down = wait_for(&observed, false, Duration::from_secs(3)).await;
        let down =
            down.unwrap_or_else(|| panic!("partition not noticed: {:?}", connected(&observed)));
        // Stay partitioned long enough for the backoff to reach its ceiling.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(connected(&observed), (false, false));

        turmoil::repair("agent", "proxy");
        // An attempt in flight may have to hit its connect timeout first, then wait at
        // most one maximal backoff delay, then handshake.
        let bound = pool.connect_timeout + pool.backoff.max + Duration::from_secs(1);
        let healed = wait_for(&observed, true, bound).await;
        let healed =
            healed.unwrap_or_else(|| panic!("no reconnect within {bound:?} of the repair"));
        echo(&observed, b"after").await;
        let attempts = observed
            .lock()
            .unwrap()
            .agent
            .as_ref()
            .unwrap()
            .borrow()
            .attempts;
        *result.lock().unwrap() = Some(Trace {
            up,
            down,
            healed,
            attempts,
        });
        Ok(())
    });

    sim.run()?;
    let trace = trace.lock().unwrap().take();
    Ok(trace.expect("the test client finished without a trace"))
}

/// A simulation with a proxy host and an agent host (which echoes every channel), both
/// restartable; what they expose goes into `observed`. Also returns the agent's timers.
fn cluster(seed: u64, observed: Arc<Mutex<Observed>>) -> (turmoil::Sim<'static>, PoolConfig) {
    let now = UnixTime::since_unix_epoch(Duration::from_secs(EPOCH_SECS));
    let cluster = Cluster::new("sim", now);
    // Simulated time does not suffer from load: tight heartbeat timeouts.
    let mut proxy_config = cluster.proxy(&["proxy"], cluster.ca_keys(), now, 24 * HOUR, 1);
    proxy_config.channel_open_timeout = Duration::from_millis(500);
    proxy_config.limits.heartbeat_timeout = Duration::from_secs(2);
    let mut agent_config =
        cluster.agent("agent-1", &["orders"], cluster.ca_keys(), now, 24 * HOUR, 2);
    agent_config.pool.heartbeat_timeout = Duration::from_secs(1);
    let pool = agent_config.pool;

    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
        .simulation_duration(Duration::from_secs(120))
        .build();

    let seen = observed.clone();
    sim.host("proxy", move || {
        let config = proxy_config.clone();
        let seen = seen.clone();
        async move {
            let rt = Runtime::simulated(seed + 1, "/nonexistent");
            let listener = rt.net().listen("0.0.0.0:3024").await?;
            let tunnels = ProxyTunnels::new(&rt, config)?;
            seen.lock().unwrap().proxy = Some(tunnels.clone());
            tunnels.serve(listener).await;
            Ok(())
        }
    });

    sim.host("agent", move || {
        let config = agent_config.clone();
        let seen = observed.clone();
        async move {
            let rt = Runtime::simulated(seed + 2, "/nonexistent");
            let (agent, mut incoming) = Agent::new(&rt, config)?;
            seen.lock().unwrap().agent = Some(agent.status());
            // Echo every channel back to the proxy.
            tokio::spawn(async move {
                while let Some(channel) = incoming.recv().await {
                    tokio::spawn(async move {
                        let (mut read, mut write) = tokio::io::split(channel.connection);
                        let _ = tokio::io::copy(&mut read, &mut write).await;
                    });
                }
            });
            let (_keep, proxies) = watch::channel(vec![PROXY_ADDR.to_owned()]);
            agent.run(proxies).await;
            Ok(())
        }
    });
    (sim, pool)
}

// A crashed proxy is noticed by the agent; once the proxy restarts, the agent is back
// within 5 s (REFERENCE.md: restart the proxy, agents reconnect within seconds).
#[test]
fn agent_reconnects_after_the_proxy_restarts() -> turmoil::Result {
    let observed = Arc::new(Mutex::new(Observed::default()));
    let (mut sim, _pool) = cluster(SEED + 200, observed.clone());
    let agent_up = |observed: &Mutex<Observed>| connected(observed).0;

    let up = step_until(&mut sim, Duration::from_secs(10), || {
        connected(&observed) == (true, true)
    })?;
    assert!(up.is_some(), "tunnel never came up");

    sim.crash("proxy");
    observed.lock().unwrap().proxy = None;
    let down = step_until(&mut sim, Duration::from_secs(2), || !agent_up(&observed))?;
    assert!(down.is_some(), "agent did not notice the crash");
    step_until(&mut sim, Duration::from_secs(3), || false)?;

    sim.bounce("proxy");
    let back = step_until(&mut sim, Duration::from_secs(5), || {
        connected(&observed) == (true, true)
    })?;
    assert!(back.is_some(), "not reconnected within 5 s of the restart");
    Ok(())
}

/// Steps `sim` until `done` holds or `within` of simulated time passes; how long it took.
fn step_until(
    sim: &mut turmoil::Sim<'_>,
    within: Duration,
    mut done: impl FnMut() -> bool,
) -> turmoil::Result<Option<Duration>> {
    let start = sim.elapsed();
    while sim.elapsed() - start <= within {
        if done() {
            return Ok(Some(sim.elapsed() - start));
        }
        sim.step()?;
    }
    Ok(None)
}

/// Opens a channel to "orders" through the first candidate.
async fn open(observed: &Mutex<Observed>) -> Result<Connection, Error> {
    let proxy = observed.lock().unwrap().proxy.clone().unwrap();
    let tunnel = proxy.candidates("orders")[0].tunnel;
    let request = ChannelRequest {
        database: "orders".to_owned(),
        client_addr: None,
        kind: Default::default(),
    };
    proxy.open_channel(tunnel, &request).await
}

/// Sends `message` through a new channel to the echoing agent and checks it comes back.
async fn echo(observed: &Mutex<Observed>, message: &[u8]) {
    let mut channel = open(observed).await.unwrap();
    channel.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    channel.read_exact(&mut back).await.unwrap();
    assert_eq!(back, message);
}

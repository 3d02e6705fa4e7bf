//! The two sans-IO cores driven against each other in virtual time, with no sockets and
//! no SSH: one agent [`Pool`] and a [`Registry`] per proxy, joined by links that a seeded
//! schedule partitions and heals. Safety is checked after every event; liveness (every
//! proxy serves the agent again) within a bound after the last fault heals.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::time::Duration;

use postern_rt::Rng;
use postern_tunnel::{
    Backoff, Pool, PoolConfig, PoolOutput, Registry, RegistryLimits, RegistryOutput, TunnelId,
};
use proptest::prelude::{ProptestConfig, prop_assert, prop_assert_eq, proptest};

const PROXIES: usize = 3;
const DATABASE: &str = "db";
const NEVER: Duration = Duration::MAX;
const MS: Duration = Duration::from_millis(1);

/// What travels over a link. `tunnel` is always the pool's id for the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Message {
    /// Agent → proxy: handshake done, register me.
    Hello {
        proxy: usize,
        tunnel: TunnelId,
    },
    /// Proxy → agent: registered.
    Welcome {
        proxy: usize,
        tunnel: TunnelId,
    },
    Heartbeat {
        proxy: usize,
        tunnel: TunnelId,
    },
    Ack {
        proxy: usize,
        tunnel: TunnelId,
    },
    /// Agent → proxy: the agent closed the connection.
    AgentClosed {
        proxy: usize,
        tunnel: TunnelId,
    },
    /// Proxy → agent: the proxy closed the connection.
    ProxyClosed {
        proxy: usize,
        tunnel: TunnelId,
    },
}

impl Message {
    fn proxy(self) -> usize {
        match self {
            Message::Hello { proxy, .. }
            | Message::Welcome { proxy, .. }
            | Message::Heartbeat { proxy, .. }
            | Message::Ack { proxy, .. }
            | Message::AgentClosed { proxy, .. }
            | Message::ProxyClosed { proxy, .. } => proxy,
        }
    }
}

struct World {
    now: Duration,
    rng: Rng,
    pool: Pool,
    registries: Vec<Registry>,
    links_up: [bool; PROXIES],
    /// Messages in flight, by delivery time (then send order, for determinism).
    in_flight: BinaryHeap<Reverse<(Duration, u64, Message)>>,
    sent: u64,
    /// Connections the agent still holds (pool tunnel ids).
    live: HashSet<TunnelId>,
    /// Pool tunnel → (proxy, registry tunnel) for connections a proxy registered.
    registered: BTreeMap<TunnelId, (usize, TunnelId)>,
}

fn pool_config() -> PoolConfig {
    PoolConfig {
        backoff: Backoff {
            initial: 100 * MS,
            max: 4_000 * MS,
            multiplier: 2,
            jitter_permille: 300,
        },
        connect_timeout: 2_000 * MS,
        heartbeat_interval: 500 * MS,
        heartbeat_timeout: 2_000 * MS,
        proxies_max: 8,
    }
}

fn registry_limits() -> RegistryLimits {
    RegistryLimits {
        heartbeat_timeout: 3_000 * MS,
        ..RegistryLimits::default()
    }
}

fn proxy_name(proxy: usize) -> String {
    format!("proxy-{proxy}:3024")
}

fn proxy_index(name: &str) -> usize {
    (0..PROXIES)
        .find(|&p| proxy_name(p) == name)
        .expect("the pool only knows the proxies it was given")
}

impl World {
    fn new(seed: u64) -> Self {
        let rng = Rng::from_seed(seed);
        let mut pool = Pool::new(pool_config(), rng.fork()).unwrap();
        pool.handle_proxies(Duration::ZERO, (0..PROXIES).map(proxy_name))
            .unwrap();
        Self {
            now: Duration::ZERO,
            rng,
            pool,
            registries: (0..PROXIES)
                .map(|_| Registry::new(registry_limits()).unwrap())
                .collect(),
            links_up: [true; PROXIES],
            in_flight: BinaryHeap::new(),
            sent: 0,
            live: HashSet::new(),
            registered: BTreeMap::new(),
        }
    }

    fn send(&mut self, message: Message) {
        let latency = Duration::from_millis(1 + self.rng.below(20));
        self.sent += 1;
        self.in_flight
            .push(Reverse((self.now + latency, self.sent, message)));
    }

    /// Performs everything the cores asked for, until they are quiet.
    fn drain(&mut self) {
        loop {
            let mut busy = false;
            while let Some(output) = self.pool.poll_output() {
                busy = true;
                match output {
                    PoolOutput::Connect { proxy, tunnel } => {
                        self.live.insert(tunnel);
                        let proxy = proxy_index(&proxy);
                        self.send(Message::Hello { proxy, tunnel });
                    }
                    PoolOutput::SendHeartbeat { proxy, tunnel } => {
                        let proxy = proxy_index(&proxy);
                        self.send(Message::Heartbeat { proxy, tunnel });
                    }
                    PoolOutput::Close { proxy, tunnel, .. } => {
                        self.live.remove(&tunnel);
                        let proxy = proxy_index(&proxy);
                        self.send(Message::AgentClosed { proxy, tunnel });
                    }
                }
            }
            for proxy in 0..PROXIES {
                while let Some(RegistryOutput::Close { tunnel: closed, .. }) =
                    self.registries[proxy].poll_output()
                {
                    busy = true;
                    let pool_tunnel = self
                        .registered
                        .iter()
                        .find(|(_, (p, r))| *p == proxy && *r == closed)
                        .map(|(t, _)| *t);
                    if let Some(tunnel) = pool_tunnel {
                        self.registered.remove(&tunnel);
                        self.send(Message::ProxyClosed { proxy, tunnel });
                    }
                }
            }
            if !busy {
                return;
            }
        }
    }

    fn deliver(&mut self, message: Message) {
        let now = self.now;
        match message {
            Message::Hello { proxy, tunnel } => {
                // The agent gave up on this connection already: it is gone.
                if !self.live.contains(&tunnel) {
                    return;
                }
                let registry = &mut self.registries[proxy];
                let registered = registry.handle_tunnel_up(now, "agent", NEVER).unwrap();
                registry
                    .handle_announce(now, registered, [DATABASE.to_owned()])
                    .unwrap();
                self.registered.insert(tunnel, (proxy, registered));
                self.send(Message::Welcome { proxy, tunnel });
            }
            Message::Welcome { tunnel, .. } => self.pool.handle_connected(now, tunnel, NEVER),
            Message::Heartbeat { proxy, tunnel } => {
                let Some(&(_, registered)) = self.registered.get(&tunnel) else {
                    return;
                };
                match self.registries[proxy].handle_heartbeat(now, registered) {
                    Ok(()) => self.send(Message::Ack { proxy, tunnel }),
                    Err(_) => {
                        self.registered.remove(&tunnel);
                        self.send(Message::ProxyClosed { proxy, tunnel });
                    }
                }
            }
            Message::Ack { tunnel, .. } => self.pool.handle_heartbeat_ack(now, tunnel),
            Message::AgentClosed { proxy, tunnel } => {
                if let Some((_, registered)) = self.registered.remove(&tunnel) {
                    self.registries[proxy].handle_tunnel_down(now, registered);
                }
            }
            Message::ProxyClosed { tunnel, .. } => {
                if self.live.remove(&tunnel) {
                    self.pool.handle_tunnel_down(now, tunnel);
                }
            }
        }
    }

    /// Runs until `until`, with faults toggled at the times in `faults`.
    fn run_until(
        &mut self,
        until: Duration,
        faults: &mut Vec<(Duration, usize)>,
    ) -> Result<(), String> {
        loop {
            self.drain();
            self.check_safety()?;
            let next_fault = faults.last().map(|f| f.0);
            let next_message = self.in_flight.peek().map(|Reverse((at, _, _))| *at);
            let timers = (0..PROXIES)
                .filter_map(|p| self.registries[p].poll_timeout())
                .chain(self.pool.poll_timeout());
            let next = [next_fault, next_message]
                .into_iter()
                .flatten()
                .chain(timers)
                .min();
            let Some(next) = next.filter(|at| *at <= until) else {
                self.now = until;
                return Ok(());
            };
            if next < self.now {
                return Err(format!("time went backwards: {next:?} < {:?}", self.now));
            }
            self.now = next;
            if next_fault == Some(next) {
                let (_, proxy) = faults.pop().expect("peeked above");
                self.links_up[proxy] = !self.links_up[proxy];
            } else if next_message == Some(next) {
                let Reverse((_, _, message)) = self.in_flight.pop().expect("peeked above");
                if self.links_up[message.proxy()] {
                    self.deliver(message);
                }
            } else {
                self.pool.handle_timeout(next);
                for registry in &mut self.registries {
                    registry.handle_timeout(next);
                }
            }
        }
    }

    /// What must hold at every moment.
    fn check_safety(&self) -> Result<(), String> {
        for proxy in 0..PROXIES {
            // A proxy lists the agent at most once, and only over a connection the
            // driver knows it registered.
            let candidates = self.registries[proxy].candidates(DATABASE);
            if candidates.len() > 1 {
                return Err(format!(
                    "proxy {proxy} lists the agent twice: {candidates:?}"
                ));
            }
            for candidate in candidates {
                if !self
                    .registered
                    .values()
                    .any(|r| *r == (proxy, candidate.tunnel))
                {
                    return Err(format!(
                        "proxy {proxy} lists an unknown tunnel {candidate:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    fn converged(&self) -> bool {
        self.pool.connected() == PROXIES
            && self
                .registries
                .iter()
                .all(|r| r.candidates(DATABASE).len() == 1)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    // Under any seeded schedule of partitions, safety holds throughout, and after the last
    // one heals every proxy serves the agent again within connect timeout + max backoff +
    // heartbeat timeout.
    #[test]
    fn cores_converge_after_partitions_heal(seed: u64, faults_count in 0usize..20) {
        let mut world = World::new(seed);
        let schedule = Rng::from_seed(seed ^ 0x5eed);
        let mut faults: Vec<(Duration, usize)> = (0..faults_count)
            .map(|_| {
                let at = Duration::from_millis(schedule.below(60_000));
                (at, schedule.below(PROXIES as u64) as usize)
            })
            .collect();
        // Popped from the end: latest last.
        faults.sort_by(|a, b| b.cmp(a));
        let healed_at = Duration::from_secs(60);
        world.run_until(healed_at, &mut faults).map_err(proptest::test_runner::TestCaseError::fail)?;
        world.links_up = [true; PROXIES];

        let config = pool_config();
        let bound = config.connect_timeout + config.backoff.max + config.heartbeat_timeout + Duration::from_secs(1);
        let mut converged_at = None;
        while world.now < healed_at + bound {
            let step = world.now + 50 * MS;
            world.run_until(step, &mut Vec::new()).map_err(proptest::test_runner::TestCaseError::fail)?;
            if world.converged() {
                converged_at = Some(world.now);
                break;
            }
        }
        prop_assert!(converged_at.is_some(), "not converged {:?} after the heal", bound);
        // And it stays that way: nothing tears a healthy pair apart.
        world.run_until(world.now + Duration::from_secs(30), &mut Vec::new()).map_err(proptest::test_runner::TestCaseError::fail)?;
        prop_assert_eq!(world.pool.connected(), PROXIES);
        prop_assert!(world.converged());
    }
}

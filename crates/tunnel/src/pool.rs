//! Agent side: which proxies to hold a tunnel to, and when to (re)connect, heartbeat and
//! give up on each. Sans-IO: the driver performs the [`PoolOutput`]s and reports back.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use postern_rt::Rng;

use crate::backoff::Backoff;
use crate::error::Error;
use crate::{CloseReason, TunnelId};

/// Timers and limits of a [`Pool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Delays between failed connection attempts.
    pub backoff: Backoff,
    /// How long an attempt (TCP, SSH handshake, authentication, control channel) may take.
    pub connect_timeout: Duration,
    /// How often a connected tunnel sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// A tunnel that has not heard from its proxy for this long is dead.
    pub heartbeat_timeout: Duration,
    /// Most proxies the pool holds tunnels to.
    pub proxies_max: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(15),
            proxies_max: 256,
        }
    }
}

impl PoolConfig {
    /// Refuses settings under which the pool could not work.
    pub fn validate(&self) -> Result<(), Error> {
        self.backoff.validate()?;
        let invalid = |field, reason: &str| {
            Err(Error::InvalidConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout", "must be greater than zero");
        }
        if self.heartbeat_interval.is_zero() {
            return invalid("heartbeat_interval", "must be greater than zero");
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return invalid(
                "heartbeat_timeout",
                "must be longer than heartbeat_interval (or every tunnel dies between two heartbeats)",
            );
        }
        if self.proxies_max == 0 {
            return invalid("proxies_max", "must be at least 1");
        }
        Ok(())
    }
}

/// What the driver must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolOutput {
    /// Open tunnel `tunnel` to `proxy`; report [`Pool::handle_connected`] or
    /// [`Pool::handle_tunnel_down`] for it.
    Connect { proxy: String, tunnel: TunnelId },
    /// Tear tunnel `tunnel` down (connecting or connected); the pool has already
    /// forgotten it, so no report is needed.
    Close {
        proxy: String,
        tunnel: TunnelId,
        reason: CloseReason,
    },
    /// Send a heartbeat over `tunnel`; report [`Pool::handle_heartbeat_ack`] when the
    /// proxy answers.
    SendHeartbeat { proxy: String, tunnel: TunnelId },
}

/// Where one proxy's tunnel stands, for status pages and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyState {
    /// Waiting until `until` before the next attempt.
    BackingOff { until: Duration },
    /// Attempt `tunnel` is under way.
    Connecting { tunnel: TunnelId },
    /// Tunnel `tunnel` is up.
    Connected { tunnel: TunnelId },
}

#[derive(Debug)]
enum State {
    BackingOff {
        until: Duration,
    },
    Connecting {
        tunnel: TunnelId,
        deadline: Duration,
    },
    Connected {
        tunnel: TunnelId,
        /// Declared dead at this time unless the proxy is heard from before.
        dead_at: Duration,
        next_heartbeat: Duration,
        /// When the proxy's certificate expires.
        cert_expires: Duration,
    },
}

#[derive(Debug)]
struct Proxy {
    state: State,
    /// Consecutive failed attempts since the last successful connection (or since the
    /// last connected tunnel was lost, which counts as one).
    failures: u32,
}

/// The agent's set of tunnels, one per proxy.
///
/// `now` in every method is monotonic time since an origin the driver chose once (for
/// example when it started); it must never go backwards. Randomness (backoff jitter)
/// comes from the [`Rng`] given to [`Pool::new`].
#[derive(Debug)]
pub struct Pool {
    config: PoolConfig,
    rng: Rng,
    proxies: BTreeMap<String, Proxy>,
    outputs: VecDeque<PoolOutput>,
    next_tunnel: u64,
}

impl Pool {
    pub fn new(config: PoolConfig, rng: Rng) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            config,
            rng,
            proxies: BTreeMap::new(),
            outputs: VecDeque::new(),
            next_tunnel: 1,
        })
    }

    /// Sets the proxies to hold tunnels to. New ones are dialled at once; tunnels to
    /// proxies no longer listed are closed. On error nothing changes.
    pub fn handle_proxies(
        &mut self,
        now: Duration,
        proxies: impl IntoIterator<Item = String>,
    ) -> Result<(), Error> {
        let wanted: std::collections::BTreeSet<String> = proxies.into_iter().collect();
        if wanted.len() > self.config.proxies_max {
            return Err(Error::ProxiesLimit {
                count: wanted.len(),
                limit: self.config.proxies_max,
            });
        }
        let gone: Vec<String> = self
            .proxies
            .keys()
            .filter(|proxy| !wanted.contains(*proxy))
            .cloned()
            .collect();
        for proxy in gone {
            if let Some(removed) = self.proxies.remove(&proxy)
                && let Some(tunnel) = removed.state.tunnel()
            {
                self.outputs.push_back(PoolOutput::Close {
                    proxy,
                    tunnel,
                    reason: CloseReason::Removed,
                });
            }
        }
        for proxy in wanted {
            if !self.proxies.contains_key(&proxy) {
                let state = self.start_attempt(now, &proxy);
                self.proxies.insert(proxy, Proxy { state, failures: 0 });
            }
        }
        Ok(())
    }

    /// Attempt `tunnel` succeeded: the tunnel is up and authenticated. The proxy's
    /// certificate expires at `cert_expires` (on the same monotonic scale as `now`); the
    /// tunnel is closed then.
    pub fn handle_connected(&mut self, now: Duration, tunnel: TunnelId, cert_expires: Duration) {
        let config = self.config;
        if let Some((_, proxy)) = self.find(tunnel)
            && matches!(proxy.state, State::Connecting { .. })
        {
            proxy.state = State::Connected {
                tunnel,
                dead_at: now + config.heartbeat_timeout,
                next_heartbeat: now + config.heartbeat_interval,
                cert_expires,
            };
            proxy.failures = 0;
        }
    }

    /// The proxy answered a heartbeat on `tunnel` (or sent anything else): it is alive.
    pub fn handle_heartbeat_ack(&mut self, now: Duration, tunnel: TunnelId) {
        let timeout = self.config.heartbeat_timeout;
        if let Some((_, proxy)) = self.find(tunnel)
            && let State::Connected { dead_at, .. } = &mut proxy.state
        {
            *dead_at = now + timeout;
        }
    }

    /// Attempt or tunnel `tunnel` failed or ended. Unknown (already closed) tunnels are
    /// ignored.
    pub fn handle_tunnel_down(&mut self, now: Duration, tunnel: TunnelId) {
        let Some(proxy) = self.find(tunnel).map(|(name, _)| name.clone()) else {
            return;
        };
        self.back_off(now, &proxy);
    }

    /// Fires every timer due at `now`: attempts, connect timeouts, heartbeats, deaths.
    pub fn handle_timeout(&mut self, now: Duration) {
        enum Due {
            Attempt,
            Close(TunnelId, CloseReason),
            Heartbeat(TunnelId),
        }
        let interval = self.config.heartbeat_interval;
        let names: Vec<String> = self.proxies.keys().cloned().collect();
        for name in names {
            let Some(proxy) = self.proxies.get_mut(&name) else {
                continue;
            };
            let due = match &mut proxy.state {
                State::BackingOff { until } if *until <= now => Due::Attempt,
                State::Connecting { tunnel, deadline } if *deadline <= now => {
                    Due::Close(*tunnel, CloseReason::ConnectTimeout)
                }
                State::Connected {
                    tunnel,
                    cert_expires,
                    ..
                } if *cert_expires <= now => Due::Close(*tunnel, CloseReason::CertificateExpired),
                State::Connected {
                    tunnel, dead_at, ..
                } if *dead_at <= now => Due::Close(*tunnel, CloseReason::HeartbeatTimeout),
                State::Connected {
                    tunnel,
                    next_heartbeat,
                    ..
                } if *next_heartbeat <= now => {
                    *next_heartbeat = now + interval;
                    Due::Heartbeat(*tunnel)
                }
                State::BackingOff { .. } | State::Connecting { .. } | State::Connected { .. } => {
                    continue;
                }
            };
            match due {
                Due::Attempt => {
                    let state = self.start_attempt(now, &name);
                    if let Some(proxy) = self.proxies.get_mut(&name) {
                        proxy.state = state;
                    }
                }
                Due::Close(tunnel, reason) => self.close(now, &name, tunnel, reason),
                Due::Heartbeat(tunnel) => self.outputs.push_back(PoolOutput::SendHeartbeat {
                    proxy: name,
                    tunnel,
                }),
            }
        }
    }

    /// The next thing for the driver to do, if any. Drain after every `handle_*` call.
    pub fn poll_output(&mut self) -> Option<PoolOutput> {
        self.outputs.pop_front()
    }

    /// When [`Pool::handle_timeout`] must next be called; `None` when no timer runs.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.proxies
            .values()
            .map(|proxy| match proxy.state {
                State::BackingOff { until } => until,
                State::Connecting { deadline, .. } => deadline,
                State::Connected {
                    dead_at,
                    next_heartbeat,
                    cert_expires,
                    ..
                } => dead_at.min(next_heartbeat).min(cert_expires),
            })
            .min()
    }

    /// Where the tunnel to `proxy` stands; `None` if the proxy is not in the pool.
    pub fn state(&self, proxy: &str) -> Option<ProxyState> {
        self.proxies.get(proxy).map(|p| match p.state {
            State::BackingOff { until } => ProxyState::BackingOff { until },
            State::Connecting { tunnel, .. } => ProxyState::Connecting { tunnel },
            State::Connected { tunnel, .. } => ProxyState::Connected { tunnel },
        })
    }

    /// How many tunnels are up.
    pub fn connected(&self) -> usize {
        self.proxies
            .values()
            .filter(|p| matches!(p.state, State::Connected { .. }))
            .count()
    }

    fn find(&mut self, tunnel: TunnelId) -> Option<(&String, &mut Proxy)> {
        self.proxies
            .iter_mut()
            .find(|(_, proxy)| proxy.state.tunnel() == Some(tunnel))
    }

    fn start_attempt(&mut self, now: Duration, proxy: &str) -> State {
        let tunnel = TunnelId(self.next_tunnel);
        self.next_tunnel += 1;
        self.outputs.push_back(PoolOutput::Connect {
            proxy: proxy.to_owned(),
            tunnel,
        });
        State::Connecting {
            tunnel,
            deadline: now + self.config.connect_timeout,
        }
    }

    fn close(&mut self, now: Duration, proxy: &str, tunnel: TunnelId, reason: CloseReason) {
        self.outputs.push_back(PoolOutput::Close {
            proxy: proxy.to_owned(),
            tunnel,
            reason,
        });
        self.back_off(now, proxy);
    }

    /// Moves `proxy` to backing off. A lost connected tunnel retries after the initial
    /// delay; each failed attempt after that doubles (by the multiplier) the delay.
    fn back_off(&mut self, now: Duration, proxy: &str) {
        let Some(entry) = self.proxies.get_mut(proxy) else {
            return;
        };
        if matches!(entry.state, State::Connected { .. }) {
            entry.failures = 0;
        }
        let delay = self.config.backoff.delay(entry.failures, &self.rng);
        entry.failures = entry.failures.saturating_add(1);
        entry.state = State::BackingOff { until: now + delay };
    }
}

impl State {
    fn tunnel(&self) -> Option<TunnelId> {
        match self {
            State::BackingOff { .. } => None,
            State::Connecting { tunnel, .. } | State::Connected { tunnel, .. } => Some(*tunnel),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_rt::Rng;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);
    /// A certificate that outlives the test.
    const NEVER: Duration = Duration::MAX;

    fn config() -> PoolConfig {
        PoolConfig {
            backoff: Backoff {
                initial: 100 * MS,
                max: 1_000 * MS,
                multiplier: 2,
                jitter_permille: 200,
            },
            connect_timeout: 500 * MS,
            heartbeat_interval: 1_000 * MS,
            heartbeat_timeout: 3_000 * MS,
            proxies_max: 8,
        }
    }

    fn drain(pool: &mut Pool) -> Vec<PoolOutput> {
        std::iter::from_fn(|| pool.poll_output()).collect()
    }

    fn connect_of(outputs: &[PoolOutput], proxy: &str) -> TunnelId {
        outputs
            .iter()
            .find_map(|o| match o {
                PoolOutput::Connect { proxy: p, tunnel } if p == proxy => Some(*tunnel),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no Connect for {proxy} in {outputs:?}"))
    }

    // A new proxy is dialled at once; a removed one is closed.
    #[test]
    fn proxies_are_dialled_when_added_and_closed_when_removed() {
        let mut pool = Pool::new(config(), Rng::from_seed(1)).unwrap();
        pool.handle_proxies(Duration::ZERO, ["a:1".to_owned(), "b:1".to_owned()])
            .unwrap();
        let out = drain(&mut pool);
        let a = connect_of(&out, "a:1");
        connect_of(&out, "b:1");
        pool.handle_connected(10 * MS, a, NEVER);
        assert_eq!(pool.connected(), 1);
        pool.handle_proxies(20 * MS, ["b:1".to_owned()]).unwrap();
        assert_eq!(
            drain(&mut pool),
            [PoolOutput::Close {
                proxy: "a:1".to_owned(),
                tunnel: a,
                reason: CloseReason::Removed
            }]
        );
        assert_eq!(pool.state("a:1"), None);
        // Reports about the removed tunnel are stale and ignored.
        pool.handle_tunnel_down(30 * MS, a);
        assert!(drain(&mut pool).is_empty());
    }

    // Too many proxies are refused as a whole.
    #[test]
    fn proxies_over_the_limit_are_refused() {
        let mut pool = Pool::new(config(), Rng::from_seed(1)).unwrap();
        let many = (0..9).map(|i| format!("p{i}:1"));
        assert!(matches!(
            pool.handle_proxies(Duration::ZERO, many),
            Err(Error::ProxiesLimit { count: 9, limit: 8 })
        ));
        assert!(drain(&mut pool).is_empty());
    }

    // Failed attempts back off exponentially; a successful connection resets the backoff.
    #[test]
    fn backoff_grows_on_failures_and_resets_after_reconnect() {
        let cfg = config();
        let mut pool = Pool::new(cfg, Rng::from_seed(7)).unwrap();
        let mut now = Duration::ZERO;
        pool.handle_proxies(now, ["p:1".to_owned()]).unwrap();
        let mut tunnel = connect_of(&drain(&mut pool), "p:1");
        for failures in 0..5 {
            pool.handle_tunnel_down(now, tunnel);
            let Some(ProxyState::BackingOff { until }) = pool.state("p:1") else {
                panic!("not backing off");
            };
            let (low, high) = cfg.backoff.window(failures);
            assert!(
                until - now >= low && until - now <= high,
                "{failures}: {:?}",
                until - now
            );
            assert_eq!(pool.poll_timeout(), Some(until));
            now = until;
            pool.handle_timeout(now);
            tunnel = connect_of(&drain(&mut pool), "p:1");
        }
        pool.handle_connected(now, tunnel, NEVER);
        pool.handle_tunnel_down(now, tunnel);
        let Some(ProxyState::BackingOff { until }) = pool.state("p:1") else {
            panic!("not backing off");
        };
        let (low, high) = cfg.backoff.window(0);
        assert!(until - now >= low && until - now <= high);
    }

    // An attempt that hangs is closed at the connect timeout and retried.
    #[test]
    fn hanging_attempts_time_out() {
        let mut pool = Pool::new(config(), Rng::from_seed(3)).unwrap();
        pool.handle_proxies(Duration::ZERO, ["p:1".to_owned()])
            .unwrap();
        let tunnel = connect_of(&drain(&mut pool), "p:1");
        assert_eq!(pool.poll_timeout(), Some(500 * MS));
        pool.handle_timeout(499 * MS);
        assert!(drain(&mut pool).is_empty());
        pool.handle_timeout(500 * MS);
        assert_eq!(
            drain(&mut pool),
            [PoolOutput::Close {
                proxy: "p:1".to_owned(),
                tunnel,
                reason: CloseReason::ConnectTimeout
            }]
        );
        // The late success of the abandoned attempt changes nothing.
        pool.handle_connected(600 * MS, tunnel, NEVER);
        assert!(matches!(
            pool.state("p:1"),
            Some(ProxyState::BackingOff { .. })
        ));
    }

    // Heartbeats go out every interval; answered ones keep the tunnel alive.
    #[test]
    fn heartbeats_every_interval_keep_an_answering_tunnel_alive() {
        let mut pool = Pool::new(config(), Rng::from_seed(3)).unwrap();
        pool.handle_proxies(Duration::ZERO, ["p:1".to_owned()])
            .unwrap();
        let tunnel = connect_of(&drain(&mut pool), "p:1");
        pool.handle_connected(Duration::ZERO, tunnel, NEVER);
        let mut beats = 0;
        for step in 1..=100u32 {
            let now = step * 100 * MS;
            pool.handle_timeout(now);
            for out in drain(&mut pool) {
                assert_eq!(
                    out,
                    PoolOutput::SendHeartbeat {
                        proxy: "p:1".to_owned(),
                        tunnel
                    }
                );
                beats += 1;
                pool.handle_heartbeat_ack(now, tunnel);
            }
        }
        assert_eq!(beats, 10);
        assert_eq!(pool.state("p:1"), Some(ProxyState::Connected { tunnel }));
    }

    // A tunnel is closed when the proxy's certificate expires, and the proxy is retried.
    #[test]
    fn tunnels_close_when_the_proxy_certificate_expires() {
        let mut pool = Pool::new(config(), Rng::from_seed(3)).unwrap();
        pool.handle_proxies(Duration::ZERO, ["p:1".to_owned()])
            .unwrap();
        let tunnel = connect_of(&drain(&mut pool), "p:1");
        pool.handle_connected(Duration::ZERO, tunnel, 2_500 * MS);
        for step in 1..=25u32 {
            pool.handle_timeout(step * 100 * MS);
            for out in drain(&mut pool) {
                match out {
                    PoolOutput::SendHeartbeat { .. } => {
                        pool.handle_heartbeat_ack(step * 100 * MS, tunnel)
                    }
                    PoolOutput::Close { reason, .. } => {
                        assert_eq!(step, 25);
                        assert_eq!(reason, CloseReason::CertificateExpired);
                    }
                    PoolOutput::Connect { .. } => panic!("reconnected before backing off"),
                }
            }
        }
        assert!(matches!(
            pool.state("p:1"),
            Some(ProxyState::BackingOff { .. })
        ));
    }

    proptest! {
        // Whatever the driver reports and whenever, each proxy has at most one live
        // tunnel, every Connect is followed by nothing for that proxy until it is
        // resolved, no backoff exceeds max, and a tunnel that hears nothing is declared
        // dead exactly heartbeat_timeout after it was last heard from.
        #[test]
        fn pool_invariants_hold_under_any_schedule(
            seed: u64,
            events in proptest::collection::vec((0u8..5, 0usize..3, 0u64..2_000), 1..200),
        ) {
            let cfg = config();
            let proxies = ["a:1", "b:1", "c:1"];
            let mut pool = Pool::new(cfg, Rng::from_seed(seed)).unwrap();
            let mut now = Duration::ZERO;
            pool.handle_proxies(now, proxies.iter().map(|p| p.to_string())).unwrap();
            // Live tunnel per proxy as the driver sees it, and when it was last heard.
            let mut live: BTreeMap<String, (TunnelId, bool, Duration)> = BTreeMap::new();
            for (kind, which, advance_ms) in events {
                for out in drain(&mut pool) {
                    match out {
                        PoolOutput::Connect { proxy, tunnel } => {
                            prop_assert!(!live.contains_key(&proxy), "two tunnels to {}", proxy);
                            live.insert(proxy, (tunnel, false, now));
                        }
                        PoolOutput::Close { proxy, tunnel, reason } => {
                            let (t, connected, heard) = live.remove(&proxy).unwrap();
                            prop_assert_eq!(t, tunnel);
                            if reason == CloseReason::HeartbeatTimeout {
                                prop_assert!(connected);
                                prop_assert_eq!(now, heard + cfg.heartbeat_timeout);
                            }
                        }
                        PoolOutput::SendHeartbeat { proxy, tunnel } => {
                            prop_assert_eq!(live.get(&proxy).map(|l| (l.0, l.1)), Some((tunnel, true)));
                        }
                    }
                }
                for proxy in proxies {
                    if let Some(ProxyState::BackingOff { until }) = pool.state(proxy) {
                        prop_assert!(until <= now + cfg.backoff.max);
                    }
                }
                let proxy = proxies[which];
                match kind {
                    0 => {
                        if let Some(entry) = live.get_mut(proxy)
                            && !entry.1
                        {
                            pool.handle_connected(now, entry.0, NEVER);
                            *entry = (entry.0, true, now);
                        }
                    }
                    1 => {
                        if let Some((tunnel, _, _)) = live.remove(proxy) {
                            pool.handle_tunnel_down(now, tunnel);
                        }
                    }
                    2 => {
                        if let Some(entry) = live.get_mut(proxy)
                            && entry.1
                        {
                            pool.handle_heartbeat_ack(now, entry.0);
                            entry.2 = now;
                        }
                    }
                    _ => {
                        // Time passes: to the next timer if it is due by the target (and
                        // fire it there), else to the target.
                        let target = now + Duration::from_millis(advance_ms);
                        match pool.poll_timeout() {
                            Some(at) if at <= target => {
                                prop_assert!(at >= now, "timer {:?} overdue at {:?}", at, now);
                                now = at;
                                pool.handle_timeout(now);
                            }
                            _ => now = target,
                        }
                    }
                }
            }
        }
    }
}

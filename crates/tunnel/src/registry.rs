//! Proxy side: which agents hold a tunnel to this proxy, which databases each serves, and
//! how many channels each tunnel carries. Sans-IO: the driver reports tunnel events and
//! performs the [`RegistryOutput`]s.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::error::Error;
use crate::{CloseReason, TunnelId};

/// Limits of a [`Registry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegistryLimits {
    /// Most channels (client connections) open at once over one tunnel.
    pub channels_per_tunnel_max: u32,
    /// Most databases one agent may announce.
    pub databases_per_agent_max: usize,
    /// Most tunnels (agents) connected at once.
    pub tunnels_max: usize,
    /// A tunnel whose agent has not been heard from for this long is dead.
    pub heartbeat_timeout: Duration,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        Self {
            channels_per_tunnel_max: 1024,
            databases_per_agent_max: 1024,
            tunnels_max: 4096,
            heartbeat_timeout: Duration::from_secs(15),
        }
    }
}

impl RegistryLimits {
    /// Refuses limits under which the registry could not work.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |field, reason: &str| {
            Err(Error::InvalidConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.channels_per_tunnel_max == 0 {
            return invalid("channels_per_tunnel_max", "must be at least 1");
        }
        if self.tunnels_max == 0 {
            return invalid("tunnels_max", "must be at least 1");
        }
        if self.heartbeat_timeout.is_zero() {
            return invalid("heartbeat_timeout", "must be greater than zero");
        }
        Ok(())
    }
}

/// An agent that can serve a database, reached over `tunnel`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub tunnel: TunnelId,
    /// The agent's id, from its SSH certificate.
    pub agent: String,
}

/// What the driver must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryOutput {
    /// Tear `tunnel` down; the registry has already forgotten it.
    Close {
        tunnel: TunnelId,
        agent: String,
        reason: CloseReason,
    },
}

#[derive(Debug)]
struct Tunnel {
    agent: String,
    databases: BTreeSet<String>,
    channels_open: u32,
    dead_at: Duration,
    /// When the agent's certificate expires.
    cert_expires: Duration,
}

/// The agents connected to this proxy.
///
/// `now` is monotonic time since an origin the driver chose once; it must never go
/// backwards. A tunnel is only ever a candidate between [`Registry::handle_tunnel_up`]
/// and its removal (down, replaced, or silent for `heartbeat_timeout`).
#[derive(Debug)]
pub struct Registry {
    limits: RegistryLimits,
    tunnels: BTreeMap<TunnelId, Tunnel>,
    outputs: VecDeque<RegistryOutput>,
    next_tunnel: u64,
}

impl Registry {
    pub fn new(limits: RegistryLimits) -> Result<Self, Error> {
        limits.validate()?;
        Ok(Self {
            limits,
            tunnels: BTreeMap::new(),
            outputs: VecDeque::new(),
            next_tunnel: 1,
        })
    }

    /// An authenticated agent opened a tunnel; its certificate expires at `cert_expires`
    /// (on the same monotonic scale as `now`), and the tunnel is closed then. An older
    /// tunnel of the same agent is replaced (the agent restarted or lost it without this
    /// proxy noticing yet).
    pub fn handle_tunnel_up(
        &mut self,
        now: Duration,
        agent: &str,
        cert_expires: Duration,
    ) -> Result<TunnelId, Error> {
        let replaced: Vec<TunnelId> = self
            .tunnels
            .iter()
            .filter(|(_, t)| t.agent == agent)
            .map(|(id, _)| *id)
            .collect();
        if self.tunnels.len() - replaced.len() >= self.limits.tunnels_max {
            return Err(Error::TunnelsLimit {
                limit: self.limits.tunnels_max,
            });
        }
        for tunnel in replaced {
            self.tunnels.remove(&tunnel);
            self.outputs.push_back(RegistryOutput::Close {
                tunnel,
                agent: agent.to_owned(),
                reason: CloseReason::Replaced,
            });
        }
        let tunnel = TunnelId(self.next_tunnel);
        self.next_tunnel += 1;
        self.tunnels.insert(
            tunnel,
            Tunnel {
                agent: agent.to_owned(),
                databases: BTreeSet::new(),
                channels_open: 0,
                dead_at: now + self.limits.heartbeat_timeout,
                cert_expires,
            },
        );
        Ok(tunnel)
    }

    /// The agent on `tunnel` serves exactly `databases` (replacing what it said before).
    /// Counts as hearing from it.
    pub fn handle_announce(
        &mut self,
        now: Duration,
        tunnel: TunnelId,
        databases: impl IntoIterator<Item = String>,
    ) -> Result<(), Error> {
        let limit = self.limits.databases_per_agent_max;
        let timeout = self.limits.heartbeat_timeout;
        let entry = self
            .tunnels
            .get_mut(&tunnel)
            .ok_or(Error::UnknownTunnel { tunnel })?;
        let databases: BTreeSet<String> = databases.into_iter().collect();
        if databases.len() > limit {
            return Err(Error::DatabasesLimit {
                agent: entry.agent.clone(),
                count: databases.len(),
                limit,
            });
        }
        entry.databases = databases;
        entry.dead_at = now + timeout;
        Ok(())
    }

    /// The agent on `tunnel` sent a heartbeat: it is alive.
    pub fn handle_heartbeat(&mut self, now: Duration, tunnel: TunnelId) -> Result<(), Error> {
        let timeout = self.limits.heartbeat_timeout;
        let entry = self
            .tunnels
            .get_mut(&tunnel)
            .ok_or(Error::UnknownTunnel { tunnel })?;
        entry.dead_at = now + timeout;
        Ok(())
    }

    /// `tunnel` ended. Unknown (already removed) tunnels are ignored.
    pub fn handle_tunnel_down(&mut self, _now: Duration, tunnel: TunnelId) {
        self.tunnels.remove(&tunnel);
    }

    /// Removes tunnels whose agents have been silent for `heartbeat_timeout`, and those
    /// whose agent certificates have expired.
    pub fn handle_timeout(&mut self, now: Duration) {
        let due: Vec<(TunnelId, CloseReason)> = self
            .tunnels
            .iter()
            .filter_map(|(id, t)| {
                if t.cert_expires <= now {
                    Some((*id, CloseReason::CertificateExpired))
                } else if t.dead_at <= now {
                    Some((*id, CloseReason::HeartbeatTimeout))
                } else {
                    None
                }
            })
            .collect();
        for (tunnel, reason) in due {
            if let Some(entry) = self.tunnels.remove(&tunnel) {
                self.outputs.push_back(RegistryOutput::Close {
                    tunnel,
                    agent: entry.agent,
                    reason,
                });
            }
        }
    }

    /// Takes one channel slot on `tunnel`; give it back with [`Registry::release_channel`].
    pub fn reserve_channel(&mut self, tunnel: TunnelId) -> Result<(), Error> {
        let limit = self.limits.channels_per_tunnel_max;
        let entry = self
            .tunnels
            .get_mut(&tunnel)
            .ok_or(Error::UnknownTunnel { tunnel })?;
        if entry.channels_open >= limit {
            return Err(Error::ChannelLimit {
                agent: entry.agent.clone(),
                tunnel,
                limit,
            });
        }
        entry.channels_open += 1;
        Ok(())
    }

    /// Gives back a slot taken by [`Registry::reserve_channel`]. A tunnel that is gone
    /// took its slots with it.
    pub fn release_channel(&mut self, tunnel: TunnelId) {
        if let Some(entry) = self.tunnels.get_mut(&tunnel) {
            entry.channels_open = entry.channels_open.saturating_sub(1);
        }
    }

    /// Connected agents that announced `database`, ordered by agent id (the router
    /// shuffles them with its own seeded RNG).
    pub fn candidates(&self, database: &str) -> Vec<Candidate> {
        let mut candidates: Vec<Candidate> = self
            .tunnels
            .iter()
            .filter(|(_, t)| t.databases.contains(database))
            .map(|(tunnel, t)| Candidate {
                tunnel: *tunnel,
                agent: t.agent.clone(),
            })
            .collect();
        candidates.sort_by(|a, b| a.agent.cmp(&b.agent).then(a.tunnel.cmp(&b.tunnel)));
        candidates
    }

    /// The agent on `tunnel`, if it is connected.
    pub fn agent(&self, tunnel: TunnelId) -> Option<&str> {
        self.tunnels.get(&tunnel).map(|t| t.agent.as_str())
    }

    /// Channels open on `tunnel` (0 if it is gone).
    pub fn channels_open(&self, tunnel: TunnelId) -> u32 {
        self.tunnels.get(&tunnel).map_or(0, |t| t.channels_open)
    }

    /// How many tunnels are connected.
    pub fn tunnels(&self) -> usize {
        self.tunnels.len()
    }

    /// The next thing for the driver to do, if any. Drain after every `handle_*` call.
    pub fn poll_output(&mut self) -> Option<RegistryOutput> {
        self.outputs.pop_front()
    }

    /// When [`Registry::handle_timeout`] must next be called; `None` with no tunnels.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.tunnels
            .values()
            .map(|t| t.dead_at.min(t.cert_expires))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);
    /// A certificate that outlives the test.
    const NEVER: Duration = Duration::MAX;

    fn limits() -> RegistryLimits {
        RegistryLimits {
            channels_per_tunnel_max: 2,
            databases_per_agent_max: 3,
            tunnels_max: 4,
            heartbeat_timeout: 10 * S,
        }
    }

    fn dbs(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    // Candidates are the connected agents that announced the database, by agent id.
    #[test]
    fn candidates_are_agents_that_announced_the_database() {
        let mut registry = Registry::new(limits()).unwrap();
        let b = registry
            .handle_tunnel_up(Duration::ZERO, "agent-b", NEVER)
            .unwrap();
        let a = registry
            .handle_tunnel_up(Duration::ZERO, "agent-a", NEVER)
            .unwrap();
        registry
            .handle_announce(Duration::ZERO, b, dbs(&["pg", "mysql"]))
            .unwrap();
        registry
            .handle_announce(Duration::ZERO, a, dbs(&["pg"]))
            .unwrap();
        let pg: Vec<String> = registry
            .candidates("pg")
            .into_iter()
            .map(|c| c.agent)
            .collect();
        assert_eq!(pg, ["agent-a", "agent-b"]);
        assert_eq!(registry.candidates("mysql").len(), 1);
        assert!(registry.candidates("other").is_empty());
        registry.handle_tunnel_down(S, b);
        assert_eq!(registry.candidates("mysql"), []);
        assert!(matches!(
            registry.handle_announce(S, b, dbs(&["x"])),
            Err(Error::UnknownTunnel { .. })
        ));
    }

    // The channel limit per tunnel is enforced, and released slots can be reused.
    #[test]
    fn channel_limit_is_enforced() {
        let mut registry = Registry::new(limits()).unwrap();
        let t = registry
            .handle_tunnel_up(Duration::ZERO, "agent", NEVER)
            .unwrap();
        registry.reserve_channel(t).unwrap();
        registry.reserve_channel(t).unwrap();
        let err = registry.reserve_channel(t).unwrap_err();
        assert!(matches!(err, Error::ChannelLimit { limit: 2, .. }), "{err}");
        assert!(err.to_string().contains("channels_per_tunnel_max"));
        registry.release_channel(t);
        registry.reserve_channel(t).unwrap();
        assert_eq!(registry.channels_open(t), 2);
    }

    // A second tunnel from the same agent replaces the first, which is closed.
    #[test]
    fn a_newer_tunnel_replaces_the_older_one() {
        let mut registry = Registry::new(limits()).unwrap();
        let old = registry
            .handle_tunnel_up(Duration::ZERO, "agent", NEVER)
            .unwrap();
        registry
            .handle_announce(Duration::ZERO, old, dbs(&["pg"]))
            .unwrap();
        let new = registry.handle_tunnel_up(S, "agent", NEVER).unwrap();
        assert_eq!(
            registry.poll_output(),
            Some(RegistryOutput::Close {
                tunnel: old,
                agent: "agent".to_owned(),
                reason: CloseReason::Replaced
            })
        );
        assert!(registry.candidates("pg").is_empty());
        registry.handle_announce(S, new, dbs(&["pg"])).unwrap();
        assert_eq!(registry.candidates("pg")[0].tunnel, new);
    }

    // Silent tunnels are removed at the heartbeat timeout; heartbeats keep them.
    #[test]
    fn silent_tunnels_die_at_the_heartbeat_timeout() {
        let mut registry = Registry::new(limits()).unwrap();
        let quiet = registry
            .handle_tunnel_up(Duration::ZERO, "quiet", NEVER)
            .unwrap();
        let chatty = registry
            .handle_tunnel_up(Duration::ZERO, "chatty", NEVER)
            .unwrap();
        registry.handle_heartbeat(5 * S, chatty).unwrap();
        assert_eq!(registry.poll_timeout(), Some(10 * S));
        registry.handle_timeout(10 * S);
        assert_eq!(
            registry.poll_output(),
            Some(RegistryOutput::Close {
                tunnel: quiet,
                agent: "quiet".to_owned(),
                reason: CloseReason::HeartbeatTimeout
            })
        );
        assert_eq!(registry.poll_output(), None);
        assert_eq!(registry.agent(chatty), Some("chatty"));
        assert_eq!(registry.poll_timeout(), Some(15 * S));
    }

    // A tunnel is closed when its agent's certificate expires, heartbeats or not.
    #[test]
    fn tunnels_close_when_the_agent_certificate_expires() {
        let mut registry = Registry::new(limits()).unwrap();
        let t = registry
            .handle_tunnel_up(Duration::ZERO, "agent", 4 * S)
            .unwrap();
        registry
            .handle_announce(Duration::ZERO, t, dbs(&["pg"]))
            .unwrap();
        registry.handle_heartbeat(3 * S, t).unwrap();
        assert_eq!(registry.poll_timeout(), Some(4 * S));
        registry.handle_timeout(4 * S);
        assert_eq!(
            registry.poll_output(),
            Some(RegistryOutput::Close {
                tunnel: t,
                agent: "agent".to_owned(),
                reason: CloseReason::CertificateExpired
            })
        );
        assert!(registry.candidates("pg").is_empty());
    }

    // Tunnel and database limits are enforced with errors naming the limit.
    #[test]
    fn tunnel_and_database_limits_are_enforced() {
        let mut registry = Registry::new(limits()).unwrap();
        for i in 0..4 {
            registry
                .handle_tunnel_up(Duration::ZERO, &format!("a{i}"), NEVER)
                .unwrap();
        }
        assert!(matches!(
            registry.handle_tunnel_up(Duration::ZERO, "a4", NEVER),
            Err(Error::TunnelsLimit { limit: 4 })
        ));
        // A reconnecting agent replaces its tunnel, so it is not refused at the limit.
        let t = registry
            .handle_tunnel_up(Duration::ZERO, "a0", NEVER)
            .unwrap();
        assert!(matches!(
            registry.handle_announce(Duration::ZERO, t, dbs(&["a", "b", "c", "d"])),
            Err(Error::DatabasesLimit {
                count: 4,
                limit: 3,
                ..
            })
        ));
    }

    proptest! {
        // Under any sequence of events, candidates are only ever tunnels that are up (as
        // the driver sees them), channel counts never exceed the limit, and every Close
        // names a tunnel that was up.
        #[test]
        fn registry_never_returns_a_disconnected_agent(
            events in proptest::collection::vec((0u8..7, 0usize..4, 0u64..6), 1..300),
        ) {
            let lim = limits();
            let mut registry = Registry::new(lim).unwrap();
            let mut now = Duration::ZERO;
            let mut up: BTreeMap<TunnelId, String> = BTreeMap::new();
            let agents = ["a", "b", "c", "d"];
            for (kind, which, secs) in events {
                let agent = agents[which];
                let tunnel_of = |up: &BTreeMap<TunnelId, String>| {
                    up.iter().find(|(_, a)| a.as_str() == agent).map(|(t, _)| *t)
                };
                match kind {
                    0 => {
                        let expires = now + Duration::from_secs(secs * 4 + 1);
                        let t = registry.handle_tunnel_up(now, agent, expires).unwrap();
                        up.insert(t, agent.to_owned());
                    }
                    1 => if let Some(t) = tunnel_of(&up) {
                        registry.handle_tunnel_down(now, t);
                        up.remove(&t);
                    },
                    2 => if let Some(t) = tunnel_of(&up) {
                        registry.handle_announce(now, t, dbs(&["pg", agent])).unwrap();
                    },
                    3 => if let Some(t) = tunnel_of(&up) {
                        registry.handle_heartbeat(now, t).unwrap();
                    },
                    4 => if let Some(t) = tunnel_of(&up) {
                        let _ = registry.reserve_channel(t);
                        prop_assert!(registry.channels_open(t) <= lim.channels_per_tunnel_max);
                    },
                    5 => if let Some(t) = tunnel_of(&up) {
                        registry.release_channel(t);
                    },
                    _ => {
                        now += Duration::from_secs(secs);
                        registry.handle_timeout(now);
                    }
                }
                while let Some(RegistryOutput::Close { tunnel, agent, .. }) = registry.poll_output() {
                    prop_assert_eq!(up.remove(&tunnel), Some(agent));
                }
                for candidate in registry.candidates("pg") {
                    prop_assert_eq!(up.get(&candidate.tunnel), Some(&candidate.agent));
                }
                prop_assert_eq!(registry.tunnels(), up.len());
            }
        }
    }
}

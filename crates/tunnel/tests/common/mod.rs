//! Shared fixtures: a cluster's host CA, tunnel certificates and configurations.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use postern_pki::{CaKind, CertAuthority, HostIdentity, HostRole, UnixTime};
use postern_rt::Rng;
use postern_tunnel::{AgentConfig, Backoff, PoolConfig, ProxyConfig};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, PublicKey};

pub const HOUR: Duration = Duration::from_secs(3600);

/// A cluster: its name and host CA.
pub struct Cluster {
    pub name: String,
    pub host_ca: CertAuthority,
}

impl Cluster {
    /// A cluster whose host CA is valid for ten years around `now`.
    pub fn new(name: &str, now: UnixTime) -> Self {
        let start = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() - 24 * 3600));
        let host_ca =
            CertAuthority::generate(CaKind::Host, name, start, 10 * 365 * 24 * HOUR).unwrap();
        Self {
            name: name.to_owned(),
            host_ca,
        }
    }

    /// The keys that tunnel certificates of this cluster must be signed by.
    pub fn ca_keys(&self) -> Vec<PublicKey> {
        vec![self.host_ca.ssh_public_key().unwrap()]
    }

    fn host(
        &self,
        host_id: &str,
        role: HostRole,
        names: &[&str],
        now: UnixTime,
        ttl: Duration,
    ) -> HostIdentity {
        HostIdentity {
            host_id: host_id.to_owned(),
            role,
            cluster: self.name.clone(),
            names: names.iter().map(|n| n.to_string()).collect(),
            expires: UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs()) + ttl),
        }
    }

    /// A proxy with a host certificate for `names`, trusting `trusted` for agents.
    pub fn proxy(
        &self,
        names: &[&str],
        trusted: Vec<PublicKey>,
        now: UnixTime,
        ttl: Duration,
        seed: u64,
    ) -> ProxyConfig {
        let key = ssh_key(seed);
        let host = self.host("proxy-1", HostRole::Proxy, names, now, ttl);
        let cert = self
            .host_ca
            .issue_ssh_host_cert(&host, key.public_key(), now)
            .unwrap();
        let mut config = ProxyConfig::new(key, cert, trusted);
        config.limits.heartbeat_timeout = Duration::from_secs(5);
        config.handshake_timeout = Duration::from_secs(5);
        config.channel_open_timeout = Duration::from_secs(5);
        config
    }

    /// An agent serving `databases`, trusting `trusted` for proxies.
    pub fn agent(
        &self,
        agent_id: &str,
        databases: &[&str],
        trusted: Vec<PublicKey>,
        now: UnixTime,
        ttl: Duration,
        seed: u64,
    ) -> AgentConfig {
        let key = ssh_key(seed);
        let host = self.host(agent_id, HostRole::Agent, &[], now, ttl);
        let cert = self
            .host_ca
            .issue_ssh_user_cert(&host, key.public_key(), now)
            .unwrap();
        // A fixed list: the sender is dropped at once.
        let databases = databases.iter().map(|d| d.to_string()).collect();
        let mut config = AgentConfig::new(
            agent_id.to_owned(),
            key,
            cert,
            trusted,
            tokio::sync::watch::channel(databases).1,
        );
        config.pool = fast_pool();
        config.channel_queue_max = 16;
        config
    }
}

/// An Ed25519 SSH key determined by `seed`.
pub fn ssh_key(seed: u64) -> PrivateKey {
    let mut bytes = [0u8; 32];
    Rng::from_seed(seed).fill(&mut bytes);
    PrivateKey::from(Ed25519Keypair::from_seed(&bytes))
}

/// Short reconnect timers so tests see reconnects quickly; heartbeat timeouts generous
/// enough that a loaded test machine does not drop tunnels by accident.
pub fn fast_pool() -> PoolConfig {
    PoolConfig {
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(400),
            multiplier: 2,
            jitter_permille: 250,
        },
        connect_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_millis(300),
        heartbeat_timeout: Duration::from_secs(3),
        proxies_max: 8,
    }
}

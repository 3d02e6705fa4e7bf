//! The one error type of this crate.

use crate::TunnelId;

/// Everything that can go wrong in the tunnel, grouped by category. Each variant carries
/// the facts a person needs to act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- Configuration ---
    /// A setting is out of range.
    #[error("invalid tunnel setting {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    // --- Limits ---
    /// More proxies listed than the pool holds tunnels to.
    #[error("{count} proxies listed, more than the limit of {limit} (proxies_max)")]
    ProxiesLimit { count: usize, limit: usize },
    /// The proxy already holds as many tunnels as it accepts.
    #[error("this proxy already holds {limit} tunnels (tunnels_max); refusing another agent")]
    TunnelsLimit { limit: usize },
    /// An agent announced more databases than a proxy accepts from one agent.
    #[error(
        "agent \"{agent}\" announced {count} databases, more than the limit of {limit} \
         (databases_per_agent_max)"
    )]
    DatabasesLimit {
        agent: String,
        count: usize,
        limit: usize,
    },
    /// A tunnel already carries as many channels as allowed.
    #[error(
        "the tunnel {tunnel} to agent \"{agent}\" already carries {limit} connections \
         (channels_per_tunnel_max); try again when some close, or run another agent"
    )]
    ChannelLimit {
        agent: String,
        tunnel: TunnelId,
        limit: u32,
    },

    // --- Tunnel state ---
    /// The tunnel is not (or no longer) connected.
    #[error("tunnel {tunnel} is not connected")]
    UnknownTunnel { tunnel: TunnelId },

    // --- Transport ---
    /// A network operation failed (connect, listen, accept).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The SSH connection failed or was closed.
    #[error("{context}: SSH: {source}")]
    Ssh {
        context: String,
        #[source]
        source: russh::Error,
    },
    /// The tunnel is down or was torn down while in use.
    #[error("tunnel to {peer} closed: {reason}")]
    TunnelClosed { peer: String, reason: String },
    /// The agent refused or could not open a channel for this database.
    #[error("agent \"{agent}\" refused a connection to database \"{database}\": {reason}")]
    ChannelRefused {
        agent: String,
        database: String,
        reason: String,
    },

    // --- Authentication ---
    /// The peer's SSH certificate was refused (foreign CA, expired, wrong role...).
    #[error("refused the SSH certificate of {peer}: {source}")]
    PeerCertificate {
        peer: String,
        #[source]
        source: postern_pki::Error,
    },
    /// The peer presented a bare SSH key where a certificate from the host CA is required.
    #[error(
        "{peer} presented no SSH certificate; only hosts with a certificate from the cluster's host CA are trusted"
    )]
    NoPeerCertificate { peer: String },
    /// The proxy did not accept this agent's SSH certificate.
    #[error(
        "proxy {proxy} refused this agent's SSH certificate (expired, or issued by another \
         cluster's host CA); renew the agent's certificate or re-join with a fresh token"
    )]
    AuthenticationRefused { proxy: String },

    // --- Protocol ---
    /// A control-channel frame is malformed.
    #[error("malformed tunnel control message: {reason}")]
    ControlMalformed { reason: String },
}

impl Error {
    /// Whether this is a failure of one tunnel or agent, after which a router should try
    /// the next candidate agent (REFERENCE.md, "Registry and failover"); other errors
    /// would fail the same way anywhere and should be returned at once.
    pub fn is_tunnel_error(&self) -> bool {
        matches!(
            self,
            Error::ChannelLimit { .. }
                | Error::UnknownTunnel { .. }
                | Error::Io { .. }
                | Error::Ssh { .. }
                | Error::TunnelClosed { .. }
                | Error::ChannelRefused { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Errors of one tunnel send a router to the next agent; configuration errors do not.
    #[test]
    fn tunnel_errors_are_told_apart() {
        let tunnel = TunnelId(1);
        assert!(Error::UnknownTunnel { tunnel }.is_tunnel_error());
        assert!(
            Error::ChannelLimit {
                agent: "a".to_owned(),
                tunnel,
                limit: 1
            }
            .is_tunnel_error()
        );
        assert!(
            !Error::InvalidConfig {
                field: "x",
                reason: String::new()
            }
            .is_tunnel_error()
        );
        assert!(
            !Error::ControlMalformed {
                reason: String::new()
            }
            .is_tunnel_error()
        );
    }
}

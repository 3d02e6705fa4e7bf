//! The reverse tunnel between agents (database services) and proxies.
//!
//! Agents dial out to every proxy and hold an SSH connection to each; proxies open one
//! channel per client connection back through it, so databases are reachable from
//! proxies without being reachable from anywhere else.
//!
//! # Sans-IO cores
//!
//! The logic that decides things has no tokio, no clock and no randomness of its own:
//!
//! - [`Pool`] (agent side): which proxies to hold tunnels to, when to dial, back off
//!   ([`Backoff`]: exponential, seeded jitter) and heartbeat, and when a tunnel is dead
//!   (silent for `heartbeat_timeout`, or the proxy's certificate expired).
//! - [`Registry`] (proxy side): which agents are connected, which databases each serves,
//!   how many channels each tunnel carries (`channels_per_tunnel_max`), and when a
//!   tunnel is dead.
//! - [`control`]: the codec of the control channel (database list, heartbeats).
//!
//! Both cores have the same shape: `handle_*(now, input)` feeds them, `poll_output()`
//! drains what the driver must do, `poll_timeout()` says when to call
//! `handle_timeout(now)`. **Time** is a [`std::time::Duration`] of monotonic time since an
//! origin the driver picks once (its start); it never goes backwards and is never read
//! by the cores themselves. **Randomness** comes from a [`postern_rt::Rng`] handle, so a
//! simulation seed fixes every backoff delay.
//!
//! # Transport
//!
//! Thin drivers carry the cores over russh, through the runtime seam
//! ([`postern_rt::Runtime`]: its network, wall clock and RNG), unchanged under tokio and
//! turmoil:
//!
//! - [`Agent`] dials each proxy, checks the proxy's SSH **host certificate** (host CA,
//!   role `proxy`, the dialled host name as principal, validity by the injected wall
//!   clock), and authenticates with its own SSH **user certificate** (role `agent`).
//! - It then opens one `session` channel, the **control channel**: it sends its database
//!   list, then a heartbeat every `heartbeat_interval`, each answered by the proxy.
//! - [`ProxyTunnels`] accepts agents, checks their certificates the same way, registers
//!   the tunnel when the control channel opens, and opens a `forwarded-tcpip` channel per
//!   client connection ([`ProxyTunnels::open_channel`]) whose "connected address" is the
//!   database name, whose "connected port" is the [`ChannelKind`] (0: a client session,
//!   1: one PostgreSQL CancelRequest) and whose "originator" is the client. The agent
//!   accepts channels only for databases it serves and hands them over as
//!   [`IncomingChannel`]s; [`IncomingChannel::kind`] says which service to run.
//!
//! russh checks certificate validity against the real clock as well; our checks use the
//! injected one, which is what simulations and tests move.
pub mod agent;
pub mod backoff;
pub mod control;
mod error;
pub mod fuzzing;
mod monotonic;
pub mod pool;
pub mod proxy;
pub mod registry;
mod sync;
pub mod table;

/// The tunnel's ciphers, best first: AES-GCM, which has hardware support (AES-NI,
/// PCLMULQDQ) on the machines agents and proxies run on and costs less per packet than
/// russh's default first choice, chacha20-poly1305 (kept as a fallback, with the rest
/// of russh's defaults). Every session's bytes pass through it twice.
pub const CIPHER_ORDER: &[russh::cipher::Name] = &[
    russh::cipher::AES_256_GCM,
    russh::cipher::AES_128_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

use std::fmt;

pub use agent::{Agent, AgentConfig, AgentStatus, IncomingChannel};
pub use backoff::Backoff;
pub use error::Error;
pub use pool::{Pool, PoolConfig, PoolOutput, ProxyState};
pub use proxy::{ChannelRequest, ProxyConfig, ProxyTunnels};
pub use registry::{Candidate, Registry, RegistryLimits, RegistryOutput};
pub use table::{Closing, TunnelTable};

/// Names one tunnel (or attempt at one) within the [`Pool`] or [`Registry`] that issued
/// it; never reused by that issuer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TunnelId(pub u64);

impl fmt::Display for TunnelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What a channel through the tunnel carries. Sent as the `forwarded-tcpip` "connected
/// port", so agents that predate cancel channels see every channel as a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ChannelKind {
    /// One client session: mutual TLS, then the database protocol.
    #[default]
    Session,
    /// One cancel request (PostgreSQL's 16-byte CancelRequest) for a session the agent
    /// serves; the channel closes after it.
    Cancel,
}

impl ChannelKind {
    /// The "connected port" that carries this kind.
    pub fn port(self) -> u32 {
        match self {
            ChannelKind::Session => 0,
            ChannelKind::Cancel => 1,
        }
    }

    /// The kind a "connected port" names; `None` for a kind this agent does not know.
    pub fn from_port(port: u32) -> Option<Self> {
        match port {
            0 => Some(ChannelKind::Session),
            1 => Some(ChannelKind::Cancel),
            _ => None,
        }
    }
}

/// Why a core asked for a tunnel to be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// The proxy is no longer in the agent's list.
    Removed,
    /// The attempt did not complete within `connect_timeout`.
    ConnectTimeout,
    /// Nothing heard from the other end within `heartbeat_timeout`.
    HeartbeatTimeout,
    /// The peer's certificate expired.
    CertificateExpired,
    /// The same agent opened a newer tunnel.
    Replaced,
    /// The control channel ended or carried a malformed message.
    ControlClosed,
    /// The service is shutting down.
    Shutdown,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::Removed => "proxy removed from the list",
            CloseReason::ConnectTimeout => "connect timeout",
            CloseReason::HeartbeatTimeout => "heartbeat timeout",
            CloseReason::CertificateExpired => "the peer's certificate expired",
            CloseReason::Replaced => "replaced by a newer tunnel from the same agent",
            CloseReason::ControlClosed => "control channel closed",
            CloseReason::Shutdown => "shutting down",
        })
    }
}

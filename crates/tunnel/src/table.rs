//! The proxy's tunnel table: the [`Registry`] and each tunnel's session handle behind one
//! lock, shared by every task of [`crate::ProxyTunnels`] (agent connections registering
//! and dropping tunnels, client connections taking channels, the timer task).
//!
//! One lock over both keeps them in step: a tunnel is a route exactly while the registry
//! knows it *and* its handle is here, and each handle leaves the table exactly once, to be
//! closed by whoever took it. `tests/loom_table.rs` checks this under every interleaving.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::Error;
use crate::registry::{Candidate, Registry, RegistryLimits, RegistryOutput};
use crate::sync::{Mutex, MutexGuard, lock};
use crate::{CloseReason, TunnelId};

/// A tunnel the table dropped, with its session handle for the caller to close.
#[derive(Debug, PartialEq, Eq)]
pub struct Closing<H> {
    pub tunnel: TunnelId,
    pub agent: String,
    pub reason: CloseReason,
    pub session: H,
}

/// Registered tunnels and their session handles (`H`: russh's `server::Handle` in the
/// proxy). Share it by reference or `Arc`; every method takes the lock once.
#[derive(Debug)]
pub struct TunnelTable<H> {
    state: Mutex<State<H>>,
}

#[derive(Debug)]
struct State<H> {
    registry: Registry,
    sessions: HashMap<TunnelId, H>,
}

impl<H: Clone> TunnelTable<H> {
    pub fn new(limits: RegistryLimits) -> Result<Self, Error> {
        Ok(Self {
            state: Mutex::new(State {
                registry: Registry::new(limits)?,
                sessions: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<H>> {
        lock(&self.state)
    }

    /// Registers a tunnel of `agent` carried by `session` (see
    /// [`Registry::handle_tunnel_up`]). A tunnel it replaces comes out of
    /// [`TunnelTable::take_closing`].
    pub fn tunnel_up(
        &self,
        now: Duration,
        agent: &str,
        cert_expires: Duration,
        session: H,
    ) -> Result<TunnelId, Error> {
        let mut state = self.lock();
        let tunnel = state.registry.handle_tunnel_up(now, agent, cert_expires)?;
        state.sessions.insert(tunnel, session);
        Ok(tunnel)
    }

    /// Forgets `tunnel`; its session handle, unless the table already gave it up (the
    /// tunnel was replaced or timed out, or this was called before).
    pub fn tunnel_down(&self, now: Duration, tunnel: TunnelId) -> Option<H> {
        let mut state = self.lock();
        state.registry.handle_tunnel_down(now, tunnel);
        state.sessions.remove(&tunnel)
    }

    /// See [`Registry::handle_announce`].
    pub fn announce(
        &self,
        now: Duration,
        tunnel: TunnelId,
        databases: impl IntoIterator<Item = String>,
    ) -> Result<(), Error> {
        self.lock().registry.handle_announce(now, tunnel, databases)
    }

    /// See [`Registry::handle_heartbeat`].
    pub fn heartbeat(&self, now: Duration, tunnel: TunnelId) -> Result<(), Error> {
        self.lock().registry.handle_heartbeat(now, tunnel)
    }

    /// See [`Registry::handle_timeout`]; the tunnels it drops come out of
    /// [`TunnelTable::take_closing`].
    pub fn timeout(&self, now: Duration) {
        self.lock().registry.handle_timeout(now);
    }

    /// See [`Registry::poll_timeout`].
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.lock().registry.poll_timeout()
    }

    /// The tunnels the registry dropped on its own (replaced, silent, certificate
    /// expired), each with its session handle. Call after every `tunnel_up` and
    /// `timeout`; concurrent callers each get different tunnels.
    pub fn take_closing(&self) -> Vec<Closing<H>> {
        let mut state = self.lock();
        let mut closing = Vec::new();
        while let Some(RegistryOutput::Close {
            tunnel,
            agent,
            reason,
        }) = state.registry.poll_output()
        {
            if let Some(session) = state.sessions.remove(&tunnel) {
                closing.push(Closing {
                    tunnel,
                    agent,
                    reason,
                    session,
                });
            }
        }
        closing
    }

    /// See [`Registry::candidates`].
    pub fn candidates(&self, database: &str) -> Vec<Candidate> {
        self.lock().registry.candidates(database)
    }

    /// Takes a channel slot on `tunnel` (give it back with [`TunnelTable::release`]):
    /// the tunnel's session handle and agent id. Fails if the tunnel is gone or full.
    pub fn reserve(&self, tunnel: TunnelId) -> Result<(H, String), Error> {
        let mut state = self.lock();
        let session = state
            .sessions
            .get(&tunnel)
            .cloned()
            .ok_or(Error::UnknownTunnel { tunnel })?;
        state.registry.reserve_channel(tunnel)?;
        let agent = state.registry.agent(tunnel).unwrap_or_default().to_owned();
        Ok((session, agent))
    }

    /// Gives back a slot taken by [`TunnelTable::reserve`] (a no-op once the tunnel is gone).
    pub fn release(&self, tunnel: TunnelId) {
        self.lock().registry.release_channel(tunnel);
    }

    /// Channels open on `tunnel` (0 if it is gone).
    pub fn channels_open(&self, tunnel: TunnelId) -> u32 {
        self.lock().registry.channels_open(tunnel)
    }

    /// How many tunnels are registered.
    pub fn tunnels(&self) -> usize {
        self.lock().registry.tunnels()
    }

    /// How many session handles the table holds: one per registered tunnel, and those of
    /// dropped tunnels that [`TunnelTable::take_closing`] has not yet handed out.
    pub fn sessions(&self) -> usize {
        self.lock().sessions.len()
    }
}

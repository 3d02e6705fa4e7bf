//! Planted bugs, for checking that the simulator catches real mistakes.
//!
//! Compiled only with the `planted-bugs` feature (which the simulator's own
//! `planted-bugs` feature turns on, through the service crates). Each bug is a small,
//! plausible mistake in real service code, guarded by [`active`]; the simulator
//! [`select`]s at most one before each seed. A seed runs on one thread (turmoil steps
//! every host from the thread that runs the simulation), so the selection is
//! thread-local: seeds run in parallel on other threads are not affected.
//!
//! Without the feature this module does not exist and no bug can be switched on.

use std::cell::Cell;

/// A bug that can be switched on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Bug {
    /// Agent: once an identity has been allowed, its later connections skip the role
    /// check (`crates/agent/src/session.rs`).
    AgentSkipsSecondRoleCheck,
    /// Agent: the audit spool is emptied when the service starts, losing events written
    /// but not yet shipped before a crash (`crates/agent/src/service.rs`).
    AgentDropsSpoolOnRestart,
    /// Proxy: always routes to the first candidate agent, even when its tunnel is down
    /// or it just failed, and never moves on (`crates/proxy/src/route.rs`).
    ProxyRoutesToFirstAgent,
    /// PKI: certificates are accepted up to 5 minutes past their expiry
    /// (`crates/pki/src/validate.rs`).
    PkiExpiryGrace,
    /// Agent: keeps trusting the user CAs it started with when a CA rotation moves on,
    /// so it refuses proxy→agent certificates from the new CA
    /// (`crates/agent/src/service.rs`, `follow_user_cas`).
    AgentIgnoresCaRotation,
}

impl Bug {
    pub const ALL: [Bug; 5] = [
        Bug::AgentSkipsSecondRoleCheck,
        Bug::AgentDropsSpoolOnRestart,
        Bug::ProxyRoutesToFirstAgent,
        Bug::PkiExpiryGrace,
        Bug::AgentIgnoresCaRotation,
    ];

    /// A short name, for test output and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Bug::AgentSkipsSecondRoleCheck => "agent-skips-second-role-check",
            Bug::AgentDropsSpoolOnRestart => "agent-drops-spool-on-restart",
            Bug::ProxyRoutesToFirstAgent => "proxy-routes-to-first-agent",
            Bug::PkiExpiryGrace => "pki-expiry-grace",
            Bug::AgentIgnoresCaRotation => "agent-ignores-ca-rotation",
        }
    }

    /// The bug named `name` (see [`Bug::name`]).
    pub fn from_name(name: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|b| b.name() == name)
    }
}

thread_local! {
    static SELECTED: Cell<Option<Bug>> = const { Cell::new(None) };
}

/// Switches `bug` on for this thread (`None`: every bug off).
pub fn select(bug: Option<Bug>) {
    SELECTED.with(|s| s.set(bug));
}

/// Whether `bug` is switched on for this thread.
pub fn active(bug: Bug) -> bool {
    SELECTED.with(|s| s.get()) == Some(bug)
}

#[cfg(test)]
mod tests {
    use super::*;

    // One bug at a time, per thread, and names round-trip.
    #[test]
    fn selection_is_one_bug_per_thread() {
        select(Some(Bug::PkiExpiryGrace));
        assert!(active(Bug::PkiExpiryGrace));
        assert!(!active(Bug::ProxyRoutesToFirstAgent));
        let other = std::thread::spawn(|| active(Bug::PkiExpiryGrace))
            .join()
            .unwrap();
        assert!(!other);
        select(None);
        assert!(!active(Bug::PkiExpiryGrace));
        for bug in Bug::ALL {
            assert_eq!(Bug::from_name(bug.name()), Some(bug));
        }
    }
}

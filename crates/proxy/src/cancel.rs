//! Which agent owns a cancel key: the proxy's table of running PostgreSQL sessions.
//!
//! psql (and libpq before PostgreSQL 17) cancels a query by opening a *new* plain TCP
//! connection to the server it is connected to and sending a 16-byte CancelRequest with
//! the session's key (process id and secret from BackendKeyData). Through the proxy that
//! connection arrives here, without a certificate, so the only thing that can route it is
//! the key itself: the proxy learns each session's key while it relays start-up, and
//! remembers which tunnel and database it belongs to until the session ends.
//!
//! Sans-IO and bounded: at most `cancel_keys_max` keys (one per running session). A key
//! nobody owns is dropped silently, as PostgreSQL does, so a client cannot probe keys.
//! [`CancelKeys`] is the table as the proxy's tasks share it; `tests/loom_cancel.rs`
//! checks it under every interleaving.

use std::collections::HashMap;

use crate::sync::{Mutex, lock};

use postern_pg::frontend::CancelRequest;
use postern_tunnel::TunnelId;

/// Most sessions whose cancel key the proxy remembers.
pub const CANCEL_KEYS_MAX_DEFAULT: usize = 100_000;

/// Where to send a cancel request for one session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelRoute {
    /// The tunnel of the agent that serves the session.
    pub tunnel: TunnelId,
    /// That agent's id (for logs).
    pub agent: String,
    /// The database (route service name) the session is on.
    pub database: String,
}

/// Proof that a key was registered; hand it back to [`CancelTable::remove`] at the end
/// of the session. Removing by ticket never removes a newer session's entry.
#[derive(Debug, PartialEq, Eq)]
pub struct CancelTicket {
    key: (i32, Vec<u8>),
    id: u64,
}

/// The table is at `cancel_keys_max`: this session cannot be cancelled through the proxy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the proxy already tracks {limit} cancel keys (cancel_keys_max); this session's queries cannot be cancelled through it"
)]
pub struct CancelTableFull {
    pub limit: usize,
}

/// Running sessions by cancel key.
#[derive(Debug)]
pub struct CancelTable {
    entries: HashMap<(i32, Vec<u8>), (u64, CancelRoute)>,
    next_id: u64,
    keys_max: usize,
}

impl CancelTable {
    /// An empty table holding at most `keys_max` keys.
    pub fn new(keys_max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            next_id: 0,
            keys_max,
        }
    }

    /// Remembers that `key` belongs to a session at `route`. A key already present (two
    /// databases handing out the same process id and secret) now routes to the newer
    /// session.
    pub fn insert(
        &mut self,
        key: &CancelRequest,
        route: CancelRoute,
    ) -> Result<CancelTicket, CancelTableFull> {
        let key = (key.process_id, key.secret_key.clone());
        if self.entries.len() >= self.keys_max && !self.entries.contains_key(&key) {
            return Err(CancelTableFull {
                limit: self.keys_max,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(key.clone(), (id, route));
        Ok(CancelTicket { key, id })
    }

    /// Forgets the session of `ticket` (if a newer session took its key, that one stays).
    pub fn remove(&mut self, ticket: CancelTicket) {
        if self
            .entries
            .get(&ticket.key)
            .is_some_and(|(id, _)| *id == ticket.id)
        {
            self.entries.remove(&ticket.key);
        }
    }

    /// Where the session that owns `key` runs, if any session does.
    pub fn route(&self, key: &CancelRequest) -> Option<&CancelRoute> {
        self.entries
            .get(&(key.process_id, key.secret_key.clone()))
            .map(|(_, route)| route)
    }

    /// How many sessions are registered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The [`CancelTable`] shared by the proxy's tasks: each session registers its key for
/// as long as it runs, and cancel requests look keys up.
#[derive(Debug)]
pub struct CancelKeys {
    table: Mutex<CancelTable>,
}

impl CancelKeys {
    /// No keys yet; at most `keys_max`.
    pub fn new(keys_max: usize) -> Self {
        Self {
            table: Mutex::new(CancelTable::new(keys_max)),
        }
    }

    /// Routes `key` to `route` until the returned registration is dropped.
    pub fn register(
        &self,
        key: &CancelRequest,
        route: CancelRoute,
    ) -> Result<CancelRegistration<'_>, CancelTableFull> {
        let ticket = lock(&self.table).insert(key, route)?;
        Ok(CancelRegistration {
            keys: self,
            ticket: Some(ticket),
        })
    }

    /// Where the running session that owns `key` is, if one does.
    pub fn route(&self, key: &CancelRequest) -> Option<CancelRoute> {
        lock(&self.table).route(key).cloned()
    }

    /// How many sessions are registered.
    pub fn len(&self) -> usize {
        lock(&self.table).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A session's key in [`CancelKeys`]; removed when dropped, however the session ends.
#[derive(Debug)]
pub struct CancelRegistration<'a> {
    keys: &'a CancelKeys,
    ticket: Option<CancelTicket>,
}

impl Drop for CancelRegistration<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            lock(&self.keys.table).remove(ticket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: i32, secret: &[u8]) -> CancelRequest {
        CancelRequest {
            process_id: pid,
            secret_key: secret.to_vec(),
        }
    }

    fn route(tunnel: u64) -> CancelRoute {
        CancelRoute {
            tunnel: TunnelId(tunnel),
            agent: format!("agent-{tunnel}"),
            database: "orders".to_owned(),
        }
    }

    // A key routes to its session until the session ends; unknown and wrong-secret keys route nowhere.
    #[test]
    fn keys_route_until_removed() {
        let mut table = CancelTable::new(10);
        let ticket = table.insert(&key(42, b"abcd"), route(1)).unwrap();
        assert_eq!(table.route(&key(42, b"abcd")), Some(&route(1)));
        assert_eq!(table.route(&key(42, b"abce")), None);
        assert_eq!(table.route(&key(43, b"abcd")), None);
        table.remove(ticket);
        assert_eq!(table.route(&key(42, b"abcd")), None);
        assert!(table.is_empty());
    }

    // The table refuses keys past its limit, and an old session's end never removes a newer one's key.
    #[test]
    fn bounded_and_removal_is_by_ticket() {
        let mut table = CancelTable::new(2);
        let old = table.insert(&key(1, b"aaaa"), route(1)).unwrap();
        table.insert(&key(2, b"bbbb"), route(2)).unwrap();
        assert_eq!(
            table.insert(&key(3, b"cccc"), route(3)),
            Err(CancelTableFull { limit: 2 })
        );
        // Same key again (another database reused it): the newer session owns it.
        let newer = table.insert(&key(1, b"aaaa"), route(3)).unwrap();
        table.remove(old);
        assert_eq!(table.route(&key(1, b"aaaa")), Some(&route(3)));
        table.remove(newer);
        assert_eq!(table.len(), 1);
    }
}

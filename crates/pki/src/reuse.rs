//! Short reuse of issued certificates.
//!
//! Issuing a certificate for a session costs a key, a signature and often a request to
//! the auth service: more than the rest of a new session. The proxy (its proxy→agent
//! certificates) and the agent (its database client certificates) keep what they issued
//! for one session and hand it to the next session that needs the same thing, for a
//! short while. Nothing the other side checks changes: the certificate carries the same
//! identity, and access is still decided for every session.
//!
//! Sans-IO: the caller passes the time, both monotonic (how long ago it was issued) and
//! wall-clock (how far it is from its expiry).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

/// How long an issued certificate serves later sessions.
pub const REUSE_MAX: Duration = Duration::from_secs(60);
/// An issued certificate is not reused within this long of its expiry.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// Most issued certificates kept.
pub const CACHE_MAX: usize = 1024;

/// Issued certificates (or what was built from them) by what they were issued for.
pub struct IssuedCache<K, V> {
    by_key: HashMap<K, Issued<V>>,
}

struct Issued<V> {
    value: V,
    /// When it was issued, on the caller's monotonic clock.
    issued_at: Duration,
    /// The certificate's `not_after`, in seconds since the Unix epoch.
    expires_secs: u64,
}

impl<V> Issued<V> {
    fn usable(&self, now: Duration, now_secs: u64) -> bool {
        now.saturating_sub(self.issued_at) < REUSE_MAX
            && now_secs.saturating_add(EXPIRY_MARGIN.as_secs()) < self.expires_secs
    }
}

impl<K, V> std::fmt::Debug for IssuedCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCache")
            .field("len", &self.by_key.len())
            .finish_non_exhaustive()
    }
}

impl<K, V> Default for IssuedCache<K, V> {
    fn default() -> Self {
        IssuedCache {
            by_key: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash, V: Clone> IssuedCache<K, V> {
    /// What was issued for `key`, if it was issued less than [`REUSE_MAX`] ago and
    /// expires more than [`EXPIRY_MARGIN`] from now. `now` is monotonic, `now_secs` is
    /// wall-clock seconds since the Unix epoch.
    pub fn get<Q>(&self, key: &Q, now: Duration, now_secs: u64) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let issued = self.by_key.get(key)?;
        issued.usable(now, now_secs).then(|| issued.value.clone())
    }

    /// Keeps `value`, issued now and expiring at `expires_secs`. Drops what is no longer
    /// usable first when full, and keeps nothing new while [`CACHE_MAX`] entries are
    /// still usable (replacing the entry of the same key is always allowed).
    pub fn insert(&mut self, key: K, value: V, expires_secs: u64, now: Duration, now_secs: u64) {
        if self.by_key.len() >= CACHE_MAX {
            self.by_key.retain(|_, kept| kept.usable(now, now_secs));
        }
        if self.by_key.len() < CACHE_MAX || self.by_key.contains_key(&key) {
            let issued = Issued {
                value,
                issued_at: now,
                expires_secs,
            };
            self.by_key.insert(key, issued);
        }
    }

    /// Entries kept, usable or not.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn reused_within_the_window_and_not_after() {
        let mut cache = IssuedCache::default();
        cache.insert("alice", 1, T0 + 3600, secs(100), T0);
        assert_eq!(cache.get("alice", secs(100), T0), Some(1));
        assert_eq!(cache.get("alice", secs(159), T0 + 59), Some(1));
        assert_eq!(cache.get("alice", secs(160), T0 + 60), None);
        assert_eq!(cache.get("bob", secs(100), T0), None);
    }

    #[test]
    fn never_reused_near_or_past_expiry() {
        let mut cache = IssuedCache::default();
        // Issued with 90 s of life left: usable for 29 s, then inside the margin.
        cache.insert("alice", 1, T0 + 90, secs(0), T0);
        assert_eq!(cache.get("alice", secs(29), T0 + 29), Some(1));
        assert_eq!(cache.get("alice", secs(30), T0 + 30), None);
        // A wall clock stepped forward past expiry ends reuse at once, whatever the
        // monotonic clock says.
        assert_eq!(cache.get("alice", secs(1), T0 + 200), None);
        // Already inside the margin when issued: never reused.
        cache.insert("bob", 2, T0 + 60, secs(0), T0);
        assert_eq!(cache.get("bob", secs(0), T0), None);
    }

    #[test]
    fn a_full_cache_drops_stale_entries_and_refuses_new_ones_while_all_are_usable() {
        let mut cache = IssuedCache::default();
        for n in 0..CACHE_MAX {
            cache.insert(n, n, T0 + 3600, secs(0), T0);
        }
        assert_eq!(cache.len(), CACHE_MAX);
        // Full of usable entries: a new key is not kept, an old key is replaced.
        cache.insert(CACHE_MAX, 0, T0 + 3600, secs(1), T0);
        assert_eq!(cache.get(&CACHE_MAX, secs(1), T0), None);
        cache.insert(7, 70, T0 + 3600, secs(1), T0);
        assert_eq!(cache.get(&7, secs(1), T0), Some(70));
        assert_eq!(cache.len(), CACHE_MAX);
        // Once they are stale, a new key clears them out.
        cache.insert(CACHE_MAX, 1, T0 + 3600, secs(60), T0 + 60);
        assert_eq!(cache.len(), 2, "the fresh key 7 and the new key");
        assert_eq!(cache.get(&CACHE_MAX, secs(60), T0 + 60), Some(1));
        assert_eq!(cache.get(&7, secs(60), T0 + 60), Some(70));
    }
}

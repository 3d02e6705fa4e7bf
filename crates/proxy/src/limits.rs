//! Sessions per user, bounded by `connections_per_user_max`: every connection task takes
//! a slot before it reaches an agent and gives it back when it ends, however it ends.
//! `tests/loom_limits.rs` checks the bound and the return to zero under every interleaving.

use std::collections::HashMap;

use crate::sync::{Arc, Mutex, lock};

/// How many sessions each user has open, each at most `max`.
#[derive(Debug)]
pub struct UserSlots {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    max: usize,
}

impl UserSlots {
    /// No sessions yet; at most `max` per user.
    pub fn new(max: usize) -> Self {
        Self {
            counts: Arc::new(Mutex::new(HashMap::new())),
            max,
        }
    }

    /// The most sessions one user may have open.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for one more session of `user`, or `None` at the limit.
    pub fn acquire(&self, user: &str) -> Option<UserSlot> {
        let mut counts = lock(&self.counts);
        let count = counts.entry(user.to_owned()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(UserSlot {
            counts: self.counts.clone(),
            user: user.to_owned(),
        })
    }

    /// Sessions `user` has open.
    pub fn sessions(&self, user: &str) -> usize {
        lock(&self.counts).get(user).copied().unwrap_or(0)
    }

    /// Users with at least one session open (a user's entry goes with its last session).
    pub fn users(&self) -> usize {
        lock(&self.counts).len()
    }
}

/// One session's place in [`UserSlots`]; given back when dropped (also when a drain
/// closes the session).
#[derive(Debug)]
pub struct UserSlot {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    user: String,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(count) = counts.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

//! Failed-login rate limiting, per user and per source address. Sans-IO: the caller
//! passes the time.
//!
//! Each subject (a user name or an address) may fail `failures_max` times within
//! `window`; after that, logins for it are refused until the oldest failure in the
//! window is `window` old. A success clears the user's failures, not the address's (a
//! password sprayer with one right guess must not reset its address).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

/// How many subjects are tracked at most; beyond it the stalest are forgotten.
pub const SUBJECTS_MAX: usize = 100_000;

/// Limits for one kind of subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub failures_max: usize,
    pub window: Duration,
}

/// Limits per user and per address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginLimits {
    pub per_user: Limit,
    pub per_address: Limit,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            per_user: Limit {
                failures_max: 5,
                window: Duration::from_secs(15 * 60),
            },
            per_address: Limit {
                failures_max: 20,
                window: Duration::from_secs(15 * 60),
            },
        }
    }
}

/// Who failed: a user name or a source address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    User(String),
    Address(IpAddr),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::User(user) => write!(f, "user {user:?}"),
            Self::Address(address) => write!(f, "address {address}"),
        }
    }
}

/// The failures seen recently, per subject.
#[derive(Debug, Default)]
pub struct LoginLimiter {
    limits: LoginLimits,
    /// Failure times (seconds since the epoch), oldest first.
    failures: HashMap<Subject, VecDeque<u64>>,
}

impl LoginLimiter {
    pub fn new(limits: LoginLimits) -> Self {
        Self {
            limits,
            failures: HashMap::new(),
        }
    }

    fn limit(&self, subject: &Subject) -> Limit {
        match subject {
            Subject::User(_) => self.limits.per_user,
            Subject::Address(_) => self.limits.per_address,
        }
    }

    /// `Err((subject, retry_after))` if either subject is locked out at `now_secs`.
    pub fn check(
        &mut self,
        now_secs: u64,
        user: &str,
        address: IpAddr,
    ) -> Result<(), (Subject, Duration)> {
        for subject in [Subject::User(user.to_owned()), Subject::Address(address)] {
            let limit = self.limit(&subject);
            let window_secs = limit.window.as_secs();
            let Some(times) = self.failures.get_mut(&subject) else {
                continue;
            };
            while times
                .front()
                .is_some_and(|&at| at + window_secs <= now_secs)
            {
                times.pop_front();
            }
            if times.is_empty() {
                self.failures.remove(&subject);
                continue;
            }
            if times.len() >= limit.failures_max {
                let oldest = times.front().copied().unwrap_or(now_secs);
                let retry_after = (oldest + window_secs).saturating_sub(now_secs);
                return Err((subject, Duration::from_secs(retry_after.max(1))));
            }
        }
        Ok(())
    }

    pub fn record_failure(&mut self, now_secs: u64, user: &str, address: IpAddr) {
        if self.failures.len() >= SUBJECTS_MAX {
            self.forget_stale(now_secs);
        }
        for subject in [Subject::User(user.to_owned()), Subject::Address(address)] {
            let limit = self.limit(&subject);
            let times = self.failures.entry(subject).or_default();
            times.push_back(now_secs);
            // Only the last `failures_max` matter.
            while times.len() > limit.failures_max {
                times.pop_front();
            }
        }
    }

    pub fn record_success(&mut self, user: &str) {
        self.failures.remove(&Subject::User(user.to_owned()));
    }

    /// Drops subjects with no failure in their window; if still full, the half whose
    /// latest failure is oldest.
    fn forget_stale(&mut self, now_secs: u64) {
        let limits = self.limits;
        self.failures.retain(|subject, times| {
            let window_secs = match subject {
                Subject::User(_) => limits.per_user.window.as_secs(),
                Subject::Address(_) => limits.per_address.window.as_secs(),
            };
            times.back().is_some_and(|&at| at + window_secs > now_secs)
        });
        if self.failures.len() >= SUBJECTS_MAX {
            // Still full of live subjects: forget exactly the half whose latest failure
            // is oldest (by count, so ties cannot make it forget everyone).
            let mut by_age: Vec<(u64, Subject)> = self
                .failures
                .iter()
                .map(|(subject, times)| (times.back().copied().unwrap_or(0), subject.clone()))
                .collect();
            by_age.sort_unstable_by_key(|(latest, _)| *latest);
            for (_, subject) in by_age.into_iter().take(SUBJECTS_MAX / 2) {
                self.failures.remove(&subject);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRESS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    // After five failures a user is locked for the rest of the window, from any address.
    #[test]
    fn locks_a_user_after_too_many_failures() {
        let mut limiter = LoginLimiter::new(LoginLimits::default());
        for i in 0..5 {
            limiter.check(1000 + i, "alice", ADDRESS).unwrap();
            limiter.record_failure(1000 + i, "alice", ADDRESS);
        }
        let (subject, retry) = limiter.check(1010, "alice", OTHER).unwrap_err();
        assert_eq!(subject, Subject::User("alice".into()));
        assert_eq!(retry, Duration::from_secs(900 - 10));
        assert!(
            limiter.check(1010, "bob", OTHER).is_ok(),
            "others are not affected"
        );
        assert!(
            limiter.check(1000 + 900, "alice", OTHER).is_ok(),
            "the window passes"
        );
    }

    // An address spraying many users is locked; a success does not unlock the address.
    #[test]
    fn locks_an_address_spraying_users() {
        let mut limiter = LoginLimiter::new(LoginLimits::default());
        for i in 0..20 {
            limiter.record_failure(1000, &format!("user{i}"), ADDRESS);
        }
        limiter.record_success("user0");
        let (subject, _) = limiter.check(1001, "fresh", ADDRESS).unwrap_err();
        assert_eq!(subject, Subject::Address(ADDRESS));
        assert!(limiter.check(1001, "fresh", OTHER).is_ok());
    }

    // With the table full, stale subjects are forgotten first.
    #[test]
    fn a_full_table_forgets_stale_subjects() {
        let mut limiter = LoginLimiter::new(LoginLimits::default());
        for i in 0..SUBJECTS_MAX - 1 {
            limiter.record_failure(1000, &format!("u{i}"), ADDRESS);
        }
        assert_eq!(limiter.failures.len(), SUBJECTS_MAX);
        limiter.record_failure(1000 + 900, "late", OTHER);
        assert_eq!(
            limiter.failures.len(),
            2,
            "only the new user and address remain"
        );
    }

    // With the table full of live subjects, half are forgotten, never all, and new ones are tracked.
    #[test]
    fn a_full_table_of_live_subjects_forgets_half() {
        let mut limiter = LoginLimiter::new(LoginLimits::default());
        for i in 0..SUBJECTS_MAX - 1 {
            limiter.record_failure(1000, &format!("u{i}"), ADDRESS);
        }
        limiter.record_failure(1001, "new", OTHER);
        assert_eq!(limiter.failures.len(), SUBJECTS_MAX / 2 + 2);
        assert!(limiter.failures.contains_key(&Subject::User("new".into())));
    }

    // A success clears the user's own failures.
    #[test]
    fn success_clears_the_user() {
        let mut limiter = LoginLimiter::new(LoginLimits::default());
        for _ in 0..4 {
            limiter.record_failure(1000, "alice", ADDRESS);
        }
        limiter.record_success("alice");
        limiter.record_failure(1000, "alice", OTHER);
        assert!(limiter.check(1000, "alice", OTHER).is_ok());
    }
}

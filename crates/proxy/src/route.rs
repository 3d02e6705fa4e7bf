//! Which agent to try next for one client connection.
//!
//! Several agents may serve one database. For each connection the proxy tries them in a
//! random order drawn from a seeded RNG (so load spreads and a simulation replays), moves
//! on after errors that say "this agent could not be reached" (tunnel down, channel
//! refused, dial timeout), and stops at once on errors that another agent would repeat
//! (access denied, database refused the login). Agents that failed recently are tried
//! after the others, so one dead agent costs at most one attempt per cool-down, not one
//! per connection.
//!
//! Sans-IO: [`Health`] and [`Attempts`] take `now` as an argument and never sleep.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use postern_rt::Rng;

/// How long an agent that failed is tried only after the others.
pub const FAILED_AGENT_COOLDOWN_DEFAULT: Duration = Duration::from_secs(30);

/// Most agents one connection will try before giving up.
pub const ATTEMPTS_MAX_DEFAULT: usize = 8;

/// Why an attempt to reach the database through one agent failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttemptError {
    /// The agent could not be reached or did not answer: try the next one.
    Unreachable { reason: String },
    /// The agent answered and refused, or the database did: another agent would say the
    /// same, so stop.
    Refused { reason: String },
}

impl AttemptError {
    /// Whether the next agent should be tried after this error.
    pub fn moves_on(&self) -> bool {
        matches!(self, AttemptError::Unreachable { .. })
    }
}

/// The outcome of routing one connection, when no agent could take it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    #[error(
        "no database service is serving {database:?} right now; check `postern db ls` or ask an administrator whether its agent is running"
    )]
    NoCandidates { database: String },
    #[error("failed to connect to any of the database services for {database:?}: {}", summary(.attempts))]
    AllUnreachable {
        database: String,
        attempts: Vec<(String, String)>,
    },
    #[error("{reason}")]
    Refused { agent: String, reason: String },
}

fn summary(attempts: &[(String, String)]) -> String {
    attempts
        .iter()
        .map(|(agent, reason)| format!("{agent}: {reason}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Recent failures per agent, shared by all connections of a proxy.
#[derive(Debug)]
pub struct Health {
    failed_at: HashMap<String, Duration>,
    cooldown: Duration,
}

impl Health {
    pub fn new(cooldown: Duration) -> Self {
        Self {
            failed_at: HashMap::new(),
            cooldown,
        }
    }

    /// Records that `agent` could not be reached at `now` (monotonic time).
    pub fn mark_failed(&mut self, agent: &str, now: Duration) {
        self.failed_at.insert(agent.to_owned(), now);
    }

    /// Records that `agent` carried a connection: it is healthy again.
    pub fn mark_ok(&mut self, agent: &str) {
        self.failed_at.remove(agent);
    }

    fn recently_failed(&self, agent: &str, now: Duration) -> bool {
        self.failed_at
            .get(agent)
            .is_some_and(|&at| now.saturating_sub(at) < self.cooldown)
    }

    /// Forgets failures older than the cool-down, bounding memory to recent failures.
    pub fn prune(&mut self, now: Duration) {
        let cooldown = self.cooldown;
        self.failed_at
            .retain(|_, &mut at| now.saturating_sub(at) < cooldown);
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new(FAILED_AGENT_COOLDOWN_DEFAULT)
    }
}

/// The attempts of one connection: the order to try agents in, and what happened.
pub struct Attempts {
    database: String,
    order: Vec<String>,
    next: usize,
    failures: Vec<(String, String)>,
}

impl Attempts {
    /// Plans the attempts for a connection to `database` among `candidates` (agent ids,
    /// duplicates ignored): healthy agents first in random order, then recently failed
    /// ones in random order, at most `attempts_max` in all.
    pub fn plan(
        database: &str,
        candidates: &[String],
        health: &Health,
        now: Duration,
        rng: &Rng,
        attempts_max: usize,
    ) -> Result<Self, RouteError> {
        let mut healthy = Vec::new();
        let mut failed = Vec::new();
        for agent in candidates {
            if healthy.contains(agent) || failed.contains(agent) {
                continue;
            }
            if health.recently_failed(agent, now) {
                failed.push(agent.clone());
            } else {
                healthy.push(agent.clone());
            }
        }
        if healthy.is_empty() && failed.is_empty() {
            return Err(RouteError::NoCandidates {
                database: database.to_owned(),
            });
        }
        rng.shuffle(&mut healthy);
        rng.shuffle(&mut failed);
        healthy.extend(failed);
        healthy.truncate(attempts_max.max(1));
        #[cfg(feature = "planted-bugs")]
        if postern_rt::planted::active(postern_rt::planted::Bug::ProxyRoutesToFirstAgent) {
            // The planted bug: the first candidate only, whatever its health.
            healthy = candidates.iter().take(1).cloned().collect();
        }
        Ok(Self {
            database: database.to_owned(),
            order: healthy,
            next: 0,
            failures: Vec::new(),
        })
    }

    /// The agent to try now, or `None` when every planned attempt has been made.
    pub fn next_agent(&mut self) -> Option<&str> {
        let agent = self.order.get(self.next)?;
        self.next += 1;
        Some(agent)
    }

    /// Reports that the attempt through `agent` failed. `Ok(())` means: try
    /// [`Attempts::next_agent`]; an error is final for this connection.
    pub fn handle_failure(
        &mut self,
        agent: &str,
        error: AttemptError,
        health: &mut Health,
        now: Duration,
    ) -> Result<(), RouteError> {
        match error {
            AttemptError::Refused { reason } => Err(RouteError::Refused {
                agent: agent.to_owned(),
                reason,
            }),
            AttemptError::Unreachable { reason } => {
                health.mark_failed(agent, now);
                self.failures.push((agent.to_owned(), reason));
                if self.next < self.order.len() {
                    Ok(())
                } else {
                    Err(RouteError::AllUnreachable {
                        database: self.database.clone(),
                        attempts: std::mem::take(&mut self.failures),
                    })
                }
            }
        }
    }
}

impl fmt::Debug for Attempts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attempts")
            .field("database", &self.database)
            .field("order", &self.order)
            .field("next", &self.next)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest};

    fn agents(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn unreachable() -> AttemptError {
        AttemptError::Unreachable {
            reason: "tunnel closed".to_owned(),
        }
    }

    // No agent serving the database is an error that says what to check.
    #[test]
    fn no_candidates_is_an_error_naming_the_database() {
        let err = Attempts::plan(
            "orders",
            &[],
            &Health::default(),
            Duration::ZERO,
            &Rng::from_seed(1),
            8,
        )
        .unwrap_err();
        assert_eq!(
            err,
            RouteError::NoCandidates {
                database: "orders".to_owned()
            }
        );
        assert!(err.to_string().contains("postern db ls"));
    }

    // An unreachable agent moves on to the next; the second one is tried.
    #[test]
    fn unreachable_agent_moves_on_to_the_next() {
        let mut health = Health::default();
        let mut attempts = Attempts::plan(
            "db",
            &agents(&["a1", "a2"]),
            &health,
            Duration::ZERO,
            &Rng::from_seed(3),
            8,
        )
        .unwrap();
        let first = attempts.next_agent().unwrap().to_owned();
        attempts
            .handle_failure(&first, unreachable(), &mut health, Duration::ZERO)
            .unwrap();
        let second = attempts.next_agent().unwrap().to_owned();
        assert_ne!(first, second);
        let err = attempts
            .handle_failure(&second, unreachable(), &mut health, Duration::ZERO)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("failed to connect to any of the database services"),
            "{err}"
        );
        assert!(
            err.to_string().contains("a1: tunnel closed")
                && err.to_string().contains("a2: tunnel closed")
        );
    }

    // A refusal stops at once: another agent would refuse too.
    #[test]
    fn refusal_stops_at_once() {
        let mut health = Health::default();
        let mut attempts = Attempts::plan(
            "db",
            &agents(&["a1", "a2"]),
            &health,
            Duration::ZERO,
            &Rng::from_seed(3),
            8,
        )
        .unwrap();
        let first = attempts.next_agent().unwrap().to_owned();
        let err = attempts
            .handle_failure(
                &first,
                AttemptError::Refused {
                    reason: "access denied".to_owned(),
                },
                &mut health,
                Duration::ZERO,
            )
            .unwrap_err();
        assert_eq!(
            err,
            RouteError::Refused {
                agent: first,
                reason: "access denied".to_owned()
            }
        );
        assert!(
            !AttemptError::Refused {
                reason: String::new()
            }
            .moves_on()
        );
        assert!(unreachable().moves_on());
    }

    // An agent that failed recently is tried last, and first again after the cool-down.
    #[test]
    fn recently_failed_agent_goes_last_until_the_cooldown_passes() {
        let mut health = Health::new(Duration::from_secs(30));
        health.mark_failed("a1", Duration::from_secs(100));
        for seed in 0..20 {
            let mut attempts = Attempts::plan(
                "db",
                &agents(&["a1", "a2", "a3"]),
                &health,
                Duration::from_secs(110),
                &Rng::from_seed(seed),
                8,
            )
            .unwrap();
            let order: Vec<String> =
                std::iter::from_fn(|| attempts.next_agent().map(str::to_owned)).collect();
            assert_eq!(
                order.last().map(String::as_str),
                Some("a1"),
                "seed {seed}: {order:?}"
            );
        }
        let firsts: std::collections::HashSet<String> = (0..40)
            .map(|seed| {
                let mut attempts = Attempts::plan(
                    "db",
                    &agents(&["a1", "a2", "a3"]),
                    &health,
                    Duration::from_secs(131),
                    &Rng::from_seed(seed),
                    8,
                )
                .unwrap();
                attempts.next_agent().unwrap().to_owned()
            })
            .collect();
        assert!(
            firsts.contains("a1"),
            "after the cool-down a1 is a first choice again: {firsts:?}"
        );
        health.prune(Duration::from_secs(131));
        assert!(!health.recently_failed("a1", Duration::from_secs(131)));
    }

    // A success clears the failure mark.
    #[test]
    fn success_clears_the_failure() {
        let mut health = Health::default();
        health.mark_failed("a1", Duration::ZERO);
        health.mark_ok("a1");
        assert!(!health.recently_failed("a1", Duration::from_secs(1)));
    }

    // The order spreads over agents: with many seeds, each agent is tried first sometimes.
    #[test]
    fn order_spreads_load() {
        let mut counts = HashMap::new();
        for seed in 0..300 {
            let mut attempts = Attempts::plan(
                "db",
                &agents(&["a1", "a2", "a3"]),
                &Health::default(),
                Duration::ZERO,
                &Rng::from_seed(seed),
                8,
            )
            .unwrap();
            *counts
                .entry(attempts.next_agent().unwrap().to_owned())
                .or_insert(0) += 1;
        }
        for agent in ["a1", "a2", "a3"] {
            assert!(counts[agent] > 60, "{counts:?}");
        }
    }

    proptest! {
        // Every distinct candidate is tried exactly once (up to the limit), whatever the
        // health, and the same seed gives the same order.
        #[test]
        fn each_candidate_once_and_seed_determines_order(
            names in prop::collection::vec("[a-d]", 0..10),
            failed in prop::collection::vec("[a-d]", 0..4),
            seed in any::<u64>(),
            attempts_max in 1usize..10,
        ) {
            let mut health = Health::default();
            for agent in &failed { health.mark_failed(agent, Duration::ZERO); }
            let plan = |seed| Attempts::plan("db", &names, &health, Duration::from_secs(1), &Rng::from_seed(seed), attempts_max);
            match (plan(seed), plan(seed)) {
                (Ok(mut a), Ok(mut b)) => {
                    let xs: Vec<String> = std::iter::from_fn(|| a.next_agent().map(str::to_owned)).collect();
                    let ys: Vec<String> = std::iter::from_fn(|| b.next_agent().map(str::to_owned)).collect();
                    prop_assert_eq!(&xs, &ys);
                    let mut distinct: Vec<&String> = names.iter().collect();
                    distinct.sort();
                    distinct.dedup();
                    prop_assert_eq!(xs.len(), distinct.len().min(attempts_max));
                    let mut sorted = xs.clone();
                    sorted.sort();
                    sorted.dedup();
                    prop_assert_eq!(sorted.len(), xs.len());
                }
                (Err(e), Err(_)) => prop_assert!(names.is_empty(), "{e}"),
                _ => prop_assert!(false, "same seed, different outcome"),
            }
        }
    }
}

//! The simulator catches real mistakes: each bug planted in service code (see
//! `postern_rt::planted`) makes some seed fail an invariant within [`SEEDS_MAX`] seeds,
//! and the seed that caught it passes with the bug switched off, so the failure is the
//! bug's. Run with `cargo test -p postern-sim --features planted-bugs --test planted`.

#![cfg(feature = "planted-bugs")]

use postern_rt::planted::{self, Bug};
use postern_sim::cluster::{self, Outcome};

/// A bug must be caught within this many seeds (from seed 0).
const SEEDS_MAX: u64 = 200;

/// Runs `seed` with `bug` switched on (for this thread only; turmoil runs the whole
/// seed on it).
fn run_with(bug: Option<Bug>, seed: u64) -> Outcome {
    planted::select(bug);
    let outcome = cluster::run(seed);
    planted::select(None);
    outcome
}

fn caught_within_the_seed_budget(bug: Bug) {
    let caught = (0..SEEDS_MAX).find_map(|seed| {
        let outcome = run_with(Some(bug), seed);
        (!outcome.failures.is_empty()).then_some((seed, outcome.failures))
    });
    let Some((seed, failures)) = caught else {
        panic!(
            "planted bug {} was not caught in {SEEDS_MAX} seeds",
            bug.name()
        );
    };
    println!(
        "planted bug {} caught by seed {seed}: {}\n  replay: cargo run -p postern-sim --release --features planted-bugs -- replay --seed {seed} --planted {}",
        bug.name(),
        failures.join("; "),
        bug.name()
    );
    let clean = run_with(None, seed);
    assert!(
        clean.failures.is_empty(),
        "seed {seed} also fails without planted bug {}: {:?}",
        bug.name(),
        clean.failures
    );
}

#[test]
fn agent_skipping_the_second_role_check_is_caught() {
    caught_within_the_seed_budget(Bug::AgentSkipsSecondRoleCheck);
}

#[test]
fn agent_dropping_its_audit_spool_on_restart_is_caught() {
    caught_within_the_seed_budget(Bug::AgentDropsSpoolOnRestart);
}

#[test]
fn proxy_routing_to_the_first_agent_only_is_caught() {
    caught_within_the_seed_budget(Bug::ProxyRoutesToFirstAgent);
}

#[test]
fn pki_accepting_expired_certificates_is_caught() {
    caught_within_the_seed_budget(Bug::PkiExpiryGrace);
}

#[test]
fn agent_ignoring_a_ca_rotation_is_caught() {
    caught_within_the_seed_budget(Bug::AgentIgnoresCaRotation);
}

// The selector is per thread and off by default: a seed run without selecting anything
// has every bug off.
#[test]
fn no_bug_is_on_unless_selected() {
    for bug in Bug::ALL {
        assert!(!planted::active(bug), "{} on by default", bug.name());
    }
}

//! The simulator as CI runs it: a band of seeds through whole clusters with faults, every
//! invariant checked, and the same seed replaying the same trace.

use postern_sim::cluster;

/// Seeds CI runs on every change (the CLI runs many more: `scripts/sim run`).
const CI_SEEDS: std::ops::Range<u64> = 0..20;

// Every seed in the CI band passes every invariant, liveness included; a failure names
// the seed and the command that replays it.
#[test]
fn ci_seeds_pass_every_invariant() {
    let mut failed = Vec::new();
    let mut statements = 0;
    for seed in CI_SEEDS {
        let outcome = cluster::run(seed);
        statements += outcome.statements_executed;
        if !outcome.failures.is_empty() {
            failed.push(format!(
                "seed {seed}: {}\n  reproduce with: cargo run -p postern-sim --release -- replay --seed {seed}",
                outcome.failures.join("; ")
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // The workload really went through: statements reached the fake databases.
    assert!(statements > 100, "only {statements} statements executed");
}

// Running a seed twice gives the same trace, event for event, and the same hash.
#[test]
fn a_seed_replays_the_same_trace() {
    for seed in [3, 11, 17] {
        let first = cluster::run(seed);
        let second = cluster::run(seed);
        let a: Vec<String> = first.trace.events().iter().map(|e| e.to_string()).collect();
        let b: Vec<String> = second
            .trace
            .events()
            .iter()
            .map(|e| e.to_string())
            .collect();
        if let Some(i) = (0..a.len().min(b.len())).find(|&i| a[i] != b[i]) {
            panic!("seed {seed} diverged at event {i}:\n  {}\n  {}", a[i], b[i]);
        }
        assert_eq!(a.len(), b.len(), "seed {seed}: different event counts");
        assert_eq!(first.trace.hash(), second.trace.hash(), "seed {seed}");
        assert!(
            a.len() > 20,
            "seed {seed}: trace too short to mean anything"
        );
    }
}

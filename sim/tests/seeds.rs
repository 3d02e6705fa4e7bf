//! The simulator as CI runs it: a band of seeds through whole clusters with faults, every
//! invariant checked, the regression seeds, and the same seed replaying the same trace.

use std::ops::Range;

use postern_sim::cluster;

/// Seeds CI runs on every change (the CLI runs many more: `scripts/sim run`), in two
/// halves so the test harness runs them on two threads.
const CI_SEEDS: [Range<u64>; 2] = [0..50, 50..100];
/// Seeds run twice for the determinism check.
const REPLAY_SEEDS: [u64; 5] = [3, 11, 17, 42, 77];

/// Runs `seeds`; returns each failure with the command that replays it, and how many
/// statements the fake databases executed.
fn run_seeds(seeds: impl IntoIterator<Item = u64>) -> (Vec<String>, usize) {
    let mut failed = Vec::new();
    let mut statements = 0;
    for seed in seeds {
        let outcome = cluster::run(seed);
        statements += outcome.statements_executed;
        if !outcome.failures.is_empty() {
            failed.push(format!(
                "seed {seed}: {}\n  reproduce with: cargo run -p postern-sim --release -- replay --seed {seed}",
                outcome.failures.join("; ")
            ));
        }
    }
    (failed, statements)
}

fn band_passes(seeds: Range<u64>) {
    let count = seeds.end - seeds.start;
    let (failed, statements) = run_seeds(seeds);
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // The workload really went through: statements reached the fake databases.
    assert!(
        statements as u64 > 10 * count,
        "only {statements} statements executed in {count} seeds"
    );
}

// Every seed in the CI band passes every invariant, liveness included; a failure names
// the seed and the command that replays it.
#[test]
fn ci_seeds_first_half_pass_every_invariant() {
    band_passes(CI_SEEDS[0].clone());
}

#[test]
fn ci_seeds_second_half_pass_every_invariant() {
    band_passes(CI_SEEDS[1].clone());
}

/// The seeds listed in `sim/regressions.txt` (a seed, then `#` and what it found).
fn regression_seeds() -> Vec<u64> {
    include_str!("../regressions.txt")
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|seed| !seed.is_empty())
        .map(|seed| {
            seed.parse()
                .unwrap_or_else(|_| panic!("regressions.txt: {seed:?} is not a seed"))
        })
        .collect()
}

// Seeds that once found a bug keep passing.
#[test]
fn regression_seeds_pass_every_invariant() {
    let seeds = regression_seeds();
    assert!(!seeds.is_empty(), "regressions.txt lists no seed");
    let (failed, _) = run_seeds(seeds);
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

// Running a seed twice gives the same trace, event for event, and the same hash.
#[test]
fn a_seed_replays_the_same_trace() {
    for seed in REPLAY_SEEDS {
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

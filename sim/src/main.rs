//! `postern-sim`: run many seeds, or replay one.
//!
//! ```text
//! cargo run -p postern-sim --release -- run --seeds 200 --jobs 2
//! cargo run -p postern-sim --release -- replay --seed 1234
//! cargo run -p postern-sim --release --features planted-bugs -- run --planted pki-expiry-grace
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, Subcommand};
use postern_rt::WallClock;
use postern_sim::cluster::{self, Outcome};

#[derive(Parser, Debug)]
#[command(
    name = "postern-sim",
    about = "Deterministic simulation of Postern clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run seeds start..start+seeds and report failures with their replay commands.
    Run {
        /// How many seeds.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// The first seed.
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Seeds run at once, each on its own thread.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Switch on this planted bug (needs `--features planted-bugs`).
        #[arg(long)]
        planted: Option<String>,
    },
    /// Run one seed and print its trace, hash and failures.
    Replay {
        #[arg(long)]
        seed: u64,
        /// Print only the events whose host or text contains this.
        #[arg(long)]
        grep: Option<String>,
        /// Switch on this planted bug (needs `--features planted-bugs`).
        #[arg(long)]
        planted: Option<String>,
    },
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn replay_command(seed: u64, planted: Option<&str>) -> String {
    match planted {
        None => format!("cargo run -p postern-sim --release -- replay --seed {seed}"),
        Some(bug) => format!(
            "cargo run -p postern-sim --release --features planted-bugs -- replay --seed {seed} --planted {bug}"
        ),
    }
}

/// Switches on the planted bug `name` for this thread (seeds run on the thread that
/// starts them), or explains why it cannot.
fn select_planted(name: Option<&str>) -> Result<(), String> {
    #[cfg(feature = "planted-bugs")]
    {
        use postern_rt::planted::{Bug, select};
        let bug = match name {
            None => None,
            Some(name) => Some(Bug::from_name(name).ok_or_else(|| {
                let names: Vec<&str> = Bug::ALL.iter().map(|b| b.name()).collect();
                format!("no planted bug {name:?}; there are: {}", names.join(", "))
            })?),
        };
        select(bug);
        Ok(())
    }
    #[cfg(not(feature = "planted-bugs"))]
    match name {
        None => Ok(()),
        Some(_) => Err("planted bugs need a build with `--features planted-bugs`".to_owned()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let planted = match &cli.command {
        Command::Run { planted, .. } | Command::Replay { planted, .. } => planted.clone(),
    };
    if let Err(e) = select_planted(planted.as_deref()) {
        eprintln!("postern-sim: {e}");
        return ExitCode::FAILURE;
    }
    match cli.command {
        Command::Run {
            seeds, start, jobs, ..
        } => run(start, seeds, jobs.max(1), planted.as_deref()),
        Command::Replay { seed, grep, .. } => replay(seed, grep.as_deref()),
    }
}

fn replay(seed: u64, grep: Option<&str>) -> ExitCode {
    let outcome = cluster::run(seed);
    for event in outcome.trace.events() {
        let line = event.to_string();
        if grep.is_none_or(|g| line.contains(g)) {
            println!("{line}");
        }
    }
    println!(
        "seed {seed}: trace hash {:016x}, {} events, {:.1}s simulated, {} statements, {} audit events",
        outcome.trace.hash(),
        outcome.trace.events().len(),
        outcome.simulated.as_secs_f64(),
        outcome.statements_executed,
        outcome.audit_events
    );
    if outcome.failures.is_empty() {
        println!("seed {seed}: passed");
        ExitCode::SUCCESS
    } else {
        for failure in &outcome.failures {
            println!("seed {seed}: FAILED {failure}");
        }
        ExitCode::FAILURE
    }
}

fn run(start: u64, seeds: u64, jobs: usize, planted: Option<&str>) -> ExitCode {
    // The seam's system clock: wall time for the summary only, never inside a run.
    let clock = WallClock::system();
    let began_ms = clock.now_ms();
    let next = Arc::new(AtomicU64::new(start));
    let end = start + seeds;
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let (next, results, done, failed) =
                (next.clone(), results.clone(), done.clone(), failed.clone());
            scope.spawn(move || {
                // Checked in main already.
                let _ = select_planted(planted);
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        break;
                    }
                    let outcome = cluster::run(seed);
                    if !outcome.failures.is_empty() {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!(
                            "\nseed {seed} FAILED: {}\n  reproduce with: {}",
                            outcome.failures[0],
                            replay_command(seed, planted)
                        );
                    }
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    eprint!("\r[{n}/{seeds}] {} failed", failed.load(Ordering::Relaxed));
                    let _ = std::io::stderr().flush();
                    results
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(outcome);
                }
            });
        }
    });
    eprintln!();
    let wall = Duration::from_millis(clock.now_ms().saturating_sub(began_ms).max(1));
    let mut results = std::mem::take(
        &mut *results
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    results.sort_by_key(|o| o.seed);
    let simulated: Duration = results.iter().map(|o| o.simulated).sum();
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    for o in &results {
        for (kind, n) in &o.faults {
            *faults.entry(kind).or_default() += n;
        }
    }
    let statements: usize = results.iter().map(|o| o.statements_executed).sum();
    let sessions: u64 = results.iter().map(|o| o.sessions_opened).sum();
    let failures: Vec<&Outcome> = results.iter().filter(|o| !o.failures.is_empty()).collect();
    println!("commit {}", commit());
    println!(
        "{} seeds ({}..{}) in {:.1}s: {:.2} seeds/s, {:.1} simulated s per wall s, {jobs} jobs",
        results.len(),
        start,
        end,
        wall.as_secs_f64(),
        results.len() as f64 / wall.as_secs_f64(),
        simulated.as_secs_f64() / wall.as_secs_f64()
    );
    println!("{sessions} client sessions opened, {statements} statements executed");
    let listed: Vec<String> = faults.iter().map(|(k, n)| format!("{k}={n}")).collect();
    println!("faults injected: {}", listed.join(" "));
    if failures.is_empty() {
        println!("all seeds passed");
        return ExitCode::SUCCESS;
    }
    println!("{} seeds FAILED:", failures.len());
    for o in failures {
        println!("  seed {}: {}", o.seed, o.failures.join("; "));
        println!(
            "    reproduce with: {}  (commit {})",
            replay_command(o.seed, planted),
            commit()
        );
    }
    ExitCode::FAILURE
}

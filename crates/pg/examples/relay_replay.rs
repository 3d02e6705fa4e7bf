//! Replays a captured session through `Relay` many times, as `benches/relay.rs` does, for
//! instruction-count profiles (wall time on shared machines varies; instructions do not):
//!
//! ```text
//! cargo build --release -p postern-pg --example relay_replay
//! valgrind --tool=callgrind target/release/examples/relay_replay pgbench_prepared 100
//! ```
//!
//! Instructions per message = (Ir at N runs - Ir at 0 runs) / (N x messages in the capture).

#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "pgbench_prepared".to_owned());
    let runs: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(100);
    let chunks = support::load(&name);
    let messages = std::fs::read_to_string(support::testdata(&format!("{name}.transcript")))
        .map(|t| t.lines().count())
        .unwrap_or(0);
    let mut events = 0;
    for _ in 0..runs {
        events += support::replay_counting(black_box(&chunks));
    }
    println!("{name}: {runs} runs, {messages} messages and {events} events in all runs");
}

//! PostgreSQL relay fuzz target: whole conversations, the relay against one that sends
//! every request through its queues; the logic is `postern_pg::fuzzing::conversation`,
//! which crates/pg/tests/fuzz_corpus.rs also runs over fuzz/corpus/pg_relay/.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| postern_pg::fuzzing::conversation(data));

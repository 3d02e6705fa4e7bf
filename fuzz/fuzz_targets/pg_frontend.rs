//! PostgreSQL frontend fuzz target; the logic is `postern_pg::fuzzing::frontend`, which
//! crates/pg/tests/fuzz_corpus.rs also runs over fuzz/corpus/pg_frontend/.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| postern_pg::fuzzing::frontend(data));

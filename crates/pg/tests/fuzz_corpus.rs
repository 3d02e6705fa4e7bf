//! The fuzz targets' logic over the committed seed corpus (fuzz/corpus/pg_*), so every
//! test run exercises them without a fuzzer.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir:?}: {e}"))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let data = std::fs::read(&path).expect("corpus file");
            (path, data)
        })
        .collect()
}

/// A fuzz target's logic.
type Target = fn(&[u8]);

// Goal: every corpus input runs through its target without a panic or failed assertion.
#[test]
fn corpus_inputs_pass_their_targets() {
    let targets: [(&str, Target); 4] = [
        ("pg_frontend", postern_pg::fuzzing::frontend),
        ("pg_backend", postern_pg::fuzzing::backend),
        ("pg_relay", postern_pg::fuzzing::conversation),
        ("pg_startup", postern_pg::fuzzing::startup),
    ];
    for (target, run) in targets {
        let inputs = corpus(target);
        assert!(inputs.len() >= 10, "{target}: only {} seeds", inputs.len());
        for (path, data) in inputs {
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target} failed on {path:?}");
        }
    }
}

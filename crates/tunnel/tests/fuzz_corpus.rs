//! The control-channel fuzz target's logic over its committed corpus, so CI exercises
//! it without a fuzzer.

use std::path::Path;

use postern_tunnel::control::Control;

// Every corpus file decodes without panicking; the valid seeds decode to what they
// hold and the malformed ones are refused.
#[test]
fn fuzz_corpus_decodes_without_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/tunnel_control");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        postern_tunnel::fuzzing::control_decode(&data);
        files += 1;
    }
    assert!(files >= 10, "corpus has {files} files");

    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let (message, used) = Control::decode(&read("databases")).unwrap().unwrap();
    assert_eq!(
        message,
        Control::Databases(vec!["orders".into(), "billing".into()])
    );
    assert_eq!(used, read("databases").len());
    assert!(
        Control::decode(&read("truncated_header"))
            .unwrap()
            .is_none()
    );
    for malformed in [
        "count_too_high",
        "unknown_tag",
        "oversized_length",
        "non_utf8_name",
    ] {
        assert!(
            Control::decode(&read(malformed)).is_err(),
            "{malformed} was accepted"
        );
    }
}

//! The fuzz target's logic over the committed corpus, so CI exercises it without a fuzzer.

use std::path::Path;

// Goal: every corpus file decodes without panicking, and the known seeds get the
// verdict they were chosen for.
#[test]
fn fuzz_corpus_decodes_without_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/pki_identity_decode");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        postern_pki::fuzzing::decode_identity(&data);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let expect_ok = match name.as_str() {
            "user_cert.der" | "user_cert_no_route.der" | "db_access_cert.der" => Some(true),
            "agent_host_cert.der"
            | "user_ca_cert.der"
            | "truncated_user_cert.der"
            | "garbage.bin"
            | "pem_text.txt" => Some(false),
            // Inputs a fuzzer adds later: only "no panic" is required.
            _ => None,
        };
        if let Some(ok) = expect_ok {
            let verdict = postern_pki::decode_identity_unverified(&data);
            assert_eq!(verdict.is_ok(), ok, "{name}: {verdict:?}");
            seen += 1;
        }
    }
    assert_eq!(seen, 8, "a seed file is missing from {}", dir.display());
}

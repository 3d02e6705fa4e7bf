//! The client configuration files `db login` writes: foreign content survives writes
//! and removals byte for byte (property test), and the written sections are snapshots.

use std::path::PathBuf;

use postern_client::dbfiles::{
    ClientFiles, DbConnection, Protocol, my_cnf_section, pg_service_section,
};
use postern_client::ini;
use proptest::prelude::*;

fn orders(protocol: Protocol) -> DbConnection {
    DbConnection {
        name: "orders".to_owned(),
        protocol,
        host: "proxy.example.com".to_owned(),
        port: 3080,
        user: "alice".to_owned(),
        database: "sales".to_owned(),
        ca: PathBuf::from("/home/alice/.postern/keys/proxy.example.com_3080/cas.pem"),
        cert: PathBuf::from("/home/alice/.postern/keys/proxy.example.com_3080/db/orders.crt"),
        key: PathBuf::from("/home/alice/.postern/keys/proxy.example.com_3080/user.key"),
    }
}

// The exact `[orders]` section libpq reads from ~/.pg_service.conf.
#[test]
fn pg_service_section_snapshot() {
    insta::assert_snapshot!(pg_service_section(&orders(Protocol::Postgres)));
}

// The exact `[client_orders]` group MySQL clients read from ~/.my.cnf.
#[test]
fn my_cnf_section_snapshot() {
    insta::assert_snapshot!(my_cnf_section(&orders(Protocol::Mysql)));
}

// Writing into a hand-kept file, rewriting and removing leave the rest of it as it was,
// and the files are written with safe modes.
#[test]
fn write_and_remove_in_real_files() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let files = ClientFiles::in_home(home.path());
    let original =
        "# my services\n[prod]\nhost=db.internal\n\n; staging below\n[staging]\nhost=st\n";
    std::fs::write(&files.pg_service, original).unwrap();
    let db = orders(Protocol::Postgres);
    files.write(&db).unwrap();
    let written = std::fs::read_to_string(&files.pg_service).unwrap();
    assert!(written.starts_with(original), "{written}");
    assert!(written.ends_with(&pg_service_section(&db)));
    // A second login to the same database replaces its section, nothing else.
    let mut again = db.clone();
    again.user = "bob".to_owned();
    files.write(&again).unwrap();
    let rewritten = std::fs::read_to_string(&files.pg_service).unwrap();
    assert_eq!(
        rewritten,
        format!("{original}{}", pg_service_section(&again))
    );
    files.remove("orders").unwrap();
    assert_eq!(
        std::fs::read_to_string(&files.pg_service).unwrap(),
        original
    );
    assert!(
        !files.my_cnf.exists(),
        "a Postgres login leaves ~/.my.cnf alone"
    );
    let mode = std::fs::metadata(&files.pg_service)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode & 0o022, 0, "not writable by others: {mode:o}");
    // No temporary file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(home.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("postern-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A line of a hand-written INI file: settings, comments, blanks, odd spacing, and
/// headers whose names look like ours.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{1,8} ?= ?[a-zA-Z0-9 /._-]{0,12}".prop_map(|s| s),
        "#[ -~]{0,20}".prop_map(|s| s),
        ";[ -~]{0,20}".prop_map(|s| s),
        Just(String::new()),
        Just("   ".to_owned()),
        "[ \t]{0,2}\\[(orders|orders2|client_orders|Orders|order|client_orders_x|x)\\][ \t]{0,2}"
            .prop_map(|s| s),
    ]
}

fn file() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(line(), 0..30),
        prop::bool::ANY,
        prop::bool::ANY,
    )
        .prop_map(|(lines, final_newline, crlf)| {
            let end = if crlf { "\r\n" } else { "\n" };
            let mut text = lines.join(end);
            if final_newline && !text.is_empty() {
                text.push_str(end);
            }
            text
        })
}

/// Every section other than `name` (with the text before the first header), in order.
fn foreign_parts(text: &str, name: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut ours = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        let header = trimmed
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .filter(|inner| !inner.contains(['[', ']']))
            .map(str::trim);
        if let Some(header) = header {
            ours = header == name;
            if !ours {
                parts.push(String::new());
            }
        }
        if !ours {
            if let Some(last) = parts.last_mut() {
                last.push_str(line.trim_end_matches(['\r', '\n']));
                last.push('\n');
            }
        } else if !trimmed.is_empty() && !trimmed.starts_with(['#', ';']) {
            // Our own settings; blank and comment lines after them are kept by the
            // editor and would show up here as trailing text, which is fine.
        }
    }
    parts
        .into_iter()
        .map(|part| {
            part.lines()
                .filter(|l| !l.trim().is_empty() && !l.trim().starts_with(['#', ';']))
                .map(|l| format!("{l}\n"))
                .collect()
        })
        .collect()
}

proptest! {
    // Writing then removing a section keeps every foreign section and comment, byte for
    // byte, in order; a removal of what was just appended restores the file exactly.
    #[test]
    fn foreign_sections_survive(text in file(), name in "(orders|client_orders)") {
        let section = ini::render_section(&name, &[("host", "h".to_owned()), ("port", "1".to_owned())]);
        let written = ini::upsert_section(&text, &name, &section);
        prop_assert!(written.contains(&section));
        prop_assert!(ini::has_section(&written, &name));
        // Foreign settings are untouched (order and bytes).
        prop_assert_eq!(foreign_parts(&written, &name), foreign_parts(&text, &name));
        // Every line that is not ours is still there, in the same order.
        let removed = ini::remove_section(&written, &name).unwrap();
        prop_assert!(!ini::has_section(&removed, &name));
        prop_assert_eq!(foreign_parts(&removed, &name), foreign_parts(&text, &name));
        if !ini::has_section(&text, &name) && (text.is_empty() || text.ends_with('\n')) {
            prop_assert_eq!(&removed, &text);
        }
        // Writing twice is the same as writing once.
        prop_assert_eq!(ini::upsert_section(&written, &name, &section), written.clone());
    }

    // Bytes that belong to no section of ours are never changed: the file minus our
    // section equals the input minus our section, including comments and blank lines.
    #[test]
    fn comments_and_blank_lines_survive(text in file()) {
        let name = "orders";
        let section = ini::render_section(name, &[("host", "h".to_owned())]);
        let written = ini::upsert_section(&text, name, &section);
        let before = ini::remove_section(&text, name).unwrap_or_else(|| text.clone());
        let after = ini::remove_section(&written, name).unwrap();
        if ini::has_section(&text, name) {
            prop_assert_eq!(after, before);
        } else {
            // Appending to a file without a final newline adds that one newline.
            let expected = if text.is_empty() || text.ends_with('\n') { text.clone() } else { format!("{text}\n") };
            prop_assert_eq!(after, expected);
        }
    }
}

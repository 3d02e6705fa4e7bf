//! Real sessions recorded by `scripts/pg-capture` (testdata/pg), decoded and replayed.

mod support;

use proptest::collection::vec;
use proptest::prelude::*;
use support::{CAPTURES, decode, load, replay, replay_cuts, transcript};

// Goal: the crate decodes every captured session completely, and the transcript is stable.
#[test]
fn decoded_transcripts() {
    for name in CAPTURES {
        let chunks = load(name);
        let text = transcript(&chunks);
        assert!(text.lines().count() > 10, "{name}: too few messages");
        insta::assert_snapshot!(format!("{name}.decoded"), text);
    }
}

// Goal: the crate's framing agrees, message for message, with the independent decoder in
// scripts/pg-capture that wrote NAME.transcript.
#[test]
fn framing_matches_capture_tool() {
    for name in CAPTURES {
        let ours: Vec<String> = decode(&load(name))
            .iter()
            .map(|d| {
                let side = if d.direction == postern_pg::Direction::Frontend {
                    "C"
                } else {
                    "S"
                };
                format!("{} {side} {} {}", d.connection, d.kind, d.wire_len)
            })
            .collect();
        let path = support::testdata(&format!("{name}.transcript"));
        let theirs: Vec<String> = std::fs::read_to_string(path)
            .expect("transcript")
            .lines()
            .map(|line| line.splitn(5, ' ').take(4).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(ours, theirs, "{name}");
    }
}

// Goal: replaying each capture through the relay yields the expected audit events.
#[test]
fn audit_events() {
    for name in CAPTURES {
        let events = replay(&load(name), None);
        insta::assert_snapshot!(format!("{name}.audit"), events.join("\n"));
    }
}

// Goal: the relay's events do not depend on where reads cut the stream (one byte at a
// time, odd sizes, whole chunks).
#[test]
fn audit_events_independent_of_read_sizes() {
    for name in CAPTURES {
        let chunks = load(name);
        let whole = replay(&chunks, None);
        for piece_len in [1, 3, 7, 64] {
            assert_eq!(
                replay(&chunks, Some(piece_len)),
                whole,
                "{name} cut every {piece_len}"
            );
        }
    }
}

// Goal: the same, for reads cut anywhere: any sequence of read sizes, round and round
// across every capture, gives the events of the captured reads.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn audit_events_independent_of_any_cuts(cuts in vec(1usize..300, 1..12)) {
        for name in CAPTURES {
            let chunks = load(name);
            prop_assert_eq!(replay_cuts(&chunks, &cuts), replay(&chunks, None), "{}", name);
        }
    }
}

// Goal: each capture yields the audit events its session must produce (a check on the
// snapshot's content, so an accepted wrong snapshot still fails here).
#[test]
fn audit_events_cover_the_sessions() {
    let count = |name: &str, needle: &str| {
        replay(&load(name), None)
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    };
    assert!(count("psql_simple", "TDB02W db.session.query.failed") >= 2);
    assert!(count("psql_simple", "TPG04I db.session.postgres.function") >= 5);
    assert!(count("psql_copy", "\"COPY 3\"") >= 2);
    assert!(count("psql_copy", "TDB02W") == 1);
    // pgbench's session is connection 1 (connection 0 only looks at the tables).
    assert_eq!(count("pgbench_simple", "1 TDB02I db.session.query"), 20 * 7);
    assert_eq!(count("pgbench_prepared", "1 TPG02I"), 20 * 7);
    assert_eq!(count("pgbench_prepared", "1 TPG00I"), 7);
    assert_eq!(count("pgbench_extended", "1 TPG00I"), 10 * 7);
    assert!(count("driver_prepared", "-> suspended") == 1);
    assert!(count("driver_prepared", "failed 23505") == 1);
    assert!(count("cancel", "failed 57014") == 1);
}

// Goal: every audited client request in a capture (Query, Parse, Bind, Execute, Close,
// FunctionCall) yields exactly one audit event: none lost, none doubled.
#[test]
fn one_event_per_audited_request() {
    for name in CAPTURES {
        let chunks = load(name);
        let requests = decode(&chunks)
            .iter()
            .filter(|d| d.direction == postern_pg::Direction::Frontend)
            .filter(|d| matches!(d.kind.as_str(), "Q" | "P" | "B" | "E" | "C" | "F"))
            .count();
        assert_eq!(replay(&chunks, None).len(), requests, "{name}");
    }
}

// Goal: the session the bench repeats (the benchmark client's statements, between its
// authentication and its Terminate) is whole: it starts with a Query or Parse, holds the
// client's every statement, and runs through one relay again and again with the same
// events each time, so the relay is back where it started after each run.
#[test]
fn pgbench_sessions_repeat() {
    for name in ["pgbench_simple", "pgbench_extended", "pgbench_prepared"] {
        let chunks = load(name);
        let reads = support::session_reads(&chunks, support::busiest_connection(&chunks));
        let (direction, first) = reads.first().expect("a session");
        assert_eq!(*direction, postern_pg::Direction::Frontend, "{name}");
        assert!(
            matches!(first.first(), Some(b'Q' | b'P')),
            "{name}: {first:?}"
        );
        let mut relay = postern_pg::Relay::new(postern_pg::Limits::default());
        let mut runs = Vec::new();
        for _ in 0..3 {
            let mut events = Vec::new();
            for (direction, bytes) in &reads {
                let result = match direction {
                    postern_pg::Direction::Frontend => relay.handle_client_bytes(bytes),
                    postern_pg::Direction::Backend => relay.handle_server_bytes(bytes),
                };
                assert_eq!(result, Ok(()), "{name}");
                events.extend(std::iter::from_fn(|| relay.poll_event()).map(|e| e.to_string()));
            }
            runs.push(events);
        }
        // 20 transactions of 7 statements, one event each or more (-M extended: 10
        // transactions, three events a statement).
        assert!(runs[0].len() >= 140, "{name}: {} events", runs[0].len());
        assert!(
            runs.iter().all(|run| *run == runs[0]),
            "{name}: runs differ"
        );
    }
}

//! The relay on synthetic sessions: error handling in pipelines, limits, bounded memory.

mod support;

use postern_pg::backend::{Fields, TransactionStatus};
use postern_pg::frontend::{Bind, Format, FunctionCall, Parse, Target};
use postern_pg::reply::{Severity, SqlState};
use postern_pg::{
    BackendMessage, Direction, Error, FrontendMessage, Limit, Limits, PeerMisbehaved, Relay,
};

fn client(messages: &[FrontendMessage]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        m.encode(&mut out).unwrap();
    }
    out
}

fn server(messages: &[BackendMessage]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        m.encode(&mut out).unwrap();
    }
    out
}

fn events(relay: &mut Relay) -> Vec<String> {
    std::iter::from_fn(|| relay.poll_event())
        .map(|e| e.to_string())
        .collect()
}

fn parse(name: &str, query: &str) -> FrontendMessage {
    FrontendMessage::Parse(Parse {
        name: name.into(),
        query: query.into(),
        parameter_types: vec![],
    })
}

fn bind(statement: &str, params: Vec<Option<Vec<u8>>>, formats: Vec<Format>) -> FrontendMessage {
    FrontendMessage::Bind(Bind {
        portal: vec![],
        statement: statement.into(),
        parameter_formats: formats,
        parameters: params,
        result_formats: vec![],
    })
}

fn execute() -> FrontendMessage {
    FrontendMessage::Execute {
        portal: vec![],
        max_rows: 0,
    }
}

fn error(code: SqlState, message: &str) -> BackendMessage {
    BackendMessage::error(Severity::Error, code, message)
}

fn ready() -> BackendMessage {
    BackendMessage::ready_for_query(TransactionStatus::Idle)
}

// Goal: an error in an extended-protocol batch fails that message and marks the rest of
// the batch, up to Sync, as skipped, including messages sent after the error arrived.
#[test]
fn error_skips_until_sync() {
    let mut relay = Relay::new(Limits::default());
    relay
        .handle_client_bytes(&client(&[
            parse("s1", "select nope"),
            bind("s1", vec![Some(b"1".to_vec())], vec![]),
            FrontendMessage::Flush,
        ]))
        .unwrap();
    relay
        .handle_server_bytes(&server(&[error(
            SqlState::PROTOCOL_VIOLATION,
            "column \"nope\" does not exist",
        )]))
        .unwrap();
    relay
        .handle_client_bytes(&client(&[execute(), FrontendMessage::Sync]))
        .unwrap();
    relay.handle_server_bytes(&server(&[ready()])).unwrap();
    // A new batch after Sync is audited normally.
    relay
        .handle_client_bytes(&client(&[parse("", "select 1"), FrontendMessage::Sync]))
        .unwrap();
    relay
        .handle_server_bytes(&server(&[BackendMessage::ParseComplete, ready()]))
        .unwrap();
    assert_eq!(
        events(&mut relay),
        [
            "TPG00I db.session.postgres.statements.parse statement=\"s1\" query=\"select nope\" -> failed 08P01 \"column \\\"nope\\\" does not exist\"",
            "TPG01I db.session.postgres.statements.bind statement=\"s1\" portal=\"\" parameters=[\"1\"] -> skipped",
            "TPG02I db.session.postgres.statements.execute portal=\"\" -> skipped",
            "TPG00I db.session.postgres.statements.parse statement=\"\" query=\"select 1\" -> ok",
        ]
    );
}

// Goal: binary parameters are audited as base64, text as text, NULL as NULL, and Execute
// names the SQL and parameters of its portal.
#[test]
fn parameters_and_execute_resolution() {
    let mut relay = Relay::new(Limits::default());
    relay
        .handle_client_bytes(&client(&[
            parse("q", "select $1, $2, $3"),
            bind(
                "q",
                vec![Some(b"text".to_vec()), Some(vec![0, 0, 0, 42]), None],
                vec![Format::Text, Format::Binary, Format::Text],
            ),
            execute(),
            FrontendMessage::Close(Target::Statement(b"q".to_vec())),
            FrontendMessage::Sync,
        ]))
        .unwrap();
    relay
        .handle_server_bytes(&server(&[
            BackendMessage::ParseComplete,
            BackendMessage::BindComplete,
            BackendMessage::DataRow(vec![Some(b"x".to_vec())]),
            BackendMessage::CommandComplete(b"SELECT 1".to_vec()),
            BackendMessage::CloseComplete,
            ready(),
        ]))
        .unwrap();
    let events = events(&mut relay);
    assert_eq!(events.len(), 4);
    assert!(events[1].ends_with("parameters=[\"text\", \"AAAAKg==\", NULL] -> ok"));
    assert_eq!(
        events[2],
        "TPG02I db.session.postgres.statements.execute portal=\"\" query=\"select $1, $2, $3\" parameters=[\"text\", \"AAAAKg==\", NULL] -> ok \"SELECT 1\""
    );
    assert!(events[3].starts_with("TPG03I db.session.postgres.statements.close statement=\"q\""));
}

// Goal: results far larger than every limit stream through with the relay's memory
// bounded (DataRow and CopyData are skipped, not accumulated).
#[test]
fn large_results_keep_memory_bounded() {
    let limits = Limits {
        buffered_message_size_max: 4096,
        ..Limits::default()
    };
    let mut relay = Relay::new(limits);
    relay
        .handle_client_bytes(&client(&[FrontendMessage::Query(b"select big".to_vec())]))
        .unwrap();
    // One 32 MiB DataRow and 2,000 rows of 16 KiB, read 64 KiB at a time.
    let mut stream = server(&[BackendMessage::DataRow(vec![Some(vec![7; 32 << 20])])]);
    let row = server(&[BackendMessage::DataRow(vec![Some(vec![1; 16 << 10])])]);
    for _ in 0..2000 {
        stream.extend_from_slice(&row);
    }
    let mut held_max = 0;
    for chunk in stream.chunks(64 << 10) {
        relay.handle_server_bytes(chunk).unwrap();
        held_max = held_max.max(relay.held_bytes());
    }
    relay
        .handle_server_bytes(&server(&[
            BackendMessage::CommandComplete(b"SELECT 2001".to_vec()),
            ready(),
        ]))
        .unwrap();
    assert!(stream.len() > 60 << 20);
    assert!(held_max < 8 << 10, "relay held {held_max} bytes");
    assert_eq!(
        events(&mut relay),
        ["TDB02I db.session.query query=\"select big\" -> ok \"SELECT 2001\""]
    );
}

// Goal: a message the relay must read whole is refused above buffered_message_size_max.
#[test]
fn buffered_message_limit() {
    let limits = Limits {
        buffered_message_size_max: 100,
        ..Limits::default()
    };
    let mut relay = Relay::new(limits);
    let query = client(&[FrontendMessage::Query(vec![b'x'; 200])]);
    assert_eq!(
        relay.handle_client_bytes(&query[..5]),
        Err(Error::LimitExceeded {
            limit: Limit::BufferedMessageSize,
            actual: 206,
            max: 100
        })
    );
    assert_eq!(
        relay.poll_event().map(|e| e.code()),
        Some("TDB06I"),
        "the refused message is audited as malformed"
    );
}

// Goal: pipelining beyond pending_requests_max is refused with the limit named.
#[test]
fn pending_requests_limit() {
    let limits = Limits {
        pending_requests_max: 2,
        ..Limits::default()
    };
    let mut relay = Relay::new(limits);
    let q = FrontendMessage::Query(b"select 1".to_vec());
    assert_eq!(
        relay.handle_client_bytes(&client(&[q.clone(), q.clone(), q])),
        Err(Error::LimitExceeded {
            limit: Limit::PendingRequests,
            actual: 3,
            max: 2
        })
    );
}

// Goal: more prepared statements than prepared_statements_max are refused.
#[test]
fn prepared_statements_limit() {
    let limits = Limits {
        prepared_statements_max: 2,
        ..Limits::default()
    };
    let mut relay = Relay::new(limits);
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        relay
            .handle_client_bytes(&client(&[parse(name, "select 1"), FrontendMessage::Sync]))
            .unwrap();
        let result = relay.handle_server_bytes(&server(&[BackendMessage::ParseComplete, ready()]));
        if i < 2 {
            result.unwrap();
        } else {
            assert_eq!(
                result,
                Err(Error::LimitExceeded {
                    limit: Limit::PreparedStatements,
                    actual: 3,
                    max: 2
                })
            );
        }
    }
}

// Goal: requests without an answer when the connection ends are still audited.
#[test]
fn close_flushes_pending() {
    let mut relay = Relay::new(Limits::default());
    relay
        .handle_client_bytes(&client(&[
            FrontendMessage::Query(b"select pg_sleep(100)".to_vec()),
            FrontendMessage::Terminate,
        ]))
        .unwrap();
    assert!(events(&mut relay).is_empty());
    relay.handle_close();
    assert_eq!(
        events(&mut relay),
        ["TDB02I db.session.query query=\"select pg_sleep(100)\" -> unknown"]
    );
    assert_eq!(
        relay.handle_server_bytes(&server(&[ready()])),
        Err(Error::PeerMisbehaved {
            direction: Direction::Backend,
            kind: PeerMisbehaved::InputAfterEnd("connection (already closed)"),
        })
    );
}

// Goal: a batch cut in flight (the connection closed before any answer) is audited with
// its SQL: the Execute of a statement whose ParseComplete never came names its text and
// parameters, with the outcome unknown.
#[test]
fn close_names_sql_of_unanswered_batch() {
    let mut relay = Relay::new(Limits::default());
    relay
        .handle_client_bytes(&client(&[
            parse("s1", "update t set n = $1"),
            bind("s1", vec![Some(b"7".to_vec())], vec![]),
            execute(),
            FrontendMessage::Close(Target::Statement(b"s1".to_vec())),
            FrontendMessage::Sync,
        ]))
        .unwrap();
    relay.handle_close();
    assert_eq!(
        events(&mut relay),
        [
            "TPG00I db.session.postgres.statements.parse statement=\"s1\" query=\"update t set n = $1\" -> unknown",
            "TPG01I db.session.postgres.statements.bind statement=\"s1\" portal=\"\" query=\"update t set n = $1\" parameters=[\"7\"] -> unknown",
            "TPG02I db.session.postgres.statements.execute portal=\"\" query=\"update t set n = $1\" parameters=[\"7\"] -> unknown",
            "TPG03I db.session.postgres.statements.close statement=\"s1\" query=\"update t set n = $1\" -> unknown",
        ]
    );
}

// Goal: nothing may follow Terminate.
#[test]
fn input_after_terminate() {
    let mut relay = Relay::new(Limits::default());
    assert_eq!(
        relay.handle_client_bytes(&client(&[
            FrontendMessage::Terminate,
            FrontendMessage::Sync
        ])),
        Err(Error::PeerMisbehaved {
            direction: Direction::Frontend,
            kind: PeerMisbehaved::InputAfterEnd("session (Terminate or CancelRequest)"),
        })
    );
}

// Goal: a server answer with no request waiting is a backend protocol error.
#[test]
fn answer_without_request() {
    let mut relay = Relay::new(Limits::default());
    assert!(matches!(
        relay.handle_server_bytes(&server(&[BackendMessage::ParseComplete])),
        Err(Error::PeerMisbehaved {
            direction: Direction::Backend,
            ..
        })
    ));
}

// Goal: COPY FROM STDIN aborted by CopyFail is a failed query; FunctionCall with a text
// argument is audited as text.
#[test]
fn copy_fail_and_function_call() {
    let mut relay = Relay::new(Limits::default());
    relay
        .handle_client_bytes(&client(&[FrontendMessage::Query(
            b"copy t from stdin".to_vec(),
        )]))
        .unwrap();
    relay
        .handle_server_bytes(&server(&[BackendMessage::CopyInResponse(
            postern_pg::backend::CopyResponse {
                format: Format::Text,
                column_formats: vec![Format::Text],
            },
        )]))
        .unwrap();
    relay
        .handle_client_bytes(&client(&[
            FrontendMessage::CopyData(b"1\n".to_vec()),
            FrontendMessage::CopyFail(b"user abort".to_vec()),
            FrontendMessage::FunctionCall(FunctionCall {
                function: 1598,
                argument_formats: vec![],
                arguments: vec![Some(b"42".to_vec())],
                result_format: Format::Text,
            }),
        ]))
        .unwrap();
    relay
        .handle_server_bytes(&server(&[
            BackendMessage::ErrorResponse(Fields::error(
                Severity::Error,
                SqlState::CONNECTION_EXCEPTION,
                "COPY from stdin failed: user abort",
            )),
            ready(),
            BackendMessage::FunctionCallResponse(Some(b"0.5".to_vec())),
            ready(),
        ]))
        .unwrap();
    assert_eq!(
        events(&mut relay),
        [
            "TDB02W db.session.query.failed query=\"copy t from stdin\" -> failed 08000 \"COPY from stdin failed: user abort\"",
            "TPG04I db.session.postgres.function function=1598 parameters=[\"42\"] -> ok",
        ]
    );
}

// Goal: statement names that differ only in invalid UTF-8 bytes (same lossy text) are
// still told apart, so Execute is audited with the SQL it really ran.
#[test]
fn names_are_matched_as_bytes() {
    let mut relay = Relay::new(Limits::default());
    let parse_raw = |name: &[u8], query: &str| {
        FrontendMessage::Parse(Parse {
            name: name.to_vec(),
            query: query.into(),
            parameter_types: vec![],
        })
    };
    let bind_raw = FrontendMessage::Bind(Bind {
        portal: vec![],
        statement: vec![0xfe],
        parameter_formats: vec![],
        parameters: vec![],
        result_formats: vec![],
    });
    relay
        .handle_client_bytes(&client(&[
            parse_raw(&[0xff], "delete from audit_log"),
            parse_raw(&[0xfe], "select 1"),
            bind_raw,
            execute(),
            FrontendMessage::Sync,
        ]))
        .unwrap();
    relay
        .handle_server_bytes(&server(&[
            BackendMessage::ParseComplete,
            BackendMessage::ParseComplete,
            BackendMessage::BindComplete,
            BackendMessage::CommandComplete(b"SELECT 1".to_vec()),
            ready(),
        ]))
        .unwrap();
    let events = events(&mut relay);
    assert_eq!(
        events[3],
        "TPG02I db.session.postgres.statements.execute portal=\"\" query=\"select 1\" -> ok \"SELECT 1\""
    );
}

// Goal: the relay says how far the message under way still runs, wherever a read cut
// the server's stream, so its driver can stop between two messages without counting
// them itself; after a failure it does not pretend to know.
#[test]
fn server_bytes_to_boundary_across_reads() {
    let bytes = support::TWO_MESSAGES;
    for split in 0..=bytes.len() {
        let mut relay = Relay::new(Limits::default());
        relay.handle_server_bytes(&bytes[..split]).unwrap();
        let expected = support::to_boundary_after(split);
        assert_eq!(
            relay.server_bytes_to_boundary(),
            Some(expected),
            "after {split} bytes"
        );
        relay.handle_server_bytes(&bytes[split..]).unwrap();
        assert_eq!(relay.server_bytes_to_boundary(), Some(0));
    }
    let mut relay = Relay::new(Limits::default());
    assert!(relay.handle_server_bytes(&[b'D', 0, 0, 0, 3]).is_err());
    assert_eq!(relay.server_bytes_to_boundary(), None);
}

//! The relay's path for a lone simple Query (sent while nothing else waits) against the
//! queues every other request goes through: any conversation, cut anywhere, with events
//! taken at any time or left waiting, gives the same results, events, boundaries and
//! memory held (`postern_pg::fuzzing::conversation`, also a fuzz target).

use postern_pg::fuzzing::{conversation, op};
use proptest::collection::vec;
use proptest::prelude::*;

/// One message: tag, length, body.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(s: &[u8]) -> Vec<u8> {
    [s, b"\0"].concat()
}

#[derive(Debug, Clone)]
enum Op {
    Client(Vec<u8>),
    Server(Vec<u8>),
    Poll(u8),
    Close,
}

fn sql() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"select 1".to_vec()),
        Just(b"".to_vec()),
        Just(b"begin".to_vec()),
        Just(b"select 1; select 2".to_vec()),
        Just(b"copy t from stdin".to_vec()),
        // A NUL inside: a malformed Query.
        Just(b"select\0 1".to_vec()),
        "[a-z ]{0,40}".prop_map(String::into_bytes),
        // Longer than the test limits' pending bytes (4 KiB) now and then.
        vec(b'a'..=b'z', 0..5000),
    ]
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"".to_vec()),
        Just(b"s1".to_vec()),
        Just(b"p".to_vec())
    ]
}

fn client_message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => sql().prop_map(|q| msg(b'Q', &cstr(&q))),
        1 => (name(), sql()).prop_map(|(n, q)| msg(b'P', &[cstr(&n), cstr(&q), vec![0, 0]].concat())),
        1 => (name(), name()).prop_map(|(p, s)| {
            msg(b'B', &[cstr(&p), cstr(&s), vec![0, 0, 0, 1, 0, 0, 0, 1, b'7', 0, 0]].concat())
        }),
        1 => name().prop_map(|p| msg(b'E', &[cstr(&p), vec![0, 0, 0, 0]].concat())),
        1 => (prop_oneof![Just(b'S'), Just(b'P')], name())
            .prop_map(|(t, n)| msg(b'D', &[vec![t], cstr(&n)].concat())),
        1 => (prop_oneof![Just(b'S'), Just(b'P')], name())
            .prop_map(|(t, n)| msg(b'C', &[vec![t], cstr(&n)].concat())),
        2 => Just(msg(b'S', b"")),
        1 => Just(msg(b'H', b"")),
        1 => Just(msg(b'd', b"1\n")),
        1 => Just(msg(b'c', b"")),
        1 => Just(msg(b'f', b"stop\0")),
        1 => Just(msg(b'F', &[0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, b'x', 0, 0])),
        1 => Just(msg(b'X', b"")),
        1 => (any::<u8>(), vec(any::<u8>(), 0..8)).prop_map(|(t, b)| msg(t, &b)),
    ]
}

fn status() -> impl Strategy<Value = u8> {
    prop_oneof![Just(b'I'), Just(b'T'), Just(b'E')]
}

/// What a server sends before ReadyForQuery.
fn answer() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop_oneof![Just("SELECT 1"), Just("BEGIN"), Just("INSERT 0 1"), Just("")]
            .prop_map(|t| msg(b'C', &cstr(t.as_bytes()))),
        1 => Just(msg(b'I', b"")),
        1 => Just(msg(b'E', b"SERROR\0C42P01\0Mno such table\0\0")),
        1 => Just(msg(b'T', &[0, 0])),
        1 => Just(msg(b'D', &[0, 1, 0, 0, 0, 1, b'1'])),
        1 => Just(msg(b'N', b"SNOTICE\0C00000\0Mhello\0\0")),
        1 => Just(msg(b'S', b"TimeZone\0UTC\0")),
        1 => Just(msg(b'G', &[0, 0, 0])),
    ]
}

fn server_message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => answer(),
        3 => status().prop_map(|s| msg(b'Z', &[s])),
        1 => prop_oneof![Just(b'1'), Just(b'2'), Just(b'3'), Just(b's'), Just(b'n')]
            .prop_map(|t| msg(t, b"")),
        1 => Just(msg(b'V', &[0xff, 0xff, 0xff, 0xff])),
        1 => Just(msg(b'Z', b"X")),
        1 => (any::<u8>(), vec(any::<u8>(), 0..8)).prop_map(|(t, b)| msg(t, &b)),
    ]
}

/// A simple Query and its answers through ReadyForQuery: the lone query's usual life.
fn exchange() -> impl Strategy<Value = Vec<Op>> {
    (sql(), vec(answer(), 0..4), status(), any::<bool>()).prop_map(
        |(query, answers, status, poll)| {
            let mut ops = vec![
                Op::Client(msg(b'Q', &cstr(&query))),
                Op::Server([answers.concat(), msg(b'Z', &[status])].concat()),
            ];
            if poll {
                ops.push(Op::Poll(0));
            }
            ops
        },
    )
}

/// An extended-protocol batch and its answers: a statement and a portal for later
/// requests to name (portals last until a ReadyForQuery outside a transaction).
fn batch() -> impl Strategy<Value = Vec<Op>> {
    (name(), name(), sql(), status(), any::<bool>()).prop_map(
        |(statement, portal, query, status, poll)| {
            let mut ops = vec![
                Op::Client(
                    [
                        msg(b'P', &[cstr(&statement), cstr(&query), vec![0, 0]].concat()),
                        msg(
                            b'B',
                            &[cstr(&portal), cstr(&statement), vec![0; 6]].concat(),
                        ),
                        msg(b'E', &[cstr(&portal), vec![0, 0, 0, 1]].concat()),
                        msg(b'S', b""),
                    ]
                    .concat(),
                ),
                Op::Server(
                    [
                        msg(b'1', b""),
                        msg(b'2', b""),
                        msg(b's', b""),
                        msg(b'Z', &[status]),
                    ]
                    .concat(),
                ),
            ];
            if poll {
                ops.push(Op::Poll(0));
            }
            ops
        },
    )
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    vec(
        prop_oneof![
            6 => exchange(),
            2 => batch(),
            3 => vec(client_message(), 1..4).prop_map(|m| vec![Op::Client(m.concat())]),
            3 => vec(server_message(), 1..4).prop_map(|m| vec![Op::Server(m.concat())]),
            3 => (0u8..4).prop_map(|n| vec![Op::Poll(n)]),
            1 => Just(vec![Op::Close]),
        ],
        0..24,
    )
    .prop_map(|ops| ops.concat())
}

/// The input `conversation` reads: the relay kind, then each op, reads cut into pieces
/// of `piece` bytes.
fn encode(ops: &[Op], piece: usize) -> Vec<u8> {
    let mut out = vec![0];
    for op in ops {
        match op {
            Op::Client(bytes) | Op::Server(bytes) => {
                let kind = if matches!(op, Op::Client(_)) {
                    op::CLIENT
                } else {
                    op::SERVER
                };
                for chunk in bytes.chunks(piece) {
                    out.push(kind | (chunk.len() - 1) as u8);
                    out.extend_from_slice(chunk);
                }
            }
            Op::Poll(n) => out.push(op::POLL | n),
            Op::Close => out.push(op::CLOSE),
        }
    }
    out
}

proptest! {
    // Goal: the lone query's path changes nothing a caller can see, whatever the
    // conversation and wherever its reads are cut.
    #[test]
    fn lone_queries_match_the_queues(ops in ops(), piece in 1..=op::CHUNK_MAX) {
        conversation(&encode(&ops, piece));
    }
}

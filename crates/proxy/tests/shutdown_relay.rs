//! A session still open when the proxy's drain timeout ends is closed between two of the
//! database's messages, with a FATAL ErrorResponse (SQLSTATE 57P01) the client shows.
//! A real client (tokio-postgres) against the real PostgreSQL at 127.0.0.1:5432 through
//! `relay`, and in-memory streams for the message boundary cases.

use std::time::Duration;

use postern_pg::frame::Boundaries;
use postern_proxy::dispatch::{CLOSE_GRACE, Ended, SHUTDOWN_MESSAGE, relay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

/// A DataRow-like message: type `D`, length, body.
fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

// Goal: boundaries are found whatever the reads' sizes: fed byte by byte or all at once,
// with empty bodies; a length below 4 loses them for good.
#[test]
fn frames_follow_message_boundaries() {
    let mut stream = message(b'R', &[0, 0, 0, 0]);
    stream.extend(message(b'S', b"client_encoding\0UTF8\0"));
    stream.extend(message(b'Z', b"I"));
    stream.extend(message(b'n', b""));
    let ends: Vec<usize> = {
        let mut at = 0;
        let mut ends = Vec::new();
        while at < stream.len() {
            let len = u32::from_be_bytes(stream[at + 1..at + 5].try_into().unwrap()) as usize;
            at += 1 + len;
            ends.push(at);
        }
        ends
    };
    let mut frames = Boundaries::default();
    assert!(frames.at_boundary());
    for (i, byte) in stream.iter().enumerate() {
        frames.advance(std::slice::from_ref(byte));
        assert_eq!(
            frames.at_boundary(),
            ends.contains(&(i + 1)),
            "after byte {i}"
        );
    }
    let mut whole = Boundaries::default();
    whole.advance(&stream);
    assert_eq!(whole, frames);

    let mut partial = Boundaries::default();
    partial.advance(&message(b'D', b"abcdef")[..3]);
    assert_eq!(partial.to_boundary(), Some(2), "the rest of the header");
    partial.advance(&[0, 10, b'a']);
    assert_eq!(partial.to_boundary(), Some(5), "the rest of the body");

    let mut broken = Boundaries::default();
    broken.advance(&[b'X', 0, 0, 0, 3, b'Z', 0, 0, 0, 5, b'I']);
    assert!(!broken.at_boundary());
    assert_eq!(broken.to_boundary(), None);
}

/// Reads what the client end receives until EOF.
async fn read_all(stream: &mut tokio::io::DuplexStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("the relay closes the client's stream")
        .unwrap();
    out
}

// Goal: asked to close in the middle of a message, the relay forwards the rest of that
// message and nothing after it, then the ErrorResponse, then closes.
#[tokio::test]
async fn closing_mid_message_finishes_it_then_tells_the_client() {
    let (mut client_end, mut client_side) = tokio::io::duplex(1 << 16);
    let (mut agent_side, mut agent_end) = tokio::io::duplex(1 << 16);
    let (closing, asked) = watch::channel(false);
    let relayed = tokio::spawn(async move {
        relay(
            &mut client_side,
            &mut agent_side,
            Boundaries::default(),
            asked,
        )
        .await
    });
    let row = message(b'D', b"0123456789");
    agent_end.write_all(&row[..7]).await.unwrap();
    let mut first = [0u8; 7];
    client_end.read_exact(&mut first).await.unwrap();
    assert_eq!(first, row[..7]);

    closing.send_replace(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = message(b'C', b"SELECT 1\0");
    let mut rest = row[7..].to_vec();
    rest.extend_from_slice(&after);
    agent_end.write_all(&rest).await.unwrap();

    let received = read_all(&mut client_end).await;
    assert_eq!(&received[..row.len() - 7], &row[7..], "the row's end first");
    let error = &received[row.len() - 7..];
    assert_eq!(
        error[0], b'E',
        "then an ErrorResponse, not the next message"
    );
    let len = u32::from_be_bytes(error[1..5].try_into().unwrap()) as usize;
    assert_eq!(error.len(), 1 + len, "and nothing after it");
    let text = String::from_utf8_lossy(error);
    assert!(text.contains("SFATAL") && text.contains("C57P01"), "{text}");
    assert!(text.contains(SHUTDOWN_MESSAGE), "{text}");
    assert_eq!(
        relayed.await.unwrap().unwrap(),
        Ended::ShutDown { told: true }
    );
}

// Goal: an agent that never finishes its message is not waited for past CLOSE_GRACE:
// the client's stream is closed without an ErrorResponse (it would corrupt the message).
#[tokio::test]
async fn a_message_not_finished_within_the_grace_is_cut() {
    let (mut client_end, mut client_side) = tokio::io::duplex(1 << 16);
    let (mut agent_side, mut agent_end) = tokio::io::duplex(1 << 16);
    let (closing, asked) = watch::channel(false);
    let relayed = tokio::spawn(async move {
        relay(
            &mut client_side,
            &mut agent_side,
            Boundaries::default(),
            asked,
        )
        .await
    });
    let row = message(b'D', b"0123456789");
    agent_end.write_all(&row[..7]).await.unwrap();
    let mut first = [0u8; 7];
    client_end.read_exact(&mut first).await.unwrap();
    let asked_at = std::time::Instant::now();
    closing.send_replace(true);
    assert!(read_all(&mut client_end).await.is_empty());
    assert!(asked_at.elapsed() >= CLOSE_GRACE);
    assert_eq!(
        relayed.await.unwrap().unwrap(),
        Ended::ShutDown { told: false }
    );
}

// Goal: a real client in a running query (pg_sleep) through the relay gets the FATAL
// 57P01 with the proxy's message when closing is asked, and the session ends.
#[tokio::test]
async fn a_real_client_reads_admin_shutdown_in_a_running_query() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (closing, asked) = watch::channel(false);
    let relayed = tokio::spawn(async move {
        let (mut client, _) = listener.accept().await.unwrap();
        let mut database = TcpStream::connect("127.0.0.1:5432").await.unwrap();
        // From the first byte the database sends, boundaries are known.
        relay(&mut client, &mut database, Boundaries::default(), asked).await
    });
    let (client, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=test sslmode=disable"),
        NoTls,
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1, "the relay carries a session");

    let query = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    closing.send_replace(true);
    let error = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("the query ends at once, not after 30 s")
        .unwrap()
        .unwrap_err();
    let db_error = error
        .as_db_error()
        .unwrap_or_else(|| panic!("a database error, not {error:?}"));
    assert_eq!(db_error.code(), &SqlState::ADMIN_SHUTDOWN);
    assert_eq!(db_error.severity(), "FATAL");
    assert_eq!(db_error.message(), SHUTDOWN_MESSAGE);
    assert!(
        db_error
            .hint()
            .is_some_and(|hint| hint.contains("reconnect"))
    );
    assert_eq!(
        relayed.await.unwrap().unwrap(),
        Ended::ShutDown { told: true }
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
}

//! The agent's relay between a real driver (tokio-postgres) and a real PostgreSQL over
//! TLS with a client certificate: queries and prepared statements pass unchanged and
//! each yields its audit event; a pipelined batch larger than the socket buffers does
//! not deadlock; a client that breaks the protocol gets an error and its session ends;
//! a shutdown in the middle of a result ends the session at a message boundary.

use std::sync::Arc;
use std::time::Duration;

use postern_agent::relay::{self, RelayEnd};
use postern_agent::upstream::postgres::{Credential, PostgresTarget};
use postern_agent::upstream::{TlsMode, UpstreamTls};
use postern_pg::audit::EventView;
use postern_pg::{AuditEvent, BackendMessage, Limits, Relay, StartupParams, StartupRequest};
use postern_pki::tls::ring_provider;
use postern_pki::{CaKind, CertAuthority, PrivateKey, UnixTime};
use postern_rt::{Net, WallClock};
use postern_testkit::{PostgresOptions, PostgresServer, ServerTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

const HOUR: Duration = Duration::from_secs(3600);

struct Database {
    ca: CertAuthority,
    server: PostgresServer,
}

fn database() -> Database {
    let now = WallClock::system().now();
    let start = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() - 60));
    let ca = CertAuthority::generate(CaKind::Db, "main", start, 48 * HOUR).unwrap();
    let files = ca
        .sign_db_server(&["localhost".to_owned()], now, 24 * HOUR)
        .unwrap();
    let server = PostgresServer::start(PostgresOptions {
        tls: Some(ServerTls {
            cert_pem: files.server_crt,
            key_pem: files.server_key,
            client_ca_pem: files.server_cas,
        }),
        ..Default::default()
    })
    .unwrap();
    server.psql("postgres", "create role alice login; create table items (id int primary key, name text); grant all on items to alice").unwrap();
    Database { ca, server }
}

/// What the agent does with a new session: read the client's StartupMessage, connect to
/// the database as that user with a db-client certificate, hand the client the
/// database's greeting, then relay.
async fn agent_session(
    db: &Database,
    client: DuplexStream,
    events: mpsc::Sender<AuditEvent>,
) -> RelayEnd {
    agent_session_with(db, client, events, relay::Controls::default()).await
}

/// [`agent_session`] with the relay's `controls`.
async fn agent_session_with(
    db: &Database,
    mut client: DuplexStream,
    events: mpsc::Sender<AuditEvent>,
    controls: relay::Controls,
) -> RelayEnd {
    let limits = Limits::default();
    let mut buf = Vec::new();
    let message = loop {
        if let Some((request, used)) = StartupRequest::decode_from(&buf, &limits).unwrap() {
            buf.drain(..used);
            match request {
                StartupRequest::Startup(message) => break message,
                other => panic!("expected StartupMessage, got {other:?}"),
            }
        }
        assert!(client.read_buf(&mut buf).await.unwrap() > 0);
    };
    let params = StartupParams::from_message(&message).unwrap();
    let key = PrivateKey::generate().unwrap();
    let cert = db
        .ca
        .issue_db_client(
            &params.user,
            &key.public_key(),
            WallClock::system().now(),
            HOUR,
        )
        .unwrap();
    let target = PostgresTarget {
        host: "localhost".to_owned(),
        port: db.server.port(),
        tls: UpstreamTls::new(
            TlsMode::VerifyFull,
            db.ca.trusted().to_pem().as_bytes(),
            None,
            ring_provider(),
            Arc::new(WallClock::system()),
        )
        .unwrap(),
    };
    let credential = Credential::ClientCert {
        chain: vec![cert.der().clone()],
        key: key.to_rustls(),
    };
    let upstream = target
        .connect(
            &Net::Tokio,
            credential,
            &params,
            &limits,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    client.write_all(&upstream.greeting).await.unwrap();
    // Bytes the client sent after its StartupMessage are relayed first.
    let pending = relay::Pending {
        client: buf,
        server: upstream.pending,
    };
    let events = relay::EventOut::new(|event: EventView<'_>| event.to_owned(), events);
    relay::run_with_controls(
        client,
        upstream.stream,
        Relay::new(limits),
        pending,
        events,
        controls,
    )
    .await
}

/// A StartupMessage for alice on database postgres.
fn startup_message() -> Vec<u8> {
    let mut startup = Vec::new();
    StartupRequest::Startup(postern_pg::frontend::StartupMessage {
        version: postern_pg::frontend::ProtocolVersion::V3_0,
        parameters: vec![
            (b"user".to_vec(), b"alice".to_vec()),
            (b"database".to_vec(), b"postgres".to_vec()),
        ],
    })
    .encode(&mut startup)
    .unwrap();
    startup
}

async fn driver(stream: DuplexStream) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::Config::new()
        .user("alice")
        .dbname("postgres")
        .application_name("relay-test")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

fn summary(event: &AuditEvent) -> String {
    format!(
        "{} {} {}",
        event.code(),
        event.name(),
        event.query.as_deref().unwrap_or("-")
    )
}

// Simple queries, prepared statements with parameters and a failing statement all reach
// the database through the relay, return the database's answers, and produce one audit
// event each, with their outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_queries_pass_through_and_are_audited() {
    let db = database();
    let (client_end, agent_end) = tokio::io::duplex(64 * 1024);
    let (tx, mut rx) = mpsc::channel(1024);
    let agent = tokio::spawn(async move { agent_session(&db, agent_end, tx).await });

    let client = driver(client_end).await;
    let rows = client
        .simple_query("select current_user, current_setting('application_name')")
        .await
        .unwrap();
    let row = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => Some((
            row.get(0).unwrap().to_owned(),
            row.get(1).unwrap().to_owned(),
        )),
        _ => None,
    });
    assert_eq!(row, Some(("alice".to_owned(), "relay-test".to_owned())));
    let inserted = client
        .execute("insert into items values ($1, $2)", &[&7i32, &"widget"])
        .await
        .unwrap();
    assert_eq!(inserted, 1);
    let name: String = client
        .query_one("select name from items where id = $1", &[&7i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "widget");
    let err = client
        .simple_query("select * from no_such_table")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
    );
    drop(client);

    assert_eq!(agent.await.unwrap(), RelayEnd::Closed);
    let mut events = Vec::new();
    while let Ok(event) = rx.try_recv() {
        events.push(event);
    }
    let lines: Vec<String> = events.iter().map(summary).collect();
    assert!(
        lines.contains(
            &"TDB02I db.session.query select current_user, current_setting('application_name')"
                .to_owned()
        ),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&"TDB02W db.session.query.failed select * from no_such_table".to_owned()),
        "{lines:#?}"
    );
    let executes: Vec<&AuditEvent> = events.iter().filter(|e| e.code() == "TPG02I").collect();
    assert_eq!(executes.len(), 2, "{lines:#?}");
    assert_eq!(
        executes[0].query.as_deref(),
        Some("insert into items values ($1, $2)")
    );
    // tokio-postgres sends parameters in binary: the audit shows them base64-encoded.
    let parameters: Vec<Option<&str>> = executes[0]
        .parameters
        .iter()
        .map(|p| p.as_deref())
        .collect();
    assert_eq!(parameters, [Some("AAAABw=="), Some("d2lkZ2V0")]);
    assert!(
        events.iter().any(|e| e.code() == "TPG00I"),
        "parse events: {lines:#?}"
    );
}

// A pipelined batch whose results (20 MB) far exceed socket buffers flows through
// without deadlock: each direction moves on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batch_larger_than_buffers_does_not_deadlock() {
    let db = database();
    let (client_end, agent_end) = tokio::io::duplex(16 * 1024);
    let (tx, mut rx) = mpsc::channel(16);
    let agent = tokio::spawn(async move { agent_session(&db, agent_end, tx).await });
    let consumer = tokio::spawn(async move {
        let mut count = 0usize;
        while rx.recv().await.is_some() {
            count += 1;
        }
        count
    });

    let client = driver(client_end).await;
    let statement = client.prepare("select repeat('x', 100000)").await.unwrap();
    let queries = (0..200).map(|_| client.query_one(&statement, &[]));
    let results = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(queries),
    )
    .await
    .expect("no deadlock");
    for row in results {
        assert_eq!(row.unwrap().get::<_, String>(0).len(), 100_000);
    }
    drop(client);
    assert_eq!(agent.await.unwrap(), RelayEnd::Closed);
    // One parse, then per query a bind and an execute at least.
    assert!(consumer.await.unwrap() >= 401);
}

// A client that sends bytes that are not PostgreSQL messages gets a FATAL error, its
// session ends, and the relay says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_protocol_violation_ends_only_the_session_with_an_error() {
    let db = database();
    let (mut client_end, agent_end) = tokio::io::duplex(64 * 1024);
    let (tx, _rx) = mpsc::channel(16);
    let agent = tokio::spawn(async move { agent_session(&db, agent_end, tx).await });

    client_end.write_all(&startup_message()).await.unwrap();
    // A message with an unknown tag and a length that is too small.
    client_end.write_all(&[b'~', 0, 0, 0, 1]).await.unwrap();
    let mut received = Vec::new();
    client_end.read_to_end(&mut received).await.unwrap();
    let end = agent.await.unwrap();
    assert!(matches!(end, RelayEnd::ClientError(_)), "{end:?}");
    // The greeting ends with ReadyForQuery ('Z'); then comes our ErrorResponse ('E').
    let error_at = received
        .iter()
        .rposition(|&b| b == b'E')
        .expect("an ErrorResponse");
    assert!(received[..error_at].contains(&b'Z'));
    assert!(String::from_utf8_lossy(&received[error_at..]).contains("FATAL"));
}

// Shutdown asked while 100 kB rows stream by: the relay finishes the database's message
// in flight, then sends FATAL 57P01, so what the client receives parses as whole
// messages that end with that ErrorResponse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_row_ends_the_session_at_a_message_boundary() {
    let db = database();
    let (mut client_end, agent_end) = tokio::io::duplex(16 * 1024);
    let (tx, _rx) = mpsc::channel(1024);
    let (shutdown, asked) = tokio::sync::watch::channel(false);
    let controls = relay::Controls {
        shutdown: Some(asked),
        ..relay::Controls::default()
    };
    let agent = tokio::spawn(async move { agent_session_with(&db, agent_end, tx, controls).await });

    client_end.write_all(&startup_message()).await.unwrap();
    let sql = b"select repeat('x', 100000) from generate_series(1, 1000)\0";
    let mut query = vec![b'Q'];
    query.extend_from_slice(&(4 + sql.len() as u32).to_be_bytes());
    query.extend_from_slice(sql);
    client_end.write_all(&query).await.unwrap();
    // Well into the rows (about 3.5 of them), then the shutdown.
    let mut received = Vec::new();
    while received.len() < 350_000 {
        assert!(client_end.read_buf(&mut received).await.unwrap() > 0);
    }
    shutdown.send_replace(true);
    tokio::time::timeout(
        Duration::from_secs(20),
        client_end.read_to_end(&mut received),
    )
    .await
    .expect("the session ends")
    .unwrap();
    assert_eq!(agent.await.unwrap(), RelayEnd::Shutdown { told: true });

    let limits = Limits::default();
    let mut messages = Vec::new();
    let mut at = 0;
    while at < received.len() {
        let (message, used) = BackendMessage::decode_from(&received[at..], &limits)
            .unwrap()
            .expect("only whole messages");
        messages.push(message);
        at += used;
    }
    let rows = messages
        .iter()
        .filter(|m| matches!(m, BackendMessage::DataRow(_)))
        .count();
    assert!((3..1000).contains(&rows), "{rows} rows");
    let Some(BackendMessage::ErrorResponse(fields)) = messages.last() else {
        panic!(
            "the last message is not an ErrorResponse: {:?}",
            messages.last()
        );
    };
    assert_eq!(fields.severity(), Some(&b"FATAL"[..]));
    assert_eq!(fields.code(), Some(&b"57P01"[..]));
    assert_eq!(fields.message(), Some(relay::SHUTDOWN_MESSAGE.as_bytes()));
}

//! The agent's connection to a real PostgreSQL: TLS verify-full with the server files
//! from `admin auth sign --format db`, a client certificate whose CN is the database
//! user, or an RDS IAM token as a cleartext password over TLS; and each way it can fail
//! gives an error that says what to fix.

use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::Credentials;
use postern_agent::upstream::postgres::{Credential, PostgresTarget, UpstreamError};
use postern_agent::upstream::{TlsMode, UpstreamTls};
use postern_pg::backend::BackendMessage;
use postern_pg::frontend::FrontendMessage;
use postern_pg::{Limits, StartupParams};
use postern_pki::tls::ring_provider;
use postern_pki::{CaKind, CertAuthority, PrivateKey, UnixTime};
use postern_rds_iam::TokenSigner;
use postern_rt::{Net, WallClock};
use postern_testkit::{PostgresOptions, PostgresServer, ServerTls, TcpAuth};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOUR: Duration = Duration::from_secs(3600);

fn now() -> UnixTime {
    WallClock::system().now()
}

fn db_ca(cluster: &str) -> CertAuthority {
    let start = UnixTime::since_unix_epoch(Duration::from_secs(now().as_secs() - 3600));
    CertAuthority::generate(CaKind::Db, cluster, start, 48 * HOUR).unwrap()
}

/// A PostgreSQL with TLS set up from `admin auth sign --format db` material for the
/// given host names, and the roles `alice` and `iam_user` (password `iam_password`).
fn database(
    ca: &CertAuthority,
    hosts: &[&str],
    tcp_auth: TcpAuth,
    iam_password: &str,
) -> PostgresServer {
    let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
    let files = ca.sign_db_server(&hosts, now(), 24 * HOUR).unwrap();
    let server = PostgresServer::start(PostgresOptions {
        tls: Some(ServerTls {
            cert_pem: files.server_crt,
            key_pem: files.server_key,
            client_ca_pem: files.server_cas,
        }),
        tcp_auth: Some(tcp_auth),
        ..Default::default()
    })
    .unwrap();
    server.psql("postgres", "create role alice login").unwrap();
    server
        .psql(
            "postgres",
            &format!("create role iam_user login password '{iam_password}'"),
        )
        .unwrap();
    server
}

fn target(
    server: &PostgresServer,
    host: &str,
    ca: &CertAuthority,
    mode: TlsMode,
    server_name: Option<&str>,
) -> PostgresTarget {
    let tls = UpstreamTls::new(
        mode,
        ca.trusted().to_pem().as_bytes(),
        server_name.map(str::to_owned),
        ring_provider(),
        Arc::new(WallClock::system()),
    )
    .unwrap();
    PostgresTarget {
        host: host.to_owned(),
        port: server.port(),
        tls,
    }
}

fn client_cert(ca: &CertAuthority, db_user: &str) -> Credential {
    let key = PrivateKey::generate().unwrap();
    let cert = ca
        .issue_db_client(db_user, &key.public_key(), now(), HOUR)
        .unwrap();
    Credential::ClientCert {
        chain: vec![cert.der().clone()],
        key: key.to_rustls(),
    }
}

fn params(user: &str) -> StartupParams {
    StartupParams {
        version: postern_pg::frontend::ProtocolVersion::V3_0,
        user: user.to_owned(),
        database: "postgres".to_owned(),
        application_name: Some("postern-test".to_owned()),
        options: None,
        replication: None,
        other: vec![("client_encoding".to_owned(), "UTF8".to_owned())],
    }
}

/// Sends one simple query on an open session and returns the first column of the
/// first row.
async fn query_one(
    upstream: &mut postern_agent::upstream::postgres::Upstream,
    sql: &str,
) -> String {
    let mut out = Vec::new();
    FrontendMessage::Query(sql.as_bytes().to_vec())
        .encode(&mut out)
        .unwrap();
    upstream.stream.write_all(&out).await.unwrap();
    let mut buf = std::mem::take(&mut upstream.pending);
    let mut first = None;
    loop {
        match BackendMessage::decode_from(&buf, &Limits::default()).unwrap() {
            Some((message, used)) => {
                buf.drain(..used);
                match message {
                    BackendMessage::DataRow(columns) if first.is_none() => {
                        first = columns[0].clone().map(|v| String::from_utf8(v).unwrap());
                    }
                    BackendMessage::ErrorResponse(fields) => panic!("{fields:?}"),
                    BackendMessage::ReadyForQuery(_) => return first.unwrap(),
                    _ => {}
                }
            }
            None => {
                assert!(upstream.stream.read_buf(&mut buf).await.unwrap() > 0);
            }
        }
    }
}

fn greeting_messages(greeting: &[u8]) -> Vec<BackendMessage> {
    let mut rest = greeting;
    let mut messages = Vec::new();
    while let Some((message, used)) = BackendMessage::decode_from(rest, &Limits::default()).unwrap()
    {
        messages.push(message);
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
    messages
}

// verify-full with a client certificate (CN = db user): the session runs as that user,
// over TLS, and the greeting carries AuthenticationOk, the server's parameters and key,
// and ReadyForQuery for the client.
#[tokio::test]
async fn client_certificate_session_with_verify_full() {
    let ca = db_ca("main");
    let server = database(&ca, &["localhost"], TcpAuth::Cert, "unused");
    let target = target(&server, "localhost", &ca, TlsMode::VerifyFull, None);
    let mut upstream = target
        .connect(
            &Net::Tokio,
            client_cert(&ca, "alice"),
            &params("alice"),
            &Limits::default(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let greeting = greeting_messages(&upstream.greeting);
    assert_eq!(greeting.first(), Some(&BackendMessage::authentication_ok()));
    assert!(matches!(
        greeting.last(),
        Some(BackendMessage::ReadyForQuery(_))
    ));
    assert!(greeting.iter().any(
        |m| matches!(m, BackendMessage::ParameterStatus { name, .. } if name == b"server_version")
    ));
    assert!(upstream.backend_key.is_some());
    assert_eq!(
        query_one(&mut upstream, "select current_user").await,
        "alice"
    );
    assert_eq!(
        query_one(
            &mut upstream,
            "select ssl::text from pg_stat_ssl where pid = pg_backend_pid()"
        )
        .await,
        "true"
    );
    assert_eq!(
        query_one(&mut upstream, "select current_setting('application_name')").await,
        "postern-test"
    );
}

// An RDS IAM token is sent as the cleartext password, over TLS.
#[tokio::test]
async fn iam_token_is_sent_as_cleartext_password_over_tls() {
    let clock = WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(
        1_795_515_630,
    )));
    let signer = TokenSigner::new(
        "eu-west-1",
        Credentials::new("AKIDEXAMPLE", "secret", None, None, "test"),
        clock,
    );
    let token = signer.token("localhost", 5432, "iam_user").await.unwrap();
    let ca = db_ca("main");
    // The test server accepts the token as this role's password, as RDS would verify it.
    let server = database(&ca, &["localhost"], TcpAuth::Password, &token);
    let target = target(&server, "localhost", &ca, TlsMode::VerifyFull, None);
    let mut upstream = target
        .connect(
            &Net::Tokio,
            Credential::Password(token),
            &params("iam_user"),
            &Limits::default(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(
        query_one(&mut upstream, "select current_user").await,
        "iam_user"
    );
    assert_eq!(
        query_one(
            &mut upstream,
            "select ssl::text from pg_stat_ssl where pid = pg_backend_pid()"
        )
        .await,
        "true"
    );

    // A wrong token is refused by the database, and the agent says so.
    let err = target
        .connect(
            &Net::Tokio,
            Credential::Password("wrong".to_owned()),
            &params("iam_user"),
            &Limits::default(),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::Refused { code, .. } if code == "28P01"),
        "{err}"
    );
}

// Each misconfiguration is named: a server cert from another CA, a name the cert does
// not list (accepted under verify-ca), a missing role, a database that asks for a
// password, a database without TLS, and one that is down.
#[tokio::test]
async fn misconfigurations_give_errors_that_say_what_to_fix() {
    let ca = db_ca("main");
    let server = database(&ca, &["localhost"], TcpAuth::Cert, "unused");
    let connect = |target: PostgresTarget, user: &'static str| {
        let ca = &ca;
        async move {
            target
                .connect(
                    &Net::Tokio,
                    client_cert(ca, user),
                    &params(user),
                    &Limits::default(),
                    Duration::from_secs(10),
                )
                .await
        }
    };

    let other = db_ca("other");
    let err = connect(
        target(&server, "localhost", &other, TlsMode::VerifyFull, None),
        "alice",
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("not signed by the configured CA"),
        "{err}"
    );

    let err = connect(
        target(&server, "127.0.0.1", &ca, TlsMode::VerifyFull, None),
        "alice",
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("does not name the host"), "{err}");
    connect(
        target(&server, "127.0.0.1", &ca, TlsMode::VerifyCa, None),
        "alice",
    )
    .await
    .unwrap();
    connect(
        target(
            &server,
            "127.0.0.1",
            &ca,
            TlsMode::VerifyFull,
            Some("localhost"),
        ),
        "alice",
    )
    .await
    .unwrap();

    let err = connect(
        target(&server, "localhost", &ca, TlsMode::VerifyFull, None),
        "mallory",
    )
    .await
    .unwrap_err();
    match &err {
        UpstreamError::Refused { code, message, .. } => {
            assert_eq!(code, "28000");
            assert!(message.contains("mallory"), "{message}");
        }
        other => panic!("{other}"),
    }

    let password_db = database(&ca, &["localhost"], TcpAuth::Password, "x");
    let err = connect(
        target(&password_db, "localhost", &ca, TlsMode::VerifyFull, None),
        "alice",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, UpstreamError::PasswordRequested { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("hostssl all all 0.0.0.0/0 cert"),
        "{err}"
    );

    let plain = PostgresServer::start(PostgresOptions::default()).unwrap();
    let err = connect(
        target(&plain, "localhost", &ca, TlsMode::VerifyFull, None),
        "postgres",
    )
    .await
    .unwrap_err();
    assert!(matches!(err, UpstreamError::NoTls { .. }), "{err}");

    let port = plain.port();
    drop(plain);
    let mut down = target(&server, "localhost", &ca, TlsMode::VerifyFull, None);
    down.port = port;
    let err = connect(down, "alice").await.unwrap_err();
    assert!(matches!(err, UpstreamError::Unreachable { .. }), "{err}");
}

//! The agent's session service end to end, the test playing the proxy: mutual TLS over
//! an in-memory channel with a proxy→agent certificate, then a real driver
//! (tokio-postgres) speaking to a real PostgreSQL with client-certificate auth. Allowed
//! sessions run and are audited with the session's fields; every refusal reaches the
//! client as a PostgreSQL error, is audited as TDB00W, and opens no database connection;
//! a proxy that stalls is cut off at the handshake timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use postern_agent::relay::RelayEnd;
use postern_agent::session::{LocalDbCa, RoleMap, SessionEnd, SessionError, SessionService};
use postern_auth::audit::AuditEvent;
use postern_pki::{DbProtocol, DbRoute, Identity, Usage};
use postern_test_cluster::{HOUR, TestCluster, later, open_channel};
use postern_testkit::{PostgresOptions, PostgresServer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;

const ROLES: &str = r#"
[[role]]
name = "dev"
allow.db_labels = { env = "dev" }
allow.db_users = ["{{internal.db_users}}", "ghost"]
allow.db_names = ["postgres"]
"#;

/// A cluster's CAs, an agent serving "orders" (labels env=dev) on a real PostgreSQL, and
/// the audit sink.
struct Cluster {
    cas: TestCluster,
    db: PostgresServer,
    service: Arc<SessionService<RoleMap, LocalDbCa>>,
    audit: mpsc::Receiver<AuditEvent>,
}

fn cluster() -> Cluster {
    cluster_with(Duration::from_secs(10))
}

fn cluster_with(handshake_timeout: Duration) -> Cluster {
    let cas = TestCluster::new("main");
    let db = cas.start_postgres(PostgresOptions {
        extra_conf: vec!["log_connections = on".to_owned()],
        ..Default::default()
    });
    db.psql(
        "postgres",
        "create role alice login; create table items (id int, name text); grant all on items to alice",
    )
    .unwrap();
    let mut config = cas.session_config("agent-1", vec![cas.served_orders(&db)]);
    config.handshake_timeout = handshake_timeout;
    let (sink, audit) = mpsc::channel(1024);
    let service = cas.session_service(&cas.runtime(7), config, ROLES, cas.local_db_ca(), sink);
    Cluster {
        cas,
        db,
        service,
        audit,
    }
}

/// Alice, role dev, trait db_users = [alice], routed to `service` as `db_user`.
fn alice(service: &str, usage: Usage) -> Identity {
    Identity {
        user: "alice".into(),
        roles: vec!["dev".into()],
        traits: BTreeMap::from([("db_users".to_owned(), vec!["alice".to_owned()])]),
        route: Some(DbRoute {
            service: service.into(),
            protocol: DbProtocol::Postgres,
            db_user: "alice".into(),
            db_name: "postgres".into(),
        }),
        allowed_db_names: vec!["postgres".into()],
        allowed_db_users: vec!["alice".into()],
        usage,
        cluster: "main".into(),
        client_ip: None,
        expires: later(HOUR),
    }
}

impl Cluster {
    /// Plays the proxy up to the TLS handshake: the channel's other end, TLS done with a
    /// certificate for `identity`, and the agent's task.
    async fn channel(
        &self,
        database: &str,
        identity: &Identity,
    ) -> (
        tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
        JoinHandle<Result<SessionEnd, SessionError>>,
    ) {
        let (proxy_end, agent) = open_channel(&self.service, database);
        let stream = self.cas.tls_to_agent(proxy_end, identity, "agent-1").await;
        (stream, agent)
    }

    /// Plays the proxy: opens a channel for `database`, TLS with a certificate for
    /// `identity`, then tokio-postgres as `db_user` on database `postgres`.
    async fn connect(
        &self,
        database: &str,
        identity: &Identity,
        db_user: &str,
    ) -> (
        Result<tokio_postgres::Client, tokio_postgres::Error>,
        JoinHandle<Result<SessionEnd, SessionError>>,
    ) {
        let (stream, agent) = self.channel(database, identity).await;
        let client = tokio_postgres::Config::new()
            .user(db_user)
            .dbname("postgres")
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_raw(stream, tokio_postgres::NoTls)
            .await
            .map(|(client, connection)| {
                tokio::spawn(connection);
                client
            });
        (client, agent)
    }

    fn events(&mut self) -> Vec<AuditEvent> {
        std::iter::from_fn(|| self.audit.try_recv().ok()).collect()
    }

    /// TCP connections PostgreSQL has seen (the test's own psql uses the Unix socket).
    fn tcp_connections(&self) -> usize {
        self.db
            .log()
            .matches("connection received: host=127.0.0.1")
            .count()
    }
}

fn summary(events: &[AuditEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let query = e
                .fields
                .get("query")
                .and_then(|q| q.as_str())
                .unwrap_or("-");
            format!("{} {} {query}", e.code, e.event)
        })
        .collect()
}

/// Asserts one TDB00W event naming alice, with an error containing `reason`.
fn assert_refusal_audited(events: &[AuditEvent], reason: &str) {
    assert_eq!(events.len(), 1, "{:#?}", summary(events));
    let event = &events[0];
    assert_eq!(
        (event.event.as_str(), event.code.as_str()),
        ("db.session.start", "TDB00W")
    );
    assert_eq!(event.user.as_deref(), Some("alice"));
    assert_eq!(event.cluster.as_deref(), Some("main"));
    assert!(event.session_id.is_some());
    let error = event.error.as_deref().unwrap_or_default();
    assert!(error.contains(reason), "{error}");
}

fn db_error(result: Result<tokio_postgres::Client, tokio_postgres::Error>) -> (SqlState, String) {
    let error = result.expect_err("the session is refused");
    let db = error.as_db_error().expect("a PostgreSQL ErrorResponse");
    assert_eq!(db.severity(), "FATAL");
    (db.code().clone(), db.message().to_owned())
}

// An allowed user runs simple and prepared queries; the sink gets db.session.start,
// one event per statement with the session's fields, then db.session.end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_session_runs_queries_and_is_audited_with_session_fields() {
    let mut cluster = cluster();
    let (client, agent) = cluster
        .connect("orders", &alice("orders", Usage::Db), "alice")
        .await;
    let client = client.unwrap();
    let rows = client.simple_query("select current_user").await.unwrap();
    let user = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(user.as_deref(), Some("alice"));
    let inserted = client
        .execute("insert into items values ($1, $2)", &[&7i32, &"widget"])
        .await
        .unwrap();
    assert_eq!(inserted, 1);
    // A statement longer than an audit event may be: its text is cut and flagged.
    let long = format!("select '{}'", "x".repeat(100_000));
    tokio::time::timeout(Duration::from_secs(20), client.simple_query(&long))
        .await
        .expect("long query answered")
        .unwrap();
    drop(client);
    let end = tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .expect("agent ends")
        .unwrap()
        .unwrap();
    assert_eq!(end.relay, RelayEnd::Closed);

    let events = cluster.events();
    let lines = summary(&events);
    assert_eq!(
        lines.first().map(String::as_str),
        Some("TDB00I db.session.start -")
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("TDB01I db.session.end -")
    );
    assert!(
        lines.contains(&"TDB02I db.session.query select current_user".to_owned()),
        "{lines:#?}"
    );
    let execute = events
        .iter()
        .find(|e| e.code == "TPG02I")
        .unwrap_or_else(|| panic!("an execute event: {lines:#?}"));
    assert_eq!(
        execute.fields.get("query").and_then(|q| q.as_str()),
        Some("insert into items values ($1, $2)")
    );
    // Binary parameters, base64-encoded.
    assert_eq!(
        execute.fields.get("parameters"),
        Some(&serde_json::json!(["AAAABw==", "d2lkZ2V0"]))
    );
    assert_eq!(
        execute.fields.get("command_tag").and_then(|t| t.as_str()),
        Some("INSERT 0 1")
    );
    assert_eq!(
        events[0].fields.get("client_addr").and_then(|a| a.as_str()),
        Some("203.0.113.7:50123")
    );
    let long_event = events
        .iter()
        .find(|e| e.fields.contains_key("query_truncated"))
        .unwrap_or_else(|| panic!("the long query's event: {lines:#?}"));
    assert_eq!(
        long_event.fields.get("query_size"),
        Some(&serde_json::json!(long.len()))
    );
    let stored = serde_json::to_string(long_event).unwrap();
    assert!(
        stored.len() <= postern_auth::audit::EVENT_SIZE_MAX,
        "{}",
        stored.len()
    );
    let uri = format!("localhost:{}", cluster.db.port());
    for event in &events {
        assert_eq!(event.session_id.as_deref(), Some(end.session_id.as_str()));
        assert_eq!(event.cluster.as_deref(), Some("main"));
        assert_eq!(event.user.as_deref(), Some("alice"));
        assert_eq!(event.db_service.as_deref(), Some("orders"));
        assert_eq!(event.protocol.as_deref(), Some("postgres"));
        assert_eq!(event.uri.as_deref(), Some(uri.as_str()));
        assert_eq!(event.db_name.as_deref(), Some("postgres"));
        assert_eq!(event.db_user.as_deref(), Some("alice"));
        assert!(event.error.is_none(), "{event:?}");
    }
    let ids: std::collections::BTreeSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), events.len(), "event ids are unique");
}

// A db user the roles do not allow: the client gets 28000 naming what failed and what is
// allowed, the refusal is audited, and no connection reaches PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_db_user_gets_28000_with_the_reason_and_never_reaches_the_database() {
    let mut cluster = cluster();
    let before = cluster.tcp_connections();
    let (client, agent) = cluster
        .connect("orders", &alice("orders", Usage::Db), "postgres")
        .await;
    let (code, message) = db_error(client);
    assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    assert!(message.contains(r#"db user "postgres""#), "{message}");
    assert!(
        message.contains(r#"allowed db users: "alice", "ghost""#),
        "{message}"
    );
    let error = agent.await.unwrap().unwrap_err();
    assert!(matches!(error, SessionError::Denied(_)), "{error:?}");

    let events = cluster.events();
    assert_refusal_audited(&events, "your roles do not allow db user \"postgres\"");
    assert_eq!(events[0].db_user.as_deref(), Some("postgres"));
    assert_eq!(cluster.tcp_connections(), before, "{}", cluster.db.log());
}

// Certificates that do not fit the channel are refused before anything else happens: a
// route to another database, a channel for a database this agent does not serve, and a
// user's own certificate (usage user) instead of a proxy→agent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_for_another_route_or_usage_are_refused() {
    let mut cluster = cluster();
    let before = cluster.tcp_connections();

    let (client, agent) = cluster
        .connect("orders", &alice("billing", Usage::Db), "alice")
        .await;
    let (code, message) = db_error(client);
    assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    assert!(
        message.contains(r#"your certificate is for database "billing""#)
            && message.contains("postern db login orders"),
        "{message}"
    );
    let error = agent.await.unwrap().unwrap_err();
    assert!(
        matches!(error, SessionError::WrongDatabase { .. }),
        "{error:?}"
    );
    assert_refusal_audited(&cluster.events(), "billing");

    let (client, agent) = cluster
        .connect("billing", &alice("billing", Usage::Db), "alice")
        .await;
    let (code, message) = db_error(client);
    assert_eq!(code, SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION);
    assert!(message.contains("does not serve \"billing\""), "{message}");
    let error = agent.await.unwrap().unwrap_err();
    assert!(matches!(error, SessionError::NotServed { .. }), "{error:?}");
    assert_refusal_audited(&cluster.events(), "does not serve");

    let (client, agent) = cluster
        .connect("orders", &alice("orders", Usage::User), "alice")
        .await;
    let (code, message) = db_error(client);
    assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    assert!(
        message.contains("certificate the proxy presented"),
        "{message}"
    );
    let error = agent.await.unwrap().unwrap_err();
    assert!(matches!(error, SessionError::Identity(_)), "{error:?}");
    let events = cluster.events();
    assert_eq!(events.len(), 1, "{:#?}", summary(&events));
    assert_eq!(events[0].code, "TDB00W");
    // The identity was not verified, so the event names no user.
    assert_eq!(events[0].user, None);
    assert_eq!(events[0].db_service.as_deref(), Some("orders"));

    assert_eq!(cluster.tcp_connections(), before, "{}", cluster.db.log());
}

// The roles allow db user "ghost", but PostgreSQL has no such role: the client sees the
// database's own refusal (its SQLSTATE and message), and the start is audited as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_refusal_reaches_the_client_with_its_sqlstate() {
    let mut cluster = cluster();
    let (client, agent) = cluster
        .connect("orders", &alice("orders", Usage::Db), "ghost")
        .await;
    let (code, message) = db_error(client);
    assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    assert!(
        message.contains("the database refused the session") && message.contains("ghost"),
        "{message}"
    );
    let error = agent.await.unwrap().unwrap_err();
    assert!(matches!(error, SessionError::Upstream(_)), "{error:?}");
    let events = cluster.events();
    assert_refusal_audited(&events, "the database refused the session");
    assert_eq!(events[0].db_user.as_deref(), Some("ghost"));
    assert!(cluster.tcp_connections() >= 1, "the agent did connect");
}

// A proxy that never starts TLS, or never sends the StartupMessage, is cut off at the
// handshake timeout; the second is told why in PostgreSQL's terms and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_proxies_are_cut_off_at_the_handshake_timeout() {
    let mut cluster = cluster_with(Duration::from_millis(500));

    let (_silent, agent) = open_channel(&cluster.service, "orders");
    let error = agent.await.unwrap().unwrap_err();
    assert!(
        matches!(error, SessionError::HandshakeTimeout { .. }),
        "{error:?}"
    );
    assert!(cluster.events().is_empty(), "no TLS, no session to audit");

    let (mut stream, agent) = cluster.channel("orders", &alice("orders", Usage::Db)).await;
    let error = agent.await.unwrap().unwrap_err();
    assert!(
        matches!(error, SessionError::StartupTimeout { .. }),
        "{error:?}"
    );
    let mut received = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut received)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&received);
    assert!(
        received.first() == Some(&b'E') && text.contains("08P01"),
        "{text}"
    );
    assert!(text.contains("no StartupMessage arrived within"), "{text}");
    assert_refusal_audited(&cluster.events(), "no StartupMessage");
}

// With the audit sink gone, an allowed session is refused before the agent connects to
// the database: nothing runs unaudited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_opens_without_an_audit_sink() {
    let mut cluster = cluster();
    cluster.audit.close();
    let before = cluster.tcp_connections();
    let (client, agent) = cluster
        .connect("orders", &alice("orders", Usage::Db), "alice")
        .await;
    let (code, message) = db_error(client);
    assert_eq!(code, SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION);
    assert!(message.contains("audit log"), "{message}");
    let error = agent.await.unwrap().unwrap_err();
    assert!(matches!(error, SessionError::AuditUnavailable), "{error:?}");
    assert_eq!(cluster.tcp_connections(), before, "{}", cluster.db.log());
}

//! Session controls with a real PostgreSQL and a real driver (tokio-postgres), the test
//! playing the proxy: an idle session is ended after the role's `client_idle_timeout`,
//! and a session is ended when the user's certificate expires; each time the client
//! receives a FATAL ErrorResponse that says why, and the end is audited.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use postern_agent::relay::RelayEnd;
use postern_agent::session::{
    LocalDbCa, RoleMap, ServedDatabase, SessionConfig, SessionEnd, SessionError, SessionService,
};
use postern_agent::upstream::postgres::PostgresTarget;
use postern_agent::upstream::{TlsMode, UpstreamTls};
use postern_auth::audit::AuditEvent;
use postern_auth::database::{Database, Protocol};
use postern_auth::role::parse_role_file;
use postern_pg::Limits;
use postern_pki::tls::{mtls_client_config, mtls_server_config, ring_provider};
use postern_pki::{
    CaKind, CertAuthority, DbProtocol, DbRoute, HostIdentity, HostRole, Identity, PrivateKey,
    UnixTime, Usage, Validator,
};
use postern_rt::{Connection, Net, Rng, Runtime, WallClock};
use postern_testkit::{PostgresOptions, PostgresServer, ServerTls};
use postern_tunnel::agent::IncomingChannel;
use rustls_pki_types::ServerName;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const HOUR: Duration = Duration::from_secs(3600);

fn now() -> UnixTime {
    WallClock::system().now()
}

fn later(by: Duration) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(now().as_secs() + by.as_secs()))
}

struct Setup {
    user_ca: CertAuthority,
    host_ca: CertAuthority,
    _db: PostgresServer,
    service: Arc<SessionService<RoleMap, LocalDbCa>>,
    audit: mpsc::Receiver<AuditEvent>,
}

/// An agent serving "orders" on a real PostgreSQL, with the roles in `roles_toml`.
fn setup(roles_toml: &str) -> Setup {
    let start = UnixTime::since_unix_epoch(Duration::from_secs(now().as_secs() - 3600));
    let ca = |kind| CertAuthority::generate(kind, "main", start, 48 * HOUR).unwrap();
    let (user_ca, host_ca, db_ca) = (ca(CaKind::User), ca(CaKind::Host), ca(CaKind::Db));
    let files = db_ca
        .sign_db_server(&["localhost".to_owned()], now(), 24 * HOUR)
        .unwrap();
    let db = PostgresServer::start(PostgresOptions {
        tls: Some(ServerTls {
            cert_pem: files.server_crt,
            key_pem: files.server_key,
            client_ca_pem: files.server_cas,
        }),
        ..Default::default()
    })
    .unwrap();
    db.psql("postgres", "create role alice login").unwrap();
    let agent_key = PrivateKey::generate().unwrap();
    let agent = HostIdentity {
        host_id: "agent-1".into(),
        role: HostRole::Agent,
        cluster: "main".into(),
        names: vec!["agent-1".into()],
        expires: later(HOUR),
    };
    let agent_cert = host_ca
        .issue_host(&agent, &agent_key.public_key(), now())
        .unwrap();
    let clock = WallClock::system();
    let tls = mtls_server_config(
        vec![agent_cert.der().clone()],
        agent_key.to_rustls(),
        &[user_ca.trusted().clone()],
        ring_provider(),
        Arc::new(clock.clone()),
    )
    .unwrap();
    let orders = ServedDatabase {
        database: Database {
            name: "orders".into(),
            description: String::new(),
            protocol: Protocol::Postgres,
            uri: format!("localhost:{}", db.port()),
            labels: BTreeMap::from([("env".to_owned(), "dev".to_owned())]),
        },
        target: PostgresTarget {
            host: "localhost".into(),
            port: db.port(),
            tls: UpstreamTls::new(
                TlsMode::VerifyFull,
                db_ca.trusted().to_pem().as_bytes(),
                None,
                ring_provider(),
                Arc::new(clock.clone()),
            )
            .unwrap(),
        },
    };
    let config = SessionConfig {
        cluster: "main".into(),
        tls,
        validator: Validator::new([user_ca.trusted().clone()]),
        databases: vec![orders],
        limits: Limits::default(),
        handshake_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(10),
    };
    let runtime = Runtime::from_parts(Net::Tokio, clock.clone(), Rng::from_seed(9), PathBuf::new());
    let roles = RoleMap::new(parse_role_file("roles.toml", roles_toml).unwrap());
    let (sink, audit) = mpsc::channel(1024);
    let service = Arc::new(SessionService::new(
        &runtime,
        config,
        roles,
        LocalDbCa::new(Arc::new(db_ca), clock),
        sink,
    ));
    Setup {
        user_ca,
        host_ca,
        _db: db,
        service,
        audit,
    }
}

fn alice(expires: UnixTime) -> Identity {
    Identity {
        user: "alice".into(),
        roles: vec!["dev".into()],
        traits: BTreeMap::new(),
        route: Some(DbRoute {
            service: "orders".into(),
            protocol: DbProtocol::Postgres,
            db_user: "alice".into(),
            db_name: "postgres".into(),
        }),
        allowed_db_names: vec![],
        allowed_db_users: vec![],
        usage: Usage::Db,
        cluster: "main".into(),
        client_ip: None,
        expires,
    }
}

type Session = (
    tokio_postgres::Client,
    JoinHandle<Result<(), tokio_postgres::Error>>,
    JoinHandle<Result<SessionEnd, SessionError>>,
);

impl Setup {
    /// Plays the proxy: a channel, mutual TLS with a certificate for `identity`, then
    /// tokio-postgres as alice. Returns the client, its connection task and the agent's.
    async fn connect(&self, identity: &Identity) -> Session {
        let (proxy_end, agent_end) = tokio::io::duplex(64 * 1024);
        let service = self.service.clone();
        let mut channel = IncomingChannel {
            proxy: "proxy-1".into(),
            database: "orders".into(),
            client_addr: "203.0.113.7".into(),
            client_port: 50123,
            ..incoming_defaults()
        };
        channel.connection = Connection::new(agent_end);
        let agent = tokio::spawn(async move { service.serve(channel).await });
        let key = PrivateKey::generate().unwrap();
        let cert = self
            .user_ca
            .issue_identity(identity, &key.public_key(), now())
            .unwrap();
        let tls = mtls_client_config(
            vec![cert.der().clone()],
            key.to_rustls(),
            &[self.host_ca.trusted().clone()],
            ring_provider(),
            Arc::new(WallClock::system()),
        )
        .unwrap();
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(ServerName::try_from("agent-1").unwrap(), proxy_end)
            .await
            .unwrap();
        let (client, connection) = tokio_postgres::Config::new()
            .user("alice")
            .dbname("postgres")
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_raw(stream, tokio_postgres::NoTls)
            .await
            .unwrap();
        (client, tokio::spawn(connection), agent)
    }

    fn events(&mut self) -> Vec<AuditEvent> {
        std::iter::from_fn(|| self.audit.try_recv().ok()).collect()
    }
}

/// An IncomingChannel's remaining fields, whatever the tunnel crate adds.
fn incoming_defaults() -> IncomingChannel {
    let (placeholder, _) = tokio::io::duplex(1);
    IncomingChannel {
        proxy: String::new(),
        database: String::new(),
        client_addr: String::new(),
        client_port: 0,
        kind: Default::default(),
        connection: Connection::new(placeholder),
    }
}

/// The FATAL error the server side sent, as the driver's connection task reports it.
async fn fatal_from(
    connection: JoinHandle<Result<(), tokio_postgres::Error>>,
) -> (String, String, String) {
    let result = tokio::time::timeout(Duration::from_secs(20), connection)
        .await
        .expect("the session ends")
        .unwrap();
    let error = result.expect_err("the connection ends with an error");
    let db = error.as_db_error().expect("a PostgreSQL ErrorResponse");
    (
        db.severity().to_owned(),
        db.code().code().to_owned(),
        db.message().to_owned(),
    )
}

// A role with client_idle_timeout = 2s: a session that runs a query then sits idle is
// ended about 2 s later with FATAL 57P05 naming the option; activity resets the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_is_ended_with_57p05() {
    let roles = "[[role]]\nname = \"dev\"\noptions = { client_idle_timeout = \"2s\" }\nallow.db_labels = { env = \"dev\" }\nallow.db_users = [\"alice\"]\nallow.db_names = [\"*\"]\n";
    let mut setup = setup(roles);
    let (client, connection, agent) = setup.connect(&alice(later(HOUR))).await;
    // Activity every second keeps it open past the timeout.
    for _ in 0..4 {
        client.simple_query("select 1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let idle_since = tokio::time::Instant::now();
    let (severity, code, message) = fatal_from(connection).await;
    let waited = idle_since.elapsed();
    assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "57P05"));
    assert!(message.contains("client_idle_timeout"), "{message}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "ended after {waited:?} idle"
    );
    let end = agent.await.unwrap().unwrap();
    assert_eq!(end.relay, RelayEnd::IdleTimeout(Duration::from_secs(2)));
    let events = setup.events();
    let last = events.last().unwrap();
    assert_eq!(last.event, "db.session.end");
    assert!(
        last.error.as_deref().unwrap_or_default().contains("idle"),
        "{last:?}"
    );
}

// disconnect_expired_cert is on by default: a session whose certificate expires in 3 s
// is ended then with FATAL 57P01 telling the user to run `postern db login`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ends_at_certificate_expiry_with_login_hint() {
    let roles = "[[role]]\nname = \"dev\"\nallow.db_labels = { env = \"dev\" }\nallow.db_users = [\"alice\"]\nallow.db_names = [\"*\"]\n";
    let mut setup = setup(roles);
    let expires = later(Duration::from_secs(3));
    let (client, connection, agent) = setup.connect(&alice(expires)).await;
    client.simple_query("select 1").await.unwrap();
    let (severity, code, message) = fatal_from(connection).await;
    assert!(
        now().as_secs() >= expires.as_secs(),
        "ended before the certificate expired"
    );
    assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "57P01"));
    assert!(message.contains("postern db login"), "{message}");
    assert!(message.contains("expired"), "{message}");
    assert_eq!(agent.await.unwrap().unwrap().relay, RelayEnd::CertExpired);
    let events = setup.events();
    assert_eq!(events.last().unwrap().event, "db.session.end");
}

// With disconnect_expired_cert = false and no idle timeout, the same short certificate
// does not end the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_option_the_session_outlives_the_certificate() {
    let roles = "[[role]]\nname = \"dev\"\noptions = { disconnect_expired_cert = false }\nallow.db_labels = { env = \"dev\" }\nallow.db_users = [\"alice\"]\nallow.db_names = [\"*\"]\n";
    let setup = setup(roles);
    let (client, connection, _agent) = setup.connect(&alice(later(Duration::from_secs(2)))).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    client.simple_query("select 1").await.unwrap();
    assert!(!connection.is_finished());
}

//! Session controls with a real PostgreSQL and a real driver (tokio-postgres), the test
//! playing the proxy: an idle session is ended after the role's `client_idle_timeout`,
//! and a session is ended when the user's certificate expires; each time the client
//! receives a FATAL ErrorResponse that says why, and the end is audited.

use std::sync::Arc;
use std::time::Duration;

use postern_agent::relay::RelayEnd;
use postern_agent::session::{LocalDbCa, RoleMap, SessionEnd, SessionError, SessionService};
use postern_auth::audit::AuditEvent;
use postern_pki::{Identity, Usage};
use postern_test_cluster::{HOUR, TestCluster, later, now, open_channel};
use postern_testkit::PostgresServer;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

struct Setup {
    cas: TestCluster,
    _db: PostgresServer,
    service: Arc<SessionService<RoleMap, LocalDbCa>>,
    audit: mpsc::Receiver<AuditEvent>,
}

/// An agent serving "orders" on a real PostgreSQL, with the roles in `roles_toml`.
fn setup(roles_toml: &str) -> Setup {
    let cas = TestCluster::new("main");
    let db = cas.start_postgres(Default::default());
    db.psql("postgres", "create role alice login").unwrap();
    let config = cas.session_config("agent-1", vec![cas.served_orders(&db)]);
    let (sink, audit) = mpsc::channel(1024);
    let service = cas.session_service(&cas.runtime(9), config, roles_toml, cas.local_db_ca(), sink);
    Setup {
        cas,
        _db: db,
        service,
        audit,
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
        let (proxy_end, agent) = open_channel(&self.service, "orders");
        let stream = self.cas.tls_to_agent(proxy_end, identity, "agent-1").await;
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
    let (client, connection, agent) = setup
        .connect(&setup.cas.alice(Usage::Db, later(HOUR)))
        .await;
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
    let (client, connection, agent) = setup.connect(&setup.cas.alice(Usage::Db, expires)).await;
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
    let (client, connection, _agent) = setup
        .connect(&setup.cas.alice(Usage::Db, later(Duration::from_secs(2))))
        .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    client.simple_query("select 1").await.unwrap();
    assert!(!connection.is_finished());
}

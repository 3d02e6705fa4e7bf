//! The PostgreSQL front door with the real psql: valid certificates become sessions;
//! expired, foreign, route-less and wrong-protocol certificates, plaintext and garbage
//! are refused with PostgreSQL errors a person can act on, and never disturb others.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use postern_pg::reply::SqlState;
use postern_pki::tls::ring_provider;
use postern_pki::{
    CaKind, CertAuthority, DbProtocol, DbRoute, HostIdentity, HostRole, Identity, PrivateKey,
    UnixTime, Usage, Validator,
};
use postern_proxy::client_auth::server_config;
use postern_proxy::postgres::{ALPN_PROTOCOLS, Accepted, FrontDoor, FrontDoorError};
use postern_proxy::route::{Attempts, Health};
use postern_rt::{Net, Rng, WallClock};
use postern_testkit::Psql;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const DAY: Duration = Duration::from_secs(86_400);

fn now_unix() -> UnixTime {
    WallClock::system().now()
}

fn later(by: Duration) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(now_unix().as_secs()) + by)
}

fn earlier(by: Duration) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(now_unix().as_secs()) - by)
}

struct Cluster {
    dir: tempfile::TempDir,
    user_ca: CertAuthority,
    host_ca: CertAuthority,
}

impl Cluster {
    fn new(name: &str) -> Self {
        let start = earlier(DAY);
        Self {
            dir: tempfile::tempdir().unwrap(),
            user_ca: CertAuthority::generate(CaKind::User, name, start, 30 * DAY).unwrap(),
            host_ca: CertAuthority::generate(CaKind::Host, name, start, 30 * DAY).unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a user certificate and key for psql; returns their paths.
    fn user_cert(
        &self,
        name: &str,
        route: Option<DbRoute>,
        issued: UnixTime,
        expires: UnixTime,
    ) -> (PathBuf, PathBuf) {
        let key = PrivateKey::generate().unwrap();
        let identity = Identity {
            user: "alice".to_owned(),
            roles: vec!["dev".to_owned()],
            traits: Default::default(),
            route,
            allowed_db_names: vec!["*".to_owned()],
            allowed_db_users: vec!["*".to_owned()],
            usage: Usage::User,
            cluster: self.user_ca.trusted().cluster().to_owned(),
            client_ip: None,
            expires,
        };
        let cert = self
            .user_ca
            .issue_identity(&identity, &key.public_key(), issued)
            .unwrap();
        let (crt, pem) = (
            self.path(&format!("{name}.crt")),
            self.path(&format!("{name}.key")),
        );
        std::fs::write(&crt, cert.to_pem()).unwrap();
        std::fs::write(&pem, key.to_pem()).unwrap();
        std::fs::set_permissions(&pem, std::fs::Permissions::from_mode(0o600)).unwrap();
        (crt, pem)
    }
}

fn route(service: &str, protocol: DbProtocol) -> Option<DbRoute> {
    Some(DbRoute {
        service: service.to_owned(),
        protocol,
        db_user: "alice".to_owned(),
        db_name: "app".to_owned(),
    })
}

/// A proxy front door on a free port; every outcome is sent to the test. A session is
/// routed with no agents registered, as a proxy whose agents are all gone would.
async fn start_proxy(
    cluster: &Cluster,
    handshake_timeout: Duration,
) -> (u16, mpsc::UnboundedReceiver<Result<String, FrontDoorError>>) {
    let host_key = PrivateKey::generate().unwrap();
    let host_cert = cluster
        .host_ca
        .issue_host(
            &HostIdentity {
                host_id: "proxy-1".to_owned(),
                role: HostRole::Proxy,
                cluster: cluster.host_ca.trusted().cluster().to_owned(),
                names: vec!["localhost".to_owned()],
                expires: later(DAY),
            },
            &host_key.public_key(),
            earlier(Duration::from_secs(60)),
        )
        .unwrap();
    let clock = WallClock::system();
    let tls = server_config(
        &host_cert,
        &host_key,
        &[cluster.user_ca.trusted().clone()],
        ALPN_PROTOCOLS,
        ring_provider(),
        Arc::new(clock.clone()),
    )
    .unwrap();
    let validator = Arc::new(Validator::new([cluster.user_ca.trusted().clone()]));
    let door = FrontDoor::new(tls, validator, clock).with_handshake_timeout(handshake_timeout);
    let listener = Net::Tokio.listen("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok(conn) = listener.accept().await else {
                return;
            };
            let (door, tx) = (door.clone(), tx.clone());
            tokio::spawn(async move {
                let outcome = match door.accept(conn).await {
                    Ok(Accepted::Session(session)) => {
                        let who = format!(
                            "{} as {} on {} via {}",
                            session.identity.identity().user,
                            session.params.user,
                            session.params.database,
                            session
                                .identity
                                .identity()
                                .route
                                .as_ref()
                                .map(|r| r.service.as_str())
                                .unwrap_or("-")
                        );
                        let service = session
                            .identity
                            .identity()
                            .route
                            .as_ref()
                            .map(|r| r.service.clone())
                            .unwrap_or_default();
                        let err = Attempts::plan(
                            &service,
                            &[],
                            &Health::default(),
                            Duration::ZERO,
                            &Rng::from_seed(1),
                            8,
                        )
                        .unwrap_err();
                        session
                            .refuse(
                                SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                                &err.to_string(),
                                None,
                            )
                            .await
                            .unwrap();
                        Ok(who)
                    }
                    Ok(Accepted::Cancel(request)) => Ok(format!("cancel {}", request.process_id)),
                    Ok(other) => Ok(format!("{other:?}")),
                    Err(e) => Err(e),
                };
                let _ = tx.send(outcome);
            });
        }
    });
    (port, rx)
}

/// Runs the real psql against the proxy, with a certificate or none; returns stderr.
async fn psql_async(
    cluster: &Cluster,
    port: u16,
    cert: Option<(PathBuf, PathBuf)>,
    sslmode: &'static str,
) -> String {
    let cluster_dir = cluster.dir.path().to_owned();
    let ca_pem = cluster.host_ca.trusted().to_pem();
    tokio::task::spawn_blocking(move || {
        let ca = cluster_dir.join("host-ca.crt");
        std::fs::write(&ca, ca_pem).unwrap();
        let psql = Psql::new()
            .host("localhost")
            .port(port)
            .user("alice")
            .dbname("app")
            .sslmode(sslmode)
            .param("sslrootcert", ca.display())
            .param("connect_timeout", 10);
        let psql = match &cert {
            Some((crt, key)) => psql.client_cert(crt, key),
            None => psql.client_cert(Path::new("/nonexistent"), Path::new("/nonexistent")),
        };
        let out = psql.run("select 1");
        assert!(
            !out.status.success(),
            "psql cannot succeed without an agent"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    })
    .await
    .unwrap()
}

// A valid routed certificate becomes a session carrying the identity and the
// StartupMessage; with no agent registered psql is told no service serves the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_certificate_becomes_a_session() {
    let cluster = Cluster::new("main");
    let (port, mut outcomes) = start_proxy(&cluster, Duration::from_secs(10)).await;
    let cert = cluster.user_cert(
        "alice",
        route("orders", DbProtocol::Postgres),
        earlier(Duration::from_secs(60)),
        later(Duration::from_secs(3600)),
    );
    let stderr = psql_async(&cluster, port, Some(cert), "verify-full").await;
    assert!(
        stderr.contains("no database service is serving \"orders\" right now"),
        "{stderr}"
    );
    assert_eq!(
        outcomes.recv().await.unwrap().unwrap(),
        "alice as alice on app via orders"
    );
}

// Expired, foreign-cluster and route-less certificates are refused inside PostgreSQL's
// protocol with a message that says to log in again, not with a TLS alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_are_refused_with_actionable_messages() {
    let cluster = Cluster::new("main");
    let other = Cluster::new("other");
    let (port, mut outcomes) = start_proxy(&cluster, Duration::from_secs(10)).await;

    let expired = cluster.user_cert(
        "expired",
        route("orders", DbProtocol::Postgres),
        earlier(Duration::from_secs(7200)),
        earlier(Duration::from_secs(3600)),
    );
    let stderr = psql_async(&cluster, port, Some(expired), "verify-full").await;
    assert!(
        stderr.contains("FATAL") && stderr.contains("expired at"),
        "{stderr}"
    );
    assert!(
        stderr.contains("HINT:  run `postern db login orders`"),
        "{stderr}"
    );
    assert!(matches!(
        outcomes.recv().await.unwrap(),
        Err(FrontDoorError::Identity(postern_pki::Error::Expired { .. }))
    ));

    let foreign = other.user_cert(
        "foreign",
        route("orders", DbProtocol::Postgres),
        earlier(Duration::from_secs(60)),
        later(Duration::from_secs(3600)),
    );
    let stderr = psql_async(&cluster, port, Some(foreign), "verify-full").await;
    assert!(
        stderr.contains("not a trusted CA of this cluster"),
        "{stderr}"
    );
    assert!(stderr.contains("postern login"), "{stderr}");
    assert!(matches!(
        outcomes.recv().await.unwrap(),
        Err(FrontDoorError::Identity(_))
    ));

    let routeless = cluster.user_cert(
        "routeless",
        None,
        earlier(Duration::from_secs(60)),
        later(Duration::from_secs(3600)),
    );
    let stderr = psql_async(&cluster, port, Some(routeless), "verify-full").await;
    assert!(stderr.contains("postern db login"), "{stderr}");
    assert!(matches!(
        outcomes.recv().await.unwrap(),
        Err(FrontDoorError::Identity(
            postern_pki::Error::RouteMissing { .. }
        ))
    ));

    let mysql = cluster.user_cert(
        "mysql",
        route("shop", DbProtocol::Mysql),
        earlier(Duration::from_secs(60)),
        later(Duration::from_secs(3600)),
    );
    let stderr = psql_async(&cluster, port, Some(mysql), "verify-full").await;
    assert!(stderr.contains("this is the PostgreSQL port"), "{stderr}");
    assert!(matches!(
        outcomes.recv().await.unwrap(),
        Err(FrontDoorError::WrongProtocol { .. })
    ));
}

// A client that will not use TLS is told TLS is required; one without a certificate is
// refused by the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_certificateless_clients_are_refused() {
    let cluster = Cluster::new("main");
    let (port, mut outcomes) = start_proxy(&cluster, Duration::from_secs(10)).await;
    let stderr = psql_async(&cluster, port, None, "disable").await;
    assert!(stderr.to_lowercase().contains("tls"), "{stderr}");
    assert!(matches!(
        outcomes.recv().await.unwrap(),
        Err(FrontDoorError::Protocol(_))
    ));

    let stderr = psql_async(&cluster, port, None, "require").await;
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(matches!(
        outcomes.recv().await.unwrap(),
        Err(FrontDoorError::Tls(_))
    ));
}

// A connection that sends nothing is closed after the handshake timeout; garbage ends
// only its own connection, and the next client is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_garbage_connections_do_not_affect_others() {
    let cluster = Cluster::new("main");
    let (port, mut outcomes) = start_proxy(&cluster, Duration::from_millis(300)).await;

    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut garbage = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    garbage
        .write_all(&[0, 0, 0, 9, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .await
        .unwrap();
    let mut reply = Vec::new();
    garbage.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply.first(), Some(&b'E'), "an ErrorResponse: {reply:?}");

    let cert = cluster.user_cert(
        "alice",
        route("orders", DbProtocol::Postgres),
        earlier(Duration::from_secs(60)),
        later(Duration::from_secs(3600)),
    );
    let stderr = psql_async(&cluster, port, Some(cert), "verify-full").await;
    assert!(
        stderr.contains("no database service is serving"),
        "{stderr}"
    );

    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "the silent connection is closed");

    let mut reasons = Vec::new();
    for _ in 0..3 {
        reasons.push(match outcomes.recv().await.unwrap() {
            Ok(_) => "session",
            Err(e) => e.reason(),
        });
    }
    reasons.sort_unstable();
    assert_eq!(reasons, ["handshake_timeout", "protocol", "session"]);
}

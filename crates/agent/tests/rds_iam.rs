//! RDS IAM through the agent's session service: with fixed AWS credentials and a fixed
//! clock, the agent's `RdsIam` credential source signs the same token the test computes
//! independently; a throwaway PostgreSQL that takes that token as the user's password
//! (password auth, TLS only) lets a real client in through the agent, which sent the
//! token as the cleartext password inside TLS.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::Credentials;
use postern_agent::rds::RdsIam;
use postern_agent::session::{
    RoleMap, ServedDatabase, SessionConfig, SessionEnd, SessionError, SessionService,
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
use postern_rds_iam::TokenSigner;
use postern_rt::{Connection, Net, Rng, Runtime, WallClock};
use postern_testkit::{PostgresOptions, PostgresServer, ServerTls, TcpAuth};
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
    service: Arc<SessionService<RoleMap, RdsIam>>,
    _audit: mpsc::Receiver<AuditEvent>,
}

/// Fixed AWS credentials, and the clock the token is signed at.
fn signer() -> TokenSigner {
    TokenSigner::new(
        "eu-west-1",
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "test",
        ),
        WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(
            1_795_515_630,
        ))),
    )
}

/// An agent serving "orders" (RDS IAM) on a real PostgreSQL whose role alice has the
/// password `password`, over TLS with password auth.
fn setup(roles_toml: &str, password: impl FnOnce(u16) -> String) -> Setup {
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
        tcp_auth: Some(TcpAuth::Password),
        ..Default::default()
    })
    .unwrap();
    let token = password(db.port());
    db.psql(
        "postgres",
        &format!("create role alice login password '{token}'"),
    )
    .unwrap();
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
        RdsIam::new(signer()),
        sink,
    ));
    Setup {
        user_ca,
        host_ca,
        _db: db,
        service,
        _audit: audit,
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
        self.try_connect(identity).await.unwrap()
    }

    async fn try_connect(&self, identity: &Identity) -> Result<Session, tokio_postgres::Error> {
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
            .await?;
        Ok((client, tokio::spawn(connection), agent))
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

const ROLES: &str = "[[role]]\nname = \"dev\"\nallow.db_labels = { env = \"dev\" }\nallow.db_users = [\"alice\"]\nallow.db_names = [\"*\"]\n";

// The token the agent generates (fixed credentials and time) is the password the
// database expects: the session opens as alice, over TLS, and its queries run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_logs_in_with_the_iam_token_over_tls() {
    let setup = setup(ROLES, |port| {
        let runtime = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| runtime.block_on(signer().token("localhost", port, "alice")))
            .unwrap()
    });
    let (client, _connection, agent) = setup.connect(&alice(later(HOUR))).await;
    let rows = client
        .simple_query(
            "select current_user, ssl::text from pg_stat_ssl where pid = pg_backend_pid()",
        )
        .await
        .unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some((
                row.get(0).unwrap().to_owned(),
                row.get(1).unwrap().to_owned(),
            )),
            _ => None,
        })
        .unwrap();
    assert_eq!(row, ("alice".to_owned(), "true".to_owned()));
    drop(client);
    let end: Result<SessionEnd, SessionError> = agent.await.unwrap();
    assert!(end.is_ok(), "{end:?}");
}

// A database that expects another token (signed for another port, so another URL)
// refuses the agent, and the client sees the database's own refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_endpoint_is_refused() {
    let setup = setup(ROLES, |port| {
        let runtime = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| {
            runtime.block_on(signer().token("localhost", port.wrapping_add(1), "alice"))
        })
        .unwrap()
    });
    let refused = setup.try_connect(&alice(later(HOUR))).await.unwrap_err();
    let db = refused.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28P01", "{}", db.message());
}

//! RDS IAM through the agent's session service: with fixed AWS credentials and a fixed
//! clock, the agent's `RdsIam` credential source signs the same token the test computes
//! independently; a throwaway PostgreSQL that takes that token as the user's password
//! (password auth, TLS only) lets a real client in through the agent, which sent the
//! token as the cleartext password inside TLS.

use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::Credentials;
use postern_agent::rds::RdsIam;
use postern_agent::session::{RoleMap, SessionEnd, SessionError, SessionService};
use postern_auth::audit::AuditEvent;
use postern_pki::{Identity, UnixTime, Usage};
use postern_rds_iam::TokenSigner;
use postern_rt::WallClock;
use postern_test_cluster::{HOUR, TestCluster, later, open_channel};
use postern_testkit::{PostgresOptions, PostgresServer, TcpAuth};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

struct Setup {
    cas: TestCluster,
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
    let cas = TestCluster::new("main");
    let db = cas.start_postgres(PostgresOptions {
        tcp_auth: Some(TcpAuth::Password),
        ..Default::default()
    });
    let token = password(db.port());
    db.psql(
        "postgres",
        &format!("create role alice login password '{token}'"),
    )
    .unwrap();
    let config = cas.session_config("agent-1", vec![cas.served_orders(&db)]);
    let (sink, audit) = mpsc::channel(1024);
    let credentials = RdsIam::new(signer());
    let service = cas.session_service(&cas.runtime(9), config, roles_toml, credentials, sink);
    Setup {
        cas,
        _db: db,
        service,
        _audit: audit,
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
        let (proxy_end, agent) = open_channel(&self.service, "orders");
        let stream = self.cas.tls_to_agent(proxy_end, identity, "agent-1").await;
        let (client, connection) = tokio_postgres::Config::new()
            .user("alice")
            .dbname("postgres")
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_raw(stream, tokio_postgres::NoTls)
            .await?;
        Ok((client, tokio::spawn(connection), agent))
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
    let (client, _connection, agent) = setup
        .connect(&setup.cas.alice(Usage::Db, later(HOUR)))
        .await;
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
    let refused = setup
        .try_connect(&setup.cas.alice(Usage::Db, later(HOUR)))
        .await
        .unwrap_err();
    let db = refused.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28P01", "{}", db.message());
}

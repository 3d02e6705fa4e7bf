//! End to end with real parts: psql → proxy (front door, dispatch) → SSH reverse tunnel →
//! agent (authorization, upstream TLS with a client certificate, relay, audit) → a real
//! PostgreSQL that accepts only certificates from Postern's database CA.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use postern_agent::session::{LocalDbCa, RoleMap, ServedDatabase, SessionConfig, SessionService};
use postern_agent::upstream::postgres::PostgresTarget;
use postern_agent::upstream::{TlsMode, UpstreamTls};
use postern_auth::audit::AuditEvent;
use postern_auth::database::{Database, Protocol};
use postern_pki::tls::ring_provider;
use postern_pki::{
    CaKind, CertAuthority, DbProtocol, DbRoute, HostIdentity, HostRole, Identity, PrivateKey,
    UnixTime, Usage, Validator, VerifiedIdentity,
};
use postern_proxy::client_auth::server_config;
use postern_proxy::dispatch::{DbAccessSigner, Dispatcher};
use postern_proxy::postgres::{ALPN_PROTOCOLS, Accepted, FrontDoor};
use postern_rt::{Net, Rng, Runtime, WallClock};
use postern_testkit::{PostgresOptions, PostgresServer, ServerTls};
use postern_tunnel::{Agent, AgentConfig, IncomingChannel, ProxyConfig, ProxyTunnels};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{Mutex, mpsc};

const HOUR: Duration = Duration::from_secs(3600);

fn now() -> UnixTime {
    WallClock::system().now()
}

fn at(offset_secs: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(
        now().as_secs().saturating_add_signed(offset_secs),
    ))
}

/// The cluster's three CAs.
struct Cluster {
    user_ca: CertAuthority,
    host_ca: CertAuthority,
    db_ca: CertAuthority,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Self {
        let start = at(-3600);
        Self {
            user_ca: CertAuthority::generate(CaKind::User, "e2e", start, 48 * HOUR).unwrap(),
            host_ca: CertAuthority::generate(CaKind::Host, "e2e", start, 48 * HOUR).unwrap(),
            db_ca: CertAuthority::generate(CaKind::Db, "e2e", start, 48 * HOUR).unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn host(&self, id: &str, role: HostRole, names: &[&str]) -> HostIdentity {
        HostIdentity {
            host_id: id.to_owned(),
            role,
            cluster: "e2e".to_owned(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            expires: at(24 * 3600),
        }
    }

    /// A user certificate routed to `service` as db user `db_user`, written for psql.
    fn user_cert(&self, service: &str, db_user: &str) -> (PathBuf, PathBuf) {
        let key = PrivateKey::generate().unwrap();
        let identity = Identity {
            user: "alice".to_owned(),
            roles: vec!["dev".to_owned()],
            traits: BTreeMap::from([("db_users".to_owned(), vec!["alice".to_owned()])]),
            route: Some(DbRoute {
                service: service.to_owned(),
                protocol: DbProtocol::Postgres,
                db_user: db_user.to_owned(),
                db_name: "postgres".to_owned(),
            }),
            allowed_db_names: vec![],
            allowed_db_users: vec![],
            usage: Usage::User,
            cluster: "e2e".to_owned(),
            client_ip: None,
            expires: at(3600),
        };
        let cert = self
            .user_ca
            .issue_identity(&identity, &key.public_key(), at(-60))
            .unwrap();
        let crt = self.dir.path().join(format!("{service}-{db_user}.crt"));
        let pem = self.dir.path().join(format!("{service}-{db_user}.key"));
        std::fs::write(&crt, cert.to_pem()).unwrap();
        std::fs::write(&pem, key.to_pem()).unwrap();
        std::fs::set_permissions(&pem, std::fs::Permissions::from_mode(0o600)).unwrap();
        (crt, pem)
    }
}

/// Signs proxy→agent certificates with the user CA, as the auth service does.
struct LocalSigner(Arc<Cluster>);

impl DbAccessSigner for LocalSigner {
    async fn sign(
        &self,
        user: &VerifiedIdentity,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        let key = PrivateKey::generate().map_err(|e| e.to_string())?;
        let (_, cert) = self
            .0
            .user_ca
            .issue_db_access(user, &key.public_key(), at(-60), Duration::from_secs(600))
            .map_err(|e| e.to_string())?;
        Ok((vec![cert.der().clone()], key.to_rustls()))
    }
}

/// A running system: PostgreSQL, a proxy (tunnel server, front door, dispatcher) and
/// one agent connected to it. Returns the front door's port.
struct System {
    front_port: u16,
    audit: Mutex<mpsc::Receiver<AuditEvent>>,
    database: PostgresServer,
    tunnels: ProxyTunnels,
    /// Per agent: its tunnel task and its session task; aborting both kills the agent.
    agents: Vec<(
        String,
        tokio::task::JoinHandle<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl System {
    /// Audit events received so far, as "event code query".
    async fn audit_lines(&self) -> Vec<String> {
        let mut rx = self.audit.lock().await;
        let mut lines = Vec::new();
        while let Ok(event) = rx.try_recv() {
            let query = event
                .fields
                .get("query")
                .and_then(|q| q.as_str())
                .unwrap_or("-")
                .to_owned();
            lines.push(format!(
                "{} {} {} user={} db_user={}",
                event.event,
                event.code,
                query,
                event.user.unwrap_or_default(),
                event.db_user.unwrap_or_default()
            ));
        }
        lines
    }
}

type Sessions = Arc<SessionService<RoleMap, LocalDbCa>>;

/// The agent's session service for the database "orders" (labels env=dev), with the
/// role "dev": the user's own db users on env=dev databases.
fn agent_sessions(
    runtime: &Runtime,
    cluster: &Cluster,
    agent_id: &str,
    database: &PostgresServer,
    audit: mpsc::Sender<AuditEvent>,
) -> Sessions {
    let roles = postern_auth::role::parse_role_file(
        "roles.toml",
        "[[role]]\nname = \"dev\"\nallow.db_labels = { env = \"dev\" }\nallow.db_users = [\"{{internal.db_users}}\"]\nallow.db_names = [\"*\"]\n",
    )
    .unwrap();
    let agent_key = PrivateKey::generate().unwrap();
    let agent_cert = cluster
        .host_ca
        .issue_host(
            &cluster.host(agent_id, HostRole::Agent, &[agent_id]),
            &agent_key.public_key(),
            at(-60),
        )
        .unwrap();
    let tls = postern_pki::tls::mtls_server_config(
        vec![agent_cert.der().clone()],
        agent_key.to_rustls(),
        &[cluster.user_ca.trusted().clone()],
        ring_provider(),
        Arc::new(WallClock::system()),
    )
    .unwrap();
    let target = PostgresTarget {
        host: "localhost".to_owned(),
        port: database.port(),
        tls: UpstreamTls::new(
            TlsMode::VerifyFull,
            cluster.db_ca.trusted().to_pem().as_bytes(),
            None,
            ring_provider(),
            Arc::new(WallClock::system()),
        )
        .unwrap(),
    };
    let served = ServedDatabase {
        database: Database {
            name: "orders".to_owned(),
            description: "orders database".to_owned(),
            protocol: Protocol::Postgres,
            uri: format!("localhost:{}", database.port()),
            labels: BTreeMap::from([("env".to_owned(), "dev".to_owned())]),
        },
        target,
    };
    let config = SessionConfig {
        cluster: "e2e".to_owned(),
        tls,
        validator: Validator::new([cluster.user_ca.trusted().clone()]),
        databases: vec![served],
        limits: Default::default(),
        handshake_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(10),
    };
    let db_ca = Arc::new(CertAuthority::from_pem(&cluster.db_ca.to_pem().unwrap()).unwrap());
    Arc::new(SessionService::new(
        runtime,
        config,
        RoleMap::new(roles),
        LocalDbCa::new(db_ca, WallClock::system()),
        audit,
    ))
}

/// One channel: the agent's session from TLS to the end of the relay.
async fn serve_agent_channel(sessions: &Sessions, channel: IncomingChannel) {
    let _ = sessions.serve(channel).await;
}

async fn start_system(cluster: Arc<Cluster>, agent_ids: &[&str]) -> System {
    // The database: TLS from the db CA, client certificates from the db CA only.
    let files = cluster
        .db_ca
        .sign_db_server(&["localhost".to_owned()], at(-60), 24 * HOUR)
        .unwrap();
    let database = PostgresServer::start(PostgresOptions {
        tls: Some(ServerTls {
            cert_pem: files.server_crt,
            key_pem: files.server_key,
            client_ca_pem: files.server_cas,
        }),
        ..Default::default()
    })
    .unwrap();
    database.psql("postgres", "create role alice login; create table notes (id int, body text); grant all on notes to alice").unwrap();

    let runtime = Runtime::from_parts(
        Net::Tokio,
        WallClock::system(),
        Rng::from_seed(7),
        cluster.dir.path().to_owned(),
    );
    let ca_ssh_keys = vec![cluster.host_ca.ssh_public_key().unwrap()];

    // Proxy: the tunnel server agents dial.
    let proxy_ssh_key = postern_pki::ssh::generate_ssh_key().unwrap();
    let proxy_ssh_cert = cluster
        .host_ca
        .issue_ssh_host_cert(
            &cluster.host("proxy-1", HostRole::Proxy, &["localhost"]),
            proxy_ssh_key.public_key(),
            at(-60),
        )
        .unwrap();
    let tunnels = ProxyTunnels::new(
        &runtime,
        ProxyConfig::new(proxy_ssh_key, proxy_ssh_cert, ca_ssh_keys.clone()),
    )
    .unwrap();
    let tunnel_listener = Net::Tokio.listen("127.0.0.1:0").await.unwrap();
    let tunnel_port = tunnel_listener.local_addr().unwrap().port();
    tokio::spawn({
        let tunnels = tunnels.clone();
        async move { tunnels.serve(tunnel_listener).await }
    });

    // Proxy: the PostgreSQL front door and the dispatcher.
    let host_key = PrivateKey::generate().unwrap();
    let host_cert = cluster
        .host_ca
        .issue_host(
            &cluster.host("proxy-1", HostRole::Proxy, &["localhost"]),
            &host_key.public_key(),
            at(-60),
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
    let door = FrontDoor::new(
        tls,
        Arc::new(Validator::new([cluster.user_ca.trusted().clone()])),
        clock.clone(),
    );
    let dispatcher = Arc::new(Dispatcher::new(
        tunnels.clone(),
        LocalSigner(cluster.clone()),
        vec![cluster.host_ca.trusted().clone()],
        clock,
        Rng::from_seed(8),
    ));
    let front = Net::Tokio.listen("127.0.0.1:0").await.unwrap();
    let front_port = front.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok(conn) = front.accept().await {
            let (door, dispatcher) = (door.clone(), dispatcher.clone());
            tokio::spawn(async move {
                if let Ok(Accepted::Session(session)) = door.accept(conn).await {
                    let _ = dispatcher.serve(session).await;
                }
            });
        }
    });

    // Agents: each dials the proxy and serves "orders" through its session service.
    let (audit_tx, audit_rx) = mpsc::channel(1024);
    let mut agents = Vec::new();
    for agent_id in agent_ids {
        let agent_ssh_key = postern_pki::ssh::generate_ssh_key().unwrap();
        let agent_ssh_cert = cluster
            .host_ca
            .issue_ssh_user_cert(
                &cluster.host(agent_id, HostRole::Agent, &[]),
                agent_ssh_key.public_key(),
                at(-60),
            )
            .unwrap();
        let databases = tokio::sync::watch::channel(vec!["orders".to_owned()]).1;
        let config = AgentConfig::new(
            (*agent_id).to_owned(),
            agent_ssh_key,
            agent_ssh_cert,
            ca_ssh_keys.clone(),
            databases,
        );
        let (agent, mut channels) = Agent::new(&runtime, config).unwrap();
        let (proxies_tx, proxies) =
            tokio::sync::watch::channel(vec![format!("localhost:{tunnel_port}")]);
        let tunnel_task = tokio::spawn(async move {
            let _keep = proxies_tx;
            agent.run(proxies).await;
        });
        let sessions = agent_sessions(&runtime, &cluster, agent_id, &database, audit_tx.clone());
        let session_task = tokio::spawn(async move {
            let mut running = tokio::task::JoinSet::new();
            while let Some(channel) = channels.recv().await {
                let sessions = sessions.clone();
                running.spawn(async move { serve_agent_channel(&sessions, channel).await });
            }
        });
        agents.push(((*agent_id).to_owned(), tunnel_task, session_task));
    }

    // Ready when the proxy sees every agent's tunnel for "orders".
    for _ in 0..200 {
        if tunnels.candidates("orders").len() == agent_ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        tunnels.candidates("orders").len(),
        agent_ids.len(),
        "the agents' tunnels never came up"
    );
    System {
        front_port,
        audit: Mutex::new(audit_rx),
        database,
        tunnels,
        agents,
    }
}

/// Runs the real psql through the proxy with `sql` as its script (meta-commands such as
/// `\\copy` on lines of their own); returns (success, stdout, stderr).
async fn psql(
    cluster: &Cluster,
    port: u16,
    cert: (PathBuf, PathBuf),
    db_user: &str,
    sql: &str,
) -> (bool, String, String) {
    let ca = cluster.dir.path().join("host-ca.crt");
    std::fs::write(&ca, cluster.host_ca.trusted().to_pem()).unwrap();
    let conninfo = format!(
        "host=localhost port={port} user={db_user} dbname=postgres sslmode=verify-full sslrootcert={} sslcert={} sslkey={} connect_timeout=10",
        ca.display(),
        cert.0.display(),
        cert.1.display()
    );
    let sql = sql.to_owned();
    tokio::task::spawn_blocking(move || {
        let out = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                &conninfo,
                "-f",
                "-",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("stdin is piped")
                    .write_all(sql.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

// psql reaches a database it cannot reach directly: through the proxy, the agent's
// reverse tunnel and the agent, as the db user its certificate routes to; each
// statement is in the audit log with the session's user and db user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_reaches_postgres_through_proxy_and_tunnel_and_is_audited() {
    let cluster = Arc::new(Cluster::new());
    let system = start_system(cluster.clone(), &["agent-1"]).await;
    let cert = cluster.user_cert("orders", "alice");

    let (ok, out, err) = psql(
        &cluster,
        system.front_port,
        cert.clone(),
        "alice",
        "select current_user",
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "alice");
    let (ok, out, err) = psql(
        &cluster,
        system.front_port,
        cert,
        "alice",
        "insert into notes values (1, 'through the tunnel'); select body from notes",
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "through the tunnel");
    // The rows are really in the database.
    assert_eq!(
        system
            .database
            .psql("postgres", "select count(*) from notes")
            .unwrap(),
        "1"
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = system.audit_lines().await;
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(
        has("db.session.start TDB00I - user=alice db_user=alice"),
        "{lines:#?}"
    );
    assert!(
        has("db.session.query TDB02I select current_user user=alice db_user=alice"),
        "{lines:#?}"
    );
    // psql runs a script statement by statement: one event each.
    assert!(
        has("db.session.query TDB02I insert into notes values (1, 'through the tunnel');"),
        "{lines:#?}"
    );
    assert!(
        has("db.session.query TDB02I select body from notes user=alice"),
        "{lines:#?}"
    );
    assert!(has("db.session.end TDB01I"), "{lines:#?}");
}

// A db user the roles do not allow is refused by the agent before anything reaches
// PostgreSQL; psql shows the access decision's reason, and the refusal is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_user_outside_the_roles_is_refused_before_the_database() {
    let cluster = Arc::new(Cluster::new());
    let system = start_system(cluster.clone(), &["agent-1"]).await;
    let cert = cluster.user_cert("orders", "postgres");

    let (ok, _, err) = psql(&cluster, system.front_port, cert, "postgres", "select 1").await;
    assert!(!ok);
    assert!(err.contains("FATAL") && err.contains("postgres"), "{err}");
    let sessions = system.database.psql("postgres", "select count(*) from pg_stat_activity where usename = 'postgres' and client_addr is not null").unwrap();
    assert_eq!(
        sessions, "0",
        "no TCP session as postgres reached the database"
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = system.audit_lines().await;
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("db.session.start TDB00W")),
        "{lines:#?}"
    );
}

// Two agents serve one database: with one killed, new connections still succeed,
// through the other, without the user doing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_fail_over_to_the_surviving_agent() {
    let cluster = Arc::new(Cluster::new());
    let mut system = start_system(cluster.clone(), &["agent-1", "agent-2"]).await;
    let cert = cluster.user_cert("orders", "alice");
    let (ok, out, err) = psql(
        &cluster,
        system.front_port,
        cert.clone(),
        "alice",
        "select 1",
    )
    .await;
    assert!(ok && out == "1", "{err}");

    let (killed, tunnel_task, session_task) = system.agents.remove(0);
    tunnel_task.abort();
    session_task.abort();
    let _ = tunnel_task.await;
    for attempt in 0..5 {
        let (ok, out, err) = psql(
            &cluster,
            system.front_port,
            cert.clone(),
            "alice",
            "select 'still here'",
        )
        .await;
        assert!(ok, "attempt {attempt} after killing {killed}: {err}");
        assert_eq!(out, "still here");
    }
    let survivors: Vec<String> = system
        .tunnels
        .candidates("orders")
        .into_iter()
        .map(|c| c.agent)
        .collect();
    assert_eq!(survivors, ["agent-2"]);
}

// A multi-statement script and psql's \copy in both directions run through the proxy
// and the agent, with the COPY statements audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_and_copy_both_ways_pass_through() {
    let cluster = Arc::new(Cluster::new());
    let system = start_system(cluster.clone(), &["agent-1"]).await;
    let cert = cluster.user_cert("orders", "alice");
    let rows = cluster.dir.path().join("rows.csv");
    std::fs::write(
        &rows,
        (1..=1000)
            .map(|i| format!("{i},row {i}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let exported = cluster.dir.path().join("exported.csv");

    let script = format!(
        "begin;\ncreate temp table staging (id int, body text);\n\\copy notes from '{}' with (format csv)\ncommit;\n\\copy (select * from notes order by id) to '{}' with (format csv)\nselect count(*), max(id) from notes;\n",
        rows.display(),
        exported.display()
    );
    let (ok, out, err) = psql(&cluster, system.front_port, cert, "alice", &script).await;
    assert!(ok, "{err}");
    assert!(out.ends_with("1000|1000"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&exported).unwrap(),
        std::fs::read_to_string(&rows).unwrap()
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = system.audit_lines().await;
    assert!(
        lines.iter().any(|l| l.contains("COPY notes FROM STDIN")
            || l.contains("copy notes from stdin")
            || l.contains("FROM STDIN")),
        "{lines:#?}"
    );
    assert!(lines.iter().any(|l| l.contains("TO STDOUT")), "{lines:#?}");
}

//! End to end with real parts: psql → proxy (front door, dispatch) → SSH reverse tunnel →
//! agent (authorization, upstream TLS with a client certificate, relay, audit) → a real
//! PostgreSQL that accepts only certificates from Postern's database CA.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use postern_agent::session::{LocalDbCa, RoleMap, SessionService};
use postern_auth::audit::AuditEvent;
use postern_pki::tls::ring_provider;
use postern_pki::{DbProtocol, DbRoute, Identity, Usage, Validator};
use postern_proxy::client_auth::server_config;
use postern_proxy::dispatch::Dispatcher;
use postern_proxy::postgres::{ALPN_PROTOCOLS, Accepted, FrontDoor};
use postern_rt::{Net, Rng, Runtime, WallClock};
use postern_test_cluster::{DEV_ROLE, LocalSigner, TestCluster, at};
use postern_testkit::{PostgresServer, Psql};
use postern_tunnel::{IncomingChannel, ProxyTunnels};
use tokio::sync::{Mutex, mpsc};

/// A user certificate for alice routed to `service` as db user `db_user`, written for psql.
fn user_cert(cluster: &TestCluster, service: &str, db_user: &str) -> (PathBuf, PathBuf) {
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
    cluster.user_cert_files(&identity, &format!("{service}-{db_user}"))
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
    cluster: &TestCluster,
    agent_id: &str,
    database: &PostgresServer,
    audit: mpsc::Sender<AuditEvent>,
) -> Sessions {
    let config = cluster.session_config(agent_id, vec![cluster.served_orders(database)]);
    cluster.session_service(runtime, config, DEV_ROLE, cluster.local_db_ca(), audit)
}

/// One channel: the agent's session from TLS to the end of the relay.
async fn serve_agent_channel(sessions: &Sessions, channel: IncomingChannel) {
    let _ = sessions.serve(channel).await;
}

async fn start_system(cluster: Arc<TestCluster>, agent_ids: &[&str]) -> System {
    // The database: TLS from the db CA, client certificates from the db CA only.
    let database = cluster.start_postgres(Default::default());
    database.psql("postgres", "create role alice login; create table notes (id int, body text); grant all on notes to alice").unwrap();

    let runtime = cluster.runtime(7);

    // Proxy: the tunnel server agents dial.
    let tunnels: ProxyTunnels = cluster.proxy_tunnels(&runtime);
    let tunnel_listener = Net::Tokio.listen("127.0.0.1:0").await.unwrap();
    let tunnel_port = tunnel_listener.local_addr().unwrap().port();
    tokio::spawn({
        let tunnels = tunnels.clone();
        async move { tunnels.serve(tunnel_listener).await }
    });

    // Proxy: the PostgreSQL front door and the dispatcher.
    let (host_cert, host_key) = cluster.proxy_host_cert();
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
        let (tunnel_task, mut channels) = cluster.start_agent_tunnel(
            &runtime,
            agent_id,
            vec!["orders".to_owned()],
            format!("localhost:{tunnel_port}"),
        );
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
    cluster: &TestCluster,
    port: u16,
    cert: (PathBuf, PathBuf),
    db_user: &str,
    sql: &str,
) -> (bool, String, String) {
    let ca = cluster.dir.path().join("host-ca.crt");
    std::fs::write(&ca, cluster.host_ca.trusted().to_pem()).unwrap();
    let psql = Psql::new()
        .host("localhost")
        .port(port)
        .user(db_user)
        .dbname("postgres")
        .verify_full(&ca)
        .client_cert(&cert.0, &cert.1)
        .param("connect_timeout", 10);
    let sql = sql.to_owned();
    tokio::task::spawn_blocking(move || Psql::summary(&psql.run_script(&sql)))
        .await
        .unwrap()
}

// psql reaches a database it cannot reach directly: through the proxy, the agent's
// reverse tunnel and the agent, as the db user its certificate routes to; each
// statement is in the audit log with the session's user and db user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_reaches_postgres_through_proxy_and_tunnel_and_is_audited() {
    let cluster = Arc::new(TestCluster::new("e2e"));
    let system = start_system(cluster.clone(), &["agent-1"]).await;
    let cert = user_cert(&cluster, "orders", "alice");

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
    let cluster = Arc::new(TestCluster::new("e2e"));
    let system = start_system(cluster.clone(), &["agent-1"]).await;
    let cert = user_cert(&cluster, "orders", "postgres");

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
    let cluster = Arc::new(TestCluster::new("e2e"));
    let mut system = start_system(cluster.clone(), &["agent-1", "agent-2"]).await;
    let cert = user_cert(&cluster, "orders", "alice");
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
    let cluster = Arc::new(TestCluster::new("e2e"));
    let system = start_system(cluster.clone(), &["agent-1"]).await;
    let cert = user_cert(&cluster, "orders", "alice");
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

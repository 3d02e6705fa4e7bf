//! `ProxyService` end to end with real parts: real psql and tokio-postgres → the proxy
//! service (listeners, limits, cancel routing, TLS routing, drain) → SSH reverse tunnel →
//! agent → a real PostgreSQL 15 that accepts only client certificates (`hostssl … cert`).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use postern_agent::cancel::{CANCEL_TIMEOUT_DEFAULT, serve_cancel};
use postern_auth::audit::AuditEvent;
use postern_pki::tls::ring_provider;
use postern_pki::{DbProtocol, DbRoute, HostRole, Identity, PrivateKey, Usage, Validator};
use postern_proxy::service::ALPN_POSTERN_POSTGRES;
use postern_proxy::{Listen, LocalAddrs, ProxyLimits, ProxyService};
use postern_rt::Net;
use postern_test_cluster::{DEV_ROLE, LocalSigner, TestCluster, at, now};
use postern_testkit::{PostgresServer, Psql};
use postern_tunnel::ChannelKind;
use prometheus_client::registry::Registry;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Alice, role dev, routed to "orders" as db user alice.
fn alice() -> Identity {
    Identity {
        user: "alice".to_owned(),
        roles: vec!["dev".to_owned()],
        traits: BTreeMap::from([("db_users".to_owned(), vec!["alice".to_owned()])]),
        route: Some(DbRoute {
            service: "orders".to_owned(),
            protocol: DbProtocol::Postgres,
            db_user: "alice".to_owned(),
            db_name: "postgres".to_owned(),
        }),
        allowed_db_names: vec![],
        allowed_db_users: vec![],
        usage: Usage::User,
        cluster: "svc".to_owned(),
        client_ip: None,
        expires: at(3600),
    }
}

/// A running proxy service and the way to stop it.
struct RunningProxy {
    addrs: LocalAddrs,
    registry: Registry,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningProxy {
    fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }
}

/// Starts a proxy service on `listen` (port 0 picks free ports).
async fn start_proxy(
    cluster: &Arc<TestCluster>,
    listen: Listen,
    auth_api_addr: Option<String>,
    limits: ProxyLimits,
) -> RunningProxy {
    let config = cluster.proxy_config(listen, auth_api_addr, limits);
    let mut proxy =
        ProxyService::new(&cluster.runtime(5), config, LocalSigner(cluster.clone())).unwrap();
    let mut registry = Registry::default();
    proxy.register_metrics(&mut registry);
    let addrs = proxy.bind().await.unwrap();
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        proxy
            .run(async move {
                let _ = shutdown_rx.await;
            })
            .await
            .unwrap();
    });
    RunningProxy {
        addrs,
        registry,
        shutdown: Some(shutdown_tx),
        task,
    }
}

fn any_port() -> Listen {
    Listen {
        postgres: "127.0.0.1:0".to_owned(),
        web: Some("127.0.0.1:0".to_owned()),
        tunnel: "127.0.0.1:0".to_owned(),
    }
}

/// PostgreSQL with client-cert auth, and alice with a table.
fn start_database(cluster: &TestCluster) -> PostgresServer {
    let database = cluster.start_postgres(Default::default());
    database
        .psql(
            "postgres",
            "create role alice login; create table notes (id int, body text); grant all on notes to alice",
        )
        .unwrap();
    database
}

/// One agent serving "orders": sessions through `SessionService`, cancel channels
/// through `serve_cancel`. Audit events go to the returned receiver.
fn start_agent(
    cluster: &Arc<TestCluster>,
    database: &PostgresServer,
    tunnel_addr: String,
) -> (mpsc::Receiver<AuditEvent>, Vec<JoinHandle<()>>) {
    let runtime = cluster.runtime(9);
    let served = cluster.served_orders(database);
    let databases = Arc::new(vec![served.clone()]);
    let config = cluster.session_config("agent-1", vec![served]);
    let (audit_tx, audit_rx) = mpsc::channel(4096);
    let sessions =
        cluster.session_service(&runtime, config, DEV_ROLE, cluster.local_db_ca(), audit_tx);
    let (tunnel_task, mut channels) =
        cluster.start_agent_tunnel(&runtime, "agent-1", vec!["orders".to_owned()], tunnel_addr);
    let net = *runtime.net();
    let channel_task = tokio::spawn(async move {
        let mut running = tokio::task::JoinSet::new();
        while let Some(channel) = channels.recv().await {
            let sessions = sessions.clone();
            let databases = databases.clone();
            running.spawn(async move {
                if channel.kind() == ChannelKind::Cancel {
                    let _ = serve_cancel(channel, &databases, &net, CANCEL_TIMEOUT_DEFAULT).await;
                } else {
                    let _ = sessions.serve(channel).await;
                }
            });
        }
    });
    (audit_rx, vec![tunnel_task, channel_task])
}

/// Waits until the proxy at `addrs` has the agent's tunnel for "orders" (via a query).
async fn until_routable(cluster: &TestCluster, addrs: &LocalAddrs, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if let Ok((client, _conn)) = try_pg_client(cluster, addrs.postgres.port()).await
            && client.simple_query("select 1").await.is_ok()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// tokio-postgres through the proxy's PostgreSQL port: SSLRequest, TLS with alice's
/// certificate (verify-full against the host CA), then the driver's start-up.
async fn try_pg_client(
    cluster: &TestCluster,
    port: u16,
) -> Result<(tokio_postgres::Client, JoinHandle<()>), String> {
    let mut tcp = Net::Tokio
        .connect(&format!("127.0.0.1:{port}"))
        .await
        .map_err(|e| e.to_string())?;
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    if answer[0] != b'S' {
        return Err(format!("proxy answered {:?} to SSLRequest", answer[0]));
    }
    let tls = cluster
        .client_tls(&alice(), None)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    driver_over(tls).await
}

async fn driver_over<S>(stream: S) -> Result<(tokio_postgres::Client, JoinHandle<()>), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = tokio_postgres::Config::new()
        .user("alice")
        .dbname("postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => format!("{} {}", db.code().code(), db.message()),
            None => e.to_string(),
        })?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, task))
}

/// psql as alice through the proxy on `port`, with her certificate.
fn alice_psql(cluster: &TestCluster, port: u16) -> Psql {
    let ca = cluster.dir.path().join("host-ca.crt");
    std::fs::write(&ca, cluster.host_ca.trusted().to_pem()).unwrap();
    let (crt, key) = cluster.user_cert_files(&alice(), "alice");
    Psql::new()
        .host("localhost")
        .port(port)
        .user("alice")
        .dbname("postgres")
        .verify_full(&ca)
        .client_cert(&crt, &key)
        .param("connect_timeout", 10)
}

/// Real psql running `sql`: (success, stdout, stderr).
async fn psql(cluster: &TestCluster, port: u16, sql: &str) -> (bool, String, String) {
    let psql = alice_psql(cluster, port);
    let sql = sql.to_owned();
    tokio::task::spawn_blocking(move || Psql::summary(&psql.run(&sql)))
        .await
        .unwrap()
}

fn drain_audit(audit: &mut mpsc::Receiver<AuditEvent>) -> Vec<String> {
    std::iter::from_fn(|| audit.try_recv().ok())
        .map(|e| {
            let query = e
                .fields
                .get("query")
                .and_then(|q| q.as_str())
                .unwrap_or("-")
                .to_owned();
            format!("{} {} {}", e.event, e.code, query)
        })
        .collect()
}

/// A system: database, proxy service, one agent.
struct System {
    cluster: Arc<TestCluster>,
    database: PostgresServer,
    proxy: RunningProxy,
    audit: mpsc::Receiver<AuditEvent>,
    _agent: Vec<JoinHandle<()>>,
}

async fn start_system(limits: ProxyLimits, auth_api_addr: Option<String>) -> System {
    let cluster = Arc::new(TestCluster::new("svc"));
    let database = start_database(&cluster);
    let proxy = start_proxy(&cluster, any_port(), auth_api_addr, limits).await;
    let (audit, agent) = start_agent(
        &cluster,
        &database,
        format!("localhost:{}", proxy.addrs.tunnel.port()),
    );
    assert!(
        until_routable(&cluster, &proxy.addrs, Duration::from_secs(10)).await,
        "the agent never became reachable through the proxy"
    );
    System {
        cluster,
        database,
        proxy,
        audit,
        _agent: agent,
    }
}

// psql and a driver with prepared statements reach PostgreSQL through the proxy
// service; the agent audits the extended protocol, and the proxy's metrics count it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_prepared_statements_through_the_service() {
    let mut system = start_system(ProxyLimits::default(), None).await;
    let port = system.proxy.addrs.postgres.port();
    let (ok, out, err) = psql(&system.cluster, port, "select current_user").await;
    assert!(ok, "{err}");
    assert_eq!(out, "alice");

    let (client, _conn) = try_pg_client(&system.cluster, port).await.unwrap();
    let insert = client
        .prepare("insert into notes values ($1, $2)")
        .await
        .unwrap();
    for i in 0..3 {
        client
            .execute(&insert, &[&i, &format!("note {i}")])
            .await
            .unwrap();
    }
    let rows = client
        .query(
            "select body from notes where id >= $1 order by id",
            &[&1i32],
        )
        .await
        .unwrap();
    let bodies: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(bodies, ["note 1", "note 2"]);
    drop(client);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = drain_audit(&mut system.audit);
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(has("db.session.start TDB00I"), "{lines:#?}");
    assert!(
        has("db.session.postgres.statements.parse TPG00I insert into notes values ($1, $2)"),
        "{lines:#?}"
    );
    assert!(
        has("db.session.postgres.statements.bind TPG01I"),
        "{lines:#?}"
    );
    assert!(
        has("db.session.postgres.statements.execute TPG02I"),
        "{lines:#?}"
    );
    assert!(has("db.session.end TDB01I"), "{lines:#?}");

    let metrics = system.proxy.metrics_text();
    assert!(
        metrics.contains("postern_proxy_tunnels_connected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("postern_proxy_active_sessions"),
        "{metrics}"
    );
    let relayed = |direction: &str| -> u64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("postern_proxy_bytes_relayed_total")
                    && l.contains(&format!("direction=\"{direction}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(relayed("client_to_database") > 100, "{metrics}");
    assert!(relayed("database_to_client") > 100, "{metrics}");
}

// Ctrl-C in psql cancels a running `select pg_sleep(60)` through the proxy within 2 s:
// the CancelRequest on a new connection reaches the agent and then PostgreSQL over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_in_psql_cancels_the_query_through_the_proxy() {
    let system = start_system(ProxyLimits::default(), None).await;
    let child = alice_psql(&system.cluster, system.proxy.addrs.postgres.port())
        .command("select pg_sleep(60)")
        .spawn()
        .unwrap();
    let pid = child.id();

    let mut running = false;
    for _ in 0..200 {
        let active = system
            .database
            .psql(
                "postgres",
                "select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'",
            )
            .unwrap();
        if active == "1" {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(running, "the query never started in PostgreSQL");

    let started = tokio::time::Instant::now();
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
    )
    .await
    .expect("psql did not finish within 2 s of Ctrl-C")
    .unwrap();
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "psql said: {stderr}"
    );
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    assert!(
        system
            .proxy
            .metrics_text()
            .contains("postern_proxy_cancel_requests_total{outcome=\"forwarded\"} 1")
    );
}

// A cancel request with a key no session owns is dropped silently: the connection is
// closed without an answer, and a running query is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_cancel_keys_are_dropped() {
    let system = start_system(ProxyLimits::default(), None).await;
    let port = system.proxy.addrs.postgres.port();
    let (client, _conn) = try_pg_client(&system.cluster, port).await.unwrap();
    let query =
        tokio::spawn(async move { client.simple_query("select pg_sleep(1)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut raw = Net::Tokio
        .connect(&format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    raw.write_all(&[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 1, 2, 3, 4])
        .await
        .unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    assert!(answer.is_empty(), "{answer:?}");
    assert!(query.await.unwrap().is_ok(), "the query was cancelled");
    assert!(
        system
            .proxy
            .metrics_text()
            .contains("postern_proxy_cancel_requests_total{outcome=\"unknown_key\"} 1")
    );
}

/// A TLS server standing in for the auth API: answers one HTTP request per connection.
async fn fake_auth_api(cluster: &TestCluster) -> (String, JoinHandle<()>) {
    let key = PrivateKey::generate().unwrap();
    let cert = cluster
        .host_ca
        .issue_host(
            &cluster.host("auth-1", HostRole::Auth, &["localhost"]),
            &key.public_key(),
            at(-60),
        )
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key.to_rustls())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = Net::Tokio.listen("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        while let Ok(conn) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(conn).await else {
                    return;
                };
                let mut request = vec![0u8; 1024];
                let n = tls.read(&mut request).await.unwrap_or(0);
                let line = String::from_utf8_lossy(&request[..n])
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let body = format!("auth api saw: {line}");
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, task)
}

// The web port routes by ALPN: `postern-postgres` runs the PostgreSQL path inside the
// TLS the proxy terminates; anything else reaches the auth API unchanged, with TLS end
// to end (the client sees the auth API's certificate, not the proxy's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_port_routes_postgres_by_alpn_and_passes_the_rest_through() {
    let cluster = Arc::new(TestCluster::new("svc"));
    let (api_addr, _api) = fake_auth_api(&cluster).await;
    let database = start_database(&cluster);
    let proxy = start_proxy(&cluster, any_port(), Some(api_addr), ProxyLimits::default()).await;
    let (_audit, _agent) = start_agent(
        &cluster,
        &database,
        format!("localhost:{}", proxy.addrs.tunnel.port()),
    );
    assert!(until_routable(&cluster, &proxy.addrs, Duration::from_secs(10)).await);
    let web = proxy.addrs.web.unwrap();

    // PostgreSQL over the web port: TLS with ALPN postern-postgres, then the driver.
    let tcp = Net::Tokio.connect(&web.to_string()).await.unwrap();
    let tls = cluster
        .client_tls(&alice(), Some(ALPN_POSTERN_POSTGRES))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_POSTERN_POSTGRES));
    let (client, _conn) = driver_over(tls).await.unwrap();
    let rows = client
        .simple_query("select 'via the web port'")
        .await
        .unwrap();
    let value = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("via the web port"));

    // Anything else: passed through to the auth API, TLS end to end.
    let plain = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates({
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cluster.host_ca.trusted().der().clone()).unwrap();
            roots
        })
        .with_no_client_auth();
    let mut plain = plain;
    plain.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = Net::Tokio.connect(&web.to_string()).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(plain))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let seen = postern_pki::tls::peer_host(
        Some(&[peer]),
        &Validator::new([cluster.host_ca.trusted().clone()]),
        HostRole::Auth,
        now(),
    );
    assert!(
        seen.is_ok(),
        "the client did not see the auth API's certificate: {seen:?}"
    );
    tls.write_all(b"GET /v1/ping HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    tls.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(
        reply.ends_with("auth api saw: GET /v1/ping HTTP/1.1"),
        "{reply}"
    );
    drop(proxy);
}

// Restarting the proxy (drop the service, start a new one on the same ports): the
// agent reconnects and a query succeeds again within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reconnect_after_a_proxy_restart() {
    let mut system = start_system(ProxyLimits::default(), None).await;
    let addrs = system.proxy.addrs;
    system.proxy.task.abort();
    let _ = (&mut system.proxy.task).await;
    let listen = Listen {
        postgres: addrs.postgres.to_string(),
        web: addrs.web.map(|a| a.to_string()),
        tunnel: addrs.tunnel.to_string(),
    };
    let restarted = tokio::time::Instant::now();
    let proxy = start_proxy(&system.cluster, listen, None, ProxyLimits::default()).await;
    assert_eq!(proxy.addrs, addrs);
    assert!(
        until_routable(&system.cluster, &proxy.addrs, Duration::from_secs(5)).await,
        "no query succeeded within 5 s of the restart"
    );
    assert!(restarted.elapsed() < Duration::from_secs(5));
    let (ok, out, err) = psql(&system.cluster, addrs.postgres.port(), "select 'back'").await;
    assert!(ok && out == "back", "{err}");
}

// Malformed bytes from some clients (garbage, a bogus length, data after SSLRequest, a
// broken TLS record) end only their own connections: a session in progress and new
// sessions are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_clients_do_not_affect_other_sessions() {
    let system = start_system(ProxyLimits::default(), None).await;
    let port = system.proxy.addrs.postgres.port();
    let (client, _conn) = try_pg_client(&system.cluster, port).await.unwrap();
    client.simple_query("begin").await.unwrap();
    client
        .simple_query("insert into notes values (7, 'before')")
        .await
        .unwrap();

    let junk: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff; 64],
        vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0],
        vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f, b'x', b'y'],
        vec![0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3],
        (0..4096u32).map(|i| (i * 7 % 251) as u8).collect(),
    ];
    let mut tasks = Vec::new();
    for bytes in junk {
        tasks.push(tokio::spawn(async move {
            let mut conn = Net::Tokio
                .connect(&format!("127.0.0.1:{port}"))
                .await
                .unwrap();
            let _ = conn.write_all(&bytes).await;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(15), conn.read_to_end(&mut answer))
                .await
                .expect("the proxy never closed a malformed connection");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    client
        .simple_query("insert into notes values (8, 'after')")
        .await
        .unwrap();
    client.simple_query("commit").await.unwrap();
    let (ok, out, err) = psql(
        &system.cluster,
        port,
        "select string_agg(body, ',' order by id) from notes",
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "before,after");
    let metrics = system.proxy.metrics_text();
    assert!(
        metrics.contains("postern_proxy_handshake_failures_total{reason=\"protocol\"}"),
        "{metrics}"
    );
}

// With connections_per_user_max = 1, a second session of the same user is refused
// with SQLSTATE 53300 naming the limit; once the first ends, a new one is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_connection_limit_refuses_with_53300() {
    let limits = ProxyLimits {
        connections_per_user_max: 1,
        ..ProxyLimits::default()
    };
    let system = start_system(limits, None).await;
    let port = system.proxy.addrs.postgres.port();
    // until_routable's probe session has ended; wait for its slot to come back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (first, first_conn) = try_pg_client(&system.cluster, port).await.unwrap();
    first.simple_query("select 1").await.unwrap();

    let refused = try_pg_client(&system.cluster, port).await;
    let Err(error) = refused else {
        panic!("a second session was accepted");
    };
    assert!(
        error.contains("53300") || error.contains("too many connections"),
        "{error}"
    );
    let (ok, _, err) = psql(&system.cluster, port, "select 1").await;
    assert!(!ok);
    assert!(
        err.contains("too many connections for user \"alice\"")
            && err.contains("connections_per_user_max"),
        "{err}"
    );

    drop(first);
    let _ = first_conn.await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (ok, out, err) = psql(&system.cluster, port, "select 'again'").await;
    assert!(ok && out == "again", "{err}");
}

// Shutdown drains: new connections are refused at once, a running session goes on
// until the drain timeout, then it is closed and `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_closes_sessions() {
    let limits = ProxyLimits {
        drain_timeout: Duration::from_secs(2),
        ..ProxyLimits::default()
    };
    let mut system = start_system(limits, None).await;
    let port = system.proxy.addrs.postgres.port();
    let (client, _conn) = try_pg_client(&system.cluster, port).await.unwrap();
    client.simple_query("select 1").await.unwrap();

    let began = tokio::time::Instant::now();
    system.proxy.shutdown.take().unwrap().send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        Net::Tokio
            .connect(&format!("127.0.0.1:{port}"))
            .await
            .is_err(),
        "the listener still accepts after shutdown"
    );
    // Draining: the running session still works.
    client
        .simple_query("select 'still draining'")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), &mut system.proxy.task)
        .await
        .expect("run did not return after the drain timeout")
        .unwrap();
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "closed before the drain timeout: {took:?}"
    );
    assert!(
        client.simple_query("select 1").await.is_err(),
        "the session outlived the drain"
    );
}

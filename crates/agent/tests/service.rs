//! The database service as a whole, with real parts: a real auth API (memory backend),
//! a real proxy tunnel server, a real PostgreSQL that only takes certificates from the
//! cluster's database CA, and tokio-postgres playing the client behind the proxy.
//! The agent joins with a token, gets its SSH certificate, announces its database with
//! static and dynamic labels, holds the tunnel, authorizes with roles it polls from
//! auth, ships audit events through its spool, withdraws on shutdown, and ends the
//! sessions still open at the drain timeout with FATAL 57P01.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use postern_agent::relay::SHUTDOWN_MESSAGE;
use postern_agent::service::{
    AgentError, AgentService, AgentServiceConfig, AgentTimers, DatabaseConfig, DatabaseTls,
    DynamicLabel, HostMaterial,
};
use postern_auth::api;
use postern_auth::audit::{AuditEvent, AuditLog, AuditQuery, MemoryAuditLog};
use postern_auth::backend::MemoryBackend;
use postern_auth::database::Protocol;
use postern_auth::limiter::LoginLimits;
use postern_auth::role::parse_role_file;
use postern_auth::server::{AuthConfig, AuthServer, TokenKind};
use postern_auth::user::{PasswordCost, Traits};
use postern_pki::tls::{mtls_client_config, ring_provider};
use postern_pki::{CaKind, IssuedCert, PrivateKey, Purpose, VerifiedHost};
use postern_rt::{Net, Rng, Runtime, WallClock};
use postern_testkit::{PostgresOptions, PostgresServer, ServerTls};
use postern_tunnel::{ChannelRequest, ProxyConfig, ProxyTunnels};
use prometheus_client::registry::Registry;
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

type Auth = Arc<AuthServer<MemoryBackend, MemoryAuditLog>>;
const PASSWORD: &str = "correct horse battery staple";

const ROLES: &str = r#"
[[role]]
name = "dev"
allow.db_labels = { env = "dev", tier = "gold" }
allow.db_users = ["alice"]
allow.db_names = ["*"]
"#;

async fn wait_for(mut ready: impl AsyncFnMut() -> bool, what: &str) {
    for _ in 0..300 {
        if ready().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn auth_server(log: MemoryAuditLog) -> Auth {
    let clock = WallClock::system();
    let server = AuthServer::new(
        MemoryBackend::new(Arc::new(clock.clone())),
        log,
        clock,
        Rng::from_seed(5),
        AuthConfig {
            cluster: "svc".into(),
            password_cost: PasswordCost {
                memory_kib: 64,
                passes: 1,
            },
            login_limits: LoginLimits::default(),
        },
    )
    .unwrap();
    server.ensure_cas().await.unwrap();
    server
        .apply_roles("root", &parse_role_file("r.toml", ROLES).unwrap())
        .await
        .unwrap();
    server
        .create_user(
            "root",
            "alice",
            vec!["dev".into()],
            Traits::default(),
            Some(PASSWORD),
            false,
        )
        .await
        .unwrap();
    Arc::new(server)
}

/// A proxy's tunnel server, its host and SSH certificates from the auth server.
async fn proxy(auth: &Auth, runtime: &Runtime) -> (ProxyTunnels, String, VerifiedHost) {
    let token = auth
        .create_join_token("root", TokenKind::Proxy, Duration::from_secs(60))
        .await
        .unwrap();
    let key = PrivateKey::generate().unwrap();
    let joined = auth
        .join(
            &token,
            TokenKind::Proxy,
            "proxy-1",
            vec!["localhost".into()],
            &key.public_key(),
        )
        .await
        .unwrap();
    let validator = auth.validator().await.unwrap();
    let host = validator
        .verify_host(
            joined.cert.der(),
            postern_pki::HostRole::Proxy,
            WallClock::system().now(),
        )
        .unwrap();
    let ssh_key = postern_pki::ssh::generate_ssh_key().unwrap();
    let ssh = auth
        .issue_ssh_for_host(&host, ssh_key.public_key())
        .await
        .unwrap();
    let tunnels = ProxyTunnels::new(
        runtime,
        ProxyConfig::new(ssh_key, ssh.cert, ssh.host_ca_keys),
    )
    .unwrap();
    let listener = Net::Tokio.listen("127.0.0.1:0").await.unwrap();
    let addr = format!("localhost:{}", listener.local_addr().unwrap().port());
    tokio::spawn({
        let tunnels = tunnels.clone();
        async move { tunnels.serve(listener).await }
    });
    (tunnels, addr, host)
}

async fn query_events(log: &MemoryAuditLog, event: &str) -> Vec<AuditEvent> {
    let mut query = AuditQuery::between(
        OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
        OffsetDateTime::from_unix_timestamp(4_000_000_000).unwrap(),
    );
    query.event = Some(event.into());
    log.search(&query).await.unwrap()
}

/// Everything around the agent: the auth API (memory backend), a PostgreSQL that takes
/// certificates from the cluster's database CA, and a proxy's tunnel server.
struct Cluster {
    log: MemoryAuditLog,
    auth: Auth,
    auth_addr: String,
    db: PostgresServer,
    _storage: tempfile::TempDir,
    runtime: Runtime,
    tunnels: ProxyTunnels,
    tunnel_addr: String,
    proxy_host: VerifiedHost,
}

type Session = (
    tokio_postgres::Client,
    JoinHandle<Result<(), tokio_postgres::Error>>,
);

impl Cluster {
    async fn start() -> Self {
        let log = MemoryAuditLog::new();
        let auth = auth_server(log.clone()).await;
        let listener = Net::Tokio.listen("127.0.0.1:0").await.unwrap();
        let auth_addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(api::serve(
            Arc::clone(&auth),
            listener,
            vec!["auth.svc".into()],
        ));

        // PostgreSQL with a server certificate from the cluster's database CA.
        let files = auth
            .sign_db_server(
                "root",
                &["localhost".into()],
                Duration::from_secs(24 * 3600),
            )
            .await
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

        let storage = tempfile::tempdir().unwrap();
        let runtime = Runtime::from_parts(
            Net::Tokio,
            WallClock::system(),
            Rng::from_seed(21),
            storage.path().to_owned(),
        );
        let (tunnels, tunnel_addr, proxy_host) = proxy(&auth, &runtime).await;
        Cluster {
            log,
            auth,
            auth_addr,
            db,
            _storage: storage,
            runtime,
            tunnels,
            tunnel_addr,
            proxy_host,
        }
    }

    /// An agent that joins with a fresh token, serves "orders" (env = dev static, tier =
    /// gold from a command) and dials the proxy.
    async fn agent_config(&self, timers: AgentTimers) -> AgentServiceConfig {
        let host_ca_pem: String = self
            .auth
            .ca_status(CaKind::Host)
            .await
            .unwrap()
            .trusted
            .iter()
            .map(|ca| ca.to_pem())
            .collect();
        let token = self
            .auth
            .create_join_token("root", TokenKind::Db, Duration::from_secs(60))
            .await
            .unwrap();
        AgentServiceConfig {
            cluster: "svc".into(),
            host_id: "agent-1".into(),
            auth_addr: self.auth_addr.clone(),
            auth_server_name: "auth.svc".into(),
            auth_ca_pem: host_ca_pem,
            host: HostMaterial::JoinToken(token),
            proxies: vec![self.tunnel_addr.clone()],
            databases: vec![DatabaseConfig {
                name: "orders".into(),
                description: "orders db".into(),
                protocol: Protocol::Postgres,
                uri: format!("localhost:{}", self.db.port()),
                ca_cert_file: None,
                tls: DatabaseTls::default(),
                aws_region: None,
                static_labels: BTreeMap::from([("env".into(), "dev".into())]),
                dynamic_labels: BTreeMap::from([(
                    "tier".into(),
                    DynamicLabel {
                        command: vec!["echo".into(), "gold".into()],
                        period: Duration::from_secs(1),
                    },
                )]),
            }],
            timers,
            aws_credentials: None,
        }
    }

    /// Waits until the agent announced "orders" with both labels and holds the tunnel.
    async fn wait_announced(&self) {
        wait_for(
            async || {
                self.auth
                    .servers_of("orders")
                    .await
                    .unwrap()
                    .iter()
                    .any(|s| {
                        s.database.labels.get("tier").map(String::as_str) == Some("gold")
                            && s.database.labels.get("env").map(String::as_str) == Some("dev")
                    })
            },
            "the announcement with both labels",
        )
        .await;
        wait_for(
            async || self.tunnels.candidates("orders").len() == 1,
            "the tunnel",
        )
        .await;
    }

    /// alice's certificate for "orders" as db user alice, the way `postern db login`
    /// gets it: a login certificate, then one routed to the database.
    async fn routed(&self) -> IssuedCert {
        let user_key = PrivateKey::generate().unwrap();
        let source: IpAddr = "127.0.0.1".parse().unwrap();
        let login = self
            .auth
            .login(
                "alice",
                PASSWORD,
                None,
                source,
                &user_key.public_key(),
                None,
            )
            .await
            .unwrap();
        let validator = self.auth.validator().await.unwrap();
        let now = WallClock::system().now();
        let caller = validator
            .verify_identity(login.cert.der(), Purpose::UserLogin, now)
            .unwrap();
        self.auth
            .reissue_for_database(
                &caller,
                "orders",
                "alice",
                "postgres",
                &user_key.public_key(),
            )
            .await
            .unwrap()
    }

    /// A user session, the proxy's way: a channel, a proxy→agent certificate from the
    /// routed one, mutual TLS, then tokio-postgres. Returns the client and its
    /// connection task.
    async fn session(&self, routed: &IssuedCert) -> Result<Session, tokio_postgres::Error> {
        let candidate = self.tunnels.candidates("orders")[0].clone();
        let channel = self
            .tunnels
            .open_channel(candidate.tunnel, &ChannelRequest::session("orders", None))
            .await
            .unwrap();
        let access_key = PrivateKey::generate().unwrap();
        let (_, access) = self
            .auth
            .issue_db_access(&self.proxy_host, routed.der(), &access_key.public_key())
            .await
            .unwrap();
        let tls = mtls_client_config(
            vec![access.der().clone()],
            access_key.to_rustls(),
            &self.auth.ca_status(CaKind::Host).await.unwrap().trusted,
            ring_provider(),
            Arc::new(WallClock::system()),
        )
        .unwrap();
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(ServerName::try_from("agent-1").unwrap(), channel)
            .await
            .unwrap();
        tokio_postgres::Config::new()
            .user("alice")
            .dbname("postgres")
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_raw(stream, tokio_postgres::NoTls)
            .await
            .map(|(client, connection)| (client, tokio::spawn(connection)))
    }
}

/// Runs `service` until the returned sender fires.
fn run(service: AgentService) -> (oneshot::Sender<()>, JoinHandle<Result<(), AgentError>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(service.run(async move {
        let _ = stopped.await;
    }));
    (stop, agent)
}

// The whole service: join, announce with labels (dynamic from a command), tunnel, a
// session authorized by polled roles and audited through the spool to auth, a role
// change that applies to the next session, metrics, and withdrawal at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_service_end_to_end() {
    let cluster = Cluster::start().await;
    let (auth, log) = (&cluster.auth, &cluster.log);
    let config = cluster
        .agent_config(AgentTimers {
            roles_poll_period: Duration::from_millis(200),
            drain_timeout: Duration::from_secs(5),
            ..AgentTimers::default()
        })
        .await;
    let service = AgentService::new(cluster.runtime.clone(), config).unwrap();
    let mut registry = Registry::default();
    service.register_metrics(&mut registry);
    let metrics = service.metrics().clone();
    let (stop, agent) = run(service);

    // Announced, with the dynamic label, and the tunnel is up.
    cluster.wait_announced().await;
    wait_for(
        async || metrics.tunnels_connected.get() == 1,
        "the tunnel metric",
    )
    .await;

    let routed = cluster.routed().await;
    let (client, _connection) = cluster.session(&routed).await.unwrap();
    let rows = client
        .simple_query("select 'through the service'")
        .await
        .unwrap();
    assert!(rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("through the service"))));
    drop(client);
    wait_for(
        async || !query_events(log, "db.session.end").await.is_empty(),
        "the session's events at auth",
    )
    .await;
    let queries = query_events(log, "db.session.query").await;
    assert!(
        queries
            .iter()
            .any(|e| e.fields.get("query").and_then(|q| q.as_str())
                == Some("select 'through the service'")
                && e.user.as_deref() == Some("alice")),
        "{queries:#?}"
    );
    assert_eq!(
        query_events(log, "db.session.start").await[0].code,
        "TDB00I"
    );

    // A role change reaches the agent without a restart: the next session is refused.
    let stricter = ROLES.replace("tier = \"gold\"", "tier = \"platinum\"");
    auth.apply_roles("root", &parse_role_file("r.toml", &stricter).unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let refused = cluster
        .session(&routed)
        .await
        .map(|_| ())
        .expect_err("the role no longer matches");
    let db_error = refused.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_error.code().code(), "28000");
    // The agent counts a refusal once it has sent it, so the client can read the
    // ErrorResponse before the counter moves (a CI run under load did).
    wait_for(
        async || {
            registry_text(&registry)
                .contains("postern_agent_handshake_failures_total{reason=\"access_denied\"} 1")
        },
        "the refusal's metric",
    )
    .await;
    let text = registry_text(&registry);
    assert!(text.contains("postern_agent_handshakes_total 2"), "{text}");
    assert!(
        text.contains("postern_agent_handshake_failures_total{reason=\"access_denied\"} 1"),
        "{text}"
    );
    assert!(text.contains("postern_agent_tunnels_connected 1"), "{text}");
    assert!(
        text.contains("postern_agent_bytes_relayed_total{direction=\"from_client\"}"),
        "{text}"
    );

    // Graceful shutdown withdraws the announcement and flushes the audit spool.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .expect("the agent stops")
        .unwrap()
        .unwrap();
    assert!(auth.servers_of("orders").await.unwrap().is_empty());
    wait_for(
        async || {
            query_events(log, "db.session.start")
                .await
                .iter()
                .any(|e| e.code == "TDB00W")
        },
        "the refusal at auth",
    )
    .await;
}

// A session still open when the drain timeout ends is ended by the agent with FATAL
// 57P01 saying the agent is shutting down and to reconnect (as the proxy does at its
// own shutdown), and its db.session.end still reaches auth. During the drain it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_ends_open_sessions_with_57p01() {
    let cluster = Cluster::start().await;
    let drain_timeout = Duration::from_secs(2);
    let config = cluster
        .agent_config(AgentTimers {
            drain_timeout,
            ..AgentTimers::default()
        })
        .await;
    let (stop, agent) = run(AgentService::new(cluster.runtime.clone(), config).unwrap());
    cluster.wait_announced().await;
    let routed = cluster.routed().await;
    let (client, connection) = cluster.session(&routed).await.unwrap();
    client.simple_query("select 1").await.unwrap();

    stop.send(()).unwrap();
    let stopping = tokio::time::Instant::now();
    client
        .simple_query("select 'during the drain'")
        .await
        .expect("sessions keep working during the drain");
    let ended = tokio::time::timeout(Duration::from_secs(20), connection)
        .await
        .expect("the session is ended")
        .unwrap();
    let waited = stopping.elapsed();
    let error = ended.expect_err("the session ends with an ErrorResponse");
    let db = error.as_db_error().expect("a PostgreSQL ErrorResponse");
    assert_eq!((db.severity(), db.code().code()), ("FATAL", "57P01"));
    assert_eq!(db.message(), SHUTDOWN_MESSAGE);
    assert!(
        db.message()
            .contains("Postern database agent is shutting down")
            && db.message().contains("reconnect"),
        "{}",
        db.message()
    );
    assert!(
        waited >= drain_timeout - Duration::from_millis(100),
        "ended after {waited:?}, before the drain timeout"
    );
    tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .expect("the agent stops")
        .unwrap()
        .unwrap();
    wait_for(
        async || {
            query_events(&cluster.log, "db.session.end")
                .await
                .iter()
                .any(|e| e.error.as_deref() == Some("the database agent shut down"))
        },
        "the session's end at auth",
    )
    .await;
    let queries = query_events(&cluster.log, "db.session.query").await;
    assert!(
        queries
            .iter()
            .any(|e| e.fields.get("query").and_then(|q| q.as_str())
                == Some("select 'during the drain'")),
        "{queries:#?}"
    );
}

fn registry_text(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

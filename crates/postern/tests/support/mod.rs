//! An in-process cluster for the client tests: the real auth server (API over mutual
//! TLS), the real proxy service (PostgreSQL port, TLS-routing web port passing the API
//! through, tunnel port), one agent (reverse tunnel, sessions, cancel) and a real
//! PostgreSQL that accepts only certificates from the cluster's database CA.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use postern_agent::cancel::{CANCEL_TIMEOUT_DEFAULT, serve_cancel};
use postern_agent::session::{LocalDbCa, RoleMap, ServedDatabase, SessionConfig, SessionService};
use postern_agent::upstream::postgres::PostgresTarget;
use postern_agent::upstream::{TlsMode, UpstreamTls};
use postern_auth::audit::MemoryAuditLog;
use postern_auth::backend::{Backend, MemoryBackend};
use postern_auth::database::{Database, Protocol};
use postern_auth::server::{AuthConfig, AuthServer};
use postern_auth::user::{PasswordCost, Traits};
use postern_pki::tls::ring_provider;
use postern_pki::{
    CaPem, CertAuthority, HostIdentity, HostRole, PrivateKey, UnixTime, Validator, VerifiedIdentity,
};
use postern_proxy::dispatch::DbAccessSigner;
use postern_proxy::{Listen, ProxyLimits, ProxyService, ProxyServiceConfig};
use postern_rt::{Net, Rng, Runtime, WallClock};
use postern_testkit::{PostgresOptions, PostgresServer, ServerTls};
use postern_tunnel::{Agent, AgentConfig, ChannelKind};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::task::JoinHandle;

pub const CLUSTER: &str = "e2e";
pub const PASSWORD: &str = "correct horse battery staple";
const HOUR: Duration = Duration::from_secs(3600);

const ROLES: &str = r#"
[[role]]
name = "dev"
allow.db_labels = { env = "dev" }
allow.db_users = ["{{internal.db_users}}"]
allow.db_names = ["*"]
"#;

fn at(offset_secs: i64) -> UnixTime {
    let now = WallClock::system().now().as_secs();
    UnixTime::since_unix_epoch(Duration::from_secs(now.saturating_add_signed(offset_secs)))
}

/// The CA of `kind` as the auth server stored it (the test plays the other services,
/// which in production get their certificates from the auth API).
async fn stored_ca(backend: &MemoryBackend, kind: &str) -> CertAuthority {
    let item = backend.get(&format!("/cas/{kind}")).await.unwrap().unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&item.value).unwrap();
    let current = &stored["current"];
    CertAuthority::from_pem(&CaPem {
        cert: current["cert"].as_str().unwrap().to_owned(),
        key: current["key"].as_str().unwrap().to_owned(),
        ssh_key: current["ssh_key"].as_str().map(str::to_owned),
    })
    .unwrap()
}

/// Signs proxy→agent certificates with the user CA, as the auth service does.
struct LocalSigner(Arc<CertAuthority>);

impl DbAccessSigner for LocalSigner {
    async fn sign(
        &self,
        user: &VerifiedIdentity,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        let key = PrivateKey::generate().map_err(|e| e.to_string())?;
        let (_, cert) = self
            .0
            .issue_db_access(user, &key.public_key(), at(-60), Duration::from_secs(600))
            .map_err(|e| e.to_string())?;
        Ok((vec![cert.der().clone()], key.to_rustls()))
    }
}

fn host(id: &str, role: HostRole, names: &[&str]) -> HostIdentity {
    HostIdentity {
        host_id: id.to_owned(),
        role,
        cluster: CLUSTER.to_owned(),
        names: names.iter().map(|n| (*n).to_owned()).collect(),
        expires: at(24 * 3600),
    }
}

/// A running cluster. Dropping it stops PostgreSQL; tasks end with the test runtime.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    /// The proxy's web port, `localhost:PORT`: what users pass to `--proxy`.
    pub web_addr: String,
    /// The proxy's PostgreSQL port, `localhost:PORT`.
    pub postgres_addr: String,
    /// The cluster's host CA (what an administrator hands to users for `--ca-file`).
    pub host_ca_file: PathBuf,
    pub database: PostgresServer,
    /// bob's TOTP generator (bob has the same password as alice).
    pub bob_totp: postern_auth::totp::Totp,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl TestCluster {
    /// Starts everything; returns when the agent's tunnel is up at the proxy.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = WallClock::system();
        let runtime = Runtime::from_parts(
            Net::Tokio,
            clock.clone(),
            Rng::from_seed(11),
            dir.path().to_owned(),
        );
        let mut tasks = Vec::new();

        // Auth: users, roles, the registry, the API on 127.0.0.1.
        let backend = MemoryBackend::new(Arc::new(clock.clone()));
        let auth = Arc::new(
            AuthServer::new(
                backend.clone(),
                MemoryAuditLog::new(),
                clock.clone(),
                Rng::from_seed(12),
                AuthConfig {
                    cluster: CLUSTER.to_owned(),
                    password_cost: PasswordCost {
                        memory_kib: 64,
                        passes: 1,
                    },
                    login_limits: Default::default(),
                },
            )
            .unwrap(),
        );
        auth.ensure_cas().await.unwrap();
        let roles = postern_auth::role::parse_role_file("roles.toml", ROLES).unwrap();
        auth.apply_roles("test", &roles).await.unwrap();
        auth.create_user(
            "test",
            "alice",
            vec!["dev".to_owned()],
            Traits {
                db_users: vec!["alice".to_owned()],
                ..Default::default()
            },
            Some(PASSWORD),
            false,
        )
        .await
        .unwrap();
        // bob has a second factor.
        let bob_totp = auth
            .create_user(
                "test",
                "bob",
                vec!["dev".to_owned()],
                Traits {
                    db_users: vec!["bob".to_owned()],
                    ..Default::default()
                },
                Some(PASSWORD),
                true,
            )
            .await
            .unwrap()
            .expect("a TOTP generator was asked for");
        let api_listener = Net::Tokio.listen("127.0.0.1:0").await.unwrap();
        let api_addr = api_listener.local_addr().unwrap();
        tasks.push(tokio::spawn({
            let auth = auth.clone();
            async move {
                let _ = postern_auth::api::serve(auth, api_listener, vec!["localhost".to_owned()])
                    .await;
            }
        }));
        let user_ca = Arc::new(stored_ca(&backend, "user").await);
        let host_ca = stored_ca(&backend, "host").await;
        let db_ca = Arc::new(stored_ca(&backend, "db").await);
        let host_ca_file = dir.path().join("host-ca.pem");
        std::fs::write(&host_ca_file, host_ca.trusted().to_pem()).unwrap();

        // PostgreSQL: TLS from the db CA, client certificates from the db CA only.
        let files = db_ca
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
        database
            .psql(
                "postgres",
                "create role alice login; create table notes (id int, body text); \
                 insert into notes values (1, 'hello'); grant all on notes to alice",
            )
            .unwrap();
        let orders = Database {
            name: "orders".to_owned(),
            description: "orders database".to_owned(),
            protocol: Protocol::Postgres,
            uri: format!("localhost:{}", database.port()),
            labels: BTreeMap::from([("env".to_owned(), "dev".to_owned())]),
        };
        auth.announce_database("agent-1", &orders, Duration::from_secs(1800))
            .await
            .unwrap();

        // A production database the "dev" role does not match: never listed.
        let billing = Database {
            name: "billing".to_owned(),
            description: "invoices".to_owned(),
            protocol: Protocol::Postgres,
            uri: format!("localhost:{}", database.port()),
            labels: BTreeMap::from([("env".to_owned(), "prod".to_owned())]),
        };
        auth.announce_database("agent-1", &billing, Duration::from_secs(1800))
            .await
            .unwrap();

        // Proxy.
        let host_key = PrivateKey::generate().unwrap();
        let host_cert = host_ca
            .issue_host(
                &host("proxy-1", HostRole::Proxy, &["localhost"]),
                &host_key.public_key(),
                at(-60),
            )
            .unwrap();
        let ssh_key = postern_pki::ssh::generate_ssh_key().unwrap();
        let ssh_cert = host_ca
            .issue_ssh_host_cert(
                &host("proxy-1", HostRole::Proxy, &["localhost"]),
                ssh_key.public_key(),
                at(-60),
            )
            .unwrap();
        let config = ProxyServiceConfig {
            cluster: CLUSTER.to_owned(),
            listen: Listen {
                postgres: "127.0.0.1:0".to_owned(),
                web: Some("127.0.0.1:0".to_owned()),
                tunnel: "127.0.0.1:0".to_owned(),
            },
            auth_api_addr: Some(api_addr.to_string()),
            host_cert,
            host_key,
            ssh_key,
            ssh_cert,
            user_cas: vec![user_ca.trusted().clone()],
            host_cas: vec![host_ca.trusted().clone()],
            host_ca_ssh_keys: vec![host_ca.ssh_public_key().unwrap()],
            limits: ProxyLimits::default(),
        };
        let mut proxy = ProxyService::new(&runtime, config, LocalSigner(user_ca.clone())).unwrap();
        let addrs = proxy.bind().await.unwrap();
        let tunnels = proxy.tunnels().clone();
        tasks.push(tokio::spawn(async move {
            let _ = proxy.run(std::future::pending()).await;
        }));

        // Agent: tunnel to the proxy, sessions and cancel requests for "orders".
        let agent_key = PrivateKey::generate().unwrap();
        let agent_cert = host_ca
            .issue_host(
                &host("agent-1", HostRole::Agent, &["agent-1"]),
                &agent_key.public_key(),
                at(-60),
            )
            .unwrap();
        let tls = postern_pki::tls::mtls_server_config(
            vec![agent_cert.der().clone()],
            agent_key.to_rustls(),
            &[user_ca.trusted().clone()],
            ring_provider(),
            Arc::new(clock.clone()),
        )
        .unwrap();
        let served = ServedDatabase {
            database: orders,
            target: PostgresTarget {
                host: "localhost".to_owned(),
                port: database.port(),
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
        let databases = Arc::new(vec![served.clone()]);
        let session_config = SessionConfig {
            cluster: CLUSTER.to_owned(),
            tls,
            validator: Validator::new([user_ca.trusted().clone()]),
            databases: vec![served],
            limits: Default::default(),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        };
        let (audit_tx, mut audit_rx) = tokio::sync::mpsc::channel(4096);
        tasks.push(tokio::spawn(async move {
            while audit_rx.recv().await.is_some() {}
        }));
        let sessions = Arc::new(SessionService::new(
            &runtime,
            session_config,
            RoleMap::new(roles),
            LocalDbCa::new(db_ca.clone(), clock.clone()),
            audit_tx,
        ));
        let agent_ssh_key = postern_pki::ssh::generate_ssh_key().unwrap();
        let agent_ssh_cert = host_ca
            .issue_ssh_user_cert(
                &host("agent-1", HostRole::Agent, &[]),
                agent_ssh_key.public_key(),
                at(-60),
            )
            .unwrap();
        let announced = tokio::sync::watch::channel(vec!["orders".to_owned()]).1;
        let agent_config = AgentConfig::new(
            "agent-1".to_owned(),
            agent_ssh_key,
            agent_ssh_cert,
            vec![host_ca.ssh_public_key().unwrap()],
            announced,
        );
        let (agent, mut channels) = Agent::new(&runtime, agent_config).unwrap();
        let (proxies_tx, proxies) =
            tokio::sync::watch::channel(vec![format!("localhost:{}", addrs.tunnel.port())]);
        tasks.push(tokio::spawn(async move {
            let _keep = proxies_tx;
            agent.run(proxies).await;
        }));
        let net = *runtime.net();
        tasks.push(tokio::spawn(async move {
            let mut running = tokio::task::JoinSet::new();
            while let Some(channel) = channels.recv().await {
                let sessions = sessions.clone();
                let databases = databases.clone();
                running.spawn(async move {
                    if channel.kind() == ChannelKind::Cancel {
                        let _ =
                            serve_cancel(channel, &databases, &net, CANCEL_TIMEOUT_DEFAULT).await;
                    } else {
                        let _ = sessions.serve(channel).await;
                    }
                });
            }
        }));
        for _ in 0..200 {
            if !tunnels.candidates("orders").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !tunnels.candidates("orders").is_empty(),
            "the agent's tunnel never came up"
        );
        let web = addrs.web.expect("the web port was asked for");
        TestCluster {
            dir,
            web_addr: format!("localhost:{}", web.port()),
            postgres_addr: format!("localhost:{}", addrs.postgres.port()),
            host_ca_file,
            database,
            bob_totp,
            tasks,
        }
    }
}

/// A user's machine: a temporary HOME, and the real `postern` binary run in it.
pub struct UserHome {
    pub home: tempfile::TempDir,
}

impl UserHome {
    pub fn new() -> Self {
        Self {
            home: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.home.path()
    }

    /// A command with only this HOME and a PATH: nothing of the developer's leaks in.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env_clear()
            .env("HOME", self.path())
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    pub fn postern(&self) -> Command {
        self.command(env!("CARGO_BIN_EXE_postern"))
    }

    /// Runs `postern ARGS` with `stdin` (blocking; call from spawn_blocking).
    pub fn run(&self, args: &[&str], stdin: &str) -> Output {
        let mut command = self.postern();
        command.args(args).stdin(Stdio::piped());
        let mut child = command.spawn().unwrap();
        {
            use std::io::Write;
            let mut input = child.stdin.take().unwrap();
            input.write_all(stdin.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }
}

/// stdout, or a panic with both streams when the command failed.
pub fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// stderr of a command that must fail.
pub fn fails(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "command should have failed:\nstdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

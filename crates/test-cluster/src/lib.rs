//! One in-process Postern cluster for tests, built the same way everywhere: the three CAs
//! ([`TestCluster`]), a PostgreSQL that accepts only the database CA's client
//! certificates, an agent's session service in front of it, the proxy (as a service or
//! as its tunnel server alone), agents' tunnels, and clients holding user certificates.
//!
//! Each piece is one call; the tests compose them and keep what they check to themselves.
//! Everything runs on the real network (loopback), the system clock and real
//! PostgreSQL (see `postern-testkit`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use postern_agent::session::{
    CredentialSource, LocalDbCa, RoleMap, ServedDatabase, SessionConfig, SessionEnd, SessionError,
    SessionService,
};
use postern_agent::upstream::postgres::PostgresTarget;
use postern_agent::upstream::{TlsMode, UpstreamTls};
use postern_auth::audit::AuditEvent;
use postern_auth::database::{Database, Protocol};
use postern_auth::role::parse_role_file;
use postern_pki::tls::{mtls_client_config, mtls_server_config, ring_provider};
use postern_pki::{
    CaKind, CertAuthority, DbProtocol, DbRoute, HostIdentity, HostRole, Identity, IssuedCert,
    PrivateKey, UnixTime, Usage, Validator, VerifiedIdentity,
};
use postern_proxy::dispatch::DbAccessSigner;
use postern_proxy::{Listen, ProxyLimits, ProxyServiceConfig};
use postern_rt::{Connection, Net, Rng, Runtime, WallClock};
use postern_testkit::{PostgresOptions, PostgresServer, ServerTls};
use postern_tunnel::{Agent, AgentConfig, IncomingChannel, ProxyConfig, ProxyTunnels};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::DuplexStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

pub const HOUR: Duration = Duration::from_secs(3600);

/// The host name the proxy's certificates carry, and the one clients dial it by.
pub const PROXY_HOST: &str = "localhost";

/// The role the proxy tests' users hold: their own db users (trait `db_users`) on
/// databases labelled env=dev, any database name.
pub const DEV_ROLE: &str = "[[role]]\nname = \"dev\"\nallow.db_labels = { env = \"dev\" }\nallow.db_users = [\"{{internal.db_users}}\"]\nallow.db_names = [\"*\"]\n";

/// The system clock's time now.
pub fn now() -> UnixTime {
    WallClock::system().now()
}

/// `by` from now.
pub fn later(by: Duration) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(now().as_secs() + by.as_secs()))
}

/// `offset_secs` from now (negative: in the past).
pub fn at(offset_secs: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(
        now().as_secs().saturating_add_signed(offset_secs),
    ))
}

/// A cluster's three CAs (valid from an hour ago for two days) and a folder for key
/// files. Every certificate it issues is valid from a minute ago.
#[derive(Debug)]
pub struct TestCluster {
    /// The cluster name in every certificate.
    pub name: String,
    pub user_ca: CertAuthority,
    pub host_ca: CertAuthority,
    pub db_ca: CertAuthority,
    pub dir: tempfile::TempDir,
}

impl TestCluster {
    pub fn new(name: &str) -> Self {
        let start = at(-3600);
        let ca = |kind| CertAuthority::generate(kind, name, start, 48 * HOUR).unwrap();
        Self {
            name: name.to_owned(),
            user_ca: ca(CaKind::User),
            host_ca: ca(CaKind::Host),
            db_ca: ca(CaKind::Db),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A host of this cluster, valid for a day.
    pub fn host(&self, id: &str, role: HostRole, names: &[&str]) -> HostIdentity {
        HostIdentity {
            host_id: id.to_owned(),
            role,
            cluster: self.name.clone(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            expires: at(24 * 3600),
        }
    }

    /// Real network, system clock, an RNG from `seed`, state in the cluster's folder.
    pub fn runtime(&self, seed: u64) -> Runtime {
        Runtime::from_parts(
            Net::Tokio,
            WallClock::system(),
            Rng::from_seed(seed),
            self.dir.path().to_owned(),
        )
    }

    // ---- PostgreSQL and the agent's session service ----

    /// PostgreSQL with `options`, TLS from the database CA, taking client certificates
    /// from the database CA (unless `options.tcp_auth` says otherwise).
    pub fn start_postgres(&self, options: PostgresOptions) -> PostgresServer {
        let files = self
            .db_ca
            .sign_db_server(&["localhost".to_owned()], at(-60), 24 * HOUR)
            .unwrap();
        PostgresServer::start(PostgresOptions {
            tls: Some(ServerTls {
                cert_pem: files.server_crt,
                key_pem: files.server_key,
                client_ca_pem: files.server_cas,
            }),
            ..options
        })
        .unwrap()
    }

    /// `database` served as "orders" (labels env=dev), reached with verify-full TLS
    /// against the database CA.
    pub fn served_orders(&self, database: &PostgresServer) -> ServedDatabase {
        ServedDatabase {
            database: Database {
                name: "orders".to_owned(),
                description: "orders database".to_owned(),
                protocol: Protocol::Postgres,
                uri: format!("localhost:{}", database.port()),
                labels: BTreeMap::from([("env".to_owned(), "dev".to_owned())]),
            },
            target: PostgresTarget {
                host: "localhost".to_owned(),
                port: database.port(),
                tls: UpstreamTls::new(
                    TlsMode::VerifyFull,
                    self.db_ca.trusted().to_pem().as_bytes(),
                    None,
                    ring_provider(),
                    Arc::new(WallClock::system()),
                )
                .unwrap(),
            },
        }
    }

    /// The session settings of agent `agent_id` serving `databases`: its host
    /// certificate for the proxy→agent TLS, the user CA, default limits, 10 s timeouts.
    pub fn session_config(&self, agent_id: &str, databases: Vec<ServedDatabase>) -> SessionConfig {
        let key = PrivateKey::generate().unwrap();
        let cert = self
            .host_ca
            .issue_host(
                &self.host(agent_id, HostRole::Agent, &[agent_id]),
                &key.public_key(),
                at(-60),
            )
            .unwrap();
        let tls = mtls_server_config(
            vec![cert.der().clone()],
            key.to_rustls(),
            &[self.user_ca.trusted().clone()],
            ring_provider(),
            Arc::new(WallClock::system()),
        )
        .unwrap();
        SessionConfig {
            cluster: self.name.clone(),
            tls,
            validator: Validator::new([self.user_ca.trusted().clone()]),
            databases,
            limits: Default::default(),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// Database credentials from this cluster's database CA.
    pub fn local_db_ca(&self) -> LocalDbCa {
        let db_ca = CertAuthority::from_pem(&self.db_ca.to_pem().unwrap()).unwrap();
        LocalDbCa::new(Arc::new(db_ca), WallClock::system())
    }

    /// An agent's session service with `config`, the roles of `roles_toml` and
    /// `credentials`, auditing into `audit`.
    pub fn session_service<C: CredentialSource>(
        &self,
        runtime: &Runtime,
        config: SessionConfig,
        roles_toml: &str,
        credentials: C,
        audit: mpsc::Sender<AuditEvent>,
    ) -> Arc<SessionService<RoleMap, C>> {
        let roles = RoleMap::new(parse_role_file("roles.toml", roles_toml).unwrap());
        Arc::new(SessionService::new(
            runtime,
            config,
            roles,
            credentials,
            audit,
        ))
    }

    // ---- Clients ----

    /// Alice with role dev and no traits, routed to "orders" as db user alice on
    /// database postgres, her certificate for `usage` until `expires`.
    pub fn alice(&self, usage: Usage, expires: UnixTime) -> Identity {
        Identity {
            user: "alice".to_owned(),
            roles: vec!["dev".to_owned()],
            traits: BTreeMap::new(),
            route: Some(DbRoute {
                service: "orders".to_owned(),
                protocol: DbProtocol::Postgres,
                db_user: "alice".to_owned(),
                db_name: "postgres".to_owned(),
            }),
            allowed_db_names: vec![],
            allowed_db_users: vec![],
            usage,
            cluster: self.name.clone(),
            client_ip: None,
            expires,
        }
    }

    /// A certificate for `identity` from the user CA, and its key.
    pub fn user_cert(&self, identity: &Identity) -> (IssuedCert, PrivateKey) {
        let key = PrivateKey::generate().unwrap();
        let cert = self
            .user_ca
            .issue_identity(identity, &key.public_key(), at(-60))
            .unwrap();
        (cert, key)
    }

    /// [`TestCluster::user_cert`] written to `<stem>.crt` and `<stem>.key` (mode 0600)
    /// in the cluster's folder, for psql.
    pub fn user_cert_files(&self, identity: &Identity, stem: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.user_cert(identity);
        let crt = self.dir.path().join(format!("{stem}.crt"));
        let pem = self.dir.path().join(format!("{stem}.key"));
        std::fs::write(&crt, cert.to_pem()).unwrap();
        std::fs::write(&pem, key.to_pem()).unwrap();
        std::fs::set_permissions(&pem, std::fs::Permissions::from_mode(0o600)).unwrap();
        (crt, pem)
    }

    /// A TLS client holding a certificate for `identity` that trusts the host CA,
    /// offering `alpn` if given.
    pub fn client_tls(
        &self,
        identity: &Identity,
        alpn: Option<&[u8]>,
    ) -> tokio_rustls::TlsConnector {
        let (cert, key) = self.user_cert(identity);
        let config = mtls_client_config(
            vec![cert.der().clone()],
            key.to_rustls(),
            &[self.host_ca.trusted().clone()],
            ring_provider(),
            Arc::new(WallClock::system()),
        )
        .unwrap();
        let mut config = (*config).clone();
        if let Some(alpn) = alpn {
            config.alpn_protocols = vec![alpn.to_vec()];
        }
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// Plays the proxy toward agent `agent_id`: TLS over `stream` with a certificate for
    /// `identity`, as the proxy does on a user's behalf.
    pub async fn tls_to_agent(
        &self,
        stream: DuplexStream,
        identity: &Identity,
        agent_id: &str,
    ) -> TlsStream<DuplexStream> {
        self.client_tls(identity, None)
            .connect(ServerName::try_from(agent_id.to_owned()).unwrap(), stream)
            .await
            .unwrap()
    }

    // ---- The proxy and the tunnels ----

    /// The proxy service's settings: host certificates (TLS and SSH) for `proxy-1` named
    /// [`PROXY_HOST`], this cluster's CAs, and `listen`, `auth_api_addr`, `limits`.
    pub fn proxy_config(
        &self,
        listen: Listen,
        auth_api_addr: Option<String>,
        limits: ProxyLimits,
    ) -> ProxyServiceConfig {
        let (host_cert, host_key) = self.proxy_host_cert();
        let (ssh_key, ssh_cert) = self.proxy_ssh_cert();
        ProxyServiceConfig {
            cluster: self.name.clone(),
            listen,
            auth_api_addr,
            host_cert,
            host_key,
            ssh_key,
            ssh_cert,
            user_cas: vec![self.user_ca.trusted().clone()],
            host_cas: vec![self.host_ca.trusted().clone()],
            host_ca_ssh_keys: vec![self.host_ca.ssh_public_key().unwrap()],
            limits,
        }
    }

    /// The proxy's TLS host certificate (`proxy-1`, named [`PROXY_HOST`]) and its key.
    pub fn proxy_host_cert(&self) -> (IssuedCert, PrivateKey) {
        let key = PrivateKey::generate().unwrap();
        let cert = self
            .host_ca
            .issue_host(
                &self.host("proxy-1", HostRole::Proxy, &[PROXY_HOST]),
                &key.public_key(),
                at(-60),
            )
            .unwrap();
        (cert, key)
    }

    /// The proxy's tunnel server alone (default limits), as `proxy-1` named
    /// [`PROXY_HOST`]; serve it with [`ProxyTunnels::serve`].
    pub fn proxy_tunnels(&self, runtime: &Runtime) -> ProxyTunnels {
        let (ssh_key, ssh_cert) = self.proxy_ssh_cert();
        let ca_keys = vec![self.host_ca.ssh_public_key().unwrap()];
        ProxyTunnels::new(runtime, ProxyConfig::new(ssh_key, ssh_cert, ca_keys)).unwrap()
    }

    fn proxy_ssh_cert(
        &self,
    ) -> (
        postern_pki::ssh::ssh_key::PrivateKey,
        postern_pki::ssh::ssh_key::Certificate,
    ) {
        let key = postern_pki::ssh::generate_ssh_key().unwrap();
        let cert = self
            .host_ca
            .issue_ssh_host_cert(
                &self.host("proxy-1", HostRole::Proxy, &[PROXY_HOST]),
                key.public_key(),
                at(-60),
            )
            .unwrap();
        (key, cert)
    }

    /// Agent `agent_id`'s tunnels: it dials `proxy` (host:port) and announces `databases`.
    /// The task runs until aborted; channels the proxy opens arrive on the receiver.
    pub fn start_agent_tunnel(
        &self,
        runtime: &Runtime,
        agent_id: &str,
        databases: Vec<String>,
        proxy: String,
    ) -> (JoinHandle<()>, mpsc::Receiver<IncomingChannel>) {
        let ssh_key = postern_pki::ssh::generate_ssh_key().unwrap();
        let ssh_cert = self
            .host_ca
            .issue_ssh_user_cert(
                &self.host(agent_id, HostRole::Agent, &[]),
                ssh_key.public_key(),
                at(-60),
            )
            .unwrap();
        let config = AgentConfig::new(
            agent_id.to_owned(),
            ssh_key,
            ssh_cert,
            vec![self.host_ca.ssh_public_key().unwrap()],
            watch::channel(databases).1,
        );
        let (agent, channels) = Agent::new(runtime, config).unwrap();
        let (proxies_tx, proxies) = watch::channel(vec![proxy]);
        let task = tokio::spawn(async move {
            let _keep = proxies_tx;
            agent.run(proxies).await;
        });
        (task, channels)
    }
}

/// Signs proxy→agent certificates with the user CA, as the auth service does.
#[derive(Debug)]
pub struct LocalSigner(pub Arc<TestCluster>);

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

/// Plays the proxy's tunnel toward `service`: a channel for `database` from a client at
/// 203.0.113.7:50123, over an in-memory pipe. The proxy's end, and the agent's task.
pub fn open_channel<C: CredentialSource + 'static>(
    service: &Arc<SessionService<RoleMap, C>>,
    database: &str,
) -> (DuplexStream, JoinHandle<Result<SessionEnd, SessionError>>) {
    // Larger than the tests' queries and answers: TLS records must not stall in a full pipe.
    let (proxy_end, agent_end) = tokio::io::duplex(64 * 1024);
    let channel = IncomingChannel {
        proxy: "proxy-1".to_owned(),
        database: database.to_owned(),
        client_addr: "203.0.113.7".to_owned(),
        client_port: 50123,
        kind: Default::default(),
        connection: Connection::new(agent_end),
    };
    let service = service.clone();
    (
        proxy_end,
        tokio::spawn(async move { service.serve(channel).await }),
    )
}

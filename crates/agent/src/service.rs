//! The database service as one runnable service: [`AgentService::new`], then
//! [`AgentService::register_metrics`], then [`AgentService::run`] until shutdown.
//!
//! ```text
//! start ─► host certificate (join token, saved material, or given material)
//!       ─► CAs and an SSH tunnel certificate from auth ─► roles cache (polled)
//!       ─► audit spool (writer + shipper) ─► announce every database (with labels)
//!       ─► tunnels to every proxy ─► each channel: SessionService::serve, or
//!          cancel::serve_cancel for channels of kind Cancel
//! shutdown ─► withdraw announcements ─► refuse new channels ─► drain sessions
//!          ─► at the drain timeout, end the rest (FATAL 57P01 to each client, audited)
//!          ─► close tunnels ─► flush the audit spool to auth (bounded wait)
//! ```
//!
//! Everything goes through the runtime seam: its network for auth, proxies and
//! databases, its wall clock for certificates, its RNG for jitter and ids, its storage
//! root for the host material and the audit spool. Timers are `tokio::time`.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_credential_types::provider::SharedCredentialsProvider;
use base64::Engine as _;
use postern_auth::api::{
    AnnounceRequest, DbClientRequest, JoinRequest, KeepAliveRequest, SshCertRequest,
    WithdrawRequest,
};
use postern_auth::audit::AuditEvent;
use postern_auth::client::AuthClient;
use postern_auth::database::{Database, Protocol};
use postern_auth::role::Role;
use postern_auth::server::TokenKind;
use postern_pki::ssh::ssh_key;
use postern_pki::tls::ring_provider;
use postern_pki::{CaKind, PrivateKey, TrustedCa, Validator};
use postern_rt::Runtime;
use postern_tunnel::{Agent, AgentConfig, ChannelKind, IncomingChannel};
use prometheus_client::registry::Registry;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::cancel::CANCEL_TIMEOUT_DEFAULT;
use crate::metrics::{ActiveGuard, AgentMetrics, Counted};
use crate::session::{
    CredentialSource, LookupError, RoleSource, ServedDatabase, SessionConfig, SessionService,
};
use crate::spool::{self, SPOOL_SIZE_MAX_DEFAULT, Spool};
use crate::upstream::postgres::{CONNECT_TIMEOUT_DEFAULT, Credential, PostgresTarget};
use crate::upstream::{TlsMode, UpstreamTls};

/// Lease of an announcement; kept alive every [`KEEPALIVE_PERIOD_DEFAULT`].
pub const ANNOUNCE_TTL_DEFAULT: Duration = Duration::from_secs(10 * 60);
/// How often announcements are kept alive.
pub const KEEPALIVE_PERIOD_DEFAULT: Duration = Duration::from_secs(60);
/// How often the roles are fetched from auth (a changed version refreshes the cache).
pub const ROLES_POLL_PERIOD_DEFAULT: Duration = Duration::from_secs(1);
/// How long shutdown waits for open sessions to end.
pub const DRAIN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// After the drain timeout, how long the sessions still open have to finish the
/// database's message in flight ([`crate::relay::CLOSE_GRACE`]), tell their clients
/// (FATAL 57P01) and send their `db.session.end` before their tasks are stopped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long shutdown waits for the audit spool to reach auth.
pub const AUDIT_FLUSH_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Events queued between sessions and the spool writer.
pub const AUDIT_QUEUE_LEN: usize = 4096;
/// Longest a dynamic label command may run.
pub const LABEL_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest period of a dynamic label command.
pub const LABEL_PERIOD_MIN: Duration = Duration::from_secs(1);
/// Longest label value kept from a command's output.
pub const LABEL_VALUE_SIZE_MAX: usize = 256;
/// First and longest wait between start-up attempts when auth is unreachable.
pub const STARTUP_RETRY_MIN: Duration = Duration::from_millis(250);
pub const STARTUP_RETRY_MAX: Duration = Duration::from_secs(10);

const HOST_DIR: &str = "agent-host";

/// Opens the audit spool under the runtime's storage root. Events written before a
/// crash or restart and not yet acknowledged by auth are found again and shipped.
pub fn open_audit_spool(runtime: &Runtime, size_max: u64) -> Result<Spool, spool::SpoolError> {
    #[cfg(feature = "planted-bugs")]
    if postern_rt::planted::active(postern_rt::planted::Bug::AgentDropsSpoolOnRestart) {
        // The planted bug: "start clean" (the spool's directory, `spool::SPOOL_DIR`).
        let _ = std::fs::remove_dir_all(runtime.storage_root().join("audit-spool"));
    }
    Spool::open(runtime.storage_root(), size_max)
}

/// How the agent gets its host certificate.
#[derive(Clone)]
#[non_exhaustive]
pub enum HostMaterial {
    /// Join with this single-use token (`postern admin tokens add --type db`). The
    /// certificate and key are saved under the storage root and reused on restart.
    JoinToken(String),
    /// A host certificate (role agent) and its key, PEM.
    Ready { cert_pem: String, key_pem: String },
}

impl std::fmt::Debug for HostMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::JoinToken(_) => f.write_str("JoinToken(<redacted>)"),
            Self::Ready { .. } => f.write_str("Ready { .. }"),
        }
    }
}

/// `tls` of a database: how its certificate is checked.
#[derive(Clone, Debug, Default)]
pub struct DatabaseTls {
    pub mode: TlsMode,
    /// The name to check instead of the host in `uri`.
    pub server_name: Option<String>,
}

/// A label whose value is the trimmed output of a command, rerun every `period`.
#[derive(Clone, Debug)]
pub struct DynamicLabel {
    /// Program and arguments (no shell).
    pub command: Vec<String>,
    pub period: Duration,
}

/// One database the agent serves, as configured.
#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    pub name: String,
    pub description: String,
    pub protocol: Protocol,
    /// `host:port` of the database.
    pub uri: String,
    /// CA bundle (PEM) to verify the database with; default: the cluster's database CA
    /// (self-hosted databases with `postern admin auth sign --format db` certificates).
    pub ca_cert_file: Option<PathBuf>,
    pub tls: DatabaseTls,
    /// `aws.region`: set for RDS/Aurora with IAM auth (the agent sends an IAM token as
    /// the password instead of a client certificate).
    pub aws_region: Option<String>,
    pub static_labels: BTreeMap<String, String>,
    pub dynamic_labels: BTreeMap<String, DynamicLabel>,
}

/// Timers and limits, with defaults.
#[derive(Clone, Debug)]
pub struct AgentTimers {
    pub announce_ttl: Duration,
    pub keepalive_period: Duration,
    pub roles_poll_period: Duration,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    pub audit_flush_timeout: Duration,
    /// Most bytes of audit events on disk before new sessions are refused.
    pub audit_spool_size_max: u64,
}

impl Default for AgentTimers {
    fn default() -> Self {
        Self {
            announce_ttl: ANNOUNCE_TTL_DEFAULT,
            keepalive_period: KEEPALIVE_PERIOD_DEFAULT,
            roles_poll_period: ROLES_POLL_PERIOD_DEFAULT,
            handshake_timeout: crate::session::HANDSHAKE_TIMEOUT_DEFAULT,
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
            drain_timeout: DRAIN_TIMEOUT_DEFAULT,
            audit_flush_timeout: AUDIT_FLUSH_TIMEOUT_DEFAULT,
            audit_spool_size_max: SPOOL_SIZE_MAX_DEFAULT,
        }
    }
}

/// Everything the database service needs.
#[derive(Clone)]
pub struct AgentServiceConfig {
    /// Cluster name (written into audit events).
    pub cluster: String,
    /// This agent's host id (unique in the cluster; its SSH user and registry key).
    pub host_id: String,
    /// The auth API, `host:port`.
    pub auth_addr: String,
    /// The name on the auth server's certificate.
    pub auth_server_name: String,
    /// The cluster's host CA certificate(s), PEM: the auth server's certificate must
    /// chain to one of them.
    pub auth_ca_pem: String,
    pub host: HostMaterial,
    /// The proxies' tunnel addresses (`host:port`); one tunnel to each.
    pub proxies: Vec<String>,
    pub databases: Vec<DatabaseConfig>,
    pub timers: AgentTimers,
    /// AWS credentials for databases with `aws_region` (RDS IAM auth). `None`: from the
    /// environment ([`crate::rds::EnvironmentCredentials`]).
    pub aws_credentials: Option<SharedCredentialsProvider>,
}

impl std::fmt::Debug for AgentServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentServiceConfig")
            .field("cluster", &self.cluster)
            .field("host_id", &self.host_id)
            .field("auth_addr", &self.auth_addr)
            .field("host", &self.host)
            .field("proxies", &self.proxies)
            .field("databases", &self.databases)
            .field("timers", &self.timers)
            .finish_non_exhaustive()
    }
}

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("database {database:?}: {field}: {reason}")]
    Config {
        database: String,
        field: &'static str,
        reason: String,
    },
    #[error("agent configuration: {field}: {reason}")]
    Setup { field: &'static str, reason: String },
    #[error("the auth service refused or failed: {0}")]
    Auth(#[from] postern_auth::Error),
    #[error("{0}")]
    Certificate(#[from] postern_pki::Error),
    #[error("{0}")]
    Spool(#[from] spool::SpoolError),
    #[error("cannot save the agent's host material in {path}: {source}")]
    Storage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tunnel: {0}")]
    Tunnel(#[from] postern_tunnel::Error),
}

/// A configured database: what the sessions see, and where its labels come from.
#[derive(Debug)]
struct Prepared {
    config: DatabaseConfig,
    host: String,
    port: u16,
    ca_pem: Option<Vec<u8>>,
}

/// The database service. See the module docs.
#[derive(Debug)]
pub struct AgentService {
    runtime: Runtime,
    config: AgentServiceConfig,
    databases: Vec<Prepared>,
    metrics: AgentMetrics,
    audit_tap: Option<AuditTap>,
}

/// Sees every audit event a session emits, on its way to the spool (see
/// [`AgentService::with_audit_tap`]).
#[derive(Clone)]
struct AuditTap(Arc<dyn Fn(&AuditEvent) + Send + Sync>);

impl std::fmt::Debug for AuditTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditTap")
    }
}

impl AgentService {
    /// Checks the configuration (URIs, CA files, label commands); connects to nothing.
    pub fn new(runtime: Runtime, config: AgentServiceConfig) -> Result<Self, AgentError> {
        if config.host_id.is_empty() {
            return Err(AgentError::Setup {
                field: "host_id",
                reason: "must not be empty".into(),
            });
        }
        let mut databases = Vec::new();
        for db in &config.databases {
            let bad = |field: &'static str, reason: String| AgentError::Config {
                database: db.name.clone(),
                field,
                reason,
            };
            if db.protocol != Protocol::Postgres {
                return Err(bad(
                    "protocol",
                    format!(
                        "{} is not served by this agent yet; use postgres",
                        db.protocol
                    ),
                ));
            }
            let (host, port) = db
                .uri
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
                .filter(|(h, _)| !h.is_empty())
                .ok_or_else(|| bad("uri", format!("{:?} is not host:port", db.uri)))?;
            let ca_pem = db
                .ca_cert_file
                .as_ref()
                .map(|path| {
                    std::fs::read(path)
                        .map_err(|e| bad("ca_cert_file", format!("{}: {e}", path.display())))
                })
                .transpose()?;
            if let Some(pem) = &ca_pem {
                UpstreamTls::new(
                    db.tls.mode,
                    pem,
                    db.tls.server_name.clone(),
                    ring_provider(),
                    Arc::new(runtime.clock().clone()),
                )
                .map_err(|e| bad("ca_cert_file", e.to_string()))?;
            }
            for (name, label) in &db.dynamic_labels {
                if label.command.is_empty() {
                    return Err(bad(
                        "dynamic_labels",
                        format!("{name}: the command is empty"),
                    ));
                }
                if label.period < LABEL_PERIOD_MIN {
                    return Err(bad(
                        "dynamic_labels",
                        format!("{name}: the period must be at least {LABEL_PERIOD_MIN:?}"),
                    ));
                }
            }
            databases.push(Prepared {
                config: db.clone(),
                host: host.to_owned(),
                port,
                ca_pem,
            });
        }
        Ok(Self {
            runtime,
            config,
            databases,
            metrics: AgentMetrics::default(),
            audit_tap: None,
        })
    }

    /// Calls `tap` with every audit event a session emits, before it is spooled: the
    /// simulator records what sessions emitted to check it against what auth stored.
    pub fn with_audit_tap(mut self, tap: impl Fn(&AuditEvent) + Send + Sync + 'static) -> Self {
        self.audit_tap = Some(AuditTap(Arc::new(tap)));
        self
    }

    /// Registers the agent's metrics (`postern_agent_*`) for the `/metrics` endpoint.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    /// The metric handles (for tests and status pages).
    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }

    /// Runs until `shutdown` completes, then drains and returns. Start-up waits (with
    /// backoff) for the auth service; configuration errors return at once.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let started = tokio::select! {
            biased;
            () = &mut shutdown => return Ok(()),
            started = self.start() => started?,
        };
        self.serve(started, shutdown).await
    }

    /// Host material, CAs, SSH certificate; retried while auth is unreachable.
    async fn start(&self) -> Result<Started, AgentError> {
        let mut delay = STARTUP_RETRY_MIN;
        loop {
            match self.try_start().await {
                Ok(started) => return Ok(started),
                Err(AgentError::Auth(postern_auth::Error::Unreachable { addr, reason })) => {
                    tracing::warn!(%addr, %reason, retry_in = ?delay, "agent: auth service unreachable");
                }
                Err(error) => return Err(error),
            }
            tokio::time::sleep(self.runtime.rng().jitter(delay, 200)).await;
            delay = (delay * 2).min(STARTUP_RETRY_MAX);
        }
    }

    async fn try_start(&self) -> Result<Started, AgentError> {
        let clock = Arc::new(self.runtime.clock().clone());
        let auth_cas = TrustedCa::from_pem_bundle(&self.config.auth_ca_pem)?;
        let client = |credentials| {
            AuthClient::new(
                *self.runtime.net(),
                &self.config.auth_addr,
                &self.config.auth_server_name,
                &auth_cas,
                credentials,
                clock.clone(),
            )
        };
        let (cert_pem, key) = self.host_material(&client(None)?).await?;
        let key_der = key.to_rustls();
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| AgentError::Setup {
                field: "host certificate",
                reason: e.to_string(),
            })?;
        let auth = client(Some((cert_der.clone(), key_der.clone_key())))?;
        let cas = TrustedCa::from_pem_bundle(&auth.cas().await?)?;
        let user_cas: Vec<TrustedCa> = cas
            .iter()
            .filter(|ca| ca.kind() == CaKind::User)
            .cloned()
            .collect();
        let db_ca_pem: String = cas
            .iter()
            .filter(|ca| ca.kind() == CaKind::Db)
            .map(TrustedCa::to_pem)
            .collect();
        let ssh_key = postern_pki::ssh::generate_ssh_key()?;
        let public = ssh_key
            .public_key()
            .to_openssh()
            .map_err(|e| AgentError::Setup {
                field: "ssh key",
                reason: e.to_string(),
            })?;
        let ssh = auth
            .ssh_cert(&SshCertRequest { public_key: public })
            .await?;
        let bad_ssh = |e: ssh_key::Error| AgentError::Setup {
            field: "ssh certificate from auth",
            reason: e.to_string(),
        };
        let ssh_cert = ssh_key::Certificate::from_openssh(&ssh.cert).map_err(bad_ssh)?;
        let host_ca_keys = ssh
            .host_ca_keys
            .iter()
            .map(|k| ssh_key::PublicKey::from_openssh(k).map_err(bad_ssh))
            .collect::<Result<Vec<_>, _>>()?;
        let tls = postern_pki::tls::mtls_server_config(
            vec![cert_der.clone()],
            key_der.clone_key(),
            &user_cas,
            ring_provider(),
            clock.clone(),
        )?;
        Ok(Started {
            auth,
            tls,
            validator: Validator::new(user_cas.clone()),
            user_cas,
            host_cert: cert_der,
            host_key: key_der,
            db_ca_pem,
            ssh_key,
            ssh_cert,
            host_ca_keys,
        })
    }

    /// The host certificate and key: given, saved from an earlier join, or joined now
    /// (and saved).
    async fn host_material(
        &self,
        anonymous: &AuthClient,
    ) -> Result<(String, PrivateKey), AgentError> {
        let dir = self.runtime.storage_root().join(HOST_DIR);
        let (cert_path, key_path) = (dir.join("host.crt"), dir.join("host.key"));
        match &self.config.host {
            HostMaterial::Ready { cert_pem, key_pem } => {
                Ok((cert_pem.clone(), PrivateKey::from_pem(key_pem)?))
            }
            HostMaterial::JoinToken(token) => {
                if let (Ok(cert), Ok(key)) = (
                    std::fs::read_to_string(&cert_path),
                    std::fs::read_to_string(&key_path),
                ) && self.saved_cert_valid(&cert)
                {
                    return Ok((cert, PrivateKey::from_pem(&key)?));
                }
                let key = PrivateKey::generate()?;
                let joined = anonymous
                    .join(&JoinRequest {
                        token: token.clone(),
                        kind: TokenKind::Db,
                        host_id: self.config.host_id.clone(),
                        names: vec![self.config.host_id.clone()],
                        public_key: base64::engine::general_purpose::STANDARD
                            .encode(key.public_key().der()),
                    })
                    .await?;
                let storage = |source| AgentError::Storage {
                    path: dir.clone(),
                    source,
                };
                std::fs::create_dir_all(&dir).map_err(storage)?;
                write_private(&key_path, key.to_pem().as_bytes()).map_err(storage)?;
                std::fs::write(&cert_path, &joined.cert).map_err(storage)?;
                Ok((joined.cert, key))
            }
        }
    }

    /// A saved host certificate is reused while it is valid for another hour.
    fn saved_cert_valid(&self, pem: &str) -> bool {
        let Ok(der) = CertificateDer::from_pem_slice(pem.as_bytes()) else {
            return false;
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
            return false;
        };
        let now = i64::try_from(self.runtime.clock().now().as_secs()).unwrap_or(i64::MAX);
        cert.validity().not_after.timestamp() > now.saturating_add(3600)
            && cert.validity().not_before.timestamp() <= now
    }

    async fn serve(
        self,
        started: Started,
        mut shutdown: std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
    ) -> Result<(), AgentError> {
        let timers = self.config.timers.clone();
        let clock = Arc::new(self.runtime.clock().clone());

        // Audit: sessions ─► queue ─► spool on disk ─► auth.
        let spool = Arc::new(open_audit_spool(
            &self.runtime,
            timers.audit_spool_size_max,
        )?);
        let (audit_tx, mut audit_rx) = mpsc::channel::<AuditEvent>(AUDIT_QUEUE_LEN);
        if let Some(AuditTap(tap)) = self.audit_tap.clone() {
            // Sessions ─► tap ─► writer; the writer still ends when every session has.
            let (tapped_tx, tapped_rx) = mpsc::channel::<AuditEvent>(AUDIT_QUEUE_LEN);
            tokio::spawn(async move {
                while let Some(event) = audit_rx.recv().await {
                    tap(&event);
                    if tapped_tx.send(event).await.is_err() {
                        return;
                    }
                }
            });
            audit_rx = tapped_rx;
        }
        let writer = tokio::spawn(spool::write_events(
            Arc::clone(&spool),
            audit_rx,
            self.runtime.blocking(),
        ));
        let shipper = tokio::spawn(spool::ship_events(
            Arc::clone(&spool),
            started.auth.clone(),
            self.runtime.blocking(),
        ));

        // Roles, cached and polled.
        let roles = RoleCache::default();
        let roles_task = tokio::spawn(poll_roles(
            started.auth.clone(),
            roles.clone(),
            timers.roles_poll_period,
        ));

        // The databases as sessions see them.
        let mut served = Vec::new();
        for db in &self.databases {
            let ca_pem = db
                .ca_pem
                .clone()
                .unwrap_or_else(|| started.db_ca_pem.clone().into_bytes());
            let tls = UpstreamTls::new(
                db.config.tls.mode,
                &ca_pem,
                db.config.tls.server_name.clone(),
                ring_provider(),
                clock.clone(),
            )
            .map_err(|e| AgentError::Config {
                database: db.config.name.clone(),
                field: "tls",
                reason: e.to_string(),
            })?;
            served.push(ServedDatabase {
                database: Database {
                    name: db.config.name.clone(),
                    description: db.config.description.clone(),
                    protocol: db.config.protocol,
                    uri: db.config.uri.clone(),
                    labels: db.config.static_labels.clone(),
                },
                target: PostgresTarget {
                    host: db.host.clone(),
                    port: db.port,
                    tls,
                },
            });
        }
        let aws =
            self.config.aws_credentials.clone().unwrap_or_else(|| {
                SharedCredentialsProvider::new(crate::rds::EnvironmentCredentials)
            });
        let credentials = AgentCredentials {
            auth: started.auth.clone(),
            rds: self
                .databases
                .iter()
                .filter_map(|db| {
                    let region = db.config.aws_region.clone()?;
                    let signer = postern_rds_iam::TokenSigner::new(
                        region,
                        aws.clone(),
                        self.runtime.clock().clone(),
                    );
                    Some((db.config.name.clone(), signer))
                })
                .collect(),
        };
        let sessions = Arc::new(
            SessionService::new(
                &self.runtime,
                SessionConfig {
                    cluster: self.config.cluster.clone(),
                    tls: started.tls,
                    validator: started.validator,
                    databases: served,
                    limits: Default::default(),
                    handshake_timeout: timers.handshake_timeout,
                    connect_timeout: timers.connect_timeout,
                },
                roles,
                credentials,
                audit_tx,
            )
            .with_audit_gate(spool.gate()),
        );

        // CA rotations: sessions trust the user CAs auth lists, polled like the roles.
        let cas_task = tokio::spawn(follow_user_cas(
            started.auth.clone(),
            Arc::clone(&sessions),
            (started.host_cert, started.host_key),
            clock.clone(),
            started.user_cas,
            timers.roles_poll_period,
        ));

        // Registry: announce with labels, keep alive, re-announce on label changes.
        let (labels_tx, labels_rx) = watch::channel(self.current_labels(&sessions));
        let mut background = JoinSet::new();
        for db in &self.databases {
            for (name, label) in &db.config.dynamic_labels {
                background.spawn(run_dynamic_label(
                    Arc::clone(&sessions),
                    labels_tx.clone(),
                    db.config.name.clone(),
                    name.clone(),
                    label.clone(),
                ));
            }
        }
        let announcer = tokio::spawn(announce(
            started.auth.clone(),
            labels_rx,
            timers.clone(),
            self.runtime.rng().clone(),
        ));

        // Tunnels to every proxy.
        let names: Vec<String> = self
            .databases
            .iter()
            .map(|d| d.config.name.clone())
            .collect();
        let (_databases_tx, databases_rx) = watch::channel(names);
        let (agent, mut channels) = Agent::new(
            &self.runtime,
            AgentConfig::new(
                self.config.host_id.clone(),
                started.ssh_key,
                started.ssh_cert,
                started.host_ca_keys,
                databases_rx,
            ),
        )?;
        let mut status = agent.status();
        let (proxies_tx, proxies_rx) = watch::channel(self.config.proxies.clone());
        let tunnel = tokio::spawn(agent.run(proxies_rx));
        {
            let metrics = self.metrics.clone();
            let spool = Arc::clone(&spool);
            background.spawn(async move {
                loop {
                    let connected = status.borrow_and_update().connected.len();
                    metrics
                        .tunnels_connected
                        .set(i64::try_from(connected).unwrap_or(i64::MAX));
                    metrics
                        .audit_spool_bytes
                        .set(i64::try_from(spool.size()).unwrap_or(i64::MAX));
                    tokio::select! {
                        biased;
                        changed = status.changed() => if changed.is_err() { return },
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            });
        }
        tracing::info!(host_id = %self.config.host_id, databases = self.databases.len(), "database service started");

        // Channels until shutdown.
        let mut running = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                channel = channels.recv() => match channel {
                    Some(channel) => {
                        self.dispatch(&sessions, &mut running, channel);
                    }
                    None => break,
                },
                Some(_) = running.join_next() => {}
            }
        }

        // Drain: nobody should route here any more; finish what is open.
        tracing::info!(
            open = running.len(),
            "database service shutting down: draining sessions"
        );
        announcer.abort();
        for name in self.databases.iter().map(|d| &d.config.name) {
            if let Err(error) = started
                .auth
                .withdraw(&WithdrawRequest {
                    db_name: name.clone(),
                })
                .await
            {
                tracing::warn!(database = %name, %error, "cannot withdraw the announcement; it ends with its lease");
            }
        }
        if !drain(&mut running, &mut channels, timers.drain_timeout).await {
            tracing::warn!(
                open = running.len(),
                "sessions still open after the drain timeout; ending them (FATAL 57P01 to each client)"
            );
            // Each relay finishes the database's message in flight, tells its client and
            // sends its end event; a session still starting up, or whose client does
            // not read, is stopped after the grace.
            sessions.shut_down_sessions();
            if !drain(&mut running, &mut channels, SHUTDOWN_GRACE).await {
                tracing::warn!(
                    open = running.len(),
                    "sessions still open after the shutdown grace; closing them"
                );
                running.shutdown().await;
            }
        }
        drop(proxies_tx);
        let _ = tunnel.await;
        background.shutdown().await;
        roles_task.abort();
        cas_task.abort();
        // The last sender goes with the session service: the writer then finishes.
        drop(sessions);
        let _ = writer.await;
        if !spool::wait_empty(&spool, timers.audit_flush_timeout).await {
            tracing::warn!(
                bytes = spool.size(),
                "audit events not yet acknowledged by auth stay spooled; they are sent after the next start"
            );
        }
        shipper.abort();
        Ok(())
    }

    fn current_labels(&self, sessions: &AgentSessions) -> Vec<Database> {
        sessions
            .databases()
            .into_iter()
            .map(|d| d.database)
            .collect()
    }

    fn dispatch(
        &self,
        sessions: &Arc<AgentSessions>,
        running: &mut JoinSet<()>,
        channel: IncomingChannel,
    ) {
        let sessions = Arc::clone(sessions);
        let metrics = self.metrics.clone();
        if channel.kind() == ChannelKind::Cancel {
            let net = *self.runtime.net();
            running.spawn(async move {
                let databases = sessions.databases();
                if let Err(error) =
                    crate::cancel::serve_cancel(channel, &databases, &net, CANCEL_TIMEOUT_DEFAULT)
                        .await
                {
                    tracing::info!(%error, "cancel request not delivered");
                }
            });
            return;
        }
        running.spawn(async move {
            metrics.handshakes.inc();
            let mut channel = channel;
            let (placeholder, _) = tokio::io::duplex(1);
            let connection = std::mem::replace(
                &mut channel.connection,
                postern_rt::Connection::new(placeholder),
            );
            channel.connection =
                postern_rt::Connection::new(Counted::client_side(connection, &metrics));
            let _active = ActiveGuard::new(&metrics.active_sessions);
            if let Err(error) = sessions.serve(channel).await {
                metrics.handshake_failed(&error);
                tracing::debug!(%error, "session refused");
            }
        });
    }
}

type AgentSessions = SessionService<RoleCache, AgentCredentials>;

/// What start-up fetched from auth.
struct Started {
    auth: AuthClient,
    tls: Arc<rustls::ServerConfig>,
    validator: Validator,
    /// The user CAs `tls` and `validator` trust, followed by [`follow_user_cas`].
    user_cas: Vec<TrustedCa>,
    host_cert: CertificateDer<'static>,
    host_key: rustls_pki_types::PrivateKeyDer<'static>,
    db_ca_pem: String,
    ssh_key: ssh_key::PrivateKey,
    ssh_cert: ssh_key::Certificate,
    host_ca_keys: Vec<ssh_key::PublicKey>,
}

/// Waits up to `limit` for every session in `running` to end; channels still arriving
/// meanwhile are closed unserved. True if all ended.
async fn drain(
    running: &mut JoinSet<()>,
    channels: &mut mpsc::Receiver<IncomingChannel>,
    limit: Duration,
) -> bool {
    let drained = async {
        loop {
            tokio::select! {
                biased;
                joined = running.join_next() => if joined.is_none() { break },
                Some(channel) = channels.recv() => drop(channel),
            }
        }
    };
    tokio::time::timeout(limit, drained).await.is_ok()
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

// --- Roles ------------------------------------------------------------------------------

/// The roles from auth, refreshed by [`poll_roles`]. Sessions read it; until the first
/// fetch succeeds, sessions are refused with a clear error.
#[derive(Clone, Debug, Default)]
pub struct RoleCache {
    inner: Arc<Mutex<Option<CachedRoles>>>,
}

/// Roles by name, and the version auth gave them.
#[derive(Debug)]
struct CachedRoles {
    version: String,
    roles: BTreeMap<String, Role>,
}

impl RoleCache {
    /// Replaces the cached roles if `version` differs; `true` if it did.
    pub fn update(&self, version: String, roles: Vec<Role>) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner
            .as_ref()
            .is_some_and(|cached| cached.version == version)
        {
            return false;
        }
        *inner = Some(CachedRoles {
            version,
            roles: roles.into_iter().map(|r| (r.name.clone(), r)).collect(),
        });
        true
    }

    /// The version of the cached roles, if any were fetched.
    pub fn version(&self) -> Option<String> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.as_ref().map(|cached| cached.version.clone())
    }
}

impl RoleSource for RoleCache {
    async fn roles(&self, names: &[String]) -> Result<Vec<Role>, LookupError> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(CachedRoles { roles, .. }) = inner.as_ref() else {
            return Err(LookupError {
                reason: "the agent has not loaded the roles from the auth service yet; \
                         check that it reaches the auth service"
                    .into(),
            });
        };
        Ok(names.iter().filter_map(|n| roles.get(n).cloned()).collect())
    }
}

/// Fetches the roles every `period`; the cache changes when their version does. A failed
/// fetch keeps the last roles.
pub async fn poll_roles(auth: AuthClient, cache: RoleCache, period: Duration) {
    loop {
        match auth.roles().await {
            Ok(answer) => {
                if cache.update(answer.version, answer.roles) {
                    tracing::info!("roles refreshed from the auth service");
                }
            }
            Err(error) => tracing::warn!(%error, "cannot refresh roles; keeping the last ones"),
        }
        tokio::time::sleep(period).await;
    }
}

// --- CA rotation ------------------------------------------------------------------------

/// Polls the cluster's CAs every `period`; when the user CAs change (a rotation moved
/// on), new sessions are checked against the new set (both CAs while a rotation is in
/// flight, the new one only once it completed). A failed poll keeps the current set.
async fn follow_user_cas(
    auth: AuthClient,
    sessions: Arc<AgentSessions>,
    host: (
        CertificateDer<'static>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
    clock: Arc<postern_rt::WallClock>,
    known: Vec<TrustedCa>,
    period: Duration,
) {
    auth.follow_user_cas(known, period, |user| {
        #[cfg(feature = "planted-bugs")]
        if postern_rt::planted::active(postern_rt::planted::Bug::AgentIgnoresCaRotation) {
            // The planted bug: the CAs loaded at start are good enough.
            return Ok(());
        }
        let tls = postern_pki::tls::mtls_server_config(
            vec![host.0.clone()],
            host.1.clone_key(),
            user,
            ring_provider(),
            clock.clone(),
        )
        .map_err(|error| error.to_string())?;
        sessions.set_user_trust(tls, Validator::new(user.to_vec()));
        Ok(())
    })
    .await;
}

// --- Credentials ------------------------------------------------------------------------

/// Client certificates from auth (`POST /v1/db-client`) for self-hosted databases; an
/// RDS IAM token for databases with `aws.region`.
#[derive(Debug)]
pub struct AgentCredentials {
    auth: AuthClient,
    /// Database name → IAM token signer for its region.
    rds: BTreeMap<String, postern_rds_iam::TokenSigner>,
}

impl CredentialSource for AgentCredentials {
    async fn credential(
        &self,
        database: &ServedDatabase,
        db_user: &str,
    ) -> Result<Credential, LookupError> {
        if let Some(signer) = self.rds.get(&database.database.name) {
            return crate::rds::iam_credential(signer, database, db_user).await;
        }
        let failed = |reason: String| LookupError { reason };
        let key = PrivateKey::generate().map_err(|e| failed(e.to_string()))?;
        let answer = self
            .auth
            .db_client(&DbClientRequest {
                db_user: db_user.to_owned(),
                public_key: base64::engine::general_purpose::STANDARD
                    .encode(key.public_key().der()),
            })
            .await
            .map_err(|e| {
                failed(format!(
                    "the auth service did not issue a database client certificate: {e}"
                ))
            })?;
        let chain = CertificateDer::pem_slice_iter(answer.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| failed(format!("unreadable database client certificate: {e}")))?;
        Ok(Credential::ClientCert {
            chain,
            key: key.to_rustls(),
        })
    }
}

// --- Registry ---------------------------------------------------------------------------

/// Announces every database, keeps the announcements alive, and announces again when
/// labels change or a keep-alive finds the lease lost.
async fn announce(
    auth: AuthClient,
    mut labels: watch::Receiver<Vec<Database>>,
    timers: AgentTimers,
    rng: postern_rt::Rng,
) {
    let ttl_secs = timers.announce_ttl.as_secs().max(1);
    let mut revisions: BTreeMap<String, u64> = BTreeMap::new();
    let mut announce_all = true;
    loop {
        let databases = labels.borrow_and_update().clone();
        let mut failed = false;
        for database in &databases {
            let known = revisions.get(&database.name).copied();
            let result = match known {
                Some(revision) if !announce_all => auth
                    .keep_alive(&KeepAliveRequest {
                        db_name: database.name.clone(),
                        revision,
                        ttl_secs,
                    })
                    .await
                    .map(|()| revision),
                _ => Err(postern_auth::Error::Conflict {
                    key: database.name.clone(),
                }),
            };
            let result = match result {
                Ok(revision) => Ok(revision),
                Err(_) => auth
                    .announce(&AnnounceRequest {
                        database: database.clone(),
                        ttl_secs,
                    })
                    .await
                    .map(|r| r.revision),
            };
            match result {
                Ok(revision) => {
                    revisions.insert(database.name.clone(), revision);
                }
                Err(error) => {
                    failed = true;
                    revisions.remove(&database.name);
                    tracing::warn!(database = %database.name, %error, "cannot announce the database; retrying");
                }
            }
        }
        announce_all = false;
        let wait = if failed {
            STARTUP_RETRY_MAX.min(timers.keepalive_period)
        } else {
            rng.jitter(timers.keepalive_period, 100)
        };
        tokio::select! {
            biased;
            changed = labels.changed() => {
                if changed.is_err() {
                    return;
                }
                announce_all = true;
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Runs one dynamic label's command every period and publishes the labels when its
/// value changes. A failing command keeps the last value and logs why.
async fn run_dynamic_label(
    sessions: Arc<AgentSessions>,
    labels: watch::Sender<Vec<Database>>,
    database: String,
    label: String,
    config: DynamicLabel,
) {
    let mut last: Option<String> = None;
    loop {
        match run_label_command(&config.command).await {
            Ok(value) => {
                if last.as_deref() != Some(value.as_str()) {
                    last = Some(value.clone());
                    if let Some(served) = sessions
                        .databases()
                        .into_iter()
                        .find(|d| d.database.name == database)
                    {
                        let mut new = served.database.labels.clone();
                        new.insert(label.clone(), value);
                        sessions.set_labels(&database, new);
                        labels.send_replace(
                            sessions
                                .databases()
                                .into_iter()
                                .map(|d| d.database)
                                .collect(),
                        );
                    }
                }
            }
            Err(reason) => tracing::warn!(
                %database, %label, %reason,
                "dynamic label command failed; keeping the last value"
            ),
        }
        tokio::time::sleep(config.period).await;
    }
}

async fn run_label_command(command: &[String]) -> Result<String, String> {
    let (program, args) = command.split_first().ok_or("empty command")?;
    let run = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(LABEL_COMMAND_TIMEOUT, run)
        .await
        .map_err(|_| format!("{program} did not finish within {LABEL_COMMAND_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{program} exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let value = String::from_utf8(output.stdout)
        .map_err(|_| format!("{program} printed something that is not UTF-8"))?;
    let value = value.trim();
    if value.len() > LABEL_VALUE_SIZE_MAX {
        return Err(format!(
            "{program} printed {} bytes; a label value holds at most {LABEL_VALUE_SIZE_MAX}",
            value.len()
        ));
    }
    Ok(value.to_owned())
}

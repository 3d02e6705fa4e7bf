//! Starting, running and stopping the roles of one process.
//!
//! With `[auth]` in this process, the proxy and the agent get their host certificates
//! straight from the auth server object (a join token minted and spent in-process, so
//! the audit log still shows who joined), then use the auth API over loopback like any
//! other host. Without it they join the remote auth server with the configured token.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use postern_agent::service::{
    AgentService, AgentServiceConfig, AgentTimers, DatabaseConfig, DatabaseTls, DynamicLabel,
    HostMaterial,
};
use postern_agent::upstream::TlsMode;
use postern_auth::audit::{AuditLog, FileAuditLog, PostgresAuditLog};
use postern_auth::backend::{Backend, PostgresBackend, SqliteBackend};
use postern_auth::client::AuthClient;
use postern_auth::database::Protocol;
use postern_auth::server::{AuthConfig, AuthServer, TokenKind};
use postern_auth::signing::HostCert;
use postern_auth::user::PasswordCost;
use postern_pki::{CaKind, IssuedCert, PrivateKey, TrustedCa, VerifiedIdentity};
use postern_proxy::dispatch::DbAccessSigner;
use postern_proxy::service::{Listen, ProxyLimits, ProxyService};
use postern_proxy::start::{AuthApi, FromAuth, ProxySettings, configure_from_auth};
use postern_rt::Runtime;
use prometheus_client::registry::Registry;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use super::config::{
    AuthSection, Config, DbProtocolSetting, DbSection, DialAddr, ListenAddr, ProxySection,
    TlsModeSetting,
};
use super::host::{self, Remote};
use super::{BoxError, metrics};

/// Lifetime of the join tokens minted in-process for the local proxy and agent: they are
/// spent at once.
const LOCAL_TOKEN_TTL: Duration = Duration::from_secs(60);
/// Where under `data_dir` a proxy or agent that joined a remote auth server keeps its
/// host certificate and key (the agent's is where `AgentService` keeps its own).
const PROXY_HOST_DIR: &str = "proxy-host";
const AGENT_HOST_DIR: &str = "agent-host";
/// Written by the auth role at start: the cluster's host CA bundle, for the
/// `auth_ca_file` of remote proxies and agents.
pub(crate) const HOST_CAS_FILE: &str = "host-cas.pem";
/// After the proxy and the agent drained, how long the rest may take to stop.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Runs every role of `config` until SIGINT/SIGTERM, then drains and returns.
pub(crate) async fn run(config: Config, config_path: PathBuf) -> Result<(), BoxError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    spawn_signal_handler(Arc::clone(&stop_tx))?;

    // Every role keeps files there: auth its state and audit, a proxy or an agent
    // that joined a remote auth server its host certificate, the agent its spool.
    let data_dir = &config.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|error| {
        format!(
            "cannot create data_dir {}: {error}; create it or set data_dir in {}",
            data_dir.display(),
            config_path.display()
        )
    })?;
    let runtime = Runtime::production(data_dir.clone())
        .map_err(|error| format!("cannot seed the random number generator: {error}"))?;

    // Listeners this module owns are bound first: a busy port fails before anything runs.
    let auth_listener = match &config.auth {
        Some(auth) => Some(bind(&runtime, "auth.listen", auth.listen).await?),
        None => None,
    };
    let metrics_listener = match &config.metrics {
        Some(section) => Some(bind(&runtime, "metrics.listen", section.listen).await?),
        None => None,
    };

    match &config.auth {
        None => {
            run_roles(
                &config,
                &runtime,
                None::<(&Local<SqliteBackend, FileAuditLog>, ApiTask)>,
                metrics_listener,
                stop_tx,
                stop_rx,
            )
            .await
        }
        Some(auth) => {
            let listener = auth_listener.ok_or("the auth listener was not bound")?;
            let clock = runtime.clock().clone();
            let auth_config = AuthConfig {
                cluster: auth.cluster_name.clone(),
                password_cost: PasswordCost::default(),
                login_limits: Default::default(),
            };
            match &auth.postgres {
                None => {
                    let state = data_dir.join("state.db");
                    let backend = SqliteBackend::open(&state, Arc::new(clock.clone()))
                        .map_err(|error| format!("auth state {}: {error}", state.display()))?;
                    let audit_dir = data_dir.join("audit");
                    let audit = FileAuditLog::open(&audit_dir)
                        .map_err(|error| format!("audit log {}: {error}", audit_dir.display()))?;
                    let server =
                        AuthServer::new(backend, audit, clock, runtime.rng().clone(), auth_config)?;
                    let stop = (stop_tx, stop_rx);
                    run_with_auth(
                        server,
                        auth,
                        listener,
                        &config,
                        &runtime,
                        metrics_listener,
                        stop,
                    )
                    .await
                }
                Some(postgres) => {
                    let backend = PostgresBackend::connect(
                        &postgres.conninfo,
                        &postgres.schema,
                        Arc::new(clock.clone()),
                    )
                    .await
                    .map_err(|error| format!("auth.postgres: {error}"))?;
                    let audit = PostgresAuditLog::connect(&postgres.conninfo, &postgres.schema)
                        .await
                        .map_err(|error| format!("auth.postgres (audit): {error}"))?;
                    let server =
                        AuthServer::new(backend, audit, clock, runtime.rng().clone(), auth_config)?;
                    let stop = (stop_tx, stop_rx);
                    run_with_auth(
                        server,
                        auth,
                        listener,
                        &config,
                        &runtime,
                        metrics_listener,
                        stop,
                    )
                    .await
                }
            }
        }
    }
}

/// Runs every role of `config` with `server` as this process's auth server, serving its
/// API on `listener`.
async fn run_with_auth<B: Backend, A: AuditLog>(
    server: AuthServer<B, A>,
    section: &AuthSection,
    listener: postern_rt::Listener,
    config: &Config,
    runtime: &Runtime,
    metrics_listener: Option<postern_rt::Listener>,
    (stop_tx, stop_rx): (Arc<watch::Sender<bool>>, watch::Receiver<bool>),
) -> Result<(), BoxError> {
    let (local, api) = Local::start(Arc::new(server), section, listener, &config.data_dir).await?;
    run_roles(
        config,
        runtime,
        Some((&local, api)),
        metrics_listener,
        stop_tx,
        stop_rx,
    )
    .await
}

/// SIGINT or SIGTERM starts the drain; a second one stops at once.
fn spawn_signal_handler(stop_tx: Arc<watch::Sender<bool>>) -> Result<(), BoxError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|error| format!("cannot handle SIGINT: {error}"))?;
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|error| format!("cannot handle SIGTERM: {error}"))?;
    tokio::spawn(async move {
        let mut received = 0;
        loop {
            let name = tokio::select! {
                biased;
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            received += 1;
            if received == 1 {
                tracing::info!(
                    signal = name,
                    "shutting down: draining sessions (send it again to stop at once)"
                );
                let _ = stop_tx.send(true);
            } else {
                tracing::warn!(signal = name, "second signal: stopping now");
                std::process::exit(1);
            }
        }
    });
    Ok(())
}

/// Completes once shutdown has begun.
async fn stopped(mut rx: watch::Receiver<bool>) {
    // An error means the sender is gone: nothing can stop us any more than now.
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn bind(
    runtime: &Runtime,
    field: &str,
    addr: ListenAddr,
) -> Result<postern_rt::Listener, BoxError> {
    runtime.net().listen(&addr.0.to_string()).await.map_err(|error| {
        format!(
            "cannot listen on {} ({field}): {error}; is another process using it? Stop it or choose another address",
            addr.0
        )
        .into()
    })
}

/// The address to dial a local listener by: its port on loopback when it listens on
/// every interface.
fn loopback(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
    } else {
        addr
    }
}

/// The machine's host name, for default host ids.
fn hostname() -> String {
    let name = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(60)
        .collect();
    if name.is_empty() {
        "local".to_owned()
    } else {
        name
    }
}

/// The auth server in this process, with its API serving.
struct Local<B, A> {
    server: Arc<AuthServer<B, A>>,
    /// `host:port` to reach the API by from this process.
    addr: String,
    cluster: String,
}

type ApiTask = tokio::task::JoinHandle<Result<(), postern_auth::Error>>;

/// What the roles need from an auth server in this process.
trait LocalAuth: Send + Sync {
    fn addr(&self) -> &str;
    fn cluster(&self) -> &str;
    /// A host certificate for a proxy or agent of this process, and its key.
    fn issue_host(
        &self,
        kind: TokenKind,
        host_id: &str,
        names: Vec<String>,
    ) -> impl Future<Output = Result<(HostCert, PrivateKey), BoxError>> + Send;
    /// The host CAs (PEM), to trust the API's certificate by.
    fn host_ca_pem(&self) -> impl Future<Output = Result<String, BoxError>> + Send;
}

impl<B: Backend, A: AuditLog> Local<B, A> {
    async fn start(
        server: Arc<AuthServer<B, A>>,
        section: &AuthSection,
        listener: postern_rt::Listener,
        data_dir: &Path,
    ) -> Result<(Self, ApiTask), BoxError> {
        server
            .ensure_cas()
            .await
            .map_err(|error| format!("cannot create the cluster's CAs: {error}"))?;
        // What remote proxies and agents set as auth_ca_file; rewritten at every start
        // so that it follows CA rotations.
        let host_cas: String = server
            .ca_status(CaKind::Host)
            .await?
            .trusted
            .iter()
            .map(TrustedCa::to_pem)
            .collect();
        let host_cas_path = data_dir.join(HOST_CAS_FILE);
        std::fs::write(&host_cas_path, host_cas)
            .map_err(|error| format!("cannot write {}: {error}", host_cas_path.display()))?;
        tracing::info!(
            path = %host_cas_path.display(),
            "auth: the host CA bundle, for auth_ca_file of remote proxies and agents"
        );
        let local = listener.local_addr()?;
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        names.extend(section.public_names.iter().cloned());
        names.dedup();
        let api = tokio::spawn(postern_auth::api::serve(
            Arc::clone(&server),
            listener,
            names,
        ));
        tracing::info!(listen = %local, cluster = %section.cluster_name, "auth: serving the API");
        let local = Self {
            server,
            addr: loopback(local).to_string(),
            cluster: section.cluster_name.clone(),
        };
        Ok((local, api))
    }
}

impl<B: Backend, A: AuditLog> LocalAuth for Local<B, A> {
    fn addr(&self) -> &str {
        &self.addr
    }

    fn cluster(&self) -> &str {
        &self.cluster
    }

    async fn issue_host(
        &self,
        kind: TokenKind,
        host_id: &str,
        names: Vec<String>,
    ) -> Result<(HostCert, PrivateKey), BoxError> {
        let actor = format!("postern start ({host_id})");
        let token = self
            .server
            .create_join_token(&actor, kind, LOCAL_TOKEN_TTL)
            .await?;
        let key = PrivateKey::generate()?;
        let cert = self
            .server
            .join(&token, kind, host_id, names, &key.public_key())
            .await?;
        Ok((cert, key))
    }

    async fn host_ca_pem(&self) -> Result<String, BoxError> {
        let status = self.server.ca_status(CaKind::Host).await?;
        Ok(status.trusted.iter().map(TrustedCa::to_pem).collect())
    }
}

/// Signs proxy→agent certificates through the auth API (`POST /v1/db-access`), which
/// verifies the user's certificate again.
#[derive(Debug)]
struct ApiSigner {
    auth: AuthClient,
}

impl DbAccessSigner for ApiSigner {
    async fn sign(
        &self,
        user: &VerifiedIdentity,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        self.auth.db_access_cert(user.cert_der()).await
    }
}

/// Runs the proxy and the agent (those configured) and the metrics endpoint until
/// shutdown; then waits for them to drain.
async fn run_roles<L: LocalAuth>(
    config: &Config,
    runtime: &Runtime,
    local: Option<(&L, ApiTask)>,
    metrics_listener: Option<postern_rt::Listener>,
    stop_tx: Arc<watch::Sender<bool>>,
    stop_rx: watch::Receiver<bool>,
) -> Result<(), BoxError> {
    let (local, api) = match local {
        Some((local, api)) => (Some(local), Some(api)),
        None => (None, None),
    };
    let mut registry = Registry::default();
    // Joining a remote auth server waits for it to answer: a signal meanwhile stops.
    let built = match &config.proxy {
        Some(section) => tokio::select! {
            () = stopped(stop_rx.clone()) => return Ok(()),
            proxy = build_proxy(runtime, section, local) => Some(proxy?),
        },
        None => None,
    };
    // CA rotations: the proxy's front doors follow the user CAs auth lists (the agent
    // follows them itself).
    let mut _follow_cas = None;
    let mut proxy = built.map(|built| {
        let handle = built.service.handle();
        _follow_cas = Some(AbortOnDrop(tokio::spawn(async move {
            let apply = |cas: &[TrustedCa]| handle.set_user_cas(cas).map_err(|e| e.to_string());
            (built.auth)
                .follow_user_cas(built.user_cas, PROXY_CA_POLL_PERIOD, apply)
                .await;
        })));
        built.service
    });
    // The agent dials the proxy of this process on its bound tunnel port.
    let mut local_tunnel = None;
    if let Some(proxy) = &mut proxy {
        let addrs = proxy.bind().await?;
        local_tunnel = Some(loopback(addrs.tunnel));
        proxy.register_metrics(&mut registry);
        tracing::info!(
            postgres = %addrs.postgres,
            web = ?addrs.web,
            tunnel = %addrs.tunnel,
            "proxy: listening"
        );
    }
    let agent = match &config.db {
        Some(section) => {
            let agent = tokio::select! {
                () = stopped(stop_rx.clone()) => return Ok(()),
                agent = build_agent(runtime, section, local, local_tunnel) => agent?,
            };
            agent.register_metrics(&mut registry);
            Some(agent)
        }
        None => None,
    };
    let metrics_task = metrics_listener.map(|listener| {
        let addr = listener.local_addr().ok();
        tracing::info!(listen = ?addr, "metrics: serving /metrics");
        tokio::spawn(metrics::serve(
            listener,
            Arc::new(registry),
            stopped(stop_rx.clone()),
        ))
    });
    let roles: Vec<&str> = [
        config.auth.as_ref().map(|_| "auth"),
        config.proxy.as_ref().map(|_| "proxy"),
        config.db.as_ref().map(|_| "db"),
    ]
    .into_iter()
    .flatten()
    .collect();
    tracing::info!(roles = %roles.join(","), "postern started");

    let on_error = |role: &'static str, result: Result<(), BoxError>| {
        if let Err(error) = &result {
            tracing::error!(role, %error, "role failed; stopping the others");
            let _ = stop_tx.send(true);
        }
        result.map_err(|error| -> BoxError { format!("{role}: {error}").into() })
    };
    let proxy_run = async {
        match proxy {
            Some(proxy) => on_error(
                "proxy",
                proxy
                    .run(stopped(stop_rx.clone()))
                    .await
                    .map_err(BoxError::from),
            ),
            None => Ok(()),
        }
    };
    let agent_run = async {
        match agent {
            Some(agent) => on_error(
                "db",
                agent
                    .run(stopped(stop_rx.clone()))
                    .await
                    .map_err(BoxError::from),
            ),
            None => Ok(()),
        }
    };
    // The auth API keeps serving while the others drain (the agent flushes its audit
    // spool to it on the way out); only its own failure ends it early. Its task is
    // left running on return and ends with the runtime.
    let auth_watch = async {
        let Some(mut api) = api else {
            return Ok(());
        };
        tokio::select! {
            biased;
            () = stopped(stop_rx.clone()) => Ok(()),
            result = &mut api => {
                let message = match result {
                    Ok(Ok(())) => "the API stopped".to_owned(),
                    Ok(Err(error)) => format!("the API failed: {error}"),
                    Err(error) => format!("the API task ended: {error}"),
                };
                on_error("auth", Err(message.into()))
            }
        }
    };
    let (proxy_result, agent_result, auth_result) = tokio::join!(proxy_run, agent_run, auth_watch);
    if let Some(task) = metrics_task {
        let _ = tokio::time::timeout(STOP_GRACE, task).await;
    }
    proxy_result?;
    agent_result?;
    auth_result?;
    Ok(())
}

/// How a proxy or agent of this process reaches the auth service, and the host
/// certificate it presents there.
struct Joined {
    cluster: String,
    auth_addr: String,
    auth_server_name: String,
    /// The host CAs (PEM) the auth server's certificate must chain to.
    auth_ca_pem: String,
    cert: IssuedCert,
    key: PrivateKey,
}

/// A section's settings for a remote auth server (`auth_addr`, `join_token`,
/// `auth_ca_file`), and the folder under `data_dir` its host certificate is kept in.
struct RemoteSettings<'a> {
    section: &'static str,
    auth_addr: &'a Option<DialAddr>,
    join_token: &'a Option<String>,
    auth_ca_file: &'a Option<PathBuf>,
    dir: &'static str,
}

/// The host certificate of a proxy or agent: from the auth server in this process, or
/// by joining the remote one (see [`host`]).
async fn join<L: LocalAuth>(
    runtime: &Runtime,
    local: Option<&L>,
    kind: TokenKind,
    host_id: &str,
    names: Vec<String>,
    remote: RemoteSettings<'_>,
) -> Result<Joined, BoxError> {
    if let Some(local) = local {
        let (host, key) = local.issue_host(kind, host_id, names).await?;
        return Ok(Joined {
            cluster: local.cluster().to_owned(),
            auth_addr: local.addr().to_owned(),
            auth_server_name: "localhost".to_owned(),
            auth_ca_pem: local.host_ca_pem().await?,
            cert: host.cert,
            key,
        });
    }
    let section = remote.section;
    // Invariant of config::check: without [auth], all three are set.
    let (Some(addr), Some(ca_file)) = (remote.auth_addr, remote.auth_ca_file) else {
        return Err(
            format!("{section}: auth_addr and auth_ca_file are needed without [auth]").into(),
        );
    };
    let ca_pem = read_file(&format!("{section}.auth_ca_file"), ca_file)?;
    let auth_cas = TrustedCa::from_pem_bundle(&ca_pem)
        .map_err(|error| format!("{section}.auth_ca_file {}: {error}", ca_file.display()))?;
    let cluster = auth_cas
        .first()
        .map(|ca| ca.cluster().to_owned())
        .ok_or_else(|| {
            format!(
                "{section}.auth_ca_file {}: no certificate in it",
                ca_file.display()
            )
        })?;
    let (cert, key) = host::obtain(
        runtime,
        &Remote {
            section,
            kind,
            host_id,
            names,
            auth_addr: &addr.0,
            auth_server_name: addr.host(),
            auth_cas: &auth_cas,
            join_token: remote.join_token.as_deref(),
            dir: runtime.storage_root().join(remote.dir),
        },
    )
    .await?;
    Ok(Joined {
        cluster,
        auth_addr: addr.0.clone(),
        auth_server_name: addr.host().to_owned(),
        auth_ca_pem: ca_pem,
        cert,
        key,
    })
}

async fn build_proxy<L: LocalAuth>(
    runtime: &Runtime,
    section: &ProxySection,
    local: Option<&L>,
) -> Result<BuiltProxy, BoxError> {
    let public = section
        .public_addr
        .clone()
        .unwrap_or_else(|| "localhost".to_owned());
    let host_id = section
        .host_id
        .clone()
        .unwrap_or_else(|| format!("proxy-{}", hostname()));
    let mut names = vec![public.clone(), "localhost".to_owned()];
    names.dedup();
    let joined = join(
        runtime,
        local,
        TokenKind::Proxy,
        &host_id,
        names,
        RemoteSettings {
            section: "proxy",
            auth_addr: &section.auth_addr,
            join_token: &section.join_token,
            auth_ca_file: &section.auth_ca_file,
            dir: PROXY_HOST_DIR,
        },
    )
    .await?;
    let auth_cas = TrustedCa::from_pem_bundle(&joined.auth_ca_pem)?;
    let limits = &section.limits;
    let settings = ProxySettings {
        cluster: joined.cluster,
        listen: Listen {
            postgres: section.listen_postgres.0.to_string(),
            web: Some(section.listen_web.0.to_string()),
            tunnel: section.listen_tunnel.0.to_string(),
        },
        auth_api_addr: Some(joined.auth_addr.clone()),
        limits: ProxyLimits {
            handshake_timeout: limits.handshake_timeout.0,
            connections_per_user_max: usize::try_from(limits.connections_per_user)
                .unwrap_or(usize::MAX),
            drain_timeout: limits.drain_timeout.0,
            ..ProxyLimits::default()
        },
    };
    let api = AuthApi {
        addr: &joined.auth_addr,
        server_name: &joined.auth_server_name,
        cas: &auth_cas,
    };
    let FromAuth { config, auth } =
        configure_from_auth(runtime, api, joined.cert, joined.key, settings)
            .await
            .map_err(|error| format!("proxy: {error}"))?;
    let user_cas = config.user_cas.clone();
    let signer = ApiSigner { auth: auth.clone() };
    Ok(BuiltProxy {
        service: ProxyService::new(runtime, config, signer)?,
        auth,
        user_cas,
    })
}

/// How often the proxy asks auth for the cluster's CAs, to follow a rotation.
const PROXY_CA_POLL_PERIOD: Duration = Duration::from_secs(5);

/// Aborts a background task when dropped (when the roles stop).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A proxy ready to bind, with what it needs to follow CA rotations.
struct BuiltProxy {
    service: ProxyService<ApiSigner>,
    auth: AuthClient,
    /// The user CAs it trusts at start.
    user_cas: Vec<TrustedCa>,
}

async fn build_agent<L: LocalAuth>(
    runtime: &Runtime,
    section: &DbSection,
    local: Option<&L>,
    local_tunnel: Option<SocketAddr>,
) -> Result<AgentService, BoxError> {
    let host_id = section
        .host_id
        .clone()
        .unwrap_or_else(|| format!("db-{}", hostname()));
    let mut proxies: Vec<String> = section.proxies.iter().map(|p| p.0.clone()).collect();
    if let Some(tunnel) = local_tunnel {
        let own = format!("localhost:{}", tunnel.port());
        if !proxies.contains(&own) {
            proxies.push(own);
        }
    }
    let joined = join(
        runtime,
        local,
        TokenKind::Db,
        &host_id,
        vec![host_id.clone()],
        RemoteSettings {
            section: "db",
            auth_addr: &section.auth_addr,
            join_token: &section.join_token,
            auth_ca_file: &section.auth_ca_file,
            dir: AGENT_HOST_DIR,
        },
    )
    .await?;
    let databases = section
        .databases
        .iter()
        .map(|database| DatabaseConfig {
            name: database.name.clone(),
            description: database.description.clone(),
            protocol: match database.protocol {
                DbProtocolSetting::Postgres => Protocol::Postgres,
            },
            uri: database.uri.0.clone(),
            ca_cert_file: database.ca_cert_file.clone(),
            tls: DatabaseTls {
                mode: match database.tls.mode {
                    TlsModeSetting::VerifyFull => TlsMode::VerifyFull,
                    TlsModeSetting::VerifyCa => TlsMode::VerifyCa,
                },
                server_name: database.tls.server_name.clone(),
            },
            aws_region: database.aws.as_ref().map(|aws| aws.region.clone()),
            static_labels: database.static_labels.clone(),
            dynamic_labels: database
                .dynamic_labels
                .iter()
                .map(|(name, label)| {
                    (
                        name.clone(),
                        DynamicLabel {
                            command: label.command.clone(),
                            period: label.period.0,
                        },
                    )
                })
                .collect(),
        })
        .collect();
    let config = AgentServiceConfig {
        cluster: joined.cluster,
        host_id,
        auth_addr: joined.auth_addr,
        auth_server_name: joined.auth_server_name,
        auth_ca_pem: joined.auth_ca_pem,
        host: HostMaterial::Ready {
            cert_pem: joined.cert.to_pem(),
            key_pem: joined.key.to_pem(),
        },
        proxies,
        databases,
        timers: AgentTimers {
            drain_timeout: section.drain_timeout.0,
            ..AgentTimers::default()
        },
        aws_credentials: Some(postern_agent::rds::standard_chain(runtime)),
    };
    Ok(AgentService::new(runtime.clone(), config)?)
}

fn read_file(field: &str, path: &Path) -> Result<String, BoxError> {
    std::fs::read_to_string(path)
        .map_err(|error| format!("{field}: cannot read {}: {error}", path.display()).into())
}

//! The agent's per-connection service: one tunnel channel from a proxy becomes one
//! authorized, audited database session.
//!
//! ```text
//! channel ─► mutual TLS (agent host cert; proxy→agent cert from the user CA, usage db)
//!         ─► identity (Purpose::ProxyToAgent) ─► the client's StartupMessage
//!         ─► the route names this channel's database, and this agent serves it
//!         ─► check_access(roles, traits, labels, db user, db name)
//!         ─► credential for the db user ─► PostgresTarget::connect ─► greeting
//!         ─► relay; each statement's event gets the session's fields and goes to audit
//! ```
//!
//! The contract with the proxy: inside TLS the proxy sends the client's StartupMessage
//! (no SSLRequest), then plain PostgreSQL protocol both ways.
//!
//! Every refusal after the TLS handshake reaches the client as a PostgreSQL
//! ErrorResponse (28000 for access, 08001 or the database's own SQLSTATE for
//! connection failures) and is audited as `db.session.start` with code `TDB00W`. The
//! roles are looked up for every session through a [`RoleSource`], so a role change
//! applies to the next connection, whatever certificate the proxy holds.
//!
//! Session and event ids come from the runtime seam's [`Rng`], times from its
//! [`WallClock`]. Nothing is logged per message.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use postern_auth::access::{AccessRequest, Denial, SessionOptions, check_access};
use postern_auth::audit::{AuditEvent, random_id};
use postern_auth::database::{Database, Protocol};
use postern_auth::role::Role;
use postern_auth::signing::SESSION_EXPIRES_TRAIT;
use postern_auth::user::Traits;
use postern_pg::audit::{EventView, OutcomeView, text};
use postern_pg::backend::{BackendMessage, Fields, field};
use postern_pg::frontend::{StartupMessage, StartupRequest};
use postern_pg::reply::{Severity, SqlState};
use postern_pg::{Limits, Relay, StartupParams};
use postern_pki::reuse::IssuedCache;
use postern_pki::tls::peer_identity;
use postern_pki::{CertAuthority, DbProtocol, Identity, PrivateKey, Purpose, Validator};
use postern_rt::{Connection, Net, Rng, Runtime, WallClock, monotonic_now};
use postern_tunnel::agent::IncomingChannel;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::relay::{self, Controls, Pending, RelayEnd};
use crate::upstream::postgres::{Credential, PostgresTarget, UpstreamError};

/// How long the proxy has to finish the TLS handshake and send the StartupMessage.
pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// Lifetime of the certificates [`LocalDbCa`] issues: they are presented once, when the
/// session connects, so a few minutes cover clock skew and slow databases.
pub const DB_CLIENT_CERT_TTL_DEFAULT: Duration = Duration::from_secs(5 * 60);

/// Relay events waiting to get their session fields and go to the audit sink.
pub const EVENT_QUEUE_LEN: usize = 256;

/// Event names and codes of a session's own events (statement events take theirs from
/// [`postern_pg::AuditEvent::name`] and [`postern_pg::AuditEvent::code`]).
pub mod codes {
    /// A session opened.
    pub const SESSION_START: (&str, &str) = ("db.session.start", "TDB00I");
    /// A session refused or failed to open; the event's `error` says why.
    pub const SESSION_START_FAILURE: (&str, &str) = ("db.session.start", "TDB00W");
    /// A session ended.
    pub const SESSION_END: (&str, &str) = ("db.session.end", "TDB01I");
}

/// A database this agent serves, and how to reach it.
#[derive(Clone, Debug)]
pub struct ServedDatabase {
    /// Name, protocol, URI and labels, as the agent announces them.
    pub database: Database,
    /// Where it is and how its TLS is checked.
    pub target: PostgresTarget,
}

/// Why a [`RoleSource`] or [`CredentialSource`] could not answer.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct LookupError {
    /// What went wrong, in words an operator can act on.
    pub reason: String,
}

/// Where the agent finds the roles a certificate names (the auth service, its cache, or
/// a map in tests).
pub trait RoleSource: Send + Sync {
    /// The roles among `names` that exist. A role that no longer exists grants and
    /// denies nothing, so it is left out rather than refused.
    fn roles(
        &self,
        names: &[String],
    ) -> impl Future<Output = Result<Vec<Role>, LookupError>> + Send;
}

/// How the agent proves itself to a database as `db_user`: a client certificate for
/// self-hosted databases ([`LocalDbCa`]), an IAM token for RDS.
pub trait CredentialSource: Send + Sync {
    /// A fresh credential for one connection to `database` as `db_user`.
    fn credential(
        &self,
        database: &ServedDatabase,
        db_user: &str,
    ) -> impl Future<Output = Result<Credential, LookupError>> + Send;
}

/// Roles held in memory, by name.
#[derive(Clone, Debug, Default)]
pub struct RoleMap {
    roles: BTreeMap<String, Role>,
}

impl RoleMap {
    pub fn new(roles: impl IntoIterator<Item = Role>) -> Self {
        Self {
            roles: roles
                .into_iter()
                .map(|role| (role.name.clone(), role))
                .collect(),
        }
    }
}

impl RoleSource for RoleMap {
    async fn roles(&self, names: &[String]) -> Result<Vec<Role>, LookupError> {
        Ok(names
            .iter()
            .filter_map(|name| self.roles.get(name).cloned())
            .collect())
    }
}

/// Client certificates (CN = db user) issued on the spot by a database CA the agent
/// holds, with a new key each time.
#[derive(Debug)]
pub struct LocalDbCa {
    ca: Arc<CertAuthority>,
    clock: WallClock,
    ttl: Duration,
}

impl LocalDbCa {
    /// Issues with `ca` (a [`postern_pki::CaKind::Db`] CA), valid for
    /// [`DB_CLIENT_CERT_TTL_DEFAULT`] from `clock`'s now.
    pub fn new(ca: Arc<CertAuthority>, clock: WallClock) -> Self {
        Self {
            ca,
            clock,
            ttl: DB_CLIENT_CERT_TTL_DEFAULT,
        }
    }

    /// Certificates valid for `ttl` instead.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
}

impl CredentialSource for LocalDbCa {
    async fn credential(
        &self,
        _database: &ServedDatabase,
        db_user: &str,
    ) -> Result<Credential, LookupError> {
        let failed = |e: postern_pki::Error| LookupError {
            reason: format!("cannot issue a database client certificate: {e}"),
        };
        let key = PrivateKey::generate().map_err(failed)?;
        let cert = self
            .ca
            .issue_db_client(db_user, &key.public_key(), self.clock.now(), self.ttl)
            .map_err(failed)?;
        Ok(Credential::ClientCert {
            chain: vec![cert.der().clone()],
            key: key.to_rustls(),
        })
    }
}

/// A client certificate's `not_after` in seconds since the Unix epoch; `None` if it
/// cannot be read (it is then not kept: the database will say what is wrong with it).
fn expires_secs(cert: &rustls_pki_types::CertificateDer<'_>) -> Option<u64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    u64::try_from(parsed.validity().not_after.timestamp()).ok()
}

/// What the agent's sessions need besides the runtime and the two sources.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// The cluster name written into audit events.
    pub cluster: String,
    /// The agent's side of the proxy→agent TLS: its host certificate, requiring client
    /// certificates from the user CA(s); see [`postern_pki::tls::mtls_server_config`].
    pub tls: Arc<rustls::ServerConfig>,
    /// Trusts the user CA(s), to validate the proxy→agent certificate.
    pub validator: Validator,
    /// The databases this agent serves.
    pub databases: Vec<ServedDatabase>,
    /// PostgreSQL wire limits, for start-up and the relay.
    pub limits: Limits,
    /// TLS handshake and StartupMessage, together.
    pub handshake_timeout: Duration,
    /// Connecting and authenticating to the database.
    pub connect_timeout: Duration,
}

/// How a session that opened ended.
#[derive(Debug, PartialEq, Eq)]
pub struct SessionEnd {
    /// The id in its audit events.
    pub session_id: String,
    /// How the relay ended.
    pub relay: RelayEnd,
}

/// Why a session did not open. Each variant after the TLS handshake is also what the
/// client was told, and the `error` of the `TDB00W` event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("the proxy did not finish the TLS handshake within {timeout:?}")]
    HandshakeTimeout { timeout: Duration },
    #[error("TLS handshake with the proxy failed: {reason}")]
    Handshake { reason: String },
    #[error("the certificate the proxy presented for this session is refused: {0}")]
    Identity(postern_pki::Error),
    #[error("no StartupMessage arrived within {timeout:?}")]
    StartupTimeout { timeout: Duration },
    #[error("the StartupMessage is refused: {0}")]
    Startup(postern_pg::Error),
    #[error("expected the client's StartupMessage, got {what}")]
    NotStartup { what: &'static str },
    #[error("the connection closed before the StartupMessage")]
    StartupClosed,
    #[error("the connection from the proxy failed: {0}")]
    Io(io::Error),
    #[error(
        "your certificate is for database {route:?}, but this connection is for {channel:?}; \
         run `postern db login {channel}`"
    )]
    WrongDatabase { route: String, channel: String },
    #[error(
        "your certificate is for a {route} database, but {database:?} speaks {served}; \
         run `postern db login {database}` again"
    )]
    WrongProtocol {
        database: String,
        route: &'static str,
        served: Protocol,
    },
    #[error(
        "this database service does not serve {database:?}; `postern db ls` lists the \
         databases you may use"
    )]
    NotServed { database: String },
    #[error("cannot check access now: the roles are unavailable: {0}")]
    Roles(LookupError),
    #[error("{0}")]
    Denied(Denial),
    #[error("no credential for db user {db_user:?}: {source}")]
    Credential {
        db_user: String,
        source: LookupError,
    },
    #[error("{0}")]
    Upstream(UpstreamError),
    #[error("the audit log is not accepting events; sessions do not open unaudited")]
    AuditUnavailable,
    #[error("{0}")]
    AuditFull(crate::spool::SpoolFull),
}

impl SessionError {
    /// The ErrorResponse the client gets.
    fn to_client(&self) -> BackendMessage {
        let message = self.to_string();
        let (code, hint) = match self {
            Self::Identity(_)
            | Self::WrongDatabase { .. }
            | Self::WrongProtocol { .. }
            | Self::Denied(_) => (SqlState::INVALID_AUTHORIZATION_SPECIFICATION.as_str(), None),
            Self::Startup(e) => (e.sql_state().as_str(), None),
            Self::StartupTimeout { .. } | Self::NotStartup { .. } => {
                (SqlState::PROTOCOL_VIOLATION.as_str(), None)
            }
            Self::Upstream(UpstreamError::Refused { code, hint, .. }) => {
                (code.as_str(), hint.as_deref())
            }
            _ => (
                SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION.as_str(),
                None,
            ),
        };
        // A database that sent no usable SQLSTATE: say it refused.
        let code = if code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric()) {
            code
        } else {
            SqlState::SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION.as_str()
        };
        let mut fields = Fields::error(
            Severity::Fatal,
            SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            &message,
        );
        for (kind, value) in &mut fields.fields {
            if *kind == field::CODE {
                *value = code.as_bytes().to_vec();
            }
        }
        if let Some(hint) = hint {
            fields = fields.with_hint(hint);
        }
        BackendMessage::ErrorResponse(fields)
    }
}

/// The agent's sessions: give it every channel the tunnel delivers. Cheap to share
/// behind an `Arc`; each [`SessionService::serve`] is one session.
pub struct SessionService<R, C> {
    config: SessionConfig,
    /// The served databases, with labels that dynamic label commands update.
    databases: std::sync::RwLock<Vec<ServedDatabase>>,
    audit_gate: Option<crate::spool::AuditGate>,
    /// The TLS acceptor and validator of proxy→agent certificates: replaced when the
    /// user CAs change (a CA rotation), read once per session.
    trust: std::sync::RwLock<Arc<UserTrust>>,
    net: Net,
    clock: WallClock,
    rng: Rng,
    roles: R,
    credentials: C,
    /// Client certificates issued for earlier sessions, by (database, db user); reused
    /// for [`postern_pki::reuse::REUSE_MAX`]. Passwords (RDS IAM tokens) are not kept.
    issued: std::sync::Mutex<IssuedCache<(String, String), Credential>>,
    /// Origin of the monotonic time `issued` counts in.
    origin: Instant,
    audit: mpsc::Sender<AuditEvent>,
    /// Turned true by [`SessionService::shut_down_sessions`]; every relay watches it.
    shutdown: watch::Sender<bool>,
    /// Users allowed before, for the planted bug that skips their later role checks.
    #[cfg(feature = "planted-bugs")]
    planted_allowed: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl<R, C> std::fmt::Debug for SessionService<R, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionService")
            .field("cluster", &self.config.cluster)
            .field(
                "databases",
                &self
                    .config
                    .databases
                    .iter()
                    .map(|d| d.database.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// What proxy→agent certificates are checked against.
struct UserTrust {
    acceptor: TlsAcceptor,
    validator: Validator,
}

impl<R: RoleSource, C: CredentialSource> SessionService<R, C> {
    /// Sessions on `runtime`'s network, clock and RNG; audit events go to `audit`
    /// (bounded: when it is full, sessions wait rather than run unaudited).
    pub fn new(
        runtime: &Runtime,
        config: SessionConfig,
        roles: R,
        credentials: C,
        audit: mpsc::Sender<AuditEvent>,
    ) -> Self {
        Self {
            trust: std::sync::RwLock::new(Arc::new(UserTrust {
                acceptor: TlsAcceptor::from(config.tls.clone()),
                validator: config.validator.clone(),
            })),
            databases: std::sync::RwLock::new(config.databases.clone()),
            audit_gate: None,
            config,
            net: *runtime.net(),
            clock: runtime.clock().clone(),
            rng: runtime.rng().clone(),
            roles,
            credentials,
            issued: std::sync::Mutex::default(),
            origin: Instant::from_std(monotonic_now()),
            audit,
            shutdown: watch::Sender::new(false),
            #[cfg(feature = "planted-bugs")]
            planted_allowed: Default::default(),
        }
    }

    /// Refuses new sessions while `gate` says the audit spool is full.
    pub fn with_audit_gate(mut self, gate: crate::spool::AuditGate) -> Self {
        self.audit_gate = Some(gate);
        self
    }

    /// Trusts other user CAs from now on (both while a CA rotation is in flight): `tls`
    /// and `validator` as in [`SessionConfig`]. Sessions already open are not affected.
    pub fn set_user_trust(&self, tls: Arc<rustls::ServerConfig>, validator: Validator) {
        let trust = Arc::new(UserTrust {
            acceptor: TlsAcceptor::from(tls),
            validator,
        });
        *self
            .trust
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = trust;
    }

    /// Ends every relaying session, now and from now on: each finishes the database's
    /// message in flight, sends the client FATAL 57P01
    /// ([`crate::relay::SHUTDOWN_MESSAGE`]), and is audited as ended. For the agent's
    /// shutdown once its drain timeout is over.
    pub fn shut_down_sessions(&self) {
        self.shutdown.send_replace(true);
    }

    fn trust(&self) -> Arc<UserTrust> {
        self.trust
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the labels of the served database `name` (dynamic labels); the next
    /// access check uses them. `false` if this service does not serve `name`.
    pub fn set_labels(&self, name: &str, labels: BTreeMap<String, String>) -> bool {
        let mut databases = self
            .databases
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match databases.iter_mut().find(|d| d.database.name == name) {
            Some(served) => {
                served.database.labels = labels;
                true
            }
            None => false,
        }
    }

    /// The served databases as they are now (labels included).
    pub fn databases(&self) -> Vec<ServedDatabase> {
        self.databases
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Serves one channel from start to end: the session's events, from
    /// `db.session.start` to `db.session.end`, have all been handed to the audit sink
    /// when this returns. Refusals were sent to the client and audited.
    ///
    /// Every step but the relay is a boxed future, and the two TLS streams are boxed: a
    /// task is as large as the largest state it can be in, and the handshakes' states
    /// (TLS connections mid-handshake, the database's start-up) would otherwise size it
    /// for the whole session, as would each place a TLS stream (over a kilobyte) passes
    /// through by value.
    pub async fn serve(&self, channel: IncomingChannel) -> Result<SessionEnd, SessionError> {
        let timeout = self.config.handshake_timeout;
        let deadline = Instant::from_std(monotonic_now()) + timeout;
        let trust = self.trust();
        let connection = channel.connection;
        let accepting = Box::pin(async {
            let accepting = trust.acceptor.accept(connection);
            let accepted = tokio::time::timeout_at(deadline, accepting).await;
            accepted.map(|tls| tls.map(Box::new))
        });
        let mut tls = match accepting.await {
            Err(_) => return Err(SessionError::HandshakeTimeout { timeout }),
            Ok(Err(e)) => {
                return Err(SessionError::Handshake {
                    reason: explain_handshake(&e),
                });
            }
            Ok(Ok(tls)) => tls,
        };

        // One RNG stream per session: its draws do not shift other sessions'.
        let rng = self.rng.fork();
        let mut common = Common {
            cluster: self.config.cluster.clone(),
            session_id: random_id(&mut rng.clone()),
            db_service: channel.database.clone(),
            client_addr: format!("{}:{}", channel.client_addr, channel.client_port),
            user: None,
            protocol: None,
            uri: None,
            db_name: None,
            db_user: None,
        };
        let channel_database = &channel.database;
        let opened = Box::pin(async {
            let opened = self.open(
                &mut tls,
                &trust.validator,
                channel_database,
                deadline,
                &mut common,
            );
            let (rest, upstream, controls) = opened.await?;
            let crate::upstream::postgres::Upstream {
                stream,
                greeting,
                pending,
                // In the greeting, which the client gets; not needed here.
                backend_key: _,
            } = upstream;
            Ok::<_, SessionError>((rest, Box::new(stream), greeting, pending, controls))
        })
        .await;
        let (startup_rest, upstream, greeting, server_pending, controls) = match opened {
            Ok(opened) => opened,
            Err(error) => return Err(Box::pin(self.refuse(&mut tls, &common, &rng, error)).await),
        };
        let start = common.event(codes::SESSION_START, &self.clock, &rng);
        if Box::pin(self.audit.send(start)).await.is_err() {
            let error = SessionError::AuditUnavailable;
            return Err(Box::pin(self.refuse(&mut tls, &common, &rng, error)).await);
        }
        let greeted = write_flush(&mut tls, &greeting).await;
        // Sent: not kept for the session's life.
        drop(greeting);
        if let Err(e) = greeted {
            let end = RelayEnd::Io(e.to_string());
            Box::pin(self.send_end(&common, &rng, &end)).await;
            return Ok(SessionEnd {
                session_id: common.session_id,
                relay: end,
            });
        }

        let pending = Pending {
            client: startup_rest,
            server: server_pending,
        };
        let relay = Relay::new(self.config.limits.clone());
        let events = self.statement_events(&common, &rng);
        let end = relay::run_with_controls(tls, upstream, relay, pending, events, controls).await;
        Box::pin(self.send_end(&common, &rng, &end)).await;
        Ok(SessionEnd {
            session_id: common.session_id,
            relay: end,
        })
    }

    /// Everything between the TLS handshake and an open database session: identity,
    /// StartupMessage, route, access, credential, connect. Fills `common` as it learns.
    async fn open(
        &self,
        tls: &mut TlsStream<Connection>,
        validator: &Validator,
        channel_database: &str,
        deadline: Instant,
        common: &mut Common,
    ) -> Result<(Vec<u8>, crate::upstream::postgres::Upstream, Controls), SessionError> {
        let verified = peer_identity(
            tls.get_ref().1.peer_certificates(),
            validator,
            Purpose::ProxyToAgent,
            self.clock.now(),
        );
        // Read the StartupMessage even when the certificate is refused: a client answered
        // before it has sent its start-up can lose the answer to a connection reset.
        let timeout = self.config.handshake_timeout;
        let startup =
            tokio::time::timeout_at(deadline, read_startup(tls, &self.config.limits)).await;
        let verified = verified.map_err(SessionError::Identity)?;
        let identity = verified.identity();
        common.user = Some(identity.user.clone());
        let (message, rest) = startup.map_err(|_| SessionError::StartupTimeout { timeout })??;
        let params = StartupParams::from_message(&message).map_err(SessionError::Startup)?;
        common.db_user = Some(params.user.clone());
        common.db_name = Some(params.database.clone());

        let served = &self.route(identity, channel_database)?;
        common.protocol = Some(served.database.protocol.to_string());
        common.uri = Some(served.database.uri.clone());

        let roles = self
            .roles
            .roles(&identity.roles)
            .await
            .map_err(SessionError::Roles)?;
        // The database name as sent: check_access defaults an empty one to the db user
        // itself, and says so when it refuses.
        let db_name_sent = message
            .parameters
            .iter()
            .find(|(name, _)| name == b"database")
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
            .unwrap_or_default();
        let request = AccessRequest {
            database: &served.database,
            db_user: &params.user,
            db_name: &db_name_sent,
        };
        #[cfg(feature = "planted-bugs")]
        let access = self.planted_check_access(&roles, identity, request);
        #[cfg(not(feature = "planted-bugs"))]
        let access = check_access(&roles, &traits(identity), request);
        let access = access.map_err(SessionError::Denied)?;
        common.db_name = Some(access.db_name);
        let controls = self.controls(identity, &SessionOptions::of(&roles));
        // No database session for a session that could not be audited.
        if self.audit.is_closed() {
            return Err(SessionError::AuditUnavailable);
        }
        if let Some(gate) = &self.audit_gate {
            gate.check().map_err(SessionError::AuditFull)?;
        }

        let credential = self.credential(served, &params.user).await?;
        let upstream = served
            .target
            .connect(
                &self.net,
                credential,
                &params,
                &self.config.limits,
                self.config.connect_timeout,
            )
            .await
            .map_err(SessionError::Upstream)?;
        Ok((rest, upstream, controls))
    }

    /// A credential for `db_user` on `served`: a client certificate issued for an
    /// earlier session less than [`postern_pki::reuse::REUSE_MAX`] ago, or a new one. The database
    /// checks the same certificate either way; access was decided for this session.
    async fn credential(
        &self,
        served: &ServedDatabase,
        db_user: &str,
    ) -> Result<Credential, SessionError> {
        let issued = || {
            self.issued
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let key = (served.database.name.clone(), db_user.to_owned());
        let now = Instant::from_std(monotonic_now()).saturating_duration_since(self.origin);
        let now_secs = self.clock.now().as_secs();
        if let Some(credential) = issued().get(&key, now, now_secs) {
            return Ok(credential);
        }
        let credential = self
            .credentials
            .credential(served, db_user)
            .await
            .map_err(|source| SessionError::Credential {
                db_user: db_user.to_owned(),
                source,
            })?;
        if let Credential::ClientCert { chain, .. } = &credential
            && let Some(expires_secs) = chain.first().and_then(expires_secs)
        {
            issued().insert(key, credential.clone(), expires_secs, now, now_secs);
        }
        Ok(credential)
    }

    /// [`check_access`], or, with the planted bug on, a pass for a user this agent
    /// allowed before (whatever the db user asked for now).
    #[cfg(feature = "planted-bugs")]
    fn planted_check_access(
        &self,
        roles: &[Role],
        identity: &Identity,
        request: AccessRequest<'_>,
    ) -> Result<postern_auth::access::Access, Denial> {
        use postern_rt::planted::{Bug, active};
        let mut allowed = self
            .planted_allowed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if active(Bug::AgentSkipsSecondRoleCheck) && allowed.contains(&identity.user) {
            let db_name = if request.db_name.is_empty() {
                request.db_user
            } else {
                request.db_name
            };
            return Ok(postern_auth::access::Access {
                db_name: db_name.to_owned(),
                allowed_by: "(allowed before)".to_owned(),
            });
        }
        let access = check_access(roles, &traits(identity), request)?;
        allowed.insert(identity.user.clone());
        Ok(access)
    }

    /// The relay's limits from the roles' options: idle timeout, and the end at the
    /// user certificate's expiry (the proxy→agent certificate lives minutes; the user's
    /// expiry rides in [`SESSION_EXPIRES_TRAIT`]); and the agent's shutdown.
    fn controls(&self, identity: &Identity, options: &SessionOptions) -> Controls {
        let mut controls = Controls {
            idle_timeout: options.client_idle_timeout.filter(|t| !t.is_zero()),
            shutdown: Some(self.shutdown.subscribe()),
            ..Controls::default()
        };
        if options.disconnect_expired_cert {
            let expires_secs = identity
                .traits
                .get(SESSION_EXPIRES_TRAIT)
                .and_then(|values| values.first())
                .and_then(|secs| secs.parse::<u64>().ok())
                .unwrap_or_else(|| identity.expires.as_secs());
            let clock = self.clock.clone();
            let left = move || {
                let now_ms = clock.now_ms();
                let expires_ms = expires_secs.saturating_mul(1000);
                (expires_ms > now_ms).then(|| Duration::from_millis(expires_ms - now_ms))
            };
            let now = Instant::now();
            controls.expires_at = Some(left().map_or(now, |left| now + left));
            controls.check_expired = Some(Arc::new(left));
        }
        controls
    }

    /// The served database the certificate's route and the channel both name.
    fn route(
        &self,
        identity: &Identity,
        channel_database: &str,
    ) -> Result<ServedDatabase, SessionError> {
        let Some(route) = &identity.route else {
            // Purpose::ProxyToAgent requires a route; refuse rather than assume.
            return Err(SessionError::WrongDatabase {
                route: String::new(),
                channel: channel_database.to_owned(),
            });
        };
        if route.service != channel_database {
            return Err(SessionError::WrongDatabase {
                route: route.service.clone(),
                channel: channel_database.to_owned(),
            });
        }
        let served = self
            .databases
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|d| d.database.name == channel_database)
            .cloned()
            .ok_or_else(|| SessionError::NotServed {
                database: channel_database.to_owned(),
            })?;
        let protocol = served.database.protocol;
        let matches = matches!(
            (route.protocol, protocol),
            (DbProtocol::Postgres, Protocol::Postgres) | (DbProtocol::Mysql, Protocol::Mysql)
        );
        // Only PostgreSQL is relayed so far.
        if !matches || protocol != Protocol::Postgres {
            return Err(SessionError::WrongProtocol {
                database: channel_database.to_owned(),
                route: route.protocol.as_str(),
                served: protocol,
            });
        }
        Ok(served)
    }

    /// Tells the client, audits `TDB00W`, and hands the error back.
    async fn refuse(
        &self,
        tls: &mut TlsStream<Connection>,
        common: &Common,
        rng: &Rng,
        error: SessionError,
    ) -> SessionError {
        let mut out = Vec::new();
        if error.to_client().encode(&mut out).is_ok() {
            // The client may be gone already; the refusal stands either way.
            let _ = write_flush(tls, &out).await;
        }
        let _ = tls.shutdown().await;
        let event = common
            .event(codes::SESSION_START_FAILURE, &self.clock, rng)
            .with_error(&error);
        // A closed sink cannot record the refusal; the session is refused regardless.
        let _ = self.audit.send(event).await;
        error
    }

    /// Where the relay's events go: rendered from its views with the session's fields,
    /// straight to the audit sink; with the spool's gate, each chunk waits for its events
    /// to be fsync'd before it is forwarded.
    fn statement_events<'s>(
        &'s self,
        common: &'s Common,
        rng: &'s Rng,
    ) -> relay::EventOut<AuditEvent, impl Fn(EventView<'_>) -> AuditEvent + 's> {
        let render = move |view: EventView<'_>| common.statement_event(view, &self.clock, rng);
        let events = relay::EventOut::new(render, self.audit.clone());
        match &self.audit_gate {
            Some(gate) => events.durable(gate.durable(), |event: &AuditEvent| event.id.as_str()),
            None => events,
        }
    }

    async fn send_end(&self, common: &Common, rng: &Rng, end: &RelayEnd) {
        let mut event = common.event(codes::SESSION_END, &self.clock, rng);
        if *end != RelayEnd::Closed {
            event = event.with_error(relay_end_text(end));
        }
        // With the sink gone there is nobody to tell.
        let _ = self.audit.send(event).await;
    }
}

fn relay_end_text(end: &RelayEnd) -> String {
    match end {
        RelayEnd::Closed => "closed".to_owned(),
        RelayEnd::ClientError(e) => format!("the client broke the protocol: {e}"),
        RelayEnd::ServerError(e) => format!("the database broke the protocol: {e}"),
        RelayEnd::AuditClosed => "the audit log stopped accepting events".to_owned(),
        RelayEnd::Io(e) => format!("connection failed: {e}"),
        RelayEnd::IdleTimeout(timeout) => format!(
            "idle for {} s (role option client_idle_timeout)",
            timeout.as_secs()
        ),
        RelayEnd::CertExpired => {
            "the user's certificate expired (role option disconnect_expired_cert)".to_owned()
        }
        RelayEnd::Shutdown { told: true } => "the database agent shut down".to_owned(),
        RelayEnd::Shutdown { told: false } => "the database agent shut down (the client was \
             closed mid-message, without the ErrorResponse)"
            .to_owned(),
    }
}

/// The fields every event of one session carries.
#[derive(Debug)]
struct Common {
    cluster: String,
    session_id: String,
    db_service: String,
    client_addr: String,
    user: Option<String>,
    protocol: Option<String>,
    uri: Option<String>,
    db_name: Option<String>,
    db_user: Option<String>,
}

impl Common {
    fn event(&self, code: (&str, &str), clock: &WallClock, rng: &Rng) -> AuditEvent {
        let mut event = AuditEvent::new(code, wall_time(clock), &mut rng.clone());
        event.cluster = Some(self.cluster.clone());
        event.user = self.user.clone();
        event.session_id = Some(self.session_id.clone());
        event.db_service = Some(self.db_service.clone());
        event.protocol = self.protocol.clone();
        event.uri = self.uri.clone();
        event.db_name = self.db_name.clone();
        event.db_user = self.db_user.clone();
        if code.0 == codes::SESSION_START.0 {
            event = event.with_field("client_addr", self.client_addr.as_str());
        }
        event
    }

    /// A relay event as an audit record: query, parameters, statement and portal names,
    /// function OID, and the outcome (`success`, `command_tag`, `sqlstate`, `error`).
    /// Rendered from the relay's borrowed view: text is converted here, once.
    fn statement_event(&self, from: EventView<'_>, clock: &WallClock, rng: &Rng) -> AuditEvent {
        let mut event = self.event((from.name(), from.code()), clock, rng);
        if let Some(query) = from.query() {
            let query = text(query);
            let (shown, cut) = cut_to_json_budget(&query, QUERY_JSON_MAX);
            event = event.with_field("query", shown);
            if cut {
                event = event
                    .with_field("query_truncated", true)
                    .with_field("query_size", query.len());
            }
        }
        if !from.parameters().is_empty() {
            let mut budget = PARAMETERS_JSON_MAX;
            let mut truncated = false;
            let parameters: Vec<serde_json::Value> = from
                .parameters()
                .iter()
                .map(|p| match p {
                    None => serde_json::Value::Null,
                    Some(value) => {
                        let value = value.render();
                        let (shown, cut) = cut_to_json_budget(&value, budget);
                        budget -= json_len(shown);
                        truncated |= cut;
                        shown.into()
                    }
                })
                .collect();
            event = event.with_field("parameters", parameters);
            if truncated {
                event = event.with_field("parameters_truncated", true);
            }
        }
        if let Some(statement) = from.statement() {
            event = event.with_field("statement_name", text(statement).as_ref());
        }
        if let Some(portal) = from.portal() {
            event = event.with_field("portal_name", text(portal).as_ref());
        }
        if let Some(function) = from.function() {
            event = event.with_field("function_oid", function);
        }
        let outcome = match from.outcome() {
            OutcomeView::Succeeded { tag } => {
                if let Some(tag) = tag {
                    event = event.with_field("command_tag", text(tag).as_ref());
                }
                "succeeded"
            }
            OutcomeView::Suspended => "suspended",
            OutcomeView::Failed { code, message } => {
                event = event
                    .with_field("sqlstate", text(code).as_ref())
                    .with_error(text(message));
                "failed"
            }
            OutcomeView::Skipped => "skipped",
            OutcomeView::Unknown => "unknown",
            _ => "other",
        };
        event.with_field("outcome", outcome)
    }
}

/// Most bytes of JSON a statement event's query text takes; longer texts are cut (and
/// flagged), so that an event stays within the audit log's
/// [`postern_auth::audit::EVENT_SIZE_MAX`] beside its parameters and error.
pub const QUERY_JSON_MAX: usize = 24 * 1024;

/// Most bytes of JSON all parameters of one statement event take together.
pub const PARAMETERS_JSON_MAX: usize = 12 * 1024;

/// Bytes `c` takes inside a JSON string.
fn json_char_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if c < ' ' => 6,
        c => c.len_utf8(),
    }
}

fn json_len(text: &str) -> usize {
    text.chars().map(json_char_len).sum()
}

/// The longest prefix of `text` whose JSON string form fits `budget` bytes, and whether
/// it was cut.
fn cut_to_json_budget(text: &str, budget: usize) -> (&str, bool) {
    // Every char takes at most 6 bytes of JSON: short texts need no count.
    if text.len().saturating_mul(6) <= budget {
        return (text, false);
    }
    let mut used = 0;
    for (at, c) in text.char_indices() {
        used += json_char_len(c);
        if used > budget {
            return (&text[..at], true);
        }
    }
    (text, false)
}

fn wall_time(clock: &WallClock) -> OffsetDateTime {
    let nanos = i128::from(clock.now_ms()) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The certificate's traits in the shape role templates read: `db_users` and
/// `db_names` are the internal traits, every other name an external one (the inverse of
/// what the auth service writes).
fn traits(identity: &Identity) -> Traits {
    let mut traits = Traits::default();
    for (name, values) in &identity.traits {
        match name.as_str() {
            SESSION_EXPIRES_TRAIT => {}
            "db_users" => traits.db_users = values.clone(),
            "db_names" => traits.db_names = values.clone(),
            _ => {
                traits.external.insert(name.clone(), values.clone());
            }
        }
    }
    traits
}

/// Reads the first start-up packet; it must be a StartupMessage. Returns it and the
/// bytes read after it (pipelined queries).
async fn read_startup<S: AsyncRead + Unpin>(
    stream: &mut S,
    limits: &Limits,
) -> Result<(StartupMessage, Vec<u8>), SessionError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Some((request, used)) =
            StartupRequest::decode_from(&buf, limits).map_err(SessionError::Startup)?
        {
            buf.drain(..used);
            return match request {
                StartupRequest::Startup(message) => Ok((message, buf)),
                StartupRequest::Ssl => Err(SessionError::NotStartup {
                    what: "an SSLRequest (the proxy ends the client's TLS itself)",
                }),
                StartupRequest::GssEnc => Err(SessionError::NotStartup {
                    what: "a GSSENCRequest",
                }),
                StartupRequest::Cancel(_) => Err(SessionError::NotStartup {
                    what: "a CancelRequest",
                }),
                _ => Err(SessionError::NotStartup {
                    what: "another start-up packet",
                }),
            };
        }
        let n = stream.read_buf(&mut buf).await.map_err(SessionError::Io)?;
        if n == 0 {
            return Err(SessionError::StartupClosed);
        }
    }
}

async fn write_flush<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// A handshake failure; expiry and unknown issuers in words that say what to do.
fn explain_handshake(error: &io::Error) -> String {
    error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(postern_pki::tls::explain_handshake_error)
        .map_or_else(|| error.to_string(), |e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Cuts land on character boundaries and count JSON escapes, so the cut text's JSON
    // form never exceeds the budget; short texts are left whole.
    #[test]
    fn json_budget_cuts_on_char_boundaries_counting_escapes() {
        assert_eq!(cut_to_json_budget("select 1", 100), ("select 1", false));
        let quotes = "\"".repeat(100);
        let (shown, cut) = cut_to_json_budget(&quotes, 50);
        assert!(cut);
        assert_eq!(shown.len(), 25);
        let controls = "\u{1}".repeat(100);
        assert_eq!(cut_to_json_budget(&controls, 60).0.len(), 10);
        let accents = "é".repeat(100);
        let (shown, cut) = cut_to_json_budget(&accents, 101);
        assert!(cut);
        assert_eq!(shown.chars().count(), 50);
        for text in [quotes.as_str(), controls.as_str(), accents.as_str()] {
            let (shown, _) = cut_to_json_budget(text, 77);
            let encoded = serde_json::to_string(shown).unwrap();
            assert!(encoded.len() - 2 <= 77, "{encoded}");
            assert_eq!(json_len(shown), encoded.len() - 2);
        }
    }
}

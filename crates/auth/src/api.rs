//! The auth API: JSON over HTTP/1.1 over mutual TLS, served with axum on a listener
//! from the runtime seam, so it runs unchanged under turmoil.
//!
//! Every endpoint checks the caller's certificate and its role; the TLS layer only
//! proves the caller holds the key of a certificate chaining to a cluster CA. The one
//! exception is `POST /v1/join`, where a host without a certificate yet presents a
//! single-use join token instead.
//!
//! | endpoint | caller |
//! |---|---|
//! | `POST /v1/login` | proxy (forwards a user's password login) |
//! | `POST /v1/users/login` | anyone (a user's own password login, through the proxy's TLS passthrough) |
//! | `GET /v1/databases` | user |
//! | `POST /v1/databases/certs` | user (`postern db login`) |
//! | `POST /v1/db-access` | proxy (proxy→agent certificate) |
//! | `POST /v1/db-client` | agent (certificate for a self-hosted database) |
//! | `POST /v1/join` | anyone with a join token |
//! | `POST /v1/hosts/renew` | proxy or agent |
//! | `POST /v1/hosts/ssh` | proxy or agent (SSH certificate for the reverse tunnel) |
//! | `GET /v1/roles` | proxy or agent (every role, with a version to spot changes) |
//! | `POST /v1/registry/announce`, `/keepalive`, `/withdraw` | agent |
//! | `GET /v1/registry/servers/{name}` | proxy |
//! | `POST /v1/audit/events` | proxy or agent |
//! | `GET /v1/cas` | any cluster certificate |
//!
//! The TLS configuration is built per connection from the CAs trusted at that moment,
//! so a CA rotation takes effect without a restart.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use base64::Engine as _;
use postern_pki::{
    CaKind, HostRole, PrivateKey, PublicKey, Purpose, TrustedCa, VerifiedHost, VerifiedIdentity,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::Error;
use crate::audit::{AuditEvent, AuditLog, BATCH_EVENTS_MAX, BATCH_SIZE_MAX};
use crate::backend::{Backend, Revision};
use crate::database::Database;
use crate::server::{AuthServer, DatabaseServer, TokenKind};

/// Largest request body; larger ones get 413.
pub const REQUEST_SIZE_MAX: usize = 64 * 1024;
/// Largest body of `POST /v1/audit/events`: a full batch of events
/// ([`BATCH_SIZE_MAX`] bytes of them), the commas and brackets of its JSON array, and
/// room for another client's whitespace. Agents and proxies bound their batches by size
/// to stay under it.
pub const AUDIT_REQUEST_SIZE_MAX: usize = BATCH_SIZE_MAX + BATCH_EVENTS_MAX + 64 * 1024;
/// A TLS handshake that takes longer is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often expired leases are swept while the API serves.
pub const EXPIRY_PERIOD: Duration = Duration::from_secs(1);
/// Most TLS handshakes in progress at once; more connections wait to be accepted.
pub const HANDSHAKES_MAX: usize = 64;

/// The remote end of a connection: its address and the certificate it presented.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    pub cert: Option<CertificateDer<'static>>,
}

/// Connections whose TLS handshake finished, for axum to serve.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<postern_rt::Connection>, Peer)>,
    local_addr: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<postern_rt::Connection>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accepting task ended (its listener failed for good): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: Some(self.local_addr),
            cert: None,
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// The auth server's own TLS certificate, reissued when the host CA changes.
struct OwnCert {
    key: PrivateKey,
    names: Vec<String>,
    issued: tokio::sync::Mutex<Option<(Vec<u8>, CertificateDer<'static>, u64)>>,
}

impl<B: Backend, A: AuditLog> AuthServer<B, A> {
    async fn server_tls_config(&self, own: &OwnCert) -> Result<Arc<rustls::ServerConfig>, Error> {
        let host = self.ca_status(CaKind::Host).await?;
        let signer_ids: Vec<u8> = host
            .trusted
            .iter()
            .flat_map(|ca| ca.key_id().to_vec())
            .collect();
        let now = self.clock().now().as_secs();
        let mut issued = own.issued.lock().await;
        let fresh = issued
            .as_ref()
            .is_some_and(|(ids, _, renew_at)| *ids == signer_ids && *renew_at > now);
        if !fresh {
            let (cert, expires) = self
                .issue_own_auth_cert(own.names.clone(), &own.key.public_key())
                .await?;
            // Renew halfway through the lifetime.
            let renew_at = now + (expires.as_secs().saturating_sub(now)) / 2;
            *issued = Some((signer_ids, cert.der().clone(), renew_at));
        }
        let cert = issued
            .as_ref()
            .map(|(_, cert, _)| cert.clone())
            .into_iter()
            .collect();
        drop(issued);

        let mut roots = RootCertStore::empty();
        for ca in self.trusted_cas().await? {
            roots
                .add(ca.der().clone())
                .map_err(|error| Error::invalid("trusted CA", error.to_string()))?;
        }
        let provider = postern_pki::tls::ring_provider();
        let tls = |error: rustls::Error| Error::invalid("tls configuration", error.to_string());
        // Unauthenticated clients may connect (only to join); every other endpoint
        // refuses them. A certificate that does not chain to our CAs fails the handshake.
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|error| Error::invalid("tls configuration", error.to_string()))?;
        let config =
            rustls::ServerConfig::builder_with_details(provider, Arc::new(self.clock().clone()))
                .with_safe_default_protocol_versions()
                .map_err(tls)?
                .with_client_cert_verifier(verifier)
                .with_single_cert(cert, own.key.to_rustls())
                .map_err(tls)?;
        Ok(Arc::new(config))
    }
}

/// Accepts connections on `listener`, serves the API on them until the listener fails.
/// `names` are the DNS names or addresses clients reach this auth server by.
pub async fn serve<B: Backend, A: AuditLog>(
    server: Arc<AuthServer<B, A>>,
    listener: postern_rt::Listener,
    names: Vec<String>,
) -> Result<(), Error> {
    server.ensure_cas().await?;
    let local_addr = listener.local_addr().map_err(|source| Error::Io {
        path: "auth api listener".into(),
        source,
    })?;
    let own = Arc::new(OwnCert {
        key: PrivateKey::generate()?,
        names,
        issued: tokio::sync::Mutex::new(None),
    });
    {
        // Leases end on time for watchers too, not only for reads.
        let server = Arc::clone(&server);
        tokio::spawn(async move { server.expire_every(EXPIRY_PERIOD).await });
    }
    let (ready_tx, ready) = mpsc::channel(HANDSHAKES_MAX);
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_MAX));
    {
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            loop {
                if ready_tx.is_closed() {
                    break;
                }
                let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
                    break;
                };
                let connection = match listener.accept().await {
                    Ok(connection) => connection,
                    Err(error) => {
                        tracing::warn!(%error, "auth api: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (server, own, ready_tx) =
                    (Arc::clone(&server), Arc::clone(&own), ready_tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let addr = connection.peer_addr();
                    let config = match server.server_tls_config(&own).await {
                        Ok(config) => config,
                        Err(error) => {
                            tracing::warn!(%error, "auth api: no TLS configuration");
                            return;
                        }
                    };
                    match tokio::time::timeout(
                        HANDSHAKE_TIMEOUT,
                        TlsAcceptor::from(config).accept(connection),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => {
                            let cert = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|certs| certs.first().cloned());
                            let _ = ready_tx.send((stream, Peer { addr, cert })).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%error, ?addr, "auth api: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(?addr, "auth api: TLS handshake timed out"),
                    }
                });
            }
        });
    }
    let listener = TlsListener { ready, local_addr };
    axum::serve(
        listener,
        router(server).into_make_service_with_connect_info::<Peer>(),
    )
    .await
    .map_err(|source| Error::Io {
        path: "auth api".into(),
        source,
    })
}

/// The API's routes, over `server`.
pub fn router<B: Backend, A: AuditLog>(server: Arc<AuthServer<B, A>>) -> Router {
    Router::new()
        .route("/v1/login", post(login::<B, A>))
        .route("/v1/users/login", post(user_login::<B, A>))
        .route("/v1/databases", get(list_databases::<B, A>))
        .route("/v1/databases/certs", post(database_cert::<B, A>))
        .route("/v1/db-access", post(db_access::<B, A>))
        .route("/v1/db-client", post(db_client::<B, A>))
        .route("/v1/join", post(join::<B, A>))
        .route("/v1/hosts/renew", post(renew::<B, A>))
        .route("/v1/hosts/ssh", post(ssh_cert::<B, A>))
        .route("/v1/roles", get(roles::<B, A>))
        .route("/v1/registry/announce", post(announce::<B, A>))
        .route("/v1/registry/keepalive", post(keep_alive::<B, A>))
        .route("/v1/registry/withdraw", post(withdraw::<B, A>))
        .route("/v1/registry/servers/{name}", get(servers::<B, A>))
        .route(
            "/v1/audit/events",
            // Inside the router-wide limit below, so this one wins for this route.
            post(audit_events::<B, A>).layer(DefaultBodyLimit::max(AUDIT_REQUEST_SIZE_MAX)),
        )
        .route("/v1/cas", get(cas::<B, A>))
        .layer(DefaultBodyLimit::max(REQUEST_SIZE_MAX))
        .with_state(server)
}

// --- Errors ------------------------------------------------------------------------

/// An error response: a status and a message a person can act on.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        let status = match &error {
            Error::InvalidInput { .. } | Error::RoleFile { .. } => StatusCode::BAD_REQUEST,
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::AlreadyExists { .. } | Error::Conflict { .. } | Error::Rotation(_) => {
                StatusCode::CONFLICT
            }
            Error::LoginFailed { .. } => StatusCode::UNAUTHORIZED,
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::TokenRefused { .. } | Error::AccessDenied(_) => StatusCode::FORBIDDEN,
            Error::Certificate(error) => match error.category() {
                postern_pki::ErrorCategory::Issuing | postern_pki::ErrorCategory::Tls => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                _ => StatusCode::FORBIDDEN,
            },
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(%error, "auth api: internal error");
            return Self {
                status,
                message: "internal error in the auth service; its log has the details".to_owned(),
            };
        }
        Self {
            status,
            message: error.to_string(),
        }
    }
}

/// A JSON request body whose refusals are [`ApiError`]s too: oversize bodies name the
/// limit, malformed ones the field and position.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let status = rejection.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!(
            "request body too large; refused (at most {REQUEST_SIZE_MAX} bytes, \
             {AUDIT_REQUEST_SIZE_MAX} for audit events)"
        )
    } else {
        format!("invalid request body: {}", rejection.body_text())
    };
    ApiError { status, message }
}

fn unauthenticated() -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "no client certificate: this endpoint needs a cluster certificate (`postern login`, or a host that joined)".to_owned(),
    }
}

fn forbidden(message: String) -> ApiError {
    ApiError {
        status: StatusCode::FORBIDDEN,
        message,
    }
}

// --- Callers -----------------------------------------------------------------------

async fn host_caller<B: Backend, A: AuditLog>(
    server: &AuthServer<B, A>,
    peer: &Peer,
    roles: &[HostRole],
) -> Result<VerifiedHost, ApiError> {
    let cert = peer.cert.as_ref().ok_or_else(unauthenticated)?;
    let validator = server.validator().await?;
    let now = server.clock().now();
    let mut first_error = None;
    for role in roles {
        match validator.verify_host(cert, *role, now) {
            Ok(host) => return Ok(host),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    let wanted: Vec<&str> = roles.iter().map(|role| role.as_str()).collect();
    let reason = first_error
        .map(|error| error.to_string())
        .unwrap_or_default();
    Err(forbidden(format!(
        "this endpoint is for {} certificates: {reason}",
        wanted.join(" or ")
    )))
}

async fn user_caller<B: Backend, A: AuditLog>(
    server: &AuthServer<B, A>,
    peer: &Peer,
) -> Result<VerifiedIdentity, ApiError> {
    let cert = peer.cert.as_ref().ok_or_else(unauthenticated)?;
    let validator = server.validator().await?;
    validator
        .verify_identity(cert, Purpose::UserLogin, server.clock().now())
        .map_err(|error| forbidden(format!("this endpoint is for user certificates: {error}")))
}

fn public_key(field: &str, der_base64: &str) -> Result<PublicKey, ApiError> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(der_base64)
        .map_err(|error| ApiError::from(Error::invalid(field, format!("not base64: {error}"))))?;
    PublicKey::from_der(&der)
        .map_err(|error| ApiError::from(Error::invalid(field, error.to_string())))
}

fn pem_bundle(cas: &[TrustedCa]) -> String {
    cas.iter().map(TrustedCa::to_pem).collect()
}

// --- Requests and responses ----------------------------------------------------------

/// `POST /v1/login`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub user: String,
    pub password: String,
    #[serde(default)]
    pub totp: Option<String>,
    /// The address the user connected to the proxy from (rate limits, audit).
    pub source: IpAddr,
    /// The user's public key: SubjectPublicKeyInfo DER, base64.
    pub public_key: String,
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// `POST /v1/users/login`: a user logging in directly (`postern login`), before they
/// hold any certificate. The source address is the connection's, not a claim.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserLoginRequest {
    pub user: String,
    pub password: String,
    #[serde(default)]
    pub totp: Option<String>,
    /// The user's public key: SubjectPublicKeyInfo DER, base64.
    pub public_key: String,
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A certificate in PEM, with the CA bundle (PEM) to trust alongside.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertResponse {
    pub cert: String,
    pub cas: String,
}

/// `POST /v1/databases/certs`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseCertRequest {
    pub service: String,
    pub db_user: String,
    #[serde(default)]
    pub db_name: String,
    pub public_key: String,
}

/// One entry of `GET /v1/databases`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListedDatabaseResponse {
    pub name: String,
    pub description: String,
    pub protocol: String,
    pub labels: BTreeMap<String, String>,
}

/// `POST /v1/db-access`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbAccessRequest {
    /// The user's database certificate as the proxy received it: DER, base64.
    pub user_cert: String,
    pub public_key: String,
}

/// `POST /v1/db-client`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbClientRequest {
    pub db_user: String,
    pub public_key: String,
}

/// `POST /v1/join`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token: String,
    pub kind: TokenKind,
    pub host_id: String,
    #[serde(default)]
    pub names: Vec<String>,
    pub public_key: String,
}

/// `POST /v1/hosts/renew`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub public_key: String,
}

/// `POST /v1/hosts/ssh`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshCertRequest {
    /// The host's SSH public key, OpenSSH format (`ssh-ed25519 AAAA...`).
    pub public_key: String,
}

/// An SSH certificate for the reverse tunnel, OpenSSH format, and the host CA's SSH
/// public keys (OpenSSH format; two while the host CA rotates).
#[derive(Debug, Serialize, Deserialize)]
pub struct SshCertResponse {
    pub cert: String,
    pub host_ca_keys: Vec<String>,
}

/// `GET /v1/roles`: every role, and a version that changes whenever any role does
/// (hosts poll it and refresh their cache when the version moves).
#[derive(Debug, Serialize, Deserialize)]
pub struct RolesResponse {
    pub version: String,
    pub roles: Vec<crate::role::Role>,
}

/// `POST /v1/registry/announce`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceRequest {
    pub database: Database,
    pub ttl_secs: u64,
}

/// `POST /v1/registry/keepalive`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepAliveRequest {
    pub db_name: String,
    pub revision: u64,
    pub ttl_secs: u64,
}

/// `POST /v1/registry/withdraw`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WithdrawRequest {
    pub db_name: String,
}

/// The revision of an announcement, for keep-alives.
#[derive(Debug, Serialize, Deserialize)]
pub struct RevisionResponse {
    pub revision: u64,
}

/// How many events of a batch were new.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredResponse {
    pub stored: usize,
}

// --- Handlers ----------------------------------------------------------------------

async fn login<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    ApiJson(request): ApiJson<LoginRequest>,
) -> Result<Json<CertResponse>, ApiError> {
    host_caller(&server, &peer, &[HostRole::Proxy]).await?;
    let key = public_key("public_key", &request.public_key)?;
    let login = server
        .login(
            &request.user,
            &request.password,
            request.totp.as_deref(),
            request.source,
            &key,
            request.ttl_secs.map(Duration::from_secs),
        )
        .await?;
    Ok(Json(CertResponse {
        cert: login.cert.to_pem(),
        cas: pem_bundle(&login.host_cas),
    }))
}

/// Like [`login`], for a user without a certificate: the same password, TOTP and rate
/// limit checks, keyed on the address the connection came from.
async fn user_login<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    ApiJson(request): ApiJson<UserLoginRequest>,
) -> Result<Json<CertResponse>, ApiError> {
    let key = public_key("public_key", &request.public_key)?;
    let source = peer
        .addr
        .map(|addr| addr.ip())
        .unwrap_or(IpAddr::from([0u8, 0, 0, 0]));
    let login = server
        .login(
            &request.user,
            &request.password,
            request.totp.as_deref(),
            source,
            &key,
            request.ttl_secs.map(Duration::from_secs),
        )
        .await?;
    Ok(Json(CertResponse {
        cert: login.cert.to_pem(),
        cas: pem_bundle(&login.host_cas),
    }))
}

async fn list_databases<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> Result<Json<Vec<ListedDatabaseResponse>>, ApiError> {
    let caller = user_caller(&server, &peer).await?;
    let user = server.state().user(&caller.identity().user).await?;
    let listed = server.list_databases(Some(&user)).await?;
    Ok(Json(
        listed
            .into_iter()
            .map(|listed| ListedDatabaseResponse {
                name: listed.database.name,
                description: listed.database.description,
                protocol: listed.database.protocol.to_string(),
                labels: listed.database.labels,
            })
            .collect(),
    ))
}

async fn database_cert<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    ApiJson(request): ApiJson<DatabaseCertRequest>,
) -> Result<Json<CertResponse>, ApiError> {
    let caller = user_caller(&server, &peer).await?;
    let key = public_key("public_key", &request.public_key)?;
    let cert = server
        .reissue_for_database(
            &caller,
            &request.service,
            &request.db_user,
            &request.db_name,
            &key,
        )
        .await?;
    Ok(Json(CertResponse {
        cert: cert.to_pem(),
        cas: pem_bundle(&server.ca_status(CaKind::Host).await?.trusted),
    }))
}

async fn db_access<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    ApiJson(request): ApiJson<DbAccessRequest>,
) -> Result<Json<CertResponse>, ApiError> {
    let proxy = host_caller(&server, &peer, &[HostRole::Proxy]).await?;
    let key = public_key("public_key", &request.public_key)?;
    let user_cert = base64::engine::general_purpose::STANDARD
        .decode(&request.user_cert)
        .map_err(|error| {
            ApiError::from(Error::invalid("user_cert", format!("not base64: {error}")))
        })?;
    let (_, cert) = server.issue_db_access(&proxy, &user_cert, &key).await?;
    Ok(Json(CertResponse {
        cert: cert.to_pem(),
        cas: pem_bundle(&server.ca_status(CaKind::Host).await?.trusted),
    }))
}

async fn db_client<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    ApiJson(request): ApiJson<DbClientRequest>,
) -> Result<Json<CertResponse>, ApiError> {
    let agent = host_caller(&server, &peer, &[HostRole::Agent]).await?;
    let key = public_key("public_key", &request.public_key)?;
    let cert = server
        .issue_db_client(&agent, &request.db_user, &key)
        .await?;
    Ok(Json(CertResponse {
        cert: cert.to_pem(),
        cas: pem_bundle(&server.ca_status(CaKind::Db).await?.trusted),
    }))
}

async fn join<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ApiJson(request): ApiJson<JoinRequest>,
) -> Result<Json<CertResponse>, ApiError> {
    let key = public_key("public_key", &request.public_key)?;
    let host = server
        .join(
            &request.token,
            request.kind,
            &request.host_id,
            request.names,
            &key,
        )
        .await?;
    Ok(Json(CertResponse {
        cert: host.cert.to_pem(),
        cas: pem_bundle(&host.trusted),
    }))
}

async fn renew<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    ApiJson(request): ApiJson<RenewRequest>,
) -> Result<Json<CertResponse>, ApiError> {
    let host = host_caller(&server, &peer, &[HostRole::Proxy, HostRole::Agent]).await?;
    let key = public_key("public_key", &request.public_key)?;
    let renewed = server.renew_host(&host, &key).await?;
    Ok(Json(CertResponse {
        cert: renewed.cert.to_pem(),
        cas: pem_bundle(&renewed.trusted),
    }))
}

async fn ssh_cert<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    ApiJson(request): ApiJson<SshCertRequest>,
) -> Result<Json<SshCertResponse>, ApiError> {
    use postern_pki::ssh::ssh_key;
    let host = host_caller(&server, &peer, &[HostRole::Proxy, HostRole::Agent]).await?;
    let key = ssh_key::PublicKey::from_openssh(request.public_key.trim()).map_err(|error| {
        ApiError::from(Error::invalid(
            "public_key",
            format!("not an OpenSSH public key: {error}"),
        ))
    })?;
    let issued = server.issue_ssh_for_host(&host, &key).await?;
    let openssh = |error: ssh_key::Error| {
        ApiError::from(Error::invalid("ssh certificate", error.to_string()))
    };
    let cert = issued.cert.to_openssh().map_err(openssh)?;
    let host_ca_keys = issued
        .host_ca_keys
        .iter()
        .map(|key| key.to_openssh().map_err(openssh))
        .collect::<Result<_, _>>()?;
    Ok(Json(SshCertResponse { cert, host_ca_keys }))
}

async fn roles<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> Result<Json<RolesResponse>, ApiError> {
    host_caller(&server, &peer, &[HostRole::Proxy, HostRole::Agent]).await?;
    let roles = server.state().roles().await?;
    let encoded = serde_json::to_vec(&roles)
        .map_err(|error| ApiError::from(Error::invalid("roles", error.to_string())))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &encoded);
    let version = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Json(RolesResponse { version, roles }))
}

async fn announce<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    ApiJson(request): ApiJson<AnnounceRequest>,
) -> Result<Json<RevisionResponse>, ApiError> {
    let agent = host_caller(&server, &peer, &[HostRole::Agent]).await?;
    let revision = server
        .announce_database(
            &agent.host().host_id,
            &request.database,
            Duration::from_secs(request.ttl_secs),
        )
        .await?;
    Ok(Json(RevisionResponse {
        revision: revision.0,
    }))
}

async fn keep_alive<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    ApiJson(request): ApiJson<KeepAliveRequest>,
) -> Result<StatusCode, ApiError> {
    let agent = host_caller(&server, &peer, &[HostRole::Agent]).await?;
    server
        .keep_database_alive(
            &agent.host().host_id,
            &request.db_name,
            Revision(request.revision),
            Duration::from_secs(request.ttl_secs),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn withdraw<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    ApiJson(request): ApiJson<WithdrawRequest>,
) -> Result<StatusCode, ApiError> {
    let agent = host_caller(&server, &peer, &[HostRole::Agent]).await?;
    server
        .withdraw_database(&agent.host().host_id, &request.db_name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn servers<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> Result<Json<Vec<DatabaseServer>>, ApiError> {
    host_caller(&server, &peer, &[HostRole::Proxy]).await?;
    Ok(Json(server.servers_of(&name).await?))
}

async fn audit_events<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    ApiJson(events): ApiJson<Vec<AuditEvent>>,
) -> Result<Json<StoredResponse>, ApiError> {
    host_caller(&server, &peer, &[HostRole::Proxy, HostRole::Agent]).await?;
    let stored = server.audit_log().emit(&events).await?;
    Ok(Json(StoredResponse { stored }))
}

async fn cas<B: Backend, A: AuditLog>(
    State(server): State<Arc<AuthServer<B, A>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> Result<String, ApiError> {
    let cert = peer.cert.as_ref().ok_or_else(unauthenticated)?;
    let validator = server.validator().await?;
    let now = server.clock().now();
    let is_user = validator
        .verify_identity(cert, Purpose::UserLogin, now)
        .is_ok();
    let is_host = [HostRole::Proxy, HostRole::Agent, HostRole::Auth]
        .into_iter()
        .any(|role| validator.verify_host(cert, role, now).is_ok());
    if !is_user && !is_host {
        return Err(forbidden(
            "the certificate presented is not a valid cluster certificate".to_owned(),
        ));
    }
    Ok(pem_bundle(&server.trusted_cas().await?))
}

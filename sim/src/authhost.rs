//! The auth service in the simulation: the real [`AuthServer`] and its HTTPS API
//! (`postern_auth::api::serve`) on the `auth` host, over an in-memory state backend and
//! audit log that outlive the host's crashes (as a database outlives its server
//! process). Agents join, announce, read roles and ship audit events to it over the
//! API; proxies join and get their CAs, SSH certificates and proxy→agent certificates
//! from it.
//!
//! The harness administers the cluster as `postern admin` would, through an
//! [`Admin`]: a second `AuthServer` over the same backend and audit log, on a clock the
//! harness sets between simulation steps. It creates the CAs, the roles and the join
//! tokens before the run, revokes and restores roles and rotates CAs during it.

use std::collections::BTreeSet;
use std::error::Error as StdError;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use base64::Engine as _;
use postern_auth::api::JoinRequest;
use postern_auth::audit::{AuditEvent, AuditLog, AuditQuery, MemoryAuditLog};
use postern_auth::backend::MemoryBackend;
use postern_auth::client::AuthClient;
use postern_auth::limiter::LoginLimits;
use postern_auth::server::{AuthConfig, AuthServer, TokenKind};
use postern_auth::user::PasswordCost;
use postern_pki::{CaKind, IssuedCert, PrivateKey, TrustedCa, VerifiedIdentity};
use postern_proxy::dispatch::DbAccessSigner;
use postern_proxy::service::{Listen, ProxyLimits, ProxyService};
use postern_proxy::start::{AuthApi, FromAuth, ProxySettings, configure_from_auth};
use postern_rt::{Blocking, Net, Rng, Runtime, WallClock};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::world::World;

/// The port the auth API listens on.
pub const PORT: u16 = 3025;
/// The name on the auth server's certificate, which hosts check.
pub const SERVER_NAME: &str = "auth";
/// The cluster's name.
pub const CLUSTER: &str = "sim";
/// Who the harness's administrative actions are audited as.
const ADMIN: &str = "sim-admin";
/// Password hashing as cheap as argon2 allows: the simulation logs nobody in by
/// password, and the auth server hashes a dummy password at every start.
const CHEAP_PASSWORDS: PasswordCost = PasswordCost {
    memory_kib: 8,
    passes: 1,
};
/// How often proxies read the cluster's CAs from auth (the agents' roles poll period).
const CA_POLL_PERIOD: Duration = Duration::from_secs(1);
/// First and longest wait between a proxy's start-up attempts while auth is away.
const STARTUP_RETRY_MIN: Duration = Duration::from_millis(250);
const STARTUP_RETRY_MAX: Duration = Duration::from_secs(2);

type BoxError = Box<dyn StdError + Send + Sync>;

/// The auth address hosts dial.
pub fn addr() -> String {
    format!("{SERVER_NAME}:{PORT}")
}

fn config() -> AuthConfig {
    AuthConfig {
        cluster: CLUSTER.to_owned(),
        password_cost: CHEAP_PASSWORDS,
        login_limits: LoginLimits::default(),
    }
}

/// Runs a future that never waits (the in-memory backend and audit log complete every
/// call at once) to its end, outside any runtime: the harness acts between steps.
fn at_once<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(value) => value,
        // Invariant: `Admin` only runs operations of the in-memory backend and audit
        // log, which never return Pending.
        Poll::Pending => panic!("an administrative operation waited"),
    }
}

/// The state auth keeps across its crashes: backend and audit log.
#[derive(Clone, Debug)]
pub struct AuthState {
    pub backend: MemoryBackend,
    pub audit: MemoryAuditLog,
    /// The backend's clock (lease expiry): the harness sets it to the simulated time.
    pub clock: WallClock,
}

/// The harness's administrative handle on auth.
#[derive(Debug)]
pub struct Admin {
    server: AuthServer<MemoryBackend, MemoryAuditLog>,
}

impl Admin {
    /// A fresh cluster: CAs valid since 30 days before `epoch_secs`, and `roles`.
    pub fn bootstrap(
        seed: u64,
        epoch_secs: u64,
        roles: &[postern_auth::role::Role],
    ) -> (Self, AuthState) {
        let start = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            epoch_secs - 30 * 86_400,
        ));
        let clock = WallClock::manual(start);
        let state = AuthState {
            backend: MemoryBackend::new(Arc::new(clock.clone())),
            audit: MemoryAuditLog::new(),
            clock: clock.clone(),
        };
        // Invariant: the configuration above is valid, and nothing below waits.
        let server = AuthServer::new(
            state.backend.clone(),
            state.audit.clone(),
            clock.clone(),
            Rng::from_seed(seed ^ 0xad31_0000),
            config(),
        )
        .expect("the admin auth server")
        .with_blocking(Blocking::Inline);
        at_once(server.ensure_cas()).expect("the cluster's CAs");
        at_once(server.apply_roles(ADMIN, roles)).expect("the roles");
        clock.set(rustls_pki_types::UnixTime::since_unix_epoch(
            Duration::from_secs(epoch_secs),
        ));
        (Self { server }, state)
    }

    /// Sets the admin's (and the backend's) clock to simulated `now`.
    pub fn set_now(&self, now_secs: u64) {
        self.server
            .clock()
            .set(rustls_pki_types::UnixTime::since_unix_epoch(
                Duration::from_secs(now_secs),
            ));
    }

    /// The CA that signs certificates of `kind` now.
    pub fn signing_ca(&self, kind: CaKind) -> postern_pki::CertAuthority {
        at_once(self.server.signing_ca(kind)).expect("a CA")
    }

    /// The CA certificates trusted for `kind` now (two while it rotates).
    pub fn trusted(&self, kind: CaKind) -> Vec<TrustedCa> {
        at_once(self.server.ca_status(kind))
            .expect("a CA status")
            .trusted
    }

    pub fn join_token(&self, kind: TokenKind) -> String {
        at_once(
            self.server
                .create_join_token(ADMIN, kind, Duration::from_secs(86_400)),
        )
        .expect("a join token")
    }

    /// Deletes a role; `None` if it did not exist.
    pub fn revoke_role(&self, name: &str) -> Option<postern_auth::role::Role> {
        let role = at_once(self.server.state().role(name)).ok()?;
        at_once(self.server.delete_role(ADMIN, name)).ok()?;
        Some(role)
    }

    pub fn restore_role(&self, role: postern_auth::role::Role) {
        at_once(self.server.apply_roles(ADMIN, &[role])).expect("a role restored");
    }

    /// Moves the rotation of `kind` one phase on; returns the new phase.
    pub fn rotate(&self, kind: CaKind) -> Result<String, String> {
        at_once(self.server.rotate_ca(ADMIN, kind))
            .map(|phase| phase.to_string())
            .map_err(|e| e.to_string())
    }

    /// The rotation phase of `kind`.
    pub fn phase(&self, kind: CaKind) -> String {
        at_once(self.server.ca_status(kind))
            .expect("a CA status")
            .phase
            .to_string()
    }

    /// Database servers announced for `db` (live leases), by host id.
    pub fn servers_of(&self, db: &str) -> BTreeSet<String> {
        at_once(self.server.servers_of(db))
            .map(|servers| servers.into_iter().map(|s| s.host_id).collect())
            .unwrap_or_default()
    }

    /// Every audit event auth stored, each once.
    pub fn stored_events(&self, state: &AuthState) -> Result<Vec<AuditEvent>, String> {
        let far = time::Duration::days(3650);
        let query = AuditQuery::between(
            time::OffsetDateTime::UNIX_EPOCH,
            time::OffsetDateTime::UNIX_EPOCH + far * 10,
        );
        let events = at_once(state.audit.search(&query)).map_err(|e| e.to_string())?;
        if events.len() >= query.limit {
            return Err(format!(
                "auth stored {} or more audit events, more than one search returns",
                events.len()
            ));
        }
        Ok(events)
    }
}

/// The audit log the auth host serves: the shared in-memory log (idempotent by event
/// id), noting each shipment in the trace.
#[derive(Clone, Debug)]
pub struct TracedAuditLog {
    pub inner: MemoryAuditLog,
    pub world: World,
}

impl AuditLog for TracedAuditLog {
    async fn emit(&self, events: &[AuditEvent]) -> Result<usize, postern_auth::Error> {
        let new = self.inner.emit(events).await?;
        // Auth's own events (certificates issued, joins) are not shipments.
        let shipped: Vec<String> = events
            .iter()
            .filter(|e| e.event.starts_with("db."))
            .map(|e| e.id.clone())
            .collect();
        if !shipped.is_empty() {
            self.world.stored(&shipped);
            self.world.record(
                SERVER_NAME,
                format!(
                    "stored {new} audit events ({} resent)",
                    shipped.len() - new.min(shipped.len())
                ),
            );
        }
        Ok(new)
    }

    async fn search(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, postern_auth::Error> {
        self.inner.search(query).await
    }
}

/// One incarnation of the auth host: the real server and API until crashed.
pub async fn serve(
    state: AuthState,
    world: World,
    clock: WallClock,
    seed: u64,
    incarnation: u64,
) -> turmoil::Result {
    world.record(SERVER_NAME, format!("start (incarnation {incarnation})"));
    let server = AuthServer::new(
        state.backend,
        TracedAuditLog {
            inner: state.audit,
            world,
        },
        clock,
        Rng::from_seed(seed),
        config(),
    )?
    .with_blocking(Blocking::Inline);
    let listener = Net::Turmoil.listen(&format!("0.0.0.0:{PORT}")).await?;
    postern_auth::api::serve(Arc::new(server), listener, vec![SERVER_NAME.to_owned()]).await?;
    Ok(())
}

/// Signs proxy→agent certificates through the auth API (`POST /v1/db-access`), as
/// `postern start` does for its proxy. The dispatcher calls it with the identity the
/// front door just admitted, so the simulator checks that identity here: it must be
/// valid by the proxy's own clock.
#[derive(Debug)]
pub struct ApiSigner {
    auth: AuthClient,
    proxy: String,
    clock: WallClock,
    world: World,
}

impl DbAccessSigner for ApiSigner {
    async fn sign(
        &self,
        user: &VerifiedIdentity,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        // Certificate times are whole seconds.
        let identity = user.identity();
        let (now, expires) = (self.clock.now().as_secs(), identity.expires.as_secs());
        if now > expires + 1 {
            self.world.violation(
                &self.proxy,
                format!(
                    "front door admitted {} with a certificate expired {}s ago",
                    identity.user,
                    now - expires
                ),
            );
        }
        self.auth.db_access_cert(user.cert_der()).await
    }
}

/// A proxy's host certificate and key (PEM), kept across its restarts as `postern
/// start` keeps them under its data folder.
pub type SavedHost = Arc<Mutex<Option<(String, String)>>>;

/// Everything a proxy host needs to start, as `postern start` builds it.
#[derive(Debug)]
pub struct ProxyHost {
    pub name: String,
    pub join_token: String,
    /// The host CA bundle (PEM) the auth server's certificate must chain to.
    pub auth_ca_pem: String,
    pub saved: SavedHost,
    pub postgres_port: u16,
    pub tunnel_port: u16,
}

/// One incarnation of a proxy: join (or reuse the saved certificate), fetch the CAs
/// and an SSH certificate from auth (retrying while auth is away), then the real
/// [`ProxyService`] until crashed.
pub async fn run_proxy(host: &ProxyHost, runtime: Runtime, world: &World) -> turmoil::Result {
    let mut delay = STARTUP_RETRY_MIN;
    let mut waited = false;
    let (service, auth, user_cas) = loop {
        match build_proxy(host, &runtime, world).await {
            Ok(built) => break built,
            Err(error) => {
                if !waited {
                    world.record(&host.name, format!("start-up waits for auth: {error}"));
                    waited = true;
                }
            }
        }
        tokio::time::sleep(runtime.rng().jitter(delay, 200)).await;
        delay = (delay * 2).min(STARTUP_RETRY_MAX);
    };
    world.record(&host.name, "proxy service running");
    // CA rotations: the front doors follow the user CAs auth lists.
    let handle = service.handle();
    tokio::spawn(async move {
        let apply = |cas: &[TrustedCa]| handle.set_user_cas(cas).map_err(|e| e.to_string());
        auth.follow_user_cas(user_cas, CA_POLL_PERIOD, apply).await;
    });
    service.run(std::future::pending()).await?;
    Ok(())
}

/// The proxy service, its auth client and the user CAs it trusts at start.
type BuiltProxy = (ProxyService<ApiSigner>, AuthClient, Vec<TrustedCa>);

async fn build_proxy(
    host: &ProxyHost,
    runtime: &Runtime,
    world: &World,
) -> Result<BuiltProxy, BoxError> {
    let auth_cas = TrustedCa::from_pem_bundle(&host.auth_ca_pem)?;
    let clock = Arc::new(runtime.clock().clone());
    let b64 = base64::engine::general_purpose::STANDARD;
    let saved = host
        .saved
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let (cert_pem, key_pem) = match saved {
        Some(saved) => saved,
        None => {
            let anonymous = AuthClient::new(
                *runtime.net(),
                &addr(),
                SERVER_NAME,
                &auth_cas,
                None,
                clock.clone(),
            )?;
            let key = PrivateKey::generate()?;
            let joined = anonymous
                .join(&JoinRequest {
                    token: host.join_token.clone(),
                    kind: TokenKind::Proxy,
                    host_id: host.name.clone(),
                    names: vec![host.name.clone()],
                    public_key: b64.encode(key.public_key().der()),
                })
                .await?;
            let saved = (joined.cert, key.to_pem());
            *host.saved.lock().unwrap_or_else(PoisonError::into_inner) = Some(saved.clone());
            saved
        }
    };
    let settings = ProxySettings {
        cluster: CLUSTER.to_owned(),
        listen: Listen {
            postgres: format!("0.0.0.0:{}", host.postgres_port),
            web: None,
            tunnel: format!("0.0.0.0:{}", host.tunnel_port),
        },
        auth_api_addr: None,
        limits: ProxyLimits::default(),
    };
    let api = AuthApi {
        addr: &addr(),
        server_name: SERVER_NAME,
        cas: &auth_cas,
    };
    let cert = IssuedCert::from_pem(&cert_pem)?;
    let key = PrivateKey::from_pem(&key_pem)?;
    let FromAuth { config, auth } = configure_from_auth(runtime, api, cert, key, settings).await?;
    let user_cas = config.user_cas.clone();
    let signer = ApiSigner {
        auth: auth.clone(),
        proxy: host.name.clone(),
        clock: runtime.clock().clone(),
        world: world.clone(),
    };
    Ok((ProxyService::new(runtime, config, signer)?, auth, user_cas))
}

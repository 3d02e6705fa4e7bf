//! The certificate authorities and everything the auth server signs: user certs at
//! login, database-routed certs after an access check, proxy→agent certs, database
//! client certs for agents, host certs for joining proxies and agents, and database
//! server certs for `admin auth sign`.
//!
//! CA rotation goes through four phases, one [`AuthServer::rotate_ca`] call each:
//!
//! | phase | signs with | trusted |
//! |---|---|---|
//! | standby | current | current |
//! | init | current | current + next |
//! | update_clients | next | current + next |
//! | update_servers | next | current + next |
//! | back to standby | next (now current) | next only; the old one is retired |
//!
//! CAs (with their private keys) live in the state backend under `/cas/KIND`, so every
//! auth server sharing the backend signs with the same keys.

use std::net::IpAddr;
use std::time::Duration;

use postern_pki::{
    CaKind, CaPem, CertAuthority, DbProtocol, DbRoute, DbServerFiles, HostIdentity, HostRole,
    Identity, IssuedCert, LIST_LEN_MAX, PublicKey, Purpose, TrustedCa, USER_CERT_TTL_DEFAULT,
    Usage, Validator, VerifiedHost, VerifiedIdentity,
};
use rustls_pki_types::UnixTime;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::access::{AccessRequest, SessionOptions, check_access};
use crate::audit::{AuditLog, codes};
use crate::backend::{Backend, Expect};
use crate::database::Protocol;
use crate::role::Role;
use crate::server::{AuthServer, TokenKind};
use crate::user::{Traits, User};

/// Lifetime of a new CA.
pub const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of proxy→agent certificates: long enough to connect, no longer.
pub const DB_ACCESS_CERT_TTL: Duration = Duration::from_secs(10 * 60);
/// Trait of proxy→agent certificates carrying the user certificate's expiry (Unix
/// seconds): sessions end then when a role sets `disconnect_expired_cert`.
pub const SESSION_EXPIRES_TRAIT: &str = "postern:session_expires";
/// Lifetime of the certificates agents present to databases.
pub const DB_CLIENT_CERT_TTL: Duration = Duration::from_secs(60 * 60);
/// Lifetime of proxy and agent host certificates.
pub const HOST_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The kinds of CA, in the order they are created and listed.
pub const CA_KINDS: [CaKind; 3] = [CaKind::User, CaKind::Host, CaKind::Db];

/// Where a CA rotation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationPhase {
    Standby,
    Init,
    UpdateClients,
    UpdateServers,
}

impl std::fmt::Display for RotationPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Standby => "standby",
            Self::Init => "init",
            Self::UpdateClients => "update_clients",
            Self::UpdateServers => "update_servers",
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredCaPem {
    cert: String,
    key: String,
    ssh_key: Option<String>,
}

impl From<CaPem> for StoredCaPem {
    fn from(pem: CaPem) -> Self {
        Self {
            cert: pem.cert,
            key: pem.key,
            ssh_key: pem.ssh_key,
        }
    }
}

impl StoredCaPem {
    fn load(&self) -> Result<CertAuthority, Error> {
        Ok(CertAuthority::from_pem(&CaPem {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ssh_key: self.ssh_key.clone(),
        })?)
    }
}

/// One kind of CA with its rotation state.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredCas {
    phase: RotationPhase,
    current: StoredCaPem,
    next: Option<StoredCaPem>,
    /// Certificates (PEM) of CAs rotated out: never trusted, named in errors.
    retired: Vec<String>,
}

fn ca_key(kind: CaKind) -> String {
    format!("/cas/{}", kind_name(kind))
}

fn kind_name(kind: CaKind) -> &'static str {
    match kind {
        CaKind::User => "user",
        CaKind::Host => "host",
        CaKind::Db => "db",
    }
}

/// A user certificate and what the client needs beside it.
#[derive(Debug, Clone)]
pub struct LoginCert {
    pub cert: IssuedCert,
    pub identity: Identity,
    /// The host CAs to trust when talking to proxies.
    pub host_cas: Vec<TrustedCa>,
}

/// A host certificate for a proxy or agent that joined, with the CAs it needs.
#[derive(Debug, Clone)]
pub struct HostCert {
    pub cert: IssuedCert,
    pub host: HostIdentity,
    /// Every trusted CA of every kind.
    pub trusted: Vec<TrustedCa>,
}

/// A host's SSH certificate for the reverse tunnel, with the host CA keys to trust.
#[derive(Debug, Clone)]
pub struct SshHostCert {
    pub cert: postern_pki::ssh::ssh_key::Certificate,
    pub host_ca_keys: Vec<postern_pki::ssh::ssh_key::PublicKey>,
}

/// What a CA kind's rotation looks like now.
#[derive(Debug, Clone)]
pub struct CaStatus {
    pub kind: CaKind,
    pub phase: RotationPhase,
    pub trusted: Vec<TrustedCa>,
}

fn identity_traits(traits: &Traits) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut map = traits.external.clone();
    if !traits.db_users.is_empty() {
        map.insert("db_users".to_owned(), traits.db_users.clone());
    }
    if !traits.db_names.is_empty() {
        map.insert("db_names".to_owned(), traits.db_names.clone());
    }
    map
}

/// The db users or names a user's roles allow, for display: `*` and expanded values.
fn allowed(
    roles: &[Role],
    traits: &Traits,
    pick: fn(&Role) -> &[crate::role::Pattern],
) -> Vec<String> {
    let mut values: Vec<String> = roles
        .iter()
        .flat_map(|role| pick(role).iter().flat_map(|pattern| pattern.expand(traits)))
        .map(|matcher| matcher.to_string())
        .collect();
    values.sort();
    values.dedup();
    values.truncate(LIST_LEN_MAX);
    values
}

fn later(now: UnixTime, ttl: Duration) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(
        now.as_secs().saturating_add(ttl.as_secs()),
    ))
}

impl<B: Backend, A: AuditLog> AuthServer<B, A> {
    async fn load_cas(&self, kind: CaKind) -> Result<(StoredCas, crate::backend::Revision), Error> {
        let key = ca_key(kind);
        loop {
            if let Some(item) = self.state().backend().get(&key).await? {
                let stored =
                    serde_json::from_slice(&item.value).map_err(|error| Error::Corrupt {
                        what: format!("CA at {key}"),
                        detail: error.to_string(),
                    })?;
                return Ok((stored, item.revision));
            }
            // First start: create it. Of several auth servers racing, one wins and the
            // others read the winner's.
            let ca =
                CertAuthority::generate(kind, &self.config().cluster, self.clock().now(), CA_TTL)?;
            let stored = StoredCas {
                phase: RotationPhase::Standby,
                current: ca.to_pem()?.into(),
                next: None,
                retired: Vec::new(),
            };
            let value = serde_json::to_vec(&stored)
                .map_err(|error| Error::invalid("CA", error.to_string()))?;
            match self
                .state()
                .backend()
                .compare_and_swap(&key, Expect::Absent, &value, None)
                .await
            {
                Ok(_) | Err(Error::Conflict { .. }) => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// Creates the CAs that do not exist yet.
    pub async fn ensure_cas(&self) -> Result<(), Error> {
        for kind in CA_KINDS {
            self.load_cas(kind).await?;
        }
        Ok(())
    }

    /// The CA that signs new certificates of `kind` in the current phase.
    async fn signer(&self, kind: CaKind) -> Result<CertAuthority, Error> {
        let (stored, _) = self.load_cas(kind).await?;
        match (stored.phase, &stored.next) {
            (RotationPhase::UpdateClients | RotationPhase::UpdateServers, Some(next)) => {
                next.load()
            }
            _ => stored.current.load(),
        }
    }

    /// The CA that signs new certificates of `kind` now (the next one from the
    /// update_clients phase of a rotation on). For tools and the simulator, which issue
    /// certificates as the auth server would without going through its API.
    pub async fn signing_ca(&self, kind: CaKind) -> Result<CertAuthority, Error> {
        self.signer(kind).await
    }

    /// Rotation phase and trusted CAs of one kind.
    pub async fn ca_status(&self, kind: CaKind) -> Result<CaStatus, Error> {
        let (stored, _) = self.load_cas(kind).await?;
        // Only the certificates: no need to touch the private keys to say what is trusted.
        let mut trusted = TrustedCa::from_pem_bundle(&stored.current.cert)?;
        if let Some(next) = &stored.next {
            trusted.extend(TrustedCa::from_pem_bundle(&next.cert)?);
        }
        Ok(CaStatus {
            kind,
            phase: stored.phase,
            trusted,
        })
    }

    /// Every trusted CA of every kind (both of a kind while it rotates).
    pub async fn trusted_cas(&self) -> Result<Vec<TrustedCa>, Error> {
        let mut trusted = Vec::new();
        for kind in CA_KINDS {
            trusted.extend(self.ca_status(kind).await?.trusted);
        }
        Ok(trusted)
    }

    /// A validator trusting the current CAs, knowing the retired ones by name.
    pub async fn validator(&self) -> Result<Validator, Error> {
        let mut retired = Vec::new();
        for kind in CA_KINDS {
            let (stored, _) = self.load_cas(kind).await?;
            for pem in &stored.retired {
                retired.extend(TrustedCa::from_pem_bundle(pem)?);
            }
        }
        Ok(Validator::new(self.trusted_cas().await?).with_retired(retired))
    }

    /// Moves the rotation of `kind` one phase on; returns the new phase.
    pub async fn rotate_ca(&self, actor: &str, kind: CaKind) -> Result<RotationPhase, Error> {
        let (mut stored, revision) = self.load_cas(kind).await?;
        let from = stored.phase;
        match stored.phase {
            RotationPhase::Standby => {
                let next = CertAuthority::generate(
                    kind,
                    &self.config().cluster,
                    self.clock().now(),
                    CA_TTL,
                )?;
                stored.next = Some(next.to_pem()?.into());
                stored.phase = RotationPhase::Init;
            }
            RotationPhase::Init => stored.phase = RotationPhase::UpdateClients,
            RotationPhase::UpdateClients => stored.phase = RotationPhase::UpdateServers,
            RotationPhase::UpdateServers => {
                let next = stored.next.take().ok_or_else(|| {
                    Error::Rotation("update_servers phase without a next CA".to_owned())
                })?;
                let old = std::mem::replace(&mut stored.current, next);
                stored.retired.push(old.cert);
                stored.phase = RotationPhase::Standby;
            }
        }
        let value =
            serde_json::to_vec(&stored).map_err(|error| Error::invalid("CA", error.to_string()))?;
        // Two admins rotating at once: one wins, the other is told to look again.
        self.state()
            .backend()
            .compare_and_swap(&ca_key(kind), Expect::Revision(revision), &value, None)
            .await
            .map_err(|error| match error {
                Error::Conflict { .. } => Error::Rotation(format!(
                    "the {kind} CA rotation moved on meanwhile; check its phase and retry"
                )),
                other => other,
            })?;
        self.record(
            self.event(codes::CA_ROTATION)
                .with_user(actor)
                .with_field("ca", kind_name(kind))
                .with_field("from", from.to_string())
                .with_field("to", stored.phase.to_string()),
        )
        .await?;
        Ok(stored.phase)
    }

    async fn record_issued(
        &self,
        user: &str,
        role: &str,
        expires: UnixTime,
        extra: &[(&str, String)],
    ) -> Result<(), Error> {
        let mut event = self
            .event(codes::CERT_ISSUED)
            .with_user(user)
            .with_field("cert_role", role)
            .with_field("expires", expires.as_secs());
        for (name, value) in extra {
            event = event.with_field(name, value.clone());
        }
        self.record(event).await
    }

    fn user_identity(
        &self,
        user: &User,
        roles: &[Role],
        source: Option<IpAddr>,
        expires: UnixTime,
    ) -> Identity {
        Identity {
            user: user.name.clone(),
            roles: user.roles.clone(),
            traits: identity_traits(&user.traits),
            route: None,
            allowed_db_names: allowed(roles, &user.traits, |role| &role.allow.db_names),
            allowed_db_users: allowed(roles, &user.traits, |role| &role.allow.db_users),
            usage: Usage::User,
            cluster: self.config().cluster.clone(),
            client_ip: source,
            expires,
        }
    }

    /// `postern login`: checks password and second factor, then issues a user
    /// certificate for `public_key`, valid for min(`requested_ttl`, 12 h, the roles'
    /// `max_session_ttl`).
    pub async fn login(
        &self,
        name: &str,
        password: &str,
        totp_code: Option<&str>,
        source: IpAddr,
        public_key: &PublicKey,
        requested_ttl: Option<Duration>,
    ) -> Result<LoginCert, Error> {
        let user = self.authenticate(name, password, totp_code, source).await?;
        let roles = self.state().roles_of(&user).await?;
        let options = SessionOptions::of(&roles);
        let ttl = [
            requested_ttl,
            Some(USER_CERT_TTL_DEFAULT),
            options.max_session_ttl,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(USER_CERT_TTL_DEFAULT);
        if ttl.is_zero() {
            return Err(Error::invalid("ttl", "must be longer than 0s"));
        }
        let now = self.clock().now();
        let identity = self.user_identity(&user, &roles, Some(source), later(now, ttl));
        let cert = self
            .signer(CaKind::User)
            .await?
            .issue_identity(&identity, public_key, now)?;
        self.record_issued(
            name,
            "user",
            identity.expires,
            &[("source", source.to_string())],
        )
        .await?;
        Ok(LoginCert {
            cert,
            identity,
            host_cas: self.ca_status(CaKind::Host).await?.trusted,
        })
    }

    /// `postern db login`: after an access check against the user's current roles,
    /// reissues the caller's certificate with a route to `service`. The new cert never
    /// outlives the one presented.
    pub async fn reissue_for_database(
        &self,
        caller: &VerifiedIdentity,
        service: &str,
        db_user: &str,
        db_name: &str,
        public_key: &PublicKey,
    ) -> Result<IssuedCert, Error> {
        let presented = caller.identity();
        if presented.usage != Usage::User || caller.purpose() != Purpose::UserLogin {
            return Err(Error::invalid(
                "certificate",
                "a user certificate from `postern login` is needed",
            ));
        }
        let user = self.state().user(&presented.user).await?;
        let roles = self.state().roles_of(&user).await?;
        let servers = self.servers_of(service).await?;
        let Some(server) = servers.first() else {
            return Err(Error::NotFound {
                kind: "database",
                name: service.to_owned(),
            });
        };
        let database = &server.database;
        let access = check_access(
            &roles,
            &user.traits,
            AccessRequest {
                database,
                db_user,
                db_name,
            },
        );
        let access = match access {
            Ok(access) => access,
            Err(denial) => {
                self.record(
                    self.event(codes::CERT_REFUSED)
                        .with_user(&user.name)
                        .with_error(&denial)
                        .with_field("db_service", service),
                )
                .await?;
                return Err(Error::AccessDenied(Box::new(denial)));
            }
        };
        let mut identity =
            self.user_identity(&user, &roles, presented.client_ip, presented.expires);
        identity.route = Some(DbRoute {
            service: service.to_owned(),
            protocol: match database.protocol {
                Protocol::Postgres => DbProtocol::Postgres,
                Protocol::Mysql => DbProtocol::Mysql,
            },
            db_user: db_user.to_owned(),
            db_name: access.db_name.clone(),
        });
        let now = self.clock().now();
        let cert = self
            .signer(CaKind::User)
            .await?
            .issue_identity(&identity, public_key, now)?;
        self.record_issued(
            &user.name,
            "user",
            identity.expires,
            &[
                ("db_service", service.to_owned()),
                ("db_user", db_user.to_owned()),
                ("db_name", access.db_name),
                ("allowed_by", access.allowed_by),
            ],
        )
        .await?;
        Ok(cert)
    }

    /// For a proxy: the short-lived certificate it presents to an agent on behalf of
    /// the user whose database certificate (`user_cert_der`) it forwards.
    pub async fn issue_db_access(
        &self,
        proxy: &VerifiedHost,
        user_cert_der: &[u8],
        public_key: &PublicKey,
    ) -> Result<(Identity, IssuedCert), Error> {
        if proxy.host().role != HostRole::Proxy {
            return Err(Error::invalid(
                "caller",
                "only proxies get proxy→agent certificates",
            ));
        }
        let now = self.clock().now();
        let user =
            self.validator()
                .await?
                .verify_identity(user_cert_der, Purpose::UserDatabase, now)?;
        // The certificate lives minutes; the user's own expiry rides along as a trait
        // so that the agent can end the session when the user's certificate expires
        // (role option `disconnect_expired_cert`), not when this one does.
        let mut identity = user.identity().clone();
        if identity.route.is_none() {
            return Err(postern_pki::Error::RouteMissing {
                cert: format!("{:?}", identity.user),
                user: identity.user,
            }
            .into());
        }
        identity.traits.insert(
            SESSION_EXPIRES_TRAIT.to_owned(),
            vec![identity.expires.as_secs().to_string()],
        );
        identity.usage = Usage::Db;
        identity.expires = identity.expires.min(later(now, DB_ACCESS_CERT_TTL));
        let cert = self
            .signer(CaKind::User)
            .await?
            .issue_identity(&identity, public_key, now)?;
        self.record_issued(
            &identity.user,
            "db",
            identity.expires,
            &[("proxy", proxy.host().host_id.clone())],
        )
        .await?;
        Ok((identity, cert))
    }

    /// For an agent: a certificate with CN = `db_user` to present to a self-hosted
    /// database.
    pub async fn issue_db_client(
        &self,
        agent: &VerifiedHost,
        db_user: &str,
        public_key: &PublicKey,
    ) -> Result<IssuedCert, Error> {
        if agent.host().role != HostRole::Agent {
            return Err(Error::invalid(
                "caller",
                "only agents get database client certificates",
            ));
        }
        let now = self.clock().now();
        let cert = self.signer(CaKind::Db).await?.issue_db_client(
            db_user,
            public_key,
            now,
            DB_CLIENT_CERT_TTL,
        )?;
        self.record_issued(
            &agent.host().host_id,
            "db-client",
            later(now, DB_CLIENT_CERT_TTL),
            &[("db_user", db_user.to_owned())],
        )
        .await?;
        Ok(cert)
    }

    /// A proxy or agent joins with a single-use token and gets its host certificate.
    pub async fn join(
        &self,
        token: &str,
        kind: TokenKind,
        host_id: &str,
        names: Vec<String>,
        public_key: &PublicKey,
    ) -> Result<HostCert, Error> {
        self.consume_join_token(token, kind, host_id).await?;
        let role = match kind {
            TokenKind::Db => HostRole::Agent,
            TokenKind::Proxy => HostRole::Proxy,
        };
        self.issue_host(host_id, role, names, public_key).await
    }

    /// A joined host renews its certificate before it expires.
    pub async fn renew_host(
        &self,
        host: &VerifiedHost,
        public_key: &PublicKey,
    ) -> Result<HostCert, Error> {
        let current = host.host();
        self.issue_host(
            &current.host_id,
            current.role,
            current.names.clone(),
            public_key,
        )
        .await
    }

    /// The SSH certificate a joined host uses on the reverse tunnel, for `key`: a user
    /// certificate for an agent (it dials), a host certificate for a proxy (it answers),
    /// with the host CA's SSH keys to trust (both while the host CA rotates).
    pub async fn issue_ssh_for_host(
        &self,
        host: &VerifiedHost,
        key: &postern_pki::ssh::ssh_key::PublicKey,
    ) -> Result<SshHostCert, Error> {
        let now = self.clock().now();
        let mut identity = host.host().clone();
        identity.expires = later(now, HOST_CERT_TTL);
        let signer = self.signer(CaKind::Host).await?;
        let cert = match identity.role {
            HostRole::Agent => signer.issue_ssh_user_cert(&identity, key, now)?,
            HostRole::Proxy => signer.issue_ssh_host_cert(&identity, key, now)?,
            other => {
                return Err(Error::invalid(
                    "caller",
                    format!("{} hosts hold no tunnel certificate", other.as_str()),
                ));
            }
        };
        let (stored, _) = self.load_cas(CaKind::Host).await?;
        let mut host_ca_keys = Vec::new();
        for pem in std::iter::once(&stored.current).chain(stored.next.as_ref()) {
            host_ca_keys.extend(pem.load()?.ssh_public_key());
        }
        self.record_issued(
            &identity.host_id,
            &format!("{}-ssh", identity.role.as_str()),
            identity.expires,
            &[],
        )
        .await?;
        Ok(SshHostCert { cert, host_ca_keys })
    }

    /// The auth server's own TLS certificate (not audited: nobody asked for it).
    pub(crate) async fn issue_own_auth_cert(
        &self,
        names: Vec<String>,
        public_key: &PublicKey,
    ) -> Result<(IssuedCert, UnixTime), Error> {
        let now = self.clock().now();
        let host = HostIdentity {
            host_id: format!("auth.{}", self.config().cluster),
            role: HostRole::Auth,
            cluster: self.config().cluster.clone(),
            names,
            expires: later(now, HOST_CERT_TTL),
        };
        let cert = self
            .signer(CaKind::Host)
            .await?
            .issue_host(&host, public_key, now)?;
        Ok((cert, host.expires))
    }

    async fn issue_host(
        &self,
        host_id: &str,
        role: HostRole,
        names: Vec<String>,
        public_key: &PublicKey,
    ) -> Result<HostCert, Error> {
        let now = self.clock().now();
        let host = HostIdentity {
            host_id: host_id.to_owned(),
            role,
            cluster: self.config().cluster.clone(),
            names,
            expires: later(now, HOST_CERT_TTL),
        };
        let cert = self
            .signer(CaKind::Host)
            .await?
            .issue_host(&host, public_key, now)?;
        self.record_issued(host_id, role.as_str(), host.expires, &[])
            .await?;
        Ok(HostCert {
            cert,
            host,
            trusted: self.trusted_cas().await?,
        })
    }

    /// `admin auth sign --format db`: key, certificate and CA bundle for a self-hosted
    /// database. During a rotation the bundle holds both database CAs.
    pub async fn sign_db_server(
        &self,
        actor: &str,
        hosts: &[String],
        ttl: Duration,
    ) -> Result<DbServerFiles, Error> {
        let now = self.clock().now();
        let mut files = self
            .signer(CaKind::Db)
            .await?
            .sign_db_server(hosts, now, ttl)?;
        files.server_cas = self
            .ca_status(CaKind::Db)
            .await?
            .trusted
            .iter()
            .map(TrustedCa::to_pem)
            .collect();
        self.record_issued(
            actor,
            "db-server",
            later(now, ttl),
            &[("hosts", hosts.join(","))],
        )
        .await?;
        Ok(files)
    }
}

//! The auth server's operations: user and role administration, login checks, join
//! tokens and the registry of database servers. Every action is audited; an action
//! whose audit event cannot be stored reports an error.
//!
//! Time and randomness come from the runtime seam ([`WallClock`], [`Rng`]) handed in,
//! so a simulator decides both.

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use postern_rt::{Blocking, Rng, WallClock};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::Error;
use crate::access::may_list;
use crate::audit::{AuditEvent, AuditLog, codes};
use crate::backend::{Backend, Revision};
use crate::database::Database;
use crate::limiter::{LoginLimiter, LoginLimits};
use crate::role::Role;
use crate::state::State;
use crate::totp::Totp;
use crate::user::{PasswordCost, Traits, User, check_user_name, hash_password, verify_password};

/// Longest join token lifetime.
pub const TOKEN_TTL_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest registry lease an agent may ask for.
pub const DB_SERVER_TTL_MAX: Duration = Duration::from_secs(30 * 60);

/// Settings of one auth server.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub cluster: String,
    pub password_cost: PasswordCost,
    pub login_limits: LoginLimits,
}

/// The kind of host a join token admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// A database service (agent).
    Db,
    /// A proxy.
    Proxy,
}

impl std::fmt::Display for TokenKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Db => "db",
            Self::Proxy => "proxy",
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredToken {
    kind: TokenKind,
    created_by: String,
}

/// One agent's announcement of one database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseServer {
    pub host_id: String,
    pub database: Database,
}

/// A database and the agents currently serving it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedDatabase {
    pub database: Database,
    pub host_ids: Vec<String>,
}

/// The auth server over a state backend and an audit log.
#[derive(Debug)]
pub struct AuthServer<B, A> {
    state: State<B>,
    audit: A,
    clock: WallClock,
    rng: Rng,
    config: AuthConfig,
    limiter: Mutex<LoginLimiter>,
    /// Verified against when the user does not exist, so that an unknown user takes as
    /// long to refuse as a wrong password.
    dummy_hash: String,
    /// Where password hashing runs (see [`AuthServer::with_blocking`]).
    blocking: Blocking,
}

fn check_host_name(field: &str, name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("{name:?}: use 1 to 128 of letters, digits and . _ -"),
        ))
    }
}

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl<B: Backend, A: AuditLog> AuthServer<B, A> {
    pub fn new(
        backend: B,
        audit: A,
        clock: WallClock,
        rng: Rng,
        config: AuthConfig,
    ) -> Result<Self, Error> {
        let mut password = [0u8; 32];
        rng.fill(&mut password);
        let password: String = password.iter().map(|b| format!("{b:02x}")).collect();
        let dummy_hash = hash_password(&password, config.password_cost, &mut rng.clone())?;
        Ok(Self {
            state: State::new(backend),
            audit,
            clock,
            rng,
            limiter: Mutex::new(LoginLimiter::new(config.login_limits)),
            config,
            dummy_hash,
            blocking: Blocking::Pool,
        })
    }

    /// Runs password hashing as `blocking` says: the runtime's policy (inline in
    /// simulation, so a seed replays); tokio's blocking pool by default.
    pub fn with_blocking(mut self, blocking: Blocking) -> Self {
        self.blocking = blocking;
        self
    }

    pub fn state(&self) -> &State<B> {
        &self.state
    }

    pub fn audit_log(&self) -> &A {
        &self.audit
    }

    pub fn clock(&self) -> &WallClock {
        &self.clock
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    pub(crate) fn rng(&self) -> Rng {
        self.rng.clone()
    }

    fn now_secs(&self) -> u64 {
        self.clock.now().as_secs()
    }

    pub(crate) fn now_time(&self) -> OffsetDateTime {
        let nanos = i128::from(self.clock.now_ms()) * 1_000_000;
        OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// An audit event stamped now, with a fresh id and the cluster name.
    pub(crate) fn event(&self, code: (&str, &str)) -> AuditEvent {
        let mut event = AuditEvent::new(code, self.now_time(), &mut self.rng());
        event.cluster = Some(self.config.cluster.clone());
        event
    }

    pub(crate) async fn record(&self, event: AuditEvent) -> Result<(), Error> {
        self.audit
            .emit(std::slice::from_ref(&event))
            .await
            .map(|_| ())
    }

    fn limiter(&self) -> MutexGuard<'_, LoginLimiter> {
        // The limiter's maps stay consistent across a panic (single inserts/removes).
        self.limiter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn hash(&self, password: &str) -> Result<String, Error> {
        let (password, cost, mut rng) =
            (password.to_owned(), self.config.password_cost, self.rng());
        self.blocking
            .run(move || hash_password(&password, cost, &mut rng))
            .await
    }

    // --- Users ----------------------------------------------------------------------

    /// Creates a user. With `with_totp`, returns the new TOTP generator so its secret
    /// can be shown once.
    pub async fn create_user(
        &self,
        actor: &str,
        name: &str,
        roles: Vec<String>,
        traits: Traits,
        password: Option<&str>,
        with_totp: bool,
    ) -> Result<Option<Totp>, Error> {
        check_user_name(name)?;
        let password_hash = match password {
            Some(password) => Some(self.hash(password).await?),
            None => None,
        };
        let totp = with_totp.then(|| Totp::generate(&mut self.rng()));
        let user = User {
            name: name.to_owned(),
            roles: roles.clone(),
            traits,
            password_hash,
            totp: totp.clone(),
            totp_last_step: None,
        };
        self.state.create_user(&user).await?;
        self.record(
            self.event(codes::USER_CREATED)
                .with_user(actor)
                .with_field("target_user", name)
                .with_field("roles", roles),
        )
        .await?;
        Ok(totp)
    }

    pub async fn delete_user(&self, actor: &str, name: &str) -> Result<(), Error> {
        self.state.delete_user(name).await?;
        self.record(
            self.event(codes::USER_DELETED)
                .with_user(actor)
                .with_field("target_user", name),
        )
        .await
    }

    /// Sets a new password; with `reset_totp`, also a new TOTP secret (returned).
    pub async fn reset_password(
        &self,
        actor: &str,
        name: &str,
        password: &str,
        reset_totp: bool,
    ) -> Result<Option<Totp>, Error> {
        let hash = self.hash(password).await?;
        let totp = reset_totp.then(|| Totp::generate(&mut self.rng()));
        self.state
            .update_user(name, |user| {
                user.password_hash = Some(hash.clone());
                if let Some(totp) = &totp {
                    user.totp = Some(totp.clone());
                    user.totp_last_step = None;
                }
                Ok(())
            })
            .await?;
        self.record(
            self.event(codes::USER_UPDATED)
                .with_user(actor)
                .with_field("target_user", name)
                .with_field(
                    "change",
                    if reset_totp {
                        "password and totp reset"
                    } else {
                        "password reset"
                    },
                ),
        )
        .await?;
        Ok(totp)
    }

    // --- Roles ----------------------------------------------------------------------

    /// Creates or replaces each role; returns, per role, whether it existed before.
    pub async fn apply_roles(&self, actor: &str, roles: &[Role]) -> Result<Vec<bool>, Error> {
        let mut existed = Vec::with_capacity(roles.len());
        for role in roles {
            existed.push(self.state.upsert_role(role).await?);
            self.record(
                self.event(codes::ROLE_UPSERTED)
                    .with_user(actor)
                    .with_field("role", role.name.clone()),
            )
            .await?;
        }
        Ok(existed)
    }

    pub async fn delete_role(&self, actor: &str, name: &str) -> Result<(), Error> {
        self.state.delete_role(name).await?;
        self.record(
            self.event(codes::ROLE_DELETED)
                .with_user(actor)
                .with_field("role", name),
        )
        .await
    }

    // --- Login ----------------------------------------------------------------------

    /// Checks a user's password and, if the user has one, TOTP code. Refusals are
    /// rate limited per user and per source address, and audited either way.
    pub async fn authenticate(
        &self,
        name: &str,
        password: &str,
        totp_code: Option<&str>,
        source: IpAddr,
    ) -> Result<User, Error> {
        // A login is refused before anything else if the name cannot be a user name;
        // the audit event then carries a bounded prefix of it.
        let audit_name: String = name.chars().take(128).collect();
        let now = self.now_secs();
        let failure = |reason: String| {
            self.event(codes::LOGIN_FAILURE)
                .with_user(&audit_name)
                .with_error(reason)
                .with_field("source", source.to_string())
        };
        if check_user_name(name).is_err() {
            self.record(failure("not a valid user name".to_owned()))
                .await?;
            return Err(Error::LoginFailed { user: audit_name });
        }
        // Bind first: the guard must not live across the await below.
        let checked = self.limiter().check(now, name, source);
        if let Err((subject, retry_after)) = checked {
            self.record(failure(format!("rate limited: {subject}")))
                .await?;
            return Err(Error::RateLimited {
                subject: subject.to_string(),
                retry_after_secs: retry_after.as_secs(),
            });
        }
        match self.check_credentials(name, password, totp_code, now).await {
            Ok(user) => {
                self.limiter().record_success(name);
                self.record(
                    self.event(codes::LOGIN)
                        .with_user(name)
                        .with_field("source", source.to_string()),
                )
                .await?;
                Ok(user)
            }
            Err(reason) => {
                self.limiter().record_failure(now, name, source);
                self.record(failure(reason)).await?;
                Err(Error::LoginFailed {
                    user: name.to_owned(),
                })
            }
        }
    }

    /// `Err` holds the reason for the audit log; the user only learns "login failed".
    async fn check_credentials(
        &self,
        name: &str,
        password: &str,
        totp_code: Option<&str>,
        now: u64,
    ) -> Result<User, String> {
        let user = match self.state.user(name).await {
            Ok(user) => Some(user),
            Err(Error::NotFound { .. } | Error::InvalidInput { .. }) => None,
            Err(error) => return Err(error.to_string()),
        };
        let hash = user
            .as_ref()
            .and_then(|user| user.password_hash.clone())
            .unwrap_or_else(|| self.dummy_hash.clone());
        let candidate = password.to_owned();
        let password_ok = self
            .blocking
            .run(move || verify_password(&candidate, &hash))
            .await;
        let Some(user) = user else {
            return Err("no such user".to_owned());
        };
        if user.password_hash.is_none() {
            return Err("user has no password".to_owned());
        }
        if !password_ok {
            return Err("wrong password".to_owned());
        }
        let Some(totp) = &user.totp else {
            return Ok(user);
        };
        let code = totp_code.ok_or_else(|| "second factor missing".to_owned())?;
        let step = totp
            .verify(code, now, user.totp_last_step)
            .ok_or_else(|| "wrong or reused second factor".to_owned())?;
        // Record the step so the code cannot be used again, here or on another server.
        self.state
            .update_user(name, |stored| {
                if stored.totp_last_step.is_some_and(|used| used >= step) {
                    return Err(Error::invalid("totp", "code already used"));
                }
                stored.totp_last_step = Some(step);
                Ok(())
            })
            .await
            .map_err(|error| format!("second factor: {error}"))
    }

    // --- Join tokens ----------------------------------------------------------------

    /// A single-use token that lets one host of `kind` join within `ttl`. Only its
    /// hash is stored.
    pub async fn create_join_token(
        &self,
        actor: &str,
        kind: TokenKind,
        ttl: Duration,
    ) -> Result<String, Error> {
        if ttl.is_zero() || ttl > TOKEN_TTL_MAX {
            return Err(Error::invalid(
                "token ttl",
                format!(
                    "must be between 1s and {}",
                    crate::duration::format_duration(TOKEN_TTL_MAX)
                ),
            ));
        }
        let mut secret = [0u8; 32];
        self.rng().fill_bytes(&mut secret);
        let token: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let stored = StoredToken {
            kind,
            created_by: actor.to_owned(),
        };
        let value = serde_json::to_vec(&stored)
            .map_err(|error| Error::invalid("token", error.to_string()))?;
        let hash = sha256_hex(&token);
        self.state
            .backend()
            .compare_and_swap(
                &format!("/tokens/{hash}"),
                crate::backend::Expect::Absent,
                &value,
                Some(ttl),
            )
            .await?;
        self.record(
            self.event(codes::TOKEN_CREATED)
                .with_user(actor)
                .with_field("kind", kind.to_string())
                .with_field("token_hash", &hash[..16])
                .with_field("ttl_secs", ttl.as_secs()),
        )
        .await?;
        Ok(token)
    }

    /// Uses up a join token for a host of `kind`. Refused if unknown, already used,
    /// expired, or for another kind of host.
    pub async fn consume_join_token(
        &self,
        token: &str,
        kind: TokenKind,
        host_id: &str,
    ) -> Result<(), Error> {
        let hash = sha256_hex(token);
        let key = format!("/tokens/{hash}");
        let refuse = async |reason: &str| -> Result<(), Error> {
            self.record(
                self.event(codes::TOKEN_REFUSED)
                    .with_error(reason)
                    .with_field("host_id", host_id)
                    .with_field("token_hash", &hash[..16]),
            )
            .await?;
            Err(Error::TokenRefused {
                reason: reason.to_owned(),
            })
        };
        let Some(item) = self.state.backend().get(&key).await? else {
            return refuse("unknown, used or expired token").await;
        };
        let stored: StoredToken =
            serde_json::from_slice(&item.value).map_err(|error| Error::Corrupt {
                what: "join token".to_owned(),
                detail: error.to_string(),
            })?;
        if stored.kind != kind {
            return refuse(&format!("token is for a {} host, not {kind}", stored.kind)).await;
        }
        // Single use: of two hosts racing with one token, only one deletes it.
        match self
            .state
            .backend()
            .compare_and_delete(&key, item.revision)
            .await
        {
            Ok(()) => {}
            Err(Error::Conflict { .. }) => return refuse("unknown, used or expired token").await,
            Err(error) => return Err(error),
        }
        self.record(
            self.event(codes::TOKEN_USED)
                .with_field("host_id", host_id)
                .with_field("kind", kind.to_string())
                .with_field("token_hash", &hash[..16]),
        )
        .await
    }

    // --- Registry of database servers -----------------------------------------------

    fn db_server_key(db_name: &str, host_id: &str) -> String {
        format!("/db_servers/{db_name}/{host_id}")
    }

    /// An agent announces a database it serves, under a lease of `ttl`. Keep it alive
    /// with [`AuthServer::keep_database_alive`] and the returned revision.
    pub async fn announce_database(
        &self,
        host_id: &str,
        database: &Database,
        ttl: Duration,
    ) -> Result<Revision, Error> {
        check_host_name("host id", host_id)?;
        check_host_name("database name", &database.name)?;
        if ttl.is_zero() || ttl > DB_SERVER_TTL_MAX {
            return Err(Error::invalid("lease ttl", "must be between 1s and 30m"));
        }
        let server = DatabaseServer {
            host_id: host_id.to_owned(),
            database: database.clone(),
        };
        let value = serde_json::to_vec(&server)
            .map_err(|error| Error::invalid("database", error.to_string()))?;
        self.state
            .backend()
            .put(
                &Self::db_server_key(&database.name, host_id),
                &value,
                Some(ttl),
            )
            .await
    }

    /// Extends an announcement's lease. [`Error::Conflict`]: it expired or was replaced,
    /// so announce again.
    pub async fn keep_database_alive(
        &self,
        host_id: &str,
        db_name: &str,
        revision: Revision,
        ttl: Duration,
    ) -> Result<(), Error> {
        check_host_name("host id", host_id)?;
        check_host_name("database name", db_name)?;
        let ttl = ttl.min(DB_SERVER_TTL_MAX);
        self.state
            .backend()
            .keep_alive(&Self::db_server_key(db_name, host_id), revision, ttl)
            .await
    }

    /// Removes an announcement (graceful agent shutdown).
    pub async fn withdraw_database(&self, host_id: &str, db_name: &str) -> Result<bool, Error> {
        check_host_name("host id", host_id)?;
        check_host_name("database name", db_name)?;
        self.state
            .backend()
            .delete(&Self::db_server_key(db_name, host_id))
            .await
    }

    /// The live announcements for one database (for proxies choosing an agent).
    pub async fn servers_of(&self, db_name: &str) -> Result<Vec<DatabaseServer>, Error> {
        check_host_name("database name", db_name)?;
        let items = self
            .state
            .backend()
            .list(&format!("/db_servers/{db_name}/"))
            .await?;
        items
            .iter()
            .map(|item| {
                serde_json::from_slice(&item.value).map_err(|error| Error::Corrupt {
                    what: format!("database server at {}", item.key),
                    detail: error.to_string(),
                })
            })
            .collect()
    }

    /// Every database with a live announcement, sorted by name; with `user`, only
    /// those the user's roles let them see.
    pub async fn list_databases(&self, user: Option<&User>) -> Result<Vec<ListedDatabase>, Error> {
        let items = self.state.backend().list("/db_servers/").await?;
        let roles = match user {
            Some(user) => Some(self.state.roles_of(user).await?),
            None => None,
        };
        let mut listed: Vec<ListedDatabase> = Vec::new();
        for item in items {
            let server: DatabaseServer =
                serde_json::from_slice(&item.value).map_err(|error| Error::Corrupt {
                    what: format!("database server at {}", item.key),
                    detail: error.to_string(),
                })?;
            let hidden = match (user, &roles) {
                (Some(user), Some(roles)) => !may_list(roles, &user.traits, &server.database),
                _ => false,
            };
            if hidden {
                continue;
            }
            match listed.last_mut() {
                // Keys sort by database name, so one database's agents are adjacent.
                Some(last) if last.database.name == server.database.name => {
                    last.host_ids.push(server.host_id)
                }
                _ => listed.push(ListedDatabase {
                    database: server.database,
                    host_ids: vec![server.host_id],
                }),
            }
        }
        Ok(listed)
    }

    /// Deletes expired leases (join tokens, database announcements). Call it every
    /// second or so; reads hide expired items even before.
    pub async fn expire(&self) -> Result<u64, Error> {
        self.state.backend().expire().await
    }

    /// Calls [`AuthServer::expire`] every `period` (on tokio's clock, which turmoil
    /// drives in simulation), logging failures; never returns.
    pub async fn expire_every(&self, period: Duration) {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(error) = self.expire().await {
                tracing::warn!(%error, "expiring leases failed");
            }
        }
    }
}

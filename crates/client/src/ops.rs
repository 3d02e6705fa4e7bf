//! The user's operations against a proxy: login, listing, database login and logout.
//! The binary's commands are thin wrappers that print what these return.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use postern_auth::api::{DatabaseCertRequest, UserLoginRequest};
use postern_auth::client::AuthClient;
use postern_pki::{Identity, PrivateKey, TrustedCa, decode_identity_unverified};
use postern_rt::{Net, WallClock};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Serialize;

use crate::Error;
use crate::dbfiles::{ClientFiles, DbConnection, Protocol};
use crate::profile::{DbLogin, Home, Profile, split_addr};
use crate::tls::{ALPN_API, Trust, client_config, fingerprint};

/// What `postern login` needs.
#[derive(Debug, Clone)]
pub struct LoginParams {
    /// The proxy's web address, `HOST:PORT`.
    pub proxy: String,
    /// Where PostgreSQL clients connect; the proxy address when not given.
    pub postgres_addr: Option<String>,
    pub user: String,
    pub password: String,
    pub totp: Option<String>,
    pub ttl: Option<Duration>,
    /// The cluster's host CA bundle (PEM). Without it, the CAs saved by an earlier login
    /// to the same proxy are used.
    pub ca_file: Option<PathBuf>,
    /// Verify nothing on this first login (a test cluster only).
    pub danger_insecure_skip_verify: bool,
}

/// What a successful login produced.
#[derive(Debug, Clone)]
pub struct LoggedIn {
    pub profile: Profile,
    pub identity: Identity,
    /// Fingerprints of the host CAs now trusted for this proxy.
    pub ca_fingerprints: Vec<String>,
}

/// One database as `db ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListedDatabase {
    pub name: String,
    pub description: String,
    pub protocol: String,
    pub labels: BTreeMap<String, String>,
    pub logged_in: bool,
}

/// `postern status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub proxy: String,
    pub user: String,
    pub roles: Vec<String>,
    pub cluster: String,
    /// Seconds since the Unix epoch.
    pub expires_unix: u64,
    pub expired: bool,
    pub databases: Vec<String>,
}

/// The user's side of Postern, over `home`.
#[derive(Debug, Clone)]
pub struct Client {
    home: Home,
    net: Net,
    clock: WallClock,
}

impl Client {
    pub fn new(home: Home, net: Net, clock: WallClock) -> Self {
        Self { home, net, clock }
    }

    pub fn home(&self) -> &Home {
        &self.home
    }

    pub fn files(&self) -> ClientFiles {
        ClientFiles::in_home(self.home.root())
    }

    // --- Login -----------------------------------------------------------------------

    pub async fn login(&self, params: LoginParams) -> Result<LoggedIn, Error> {
        let (proxy_host, _) = split_addr(&params.proxy)?;
        if let Some(addr) = &params.postgres_addr {
            split_addr(addr)?;
        }
        let keys = self.home.keys(&params.proxy);
        let trust = if params.danger_insecure_skip_verify {
            Trust::DangerAcceptAnyServer
        } else if let Some(path) = &params.ca_file {
            Trust::Cas(read_cas(path)?)
        } else if keys.cas().exists() {
            Trust::Cas(read_cas(&keys.cas())?)
        } else {
            return Err(Error::Usage(format!(
                "postern does not know the CA of {proxy} yet: pass --ca-file PATH with the cluster's host CA \
                 (ask your administrator), or, on a test cluster only, --danger-insecure-skip-verify",
                proxy = params.proxy
            )));
        };
        let api = AuthClient::from_tls_config(
            self.net,
            &params.proxy,
            &proxy_host,
            client_config(&trust, None, &[ALPN_API], &self.clock)?,
        )
        .map_err(|error| Error::Tls(error.to_string()))?;
        let key = PrivateKey::generate()?;
        let request = UserLoginRequest {
            user: params.user.clone(),
            password: params.password.clone(),
            totp: params.totp.clone().filter(|code| !code.is_empty()),
            public_key: base64::engine::general_purpose::STANDARD.encode(key.public_key().der()),
            ttl_secs: params.ttl.map(|ttl| ttl.as_secs()),
        };
        let answer = api
            .user_login(&request)
            .await
            .map_err(|error| api_error(&params.proxy, &params.user, error))?;
        let cas = TrustedCa::from_pem_bundle(&answer.cas)?;
        let cert = cert_der(&answer.cert)?;
        let identity = decode_identity_unverified(&cert)?;
        keys.write_login(&key.to_pem(), &answer.cert, &answer.cas)?;
        // A new login starts without database logins: their certificates were for the
        // old key. Their sections in the client files go too.
        if let Some(old) = self.home.load(&params.proxy)? {
            for name in old.databases.keys() {
                self.files().remove(name)?;
            }
        }
        let profile = Profile {
            proxy: params.proxy.clone(),
            postgres_addr: params.postgres_addr.unwrap_or(params.proxy),
            mysql_addr: None,
            user: params.user,
            databases: BTreeMap::new(),
        };
        self.home.save(&profile)?;
        Ok(LoggedIn {
            profile,
            identity,
            ca_fingerprints: cas.iter().map(|ca| fingerprint(ca.der())).collect(),
        })
    }

    /// The current profile and its login identity; an error a person can act on when
    /// there is none or it expired.
    pub fn session(&self) -> Result<(Profile, Identity), Error> {
        let profile = self.home.current()?.ok_or(Error::NotLoggedIn)?;
        let keys = self.home.keys(&profile.proxy);
        let cert = cert_der(&read_text(&keys.user_cert())?)?;
        let identity = decode_identity_unverified(&cert)?;
        if identity.expires.as_secs() <= self.clock.now().as_secs() {
            return Err(Error::LoginExpired {
                proxy: profile.proxy.clone(),
                user: profile.user.clone(),
                expired: format_time(identity.expires.as_secs()),
            });
        }
        Ok((profile, identity))
    }

    pub fn status(&self) -> Result<Status, Error> {
        let profile = self.home.current()?.ok_or(Error::NotLoggedIn)?;
        let keys = self.home.keys(&profile.proxy);
        let cert = cert_der(&read_text(&keys.user_cert())?)?;
        let identity = decode_identity_unverified(&cert)?;
        let expires_unix = identity.expires.as_secs();
        Ok(Status {
            proxy: profile.proxy,
            user: identity.user,
            roles: identity.roles,
            cluster: identity.cluster,
            expires_unix,
            expired: expires_unix <= self.clock.now().as_secs(),
            databases: profile.databases.keys().cloned().collect(),
        })
    }

    /// Removes the current profile, its keys and its databases' client sections.
    /// Returns the proxy logged out of.
    pub fn logout(&self) -> Result<Option<String>, Error> {
        let Some(profile) = self.home.current()? else {
            return Ok(None);
        };
        for name in profile.databases.keys() {
            self.files().remove(name)?;
        }
        self.home.remove(&profile.proxy)?;
        Ok(Some(profile.proxy))
    }

    fn api(&self, profile: &Profile, cert_path: &std::path::Path) -> Result<AuthClient, Error> {
        let keys = self.home.keys(&profile.proxy);
        let (host, _) = split_addr(&profile.proxy)?;
        let cas = read_cas(&keys.cas())?;
        let credentials = credentials(cert_path, &keys.key())?;
        AuthClient::from_tls_config(
            self.net,
            &profile.proxy,
            &host,
            client_config(
                &Trust::Cas(cas),
                Some(credentials),
                &[ALPN_API],
                &self.clock,
            )?,
        )
        .map_err(|error| Error::Tls(error.to_string()))
    }

    // --- Databases -------------------------------------------------------------------

    /// The databases the user's roles allow, sorted by name.
    pub async fn databases(&self) -> Result<Vec<ListedDatabase>, Error> {
        let (profile, _) = self.session()?;
        let api = self.api(&profile, &self.home.keys(&profile.proxy).user_cert())?;
        let mut listed: Vec<ListedDatabase> = api
            .databases()
            .await
            .map_err(|error| api_error(&profile.proxy, &profile.user, error))?
            .into_iter()
            .map(|db| ListedDatabase {
                logged_in: profile.databases.contains_key(&db.name),
                name: db.name,
                description: db.description,
                protocol: db.protocol,
                labels: db.labels,
            })
            .collect();
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(listed)
    }

    /// `db login`: a certificate routed to database `name`, and its client sections.
    /// The db user defaults to the user's name; the database name to the db user's.
    pub async fn db_login(
        &self,
        name: &str,
        db_user: Option<&str>,
        db_name: Option<&str>,
    ) -> Result<DbConnection, Error> {
        let (mut profile, identity) = self.session()?;
        let listed = self.databases().await?;
        let Some(database) = listed.iter().find(|db| db.name == name) else {
            return Err(Error::UnknownDatabase {
                name: name.to_owned(),
                known: listed.into_iter().map(|db| db.name).collect(),
            });
        };
        let protocol = Protocol::parse(&database.protocol).ok_or_else(|| {
            Error::Usage(format!(
                "database {name:?} speaks {:?}, which this postern cannot connect to",
                database.protocol
            ))
        })?;
        let db_user = db_user
            .map(str::to_owned)
            .or_else(|| profile.databases.get(name).map(|db| db.db_user.clone()))
            .unwrap_or_else(|| identity.user.clone());
        let db_name = db_name
            .map(str::to_owned)
            .or_else(|| profile.databases.get(name).map(|db| db.db_name.clone()))
            .unwrap_or_default();
        let keys = self.home.keys(&profile.proxy);
        let key = PrivateKey::from_pem(&read_text(&keys.key())?)?;
        let api = self.api(&profile, &keys.user_cert())?;
        let answer = api
            .database_cert(&DatabaseCertRequest {
                service: name.to_owned(),
                db_user: db_user.clone(),
                db_name: db_name.clone(),
                public_key: base64::engine::general_purpose::STANDARD
                    .encode(key.public_key().der()),
            })
            .await
            .map_err(|error| match error {
                postern_auth::Error::Remote {
                    status: 403,
                    message,
                } => Error::NoAccess {
                    name: name.to_owned(),
                    reason: message,
                },
                error => api_error(&profile.proxy, &profile.user, error),
            })?;
        keys.write_db_cert(name, &answer.cert)?;
        profile.databases.insert(
            name.to_owned(),
            DbLogin {
                protocol,
                db_user,
                db_name,
            },
        );
        self.home.save(&profile)?;
        let connection = self.connection(&profile, name)?;
        self.files().write(&connection)?;
        Ok(connection)
    }

    /// `db logout NAME`, or every database with `None`. Returns the names logged out.
    pub fn db_logout(&self, name: Option<&str>) -> Result<Vec<String>, Error> {
        let mut profile = self.home.current()?.ok_or(Error::NotLoggedIn)?;
        let names: Vec<String> = match name {
            Some(name) if profile.databases.contains_key(name) => vec![name.to_owned()],
            Some(name) => {
                return Err(Error::DbNotLoggedIn {
                    name: name.to_owned(),
                });
            }
            None => profile.databases.keys().cloned().collect(),
        };
        let keys = self.home.keys(&profile.proxy);
        for name in &names {
            self.files().remove(name)?;
            crate::files::remove_if_exists(&keys.db_cert(name))?;
            profile.databases.remove(name);
        }
        self.home.save(&profile)?;
        Ok(names)
    }

    /// How to reach logged-in database `name` (no network).
    pub fn connection(&self, profile: &Profile, name: &str) -> Result<DbConnection, Error> {
        let login = profile
            .databases
            .get(name)
            .ok_or_else(|| Error::DbNotLoggedIn {
                name: name.to_owned(),
            })?;
        let addr = match login.protocol {
            Protocol::Postgres => profile.postgres_addr.as_str(),
            Protocol::Mysql => profile.mysql_addr.as_deref().unwrap_or(&profile.proxy),
        };
        let (host, port) = split_addr(addr)?;
        let keys = self.home.keys(&profile.proxy);
        Ok(DbConnection {
            name: name.to_owned(),
            protocol: login.protocol,
            host,
            port,
            user: login.db_user.clone(),
            database: login.db_name.clone(),
            ca: keys.cas(),
            cert: keys.db_cert(name),
            key: keys.key(),
        })
    }

    /// The logged-in database a command means: `name`, or the only one logged in.
    pub fn pick_database(&self, profile: &Profile, name: Option<&str>) -> Result<String, Error> {
        match name {
            Some(name) => Ok(name.to_owned()),
            None => match profile.databases.len() {
                1 => Ok(profile.databases.keys().next().cloned().unwrap_or_default()),
                0 => Err(Error::Usage(
                    "no database logged in: run `postern db ls` then `postern db login NAME`"
                        .to_owned(),
                )),
                _ => Err(Error::Usage(format!(
                    "several databases are logged in ({}); choose one with --db NAME",
                    profile
                        .databases
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            },
        }
    }

    /// Why database `name` needs a new `db login` before connecting as `db_user` to
    /// `db_name` (`None` keeps what is logged in), or `None` when its cert is good.
    pub fn relogin_reason(
        &self,
        profile: &Profile,
        name: &str,
        db_user: Option<&str>,
        db_name: Option<&str>,
    ) -> Option<String> {
        let Some(login) = profile.databases.get(name) else {
            return Some("not logged in".to_owned());
        };
        let path = self.home.keys(&profile.proxy).db_cert(name);
        let identity = read_text(&path)
            .and_then(|pem| cert_der(&pem))
            .and_then(|der| decode_identity_unverified(&der).map_err(Error::from));
        let identity = match identity {
            Ok(identity) => identity,
            Err(_) => return Some("its certificate is missing".to_owned()),
        };
        if identity.expires.as_secs() <= self.clock.now().as_secs() {
            return Some("its certificate expired".to_owned());
        }
        let route = identity.route.as_ref();
        if route.is_none_or(|route| route.service != name) {
            return Some("its certificate routes to another database".to_owned());
        }
        if db_user.is_some_and(|user| user != login.db_user)
            || db_name.is_some_and(|db| db != login.db_name)
        {
            return Some("another db user or database name was asked for".to_owned());
        }
        None
    }
}

fn read_text(path: &std::path::Path) -> Result<String, Error> {
    let text = crate::files::read_or_empty(path)?;
    if text.is_empty() {
        return Err(Error::NotLoggedIn);
    }
    Ok(text)
}

fn read_cas(path: &std::path::Path) -> Result<Vec<TrustedCa>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::File {
        path: path.to_owned(),
        source,
    })?;
    let cas = TrustedCa::from_pem_bundle(&text)?;
    if cas.is_empty() {
        return Err(Error::Corrupt {
            path: path.to_owned(),
            reason: "no CA certificate in it".to_owned(),
        });
    }
    Ok(cas)
}

fn cert_der(pem: &str) -> Result<CertificateDer<'static>, Error> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|error| Error::Tls(format!("certificate PEM: {error}")))
}

fn credentials(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let cert = cert_der(&read_text(cert)?)?;
    let key = PrivateKey::from_pem(&read_text(key)?)?;
    Ok((vec![cert], key.to_rustls()))
}

/// Maps the API client's errors onto what the user can do about them.
fn api_error(proxy: &str, user: &str, error: postern_auth::Error) -> Error {
    match error {
        postern_auth::Error::Unreachable { reason, .. } => Error::Unreachable {
            addr: proxy.to_owned(),
            reason,
        },
        postern_auth::Error::Remote { status: 401, .. } => Error::WrongPassword {
            user: user.to_owned(),
        },
        postern_auth::Error::Remote { message, .. } => Error::Refused(message),
        other => Error::Refused(other.to_string()),
    }
}

/// A Unix time as RFC 3339 UTC.
pub fn format_time(unix_secs: u64) -> String {
    i64::try_from(unix_secs)
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{unix_secs} (Unix time)"))
}

//! Who a certificate speaks for, and how that is written into X.509 and read back.
//!
//! The user name is the subject common name; every other field is its own non-critical
//! extension under Postern's arc (see [`crate::oid`]). Encoding and decoding apply the
//! same limits ([`check_identity`]), so any [`Identity`] that encodes decodes back equal,
//! and anything the decoder accepts could have been encoded.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use rustls_pki_types::UnixTime;
use x509_parser::certificate::X509Certificate;

use crate::der::{self, Reader};
use crate::error::Error;
use crate::oid::{self, ArcMember, Field};

/// Longest string (in bytes) in any identity field.
pub const FIELD_LEN_MAX: usize = 1024;
/// Most entries in any list (roles, allowed names, trait values) and most traits.
pub const LIST_LEN_MAX: usize = 256;

/// A user's identity as carried by user certificates and proxy→agent certificates.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// User name (the subject common name).
    pub user: String,
    /// Role names, in the order the auth service listed them.
    pub roles: Vec<String>,
    /// Traits (e.g. `db_users`, `logins`, external claims): name → values.
    pub traits: BTreeMap<String, Vec<String>>,
    /// The database this certificate is for, set by `postern db login`.
    pub route: Option<DbRoute>,
    /// Database names the user's roles allow (may contain `*`).
    pub allowed_db_names: Vec<String>,
    /// Database users the user's roles allow (may contain `*`).
    pub allowed_db_users: Vec<String>,
    /// What the certificate is for: the user's own, or proxy→agent.
    pub usage: Usage,
    /// Cluster that issued it.
    pub cluster: String,
    /// IP address the user logged in from, when known.
    pub client_ip: Option<IpAddr>,
    /// Expiry: the certificate's `notAfter`, whole seconds.
    pub expires: UnixTime,
}

/// The database a certificate is routed to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DbRoute {
    /// Database service name as registered by agents (`postern db ls`).
    pub service: String,
    /// Wire protocol.
    pub protocol: DbProtocol,
    /// Database user to log in as (may be empty: decided at connect time).
    pub db_user: String,
    /// Database name (may be empty: the protocol's default).
    pub db_name: String,
}

/// Database wire protocols.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DbProtocol {
    /// PostgreSQL.
    Postgres,
    /// MySQL and MariaDB.
    Mysql,
}

impl DbProtocol {
    /// The token written into certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        }
    }

    fn from_token(s: &str) -> Option<Self> {
        match s {
            "postgres" => Some(Self::Postgres),
            "mysql" => Some(Self::Mysql),
            _ => None,
        }
    }
}

/// What an identity certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Usage {
    /// The user's own certificate, presented by the user's client to the proxy.
    User,
    /// A short-lived certificate the proxy presents to an agent on the user's behalf.
    Db,
}

impl Usage {
    /// The cert role that carries this usage.
    pub fn cert_role(self) -> CertRole {
        match self {
            Self::User => CertRole::User,
            Self::Db => CertRole::Db,
        }
    }
}

/// The role of a service host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostRole {
    /// A proxy.
    Proxy,
    /// A database service agent.
    Agent,
    /// An auth server.
    Auth,
}

impl HostRole {
    /// The cert role that carries this host role.
    pub fn cert_role(self) -> CertRole {
        match self {
            Self::Proxy => CertRole::Proxy,
            Self::Agent => CertRole::Agent,
            Self::Auth => CertRole::Auth,
        }
    }

    /// The token used in certificates (`proxy`, `agent`, `auth`).
    pub fn as_str(self) -> &'static str {
        self.cert_role().as_str()
    }
}

/// The three certificate authorities of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CaKind {
    /// Signs user certificates and proxy→agent certificates.
    User,
    /// Signs proxy, agent and auth host certificates, and SSH certificates for the tunnel.
    Host,
    /// Signs certificates agents present to databases, and self-hosted database server certs.
    Db,
}

impl CaKind {
    /// The cert role of this CA's own certificate.
    pub fn cert_role(self) -> CertRole {
        match self {
            Self::User => CertRole::UserCa,
            Self::Host => CertRole::HostCa,
            Self::Db => CertRole::DbCa,
        }
    }

    /// The only CA kind that may sign `role`; `None` for CA roles (self-signed).
    pub fn signer_of(role: CertRole) -> Option<Self> {
        match role {
            CertRole::User | CertRole::Db => Some(Self::User),
            CertRole::Proxy | CertRole::Agent | CertRole::Auth => Some(Self::Host),
            CertRole::DbClient | CertRole::DbServer => Some(Self::Db),
            CertRole::UserCa | CertRole::HostCa | CertRole::DbCa => None,
        }
    }
}

impl fmt::Display for CaKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::User => "user",
            Self::Host => "host",
            Self::Db => "database",
        })
    }
}

/// Every kind of certificate Postern issues; written into the cert role field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CertRole {
    /// A user's certificate (usage user).
    User,
    /// Proxy→agent certificate carrying a user's identity (usage db).
    Db,
    /// Proxy host.
    Proxy,
    /// Database service agent host.
    Agent,
    /// Auth server host.
    Auth,
    /// Certificate an agent presents to a database (CN = database user).
    DbClient,
    /// Server certificate of a self-hosted database.
    DbServer,
    /// The user CA itself.
    UserCa,
    /// The host CA itself.
    HostCa,
    /// The database CA itself.
    DbCa,
}

impl CertRole {
    const ALL: [Self; 10] = [
        Self::User,
        Self::Db,
        Self::Proxy,
        Self::Agent,
        Self::Auth,
        Self::DbClient,
        Self::DbServer,
        Self::UserCa,
        Self::HostCa,
        Self::DbCa,
    ];

    /// The token written into certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Db => "db",
            Self::Proxy => "proxy",
            Self::Agent => "agent",
            Self::Auth => "auth",
            Self::DbClient => "db-client",
            Self::DbServer => "db-server",
            Self::UserCa => "user-ca",
            Self::HostCa => "host-ca",
            Self::DbCa => "db-ca",
        }
    }

    fn from_token(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// True for proxy, agent and auth.
    pub fn is_host(self) -> bool {
        matches!(self, Self::Proxy | Self::Agent | Self::Auth)
    }
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service host's identity, as carried by host certificates.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostIdentity {
    /// Stable host id (the subject common name).
    pub host_id: String,
    /// What the host is.
    pub role: HostRole,
    /// Cluster it belongs to.
    pub cluster: String,
    /// DNS names and IP addresses it serves under (subject alternative names). IP
    /// addresses are written in their canonical text form.
    pub names: Vec<String>,
    /// Expiry: the certificate's `notAfter`.
    pub expires: UnixTime,
}

// ---------------------------------------------------------------------------------------
// Limits shared by encoding and decoding.

/// Checks one string field; `non_empty` for names that must be given.
fn check_str(field: Field, s: &str, non_empty: bool) -> Result<(), (Field, String)> {
    if non_empty && s.is_empty() {
        return Err((field, "must not be empty".into()));
    }
    if s.len() > FIELD_LEN_MAX {
        return Err((
            field,
            format!("is {} bytes, more than {FIELD_LEN_MAX}", s.len()),
        ));
    }
    // Control characters would let a name forge lines in logs and audit events.
    if s.chars().any(char::is_control) {
        return Err((field, format!("{s:?} contains control characters")));
    }
    Ok(())
}

fn check_list(field: Field, items: &[String]) -> Result<(), (Field, String)> {
    if items.len() > LIST_LEN_MAX {
        return Err((
            field,
            format!("has {} entries, more than {LIST_LEN_MAX}", items.len()),
        ));
    }
    items.iter().try_for_each(|s| check_str(field, s, true))
}

/// The limits every identity must meet, applied when issuing and when decoding.
pub(crate) fn check_identity(id: &Identity) -> Result<(), (Field, String)> {
    check_str(Field::User, &id.user, true)?;
    check_str(Field::Cluster, &id.cluster, true)?;
    check_list(Field::Roles, &id.roles)?;
    check_list(Field::AllowedDbNames, &id.allowed_db_names)?;
    check_list(Field::AllowedDbUsers, &id.allowed_db_users)?;
    if id.traits.len() > LIST_LEN_MAX {
        return Err((
            Field::Traits,
            format!("has {} traits, more than {LIST_LEN_MAX}", id.traits.len()),
        ));
    }
    for (name, values) in &id.traits {
        check_str(Field::Traits, name, true)?;
        if values.len() > LIST_LEN_MAX {
            return Err((
                Field::Traits,
                format!("trait {name:?} has more than {LIST_LEN_MAX} values"),
            ));
        }
        values
            .iter()
            .try_for_each(|v| check_str(Field::Traits, v, false))?;
    }
    if let Some(route) = &id.route {
        check_str(Field::Route, &route.service, true)?;
        check_str(Field::Route, &route.db_user, false)?;
        check_str(Field::Route, &route.db_name, false)?;
    }
    Ok(())
}

pub(crate) fn check_host(host: &HostIdentity) -> Result<(), (Field, String)> {
    check_str(Field::User, &host.host_id, true)?;
    check_str(Field::Cluster, &host.cluster, true)?;
    if host.names.len() > LIST_LEN_MAX {
        return Err((
            Field::User,
            format!("host has more than {LIST_LEN_MAX} names"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Encoding.

fn utf8_field(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    der::write_utf8(&mut out, s);
    out
}

fn utf8_list(out: &mut Vec<u8>, items: &[String]) {
    der::write_sequence(out, |seq| {
        items.iter().for_each(|s| der::write_utf8(seq, s))
    });
}

fn list_field(items: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    utf8_list(&mut out, items);
    out
}

/// The cert role and cluster fields every Postern certificate carries.
pub(crate) fn common_extensions(role: CertRole, cluster: &str) -> Vec<(Field, Vec<u8>)> {
    vec![
        (Field::CertRole, utf8_field(role.as_str())),
        (Field::Cluster, utf8_field(cluster)),
    ]
}

/// The extensions carrying `id` (everything but the user name and expiry, which are the
/// subject common name and `notAfter`).
pub(crate) fn identity_extensions(id: &Identity) -> Vec<(Field, Vec<u8>)> {
    let mut fields = common_extensions(id.usage.cert_role(), &id.cluster);
    fields.push((Field::Roles, list_field(&id.roles)));
    let mut traits = Vec::new();
    der::write_sequence(&mut traits, |seq| {
        for (name, values) in &id.traits {
            der::write_sequence(seq, |pair| {
                der::write_utf8(pair, name);
                utf8_list(pair, values);
            });
        }
    });
    fields.push((Field::Traits, traits));
    if let Some(route) = &id.route {
        let mut out = Vec::new();
        der::write_sequence(&mut out, |seq| {
            der::write_utf8(seq, &route.service);
            der::write_utf8(seq, route.protocol.as_str());
            der::write_utf8(seq, &route.db_user);
            der::write_utf8(seq, &route.db_name);
        });
        fields.push((Field::Route, out));
    }
    fields.push((Field::AllowedDbNames, list_field(&id.allowed_db_names)));
    fields.push((Field::AllowedDbUsers, list_field(&id.allowed_db_users)));
    if let Some(ip) = id.client_ip {
        let mut out = Vec::new();
        match ip {
            IpAddr::V4(v4) => der::write_tlv(&mut out, der::TAG_OCTET_STRING, &v4.octets()),
            IpAddr::V6(v6) => der::write_tlv(&mut out, der::TAG_OCTET_STRING, &v6.octets()),
        }
        fields.push((Field::ClientIp, out));
    }
    fields
}

// ---------------------------------------------------------------------------------------
// Decoding.

/// How error messages name a certificate: its quoted subject common name.
pub(crate) fn describe(cert: &X509Certificate<'_>) -> String {
    match cert
        .subject()
        .iter_common_name()
        .next()
        .map(|cn| cn.as_str())
    {
        Some(Ok(cn)) => format!("{cn:?}"),
        _ => "(without common name)".to_string(),
    }
}

/// The identity fields of one certificate, each present at most once, before their
/// contents are decoded.
#[derive(Debug)]
pub(crate) struct RawFields<'a> {
    label: String,
    common_name: Option<String>,
    extensions: BTreeMap<Field, &'a [u8]>,
    not_after: i64,
}

impl<'a> RawFields<'a> {
    /// Collects our fields; rejects unknown fields under our arc and duplicates.
    pub(crate) fn collect(cert: &X509Certificate<'a>) -> Result<Self, Error> {
        let label = describe(cert);
        let mut extensions = BTreeMap::new();
        for ext in cert.extensions() {
            match oid::classify(&ext.oid) {
                ArcMember::Foreign => {}
                ArcMember::Unknown => {
                    return Err(Error::UnknownIdentityField {
                        cert: label,
                        oid: ext.oid.to_id_string(),
                    });
                }
                ArcMember::Known(field) => {
                    if extensions.insert(field, ext.value).is_some() {
                        return Err(Error::DuplicateIdentityField { cert: label, field });
                    }
                }
            }
        }
        let mut common_name = None;
        for attr in cert.subject().iter_attributes() {
            if oid::classify(attr.attr_type()) != ArcMember::Foreign {
                return Err(Error::UnknownIdentityField {
                    cert: label,
                    oid: attr.attr_type().to_id_string(),
                });
            }
        }
        for cn in cert.subject().iter_common_name() {
            let value = cn.as_str().map_err(|e| Error::InvalidIdentityField {
                cert: label.clone(),
                field: Field::User,
                reason: format!("common name is not a string: {e}"),
            })?;
            if common_name.replace(value.to_string()).is_some() {
                return Err(Error::DuplicateIdentityField {
                    cert: label,
                    field: Field::User,
                });
            }
        }
        Ok(Self {
            label,
            common_name,
            extensions,
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    fn invalid(&self, field: Field, reason: impl fmt::Display) -> Error {
        Error::InvalidIdentityField {
            cert: self.label.clone(),
            field,
            reason: reason.to_string(),
        }
    }

    fn required(&self, field: Field) -> Result<&'a [u8], Error> {
        self.extensions
            .get(&field)
            .copied()
            .ok_or_else(|| Error::MissingIdentityField {
                cert: self.label.clone(),
                field,
            })
    }

    fn read_utf8(&self, field: Field) -> Result<&'a str, Error> {
        let mut r = Reader::new(self.required(field)?);
        let s = r.read_utf8().map_err(|e| self.invalid(field, e))?;
        r.finish().map_err(|e| self.invalid(field, e))?;
        Ok(s)
    }

    fn read_list(&self, field: Field) -> Result<Vec<String>, Error> {
        let mut outer = Reader::new(self.required(field)?);
        let list = read_utf8_seq(&mut outer).map_err(|e| self.invalid(field, e))?;
        outer.finish().map_err(|e| self.invalid(field, e))?;
        Ok(list)
    }

    /// The cert role field, which every Postern certificate has.
    pub(crate) fn role(&self) -> Result<CertRole, Error> {
        let token = self.read_utf8(Field::CertRole)?;
        CertRole::from_token(token)
            .ok_or_else(|| self.invalid(Field::CertRole, format!("unknown role {token:?}")))
    }

    /// The cluster field, which every Postern certificate has.
    pub(crate) fn cluster(&self) -> Result<&'a str, Error> {
        let cluster = self.read_utf8(Field::Cluster)?;
        check_str(Field::Cluster, cluster, true).map_err(|(f, r)| self.invalid(f, r))?;
        Ok(cluster)
    }

    fn expires(&self) -> Result<UnixTime, Error> {
        let secs = u64::try_from(self.not_after).map_err(|_| Error::Malformed {
            cert: self.label.clone(),
            reason: "notAfter is before 1970".into(),
        })?;
        Ok(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            secs,
        )))
    }

    fn common_name(&self) -> Result<&str, Error> {
        self.common_name
            .as_deref()
            .ok_or_else(|| Error::MissingIdentityField {
                cert: self.label.clone(),
                field: Field::User,
            })
    }

    /// Refuses fields that only identity certificates carry (host and database certs
    /// have a role and a cluster, nothing else).
    pub(crate) fn only_common_fields(&self, role: CertRole) -> Result<(), Error> {
        match self
            .extensions
            .keys()
            .find(|f| !matches!(f, Field::CertRole | Field::Cluster))
        {
            Some(field) => {
                Err(self.invalid(*field, format!("not allowed in a {role} certificate")))
            }
            None => Ok(()),
        }
    }

    /// Decodes a user identity. The caller has checked the role is `user` or `db`.
    pub(crate) fn identity(&self, usage: Usage) -> Result<Identity, Error> {
        let user = self.common_name()?.to_string();
        let cluster = self.cluster()?.to_string();
        let roles = self.read_list(Field::Roles)?;
        let traits = self.traits()?;
        let route = self.route()?;
        let allowed_db_names = self.read_list(Field::AllowedDbNames)?;
        let allowed_db_users = self.read_list(Field::AllowedDbUsers)?;
        let client_ip = self.client_ip()?;
        let id = Identity {
            user,
            roles,
            traits,
            route,
            allowed_db_names,
            allowed_db_users,
            usage,
            cluster,
            client_ip,
            expires: self.expires()?,
        };
        check_identity(&id).map_err(|(field, reason)| self.invalid(field, reason))?;
        Ok(id)
    }

    /// Decodes a host identity; `names` come from the subject alternative names.
    pub(crate) fn host(&self, role: HostRole, names: Vec<String>) -> Result<HostIdentity, Error> {
        self.only_common_fields(role.cert_role())?;
        let host = HostIdentity {
            host_id: self.common_name()?.to_string(),
            role,
            cluster: self.cluster()?.to_string(),
            names,
            expires: self.expires()?,
        };
        check_host(&host).map_err(|(field, reason)| self.invalid(field, reason))?;
        Ok(host)
    }

    fn traits(&self) -> Result<BTreeMap<String, Vec<String>>, Error> {
        let field = Field::Traits;
        let bad = |e: &dyn fmt::Display| self.invalid(field, e);
        let mut outer = Reader::new(self.required(field)?);
        let mut pairs = Reader::new(outer.read(der::TAG_SEQUENCE).map_err(|e| bad(&e))?);
        outer.finish().map_err(|e| bad(&e))?;
        let mut traits = BTreeMap::new();
        let mut previous: Option<String> = None;
        while !pairs.is_empty() {
            if traits.len() == LIST_LEN_MAX {
                return Err(self.invalid(field, format!("more than {LIST_LEN_MAX} traits")));
            }
            let mut pair = Reader::new(pairs.read(der::TAG_SEQUENCE).map_err(|e| bad(&e))?);
            let name = pair.read_utf8().map_err(|e| bad(&e))?.to_string();
            let values = read_utf8_seq(&mut pair).map_err(|e| bad(&e))?;
            pair.finish().map_err(|e| bad(&e))?;
            // Encoding writes names in ascending order; anything else (including a
            // repeated name) was not written by us.
            if previous.as_ref().is_some_and(|p| *p >= name) {
                return Err(
                    self.invalid(field, format!("trait {name:?} is out of order or repeated"))
                );
            }
            previous = Some(name.clone());
            traits.insert(name, values);
        }
        Ok(traits)
    }

    fn route(&self) -> Result<Option<DbRoute>, Error> {
        let field = Field::Route;
        let Some(content) = self.extensions.get(&field) else {
            return Ok(None);
        };
        let bad = |e: &dyn fmt::Display| self.invalid(field, e);
        let mut outer = Reader::new(content);
        let mut seq = Reader::new(outer.read(der::TAG_SEQUENCE).map_err(|e| bad(&e))?);
        outer.finish().map_err(|e| bad(&e))?;
        let service = seq.read_utf8().map_err(|e| bad(&e))?.to_string();
        let protocol = seq.read_utf8().map_err(|e| bad(&e))?;
        let db_user = seq.read_utf8().map_err(|e| bad(&e))?.to_string();
        let db_name = seq.read_utf8().map_err(|e| bad(&e))?.to_string();
        seq.finish().map_err(|e| bad(&e))?;
        let protocol = DbProtocol::from_token(protocol)
            .ok_or_else(|| self.invalid(field, format!("unknown protocol {protocol:?}")))?;
        Ok(Some(DbRoute {
            service,
            protocol,
            db_user,
            db_name,
        }))
    }

    fn client_ip(&self) -> Result<Option<IpAddr>, Error> {
        let field = Field::ClientIp;
        let Some(content) = self.extensions.get(&field) else {
            return Ok(None);
        };
        let mut r = Reader::new(content);
        let bytes = r
            .read(der::TAG_OCTET_STRING)
            .map_err(|e| self.invalid(field, e))?;
        r.finish().map_err(|e| self.invalid(field, e))?;
        if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
            Ok(Some(IpAddr::from(v4)))
        } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
            Ok(Some(IpAddr::from(v6)))
        } else {
            Err(self.invalid(field, format!("{} bytes, expected 4 or 16", bytes.len())))
        }
    }
}

/// Reads a SEQUENCE OF UTF8String, at most [`LIST_LEN_MAX`] long.
fn read_utf8_seq(r: &mut Reader<'_>) -> Result<Vec<String>, String> {
    let mut seq = Reader::new(r.read(der::TAG_SEQUENCE).map_err(|e| e.to_string())?);
    let mut items = Vec::new();
    while !seq.is_empty() {
        if items.len() == LIST_LEN_MAX {
            return Err(format!("more than {LIST_LEN_MAX} entries"));
        }
        items.push(seq.read_utf8().map_err(|e| e.to_string())?.to_string());
    }
    Ok(items)
}

/// [`check_str`] for issuing requests: errors become [`Error::InvalidRequest`].
pub(crate) fn check_str_pub(field: Field, s: &str, non_empty: bool) -> Result<(), Error> {
    check_str(field, s, non_empty).map_err(|(field, reason)| Error::InvalidRequest {
        field: field.name(),
        reason,
    })
}

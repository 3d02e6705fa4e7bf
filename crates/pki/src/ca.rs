//! The three certificate authorities, and issuing.
//!
//! Randomness: key generation (CA keys, database server keys) draws from the operating
//! system through ring, as rcgen does. Everything else is
//! deterministic: serial numbers are hashes of the certificate's contents, and all times
//! come from the caller's `now`.

use std::fmt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::Error;
use crate::identity::{
    self, CaKind, CertRole, HostIdentity, Identity, Usage, check_host, check_identity,
};
use crate::keys::{PrivateKey, PublicKey};
use crate::oid::Field;
use crate::trust::TrustedCa;
use crate::validate::VerifiedIdentity;

/// How far before `now` a new certificate's `notBefore` is set, so that peers whose
/// clocks run a little behind accept it.
pub const NOT_BEFORE_BACKDATE: Duration = Duration::from_secs(60);

/// Default lifetime of a user certificate (`postern login`); the auth service caps it by
/// the roles' `max_session_ttl`.
pub const USER_CERT_TTL_DEFAULT: Duration = Duration::from_secs(12 * 3600);

/// Longest-lived leaf certificate this crate will issue (database server certs are the
/// long ones: `--ttl 2190h` is common).
pub const LEAF_TTL_MAX: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

// ---------------------------------------------------------------------------------------
// Issued certificates.

/// A certificate this crate issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    der: CertificateDer<'static>,
    not_before: UnixTime,
    not_after: UnixTime,
}

impl IssuedCert {
    /// Reads a leaf certificate Postern issued (DER), e.g. one the auth service returned
    /// to a joining host or one saved on disk. Checks that it is one well-formed X.509
    /// certificate carrying a Postern role; whether it chains to a trusted CA is for the
    /// validator (and the TLS peer) to decide.
    pub fn from_der(der: &[u8]) -> Result<Self, Error> {
        let load = |reason: String| Error::Load {
            what: "certificate",
            reason,
        };
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| load(e.to_string()))?;
        if !rest.is_empty() {
            return Err(load("trailing bytes after the certificate".into()));
        }
        let role = identity::RawFields::collect(&cert)?.role()?;
        if matches!(role, CertRole::UserCa | CertRole::HostCa | CertRole::DbCa) {
            return Err(load(format!(
                "role is {role}, a CA, not a leaf certificate"
            )));
        }
        let time = |t: x509_parser::time::ASN1Time| {
            u64::try_from(t.timestamp())
                .map(|secs| UnixTime::since_unix_epoch(Duration::from_secs(secs)))
                .map_err(|_| load("validity before 1970".into()))
        };
        Ok(Self {
            not_before: time(cert.validity().not_before)?,
            not_after: time(cert.validity().not_after)?,
            der: CertificateDer::from(der.to_vec()),
        })
    }

    /// Reads the first certificate of a PEM text (`-----BEGIN CERTIFICATE-----`).
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        let der = CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .ok_or_else(|| Error::Load {
                what: "certificate PEM",
                reason: "no CERTIFICATE block found".into(),
            })?
            .map_err(|e| Error::Load {
                what: "certificate PEM",
                reason: e.to_string(),
            })?;
        Self::from_der(&der)
    }

    /// Start of the validity period.
    pub fn not_before(&self) -> UnixTime {
        self.not_before
    }

    /// End of the validity period.
    pub fn not_after(&self) -> UnixTime {
        self.not_after
    }

    /// DER bytes, as rustls and the validator take them.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// PEM text (`-----BEGIN CERTIFICATE-----`).
    pub fn to_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.der)
    }
}

/// The three files `postern admin auth sign --format db` writes for a self-hosted
/// database (PostgreSQL `ssl_cert_file`, `ssl_key_file`, `ssl_ca_file`; MySQL `ssl-cert`,
/// `ssl-key`, `ssl-ca`).
#[derive(Clone, PartialEq, Eq)]
pub struct DbServerFiles {
    /// `server.crt`: the database's server certificate, signed by the database CA.
    pub server_crt: String,
    /// `server.key`: its private key (secret).
    pub server_key: String,
    /// `server.cas`: the CA bundle the database trusts for client certificates (the
    /// database CA, which signs the certificates agents present).
    pub server_cas: String,
}

impl fmt::Debug for DbServerFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbServerFiles")
            .field("server_crt", &self.server_crt)
            .field("server_cas", &self.server_cas)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------
// Trusted CA certificates (the public half).

// ---------------------------------------------------------------------------------------
// Certificate authorities (with their private keys).

/// The PEM blobs that persist one CA.
#[derive(Clone, PartialEq, Eq)]
pub struct CaPem {
    /// CA certificate.
    pub cert: String,
    /// PKCS#8 private key (secret).
    pub key: String,
    /// Host CA only: the OpenSSH private key that signs tunnel certificates (secret).
    pub ssh_key: Option<String>,
}

impl fmt::Debug for CaPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaPem")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

/// A certificate authority with its private key: user, host or database.
pub struct CertAuthority {
    trusted: TrustedCa,
    issuer: Issuer<'static, KeyPair>,
    /// Host CA only: signs SSH certificates for the reverse tunnel.
    pub(crate) ssh_key: Option<ssh_key::PrivateKey>,
}

impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority")
            .field("trusted", &self.trusted)
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Creates a new CA for `cluster`, valid from `now` (less [`NOT_BEFORE_BACKDATE`])
    /// for `ttl`. The key comes from the OS through ring; the host CA also gets an
    /// Ed25519 SSH key, seeded the same way.
    pub fn generate(
        kind: CaKind,
        cluster: &str,
        now: UnixTime,
        ttl: Duration,
    ) -> Result<Self, Error> {
        identity::check_str_pub(Field::Cluster, cluster, true)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| {
            Error::KeyGeneration {
                reason: e.to_string(),
            }
        })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Postern {kind} CA"));
        dn.push(DnType::OrganizationName, cluster);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let not_before = backdate(now);
        let not_after = add(now, ttl)?;
        params.not_before = to_offset(not_before)?;
        params.not_after = to_offset(not_after)?;
        let extensions = identity::common_extensions(kind.cert_role(), cluster);
        params.serial_number = Some(serial(
            &rcgen::PublicKeyData::subject_public_key_info(&key),
            not_before,
            &extensions,
        ));
        params.custom_extensions = custom_extensions(extensions);
        let cert = params.self_signed(&key).map_err(signing)?;
        let ssh_key = match kind {
            CaKind::Host => Some(crate::ssh::generate_ca_key()?),
            CaKind::User | CaKind::Db => None,
        };
        Self::from_parts(cert.der(), key, ssh_key)
    }

    /// Loads a CA saved with [`CertAuthority::to_pem`].
    pub fn from_pem(pem: &CaPem) -> Result<Self, Error> {
        let der = CertificateDer::from_pem_slice(pem.cert.as_bytes()).map_err(|e| Error::Load {
            what: "CA certificate PEM",
            reason: e.to_string(),
        })?;
        let key = KeyPair::from_pem(&pem.key).map_err(|e| Error::Load {
            what: "CA private key",
            reason: e.to_string(),
        })?;
        let ssh_key = pem
            .ssh_key
            .as_deref()
            .map(crate::ssh::load_ca_key)
            .transpose()?;
        Self::from_parts(&der, key, ssh_key)
    }

    fn from_parts(
        der: &CertificateDer<'_>,
        key: KeyPair,
        ssh_key: Option<ssh_key::PrivateKey>,
    ) -> Result<Self, Error> {
        let trusted = TrustedCa::from_der(der)?;
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| Error::Load {
            what: "CA certificate",
            reason: e.to_string(),
        })?;
        if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err(Error::Load {
                what: "CA private key",
                reason: "it does not match the CA certificate's public key".into(),
            });
        }
        if (trusted.kind() == CaKind::Host) != ssh_key.is_some() {
            return Err(Error::Load {
                what: "CA SSH key",
                reason: "the host CA needs an SSH key, and only the host CA has one".into(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(der, key).map_err(|e| Error::Load {
            what: "CA certificate",
            reason: e.to_string(),
        })?;
        Ok(Self {
            trusted,
            issuer,
            ssh_key,
        })
    }

    /// The PEM blobs to persist this CA (the key parts are secret).
    pub fn to_pem(&self) -> Result<CaPem, Error> {
        Ok(CaPem {
            cert: self.trusted.to_pem(),
            key: self.issuer.key().serialize_pem(),
            ssh_key: self
                .ssh_key
                .as_ref()
                .map(crate::ssh::ca_key_to_openssh)
                .transpose()?,
        })
    }

    /// Which CA this is.
    pub fn kind(&self) -> CaKind {
        self.trusted.kind()
    }

    /// The public certificate, to hand to validators and TLS configurations.
    pub fn trusted(&self) -> &TrustedCa {
        &self.trusted
    }

    /// Issues a certificate for `identity` to `subject_key`: a user certificate when
    /// `identity.usage` is [`Usage::User`], a proxy→agent certificate when it is
    /// [`Usage::Db`]. Expires at `identity.expires`. Needs the user CA.
    pub fn issue_identity(
        &self,
        identity: &Identity,
        subject_key: &PublicKey,
        now: UnixTime,
    ) -> Result<IssuedCert, Error> {
        check_identity(identity).map_err(|(field, reason)| Error::InvalidRequest {
            field: field.name(),
            reason,
        })?;
        self.same_cluster(&identity.cluster)?;
        self.sign_leaf(
            Leaf {
                role: identity.usage.cert_role(),
                common_name: &identity.user,
                names: &[],
                extensions: identity::identity_extensions(identity),
                not_after: identity.expires,
            },
            subject_key,
            now,
        )
    }

    /// Issues the short-lived certificate a proxy presents to an agent on behalf of a
    /// verified user: the same identity with usage `db`, expiring at `now + ttl` or the
    /// user's own expiry, whichever is first. Needs the user CA. Returns the identity
    /// written, too. The auth service obtains `user` by validating the user certificate
    /// the proxy forwards ([`crate::Validator::verify_identity`] with
    /// [`crate::Purpose::UserDatabase`]), so it never mints from unchecked claims.
    pub fn issue_db_access(
        &self,
        user: &VerifiedIdentity,
        subject_key: &PublicKey,
        now: UnixTime,
        ttl: Duration,
    ) -> Result<(Identity, IssuedCert), Error> {
        let mut identity = user.identity().clone();
        if identity.route.is_none() {
            return Err(Error::RouteMissing {
                cert: format!("{:?}", identity.user),
                user: identity.user,
            });
        }
        identity.usage = Usage::Db;
        identity.expires = identity.expires.min(add(now, ttl)?);
        let cert = self.issue_identity(&identity, subject_key, now)?;
        Ok((identity, cert))
    }

    /// Issues a proxy, agent or auth host certificate. Needs the host CA.
    pub fn issue_host(
        &self,
        host: &HostIdentity,
        subject_key: &PublicKey,
        now: UnixTime,
    ) -> Result<IssuedCert, Error> {
        check_host(host).map_err(|(field, reason)| Error::InvalidRequest {
            field: field.name(),
            reason,
        })?;
        self.same_cluster(&host.cluster)?;
        self.sign_leaf(
            Leaf {
                role: host.role.cert_role(),
                common_name: &host.host_id,
                names: &host.names,
                extensions: identity::common_extensions(host.role.cert_role(), self.cluster()),
                not_after: host.expires,
            },
            subject_key,
            now,
        )
    }

    /// Issues the certificate an agent presents to a self-hosted database: CN is the
    /// database user (PostgreSQL `cert` auth, MySQL `REQUIRE SUBJECT '/CN=NAME'`). Needs
    /// the database CA.
    pub fn issue_db_client(
        &self,
        db_user: &str,
        subject_key: &PublicKey,
        now: UnixTime,
        ttl: Duration,
    ) -> Result<IssuedCert, Error> {
        identity::check_str_pub(Field::User, db_user, true)?;
        self.sign_leaf(
            Leaf {
                role: CertRole::DbClient,
                common_name: db_user,
                names: &[],
                extensions: identity::common_extensions(CertRole::DbClient, self.cluster()),
                not_after: add(now, ttl)?,
            },
            subject_key,
            now,
        )
    }

    /// `postern admin auth sign --format db`: a new key and server certificate for a
    /// self-hosted database reachable as `hostnames` (DNS names or IP addresses; the
    /// first is also the common name), valid for `ttl`, and the CA bundle the database
    /// should trust for client certificates. Needs the database CA. During a CA rotation,
    /// append the other database CA's [`TrustedCa::to_pem`] to `server_cas`.
    pub fn sign_db_server(
        &self,
        hostnames: &[String],
        now: UnixTime,
        ttl: Duration,
    ) -> Result<DbServerFiles, Error> {
        let first = hostnames.first().ok_or(Error::InvalidRequest {
            field: "hostnames",
            reason: "must name at least one host".into(),
        })?;
        let key = PrivateKey::generate()?;
        let cert = self.sign_leaf(
            Leaf {
                role: CertRole::DbServer,
                common_name: first,
                names: hostnames,
                extensions: identity::common_extensions(CertRole::DbServer, self.cluster()),
                not_after: add(now, ttl)?,
            },
            &key.public_key(),
            now,
        )?;
        Ok(DbServerFiles {
            server_crt: cert.to_pem(),
            server_key: key.to_pem(),
            server_cas: self.trusted.to_pem(),
        })
    }

    fn cluster(&self) -> &str {
        self.trusted.cluster()
    }

    pub(crate) fn same_cluster(&self, cluster: &str) -> Result<(), Error> {
        if cluster == self.cluster() {
            Ok(())
        } else {
            Err(Error::InvalidRequest {
                field: "cluster",
                reason: format!("{cluster:?} is not this CA's cluster {:?}", self.cluster()),
            })
        }
    }

    fn sign_leaf(
        &self,
        leaf: Leaf<'_>,
        subject_key: &PublicKey,
        now: UnixTime,
    ) -> Result<IssuedCert, Error> {
        let signer = CaKind::signer_of(leaf.role);
        if signer != Some(self.kind()) {
            return Err(Error::WrongCaKind {
                // Leaf roles always have a signer; CA roles are never passed here.
                expected: signer.unwrap_or(self.kind()),
                actual: self.kind(),
            });
        }
        let now_secs = secs(now);
        let not_after_secs = secs(leaf.not_after);
        if not_after_secs <= now_secs {
            return Err(Error::InvalidRequest {
                field: "expiry",
                reason: format!(
                    "{} is not after now ({})",
                    crate::error::fmt_time(leaf.not_after),
                    crate::error::fmt_time(now)
                ),
            });
        }
        if not_after_secs - now_secs > LEAF_TTL_MAX.as_secs() as i64 {
            return Err(Error::InvalidRequest {
                field: "expiry",
                reason: format!("is more than {} days away", LEAF_TTL_MAX.as_secs() / 86400),
            });
        }
        if not_after_secs > self.trusted.not_after_secs() {
            return Err(Error::InvalidRequest {
                field: "expiry",
                reason: "is after the CA's own expiry; rotate the CA first".into(),
            });
        }
        // Never before the CA itself became valid.
        let not_before = backdate(now).max(from_secs(self.trusted.not_before_secs()));

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, leaf.common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match leaf.role {
            CertRole::Proxy | CertRole::Agent | CertRole::Auth => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            CertRole::DbServer => vec![ExtendedKeyUsagePurpose::ServerAuth],
            _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.subject_alt_names = leaf
            .names
            .iter()
            .map(|name| san(name))
            .collect::<Result<_, _>>()?;
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(not_before)?;
        params.not_after = to_offset(leaf.not_after)?;
        params.serial_number = Some(serial(subject_key.der(), not_before, &leaf.extensions));
        params.custom_extensions = custom_extensions(leaf.extensions);
        let cert = params
            .signed_by(&subject_key.to_rcgen()?, &self.issuer)
            .map_err(signing)?;
        Ok(IssuedCert {
            der: cert.der().clone(),
            not_before,
            not_after: leaf.not_after,
        })
    }
}

/// What differs between the kinds of leaf certificate.
struct Leaf<'a> {
    role: CertRole,
    common_name: &'a str,
    names: &'a [String],
    extensions: Vec<(Field, Vec<u8>)>,
    not_after: UnixTime,
}

fn custom_extensions(fields: Vec<(Field, Vec<u8>)>) -> Vec<CustomExtension> {
    fields
        .into_iter()
        .map(|(field, content)| CustomExtension::from_oid_content(&field.oid(), content))
        .collect()
}

fn san(name: &str) -> Result<SanType, Error> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        // Decoding writes the canonical form; insist on it so names round-trip exactly.
        if ip.to_string() != name {
            return Err(Error::InvalidRequest {
                field: "host name",
                reason: format!("write IP address {name:?} as {ip}"),
            });
        }
        return Ok(SanType::IpAddress(ip));
    }
    let dns = rcgen::string::Ia5String::try_from(name).map_err(|e| Error::InvalidRequest {
        field: "host name",
        reason: format!("{name:?}: {e}"),
    })?;
    Ok(SanType::DnsName(dns))
}

/// A serial number unique per (key, start time, contents) without a random source:
/// SHA-256 of those, cut to the 20 bytes RFC 5280 allows, kept positive.
fn serial(spki: &[u8], not_before: UnixTime, fields: &[(Field, Vec<u8>)]) -> SerialNumber {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(spki);
    ctx.update(&not_before.as_secs().to_be_bytes());
    for (field, content) in fields {
        for c in field.oid() {
            ctx.update(&c.to_be_bytes());
        }
        ctx.update(&(content.len() as u64).to_be_bytes());
        ctx.update(content);
    }
    let digest = ctx.finish();
    let mut bytes = digest.as_ref()[..20].to_vec();
    // Positive, and never starting with a zero byte (which DER would strip).
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn signing(e: rcgen::Error) -> Error {
    Error::Signing {
        reason: e.to_string(),
    }
}

pub(crate) fn secs(t: UnixTime) -> i64 {
    i64::try_from(t.as_secs()).unwrap_or(i64::MAX)
}

pub(crate) fn from_secs(secs: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

fn backdate(now: UnixTime) -> UnixTime {
    from_secs(secs(now).saturating_sub(NOT_BEFORE_BACKDATE.as_secs() as i64))
}

fn add(now: UnixTime, ttl: Duration) -> Result<UnixTime, Error> {
    now.as_secs()
        .checked_add(ttl.as_secs())
        .map(|s| UnixTime::since_unix_epoch(Duration::from_secs(s)))
        .ok_or(Error::InvalidRequest {
            field: "ttl",
            reason: "overflows the clock".into(),
        })
}

fn to_offset(t: UnixTime) -> Result<time::OffsetDateTime, Error> {
    time::OffsetDateTime::from_unix_timestamp(secs(t)).map_err(|e| Error::InvalidRequest {
        field: "time",
        reason: e.to_string(),
    })
}

pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    // Base64 output is ASCII, so every 64-byte chunk is valid UTF-8.
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

//! The validator: from certificate bytes and an injected `now` to a verified identity.
//!
//! Checks, in order (the first failure is reported):
//!
//! 1. size limit, DER framing (garbage vs. truncated), X.509 parse;
//! 2. no critical extension we do not understand;
//! 3. not self-signed;
//! 4. accepted signature algorithm;
//! 5. issued by a trusted CA (matched by authority key id) whose signature verifies;
//!    else signed by a rotated-out CA; else names a trusted CA but does not verify
//!    (tampered); else unknown issuer;
//! 6. `notBefore <= now <= notAfter`, for the certificate and for its CA;
//! 7. cert role: the family (user vs host), the exact role, and that the CA kind that
//!    signed it is the one that signs that role, in the same cluster;
//! 8. basic constraints (not a CA) and extended key usage for the role;
//! 9. identity fields decode exactly (unknown, duplicated, missing, invalid: refused);
//! 10. a database route, where the purpose needs one.
//!
//! Success returns [`VerifiedIdentity`] or [`VerifiedHost`], which have private fields:
//! code that holds one knows these checks ran.

use rustls_pki_types::UnixTime;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use crate::ca::{from_secs, secs};
use crate::der::{self, DerError, Reader};
use crate::error::Error;
use crate::identity::{CaKind, CertRole, HostIdentity, HostRole, Identity, RawFields, Usage};
use crate::trust::TrustedCa;

/// Largest certificate the validator will parse.
pub const CERT_LEN_MAX: usize = 16 * 1024;

/// What a user identity certificate is being presented for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// A user's certificate for the cluster in general (web API, `db ls`); the route
    /// is optional.
    UserLogin,
    /// A user's certificate presented to the proxy's database listener: must name a
    /// database.
    UserDatabase,
    /// A proxy→agent certificate (usage `db`) presented to an agent: must name a
    /// database.
    ProxyToAgent,
}

impl Purpose {
    fn usage(self) -> Usage {
        match self {
            Self::UserLogin | Self::UserDatabase => Usage::User,
            Self::ProxyToAgent => Usage::Db,
        }
    }

    fn needs_route(self) -> bool {
        matches!(self, Self::UserDatabase | Self::ProxyToAgent)
    }
}

/// A user identity that passed every check of [`Validator::verify_identity`]. Only the
/// validator can make one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedIdentity {
    identity: Identity,
    purpose: Purpose,
    cert_der: Vec<u8>,
}

impl VerifiedIdentity {
    /// The verified identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// What it was verified for.
    pub fn purpose(&self) -> Purpose {
        self.purpose
    }

    /// The certificate (DER) it was verified from: a proxy forwards it to the auth
    /// service, which verifies it again before signing on the user's behalf.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }
}

/// A host identity that passed every check of [`Validator::verify_host`]. Only the
/// validator can make one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedHost {
    host: HostIdentity,
}

impl VerifiedHost {
    /// The verified host identity.
    pub fn host(&self) -> &HostIdentity {
        &self.host
    }
}

/// Validates certificates against a set of trusted CAs.
///
/// Give it the cluster's user and host CAs (and the database CA if useful): what a
/// certificate may be used for is decided by its role and by which kind of CA signed it,
/// not by the trust set, and a host certificate presented as a user's then gets the
/// precise [`Error::HostCertUsedAsUser`] instead of [`Error::UnknownIssuer`].
///
/// During a CA rotation, several CAs of one kind are active at once: pass them all to
/// [`Validator::new`]. CAs removed by a completed rotation can be given to
/// [`Validator::with_retired`] so their certificates get a "rotated out, log in again"
/// error instead of "unknown issuer"; they are never trusted.
#[derive(Clone, Debug)]
pub struct Validator {
    active: Vec<TrustedCa>,
    retired: Vec<TrustedCa>,
}

/// A parsed certificate that chains to a trusted CA and is within its validity period.
struct Chained<'a> {
    cert: X509Certificate<'a>,
    fields: RawFields<'a>,
    ca: &'a TrustedCa,
}

impl Validator {
    /// Trusts `active` (any mix of user, host and database CAs).
    pub fn new(active: impl IntoIterator<Item = TrustedCa>) -> Self {
        Self {
            active: active.into_iter().collect(),
            retired: Vec::new(),
        }
    }

    /// Remembers CAs that were rotated out, for a clearer error; they stay untrusted.
    pub fn with_retired(mut self, retired: impl IntoIterator<Item = TrustedCa>) -> Self {
        self.retired.extend(retired);
        self
    }

    /// The trusted CAs.
    pub fn active(&self) -> &[TrustedCa] {
        &self.active
    }

    /// Verifies a user certificate (or a proxy→agent certificate) for `purpose` at `now`.
    pub fn verify_identity(
        &self,
        cert_der: &[u8],
        purpose: Purpose,
        now: UnixTime,
    ) -> Result<VerifiedIdentity, Error> {
        let chained = self.chain(cert_der, now)?;
        let label = chained.fields.label().to_string();
        let role = chained.fields.role()?;
        let expected = purpose.usage().cert_role();
        if role.is_host() {
            return Err(Error::HostCertUsedAsUser {
                cert: label,
                actual: role,
            });
        }
        if role != expected {
            return Err(Error::WrongRole {
                cert: label,
                expected,
                actual: role,
            });
        }
        check_issuer(&chained, role)?;
        check_leaf_usage(&chained.cert, role, &label)?;
        let identity = chained.fields.identity(purpose.usage())?;
        if purpose.needs_route() && identity.route.is_none() {
            return Err(Error::RouteMissing {
                cert: label,
                user: identity.user,
            });
        }
        Ok(VerifiedIdentity {
            identity,
            purpose,
            cert_der: cert_der.to_vec(),
        })
    }

    /// Verifies a host certificate of role `expected` at `now`.
    pub fn verify_host(
        &self,
        cert_der: &[u8],
        expected: HostRole,
        now: UnixTime,
    ) -> Result<VerifiedHost, Error> {
        let chained = self.chain(cert_der, now)?;
        let label = chained.fields.label().to_string();
        let role = chained.fields.role()?;
        if !role.is_host() {
            return Err(Error::UserCertUsedAsHost {
                cert: label,
                actual: role,
            });
        }
        if role != expected.cert_role() {
            return Err(Error::WrongRole {
                cert: label,
                expected: expected.cert_role(),
                actual: role,
            });
        }
        check_issuer(&chained, role)?;
        check_leaf_usage(&chained.cert, role, &label)?;
        let names = subject_alt_names(&chained.cert, &label)?;
        let host = chained.fields.host(expected, names)?;
        Ok(VerifiedHost { host })
    }

    /// Steps 1–6: parse, critical extensions, trust, time.
    fn chain<'a>(&'a self, cert_der: &'a [u8], now: UnixTime) -> Result<Chained<'a>, Error> {
        let cert = parse(cert_der)?;
        let label = crate::identity::describe(&cert);

        if let Some(ext) = cert
            .extensions()
            .iter()
            .find(|ext| ext.critical && !crate::oid::is_understood(&ext.oid))
        {
            return Err(Error::UnknownCriticalExtension {
                cert: label,
                oid: ext.oid.to_id_string(),
            });
        }

        if cert.subject().as_raw() == cert.issuer().as_raw() && cert.verify_signature(None).is_ok()
        {
            return Err(Error::SelfSigned { cert: label });
        }

        let algorithm = &cert.signature_algorithm.algorithm;
        let accepted = [
            x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256,
            x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA384,
            x509_parser::oid_registry::OID_SIG_ED25519,
        ];
        if !accepted.contains(algorithm) {
            return Err(Error::UnsupportedSignatureAlgorithm {
                cert: label,
                algorithm: algorithm.to_id_string(),
            });
        }

        let ca = self.find_issuer(&cert, &label)?;

        let now_secs = secs(now);
        let not_before = cert.validity().not_before.timestamp();
        let not_after = cert.validity().not_after.timestamp();
        if now_secs < not_before {
            return Err(Error::NotYetValid {
                cert: label,
                now,
                not_before: from_secs(not_before),
            });
        }
        if now_secs > not_after + planted_expiry_grace() {
            return Err(Error::Expired {
                cert: label,
                now,
                not_after: from_secs(not_after),
            });
        }
        // Issuing never outlives the CA, but a CA loaded from elsewhere might be stale.
        if now_secs > ca.not_after_secs() || now_secs < ca.not_before_secs() {
            let (not_before, not_after) = (ca.not_before_secs(), ca.not_after_secs());
            return Err(if now_secs > not_after {
                Error::Expired {
                    cert: format!("{:?} (the issuing CA)", ca.subject()),
                    now,
                    not_after: from_secs(not_after),
                }
            } else {
                Error::NotYetValid {
                    cert: format!("{:?} (the issuing CA)", ca.subject()),
                    now,
                    not_before: from_secs(not_before),
                }
            });
        }

        let fields = RawFields::collect(&cert)?;
        Ok(Chained { cert, fields, ca })
    }

    fn find_issuer<'a>(
        &'a self,
        cert: &X509Certificate<'_>,
        label: &str,
    ) -> Result<&'a TrustedCa, Error> {
        let key_id = authority_key_id(cert, label)?;
        let names_ca = |ca: &TrustedCa| match key_id {
            Some(id) => ca.key_id() == id,
            None => ca.subject() == cert.issuer().to_string(),
        };
        let signed_by = |ca: &TrustedCa| {
            X509Certificate::from_der(ca.der())
                .is_ok_and(|(_, ca_cert)| cert.verify_signature(Some(ca_cert.public_key())).is_ok())
        };
        if let Some(ca) = self.active.iter().find(|ca| names_ca(ca) && signed_by(ca)) {
            return Ok(ca);
        }
        let issuer = cert.issuer().to_string();
        if self.retired.iter().any(|ca| names_ca(ca) && signed_by(ca)) {
            return Err(Error::CaRotatedOut {
                cert: label.to_string(),
                issuer,
            });
        }
        if self.active.iter().chain(&self.retired).any(names_ca) {
            return Err(Error::BadSignature {
                cert: label.to_string(),
                issuer,
            });
        }
        Err(Error::UnknownIssuer {
            cert: label.to_string(),
            issuer,
        })
    }
}

/// Parses one certificate, telling garbage, truncation and other malformation apart.
/// Seconds past `notAfter` still accepted: none, unless the simulator planted the bug.
fn planted_expiry_grace() -> i64 {
    #[cfg(feature = "planted-bugs")]
    if postern_rt::planted::active(postern_rt::planted::Bug::PkiExpiryGrace) {
        return 300;
    }
    0
}

fn parse(cert_der: &[u8]) -> Result<X509Certificate<'_>, Error> {
    let unparsed = || format!("({} bytes)", cert_der.len());
    if cert_der.len() > CERT_LEN_MAX {
        return Err(Error::TooLarge {
            cert: unparsed(),
            len: cert_der.len(),
            len_max: CERT_LEN_MAX,
        });
    }
    let mut framing = Reader::new(cert_der);
    match framing.read(der::TAG_SEQUENCE) {
        Ok(_) => {}
        Err(DerError::Truncated { have, need }) => {
            return Err(Error::Truncated {
                cert: unparsed(),
                have,
                need,
            });
        }
        Err(_) => {
            return Err(Error::NotACertificate {
                cert: unparsed(),
                len: cert_der.len(),
            });
        }
    }
    if !framing.is_empty() {
        return Err(Error::Malformed {
            cert: unparsed(),
            reason: "bytes after the certificate".into(),
        });
    }
    check_outer_structure(cert_der).map_err(|reason| Error::Malformed {
        cert: unparsed(),
        reason,
    })?;
    match X509Certificate::from_der(cert_der) {
        Ok((_, cert)) => Ok(cert),
        Err(e) => Err(Error::Malformed {
            cert: unparsed(),
            reason: e.to_string(),
        }),
    }
}

/// The parts of a certificate outside the signed bytes, read strictly: x509-parser is
/// lenient about them (it accepts a wrong tag on the outer signature algorithm), and
/// an unsigned part that can vary lets one certificate have many encodings.
fn check_outer_structure(cert_der: &[u8]) -> Result<(), String> {
    let der_err = |e: DerError| e.to_string();
    let mut outer = Reader::new(cert_der);
    let mut cert = Reader::new(outer.read(der::TAG_SEQUENCE).map_err(der_err)?);
    outer.finish().map_err(der_err)?;
    let tbs = cert.read(der::TAG_SEQUENCE).map_err(der_err)?;
    let outer_algorithm = cert.read(der::TAG_SEQUENCE).map_err(der_err)?;
    let signature = cert.read(der::TAG_BIT_STRING).map_err(der_err)?;
    cert.finish().map_err(der_err)?;
    if signature.first() != Some(&0) {
        return Err("the signature BIT STRING has unused bits".into());
    }
    let mut tbs = Reader::new(tbs);
    if tbs.peek_tag() == Some(der::TAG_CONTEXT_0) {
        tbs.read(der::TAG_CONTEXT_0).map_err(der_err)?;
    }
    tbs.read(der::TAG_INTEGER).map_err(der_err)?;
    let signed_algorithm = tbs.read(der::TAG_SEQUENCE).map_err(der_err)?;
    if signed_algorithm != outer_algorithm {
        return Err("the outer signature algorithm differs from the signed one".into());
    }
    Ok(())
}

fn authority_key_id<'a>(
    cert: &'a X509Certificate<'_>,
    label: &str,
) -> Result<Option<&'a [u8]>, Error> {
    let mut found = None;
    for ext in cert.extensions() {
        if let ParsedExtension::AuthorityKeyIdentifier(aki) = ext.parsed_extension() {
            if found.is_some() {
                return Err(Error::Malformed {
                    cert: label.to_string(),
                    reason: "two authority key identifiers".into(),
                });
            }
            found = Some(aki.key_identifier.as_ref().map(|id| id.0));
        }
    }
    Ok(found.flatten())
}

/// The CA that signed the certificate must be the kind that signs its role, and of the
/// same cluster.
fn check_issuer(chained: &Chained<'_>, role: CertRole) -> Result<(), Error> {
    let label = chained.fields.label();
    if CaKind::signer_of(role) != Some(chained.ca.kind()) {
        return Err(Error::WrongIssuer {
            cert: label.to_string(),
            role,
            issuer_kind: chained.ca.kind(),
        });
    }
    let cluster = chained.fields.cluster()?;
    if cluster != chained.ca.cluster() {
        return Err(Error::ClusterMismatch {
            cert: label.to_string(),
            cert_cluster: cluster.to_string(),
            ca_cluster: chained.ca.cluster().to_string(),
        });
    }
    Ok(())
}

/// Basic constraints and extended key usage match the role (what rustls will also check
/// in the handshake).
fn check_leaf_usage(cert: &X509Certificate<'_>, role: CertRole, label: &str) -> Result<(), Error> {
    let bad = |reason: String| Error::KeyUsage {
        cert: label.to_string(),
        reason,
    };
    let bc = cert.basic_constraints().map_err(|e| bad(e.to_string()))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(bad("it is a CA certificate, not a leaf".into()));
    }
    let eku = cert
        .extended_key_usage()
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("it has no extended key usage".into()))?;
    let needs_server = role.is_host();
    if !eku.value.client_auth {
        return Err(bad("its extended key usage lacks TLS client auth".into()));
    }
    if needs_server && !eku.value.server_auth {
        return Err(bad("its extended key usage lacks TLS server auth".into()));
    }
    Ok(())
}

fn subject_alt_names(cert: &X509Certificate<'_>, label: &str) -> Result<Vec<String>, Error> {
    use x509_parser::extensions::GeneralName;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::Malformed {
            cert: label.to_string(),
            reason: e.to_string(),
        })?;
    let Some(san) = san else {
        return Ok(Vec::new());
    };
    san.value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(dns) => Ok((*dns).to_string()),
            GeneralName::IPAddress(bytes) => {
                if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                    Ok(std::net::IpAddr::from(v4).to_string())
                } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                    Ok(std::net::IpAddr::from(v6).to_string())
                } else {
                    Err(Error::Malformed {
                        cert: label.to_string(),
                        reason: format!("IP address SAN of {} bytes", bytes.len()),
                    })
                }
            }
            other => Err(Error::Malformed {
                cert: label.to_string(),
                reason: format!("unexpected subject alternative name {other}"),
            }),
        })
        .collect()
}

/// Decodes the identity in a certificate **without verifying anything** (no signature,
/// no time, no trust): for displaying a local certificate (`postern status`) and for
/// fuzzing. Never use the result for an access decision; use [`Validator`].
pub fn decode_identity_unverified(cert_der: &[u8]) -> Result<Identity, Error> {
    let cert = parse(cert_der)?;
    let fields = RawFields::collect(&cert)?;
    let label = fields.label().to_string();
    match fields.role()? {
        CertRole::User => fields.identity(Usage::User),
        CertRole::Db => fields.identity(Usage::Db),
        role if role.is_host() => Err(Error::HostCertUsedAsUser {
            cert: label,
            actual: role,
        }),
        role => Err(Error::WrongRole {
            cert: label,
            expected: CertRole::User,
            actual: role,
        }),
    }
}

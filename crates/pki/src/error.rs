//! The one error type of this crate.

use rustls_pki_types::UnixTime;

use crate::identity::{CaKind, CertRole};
use crate::oid::Field;

/// What kind of problem an [`Error`] is, for callers that map errors to protocol codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCategory {
    /// The bytes are not a well-formed certificate.
    Malformed,
    /// The certificate is well-formed but its identity fields are not.
    Identity,
    /// The certificate does not chain to a trusted CA, or was altered.
    Untrusted,
    /// The certificate is outside its validity period at the injected `now`.
    Time,
    /// The certificate is valid but not for this use (role, key usage, route).
    Usage,
    /// Issuing or loading certificates and keys failed (local configuration problem).
    Issuing,
    /// Building a TLS configuration or reading a TLS peer failed.
    Tls,
    /// An SSH certificate for the reverse tunnel was refused.
    Ssh,
}

/// Everything that can go wrong in this crate. Each variant carries the facts a person
/// needs, and its message says what to do next.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- Malformed ---
    /// The bytes do not start a DER SEQUENCE (garbage, or PEM text passed as DER).
    #[error(
        "the {len} bytes given are not a DER X.509 certificate; pass the certificate file \
         itself (PEM or DER)"
    )]
    NotACertificate { cert: String, len: usize },
    /// The DER ends before the certificate does.
    #[error(
        "certificate {cert} is truncated: {have} of {need} bytes present; copy the whole \
         certificate again"
    )]
    Truncated {
        cert: String,
        have: usize,
        need: usize,
    },
    /// The DER is complete but is not a valid X.509 certificate.
    #[error("certificate {cert} is malformed ({reason}); it was not issued by Postern")]
    Malformed { cert: String, reason: String },
    /// Larger than any certificate we issue; refused before parsing.
    #[error("certificate {cert} is {len} bytes, more than the limit of {len_max}; refused")]
    TooLarge {
        cert: String,
        len: usize,
        len_max: usize,
    },

    // --- Identity ---
    /// An extension under Postern's arc that this version does not know.
    #[error(
        "certificate {cert} carries unknown identity field {oid}; it comes from a newer or \
         foreign issuer: upgrade Postern, or log in again with `postern login`"
    )]
    UnknownIdentityField { cert: String, oid: String },
    /// An identity field present twice.
    #[error(
        "certificate {cert} carries the identity field \"{field}\" more than once; it was not \
         issued by Postern and is refused"
    )]
    DuplicateIdentityField { cert: String, field: Field },
    /// A required identity field is absent.
    #[error(
        "certificate {cert} lacks the identity field \"{field}\"; it was not issued by Postern \
         for this use: get one with `postern login`"
    )]
    MissingIdentityField { cert: String, field: Field },
    /// An identity field is present but its content is invalid.
    #[error("certificate {cert} has an invalid \"{field}\" identity field: {reason}")]
    InvalidIdentityField {
        cert: String,
        field: Field,
        reason: String,
    },

    // --- Untrusted ---
    /// Issued by itself rather than by a cluster CA.
    #[error(
        "certificate {cert} is self-signed; only certificates issued by the cluster's CA are \
         accepted: get one with `postern login`"
    )]
    SelfSigned { cert: String },
    /// The issuer is none of the trusted CAs (another cluster, or a foreign CA).
    #[error(
        "certificate {cert} was issued by \"{issuer}\", which is not a trusted CA of this \
         cluster; log in to this cluster with `postern login`"
    )]
    UnknownIssuer { cert: String, issuer: String },
    /// Signed by a CA that a completed rotation removed from the trusted set.
    #[error(
        "certificate {cert} was signed by \"{issuer}\" with a key that has since been rotated \
         out; run `postern login` to get a certificate from the current CA"
    )]
    CaRotatedOut { cert: String, issuer: String },
    /// Names a trusted CA, but the signature does not verify: altered or forged.
    #[error(
        "certificate {cert} names the trusted CA \"{issuer}\" but its signature does not \
         verify: it was altered after issuing; discard it and run `postern login`"
    )]
    BadSignature { cert: String, issuer: String },
    /// Signed with an algorithm we do not accept.
    #[error(
        "certificate {cert} is signed with algorithm {algorithm}, which Postern does not \
         accept (ECDSA P-256/P-384 or Ed25519 only)"
    )]
    UnsupportedSignatureAlgorithm { cert: String, algorithm: String },
    /// A critical extension this validator does not understand (RFC 5280 says: reject).
    #[error(
        "certificate {cert} has a critical extension {oid} that Postern does not understand; \
         it was not issued by Postern and is refused"
    )]
    UnknownCriticalExtension { cert: String, oid: String },
    /// A trusted CA signed a role it never signs (e.g. the host CA signed a user role).
    #[error(
        "certificate {cert} has role {role} but was signed by the {issuer_kind} CA, which \
         never issues that role; refused"
    )]
    WrongIssuer {
        cert: String,
        role: CertRole,
        issuer_kind: CaKind,
    },
    /// The certificate's cluster differs from its CA's.
    #[error(
        "certificate {cert} is for cluster \"{cert_cluster}\" but its CA belongs to \
         \"{ca_cluster}\"; refused"
    )]
    ClusterMismatch {
        cert: String,
        cert_cluster: String,
        ca_cluster: String,
    },

    // --- Time ---
    /// `now` is past `not_after`.
    #[error(
        "certificate {cert} expired at {} (now {}); run `postern login` (and `postern db login \
         <database>`) to get a fresh one",
        fmt_time(*not_after),
        fmt_time(*now)
    )]
    Expired {
        cert: String,
        now: UnixTime,
        not_after: UnixTime,
    },
    /// `now` is before `not_before`.
    #[error(
        "certificate {cert} is not valid before {} (now {}); check this machine's clock",
        fmt_time(*not_before),
        fmt_time(*now)
    )]
    NotYetValid {
        cert: String,
        now: UnixTime,
        not_before: UnixTime,
    },

    // --- Usage ---
    /// A host certificate presented where a user identity is required.
    #[error(
        "certificate {cert} is a host certificate (role {actual}), but a user certificate is \
         required here; use the certificate from `postern login`"
    )]
    HostCertUsedAsUser { cert: String, actual: CertRole },
    /// A user (or other non-host) certificate presented where a host is required.
    #[error(
        "certificate {cert} has role {actual}, but a host certificate is required here; check \
         the service's configured certificate paths"
    )]
    UserCertUsedAsHost { cert: String, actual: CertRole },
    /// Right family, wrong role (e.g. a proxy cert where an agent cert is required).
    #[error("certificate {cert} has role {actual}, but role {expected} is required here")]
    WrongRole {
        cert: String,
        expected: CertRole,
        actual: CertRole,
    },
    /// Basic constraints or extended key usage do not allow this use.
    #[error("certificate {cert} may not be used here: {reason}")]
    KeyUsage { cert: String, reason: String },
    /// A database connection needs a certificate that names a database.
    #[error(
        "the certificate of user \"{user}\" names no database; run `postern db login \
         <database>` first"
    )]
    RouteMissing { cert: String, user: String },

    // --- Issuing ---
    /// A request to issue a certificate is invalid.
    #[error("cannot issue a certificate: {field} {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    /// The operation needs a different CA.
    #[error("this needs the {expected} CA, but the {actual} CA was given")]
    WrongCaKind { expected: CaKind, actual: CaKind },
    /// rcgen or ssh-key failed to build or sign.
    #[error("signing failed: {reason}")]
    Signing { reason: String },
    /// Generating a key failed.
    #[error("key generation failed: {reason}")]
    KeyGeneration { reason: String },
    /// PEM or key material could not be loaded.
    #[error("cannot load {what}: {reason}")]
    Load { what: &'static str, reason: String },

    // --- Tls ---
    /// rustls refused the configuration.
    #[error("TLS configuration failed: {reason}")]
    TlsConfig { reason: String },
    /// The TLS peer sent no certificate.
    #[error("the TLS peer presented no certificate; connect with `postern db login` material")]
    NoPeerCertificate,

    // --- Ssh ---
    /// An SSH certificate could not be decoded or encoded.
    #[error("SSH certificate is malformed: {reason}")]
    SshMalformed { reason: String },
    /// Signed by a key that is not a trusted host CA key.
    #[error(
        "SSH certificate \"{key_id}\" is signed by {ca_fingerprint}, which is not a trusted host \
         CA; re-register the host with a fresh join token"
    )]
    SshUntrusted {
        key_id: String,
        ca_fingerprint: String,
    },
    /// The signature does not verify.
    #[error("SSH certificate \"{key_id}\" has a bad signature: it was altered; refused")]
    SshBadSignature { key_id: String },
    /// `now` is at or past `valid_before`.
    #[error(
        "SSH certificate \"{key_id}\" expired at {} (now {}); the host must renew its tunnel \
         certificate (restart it or check its auth connection)",
        fmt_time(*valid_before),
        fmt_time(*now)
    )]
    SshExpired {
        key_id: String,
        now: UnixTime,
        valid_before: UnixTime,
    },
    /// `now` is before `valid_after`.
    #[error(
        "SSH certificate \"{key_id}\" is not valid before {} (now {}); check the host's clock",
        fmt_time(*valid_after),
        fmt_time(*now)
    )]
    SshNotYetValid {
        key_id: String,
        now: UnixTime,
        valid_after: UnixTime,
    },
    /// A user certificate where a host certificate is required, or the reverse, or the
    /// wrong host role.
    #[error("SSH certificate \"{key_id}\" is for {actual}, but {expected} is required here")]
    SshWrongUse {
        key_id: String,
        expected: String,
        actual: String,
    },
    /// The expected principal is not listed.
    #[error(
        "SSH certificate \"{key_id}\" is not valid for \"{expected}\" (valid for {principals:?})"
    )]
    SshPrincipal {
        key_id: String,
        expected: String,
        principals: Vec<String>,
    },
    /// A critical option we do not understand (OpenSSH says: reject).
    #[error("SSH certificate \"{key_id}\" has unknown critical option \"{option}\"; refused")]
    SshCriticalOption { key_id: String, option: String },
}

impl Error {
    /// The category, for mapping to protocol error codes.
    pub fn category(&self) -> ErrorCategory {
        use ErrorCategory as C;
        match self {
            Self::NotACertificate { .. }
            | Self::Truncated { .. }
            | Self::Malformed { .. }
            | Self::TooLarge { .. } => C::Malformed,
            Self::UnknownIdentityField { .. }
            | Self::DuplicateIdentityField { .. }
            | Self::MissingIdentityField { .. }
            | Self::InvalidIdentityField { .. } => C::Identity,
            Self::SelfSigned { .. }
            | Self::UnknownIssuer { .. }
            | Self::CaRotatedOut { .. }
            | Self::BadSignature { .. }
            | Self::UnsupportedSignatureAlgorithm { .. }
            | Self::UnknownCriticalExtension { .. }
            | Self::WrongIssuer { .. }
            | Self::ClusterMismatch { .. } => C::Untrusted,
            Self::Expired { .. } | Self::NotYetValid { .. } => C::Time,
            Self::HostCertUsedAsUser { .. }
            | Self::UserCertUsedAsHost { .. }
            | Self::WrongRole { .. }
            | Self::KeyUsage { .. }
            | Self::RouteMissing { .. } => C::Usage,
            Self::InvalidRequest { .. }
            | Self::WrongCaKind { .. }
            | Self::Signing { .. }
            | Self::KeyGeneration { .. }
            | Self::Load { .. } => C::Issuing,
            Self::TlsConfig { .. } | Self::NoPeerCertificate => C::Tls,
            Self::SshMalformed { .. }
            | Self::SshUntrusted { .. }
            | Self::SshBadSignature { .. }
            | Self::SshExpired { .. }
            | Self::SshNotYetValid { .. }
            | Self::SshWrongUse { .. }
            | Self::SshPrincipal { .. }
            | Self::SshCriticalOption { .. } => C::Ssh,
        }
    }
}

/// Formats a time as RFC 3339 UTC (`2026-11-24T01:02:03Z`) for messages.
pub(crate) fn fmt_time(t: UnixTime) -> String {
    let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(dt) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        ),
        Err(_) => format!("{secs} s after the Unix epoch"),
    }
}

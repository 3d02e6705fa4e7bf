//! Object identifiers: the private arc that carries Postern identities in X.509, and the
//! standard extensions the validator understands.
//!
//! # The arc
//!
//! `1.3.6.1.4.1.64773` is the arc this crate uses (shape of an IANA Private Enterprise
//! Number). It is **not registered yet**: register a PEN before certificates leave a
//! closed deployment, then change [`POSTERN_ARC`] (one constant). Layout:
//!
//! | OID | field | DER content of the (non-critical) extension |
//! |---|---|---|
//! | `ARC.1.1` | cert role | UTF8String (`user`, `db`, `proxy`, `agent`, `auth`, `db-client`, `db-server`, `user-ca`, `host-ca`, `db-ca`) |
//! | `ARC.1.2` | cluster | UTF8String |
//! | `ARC.1.3` | roles | SEQUENCE OF UTF8String |
//! | `ARC.1.4` | traits | SEQUENCE OF SEQUENCE { name UTF8String, values SEQUENCE OF UTF8String } (names ascending) |
//! | `ARC.1.5` | route | SEQUENCE { service, protocol, db user, db name } (all UTF8String) |
//! | `ARC.1.6` | allowed db names | SEQUENCE OF UTF8String |
//! | `ARC.1.7` | allowed db users | SEQUENCE OF UTF8String |
//! | `ARC.1.8` | client IP | OCTET STRING of 4 or 16 bytes |
//!
//! Any other OID under `ARC` is an unknown identity field and is rejected.

use x509_parser::der_parser::oid::Oid;

/// Postern's private arc (see the module docs: not yet registered).
pub const POSTERN_ARC: &[u64] = &[1, 3, 6, 1, 4, 1, 64773];

/// The sub-arc of [`POSTERN_ARC`] holding X.509 identity fields.
const X509_FIELDS: u64 = 1;

/// One identity field carried in its own X.509 extension under [`POSTERN_ARC`]`.1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Field {
    /// The certificate's role (what it may be used for).
    CertRole,
    /// The cluster name.
    Cluster,
    /// The user's roles.
    Roles,
    /// The user's traits.
    Traits,
    /// The database the certificate is routed to.
    Route,
    /// Database names the user may use.
    AllowedDbNames,
    /// Database users the user may use.
    AllowedDbUsers,
    /// The client IP the certificate was issued to.
    ClientIp,
    /// The user name (the subject common name, not an extension).
    User,
}

impl Field {
    /// Every field carried as an extension, in the order they are written.
    pub(crate) const EXTENSIONS: [Self; 8] = [
        Self::CertRole,
        Self::Cluster,
        Self::Roles,
        Self::Traits,
        Self::Route,
        Self::AllowedDbNames,
        Self::AllowedDbUsers,
        Self::ClientIp,
    ];

    /// The last OID component under `ARC.1`; `None` for fields not carried in extensions.
    fn number(self) -> Option<u64> {
        Some(match self {
            Self::CertRole => 1,
            Self::Cluster => 2,
            Self::Roles => 3,
            Self::Traits => 4,
            Self::Route => 5,
            Self::AllowedDbNames => 6,
            Self::AllowedDbUsers => 7,
            Self::ClientIp => 8,
            Self::User => return None,
        })
    }

    /// The extension OID as rcgen wants it.
    pub(crate) fn oid(self) -> Vec<u64> {
        let mut oid = POSTERN_ARC.to_vec();
        oid.push(X509_FIELDS);
        oid.extend(self.number());
        oid
    }

    /// Human name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::CertRole => "cert role",
            Self::Cluster => "cluster",
            Self::Roles => "roles",
            Self::Traits => "traits",
            Self::Route => "database route",
            Self::AllowedDbNames => "allowed database names",
            Self::AllowedDbUsers => "allowed database users",
            Self::ClientIp => "client IP",
            Self::User => "user",
        }
    }
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an OID falls relative to our arc.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ArcMember {
    /// Not under [`POSTERN_ARC`].
    Foreign,
    /// A known identity field.
    Known(Field),
    /// Under our arc, but not a field this version knows.
    Unknown,
}

pub(crate) fn classify(oid: &Oid<'_>) -> ArcMember {
    // Components too large for u64 cannot be ours; `iter` returns None for those.
    let Some(components) = oid.iter() else {
        return ArcMember::Foreign;
    };
    let components: Vec<u64> = components.collect();
    if !components.starts_with(POSTERN_ARC) {
        return ArcMember::Foreign;
    }
    let tail = &components[POSTERN_ARC.len()..];
    match tail {
        [X509_FIELDS, n] => Field::EXTENSIONS
            .into_iter()
            .find(|f| f.number() == Some(*n))
            .map_or(ArcMember::Unknown, ArcMember::Known),
        _ => ArcMember::Unknown,
    }
}

/// Standard extensions the validator understands, so they may be marked critical.
/// (nameConstraints is absent on purpose: we do not enforce it, so a critical one must fail.)
const UNDERSTOOD_EXTENSIONS: [&[u64]; 6] = [
    &[2, 5, 29, 14], // subjectKeyIdentifier
    &[2, 5, 29, 15], // keyUsage
    &[2, 5, 29, 17], // subjectAltName
    &[2, 5, 29, 19], // basicConstraints
    &[2, 5, 29, 35], // authorityKeyIdentifier
    &[2, 5, 29, 37], // extKeyUsage
];

/// True if the validator knows what an extension with this OID means.
pub(crate) fn is_understood(oid: &Oid<'_>) -> bool {
    if classify(oid) != ArcMember::Foreign {
        return true;
    }
    let Some(components) = oid.iter() else {
        return false;
    };
    let components: Vec<u64> = components.collect();
    UNDERSTOOD_EXTENSIONS.contains(&components.as_slice())
}

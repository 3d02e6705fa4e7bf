//! Postern's public key infrastructure, sans-IO.
//!
//! - Three certificate authorities per cluster ([`CaKind`]): **user** (user certificates
//!   and proxy→agent certificates), **host** (proxy, agent and auth certificates, and the
//!   SSH certificates of the reverse tunnel), **db** (certificates agents present to
//!   databases, and server certificates for self-hosted databases).
//! - [`Identity`]: who a user certificate speaks for, written into X.509 under a private
//!   OID arc ([`oid`]) and read back exactly.
//! - Issuing ([`CertAuthority`]) and validating ([`Validator`]), with a [`VerifiedIdentity`]
//!   that only the validator can construct.
//! - [`tls`]: rustls configurations for mutual TLS, with the crypto provider and the wall
//!   clock passed in.
//! - [`ssh`]: tunnel SSH certificates, validated against an injected `now`.
//!
//! No I/O, no clock reads: every function that needs the time takes `now: UnixTime`.
//! Key generation draws randomness from the OS through ring (rcgen does the same); it is
//! the only randomness, and it never decides anything.
//!
//! ```
//! use std::time::Duration;
//! use postern_pki::{CaKind, CertAuthority, Identity, PrivateKey, Purpose, UnixTime, Usage,
//!     Validator};
//!
//! let now = UnixTime::since_unix_epoch(Duration::from_secs(1_795_478_400));
//! let year = Duration::from_secs(365 * 24 * 3600);
//! let user_ca = CertAuthority::generate(CaKind::User, "prod", now, year)?;
//!
//! let alice = Identity {
//!     user: "alice".into(),
//!     roles: vec!["dev".into()],
//!     traits: Default::default(),
//!     route: None,
//!     allowed_db_names: vec!["*".into()],
//!     allowed_db_users: vec!["alice".into()],
//!     usage: Usage::User,
//!     cluster: "prod".into(),
//!     client_ip: None,
//!     expires: UnixTime::since_unix_epoch(Duration::from_secs(1_795_478_400 + 12 * 3600)),
//! };
//! let key = PrivateKey::generate()?;
//! let cert = user_ca.issue_identity(&alice, &key.public_key(), now)?;
//!
//! let validator = Validator::new([user_ca.trusted().clone()]);
//! let verified = validator.verify_identity(cert.der(), Purpose::UserLogin, now)?;
//! assert_eq!(verified.identity(), &alice);
//!
//! // `postern db login` is needed before connecting to a database:
//! let err = validator.verify_identity(cert.der(), Purpose::UserDatabase, now).unwrap_err();
//! assert!(err.to_string().contains("postern db login"));
//! # Ok::<(), postern_pki::Error>(())
//! ```

mod ca;
mod der;
mod error;
mod identity;
mod keys;
mod trust;
mod validate;

pub mod fuzzing;
pub mod oid;
pub mod reuse;
pub mod ssh;
pub mod tls;

pub use ca::{
    CaPem, CertAuthority, DbServerFiles, IssuedCert, LEAF_TTL_MAX, NOT_BEFORE_BACKDATE,
    USER_CERT_TTL_DEFAULT,
};
pub use error::{Error, ErrorCategory};
pub use identity::{
    CaKind, CertRole, DbProtocol, DbRoute, FIELD_LEN_MAX, HostIdentity, HostRole, Identity,
    LIST_LEN_MAX, Usage,
};
pub use keys::{PrivateKey, PublicKey};
pub use oid::Field;
pub use rustls_pki_types::UnixTime;
pub use trust::TrustedCa;
pub use validate::{
    CERT_LEN_MAX, Purpose, Validator, VerifiedHost, VerifiedIdentity, decode_identity_unverified,
};

//! Subject keys: the private key a certificate holder keeps, and the public key it sends
//! to be certified.
//!
//! Randomness: [`PrivateKey::generate`] draws from the operating system through ring, as
//! rcgen does. Nothing else in this crate generates keys except the CAs.

use std::fmt;

use rcgen::KeyPair;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::Error;

/// A private key (ECDSA P-256) for a certificate's subject.
pub struct PrivateKey {
    key: KeyPair,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl PrivateKey {
    /// Generates a new ECDSA P-256 key from the operating system's randomness (via ring).
    pub fn generate() -> Result<Self, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| {
            Error::KeyGeneration {
                reason: e.to_string(),
            }
        })?;
        Ok(Self { key })
    }

    /// Loads a PKCS#8 PEM private key.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(pem).map_err(|e| Error::Load {
            what: "private key",
            reason: e.to_string(),
        })?;
        Ok(Self { key })
    }

    /// The key as PKCS#8 PEM. Secret: write it with owner-only permissions.
    pub fn to_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The key as rustls wants it.
    pub fn to_rustls(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            spki_der: rcgen::PublicKeyData::subject_public_key_info(&self.key),
        }
    }
}

/// A subject's public key: DER SubjectPublicKeyInfo, as found in a CSR or sent by a client.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey {
    spki_der: Vec<u8>,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({} bytes of SPKI)", self.spki_der.len())
    }
}

impl PublicKey {
    /// Accepts a DER SubjectPublicKeyInfo of a key type rcgen can certify.
    pub fn from_der(spki_der: &[u8]) -> Result<Self, Error> {
        rcgen::SubjectPublicKeyInfo::from_der(spki_der).map_err(|e| Error::Load {
            what: "public key",
            reason: e.to_string(),
        })?;
        Ok(Self {
            spki_der: spki_der.to_vec(),
        })
    }

    /// Accepts a PEM `PUBLIC KEY` (SubjectPublicKeyInfo).
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        let der = rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| Error::Load {
                what: "public key",
                reason: e.to_string(),
            })?;
        Self::from_der(&der)
    }

    /// DER SubjectPublicKeyInfo.
    pub fn der(&self) -> &[u8] {
        &self.spki_der
    }

    pub(crate) fn to_rcgen(&self) -> Result<rcgen::SubjectPublicKeyInfo, Error> {
        rcgen::SubjectPublicKeyInfo::from_der(&self.spki_der).map_err(|e| Error::Load {
            what: "public key",
            reason: e.to_string(),
        })
    }
}

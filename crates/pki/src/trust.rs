//! Trusted CA certificates: the public half of a CA, as validators and TLS
//! configurations hold it.

use std::fmt;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use crate::ca::{hex, pem_encode};
use crate::error::Error;
use crate::identity::{CaKind, RawFields};

/// A CA certificate trusted by validators and TLS configurations.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustedCa {
    kind: CaKind,
    cluster: String,
    subject: String,
    key_id: Vec<u8>,
    not_before: i64,
    not_after: i64,
    der: CertificateDer<'static>,
}

impl fmt::Debug for TrustedCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedCa")
            .field("kind", &self.kind)
            .field("subject", &self.subject)
            .field("key_id", &hex(&self.key_id))
            .finish_non_exhaustive()
    }
}

impl TrustedCa {
    /// Reads a Postern CA certificate (DER).
    pub fn from_der(der: &[u8]) -> Result<Self, Error> {
        let load = |reason: String| Error::Load {
            what: "CA certificate",
            reason,
        };
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| load(e.to_string()))?;
        if !rest.is_empty() {
            return Err(load("trailing bytes after the certificate".into()));
        }
        let fields = RawFields::collect(&cert)?;
        let role = fields.role()?;
        let kind = [CaKind::User, CaKind::Host, CaKind::Db]
            .into_iter()
            .find(|k| k.cert_role() == role)
            .ok_or_else(|| load(format!("role is {role}, not a CA")))?;
        fields.only_common_fields(role)?;
        let is_ca = cert
            .basic_constraints()
            .map_err(|e| load(e.to_string()))?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(load("basicConstraints does not say CA".into()));
        }
        let key_id = cert
            .extensions()
            .iter()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
            .ok_or_else(|| load("no subject key identifier".into()))?;
        Ok(Self {
            kind,
            cluster: fields.cluster()?.to_string(),
            subject: cert.subject().to_string(),
            key_id,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            der: CertificateDer::from(der.to_vec()),
        })
    }

    /// Reads every certificate in a PEM bundle.
    pub fn from_pem_bundle(pem: &str) -> Result<Vec<Self>, Error> {
        let mut cas = Vec::new();
        for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let der = der.map_err(|e| Error::Load {
                what: "CA certificate PEM",
                reason: e.to_string(),
            })?;
            cas.push(Self::from_der(&der)?);
        }
        if cas.is_empty() {
            return Err(Error::Load {
                what: "CA certificate PEM",
                reason: "no CERTIFICATE block found".into(),
            });
        }
        Ok(cas)
    }

    /// Which CA this is.
    pub fn kind(&self) -> CaKind {
        self.kind
    }

    /// The cluster it belongs to.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Subject distinguished name, for messages.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Subject key identifier; leaf certificates name it as their authority key id.
    pub fn key_id(&self) -> &[u8] {
        &self.key_id
    }

    /// DER certificate.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// PEM certificate.
    pub fn to_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.der)
    }

    pub(crate) fn not_after_secs(&self) -> i64 {
        self.not_after
    }

    pub(crate) fn not_before_secs(&self) -> i64 {
        self.not_before
    }
}

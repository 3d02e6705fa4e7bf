//! TLS for database clients: a certificate is required, trust is decided after the
//! handshake.
//!
//! A client certificate that is expired, from another cluster, or lacks a database route
//! is the common case of a user who must log in again. Refusing it inside the TLS
//! handshake gives the user a bare alert ("sslv3 alert certificate expired") from their
//! client library. Instead, the handshake only demands a certificate and proof that the
//! client holds its key; the front door then runs `postern_pki::Validator` on it and
//! refuses in the database's own protocol, with a message that says what to do.
//!
//! That is safe because nothing reaches past the front door without a
//! `postern_pki::VerifiedIdentity`, which only the validator can build: skipping the
//! check is a type error, not a forgotten `if`.

use std::sync::Arc;

use postern_pki::{CERT_LEN_MAX, IssuedCert, PrivateKey, TrustedCa};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ServerConfig};
use rustls::time_provider::TimeProvider;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, UnixTime};

/// Requires a client certificate and a valid signature with its key; leaves chain,
/// time, role and route to the validator after the handshake.
#[derive(Debug)]
struct ValidateAfterHandshake {
    provider: Arc<CryptoProvider>,
    /// Subjects of the trusted user CAs, so clients holding several certs pick ours.
    root_hints: Vec<DistinguishedName>,
}

impl ClientCertVerifier for ValidateAfterHandshake {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Bound the work the validator will do later; everything else is its job.
        if end_entity.len() > CERT_LEN_MAX {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why a TLS server configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS for database clients: {0}")]
pub struct TlsSetupError(#[from] rustls::Error);

/// The TLS configuration of a database-client listener: presents the proxy's host
/// certificate, requires a client certificate (validated after the handshake), TLS 1.2
/// and 1.3 only, no session resumption (every connection shows its certificate), and the
/// given ALPN protocols.
pub fn server_config(
    cert: &IssuedCert,
    key: &PrivateKey,
    user_cas: &[TrustedCa],
    alpn_protocols: &[&[u8]],
    provider: Arc<CryptoProvider>,
    time: Arc<dyn TimeProvider>,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let verifier = ValidateAfterHandshake {
        provider: provider.clone(),
        root_hints: root_hints(user_cas),
    };
    let mut config = ServerConfig::builder_with_details(provider, time)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(vec![cert.der().clone()], key.to_rustls())?;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = alpn_protocols.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The subjects of the trusted user CAs, as a TLS CertificateRequest names them. A CA
/// that webpki cannot parse is left out of the hints (the validator refuses its certs).
fn root_hints(user_cas: &[TrustedCa]) -> Vec<DistinguishedName> {
    let mut store = RootCertStore::empty();
    for ca in user_cas {
        let _ = store.add(ca.der().clone());
    }
    store.subjects()
}

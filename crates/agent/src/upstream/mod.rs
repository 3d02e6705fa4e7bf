//! Connections from the agent to databases. TLS always: there is no plaintext fallback.

pub mod postgres;

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::time_provider::TimeProvider;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// How the agent checks a database's certificate (`tls.mode` in the database config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TlsMode {
    /// Chain to the configured CA and the name the agent connects to (or
    /// `tls.server_name`). The default.
    #[default]
    VerifyFull,
    /// Chain to the configured CA; any name. For databases reached by an address their
    /// certificate does not list.
    VerifyCa,
}

/// What the agent trusts and presents when it connects to one database.
#[derive(Clone)]
pub struct UpstreamTls {
    mode: TlsMode,
    roots: Arc<RootCertStore>,
    server_name: Option<String>,
    provider: Arc<CryptoProvider>,
    time: Arc<dyn TimeProvider>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("mode", &self.mode)
            .field("roots", &self.roots.len())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why the TLS settings of a database could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    #[error(
        "the CA bundle for the database holds no certificate (expected PEM `-----BEGIN CERTIFICATE-----` blocks)"
    )]
    NoCaCertificates,
    #[error("the CA bundle for the database has an unreadable certificate: {0}")]
    BadCaCertificate(String),
    #[error("tls.server_name {0:?} is not a valid DNS name or IP address")]
    BadServerName(String),
    #[error("cannot set up TLS to the database: {0}")]
    Rustls(#[from] rustls::Error),
}

impl UpstreamTls {
    /// Trusts the CA certificates in `ca_pem` (the database's `ca_cert_file`: Postern's
    /// database CA for self-hosted servers, the RDS CA bundle for RDS).
    pub fn new(
        mode: TlsMode,
        ca_pem: &[u8],
        server_name: Option<String>,
        provider: Arc<CryptoProvider>,
        time: Arc<dyn TimeProvider>,
    ) -> Result<Self, TlsConfigError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| TlsConfigError::BadCaCertificate(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| TlsConfigError::BadCaCertificate(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(TlsConfigError::NoCaCertificates);
        }
        if let Some(name) = &server_name {
            ServerName::try_from(name.as_str())
                .map_err(|_| TlsConfigError::BadServerName(name.clone()))?;
        }
        Ok(Self {
            mode,
            roots: Arc::new(roots),
            server_name,
            provider,
            time,
        })
    }

    /// The name to check the database's certificate against when connecting to `host`.
    pub(crate) fn server_name(&self, host: &str) -> Result<ServerName<'static>, TlsConfigError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        ServerName::try_from(name.to_owned())
            .map_err(|_| TlsConfigError::BadServerName(name.to_owned()))
    }

    /// A client configuration presenting `client_cert` (or no certificate).
    pub(crate) fn client_config(
        &self,
        client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Arc<ClientConfig>, TlsConfigError> {
        let webpki =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| TlsConfigError::Rustls(rustls::Error::General(e.to_string())))?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            TlsMode::VerifyFull => webpki,
            TlsMode::VerifyCa => Arc::new(ChainOnly(webpki)),
        };
        let builder = ClientConfig::builder_with_details(self.provider.clone(), self.time.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match client_cert {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        };
        // One connection per session; nothing to resume.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// verify-ca: the chain must verify; the name is not checked. webpki checks the chain
/// before the name, so a name error means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

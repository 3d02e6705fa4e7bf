//! TLS configurations of the client: to the proxy's API (verifying the cluster's host
//! CA, optionally presenting the user's certificate) and to its database ports.

use std::sync::Arc;

use postern_pki::TrustedCa;
use postern_rt::WallClock;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::Error;

/// ALPN offered on the API connection (the TLS-routing port passes it to the auth API).
pub const ALPN_API: &[u8] = b"http/1.1";
/// ALPN of PostgreSQL over the proxy's TLS-routing port.
pub const ALPN_POSTGRES: &[u8] = b"postern-postgres";

fn tls(error: rustls::Error) -> Error {
    Error::Tls(error.to_string())
}

/// How the client decides to trust the proxy.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The cluster's host CAs.
    Cas(Vec<TrustedCa>),
    /// Nothing is verified. Only for a first login on a test cluster.
    DangerAcceptAnyServer,
}

/// A client TLS configuration with `trust`, presenting `credentials` when given.
pub fn client_config(
    trust: &Trust,
    credentials: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[&[u8]],
    clock: &WallClock,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let provider = postern_pki::tls::ring_provider();
    let builder =
        rustls::ClientConfig::builder_with_details(provider.clone(), Arc::new(clock.clone()))
            .with_safe_default_protocol_versions()
            .map_err(tls)?;
    let builder = match trust {
        Trust::Cas(cas) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in cas {
                roots.add(ca.der().clone()).map_err(tls)?;
            }
            builder.with_root_certificates(roots)
        }
        Trust::DangerAcceptAnyServer => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider))),
    };
    let mut config = match credentials {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(tls)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Accepts any server certificate (signatures are still checked, so the handshake is
/// sound; who is at the other end is not).
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// SHA-256 of a certificate's DER, as `SHA256:aa:bb:...` (what an administrator
/// compares with the fingerprint of the cluster's host CA).
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("SHA256:{}", hex.join(":"))
}

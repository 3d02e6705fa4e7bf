//! rustls integration: mutual-TLS configurations built from our certificates, with the
//! crypto provider and the wall clock passed in explicitly.
//!
//! Why explicit: if any crate in the build enables rustls' aws-lc-rs backend beside ring,
//! the implicit `ServerConfig::builder()` panics; and passing a
//! [`TimeProvider`] backed by the runtime seam's
//! clock makes rustls check certificate expiry against simulated time, so a turmoil test
//! can move the clock past `notAfter` and watch the handshake fail.
//!
//! The handshake checks chain, expiry and key usage (webpki). After it, call
//! [`peer_identity`] or [`peer_host`] to run our [`Validator`] on the peer's certificate
//! and get the proof-carrying [`VerifiedIdentity`] / [`VerifiedHost`].
//!
//! The proxy→agent hop, end to end (the driver moves the bytes; here, nothing does):
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use postern_pki::tls::{mtls_client_config, mtls_server_config, ring_provider};
//! use postern_pki::{CaKind, CertAuthority, HostIdentity, HostRole, PrivateKey, UnixTime};
//!
//! #[derive(Debug)]
//! struct Clock(UnixTime); // in services: the runtime seam's wall clock
//! impl rustls::time_provider::TimeProvider for Clock {
//!     fn current_time(&self) -> Option<UnixTime> { Some(self.0) }
//! }
//!
//! let now = UnixTime::since_unix_epoch(Duration::from_secs(1_795_478_400));
//! let year = Duration::from_secs(365 * 24 * 3600);
//! let host_ca = CertAuthority::generate(CaKind::Host, "prod", now, year)?;
//! let user_ca = CertAuthority::generate(CaKind::User, "prod", now, year)?;
//! let agent_key = PrivateKey::generate()?;
//! let agent = HostIdentity {
//!     host_id: "agent-1".into(),
//!     role: HostRole::Agent,
//!     cluster: "prod".into(),
//!     names: vec!["agent-1.prod.postern".into()],
//!     expires: UnixTime::since_unix_epoch(Duration::from_secs(1_795_478_400 + 3600)),
//! };
//! let agent_cert = host_ca.issue_host(&agent, &agent_key.public_key(), now)?;
//! let clock: Arc<dyn rustls::time_provider::TimeProvider> = Arc::new(Clock(now));
//!
//! // Agent side: present the host cert, require a client cert from the user CA.
//! let server = mtls_server_config(
//!     vec![agent_cert.der().clone()],
//!     agent_key.to_rustls(),
//!     &[user_ca.trusted().clone()],
//!     ring_provider(),
//!     clock.clone(),
//! )?;
//! // Proxy side: `mtls_client_config(proxy→agent cert, key, &[host CA], ...)`, connect
//! // with server name "agent-1.prod.postern"; after the handshake the agent calls
//! // `peer_identity(conn.peer_certificates(), &validator, Purpose::ProxyToAgent, now)`.
//! # let _ = server;
//! # Ok::<(), postern_pki::Error>(())
//! ```

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::time_provider::TimeProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::error::Error;
use crate::identity::HostRole;
use crate::trust::TrustedCa;
use crate::validate::{Purpose, Validator, VerifiedHost, VerifiedIdentity};

/// rustls' ring crypto provider, the one Postern uses everywhere.
pub fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration that presents `cert_chain`/`key` and **requires** a client
/// certificate chaining to one of `client_cas` (pass old and new CA during a rotation).
/// Certificate times are checked against `time`. Session resumption is off: a resumed
/// TLS 1.3 session shows no certificate, so rustls would not check expiry again, and a
/// session could outlive the certificate that opened it. To set ALPN protocols, clone
/// the configuration out of the `Arc` (`(*config).clone()`).
pub fn mtls_server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_cas: &[TrustedCa],
    provider: Arc<CryptoProvider>,
    time: Arc<dyn TimeProvider>,
) -> Result<Arc<ServerConfig>, Error> {
    let roots = root_store(client_cas)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(tls_config)?;
    let mut config = ServerConfig::builder_with_details(provider, time)
        .with_safe_default_protocol_versions()
        .map_err(tls_config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)
        .map_err(tls_config)?;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client configuration that presents `cert_chain`/`key` and accepts a server whose
/// certificate chains to one of `server_cas` and names the server name used to connect.
/// Certificate times are checked against `time`; resumption is off, as for the server.
/// Also the agent→database configuration: the database client certificate, trusting the
/// database CA.
pub fn mtls_client_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    server_cas: &[TrustedCa],
    provider: Arc<CryptoProvider>,
    time: Arc<dyn TimeProvider>,
) -> Result<Arc<ClientConfig>, Error> {
    let roots = root_store(server_cas)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(tls_config)?;
    let mut config = ClientConfig::builder_with_details(provider, time)
        .with_safe_default_protocol_versions()
        .map_err(tls_config)?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(cert_chain, key)
        .map_err(tls_config)?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// After a handshake: validates the peer's end-entity certificate as a user identity
/// for `purpose` at `now`. Pass `connection.peer_certificates()`.
pub fn peer_identity(
    peer_certificates: Option<&[CertificateDer<'_>]>,
    validator: &Validator,
    purpose: Purpose,
    now: UnixTime,
) -> Result<VerifiedIdentity, Error> {
    let end_entity = end_entity(peer_certificates)?;
    validator.verify_identity(end_entity, purpose, now)
}

/// After a handshake: validates the peer's end-entity certificate as a host of role
/// `role` at `now`. Pass `connection.peer_certificates()`.
pub fn peer_host(
    peer_certificates: Option<&[CertificateDer<'_>]>,
    validator: &Validator,
    role: HostRole,
    now: UnixTime,
) -> Result<VerifiedHost, Error> {
    let end_entity = end_entity(peer_certificates)?;
    validator.verify_host(end_entity, role, now)
}

/// Turns a rustls handshake error about a certificate's validity period into our error,
/// whose message tells the user what to do (`postern login`), instead of a bare TLS
/// alert. `None` for other errors.
pub fn explain_handshake_error(error: &rustls::Error) -> Option<Error> {
    use rustls::CertificateError as C;
    let cert = "presented in the TLS handshake".to_string();
    match error {
        rustls::Error::InvalidCertificate(C::ExpiredContext { time, not_after }) => {
            Some(Error::Expired {
                cert,
                now: *time,
                not_after: *not_after,
            })
        }
        rustls::Error::InvalidCertificate(C::NotValidYetContext { time, not_before }) => {
            Some(Error::NotYetValid {
                cert,
                now: *time,
                not_before: *not_before,
            })
        }
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => Some(Error::UnknownIssuer {
            cert,
            issuer: "a CA this side does not trust".into(),
        }),
        _ => None,
    }
}

fn end_entity<'a>(peer_certificates: Option<&'a [CertificateDer<'_>]>) -> Result<&'a [u8], Error> {
    peer_certificates
        .and_then(|chain| chain.first())
        .map(|der| der.as_ref())
        .ok_or(Error::NoPeerCertificate)
}

fn root_store(cas: &[TrustedCa]) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.der().clone()).map_err(tls_config)?;
    }
    if roots.is_empty() {
        return Err(Error::TlsConfig {
            reason: "no trusted CA given".into(),
        });
    }
    Ok(Arc::new(roots))
}

fn tls_config(e: impl std::fmt::Display) -> Error {
    Error::TlsConfig {
        reason: e.to_string(),
    }
}

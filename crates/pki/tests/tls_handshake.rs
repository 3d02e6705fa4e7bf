//! Mutual TLS with our certificates, driven in memory (rustls is sans-IO too), with the
//! wall clock injected through rustls' TimeProvider.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use postern_pki::tls::{
    explain_handshake_error, mtls_client_config, mtls_server_config, peer_host, peer_identity,
    ring_provider,
};
use postern_pki::{Error, HostRole, PrivateKey, Purpose, UnixTime};
use rustls::pki_types::ServerName;
use rustls::time_provider::TimeProvider;
use rustls::{ClientConnection, ServerConnection};

#[derive(Debug)]
struct FixedTime(UnixTime);

impl TimeProvider for FixedTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(self.0)
    }
}

/// A proxy (TLS client, presenting a proxy→agent cert) and an agent (TLS server).
struct Hop {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn hop(cluster: &Cluster, client_cas: &Cluster, now: UnixTime) -> Hop {
    let agent_key = PrivateKey::generate().unwrap();
    let agent_cert = cluster
        .host_ca
        .issue_host(&agent_host(), &agent_key.public_key(), at(T0))
        .unwrap();
    // A user verified by the proxy, then the 5-minute proxy→agent cert for them.
    let user_key = PrivateKey::generate().unwrap();
    let user_cert = cluster
        .user_ca
        .issue_identity(&alice(), &user_key.public_key(), at(T0))
        .unwrap();
    let user = cluster
        .validator()
        .verify_identity(user_cert.der(), Purpose::UserDatabase, at(T0))
        .unwrap();
    let proxy_key = PrivateKey::generate().unwrap();
    let (_, access_cert) = cluster
        .user_ca
        .issue_db_access(
            &user,
            &proxy_key.public_key(),
            at(T0),
            Duration::from_secs(300),
        )
        .unwrap();
    let time: Arc<dyn TimeProvider> = Arc::new(FixedTime(now));
    Hop {
        server: mtls_server_config(
            vec![agent_cert.der().clone()],
            agent_key.to_rustls(),
            &[client_cas.user_ca.trusted().clone()],
            ring_provider(),
            time.clone(),
        )
        .unwrap(),
        client: mtls_client_config(
            vec![access_cert.der().clone()],
            proxy_key.to_rustls(),
            &[cluster.host_ca.trusted().clone()],
            ring_provider(),
            time,
        )
        .unwrap(),
    }
}

/// Runs the handshake to completion or to the first error (which side, error).
fn handshake(
    hop: &Hop,
) -> Result<(ClientConnection, ServerConnection), (&'static str, rustls::Error)> {
    let name = ServerName::try_from("agent-1.prod.postern").unwrap();
    let mut client = ClientConnection::new(hop.client.clone(), name).unwrap();
    let mut server = ServerConnection::new(hop.server.clone()).unwrap();
    for _ in 0..20 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        let mut slice = &buf[..];
        while !slice.is_empty() {
            server.read_tls(&mut slice).unwrap();
        }
        server.process_new_packets().map_err(|e| ("agent", e))?;
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        let mut slice = &buf[..];
        while !slice.is_empty() {
            client.read_tls(&mut slice).unwrap();
        }
        client.process_new_packets().map_err(|e| ("proxy", e))?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok((client, server));
        }
    }
    panic!("handshake did not finish in 20 rounds");
}

// Goal: within validity, the handshake succeeds and each side gets a verified peer.
#[test]
fn handshake_succeeds_and_yields_verified_peers() {
    let cluster = Cluster::new("prod");
    let now = at(T0 + 60);
    let (client, server) = handshake(&hop(&cluster, &cluster, now)).unwrap();
    let validator = cluster.validator();
    let user = peer_identity(
        server.peer_certificates(),
        &validator,
        Purpose::ProxyToAgent,
        now,
    )
    .unwrap();
    assert_eq!(user.identity().user, "alice");
    assert_eq!(user.identity().route, alice().route);
    let agent = peer_host(client.peer_certificates(), &validator, HostRole::Agent, now).unwrap();
    assert_eq!(agent.host().host_id, "agent-1");
}

// Goal: once the injected clock passes the proxy→agent cert's notAfter, the agent
// refuses the handshake with the expiry error, explained as "log in again".
#[test]
fn handshake_fails_once_clock_passes_expiry() {
    let cluster = Cluster::new("prod");
    let now = at(T0 + 301);
    let (side, err) = handshake(&hop(&cluster, &cluster, now)).unwrap_err();
    assert_eq!(side, "agent");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. })
        ),
        "{err:?}"
    );
    let explained = explain_handshake_error(&err).unwrap();
    assert!(
        matches!(explained, Error::Expired { not_after, .. } if not_after == at(T0 + 300)),
        "{explained:?}"
    );
    assert!(explained.to_string().contains("postern login"));
}

// Goal: the server's own host cert is checked against the injected clock too.
#[test]
fn handshake_fails_when_agent_cert_expired() {
    let cluster = Cluster::new("prod");
    // Past the agent cert (T0 + 24 h); the proxy→agent cert would also have expired, but
    // the proxy checks the server first.
    let now = at(T0 + 25 * HOUR);
    let (side, err) = handshake(&hop(&cluster, &cluster, now)).unwrap_err();
    assert_eq!(side, "proxy");
    assert!(matches!(
        explain_handshake_error(&err),
        Some(Error::Expired { .. })
    ));
}

// Goal: a client cert from another cluster's user CA fails the handshake.
#[test]
fn handshake_fails_for_foreign_client_ca() {
    let cluster = Cluster::new("prod");
    let other = Cluster::new("other");
    let (side, err) = handshake(&hop(&cluster, &other, at(T0 + 60))).unwrap_err();
    assert_eq!(side, "agent");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );
}

// Goal: building a configuration without any trusted CA is an error, not a panic.
#[test]
fn config_without_trusted_ca_is_refused() {
    let key = PrivateKey::generate().unwrap();
    let time: Arc<dyn TimeProvider> = Arc::new(FixedTime(at(T0)));
    let err =
        mtls_client_config(Vec::new(), key.to_rustls(), &[], ring_provider(), time).unwrap_err();
    assert!(matches!(err, Error::TlsConfig { .. }), "{err}");
}

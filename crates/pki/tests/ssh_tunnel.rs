//! SSH certificates for the reverse tunnel: issued by the host CA, checked against an
//! injected `now`.

mod common;

use common::*;
use postern_pki::ssh::ssh_key::certificate::CertType;
use postern_pki::ssh::ssh_key::private::Ed25519Keypair;
use postern_pki::ssh::ssh_key::{Certificate, PrivateKey, PublicKey};
use postern_pki::ssh::{SshExpectation, verify_ssh_cert};
use postern_pki::{Error, HostRole};

fn ssh_key(seed: u8) -> PublicKey {
    PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
        .public_key()
        .clone()
}

const AGENT: SshExpectation<'static> = SshExpectation {
    cert_type: CertType::User,
    role: HostRole::Agent,
    principal: "agent-1",
};

fn agent_cert(cluster: &Cluster) -> Certificate {
    cluster
        .host_ca
        .issue_ssh_user_cert(&agent_host(), &ssh_key(1), at(T0))
        .unwrap()
}

fn trusted(cluster: &Cluster) -> Vec<PublicKey> {
    vec![cluster.host_ca.ssh_public_key().unwrap()]
}

// Goal: an agent's SSH user cert and a proxy's SSH host cert verify for their use.
#[test]
fn tunnel_certs_verify() {
    let cluster = Cluster::new("prod");
    let verified = verify_ssh_cert(
        &agent_cert(&cluster),
        AGENT,
        &trusted(&cluster),
        at(T0 + HOUR),
    )
    .unwrap();
    assert_eq!(verified.key_id(), "agent-1");
    assert_eq!(verified.role(), HostRole::Agent);
    assert_eq!(verified.cluster(), "prod");
    assert_eq!(verified.valid_before(), agent_host().expires);

    let proxy = cluster
        .host_ca
        .issue_ssh_host_cert(&proxy_host(), &ssh_key(2), at(T0))
        .unwrap();
    let expect = SshExpectation {
        cert_type: CertType::Host,
        role: HostRole::Proxy,
        principal: "proxy-1.prod.postern",
    };
    assert!(verify_ssh_cert(&proxy, expect, &trusted(&cluster), at(T0 + HOUR)).is_ok());
}

// Goal: the certificate survives OpenSSH text encoding (what russh and files carry).
#[test]
fn tunnel_cert_survives_openssh_encoding() {
    let cluster = Cluster::new("prod");
    let text = agent_cert(&cluster).to_openssh().unwrap();
    let back = Certificate::from_openssh(&text).unwrap();
    assert!(verify_ssh_cert(&back, AGENT, &trusted(&cluster), at(T0 + HOUR)).is_ok());
}

// Goal: each way an SSH tunnel cert can be wrong gets its own error.
#[test]
fn bad_tunnel_certs_are_refused() {
    let cluster = Cluster::new("prod");
    let other = Cluster::new("prod");
    let cert = agent_cert(&cluster);
    let ok_keys = trusted(&cluster);
    let now = at(T0 + HOUR);

    let err = verify_ssh_cert(&cert, AGENT, &ok_keys, at(T0 + 25 * HOUR)).unwrap_err();
    assert!(matches!(err, Error::SshExpired { .. }), "{err}");
    assert!(err.to_string().contains("expired"));

    let err = verify_ssh_cert(&cert, AGENT, &ok_keys, at(T0 - HOUR)).unwrap_err();
    assert!(matches!(err, Error::SshNotYetValid { .. }), "{err}");

    let err = verify_ssh_cert(&cert, AGENT, &trusted(&other), now).unwrap_err();
    assert!(matches!(err, Error::SshUntrusted { .. }), "{err}");

    let as_host = SshExpectation {
        cert_type: CertType::Host,
        ..AGENT
    };
    let err = verify_ssh_cert(&cert, as_host, &ok_keys, now).unwrap_err();
    assert!(matches!(err, Error::SshWrongUse { .. }), "{err}");

    let as_proxy = SshExpectation {
        role: HostRole::Proxy,
        ..AGENT
    };
    let err = verify_ssh_cert(&cert, as_proxy, &ok_keys, now).unwrap_err();
    assert!(matches!(err, Error::SshWrongUse { .. }), "{err}");

    let other_host = SshExpectation {
        principal: "agent-2",
        ..AGENT
    };
    let err = verify_ssh_cert(&cert, other_host, &ok_keys, now).unwrap_err();
    assert!(matches!(err, Error::SshPrincipal { .. }), "{err}");

    // Tamper with the key id inside the signed bytes: "agent-1" -> "agent-2".
    let mut bytes = cert.to_bytes().unwrap();
    let at_id = bytes.windows(7).position(|w| w == b"agent-1").unwrap();
    bytes[at_id + 6] = b'2';
    let tampered = Certificate::from_bytes(&bytes).unwrap();
    let expect = SshExpectation {
        principal: tampered.valid_principals()[0].as_str(),
        ..AGENT
    };
    let err = verify_ssh_cert(&tampered, expect, &ok_keys, now).unwrap_err();
    assert!(matches!(err, Error::SshBadSignature { .. }), "{err}");
}

// Goal: only the host CA signs tunnel certs.
#[test]
fn only_host_ca_signs_ssh() {
    let cluster = Cluster::new("prod");
    assert!(cluster.user_ca.ssh_public_key().is_none());
    let err = cluster
        .user_ca
        .issue_ssh_user_cert(&agent_host(), &ssh_key(1), at(T0))
        .unwrap_err();
    assert!(matches!(err, Error::WrongCaKind { .. }), "{err}");
}

// Goal: generated tunnel keys are fresh each time and certifiable.
#[test]
fn generated_ssh_keys_are_distinct_and_certifiable() {
    let cluster = Cluster::new("prod");
    let a = postern_pki::ssh::generate_ssh_key().unwrap();
    let b = postern_pki::ssh::generate_ssh_key().unwrap();
    assert_ne!(a.public_key(), b.public_key());
    let cert = cluster
        .host_ca
        .issue_ssh_user_cert(&agent_host(), a.public_key(), at(T0))
        .unwrap();
    assert_eq!(cert.public_key(), a.public_key().key_data());
}

//! Issuing every kind of certificate and validating it back.

mod common;

use common::*;
use postern_pki::{
    CaPem, CertAuthority, Error, HostRole, IssuedCert, PrivateKey, Purpose, TrustedCa, Usage,
    Validator, decode_identity_unverified,
};

// Goal: a user cert issued by the user CA verifies at `now` and yields the same identity.
#[test]
fn user_cert_round_trips_through_validator() {
    let cluster = Cluster::new("prod");
    let key = PrivateKey::generate().unwrap();
    let cert = cluster
        .user_ca
        .issue_identity(&alice(), &key.public_key(), at(T0))
        .unwrap();
    let verified = cluster
        .validator()
        .verify_identity(cert.der(), Purpose::UserDatabase, at(T0 + HOUR))
        .unwrap();
    assert_eq!(verified.identity(), &alice());
    assert_eq!(decode_identity_unverified(cert.der()).unwrap(), alice());
}

// Goal: host certs verify as their own role and carry their names back out.
#[test]
fn host_cert_verifies_with_names() {
    let cluster = Cluster::new("prod");
    let key = PrivateKey::generate().unwrap();
    let cert = cluster
        .host_ca
        .issue_host(&agent_host(), &key.public_key(), at(T0))
        .unwrap();
    let verified = cluster
        .validator()
        .verify_host(cert.der(), HostRole::Agent, at(T0 + HOUR))
        .unwrap();
    assert_eq!(verified.host(), &agent_host());
}

// Goal: the proxy→agent cert carries the user's identity with usage db, capped in time.
#[test]
fn db_access_cert_carries_user_identity() {
    let cluster = Cluster::new("prod");
    let validator = cluster.validator();
    let user_key = PrivateKey::generate().unwrap();
    let user_cert = cluster
        .user_ca
        .issue_identity(&alice(), &user_key.public_key(), at(T0))
        .unwrap();
    let user = validator
        .verify_identity(user_cert.der(), Purpose::UserDatabase, at(T0 + HOUR))
        .unwrap();
    let proxy_key = PrivateKey::generate().unwrap();
    let ttl = std::time::Duration::from_secs(300);
    let (identity, cert) = cluster
        .user_ca
        .issue_db_access(&user, &proxy_key.public_key(), at(T0 + HOUR), ttl)
        .unwrap();
    assert_eq!(identity.usage, Usage::Db);
    assert_eq!(identity.expires, at(T0 + HOUR + 300));
    let at_agent = validator
        .verify_identity(cert.der(), Purpose::ProxyToAgent, at(T0 + HOUR + 10))
        .unwrap();
    assert_eq!(at_agent.identity(), &identity);
    assert_eq!(
        at_agent.identity().route,
        alice().route,
        "route must survive the hop"
    );
}

// Goal: CAs survive a PEM round trip and keep signing certs the old trust accepts.
#[test]
fn ca_pem_round_trip_keeps_issuing() {
    let cluster = Cluster::new("prod");
    for ca in [&cluster.user_ca, &cluster.host_ca, &cluster.db_ca] {
        let pem = ca.to_pem().unwrap();
        assert_eq!(
            pem.ssh_key.is_some(),
            ca.kind() == postern_pki::CaKind::Host
        );
        let loaded = CertAuthority::from_pem(&pem).unwrap();
        assert_eq!(loaded.trusted(), ca.trusted());
        assert_eq!(loaded.ssh_public_key(), ca.ssh_public_key());
    }
    let loaded = CertAuthority::from_pem(&cluster.user_ca.to_pem().unwrap()).unwrap();
    let key = PrivateKey::generate().unwrap();
    let cert = loaded
        .issue_identity(&alice(), &key.public_key(), at(T0))
        .unwrap();
    assert!(
        cluster
            .validator()
            .verify_identity(cert.der(), Purpose::UserLogin, at(T0))
            .is_ok()
    );
}

// Goal: a CA whose key does not match its certificate is refused at load time.
#[test]
fn ca_load_rejects_mismatched_key() {
    let a = Cluster::new("prod");
    let b = Cluster::new("prod");
    let a_pem = a.user_ca.to_pem().unwrap();
    let b_pem = b.user_ca.to_pem().unwrap();
    let mixed = CaPem {
        cert: a_pem.cert,
        key: b_pem.key,
        ssh_key: None,
    };
    assert!(matches!(
        CertAuthority::from_pem(&mixed),
        Err(Error::Load {
            what: "CA private key",
            ..
        })
    ));
}

// Goal: database client certs have CN = db user and are refused from the wrong CA.
#[test]
fn db_client_cert_needs_db_ca() {
    let cluster = Cluster::new("prod");
    let key = PrivateKey::generate().unwrap();
    let ttl = std::time::Duration::from_secs(600);
    let cert = cluster
        .db_ca
        .issue_db_client("reader", &key.public_key(), at(T0), ttl)
        .unwrap();
    let parsed = x509_cn(cert.der());
    assert_eq!(parsed, "reader");
    let err = cluster
        .user_ca
        .issue_db_client("reader", &key.public_key(), at(T0), ttl)
        .unwrap_err();
    assert!(matches!(err, Error::WrongCaKind { .. }), "{err}");
}

// Goal: `admin auth sign --format db` material is three PEM blobs that fit together.
#[test]
fn db_server_files_fit_together() {
    let cluster = Cluster::new("prod");
    let hosts = vec!["db.internal".to_string(), "10.1.2.3".to_string()];
    let ttl = std::time::Duration::from_secs(2190 * 3600);
    let files = cluster.db_ca.sign_db_server(&hosts, at(T0), ttl).unwrap();
    assert!(files.server_crt.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(files.server_key.contains("PRIVATE KEY"));
    let cas = TrustedCa::from_pem_bundle(&files.server_cas).unwrap();
    assert_eq!(cas, vec![cluster.db_ca.trusted().clone()]);
    // The key in server.key is the one certified in server.crt.
    let key = PrivateKey::from_pem(&files.server_key).unwrap();
    let cert = rustls_pki_types_cert(&files.server_crt);
    assert!(
        cert.windows(key.public_key().der().len())
            .any(|w| w == key.public_key().der())
    );
    assert_eq!(x509_cn(&cert), "db.internal");
}

// Goal: issuing refuses an expiry that is not in the future.
#[test]
fn issuing_refuses_past_expiry() {
    let cluster = Cluster::new("prod");
    let key = PrivateKey::generate().unwrap();
    let mut id = alice();
    id.expires = at(T0 - 1);
    let err = cluster
        .user_ca
        .issue_identity(&id, &key.public_key(), at(T0))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidRequest {
                field: "expiry",
                ..
            }
        ),
        "{err}"
    );
}

// Goal: during a rotation both the old and the new CA are trusted.
#[test]
fn rotation_trusts_both_cas() {
    let old = Cluster::new("prod");
    let new = Cluster::new("prod");
    let validator = Validator::new([old.user_ca.trusted().clone(), new.user_ca.trusted().clone()]);
    for ca in [&old.user_ca, &new.user_ca] {
        let key = PrivateKey::generate().unwrap();
        let cert = ca
            .issue_identity(&alice(), &key.public_key(), at(T0))
            .unwrap();
        assert!(
            validator
                .verify_identity(cert.der(), Purpose::UserLogin, at(T0))
                .is_ok()
        );
    }
}

fn rustls_pki_types_cert(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn x509_cn(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    let cn = cert.subject().iter_common_name().next().unwrap();
    cn.as_str().unwrap().to_string()
}

// Goal: a host name written as a non-canonical IP is refused, so names round-trip.
#[test]
fn host_names_must_be_canonical_ips() {
    let cluster = Cluster::new("prod");
    let key = PrivateKey::generate().unwrap();
    let mut host = agent_host();
    host.names = vec!["::0001".into()];
    let err = cluster
        .host_ca
        .issue_host(&host, &key.public_key(), at(T0))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidRequest {
                field: "host name",
                ..
            }
        ),
        "{err}"
    );
}

// Goal: a subject public key arrives as PEM or DER and means the same key.
#[test]
fn public_key_from_pem_and_der_agree() {
    let key = PrivateKey::generate().unwrap();
    let der = key.public_key();
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64_encode(der.der())
    );
    assert_eq!(postern_pki::PublicKey::from_pem(&pem).unwrap(), der);
    assert!(postern_pki::PublicKey::from_der(b"not a key").is_err());
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// The types services share across tasks are Send + Sync: checked at compile time.
const _: () = {
    fn send_sync<T: Send + Sync>() {}
    let _ = send_sync::<CertAuthority>;
    let _ = send_sync::<Validator>;
    let _ = send_sync::<postern_pki::VerifiedIdentity>;
    let _ = send_sync::<Error>;
};

// Goal: a rotation bundle (old + new CA in one PEM) loads both; a leaf is not a CA.
#[test]
fn trusted_ca_bundle_loads_every_ca_and_refuses_leaves() {
    let old = Cluster::new("prod");
    let new = Cluster::new("prod");
    let bundle = format!(
        "{}{}",
        old.user_ca.trusted().to_pem(),
        new.user_ca.trusted().to_pem()
    );
    let cas = TrustedCa::from_pem_bundle(&bundle).unwrap();
    assert_eq!(
        cas,
        vec![old.user_ca.trusted().clone(), new.user_ca.trusted().clone()]
    );
    let key = PrivateKey::generate().unwrap();
    let leaf = old
        .user_ca
        .issue_identity(&alice(), &key.public_key(), at(T0))
        .unwrap();
    let err = TrustedCa::from_der(leaf.der()).unwrap_err();
    assert!(matches!(err, Error::Load { .. }), "{err}");
    assert!(TrustedCa::from_pem_bundle("no pem here").is_err());
}

// Goal: a leaf certificate read back from PEM or DER (as a joined host reads the one the
// auth service returned, or saved) equals the issued one, validity included; CA
// certificates and garbage are refused.
#[test]
fn issued_cert_reads_back_from_pem_and_der() {
    let cluster = Cluster::new("prod");
    let key = PrivateKey::generate().unwrap();
    let cert = cluster
        .host_ca
        .issue_host(&agent_host(), &key.public_key(), at(T0))
        .unwrap();
    let from_pem = IssuedCert::from_pem(&cert.to_pem()).unwrap();
    assert_eq!(from_pem, cert);
    assert_eq!(IssuedCert::from_der(cert.der()).unwrap(), cert);
    assert_eq!(cert.not_after(), agent_host().expires);
    assert!(
        cert.not_before() < at(T0),
        "backdated by NOT_BEFORE_BACKDATE"
    );

    let ca_pem = cluster.host_ca.trusted().to_pem();
    assert!(IssuedCert::from_pem(&ca_pem).is_err(), "a CA is no leaf");
    assert!(IssuedCert::from_pem("no certificate here").is_err());
    let mut trailing = cert.der().to_vec();
    trailing.push(0);
    assert!(IssuedCert::from_der(&trailing).is_err());
}

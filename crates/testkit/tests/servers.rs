//! The throwaway servers start, answer, enforce client-certificate auth, and go away.

use std::fs;
use std::path::Path;
use std::process::Command;

use postern_testkit::{
    MariaDbOptions, MariaDbServer, PostgresOptions, PostgresServer, Psql, ServerTls,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

/// A CA, a server cert for 127.0.0.1/localhost and a client cert with CN `alice`.
fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "testkit CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    client.distinguished_name.push(DnType::CommonName, "alice");
    let client = client.signed_by(&client_key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server: (server.pem(), server_key.serialize_pem()),
        client: (client.pem(), client_key.serialize_pem()),
    }
}

// A plain server answers queries over TCP and is gone after drop.
#[test]
fn postgres_starts_answers_and_stops() {
    let server = PostgresServer::start(PostgresOptions::default()).unwrap();
    let port = server.port();
    assert_eq!(server.psql("postgres", "select 40 + 2").unwrap(), "42");
    let out = Psql::new()
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .run("select current_user");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "postgres");
    drop(server);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

// With TLS, TCP clients need a certificate whose CN is the database user, and verify-full
// against our CA succeeds; without a certificate the server refuses.
#[test]
fn postgres_with_tls_requires_a_client_certificate() {
    let pki = pki();
    let server = PostgresServer::start(PostgresOptions {
        tls: Some(ServerTls {
            cert_pem: pki.server.0.clone(),
            key_pem: pki.server.1.clone(),
            client_ca_pem: pki.ca_pem.clone(),
        }),
        ..Default::default()
    })
    .unwrap();
    server.psql("postgres", "create role alice login").unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    fs::write(path("ca.crt"), &pki.ca_pem).unwrap();
    fs::write(path("alice.crt"), &pki.client.0).unwrap();
    fs::write(path("alice.key"), &pki.client.1).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path("alice.key"), fs::Permissions::from_mode(0o600)).unwrap();

    let base = Psql::new()
        .host("localhost")
        .port(server.port())
        .dbname("postgres")
        .user("alice");
    let out = base
        .clone()
        .verify_full(&dir.path().join("ca.crt"))
        .client_cert(&dir.path().join("alice.crt"), &dir.path().join("alice.key"))
        .run("select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alice|t");

    let out = base
        .sslmode("require")
        .client_cert(Path::new("/nonexistent"), Path::new("/nonexistent"))
        .run("select 1");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");
}

// MariaDB with TLS: a user created with REQUIRE SUBJECT logs in with the matching
// client certificate and not without it.
#[test]
fn mariadb_with_tls_requires_the_subject() {
    let pki = pki();
    let server = MariaDbServer::start(MariaDbOptions {
        tls: Some(ServerTls {
            cert_pem: pki.server.0.clone(),
            key_pem: pki.server.1.clone(),
            client_ca_pem: pki.ca_pem.clone(),
        }),
    })
    .unwrap();
    server
        .sql("create user alice@'%' require subject '/CN=alice'; grant select on *.* to alice@'%'")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    fs::write(path("ca.crt"), &pki.ca_pem).unwrap();
    fs::write(path("alice.crt"), &pki.client.0).unwrap();
    fs::write(path("alice.key"), &pki.client.1).unwrap();
    let port = format!("--port={}", server.port());

    let out = Command::new("mariadb")
        .args(["--no-defaults", "-h127.0.0.1", &port, "-ualice", "-N", "-B"])
        .arg(format!("--ssl-ca={}", path("ca.crt")))
        .arg(format!("--ssl-cert={}", path("alice.crt")))
        .arg(format!("--ssl-key={}", path("alice.key")))
        .args(["-e", "select current_user()"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alice@%");

    let out = Command::new("mariadb")
        .args([
            "--no-defaults",
            "-h127.0.0.1",
            &port,
            "-ualice",
            "--ssl",
            "-e",
            "select 1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Access denied"));
}

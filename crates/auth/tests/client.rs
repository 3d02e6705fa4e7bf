//! The API client against a real auth server: a proxy and an agent join, announce,
//! log a user in and hand out the certificates of a database connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use postern_auth::Error;
use postern_auth::api::{
    self, AnnounceRequest, DatabaseCertRequest, DbAccessRequest, DbClientRequest, JoinRequest,
    KeepAliveRequest, LoginRequest,
};
use postern_auth::audit::{AuditEvent, MemoryAuditLog, codes};
use postern_auth::backend::MemoryBackend;
use postern_auth::client::AuthClient;
use postern_auth::database::{Database, Protocol};
use postern_auth::limiter::LoginLimits;
use postern_auth::role::parse_role_file;
use postern_auth::server::{AuthConfig, AuthServer, TokenKind};
use postern_auth::user::{PasswordCost, Traits};
use postern_pki::{CaKind, PrivateKey, TrustedCa};
use postern_rt::{Net, Rng, WallClock};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

const PASSWORD: &str = "correct horse battery staple";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

struct Setup {
    server: Arc<AuthServer<MemoryBackend, MemoryAuditLog>>,
    clock: WallClock,
    addr: String,
    host_cas: Vec<TrustedCa>,
}

impl Setup {
    fn client(&self, credentials: Option<(CertificateDer<'static>, &PrivateKey)>) -> AuthClient {
        let credentials = credentials.map(|(cert, key)| (cert, key.to_rustls()));
        AuthClient::new(
            Net::Tokio,
            &self.addr,
            "auth.test",
            &self.host_cas,
            credentials,
            Arc::new(self.clock.clone()),
        )
        .unwrap()
    }
}

async fn setup() -> Setup {
    let clock = WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(
        1_800_000_000,
    )));
    let config = AuthConfig {
        cluster: "test".into(),
        password_cost: PasswordCost {
            memory_kib: 64,
            passes: 1,
        },
        login_limits: LoginLimits::default(),
    };
    let server = AuthServer::new(
        MemoryBackend::new(Arc::new(clock.clone())),
        MemoryAuditLog::new(),
        clock.clone(),
        Rng::from_seed(11),
        config,
    )
    .unwrap();
    server.ensure_cas().await.unwrap();
    let roles = "[[role]]\nname = \"dev\"\nallow.db_labels = { env = \"dev\" }\nallow.db_users = [\"app\"]\nallow.db_names = [\"*\"]\n";
    server
        .apply_roles("root", &parse_role_file("r.toml", roles).unwrap())
        .await
        .unwrap();
    server
        .create_user(
            "root",
            "alice",
            vec!["dev".into()],
            Traits::default(),
            Some(PASSWORD),
            false,
        )
        .await
        .unwrap();
    let server = Arc::new(server);
    let listener = Net::Tokio.listen("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(api::serve(
        Arc::clone(&server),
        listener,
        vec!["auth.test".into()],
    ));
    let host_cas = server.ca_status(CaKind::Host).await.unwrap().trusted;
    Setup {
        server,
        clock,
        addr,
        host_cas,
    }
}

// The whole certificate flow of one database connection, through the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_agent_and_user_flow() {
    let s = setup().await;
    let anonymous = s.client(None);

    let agent_key = PrivateKey::generate().unwrap();
    let token = s
        .server
        .create_join_token("root", TokenKind::Db, Duration::from_secs(60))
        .await
        .unwrap();
    let joined = anonymous
        .join(&JoinRequest {
            token,
            kind: TokenKind::Db,
            host_id: "agent-1".into(),
            names: vec![],
            public_key: b64(agent_key.public_key().der()),
        })
        .await
        .unwrap();
    let agent = s.client(Some((der(&joined.cert), &agent_key)));
    let database = Database {
        name: "dev-pg".into(),
        description: "dev".into(),
        protocol: Protocol::Postgres,
        uri: "db:5432".into(),
        labels: BTreeMap::from([("env".into(), "dev".into())]),
    };
    let revision = agent
        .announce(&AnnounceRequest {
            database,
            ttl_secs: 600,
        })
        .await
        .unwrap()
        .revision;
    agent
        .keep_alive(&KeepAliveRequest {
            db_name: "dev-pg".into(),
            revision,
            ttl_secs: 600,
        })
        .await
        .unwrap();
    let event = AuditEvent::new(
        codes::LOGIN,
        time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
        &mut ChaCha20Rng::seed_from_u64(2),
    );
    assert_eq!(
        agent
            .emit_audit(std::slice::from_ref(&event))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        agent.emit_audit(&[event]).await.unwrap(),
        0,
        "idempotent through the API too"
    );
    agent
        .db_client(&DbClientRequest {
            db_user: "app".into(),
            public_key: b64(agent_key.public_key().der()),
        })
        .await
        .unwrap();

    let proxy_key = PrivateKey::generate().unwrap();
    let token = s
        .server
        .create_join_token("root", TokenKind::Proxy, Duration::from_secs(60))
        .await
        .unwrap();
    let joined = anonymous
        .join(&JoinRequest {
            token,
            kind: TokenKind::Proxy,
            host_id: "proxy-1".into(),
            names: vec![],
            public_key: b64(proxy_key.public_key().der()),
        })
        .await
        .unwrap();
    let proxy = s.client(Some((der(&joined.cert), &proxy_key)));
    let servers = proxy.servers("dev-pg").await.unwrap();
    assert_eq!(
        servers
            .iter()
            .map(|s| s.host_id.as_str())
            .collect::<Vec<_>>(),
        ["agent-1"]
    );

    let user_key = PrivateKey::generate().unwrap();
    let login = proxy
        .login(&LoginRequest {
            user: "alice".into(),
            password: PASSWORD.into(),
            totp: None,
            source: "192.0.2.9".parse().unwrap(),
            public_key: b64(user_key.public_key().der()),
            ttl_secs: None,
        })
        .await
        .unwrap();
    let user = s.client(Some((der(&login.cert), &user_key)));
    let listed = user.databases().await.unwrap();
    assert_eq!(
        listed.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        ["dev-pg"]
    );
    let routed = user
        .database_cert(&DatabaseCertRequest {
            service: "dev-pg".into(),
            db_user: "app".into(),
            db_name: "app".into(),
            public_key: b64(user_key.public_key().der()),
        })
        .await
        .unwrap();
    let denied = user
        .database_cert(&DatabaseCertRequest {
            service: "dev-pg".into(),
            db_user: "root".into(),
            db_name: String::new(),
            public_key: b64(user_key.public_key().der()),
        })
        .await
        .unwrap_err();
    match denied {
        Error::Remote {
            status: 403,
            message,
        } => assert!(message.contains("allowed db users: \"app\""), "{message}"),
        other => panic!("expected a 403 with the reason, got {other}"),
    }
    let access = proxy
        .db_access(&DbAccessRequest {
            user_cert: b64(der(&routed.cert).as_ref()),
            public_key: b64(proxy_key.public_key().der()),
        })
        .await
        .unwrap();
    let validator = s.server.validator().await.unwrap();
    let at_agent = validator
        .verify_identity(
            &der(&access.cert),
            postern_pki::Purpose::ProxyToAgent,
            s.clock.now(),
        )
        .unwrap();
    assert_eq!(at_agent.identity().user, "alice");
    assert!(user.cas().await.unwrap().contains("BEGIN CERTIFICATE"));

    let wrong_role = user
        .announce(&AnnounceRequest {
            database: servers[0].database.clone(),
            ttl_secs: 60,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(wrong_role, Error::Remote { status: 403, .. }),
        "{wrong_role}"
    );
}

// A server that is not there is reported as unreachable, naming the address.
#[tokio::test]
async fn unreachable_server() {
    let clock = WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(
        1_800_000_000,
    )));
    let listener = Net::Tokio.listen("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let client =
        AuthClient::new(Net::Tokio, &addr, "auth.test", &[], None, Arc::new(clock)).unwrap();
    match client.databases().await.unwrap_err() {
        Error::Unreachable { addr: reported, .. } => assert_eq!(reported, addr),
        other => panic!("expected unreachable, got {other}"),
    }
}

// A joined agent gets a tunnel SSH certificate that verifies against the host CA keys
// returned beside it, and the roles endpoint's version moves when a role changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_gets_ssh_cert_and_versioned_roles() {
    use postern_auth::api::SshCertRequest;
    use postern_pki::HostRole;
    use postern_pki::ssh::{SshExpectation, generate_ssh_key, ssh_key, verify_ssh_cert};

    let s = setup().await;
    let agent_key = PrivateKey::generate().unwrap();
    let token = s
        .server
        .create_join_token("root", TokenKind::Db, Duration::from_secs(60))
        .await
        .unwrap();
    let joined = s
        .client(None)
        .join(&JoinRequest {
            token,
            kind: TokenKind::Db,
            host_id: "agent-ssh".into(),
            names: vec![],
            public_key: b64(agent_key.public_key().der()),
        })
        .await
        .unwrap();
    let agent = s.client(Some((der(&joined.cert), &agent_key)));

    let ssh = generate_ssh_key().unwrap();
    let answer = agent
        .ssh_cert(&SshCertRequest {
            public_key: ssh.public_key().to_openssh().unwrap(),
        })
        .await
        .unwrap();
    let cert = ssh_key::Certificate::from_openssh(&answer.cert).unwrap();
    let ca_keys: Vec<ssh_key::PublicKey> = answer
        .host_ca_keys
        .iter()
        .map(|k| ssh_key::PublicKey::from_openssh(k).unwrap())
        .collect();
    assert_eq!(ca_keys.len(), 1);
    let verified = verify_ssh_cert(
        &cert,
        SshExpectation {
            cert_type: ssh_key::certificate::CertType::User,
            role: HostRole::Agent,
            principal: "agent-ssh",
        },
        &ca_keys,
        s.clock.now(),
    )
    .unwrap();
    assert_eq!(verified.key_id(), "agent-ssh");
    assert_eq!(cert.public_key(), ssh.public_key().key_data());

    // Without a host certificate, neither endpoint answers.
    assert!(matches!(
        s.client(None).roles().await,
        Err(Error::Remote { status: 401, .. })
    ));

    let before = agent.roles().await.unwrap();
    assert_eq!(
        before
            .roles
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["dev"]
    );
    assert_eq!(agent.roles().await.unwrap().version, before.version);
    let ops = "[[role]]\nname = \"ops\"\nallow.db_labels = { env = \"prod\" }\nallow.db_users = [\"*\"]\n";
    s.server
        .apply_roles("root", &parse_role_file("r.toml", ops).unwrap())
        .await
        .unwrap();
    let after = agent.roles().await.unwrap();
    assert_ne!(after.version, before.version);
    assert_eq!(after.roles.len(), 2);
}

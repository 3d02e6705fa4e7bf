//! Signing: login certs and their TTL, database routes after access checks, proxy→agent
//! and database client certs, joining hosts, database server certs, CA rotation.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use postern_auth::Error;
use postern_auth::audit::{AuditLog, AuditQuery, FileAuditLog};
use postern_auth::backend::MemoryBackend;
use postern_auth::database::{Database, Protocol};
use postern_auth::limiter::LoginLimits;
use postern_auth::role::parse_role_file;
use postern_auth::server::{AuthConfig, AuthServer, TokenKind};
use postern_auth::signing::RotationPhase;
use postern_auth::user::{PasswordCost, Traits};
use postern_pki::{CaKind, HostRole, PrivateKey, Purpose};
use postern_rt::{Rng, WallClock};
use rustls_pki_types::UnixTime;

const START_SECS: u64 = 1_800_000_000;
const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
const PASSWORD: &str = "correct horse battery staple";

const ROLES: &str = r#"
[[role]]
name = "dev"
options = { max_session_ttl = "1h" }
allow.db_labels = { env = "dev" }
allow.db_users = ["{{internal.db_users}}"]
allow.db_names = ["app"]

[[role]]
name = "long"
allow.db_labels = { env = "dev" }
allow.db_users = ["*"]
allow.db_names = ["*"]
"#;

struct Fixture {
    server: AuthServer<MemoryBackend, FileAuditLog>,
    clock: WallClock,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let clock = WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(START_SECS)));
    let dir = tempfile::tempdir().unwrap();
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
        FileAuditLog::open(dir.path()).unwrap(),
        clock.clone(),
        Rng::from_seed(5),
        config,
    )
    .unwrap();
    server.ensure_cas().await.unwrap();
    server
        .apply_roles("root", &parse_role_file("roles.toml", ROLES).unwrap())
        .await
        .unwrap();
    let traits = Traits {
        db_users: vec!["alice".into()],
        ..Traits::default()
    };
    server
        .create_user(
            "root",
            "alice",
            vec!["dev".into()],
            traits,
            Some(PASSWORD),
            false,
        )
        .await
        .unwrap();
    server
        .create_user(
            "root",
            "ops",
            vec!["long".into()],
            Traits::default(),
            Some(PASSWORD),
            false,
        )
        .await
        .unwrap();
    let database = Database {
        name: "dev-pg".into(),
        description: String::new(),
        protocol: Protocol::Postgres,
        uri: "db.internal:5432".into(),
        labels: BTreeMap::from([("env".into(), "dev".into())]),
    };
    server
        .announce_database("agent-1", &database, Duration::from_secs(600))
        .await
        .unwrap();
    Fixture {
        server,
        clock,
        _dir: dir,
    }
}

fn key() -> PrivateKey {
    PrivateKey::generate().unwrap()
}

// Login issues a user cert the validator accepts, for min(requested, 12 h, role max_session_ttl).
#[tokio::test]
async fn login_cert_ttl_is_capped() {
    let f = fixture().await;
    let now = f.clock.now();
    let k = key();
    let capped = f
        .server
        .login("alice", PASSWORD, None, SOURCE, &k.public_key(), None)
        .await
        .unwrap();
    assert_eq!(
        capped.identity.expires.as_secs(),
        START_SECS + 3600,
        "role max_session_ttl 1h"
    );
    let shorter = f
        .server
        .login(
            "alice",
            PASSWORD,
            None,
            SOURCE,
            &k.public_key(),
            Some(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    assert_eq!(
        shorter.identity.expires.as_secs(),
        START_SECS + 600,
        "requested 10m"
    );
    let default = f
        .server
        .login(
            "ops",
            PASSWORD,
            None,
            SOURCE,
            &k.public_key(),
            Some(Duration::from_secs(86_400)),
        )
        .await
        .unwrap();
    assert_eq!(
        default.identity.expires.as_secs(),
        START_SECS + 12 * 3600,
        "12h at most"
    );

    let verified = f
        .server
        .validator()
        .await
        .unwrap()
        .verify_identity(capped.cert.der(), Purpose::UserLogin, now)
        .unwrap();
    let identity = verified.identity();
    assert_eq!(identity.user, "alice");
    assert_eq!(identity.roles, ["dev"]);
    assert_eq!(identity.traits["db_users"], ["alice"]);
    assert_eq!(identity.allowed_db_users, ["alice"]);
    assert_eq!(identity.client_ip, Some(SOURCE));
    assert!(
        f.server
            .login(
                "alice",
                "wrong password!",
                None,
                SOURCE,
                &k.public_key(),
                None
            )
            .await
            .is_err()
    );
}

// db login: the route is written only after the access check, and the cert never outlives the login cert.
#[tokio::test]
async fn reissue_for_database_checks_access() {
    let f = fixture().await;
    let k = key();
    let validator = f.server.validator().await.unwrap();
    let login = f
        .server
        .login("alice", PASSWORD, None, SOURCE, &k.public_key(), None)
        .await
        .unwrap();
    let caller = validator
        .verify_identity(login.cert.der(), Purpose::UserLogin, f.clock.now())
        .unwrap();

    let cert = f
        .server
        .reissue_for_database(&caller, "dev-pg", "alice", "app", &k.public_key())
        .await
        .unwrap();
    let routed = validator
        .verify_identity(cert.der(), Purpose::UserDatabase, f.clock.now())
        .unwrap();
    let route = routed.identity().route.clone().unwrap();
    assert_eq!(
        (
            route.service.as_str(),
            route.db_user.as_str(),
            route.db_name.as_str()
        ),
        ("dev-pg", "alice", "app")
    );
    assert_eq!(routed.identity().expires, login.identity.expires);

    let denied = f
        .server
        .reissue_for_database(&caller, "dev-pg", "postgres", "app", &k.public_key())
        .await
        .unwrap_err();
    assert!(matches!(denied, Error::AccessDenied(_)), "{denied}");
    let refusals = AuditQuery {
        event: Some("auth.cert.issued".into()),
        ..AuditQuery::between(
            time::OffsetDateTime::UNIX_EPOCH,
            time::macros::datetime!(2100-01-01 0:00 UTC),
        )
    };
    let refused: Vec<_> = f
        .server
        .audit_log()
        .search(&refusals)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.code == "TAU01W")
        .collect();
    assert_eq!(refused.len(), 1, "the refusal is audited as a failure");
    assert!(
        refused[0]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("postgres")
    );
    assert!(
        denied.to_string().contains("allowed db users: \"alice\""),
        "{denied}"
    );
    let missing = f
        .server
        .reissue_for_database(&caller, "nope", "alice", "app", &k.public_key())
        .await
        .unwrap_err();
    assert!(matches!(missing, Error::NotFound { .. }), "{missing}");
}

// Hosts join with single-use tokens; proxies get proxy→agent certs, agents get database client certs.
#[tokio::test]
async fn hosts_join_and_get_their_certs() {
    let f = fixture().await;
    let now = f.clock.now();
    let validator = f.server.validator().await.unwrap();
    let proxy_key = key();
    let token = f
        .server
        .create_join_token("root", TokenKind::Proxy, Duration::from_secs(300))
        .await
        .unwrap();
    let proxy = f
        .server
        .join(
            &token,
            TokenKind::Proxy,
            "proxy-1",
            vec!["proxy.example.com".into()],
            &proxy_key.public_key(),
        )
        .await
        .unwrap();
    assert!(
        f.server
            .join(
                &token,
                TokenKind::Proxy,
                "proxy-2",
                vec![],
                &proxy_key.public_key()
            )
            .await
            .is_err(),
        "single use"
    );
    let proxy = validator
        .verify_host(proxy.cert.der(), HostRole::Proxy, now)
        .unwrap();
    assert_eq!(proxy.host().names, ["proxy.example.com"]);

    let agent_key = key();
    let token = f
        .server
        .create_join_token("root", TokenKind::Db, Duration::from_secs(300))
        .await
        .unwrap();
    let agent = f
        .server
        .join(
            &token,
            TokenKind::Db,
            "agent-1",
            vec![],
            &agent_key.public_key(),
        )
        .await
        .unwrap();
    let agent = validator
        .verify_host(agent.cert.der(), HostRole::Agent, now)
        .unwrap();

    let user_key = key();
    let login = f
        .server
        .login("ops", PASSWORD, None, SOURCE, &user_key.public_key(), None)
        .await
        .unwrap();
    let caller = validator
        .verify_identity(login.cert.der(), Purpose::UserLogin, now)
        .unwrap();
    let db_cert = f
        .server
        .reissue_for_database(&caller, "dev-pg", "app", "app", &user_key.public_key())
        .await
        .unwrap();
    let (identity, access) = f
        .server
        .issue_db_access(&proxy, db_cert.der(), &proxy_key.public_key())
        .await
        .unwrap();
    assert_eq!(identity.user, "ops");
    let at_agent = validator
        .verify_identity(access.der(), Purpose::ProxyToAgent, now)
        .unwrap();
    assert_eq!(
        at_agent.identity().route.as_ref().unwrap().service,
        "dev-pg"
    );
    // The proxy→agent certificate lives minutes, and carries the user certificate's
    // own expiry for the agent's disconnect_expired_cert.
    let user_expires = validator
        .verify_identity(db_cert.der(), Purpose::UserDatabase, now)
        .unwrap()
        .identity()
        .expires;
    assert!(at_agent.identity().expires.as_secs() <= now.as_secs() + 600);
    assert!(user_expires.as_secs() > now.as_secs() + 600);
    assert_eq!(
        at_agent.identity().traits[postern_auth::signing::SESSION_EXPIRES_TRAIT],
        vec![user_expires.as_secs().to_string()]
    );
    assert!(
        f.server
            .issue_db_access(&agent, db_cert.der(), &agent_key.public_key())
            .await
            .is_err(),
        "agents are not proxies"
    );
    assert!(
        f.server
            .issue_db_access(&proxy, login.cert.der(), &proxy_key.public_key())
            .await
            .is_err(),
        "needs a routed cert"
    );

    f.server
        .issue_db_client(&agent, "app", &agent_key.public_key())
        .await
        .unwrap();
    assert!(
        f.server
            .issue_db_client(&proxy, "app", &proxy_key.public_key())
            .await
            .is_err(),
        "proxies are not agents"
    );
}

// A CA rotation goes standby → init → update_clients → update_servers → standby, trusting both CAs in flight.
#[tokio::test]
async fn ca_rotation_trusts_both_in_flight() {
    let f = fixture().await;
    let k = key();
    let old = f
        .server
        .login("ops", PASSWORD, None, SOURCE, &k.public_key(), None)
        .await
        .unwrap();
    let mut phases = Vec::new();
    let mut new = None;
    for _ in 0..4 {
        let phase = f.server.rotate_ca("root", CaKind::User).await.unwrap();
        phases.push(phase);
        let validator = f.server.validator().await.unwrap();
        if phase != RotationPhase::Standby {
            assert_eq!(
                f.server
                    .ca_status(CaKind::User)
                    .await
                    .unwrap()
                    .trusted
                    .len(),
                2
            );
            validator
                .verify_identity(old.cert.der(), Purpose::UserLogin, f.clock.now())
                .expect("old CA trusted in flight");
        }
        if phase == RotationPhase::UpdateClients {
            new = Some(
                f.server
                    .login("ops", PASSWORD, None, SOURCE, &k.public_key(), None)
                    .await
                    .unwrap(),
            );
        }
    }
    assert_eq!(
        phases,
        [
            RotationPhase::Init,
            RotationPhase::UpdateClients,
            RotationPhase::UpdateServers,
            RotationPhase::Standby
        ]
    );
    let validator = f.server.validator().await.unwrap();
    let refused = validator
        .verify_identity(old.cert.der(), Purpose::UserLogin, f.clock.now())
        .unwrap_err();
    assert!(refused.to_string().contains("rotated"), "{refused}");
    validator
        .verify_identity(new.unwrap().cert.der(), Purpose::UserLogin, f.clock.now())
        .expect("new CA trusted");
    assert_eq!(
        f.server
            .ca_status(CaKind::User)
            .await
            .unwrap()
            .trusted
            .len(),
        1
    );

    let query = AuditQuery {
        event: Some("auth.ca.rotation".into()),
        ..AuditQuery::between(
            time::OffsetDateTime::UNIX_EPOCH,
            time::macros::datetime!(2100-01-01 0:00 UTC),
        )
    };
    assert_eq!(f.server.audit_log().search(&query).await.unwrap().len(), 4);
}

// admin auth sign --format db writes key, cert and a CA bundle that holds both CAs during a rotation.
#[tokio::test]
async fn db_server_files() {
    let f = fixture().await;
    let hosts = vec!["db.internal".to_owned(), "10.0.0.5".to_owned()];
    let files = f
        .server
        .sign_db_server("root", &hosts, Duration::from_secs(2190 * 3600))
        .await
        .unwrap();
    assert!(files.server_crt.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(files.server_key.contains("PRIVATE KEY"));
    assert_eq!(files.server_cas.matches("BEGIN CERTIFICATE").count(), 1);
    f.server.rotate_ca("root", CaKind::Db).await.unwrap();
    let files = f
        .server
        .sign_db_server("root", &hosts, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(files.server_cas.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(
        f.server
            .sign_db_server("root", &[], Duration::from_secs(3600))
            .await
            .is_err()
    );
}
